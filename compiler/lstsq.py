"""Least-squares building blocks for data-driven weight recovery (pruning reconstruction,
2:4 sparsity): collect layer inputs/outputs on calibration feeds (in reference arithmetic,
:mod:`edgec.runtime`), sample im2col rows, and solve ridge-regularised normal equations in
closed form.

* :func:`run_tensors`, :func:`sample_rows`, :func:`ridge_solve`: one layer at a time, rows kept
  in memory (2:4 sparsity).
* :class:`LinearMap`: a Conv (any ``group``: one map per group, depthwise included), Gemm or
  MatMul as grouped linear maps over rows; :class:`NormalEquations`: streaming sums (float64)
  for its ridge fit (training rows are never kept; the held-out fifth is, for its errors);
  :class:`StagedRun`: a model run part by part over all calibration batches, each part once,
  with the live tensors kept in between, so that layers can be re-fitted between the parts
  (pruning reconstruction).
"""

from __future__ import annotations

import functools
import operator
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper

from . import runtime
from .ir import node_reads


# a layer with more inputs per output than this is not re-fitted: its normal equations are a
# K x K float64 system (8,192: 0.5 GB); VGG-19's first fully connected layer reads 25,088
# inputs, about 17,600 after 30% pruning (2.5 GB a copy)
MAX_UNKNOWNS = 8192


def bias_add(ir, node: gs.Node) -> tuple[gs.Node, int] | None:
    """The Add that gives a MatMul with constant 2-D weights its bias, as exporters write
    ``Linear``: the MatMul's output's only reader, adding a constant with one value per output
    feature (shape ``[N]`` or ``[1, ..., N]``). (Add node, the constant's input slot) or None."""
    if node.op != "MatMul" or len(node.inputs) != 2 or not node.outputs:
        return None
    out = node.outputs[0]
    if any(o.name == out.name for o in ir.graph.outputs) or len(out.outputs) != 1:
        return None
    add = out.outputs[0]
    if add.op != "Add" or len(add.inputs) != 2:
        return None
    slot = 1 if add.inputs[0].name == out.name else 0
    if add.inputs[1 - slot].name != out.name:
        return None
    w, c = ir.const_value(node.inputs[1]), ir.const_value(add.inputs[slot])
    if w is None or c is None or w.ndim != 2 or c.dtype.kind != "f" or c.size != w.shape[1] or \
            (c.ndim and c.shape[-1] != w.shape[1]):
        return None
    return add, slot


def run_tensors(model: onnx.ModelProto, names: list[str], feeds: list[dict]) -> list[list[np.ndarray]]:
    """Values of the tensors ``names`` for each feed batch, in reference arithmetic
    (:func:`edgec.runtime.capture`)."""
    res: list[list[np.ndarray]] = [[] for _ in names]

    def on_batch(values: dict) -> None:
        for i, n in enumerate(names):
            res[i].append(np.asarray(values[n]))

    runtime.capture(model, names, feeds, on_batch)
    return res


def conv_geometry(node: gs.Node, w: np.ndarray):
    k = w.shape[2:]
    nd = len(k)
    strides = list(node.attrs.get("strides", [1] * nd))
    dil = list(node.attrs.get("dilations", [1] * nd))
    pads = list(node.attrs.get("pads", [0] * (2 * nd)))
    return k, strides, dil, pads


def conv_patches(x: np.ndarray, node: gs.Node, w: np.ndarray, rows: tuple) -> np.ndarray:
    """im2col patches [R, C*prod(k)] of ``x`` at output positions ``rows`` = (n, oy, ox)."""
    return patches(x, node, tuple(w.shape[2:]), rows)


def patches(x: np.ndarray, node: gs.Node, kernel: tuple, rows: tuple) -> np.ndarray:
    """im2col patches [R, C*prod(kernel)] (channel-major, as a Conv weight [Cout, C, kh, kw]
    flattens) of ``x`` at output positions ``rows`` = (n, oy, ox)."""
    nd = len(kernel)
    k = kernel
    s = list(node.attrs.get("strides", [1] * nd))
    d = list(node.attrs.get("dilations", [1] * nd))
    p = list(node.attrs.get("pads", [0] * (2 * nd)))
    if len(k) != 2:
        raise NotImplementedError("only 2-D convolutions")
    xp = np.pad(x, ((0, 0), (0, 0), (p[0], p[2]), (p[1], p[3]))) if any(p) else x
    n, oy, ox = rows
    nb, c, hp, wp = xp.shape
    ys = oy[:, None] * s[0] + np.arange(k[0])[None, :] * d[0]
    xs = ox[:, None] * s[1] + np.arange(k[1])[None, :] * d[1]
    # one gather per channel along its contiguous (batch, y, x) plane, then to [R, C, kh, kw]:
    # faster than indexing the four axes at once, where each element strides over the channels
    flat = n[:, None, None] * (hp * wp) + ys[:, :, None] * wp + xs[:, None, :]
    planes = xp.reshape(c, hp * wp) if nb == 1 else xp.transpose(1, 0, 2, 3).reshape(c, -1)
    return np.take(planes, flat, axis=1).transpose(1, 0, 2, 3).reshape(len(n), -1)


def sample_rows(node: gs.Node, w: np.ndarray, x: np.ndarray, y: np.ndarray, count: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray] | None:
    """Up to ``count`` (input row, output row) pairs of a Conv (im2col) or Gemm/MatMul layer."""
    if node.op == "Conv":
        if y.ndim != 4:
            return None
        n_, _, h, wd = y.shape
        total = n_ * h * wd
        idx = rng.choice(total, size=min(count, total), replace=False)
        n, rem = np.divmod(idx, h * wd)
        oy, ox = np.divmod(rem, wd)
        return conv_patches(x, node, w, (n, oy, ox)), y[n, :, oy, ox]
    x2 = x.reshape(-1, x.shape[-1])
    y2 = y.reshape(-1, y.shape[-1])
    idx = rng.choice(len(x2), size=min(count, len(x2)), replace=False)
    return x2[idx], y2[idx]


def ridge_solve(X: np.ndarray, Y: np.ndarray, ridge: float, bias: bool) -> np.ndarray:
    """argmin_W ||[X 1] W - Y||^2 + lambda ||W||^2, lambda = ridge * mean(diag(X'X))."""
    X = X.astype(np.float64)
    if bias:
        X = np.concatenate([X, np.ones((X.shape[0], 1))], axis=1)
    G = X.T @ X
    d = G.shape[0] - (1 if bias else 0)
    lam = ridge * float(np.mean(np.diag(G)[:d])) if d else 0.0
    G[np.arange(d), np.arange(d)] += lam + 1e-12
    return np.linalg.solve(G, X.T @ Y.astype(np.float64))


# ====================================================================== layers as grouped linear maps
@dataclass
class LinearMap:
    """A Conv (any ``group``), Gemm (transA=0) or MatMul with a constant 2-D weight, seen as
    ``groups`` independent linear maps over rows: ``y[r, g, :] = x[r, g, :] @ W[g] + b[g]``.

    Rows are output positions: for a Conv (n, oy, ox), whose input row is the im2col patch over
    the group's input channels (a depthwise conv: one map per channel over its kernel taps);
    for Gemm/MatMul every leading index. ``W`` [groups, K, Nout] and ``b`` [groups, Nout] are
    float64, with Gemm's alpha and beta folded in (``b`` is zero for a layer without bias)."""

    node: gs.Node
    W: np.ndarray
    b: np.ndarray
    fit_bias: bool
    kernel: tuple = ()
    # fitted on the positions of the 4-D tensor a global average pool reads (see x_rows), not on
    # the pooled rows: one row per position instead of one per sample
    pooled: bool = False

    @property
    def groups(self) -> int:
        return self.W.shape[0]

    @classmethod
    def of(cls, node: gs.Node, w: np.ndarray, bias: np.ndarray | None, n_inputs: int) -> "LinearMap | None":
        """The map of ``node`` with constant weight ``w`` and ``bias`` (None when it has none or
        it is not constant); ``n_inputs``: the node's input count. None when not representable
        (a Gemm with a non-constant or full-matrix C, a non-2-D conv)."""
        w = np.asarray(w, dtype=np.float64)
        if node.op == "Conv":
            g = int(node.attrs.get("group", 1))
            if w.ndim != 4 or g < 1 or w.shape[0] % g or (n_inputs > 2 and bias is None):
                return None
            no = w.shape[0] // g
            W = w.reshape(g, no, -1).transpose(0, 2, 1)  # [g, Cg*kh*kw, no]
            b = np.zeros((g, no)) if bias is None else np.asarray(bias, np.float64).reshape(g, no)
            return cls(node, W, b, True, tuple(w.shape[2:]))
        if w.ndim != 2:
            return None
        if node.op == "Gemm":
            alpha = float(node.attrs.get("alpha", 1.0))
            beta = float(node.attrs.get("beta", 1.0))
            W = alpha * (w.T if node.attrs.get("transB", 0) else w)
            b = np.zeros(W.shape[1])
            if n_inputs > 2:
                if bias is None or bias.size not in (1, W.shape[1]):
                    return None
                b = beta * np.broadcast_to(np.asarray(bias, np.float64).reshape(-1), (W.shape[1],))
            return cls(node, W[None], b[None].copy(), True)
        return cls(node, w[None], np.zeros((1, w.shape[1])), False)  # MatMul: no bias to fit

    # ------------------------------------------------------------------ rows
    def positions(self, y: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray | None:
        """Up to ``count`` distinct rows (flat indices, random order) of the layer's output ``y``;
        None when ``y`` does not have the layer's layout."""
        nout = self.groups * self.W.shape[2]
        if self.node.op == "Conv":
            if y.ndim != 4 or y.shape[1] != nout:
                return None
            total = y.shape[0] * y.shape[2] * y.shape[3]
        else:
            if y.ndim < 1 or y.shape[-1] != nout:
                return None
            total = int(np.prod(y.shape[:-1]))
        if total == 0:
            return None
        return rng.choice(total, size=count, replace=False) if count < total else rng.permutation(total)

    def y_rows(self, y: np.ndarray, idx: np.ndarray, channels: np.ndarray | None = None) -> np.ndarray:
        """[R, groups, Nout] rows of the output ``y`` at flat positions ``idx``; ``channels``: only
        those channels of ``y`` (on the layer's channel axis) are the layer's outputs."""
        if self.node.op == "Conv":
            if y.shape[0] == 1:  # (a batch of one: two takes, several times faster than the fancy index)
                r = np.take(y.reshape(y.shape[1], -1), idx, axis=1)
                if channels is not None:
                    r = np.take(r, channels, axis=0)
                return np.ascontiguousarray(r.T).reshape(len(idx), self.groups, -1)
            n, rem = np.divmod(idx, y.shape[2] * y.shape[3])
            oy, ox = np.divmod(rem, y.shape[3])
            r = y[n, :, oy, ox]
        else:
            r = y.reshape(-1, y.shape[-1])[idx]
        if channels is not None:
            r = r[:, channels]
        return r.reshape(len(idx), self.groups, -1)

    def x_rows(self, x: np.ndarray, y_shape: tuple, idx: np.ndarray) -> np.ndarray | None:
        """[R, groups, K] input rows (im2col patches for a Conv) giving the output rows ``idx`` of
        an output of shape ``y_shape``; None when ``x`` does not fit the layer. A ``pooled`` map
        reads ``x`` [N, K, H, W], the tensor before the pool, at flat positions ``idx`` over
        (n, y, x) of ``y_shape`` (that tensor's shape)."""
        g, k = self.groups, self.W.shape[1]
        if self.pooled:
            if g != 1 or x.ndim != 4 or x.shape[1] != k or tuple(x.shape[2:]) != tuple(y_shape[2:]):
                return None
            n, rem = np.divmod(idx, x.shape[2] * x.shape[3])
            oy, ox = np.divmod(rem, x.shape[3])
            return x[n, :, oy, ox].reshape(len(idx), 1, k)
        if self.node.op == "Conv":
            if x.ndim != 4 or len(y_shape) != 4 or len(self.kernel) != 2 or x.shape[1] * int(np.prod(self.kernel)) != g * k:
                return None
            n, rem = np.divmod(idx, y_shape[2] * y_shape[3])
            oy, ox = np.divmod(rem, y_shape[3])
            return patches(x, self.node, self.kernel, (n, oy, ox)).reshape(len(idx), g, k)
        if x.ndim < 1 or x.shape[-1] != k or int(np.prod(x.shape[:-1])) != int(np.prod(y_shape[:-1])):
            return None
        return x.reshape(-1, k)[idx].reshape(len(idx), 1, k)

    def samples(self, y_shape: tuple, idx: np.ndarray) -> np.ndarray:
        """The batch index (the leading axis) of each flat output position ``idx`` of an output of
        shape ``y_shape`` (a ``pooled`` map's: the pooled tensor's shape)."""
        if self.node.op == "Conv" or self.pooled:
            per = int(np.prod(y_shape[2:]))
        else:
            per = int(np.prod(y_shape[1:-1])) if len(y_shape) > 1 else 1
        return np.asarray(idx) // max(per, 1)

    # ------------------------------------------------------------------ back to the node
    def tensors(self, W: np.ndarray, b: np.ndarray, like: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(weight, bias) in the node's layout and ``like``'s dtype, for Gemm with alpha = beta = 1;
        bias None for a layer that fits none (MatMul)."""
        if self.node.op == "Conv":
            g, _, no = W.shape
            w = W.transpose(0, 2, 1).reshape((g * no,) + tuple(like.shape[1:]))
        elif self.node.op == "Gemm":
            w = W[0].T if self.node.attrs.get("transB", 0) else W[0]
        else:
            w = W[0]
        return w.astype(like.dtype), (b.reshape(-1).astype(like.dtype) if self.fit_bias else None)


class NormalEquations:
    """Sums for a grouped ridge least-squares fit: per group ``[X 1]'[X 1]`` and ``[X 1]'Y`` over
    the training rows (split 0), and the held-out rows (split 1) themselves, kept (a fifth of the
    rows: computing a held-out error from them costs a fifth of what it costs from their sums).
    Training rows are buffered only up to ``chunk_bytes``, then added to the sums in one matrix
    product (``A'A`` of one buffer: a symmetric rank-k update in BLAS), which runs far faster than
    many small ones; in float64, whose products gave the same bits at every thread count
    tested (float32 products did not: ``tests/test_ray.py``'s --goal test caught it). The error of any weights on either split follows."""

    def __init__(self, groups: int, k: int, nout: int, chunk_bytes: int = 64 << 20):
        self.k = k
        self.G = np.zeros((groups, k + 1, k + 1))
        self.B = np.zeros((groups, k + 1, nout))
        self.yy = 0.0
        self.rows = np.zeros(2, dtype=np.int64)
        self.chunk_rows = max(1, chunk_bytes // (8 * groups * (k + 1 + nout)))
        self._buf: list = []
        self._held: list = []
        self._held_rows: tuple | None = None  # ([groups, R, K+1], [groups, R, Nout]) once joined
        self._held_sums: tuple | None = None  # their G and B, once a solve on all rows asks

    def add(self, X: np.ndarray, Y: np.ndarray, held_out: np.ndarray) -> None:
        """Rows ``X`` [R, groups, K] and ``Y`` [R, groups, Nout]; ``held_out`` marks split-1 rows."""
        held_out = np.asarray(held_out, dtype=bool)
        if held_out.any():
            self._held.append((X, Y) if held_out.all() else (X[held_out], Y[held_out]))
            self._held_rows = self._held_sums = None
        if not held_out.all():
            self._buf.append((X, Y) if not held_out.any() else (X[~held_out], Y[~held_out]))
            if sum(len(x) for x, _ in self._buf) >= self.chunk_rows:
                self._flush()

    @staticmethod
    def _join(buf: list, k: int) -> tuple[np.ndarray, np.ndarray]:
        """[groups, R, K+1] rows with a column of ones (the bias) and [groups, R, Nout], in float64.
        (Not float32: OpenBLAS's sgemm sums in another order with another thread count, so a Ray
        task, one thread, re-fitted other weights than the same compile in process.)"""
        n = sum(len(x) for x, _ in buf)
        g = buf[0][0].shape[1]
        dt = np.float64
        x1 = np.empty((g, n, k + 1), dtype=dt)
        y1 = np.empty((g, n, buf[0][1].shape[2]), dtype=dt)
        lo = 0
        for x, y in buf:
            x1[:, lo:lo + len(x), :k] = x.transpose(1, 0, 2)
            y1[:, lo:lo + len(x)] = y.transpose(1, 0, 2)
            lo += len(x)
        x1[:, :, k] = 1.0
        return x1, y1

    @staticmethod
    def _sums(x1: np.ndarray, y1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(x1) == 1:  # a'a of one buffer: numpy calls BLAS syrk
            return (x1[0].T @ x1[0])[None], (x1[0].T @ y1[0])[None]
        xt = x1.transpose(0, 2, 1)
        return np.matmul(xt, x1), np.matmul(xt, y1)

    def _flush(self) -> None:
        if not self._buf:
            return
        x1, y1 = self._join(self._buf, self.k)
        self._buf.clear()
        G, B = self._sums(x1, y1)
        self.G += G
        self.B += B
        self.yy += float(np.sum(np.square(y1, dtype=np.float64)))
        self.rows[0] += x1.shape[1]

    def _held_out(self) -> tuple[np.ndarray, np.ndarray] | None:
        if self._held_rows is None and self._held:
            self._held_rows = self._join(self._held, self.k)
            self.rows[1] = self._held_rows[0].shape[1]
        return self._held_rows

    def solve(self, ridge: float, bias: bool, train_only: bool,
              prior: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Ridge solution ``W`` [groups, K, Nout], ``b`` [groups, Nout] (zero without ``bias``) on
        the training rows or on all rows; ``lambda = ridge * mean(diag(X'X))`` per group. The
        ridge pulls ``W`` towards ``prior`` [groups, K, Nout] (zero when None)."""
        self._flush()
        G, B = self.G, self.B
        held = None if train_only else self._held_out()
        if held is not None:
            if self._held_sums is None:
                self._held_sums = self._sums(*held)
            G, B = G + self._held_sums[0], B + self._held_sums[1]
        k, d = self.k, self.k + (1 if bias else 0)
        G = G[:, :d, :d].copy()
        lam = ridge * np.mean(np.diagonal(G[:, :k, :k], axis1=1, axis2=2), axis=1) if k else np.zeros(len(G))
        G[:, np.arange(k), np.arange(k)] += (lam + 1e-12)[:, None]
        B = B[:, :d]
        if prior is not None:
            B = B.copy()
            B[:, :k] += (lam + 1e-12)[:, None, None] * prior
        sol = np.linalg.solve(G, B)
        return sol[:, :k], (sol[:, k] if bias else np.zeros((len(G), B.shape[2])))

    def wide(self) -> bool:
        """Whether :meth:`fit` takes the held-out-update path: one group and fewer held-out rows
        than unknowns, where solving for the held-out rows too costs less than the solves it saves."""
        self._flush()
        held = self._held_out()
        return held is not None and self.G.shape[0] == 1 and held[0].shape[1] <= self.k

    def fit(self, ridge: float, steps: tuple, bias: bool,
            prior: np.ndarray | None = None) -> tuple[float, float, int, tuple | None]:
        """:meth:`fit_priors` with one prior (``prior``, or zero when None); returns its first
        four values."""
        return self.fit_priors(ridge, steps, bias, {"prior": prior})[:4]

    def fit_priors(self, ridge: float, steps: tuple, bias: bool,
                   priors: dict[str, np.ndarray | None]) -> tuple[float, float, int, tuple | None, str]:
        """Ridge fit with ``lambda = ridge * step * mean(diag(X'X))`` chosen among ``steps`` on the
        held-out rows, for each of ``priors`` (name -> the weights [groups, K, Nout] the ridge pulls
        towards, zero when None), and the prior whose best step has the lowest held-out error
        (the first one on a tie). Without :meth:`wide`, each prior tries the steps in increasing
        order until its held-out error rises (it is taken as unimodal in lambda); with it, each
        starts at the second step and moves the way the held-out error's slope points, until the
        error rises. The priors share each step's
        factorisation (``A^-1 (B + lambda W0) = A^-1 B + lambda A^-1 W0``), so a second prior
        costs right-hand sides, not factorisations. Returns (held-out MSE of the chosen training
        fit, its ``ridge * step``, factorisations made, a callable giving (W, b) solved on all
        rows or None when there are no held-out rows, the chosen prior's name).

        With :meth:`wide`, each factorisation also solves for the held-out rows ``X_h'`` (``P =
        A^-1 X_h'``), which gives three things without another factorisation: the sign of the
        held-out error's derivative in lambda (``-2 <P R_h, W - W0>``: the next step tried is the
        larger one when it is negative, the smaller one when positive), and the all-rows solution by
        the Woodbury identity: ``(A + X_h'X_h)^-1 (B + X_h'Y_h) = W + P (I + X_h P)^-1 (Y_h - X_h W)``.
        The steps and lambda are those of the training solves (``lambda`` from the training rows'
        Gram matrix), so the same step is chosen; the all-rows fit then keeps that absolute
        lambda, a relative ridge 4/5 of the training one's, where :meth:`solve` on all rows takes
        ``lambda`` from the all-rows Gram matrix. (Taking it from there for the training solves
        too chose another step on one of all-MiniLM-L6-v2's layers, and its retrieval top-1 fell
        from 0.29 to 0.15 at 30%: these fits are that sensitive to the ridge.) Otherwise each step
        is one batched solve on the training rows and the all-rows fit one more (:meth:`solve`)."""
        self._flush()
        held = self._held_out()
        names = list(priors)
        if held is None:
            return float("nan"), ridge * steps[0], 0, None, names[0]
        k, d = self.k, self.k + (1 if bias else 0)
        g, nout = self.G.shape[0], self.B.shape[2]
        pads = {nm: None if p is None else np.concatenate([p, np.zeros((g, d - k, nout))], axis=1)
                for nm, p in priors.items()}
        extra = [nm for nm in names if pads[nm] is not None]
        # per prior, the steps tried: index -> (held-out MSE, ridge * step, W, P, R, slope)
        tried: dict[str, dict[int, tuple]] = {nm: {} for nm in names}
        solves = 0
        wide = self.wide()
        if wide:
            x1, y1 = held
            xh, yh = x1[0, :, :d], y1[0]
        scale = np.mean(np.diagonal(self.G[:, :k, :k], axis1=1, axis2=2), axis=1) if k else np.zeros(g)

        def best_of(nm: str) -> int:
            t = tried[nm]
            return min(t, key=lambda i: (not t[i][0] <= t[i][0], t[i][0], i))

        def wanted(nm: str) -> int | None:
            """The next step this prior needs: without the slope, the next larger one while the
            last one tried is the best; with it, the neighbour of the best one it points to."""
            t = tried[nm]
            if not t:
                return 1 if wide and len(steps) > 1 else 0
            b = best_of(nm)
            if wide:
                sl = t[b][5]
                j = b + 1 if sl < 0 else b - 1 if sl > 0 else None
            else:
                j = b + 1 if b == max(t) else None
            return j if j is not None and 0 <= j < len(steps) and j not in t else None

        while True:
            need = [j for j in map(wanted, names) if j is not None]
            if not need:
                break
            idx = min(need)
            step = steps[idx]
            lam = ridge * step * scale + 1e-12  # [groups], as solve(train_only=True)
            # the ridge goes on G's diagonal in place and the diagonal is put back, bit for bit:
            # solve copies its operands anyway, and a second copy of a 3,000-wide G costs time
            A = self.G[:, :d, :d]
            rhs = [self.B[:, :d]] + [pads[nm] for nm in extra] + ([xh.T[None]] if wide else [])
            rhs = np.concatenate(rhs, axis=2)
            diag = A[:, np.arange(k), np.arange(k)]
            A[:, np.arange(k), np.arange(k)] = diag + lam[:, None]
            try:
                sol = np.linalg.solve(A, rhs)
            finally:
                A[:, np.arange(k), np.arange(k)] = diag
            solves += 1
            base = sol[:, :, :nout]
            P = sol[0, :, nout * (1 + len(extra)):] if wide else None
            for nm in names:
                if idx in tried[nm]:
                    continue
                W = base
                if pads[nm] is not None:
                    j = 1 + extra.index(nm)
                    W = base + lam[:, None, None] * sol[:, :, nout * j:nout * (j + 1)]
                slope, R = None, None
                if wide:
                    R = xh @ W[0] - yh
                    e = float(np.sum(np.square(R))) / R.size
                    W0 = pads[nm][0] if pads[nm] is not None else 0.0
                    slope = -2.0 * float(np.sum((P @ R)[:k] * (W[0] - W0)[:k]))  # d(held-out SSE)/d(lambda)
                    if not np.isfinite(slope):
                        slope = 0.0
                else:
                    e = self.mse(W[:, :k], W[:, k] if bias else np.zeros((g, nout)))
                tried[nm][idx] = (e, ridge * step, W, P, R, slope)
        best = {nm: tried[nm][best_of(nm)][:5] for nm in names}
        chosen = min(names, key=lambda nm: (not best[nm][0] <= best[nm][0], best[nm][0], names.index(nm)))
        e, lam_c, W, P, R = best[chosen]
        if not wide:
            prior = priors[chosen]
            return e, lam_c, solves, lambda: self.solve(lam_c, bias, train_only=False, prior=prior), chosen

        def all_rows():
            S = xh @ P
            S[np.arange(len(S)), np.arange(len(S))] += 1.0
            Wa = W[0] - P @ np.linalg.solve(S, R)
            return Wa[None, :k], (Wa[None, k] if bias else np.zeros((1, nout)))
        return e, lam_c, solves, all_rows, chosen

    def held_out_mean_square(self) -> float:
        """Mean of the squared held-out targets (nan without held-out rows): what a held-out MSE
        is relative to."""
        held = self._held_out()
        return float("nan") if held is None else float(np.mean(np.square(held[1])))

    def mse(self, W: np.ndarray, b: np.ndarray, split: int = 1) -> float:
        """Mean squared error of ``x @ W + b`` against ``y`` over a split's rows (nan when empty)."""
        self._flush()
        W1 = np.concatenate([W, b[:, None, :]], axis=1)
        if split == 0:
            sse = float(np.sum(W1 * np.matmul(self.G, W1)) - 2.0 * np.sum(W1 * self.B) + self.yy)
        else:
            held = self._held_out()
            if held is None:
                return float("nan")
            x1, y1 = held
            r = np.matmul(x1, W1.astype(x1.dtype)) - y1
            sse = float(np.sum(np.square(r, dtype=np.float64)))
        n = int(self.rows[split]) * W.shape[0] * W.shape[2]
        return max(sse, 0.0) / n if n else float("nan")


# ====================================================================== running a model in parts
class StagedRun:
    """A model run in parts over a fixed list of batches, so that chosen nodes (``layers``:
    node name -> the input it is fitted on) can change their constants between the parts.

    :meth:`waves` yields sets of layers whose input is final: it depends on no layer still to be
    re-fitted. Before each yield, one part runs: every node needed by a remaining layer whose
    own layers are all settled (each node runs once, with its layers' new constants), in one
    reference session over all batches (:func:`edgec.runtime.run_batches`). The tensors later
    parts read are kept per batch and dropped once read for the last time. A chain of N layers
    takes N parts; layers in parallel branches share theirs. Nodes no layer input depends on
    never run.
    """

    def __init__(self, model: onnx.ModelProto, feeds: list[dict], layers: dict[str, str],
                 needs: dict[str, list[str]] | None = None):
        """``needs``: per layer, more tensors that must be final (and kept) before it is ready."""
        self.model, self.feeds = model, feeds
        needs = needs or {}
        self.nodes = list(model.graph.node)
        self.inits = {t.name: t for t in model.graph.initializer}
        self.graph_inputs = {v.name for v in model.graph.input} - set(self.inits)
        self.layer_input = dict(layers)
        names = [n.name for n in self.nodes]
        self.index = {nm: i for i, nm in enumerate(names) if nm}
        # only the layers are looked up by name: other nodes may share a name or have none
        counts = Counter(names)
        bad = [nm for nm in layers if counts[nm] != 1]
        if bad:
            raise ValueError(f"StagedRun: each layer needs a unique node name (missing or repeated: {bad[:3]})")
        self.reads = [node_reads(n) for n in self.nodes]
        producer = {o: i for i, n in enumerate(self.nodes) for o in n.output if o}
        bit = {self.index[nm]: 1 << k for k, nm in enumerate(layers)}
        self.layer_bit = {nm: bit[self.index[nm]] for nm in layers}
        # deps[i]: the layers node i's value depends on, itself included (a bit mask)
        self.deps = []
        for i, _ in enumerate(self.nodes):
            d = bit.get(i, 0)
            for r in self.reads[i]:
                if r in producer:
                    d |= self.deps[producer[r]]
            self.deps.append(d)
        self.layer_needs = {nm: [x] + [t for t in needs.get(nm, []) if t != x] for nm, x in layers.items()}
        self.input_deps, self.own_deps = {}, {}
        for nm, xs in self.layer_needs.items():
            d = [self.deps[producer[x]] if x in producer else 0 for x in xs]
            self.own_deps[nm] = d[0]
            self.input_deps[nm] = functools.reduce(operator.or_, d)
        # layers whose extra needs were given up: two layers each needing the other's result
        # (both operands of one Add) cannot both wait; the first in order goes without
        self.dropped: set[str] = set()
        # the nodes some layer input depends on
        needed, stack = set(), [producer[x] for xs in self.layer_needs.values() for x in xs if x in producer]
        while stack:
            i = stack.pop()
            if i not in needed:
                needed.add(i)
                stack.extend(producer[r] for r in self.reads[i] if r in producer)
        self.pending = sorted(needed)
        self.producer = producer
        self.values: dict[str, list] = {}
        self.replaced: dict[int, tuple[onnx.NodeProto, list[onnx.TensorProto]]] = {}
        self.parts = 0

    # ------------------------------------------------------------------ reading values
    def batches(self, name: str) -> list:
        """The values of ``name`` (a graph input or a tensor a run part kept), one per batch."""
        if name in self.values:
            return self.values[name]
        return [f[name] for f in self.feeds]

    def replace(self, layer: str, inputs: dict[int, np.ndarray], attrs: dict | None = None) -> None:
        """New constants for ``layer`` (input slot -> value; a slot equal to the input count
        appends one) and attributes, used when the layer runs in a later part."""
        i = self.index[layer]
        node = onnx.NodeProto()
        node.CopyFrom(self.nodes[i])
        tensors = []
        for slot, value in sorted(inputs.items()):
            name = f"{layer}__staged_{slot}"
            tensors.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
            if slot < len(node.input):
                node.input[slot] = name
            elif slot == len(node.input):
                node.input.append(name)
            else:
                raise ValueError(f"{layer}: input slot {slot} beyond its {len(node.input)} inputs")
        for k, v in (attrs or {}).items():
            for a in list(node.attribute):
                if a.name == k:
                    node.attribute.remove(a)
            node.attribute.append(helper.make_attribute(k, v))
        self.replaced[i] = (node, tensors)

    # ------------------------------------------------------------------ the parts
    def waves(self) -> Iterator[list[str]]:
        settled = 0
        remaining = list(self.layer_input)
        while remaining:
            ready = [nm for nm in remaining if self.input_deps[nm] & ~settled == 0]
            if not ready:  # extra needs waiting on each other: the first such layer goes without
                ready = [nm for nm in remaining if self.own_deps[nm] & ~settled == 0][:1]
                if not ready:  # cannot happen in a DAG; never loop
                    raise RuntimeError("StagedRun: no layer is ready")
                self.dropped.add(ready[0])
                self.input_deps[ready[0]] = self.own_deps[ready[0]]
            part = [i for i in self.pending if self.deps[i] & ~settled == 0]
            taken = set(part)
            self.pending = [i for i in self.pending if i not in taken]
            self._run(part, self._live(remaining))
            yield ready
            for nm in ready:
                settled |= self.layer_bit[nm]
            remaining = [nm for nm in remaining if nm not in ready]
            live = self._live(remaining)
            for name in [n for n in self.values if n not in live]:
                del self.values[name]

    def _live(self, layers: list[str]) -> set[str]:
        """Tensors still to be read: inputs of ``layers`` and of the nodes yet to run."""
        live = {x for nm in layers for x in self.layer_needs[nm]}
        for i in self.pending:
            live |= self.reads[i]
        return live

    def _run(self, part: list[int], live: set[str]) -> None:
        outputs = [o for i in part for o in self.nodes[i].output if o and o in live]
        if not outputs:
            return
        graph = onnx.GraphProto(name=f"{self.model.graph.name}_part{self.parts}")
        defined: set[str] = set()  # produced in the part, or its new constants
        fed: list[str] = []
        for i in part:
            node, tensors = self.replaced.get(i, (self.nodes[i], []))
            graph.initializer.extend(tensors)
            defined.update(t.name for t in tensors)
            for r in sorted(node_reads(node) if i in self.replaced else self.reads[i]):
                if r in defined:
                    continue
                defined.add(r)
                if r in self.inits:
                    graph.initializer.append(self.inits[r])
                else:
                    fed.append(r)
            graph.node.append(node)
            defined.update(o for o in node.output if o)
        cols = [self.batches(r) for r in fed]
        for r, c in zip(fed, cols):
            dtype = helper.np_dtype_to_tensor_dtype(np.asarray(c[0]).dtype)
            graph.input.append(helper.make_tensor_value_info(r, dtype, None))
        graph.output.extend(helper.make_empty_tensor_value_info(o) for o in outputs)
        m = onnx.ModelProto(ir_version=self.model.ir_version, producer_name="edgec-staged")
        m.opset_import.extend(self.model.opset_import)
        m.functions.extend(self.model.functions)
        m.graph.CopyFrom(graph)
        sess = runtime.reference_session(m)
        batches = ({r: c[j] for r, c in zip(fed, cols)} for j in range(len(self.feeds)))
        got: dict[str, list] = {o: [] for o in outputs}
        for _, values in runtime.run_batches(sess, outputs, batches):
            for o in outputs:
                got[o].append(values[o])
        self.values.update(got)
        self.parts += 1
