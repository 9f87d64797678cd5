"""The text form of channel groups (``edgec inspect --groups``, the golden files)."""

from __future__ import annotations

from .model import ChannelGroup


def _ranges(xs: list[int]) -> str:
    """[0,1,2,5,6,9] -> '0-2,5-6,9'."""
    if not xs:
        return "-"
    out, start, prev = [], xs[0], xs[0]
    for x in xs[1:]:
        if x == prev + 1:
            prev = x
            continue
        out.append(f"{start}-{prev}" if prev != start else f"{start}")
        start = prev = x
    out.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ",".join(out)


def _mapping(idx: list[int]) -> str:
    """Run-length form of a unit index list: [0,0,0,1,1,1,2,2,2] -> '0-2 (x3 each)'."""
    runs = []
    for x in idx:
        if runs and runs[-1][0] == x:
            runs[-1][1] += 1
        else:
            runs.append([x, 1])
    reps = {r for _, r in runs}
    if len(reps) == 1 and reps != {1}:
        return f"{_ranges([v for v, _ in runs])} (x{reps.pop()} each)"
    if reps == {1}:
        return _ranges(idx)
    return ",".join(f"{v}" if r == 1 else f"{v}x{r}" for v, r in runs)


def format_groups(groups: list[ChannelGroup]) -> str:
    """Stable text dump (used for golden files)."""
    lines = []
    for g in groups:
        status = "prunable" if g.prunable else f"UNPRUNABLE: {g.reason}"
        sizes = g.unit_sizes()
        unit = "" if all(s == 1 for s in sizes) else f" (units of {_ranges(sorted(set(sizes)))} channels)"
        lines.append(f"group {g.id}: {g.channels} units{unit}, {status}")
        for o in g.origins:
            lines.append(f"  origin   {o.tensor} <- {o.op}" + (f" '{o.node}'" if o.node else ""))
        for gm in g.members:
            mb, pos, idx = gm.member, gm.positions, gm.units
            blk = f" x{mb.block}" if mb.block != 1 else ""
            div = f" /{mb.div}" if mb.div != 1 else ""
            mapping = "" if idx == list(range(len(idx))) and pos == idx else f" -> units {_mapping(idx)}"
            lines.append(f"  {mb.kind:<8} {mb.label()} [{_ranges(pos)}]{blk}{div}{mapping}")
    return "\n".join(lines) + "\n"
