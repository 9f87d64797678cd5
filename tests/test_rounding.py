"""Weight rounding chosen for each layer's output (GPTQ, ``edgec.rounding``), kept only where the
model's measured output error drops."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import edgec
from edgec import calibdata, quantize_api, report, rounding
from edgec.builders import ALL_MODELS


def _layer_error(W, H, levels, scale, zero):
    """Output error of a layer under rounded weights: trace((W - Wq) H (W - Wq)^T)."""
    D = W - (levels - zero[..., None]) * scale[..., None]
    return float(np.einsum("gok,gkl,gol->", D, H, D))


def _correlated_layer(rng, g=1, out=24, k=48, rows=4000):
    mix = rng.normal(size=(g, k, k)) * 0.3 + np.eye(k)
    X = np.einsum("rgk,gkl->rgl", rng.normal(size=(rows, g, k)), mix)  # correlated inputs, as in a real layer
    H = np.einsum("rgk,rgl->gkl", X, X) / rows
    W = rng.normal(size=(g, out, k))
    return W, H


@pytest.mark.parametrize("kind", ["int8", "int7", "int4", "uint8"])
@pytest.mark.parametrize("groups", [1, 6])
def test_gptq_lowers_the_layer_output_error_of_nearest_rounding(kind, groups):
    rng = np.random.default_rng(groups)
    W, H = _correlated_layer(rng, g=groups)
    lo, hi = rounding.LEVELS[kind]
    if kind == "uint8":  # per-output asymmetric: [min(w, 0), max(w, 0)] onto [0, 255]
        wmin, wmax = np.minimum(W.min(-1), 0), np.maximum(W.max(-1), 0)
        scale = (wmax - wmin) / 255
        zero = np.rint(-wmin / scale)
    else:
        scale = np.abs(W).max(-1) / hi
        zero = np.zeros_like(scale)
    nearest = np.clip(np.rint(W / scale[..., None]) + zero[..., None], lo, hi)
    chosen = rounding.gptq(W, H, scale, zero, lo, hi)
    assert chosen.min() >= lo and chosen.max() <= hi and np.all(chosen == np.rint(chosen))
    assert not np.array_equal(chosen, nearest)
    e_near = _layer_error(W, H, nearest, scale, zero)
    e_gptq = _layer_error(W, H, chosen, scale, zero)
    assert e_gptq < 0.8 * e_near, (e_gptq, e_near)
    # each level stays next to its weight's value: it chooses between neighbours, it does not re-fit
    assert np.max(np.abs(chosen - (W / scale[..., None] + zero[..., None]))) < 3


def test_gptq_with_a_singular_input_covariance():
    """An input channel that is always zero (a dead ReLU) gives a singular H: the damping keeps it
    solvable, and the dead channel's weights keep their nearest level."""
    rng = np.random.default_rng(1)
    W, H = _correlated_layer(rng)
    H[:, 5, :] = 0
    H[:, :, 5] = 0
    scale = np.abs(W).max(-1) / 127
    zero = np.zeros_like(scale)
    chosen = rounding.gptq(W, H, scale, zero, -127, 127)
    np.testing.assert_array_equal(chosen[..., 5], np.rint(W[..., 5] / scale))


@pytest.mark.parametrize("name", ["resnet_bottleneck", "mobilenet_v2", "inception", "transformer_encoder"])
def test_gptq_rounding_never_measures_worse_than_nearest(name, monkeypatch):
    monkeypatch.setattr(quantize_api, "ROUNDING_FLOOR", 0.0)  # tried whatever the error
    model = ALL_MODELS[name](batch=4)
    calib = list(calibdata.load_calibration("random", model, max_samples=32, seed=3))
    reps = {}
    full = {}
    for r in ("nearest", "gptq"):
        full[r] = edgec.compile(model, quantize="int8", calib=calib, rounding=r).report
        reps[r] = full[r]["quantization"]
    assert "rounding" not in reps["nearest"]
    sec = reps["gptq"]["rounding"]
    assert sec["method"] == "gptq" and sec["layers"] > 0
    assert sec["applied"] == (sec["rel_l2_chosen"] < sec["rel_l2_nearest"])
    text = report.compile_text(full["gptq"])
    assert f"rounding: GPTQ levels on {sec['layers']} layers" in text
    # 32 samples: the choice and the reported error are measured on the same samples
    assert reps["gptq"]["error"]["rel_l2"] <= reps["nearest"]["error"]["rel_l2"] + 1e-9
    if sec["applied"]:
        assert reps["gptq"]["error"]["rel_l2"] < reps["nearest"]["error"]["rel_l2"]


def test_chosen_levels_keep_the_no_vnni_bound(monkeypatch):
    """u8s7 (AVX2 without VNNI): every written weight level stays in [-63, 63], rounding chosen
    or not, so no pair of products can saturate ONNX Runtime's int16 accumulation."""
    monkeypatch.setattr(quantize_api, "ROUNDING_FLOOR", 0.0)
    model = ALL_MODELS["resnet_basic"](batch=4)
    calib = list(calibdata.load_calibration("random", model, max_samples=32, seed=3))
    r = edgec.compile(model, quantize="int8", calib=calib, target_options={"isa": "avx2", "scheme": "u8s7"},
                      rounding="gptq")
    assert r.report["quantization"]["rounding"]["layers"] > 0
    levels = [numpy_helper.to_array(i) for i in r.model.graph.initializer
              if i.data_type == onnx.TensorProto.INT8 and i.name.endswith("_weight_quantized")]
    assert levels and max(int(np.abs(q).max()) for q in levels) <= 63


def test_rounding_option_is_checked():
    model = ALL_MODELS["plain_cnn"]()
    with pytest.raises(edgec.UserError, match="rounding"):
        edgec.compile(model, quantize="int8", calib="random", rounding="auto")
    with pytest.raises(edgec.UserError, match="rounding"):
        quantize_api.quantize(edgec.from_model(model), [], rounding="up")


def test_rounding_is_not_tried_where_the_error_is_already_small():
    """Below a fifth of the budget the gain could not matter: nearest rounding, no GPTQ cost, and
    the report says why."""
    model = ALL_MODELS["resnet_bottleneck"](batch=4)
    calib = list(calibdata.load_calibration("random", model, max_samples=32, seed=3))
    q = edgec.compile(model, quantize="int8", calib=calib, rounding="gptq").report["quantization"]
    assert q["error"]["rel_l2"] < quantize_api.ROUNDING_FLOOR * quantize_api.DEFAULT_INT8_BUDGET
    assert q["rounding"]["method"] == "nearest" and not q["rounding"]["applied"]
    assert "below" in q["rounding"]["why"]
    # a tighter budget lowers the floor: then it is tried
    q = edgec.compile(model, quantize="int8", calib=calib, max_error=0.02, rounding="gptq").report["quantization"]
    assert q["rounding"]["method"] == "gptq" and q["rounding"]["layers"] > 0


def test_nearest_is_the_default():
    """GPTQ's levels come from float64 linear algebra (BLAS): another build or thread count can
    choose another level where two are nearly equal, so a default compile does not use it and
    stays the same on every host."""
    model = ALL_MODELS["mobilenet_v2"](batch=4)
    calib = list(calibdata.load_calibration("random", model, max_samples=32, seed=3))
    q = edgec.compile(model, quantize="int8", calib=calib).report["quantization"]
    assert "rounding" not in q
