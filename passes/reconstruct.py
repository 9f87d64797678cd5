"""reconstruct: least-squares recovery of the layers that read pruned channels.

Design choice: reconstruction is a *function* (:func:`reconstruct`) that ``prune_channels``
calls after every pruning step when calibration data is given (it needs the unpruned model
and the map of which channels survived, which only the pruning knows). A thin pass
(:class:`Reconstruct`) wraps it for pipelines that carry these explicitly: it reads the
unpruned model from ``ctx.reference`` and the calibration batches from ``ctx.feeds()``, and
is told which channels survived (``kept``) when it is built.

For every Conv (group 1, no auto_pad), Gemm (transA=0) and MatMul with a constant 2-D weight
whose input lost channels, in graph order:

* ``X``: its input in the *pruned* model (already-reconstructed layers upstream included), as
  im2col patches for Conv; ``Y``: its output in the *unpruned* model at the same tensor (only
  the surviving output channels), both on the calibration feeds;
* spatial positions are sampled (``max_rows`` rows per layer) to bound memory;
* weights (and bias; a Conv without bias gets one) are solved in closed form from the ridge
  regularised normal equations ``(X'X + lambda I) W = X'Y``, ``lambda = ridge * mean(diag(X'X))``;
* the ridge strength is picked among ``ridge * (1, 10, 100, 1000)`` on a held-out fifth of the
  rows, and the fit (then redone on all rows) is kept only if it beats the current weights on
  those held-out rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from edgec.ir import IR
from edgec.lstsq import ridge_solve, run_tensors, sample_rows
from edgec.pipeline import Pass, PassContext, PassResult, register


@dataclass
class ReconstructionResult:
    """What the ``reconstruct`` pass did (the ``data`` of its PassResult): one dict per layer
    considered (name, op, rows, ridge, held-out errors before/after, whether it was re-fitted)."""

    layers: list[dict] = field(default_factory=list)


def _layers(ir: IR, kept: dict[str, tuple]) -> list[gs.Node]:
    out = []
    for node in ir.nodes:
        if not node.inputs or node.inputs[0].name not in kept:
            continue
        if node.op == "Conv" and int(node.attrs.get("group", 1)) == 1 and \
                node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", b"NOTSET") and ir.const_value(node.inputs[1]) is not None:
            out.append(node)
        elif node.op == "Gemm" and not node.attrs.get("transA", 0) and ir.const_value(node.inputs[1]) is not None:
            out.append(node)
        elif node.op == "MatMul" and ir.const_value(node.inputs[1]) is not None and \
                ir.const_value(node.inputs[1]).ndim == 2 and not ir.is_const(node.inputs[0]):
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


def reconstruct(ir: IR, original: onnx.ModelProto, feeds: list[dict], kept: dict[str, tuple], *,
                ridge: float = 1e-3, max_rows: int = 4096, seed: int = 0) -> list[dict]:
    """Re-fit the consumers of pruned channels in ``ir`` (in place). ``kept`` maps tensor names
    to (axis, surviving positions in the original tensor). Returns one dict per layer."""
    layers = _layers(ir, kept)
    if not layers or not feeds:
        return []
    orig_names = {o for n in original.graph.node for o in n.output}
    layers = [n for n in layers if n.outputs[0].name in orig_names]
    targets = run_tensors(original, [n.outputs[0].name for n in layers], feeds)
    rng = np.random.default_rng(seed)
    report = []
    for node, ys in zip(layers, targets):
        yname = node.outputs[0].name
        w = ir.const_value(node.inputs[1]).astype(np.float64)
        has_b = len(node.inputs) > 2 and ir.const_value(node.inputs[2]) is not None
        b = ir.const_value(node.inputs[2]).astype(np.float64) if has_b else None
        xs = run_tensors(ir.to_onnx(), [node.inputs[0].name], feeds)[0]
        X_rows, Y_rows = [], []
        per_batch = max(1, max_rows // len(xs))
        for x, y in zip(xs, ys):
            if yname in kept:
                axis, pos = kept[yname]
                y = np.take(y, pos, axis=axis)
            rows = sample_rows(node, w, x, y, per_batch, rng)
            if rows is None:
                break
            X_rows.append(rows[0])
            Y_rows.append(rows[1])
        if not X_rows:
            report.append({"layer": node.name, "refit": False, "reason": "unsupported layout"})
            continue
        X = np.concatenate(X_rows).astype(np.float64)
        Y = np.concatenate(Y_rows).astype(np.float64)
        # current weights as a [K, Nout] matrix (+ bias)
        if node.op == "Conv":
            W0 = w.reshape(w.shape[0], -1).T
        elif node.op == "Gemm":
            alpha = float(node.attrs.get("alpha", 1.0))
            beta = float(node.attrs.get("beta", 1.0))
            W0 = alpha * (w.T if node.attrs.get("transB", 0) else w)
            if b is not None:
                b = beta * np.broadcast_to(b.reshape(-1), (W0.shape[1],)) if b.size in (1, W0.shape[1]) else None
                has_b = b is not None
        else:
            W0 = w
        fit_bias = node.op in ("Conv", "Gemm")
        if node.op == "Gemm" and len(node.inputs) > 2 and not has_b:
            fit_bias = False  # a non-constant / full-matrix C: leave it alone
        # choose the ridge strength on held-out rows (guards against too few calibration rows)
        perm = rng.permutation(len(X))
        n_val = max(1, len(X) // 5)
        val, tr = perm[:n_val], perm[n_val:]

        def err(W, bb, rows):
            return float(np.mean((X[rows] @ W + (bb if bb is not None else 0.0) - Y[rows]) ** 2))

        err0 = err(W0, b if has_b else None, val)
        best = None
        for lam in (ridge, ridge * 10, ridge * 100, ridge * 1000):
            sol = ridge_solve(X[tr], Y[tr], lam, fit_bias)
            W1, b1 = (sol[:-1], sol[-1]) if fit_bias else (sol, None)
            e = err(W1, b1, val)
            if best is None or e < best[0]:
                best = (e, lam)
        err1, lam = best
        entry = {"layer": node.name, "op": node.op, "rows": int(X.shape[0]), "ridge": lam,
                 "val_mse_before": err0, "val_mse_after": err1}
        sol = ridge_solve(X, Y, lam, fit_bias)
        W1, b1 = (sol[:-1], sol[-1]) if fit_bias else (sol, None)
        if not err1 < err0:
            entry["refit"] = False
            report.append(entry)
            continue
        dt = ir.const_value(node.inputs[1]).dtype
        if node.op == "Conv":
            _set(ir, node, 1, W1.T.reshape(w.shape).astype(dt))
            _set(ir, node, 2, b1.astype(dt))
        elif node.op == "Gemm":
            node.attrs["alpha"] = 1.0
            node.attrs["beta"] = 1.0
            _set(ir, node, 1, (W1.T if node.attrs.get("transB", 0) else W1).astype(dt))
            if b1 is not None:
                _set(ir, node, 2, b1.astype(dt))
        else:
            _set(ir, node, 1, W1.astype(dt))
        entry["refit"] = True
        report.append(entry)
        ir.changed()
    return report


@register
class Reconstruct(Pass):
    name = "reconstruct"
    description = "least-squares re-fit of the layers reading pruned channels (needs the unpruned model)"
    lossless = False

    def __init__(self, kept: dict[str, tuple] | None = None, ridge: float = 1e-3):
        super().__init__()
        self.kept, self.ridge = kept or {}, ridge

    def run(self, ir: IR, ctx: PassContext) -> PassResult:
        feeds = ctx.feeds()
        if ctx.reference is None or not feeds:
            result = PassResult(False, data=ReconstructionResult())
            result.note("reconstruct: no reference model or calibration data given; nothing done")
            return result
        layers = reconstruct(ir, ctx.reference, feeds, self.kept, ridge=self.ridge)
        return PassResult(any(r.get("refit") for r in layers), data=ReconstructionResult(layers))
