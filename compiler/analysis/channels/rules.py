"""The rules: how each op relates the channel axes of its inputs and outputs.

One handler per op type in :data:`RULES` (adding an op = adding a row). A rule reads the
channel maps of the node's inputs from the analysis and

* sets the maps of its outputs (moving, copying or re-blocking the channels),
* creates channel spaces (layers with constant weights: their output channels),
* ties channels that must be kept or pruned together (``union``/``tie``),
* registers the members to rewrite (:mod:`.members`), and
* blocks, with a reason, the channels it cannot follow.

An op without a rule blocks whatever tracked channels it reads (see
:meth:`.engine.ChannelAnalysis.run`), saying that it has no channel rule.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import onnx_graphsurgeon as gs

from edgec.ir import is_empty

from .members import GroupAttr, ParamSlice, ShapeEntry, SliceWindow, SplitSize
from .model import Origin, TMap

if TYPE_CHECKING:  # annotations only (the engine imports this module)
    from .engine import ChannelAnalysis


# ====================================================================== helpers
def _name(node) -> str:
    return f"{node.op} '{node.name}'"


def _rank(t) -> int | None:
    return len(t.shape) if t is not None and t.shape is not None else None


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _const_ints(a: ChannelAnalysis, t) -> list[int] | None:
    v = a.ir.const_value(t)
    return None if v is None else [int(x) for x in np.asarray(v).reshape(-1)]


def _dim(t, axis: int) -> int | None:
    """Static size of one axis of ``t`` (None if unknown or symbolic)."""
    if isinstance(t, gs.Constant):
        return int(t.shape[axis])
    if t is None or t.shape is None or axis >= len(t.shape):
        return None
    d = t.shape[axis]
    return int(d) if isinstance(d, (int, np.integer)) and d >= 0 else None



def _passthrough(a: ChannelAnalysis, node) -> None:
    m = a.get(node.inputs[0]) if node.inputs else None
    if m is None:
        return
    for o in node.outputs:
        if o.outputs or a.ir.is_graph_output(o):
            a.set(o, m, node.inputs[0])


def _add_param(a: ChannelAnalysis, node, slot: int, axis: int, m: TMap, role: str) -> None:
    """Constant input ``slot`` of ``node`` follows the channels of ``m`` along ``axis``."""
    a.add(ParamSlice(node=node, slot=slot, axis=axis, elems=m.elems, block=m.block, role=role))


def _optional_param(a: ChannelAnalysis, node, slot: int, m: TMap, axis: int, role: str, expect: int) -> bool:
    """Register input ``slot`` (a constant) as a member sliced on ``axis``; False if it is not
    a constant of the expected size there."""
    t = node.inputs[slot] if slot < len(node.inputs) else None
    if is_empty(t):
        return True
    v = a.ir.const_value(t)
    if v is None or v.ndim <= axis or v.shape[axis] != expect:
        return False
    _add_param(a, node, slot, axis, m, role)
    return True


# ====================================================================== rules
def r_conv(a: ChannelAnalysis, node) -> None:
    x = node.inputs[0]
    w = a.ir.const_value(node.inputs[1]) if len(node.inputs) > 1 else None
    m = a.get(x)
    y = node.outputs[0]
    if w is None:
        if m is not None:
            a.block(m.elems, f"{_name(node)} has non-constant weights")
        return
    group = int(node.attrs.get("group", 1))
    cout, cin_g = int(w.shape[0]), int(w.shape[1])
    cin = cin_g * group
    if m is not None and (m.axis != 1 or (m.block != 1 and group != 1)):
        a.block(m.elems, f"{_name(node)} reads channels on axis {m.axis} (block {m.block})")
        m = None
    if group == 1:  # (a block of input channels per element: heads merged back into NCHW, as MatMul reads them)
        out = a.origin(y, node, 1, cout)
        _add_param(a, node, 1, 0, out, "weight.out")
        if not _optional_param(a, node, 2, out, 0, "bias", cout):
            a.block(out.elems, f"{_name(node)} bias is not a constant")
        if m is not None:
            _add_param(a, node, 1, 1, m, "weight.in")
        return
    if cin_g == 1 and cout != cin:
        reason = f"{_name(node)}: depthwise with channel multiplier {cout // max(cin, 1)} is not supported"
        if m is not None:
            a.block(m.elems, reason)
        a.block(a.origin(y, node, 1, cout).elems, reason)
        return
    if group == cin == cout and cin_g == 1:  # depthwise: output channel c is input channel c
        m = m or a.ensure(x, 1, cin, f"depthwise {_name(node)} input is not tracked")
        a.set(y, m)
        _add_param(a, node, 1, 0, m, "dw.weight")
        if not _optional_param(a, node, 2, m, 0, "bias", cout):
            a.block(m.elems, f"{_name(node)} bias is not a constant")
        a.add(GroupAttr(node=node, elems=m.elems, block=m.block, attr="group"))
        return
    # general grouped conv: a unit is a whole conv group (its input block and its output block)
    cout_g = cout // group
    out = a.origin(y, node, 1, cout)
    m = m or a.ensure(x, 1, cin, f"grouped {_name(node)} input is not tracked")
    if m is None or len(m.elems) != cin:
        a.block(out.elems, f"grouped {_name(node)}: input channels unknown")
        return
    for i in range(group):
        first = m.elems[i * cin_g]
        for k in range(cin_g):
            a.union(first, m.elems[i * cin_g + k])
        for k in range(cout_g):
            a.union(first, out.elems[i * cout_g + k])
    _add_param(a, node, 1, 0, out, "weight.out")
    if not _optional_param(a, node, 2, out, 0, "bias", cout):
        a.block(out.elems, f"{_name(node)} bias is not a constant")
    a.add(GroupAttr(node=node, elems=out.elems, block=out.block, attr="group", div=cout_g))


def r_conv_transpose(a: ChannelAnalysis, node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    w = a.ir.const_value(node.inputs[1])
    m = a.get(x)
    group = int(node.attrs.get("group", 1))
    if w is None or group != 1 or node.attrs.get("output_shape"):
        reason = f"{_name(node)}: non-constant weights, groups or output_shape"
        if m is not None:
            a.block(m.elems, reason)
        if w is not None:
            a.block(a.origin(y, node, 1, int(w.shape[1]) * group).elems, reason)
        return
    if m is not None and (m.axis != 1 or m.block != 1):
        a.block(m.elems, f"{_name(node)} reads channels on axis {m.axis}")
        m = None
    out = a.origin(y, node, 1, int(w.shape[1]))
    _add_param(a, node, 1, 1, out, "weight.out")
    if not _optional_param(a, node, 2, out, 0, "bias", int(w.shape[1])):
        a.block(out.elems, f"{_name(node)} bias is not a constant")
    if m is not None:
        _add_param(a, node, 1, 0, m, "weight.in")


def r_gemm(a: ChannelAnalysis, node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    b = a.ir.const_value(node.inputs[1])
    m = a.get(x)
    trans_a, trans_b = int(node.attrs.get("transA", 0)), int(node.attrs.get("transB", 0))
    if b is None or trans_a or b.ndim != 2:
        if m is not None:
            a.block(m.elems, f"{_name(node)}: non-constant B or transA=1")
        return
    n = int(b.shape[0] if trans_b else b.shape[1])
    out = a.origin(y, node, 1, n)
    _add_param(a, node, 1, 0 if trans_b else 1, out, "weight.out")
    if len(node.inputs) > 2 and not is_empty(node.inputs[2]):
        c = a.ir.const_value(node.inputs[2])
        if c is None:
            a.block(out.elems, f"{_name(node)} C is not a constant")
        elif c.ndim >= 1 and c.shape[-1] == n and n > 1:
            _add_param(a, node, 2, c.ndim - 1, out, "bias")
    if m is not None:
        if m.axis != 1:
            a.block(m.elems, f"{_name(node)} reads channels on axis {m.axis}")
        else:
            _add_param(a, node, 1, 1 if trans_b else 0, m, "weight.in")


def r_matmul(a: ChannelAnalysis, node) -> None:
    A, B = node.inputs[0], node.inputs[1]
    y = node.outputs[0]
    wb = a.ir.const_value(B)
    ra, rb, ry = _rank(A), _rank(B), _rank(y)
    ma, mb = a.get(A), a.get(B)
    if wb is not None and not a.ir.is_const(A):
        if wb.ndim != 2 or ra is None or ra < 2:
            if ma is not None:
                a.block(ma.elems, f"{_name(node)}: weight is not a matrix")
            return
        out = a.origin(y, node, ry - 1, int(wb.shape[1]))
        _add_param(a, node, 1, 1, out, "weight.out")
        if ma is not None:
            if ma.axis == ra - 1:
                _add_param(a, node, 1, 0, ma, "weight.in")
            else:
                a.block(ma.elems, f"{_name(node)} reads channels on axis {ma.axis}, not the contracted axis")
        return
    if wb is not None or a.ir.is_const(A) or ra is None or rb is None or ry is None or ra < 2 or rb < 2:
        a.block_inputs(node, f"{_name(node)}: constant left operand or unknown ranks")
        return
    # Two activations (attention): batch axes are tied/passed, the row axis of A and the
    # column axis of B pass through, the contracted axes block.
    outm, carried = None, []
    for t, m, r, kind in ((A, ma, ra, "A"), (B, mb, rb, "B")):
        if m is None:
            continue
        if (kind == "A" and m.axis == r - 1) or (kind == "B" and m.axis == r - 2):
            a.block(m.elems, f"{_name(node)} contracts over the channel axis")
            continue
        oax = m.axis + (ry - r)
        if outm is not None:
            if outm.axis != oax or len(outm.elems) != len(m.elems) or outm.block != m.block:
                a.block(m.elems + outm.elems, f"{_name(node)}: inconsistent channel axes")
                continue
            a.tie(outm.elems, m.elems)
        else:
            outm = TMap(oax, m.elems, m.block)
        carried.append(kind)
    if outm is None:
        return
    if outm.axis < ry - 2:  # a batch axis: the other operand must have it too (or broadcast 1)
        for t, m, r, kind in ((A, ma, ra, "A"), (B, mb, rb, "B")):
            if kind in carried:
                continue
            ax = outm.axis - (ry - r)
            if ax < 0 or _dim(t, ax) == 1:
                continue
            if m is not None:  # its channels are on another axis: this one is not tracked, so it cannot shrink
                a.block(outm.elems, f"{_name(node)}: operand '{t.name}' holds these channels on an untracked axis")
                continue
            m2 = a.ensure(t, ax, len(outm.elems), f"{_name(node)} operand '{t.name}' is not tracked")
            a.tie(outm.elems, m2.elems)
    a.set(y, outm)


def r_elementwise(a: ChannelAnalysis, node) -> None:
    """Add/Sub/Mul/Div/... (and PRelu): mapped inputs are tied, per-channel constants sliced."""
    y = node.outputs[0]
    ry = _rank(y)
    ins = [t for t in node.inputs if not is_empty(t)]
    mapped = [(t, a.get(t)) for t in ins if a.get(t) is not None]
    if not mapped:
        return
    if ry is None or any(_rank(t) is None for t in ins):
        a.block_inputs(node, f"{_name(node)}: unknown ranks")
        return
    outm = None
    for t, m in mapped:
        oax = m.axis + ry - _rank(t)
        if _dim(y, oax) is not None and len(m.elems) * m.block != _dim(y, oax):
            a.block(m.elems, f"{_name(node)} broadcasts '{t.name}' over channels")
            continue
        if outm is None:
            outm = TMap(oax, m.elems, m.block)
        elif outm.axis != oax or len(outm.elems) != len(m.elems) or outm.block != m.block:
            a.block(m.elems + outm.elems, f"{_name(node)} combines different channel layouts")
        else:
            a.tie(outm.elems, m.elems)
    if outm is None:
        return
    full = len(outm.elems) * outm.block
    for slot, t in enumerate(node.inputs):
        if is_empty(t) or a.get(t) is not None:
            continue
        r = _rank(t)
        ax = outm.axis - (ry - r)
        if a.ir.is_const(t):
            v = a.ir.const_value(t)
            if v is None:
                a.block(outm.elems, f"{_name(node)}: unreadable constant")
            elif ax >= 0 and v.shape[ax] == full and full > 1:
                a.add(ParamSlice(node=node, slot=slot, axis=ax, elems=outm.elems, block=outm.block, role="per-channel const"))
            elif ax >= 0 and v.shape[ax] != 1:
                a.block(outm.elems, f"{_name(node)}: constant '{t.name}' does not broadcast per channel")
            continue
        d = _dim(t, ax) if ax >= 0 else 1
        if d == 1:
            continue
        if d == full and _unsqueezed_const(a, node, t, ax, outm):
            continue
        if d is None or outm.block != 1:
            a.block(outm.elems, f"{_name(node)} reads '{t.name}' of unknown layout")
            continue
        m2 = a.ensure(t, ax, full, f"'{t.name}' (not produced by a prunable layer) meets the channels at {_name(node)}")
        a.tie(outm.elems, m2.elems)
    a.set(y, outm)


def _unsqueezed_const(a: ChannelAnalysis, node, t, ax: int, outm: TMap) -> bool:
    """``t = Unsqueeze(constant)`` read only by ``node`` (old exporters' per-channel BN scale):
    the constant behind it is the member."""
    prod = a.ir.producer(t)
    if prod is None or prod.op != "Unsqueeze" or len(t.outputs) != 1 or a.ir.is_graph_output(t):
        return False
    if not a.ir.is_const(prod.inputs[0]):
        return False
    axes, r = _axes_of(a, prod), _rank(t)
    if axes is None or r is None:
        return False
    axes = [_norm_axis(x, r) for x in axes]
    if ax in axes:
        return False
    a.add(ParamSlice(node=prod, slot=0, axis=ax - sum(1 for x in axes if x < ax), elems=outm.elems,
                     block=outm.block, role="per-channel const"))
    return True


def r_concat(a: ChannelAnalysis, node) -> None:
    y = node.outputs[0]
    ry = _rank(y)
    if not any(a.get(t) is not None for t in node.inputs):
        return
    if ry is None:
        a.block_inputs(node, f"{_name(node)}: unknown rank")
        return
    axis = _norm_axis(int(node.attrs.get("axis", 0)), ry)
    maps = [a.get(t) for t in node.inputs]
    known = [m for m in maps if m is not None]
    if all(m.axis == axis for m in known):
        blocks = {m.block for m in known}
        if len(blocks) != 1:
            a.block_inputs(node, f"{_name(node)} concatenates different channel block sizes")
            return
        blk = blocks.pop()
        elems = []
        for t, m in zip(node.inputs, maps):
            if m is None:
                d = _dim(t, axis)
                if d is None or d % blk:
                    a.block_inputs(node, f"{_name(node)}: input '{t.name}' of unknown size")
                    return
                if d == 0:
                    continue
                why = f"'{t.name}' (not produced by a prunable layer) is concatenated at {_name(node)}"
                if isinstance(t, gs.Constant):  # its channels are its own: kept, and the others' stay free
                    own = a.new_elems(d // blk)
                    a.origins.append(Origin(t, None, own))
                    a.block(own, why)
                    elems.extend(own)
                    continue
                m = a.ensure(t, axis, d // blk, why)
                m.block = blk
            elems.extend(m.elems)
        a.set(y, TMap(axis, elems, blk))
        return
    # Concatenation along another axis: the channels of every input are tied.
    first = known[0]
    if any(m.axis != first.axis or len(m.elems) != len(first.elems) or m.block != first.block for m in known):
        a.block_inputs(node, f"{_name(node)} along axis {axis} of inputs with different channel layouts")
        return
    for slot, (t, m) in enumerate(zip(node.inputs, maps)):
        if m is None and isinstance(t, gs.Constant):  # (ViT's class token, folded at a fixed batch)
            v = a.ir.const_value(t)
            if v is None or v.ndim <= first.axis or v.shape[first.axis] != len(first.elems) * first.block:
                a.block(first.elems, f"{_name(node)}: constant '{t.name}' does not hold the tracked channels")
                return
            a.add(ParamSlice(node=node, slot=slot, axis=first.axis, elems=first.elems, block=first.block,
                             role="concat const"))
            continue
        if m is None:
            m = a.ensure(t, first.axis, len(first.elems), f"'{t.name}' is concatenated with tracked channels at {_name(node)}")
        a.tie(first.elems, m.elems)
    a.set(y, first)


def r_split(a: ChannelAnalysis, node) -> None:
    m = a.get(node.inputs[0])
    if m is None:
        return
    r = _rank(node.inputs[0])
    axis = _norm_axis(int(node.attrs.get("axis", 0)), r) if r is not None else None
    if axis != m.axis:
        for o in node.outputs:
            a.set(o, m)
        return
    if len(node.inputs) > 1 and not is_empty(node.inputs[1]):
        sizes, slot = _const_ints(a, node.inputs[1]), 1
    elif "split" in node.attrs:
        sizes, slot = [int(s) for s in node.attrs["split"]], -1
    elif "num_outputs" in node.attrs:  # opset 18: even chunks of ceil(n / k), the last one smaller
        n, k = len(m.elems) * m.block, int(node.attrs["num_outputs"])
        chunk = -(-n // k) if k > 0 else 0
        sizes, slot = ([chunk] * (k - 1) + [n - chunk * (k - 1)] if k > 0 and n - chunk * (k - 1) >= 0 else None), -2
    else:
        sizes, slot = None, None
    if sizes is None or any(s % m.block for s in sizes) or sum(sizes) != len(m.elems) * m.block:
        a.block(m.elems, f"{_name(node)} along the channel axis without constant sizes")
        return
    pos = 0
    for k, (o, s) in enumerate(zip(node.outputs, sizes)):
        n = s // m.block
        om = TMap(m.axis, m.elems[pos:pos + n], m.block)
        pos += n
        a.set(o, om)
        a.add(SplitSize(node=node, slot=slot, index=k, elems=om.elems, block=m.block,
                        sizes=tuple(sizes) if slot == -2 else ()))


def r_slice(a: ChannelAnalysis, node) -> None:
    """Slice: other axes pass through; a unit-step window along the channel axis keeps the
    window's elements, and its start/end are rewritten (members of kind ``slice``)."""
    m = a.get(node.inputs[0])
    if m is None:
        return
    r = _rank(node.inputs[0])
    if "starts" in node.attrs:  # opset < 10
        starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
        axes, steps, slot = node.attrs.get("axes"), None, -1
    else:
        starts, ends = _const_ints(a, node.inputs[1]), _const_ints(a, node.inputs[2])
        axes = _const_ints(a, node.inputs[3]) if len(node.inputs) > 3 and not is_empty(node.inputs[3]) else None
        steps = _const_ints(a, node.inputs[4]) if len(node.inputs) > 4 and not is_empty(node.inputs[4]) else None
        slot = 1
    if starts is None or ends is None or r is None:
        a.block(m.elems, f"{_name(node)}: starts/ends are not constants")
        return
    axes = list(range(len(starts))) if axes is None else [_norm_axis(int(x), r) for x in axes]
    if m.axis not in axes:
        a.set(node.outputs[0], m)
        return
    k = axes.index(m.axis)
    if steps is not None and steps[k] != 1:
        a.block(m.elems, f"{_name(node)} slices the channel axis with step {steps[k]}")
        return
    full = len(m.elems) * m.block
    st, en = int(starts[k]), int(ends[k])
    st = max(0, min(full, st + full if st < 0 else st))
    en = max(0, min(full, en + full if en < 0 else en))
    if st % m.block or en % m.block or en <= st:
        a.block(m.elems, f"{_name(node)} cuts through channel blocks")
        return
    a.add(SliceWindow(node=node, slot=slot, entry=k, elems=m.elems, block=m.block, start=st // m.block,
                      end=en // m.block))
    a.set(node.outputs[0], TMap(m.axis, m.elems[st // m.block:en // m.block], m.block))


def r_gather(a: ChannelAnalysis, node) -> None:
    """Gather along another axis than the channels' (``qkv[0]`` of a fused QKV): the channel axis
    moves by the indices' rank; along the channel axis it blocks."""
    if len(node.inputs) > 1 and a.get(node.inputs[1]) is not None:
        a.block(a.get(node.inputs[1]).elems, f"{_name(node)} reads the channels as indices")
    m = a.get(node.inputs[0])
    if m is None:
        return
    r, q = _rank(node.inputs[0]), _rank(node.inputs[1]) if len(node.inputs) > 1 else None
    if r is None or q is None:
        a.block(m.elems, f"{_name(node)}: unknown ranks")
        return
    axis = _norm_axis(int(node.attrs.get("axis", 0)), r)
    if axis == m.axis:
        a.block(m.elems, f"{_name(node)} gathers along the channel axis")
        if q == 0:  # one index: a single unit taken off the axis
            a.indexed.update(m.elems)
        return
    a.set(node.outputs[0], TMap(m.axis if m.axis < axis else m.axis + q - 1, m.elems, m.block))


def r_transpose(a: ChannelAnalysis, node) -> None:
    m = a.get(node.inputs[0])
    if m is None:
        return
    perm = node.attrs.get("perm")
    r = _rank(node.inputs[0])
    if perm is None:
        perm = list(range(r - 1, -1, -1)) if r is not None else None
    if perm is None:
        a.block(m.elems, f"{_name(node)}: unknown rank")
        return
    a.set(node.outputs[0], TMap(list(perm).index(m.axis), m.elems, m.block))


def _shuffle(a: ChannelAnalysis, node, m: TMap, xs, ys) -> bool:
    """Reshape [.., C, ..] -> [.., g, C/g, ..] -> Transpose(swap) -> Reshape [.., C, ..]."""
    ax = m.axis
    y = node.outputs[0]
    if len(ys) != len(xs) + 1 or ys[:ax] != xs[:ax] or ys[ax + 2:] != xs[ax + 1:] or m.block != 1:
        return False
    g, cg = ys[ax], ys[ax + 1]
    if len(y.outputs) != 1 or a.ir.is_graph_output(y) or y.outputs[0].op != "Transpose":
        return False
    tr = y.outputs[0]
    perm = list(tr.attrs.get("perm", []))
    want = list(range(len(ys)))
    want[ax], want[ax + 1] = ax + 1, ax
    t2 = tr.outputs[0]
    if perm != want or len(t2.outputs) != 1 or a.ir.is_graph_output(t2) or t2.outputs[0].op != "Reshape":
        return False
    rs2 = t2.outputs[0]
    out = rs2.outputs[0]
    s1, s2 = _const_ints(a, node.inputs[1]), _const_ints(a, rs2.inputs[1])
    if a.shape(out) != tuple(xs) or s1 is None or s2 is None:
        return False
    if s1[ax + 1] in (0, -1) or s1[ax] in (0, -1) or s2[ax] == 0:
        return False
    e = m.elems
    for j in range(cg):  # channel j of every shuffle group is kept or pruned together
        for i in range(1, g):
            a.union(e[j], e[i * cg + j])
    a.set(out, TMap(ax, [e[i * cg + j] for j in range(cg) for i in range(g)], 1))
    a.add(ShapeEntry(node=node, slot=1, entry=ax + 1, elems=e, role="shuffle", div=g))
    if s2[ax] != -1:
        a.add(ShapeEntry(node=rs2, slot=1, entry=ax, elems=e))
    a.skip.update({id(tr), id(rs2)})
    return True


def _reshape_like(a: ChannelAnalysis, node, m: TMap, xs, ys, shape_slot: int | None, first: int = 0) -> None:
    """Channel axis through a reshape from static ``xs`` to static ``ys``."""
    y = node.outputs[0]
    ax, cb = m.axis, xs[m.axis]
    pre = int(np.prod(xs[:ax])) if ax else 1
    inner = int(np.prod(xs[ax + 1:])) if ax + 1 < len(xs) else 1
    j, acc = None, 1
    for k, d in enumerate(ys):
        if acc == pre and d != 1 and k >= first:
            j = k
            break
        acc *= d
    if j is None:
        a.block(m.elems, f"{_name(node)} reshapes the channel axis away")
        return
    shape = _const_ints(a, node.inputs[shape_slot]) if shape_slot is not None else None
    if shape_slot is not None and shape is None:
        a.block(m.elems, f"{_name(node)}: shape is not a constant")
        return

    def entry(mult: int, div: int = 1, same: bool = False) -> bool:
        if shape is None:
            return True
        v = shape[j]
        if v == -1 or (v == 0 and same):
            return True
        if v <= 0:
            return False
        a.add(ShapeEntry(node=node, slot=shape_slot, entry=j, elems=m.elems, block=mult, div=div))
        return True

    d = ys[j]
    if d % cb == 0 and inner % (d // cb) == 0:  # channel axis merged with inner dims
        r = d // cb
        if not entry(m.block * r, 1, same=(j == ax and r == 1)):
            a.block(m.elems, f"{_name(node)}: shape entry {j} cannot be rewritten")
            return
        a.set(y, TMap(j, m.elems, m.block * r))
        return
    if cb % d == 0 and j + 1 < len(ys) and (cb // d) % m.block == 0:  # split into (d, cb/d): heads
        # [.., 3, heads, dh, ..] (a fused QKV): the units are either the first factor's d slices
        # or, taking the next axis as the channel axis, its heads tied across the d slices. The
        # first is tried first; the engine takes the second where it prunes more (``a.prefer``).
        d1 = ys[j + 1]
        alt = d > 1 and d1 > 1 and (cb // d) % d1 == 0 and (cb // d // d1) % m.block == 0
        if alt:
            a.ambiguous[id(node)] = m.elems
        k, stack = (j + 1, d) if alt and id(node) in a.prefer else (j, 1)
        n = ys[k]
        chunk = (cb // stack // n) // m.block  # elements of one unit in one slice
        e = m.elems
        for h in range(n):
            first_e = e[h * chunk]
            for s_ in range(stack):
                base = s_ * n * chunk + h * chunk
                for i in range(chunk):
                    a.union(first_e, e[base + i])
        om = TMap(k, [e[h * chunk] for h in range(n)], 1)
        if shape is not None and shape[k] > 0:
            a.add(ShapeEntry(node=node, slot=shape_slot, entry=k, elems=om.elems))
        elif shape is not None and shape[k] != -1:
            a.block(m.elems, f"{_name(node)}: shape entry {k} cannot be rewritten")
            return
        a.set(y, om)
        return
    a.block(m.elems, f"{_name(node)} reshapes {list(xs)} -> {list(ys)} across the channel axis")


def _static_tail(t, start: int) -> bool:
    return t.shape is not None and all(_dim(t, k) is not None for k in range(start, len(t.shape)))


def r_reshape(a: ChannelAnalysis, node) -> None:
    m = a.get(node.inputs[0])
    if m is None:
        return
    x, y = node.inputs[0], node.outputs[0]
    if node.attrs.get("allowzero", 0):  # (PyTorch's dynamo exporter writes it: it matters only for a 0 entry)
        target = _const_ints(a, node.inputs[1])
        if target is None or 0 in target:
            a.block(m.elems, f"{_name(node)}: allowzero=1 with a zero (or unknown) shape entry")
            return
    xs, ys = a.shape(x), a.shape(y)
    if xs is not None and ys is not None:
        if _shuffle(a, node, m, list(xs), list(ys)):
            return
        _reshape_like(a, node, m, list(xs), list(ys), 1)
        return
    # symbolic leading dims (batch): the dims before the channel axis must be kept as they are
    shape = _const_ints(a, node.inputs[1])
    ax = m.axis
    if (shape is not None and _static_tail(x, ax) and y.shape is not None and len(y.shape) > ax
            and _static_tail(y, ax) and all(v in (0, -1) or v == _dim(x, k) for k, v in enumerate(shape[:ax]))
            and sum(1 for v in shape if v == -1) <= 1):
        xs2 = [1] * ax + [_dim(x, k) for k in range(ax, len(x.shape))]
        ys2 = [1] * ax + [_dim(y, k) for k in range(ax, len(y.shape))]
        _reshape_like(a, node, m, xs2, ys2, 1, first=ax)
        return
    a.block(m.elems, f"{_name(node)}: shapes unknown")


def r_flatten(a: ChannelAnalysis, node) -> None:
    m = a.get(node.inputs[0])
    if m is None:
        return
    x, y = node.inputs[0], node.outputs[0]
    r = _rank(x)
    fax = _norm_axis(int(node.attrs.get("axis", 1)), r) if r is not None else None
    if fax is not None and fax <= m.axis and _static_tail(x, fax) and all(_dim(x, k) == 1 for k in range(fax, m.axis)):
        inner = int(np.prod([_dim(x, k) for k in range(m.axis + 1, r)])) if m.axis + 1 < r else 1
        a.set(y, TMap(1, m.elems, m.block * inner))
        return
    xs, ys = a.shape(x), a.shape(y)
    if xs is None or ys is None:
        a.block(m.elems, f"{_name(node)}: shapes unknown")
        return
    _reshape_like(a, node, m, list(xs), list(ys), None)


def _axes_of(a: ChannelAnalysis, node, slot: int = 1) -> list[int] | None:
    if "axes" in node.attrs:
        return [int(x) for x in node.attrs["axes"]]
    if len(node.inputs) > slot and not is_empty(node.inputs[slot]):
        return _const_ints(a, node.inputs[slot])
    return None


def r_unsqueeze(a: ChannelAnalysis, node) -> None:
    m = a.get(node.inputs[0])
    if m is None:
        return
    axes, ry = _axes_of(a, node), _rank(node.outputs[0])
    if axes is None or ry is None:
        a.block(m.elems, f"{_name(node)}: axes unknown")
        return
    axes = sorted(_norm_axis(x, ry) for x in axes)
    rest = [k for k in range(ry) if k not in axes]
    a.set(node.outputs[0], TMap(rest[m.axis], m.elems, m.block))


def r_squeeze(a: ChannelAnalysis, node) -> None:
    m = a.get(node.inputs[0])
    if m is None:
        return
    axes, rank = _axes_of(a, node), _rank(node.inputs[0])
    if axes is not None and rank is not None:  # the rank is enough (a symbolic batch is not squeezed)
        axes = [_norm_axis(x, rank) for x in axes]
    else:
        xs = a.shape(node.inputs[0])
        if xs is None:
            a.block(m.elems, f"{_name(node)}: shape unknown")
            return
        axes = [k for k, d in enumerate(xs) if d == 1]
    if m.axis in axes:
        a.block(m.elems, f"{_name(node)} squeezes the channel axis")
        a.indexed.update(m.elems)
        return
    a.set(node.outputs[0], TMap(m.axis - sum(1 for x in axes if x < m.axis), m.elems, m.block))


def r_batchnorm(a: ChannelAnalysis, node) -> None:
    m = a.get(node.inputs[0])
    if m is None:
        return
    if m.axis != 1 or node.attrs.get("training_mode", 0) or any(o.outputs for o in node.outputs[1:]):
        a.block(m.elems, f"{_name(node)} normalises another axis or is in training mode")
        return
    full = len(m.elems) * m.block
    roles = ("bn.scale", "bn.bias", "bn.mean", "bn.var") if node.op == "BatchNormalization" else ("in.scale", "in.bias")
    for slot, role in enumerate(roles, start=1):
        if not _optional_param(a, node, slot, m, 0, role, full):
            a.block(m.elems, f"{_name(node)}: {role} is not a per-channel constant")
            return
    a.set(node.outputs[0], m, node.inputs[0])


def r_pool(a: ChannelAnalysis, node) -> None:
    m = a.get(node.inputs[0])
    if m is None:
        return
    if m.axis != 1 or m.block != 1:
        a.block(m.elems, f"{_name(node)} pools over the channel axis")
        return
    y, x = node.outputs[0], node.inputs[0]
    a.set(y, m)
    if node.op.startswith("Global") and y.shape is None and x.shape is not None:
        y.shape = list(x.shape[:2]) + [1] * (len(x.shape) - 2)
    if len(node.outputs) > 1 and node.outputs[1].outputs:
        a.block(m.elems, f"{_name(node)} Indices output is used")


def r_unary(a: ChannelAnalysis, node) -> None:
    _passthrough(a, node)


def r_clip(a: ChannelAnalysis, node) -> None:
    m = a.get(node.inputs[0])
    if m is None:
        return
    for t in node.inputs[1:]:
        if not is_empty(t) and not (a.ir.is_const(t) and a.ir.const_value(t).size == 1):
            a.block(m.elems, f"{_name(node)}: min/max are not scalar constants")
            return
    a.set(node.outputs[0], m, node.inputs[0])


def r_pad(a: ChannelAnalysis, node) -> None:
    m = a.get(node.inputs[0])
    if m is None:
        return
    pads = [int(p) for p in node.attrs["pads"]] if "pads" in node.attrs else (
        _const_ints(a, node.inputs[1]) if len(node.inputs) > 1 else None)
    r = _rank(node.inputs[0])
    axes = _const_ints(a, node.inputs[3]) if len(node.inputs) > 3 and not is_empty(node.inputs[3]) else None
    if pads is None or r is None or (axes is None and len(pads) != 2 * r):
        a.block(m.elems, f"{_name(node)}: pads unknown")
        return
    axes = list(range(r)) if axes is None else [_norm_axis(x, r) for x in axes]
    k = len(axes)
    if m.axis in axes and (pads[axes.index(m.axis)] or pads[k + axes.index(m.axis)]):
        a.block(m.elems, f"{_name(node)} pads the channel axis")
        return
    a.set(node.outputs[0], m)


def r_resize(a: ChannelAnalysis, node) -> None:
    m = a.get(node.inputs[0])
    if m is None:
        return
    scales = a.ir.const_value(node.inputs[2]) if len(node.inputs) > 2 and not is_empty(node.inputs[2]) else None
    sizes = _const_ints(a, node.inputs[3]) if len(node.inputs) > 3 and not is_empty(node.inputs[3]) else None
    if scales is not None and scales.size and float(scales.reshape(-1)[m.axis]) == 1.0 and sizes is None:
        a.set(node.outputs[0], m)
        return
    if sizes is not None and "axes" not in node.attrs:
        a.add(ShapeEntry(node=node, slot=3, entry=m.axis, elems=m.elems, block=m.block, role="sizes"))
        a.set(node.outputs[0], m)
        return
    a.block(m.elems, f"{_name(node)}: scales/sizes unknown or scale the channel axis")


def r_softmax(a: ChannelAnalysis, node) -> None:
    m = a.get(node.inputs[0])
    if m is None:
        return
    r = _rank(node.inputs[0])
    default = -1 if a.ir.opset >= 13 else 1
    axis = _norm_axis(int(node.attrs.get("axis", default)), r) if r is not None else None
    if axis is None or (axis == m.axis if a.ir.opset >= 13 else m.axis >= axis):
        a.block(m.elems, f"{_name(node)} normalises over the channel axis")
        return
    a.set(node.outputs[0], m, node.inputs[0])


def r_layernorm(a: ChannelAnalysis, node) -> None:
    m = a.get(node.inputs[0])
    if m is None:
        return
    r = _rank(node.inputs[0])
    axis = _norm_axis(int(node.attrs.get("axis", -1)), r) if r is not None else None
    if axis is None or m.axis >= axis:
        a.block(m.elems, f"{_name(node)} normalises over the channel axis (its statistics depend on every channel)")
        return
    a.set(node.outputs[0], m, node.inputs[0])


def r_groupnorm(a: ChannelAnalysis, node) -> None:
    """GroupNormalization: statistics span a group, so a unit is a whole group (``num_groups``
    rewritten; scale/bias are per channel (opset 21) or per group (opset 18))."""
    m = a.get(node.inputs[0])
    if m is None:
        return
    groups = int(node.attrs.get("num_groups", 0))
    c = len(m.elems)
    if m.axis != 1 or m.block != 1 or groups <= 0 or c % groups:
        a.block(m.elems, f"{_name(node)}: channels not on axis 1 or not divisible into {groups} groups")
        return
    cg = c // groups
    for i in range(groups):
        for k in range(1, cg):
            a.union(m.elems[i * cg], m.elems[i * cg + k])
    per_group = TMap(1, [m.elems[i * cg] for i in range(groups)], 1)
    for slot in (1, 2):
        v = a.ir.const_value(node.inputs[slot])
        if v is not None and v.ndim == 1 and v.shape[0] == c:
            _add_param(a, node, slot, 0, m, "gn.scale" if slot == 1 else "gn.bias")
        elif v is not None and v.ndim == 1 and v.shape[0] == groups:
            _add_param(a, node, slot, 0, per_group, "gn.scale" if slot == 1 else "gn.bias")
        else:
            a.block(m.elems, f"{_name(node)}: scale/bias are not per-channel or per-group constants")
            return
    a.add(GroupAttr(node=node, elems=m.elems, attr="num_groups", div=cg))
    a.set(node.outputs[0], m, node.inputs[0])


def r_reduce(a: ChannelAnalysis, node) -> None:
    m = a.get(node.inputs[0])
    if m is None:
        return
    r = _rank(node.inputs[0])
    axes = _axes_of(a, node)
    if r is None or not axes:
        a.block(m.elems, f"{_name(node)} reduces over all axes")
        return
    axes = [_norm_axis(x, r) for x in axes]
    if m.axis in axes:
        a.block(m.elems, f"{_name(node)} reduces over the channel axis")
        return
    keep = int(node.attrs.get("keepdims", 1))
    ax = m.axis if keep else m.axis - sum(1 for x in axes if x < m.axis)
    a.set(node.outputs[0], TMap(ax, m.elems, m.block))


def r_blocker(reason: str) -> Callable:
    def rule(a: ChannelAnalysis, node) -> None:
        a.block_inputs(node, f"{_name(node)} {reason}")
    return rule


UNARY = ("Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu",
         "ThresholdedRelu", "Softplus", "Softsign", "Mish", "Gelu", "Erf", "Exp", "Log", "Abs", "Neg",
         "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Identity", "Cast",
         "Dropout", "Not", "IsNaN")

#: The rule table: op type -> how the op relates the channel axes of its inputs and outputs.
RULES: dict[str, Callable[[ChannelAnalysis, gs.Node], None]] = {
    # producers: create an output channel space, consume the input's in their weights
    "Conv": r_conv,
    "ConvTranspose": r_conv_transpose,
    "Gemm": r_gemm,
    "MatMul": r_matmul,
    # pass-through (per-channel parameters sliced)
    **{op: r_unary for op in UNARY},
    "Clip": r_clip,
    "BatchNormalization": r_batchnorm,
    "InstanceNormalization": r_batchnorm,
    "MaxPool": r_pool, "AveragePool": r_pool, "LpPool": r_pool,
    "GlobalAveragePool": r_pool, "GlobalMaxPool": r_pool, "GlobalLpPool": r_pool,
    "Pad": r_pad,
    "Resize": r_resize,
    "Upsample": r_blocker("(deprecated Upsample) is not supported"),
    # elementwise: ties the inputs' channels, slices per-channel constants
    **{op: r_elementwise for op in ("Add", "Sub", "Mul", "Div", "Sum", "Max", "Min", "Mean", "Pow", "PRelu",
                                    # (PyTorch's SDPA export: Where(IsNaN(p), 0, p) after the softmax)
                                    "Where", "Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual",
                                    "And", "Or", "Xor", "Mod")},
    # layout
    "Concat": r_concat,
    "Split": r_split,
    "Transpose": r_transpose,
    "Reshape": r_reshape,
    "Flatten": r_flatten,
    "Unsqueeze": r_unsqueeze,
    "Squeeze": r_squeeze,
    # normalisations / reductions (block when they span the channels)
    "Softmax": r_softmax, "LogSoftmax": r_softmax, "Hardmax": r_softmax,
    "LayerNormalization": r_layernorm,
    "GroupNormalization": r_groupnorm,
    "LRN": r_blocker("mixes neighbouring channels"),
    **{op: r_reduce for op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2",
                               "ReduceProd", "ReduceSumSquare", "ReduceLogSumExp")},
    "Shape": r_blocker("reads the tensor's shape (depends on the channel count)"),
    "Size": r_blocker("reads the tensor's size (depends on the channel count)"),
    "Slice": r_slice,
    "Gather": r_gather,
}

