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
- ``check``: a condition on the node (``node -> None`` or the reason it stays float).

A scheme (:class:`edgec.target.QuantScheme`) selects its table by ``rules`` and drives it with
its switches: ``activations`` (asymmetric uint8 / symmetric int8), ``weights`` (per-channel /
per-tensor), ``weight_type`` (int8, int7, uint8), ``bias`` (int32 / float), ``weight_format``
(integer initializers / float initializers with Q -> DQ), ``pointwise`` (unary ops quantized
like the aggregates, for toolchains that want every tensor in int8). Adding a target's scheme
is one table here (or an existing one) and one profile in ``backends/``: see the README.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import onnx_graphsurgeon as gs

from .errors import UserError

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


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


def _nearest_only(node: gs.Node) -> str | None:
    return None if node.attrs.get("mode", "nearest") == "nearest" else "Resize that is not nearest"


def _single_output(node: gs.Node) -> str | None:
    return None if len(node.outputs) == 1 else "more than one output"


_MOVE = OpRule(follows=True, output="always", share_scale="input")
_FOLLOW = OpRule(follows=True, output="always")

# ONNX Runtime's CPU QDQ fusions: DQ -> op -> Q groups become QLinearConv, QGemm,
# QLinearMatMul, QLinearAdd/Mul, QLinearConcat, QLinearGlobalAveragePool, QLinearAveragePool;
# Q/DQ pairs around data-movement ops drop. (Also what RKNN-Toolkit2 reads as pre-quantized.)
ORT_FUSABLE: dict[str, OpRule] = {
    "Conv": OpRule(weighted=True, output="always"),
    "ConvTranspose": OpRule(weighted=True, output="always"),
    # QGemm has a float-output form; MatMul keeps its Q: ONNX Runtime rewrites a MatMul + bias
    # Add without one into a float Gemm
    "Gemm": OpRule(weighted=True, output="for-quantized-readers"),
    "MatMul": OpRule(weighted=True, output="always"),
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
}

# TensorRT's explicit quantization (its documented Q/DQ placement; NVIDIA Model Optimizer's ONNX
# PTQ does the same): Q/DQ on the inputs of weighted ops only, none on their outputs (TensorRT
# fuses Conv + BN + ReLU itself, an extra pair would split the fusion), the residual input of
# skip-connection adds, and nothing else (TensorRT propagates Q/DQ through pooling, concat and
# reshapes itself).
TENSORRT: dict[str, OpRule] = {
    # depthwise and grouped convolutions too: TensorRT has INT8 kernels for them (a layer that is
    # too sensitive is kept float by measurement, not by rule)
    "Conv": OpRule(weighted=True, output="never"),
    "ConvTranspose": OpRule(weighted=True, output="never"),
    "Gemm": OpRule(weighted=True, output="never"),
    "MatMul": OpRule(weighted=True, output="never"),
    "Add": OpRule(residual=True),
}

TABLES: dict[str, dict[str, OpRule]] = {"ort-fusable": ORT_FUSABLE, "tensorrt": TENSORRT}


def table_for(scheme) -> dict[str, OpRule]:
    """The rule table a scheme names, with its ``pointwise`` ops added as following ops."""
    name = getattr(scheme, "rules", "ort-fusable")
    if name not in TABLES:
        raise UserError(f"unknown quantization rule table '{name}' (known: {', '.join(TABLES)})")
    table = dict(TABLES[name])
    for op in getattr(scheme, "pointwise", ()) or ():
        table.setdefault(op, _FOLLOW)
    return table
