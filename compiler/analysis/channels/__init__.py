"""Channel dependency analysis: which tensor/parameter slices must be pruned together.

Model
-----
Every *channel* of every tracked tensor is an element of a union-find structure. A tensor's
channel map (:class:`TMap`) says which axis carries channels, the element behind each
position of that axis, and ``block``: how many consecutive positions one element owns (a
``Flatten`` of ``[N, C, H, W]`` gives each channel a block of ``H*W`` features).

* Layers with constant weights (Conv, ConvTranspose, Gemm, MatMul) *create* elements: their
  output channels ("origin space"); their weight's input-channel slices *consume* the input's
  elements.
* Other ops move, copy, tie or block elements by the rule table :data:`RULES` (one handler per
  op type; adding an op = adding a row). Ties (``union``) say "these two channels must be kept
  or pruned together" (residual Add, SE Mul, depthwise conv, channel shuffle, attention heads).
* Anything not understood blocks the elements it reads, with a reason. Graph inputs/outputs
  and ops that depend on the channel count (Softmax/LayerNorm/reductions over channels, shape
  reads, fixed Reshapes that cannot be rewritten) block as well.

A :class:`ChannelGroup` is a connected set of origin spaces (two spaces are connected when any
of their channels are tied); its *units* are the union-find classes (a unit is what is pruned:
one channel, a whole attention head, one channel in every shuffle group...). ``members`` are
every parameter slice, shape constant, split size, attribute and slice window that must be
rewritten when units go, each a typed :class:`Member` that applies a kept-channel list to the
IR itself. Pruning (``edgec.passes.prune_channels.apply_pruning``) applies all of them,
consistently, in one go.

Modules
-------
* :mod:`.model`: the data model (channel maps, channel spaces, groups and their parts);
* :mod:`.members`: the typed members and how each rewrites the IR;
* :mod:`.engine`: the union-find, the analysis driver and :func:`find_groups`;
* :mod:`.rules`: the per-op rules and the op -> rule table;
* :mod:`.text`: :func:`format_groups`, the stable text dump.
"""

from .engine import ChannelAnalysis, analyse, find_groups
from .members import (ConstantEdits, GroupAttr, Member, ParamSlice, ShapeEntry, SliceWindow, SplitSize,
                      constant_of_shape, expand_positions)
from .model import ChannelGroup, GroupMember, GroupOrigin, GroupTensor, Origin, TMap
from .rules import RULES
from .text import format_groups

__all__ = [
    "RULES", "ChannelAnalysis", "ChannelGroup", "ConstantEdits", "GroupAttr", "GroupMember", "GroupOrigin",
    "GroupTensor", "Member", "Origin", "ParamSlice", "ShapeEntry", "SliceWindow", "SplitSize", "TMap", "analyse",
    "constant_of_shape", "expand_positions", "find_groups", "format_groups",
]
