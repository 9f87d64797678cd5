"""The quantization plan: what gets quantized and how, as data.

:func:`build_plan` walks the float IR with a rule table (:mod:`edgec.quant_rules`), the
calibrated activation ranges and a scheme's switches, and returns a :class:`QuantPlan`:

- ``activations``: tensor -> :class:`ActQuant` (scale, zero point, dtype, and which readers read
  the dequantized copy: every reader, or the listed ``(node, input slot)`` edges);
- ``weights``: layer -> :class:`WeightQuant` (axis, bits, storage type, bias handling);
- ``folded``: the Relu/Clip nodes removed and absorbed into their input's range;
- ``bias_shift``: per-layer bias corrections (added to the int32 bias).

Nodes are identified by their first output's name (unique in a valid graph, and the same in
the IR and in the ONNX model exported from it). The plan is evaluated without rewriting the IR
(:mod:`edgec.quant_probe`) and written into the IR by one materialiser
(:class:`edgec.passes.quantize.QuantizeQDQ`); both compute weights and biases with the
functions here, so what was measured is what is written.

Numerics
- Weights (``WeightQuant.kind``): ``int8`` symmetric [-127, 127]; ``int7`` symmetric [-63, 63]
  in int8 storage (``2 * 255 * 63 < 2**15``: no int16 saturation in ONNX Runtime's no-VNNI U8S8
  kernels); ``uint8`` asymmetric with a zero point per channel (U8U8); ``int4`` the grid [-8, 7]
  (scale ``max|w| / 7``) in int8 storage (ONNX has no INT4 type at opset 17: the numerics are
  int4's, the file size int8's). Depthwise convolutions keep int8 under int7/uint8 (their kernels
  widen to int16 and never saturate, and ONNX Runtime has no fast U8U8 depthwise kernel).
  Scales per output channel (:func:`weight_axis`) or per tensor, rounded to float32.
- Bias of Conv/ConvTranspose/Gemm (``bias="int32"``): int32 at scale input scale x weight
  scale (per channel), zero point 0, the form QLinearConv/QGemm take; kept float when it would
  overflow int32.
- Activations: ``asymmetric`` uint8 with a zero point; ``symmetric`` int8 [-127, 127], zero
  point 0; one scale per tensor. The int8 fallback's last step (schemes with
  ``wide_activations``) gives chosen tensors 16 bits over the same range (:func:`widened`:
  uint16 / int16 [-32767, 32767]).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import onnx_graphsurgeon as gs

from .errors import UserError
from .ir import IR, is_empty
from .quant_rules import OpRule, table_for

PRECISIONS = ("fp32", "fp16", "int8", "int4")
INT_PRECISIONS = ("int8", "int4")
WEIGHT_TYPES = ("int8", "int7", "uint8")
MIN_SCALE = 1e-8
# an op whose inputs share one scale (Concat) stays float when their ranges differ more than this:
# the smaller input would keep fewer than 255 / ratio levels (detection heads concatenate
# [0, 1] scores with pixel-scale boxes)
MAX_SHARED_SPAN_RATIO = 16.0
# a tensor that reaches only graph outputs, or ops whose input stays float (OpRule.float_input:
# LSTM/GRU, Exp), through data movement and constant affine arithmetic gets no Q/DQ: graph
# outputs stay float, one per-tensor scale on the last layer's output would crush its small
# channels (a head whose channels span 1e-3..1e3), and a static scale on the input of an exp or a
# recurrence saturates on data beyond the calibration set's range (a box width of 594 pixels
# came out 326)
FLOAT_OUTPUT_TAILS = True
_PASS_THROUGH = ("Split", "Concat", "Slice", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity")


# ====================================================================== the plan (data)
@dataclass(frozen=True)
class ActQuant:
    scale: np.float32
    zero_point: int
    dtype: str  # "uint8" | "int8" | "uint16" | "int16" (the fallback's 16-bit activations)
    readers: frozenset | None = None  # None: every reader; else {(node id, input slot)}
    # the observed range of its scale group (min-max), which 16 bits cover whole: an 8-bit range
    # clipped by percentile or MSE is widened to it (clipping error is not rounding error)
    full: tuple[float, float] | None = None


class Ranges(dict):
    """Calibrated ranges (tensor -> (lo, hi)) with ``full``: each tensor's observed min-max range
    (of the statistics the ranges came from), which :func:`widened` gives a 16-bit tensor.
    A plain dict works too (16 bits then cover the 8-bit range)."""

    def __init__(self, ranges=(), *, full: dict | None = None):
        super().__init__(ranges)
        self.full = full


@dataclass(frozen=True)
class WeightQuant:
    layer: str  # the user-facing name (node name, or its output's)
    op: str
    axis: int | None
    kind: str  # "int8" | "int7" | "uint8" | "int4"
    bias: str  # "int32" | "float"
    input: str  # the activation tensor whose scale the int32 bias uses


@dataclass
class QuantPlan:
    activations: dict[str, ActQuant] = field(default_factory=dict)
    weights: dict[str, WeightQuant] = field(default_factory=dict)  # node id -> weight
    folded: tuple[str, ...] = ()  # node ids of Relu/Clip folded into ranges
    quantized_ops: int = 0
    bias_shift: dict[str, np.ndarray] = field(default_factory=dict)  # node id -> per-channel shift
    weight_format: str = "integer"  # "integer" (int initializer -> DQ) | "float-qdq" (float -> Q -> DQ)
    float_layers: tuple[tuple[str, str], ...] = ()  # (layer, why it stays float)
    residual_adds: int = 0
    # node id -> (stored levels, scales, zero points) chosen for the layer's output
    # (edgec.rounding) instead of nearest rounding; same scales and zero points as nearest
    rounded: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)

    def with_bias_shift(self, shifts: dict[str, np.ndarray]) -> "QuantPlan":
        return replace(self, bias_shift=dict(shifts))

    def summary(self) -> dict:
        kinds = [w.kind for w in self.weights.values()]
        return {"layers_int8": sum(k != "int4" for k in kinds), "layers_int4": kinds.count("int4"),
                "activations_quantized": len(self.activations), "relu_folded": len(self.folded),
                "ops_quantized": self.quantized_ops}


# ====================================================================== numerics
def node_id(node: gs.Node) -> str:
    return node.outputs[0].name if node.outputs else node.name


def node_key(node: gs.Node) -> str:
    """The user-facing name of a layer (precision plans, --keep-float, reports)."""
    return node.name or (node.outputs[0].name if node.outputs else "")


def weight_axis(node: gs.Node, ndim: int | None = None) -> int | None:
    """The per-output-channel axis of the weight of ``node`` (None: per-tensor only)."""
    axis = None
    if node.op == "Conv":
        axis = 0
    elif node.op == "ConvTranspose":
        axis = 1 if int(node.attrs.get("group", 1)) == 1 else None
    elif node.op == "Gemm":
        axis = 0 if int(node.attrs.get("transB", 0)) else 1
    elif node.op == "MatMul":
        axis = 1
    if axis is not None and ndim is not None and axis >= ndim:
        return None
    return axis


def is_depthwise(node: gs.Node, w: np.ndarray) -> bool:
    """One input and one output channel per group: ONNX Runtime's depthwise kernels widen to
    int16 before multiplying and never saturate."""
    g = int(node.attrs.get("group", 1))
    return node.op == "Conv" and g > 1 and w.ndim >= 3 and w.shape[1] == 1 and w.shape[0] == g


def quantize_weight(w: np.ndarray, axis: int | None, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric quantization: (int8 values, float32 scales), per ``axis`` or scalar.

    ``q = clip(round_half_even(w / scale), qmin, qmax)`` with ``scale = max|w| / qmax`` rounded to
    float32; int8: [-127, 127]; int7: [-63, 63]; int4: [-8, 7] (scale max|w| / 7)."""
    qmax = {8: 127, 7: 63, 4: 7}[bits]
    qmin = -qmax - (1 if bits == 4 else 0)
    if axis is None:
        amax = float(np.max(np.abs(w))) if w.size else 0.0
        scale = np.asarray(amax / qmax if amax > 0 else 1.0, dtype=np.float32)
        q = np.rint(w.astype(np.float64) / np.float64(scale))
    else:
        other = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.max(np.abs(w), axis=other).astype(np.float64) if w.size else np.zeros(w.shape[axis])
        scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
        q = np.rint(w.astype(np.float64) / scale.astype(np.float64).reshape(axis_shape(w.ndim, axis)))
    np.clip(q, qmin, qmax, out=q)
    return q.astype(np.int8), scale


def quantize_weight_uint8(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric uint8 (U8U8): (uint8 values, float32 scales, uint8 zero points). The range
    ``[min(w, 0), max(w, 0)]`` maps onto [0, 255], ``scale = (hi - lo) / 255``, ``zp = round(-lo /
    scale)``, so 0 is exact."""
    w64 = w.astype(np.float64)
    if axis is None:
        lo = np.asarray(min(float(w64.min()), 0.0) if w.size else 0.0)
        hi = np.asarray(max(float(w64.max()), 0.0) if w.size else 0.0)
    else:
        other = tuple(i for i in range(w.ndim) if i != axis)
        lo = np.minimum(w64.min(axis=other), 0.0) if w.size else np.zeros(w.shape[axis])
        hi = np.maximum(w64.max(axis=other), 0.0) if w.size else np.zeros(w.shape[axis])
    span = hi - lo
    scale = np.where(span > 0, span / 255.0, 1.0).astype(np.float32)
    zp = np.clip(np.rint(-lo / scale.astype(np.float64)), 0, 255)
    if axis is None:
        q = np.rint(w64 / np.float64(scale)) + zp
    else:
        shape = axis_shape(w.ndim, axis)
        q = np.rint(w64 / scale.astype(np.float64).reshape(shape)) + zp.reshape(shape)
    np.clip(q, 0, 255, out=q)
    return q.astype(np.uint8), scale, zp.astype(np.uint8)


def axis_shape(ndim: int, axis: int) -> list[int]:
    shape = [1] * ndim
    shape[axis] = -1
    return shape


def activation_params(lo: float, hi: float, symmetric: bool) -> tuple[np.float32, int]:
    """(scale, zero point) for an activation range."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if symmetric:
        t = max(-lo, hi)
        return np.float32(max(t / 127.0, MIN_SCALE)), 0
    scale = max((hi - lo) / 255.0, MIN_SCALE)
    zp = int(np.clip(np.round(-lo / scale), 0, 255))
    return np.float32(scale), zp


WIDE = {"uint8": "uint16", "int8": "int16"}  # an activation type -> its 16-bit form
QRANGE = {"uint8": (0, 255), "int8": (-128, 127), "uint16": (0, 65535), "int16": (-32768, 32767)}


def is_wide(dtype: str) -> bool:
    """Whether an activation type is a 16-bit one (the fallback's)."""
    return dtype in WIDE.values()


def qdq_domain(dtype: str, opset: int) -> str:
    """The domain of the QuantizeLinear/DequantizeLinear of an activation of ``dtype`` in a model
    at ``opset``: ai.onnx's, except 16-bit types before opset 21 (ONNX Runtime's ``com.microsoft``
    ones, which take them)."""
    return "com.microsoft" if is_wide(dtype) and opset < 21 else ""


def widened(aq: ActQuant) -> ActQuant:
    """``aq``'s range (the float values its 8-bit levels span, extended to its group's observed
    range ``aq.full`` where the 8-bit range clipped it) on 16 bits: at least 257 levels for each
    of the 8-bit ones; a 16-bit ``aq`` is returned as it is."""
    if aq.dtype not in WIDE:
        return aq
    s = float(aq.scale)
    if aq.dtype == "int8":  # symmetric: zero point 0, [-127, 127] -> [-32767, 32767]
        t = max(s * 127.0, *(abs(v) for v in aq.full)) if aq.full is not None else s * 127.0
        return replace(aq, scale=np.float32(max(t / 32767.0, MIN_SCALE)), zero_point=0, dtype="int16")
    lo, hi = (0 - aq.zero_point) * s, (255 - aq.zero_point) * s
    if aq.full is not None:
        lo, hi = min(lo, aq.full[0]), max(hi, aq.full[1])
    scale = max((hi - lo) / 65535.0, MIN_SCALE)
    zp = int(np.clip(np.round(-lo / scale), 0, 65535))
    return replace(aq, scale=np.float32(scale), zero_point=zp, dtype="uint16")


def weight_arrays(w: np.ndarray, wq: WeightQuant, rounded=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(stored values, float32 scales, zero points) of a weight under ``wq``; ``rounded``: the
    plan's chosen (levels, scales, zero points) for this layer, when it has them."""
    if rounded is not None:
        return rounded
    if wq.kind == "uint8":
        return quantize_weight_uint8(w, wq.axis)
    q, scale = quantize_weight(w, wq.axis, {"int8": 8, "int7": 7, "int4": 4}[wq.kind])
    return q, scale, np.zeros(scale.shape, dtype=np.int8)


def dequantize(q: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int | None) -> np.ndarray:
    """What DequantizeLinear computes: ``float32(int32(q) - int32(zp)) * scale`` in float32."""
    if axis is not None and np.ndim(scale):
        shape = axis_shape(q.ndim, axis)
        scale, zp = np.reshape(scale, shape), np.reshape(zp, shape)
    diff = q.astype(np.int32) - np.asarray(zp).astype(np.int32)
    return diff.astype(np.float32) * np.asarray(scale, dtype=np.float32)


def fake_quantized_weight(w: np.ndarray, wq: WeightQuant, weight_format: str, rounded=None) -> np.ndarray:
    """The float weight the quantized layer computes with, bit for bit as ONNX Runtime's
    DequantizeLinear (and, for ``float-qdq``, QuantizeLinear in float32) produce it."""
    if rounded is not None:  # float-qdq stores exactly these dequantized levels: Q gives them back
        return dequantize(*weight_arrays(w, wq, rounded), wq.axis)
    if weight_format == "float-qdq":
        _, scale, _ = weight_arrays(w, wq)
        s = scale.reshape(axis_shape(w.ndim, wq.axis)) if wq.axis is not None and scale.ndim else scale
        q = np.clip(np.rint(w.astype(np.float32) / s.astype(np.float32)), -127, 127)
        return (q.astype(np.float32) * s.astype(np.float32)).astype(np.float32)
    q, scale, zp = weight_arrays(w, wq)
    return dequantize(q, scale, zp, wq.axis)


def out_channels(node: gs.Node, w: np.ndarray) -> int:
    if node.op == "Conv":
        return w.shape[0]
    if node.op == "ConvTranspose":
        return w.shape[1] * int(node.attrs.get("group", 1))
    if node.op == "Gemm":
        return w.shape[0] if int(node.attrs.get("transB", 0)) else w.shape[1]
    return w.shape[-1]


@dataclass
class BiasForm:
    """How a quantized layer's bias is written: ``q`` int32 at ``scale`` (zero point 0), or a
    float ``value`` (``q`` None); ``None`` overall means the bias input is left alone."""

    value: np.ndarray  # float32, what the layer adds
    q: np.ndarray | None = None
    scale: np.ndarray | None = None
    note: str | None = None


def bias_form(node: gs.Node, w: np.ndarray, b: np.ndarray | None, has_bias_input: bool, x_scale, w_scale,
              shift, bias: str) -> BiasForm | None:
    """The bias a quantized layer gets (None: its bias input stays as it is)."""
    if node.op not in ("Conv", "ConvTranspose", "Gemm") or x_scale is None or bias != "int32":
        return None
    out_ch = out_channels(node, w)
    if has_bias_input:
        if b is None:
            return None
        b = b.astype(np.float64)
        if node.op == "Gemm":
            if b.ndim != 1 or b.shape[0] != out_ch:
                return None  # a broadcast C stays float
            b = b * float(node.attrs.get("beta", 1.0))
    else:
        if shift is None:
            return None
        b = np.zeros(out_ch)
    if shift is not None:
        b = b + np.asarray(shift, dtype=np.float64).reshape(-1)
    ws = w_scale.astype(np.float64) if np.ndim(w_scale) else np.full(out_ch, float(w_scale))
    if ws.shape[0] != out_ch:  # per-channel axis that is not the output axis: per-tensor form
        ws = np.full(out_ch, float(np.max(ws)))
    b_scale = (np.float64(x_scale) * ws).astype(np.float32)
    if np.any(b_scale <= 0):  # (an all-zero weight channel, or an input that is constant zero)
        return BiasForm(value=b.astype(np.float32), note="zero scale")
    qb = np.round(b / b_scale.astype(np.float64))
    if np.any(np.abs(qb) > 2**31 - 1):
        return BiasForm(value=b.astype(np.float32), note="int32 overflow")
    q = qb.astype(np.int32)
    return BiasForm(value=dequantize(q, b_scale, np.zeros(out_ch, dtype=np.int32), 0), q=q, scale=b_scale)


# ====================================================================== building a plan
def weight_ok(ir: IR, n: gs.Node) -> bool:
    """A weighted op edgec can quantize: a constant float32 weight of the expected rank, read by
    an op whose activation input is float32."""
    if len(n.inputs) < 2 or not n.outputs:
        return False
    x, w = n.inputs[0], n.inputs[1]
    if ir.is_const(x) or not ir.is_const(w):
        return False
    wv = ir.const_value(w)
    if wv is None or wv.dtype != np.float32:
        return False
    if x.dtype is not None and np.dtype(x.dtype) != np.float32:
        return False
    if n.op == "MatMul" and wv.ndim != 2:
        return False
    if n.op == "Gemm" and (n.attrs.get("transA", 0) or wv.ndim != 2):
        return False
    if n.op in ("Conv", "ConvTranspose") and wv.ndim < 3:
        return False
    return True


def weighted_nodes(ir: IR, table: dict[str, OpRule] | None = None) -> list[gs.Node]:
    """Layers a plan can quantize as weighted ops (constant float weight), in graph order."""
    table = table if table is not None else table_for(None)
    return [n for n in ir.nodes if n.op in table and table[n.op].weighted and _default_domain(n) and weight_ok(ir, n)]


def _siblings(layers: list[gs.Node]) -> list[list[gs.Node]]:
    """``layers`` in groups of two or more that read the same (first) input tensor."""
    by_input: dict[str, list[gs.Node]] = {}
    for n in layers:
        by_input.setdefault(n.inputs[0].name, []).append(n)
    return [g for g in by_input.values() if len(g) > 1]


def _default_domain(n: gs.Node) -> bool:
    return n.domain in (None, "", "ai.onnx")



def kept_float(node: gs.Node, keep: set) -> bool:
    return bool(keep) and (node_key(node) in keep or node.name in keep or any(o.name in keep for o in node.outputs))


def build_plan(ir: IR, scheme, ranges: dict, *, precisions: dict | None = None, keep_float=(),
               activations: str | None = None, weights: str | None = None, wide=()) -> QuantPlan:
    """The plan for ``ir`` under ``scheme`` (a :class:`edgec.target.QuantScheme`), given the
    calibrated ``ranges`` (tensor -> (lo, hi)); ``precisions`` (layer -> fp32/int8/int4, default
    int8) and ``keep_float`` (node or tensor names) exclude layers; ``activations``/``weights``
    override the scheme's; the activation tensors in ``wide`` get 16 bits (:func:`widened`)."""
    plan = _Planner(ir, scheme, ranges, precisions or {}, set(keep_float or ()),
                    activations or scheme.activations, weights or scheme.weights).run()
    return with_wide(plan, wide)


def scale_groups(ir: IR, plan: QuantPlan) -> dict[str, list[str]]:
    """The plan's quantized tensors in groups sharing one scale through an op (a folded ReLU, a
    data-movement op, a Concat): group's first tensor -> its tensors. Widen or float a group
    whole: the materialised model gives a folded ReLU's readers its input's Q/DQ."""
    acts = plan.activations
    parent = {t: t for t in acts}

    def find(t):
        while parent[t] != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t

    for n in ir.nodes:
        ins = [x.name for x in n.inputs if x.name in acts]
        for o in n.outputs:
            for i in ins:
                if o.name in acts and (acts[i].scale, acts[i].zero_point) == (acts[o.name].scale, acts[o.name].zero_point):
                    parent[find(o.name)] = find(i)
    groups: dict[str, list[str]] = {t: [] for t in acts if find(t) == t}
    for t in acts:
        groups[find(t)].append(t)
    return groups


def with_wide(plan: QuantPlan, wide) -> QuantPlan:
    """``plan`` with the activation tensors in ``wide`` on 16 bits."""
    wide = set(wide or ())
    if not wide & set(plan.activations):
        return plan
    return replace(plan, activations={t: widened(a) if t in wide else a for t, a in plan.activations.items()})


def clip_bounds(ir: IR, n: gs.Node) -> tuple:
    """A Clip's (min, max) as constants, either None where it has none or it is not constant
    (an empty or missing input; the opset < 11 attributes, min defaulting to -inf)."""
    lo = ir.const_value(n.inputs[1]) if len(n.inputs) > 1 and not is_empty(n.inputs[1]) else None
    hi = ir.const_value(n.inputs[2]) if len(n.inputs) > 2 and not is_empty(n.inputs[2]) else None
    if "min" in n.attrs or "max" in n.attrs:  # opset < 11 form
        lo = np.asarray(n.attrs.get("min", -np.inf))
        hi = np.asarray(n.attrs.get("max", np.inf)) if "max" in n.attrs else None
    return lo, hi

class _Planner:
    def __init__(self, ir: IR, scheme, ranges, precisions, keep, activations, weights):
        if activations not in ("asymmetric", "symmetric"):
            raise UserError(f"activations must be 'asymmetric' or 'symmetric', got '{activations}'")
        if weights not in ("per-channel", "per-tensor"):
            raise UserError(f"weights must be 'per-channel' or 'per-tensor', got '{weights}'")
        bad = [v for v in precisions.values() if v not in PRECISIONS]
        if bad:
            raise UserError(f"unknown precision '{bad[0]}' in the precision plan (known: {', '.join(PRECISIONS)})")
        if scheme.weight_type not in WEIGHT_TYPES:
            raise UserError(f"weight type must be one of {', '.join(WEIGHT_TYPES)}, got '{scheme.weight_type}'")
        self.ir, self.scheme, self.ranges = ir, scheme, ranges
        self.precisions, self.keep = precisions, keep
        self.symmetric = activations == "symmetric"
        self.per_channel = weights == "per-channel"
        self.table = table_for(scheme)
        self.crushed: dict[str, str] = {}  # shared-scale ops kept float, and why
        self.fold_caps: dict[str, tuple[str, float | None]] = {}  # folded Relu/Clip's tensors -> (its output, its cap)

    def rule(self, n: gs.Node) -> OpRule | None:
        return self.table.get(n.op) if _default_domain(n) else None

    def _precision(self, n: gs.Node) -> str:
        """A layer's precision in the plan, named by its node name or its output (the loader names
        unnamed nodes ``<op>_<output>``, and a plan may name them by the output)."""
        return self.precisions.get(node_key(n), self.precisions.get(node_id(n), "int8"))

    def run(self) -> QuantPlan:
        ir = self.ir
        ir.toposort()
        floats: list[tuple[str, str]] = self._float_by_rule()
        weighted = []
        for n in weighted_nodes(ir, self.table):
            key = node_key(n)
            if self._precision(n) not in INT_PRECISIONS:
                continue
            if kept_float(n, self.keep):
                floats.append((key, "keep_float"))
                continue
            why = self.table[n.op].check(n) if self.table[n.op].check else None
            if why:
                floats.append((key, why))
                continue
            if n.inputs[0].name not in self.ranges:
                floats.append((key, f"no calibrated range for '{n.inputs[0].name}'"))
                continue
            weighted.append(n)
        if self.scheme.sibling_outputs:
            weighted = self._float_siblings(weighted, floats)
        if not weighted:
            return QuantPlan(weight_format=self.scheme.weight_format, float_layers=tuple(floats))
        qnodes: set[int] = {id(n) for n in weighted}
        qtensors: dict[str, gs.Tensor] = {}
        edges: dict[str, set] = {}  # tensors only some readers read quantized: those edges
        producer_q: set[str] = set()  # tensors every reader reads quantized
        folded: dict[int, gs.Node] = {}
        override: dict[str, tuple[float, float]] = {}
        for n in weighted:
            qtensors[n.inputs[0].name] = n.inputs[0]
        for n in weighted:
            self._mark_output(n, qtensors, producer_q, force=False)
        changed = True
        while changed:  # fixed point over the ops that follow quantized inputs (and ReLU folding)
            changed = False
            for n in ir.nodes:
                if id(n) in qnodes or id(n) in folded or kept_float(n, self.keep):
                    continue
                r = self.rule(n)
                if r is None:
                    continue
                if r.removable and self._try_fold(n, r, qnodes, folded, override):
                    out = n.outputs[0]
                    if not ir.is_graph_output(out) and out.name in self.ranges:
                        qtensors[out.name] = out
                        producer_q.add(out.name)
                    changed = True
                    continue
                if not r.follows or not self._follows(n, r, qtensors):
                    continue
                qnodes.add(id(n))
                for t in n.inputs:
                    if not ir.is_const(t) and not is_empty(t):
                        qtensors[t.name] = t
                self._mark_output(n, qtensors, producer_q, force=True)
                changed = True
        # outputs quantized only for quantized readers: dropped when none is (last readers first,
        # so a chain of such ops drops together); a following op whose output drops runs float
        for n in reversed(ir.nodes):
            r = self.rule(n)
            out = n.outputs[0] if n.outputs else None
            if r is None or r.output != "for-quantized-readers" or id(n) not in qnodes or out is None \
                    or out.name not in qtensors or any(id(c) in qnodes for c in out.outputs):
                continue
            del qtensors[out.name]
            producer_q.discard(out.name)
            if not r.weighted:
                qnodes.discard(id(n))
        if self.scheme.sibling_outputs:
            self._sibling_outputs(weighted, qtensors, producer_q)
        residual = self._residual_adds(weighted, qtensors, edges)

        # scale groups
        parent: dict[str, str] = {}

        def find(a):
            while parent.get(a, a) != a:
                a = parent[a]
            return a

        def union(a, b):
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[rb] = ra

        def rng(name):
            return override.get(name, self.ranges[name])

        for name, t in qtensors.items():  # ops whose output range is fixed by their math
            prod = ir.producer(t)
            r = self.rule(prod) if prod is not None else None
            if r is not None and r.fixed_range is not None and self.scheme.fixed_ranges:
                override[name] = r.fixed_range
        for n in folded.values():
            union(n.inputs[0].name, n.outputs[0].name)
        for n in ir.nodes:
            if id(n) not in qnodes or n.outputs[0].name not in qtensors:
                continue
            r = self.rule(n)
            if r is None:
                continue
            if r.share_scale == "input":
                union(n.inputs[0].name, n.outputs[0].name)
            elif r.share_scale == "all":
                names = [t.name for t in n.inputs] + [n.outputs[0].name]
                signs = {rng(x)[0] >= 0 for x in names if x in self.ranges or x in override}
                if len(signs) == 1 or self.symmetric:
                    for x in names[1:]:
                        union(names[0], x)

        def group_spans(range_of) -> dict[str, list[float]]:
            """Each scale group's [lo, hi] over its tensors' ranges; a folded activation's keeps its zero floor."""
            spans: dict[str, list[float]] = {}
            for name in qtensors:
                lo, hi = range_of(name)
                g = spans.setdefault(find(name), [0.0, 0.0])
                g[0], g[1] = min(g[0], lo), max(g[1], hi)
            for n in folded.values():
                g = spans.get(find(n.outputs[0].name))
                if g is not None and g[0] < 0:
                    g[0] = 0.0
            return spans

        group_range = group_spans(lambda name: rng(name) if (name in self.ranges or name in override) else (0.0, 0.0))
        full = getattr(self.ranges, "full", None)

        def full_range(name):  # the observed range, with the same folds and fixed ranges
            if name in self.fold_caps:
                y, cap = self.fold_caps[name]
                hi = max(full.get(y, self.ranges[y])[1], 0.0)
                return 0.0, (min(hi, cap) if cap is not None else hi)
            if name in override:  # a fixed range
                return override[name]
            return full.get(name, self.ranges[name]) if name in self.ranges else (0.0, 0.0)

        group_full = group_spans(full_range) if full is not None else {}
        dtype = "int8" if self.symmetric else "uint8"
        acts: dict[str, ActQuant] = {}
        for name, t in qtensors.items():
            scale, zp = activation_params(*group_range[find(name)], self.symmetric)
            if name in producer_q:
                readers = None
            else:
                readers = {(node_id(c), i) for c in t.outputs if id(c) in qnodes
                           for i, x in enumerate(c.inputs) if x is t}
                readers |= edges.get(name, set())
                if not readers:
                    continue
                readers = frozenset(readers)
            gf = group_full.get(find(name))
            acts[name] = ActQuant(scale, zp, dtype, readers, None if gf is None else (float(gf[0]), float(gf[1])))
        wq = {}
        for n in weighted:
            w = ir.const_value(n.inputs[1])
            prec = self._precision(n)
            if prec == "int4":
                kind = "int4"
            elif self.scheme.weight_type != "int8" and is_depthwise(n, w):
                kind = "int8"
            else:
                kind = self.scheme.weight_type
            axis = weight_axis(n, w.ndim) if self.per_channel else None
            wq[node_id(n)] = WeightQuant(node_key(n), n.op, axis, kind, self.scheme.bias, n.inputs[0].name)
        return QuantPlan(activations=acts, weights=wq, folded=tuple(node_id(n) for n in folded.values()),
                         quantized_ops=len(qnodes), weight_format=self.scheme.weight_format,
                         float_layers=tuple(floats) + tuple(self.crushed.items()), residual_adds=residual)

    # ------------------------------------------------------------------ decisions
    def _float_siblings(self, weighted: list[gs.Node], floats: list) -> list[gs.Node]:
        """``weighted`` without the layers that read one tensor with a layer kept float (by
        --keep-float, the fallback, a rule or the precision plan), which join ``floats``: RKNN
        computes the float one in FP16 and cannot build it beside an int8 one
        (:attr:`QuantScheme.sibling_outputs`)."""
        quantized = {id(n) for n in weighted}
        dropped: set[int] = set()
        for siblings in _siblings(weighted_nodes(self.ir, self.table)):
            kept = [m for m in siblings if id(m) not in quantized]
            if not kept or len(kept) == len(siblings):
                continue
            for m in siblings:
                if id(m) in quantized:
                    dropped.add(id(m))
                    floats.append((node_key(m), f"reads '{m.inputs[0].name}' beside '{node_key(kept[0])}', which stays "
                                                f"float: RKNN cannot build an int8 layer beside an FP16 one on one tensor"))
        return [n for n in weighted if id(n) not in dropped]

    def _sibling_outputs(self, weighted: list[gs.Node], qtensors, producer_q) -> None:
        """Weighted ops reading one tensor all give their outputs Q/DQ when one of them does
        (:attr:`QuantScheme.sibling_outputs`): a YOLOX head's box conv, whose output only a float
        Concat reads, beside the objectness conv whose Sigmoid is quantized."""
        for siblings in _siblings(weighted):
            if not any(m.outputs[0].name in qtensors for m in siblings):
                continue
            for m in siblings:
                out = m.outputs[0]
                # (a float tail too: its own scale, and the alternative is no build at all)
                if out.name in qtensors or self.ir.is_graph_output(out) or out.name not in self.ranges:
                    continue
                qtensors[out.name] = out
                producer_q.add(out.name)

    def _mark_output(self, n: gs.Node, qtensors, producer_q, force: bool) -> None:
        out = n.outputs[0]
        r = self.rule(n)
        if self.ir.is_graph_output(out) or out.name not in self.ranges or r is None or r.output == "never":
            return
        if r.output == "for-quantized-readers" and not force:
            if not any(self.rule(c) is not None and not self.rule(c).residual for c in out.outputs):
                return
        if FLOAT_OUTPUT_TAILS and self._float_tail(out):
            return
        qtensors[out.name] = out
        producer_q.add(out.name)

    def _try_fold(self, n: gs.Node, r: OpRule, qnodes, folded, override) -> bool:
        """Asymmetric activations: a Relu/Clip(0, c) alone reading a quantized op's output."""
        ir = self.ir
        if self.symmetric:
            return False
        x, y = n.inputs[0], n.outputs[0]
        prod = ir.producer(x)
        if prod is None or id(prod) not in qnodes or ir.single_consumer(x) is not n:
            return False
        if ir.is_graph_output(y) or y.name not in self.ranges:
            return False
        hi_cap = None
        if n.op == "Clip":
            lo_v, hi_v = clip_bounds(ir, n)
            if lo_v is None or float(lo_v) != 0.0:
                return False
            if len(n.inputs) > 2 and not is_empty(n.inputs[2]) and hi_v is None:
                return False
            hi_cap = float(hi_v) if hi_v is not None else None
        lo, hi = self.ranges[y.name]
        hi = max(hi, 0.0)
        if hi_cap is not None:
            hi = min(hi, hi_cap)
        override[x.name] = (0.0, hi)
        override[y.name] = (0.0, hi)
        self.fold_caps[x.name] = self.fold_caps[y.name] = (y.name, hi_cap)
        folded[id(n)] = n
        qnodes.add(id(n))
        return True

    def _follows(self, n: gs.Node, r: OpRule, qtensors) -> bool:
        ir = self.ir
        acts = [t for t in n.inputs if not is_empty(t) and not ir.is_const(t)]
        if not acts or not n.outputs:
            return False
        if any(t.dtype is not None and np.dtype(t.dtype) != np.float32 for t in acts):
            return False
        if r.inputs == "any":
            ok = len(acts) == len(n.inputs)
        elif r.inputs == 1:
            ok = len(acts) == 1 and n.inputs[0] is acts[0] and len(n.outputs) == 1
        else:
            ok = len(acts) == r.inputs and len(n.inputs) == r.inputs
        if not ok or (r.check is not None and r.check(n)):
            return False
        if r.share_scale == "all" and len(acts) > 1 and all(t.name in self.ranges for t in acts):
            spans = [max(self.ranges[t.name][1], 0.0) - min(self.ranges[t.name][0], 0.0) for t in acts]
            if min(spans) > 0 and max(spans) / min(spans) > MAX_SHARED_SPAN_RATIO:
                small = min(range(len(acts)), key=lambda i: spans[i])
                self.crushed[node_key(n)] = (
                    f"its inputs' ranges differ {max(spans) / min(spans):.0f}x: one shared int8 scale would leave "
                    f"'{acts[small].name}' about {max(2, int(255 * min(spans) / max(spans)))} levels; the "
                    f"Concat runs float and each input keeps its own scale")
                return False
        if not all(t.name in qtensors for t in acts):
            return False
        if not (all(t.name in self.ranges for t in acts) and n.outputs[0].name in self.ranges
                or (ir.is_graph_output(n.outputs[0]) and all(t.name in self.ranges for t in acts))):
            return False
        return True

    def _float_by_rule(self) -> list[tuple[str, str]]:
        """The ops this table keeps float on purpose (``float_reason``), and MatMuls of two
        activations (attention's Q x K^T and weights x V: only a constant weight is quantized)."""
        out = []
        for n in self.ir.nodes:
            r = self.rule(n)
            if r is None or kept_float(n, self.keep):
                continue
            if r.float_reason:
                out.append((node_key(n), r.float_reason))
            elif r.weighted and n.op == "MatMul" and len(n.inputs) == 2 \
                    and not any(self.ir.is_const(t) for t in n.inputs):
                out.append((node_key(n), "both inputs are activations (attention scores or context): "
                                          "only MatMuls with a constant weight are quantized"))
        return out

    def _float_tail(self, t: gs.Tensor) -> bool:
        """``t`` needs no Q/DQ: it reaches only graph outputs and ops whose input stays float
        (``float_input``: recurrent layers, the decode's Exp), through data movement (Reshape,
        Transpose, Split, Concat, ...) and constant affine arithmetic (a bias Add, a stride Mul)
        only, all of which stay float then: the tail of a detector's decode, a channels-last
        output, the input projection of an LSTM."""
        readers = list(t.outputs)
        if not readers:
            return False
        ir = self.ir
        for c in readers:
            r = self.rule(c)
            if r is not None and r.float_input:
                continue
            acts = [x for x in c.inputs if not is_empty(x) and not ir.is_const(x)]
            move = (r is not None and r.share_scale == "input" and c.inputs[0] is t) or c.op in _PASS_THROUGH
            affine = c.op in ("Add", "Sub", "Mul", "Div") and len(acts) == 1
            if not (move or affine) or not c.outputs:
                return False
            for o in c.outputs:
                if ir.is_graph_output(o) and not o.outputs:
                    continue
                if not self._float_tail(o):
                    return False
        return True

    def _residual_adds(self, weighted, qtensors, edges) -> int:
        """TensorRT: quantize the input of a skip-connection Add that does not come from a
        quantized weighted op (conv + projection conv: the earlier one; the later fuses)."""
        if not any(r.residual for r in self.table.values()):
            return 0
        ir = self.ir
        quantized = {id(n) for n in weighted}
        order = ir.node_index()
        count = 0
        for node in ir.nodes:
            r = self.rule(node)
            if r is None or not r.residual or len(node.inputs) != 2 or not node.outputs:
                continue
            producers = [ir.producer(t) for t in node.inputs]
            fused = [p is not None and id(p) in quantized for p in producers]
            if not any(fused):
                continue
            if all(fused):
                side = 0 if order[id(producers[0])] < order[id(producers[1])] else 1
            else:
                side = fused.index(False)
            other = node.inputs[side]
            if ir.is_const(other) or other.name not in self.ranges or kept_float(node, self.keep):
                continue
            qtensors[other.name] = other
            edges.setdefault(other.name, set()).add((node_id(node), side))
            count += 1
        return count
