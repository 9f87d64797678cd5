"""reconstruct: least-squares recovery of the layers that read pruned channels.

Design choice: reconstruction is a *function* (:func:`reconstruct`) that ``prune_channels``
calls after every pruning step when calibration data is given (it needs the unpruned model
and the map of which channels survived, which only the pruning knows). A thin pass
(:class:`Reconstruct`) wraps it for pipelines that carry these explicitly: it reads the
unpruned model from ``ctx.reference`` and the calibration batches from ``ctx.feeds()``, and
is told which channels survived (``kept``) when it is built.

Every Conv (any ``group``, no auto_pad, 2-D kernel), Gemm (transA=0) and MatMul with a constant
2-D weight whose input lost channels is re-fitted, as :class:`edgec.lstsq.LinearMap`: a grouped
or depthwise conv is one fit per group (depthwise: per channel, over its kernel taps) from that
group's input channels. So is every such layer whose input pruning changed without removing
channels from it (``downstream``, the default: a layer after a re-fitted one, whose fit could
not make its output exact, and a nonlinearity between): it keeps its inputs and is fitted to
its unpruned output like the others, and like them it keeps its weights unless the fit beats
them on held-out samples. (On PP-OCRv4's recogniser most of these in its transformer part kept
theirs: 1,280 rows from 32 text lines.)

* ``Y``: the layer's output in the *unpruned* model (only the surviving output channels), from
  one reference pass of the unpruned model over the calibration feeds; up to ``max_rows``
  output positions per layer are sampled (spread over the batches) and only those rows kept.
* ``X``: the layer's input in the *pruned* model with every re-fitted layer upstream already
  re-fitted (sequential semantics), as im2col patches for a Conv, at the same positions. It
  comes from :class:`edgec.lstsq.StagedRun`: the pruned model is exported once and run in parts,
  each node once over all batches; a part runs as soon as every re-fitted layer it depends on
  is fitted, so layers in parallel branches (a projection shortcut and its block's first conv,
  Inception/DenseNet branches) share a part and a chain of N layers takes N parts, not N full
  passes.
* The fit is closed form on streamed normal equations (:class:`edgec.lstsq.NormalEquations`,
  float64 products: float32 ones summed in another order at another thread count): weights
  and bias (a Conv without bias gets one) from ``(X'X + lambda I) W = X'Y``,
  ``lambda = ridge * mean(diag(X'X))`` per group. The rows of every fifth calibration sample
  are held out (and kept): whole samples, since the pixels of one image are not independent of
  each other, and a fit that learnt an image's rows passes a test on its other rows (with fewer
  than ``HOLDOUT_MIN_SAMPLES`` samples: every fifth row). ``lambda`` is picked among ``ridge * (1, 10, 100, 1000)`` on those rows, trying
  them in increasing order until the held-out error rises (a wide layer, below, starts at the
  second and follows the error's slope); the best fit is kept only if it
  beats the current weights there, and then solved again on all rows. (Skipping that re-solve
  saved a third of the solving time, but cost PP-OCRv4's detector half a point of F1 at 30%.)
  Where there are fewer held-out rows than unknowns (the wide layers, which take most of the
  time), each factorisation also solves for the held-out rows: the held-out error's slope in
  lambda then stops the search without solving the next step when it would only rise, and the
  all-rows fit is a Woodbury update, not another factorisation
  (:meth:`edgec.lstsq.NormalEquations.fit`): one factorisation per layer instead of three
  when the smallest ridge wins.
* A layer with more than ``MAX_UNKNOWNS`` inputs per output (VGG's first fully connected layer)
  is left as pruned, with the reason: its K x K system would take gigabytes and minutes.
* What the ridge pulls towards (``prior``): zero, or the layer's ``current`` (pruned) weights
  (``(X'X + lambda I) W = X'Y + lambda W0``: a large ridge then keeps the trained weights
  rather than shrinking them, which matters where rows are few for the unknowns). The default,
  ``auto``, fits both and keeps, per layer, the one with the lower held-out error; the two
  share each factorisation (:meth:`edgec.lstsq.NormalEquations.fit_priors`), so the choice
  costs right-hand sides, not solves. Neither fixed prior was better everywhere: ``current``
  helped PP-OCRv4's recogniser and all-MiniLM-L6-v2 and cost PP-OCRv4's detector (see the
  README's pruning section).
* A layer after a global average pool (an SE block's squeeze conv, a classifier head: a 1x1
  conv or a Gemm/MatMul reading ``GlobalAveragePool(u)`` or a spatial ``ReduceMean``, through a
  Flatten/Reshape/Squeeze) has one row per *sample*, often fewer than its unknowns. It is
  fitted on the positions of ``u`` instead: its input rows are ``u``'s pixels in the pruned
  model, its targets the unpruned layer applied to ``u``'s pixels in the unpruned model. The
  layer is linear, so its pooled output is the mean of those per-pixel outputs, and the pooled
  error is at most the mean per-pixel error (Jensen): the fit minimises a bound on what it
  must match, from H*W times more rows (``pool_rows``; the entry's ``rows_of`` names ``u``).
* A layer whose output flows alone into a residual ``Add(y, r)`` (through per-channel affine
  ops: an inference BatchNormalization, a bias Add, a constant Mul, whose scales ``s`` multiply;
  and Transposes: ConvNeXt's channels-last MLP, ``r`` then read in the layer's layout)
  is fitted to what makes the *sum* match (``residual``): ``y_o + (r_o - r_p) / s`` at its rows,
  ``r_o`` the unpruned model's ``r`` and ``r_p`` the pruned one's with every layer upstream
  re-fitted (:class:`edgec.lstsq.StagedRun` waits for ``r`` too). The error pruning left in the
  stream is then absorbed block by block instead of accumulating: on all-MiniLM-L6-v2 at 30% the
  held-out relative L2 fell from 0.246 to 0.237 (``benchmarks/real_models.py``). When both
  operands of the Add are re-fitted layers (a projection shortcut), the one fitted first matches
  its own output and the other the sum (the entry's ``residual`` names ``r``).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper

from edgec import runtime
from edgec.ir import IR
from edgec import lstsq
from edgec.lstsq import LinearMap, NormalEquations, StagedRun, bias_add
from edgec.pipeline import Pass, PassContext, PassResult, register

RIDGE_STEPS = (1, 10, 100, 1000)
HOLDOUT_MIN_SAMPLES = 10  # fewer calibration samples: every fifth row is held out, not every fifth sample
PRIORS = ("zero", "current", "auto")
MAX_UNKNOWNS = lstsq.MAX_UNKNOWNS  # a layer with more inputs per output is not re-fitted (see there)


@dataclass
class ReconstructionResult:
    """What the ``reconstruct`` pass did (the ``data`` of its PassResult): one dict per layer
    considered (name, op, groups, rows, ridge, prior, held-out errors before/after and, as kept,
    relative to the layer's output (``val_rel_l2``), the part of the
    staged run it was fitted in, whether it was re-fitted; ``rows_of`` for a layer fitted on
    the positions before a global pool)."""

    layers: list[dict] = field(default_factory=list)


def _changed(ir: IR, kept: dict[str, tuple]) -> set[str]:
    """The tensors pruning changed: the pruned ones (``kept``) and every tensor computed from one."""
    tensors = ir.graph.tensors()
    changed, todo = set(), [n for n in kept if n in tensors]
    while todo:
        name = todo.pop()
        if name in changed:
            continue
        changed.add(name)
        todo.extend(o.name for user in tensors[name].outputs for o in user.outputs)
    return changed


def _layers(ir: IR, kept: dict[str, tuple], grouped: bool = True, downstream: bool = False) -> list[gs.Node]:
    out = []
    reads = _changed(ir, kept) if downstream else kept
    for node in ir.nodes:
        if not node.inputs or node.inputs[0].name not in reads or len(node.inputs) < 2:
            continue
        w = ir.const_value(node.inputs[1])
        if w is None or w.dtype.kind != "f":
            continue
        if node.op == "Conv" and w.ndim == 4 and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", b"NOTSET"):
            if grouped or int(node.attrs.get("group", 1)) == 1:
                out.append(node)
        elif node.op == "Gemm" and not node.attrs.get("transA", 0):
            out.append(node)
        elif node.op == "MatMul" and w.ndim == 2 and not ir.is_const(node.inputs[0]):
            out.append(node)
    return out


def _set(ir: IR, node: gs.Node, slot: int, value: np.ndarray) -> None:
    value = np.ascontiguousarray(value)
    if slot < len(node.inputs):
        t = node.inputs[slot]
        if isinstance(t, gs.Constant) and len(t.outputs) == 1:
            t.values = value
            return
        node.inputs[slot] = ir.make_const((t.name or node.name) + "_refit", value)
    else:
        node.inputs.append(ir.make_const(node.name + "_refit_bias", value))


def _map(ir: IR, node: gs.Node) -> LinearMap | None:
    bias = ir.const_value(node.inputs[2]) if len(node.inputs) > 2 else None
    return LinearMap.of(node, ir.const_value(node.inputs[1]), bias, len(node.inputs))


def _pooled_input(ir: IR, node: gs.Node, lm: LinearMap) -> gs.Tensor | None:
    """The 4-D tensor ``u`` [N, C, H, W] when ``node`` reads ``GlobalAveragePool(u)`` (or a
    ``ReduceMean`` over its spatial axes), possibly through a Flatten/Reshape/Squeeze to [N, C],
    as a 1x1 convolution (stride 1, no padding) or a Gemm/MatMul: the layer is then linear in
    ``u``'s positions, and its pooled output is the mean of its outputs there. Else None."""
    if lm.groups != 1:
        return None
    if node.op == "Conv" and (any(v != 1 for v in lm.kernel) or any(node.attrs.get("pads", []))):
        return None
    t = node.inputs[0]
    for _ in range(4):
        p = ir.producer(t)
        if p is None:
            return None
        if p.op in ("Flatten", "Reshape", "Squeeze"):
            if p.op == "Flatten" and int(p.attrs.get("axis", 1)) != 1:
                return None
            shape = ir.static_shape(p.outputs[0])
            if shape is None or len(shape) != 2:
                return None
            t = p.inputs[0]
            continue
        u = p.inputs[0] if p.inputs else None
        if u is None:
            return None
        ushape = ir.static_shape(u)
        if ushape is None or len(ushape) != 4 or ushape[1] != lm.W.shape[1]:
            return None
        if p.op == "ReduceMean":
            axes = p.attrs.get("axes")
            if axes is None and len(p.inputs) > 1:
                axes = ir.const_value(p.inputs[1])
            if axes is None or sorted(int(a) % 4 for a in np.asarray(axes).reshape(-1)) != [2, 3]:
                return None
        elif p.op != "GlobalAveragePool":
            return None
        vshape = ir.static_shape(t)
        if vshape is None or int(np.prod(vshape)) != ushape[0] * ushape[1]:
            return None
        return u
    return None


def _per_channel(c: np.ndarray, shape: tuple, axis: int) -> np.ndarray | None:
    """A constant operand of an elementwise op on a tensor of ``shape`` as one value per channel
    on ``axis`` (a scalar: the same for every channel); None when it varies along another axis."""
    if c.ndim > len(shape):
        return None
    full = (1,) * (len(shape) - c.ndim) + tuple(c.shape)
    if any(d != 1 for k, d in enumerate(full) if k != axis) or full[axis] not in (1, shape[axis]):
        return None
    return np.broadcast_to(c.reshape(-1), (shape[axis],)).astype(np.float64)


def _residual_partner(ir: IR, node: gs.Node) -> tuple[str, np.ndarray, tuple] | None:
    """The other operand ``r`` of the residual Add the layer's output flows into alone, through
    per-channel affine ops (an inference BatchNormalization, an Add or Mul of a per-channel
    constant: a MatMul's bias, a layer scale) and Transposes (ConvNeXt's channels-last MLP),
    when ``r`` has the Add's static shape. Returns ``r``, the product ``s`` of those ops' scales
    per output channel, and ``perm``: ``r``'s layout is the layer output's transposed by it. The
    layer is then fitted to the unpruned sum less the pruned model's ``r`` (in the layer's
    layout, divided by ``s``: ``_fit``'s targets), so it also absorbs the error pruning left in
    ``r``. None otherwise."""
    t = node.outputs[0]
    shape = ir.static_shape(t)
    if shape is None or len(shape) < 2:
        return None
    axis = 1 if node.op == "Conv" else len(shape) - 1
    scale, perm = np.ones(shape[axis]), tuple(range(len(shape)))
    for _ in range(8):
        users = list(t.outputs)
        if len(users) != 1 or ir.is_graph_output(t):
            return None
        u = users[0]
        if u.op == "Transpose":
            p = tuple(int(a) for a in u.attrs.get("perm", range(len(shape) - 1, -1, -1)))
            if sorted(p) != list(range(len(shape))):
                return None
            perm, axis, shape = tuple(perm[k] for k in p), p.index(axis), tuple(shape[k] for k in p)
            t = u.outputs[0]
            continue
        if u.op == "BatchNormalization" and len(u.inputs) == 5 and axis == 1 and \
                not u.attrs.get("training_mode", 0) and not any(o.outputs for o in u.outputs[1:]):
            g, v = ir.const_value(u.inputs[1]), ir.const_value(u.inputs[4])
            if g is None or v is None or not ir.is_const(u.inputs[2]) or not ir.is_const(u.inputs[3]):
                return None
            scale = scale * np.asarray(g, np.float64) / np.sqrt(np.asarray(v, np.float64) + float(u.attrs.get("epsilon", 1e-5)))
            t = u.outputs[0]
            continue
        if u.op not in ("Add", "Mul") or len(u.inputs) != 2:
            return None
        other = u.inputs[1] if u.inputs[0] is t else u.inputs[0]
        if other is t:
            return None
        c = ir.const_value(other)
        if c is not None:
            per = _per_channel(np.asarray(c), shape, axis)
            if per is None:
                return None
            if u.op == "Mul":
                scale = scale * per
            t = u.outputs[0]
            continue
        if u.op != "Add" or ir.static_shape(other) != shape:
            return None
        if not np.all(np.isfinite(scale)) or np.min(np.abs(scale)) < 1e-6 * max(np.max(np.abs(scale)), 1e-30):
            return None
        return other.name, scale, perm
    return None


def _name_uniquely(ir: IR, node: gs.Node, names: Counter) -> None:
    """Give ``node`` a name no other node has, when it has none or shares it (``names``: the
    graph's node names, counted; kept up to date)."""
    if node.name and names[node.name] == 1:
        return
    names[node.name] -= 1
    node.name = ir.unique_name(f"{node.op}_{node.outputs[0].name}")
    names[node.name] += 1


def _original_map(original: onnx.ModelProto, output: str) -> LinearMap | None:
    """The map of the layer writing ``output`` in the unpruned model."""
    inits = {t.name: t for t in original.graph.initializer}
    for n in original.graph.node:
        if not n.output or n.output[0] != output:
            continue
        vals = [numpy_helper.to_array(inits[x]) if x in inits else None for x in n.input]
        if len(vals) < 2 or vals[1] is None:
            return None
        node = gs.Node(op=n.op_type, name=n.name, attrs={a.name: helper.get_attribute_value(a) for a in n.attribute})
        return LinearMap.of(node, vals[1], vals[2] if len(vals) > 2 else None, len(vals))
    return None


def reconstruct(ir: IR, original: onnx.ModelProto, feeds: list[dict], kept: dict[str, tuple], *,
                ridge: float = 1e-3, max_rows: int = 4096, seed: int = 0, grouped: bool = True,
                prior: str = "auto", pool_rows: bool = True, residual: bool = True,
                downstream: bool = True, n_samples: int | None = None) -> list[dict]:
    """Re-fit the consumers of pruned channels in ``ir`` (in place). ``kept`` maps tensor names
    to (axis, surviving positions in the original tensor); ``grouped=False`` leaves grouped and
    depthwise convs alone; ``prior``: what the ridge pulls the weights towards, ``zero``, the
    layer's ``current`` (pruned) weights, or ``auto`` (per layer, whichever fits the held-out
    rows better); ``pool_rows``: fit layers after a global average pool on the pool's input
    positions; ``residual``: fit a layer feeding a residual Add to the unpruned sum;
    ``downstream``: also fit the layers that read a tensor pruning changed but did not prune;
    ``n_samples``: the calibration samples given, when a fixed-batch model's last batch is padded
    with copies of them (their rows are left out). Returns one dict per layer."""
    if prior not in PRIORS:
        raise ValueError(f"unknown ridge prior '{prior}' ({', '.join(PRIORS)})")
    if not feeds:
        return []
    orig_names = {o for n in original.graph.node for o in n.output}
    layers = [n for n in _layers(ir, kept, grouped, downstream) if n.outputs[0].name in orig_names]
    if not layers:
        return []
    names = Counter(n.name for n in ir.nodes)
    for node in layers:  # the staged run finds the layers by name (exporters may leave them unnamed)
        _name_uniquely(ir, node, names)
    report: dict[str, dict] = {}
    maps: dict[str, LinearMap] = {}
    # MatMuls whose bias an Add gives (edgec.lstsq.bias_add): fitted with that bias, and the Add's
    # output is the layer's, when it keeps the MatMul's channels
    bias_adds: dict[str, tuple[gs.Node, int]] = {}
    for node in layers:
        lm = _map(ir, node)
        found = bias_add(ir, node) if lm is not None else None
        if found is not None:
            mm, ad = node.outputs[0].name, found[0].outputs[0].name
            same = (mm in kept) == (ad in kept) and (mm not in kept or (
                kept[mm][0] == kept[ad][0] and np.array_equal(kept[mm][1], kept[ad][1])))
            if same and ad in orig_names:
                _name_uniquely(ir, found[0], names)
                bias_adds[node.name] = found
                c = ir.const_value(found[0].inputs[found[1]])
                lm = replace(lm, b=np.array(c, np.float64).reshape(1, -1), fit_bias=True)
        if lm is None:
            report[node.name] = {"layer": node.name, "op": node.op, "refit": False, "reason": "unsupported layer"}
        elif lm.W.shape[1] + lm.fit_bias > MAX_UNKNOWNS:
            k = lm.W.shape[1] + lm.fit_bias
            report[node.name] = {"layer": node.name, "op": node.op, "refit": False,
                                 "reason": f"too wide to re-fit in closed form: {k} inputs per output (a {k}x{k} "
                                           f"float64 system, {k * k * 8 / 2 ** 30:.1f} GB; the limit is {MAX_UNKNOWNS})"}
        else:
            maps[node.name] = lm
    if not maps:
        return [report[n.name] for n in layers]
    layer_out = {nm: bias_adds[nm][0].outputs[0].name if nm in bias_adds else lm.node.outputs[0].name
                 for nm, lm in maps.items()}
    per_batch = max(1, math.ceil(max_rows / len(feeds)))
    # layers after a global average pool: fitted on the pool's input positions (see _pooled_input)
    pooled: dict[str, tuple[str, LinearMap]] = {}
    for nm, lm in maps.items() if pool_rows else ():
        if nm in bias_adds:  # (the unpruned map applied per position would leave out the Add's bias)
            continue
        u = _pooled_input(ir, lm.node, lm)
        om = _original_map(original, lm.node.outputs[0].name) if u is not None and u.name in orig_names else None
        out = lm.node.outputs[0].name
        if om is None or om.groups != 1 or (out in kept and kept[out][0] % 2 != 1):
            continue
        lm.pooled = True
        pooled[nm] = (u.name, om)
    fit_inputs = {nm: pooled[nm][0] if nm in pooled else lm.node.inputs[0].name for nm, lm in maps.items()}
    # layers feeding a residual Add alone, fitted to the unpruned sum less the pruned partner:
    # name -> (the partner r, the affine ops' scales [groups, Nout], r's layout -> the layer's)
    partners: dict[str, tuple[str, np.ndarray, tuple]] = {}
    known = orig_names | {i.name for i in original.graph.input}
    for nm, lm in maps.items() if residual else ():
        found = None if nm in pooled else _residual_partner(ir, lm.node)
        if found is None or found[0] not in known:
            continue
        r, scale, perm = found
        out = layer_out[nm]
        rank = len(perm)
        channel_axis = 1 if lm.node.op == "Conv" else rank - 1
        ok = (out not in kept or kept[out][0] % rank == channel_axis) and \
            (r not in kept or kept[r][0] % rank == perm.index(channel_axis))
        same = (r in kept) == (out in kept) and (r not in kept or np.array_equal(kept[r][1], kept[out][1]))
        if ok and same and len(scale) == lm.groups * lm.W.shape[2]:
            partners[nm] = (r, scale.reshape(lm.groups, -1), tuple(int(k) for k in np.argsort(perm)))
    partner_rows: dict[str, list] = {nm: [] for nm in partners}  # r_o at each batch's sampled rows

    # targets: one pass of the unpruned model; only the sampled rows of each layer are kept
    targets: dict[str, list] = {nm: [] for nm in maps}
    outputs = {nm: pooled[nm][0] if nm in pooled else layer_out[nm] for nm in maps}

    def on_batch(values: dict) -> None:
        for li, (nm, lm) in enumerate(maps.items()):
            j = len(targets[nm])
            y = np.asarray(values[outputs[nm]])
            if nm in pooled:  # the unpruned layer applied at each position of the pool's input
                om = pooled[nm][1]
                n_ = y.shape[0] * y.shape[2] * y.shape[3]
                rng = np.random.default_rng((seed, li, j))
                idx = rng.choice(n_, size=per_batch, replace=False) if per_batch < n_ else rng.permutation(n_)
                n, rem = np.divmod(idx, y.shape[2] * y.shape[3])
                oy, ox = np.divmod(rem, y.shape[3])
                rows = y[n, :, oy, ox].astype(np.float64) @ om.W[0] + om.b[0]
                out = lm.node.outputs[0].name
                if out in kept:
                    rows = rows[:, kept[out][1]]
                targets[nm].append((y.shape, idx, rows[:, None, :]))
                continue
            pos = None
            if outputs[nm] in kept:
                axis, pos = kept[outputs[nm]]
                if axis % max(y.ndim, 1) != (1 if lm.node.op == "Conv" else y.ndim - 1):
                    y, pos = np.take(y, pos, axis=axis), None
            # the surviving channels of the sampled rows only (not of the whole output: same values)
            shape = y.shape if pos is None else y.shape[:1] + (len(pos),) + y.shape[2:] if lm.node.op == "Conv" \
                else y.shape[:-1] + (len(pos),)
            idx = lm.positions(np.broadcast_to(np.zeros((), y.dtype), shape), per_batch,
                               np.random.default_rng((seed, li, j)))
            targets[nm].append(None if idx is None else (shape, idx, lm.y_rows(y, idx, pos)))
            if nm in partners:
                r, _, back = partners[nm]
                partner_rows[nm].append(None if idx is None else lm.y_rows(
                    np.transpose(np.asarray(values[r]), back), idx, kept[r][1] if r in kept else None))

    runtime.capture(original, sorted(set(outputs.values()) | {r for r, _, _ in partners.values()}), feeds, on_batch)

    # inputs: the pruned model in parts, each layer fitted as soon as its input is final
    staged = StagedRun(ir.to_onnx(), feeds, fit_inputs, {nm: [r] for nm, (r, _, _) in partners.items()})
    for ready in staged.waves():
        for nm in ready:
            lm = maps[nm]
            ys = targets.pop(nm)
            if nm in staged.dropped:  # its partner waits on it (both operands of one Add): fitted as it is
                partners.pop(nm, None)
            if nm in partners:  # target: the unpruned sum less the pruned partner, at the same rows
                r, scale, back = partners[nm]
                inv = 1.0 / scale
                ys = [None if y is None or ro is None else
                      (y[0], y[1], (y[2] + (ro - lm.y_rows(np.transpose(np.asarray(rp), back), y[1])) * inv)
                       .astype(y[2].dtype))
                      for y, ro, rp in zip(ys, partner_rows.pop(nm), staged.batches(r))]
            entry = _fit(lm, staged.batches(fit_inputs[nm]), ys, ridge, prior, n_samples)
            if nm in partners:
                entry["residual"] = partners[nm][0]
            entry["part"] = staged.parts
            if nm in pooled:
                entry["rows_of"] = f"the positions of {fit_inputs[nm]} (before the global pool)"
            report[nm] = entry
            if entry["refit"]:
                W, b = entry.pop("solution")
                node = lm.node
                like = ir.const_value(node.inputs[1])
                w_new, b_new = lm.tensors(W, b, like)
                consts = {1: w_new} if b_new is None or nm in bias_adds else {1: w_new, 2: b_new}
                if nm in bias_adds:  # the bias goes back into the Add, in its constant's shape
                    add, slot = bias_adds[nm]
                    value = b_new.reshape(ir.const_value(add.inputs[slot]).shape)
                    _set(ir, add, slot, value)
                    staged.replace(add.name, {slot: value})
                attrs = {"alpha": 1.0, "beta": 1.0} if node.op == "Gemm" else None
                if attrs:
                    node.attrs.update(attrs)
                for slot, value in consts.items():
                    _set(ir, node, slot, value)
                staged.replace(nm, consts, attrs)
                ir.changed()
    return [report[n.name] for n in layers]


def _fit(lm: LinearMap, xs: list, ys: list, ridge: float, prior: str = "zero",
         n_samples: int | None = None) -> dict:
    """Accumulate the normal equations of ``lm`` over the batches and solve them; the entry's
    ``solution`` is (W, b) when the fit beats the current weights on the held-out rows. Rows of
    samples past the first ``n_samples`` (the copies padding a fixed-batch model's last batch)
    are left out: a copy of a held-out sample among the training rows would pass the test."""
    node = lm.node
    g, k, no = lm.W.shape
    entry = {"layer": node.name, "op": node.op, "groups": g, "refit": False}
    ne = NormalEquations(g, k, no)
    samples = sum(y[0][0] for y in ys if y is not None and len(y[0]))
    if n_samples is not None:
        samples = min(samples, n_samples)
    by_sample = samples >= HOLDOUT_MIN_SAMPLES
    offset = rows = 0
    for x, y in zip(xs, ys):
        X = None if y is None else lm.x_rows(np.asarray(x), y[0], y[1])
        if X is None:
            entry["reason"] = "unsupported layout"
            return entry
        sample = lm.samples(y[0], y[1]) + offset
        offset += y[0][0]
        Y = y[2]
        if sample.size and sample.max() >= samples:
            real = sample < samples
            X, Y, sample = X[real], Y[real], sample[real]
            if not len(X):
                continue
        if by_sample:  # whole samples held out: rows of one image are not independent
            held_out = sample % 5 == 0
        else:
            held_out = (np.arange(len(X)) + rows) % 5 == 0
        rows += len(X)
        ne.add(X, Y, held_out)
    err0 = ne.mse(lm.W, lm.b)
    priors = {nm: (lm.W if nm == "current" else None) for nm in (("zero", "current") if prior == "auto" else (prior,))}
    err1, lam, solves, all_rows, pr = ne.fit_priors(ridge, RIDGE_STEPS, lm.fit_bias, priors)
    entry.update(rows=int(ne.rows.sum()), ridge=lam, prior=pr, solves=solves, val_mse_before=err0, val_mse_after=err1)
    if all_rows is not None and err1 < err0:
        entry["solution"] = all_rows()
        entry["refit"] = True
    ms = ne.held_out_mean_square()
    if ms > 0:  # the layer's held-out error relative to its output, as kept
        entry["val_rel_l2"] = math.sqrt(min(err0, err1) / ms) if entry["refit"] else math.sqrt(err0 / ms)
    return entry


@register
class Reconstruct(Pass):
    name = "reconstruct"
    description = "least-squares re-fit of the layers reading pruned channels (needs the unpruned model)"
    lossless = False

    def __init__(self, kept: dict[str, tuple] | None = None, ridge: float = 1e-3, prior: str = "auto"):
        super().__init__()
        self.kept, self.ridge, self.prior = kept or {}, ridge, prior

    def run(self, ir: IR, ctx: PassContext) -> PassResult:
        feeds = ctx.feeds()
        if ctx.reference is None or not feeds:
            result = PassResult(False, data=ReconstructionResult())
            result.note("reconstruct: no reference model or calibration data given; nothing done")
            return result
        layers = reconstruct(ir, ctx.reference, feeds, self.kept, ridge=self.ridge, prior=self.prior)
        return PassResult(any(r.get("refit") for r in layers), data=ReconstructionResult(layers))
