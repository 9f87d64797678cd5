"""A model's data-dependent tail: NonMaxSuppression (or NonZero, Unique, Compress) and every node
after it.

Those outputs change shape with the values (how many boxes survive), so no output error can be
measured on them: a lossy compile measures, and decides on, the tensors the tail reads instead
(a detector's boxes and scores before NMS). :func:`cut` takes the tail off a model, whose graph
outputs become those tensors; the model is quantized like any other; :func:`join` puts the
tail back, reading the same names. The tail itself stays as it was (float, integer, index ops).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import onnx

from .ir import DEFAULT_DOMAINS, IR, proto_bodies

DATA_DEPENDENT_OPS = frozenset({"NonMaxSuppression", "NonZero", "Unique", "Compress"})


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
    where: dict = field(default_factory=dict)  # cut tensor -> (its first tail reader's first output, input slot)


def _starts_tail(op: str, domain: str | None) -> bool:
    return op in DATA_DEPENDENT_OPS and domain in DEFAULT_DOMAINS


def has_tail(ops) -> bool:
    """Whether any of the (top-level) ``ops`` (type, domain) starts a data-dependent tail."""
    return any(_starts_tail(op, domain) for op, domain in ops)


def _reads(node: onnx.NodeProto) -> list[str]:
    """Names ``node`` reads, with those its If/Loop/Scan bodies read from outside (a superset:
    names a body defines itself are not produced outside, so they never match)."""
    out = [n for n in node.input if n]
    for g in proto_bodies(node):
        for inner in g.node:
            out.extend(_reads(inner))
    return out


FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                         onnx.TensorProto.BFLOAT16})


def cut(model: onnx.ModelProto) -> tuple[onnx.ModelProto, Tail] | None:
    """``(head, tail)``: the model without its data-dependent tail, whose outputs are the graph's
    outputs made before the tail and the tensors the tail reads; None if it has no tail, or if a
    tensor the tail reads has no known type (it could not be an output). ``model`` is not
    changed (the tail's nodes are copies).

    The tail reaches back over what holds no float values (a score threshold's mask, ArgMax's
    labels, constants): a mask flips where a score crosses the threshold, so measured in its
    place a few flips outweighed every float error; the float scores it compares are measured
    instead. A node the head reads too is copied into the tail. The tail owns the initializers
    it reads (a copy under a new name where the head reads one too), so nothing the lossy stage
    does to the head's constants reaches it."""
    g = model.graph
    nodes = []
    for n in g.node:
        c = onnx.NodeProto()
        c.CopyFrom(n)
        nodes.append(c)
    in_tail: list[bool] = []
    made_by_tail: set[str] = set()
    for node in nodes:
        t = _starts_tail(node.op_type, node.domain) or any(r in made_by_tail for r in _reads(node))
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
    taken = _all_names(model)
    _reach_back(nodes, in_tail, {o.name for o in g.output}, infos, taken)
    made_by_tail = {o for node, t in zip(nodes, in_tail) if t for o in node.output if o}
    head_made = {o for node, t in zip(nodes, in_tail) if not t for o in node.output if o}
    head_reads = {r for node, t in zip(nodes, in_tail) if not t for r in _reads(node)} | {o.name for o in g.output}
    inits = {i.name: i for i in g.initializer}
    cut_names: list[str] = []
    where: dict[str, tuple] = {}  # cut tensor -> (its first tail reader's first output, input slot)
    tail_inits: dict[str, onnx.TensorProto] = {}
    for node, t in zip(nodes, in_tail):
        if not t:
            continue
        for slot, r in enumerate(node.input):
            if r in inits and r in head_reads:  # shared with the head: the tail reads its own copy
                own = _fresh(f"{r}__tail", taken)
                copy = onnx.TensorProto()
                copy.CopyFrom(inits[r])
                copy.name = own
                inits[own] = copy
                for other, o_t in zip(nodes, in_tail):
                    if o_t:
                        _rename_reads(other, r, own)
                r = own
            if r in head_made and r not in cut_names:
                cut_names.append(r)
                where[r] = (node.output[0] if node.output else node.name, slot)
            elif r in inits:
                tail_inits[r] = inits[r]
        for r in _reads(node):  # names its bodies read from outside
            if r in head_made and r not in cut_names:
                cut_names.append(r)
                where[r] = (node.output[0] if node.output else node.name, -1)
            elif r in inits and r not in head_reads:
                tail_inits[r] = inits[r]
    if any(n not in infos for n in cut_names):
        return None
    tail = Tail(nodes=[n for n, t in zip(nodes, in_tail) if t],
                ops=[f"{n.op_type} '{n.name or n.output[0]}'" for n, t in zip(nodes, in_tail)
                     if t and _starts_tail(n.op_type, n.domain)],
                cut=cut_names, initializers=list(tail_inits.values()), outputs=list(g.output),
                names=made_by_tail | set(tail_inits) | {n.name for n, t in zip(nodes, in_tail) if t and n.name},
                where=where)
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


def _all_names(model: onnx.ModelProto) -> set[str]:
    names = {i.name for i in model.graph.initializer} | {i.name for i in model.graph.input}

    def walk(g):
        for n in g.node:
            names.update(n.output)
            if n.name:
                names.add(n.name)
            for sub in proto_bodies(n):
                names.update(i.name for i in sub.initializer)
                walk(sub)
    walk(model.graph)
    return names


def _fresh(base: str, taken: set[str]) -> str:
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}{k}"
    taken.add(name)
    return name


def _rename_reads(node: onnx.NodeProto, old: str, new: str) -> None:
    """``node`` (and its bodies) read ``new`` where they read ``old``."""
    for i, x in enumerate(node.input):
        if x == old:
            node.input[i] = new
    for sub in proto_bodies(node):
        for inner in sub.node:
            _rename_reads(inner, old, new)


def _reach_back(nodes: list, in_tail: list[bool], graph_outputs: set[str], infos: dict, taken: set[str]) -> None:
    """Nodes the tail reads whose outputs hold no float values (Constant nodes too) join it:
    their float inputs are what gets measured. One the head reads too is copied into the tail
    under new output names."""
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
            if not any(in_tail[j] for j in read_by):
                continue
            types = [infos[o].type.tensor_type.elem_type if o in infos else None for o in outs]
            if not (n.op_type == "Constant" or all(t is not None and t not in FLOAT_TYPES for t in types)):
                continue
            if all(in_tail[j] for j in read_by):
                in_tail[i] = changed = True
                break
            copy = onnx.NodeProto()  # the head reads it too: the tail gets its own
            copy.CopyFrom(n)
            if copy.name:
                copy.name = _fresh(f"{copy.name}__tail", taken)
            for k, o in enumerate(copy.output):
                if o:
                    new = _fresh(f"{o}__tail", taken)
                    copy.output[k] = new
                    if o in infos:
                        vi = onnx.ValueInfoProto()
                        vi.CopyFrom(infos[o])
                        vi.name = new
                        infos[new] = vi
                    for j in set(read_by):
                        if in_tail[j]:
                            _rename_reads(nodes[j], o, new)
            nodes.insert(i + 1, copy)
            in_tail.insert(i + 1, True)
            changed = True
            break


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


@contextmanager
def detached(ir: IR) -> Iterator[Tail | None]:
    """``ir`` without its data-dependent tail while the block runs (the tail, or None, is
    yielded), and with it again after, whatever the block raised."""
    tail = detach(ir)
    try:
        yield tail
    finally:
        if tail is not None:
            attach(ir, tail)
