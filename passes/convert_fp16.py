"""convert_fp16: run the model in float16, keeping overflow-prone ops and the interface in float32.

Rules
- Every default-domain node that computes on float32 tensors runs in float16, except:
  * ops whose intermediate sums or exponentials overflow float16's 65504 or lose its 11-bit
    precision: ``Exp``, ``Pow``, ``Log``, ``Softmax``/``LogSoftmax`` (exponentials and a sum
    over the axis), the sum-like reductions (``ReduceSum``, ``ReduceSumSquare``, ``ReduceL1``,
    ``ReduceL2``, ``ReduceLogSumExp``, ``ReduceMean``, ``ReduceProd``, ``CumSum``), the
    normalisations (``LayerNormalization``, ``InstanceNormalization``, ``GroupNormalization``,
    ``LpNormalization``: variances of large-magnitude activations) and ``Erf``-GELU's inputs are fine;
  * ops whose attributes or extra inputs carry float32 by type (``Cast``, ``CastLike``,
    ``ConstantOfShape``, ``EyeLike``, the Random ops, ``Resize``/``Upsample`` (float scales),
    ``Range``, ``TopK``, ``NonMaxSuppression``, ``RoiAlign``);
  * ops with subgraphs and custom domains;
  * ``keep_float`` nodes (by node name or output tensor name);
  * op types ONNX Runtime's CPU provider has no float16 kernel for: found by creating a
    session on the converted model and moving the op types it refuses back to float32 (the
    pass's notes name them).
- Graph inputs and outputs keep float32 (and their names): ``Cast`` nodes at the boundary.
  A Cast is inserted wherever a tensor crosses between float16 and float32 nodes (one per
  tensor and direction). Float32 constants read by float16 nodes get float16 copies (values
  beyond +-65504 saturate, with a note).
Post-condition: same outputs up to float16 rounding (not lossless).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from edgec.ir import IR, plain_dtype, subgraphs
from edgec.pipeline import Pass, PassContext, PassResult, register

from edgec.verify import session

from ._util import has_subgraph, is_default_domain

OVERFLOW_PRONE = {"Exp", "Pow", "Log", "Softmax", "LogSoftmax", "ReduceSum", "ReduceSumSquare", "ReduceL1",
                  "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMean", "ReduceProd", "CumSum",
                  "LayerNormalization", "InstanceNormalization", "GroupNormalization", "LpNormalization"}
TYPED = {"Cast", "CastLike", "ConstantOfShape", "EyeLike", "RandomNormal", "RandomNormalLike", "RandomUniform",
         "RandomUniformLike", "Multinomial", "Bernoulli", "Resize", "Upsample", "Range", "TopK",
         "NonMaxSuppression", "RoiAlign", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
         # QOperator ops: their float scales are float32 by definition (a float16 one is an invalid model)
         "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"}
FP16_MAX = 65504.0


@dataclass
class FP16Result:
    """What convert_fp16 did (the ``data`` of its PassResult): nodes computing in float16, Cast
    nodes inserted, constants given float16 copies, and the op types kept in float32."""

    nodes_fp16: int = 0
    casts: int = 0
    constants_fp16: int = 0
    kept_fp32_ops: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _captured(ir: IR) -> set[str]:
    """Names If/Loop/Scan bodies read from the graph around them (cached until the graph changes)."""
    got = ir.analysis_cache.get("fp16_captured")
    if got is None:
        got = set()
        for sub in (g for node in ir.nodes for g in subgraphs(node)):
            made = {t.name for b in sub.nodes for t in b.outputs} | {t.name for t in sub.inputs}
            got.update(t.name for b in sub.nodes for t in b.inputs
                       if t.name not in made and not isinstance(t, gs.Constant))
        ir.analysis_cache["fp16_captured"] = got
    return got


@register
class ConvertFP16(Pass):
    name = "convert_fp16"
    description = "float16 weights and compute; overflow-prone ops and graph inputs/outputs stay float32"
    requires = ("shapes",)
    lossless = False

    def __init__(self, keep_float=(), block=(), check_with_ort: bool = True):
        super().__init__()
        self.keep_float = set(keep_float or ())
        self.block = set(OVERFLOW_PRONE) | set(TYPED) | set(block)
        self.check_with_ort = check_with_ort

    def run(self, ir: IR, ctx: PassContext) -> PassResult:
        ir.infer_shapes()
        result = PassResult(False, data=FP16Result())  # (nothing to convert: an int-only or float16 model)
        extra: set[str] = set()
        if self.check_with_ort:
            for _ in range(8):
                trial = ir.copy()
                trial.infer_shapes()
                if not self._convert(trial, extra, None):
                    return result
                refused = _refused_op(trial)
                if refused is None or refused in extra:
                    break
                extra.add(refused)
            if extra:
                result.note(f"kept in float32 (no float16 kernel in ONNX Runtime CPU): {', '.join(sorted(extra))}")
        result.changed = self._convert(ir, extra, result)
        return result

    # ------------------------------------------------------------------
    def _fp16_node(self, ir: IR, n: gs.Node, extra: set[str]) -> bool:
        if not is_default_domain(n) or has_subgraph(n) or n.op in self.block or n.op in extra:
            return False
        if any(o.name in _captured(ir) for o in n.outputs):  # an If/Loop body reads it as float32
            return False
        if self.keep_float and (n.name in self.keep_float or any(o.name in self.keep_float for o in n.outputs)):
            return False
        # an input of unknown type (a custom-domain op's output, ONNX Runtime's FusedMatMul, say) would get no
        # Cast, and a float32 value would meet float16 ones: such a node stays float32
        if any(isinstance(t, gs.Variable) and not t.is_empty() and t.dtype is None for t in n.inputs):
            return False
        return any(_is_f32(t) for t in list(n.inputs) + list(n.outputs))

    def _convert(self, ir: IR, extra: set[str], result: PassResult | None) -> bool:
        """Convert ``ir``; ``result`` (None for a trial conversion) gets the notes and data."""
        fp16_nodes = [n for n in ir.nodes if self._fp16_node(ir, n, extra)]
        if not fp16_nodes:
            if result is not None:
                result.note("no float32 computation to convert")
            return False
        half = {id(n) for n in fp16_nodes}
        casts: dict[tuple[str, str], gs.Tensor] = {}
        const16: dict[int, gs.Constant] = {}
        saturated = 0
        new_nodes: list[gs.Node] = []
        # 1. outputs of fp16 nodes become float16 (graph outputs keep their name and float32)
        for n in fp16_nodes:
            for i, t in enumerate(n.outputs):
                if not _is_f32(t):
                    continue
                if ir.is_graph_output(t):
                    inner = ir.make_var(t.name + "_fp16", dtype=np.float16, shape=t.shape)
                    n.outputs[i] = inner
                    for c in list(t.outputs):  # other readers of the graph output
                        for j, x in enumerate(c.inputs):
                            if x is t:
                                c.inputs[j] = inner
                    new_nodes.append(gs.Node("Cast", name=ir.unique_name(t.name + "_to_fp32"), inputs=[inner],
                                             outputs=[t], attrs={"to": onnx.TensorProto.FLOAT}))
                else:
                    t.dtype = np.float16
        # 2. inputs: cast where precision changes, fp16 copies of constants
        for n in list(ir.nodes):
            want16 = id(n) in half
            for i, t in enumerate(n.inputs):
                if t is None or (isinstance(t, gs.Variable) and t.is_empty()):
                    continue
                if isinstance(t, gs.Constant):
                    if want16 and _is_f32(t):
                        c = const16.get(id(t))
                        if c is None:
                            v = np.asarray(t.values, dtype=np.float32)
                            saturated += int(np.sum(np.abs(v[np.isfinite(v)]) > FP16_MAX))
                            c = gs.Constant(ir.unique_name(t.name + "_fp16"),
                                            np.asarray(np.clip(v, -FP16_MAX, FP16_MAX), dtype=np.float16))
                            const16[id(t)] = c
                        n.inputs[i] = c
                    continue
                dt = _dtype(t)
                if want16 and dt == np.float32:
                    n.inputs[i] = self._cast(ir, t, np.float16, casts, new_nodes)
                elif not want16 and dt == np.float16 and _produced_by_half(ir, t, half):
                    n.inputs[i] = self._cast(ir, t, np.float32, casts, new_nodes)
        ir.graph.nodes.extend(new_nodes)
        if result is not None:
            kept = sorted({n.op for n in ir.nodes if id(n) not in half and n.op != "Cast"
                           and any(_is_f32(t) for t in n.outputs)})
            result.data = FP16Result(nodes_fp16=len(fp16_nodes), casts=len(new_nodes), constants_fp16=len(const16),
                                     kept_fp32_ops=kept)
            result.note(f"{len(fp16_nodes)} nodes in float16, {len(const16)} constants converted"
                        + (f", float32 kept for {', '.join(kept)}" if kept else ""))
            if saturated:
                result.note(f"{saturated} constant values beyond +-65504 saturated to the float16 range")
        return True

    def _cast(self, ir: IR, t: gs.Tensor, to, cache, new_nodes) -> gs.Tensor:
        key = (t.name, np.dtype(to).name)
        if key in cache:
            return cache[key]
        out = ir.make_var(f"{t.name}_{np.dtype(to).name}", dtype=to, shape=t.shape)
        onnx_to = onnx.TensorProto.FLOAT16 if np.dtype(to) == np.float16 else onnx.TensorProto.FLOAT
        new_nodes.append(gs.Node("Cast", name=ir.unique_name(f"{t.name}_cast_{np.dtype(to).name}"), inputs=[t],
                                 outputs=[out], attrs={"to": onnx_to}))
        cache[key] = out
        return out


def _dtype(t) -> np.dtype | None:
    return plain_dtype(t.dtype)


def _is_f32(t) -> bool:
    return t is not None and _dtype(t) == np.float32  # a constant's dtype is known without loading it


def _produced_by_half(ir: IR, t, half: set[int]) -> bool:
    p = ir.producer(t)
    return p is not None and id(p) in half


def _refused_op(ir: IR) -> str | None:
    """The op type ONNX Runtime refuses to create a CPU session for (None: it loads)."""
    try:
        session(ir.to_onnx())
        return None
    except (ort.capi.onnxruntime_pybind11_state.NotImplemented, ort.capi.onnxruntime_pybind11_state.Fail,
            ort.capi.onnxruntime_pybind11_state.InvalidGraph) as e:
        m = re.search(r"implementation for (\w+)\(", str(e)) or re.search(r"node with name '([^']*)'", str(e))
        if not m:
            return None
        name = m.group(1)
        for n in ir.nodes:
            if n.name == name:
                return n.op
        return name
