"""The grouping engine: the union-find over channels, the analysis driver that runs the rule
table over the graph, and :func:`find_groups`, which turns the result into channel groups."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from edgec.ir import DEFAULT_DOMAINS, IR

from .members import Member
from .model import ChannelGroup, GroupMember, GroupOrigin, GroupTensor, Origin, TMap
from .rules import RULES


class ChannelAnalysis:
    """The state the rules build: a union-find over every channel element, the channel map of
    every tracked tensor, the members to rewrite, the origin spaces and why elements are
    blocked."""

    def __init__(self, ir: IR, prefer: frozenset = frozenset()):
        self.ir = ir
        # reshapes that split the channels into [d, heads, ..] (fused QKV): node id -> elements
        # read; ``prefer``: those whose heads (not their d slices) are the units
        self.ambiguous: dict[int, list[int]] = {}
        self.prefer = prefer
        self.indexed: set[int] = set()  # elements taken one by one off their axis (Squeeze, Gather of an index)
        self.parent: list[int] = []
        self.reasons: dict[int, list[str]] = {}
        self.maps: dict[str, TMap] = {}
        self.members: list[Member] = []
        self.origins: list[Origin] = []
        self.skip: set[int] = set()  # nodes consumed by a pattern rule

    # ---------------------------------------------------------------- union-find
    def new_elems(self, n: int) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return list(range(start, start + n))

    def find(self, e: int) -> int:
        p = self.parent
        root = e
        while p[root] != root:
            root = p[root]
        while p[e] != root:
            p[e], e = root, p[e]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if ra > rb:
                ra, rb = rb, ra
            self.parent[rb] = ra

    def tie(self, xs: list[int], ys: list[int]) -> None:
        for a, b in zip(xs, ys):
            self.union(a, b)

    def block(self, elems, reason: str) -> None:
        for e in elems:  # the whole group of each element becomes unprunable
            lst = self.reasons.setdefault(e, [])
            if reason not in lst:
                lst.append(reason)

    # ---------------------------------------------------------------- tensors
    def get(self, t) -> TMap | None:
        if t is None or isinstance(t, gs.Constant):
            return None
        return self.maps.get(t.name)

    def set(self, t, m: TMap | None, same_shape_as=None) -> None:
        if m is not None and t is not None and t.name:
            self.maps[t.name] = m
        # shape inference gives up on some ops (e.g. opset-21 GroupNormalization): a shape-preserving
        # op's output has its input's shape
        if same_shape_as is not None and t is not None and t.shape is None and same_shape_as.shape is not None:
            t.shape = list(same_shape_as.shape)

    def shape(self, t) -> tuple | None:
        return self.ir.static_shape(t)

    def origin(self, t, node, axis: int, n: int) -> TMap:
        elems = self.new_elems(n)
        self.origins.append(Origin(t, node, elems))
        m = TMap(axis, elems, 1)
        self.set(t, m)
        return m

    def ensure(self, t, axis: int, length: int, why: str) -> TMap | None:
        """The map of ``t``, or a new blocked space if ``t`` is untracked (graph input, output
        of an op without rule...)."""
        m = self.get(t)
        if m is not None:
            return m
        if isinstance(t, gs.Constant):
            return None
        elems = self.new_elems(length)
        self.origins.append(Origin(t, None, elems))
        self.block(elems, why)
        m = TMap(axis, elems, 1)
        self.set(t, m)
        return m

    def block_inputs(self, node, reason: str) -> None:
        for t in node.inputs:
            m = self.get(t)
            if m is not None:
                self.block(m.elems, reason)

    def add(self, member: Member) -> None:
        self.members.append(member)

    # ---------------------------------------------------------------- run
    def run(self) -> None:
        ir = self.ir
        ir.infer_shapes()
        for node in list(ir.nodes):
            if id(node) in self.skip:
                continue
            if node.domain not in DEFAULT_DOMAINS:
                self.block_inputs(node, f"read by custom op {node.domain}.{node.op} '{node.name}'")
                continue
            rule = RULES.get(node.op)
            if rule is None:  # an op nobody described: what it reads cannot be pruned
                if any(self.get(t) is not None for t in node.inputs):
                    self.block_inputs(node, f"read by {node.op} '{node.name}' (no channel rule for {node.op})")
                continue
            rule(self, node)
        for t in ir.outputs:
            m = self.get(t)
            if m is not None:
                self.block(m.elems, f"graph output '{t.name}'")


def analyse(ir: IR) -> ChannelAnalysis:
    """The channel analysis of ``ir``. A reshape that splits channels into ``[d, heads, ..]``
    (a fused QKV projection reshaped to ``[.., 3, heads, dh]``) is read with its d slices as the
    units; where that leaves its channels unprunable (the slices are taken apart and squeezed),
    its heads tied across the slices are tried as the units instead, and kept if more units can
    then be pruned."""
    a = ChannelAnalysis(ir)
    a.run()
    if not a.ambiguous:
        return a
    # only a reshape whose slices are then taken one by one (Slice + Squeeze, Gather of an index,
    # Split + Squeeze) is read the other way: there its first factor is not a channel axis
    indexed = {a.find(e) for e in a.indexed}
    flip = frozenset(k for k, elems in a.ambiguous.items() if any(a.find(e) in indexed for e in elems))
    if not flip:
        return a
    b = ChannelAnalysis(ir, flip)
    b.run()
    # (a tie keeps the heads' reading: its reasons name what really blocks, not the squeezed slices)
    return b if _prunable_units(find_groups(ir, b)) >= _prunable_units(find_groups(ir, a)) else a


def _prunable_units(groups: list[ChannelGroup]) -> int:
    return sum(g.channels for g in groups if g.prunable)


def _split_by_group(elems: list[int], a: ChannelAnalysis, unit_index: dict[int, tuple]) -> dict[int, tuple]:
    """group key -> (positions in ``elems``, unit index of each)."""
    per: dict[int, tuple] = {}
    for p, e in enumerate(elems):
        key, k = unit_index[a.find(e)]
        pos, idx = per.setdefault(key, ([], []))
        pos.append(p)
        idx.append(k)
    return per


def find_groups(ir: IR, analysis: ChannelAnalysis | None = None) -> list[ChannelGroup]:
    """Channel groups of ``ir``, in graph order (ids ``g0``, ``g1``...)."""
    a = analysis or analyse(ir)
    # Groups: origin spaces connected through tied elements.
    gparent: dict[int, int] = {}

    def gfind(x):
        while gparent.setdefault(x, x) != x:
            gparent[x] = gparent[gparent[x]]
            x = gparent[x]
        return x

    for o in a.origins:
        roots = [a.find(e) for e in o.elems]
        for r in roots[1:]:
            ra, rb = gfind(roots[0]), gfind(r)
            if ra != rb:
                gparent[max(ra, rb)] = min(ra, rb)
    order: dict[int, list] = {}  # group key -> unit roots in order
    origins: dict[int, list] = {}
    for o in a.origins:
        if not o.elems:
            continue
        key = gfind(a.find(o.elems[0]))
        units = order.setdefault(key, [])
        seen = set(units)
        for e in o.elems:
            r = a.find(e)
            if r not in seen:
                seen.add(r)
                units.append(r)
        node = o.node
        origins.setdefault(key, []).append(GroupOrigin(o.tensor.name, node.op if node is not None else "untracked",
                                                       node.name if node is not None else ""))
    reasons: dict[int, list] = {}
    for e, rs in a.reasons.items():
        key = gfind(a.find(e))
        lst = reasons.setdefault(key, [])
        for r in rs:
            if r not in lst:
                lst.append(r)
    groups: dict[int, ChannelGroup] = {}
    unit_index: dict[int, tuple] = {}
    for i, (key, units) in enumerate(order.items()):
        rs = reasons.get(key, [])
        if not rs and len(units) < 2:
            rs = ["a single unit (one channel, or every channel tied together, e.g. by grouped convolutions "
                  "and channel shuffles)"]
        g = ChannelGroup(f"g{i}", len(units), origins[key], [], not rs, "; ".join(rs), units, analysis=a)
        groups[key] = g
        for k, u in enumerate(units):
            unit_index[u] = (key, k)
    for mb in a.members:
        for key, (pos, idx) in _split_by_group(mb.elems, a, unit_index).items():
            groups[key].members.append(GroupMember(mb, pos, idx))
    for name, m in a.maps.items():
        for key, (pos, idx) in _split_by_group(m.elems, a, unit_index).items():
            groups[key].tensors.append(GroupTensor(name, m.axis, pos, idx, m.block))
    return list(groups.values())
