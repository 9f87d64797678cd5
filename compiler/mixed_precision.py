"""Mixed precision: measure each layer's sensitivity, then choose FP32 / INT8 / INT4 per layer.

Error metric (everywhere in edgec's quantization): the relative L2 error of the graph outputs
against the FP32 model over the evaluation samples,
``rel_l2 = ||y - y_fp32|| / ||y_fp32||`` (worst output), reported with SQNR = -20 log10(rel_l2) dB.
``max_error=0.01`` thus means "outputs within 1% RMS of FP32" (~40 dB).

Algorithm (:func:`choose_plan`)
1. Sensitivity: each weighted layer (Conv, ConvTranspose, Gemm, constant-weight MatMul) is
   quantized *alone* (its weights at int8, then int4, its activations uint8/int8) and the
   output error measured on up to ``eval_samples`` calibration samples.
2. The first and last weighted layers stay FP32 by default (``keep_ends``): they hold little of
   the size and much of the error.
3. Greedy search for the smallest weights within ``max_error``: start with every other layer
   INT8; while the error is over the budget, move the most sensitive quantized layer back to
   FP32; then, least INT4-sensitive first (per byte saved), move INT8 layers to INT4 when the
   error stays within the budget. Every step is measured on the whole model, not predicted.
   With ``max_bytes`` (a weight-size budget) instead: INT8 everywhere, then INT4 by least
   sensitivity until the weights fit (the ends too if they must), smallest error first.
FP16 per layer is not part of the search (ONNX Runtime CPU would run each FP16 island between
Casts); ``--quantize fp16`` converts the whole model.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from . import executor
from .errors import UserError
from .ir import IR
from .quant_plan import build_plan, kept_float, node_key, weighted_nodes
from .quant_probe import Probe
from .quant_rules import table_for
from .runtime import error_metrics, join_batches, reference_session

BYTES_PER_PARAM = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}
DEFAULT_MAX_ERROR = 0.02


def weights_bytes(sizes: dict[str, int], plan: dict[str, str]) -> int:
    return int(sum(sizes[k] * BYTES_PER_PARAM[plan.get(k, "int8")] for k in sizes))


class _Evaluator:
    """The output error of a precision plan, measured on the probe (no IR copies)."""

    def __init__(self, ir: IR, probe: Probe, scheme, ranges, batches, reference, keep_float, weights):
        self.ir, self.probe, self.scheme, self.ranges = ir, probe, scheme, ranges
        self.batches, self.keep_float, self.weights = batches, keep_float, weights
        self.ref = reference
        self.count = 0

    def error(self, precisions: dict[str, str]) -> float:
        self.count += 1
        plan = build_plan(self.ir, self.scheme, self.ranges, precisions=precisions, keep_float=self.keep_float)
        return self.probe.error(plan, self.batches, self.ref, weights=self.weights)["rel_l2"]

    def errors(self, plans: list[dict[str, str]]) -> list[float]:
        """The errors of independent plans: one after the other here, or at once as tasks when
        the executor in force distributes work (:mod:`edgec.executor`). A task runs the probe
        model (sent once) with the plan's inputs over the same batches, in the same reference
        arithmetic, so each error is the same number either way."""
        ex = executor.current()
        if not ex.distributed or len(plans) < 2:
            return [self.error(p) for p in plans]
        self.count += len(plans)
        feeds = [self.probe.inputs_for(build_plan(self.ir, self.scheme, self.ranges, precisions=p,
                                                  keep_float=self.keep_float), self.weights) for p in plans]
        base = feeds[0]
        shared = {"model": self.probe.model.SerializeToString(), "names": list(self.probe.graph_outputs),
                  "batches": list(self.batches), "reference": self.ref, "base": base}
        deltas = [{k: v for k, v in f.items() if not _same(v, base.get(k))} for f in feeds]
        return list(ex.map(plan_error, deltas, shared=shared))


def _same(a, b) -> bool:
    if a is b:
        return True
    if b is None:
        return False
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b))


def plan_error(delta: dict, shared) -> float:
    """One plan's output error (a task of :meth:`_Evaluator.errors`): the probe model run with
    the shared inputs updated by ``delta`` on every batch, against the float reference."""
    spec, token = executor.shared_value(shared), executor.shared_token(shared)
    sess = (executor.cached(token, "probe", lambda: reference_session(spec["model"])) if token
            else reference_session(spec["model"]))
    fixed = {**spec["base"], **delta}
    names = spec["names"]
    parts: dict[str, list] = {n: [] for n in names}
    for b in spec["batches"]:
        for n, v in zip(names, sess.run(names, {**b, **fixed})):
            parts[n].append(v)
    return error_metrics(spec["reference"], join_batches(parts))["rel_l2"]


def choose_plan(ir: IR, probe: Probe, scheme, ranges: dict, batches: Iterable[dict], reference: dict, *,
                max_error: float | None = None, max_bytes: int | None = None, keep_float: Iterable[str] = (),
                keep_ends: bool = True, weights=None, log: Callable[[str], None] | None = None
                ) -> tuple[dict[str, str], list[dict], dict]:
    """Return ``(precisions, sensitivity table, search summary)``; see the module doc. Plans are
    measured on ``probe`` (with equalised ``weights`` when given) over ``batches``, against the
    float model's outputs on them (``reference``)."""
    log = log or (lambda s: None)
    if max_error is not None and not max_error > 0:
        raise UserError(f"--max-error must be positive, got {max_error}")
    if max_bytes is not None and max_bytes <= 0:
        raise UserError(f"the size budget must be positive, got {max_bytes}")
    if max_error is None and max_bytes is None:
        max_error = DEFAULT_MAX_ERROR
    keep = set(keep_float or ())
    ir.toposort()
    layers = [n for n in weighted_nodes(ir, table_for(scheme)) if n.inputs[0].name in ranges and not kept_float(n, keep)]
    if not layers:
        raise UserError("mixed precision: the model has no layer that can be quantized")
    keys = [node_key(n) for n in layers]
    sizes = {node_key(n): int(ir.const_value(n.inputs[1]).size) for n in layers}
    ops = {node_key(n): n.op for n in layers}
    ev = _Evaluator(ir, probe, scheme, ranges, batches, reference, tuple(keep), weights)
    everything_fp32 = {k: "fp32" for k in keys}
    # 1. sensitivity, one layer at a time
    sens: dict[str, dict[str, float]] = {k: {} for k in keys}
    runs = [(k, p) for k in keys for p in ("int8", "int4")]
    for (k, p), e in zip(runs, ev.errors([{**everything_fp32, k: p} for k, p in runs])):
        sens[k][p] = e
    for k in keys:
        log(f"sensitivity {k}: int8 {sens[k]['int8']:.4g}, int4 {sens[k]['int4']:.4g}")

    ends = {keys[0], keys[-1]} if keep_ends and len(keys) > 2 else set()
    plan = {k: ("fp32" if k in ends else "int8") for k in keys}
    err = ev.error(plan)
    if max_bytes is None:
        # 2. meet the error budget: most sensitive quantized layers back to fp32
        while err > max_error:
            quantized = [k for k in keys if plan[k] != "fp32"]
            if not quantized:
                break
            worst = max(quantized, key=lambda k: sens[k][plan[k]])
            plan[worst] = "fp32"
            err = ev.error(plan)
        # 3. shrink: int8 -> int4 by least sensitivity per byte saved
        for k in sorted([k for k in keys if plan[k] == "int8"],
                        key=lambda k: sens[k]["int4"] / max(sizes[k], 1)):
            trial = {**plan, k: "int4"}
            e = ev.error(trial)
            if e <= max_error:
                plan, err = trial, e
    else:
        if weights_bytes(sizes, plan) > max_bytes:
            plan = {k: "int8" for k in keys}
        order = sorted(keys, key=lambda k: sens[k]["int4"] / max(sizes[k], 1))
        for k in order:
            if weights_bytes(sizes, plan) <= max_bytes:
                break
            plan[k] = "int4"
        err = ev.error(plan)
        if max_error is not None and err > max_error:
            log(f"mixed precision: the size budget forces an error of {err:.4g} > max_error {max_error}")
    table = []
    for k in keys:
        row = {"layer": k, "op": ops[k], "params": sizes[k], "precision": plan[k]}
        for p in ("int8", "int4"):
            row[f"{p}_rel_l2"] = round(sens[k][p], 6)
            row[f"{p}_sqnr_db"] = round(float(-20 * np.log10(sens[k][p])) if sens[k][p] > 0 else float("inf"), 2)
        table.append(row)
    summary = {"max_error": max_error, "max_bytes": max_bytes, "error_rel_l2": err,
               "within_budget": (max_error is None or err <= max_error)
               and (max_bytes is None or weights_bytes(sizes, plan) <= max_bytes),
               "weights_bytes": weights_bytes(sizes, plan), "fp32_weights_bytes": weights_bytes(sizes, everything_fp32),
               "evaluations": ev.count, "eval_samples": _n(batches),
               "counts": {p: sum(1 for v in plan.values() if v == p) for p in ("fp32", "int8", "int4")}}
    if not summary["within_budget"]:
        summary["warning"] = "no plan meets the budget; the closest one found is used"
    return plan, table, summary


def _n(batches) -> int | None:
    return getattr(batches, "num_samples", None)
