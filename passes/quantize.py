"""quantize_qdq: insert QuantizeLinear/DequantizeLinear pairs (static INT8 QDQ) from calibrated ranges.

The pass needs activation ranges (``ranges``: tensor name -> (lo, hi)), which come from
calibration (:mod:`edgec.calibration`); :func:`edgec.quantize_api.quantize` calibrates and runs
it. Run by name without ranges it raises a UserError.

Schemes
- Weights (``weight_type``, from the target's scheme): ``int8`` symmetric (zero point 0) in
  [-127, 127]; ``int7`` symmetric in [-63, 63], int8 storage (for x86 CPUs without VNNI,
  where ONNX Runtime's U8S8 GEMM kernels add pairs of uint8 x int8 products in saturating
  int16: ``2 * 255 * 63 < 2**15``); ``uint8`` asymmetric with a zero point per channel
  (U8U8; the other way not to saturate). Depthwise convolutions keep int8 [-127, 127] under
  both (their kernels do not saturate, and ONNX Runtime has no fast U8U8 depthwise kernel;
  see :func:`is_depthwise`). Scales per output channel (Conv axis 0, ConvTranspose axis 1 when group == 1, Gemm axis 0 with transB=1 /
  axis 1 with transB=0, MatMul axis 1 for a 2-D constant right operand) or per tensor. Stored
  as integer initializers feeding DequantizeLinear. ``int4`` layers (precision plan) use the
  int4 grid [-7, 7] (scale = max|w| / 7) in int8 storage whatever the weight type (their pair
  sums, at most ``2 * 255 * 8``, cannot saturate). The model stays at its opset (edgec normalises to 17), where
  ONNX has no INT4 type: int4 is *emulated* by int8 storage holding values in [-8, 7]; the
  numerics are int4's, the file size is int8's (the report counts 4 bits per weight as the
  size real int4 storage would have).
- Bias of Conv/ConvTranspose/Gemm: int32, scale = input scale x weight scale (per channel),
  zero point 0: the form ONNX Runtime's QLinearConv/QGemm take.
- Activations: ``asymmetric`` = uint8 with a zero point, ``symmetric`` = int8, zero point 0,
  [-127, 127]. One scale per tensor.

Also here: :func:`cross_layer_equalization` (a lossless float rewrite that balances the weight
ranges of Conv[-Relu]-Conv pairs before quantization; :mod:`edgec.quantize_api` applies it only
where it measurably lowers the error).

Placement (rule table for ONNX Runtime's CPU QDQ fusions: DQ -> op -> Q groups become
QLinearConv, QLinearMatMul / MatMulIntegerToFloat, QGemm, QLinearAdd/Mul, QLinearConcat,
QLinearGlobalAveragePool, QLinearAveragePool, and Q/DQ pairs around data-movement ops drop):
- weighted ops (Conv, ConvTranspose, Gemm, MatMul with a constant weight) are quantized unless
  the precision plan or ``keep_float`` says otherwise; their activation input gets Q/DQ, their
  output gets Q/DQ (Gemm only when a quantized op reads it: QGemm has a float-output form;
  MatMul always, because ONNX Runtime turns a MatMul + bias Add with no Q into a float Gemm);
- ``Add``/``Mul`` of two activations, ``Concat``, ``GlobalAveragePool``, ``AveragePool`` are
  quantized when every activation input is already quantized; data-movement ops (``MaxPool``,
  ``Reshape``, ``Transpose``, ``Flatten``, ``Squeeze``, ``Unsqueeze``, ``Resize`` nearest,
  ``Identity``) likewise, and keep their input's scale (output shares the input's scale, so
  ONNX Runtime drops the pair and runs them on integers);
- ``Concat`` inputs and output share one scale (when their ranges are all non-negative or all
  signed: a ReLU folded into a zero-floored range is never widened below 0);
- asymmetric mode: a ``Relu`` or ``Clip(min=0)`` that is the only reader of a quantized op's
  output is removed and folded into that output's range ``[0, hi]`` (zero point 0: the
  quantizer's saturation *is* the ReLU, exactly);
- symmetric mode keeps ReLUs (a zero point of 0 in int8 cannot floor a range at 0): ONNX
  Runtime runs them in float between DQ and Q and fuses fewer groups; asymmetric (U8S8) is the
  mode for ONNX Runtime CPU, symmetric the one for TensorRT-style back ends;
- graph outputs stay float (no Q/DQ on a graph output); ``keep_float`` names nodes or tensors
  that stay float (a tensor name keeps its producer float);
- ``pointwise`` ops (a target's choice: RKNN lists Sigmoid, HardSwish, HardSigmoid, Tanh,
  LeakyRelu) are quantized like the aggregate ops when their input is, so a toolchain that
  wants every tensor quantized gets every tensor quantized.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from edgec.errors import UserError
from edgec.ir import IR
from edgec.pipeline import Pass, register

from ._util import is_default_domain

WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
BINARY = ("Add", "Mul")
AGGREGATE = ("Concat", "GlobalAveragePool", "AveragePool")
DATA_MOVEMENT = ("MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Resize", "Identity")
FOLDABLE_ACT = ("Relu", "Clip")
INT_PRECISIONS = ("int8", "int4")
# how an "int8" layer stores its weights: int8 symmetric [-127, 127] (U8S8/S8S8), int7 symmetric
# [-63, 63] in int8 storage (U8S7: no int16 saturation in the no-VNNI U8S8 kernels), uint8
# asymmetric with a zero point per channel (U8U8)
WEIGHT_TYPES = ("int8", "int7", "uint8")
PRECISIONS = ("fp32", "fp16", "int8", "int4")
MIN_SCALE = 1e-8


def node_key(node: gs.Node) -> str:
    return node.name or (node.outputs[0].name if node.outputs else "")


def weighted_nodes(ir: IR) -> list[gs.Node]:
    """Nodes quantize_qdq can quantize as weighted layers (constant float weight)."""
    out = []
    for n in ir.nodes:
        if n.op in WEIGHTED and is_default_domain(n) and _weight_ok(ir, n):
            out.append(n)
    return out


def _weight_ok(ir: IR, n: gs.Node) -> bool:
    if len(n.inputs) < 2:
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


def weight_axis(ir: IR, n: gs.Node) -> int | None:
    """The per-output-channel axis of the weight of ``n`` (None: per-tensor only)."""
    if n.op == "Conv":
        return 0
    if n.op == "ConvTranspose":
        return 1 if int(n.attrs.get("group", 1)) == 1 else None
    if n.op == "Gemm":
        return 0 if int(n.attrs.get("transB", 0)) else 1
    if n.op == "MatMul":
        return 1
    return None


def is_depthwise(n: gs.Node, w: np.ndarray) -> bool:
    """A depthwise convolution (one input and one output channel per group): ONNX Runtime runs
    it on its own kernels, which widen to int16 before multiplying and never saturate (measured
    on an AVX2-only CPU: exact where the GEMM-based QLinearConv of the same data halves)."""
    g = int(n.attrs.get("group", 1))
    return n.op == "Conv" and g > 1 and w.ndim >= 3 and w.shape[1] == 1 and w.shape[0] == g


def quantize_weight(w: np.ndarray, axis: int | None, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric quantization: (int8 values, float32 scales) (scales per ``axis`` or scalar).

    ``q = clip(round_half_even(w / scale), qmin, qmax)`` with ``scale = max|w| / qmax`` rounded to
    float32 (the value DequantizeLinear multiplies by); int8: [-127, 127]; int7: [-63, 63] (in
    int8 storage: ``2 * 255 * 63 < 2**15``, so the int16 pair sums of the no-VNNI U8S8 kernels
    never saturate); int4: [-8, 7] grid (scale max|w| / 7).
    """
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
        q = np.rint(w.astype(np.float64) / scale.astype(np.float64).reshape(_axis_shape(w.ndim, axis)))
    np.clip(q, qmin, qmax, out=q)
    return q.astype(np.int8), scale


def quantize_weight_uint8(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric uint8 quantization (the U8U8 scheme): (uint8 values, float32 scales, uint8 zero
    points), per ``axis`` or per tensor. The range ``[min(w, 0), max(w, 0)]`` maps onto
    [0, 255] with ``scale = (hi - lo) / 255`` and ``zp = round(-lo / scale)``, so 0 is exact."""
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
        shape = _axis_shape(w.ndim, axis)
        q = np.rint(w64 / scale.astype(np.float64).reshape(shape)) + zp.reshape(shape)
    np.clip(q, 0, 255, out=q)
    return q.astype(np.uint8), scale, zp.astype(np.uint8)


def _axis_shape(ndim: int, axis: int) -> list[int]:
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


@register
class QuantizeQDQ(Pass):
    name = "quantize_qdq"
    description = "static INT8 QDQ quantization from calibrated ranges (weights per channel, int32 bias)"
    requires = ("shapes",)
    lossless = False

    def __init__(self, ranges: dict | None = None, *, activations: str = "asymmetric",
                 weights: str = "per-channel", plan: dict | None = None, keep_float=(),
                 bias_shift: dict | None = None, quantize_activations: bool = True, pointwise=(),
                 weight_type: str = "int8"):
        super().__init__()
        if weight_type not in WEIGHT_TYPES:
            raise UserError(f"weight type must be one of {', '.join(WEIGHT_TYPES)}, got '{weight_type}'")
        self.weight_type = weight_type
        # unary ops whose output is quantized too when their input is (a target that wants every
        # tensor quantized, e.g. RKNN's pre-quantized path, lists Sigmoid, HardSwish, ...)
        self.pointwise = tuple(pointwise or ())
        if activations not in ("asymmetric", "symmetric"):
            raise UserError(f"activations must be 'asymmetric' or 'symmetric', got '{activations}'")
        if weights not in ("per-channel", "per-tensor"):
            raise UserError(f"weights must be 'per-channel' or 'per-tensor', got '{weights}'")
        self.ranges = ranges
        self.symmetric = activations == "symmetric"
        self.per_channel = weights == "per-channel"
        self.plan = dict(plan or {})
        bad = [v for v in self.plan.values() if v not in PRECISIONS]
        if bad:
            raise UserError(f"unknown precision '{bad[0]}' in the precision plan (known: {', '.join(PRECISIONS)})")
        self.keep_float = set(keep_float or ())
        self.bias_shift = dict(bias_shift or {})
        self.quantize_activations = quantize_activations
        self.summary: dict = {}

    # ------------------------------------------------------------------ driver
    def run(self, ir: IR) -> bool:
        if self.ranges is None:
            raise UserError("quantize_qdq needs calibrated activation ranges: use edgec.quantize_api.quantize "
                            "(CLI: --quantize int8 --calib DATA)")
        if ir.opset < 13:
            raise UserError(f"QDQ quantization needs opset >= 13 (per-channel DequantizeLinear); the model is at {ir.opset}")
        ir.toposort()
        weighted = [n for n in weighted_nodes(ir) if self._precision(n) in INT_PRECISIONS]
        weighted = [n for n in weighted if not self._kept(n) and n.inputs[0].name in self.ranges]
        if not weighted:
            self.note("no layer to quantize")
            return False
        qnodes: set[int] = {id(n) for n in weighted}
        qtensors: dict[str, gs.Tensor] = {}  # activation tensors that get Q/DQ
        for n in weighted:
            qtensors[n.inputs[0].name] = n.inputs[0]
        folded: dict[int, gs.Node] = {}  # id(act node) -> act node folded into its input's range
        override: dict[str, tuple[float, float]] = {}
        producer_q: set[str] = set()  # tensors produced by a quantized node (all readers read DQ)

        # outputs of weighted ops
        for n in weighted:
            self._mark_output(ir, n, qtensors, producer_q, qnodes)
        # fixed point over non-weighted ops (and ReLU folding)
        changed = True
        while changed:
            changed = False
            for n in ir.nodes:
                if id(n) in qnodes or id(n) in folded or not is_default_domain(n) or self._kept(n):
                    continue
                if self._try_fold(ir, n, qnodes, folded, override):
                    out = n.outputs[0]
                    if not ir.is_graph_output(out) and out.name in self.ranges:
                        qtensors[out.name] = out
                        producer_q.add(out.name)
                    changed = True
                    continue
                if not self.quantize_activations or not self._quantizable_plain(ir, n, qtensors):
                    continue
                qnodes.add(id(n))
                for t in n.inputs:
                    if not ir.is_const(t) and not _empty(t):
                        qtensors[t.name] = t
                self._mark_output(ir, n, qtensors, producer_q, qnodes, force=True)
                changed = True

        # Gemm/MatMul outputs quantized only for readers that did not end up quantized: drop
        # (their float-output integer kernels need no Q)
        for n in weighted:
            out = n.outputs[0]
            if n.op == "Gemm" and out.name in qtensors and not any(id(c) in qnodes for c in out.outputs):
                del qtensors[out.name]
                producer_q.discard(out.name)

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

        for n in ir.nodes:
            if id(n) in folded:
                union(n.inputs[0].name, n.outputs[0].name)
        for n in ir.nodes:
            if id(n) not in qnodes:
                continue
            if n.op in DATA_MOVEMENT and n.outputs[0].name in qtensors:
                union(n.inputs[0].name, n.outputs[0].name)
            elif n.op == "Concat" and n.outputs[0].name in qtensors:
                names = [t.name for t in n.inputs] + [n.outputs[0].name]
                signs = {rng(x)[0] >= 0 for x in names if x in self.ranges or x in override}
                if len(signs) == 1 or self.symmetric:
                    for x in names[1:]:
                        union(names[0], x)
        group_range: dict[str, list[float]] = {}
        for name in qtensors:
            lo, hi = rng(name) if (name in self.ranges or name in override) else (0.0, 0.0)
            r = group_range.setdefault(find(name), [0.0, 0.0])
            r[0], r[1] = min(r[0], lo), max(r[1], hi)
        # a folded activation's range must keep its zero floor
        for n in folded.values():
            g = group_range.get(find(n.outputs[0].name))
            if g is not None and g[0] < 0:
                g[0] = 0.0  # (only reachable through data-movement unions of non-negative tensors)

        params = {name: activation_params(*group_range[find(name)], self.symmetric) for name in qtensors}

        x_scales = {id(n): params[n.inputs[0].name][0] if n.inputs[0].name in params else None for n in weighted}

        # ----- rewrite: fold activations
        for act in folded.values():
            t, r = act.inputs[0], act.outputs[0]
            ir.replace_uses(r, t)
            act.inputs.clear()
            act.outputs.clear()
            # r's consumers now read t; t's params are r's

        # ----- rewrite: Q/DQ on activations
        dq_of: dict[str, gs.Variable] = {}
        qdtype = np.int8 if self.symmetric else np.uint8
        for name, t in qtensors.items():
            if not t.outputs and not ir.is_graph_output(t):
                continue
            if name in dq_of:
                continue
            scale, zp = params[name]
            s_c = _scalar_const(ir, name + "_scale", np.array(scale, dtype=np.float32))
            z_c = _scalar_const(ir, name + "_zero_point", np.array(zp, dtype=qdtype))
            tq = ir.make_var(name + "_quantized", dtype=qdtype, shape=t.shape)
            tdq = ir.make_var(name + "_dequantized", dtype=np.float32, shape=t.shape)
            readers = [c for c in t.outputs]
            qn = gs.Node("QuantizeLinear", name=ir.unique_name(name + "_QuantizeLinear"), inputs=[t, s_c, z_c], outputs=[tq])
            dqn = gs.Node("DequantizeLinear", name=ir.unique_name(name + "_DequantizeLinear"), inputs=[tq, s_c, z_c], outputs=[tdq])
            all_readers = name in producer_q
            for c in readers:
                if all_readers or id(c) in qnodes:
                    for i, x in enumerate(c.inputs):
                        if x is t:
                            c.inputs[i] = tdq
            ir.graph.nodes.extend([qn, dqn])
            dq_of[name] = tdq

        # ----- rewrite: weights and biases
        n_int8 = n_int4 = 0
        for n in weighted:
            prec = self._precision(n)
            bits = 4 if prec == "int4" else 8
            self._quantize_weight(ir, n, bits, x_scales[id(n)])
            n_int8 += bits == 8
            n_int4 += bits == 4
        self.summary = {"layers_int8": n_int8, "layers_int4": n_int4,
                        "activations_quantized": len(dq_of), "relu_folded": len(folded),
                        "ops_quantized": len(qnodes)}
        self.summary["weight_type"] = self.weight_type
        self.note(f"{n_int8} layers int8 ({self.weight_type} weights), {n_int4} int4 (emulated in int8 storage), {len(dq_of)} activation "
                  f"tensors quantized ({'int8 symmetric' if self.symmetric else 'uint8 asymmetric'}), "
                  f"{len(folded)} ReLU/Clip folded into ranges")
        return True

    # ------------------------------------------------------------------ decisions
    def _precision(self, n: gs.Node) -> str:
        return self.plan.get(node_key(n), "int8")

    def _kept(self, n: gs.Node) -> bool:
        return bool(self.keep_float) and (node_key(n) in self.keep_float or n.name in self.keep_float
                                          or any(o.name in self.keep_float for o in n.outputs))

    def _mark_output(self, ir: IR, n: gs.Node, qtensors, producer_q, qnodes, force: bool = False) -> None:
        out = n.outputs[0]
        if ir.is_graph_output(out) or out.name not in self.ranges:
            return
        if n.op == "Gemm" and not force:
            # QGemm has a float-output form that needs no Q: quantize the output only for
            # quantized readers (decided when they are) or a foldable ReLU. (MatMul keeps its Q:
            # ONNX Runtime rewrites a MatMul + bias Add without one into a float Gemm.)
            readers = list(out.outputs)
            if not any(c.op in WEIGHTED + BINARY + AGGREGATE + DATA_MOVEMENT + FOLDABLE_ACT for c in readers):
                return
        qtensors[out.name] = out
        producer_q.add(out.name)

    def _try_fold(self, ir: IR, n: gs.Node, qnodes, folded, override) -> bool:
        """Asymmetric mode: a Relu/Clip(0, c) that alone reads a quantized op's output."""
        if self.symmetric or n.op not in FOLDABLE_ACT:
            return False
        x, y = n.inputs[0], n.outputs[0]
        prod = ir.producer(x)
        if prod is None or id(prod) not in qnodes or ir.single_consumer(x) is not n:
            return False
        if ir.is_graph_output(y) or y.name not in self.ranges:
            return False
        hi_cap = None
        if n.op == "Clip":
            lo_v = ir.const_value(n.inputs[1]) if len(n.inputs) > 1 and not _empty(n.inputs[1]) else None
            hi_v = ir.const_value(n.inputs[2]) if len(n.inputs) > 2 and not _empty(n.inputs[2]) else None
            if "min" in n.attrs or "max" in n.attrs:  # opset < 11 form
                lo_v = np.asarray(n.attrs.get("min", -np.inf))
                hi_v = np.asarray(n.attrs.get("max", np.inf)) if "max" in n.attrs else None
            if lo_v is None or float(lo_v) != 0.0:
                return False
            if len(n.inputs) > 2 and not _empty(n.inputs[2]) and hi_v is None:
                return False
            hi_cap = float(hi_v) if hi_v is not None else None
        lo, hi = self.ranges[y.name]
        hi = max(hi, 0.0)
        if hi_cap is not None:
            hi = min(hi, hi_cap)
        override[x.name] = (0.0, hi)
        override[y.name] = (0.0, hi)
        folded[id(n)] = n
        qnodes.add(id(n))
        # the producer's output is now quantized for every reader (through the fold)
        return True

    def _quantizable_plain(self, ir: IR, n: gs.Node, qtensors) -> bool:
        acts = [t for t in n.inputs if not _empty(t) and not ir.is_const(t)]
        if not acts or not n.outputs:
            return False
        if any(t.dtype is not None and np.dtype(t.dtype) != np.float32 for t in acts):
            return False
        if n.op in BINARY:
            ok = len(acts) == 2 and len(n.inputs) == 2
        elif n.op == "Concat":
            ok = len(acts) == len(n.inputs)
        elif n.op in ("GlobalAveragePool", "AveragePool") or n.op in self.pointwise:
            ok = len(acts) == 1 and len(n.outputs) == 1
        elif n.op in DATA_MOVEMENT:
            ok = len(acts) == 1 and n.inputs[0] is acts[0] and len(n.outputs) == 1
            if n.op == "Resize" and n.attrs.get("mode", "nearest") != "nearest":
                ok = False
            if n.op == "MaxPool" and len(n.outputs) > 1:
                ok = False
        else:
            return False
        if not ok:
            return False
        if not all(t.name in qtensors for t in acts):
            return False
        return all(t.name in self.ranges for t in acts) and n.outputs[0].name in self.ranges \
            or (ir.is_graph_output(n.outputs[0]) and all(t.name in self.ranges for t in acts))

    # ------------------------------------------------------------------ weights
    def _quantize_weight(self, ir: IR, n: gs.Node, bits: int, x_scale) -> None:
        base = node_key(n)
        w = ir.const_value(n.inputs[1])
        axis = weight_axis(ir, n) if self.per_channel else None
        if axis is not None and axis >= w.ndim:
            axis = None
        if bits == 8 and self.weight_type == "uint8" and not is_depthwise(n, w):
            q, scale, zp = quantize_weight_uint8(w, axis)
        else:
            seven = bits == 8 and self.weight_type == "int7" and not is_depthwise(n, w)
            q, scale = quantize_weight(w, axis, 7 if seven else bits)
            zp = np.zeros(scale.shape, dtype=np.int8)
        wq = ir.make_const(base + "_weight_quantized", q)
        ws = _scalar_const(ir, base + "_weight_scale", scale)
        wz = _scalar_const(ir, base + "_weight_zero_point", zp)
        wdq = ir.make_var(base + "_weight_dequantized", dtype=np.float32, shape=list(w.shape))
        attrs = {"axis": int(axis)} if axis is not None else {}
        ir.graph.nodes.append(gs.Node("DequantizeLinear", name=ir.unique_name(base + "_weight_DequantizeLinear"),
                                      inputs=[wq, ws, wz], outputs=[wdq], attrs=attrs))
        n.inputs[1] = wdq
        # bias
        shift = self.bias_shift.get(base)
        if n.op not in ("Conv", "ConvTranspose", "Gemm") or x_scale is None:
            if shift is not None:
                self.note(f"bias correction of '{base}' not applied (no bias input form)")
            return
        out_ch = _out_channels(n, w)
        has_bias = len(n.inputs) > 2 and not _empty(n.inputs[2])
        if has_bias:
            b = ir.const_value(n.inputs[2])
            if b is None:
                return
            b = b.astype(np.float64)
            if n.op == "Gemm":
                beta = float(n.attrs.get("beta", 1.0))
                if b.ndim != 1 or b.shape[0] != out_ch:
                    return  # a broadcast C stays float
                b = b * beta
        else:
            if shift is None:
                return
            b = np.zeros(out_ch)
        if shift is not None:
            b = b + np.asarray(shift, dtype=np.float64).reshape(-1)
        w_scale = scale.astype(np.float64) if scale.ndim else np.full(out_ch, float(scale))
        if w_scale.shape[0] != out_ch:
            w_scale = np.full(out_ch, float(np.max(w_scale)))
            # (per-channel axis that is not the output axis: bias uses per-tensor form)
        b_scale = (np.float64(x_scale) * w_scale).astype(np.float32)
        qb = np.round(b / b_scale.astype(np.float64))
        if np.any(np.abs(qb) > 2**31 - 1) or np.any(b_scale <= 0):
            bias_c = ir.make_const(base + "_bias", b.astype(np.float32))
            self.note(f"bias of '{base}' kept float (int32 overflow)")
            _set_bias(n, bias_c)
            if n.op == "Gemm":
                n.attrs["beta"] = 1.0
            return
        bq = ir.make_const(base + "_bias_quantized", qb.astype(np.int32))
        bs = ir.make_const(base + "_bias_scale", b_scale)
        bz = ir.make_const(base + "_bias_zero_point", np.zeros(out_ch, dtype=np.int32))
        bdq = ir.make_var(base + "_bias_dequantized", dtype=np.float32, shape=[out_ch])
        ir.graph.nodes.append(gs.Node("DequantizeLinear", name=ir.unique_name(base + "_bias_DequantizeLinear"),
                                      inputs=[bq, bs, bz], outputs=[bdq], attrs={"axis": 0}))
        _set_bias(n, bdq)
        if n.op == "Gemm":
            n.attrs["beta"] = 1.0


def _out_channels(n: gs.Node, w: np.ndarray) -> int:
    if n.op == "Conv":
        return w.shape[0]
    if n.op == "ConvTranspose":
        return w.shape[1] * int(n.attrs.get("group", 1))
    if n.op == "Gemm":
        return w.shape[0] if int(n.attrs.get("transB", 0)) else w.shape[1]
    return w.shape[-1]


def _set_bias(n: gs.Node, t: gs.Tensor) -> None:
    if len(n.inputs) > 2:
        n.inputs[2] = t
    else:
        n.inputs.append(t)


def _scalar_const(ir: IR, hint: str, value: np.ndarray) -> gs.Constant:
    """A constant that keeps a 0-d shape (ir.make_const would make it 1-D)."""
    return gs.Constant(ir.unique_name(hint), np.asarray(value))


def _empty(t) -> bool:
    return t is None or (isinstance(t, gs.Variable) and t.is_empty())


# ====================================================================== cross-layer equalisation
def cross_layer_equalization(ir: IR, sweeps: int = 3) -> int:
    """Cross-layer equalisation (Nagel et al. 2019, AIMET's CLE) on the float graph; lossless.

    For ``Conv1 -> [Relu] -> Conv2`` where Conv1's output and the Relu's have no other reader,
    output channel ``i`` of Conv1 is divided by ``s_i`` and input channel ``i`` of Conv2
    multiplied by it (ReLU is positively homogeneous), with ``s_i = sqrt(r1_i / r2_i)`` from the
    channel's weight ranges in both layers: afterwards both ranges equal ``sqrt(r1_i * r2_i)``.
    Conv2 may be a regular (group 1) or depthwise convolution; Conv1 any convolution.
    Clip/ReLU6 is not positively homogeneous: such pairs are left alone. Returns the number of
    pairs equalised (repeated ``sweeps`` times so chains converge).
    """
    pairs = _cle_pairs(ir)
    if not pairs:
        return 0
    for _ in range(sweeps):
        for c1, c2 in pairs:
            _equalize(ir, c1, c2)
    return len(pairs)


def cle_worthwhile(ir: IR, per_tensor: bool) -> bool:
    """Whether trying equalisation is worth a second quantization: equalisable pairs exist and
    weights are per-tensor or a pair involves a depthwise convolution (MobileNet-style nets,
    where per-channel scales alone leave activations unbalanced)."""
    pairs = _cle_pairs(ir)
    if not pairs:
        return False
    if per_tensor:
        return True
    return any(int(c.attrs.get("group", 1)) > 1 for pair in pairs for c in pair)


def _cle_pairs(ir: IR) -> list[tuple[gs.Node, gs.Node]]:
    out = []
    for c1 in ir.find("Conv"):
        w1 = ir.const_value(c1.inputs[1]) if len(c1.inputs) > 1 else None
        if w1 is None or w1.dtype != np.float32 or w1.ndim < 3:
            continue
        if len(c1.inputs) > 2 and not _empty(c1.inputs[2]) and ir.const_value(c1.inputs[2]) is None:
            continue
        nxt = ir.single_consumer(c1.outputs[0])
        if nxt is None:
            continue
        if nxt.op == "Relu":
            nxt = ir.single_consumer(nxt.outputs[0])
            if nxt is None:
                continue
        if nxt.op != "Conv":
            continue
        w2 = ir.const_value(nxt.inputs[1]) if len(nxt.inputs) > 1 else None
        if w2 is None or w2.dtype != np.float32:
            continue
        c = w1.shape[0]
        g2 = int(nxt.attrs.get("group", 1))
        if not ((g2 == 1 and w2.shape[1] == c) or (g2 == c and w2.shape[0] == c and w2.shape[1] == 1)):
            continue
        out.append((c1, nxt))
    return out


def _equalize(ir: IR, c1: gs.Node, c2: gs.Node) -> None:
    w1 = ir.const_value(c1.inputs[1]).astype(np.float64)
    w2 = ir.const_value(c2.inputs[1]).astype(np.float64)
    c = w1.shape[0]
    depthwise = int(c2.attrs.get("group", 1)) == c and w2.shape[1] == 1 and c > 1
    r1 = np.abs(w1.reshape(c, -1)).max(axis=1)
    r2 = (np.abs(w2.reshape(c, -1)).max(axis=1) if depthwise
          else np.abs(np.moveaxis(w2, 1, 0).reshape(c, -1)).max(axis=1))
    ok = (r1 > 0) & (r2 > 0)
    s = np.ones(c)
    s[ok] = np.sqrt(r1[ok] / r2[ok])
    if np.allclose(s, 1.0, rtol=1e-3):
        return
    shape1 = (-1,) + (1,) * (w1.ndim - 1)
    base1, base2 = node_key(c1), node_key(c2)
    c1.inputs[1] = ir.make_const(base1 + "_cle_W", (w1 / s.reshape(shape1)).astype(np.float32))
    if len(c1.inputs) > 2 and not _empty(c1.inputs[2]):
        b1 = ir.const_value(c1.inputs[2]).astype(np.float64)
        c1.inputs[2] = ir.make_const(base1 + "_cle_b", (b1 / s).astype(np.float32))
    if depthwise:
        w2n = w2 * s.reshape((-1,) + (1,) * (w2.ndim - 1))
    else:
        w2n = w2 * s.reshape((1, -1) + (1,) * (w2.ndim - 2))
    c2.inputs[1] = ir.make_const(base2 + "_cle_W", w2n.astype(np.float32))
