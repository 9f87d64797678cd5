"""sparsify_24: 2:4 structured sparsity for Ampere/Orin sparse tensor cores (TensorRT).

Rules
- Eligible: Conv with group 1 and Gemm/MatMul with a constant weight whose reduction
  dimension (Conv input channels, Gemm/MatMul K) is a multiple of 4 and whose weight is read
  by that layer only. The 2:4 groups run along the reduction dimension: for a Conv weight
  ``[K, C, R, S]`` every ``(k, r, s)`` keeps the 2 largest of each 4 consecutive channels.
- Recovery (with calibration data: ``ctx.feeds()``), layer by layer in graph order: each output row's kept
  weights (and the bias) are re-fitted by ridge least squares so that, on the input the
  already-sparsified layers upstream produce, the layer's output matches what the dense
  layer computed: ``min ||X_S w_S + b - Y_dense||^2`` over the row's surviving positions S.
  Rows are solved one by one (each has its own mask). The ridge strength is chosen on a
  held-out fifth of the rows, and a layer keeps the plain magnitude mask when the fit does not
  beat it there; layers whose reduction size exceeds ``max_fit_dim`` are not re-fitted (both
  said in the result).
- TensorRT decides per layer whether its sparse kernels are faster; the result's ``data`` (a
  :class:`SparsityResult`) lists every layer with its density and the fitted error so the user
  can see what to expect.
Lossy: the output error is measured by ``--verify``/``--max-error``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from edgec.ir import IR
from edgec.lstsq import run_tensors, sample_rows
from edgec.pipeline import Pass, PassContext, PassResult, register


@dataclass
class SparsityResult:
    """What 2:4 sparsity did (the ``data`` of its PassResult): one dict per layer (name, op,
    weights, density, whether it was re-fitted by least squares, and why not)."""

    pattern: str = "2:4"
    layers: list[dict] = field(default_factory=list)


def mask_24(w2: np.ndarray) -> np.ndarray:
    """Boolean mask keeping the 2 largest |w| of every 4 consecutive entries along axis 1."""
    k, d = w2.shape
    groups = np.abs(w2).reshape(k, d // 4, 4)
    order = np.argsort(-groups, axis=2, kind="stable")
    mask = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(mask, order[:, :, :2], True, axis=2)
    return mask.reshape(k, d)


def _as_rows(node: gs.Node, w: np.ndarray) -> np.ndarray:
    """The weight as [outputs, reduction] with the reduction laid out channel-fastest per tap."""
    if node.op == "Conv":
        return w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1)  # [K, R*S*C]: 4-groups along C
    if node.op == "Gemm":
        return w if node.attrs.get("transB", 0) else w.T
    return w.T  # MatMul [K, N] -> [N, K]


def _from_rows(node: gs.Node, rows: np.ndarray, shape) -> np.ndarray:
    if node.op == "Conv":
        k, c, r, s = shape
        return rows.reshape(k, r, s, c).transpose(0, 3, 1, 2)
    if node.op == "Gemm":
        return rows if node.attrs.get("transB", 0) else rows.T
    return rows.T


def _im2col_order(node: gs.Node, w: np.ndarray) -> np.ndarray | None:
    """Permutation from conv_patches' [C, R, S] column order to _as_rows' [R, S, C]."""
    if node.op != "Conv":
        return None
    _, c, r, s = w.shape
    return np.arange(c * r * s).reshape(c, r, s).transpose(1, 2, 0).reshape(-1)


@register
class Sparsify24(Pass):
    name = "sparsify_24"
    description = "2:4 structured sparsity of eligible Conv/Gemm/MatMul weights, re-fitted by least squares"
    lossless = False
    preserves_shapes = True

    def __init__(self, ridge: float = 1e-3, max_rows: int = 4096, max_fit_dim: int = 1024, seed: int = 0):
        super().__init__()
        self.ridge, self.max_rows, self.max_fit_dim, self.seed = ridge, max_rows, max_fit_dim, seed

    def _eligible(self, ir: IR) -> list[gs.Node]:
        out = []
        for node in ir.nodes:
            if node.op not in ("Conv", "Gemm", "MatMul") or not node.outputs or len(node.inputs) < 2:
                continue
            w = ir.const_value(node.inputs[1])
            if w is None or w.dtype.kind != "f" or len(node.inputs[1].outputs) != 1:
                continue
            if node.op == "Conv" and (int(node.attrs.get("group", 1)) != 1 or w.ndim != 4):
                continue
            if node.op == "Gemm" and node.attrs.get("transA", 0):
                continue
            if node.op == "MatMul" and (w.ndim != 2 or ir.is_const(node.inputs[0])):
                continue
            if _as_rows(node, w).shape[1] % 4:
                continue
            out.append(node)
        return out

    def run(self, ir: IR, ctx: PassContext) -> PassResult:
        data = SparsityResult()
        result = PassResult(False, data=data)
        layers = self._eligible(ir)
        if not layers:
            result.note("no layer is eligible for 2:4 sparsity (group-1 Conv/Gemm/MatMul with a multiple of 4 inputs)")
            return result
        feeds = ctx.feeds()
        rng = np.random.default_rng(self.seed)
        targets = None
        if feeds:  # what each layer computed while dense
            targets = run_tensors(ir.to_onnx(), [n.outputs[0].name for n in layers], feeds)
        for i, node in enumerate(layers):
            w = ir.const_value(node.inputs[1])
            rows = _as_rows(node, w.astype(np.float64))
            mask = mask_24(rows)
            new = np.where(mask, rows, 0.0)
            entry = {"layer": node.name, "op": node.op, "weights": int(rows.size), "density": 0.5, "refit": False}
            gemm_ok = node.op != "Gemm" or len(node.inputs) < 3 or (
                ir.const_value(node.inputs[2]) is not None and ir.const_value(node.inputs[2]).size in (1, rows.shape[0]))
            if targets is not None and rows.shape[1] <= self.max_fit_dim and gemm_ok:
                # sequential: the input as the already-sparsified layers upstream produce it
                xs = run_tensors(ir.to_onnx(), [node.inputs[0].name], feeds)[0]
                new, bias, entry = self._refit(node, w, rows, mask, xs, targets[i], rng, entry)
                if bias is not None:
                    b_const = ir.make_const((node.name or node.outputs[0].name) + "_24b", bias.astype(w.dtype))
                    if node.op == "Gemm":  # the fit absorbed alpha and beta * C
                        node.attrs["alpha"] = 1.0
                        node.attrs["beta"] = 1.0
                    if len(node.inputs) > 2:
                        node.inputs[2] = b_const
                    else:
                        node.inputs.append(b_const)
            elif targets is not None and rows.shape[1] > self.max_fit_dim:
                entry["reason"] = f"reduction size {rows.shape[1]} > {self.max_fit_dim}: magnitude mask only"
            node.inputs[1] = ir.make_const((node.name or node.outputs[0].name) + "_24",
                                           _from_rows(node, new, w.shape).astype(w.dtype))
            data.layers.append(entry)
        fitted = sum(e["refit"] for e in data.layers)
        result.note(f"2:4 sparsity on {len(layers)} layers ({fitted} re-fitted by least squares)")
        result.changed = True
        return result

    def _refit(self, node, w, rows, mask, xs, ys, rng, entry):
        per_batch = max(1, self.max_rows // len(xs))
        X_parts, Y_parts = [], []
        for x, y in zip(xs, ys):
            got = sample_rows(node, w, x, y, per_batch, rng)
            if got is None:
                return np.where(mask, rows, 0.0), None, entry
            X_parts.append(got[0])
            Y_parts.append(got[1])
        X = np.concatenate(X_parts).astype(np.float64)
        Y = np.concatenate(Y_parts).astype(np.float64)
        perm = _im2col_order(node, w)
        if perm is not None:
            X = X[:, perm]
        has_bias = node.op in ("Conv", "Gemm")
        scale = float(node.attrs.get("alpha", 1.0)) if node.op == "Gemm" else 1.0
        magnitude = np.where(mask, rows, 0.0)
        dense_b = Y.mean(axis=0) - scale * (X.mean(axis=0) @ rows.T) if has_bias else np.zeros(Y.shape[1])
        order = rng.permutation(len(X))
        n_val = max(1, len(X) // 5)
        val, train = order[:n_val], order[n_val:]
        norm = float(np.sum(Y[val] ** 2)) or 1.0

        def fit(rows_idx, lam_scale):
            Xs = X[rows_idx]
            Xb = np.concatenate([Xs, np.ones((len(Xs), 1))], axis=1) if has_bias else Xs
            G, B = Xb.T @ Xb, Xb.T @ Y[rows_idx]
            d = X.shape[1]
            lam = lam_scale * float(np.mean(np.diag(G)[:d])) + 1e-12
            w_new, b_new = np.zeros_like(rows), np.zeros(rows.shape[0])
            for k in range(rows.shape[0]):
                keep = np.flatnonzero(mask[k])
                idx = np.concatenate([keep, [d]]) if has_bias else keep
                sub = G[np.ix_(idx, idx)].copy()
                sub[np.arange(len(keep)), np.arange(len(keep))] += lam
                sol = np.linalg.solve(sub, B[idx, k])
                w_new[k, keep] = sol[:len(keep)]
                if has_bias:
                    b_new[k] = sol[-1]
            return w_new, b_new

        def val_error(w_rows, b, alpha):
            pred = alpha * (X[val] @ w_rows.T) + b
            return float(np.sqrt(np.sum((pred - Y[val]) ** 2) / norm))

        err_mag = val_error(magnitude, dense_b, scale)
        best = None
        for lam_scale in (self.ridge, self.ridge * 10, self.ridge * 100, self.ridge * 1000):
            w_new, b_new = fit(train, lam_scale)
            e = val_error(w_new, b_new, 1.0)
            if best is None or e < best[0]:
                best = (e, lam_scale)
        entry.update(rows=int(len(X)), rel_error_magnitude=err_mag, rel_error_refit=best[0], ridge=best[1])
        if not best[0] < err_mag:  # the fit does not generalise: keep the plain magnitude mask
            return magnitude, None, entry
        new, bias = fit(np.arange(len(X)), best[1])
        entry["refit"] = True
        if not has_bias:
            bias = None
        return new, bias, entry  # Gemm: new rows already include alpha (set to 1 by the caller)
