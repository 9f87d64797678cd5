"""Members of a channel group: what must be rewritten when some of its channels go.

One class per kind, each knowing how to apply a kept-position list to the IR
(:meth:`Member.apply`): ``keep`` are the surviving positions of the member's ``elems`` (sorted),
and each element owns ``block`` consecutive entries of what the member rewrites.

* :class:`ParamSlice` (``param``): a constant input (weight, bias, BN/norm parameter,
  per-channel constant) sliced along one axis;
* :class:`ShapeEntry` (``shape``): one entry of an int64 shape constant (Reshape shape, Resize
  sizes) becomes ``kept * block // div``;
* :class:`SplitSize` (``split``): one Split size (input or ``split`` attribute) becomes
  ``kept * block``;
* :class:`GroupAttr` (``attr``): an integer attribute (Conv/ConvTranspose ``group``,
  GroupNormalization ``num_groups``) becomes ``kept * block // div``;
* :class:`SliceWindow` (``slice``): a Slice's start/end along the channel axis (inputs 1/2, or
  the attributes before opset 10) move to the surviving part of the element window.

Constant rewrites are staged in a :class:`ConstantEdits` and written by its ``commit``, so the
members touching one constant (a weight's output and input channels, two entries of one shape)
make one new value; a uniform weight made by ``ConstantOfShape`` stays a ``ConstantOfShape``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from edgec.ir import IR


def expand_positions(pos: list[int], block: int) -> list[int]:
    """Element positions -> entry positions, each element owning ``block`` consecutive entries."""
    if block == 1:
        return list(pos)
    return [p * block + k for p in pos for k in range(block)]


def constant_of_shape(ir: IR, t) -> tuple[list[int], gs.Node] | None:
    """(shape, node) if ``t`` is a ConstantOfShape of a constant shape (a uniform tensor)."""
    prod = ir.producer(t)
    if prod is None or prod.op != "ConstantOfShape" or not prod.inputs or not isinstance(prod.inputs[0], gs.Constant):
        return None
    return [int(d) for d in np.asarray(prod.inputs[0].values).reshape(-1)], prod


class ConstantEdits:
    """The constant rewrites of one pruning, merged per (node, input slot): slices of a constant
    along axes, and single entries set in a constant. ``commit`` writes them all."""

    def __init__(self, ir: IR):
        self.ir = ir
        self._slices: dict[tuple[int, int], tuple[gs.Node, int, list]] = {}
        self._entries: dict[tuple[int, int], tuple[gs.Node, int, list]] = {}

    def take(self, node: gs.Node, slot: int, axis: int, positions: list[int]) -> None:
        """Keep only ``positions`` along ``axis`` of constant input ``slot`` of ``node``."""
        self._slices.setdefault((id(node), slot), (node, slot, []))[2].append((axis, positions))

    def set_entry(self, node: gs.Node, slot: int, entry: int, value: int) -> None:
        """Set entry ``entry`` of the 1-D constant input ``slot`` of ``node`` to ``value``."""
        self._entries.setdefault((id(node), slot), (node, slot, []))[2].append((entry, value))

    def commit(self) -> None:
        ir = self.ir
        for node, slot, cuts in self._slices.values():
            if self._slice_constant_of_shape(node, slot, cuts):
                continue
            v = ir.const_value(node.inputs[slot])
            for axis, pos in cuts:
                v = np.take(v, pos, axis=axis)
            self._set(node, slot, v)
        for node, slot, edits in self._entries.values():
            v = np.array(ir.const_value(node.inputs[slot]), copy=True)
            for entry, value in edits:
                v[entry] = value
            self._set(node, slot, v)
        self._slices.clear()
        self._entries.clear()

    def _slice_constant_of_shape(self, node: gs.Node, slot: int, cuts) -> bool:
        """Slicing a uniform ConstantOfShape weight only changes its shape: no materialising."""
        ir = self.ir
        cs = constant_of_shape(ir, node.inputs[slot])
        if cs is None:
            return False
        shape, prod = cs
        for axis, pos in cuts:
            shape[axis] = len(pos)
        t = node.inputs[slot]
        out = ir.make_var(t.name + "_pruned", dtype=t.dtype, shape=list(shape))
        sc = ir.make_const(t.name + "_pruned_shape", np.asarray(shape, dtype=np.int64))
        ir.graph.nodes.append(gs.Node("ConstantOfShape", name=ir.unique_name(t.name + "_pruned"),
                                      attrs=dict(prod.attrs), inputs=[sc], outputs=[out]))
        node.inputs[slot] = out
        return True

    def _set(self, node: gs.Node, slot: int, value: np.ndarray) -> None:
        ir = self.ir
        t = node.inputs[slot]
        value = np.ascontiguousarray(value)
        prod = ir.producer(t)
        if (prod is not None and prod.op == "ConstantOfShape" and value.size
                and np.all(value == value.reshape(-1)[0])):
            # keep ConstantOfShape weights small: a new ConstantOfShape of the new shape
            out = ir.make_var(t.name + "_pruned", dtype=value.dtype, shape=list(value.shape))
            shape = ir.make_const(t.name + "_pruned_shape", np.asarray(value.shape, dtype=np.int64))
            ir.graph.nodes.append(gs.Node("ConstantOfShape", name=ir.unique_name(t.name + "_pruned"),
                                          attrs=dict(prod.attrs), inputs=[shape], outputs=[out]))
            node.inputs[slot] = out
            return
        if isinstance(t, gs.Constant) and len(t.outputs) == 1 and not ir.is_graph_output(t):
            t.values = value
            return
        node.inputs[slot] = ir.make_const(t.name + "_pruned", value)


@dataclass(eq=False, kw_only=True)
class Member:
    """Something of ``node`` to rewrite when units are pruned. ``elems`` are the channel
    elements (union-find ids) it follows, in order; each owns ``block`` consecutive entries.
    Counted members (shape entries, split sizes, attributes) become ``kept * block // div``."""

    kind: ClassVar[str] = ""
    node: gs.Node
    elems: list
    block: int = 1
    div: int = 1

    def label(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def apply(self, edits: ConstantEdits, keep: list[int]) -> None:  # pragma: no cover - interface
        """Rewrite for the surviving positions ``keep`` of ``elems`` (constants via ``edits``,
        attributes directly). Raises ValueError when the rewrite would break the graph."""
        raise NotImplementedError

    def count(self, keep: list[int]) -> int:
        """The new value of a counted member: ``len(keep) * block // div``."""
        value = len(keep) * self.block
        if value % self.div:
            raise ValueError(f"pruning breaks {self.label()}: {value} not divisible by {self.div}")
        return value // self.div


@dataclass(eq=False, kw_only=True)
class ParamSlice(Member):
    """Constant input ``slot`` of ``node`` (``role``: ``weight.out``, ``weight.in``,
    ``dw.weight``, ``bias``, ``bn.scale``, ``gn.bias``, ``per-channel const``...), sliced along
    ``axis``."""

    kind: ClassVar[str] = "param"
    slot: int
    axis: int
    role: str = ""

    def label(self) -> str:
        t = self.node.inputs[self.slot]
        return f"{t.name} ({self.node.op} '{self.node.name}' {self.role}) axis {self.axis}"

    def apply(self, edits: ConstantEdits, keep: list[int]) -> None:
        edits.take(self.node, self.slot, self.axis, expand_positions(keep, self.block))


@dataclass(eq=False, kw_only=True)
class ShapeEntry(Member):
    """Entry ``entry`` of the int64 constant at input ``slot`` (a Reshape shape, Resize sizes;
    ``role`` ``shape``, ``shuffle`` or ``sizes``) becomes ``kept * block // div``."""

    kind: ClassVar[str] = "shape"
    slot: int
    entry: int
    role: str = "shape"

    def label(self) -> str:
        t = self.node.inputs[self.slot]
        return f"{t.name} ({self.node.op} '{self.node.name}' shape) entry {self.entry}"

    def apply(self, edits: ConstantEdits, keep: list[int]) -> None:
        edits.set_entry(self.node, self.slot, self.entry, self.count(keep))


@dataclass(eq=False, kw_only=True)
class SplitSize(Member):
    """Split size ``index`` (of the sizes input ``slot``, of the ``split`` attribute when
    ``slot`` is -1, or of the even chunks opset 18's ``num_outputs`` makes when ``slot`` is -2:
    ``sizes`` then holds them, and the Split gets them as an input) becomes ``kept * block``."""

    kind: ClassVar[str] = "split"
    slot: int
    index: int
    sizes: tuple = ()

    def label(self) -> str:
        if self.slot == -2:
            return f"{self.node.op} '{self.node.name}' num_outputs chunk {self.index}"
        if self.slot < 0:
            return f"{self.node.op} '{self.node.name}' attr split[{self.index}]"
        t = self.node.inputs[self.slot]
        return f"{t.name} ({self.node.op} '{self.node.name}' split) entry {self.index}"

    def apply(self, edits: ConstantEdits, keep: list[int]) -> None:
        value = self.count(keep)
        if self.slot == -2:  # num_outputs: the chunks become a sizes input (the same split at opset 18)
            node = self.node
            if "num_outputs" in node.attrs:
                del node.attrs["num_outputs"]
                node.inputs.append(edits.ir.make_const(f"{node.outputs[0].name}_split_sizes",
                                                       np.asarray(self.sizes, dtype=np.int64)))
            edits.set_entry(node, 1, self.index, value)
        elif self.slot < 0:
            split = list(self.node.attrs["split"])
            split[self.index] = value
            self.node.attrs["split"] = split
        else:
            edits.set_entry(self.node, self.slot, self.index, value)


@dataclass(eq=False, kw_only=True)
class GroupAttr(Member):
    """Integer attribute ``attr`` (Conv/ConvTranspose ``group``, GroupNormalization
    ``num_groups``) becomes ``kept * block // div``."""

    kind: ClassVar[str] = "attr"
    attr: str

    def label(self) -> str:
        return f"{self.node.op} '{self.node.name}' attr {self.attr}"

    def apply(self, edits: ConstantEdits, keep: list[int]) -> None:
        self.node.attrs[self.attr] = self.count(keep)


@dataclass(eq=False, kw_only=True)
class SliceWindow(Member):
    """A Slice keeping elements ``start:end`` of ``elems`` along the channel axis: entry
    ``entry`` of its starts/ends (inputs 1/2 when ``slot`` is 1, the attributes when ``slot`` is
    -1) moves to the window's surviving elements."""

    kind: ClassVar[str] = "slice"
    slot: int
    entry: int
    start: int
    end: int

    def label(self) -> str:
        return f"{self.node.op} '{self.node.name}' window {self.start}:{self.end} entry {self.entry}"

    def apply(self, edits: ConstantEdits, keep: list[int]) -> None:
        new_st = sum(1 for p in keep if p < self.start) * self.block
        new_en = new_st + sum(1 for p in keep if self.start <= p < self.end) * self.block
        if new_en == new_st:
            raise ValueError(f"pruning would empty {self.label()}")
        if self.slot < 0:
            for key, val in (("starts", new_st), ("ends", new_en)):
                lst = list(self.node.attrs[key])
                lst[self.entry] = val
                self.node.attrs[key] = lst
        else:
            edits.set_entry(self.node, 1, self.entry, new_st)
            edits.set_entry(self.node, 2, self.entry, new_en)
