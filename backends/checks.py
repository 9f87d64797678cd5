"""Conformance checks shared by targets: each returns a list of one-line problems."""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import onnx_graphsurgeon as gs

from edgec import loader
from edgec.ir import IR, plain_dtype, subgraphs
from edgec.ir import dtype_name as _elem_name

TYPE_NAMES = {"float32": "FP32", "float16": "FP16", "float64": "DOUBLE", "int32": "INT32", "int64": "INT64",
              "int8": "INT8", "uint8": "UINT8", "bool": "BOOL", "bfloat16": "BF16"}


def all_nodes(graph: gs.Graph) -> Iterable[gs.Node]:
    """Nodes of the graph and of every subgraph inside it (a node, then its bodies' nodes)."""
    for node in graph.nodes:
        yield node
        for body in subgraphs(node):
            yield from body.nodes


def label(node: gs.Node) -> str:
    op = node.op if node.domain in (None, "", "ai.onnx") else f"{node.domain}::{node.op}"
    return f"{op} '{node.name or node.outputs[0].name}'"


def check_opset(target, ir: IR) -> list[str]:
    if not target.min_opset <= ir.opset <= target.max_opset:
        why = next((n for n in getattr(ir.info, "notes", None) or [] if isinstance(n, loader.OpsetKept)), "")
        return [f"opset {ir.opset} is outside what {target.description} reads ({target.min_opset}-{target.max_opset})"
                + (f": {why}" if why else "")]
    return []


def dynamic_inputs(ir: IR) -> list[str]:
    out = []
    for t in ir.inputs:
        if t.shape is None or any(not isinstance(d, (int, np.integer)) or d <= 0 for d in t.shape):
            out.append(f"{t.name}{list(t.shape) if t.shape is not None else '[?]'}")
    return out


def check_static(target, ir: IR) -> list[str]:
    dyn = dynamic_inputs(ir)
    if dyn:
        return [f"{target.name} needs static input shapes; dynamic: {', '.join(dyn)} "
                f"(give --input-shape NAME=D1,D2,...)"]
    return []


def check_ops(ir: IR, verdict: Callable[[gs.Node], str | None]) -> list[str]:
    problems = []
    for node in all_nodes(ir.graph):
        why = verdict(node)
        if why:
            problems.append(f"{label(node)}: {why}")
    return problems


def dtype_name(t) -> str | None:
    if t is None or t.dtype is None:
        return None
    dt = plain_dtype(t.dtype)
    if dt is not None:
        return TYPE_NAMES.get(str(dt), str(dt).upper())
    return (_elem_name(t.dtype) or "?").upper()


def zero_point_is_zero(ir: IR, node: gs.Node) -> bool:
    if len(node.inputs) < 3 or (isinstance(node.inputs[2], gs.Variable) and node.inputs[2].is_empty()):
        return True
    zp = ir.const_value(node.inputs[2])
    return zp is not None and not np.any(zp)
