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

Scores are normalised per group to mean 1 ("relative importance"), which makes a global
ranking across groups meaningful: a unit with score 0.2 is five times less important than
its group's average.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from edgec import runtime
from edgec.analysis.channels import ChannelGroup, GroupTensor, ParamSlice
from edgec.ir import IR

METHODS = ("l1", "l2", "bn", "activation", "fused", "wanda")
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
            feeds: list[dict] | None = None) -> dict[str, np.ndarray]:
    """Normalised importance (mean 1 per group) of every unit of every prunable group."""
    if method not in METHODS:
        raise ValueError(f"unknown importance method '{method}' (known: {', '.join(METHODS)})")
    groups = [g for g in groups if g.prunable]
    if method in ("activation", "fused") and not feeds:
        if method == "activation":
            raise ValueError("importance 'activation' needs calibration feeds")
    if method == "wanda" and not feeds:
        raise ValueError("importance 'wanda' needs calibration feeds")
    act = activation_scores(ir, groups, feeds) if method in ("activation", "fused") and feeds else {}
    if method == "wanda":
        act = activation_scores(ir, groups, feeds, rms=True)
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
        elif method == "wanda":
            a, w = act.get(g.id), param_scores(ir, g, "l2", roles=("weight.in",))
            s = a * w if a is not None and w is not None else param_scores(ir, g, "l2")
        else:
            parts = [param_scores(ir, g, "l2"), param_scores(ir, g, "bn"), act.get(g.id)]
            parts = [_normalise(p) for p in parts if p is not None]
            s = np.mean(parts, axis=0) if parts else None
        out[g.id] = _normalise(s) if s is not None else np.ones(g.channels)
    return out
