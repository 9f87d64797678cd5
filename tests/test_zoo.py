"""The model-zoo graphs the onnx wheel ships (opset 9, initializers listed as inputs, weights
made by ConstantOfShape): all compile, pass the full checker and match ONNX Runtime, both on
random inputs; outputs keep the shape of the reference output shipped beside them."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import numpy_helper

import edgec

from conftest import LIGHT_MODELS, assert_same_outputs

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("path", LIGHT_MODELS, ids=lambda p: Path(p).stem)
def test_light_model_compiles_and_matches(path, tmp_path):
    out = tmp_path / "out.onnx"
    result = edgec.compile(path, out, verify=True)
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    r = result.report
    assert r["verify"]["passed"]
    assert r["after"]["nodes"] <= r["before"]["nodes"]
    assert r["after"]["macs"] <= r["before"]["macs"]
    assert r["after"]["params"] <= r["before"]["params"]
    # A second input draw, and the output shape of the reference output shipped beside the model.
    ref_pb = Path(path).with_name(Path(path).stem + "_output_0.pb")
    ref = numpy_helper.to_array(onnx.load_tensor(str(ref_pb)))
    got = assert_same_outputs(onnx.load(path), model, seed=1)
    assert next(iter(got.values())).shape == ref.shape


def test_light_resnet50_folds_every_batchnorm():
    path = [p for p in LIGHT_MODELS if "resnet50" in p][0]
    result = edgec.compile(path)
    hist = result.report["after"]["op_histogram"]
    assert "BatchNormalization" not in hist
    assert result.report["before"]["op_histogram"]["BatchNormalization"] == 53
