"""Pruning sensitivity, measured: how much the model's outputs change when a channel group loses
chosen units, for every group, from one probe model.

The probe is the model with a multiplier input after each tensor
:func:`edgec.importance.measured_tensors` picks for a group (the end of the BN/activation chain
after each producer: what the group's consumers read). All multipliers at one give the model's own
outputs; zeros at a group's units make those channels read as zero downstream, which is what
removing them does to the consumers (without the least-squares re-fit, so a measured error is an
upper bound of the reconstructed one). With ``refit`` (reconstruction follows), a tensor whose
channels, held at a constant, reach only layers the re-fit gives a bias (a Conv of one group, a
Gemm) through ops that keep them constant (activations, BN, pools, a depthwise conv: see
:func:`_bias_absorbs`) has its removed channels read as their mean over the batches instead: the
re-fitted bias absorbs the mean, so that is the closer bound (zeros overstate the cost of
removing a channel with a large mean, as a ReLU's output has). A MatMul without a bias Add has
no bias to fit, and an SE gate or a LayerNorm mixes the constant with other values, so those
tensors stay at zeros. Where the re-fitted layers could also mix the tensor's channels (they read
it through data movement, Concat, average pools or Resize only: no activation, BN or depthwise
conv between), a removed channel reads as its least-squares affine prediction from the kept
channels at the same position, ``x_r ~ A x_k + c`` from the tensor's channel covariance on the
same batches: for a 1x1 conv, a Gemm or a MatMul that is what its re-fit does on those batches,
up to a small ridge (a kxk conv's can also use neighbouring pixels, so it stays a bound). A
tensor of more than ``PREDICT_MAX_CHANNELS`` channels, or with fewer than
``PREDICT_ROWS_PER_CHANNEL`` rows per channel over the trial batches (a classifier's features on
a few samples, which a prediction would fit exactly), keeps the mean. The probe adds that channel mix
(a 1x1 Conv, or a MatMul for channels last, from a ``_pred`` input, zero unless a trial sets it)
after those tensors. One reference session (:mod:`edgec.runtime`) then runs every trial: no
export, no session per group.

:func:`measure` returns, per group and trial, the squared relative output error
``sum ||y - y0||^2 / sum ||y0||^2`` (summed over the graph outputs and the batches, ``y0`` the
unmasked model's outputs) on up to ``max_batches`` calibration batches, drawn with a fixed seed
(:func:`edgec.calibdata.seeded_positions`: not the first ones, which a folder read in order fills
with one class). Squared errors of independent changes add, which is what :func:`allocate`
assumes.

:func:`allocate` spreads a removal budget over the groups: greedily, one step of units at a time,
to the group whose measured error grows least per unit of cost (channels for a channel ratio,
MACs for a MACs target), with each group's error interpolated linearly between its trials
(from zero at no removal, extended with the last slope beyond the largest trial).
"""

from __future__ import annotations

import heapq
import math
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgec import runtime
from edgec.analysis.channels import ChannelGroup
from edgec.calibdata import seeded_positions
from edgec.importance import measured_tensors
from edgec.lstsq import MAX_UNKNOWNS, bias_add
from edgec.ir import IR

MAX_BATCHES = 8  # calibration batches a trial runs on


def _probe(ir: IR, groups: list[ChannelGroup], predicted: Callable[[str, int, int, int], bool] | None = None
           ) -> tuple[onnx.ModelProto, dict[str, tuple], set[str]]:
    """The model with a multiplier input on each measured tensor ``x`` and a fill added after it:
    ``x * mask + fill`` (and ``+ P x``, a channel mix from a ``_pred`` matrix input, for the
    tensors ``predicted(name, rank, axis, channels)`` accepts). Returns (model, {tensor: (input name, mask
    shape, axis, channels)}, the tensors with a prediction)."""
    model = ir.to_onnx()
    tensors = ir.tensors()
    outputs = {o.name for o in model.graph.output}
    masks: dict[str, tuple] = {}
    for g in groups:
        for gt in measured_tensors(ir, g):
            t = tensors.get(gt.name)
            if gt.name in masks or gt.name in outputs or t is None or t.shape is None:
                continue
            rank = len(t.shape)
            axis = gt.axis % rank if rank else 0
            n = len(g.analysis.maps[gt.name].elems) * gt.block
            shape = [1] * rank
            shape[axis] = n
            masks[gt.name] = (f"{gt.name}__edgec_mask", shape, axis, n)
    if not masks:
        return model, masks, set()
    renamed = {name: f"{name}__edgec_masked" for name in masks}
    for node in model.graph.node:
        for i, x in enumerate(node.input):
            if x in renamed:
                node.input[i] = renamed[x]
    dtypes = {vi.name: vi.type.tensor_type.elem_type for vi in
              list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    pred: set[str] = set()
    for name, (inp, shape, axis, n) in masks.items():
        elem = dtypes.get(name, TensorProto.FLOAT)
        model.graph.input.append(helper.make_tensor_value_info(inp, elem, shape))
        model.graph.input.append(helper.make_tensor_value_info(inp + "_fill", elem, shape))
        model.graph.node.append(helper.make_node("Mul", [name, inp], [renamed[name] + "_kept"],
                                                 name=f"{name}__edgec_mask_mul"))
        kept = renamed[name] + "_kept"
        if predicted is not None and elem == TensorProto.FLOAT and predicted(name, len(shape), axis, n):
            pred.add(name)
            if axis == len(shape) - 1:  # channels last: x @ P' (P' = P transposed, [C, C])
                model.graph.input.append(helper.make_tensor_value_info(inp + "_pred", elem, [n, n]))
                model.graph.node.append(helper.make_node("MatMul", [name, inp + "_pred"], [name + "__edgec_pred"],
                                                         name=f"{name}__edgec_pred"))
            else:  # channels at axis 1: a 1x1 convolution with weight P [C, C, 1, ...]
                model.graph.input.append(helper.make_tensor_value_info(inp + "_pred", elem, [n, n] + [1] * (len(shape) - 2)))
                model.graph.node.append(helper.make_node("Conv", [name, inp + "_pred"], [name + "__edgec_pred"],
                                                         name=f"{name}__edgec_pred"))
            model.graph.node.append(helper.make_node("Add", [kept, name + "__edgec_pred"], [kept + "_pred"],
                                                     name=f"{name}__edgec_pred_add"))
            kept += "_pred"
        model.graph.node.append(helper.make_node("Add", [kept, inp + "_fill"], [renamed[name]],
                                                 name=f"{name}__edgec_mask_fill"))
    # the Mul nodes were appended at the end: put the graph back in topological order
    _toposort(model.graph)
    return model, masks, pred


def _producers_first(inputs: list[list[str]], outputs: list[list[str]]) -> list[int]:
    """Node indices ordered so that each comes after the producers of its inputs (depth first,
    ``inputs``/``outputs``: each node's tensor names)."""
    produced = {o: i for i, outs in enumerate(outputs) for o in outs if o}
    order, state = [], [0] * len(inputs)
    for start in range(len(inputs)):
        stack = [(start, False)]
        while stack:
            i, done = stack.pop()
            if done:
                state[i] = 2
                order.append(i)
                continue
            if state[i]:
                continue
            state[i] = 1
            stack.append((i, True))
            for x in inputs[i]:
                j = produced.get(x)
                if j is not None and not state[j]:
                    stack.append((j, False))
    return order


def _toposort(graph: onnx.GraphProto) -> None:
    order = _producers_first([list(n.input) for n in graph.node], [list(n.output) for n in graph.node])
    nodes = [graph.node[i] for i in order]
    new = [onnx.NodeProto() for _ in nodes]
    for a, b in zip(new, nodes):
        a.CopyFrom(b)
    del graph.node[:]
    graph.node.extend(new)


# ops a channel read as a constant stays a constant through (per channel, one data input; a
# depthwise conv's zero padding changes it at the borders only)
_PER_CHANNEL = {"Relu", "LeakyRelu", "PRelu", "Clip", "HardSwish", "HardSigmoid", "Sigmoid", "Tanh", "Elu",
                "Selu", "Softplus", "Gelu", "Identity", "Dropout", "BatchNormalization", "MaxPool", "AveragePool",
                "GlobalAveragePool", "GlobalMaxPool", "Resize", "Upsample", "Concat",
                "Flatten", "Squeeze", "Unsqueeze", "Reshape", "Transpose"}  # (a bias absorbs constant features)
_ARITH = {"Add", "Sub", "Mul", "Div"}
# linear ops that keep a channel mix a channel mix (``_bias_absorbs(linear=True)``)
_MIXABLE = {"Identity", "Dropout", "AveragePool", "GlobalAveragePool", "Resize", "Upsample", "Concat",
            "Flatten", "Squeeze", "Unsqueeze", "Reshape", "Transpose"}


def _in_order(ir: IR) -> list:
    """``ir``'s nodes, each after the producers of its inputs (a pass may have appended nodes)."""
    nodes = list(ir.nodes)
    order = _producers_first([[x.name for x in n.inputs] for n in nodes], [[o.name for o in n.outputs] for n in nodes])
    return [nodes[i] for i in order]


def _bias_absorbs(ir: IR, name: str, order: list | None = None, linear: bool = False) -> bool:
    """Whether a channel of tensor ``name`` held at a constant reaches only layers that
    reconstruction re-fits with a bias (a Conv of one group, a Gemm, a MatMul whose bias an Add
    gives: :func:`edgec.lstsq.bias_add`; reading it as their data input), through ops that keep
    it a constant: activations, BN, pools, Resize, Concat, reshapes,
    a depthwise conv, arithmetic whose other operands are constants or constant too (a hard-swish
    written as ``x * HardSigmoid(x)``). Then the re-fitted bias absorbs it. A MatMul with no bias
    to fit, a LayerNorm, a product with another activation (an SE gate) or a graph output on the
    way: not absorbed. ``order``: :func:`_in_order`'s, when the caller asks for many tensors.

    ``linear``: whether the re-fit can also replace a channel by any affine function of the
    tensor's other channels at the same position: the tensor reaches only those re-fitted layers,
    through ops that commute with mixing its channels (data movement, Concat, average pools,
    Resize); no activation, BN or depthwise conv on the way."""
    held = {name}  # tensors whose channel is a constant when the tensor's is
    for n in order if order is not None else _in_order(ir):  # every input settled before its reader
        ins = [x.name in held for x in n.inputs]
        if not any(ins):
            continue
        w = ir.const_value(n.inputs[1]) if n.op in ("Conv", "Gemm", "MatMul") and len(n.inputs) > 1 else None
        # what reconstruction re-fits: not a layer too wide for its closed form, nor an auto_pad conv
        k = None if w is None or w.ndim < 2 else (int(np.prod(w.shape[1:])) if n.op == "Conv" else
                                                   w.shape[1] if n.op == "Gemm" and n.attrs.get("transB", 0) else w.shape[0])
        fits = k is not None and k + 1 <= MAX_UNKNOWNS and n.attrs.get("auto_pad", "NOTSET") in ("NOTSET", b"NOTSET") \
            and (n.op != "Conv" or w.ndim == 4)  # reconstruction re-fits 2-D convolutions only
        if n.op == "MatMul" and ins == [True, False] and fits and bias_add(ir, n) is not None:
            continue  # re-fitted with the bias its Add gives
        if n.op != "MatMul" and w is not None and ins[0] and not any(ins[1:]):
            group = int(n.attrs.get("group", 1))
            if fits and ((n.op == "Gemm" and not n.attrs.get("transA", 0)) or (n.op == "Conv" and group == 1)):
                continue  # re-fitted, with a bias
            if not linear and n.op == "Conv" and w.ndim == 4 and w.shape[1] == 1 and group == w.shape[0]:  # depthwise
                held.update(o.name for o in n.outputs)
                continue
            return False
        if n.op in (_MIXABLE if linear else _PER_CHANNEL) and (n.op == "Concat" or (ins[0] and not any(ins[1:]))):
            held.update(o.name for o in n.outputs)
            continue
        if not linear and n.op in _ARITH and all(h or ir.is_const(x) for h, x in zip(ins, n.inputs)):
            held.update(o.name for o in n.outputs)
            continue
        return False
    return not any(o.name in held for o in ir.graph.outputs)


def measure(ir: IR, groups: list[ChannelGroup], trials: dict[str, list[list[int]]], feeds: list[dict], *,
            max_batches: int = MAX_BATCHES, log: Callable[[str], None] | None = None,
            refit: bool = False, predict: bool = True) -> dict[str, list[float]]:
    """Squared relative output error of each trial (``trials[group id]``: lists of units to
    remove, indices into ``group.units``), per group id, in the order given. Removed units read
    as zeros, or with ``refit`` as what the re-fit can make of them (the module doc): their mean
    where a re-fitted bias absorbs it, and with ``predict`` their least-squares prediction from
    the tensor's kept channels where the re-fitted layers can mix channels
    (``_bias_absorbs(linear=True)``). A group with no measurable tensor gets no entry."""
    by_id = {g.id: g for g in groups}
    chosen = [by_id[gid] for gid in trials if gid in by_id]
    order = _in_order(ir) if refit else None
    mixable = (lambda name, rank, axis, n: n <= PREDICT_MAX_CHANNELS and (axis == rank - 1 or (axis == 1 and rank >= 3))
               and _bias_absorbs(ir, name, order, linear=True)) if refit and predict else None
    model, masks, predicted = _probe(ir, chosen, mixable)
    if not masks:
        return {}
    batches = [feeds[i] for i in seeded_positions(len(feeds), max_batches)]
    names = runtime.output_names(model)
    filled = [t for t in masks if refit and (t in predicted or _bias_absorbs(ir, t, order))]
    sess = runtime.reference_session(runtime.augment(model, filled))
    # the mask inputs in their tensors' type (a float16 model's masks are float16)
    dt = {i.name: helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in model.graph.input}
    ones = {inp: np.ones(shape, dtype=dt[inp]) for inp, shape, _, _ in masks.values()}
    zeros = {inp + "_fill": np.zeros(shape, dtype=dt[inp]) for inp, shape, _, _ in masks.values()}
    for t in predicted:
        inp, shape, axis, n = masks[t]
        zeros[inp + "_pred"] = np.zeros([n, n] + ([] if axis == len(shape) - 1 else [1] * (len(shape) - 2)), np.float32)
    y0, sums, count = [], {t: 0.0 for t in filled}, {t: 0 for t in filled}
    grams = {t: 0.0 for t in predicted}  # sum of x x' over positions, per predicted tensor
    for _, values in runtime.run_batches(sess, names + filled, batches, fixed={**ones, **zeros}):
        y0.append({n: values[n] for n in names})
        for t in filled:
            v, axis = np.asarray(values[t], dtype=np.float64), masks[t][2]
            sums[t] = sums[t] + np.sum(v, axis=tuple(a for a in range(v.ndim) if a != axis))
            count[t] += v.size // max(v.shape[axis], 1)
            if t in predicted:
                rows = np.moveaxis(v, axis, -1).reshape(-1, v.shape[axis])
                grams[t] = grams[t] + rows.T @ rows
    means = {t: (sums[t] / max(count[t], 1)).reshape(masks[t][1]).astype(np.float32) for t in filled}
    # a prediction fitted and scored on the same rows is only fair with many rows per channel (with
    # fewer it fits them exactly and every removal looks free): otherwise the tensor keeps the mean
    predicted = {t for t in predicted if count[t] >= PREDICT_ROWS_PER_CHANNEL * masks[t][3]}
    covs = {t: grams[t] / max(count[t], 1) - np.outer(sums[t], sums[t]) / max(count[t], 1) ** 2 for t in predicted}
    norm = sum(float(np.sum(np.square(np.asarray(v[n], dtype=np.float64)))) for v in y0 for n in names)
    norm = max(norm, 1e-30)
    out: dict[str, list[float]] = {}
    total = sum(len(trials[g.id]) for g in chosen)
    done = 0
    for g in chosen:
        parts = [gt for gt in measured_tensors(ir, g) if gt.name in masks]
        if not parts:
            continue
        errs = []
        for units in trials[g.id]:
            fixed = {**ones, **zeros}
            dead = set(int(u) for u in units)
            for gt in parts:
                inp, shape, axis, n = masks[gt.name]
                m = np.ones(n, dtype=np.float32)
                for pos, u in zip(gt.positions, gt.units):
                    if u in dead:
                        m[pos * gt.block:(pos + 1) * gt.block] = 0.0
                fixed[inp] = (fixed[inp] * m.reshape(shape)).astype(dt[inp])
                if gt.name in predicted:
                    fixed[inp + "_pred"], fill = _prediction(covs[gt.name], sums[gt.name] / max(count[gt.name], 1),
                                                            fixed[inp].reshape(-1) > 0.5, zeros[inp + "_pred"].shape,
                                                            axis == len(shape) - 1)
                    fixed[inp + "_fill"] = fill.reshape(shape).astype(dt[inp])
                elif gt.name in means:
                    fixed[inp + "_fill"] = ((1.0 - fixed[inp]) * means[gt.name]).astype(dt[inp])
            sse = 0.0
            for k, (_, values) in enumerate(runtime.run_batches(sess, names, batches, fixed=fixed)):
                for n_ in names:
                    d = np.asarray(values[n_], dtype=np.float64) - np.asarray(y0[k][n_], dtype=np.float64)
                    sse += float(np.sum(d * d))
            errs.append(sse / norm)
            done += 1
        out[g.id] = errs
        if log is not None:
            log(f"  sensitivity: {done}/{total} trials ({len(out)}/{len(chosen)} groups)")
    return out


PREDICT_RIDGE = 1e-3  # of the kept channels' mean variance, on the diagonal of their covariance
PREDICT_MAX_CHANNELS = 2048  # a wider tensor keeps the mean (its covariance: 32 MB, a solve per trial)
PREDICT_ROWS_PER_CHANNEL = 10  # fewer rows (positions over the trial batches) per channel: the mean


def _prediction(cov: np.ndarray, mean: np.ndarray, kept: np.ndarray, shape: tuple, last: bool
                ) -> tuple[np.ndarray, np.ndarray]:
    """The removed channels' (``~kept``) least-squares affine prediction from the kept ones:
    ``x_r ~ A x_k + c``, ``A = C_rk (C_kk + lambda I)^-1``. Returns the probe's channel mix (``P``,
    rows of removed channels ``A`` and zero elsewhere, in the ``_pred`` input's ``shape``;
    transposed for a channels-last MatMul) and the fill (``c`` at removed channels, 0 at kept)."""
    n = len(mean)
    P, fill = np.zeros((n, n)), np.zeros(n)
    r, k = np.flatnonzero(~kept), np.flatnonzero(kept)
    if len(r):
        fill[r] = mean[r]
    if len(r) and len(k):
        ckk = cov[np.ix_(k, k)]
        lam = PREDICT_RIDGE * max(float(np.mean(np.diag(ckk))), 1e-30)
        A = np.linalg.solve(ckk + lam * np.eye(len(k)), cov[np.ix_(k, r)]).T  # [r, k]
        P[np.ix_(r, k)] = A
        fill[r] = mean[r] - A @ mean[k]
    P = P.T if last else P
    return P.reshape(shape).astype(np.float32), fill


def allocate(curves: dict[str, list[tuple[int, float]]], limits: dict[str, int], step: dict[str, int],
             cost: dict[str, float], budget: float, first: dict[str, int] | None = None) -> dict[str, int]:
    """Units to remove per group: ``curves[g]`` = measured (units removed, squared error) points,
    ``limits[g]`` the most units ``g`` may lose, ``step[g]`` the units one step removes (the
    rounding multiple; ``first[g]`` for the first step, default ``step[g]``), ``cost[g]`` what one unit is worth (channels, MACs); steps are taken
    from the group with the least error added per cost until ``budget`` is spent. Groups
    without a curve are spent last, uniformly (their error is unknown, not zero)."""
    removed = {g: 0 for g in limits}
    first = first or step

    def size(g: str) -> int:
        return step[g] if removed[g] else first[g]

    def err(g: str, u: int) -> float:
        pts = [(0, 0.0)] + sorted(curves[g])
        for (u0, e0), (u1, e1) in zip(pts, pts[1:]):
            if u <= u1:
                return e0 + (e1 - e0) * (u - u0) / max(u1 - u0, 1)
        (u0, e0), (u1, e1) = pts[-2], pts[-1]
        return e1 + (e1 - e0) * (u - u1) / max(u1 - u0, 1)

    def key(g: str) -> float:
        u = removed[g]
        return (err(g, u + size(g)) - err(g, u)) / max(size(g) * cost[g], 1e-30)

    heap = [(key(g), g) for g in limits if g in curves and first[g] <= limits[g] and cost[g] > 0]
    heapq.heapify(heap)
    spent = 0.0
    while heap and spent < budget - 1e-9:
        _, g = heapq.heappop(heap)
        spent += size(g) * cost[g]
        removed[g] += size(g)
        if removed[g] + step[g] <= limits[g]:
            heapq.heappush(heap, (key(g), g))
    # groups never measured: the rest of the budget, in equal shares of their limits
    rest = [g for g in limits if g not in curves and cost[g] > 0]
    if rest and spent < budget - 1e-9:
        share = min(1.0, (budget - spent) / max(sum(limits[g] * cost[g] for g in rest), 1e-30))
        for g in rest:
            k = int(math.floor((limits[g] * share - first[g]) / step[g])) + 1 if limits[g] * share >= first[g] else 0
            removed[g] = first[g] + (k - 1) * step[g] if k else 0
    return removed
