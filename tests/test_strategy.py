"""--goal: edgec chooses pruning and precision for the target within the budget, and says why."""

from __future__ import annotations

import pytest

import edgec
from edgec.errors import UserError

from conftest import EXAMPLE


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
    # the chosen ratio is the most aggressive one that fits: the one tried just before it did not fit
    chosen_index = [t["settings"] for t in st["tried"]].index(st["chosen"])
    assert all(not t["ok"] for t in st["tried"][:chosen_index])
    assert r["after"]["macs"] < r["before"]["macs"] and out.exists()
    assert any("int8 units" in why for why in st["reasons"])


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
