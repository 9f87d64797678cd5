"""Weight rounding chosen for each layer's output, not weight by weight (GPTQ, Frantar et al. 2023).

Rounding every weight to its nearest level minimises the error of each weight alone. What the
model computes with is the layer's output ``W x``, and its error under a rounded weight ``Q`` is
``(W - Q) H (W - Q)^T`` with ``H = E[x x^T]`` over the layer's inputs. Optimal Brain Quantization
rounds the weight's input columns one at a time and moves the rounding error of each column onto
the columns not yet rounded, weighted by the inverse of ``H``, so that the output keeps what the
rounding took away; GPTQ's Cholesky form does it for every output channel at once. The scales
are the plan's (the levels are the same, only which level each weight takes changes), so the
result is a drop-in replacement for nearest rounding in every format the materialiser writes.

``H`` comes from the layer's inputs *as the quantized model sees them*: the probe (built with
``layer_inputs``) runs the plan with nearest rounding and its layers' dequantized inputs are read
(a sample of rows per layer,
im2col patches for a Conv, one ``H`` per group of a grouped or depthwise conv).

:func:`optimise` returns ``{node id: (levels, scales, zero points)}``, which a plan carries in
``QuantPlan.rounded``; compile() keeps it only when the model's measured output error drops.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .lstsq import LinearMap
from .quant_plan import QuantPlan, weight_arrays, weight_axis
from .runtime import run_batches

ROWS = 8192  # input rows sampled per layer for its H
DAMP = 0.01  # H + DAMP * mean(diag H) * I: H from a sample is often singular
BLOCK = 128  # columns rounded per block (lazy batch updates)
LEVELS = {"int8": (-127, 127), "int7": (-63, 63), "int4": (-8, 7), "uint8": (0, 255)}
MAX_H_BYTES = 1 << 30  # layers whose H would be larger keep nearest rounding


def eligible(plan: QuantPlan) -> list[str]:
    """Layers whose rounding can be chosen: every integer weight kind."""
    return [k for k, w in plan.weights.items() if w.kind in LEVELS]


def gptq(W: np.ndarray, H: np.ndarray, scale: np.ndarray, zero: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Integer levels for ``W`` [g, out, K] (``g`` independent maps, ``K`` inputs each) with
    input second moments ``H`` [g, K, K], per-output ``scale`` and ``zero`` point [g, out] and
    levels ``qmin..qmax``: GPTQ's column-by-column rounding with error feedback. Returns the
    stored levels [g, out, K] (``w ~ (level - zero) * scale``)."""
    W = W.astype(np.float64).copy()
    g, no, K = W.shape
    H = H.astype(np.float64).copy()
    diag = np.einsum("gkk->gk", H)
    dead = diag <= 0
    mean = np.where(diag > 0, diag, 0).sum(1) / np.maximum((~dead).sum(1), 1)
    idx = np.arange(K)
    H[:, idx, idx] += DAMP * np.maximum(mean, 1e-12)[:, None]
    H[:, idx, idx] = np.where(dead, 1.0, H[:, idx, idx])
    try:
        L = np.linalg.cholesky(H)
        Linv = np.linalg.inv(L)
        Hinv = np.swapaxes(Linv, 1, 2) @ Linv
        U = np.swapaxes(np.linalg.cholesky(Hinv), 1, 2)  # upper: Hinv = U^T U
    except np.linalg.LinAlgError:
        return np.clip(np.rint(W / scale[..., None]) + zero[..., None], qmin, qmax)
    s = scale.astype(np.float64)[..., None]  # [g, out, 1]
    z = zero.astype(np.float64)
    Q = np.zeros_like(W)
    for a in range(0, K, BLOCK):
        b = min(a + BLOCK, K)
        Wb = W[:, :, a:b].copy()
        Err = np.zeros_like(Wb)
        Ub = U[:, a:b, a:b]
        for i in range(b - a):
            w = Wb[:, :, i]
            q = np.clip(np.rint(w / s[..., 0]) + z, qmin, qmax)
            Q[:, :, a + i] = q
            e = (w - (q - z) * s[..., 0]) / Ub[:, i, i][:, None]
            Wb[:, :, i:] -= e[:, :, None] * Ub[:, i, None, i:]
            Err[:, :, i] = e
        if b < K:
            W[:, :, b:] -= Err @ U[:, a:b, b:]
    return Q


class _Layer:
    """One layer's map, scales and H accumulator."""

    def __init__(self, node, w, wq, source):
        self.node, self.w, self.wq, self.source = node, w, wq, source
        self.map = LinearMap.of(node, w, None, 2)
        _, self.scale, self.zero = weight_arrays(w, wq)
        self.H = None
        self.rows = 0


def optimise(plan: QuantPlan, probe, batches, *, weights=None, log: Callable[[str], None] | None = None,
             seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """GPTQ rounding for the eligible layers of ``plan`` whose input the ``probe`` observes,
    measured on ``batches``; ``weights``: equalised weights (``{node id: {slot: array}}``) or
    None. Returns ``{node id: (levels in the weight's stored dtype and layout, scales, zero points)}``."""
    log = log or (lambda s: None)
    layers: dict[str, _Layer] = {}
    for nid in eligible(plan):
        wq = plan.weights[nid]
        node = probe.layers.get(nid)
        if node is None or float(node.attrs.get("alpha", 1.0)) != 1.0:
            continue
        w = (weights or {}).get(nid, {}).get(1, probe.float_w[nid])
        source = probe.layer_input.get(nid)
        aq = plan.activations.get(wq.input)
        if source is None or w.ndim < 2 or aq is None or not (aq.readers is None or (nid, 0) in aq.readers):
            continue  # (a layer whose input is float is left to nearest rounding)
        lay = _Layer(node, w, wq, source)
        if lay.map is None or not _scale_fits(lay):
            continue
        g, K = lay.map.W.shape[0], lay.map.W.shape[1]
        if g * K * K * 8 > MAX_H_BYTES:
            continue
        layers[nid] = lay
    if not layers:
        return {}
    batches = list(batches)
    per_batch = max(1, ROWS // max(len(batches), 1))
    rng = np.random.default_rng(seed)
    fetch = list(dict.fromkeys([lay.source for lay in layers.values()] + [nid for nid in layers]))
    for _, vals in run_batches(probe.session, fetch, batches, fixed=probe.inputs_for(plan, weights)):
        for nid, lay in layers.items():
            x, y = vals[lay.source], vals[nid]
            idx = lay.map.positions(y, per_batch, rng)
            if idx is None:
                continue
            X = lay.map.x_rows(x, y.shape, idx)
            if X is None:
                continue
            X = np.ascontiguousarray(X.astype(np.float64).transpose(1, 0, 2))  # [g, R, K]
            G = np.swapaxes(X, 1, 2) @ X  # (batched BLAS)
            lay.H = G if lay.H is None else lay.H + G
            lay.rows += len(idx)
    out: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for nid, lay in layers.items():
        if lay.H is None or lay.rows == 0:
            continue
        W = np.swapaxes(lay.map.W, 1, 2)  # [g, out, K]
        g, no, _ = W.shape
        Q = gptq(W, lay.H / lay.rows, _per_output(lay.scale, g, no), _per_output(lay.zero, g, no),
                 *LEVELS[lay.wq.kind])
        levels, _ = lay.map.tensors(np.swapaxes(Q, 1, 2), np.zeros((g, no)), lay.w.astype(np.float64))
        out[nid] = (np.rint(levels).astype(lay.zero.dtype), lay.scale, lay.zero)
    log(f"rounding: GPTQ on {len(out)} layers")
    return out


def _scale_fits(lay: _Layer) -> bool:
    """The weight's scales are per tensor or along the layer's output channels."""
    if np.ndim(lay.scale) == 0 or lay.scale.size == 1:
        return True
    m = lay.map
    return lay.scale.size == m.groups * m.W.shape[2] and weight_axis(lay.node) == lay.wq.axis


def _per_output(values, g: int, no: int) -> np.ndarray:
    s = np.asarray(values, dtype=np.float64)
    if s.size == 1:
        return np.full((g, no), float(s.reshape(-1)[0]))
    return s.reshape(g, no)
