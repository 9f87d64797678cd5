"""The data model of the channel analysis: tensor channel maps, channel spaces, groups.

Elements (channels) are ints, ids in the analysis' union-find. The members of a group (what is
rewritten when its units go) are in :mod:`.members`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import onnx_graphsurgeon as gs

from .members import Member

if TYPE_CHECKING:  # annotations only: the engine builds these
    from .engine import ChannelAnalysis


@dataclass
class TMap:
    """Channel map of one tensor: ``axis`` carries channels; position ``p`` of the axis belongs to
    element ``elems[p // block]``."""

    axis: int
    elems: list
    block: int = 1


@dataclass(eq=False)
class Origin:
    """A channel space of the analysis: the channels of ``tensor`` created by ``node`` (a layer
    with constant weights), or an untracked tensor's channels (``node`` None: blocked)."""

    tensor: gs.Tensor
    node: gs.Node | None
    elems: list


@dataclass(frozen=True)
class GroupOrigin:
    """A layer whose output channels are in a group: its output ``tensor`` name, ``op``
    (``untracked`` for a blocked untracked tensor) and ``node`` name."""

    tensor: str
    op: str
    node: str = ""


@dataclass
class GroupMember:
    """A member's part in a group: the ``positions`` of its ``elems`` that belong to the group
    and the group unit of each."""

    member: Member
    positions: list[int]
    units: list[int]


@dataclass
class GroupTensor:
    """A mapped tensor's part in a group: channel ``axis``, the ``positions`` (elements) of the
    group on it, the unit of each, and the ``block`` of entries one element owns."""

    name: str
    axis: int
    positions: list[int]
    units: list[int]
    block: int = 1


@dataclass
class ChannelGroup:
    """A connected set of origin spaces; ``channels`` prunable units (union-find classes)."""

    id: str
    channels: int  # number of prunable units
    origins: list[GroupOrigin]
    members: list[GroupMember]
    prunable: bool
    reason: str = ""
    units: list = field(default_factory=list)  # union-find roots, unit order
    tensors: list[GroupTensor] = field(default_factory=list)
    analysis: ChannelAnalysis | None = field(default=None, repr=False)

    def unit_sizes(self) -> list[int]:
        """Channels of one layer per unit (1 for a plain channel, dh for an attention head ...)."""
        a = self.analysis
        best = {u: 0 for u in self.units}
        for o in a.origins:
            counts: dict[int, int] = {}
            for e in o.elems:
                r = a.find(e)
                if r in best:
                    counts[r] = counts.get(r, 0) + 1
            for r, c in counts.items():
                best[r] = max(best[r], c)
        return [best[u] for u in self.units]
