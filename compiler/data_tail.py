"""A model's data-dependent tail: NonMaxSuppression (or NonZero, Unique, Compress) and every node
after it.

Those outputs change shape with the values (how many boxes survive), so no output error can be
measured on them: a lossy compile measures, and decides on, the tensors the tail reads instead
(a detector's boxes and scores before NMS). :func:`cut` takes the tail off a model, whose graph
outputs become those tensors; the model is quantized like any other; :func:`join` puts the
tail back, reading the same names. The tail itself stays as it was (float, integer, index ops).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from .ir import IR

DATA_DEPENDENT_OPS = frozenset({"NonMaxSuppression", "NonZero", "Unique", "Compress"})
_DEFAULT = ("", "ai.onnx", None)


@dataclass
class Tail:
    """The tail's ``nodes`` (graph order), the ``ops`` that start it (labels), the tensors it
    reads from the rest of the graph (``cut``, in first-read order), the initializers it reads,
    and the graph's outputs as they were."""

    nodes: list[onnx.NodeProto]
    ops: list[str]
    cut: list[str]
    initializers: list[onnx.TensorProto]
    outputs: list[onnx.ValueInfoProto]
    names: set[str] = field(default_factory=set)  # every name the tail defines (kept free in the head)


def has_tail(ops) -> bool:
    """Whether any of the (top-level) ``ops`` (type, domain) starts a data-dependent tail."""
    return any(op in DATA_DEPENDENT_OPS and domain in _DEFAULT for op, domain in ops)


def _reads(node: onnx.NodeProto) -> list[str]:
    """Names ``node`` reads, with those its If/Loop/Scan bodies read from outside (a superset:
    names a body defines itself are not produced outside, so they never match)."""
    out = [n for n in node.input if n]
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            for inner in g.node:
                out.extend(_reads(inner))
    return out


FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                         onnx.TensorProto.BFLOAT16})


def cut(model: onnx.ModelProto) -> tuple[onnx.ModelProto, Tail] | None:
    """``(head, tail)``: the model without its data-dependent tail, whose outputs are the graph's
    outputs made before the tail and the tensors the tail reads; None if it has no tail, or if a
    tensor the tail reads has no known type (it could not be an output).

    The tail reaches back over what only it reads and that holds no float values (a score
    threshold's mask, ArgMax's labels, constants): a mask flips where a score crosses the
    threshold, so measured in its place a few flips outweighed every float error, and the
    float scores it compares are measured instead."""
    g = model.graph
    nodes = list(g.node)
    in_tail: list[bool] = []
    made_by_tail: set[str] = set()
    for node in nodes:
        t = (node.op_type in DATA_DEPENDENT_OPS and node.domain in _DEFAULT) or any(r in made_by_tail for r in _reads(node))
        in_tail.append(t)
        if t:
            made_by_tail.update(o for o in node.output if o)
    if not any(in_tail):
        return None
    infos = _typed(g)
    if any(o not in infos for n in nodes for o in n.output if o):  # (an original model may carry no value_info)
        try:
            inferred = _typed(onnx.shape_inference.infer_shapes(model).graph)
            infos = {**inferred, **infos}
        except Exception:  # inference is best effort
            pass
    _reach_back(nodes, in_tail, {o.name for o in g.output}, infos)
    made_by_tail = {o for node, t in zip(nodes, in_tail) if t for o in node.output if o}
    head_made = {o for node, t in zip(nodes, in_tail) if not t for o in node.output if o}
    inits = {i.name: i for i in g.initializer}
    cut_names: list[str] = []
    tail_inits: dict[str, onnx.TensorProto] = {}
    for node, t in zip(nodes, in_tail):
        if not t:
            continue
        for r in _reads(node):
            if r in head_made and r not in cut_names:
                cut_names.append(r)
            elif r in inits:
                tail_inits[r] = inits[r]
    if any(n not in infos for n in cut_names):
        return None
    tail = Tail(nodes=[n for n, t in zip(nodes, in_tail) if t],
                ops=[f"{n.op_type} '{n.name or n.output[0]}'" for n, t in zip(nodes, in_tail)
                     if t and n.op_type in DATA_DEPENDENT_OPS],
                cut=cut_names, initializers=list(tail_inits.values()), outputs=list(g.output),
                names=made_by_tail | {n.name for n, t in zip(nodes, in_tail) if t and n.name})
    head = onnx.ModelProto()
    head.CopyFrom(model)
    hg = head.graph
    del hg.node[:]
    hg.node.extend(n for n, t in zip(nodes, in_tail) if not t)
    del hg.output[:]
    hg.output.extend(o for o in g.output if o.name not in made_by_tail)
    listed = {o.name for o in hg.output}
    hg.output.extend(infos[n] for n in cut_names if n not in listed)
    keep = {r for n in hg.node for r in _reads(n)} | listed | set(cut_names)
    kept = [i for i in hg.initializer if i.name in keep]
    del hg.initializer[:]
    hg.initializer.extend(kept)
    return head, tail


def _reach_back(nodes: list, in_tail: list[bool], graph_outputs: set[str], infos: dict) -> None:
    """Nodes read only by the tail whose outputs hold no float values (Constant nodes too) join
    it, repeatedly: their float inputs are what gets measured."""
    changed = True
    while changed:
        changed = False
        readers: dict[str, list[int]] = {}
        for i, n in enumerate(nodes):
            for r in _reads(n):
                readers.setdefault(r, []).append(i)
        for i, n in enumerate(nodes):
            outs = [o for o in n.output if o]
            if in_tail[i] or not outs or any(o in graph_outputs for o in outs):
                continue
            read_by = [j for o in outs for j in readers.get(o, [])]
            if not read_by or not all(in_tail[j] for j in read_by):
                continue
            types = [infos[o].type.tensor_type.elem_type if o in infos else None for o in outs]
            if n.op_type == "Constant" or all(t is not None and t not in FLOAT_TYPES for t in types):
                in_tail[i] = changed = True


def _typed(g: onnx.GraphProto) -> dict[str, onnx.ValueInfoProto]:
    return {vi.name: vi for vi in (*g.value_info, *g.output, *g.input) if vi.type.tensor_type.elem_type}


def join(head: onnx.ModelProto, tail: Tail) -> onnx.ModelProto:
    """``head`` (rewritten, its outputs' names kept) with ``tail`` back on, and the original
    outputs in their order."""
    model = onnx.ModelProto()
    model.CopyFrom(head)
    g = model.graph
    g.node.extend(tail.nodes)
    have = {i.name for i in g.initializer}
    g.initializer.extend(i for i in tail.initializers if i.name not in have)
    now = {o.name: o for o in g.output}
    del g.output[:]
    g.output.extend(now.get(o.name, o) if o.name not in tail.names else o for o in tail.outputs)
    return model


def head_of(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """The measurable part of ``model`` (:func:`cut`'s head), or None without a tail."""
    found = cut(model)
    return None if found is None else found[0]


def detach(ir: IR) -> Tail | None:
    """Take ``ir``'s data-dependent tail off, in place (the same IR object now holds the head,
    whose outputs can be measured); the tail, or None if there is none to take."""
    if not has_tail((n.op, n.domain) for n in ir.nodes):
        return None
    found = cut(ir.to_onnx())
    if found is None:
        return None
    head, tail = found
    ir.graph = IR.from_onnx(head, info=ir.info).graph
    ir.reserved |= tail.names
    ir.changed()
    return tail


def attach(ir: IR, tail: Tail) -> None:
    """Put ``tail`` back on ``ir`` (in place), reading the names it read."""
    ir.graph = IR.from_onnx(join(ir.to_onnx(), tail), info=ir.info).graph
    ir.reserved -= tail.names
    ir.changed()
    ir.infer_shapes()
