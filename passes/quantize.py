"""quantize_qdq: write a quantization plan into the graph (QuantizeLinear/DequantizeLinear).

The one materialiser of every target's int8 scheme. What to quantize is decided elsewhere, as
data: the rule tables (:mod:`edgec.quant_rules`) and calibrated ranges give a
:class:`~edgec.quant_plan.QuantPlan` (:func:`edgec.quant_plan.build_plan`); this pass writes
it. The plan comes from the pass context (``ctx.plan``, as :mod:`edgec.quantize_api` gives
it) or, when the pass is run on its own, is built here from ``ranges`` (or ``ctx.ranges``) and
the scheme options given to the constructor.

Rules
- Folded activations (``plan.folded``: a Relu/Clip(0, c) alone reading a quantized output) are
  removed; their readers read the producer's output, whose range is ``[0, hi]``.
- Every planned activation tensor gets one ``QuantizeLinear -> DequantizeLinear`` pair (scalar
  scale and zero point); the readers the plan names (all, or listed input slots) read the
  dequantized copy. Graph outputs stay float. A 16-bit tensor (the int8 fallback's last step)
  gets a uint16/int16 pair: ai.onnx's from opset 21, ONNX Runtime's ``com.microsoft`` one before.
- Every planned weight: ``weight_format="integer"``: its integer values as an initializer
  feeding ``DequantizeLinear`` (per-channel ``axis`` or per tensor); ``"float-qdq"`` (TensorRT):
  the float weight feeds ``QuantizeLinear -> DequantizeLinear`` and the toolchain folds them.
- Biases of Conv/ConvTranspose/Gemm under ``bias="int32"``: int32 at input scale x weight
  scale (plus the plan's bias correction), through ``DequantizeLinear``; kept float with a note
  when that would overflow int32. Gemm's ``beta`` is folded in.
Numerics are in :mod:`edgec.quant_plan` (the probe that measures plans uses the same functions).
Needs opset >= 13 (per-axis DequantizeLinear).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from edgec.errors import UserError
from edgec.ir import IR, is_empty
from edgec.pipeline import Pass, PassContext, PassResult, register
from edgec.quant_plan import (ActQuant, QuantPlan, bias_form, build_plan, dequantize, is_wide, node_id,
                              qdq_domain, weight_arrays)
from edgec.target import QuantScheme


@register
class QuantizeQDQ(Pass):
    name = "quantize_qdq"
    description = "write a quantization plan as QuantizeLinear/DequantizeLinear (static INT8, per-channel weights)"
    requires = ("shapes",)
    lossless = False
    preserves_shapes = True  # Q/DQ outputs get their inputs' shapes; folded ReLUs kept theirs

    def __init__(self, ranges: dict | None = None, *, scheme: QuantScheme | None = None,
                 activations: str | None = None, weights: str | None = None, precisions: dict | None = None,
                 keep_float=(), weight_type: str | None = None, pointwise=()):
        super().__init__()
        base = scheme or QuantScheme()
        overrides = {k: v for k, v in (("activations", activations), ("weights", weights),
                                       ("weight_type", weight_type)) if v is not None}
        if pointwise:
            overrides["pointwise"] = tuple(pointwise)
        self.scheme = QuantScheme(**{**base.__dict__, **overrides})
        self.ranges = ranges
        self.precisions = dict(precisions or {})
        self.keep_float = tuple(keep_float or ())

    def run(self, ir: IR, ctx: PassContext) -> PassResult:
        plan = ctx.plan
        if plan is None:
            ranges = self.ranges if self.ranges is not None else ctx.ranges
            if ranges is None:
                raise UserError("quantize_qdq needs calibrated activation ranges: use edgec.quantize_api "
                                "(CLI: --quantize int8 --calib DATA)")
            plan = build_plan(ir, self.scheme, ranges, precisions=self.precisions, keep_float=self.keep_float)
        if ir.opset < 13:
            raise UserError(f"QDQ quantization needs opset >= 13 (per-channel DequantizeLinear); the model is at {ir.opset}")
        result = PassResult(False, data=plan)
        for layer, why in plan.float_layers:
            result.note(f"{layer} stays float: {why}")
        if not plan.weights:
            result.note("no layer to quantize")
            return result
        materialise(ir, plan, result)
        result.changed = True
        return result


def materialise(ir: IR, plan: QuantPlan, result: PassResult) -> None:
    """Write ``plan`` into ``ir`` (see the module doc); notes go to ``result``."""
    nodes = {node_id(n): n for n in ir.nodes if n.outputs}
    tensors = ir.graph.tensors()
    for nid in plan.folded:
        act = nodes[nid]
        ir.replace_uses(act.outputs[0], act.inputs[0])
        act.inputs.clear()
        act.outputs.clear()
    written = 0
    for name, aq in plan.activations.items():
        t = tensors.get(name)
        if t is None or (not t.outputs and not ir.is_graph_output(t)):
            continue
        qn, tdq = _qdq(ir, t, aq)
        for c in list(t.outputs):
            if c is qn:
                continue
            for i, x in enumerate(c.inputs):
                if x is t and (aq.readers is None or (node_id(c), i) in aq.readers):
                    c.inputs[i] = tdq
        written += 1
    for nid, wq in plan.weights.items():
        n = nodes[nid]
        _weight(ir, n, wq, plan, result)
    counts = plan.summary()
    kinds = [a.dtype for a in plan.activations.values()]
    kind = "int8" if "int8" in kinds or "int16" in kinds else "uint8"
    wide = sum(is_wide(k) for k in kinds)
    weight_types = sorted({w.kind for w in plan.weights.values() if w.kind != "int4"})
    result.note(f"{counts['layers_int8']} layers int8 ({', '.join(weight_types) or 'int8'} weights), "
                f"{counts['layers_int4']} int4 (emulated in int8 storage), {written} activation tensors quantized "
                f"({'int8 symmetric' if kind == 'int8' else 'uint8 asymmetric'}"
                + (f"; {wide} of them 16-bit" if wide else "") + "), "
                f"{counts['relu_folded']} ReLU/Clip folded into ranges")


def _qdq(ir: IR, t: gs.Tensor, aq: ActQuant) -> tuple[gs.Node, gs.Variable]:
    """One QuantizeLinear -> DequantizeLinear pair on ``t``: the Q node and the dequantized
    tensor (not yet read)."""
    name = t.name
    qdtype = np.dtype(aq.dtype).type
    domain = qdq_domain(aq.dtype, ir.opset)
    s_c = _scalar(ir, name + "_scale", np.array(aq.scale, dtype=np.float32))
    z_c = _scalar(ir, name + "_zero_point", np.array(aq.zero_point, dtype=qdtype))
    tq = ir.make_var(name + "_quantized", dtype=qdtype, shape=t.shape)
    tdq = ir.make_var(name + "_dequantized", dtype=np.float32, shape=t.shape)
    qn = gs.Node("QuantizeLinear", name=ir.unique_name(name + "_QuantizeLinear"), inputs=[t, s_c, z_c], outputs=[tq],
                 domain=domain)
    dqn = gs.Node("DequantizeLinear", name=ir.unique_name(name + "_DequantizeLinear"), inputs=[tq, s_c, z_c],
                  outputs=[tdq], domain=domain)
    ir.graph.nodes.extend([qn, dqn])
    return qn, tdq


def _weight(ir: IR, n: gs.Node, wq, plan: QuantPlan, result: PassResult) -> None:
    base = n.name or n.outputs[0].name
    w = ir.const_value(n.inputs[1])
    rounded = plan.rounded.get(node_id(n))
    q, scale, zp = weight_arrays(w, wq, rounded)
    attrs = {"axis": int(wq.axis)} if wq.axis is not None else {}
    ws = _scalar(ir, base + "_weight_scale", scale)
    wz = _scalar(ir, base + "_weight_zero_point", zp)
    wdq = ir.make_var(base + "_weight_dequantized", dtype=np.float32, shape=list(w.shape))
    if plan.weight_format == "float-qdq":  # the float weight through Q -> DQ (TensorRT folds them)
        # chosen levels are stored dequantized: Q in float32 gives exactly those levels back
        wf = ir.make_const(base + "_weight", w if rounded is None else dequantize(q, scale, zp, wq.axis))
        wqv = ir.make_var(base + "_weight_quantized", dtype=zp.dtype.type, shape=list(w.shape))
        ir.graph.nodes.append(gs.Node("QuantizeLinear", name=ir.unique_name(base + "_weight_QuantizeLinear"),
                                      inputs=[wf, ws, wz], outputs=[wqv], attrs=dict(attrs)))
        src = wqv
    else:
        src = ir.make_const(base + "_weight_quantized", q)
    ir.graph.nodes.append(gs.Node("DequantizeLinear", name=ir.unique_name(base + "_weight_DequantizeLinear"),
                                  inputs=[src, ws, wz], outputs=[wdq], attrs=attrs))
    n.inputs[1] = wdq
    shift = plan.bias_shift.get(node_id(n))
    aq = plan.activations.get(wq.input)
    has_bias = len(n.inputs) > 2 and not is_empty(n.inputs[2])
    b = ir.const_value(n.inputs[2]) if has_bias else None
    form = bias_form(n, w, b, has_bias, aq.scale if aq is not None else None, scale, shift, wq.bias)
    if form is None:
        if shift is not None:
            result.note(f"bias correction of '{wq.layer}' not applied (no bias input form)")
        return
    out_ch = form.value.shape[0]
    if form.q is None:
        result.note(f"bias of '{wq.layer}' kept float ({form.note})")
        _set_bias(n, ir.make_const(base + "_bias", form.value))
    else:
        bq = ir.make_const(base + "_bias_quantized", form.q)
        bs = ir.make_const(base + "_bias_scale", form.scale)
        bz = ir.make_const(base + "_bias_zero_point", np.zeros(out_ch, dtype=np.int32))
        bdq = ir.make_var(base + "_bias_dequantized", dtype=np.float32, shape=[out_ch])
        ir.graph.nodes.append(gs.Node("DequantizeLinear", name=ir.unique_name(base + "_bias_DequantizeLinear"),
                                      inputs=[bq, bs, bz], outputs=[bdq], attrs={"axis": 0}))
        _set_bias(n, bdq)
    if n.op == "Gemm":
        n.attrs["beta"] = 1.0


def _set_bias(n: gs.Node, t: gs.Tensor) -> None:
    if len(n.inputs) > 2:
        n.inputs[2] = t
    else:
        n.inputs.append(t)


def _scalar(ir: IR, hint: str, value: np.ndarray) -> gs.Constant:
    """A constant that keeps its shape (0-d stays 0-d; ir.make_const would make it 1-D)."""
    return gs.Constant(ir.unique_name(hint), np.asarray(value))

