"""A readable, stable text form of a graph for golden files and debugging.

One line per node: ``%out = Op(%in, @weight:float32[16,3,3,3]#1a2b3c4d) {attrs}``. Constants
are summarised by dtype, shape and the first 8 hex digits of the SHA-1 of their bytes
(scalars and tiny int64 vectors, e.g. shapes and axes, are printed by value).
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .ir import IR, dtype_name


def _shape(shape) -> str:
    if shape is None:
        return "?"
    return "[" + ",".join(str(d) for d in shape) + "]"


def _dtype(dt) -> str:
    try:
        return str(np.dtype(dt)) if dt is not None else "?"
    except TypeError:
        return str(dt)


def _const(ir: IR, t: gs.Constant) -> str:
    v = ir.const_value(t)
    if v is None:  # carried through untouched (bfloat16, float8, int4, strings)
        return f"{dtype_name(t.dtype)}{_shape(t.shape)}"
    if v.dtype.kind in "iub" and v.size <= 8:
        return f"{_dtype(v.dtype)}{_shape(v.shape)}={v.reshape(-1).tolist()}"
    if v.size == 1:
        return f"{_dtype(v.dtype)}{_shape(v.shape)}={v.reshape(-1)[0].item():.6g}"
    digest = hashlib.sha1(np.ascontiguousarray(v).tobytes()).hexdigest()[:8]
    return f"{_dtype(v.dtype)}{_shape(v.shape)}#{digest}"


def _attr(v) -> str:
    if isinstance(v, gs.Graph):
        return f"<graph {v.name}: {len(v.nodes)} nodes>"
    if isinstance(v, gs.Constant):
        return "<tensor>"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_attr(x) for x in v) + "]"
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    return str(v)


def dump(model_or_ir) -> str:
    ir = model_or_ir if isinstance(model_or_ir, IR) else IR.from_onnx(model_or_ir)
    ir.toposort()
    lines = ["opsets " + ", ".join(f"{d or 'ai.onnx'}={v}" for d, v in sorted(ir.opsets.items()))]
    for t in ir.inputs:
        lines.append(f"input  %{t.name}: {_dtype(t.dtype)}{_shape(t.shape)}")
    for t in ir.outputs:
        lines.append(f"output %{t.name}: {_dtype(t.dtype)}{_shape(t.shape)}")
    for node in ir.nodes:
        args = []
        for t in node.inputs:
            if isinstance(t, gs.Variable) and t.is_empty():
                args.append("_")
            elif isinstance(t, gs.Constant):
                args.append(f"@{t.name}:{_const(ir, t)}")
            else:
                args.append(f"%{t.name}")
        outs = ", ".join(f"%{t.name}" for t in node.outputs)
        op = node.op if node.domain in (None, "", "ai.onnx") else f"{node.domain}.{node.op}"
        attrs = ", ".join(f"{k}={_attr(v)}" for k, v in sorted(node.attrs.items()))
        lines.append(f"{outs} = {op}({', '.join(args)})" + (f" {{{attrs}}}" if attrs else ""))
    return "\n".join(lines) + "\n"
