"""--goal: edgec chooses pruning and precision for the target within the budget, and says why."""

from __future__ import annotations

import pytest

import edgec
from edgec.errors import UserError

from conftest import EXAMPLE
from test_quantization import _collapsing_model


def test_latency_goal_meets_the_error_budget_on_real_data(tmp_path):
    out = tmp_path / "g.onnx"
    r = edgec.compile(EXAMPLE / "model.onnx", out, goal="latency", max_error=0.3, calib=EXAMPLE / "calib.npz",
                      eval_data=EXAMPLE / "eval.npz", round_to=4).report
    st = r["strategy"]
    print(f"\ngoal latency, max_error 0.3: chose {st['chosen']}, accuracy {r['accuracy']['after']:.4f}, "
          f"rel L2 {r['verify']['rel_l2']:.3f}")
    assert st["chosen"].get("quantize") == "int8"
    assert r["verify"]["rel_l2"] <= 0.3 and r["verify"]["passed"]
    rejected = [t for t in st["tried"] if not t["ok"]]
    assert all(t["rel_l2"] is None or t["rel_l2"] > 0.3 for t in rejected)
    # int8 alone first, then the ratios bisected: the chosen one fits, every larger one tried did
    # not, the next larger ratio was tried, and at most three of the five were compiled
    from edgec.strategy import RATIOS
    assert st["tried"][0]["settings"] == {"quantize": "int8"} and st["tried"][0]["ok"]
    ratio = st["chosen"]["prune"]
    pruned = {t["settings"]["prune"]: t["ok"] for t in st["tried"] if "prune" in t["settings"]}
    assert pruned[ratio] and not any(ok for r, ok in pruned.items() if r > ratio)
    larger = [r for r in RATIOS if r > ratio]
    assert not larger or min(larger) in pruned
    assert len(pruned) <= 3 and any("bisected" in why for why in st["reasons"])
    assert r["after"]["macs"] < r["before"]["macs"] and out.exists()
    assert any("int8 units" in why for why in st["reasons"])


def test_latency_goal_gives_int8_the_goals_budget():
    """The trials ran int8 with its default fallback budget (0.1), so a goal of 0.01 on this model
    saw all int8 at 0.044, compiled every pruning ratio on top of it and wrote the float model.
    int8's fallback now gets the goal's budget: conv1's outlier scale goes float and the rest
    stays int8, within 0.01 in ONNX Runtime."""
    model = _collapsing_model(outlier=10)  # all int8: relative L2 about 0.04, under int8's default budget 0.1
    plain = edgec.compile(model, None, quantize="int8", calib="random", verify=True).report
    assert 0.01 < plain["verify"]["rel_l2"] < 0.1 and not plain["quantization"].get("fallback")
    r = edgec.compile(model, None, goal="latency", max_error=0.01, calib="random").report
    assert r["strategy"]["chosen"] == {"quantize": "int8"}
    assert r["verify"]["rel_l2"] <= 0.01 and r["verify"]["passed"]
    fb = r["quantization"]["fallback"]
    assert fb["met"] and {f["node"] for f in fb["float"]} == {"conv1", "relu1", "conv2"}
    # nothing here is prunable at the 8-channel multiple: no ratio is named as if it pruned
    assert any("removes nothing" in why for why in r["strategy"]["reasons"])


def test_latency_goal_prunes_nothing_on_top_of_an_int8_that_misses():
    """int8 alone above the budget (even after its fallback): pruning only adds error, so no
    pruned candidate is compiled (there were five), and the exact rewrites are written."""
    r = edgec.compile(EXAMPLE / "model.onnx", None, goal="latency", max_error=0.001, calib=EXAMPLE / "calib.npz",
                      eval_data=EXAMPLE / "eval.npz").report
    st = r["strategy"]
    assert [t["settings"] for t in st["tried"]] == [{"quantize": "int8"}, {}]
    assert st["tried"][0]["rel_l2"] > 0.001 and st["chosen"] == {}
    assert any("no pruning compiled" in why for why in st["reasons"])


def test_accuracy_goal_is_exact():
    r = edgec.compile(EXAMPLE / "model.onnx", goal="accuracy", target="jetson", calib=EXAMPLE / "calib.npz").report
    assert r["strategy"]["chosen"] == {} and "quantization" not in r and "pruning" not in r
    assert r["verify"]["allclose"]
    assert "FP16" in r["strategy"]["reasons"][0]


def test_goal_without_calibration_data_stays_exact():
    r = edgec.compile(EXAMPLE / "model.onnx", goal="size").report
    assert r["strategy"]["chosen"] == {} and "no --calib" in r["strategy"]["reasons"][0]


def test_goal_refuses_explicit_choices():
    with pytest.raises(UserError, match="drop --prune"):
        edgec.compile(EXAMPLE / "model.onnx", goal="latency", prune=0.3, calib=EXAMPLE / "calib.npz")


def test_goal_refuses_a_bad_output_path_before_compiling(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        edgec.compile(EXAMPLE / "model.onnx", tmp_path / "missing" / "o.onnx", goal="latency", max_error=0.3,
                      calib=EXAMPLE / "calib.npz")


# ---------------------------------------------------------------------- CompileOptions
def test_compile_keywords_and_compile_options_agree():
    """Every option keyword of edgec.compile is a CompileOptions field, with the same default."""
    import inspect

    from edgec.options import KEYWORDS, CompileOptions

    params = inspect.signature(edgec.compile).parameters
    assert {k: params[k].default for k in KEYWORDS} == CompileOptions().as_kwargs()
    # executor and ray_address say where the work runs, not what it computes (the bytes are the same)
    assert set(params) - set(KEYWORDS) == {"model", "output", "log", "report_file", "options", "_outputs",
                                           "executor", "ray_address"}
    o = CompileOptions.from_kwargs(prune=0.3, keep_float="a,b", quantize="int8", max_error=0.1)
    assert o.prune.ratio == 0.3 and o.quant.keep_float == ("a", "b") and o.verify.max_error == 0.1
    assert CompileOptions.from_kwargs(**o.as_kwargs()) == o


def test_compile_takes_options_or_keywords_not_both():
    from dataclasses import replace

    from edgec.options import CompileOptions

    calib = EXAMPLE / "calib.npz"
    by_keywords = edgec.compile(EXAMPLE / "model.onnx", prune=0.3, calib=calib, verify=True).report
    base = CompileOptions(calib=calib)
    options = replace(base, prune=replace(base.prune, ratio=0.3), verify=replace(base.verify, verify=True))
    by_options = edgec.compile(EXAMPLE / "model.onnx", options=options).report
    for rep in (by_keywords, by_options):  # (auto's choice times itself)
        rep["pruning"]["choice"].pop("seconds")
    assert by_options["after"] == by_keywords["after"] and by_options["pruning"] == by_keywords["pruning"]
    with pytest.raises(UserError, match="not both"):
        edgec.compile(EXAMPLE / "model.onnx", options=options, prune=0.2)
    with pytest.raises(UserError, match="--prune-macs"):  # options are checked as keywords are
        edgec.compile(EXAMPLE / "model.onnx", options=replace(options, prune=replace(options.prune, macs=2.0)))


def _stub_goal(table: dict, **budget):
    """strategy.run on a stub compile: ``table`` maps a candidate (its pruning ratio, None for the
    precision alone, "exact") to (relative L2, bytes); a candidate over --max-error raises as a
    compile does. Returns (chosen settings, the strategy section, the candidates compiled)."""
    from types import SimpleNamespace

    from edgec import strategy
    from edgec.errors import VerificationError
    from edgec.options import CompileOptions, QuantOptions, VerifyOptions

    compiled = []

    def compile_fn(opts, output):
        key = "exact" if opts.quant.mode is None else opts.prune.ratio
        if output is None:
            compiled.append(key)
        err, size = table[key]
        if opts.verify.max_error is not None and key != "exact" and err > opts.verify.max_error:
            raise VerificationError(f"error {err} above {opts.verify.max_error}", measured={"rel_l2": err})
        return SimpleNamespace(report={"verify": {"rel_l2": err}, "after": {"bytes": size, "macs": 0},
                                       "pruned": 0 if key in (None, "exact") else 8})

    target = SimpleNamespace(name="cpu", description="cpu", float_precision="fp32", channel_multiple=8)
    opts = CompileOptions(calib="x", goal=budget.pop("goal", "size"),
                          verify=VerifyOptions(max_error=budget.get("max_error")),
                          quant=QuantOptions(max_bytes=budget.get("max_bytes")))
    st = strategy.run(compile_fn, "m.onnx", None, opts, target_profile=target).report["strategy"]
    return st["chosen"], st, compiled


def test_goal_takes_the_most_pruned_candidate_that_fits_both_budgets():
    """Size need not fall with the ratio (mixed keeps wider precisions where pruning left more
    error): 0.4 is the largest ratio within the error budget, but 0.3 does not fit the size
    budget while 0.4 does, and 0.5 misses the error. A review found the bisection then wrote the
    exact model; the most pruned candidate measured that fits both wins."""
    table = {0.5: (0.12, 60), 0.4: (0.08, 70), 0.3: (0.07, 80), 0.2: (0.06, 72), 0.1: (0.05, 78),
             None: (0.04, 90), "exact": (0.0, 400)}
    chosen, st, compiled = _stub_goal(table, max_error=0.1, max_bytes=75)
    assert chosen == {"prune": 0.4, "quantize": "mixed"}, st
    table[0.4], table[0.3] = (0.08, 76), (0.07, 74)  # the largest within the error budget misses the size,
    chosen, st, compiled = _stub_goal(table, max_error=0.1, max_bytes=75)  # a smaller one measured fits
    assert chosen == {"prune": 0.3, "quantize": "mixed"}, st
    assert len({c for c in compiled if c not in (None, "exact")}) <= 3


def test_goal_says_why_no_pruning_was_compiled():
    table = {r: (0.2, 10) for r in (0.5, 0.4, 0.3, 0.2, 0.1)} | {None: (0.2, 50), "exact": (0.0, 400)}
    chosen, st, compiled = _stub_goal(table, goal="latency", max_error=0.1)
    assert chosen == {} and set(compiled) == {None, "exact"}
    assert any("misses the error budget (0.2 > 0.1)" in r for r in st["reasons"]), st["reasons"]


def test_int8_gets_the_error_budget_pruning_left():
    """--prune with --quantize int8 --max-error: int8's fallback measures against the pruned float
    model, so it gets what pruning left of the budget (errors in quadrature), not all of it."""
    from types import SimpleNamespace

    from edgec.api import _quant_budget
    from edgec.options import CompileOptions, VerifyOptions

    def run(max_error, spent):
        return SimpleNamespace(options=CompileOptions(verify=VerifyOptions(max_error=max_error)),
                               prune_error=None if spent is None else {"rel_l2": spent})

    assert _quant_budget(run(0.1, 0.06)) == pytest.approx(0.08)
    assert _quant_budget(run(0.1, None)) == 0.1 and _quant_budget(run(None, 0.06)) is None
    assert _quant_budget(run(0.1, 0.2)) == 0.1  # pruning alone over: nothing to share (the compile fails)
