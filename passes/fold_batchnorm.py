"""fold_batchnorm: fold an inference BatchNormalization into the layer that feeds it.

Rules
- ``y = BN(x)`` with ``s = gamma / sqrt(var + eps)`` is ``s * x + (beta - s * mean)``, per
  channel (axis 1).
- Foldable producers, when ``x`` has no other reader and is not a graph output, the weights
  (and bias, if any) are constants (``ConstantOfShape`` weights included), and the BN is in
  inference mode (``training_mode=0``; below opset 14 training mode is signalled by declaring
  the statistics outputs at all) with only its first output used:
  * Conv (any group count, bias or not): ``W[o] *= s[o]``, ``b = (b - mean) * s + beta``;
  * ConvTranspose: output channel ``o = g * (C_out/g) + j`` is weight ``W[g*C_in/g + i, j]``;
  * Gemm: columns of ``op(B)`` scaled, ``C`` rewritten (``beta`` folded to 1);
  * MatMul with a constant 2-D right operand and a rank-2 output: columns of ``B`` scaled and
    an Add of the new bias appended.
- New constants are created; shared weights are never modified in place.
- A BN that cannot be folded stays and a note says why.
Post-condition: same outputs up to float rounding (lossless).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from edgec.ir import IR
from edgec.pipeline import Pass, PassContext, PassResult, register

FOLDABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@register
class FoldBatchNorm(Pass):
    name = "fold_batchnorm"
    description = "fold BatchNormalization into a preceding Conv, ConvTranspose, Gemm or constant-weight MatMul"
    preserves_shapes = True
    requires = ("shapes",)

    def run(self, ir: IR, ctx: PassContext) -> PassResult:
        result = PassResult(False)
        for bn in list(ir.find("BatchNormalization")):
            reason = self._fold(ir, bn)
            if reason is None:
                result.changed = True
            else:
                result.note(f"BatchNormalization '{bn.name or bn.outputs[0].name}' not folded: {reason}")
        return result

    def _fold(self, ir: IR, bn: gs.Node) -> str | None:
        affine = inference_affine(ir, bn)
        if isinstance(affine, str):
            return affine
        s, shift = affine
        x = bn.inputs[0]
        prod = ir.producer(x)
        if prod is None:
            return "its input is a graph input"
        if prod.op not in FOLDABLE or prod.domain not in (None, "", "ai.onnx"):
            return f"its input comes from {prod.op}, not from Conv/ConvTranspose/Gemm/MatMul"
        if ir.single_consumer(x) is not bn:
            return f"the {prod.op} output is also read elsewhere"
        fold = {"Conv": self._conv, "ConvTranspose": self._conv_transpose,
                "Gemm": self._gemm, "MatMul": self._matmul}[prod.op]
        reason = fold(ir, prod, s, shift)
        if reason is not None:
            return reason
        ir.bypass(bn)
        return None

    # Each folder returns None on success or the reason it cannot fold.
    def _conv(self, ir: IR, conv: gs.Node, s, shift) -> str | None:
        w = ir.const_value(conv.inputs[1])
        if w is None or w.shape[0] != s.shape[0]:
            return "the Conv weight is not a constant with one row per channel"
        b = ir.const_value(conv.inputs[2]) if len(conv.inputs) > 2 else None
        if len(conv.inputs) > 2 and b is None and not _empty(conv.inputs[2]):
            return "the Conv bias is not a constant"
        b = np.zeros(w.shape[0]) if b is None else b.astype(np.float64)
        w_new = (w.astype(np.float64) * s.reshape((-1,) + (1,) * (w.ndim - 1))).astype(w.dtype)
        b_new = (b * s + shift).astype(w.dtype)
        _set_inputs(ir, conv, w_new, b_new)
        return None

    def _conv_transpose(self, ir: IR, conv: gs.Node, s, shift) -> str | None:
        w = ir.const_value(conv.inputs[1])
        if w is None:
            return "the ConvTranspose weight is not a constant"
        group = int(conv.attrs.get("group", 1))
        cin, cout_g = w.shape[0], w.shape[1]
        if cout_g * group != s.shape[0]:
            return "channel count mismatch"
        b = ir.const_value(conv.inputs[2]) if len(conv.inputs) > 2 else None
        if len(conv.inputs) > 2 and b is None and not _empty(conv.inputs[2]):
            return "the ConvTranspose bias is not a constant"
        b = np.zeros(s.shape[0]) if b is None else b.astype(np.float64)
        ws = w.astype(np.float64).reshape((group, cin // group, cout_g) + w.shape[2:])
        ws = ws * s.reshape((group, 1, cout_g) + (1,) * (w.ndim - 2))
        _set_inputs(ir, conv, ws.reshape(w.shape).astype(w.dtype), (b * s + shift).astype(w.dtype))
        return None

    def _gemm(self, ir: IR, gemm: gs.Node, s, shift) -> str | None:
        b = ir.const_value(gemm.inputs[1])
        if b is None:
            return "the Gemm B operand is not a constant"
        trans_b = int(gemm.attrs.get("transB", 0))
        n = b.shape[0] if trans_b else b.shape[1]
        if n != s.shape[0]:
            return "channel count mismatch"
        alpha = float(gemm.attrs.get("alpha", 1.0))
        beta = float(gemm.attrs.get("beta", 1.0))
        b_new = b.astype(np.float64) * (s[:, None] if trans_b else s[None, :])
        c = ir.const_value(gemm.inputs[2]) if len(gemm.inputs) > 2 and not _empty(gemm.inputs[2]) else None
        if len(gemm.inputs) > 2 and not _empty(gemm.inputs[2]) and c is None:
            return "the Gemm C operand is not a constant"
        c_new = shift if c is None else beta * c.astype(np.float64) * s + shift
        gemm.attrs["beta"] = 1.0
        gemm.attrs["alpha"] = alpha
        _set_inputs(ir, gemm, b_new.astype(b.dtype), c_new.astype(b.dtype))
        return None

    def _matmul(self, ir: IR, mm: gs.Node, s, shift) -> str | None:
        b = ir.const_value(mm.inputs[1])
        a = mm.inputs[0]
        if b is None or b.ndim != 2:
            return "the MatMul right operand is not a constant matrix"
        if a.shape is None or len(a.shape) != 2:
            return "the MatMul output is not 2-D (BN's channel axis would not be its columns)"
        if b.shape[1] != s.shape[0]:
            return "channel count mismatch"
        mm.inputs[1] = ir.make_const(mm.name + "_bnfolded_B", (b.astype(np.float64) * s[None, :]).astype(b.dtype))
        out = mm.outputs[0]
        mid = ir.make_var(out.name + "_mm", dtype=out.dtype, shape=out.shape)
        mm.outputs[0] = mid
        bias = ir.make_const(mm.name + "_bnfolded_bias", shift.astype(b.dtype))
        ir.graph.nodes.append(gs.Node("Add", name=ir.unique_name(mm.name + "_bias"), inputs=[mid, bias], outputs=[out]))
        return None


def inference_affine(ir: IR, bn: gs.Node) -> tuple[np.ndarray, np.ndarray] | str:
    """``(s, shift)`` in float64, per channel, of a BatchNormalization in inference mode
    (``y = s * x + shift``, ``s = gamma / sqrt(var + eps)``, ``shift = beta - s * mean``), or the
    reason it is not one: training mode, per-activation statistics, statistics outputs in use,
    parameters that are not constants."""
    if bn.attrs.get("training_mode", 0):
        return "training_mode=1"
    if ir.opset < 14 and any(o.name for o in bn.outputs[1:]):
        # BatchNormalization-9..13: declaring the statistics outputs *is* training mode
        # (ONNX Runtime then normalises with batch statistics), read or not.
        return "training mode (opset < 14 with its statistics outputs declared)"
    if bn.attrs.get("spatial", 1) != 1:
        return "spatial=0 (per-activation statistics)"
    if any(o.outputs or ir.is_graph_output(o) for o in bn.outputs[1:]):
        return "its running-statistics outputs are used"
    params = [ir.const_value(t) for t in bn.inputs[1:5]]
    if any(p is None for p in params):
        return "its scale/bias/mean/var are not constants"
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    s = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
    return s, beta - s * mean


def _empty(t) -> bool:
    return isinstance(t, gs.Variable) and t.is_empty()


def _set_inputs(ir: IR, node: gs.Node, weight: np.ndarray, bias: np.ndarray) -> None:
    base = node.name or node.outputs[0].name
    node.inputs[1] = ir.make_const(base + "_bnfolded_W", weight)
    bias_c = ir.make_const(base + "_bnfolded_b", bias)
    if len(node.inputs) > 2:
        node.inputs[2] = bias_c
    else:
        node.inputs.append(bias_c)
