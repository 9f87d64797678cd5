"""``--goal``: choose pruning and precision for a target, within an error or size budget.

What each goal means on a profile:

* ``accuracy``: only exact rewrites. Float layers run in the device's float precision (FP16
  on Jetson and Rockchip NPUs, where the toolchain converts; FP32 on CPUs).
* ``latency``: the device computes channels in parallel (vector lanes, tensor cores, NPU
  MACs), so structured channel pruning, rounded to its channel multiple, cuts real time;
  every target here has int8 units (VNNI/dot-product CPUs, tensor cores, the NPU), so INT8,
  with the int8 fallback's float steps only (no 16-bit activations: float speed).
  The pruning ratio is the largest of ``RATIOS`` that keeps the output error within
  ``max_error``; without a budget nothing is pruned (pruning blind is a guess).
* ``size``: the smallest weights: INT8 (``mixed`` down to INT4 where the budget allows)
  and pruning within the budget.

The precision alone is compiled first; when it meets the error budget, the pruning ratios
are bisected for the largest that does (with the precision on top), else nothing is pruned;
the last resort is exact rewrites. The report's ``strategy`` section lists what was tried, the
measured error and size of each, and why the winner was chosen.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from .errors import EdgecError, UserError
from .loader import check_output_path
from .options import CompileOptions, PruneOptions, QuantOptions

GOALS = ("latency", "size", "accuracy")
RATIOS = (0.5, 0.4, 0.3, 0.2, 0.1)


@dataclass(frozen=True)
class Candidate:
    """One setting to try: the pruning and quantization option groups of a compile."""

    prune: PruneOptions
    quant: QuantOptions

    @property
    def settings(self) -> dict:
        """As the report lists it: ``{"prune": ratio, "quantize": mode}``, what is on."""
        return {**({"prune": self.prune.ratio} if self.prune.ratio is not None else {}),
                **({"quantize": self.quant.mode} if self.quant.mode is not None else {})}

    def options(self, base: CompileOptions, *, max_error: float | None) -> CompileOptions:
        """``base`` with this candidate's pruning and precision, verified, within ``max_error``."""
        return replace(base, goal=None, prune=self.prune, quant=self.quant,
                       verify=replace(base.verify, verify=True, max_error=max_error))


def candidates(target, goal: str, base: CompileOptions) -> tuple[list[Candidate], list[str]]:
    """Compile settings to try, most aggressive first, and the reasons behind them. ``base``
    gives the rest of the pruning and quantization options (importance, --round-to, the
    calibration method, ...) and the budgets (``verify.max_error``, ``quant.max_bytes``)."""
    max_error, max_bytes, round_to = base.verify.max_error, base.quant.max_bytes, base.prune.round_to

    def candidate(ratio: float | None = None, quantize: str | None = None) -> Candidate:
        # max_bytes is the budget the winner is measured against, not the mixed search's limit;
        # latency: no 16-bit activations (the ops around one run at float speed on ONNX Runtime)
        return Candidate(replace(base.prune, ratio=ratio, macs=None),
                         replace(base.quant, mode=quantize, max_bytes=None,
                                 sixteen_bit=base.quant.sixteen_bit and goal != "latency"))

    reasons = []
    if goal == "accuracy":
        reasons.append(f"accuracy: exact rewrites only; float layers run in {target.float_precision.upper()} "
                       f"on {target.description}")
        return [candidate()], reasons
    if base.calib is None:
        reasons.append(f"{goal}: no --calib data, so no int8 and no pruning (both learn from data); exact rewrites only")
        return [candidate()], reasons
    quant = "mixed" if goal == "size" and target.name != "jetson" else "int8"
    reasons.append(f"{goal}: {target.description} has int8 units: --quantize {quant}"
                   + (" (per-layer FP32/FP16/INT8/INT4 by measured sensitivity)" if quant == "mixed" else ""))
    ratios: tuple = ()
    if max_error is not None or max_bytes is not None:
        ratios = RATIOS
        multiple = round_to or target.channel_multiple
        why = "the device computes that many in parallel" if not round_to else "--round-to"
        reasons.append(f"{goal}: structured channel pruning rounded to {multiple} channels ({why}), "
                       f"the largest ratio within the budget")
    else:
        reasons.append(f"{goal}: no --max-error/--max-bytes budget, so no pruning (pruning blind is a guess)")
    # last resort: exact rewrites only, when int8 cannot meet the budget
    return [candidate(r, quant) for r in ratios] + [candidate(quantize=quant), candidate()], reasons


def pruned_channels(report: dict) -> int:
    """Channels a compile's pruning removed (0 without pruning); a trial's reduced report has it."""
    if "pruned" in report:
        return report["pruned"]
    return sum(g.get("removed", 0) for g in (report.get("pruning") or {}).get("groups", []))


def _fits(report: dict, max_error, max_bytes) -> tuple[bool, str]:
    err = report.get("verify", {}).get("rel_l2")
    size = report["after"]["bytes"]
    if max_error is not None and (err is None or err > max_error):
        return False, f"error {err:.4g} > {max_error}"
    if max_bytes is not None and size > max_bytes:
        return False, f"{size} bytes > {max_bytes}"
    return True, "within budget"


def run(compile_fn: Callable, model, output, options: CompileOptions, *, target_profile, log=None,
        trials: Callable | None = None):
    """Compile the candidates for ``options.goal`` (``compile_fn(options, output)``, output None
    for a trial) and the winner again with ``output``; its report gets a ``strategy`` section.

    A trial runs with the error budget, so int8's fallback keeps ops float until it is met (its
    default budget is looser than a goal's usually is). The precision alone is tried first: when
    it misses the error budget, pruning on top of it only adds error, so no pruning is compiled.
    Otherwise the pruning ratios are bisected for the largest within the budget (the error grows
    with the ratio, the size falls): at most three pruned compiles of five. Where that one misses
    the size budget, the most pruned candidate measured that fits both wins; one that pruned no
    channel is not named.

    ``trials(list of options)`` (optional) compiles every trial at once (on an executor's
    workers) and returns, in order, each one's report (``verify`` and ``after`` at least) or the
    EdgecError it raised, or None to compile them here one by one. The winner is the same
    either way: the search reads the same outcomes in the same order."""
    goal = options.goal
    if goal not in GOALS:
        raise UserError(f"--goal {goal}: choose one of {', '.join(GOALS)}")
    for key, given in (("prune", options.prune.ratio), ("prune-macs", options.prune.macs),
                       ("quantize", options.quant.mode)):
        if given is not None:
            raise UserError(f"--goal chooses pruning and precision itself: drop --{key}")
    log = log or (lambda s: None)
    if output is not None:  # refuse a bad output path before compiling any candidate
        check_output_path(output, model if not hasattr(model, "graph") else None)
    max_error, max_bytes = options.verify.max_error, options.quant.max_bytes
    tries, reasons = candidates(target_profile, goal, options)
    trial_options = [cand.options(options, max_error=max_error) for cand in tries]
    outcomes = trials(trial_options) if trials is not None and len(tries) > 1 else None
    tried: list[dict] = []
    seen: dict[int, dict] = {}

    def measure(i: int) -> dict:
        """Candidate ``i``'s entry in ``tried`` (compiled on first use): ``ok``, and ``error_ok``
        (it compiled and its error is within the budget, whatever its size)."""
        if i in seen:
            return seen[i]
        cand = tries[i]
        label = ", ".join(f"{k}={v}" for k, v in cand.settings.items()) or "exact rewrites only"
        log(f"goal {goal}: trying {label}")
        try:
            if outcomes is None:
                report = compile_fn(trial_options[i], None).report
            elif isinstance(outcomes[i], BaseException):
                raise outcomes[i]
            else:
                report = outcomes[i]
        except EdgecError as e:
            measured = getattr(e, "measured", None) or {}
            entry = {"settings": cand.settings, "ok": False, "why": str(e), "rel_l2": measured.get("rel_l2"),
                     "error_ok": False}
        else:
            ok, why = _fits(report, max_error, max_bytes)
            err = report.get("verify", {}).get("rel_l2")
            entry = {"settings": cand.settings, "ok": ok, "why": why, "rel_l2": err,
                     "bytes": report["after"]["bytes"], "macs": report["after"]["macs"],
                     "pruned": pruned_channels(report),
                     "error_ok": max_error is None or (err is not None and err <= max_error)}
        tried.append(entry)
        seen[i] = entry
        return entry

    pruned = [i for i, c in enumerate(tries) if c.prune.ratio is not None]
    alone = len(pruned)  # the precision without pruning, then exact rewrites last
    winner = None
    if pruned:
        first = measure(alone)
        if not first["error_ok"]:
            err = first.get("rel_l2")
            what = (f"misses the error budget ({err:.4g} > {max_error})" if err is not None and max_error is not None
                    and err > max_error else f"failed ({first['why'][:160]})")
            reasons.append(f"{goal}: {tries[alone].settings.get('quantize', 'the precision')} alone {what}, and "
                           f"pruning on top of it only adds error: no pruning compiled")
        else:
            by_ratio = sorted(pruned, key=lambda i: tries[i].prune.ratio)
            lo, hi = -1, len(by_ratio)  # by_ratio[lo] within the error budget (-1: the precision alone)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if measure(by_ratio[mid])["error_ok"]:
                    lo = mid
                else:
                    hi = mid
            best = by_ratio[lo] if lo >= 0 else alone
            reasons.append(f"{goal}: pruning ratios bisected (the error grows with the ratio): "
                           f"{sum(i in seen for i in pruned)} of {len(pruned)} compiled")
            if best != alone and not measure(best).get("pruned"):
                reasons.append(f"{goal}: pruning at {tries[best].prune.ratio} removes nothing here (channel counts "
                               f"rounded to the multiple), so none is applied")
                best = alone
            # the most pruned candidate measured that fits both budgets (the largest within the error
            # budget may miss the size one where size does not fall with the ratio)
            fitting = [i for i in by_ratio[:lo + 1] if i in seen and seen[i]["ok"] and seen[i].get("pruned")]
            if measure(best)["ok"]:
                winner = best
            elif fitting:
                winner = fitting[-1]
    for i in ([] if winner is not None else range(alone, len(tries))):
        if measure(i)["ok"] or i == len(tries) - 1:
            winner = i
            break
    cand, ok = tries[winner], seen[winner]["ok"]
    if not ok:
        reasons.append(f"no candidate met the budget; the last one (exact rewrites) is used: {seen[winner]['why']}")
    # compile the winner again, writing the output (and failing on the budget if it still misses)
    final = compile_fn(cand.options(options, max_error=max_error if ok else None), output)
    final.report["strategy"] = {"goal": goal, "max_error": max_error, "max_bytes": max_bytes,
                                "chosen": cand.settings, "reasons": reasons,
                                "tried": [{k: v for k, v in t.items() if k != "error_ok"} for t in tried]}
    return final
