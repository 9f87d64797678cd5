"""Per-unit importance of channel groups, for choosing what to prune.

Every score is computed per *unit* of a :class:`~edgec.analysis.channels.ChannelGroup`
(a channel, or a whole head / tied set of channels), aggregated over every parameter slice
in the group:

* ``l1`` / ``l2``: norm of each weight slice (producer rows and consumer columns). Each
  member's norms are divided by that member's mean first, so a wide 3x3 conv and a 1x1 conv
  weigh the same; the unit's score is the mean over members.
* ``bn``: ``|gamma|`` of the BatchNormalizations in the group (network slimming); falls back
  to ``l1`` for groups without a BN.
* ``activation``: mean ``|activation|`` of the group's layer outputs (after the BN/activation
  chain that directly follows each producer) on calibration feeds. The reference executor
  (:func:`edgec.runtime.capture`) runs the model with those tensors exposed as extra outputs,
  batch by batch, keeping running sums.
* ``fused``: mean of the normalised ``l2``, ``bn`` (if the group has BNs) and ``activation``
  (if feeds are given).
* ``wanda``: what removing a unit takes from the layers that read it (Wanda-style): the root
  mean square of its channels on the calibration feeds times the L2 norm of the consumers'
  weights reading them (``weight.in`` slices, each consumer normalised to mean 1). Groups
  without such a consumer, or without a measured tensor, fall back to ``l2``.
* ``obs``: the output error a unit's removal leaves in the layers that read it *after* their
  weights are re-fitted by least squares, as reconstruction re-fits them (structured Optimal
  Brain Surgeon on each consumer's channel Gram matrix ``G`` over the calibration feeds). For
  one input channel ``c`` of a consumer with weight columns ``w_c``, that error is
  ``|w_c|^2 / (G^-1)_cc``: ``1 / (G^-1)_cc`` is the part of the channel's energy the other
  channels cannot explain. So it is ``wanda``'s score squared when channels are uncorrelated,
  and near zero for a channel the others reproduce. Units are removed greedily (the weights and
  ``G^-1`` are updated after each, so two copies of one channel do not both look redundant) and
  scored by the error at their turn; each consumer's error is relative to its output energy.
  Conv kernels are taken per tap over the channel Gram (the spatial correlation between taps is
  not modelled); an attention head is a block of channels, removed together. Groups with a
  reader it does not model (a grouped conv, a reader of more than ``OBS_MAX_FEATURES`` features,
  or of blocks over more than ``OBS_MAX_BLOCK_FEATURES``) fall back to ``wanda``.

Scores are normalised per group to mean 1 ("relative importance"), which makes a global
ranking across groups meaningful: a unit with score 0.2 is five times less important than
its group's average.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from edgec import runtime
from edgec.analysis.channels import ChannelGroup, GroupTensor, ParamSlice
from edgec.ir import IR

METHODS = ("l1", "l2", "bn", "activation", "fused", "wanda", "obs")
MEASURED = ("activation", "fused", "wanda", "obs")  # the ones that run the model on calibration feeds
WEIGHT_ROLES = ("weight.out", "weight.in", "dw.weight")
_CHAIN_OPS = {"BatchNormalization", "Relu", "LeakyRelu", "Clip", "HardSwish", "HardSigmoid", "Sigmoid",
              "Tanh", "Elu", "Selu", "PRelu", "Identity", "Dropout", "Add"}


def _normalise(s: np.ndarray) -> np.ndarray:
    m = float(np.mean(s)) if s.size else 0.0
    return s / m if m > 0 else np.ones_like(s)


def _per_position(value: np.ndarray, axis: int, npos: int, block: int, kind: str) -> np.ndarray:
    v = np.moveaxis(value.astype(np.float64), axis, 0).reshape(npos, block, -1)
    if kind == "l1":
        return np.abs(v).sum(axis=(1, 2))
    return (v * v).sum(axis=(1, 2))


def param_scores(ir: IR, g: ChannelGroup, kind: str, roles: tuple = WEIGHT_ROLES) -> np.ndarray | None:
    """l1/l2 (``kind``, over the weight slices of ``roles``) or bn (``|gamma|``) per unit; None if
    the group has no such member."""
    total = np.zeros(g.channels)
    count = np.zeros(g.channels)
    for gm in g.members:
        mb, pos, idx = gm.member, gm.positions, gm.units
        if not isinstance(mb, ParamSlice):
            continue
        if kind == "bn":
            if mb.role != "bn.scale":
                continue
        elif mb.role not in roles:
            continue
        t = mb.node.inputs[mb.slot]
        prod = ir.producer(t)
        if prod is not None and prod.op == "ConstantOfShape":
            continue  # uniform weights (model-zoo "light" models) carry no ranking information
        v = ir.const_value(t)
        if v is None:
            continue
        if kind == "bn":
            per = np.abs(v.astype(np.float64)).reshape(len(mb.elems), mb.block).mean(axis=1)
        else:
            per = _per_position(v, mb.axis, len(mb.elems), mb.block, kind)
        per = per[pos]
        u = np.zeros(g.channels)
        np.add.at(u, idx, per)
        if kind == "l2":
            u = np.sqrt(u)
        hit = np.zeros(g.channels)
        np.add.at(hit, idx, 1)
        seen = hit > 0
        norm = u[seen].mean() if seen.any() else 0.0
        total[seen] += u[seen] / norm if norm > 0 else 1.0
        count[seen] += 1
    if not count.any():
        return None
    return np.where(count > 0, total / np.maximum(count, 1), 0.0)


def measured_tensors(ir: IR, g: ChannelGroup) -> list[GroupTensor]:
    """For each origin of the group: the tensor at the end of its BN/activation chain."""
    a = g.analysis
    tensors = ir.tensors()
    by_name = {gt.name: gt for gt in g.tensors}
    out = []
    for o in g.origins:
        name = o.tensor
        if o.op == "untracked" or name not in by_name:
            continue
        t = tensors.get(name)
        cur = name
        while t is not None and len(t.outputs) == 1 and t.outputs[0].op in _CHAIN_OPS:
            nxt = t.outputs[0].outputs[0]
            if nxt.name not in by_name or a.maps.get(nxt.name) is None or \
                    a.maps[nxt.name].elems != a.maps[cur].elems:
                break
            cur, t = nxt.name, nxt
        out.append(by_name[cur])
    return out


def activation_scores(ir: IR, groups: list[ChannelGroup], feeds: Iterable[dict],
                      rms: bool = False) -> dict[str, np.ndarray]:
    """Mean |activation| (``rms``: root mean square) per unit, per group id, over the calibration
    feeds."""
    wanted = {g.id: measured_tensors(ir, g) for g in groups}
    names = sorted({gt.name for lst in wanted.values() for gt in lst})
    if not names:
        return {}
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, float] = {}
    axes = {gt.name: gt.axis for lst in wanted.values() for gt in lst}

    def on_batch(values: dict) -> None:
        for n in names:
            v = np.asarray(values[n], dtype=np.float64)
            v = v * v if rms else np.abs(v)
            ax = axes[n]
            red = tuple(i for i in range(v.ndim) if i != ax)
            sums[n] = sums.get(n, 0) + v.sum(axis=red)
            counts[n] = counts.get(n, 0) + v.size / v.shape[ax]

    runtime.capture(ir.to_onnx(), names, feeds, on_batch)
    res = {}
    for g in groups:
        total = np.zeros(g.channels)
        cnt = np.zeros(g.channels)
        for gt in wanted[g.id]:
            if gt.name not in sums:
                continue
            per = (sums[gt.name] / counts[gt.name]).reshape(-1, gt.block).mean(axis=1)
            per = np.sqrt(per) if rms else per
            u = np.zeros(g.channels)
            np.add.at(u, gt.units, per[gt.positions])
            hit = np.zeros(g.channels)
            np.add.at(hit, gt.units, 1)
            seen = hit > 0
            u[seen] /= hit[seen]
            norm = u[seen].mean() if seen.any() else 0.0
            total[seen] += u[seen] / norm if norm > 0 else 1.0
            cnt[seen] += 1
        if cnt.any():
            res[g.id] = np.where(cnt > 0, total / np.maximum(cnt, 1), 0.0)
    return res


def compute(ir: IR, groups: list[ChannelGroup], method: str = "l1",
            feeds: list[dict] | None = None, curves: dict | None = None) -> dict[str, np.ndarray]:
    """Normalised importance (mean 1 per group) of every unit of every prunable group. With
    ``obs``, ``curves`` (when given) receives each modelled group's error curve (see
    :func:`obs_scores`)."""
    if method not in METHODS:
        raise ValueError(f"unknown importance method '{method}' (known: {', '.join(METHODS)})")
    groups = [g for g in groups if g.prunable]
    if method in ("activation", "fused") and not feeds:
        if method == "activation":
            raise ValueError("importance 'activation' needs calibration feeds")
    if method in ("wanda", "obs") and not feeds:
        raise ValueError(f"importance '{method}' needs calibration feeds")
    act = activation_scores(ir, groups, feeds) if method in ("activation", "fused") and feeds else {}
    obs = obs_scores(ir, groups, feeds, curves) if method == "obs" else {}
    if method in ("wanda", "obs"):  # for obs, the groups it falls back on only
        act = activation_scores(ir, [g for g in groups if g.id not in obs], feeds, rms=True)
    out = {}
    for g in groups:
        if method in ("l1", "l2"):
            s = param_scores(ir, g, method)
        elif method == "bn":
            s = param_scores(ir, g, "bn")
            if s is None:
                s = param_scores(ir, g, "l1")
        elif method == "activation":
            s = act.get(g.id)
            if s is None:
                s = param_scores(ir, g, "l1")
        elif method == "obs" and g.id in obs:
            s = obs[g.id]
        elif method in ("wanda", "obs"):
            a, w = act.get(g.id), param_scores(ir, g, "l2", roles=("weight.in",))
            s = a * w if a is not None and w is not None else param_scores(ir, g, "l2")
        else:
            parts = [param_scores(ir, g, "l2"), param_scores(ir, g, "bn"), act.get(g.id)]
            parts = [_normalise(p) for p in parts if p is not None]
            s = np.mean(parts, axis=0) if parts else None
        out[g.id] = _normalise(s) if s is not None else np.ones(g.channels)
    return out


# ---------------------------------------------------------------------- obs
OBS_DAMP = 1e-2  # relative ridge on each channel Gram matrix (of its mean diagonal), as a re-fit's
OBS_GREEDY_SHARE = 0.9  # of a group's units ranked greedily (the default max_layer_ratio: pruning takes at most that); the rest by their cost then
OBS_MAX_FEATURES = 4096  # a reader of more input features (a Gemm after Flatten of a large map) is not modelled
OBS_MAX_BLOCK_FEATURES = 1024  # ... nor one reading blocks of channels (heads, Flatten) over more: each block's
# removal updates the whole matrices, at a cost growing with the square of the features
OBS_UPDATES = 12  # full matrix updates per group at most (units are still chosen one by one)


def _consumers(ir: IR, g: ChannelGroup) -> list[tuple] | None:
    """(its input tensor name, channel axis of that tensor, weight matrix [rows, channels],
    {unit: [channel positions]}) for every weight.in member of the group; None
    when one of them is not one the OBS score models (plain Conv, ConvTranspose, Gemm and MatMul
    reading channels, an element a channel or a block of them, such as an attention head): a
    score from only some of the readers would mislead."""
    out = []
    for gm in g.members:
        mb = gm.member
        if not isinstance(mb, ParamSlice) or mb.role != "weight.in":
            continue
        node = mb.node
        v = ir.const_value(node.inputs[mb.slot])
        x = node.inputs[0]
        rank = len(x.shape) if x.shape is not None else None
        axis = 1 if node.op in ("Conv", "ConvTranspose", "Gemm") else (rank - 1 if rank else None)
        if v is None or axis is None or node.op == "Conv" and int(node.attrs.get("group", 1)) != 1 \
                or node.op == "Gemm" and int(node.attrs.get("transA", 0)) \
                or v.shape[mb.axis] != len(mb.elems) * mb.block or v.shape[mb.axis] > OBS_MAX_FEATURES \
                or mb.block > 1 and v.shape[mb.axis] > OBS_MAX_BLOCK_FEATURES:
            return None
        v = np.asarray(v, dtype=np.float64)
        rows = np.moveaxis(v, mb.axis, -1).reshape(-1, v.shape[mb.axis])  # [rows, channels]
        units: dict[int, list[int]] = {}
        for p, u in zip(gm.positions, gm.units):  # an element owns block consecutive channels (a head)
            units.setdefault(int(u), []).extend(range(int(p) * mb.block, (int(p) + 1) * mb.block))
        out.append((x.name, axis, rows, units))
    return out


def _grams(ir: IR, wanted: dict[str, int], feeds: Iterable[dict]) -> dict[str, np.ndarray]:
    """Channel Gram matrix (sum over every other axis of x x') of each tensor, float64."""
    grams: dict[str, np.ndarray] = {}

    def on_batch(values: dict) -> None:
        for n, ax in wanted.items():
            v = np.moveaxis(np.asarray(values[n]), ax, 0)
            v = v.reshape(v.shape[0], -1).astype(np.float64)
            grams[n] = grams.get(n, 0) + v @ v.T

    if wanted:
        runtime.capture(ir.to_onnx(), sorted(wanted), feeds, on_batch)
    return grams


class _Single:
    """One tensor's greedy state where every unit is one channel. Since the last full update
    (``Ginv``, ``Q = M'M``, compacted to the channels left), each removal is a rank-1 downdate
    kept as columns: ``Ginv_t = Ginv - U U'``, ``Q_t = Q - (A B' + B A')``; the diagonals the
    scores read are updated in O(channels) per removal, the matrices once per chunk."""

    def __init__(self, Ginv: np.ndarray, M: np.ndarray, upos: dict, n: int, chunk: int):
        c = Ginv.shape[0]
        self.G, self.Q = Ginv.copy(), M.T @ M
        self.pos = np.full(n, -1)
        for u, ps in upos.items():
            self.pos[u] = ps[0]
        self.where = np.arange(c)  # channel -> row now (-1: removed)
        self.U, self.A, self.B = (np.zeros((c, chunk)) for _ in range(3))
        self.t = 0
        self.removed = np.zeros(c, dtype=bool)  # rows removed since the last full update
        self._diagonals()

    def _diagonals(self) -> None:
        self.dG, self.dQ = np.diagonal(self.G).copy(), np.diagonal(self.Q).copy()

    def add_costs(self, cost: np.ndarray, alive: np.ndarray) -> None:
        has = (self.pos >= 0) & alive
        j = self.where[self.pos[has]]
        cost[has] += np.maximum(self.dQ[j], 0.0) / np.maximum(self.dG[j], 1e-300)

    def remove(self, unit: int) -> None:
        if self.pos[unit] < 0:
            return
        p, t = int(self.where[self.pos[unit]]), self.t
        U, A, B = self.U[:, :t], self.A[:, :t], self.B[:, :t]
        g = self.G[:, p] - U @ U[p]
        q = self.Q[:, p] - A @ B[p] - B @ A[p]
        gpp = max(float(g[p]), 1e-300)
        h = g / gpp
        bb = q - 0.5 * float(q[p]) * h
        self.U[:, t], self.A[:, t], self.B[:, t] = g / np.sqrt(gpp), h, bb
        self.dG -= self.U[:, t] ** 2
        self.dQ -= 2.0 * h * bb
        self.removed[p] = True
        self.t += 1
        if self.t == self.U.shape[1]:
            self.flush()

    def flush(self) -> None:
        if not self.t:
            return
        U, A, B = self.U[:, :self.t], self.A[:, :self.t], self.B[:, :self.t]
        self.G -= U @ U.T
        AB = A @ B.T
        self.Q -= AB
        self.Q -= AB.T
        keep = ~self.removed
        self.G, self.Q = self.G[np.ix_(keep, keep)], self.Q[np.ix_(keep, keep)]
        row = np.cumsum(keep) - 1
        live = self.where >= 0
        live[live] = keep[self.where[live]]
        self.where = np.where(live, row[np.maximum(self.where, 0)], -1)
        c = len(self.G)
        self.U, self.A, self.B = (np.zeros((c, self.U.shape[1])) for _ in range(3))
        self.removed = np.zeros(c, dtype=bool)
        self.t = 0
        self._diagonals()


class _Blocks:
    """One tensor's greedy state where a unit is several channels (an attention head): each
    removal is a block downdate of the full matrices, made at once (such groups have few units)."""

    def __init__(self, Ginv: np.ndarray, M: np.ndarray, upos: dict):
        self.G, self.Q, self.upos = Ginv.copy(), M.T @ M, upos

    def add_costs(self, cost: np.ndarray, alive: np.ndarray) -> None:
        for u, ps in self.upos.items():
            if alive[u]:
                ix = np.ix_(ps, ps)
                cost[u] += float(np.trace(np.linalg.solve(self.G[ix], self.Q[ix])))

    def remove(self, unit: int) -> None:
        R = self.upos.get(unit)
        if not R:
            return
        H = np.linalg.solve(self.G[np.ix_(R, R)], self.G[R])  # [|R|, C]
        QH = self.Q[:, R] @ H
        self.Q += H.T @ (self.Q[np.ix_(R, R)] @ H) - QH - QH.T
        self.G -= self.G[:, R] @ H
        self.G[R, :] = 0.0
        self.G[:, R] = 0.0
        self.G[R, R] = 1.0  # removed: no longer read
        self.Q[R, :] = 0.0
        self.Q[:, R] = 0.0


def _greedy(states: list[list], n: int) -> tuple[np.ndarray, list[int], np.ndarray]:
    """Greedy OBS removal order over ``n`` units; ``states``: per tensor [Ginv, M, {unit: positions}]
    (``M``: the consumers' weight rows, each consumer scaled to unit output energy). Returns each
    unit's score: the running maximum of the error its removal added, at its turn (nudged up to
    be strictly increasing, so that the k lowest scores are the k units removed first), the
    units in the order removed, and the error each added.

    Removing channel ``p`` (the OBS update) changes ``Ginv -= g g' / g_p`` (``g = Ginv[:, p]``)
    and ``M -= M[:, p] g' / g_p``. Units are chosen one by one, each choice seeing the ones
    before it; the matrices are brought up to date once per chunk of choices (``_Single``)."""
    steps = min(n - 1, max(1, math.ceil(OBS_GREEDY_SHARE * n)))
    chunk = max(1, math.ceil(steps / OBS_UPDATES))
    work = [_Single(G, M, upos, n, chunk) if all(len(ps) == 1 for ps in upos.values()) else _Blocks(G, M, upos)
            for G, M, upos in states]
    score = np.zeros(n)
    alive = np.ones(n, dtype=bool)
    level = 0.0
    order: list[int] = []
    added: list[float] = []

    def costs() -> np.ndarray:
        cost = np.zeros(n)
        for w in work:
            w.add_costs(cost, alive)
        return cost

    for _ in range(steps):
        cost = costs()
        cand = np.where(alive)[0]
        i = int(cand[np.argmin(cost[cand])])
        # strictly increasing in the greedy order (also where a later removal costs less), by a
        # relative step that survives the normalisation: the k lowest scores are the first k removed
        level = max(float(cost[i]), level * (1.0 + 1e-9) + 1e-30)
        score[i] = level
        alive[i] = False
        order.append(i)
        added.append(float(cost[i]))
        for w in work:
            w.remove(i)
    if alive.any():  # the last unit, or the rest past the greedy share: their costs then, above every removed one
        cost = costs()
        rest = np.where(alive)[0]
        score[rest] = level + np.maximum(cost[rest], 0.0) + 1e-12 * (1.0 + level)
    return score, order, np.asarray(added)


def obs_scores(ir: IR, groups: list[ChannelGroup], feeds: Iterable[dict],
               curves: dict | None = None) -> dict[str, np.ndarray]:
    """OBS importance per unit, per group id (see the module docstring); groups with no consumer
    it models are left out. ``curves`` (when given) receives, per group, ``[(k, error)]`` for
    k = 1, 2, ... units removed in the greedy order: the error left in the layers that read the
    group after their re-fit, summed over them, each relative to its output energy (what
    ``prune_channels``' ``local`` allocation compares across groups)."""
    cons = {g.id: _consumers(ir, g) or [] for g in groups}
    wanted = {x: ax for lst in cons.values() for x, ax, _, _ in lst}
    grams = _grams(ir, wanted, feeds)
    res = {}
    for g in groups:
        per_tensor: dict[str, list] = {}
        for x, _, rows, upos in cons[g.id]:
            G = grams.get(x)
            if G is None or G.shape[0] != rows.shape[1] or not np.isfinite(G).all():
                per_tensor = {}  # a reader it cannot measure: the group falls back, as when it cannot model one
                break
            energy = float(np.sum(rows * (rows @ G)))
            if not energy > 0:
                continue
            st = per_tensor.setdefault(x, [[], {}])
            st[0].append(rows / np.sqrt(energy))
            for u, ps in upos.items():
                st[1].setdefault(u, ps)
        if not per_tensor:
            continue
        states = []
        for x, (ms, upos) in per_tensor.items():
            G = grams[x].copy()
            damp = OBS_DAMP * float(np.mean(np.diagonal(G))) + 1e-12
            G[np.arange(len(G)), np.arange(len(G))] += damp
            states.append([np.linalg.inv(G), np.concatenate(ms, axis=0), upos])
        score, _, added = _greedy(states, g.channels)
        res[g.id] = score
        if curves is not None:
            curves[g.id] = [(k + 1, float(e)) for k, e in enumerate(np.cumsum(added))]
    return res
