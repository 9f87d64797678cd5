"""The shipped example (a trained digits CNN and its real held-out data): the README's first
command keeps accuracy, folds every BatchNorm and reports what it did."""

from __future__ import annotations

import json

import numpy as np
import onnx

import edgec

from conftest import EXAMPLE


def test_example_compile_keeps_accuracy(tmp_path):
    meta = json.loads((EXAMPLE / "metadata.json").read_text())
    out = tmp_path / "digits.onnx"
    result = edgec.compile(EXAMPLE / "model.onnx", out, verify=True, eval_data=EXAMPLE / "eval.npz")
    r = result.report
    assert abs(r["accuracy"]["before"] - meta["test_accuracy_onnxruntime"]) < 1e-9
    assert r["accuracy"]["after"] == r["accuracy"]["before"]
    assert "BatchNormalization" not in r["after"]["op_histogram"]
    assert r["before"]["op_histogram"]["BatchNormalization"] == 7
    assert r["after"]["params"] < r["before"]["params"] and r["after"]["macs"] < r["before"]["macs"]
    assert r["verify"]["passed"]
    # the whole held-out set, not random inputs: logits agree
    with np.load(EXAMPLE / "eval.npz") as z:
        x = z["input"]
    from edgec import verify

    ref = verify.run(onnx.load(EXAMPLE / "model.onnx"), {"input": x})["logits"]
    got = verify.run(onnx.load(out), {"input": x})["logits"]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
