"""jetson: TensorRT-ready ONNX for NVIDIA Jetson.

Options: ``trt`` = ``8.5`` (JetPack 5.1), ``8.6`` (JetPack 6.0) or ``10`` (JetPack 6.1+,
TensorRT 10.3). Profile: opsets <= 17 for 8.x, 9-20 for 10; dynamic shapes allowed (the
report lists the inputs that need a min/opt/max optimisation profile); int8 is explicit
quantization in TensorRT's form (QDQ only, symmetric, zero point 0, weights per channel,
no Q/DQ on weighted ops' outputs, float bias); float layers run in FP16; channel multiple 8
(tensor cores).

Pipeline: the lossless clean-up, LayerNormalization decomposed for 8.x (its parser has none),
INT64 constants narrowed to INT32 where readers accept it.
Check: every node (subgraphs included) against onnx-tensorrt's support matrix of the chosen
version (backends/op_tables.py), plus the restrictions that matter in practice: Q/DQ zero
points 0 and INT8 only, no QLinear/Integer ops, MaxPool's Indices output unused, 2-D/3-D
pooling, TopK sorted, Pad/Slice axes constant, no custom-domain ops (they need plugins).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from edgec.ir import IR
from edgec.target import QuantScheme, Target

from . import _checks, op_tables

VERSIONS = {"8.5": op_tables.TRT85, "8.6": op_tables.TRT85, "10": op_tables.TRT10}


def _configure(t: Target) -> None:
    version = str(t.options["trt"])
    if version not in VERSIONS:
        from edgec.errors import UserError

        raise UserError(f"target jetson: trt={version} is not known (choose one of {', '.join(VERSIONS)})")
    if version == "10":
        t.min_opset, t.max_opset = 9, 20
        t.description = "TensorRT 10.x on Jetson (JetPack 6.1+)"
    else:
        t.min_opset, t.max_opset = 7, 17
        t.description = f"TensorRT {version} on Jetson (JetPack {'5.1' if version == '8.5' else '6.0'})"


def _pipeline(t: Target) -> list:
    from edgec.passes import DecomposeOps, NarrowInt64

    from . import lossless_pipeline

    extra = [NarrowInt64()]
    if not VERSIONS[str(t.options["trt"])].get("LayerNormalization", (False,))[0]:
        extra.insert(0, DecomposeOps(ops=("LayerNormalization",)))
    return lossless_pipeline(extra=extra)


def _verdict(t: Target, ir: IR):
    table = VERSIONS[str(t.options["trt"])]
    version = t.options["trt"]

    def verdict(node: gs.Node) -> str | None:
        if node.domain not in (None, "", "ai.onnx"):
            return f"custom domain '{node.domain}': the TensorRT {version} parser needs a plugin for it"
        entry = table.get(node.op)
        if entry is None or not entry[0]:
            return f"not supported by the TensorRT {version} ONNX parser"
        _, types, _ = entry
        if node.op in ("QuantizeLinear", "DequantizeLinear"):
            if not _checks.zero_point_is_zero(ir, node):
                return "TensorRT needs zero point 0 (symmetric quantization)"
            q = node.outputs[0] if node.op == "QuantizeLinear" else node.inputs[0]
            name = _checks.dtype_name(q)
            if name is not None and name not in ("INT8", "FP8", "INT4") or (name == "INT4" and version != "10"):
                return f"quantized type {name} is not supported (INT8{', INT4, FP8' if version == '10' else ''} only)"
        if node.op == "MaxPool" and len(node.outputs) > 1 and (node.outputs[1].outputs or ir.is_graph_output(node.outputs[1])):
            return "the Indices output is not supported"
        if node.op in ("MaxPool", "AveragePool") and len(node.attrs.get("kernel_shape", [1, 1])) not in (2, 3):
            return "only 2-D or 3-D pooling is supported"
        if node.op == "TopK" and not node.attrs.get("sorted", 1):
            return "sorted must be 1"
        if node.op in ("Pad", "Slice"):
            axes_idx = 3 if node.op == "Pad" else 3
            if len(node.inputs) > axes_idx and not (isinstance(node.inputs[axes_idx], gs.Variable)
                                                     and node.inputs[axes_idx].is_empty()) \
                    and not ir.is_const(node.inputs[axes_idx]):
                return "axes must be an initializer"
        if node.op == "Resize" and node.attrs.get("mode", "nearest") not in ("nearest", "linear"):
            return f"resize mode {node.attrs.get('mode')} is not supported (nearest, linear)"
        if types and node.op not in ("QuantizeLinear", "DequantizeLinear", "Cast"):
            data = node.inputs[0] if node.inputs else None
            name = _checks.dtype_name(data)
            if name in ("DOUBLE",) and "DOUBLE" not in types:
                return "DOUBLE tensors are only partly supported (cast to FP32)"
        return None

    return verdict


def _check(t: Target, ir: IR) -> list[str]:
    return _checks.check_opset(t, ir) + _checks.check_ops(ir, _verdict(t, ir))


TARGET = Target(
    name="jetson",
    description="TensorRT 8.5 on Jetson (JetPack 5.1)",
    min_opset=7,
    max_opset=17,
    channel_multiple=8,
    float_precision="fp16",
    quant=QuantScheme(activations="symmetric", weights="per-channel", bias="float", quantize_outputs=False),
    options={"trt": "8.5"},
    option_help={"trt": "TensorRT version: 8.5, 8.6 or 10"},
    configure=_configure,
    pipeline=_pipeline,
    check=_check,
)
_configure(TARGET)
