"""jetson: TensorRT-ready ONNX for NVIDIA Jetson.

Options: ``trt`` = ``8.5`` (JetPack 5.1), ``8.6`` (JetPack 6.0) or ``10`` (JetPack 6.1+,
TensorRT 10.3). Profile: opsets <= 17 for 8.x, 9-20 for 10; dynamic shapes allowed (the
report lists the inputs that need a min/opt/max optimisation profile); int8 is explicit
quantization in TensorRT's form (QDQ only, symmetric, zero point 0, weights per channel,
no Q/DQ on weighted ops' outputs, float bias); float layers run in FP16; channel multiple 8
(tensor cores).

Pipeline: the lossless clean-up, LayerNormalization decomposed for 8.x (its parser has none),
INT64 constants narrowed to INT32 where readers accept it; with ``sparsity=2:4`` eligible
weights are pruned 2:4 for Ampere/Orin sparse tensor cores and re-fitted on ``--calib`` data.
Check: every node (subgraphs included) against onnx-tensorrt's support matrix of the chosen
version (backends/op_tables.py), plus the restrictions that matter in practice: Q/DQ zero
points 0 and INT8 only, no QLinear/Integer ops, MaxPool's Indices output unused, 2-D/3-D
pooling, TopK sorted, Pad/Slice axes constant, no custom-domain ops (they need plugins).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from edgec.errors import UserError
from edgec.ir import IR
from edgec.outputs import Outputs
from edgec.passes import DecomposeOps, NarrowInt64, Sparsify24
from edgec.target import QuantScheme, Target

from . import checks, op_tables
from .cleanup import lossless_pipeline

VERSIONS = {"8.5": op_tables.TRT85, "8.6": op_tables.TRT85, "10": op_tables.TRT10}


def _configure(t: Target) -> None:
    version = str(t.options["trt"])
    if version not in VERSIONS:
        raise UserError(f"target jetson: trt={version} is not known (choose one of {', '.join(VERSIONS)})")
    if t.options["sparsity"] not in ("", "2:4"):
        raise UserError(f"target jetson: sparsity={t.options['sparsity']} is not known (2:4)")
    _given_profile(t)
    if version == "10":
        t.min_opset, t.max_opset = 9, 20
        t.description = "TensorRT 10.x on Jetson (JetPack 6.1+)"
    else:
        t.min_opset, t.max_opset = 7, 17
        t.description = f"TensorRT {version} on Jetson (JetPack {'5.1' if version == '8.5' else '6.0'})"


def _pipeline(t: Target) -> list:
    extra = [NarrowInt64()]
    if not VERSIONS[str(t.options["trt"])].get("LayerNormalization", (False,))[0]:
        extra.insert(0, DecomposeOps(ops=("LayerNormalization",)))
    pipeline = lossless_pipeline(extra=extra)
    if t.options["sparsity"] == "2:4":  # on the final (BN-folded) weights
        pipeline.append(Sparsify24())
    elif t.options["sparsity"]:
        raise UserError(f"target jetson: sparsity={t.options['sparsity']} is not known (2:4)")
    return pipeline


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
            if not checks.zero_point_is_zero(ir, node):
                return "TensorRT needs zero point 0 (symmetric quantization)"
            q = node.outputs[0] if node.op == "QuantizeLinear" else node.inputs[0]
            name = checks.dtype_name(q)
            if name is not None and name not in ("INT8", "FP8", "INT4") or (name == "INT4" and version != "10"):
                return f"quantized type {name} is not supported (INT8{', INT4, FP8' if version == '10' else ''} only)"
        if node.op == "MaxPool" and len(node.outputs) > 1 and (node.outputs[1].outputs or ir.is_graph_output(node.outputs[1])):
            return "the Indices output is not supported"
        if node.op in ("MaxPool", "AveragePool") and len(node.attrs.get("kernel_shape", [1, 1])) not in (2, 3):
            return "only 2-D or 3-D pooling is supported"
        if node.op == "TopK" and not node.attrs.get("sorted", 1):
            return "sorted must be 1"
        if node.op in ("Pad", "Slice"):
            axes = node.inputs[3] if len(node.inputs) > 3 else None  # Pad and Slice: axes is input 3
            if axes is not None and not (isinstance(axes, gs.Variable) and axes.is_empty()) \
                    and not ir.is_const(axes):
                return "axes must be an initializer"
        if node.op == "Resize" and node.attrs.get("mode", "nearest") not in ("nearest", "linear"):
            return f"resize mode {node.attrs.get('mode')} is not supported (nearest, linear)"
        if types and node.op not in ("QuantizeLinear", "DequantizeLinear", "Cast"):
            data = node.inputs[0] if node.inputs else None
            name = checks.dtype_name(data)
            if name in ("DOUBLE",) and "DOUBLE" not in types:
                return "DOUBLE tensors are only partly supported (cast to FP32)"
        return None

    return verdict


def _profile(t: Target, ir: IR) -> dict[str, list[list[int]]]:
    """min/opt/max shapes per dynamic input, from ``--target-option profile=NAME:MIN:OPT:MAX[;...]``
    (dims joined by x); inputs left out get batch 1 everywhere."""
    given = _given_profile(t)
    profile = {}
    for inp in ir.inputs:
        dims = list(inp.shape or [])
        if all(isinstance(d, (int, np.integer)) and d > 0 for d in dims):
            continue
        fixed = [int(d) if isinstance(d, (int, np.integer)) and d > 0 else 1 for d in dims]
        profile[inp.name] = given.get(inp.name, [fixed, fixed, fixed])
    unknown = set(given) - {i.name for i in ir.inputs}
    if unknown:
        raise UserError(f"target option profile names {sorted(unknown)[0]!r}, not a model input")
    return profile


def _given_profile(t: Target) -> dict[str, list[list[int]]]:
    """``profile=NAME:MIN:OPT:MAX[;...]`` parsed and checked (positive dims, same rank, MIN <= OPT <= MAX)."""
    given = {}
    for item in filter(None, (x.strip() for x in str(t.options["profile"]).split(";"))):
        parts = item.split(":")
        if len(parts) != 4 or not parts[0]:
            raise UserError(f"target option profile: '{item}' is not NAME:MIN:OPT:MAX (e.g. input:1x3x224x224:8x3x224x224:32x3x224x224)")
        try:
            shapes = [[int(d) for d in p.split("x")] for p in parts[1:]]
        except ValueError:
            raise UserError(f"target option profile: dims in '{item}' must be integers joined by x") from None
        lo, opt, hi = shapes
        if any(d <= 0 for s in shapes for d in s) or not len(lo) == len(opt) == len(hi):
            raise UserError(f"target option profile: '{item}': dims must be positive and MIN, OPT, MAX of one rank")
        if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
            raise UserError(f"target option profile: '{item}': need MIN <= OPT <= MAX in every dim")
        given[parts[0]] = shapes
    return given


def _check(t: Target, ir: IR) -> list[str]:
    opset = checks.check_opset(t, ir)
    if opset and str(t.options["trt"]) != "10" and ir.opset <= 20:  # JetPack 6.1+ reads it as it is
        opset = [opset[0] + "; TensorRT 10 reads opsets up to 20 (--target-option trt=10)"]
    problems = opset + checks.check_ops(ir, _verdict(t, ir))
    for name, (lo, opt, hi) in _profile(t, ir).items():
        if not t.options["profile"] or name not in t.options["profile"]:
            problems.append(f"warning: input '{name}' is dynamic: TensorRT needs an optimisation profile; using "
                            f"{'x'.join(map(str, opt))} for min/opt/max (set --target-option profile=...)")
    return problems


def side_paths(t: Target, output: Path, **_) -> list[tuple]:
    """What :func:`write_trtexec` writes beside ``output``: (path, kind, what, replaceable)."""
    return [(output.with_name(output.name + ".trtexec.txt"), "file", "trtexec command file", None)]


def write_trtexec(t: Target, ir: IR, output: Path, writer=None, **_) -> list[Path]:
    """``OUT.trtexec.txt``: the trtexec command that builds this model on the Jetson (staged in
    ``writer``, an :class:`edgec.outputs.Outputs`, when given: written with the model or not at all)."""
    args = [f"trtexec --onnx={output.name} --saveEngine={output.stem}.engine"]
    has_qdq = any(n.op in ("QuantizeLinear", "DequantizeLinear") for n in ir.nodes)
    args.append("--int8 --fp16" if has_qdq else "--fp16")
    profile = _profile(t, ir)
    for flag, k in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
        if profile:
            args.append(flag + "=" + ",".join(f"{n}:{'x'.join(map(str, s[k]))}" for n, s in profile.items()))
    if t.options["sparsity"] == "2:4":
        args.append("--sparsity=enable")
    path = output.with_name(output.name + ".trtexec.txt")
    text = " \\\n    ".join(args) + "\n"
    if writer is None:
        with Outputs() as writer:
            writer.claim(path, "trtexec command file")
            writer.write_text(path, text)
            writer.commit()
    else:
        writer.write_text(path, text)
    return [path]


write_trtexec.paths = side_paths


TARGET = Target(
    name="jetson",
    description="TensorRT 8.5 on Jetson (JetPack 5.1)",
    min_opset=7,
    max_opset=17,
    channel_multiple=8,
    float_precision="fp16",
    quant=QuantScheme(rules="tensorrt", activations="symmetric", weights="per-channel", bias="float",
                      weight_format="float-qdq", mixed=False,
                      alternatives="or no --quantize (TensorRT builds the float model in FP16)"),
    options={"trt": "8.5", "profile": "", "sparsity": ""},
    option_help={"trt": "TensorRT version: 8.5, 8.6 or 10",
                 "profile": "min/opt/max shapes of dynamic inputs: NAME:1x3x224x224:8x3x224x224:32x3x224x224[;...]",
                 "sparsity": "2:4 to prune eligible weights for Ampere/Orin sparse tensor cores"},
    configure=_configure,
    pipeline=_pipeline,
    check=_check,
    extras=write_trtexec,
)
_configure(TARGET)
