"""OpenVINO (a second CPU runtime, in its own virtual environment, driven as a subprocess)
runs what edgec writes and agrees with ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import edgec
from edgec import builders, verify

import vendor
from conftest import EXAMPLE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def openvino():
    vendor.require("openvino")
    return vendor


def run_both(tmp_path, models: dict, target="cpu", **compile_kw):
    jobs, refs = [], {}
    for name, model in models.items():
        out = tmp_path / f"{name}.onnx"
        edgec.compile(model, out, target=target, **compile_kw)
        compiled = onnx.load(out)
        feeds = verify.random_inputs(compiled, seed=5)
        np.savez(tmp_path / f"{name}.in.npz", **feeds)
        refs[name] = verify.run(compiled, feeds)
        jobs.append({"model": str(out), "inputs": str(tmp_path / f"{name}.in.npz"), "out": str(tmp_path / f"{name}.ov.npz")})
    return jobs, refs


def test_float_models_match_onnxruntime(openvino, tmp_path):
    models = {name: fn() for name, fn in builders.ALL_MODELS.items()}
    models["digits"] = onnx.load(EXAMPLE / "model.onnx")
    jobs, refs = run_both(tmp_path, models)
    for job, res in zip(jobs, openvino.run_jobs("openvino", jobs)):
        assert res["ok"], res["error"]
        name = job["model"].rsplit("/", 1)[-1][:-5]
        with np.load(job["out"]) as z:
            for key, ref in refs[name].items():
                np.testing.assert_allclose(z[key], ref, rtol=1e-4, atol=1e-4, err_msg=f"{name}:{key}")


@pytest.mark.parametrize("scheme", ["u8s8", "u8s7", "u8u8"])
def test_int8_qdq_runs_on_int8_kernels(openvino, tmp_path, scheme):
    """edgec's CPU QDQ output is executed by OpenVINO and agrees with the reference arithmetic.
    Models with int8 weights (U8S8 for isa=vnni, U8S7) run their convolutions on OpenVINO's int8
    kernels; with U8U8 (the isa=avx2 default) OpenVINO runs the uint8-weight convolutions in f32
    (its low-precision transformations want signed weights), still agreeing."""
    options = {"isa": "vnni"} if scheme == "u8s8" else {"scheme": scheme}
    models = {"digits": onnx.load(EXAMPLE / "model.onnx"), "resnet_basic": builders.resnet_basic(),
              "mobilenet_v2": builders.mobilenet_v2()}
    jobs, refs = [], {}
    for name, model in models.items():
        shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
        calib = [{model.graph.input[0].name: np.random.default_rng(k).normal(size=shape).astype(np.float32)}
                 for k in range(8)]
        if name == "digits":
            calib = str(EXAMPLE / "calib.npz")
        j, r = run_both(tmp_path, {name: model}, quantize="int8", calib=calib, target_options=options)
        jobs += j
        refs.update(r)
    for job, res in zip(jobs, openvino.run_jobs("openvino", jobs)):
        name = job["model"].rsplit("/", 1)[-1][:-5]
        assert res["ok"], res["error"]
        conv_precisions = set(res["precisions"].get("Convolution", []))
        if scheme != "u8u8":
            assert conv_precisions & {"u8", "i8"}, (name, res["precisions"])
        with np.load(job["out"]) as z:
            for key, ref in refs[name].items():
                cos = float(np.dot(z[key].ravel(), ref.ravel()) / (np.linalg.norm(z[key]) * np.linalg.norm(ref)))
                assert cos > 0.999, (name, key, cos)
