"""Quantization rule tables: how each op type is quantized, per target scheme.

In the style of ONNX Runtime's quantizer registry (op type -> quantizer): a table maps an op
type to an :class:`OpRule` saying what gets Q/DQ around that op. The rules only *decide*;
:mod:`edgec.quant_plan` turns a table, calibrated ranges and a scheme's switches into a
:class:`~edgec.quant_plan.QuantPlan` (data), and one materialiser
(:class:`edgec.passes.quantize.QuantizeQDQ`) writes every Q/DQ node of the plan.

A rule's fields:

- ``weighted``: the op has a constant float weight (input 1), quantized per output channel
  (or per tensor), and its activation input (input 0) gets Q/DQ;
- ``output``: Q/DQ on the op's output: ``"always"``, ``"for-quantized-readers"`` (kept only
  when an op reading it ends up quantized: ONNX Runtime's QGemm has a float-output form), or
  ``"never"``;
- ``follows``: a non-weighted op that is quantized when every activation input already is
  (``inputs`` = how many activation inputs it must have: an int, or ``"any"``);
- ``share_scale``: ``"input"`` (the output keeps its input's scale: data movement, so ONNX
  Runtime drops the Q/DQ pair and runs the op on integers) or ``"all"`` (Concat: inputs and
  output share one scale, when their ranges agree in sign);
- ``removable``: a Relu/Clip(0, c) alone reading a quantized output is removed and folded
  into that output's range ``[0, hi]`` (asymmetric activations only: the zero point's
  saturation *is* the ReLU);
- ``residual``: TensorRT: the input of an Add that does not come from a quantized weighted
  op gets Q/DQ, so the add fuses into the convolution;
- ``check``: a condition on the node (``node -> None`` or the reason it stays float);
- ``fixed_range``: the op's output range is fixed by its math (Softmax, Sigmoid, HardSigmoid:
  ``[0, 1]``): when that output is quantized (the op follows, or a weighted op reads it) its
  scale comes from this range, not from calibration, so held-out data never saturates it;
- ``float_reason``: the op is kept float on purpose in this table; every such node is listed in
  the plan's ``float_layers`` with this reason (the report's notes);
- ``float_input``: its input stays float too: a producer whose output reaches only such ops and
  graph outputs, through data movement or constant affine arithmetic (a MatMul + bias +
  Transpose into an LSTM, a box conv + Split into the decode's Exp), gets no output Q/DQ (a
  static scale saturating on data beyond the calibration set's range would feed the error into
  every later step of a recurrence, or shrink a box exponentially).

Structures that break naive int8, and the rule that handles each (tests/test_structures.py):

- detection heads: the DFL integral (a Conv/MatMul whose one output channel's weights are
  ``0..n``) keeps its float weights (``_integral_projection``); the decode arithmetic (Add/Mul
  with constants, Exp) stays float, and so does the input of an Exp; a Concat of sigmoid
  scores and pixel-scale boxes is not given one shared scale (the planner's
  MAX_SHARED_SPAN_RATIO: it stays float and each input keeps its own scale);
- outputs with channels orders of magnitude apart: a tensor that reaches a graph output through
  data movement and constant affine ops only (Transpose, Reshape, ...) gets no per-tensor Q/DQ
  (the planner's FLOAT_OUTPUT_TAILS); the layer still runs per-channel int8 weights;
- attention: Softmax follows a quantized input at the fixed ``[0, 1]`` range (QLinearSoftmax) for
  a quantized reader; activation x activation MatMuls stay float; LayerNormalization stays float;
- LSTM/GRU/RNN stay float, with their input;
- SE gates: Sigmoid/HardSigmoid outputs at the fixed ``[0, 1]`` range; HardSwish/HardSigmoid
  float where the runtime has no int8 kernel for them.

A scheme (:class:`edgec.target.QuantScheme`) selects its table by ``rules`` and drives it with
its switches: ``activations`` (asymmetric uint8 / symmetric int8), ``weights`` (per-channel /
per-tensor), ``weight_type`` (int8, int7, uint8), ``bias`` (int32 / float), ``weight_format``
(integer initializers / float initializers with Q -> DQ), ``pointwise`` (unary ops quantized
like the aggregates, for toolchains that want every tensor in int8). Adding a target's scheme
is one table here (or an existing one) and one profile in ``backends/``: see the README.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from .errors import UserError

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# ops of an already-quantized input (ONNX Runtime's QDQ, QOperator and dynamic-quantization output,
# its com.microsoft ones included): int8 keeps them as they are, pruning finds no float weights in them
PRE_QUANTIZED = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
                 "ConvInteger", "MatMulInteger", "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearConcat",
                 "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearLeakyRelu", "QLinearSoftmax",
                 "DynamicQuantizeLSTM", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm", "QAttention"}


@dataclass(frozen=True)
class OpRule:
    weighted: bool = False
    output: str = "never"  # "always" | "for-quantized-readers" | "never"
    follows: bool = False
    inputs: int | str = 1  # activation inputs a following op must have (or "any")
    share_scale: str = "none"  # "none" | "input" | "all"
    removable: bool = False
    residual: bool = False
    check: Callable[[gs.Node], str | None] | None = None
    fixed_range: tuple[float, float] | None = None
    float_reason: str | None = None
    float_input: bool = False


def _nearest_only(node: gs.Node) -> str | None:
    return None if node.attrs.get("mode", "nearest") == "nearest" else "Resize that is not nearest"


def _single_output(node: gs.Node) -> str | None:
    return None if len(node.outputs) == 1 else "more than one output"


def _integral_projection(node: gs.Node) -> str | None:
    """A DFL integral: one output channel whose weights are 0, 1, ..., n (the expectation of a
    softmax over n + 1 box bins). Rounded to int8 the bin values themselves move (scale n / 127:
    bin 1 becomes 18 * 7 / 127 = 0.992 for bins 0..7, a bias in every box side), and the layer is
    one dot product per box side: it keeps float weights."""
    if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
        return None
    w = np.asarray(node.inputs[1].values)
    n = w.size
    if n < 4 or w.ndim < 2 or sum(d > 1 for d in w.shape) != 1:
        return None
    out_axis = {"Conv": 0, "MatMul": 1, "Gemm": 0 if node.attrs.get("transB", 0) else 1}.get(node.op)
    if out_axis is None or w.shape[out_axis] != 1:  # one output channel: the bins are the input axis
        return None
    if not np.array_equal(w.reshape(-1), np.arange(n, dtype=w.dtype)):
        return None
    return (f"a DFL integral (weights 0..{n - 1}, the expectation over box bins): int8 would round the bin "
            f"values themselves (scale {n - 1}/127) and shift every box; it keeps float weights")


_MOVE = OpRule(follows=True, output="always", share_scale="input")
_FOLLOW = OpRule(follows=True, output="always")
_UNIT = (0.0, 1.0)
_RECURRENT = ("ONNX Runtime quantizes recurrent layers dynamically only (DynamicQuantizeLSTM: input ranges taken "
              "per call; its static QDQ quantizer has no LSTM/GRU rule and its CPU provider no QDQ fusion), and "
              "int8 rounding or saturation of the recurrent state or its input would compound over the sequence: "
              "kept float with its input, the layers before and after it are int8")
_RECURRENT_TRT = ("edgec gives recurrent layers no Q/DQ: the ONNX op has no place for them on its state or gates "
                  "(TensorRT's ONNX parser builds it as a loop of matrix multiplies), and int8 rounding of the state "
                  "would compound over the sequence; it runs FP32/FP16")
_NO_KERNEL = ("no int8 kernel in ONNX Runtime (its QDQ fusions cover Sigmoid, Softmax, LeakyRelu, pools, Add, Mul, "
              "Concat and the weighted ops): a Q/DQ pair around it would only add rounding")

# ONNX Runtime's CPU QDQ fusions: DQ -> op -> Q groups become QLinearConv, QGemm,
# QLinearMatMul, QLinearAdd/Mul, QLinearConcat, QLinearGlobalAveragePool, QLinearAveragePool;
# Q/DQ pairs around data-movement ops drop. (Also what RKNN-Toolkit2 reads as pre-quantized.)
ORT_FUSABLE: dict[str, OpRule] = {
    "Conv": OpRule(weighted=True, output="always", check=_integral_projection),
    "ConvTranspose": OpRule(weighted=True, output="always"),
    # QGemm has a float-output form; MatMul keeps its Q: ONNX Runtime rewrites a MatMul + bias
    # Add without one into a float Gemm
    "Gemm": OpRule(weighted=True, output="for-quantized-readers", check=_integral_projection),
    "MatMul": OpRule(weighted=True, output="always", check=_integral_projection),
    "Add": OpRule(follows=True, inputs=2, output="always"),
    "Mul": OpRule(follows=True, inputs=2, output="always"),
    "Concat": OpRule(follows=True, inputs="any", output="always", share_scale="all"),
    "GlobalAveragePool": OpRule(follows=True, output="always", check=_single_output),
    "AveragePool": OpRule(follows=True, output="always", check=_single_output),
    "MaxPool": OpRule(follows=True, output="always", share_scale="input", check=_single_output),
    "Reshape": _MOVE,
    "Transpose": _MOVE,
    "Flatten": _MOVE,
    "Squeeze": _MOVE,
    "Unsqueeze": _MOVE,
    "Resize": OpRule(follows=True, output="always", share_scale="input", check=_nearest_only),
    "Identity": _MOVE,
    "Relu": OpRule(removable=True),
    "Clip": OpRule(removable=True),
    # [0, 1] by the op's math: that range, not a calibrated one, wherever the output is quantized.
    # Softmax follows a quantized input (QLinearSoftmax) when a quantized op reads it. Sigmoid does
    # not follow: QLinearSigmoid + QLinearMul for SiLU's x * sigmoid(x) cost se_block 0.9 dB for no
    # measurable speed (benchmarks/quantization.py); a weighted op reading it still quantizes it
    "Sigmoid": OpRule(fixed_range=_UNIT),
    "Softmax": OpRule(follows=True, output="for-quantized-readers", fixed_range=_UNIT),
    "HardSigmoid": OpRule(fixed_range=_UNIT, float_reason=_NO_KERNEL),
    "HardSwish": OpRule(float_reason=_NO_KERNEL),
    "Exp": OpRule(float_input=True,
                  float_reason="exp turns an input's rounding error into a relative output error, and a saturated "
                               "input into a much smaller box: the decode stays float, and its input too"),
    "LayerNormalization": OpRule(float_reason="it normalises by per-token statistics, and ONNX Runtime's CPU "
                                              "provider has no int8 LayerNormalization: it runs float, its output is "
                                              "quantized where a weighted op reads it"),
    "LSTM": OpRule(float_reason=_RECURRENT, float_input=True),
    "GRU": OpRule(float_reason=_RECURRENT, float_input=True),
    "RNN": OpRule(float_reason=_RECURRENT, float_input=True),
}

# TensorRT's explicit quantization (its documented Q/DQ placement; NVIDIA Model Optimizer's ONNX
# PTQ does the same): Q/DQ on the inputs of weighted ops only, none on their outputs (TensorRT
# fuses Conv + BN + ReLU itself, an extra pair would split the fusion), the residual input of
# skip-connection adds, and nothing else (TensorRT propagates Q/DQ through pooling, concat and
# reshapes itself).
TENSORRT: dict[str, OpRule] = {
    # depthwise and grouped convolutions too: TensorRT has INT8 kernels for them (a layer that is
    # too sensitive is kept float by measurement, not by rule)
    "Conv": OpRule(weighted=True, output="never", check=_integral_projection),
    "ConvTranspose": OpRule(weighted=True, output="never"),
    "Gemm": OpRule(weighted=True, output="never", check=_integral_projection),
    "MatMul": OpRule(weighted=True, output="never", check=_integral_projection),
    "Add": OpRule(residual=True),
    # no Q/DQ of their own: TensorRT runs them in FP32/FP16; a weighted op reading a softmax or a
    # sigmoid quantizes it over their fixed [0, 1] range; the ones with a reason are listed in the report
    "Softmax": OpRule(fixed_range=_UNIT),
    "Sigmoid": OpRule(fixed_range=_UNIT),
    "HardSigmoid": OpRule(fixed_range=_UNIT),
    "LayerNormalization": OpRule(float_reason="TensorRT normalisation layers take no Q/DQ in explicit quantization "
                                              "(Q/DQ go on weighted ops' inputs): it runs FP32/FP16"),
    "LSTM": OpRule(float_reason=_RECURRENT_TRT),
    "GRU": OpRule(float_reason=_RECURRENT_TRT),
    "RNN": OpRule(float_reason=_RECURRENT_TRT),
}

TABLES: dict[str, dict[str, OpRule]] = {"ort-fusable": ORT_FUSABLE, "tensorrt": TENSORRT}


def table_for(scheme) -> dict[str, OpRule]:
    """The rule table a scheme names, with its ``pointwise`` ops added as following ops."""
    name = getattr(scheme, "rules", "ort-fusable")
    if name not in TABLES:
        raise UserError(f"unknown quantization rule table '{name}' (known: {', '.join(TABLES)})")
    table = dict(TABLES[name])
    for op in getattr(scheme, "pointwise", ()) or ():
        # every tensor int8: the op follows with its output always quantized (a [0, 1] op keeps
        # its fixed range), over a rule that kept it float
        rule = table.get(op)
        if rule is None:
            table[op] = _FOLLOW
        elif not rule.follows or rule.output != "always" or rule.float_reason:
            table[op] = replace(rule, follows=True, output="always", float_reason=None, float_input=False)
    return table
