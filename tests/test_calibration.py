"""Calibration statistics and clipping methods, checked against theory and numpy."""

from __future__ import annotations

import tracemalloc

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgec import calibration as cal
from edgec.errors import UserError


def _qdq_mse(x: np.ndarray, lo: float, hi: float, symmetric: bool) -> float:
    """Quantize-dequantize MSE of ``x`` in range (lo, hi), computed on the raw samples."""
    if symmetric:
        t = max(-lo, hi)
        s = t / 127
        q = np.clip(np.rint(x / s), -127, 127) * s
    else:
        s = (hi - lo) / 255
        zp = np.rint(-lo / s)
        q = (np.clip(np.rint(x / s) + zp, 0, 255) - zp) * s
    return float(np.mean((x - q) ** 2))


def _gauss_outliers(seed=0, n=200_000, n_out=20, at=40.0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n)
    x[rng.choice(n, n_out, replace=False)] = at * rng.choice([-1, 1], n_out)
    return x


# ------------------------------------------------------------------ histogram merging
def test_batched_histogram_equals_one_shot():
    x = _gauss_outliers(1) * 3.7
    one = cal.TensorStats()
    one.update(x)
    rng = np.random.default_rng(2)
    perm = rng.permutation(x)
    cuts = np.sort(rng.choice(np.arange(1, len(x)), 11, replace=False))
    # small batches first, so the range has to grow (and bins re-merge) several times
    parts = sorted(np.split(perm, cuts), key=lambda p: np.abs(p).max())
    many = cal.TensorStats()
    for p in parts:
        many.update(p)
    np.testing.assert_array_equal(many.hist, one.hist)
    assert (many.min, many.max, many.count, many.half_range) == (one.min, one.max, one.count, one.half_range)
    # merging separately collected statistics is exact as well
    a, b = cal.TensorStats(), cal.TensorStats()
    a.update(parts[0] * 1e-3)
    b.update(parts[-1])
    ab = cal.TensorStats()
    ab.update(np.concatenate([parts[0] * 1e-3, parts[-1]]))
    a.merge(b)
    np.testing.assert_array_equal(a.hist, ab.hist)
    assert (a.min, a.max, a.count) == (ab.min, ab.max, ab.count)


def test_histogram_counts_match_numpy():
    x = np.random.default_rng(3).uniform(-3, 5, 50_000)
    st = cal.TensorStats(bins=1024)
    st.update(x)
    ref, _ = np.histogram(x, bins=st.edges())
    np.testing.assert_array_equal(st.hist, ref)


# ------------------------------------------------------------------ methods
def test_minmax_is_the_observed_range():
    x = np.random.default_rng(0).normal(0.5, 2, 10_000)
    st = cal.TensorStats()
    st.update(x)
    assert cal.compute_range(st, "minmax") == (x.min(), x.max())
    t = np.abs(x).max()
    assert cal.compute_range(st, "minmax", symmetric=True) == (-t, t)
    pos = cal.TensorStats()
    pos.update(np.abs(x) + 1)
    assert cal.compute_range(pos, "minmax")[0] == 0.0  # zero always representable


@pytest.mark.parametrize("p", [99.0, 99.9, 99.99])
def test_percentile_of_uniform(p):
    x = np.random.default_rng(1).uniform(0, 1, 400_000)
    st = cal.TensorStats()
    st.update(x)
    lo, hi = cal.compute_range(st, "percentile", percentile=p)
    w = 2 * st.half_range / st.bins
    assert lo == 0.0
    assert abs(hi - np.percentile(x, p)) <= w + 1e-3
    # symmetric: percentile of |x| on a symmetric uniform
    y = np.random.default_rng(2).uniform(-2, 2, 400_000)
    sy = cal.TensorStats()
    sy.update(y)
    lo, hi = cal.compute_range(sy, "percentile", percentile=p, symmetric=True)
    assert lo == -hi and abs(hi - np.percentile(np.abs(y), p)) <= 2 * (2 * sy.half_range / sy.bins) + 2e-3


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_clip_is_near_the_brute_force_optimum(symmetric):
    # One outlier at 100 in 200k N(0,1) samples: keeping it costs every sample a 100/127 step
    # (total noise 200k * step^2/12 ~ 10300); clipping at T costs (100 - T)^2 for the outlier plus
    # 200k * (T/127)^2/12: the symmetric optimum is near T ~ 30, well below the max.
    x = _gauss_outliers(4, n=200_000, n_out=1, at=100.0)
    st = cal.TensorStats()
    st.update(x)
    lo, hi = cal.compute_range(st, "mse", symmetric=symmetric)
    mn, mx = min(x.min(), 0), max(x.max(), 0)
    grid = np.linspace(0.01, 1.0, 60)
    got = _qdq_mse(x, lo, hi, symmetric)
    if symmetric:
        assert max(-lo, hi) < 0.5 * np.abs(x).max()  # well below the max
        t = max(-mn, mx)
        best = min(_qdq_mse(x, -a * t, a * t, True) for a in grid)
    else:
        assert max(-lo, hi) < 0.8 * np.abs(x).max() and hi < 0.8 * mx  # both sides clipped
        # brute force on the raw samples over clip families: scaled min-max, and each side alone
        fams = ([(a * mn, a * mx) for a in grid] + [(a * mn, hi) for a in grid] + [(lo, a * mx) for a in grid])
        best = min(_qdq_mse(x, a, b, False) for a, b in fams)
    assert got <= 1.05 * best, (got, best)
    assert got < (0.5 if symmetric else 0.8) * _qdq_mse(x, mn, mx, symmetric)  # better than min-max


def test_mse_coarse_to_fine_search_finds_the_full_grid_clip(monkeypatch):
    """The MSE search evaluates every 8th clip candidate, then the neighbourhood of the best two:
    on ReLU outputs, Gaussians with outliers and Laplace tensors at scales 1e-3..1e3 it returns the
    same clips as evaluating all 200 (MSE_COARSE = 1)."""
    rng = np.random.default_rng(0)
    stats = []
    for k in range(24):
        x = rng.standard_normal(50_000)
        if k % 4 == 1:
            x = np.maximum(x, 0)
        elif k % 4 == 2:
            x = np.where(rng.random(x.size) < 0.001, x * 30, x)
        elif k % 4 == 3:
            x = rng.laplace(size=x.size) * np.exp(rng.uniform(-7, 7))
        st = cal.TensorStats()
        st.update(x.astype(np.float32))
        stats.append(st)
    fast = [(cal.compute_range(st, "mse"), cal.compute_range(st, "mse", symmetric=True)) for st in stats]
    monkeypatch.setattr(cal, "MSE_COARSE", 1)
    full = [(cal.compute_range(st, "mse"), cal.compute_range(st, "mse", symmetric=True)) for st in stats]
    assert fast == full


def test_entropy_clips_gaussian_outliers():
    x = _gauss_outliers(5)
    st = cal.TensorStats()
    st.update(x)
    lo, hi = cal.compute_range(st, "entropy", symmetric=True)
    assert lo == -hi
    assert 2.5 < hi < 0.5 * np.abs(x).max()  # keeps the bulk of the Gaussian, drops the outliers
    # no outliers, a tight bounded distribution: nothing worth clipping
    u = cal.TensorStats()
    u.update(np.random.default_rng(6).uniform(0, 1, 100_000))
    assert cal.compute_range(u, "entropy")[1] > 0.95


def test_unknown_method_and_bad_percentile_are_user_errors():
    st = cal.TensorStats()
    st.update(np.arange(10.0))
    with pytest.raises(UserError, match="unknown calibration method"):
        cal.compute_range(st, "kl")
    with pytest.raises(UserError, match="percentile"):
        cal.compute_range(st, "percentile", percentile=0)
    with pytest.raises(UserError, match="tensor class"):
        cal.method_for({"activations": "mse"}, "input")


# ------------------------------------------------------------------ engine on ONNX Runtime
def _mlp_model():
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])
    w1 = onnx.numpy_helper.from_array(rng.normal(0, 0.5, (16, 32)).astype(np.float32), "w1")
    w2 = onnx.numpy_helper.from_array(rng.normal(0, 0.5, (32, 8)).astype(np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    m = helper.make_model(helper.make_graph(nodes, "mlp", [x], [y], [w1, w2]),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _batches(n_batches, size=64, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n_batches):
        yield {"x": rng.standard_normal((size, 16)).astype(np.float32)}


def test_collect_matches_numpy_statistics_and_reports_progress():
    m = _mlp_model()
    seen = []
    stats = cal.collect(m, ["x", "h", "r", "y"], _batches(5), progress=lambda done, total: seen.append(done))
    assert seen == [64, 128, 192, 256, 320]
    xs = np.concatenate([b["x"] for b in _batches(5)])
    w1 = onnx.numpy_helper.to_array(m.graph.initializer[0])
    h = xs @ w1
    assert np.isclose(stats["h"].min, h.min(), rtol=1e-5) and np.isclose(stats["h"].max, h.max(), rtol=1e-5)
    assert stats["r"].min == 0.0 and stats["x"].count == xs.size
    one = cal.TensorStats()
    one.update(xs)
    np.testing.assert_array_equal(stats["x"].hist, one.hist)


def test_memory_is_flat_in_the_number_of_batches():
    m = _mlp_model()

    def peak(n):
        tracemalloc.start()
        cal.collect(m, ["x", "h", "r", "y"], _batches(n, size=256))
        _, p = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return p

    peak(2)  # warm up ORT / imports
    small, large = peak(4), peak(40)
    assert large < 1.5 * small + 200_000, (small, large)  # 10x the data, not 10x the memory


def test_one_method_per_tensor_class():
    m = _mlp_model()
    stats = cal.collect(m, ["x", "h", "r"], _batches(3))
    ranges = cal.ranges_from_stats(m, stats, method={"default": "minmax", "unbounded": "percentile"},
                                   percentile=90.0)
    assert ranges["r"] == (0.0, stats["r"].max)  # bounded (after Relu): min-max
    assert ranges["x"] == (stats["x"].min, stats["x"].max)  # input: default
    assert ranges["h"][1] < 0.8 * stats["h"].max  # unbounded: percentile 90 clips
    assert cal.tensor_class(m, "r") == "bounded" and cal.tensor_class(m, "h") == "unbounded"


def test_empty_calibration_set_is_a_user_error():
    with pytest.raises(UserError, match="empty"):
        cal.collect(_mlp_model(), ["h"], iter([]))


def test_parse_method_for_the_cli():
    assert cal.parse_method("mse") == "mse"
    assert cal.parse_method("default=minmax,unbounded=percentile") == {"default": "minmax", "unbounded": "percentile"}
    with pytest.raises(UserError):
        cal.parse_method("kl")
    with pytest.raises(UserError):
        cal.parse_method("weights=mse")


def test_progress_flag_prints_one_updating_line(capsys):
    cal.collect(_mlp_model(), ["h"], _batches(3), progress=True, total=192)
    err = capsys.readouterr().err
    assert "calibrating: 192/192 samples" in err and err.count("\n") == 1
