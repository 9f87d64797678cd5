"""Least-squares building blocks for data-driven weight recovery (pruning reconstruction,
2:4 sparsity): collect layer inputs/outputs on calibration feeds (in reference arithmetic,
:mod:`edgec.runtime`), sample im2col rows, and solve ridge-regularised normal equations in
closed form."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import runtime


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
    k, s, d, p = conv_geometry(node, w)
    if len(k) != 2:
        raise NotImplementedError("only 2-D convolutions")
    xp = np.pad(x, ((0, 0), (0, 0), (p[0], p[2]), (p[1], p[3])))
    n, oy, ox = rows
    ys = oy[:, None] * s[0] + np.arange(k[0])[None, :] * d[0]
    xs = ox[:, None] * s[1] + np.arange(k[1])[None, :] * d[1]
    c = np.arange(x.shape[1])
    patches = xp[n[:, None, None, None], c[None, :, None, None], ys[:, None, :, None], xs[:, None, None, :]]
    return patches.reshape(len(n), -1)


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
