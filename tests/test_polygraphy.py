"""NVIDIA polygraphy (without TensorRT, in its own virtual environment) accepts the
TensorRT-ready graphs `edgec compile -t jetson` writes: `check lint` passes with no lint
warnings and `inspect model` reads them."""

from __future__ import annotations

import subprocess

import numpy as np
import onnx
import pytest

import edgec
from edgec import builders

import vendor

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def polygraphy():
    return vendor.tool("polygraphy", "polygraphy")


@pytest.mark.parametrize("trt", ["8.5", "10"])
def test_jetson_graphs_pass_polygraphy_lint(polygraphy, tmp_path, trt):
    for name, fn in builders.ALL_MODELS.items():
        out = tmp_path / f"{name}.onnx"
        edgec.compile(fn(), out, target="jetson", target_options={"trt": trt})
        if trt == "8.5":
            assert "LayerNormalization" not in {n.op_type for n in onnx.load(out).graph.node}
        lint = subprocess.run([str(polygraphy), "check", "lint", str(out)], capture_output=True, text=True, timeout=300)
        text = lint.stdout + lint.stderr
        assert lint.returncode == 0 and "PASSED" in text, f"{name}: {text[-2000:]}"
        assert "[W] LINT" not in text and "[E] LINT" not in text, f"{name}: {text[-2000:]}"
        inspect = subprocess.run([str(polygraphy), "inspect", "model", str(out)], capture_output=True, text=True,
                                 timeout=300)
        assert inspect.returncode == 0 and "ONNX Opset" in inspect.stdout, inspect.stderr[-2000:]


def test_jetson_int8_qdq_graphs_pass_polygraphy_lint(polygraphy, tmp_path):
    for name in ("resnet_basic", "mobilenet_v2", "transformer_encoder"):
        model = builders.ALL_MODELS[name]()
        shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
        calib = [{model.graph.input[0].name: np.random.default_rng(k).normal(size=shape).astype(np.float32)}
                 for k in range(8)]
        out = tmp_path / f"{name}_int8.onnx"
        edgec.compile(model, out, target="jetson", target_options={"trt": "10"}, quantize="int8", calib=calib)
        lint = subprocess.run([str(polygraphy), "check", "lint", str(out)], capture_output=True, text=True, timeout=300)
        text = lint.stdout + lint.stderr
        assert lint.returncode == 0 and "PASSED" in text and "LINT" not in text.replace("check lint", ""), text[-2000:]
