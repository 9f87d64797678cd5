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


# ---------------------------------------------------------------- saturation-aware ranges
def _saturating_model() -> onnx.ModelProto:
    """Conv outputs read by each saturating reader edgec knows (and two it must not clip)."""
    from edgec.builders import GraphBuilder
    b = GraphBuilder("saturating", seed=3)
    x = b.input("input", (1, 3, 12, 12))
    c1 = b.conv(x, 8, k=3)
    h1 = b.hardswish(c1)                                               # HardSwish: [-3, inf)
    c2 = b.conv(h1, 8, k=1)
    hs = b.op("HardSigmoid", [c2], b.shape(c2), alpha=1.0 / 6, beta=0.5)  # x * HardSigmoid(x)
    h2 = b.mul(c2, hs)
    c3 = b.conv(h2, 8, k=1)
    t = b.add(c3, 3.0)                                                 # x * Clip(x + 3, 0, 6) / 6
    h3 = b.div(b.mul(c3, b.clip(t, 0.0, 6.0)), 6.0)
    c4 = b.conv(h3, 8, k=1)
    p = b.maxpool(b.reshape(c4, (1, 8, 12, 12)), k=2)                  # moved, then a ReLU6
    r6 = b.clip(p, 0.0, 6.0)
    c5 = b.conv(r6, 8, k=1)
    g = b.op("HardSigmoid", [c5], b.shape(c5), alpha=0.2, beta=0.5)    # [-2.5, 2.5]
    c6 = b.conv(b.mul(g, r6), 8, k=1)
    both = b.add(b.relu(c6), c6)                                       # a reader that does not saturate
    both = b.add(b.sigmoid(b.conv(both, 8, k=1)), b.silu(b.conv(both, 8, k=1)))  # smooth: never clipped
    b.output(b.hardswish(b.conv(both, 4, k=1)))
    b.output(b.conv(both, 4, k=1))
    return b.build()


def test_saturation_bounds_find_each_saturating_reader():
    from edgec.analysis.saturation import saturation_bounds
    m = _saturating_model()
    bounds = saturation_bounds(m)
    by_op: dict[str, list] = {}
    convs = [n.output[0] for n in m.graph.node if n.op_type == "Conv"]
    for c in convs:
        by_op.setdefault(c, bounds.get(c))
    inf = float("inf")
    approx = pytest.approx  # the attributes are float32 (alpha 1/6)
    assert by_op[convs[0]] == (-3.0, inf)                  # HardSwish
    assert by_op[convs[1]] == approx((-3.0, inf), 1e-6)    # x * HardSigmoid(x): the Mul's -3 spans the HardSigmoid's [-3, 3]
    assert by_op[convs[2]] == (-3.0, inf)                  # x * Clip(x + 3, 0, 6) / 6
    assert by_op[convs[3]] == (0.0, 6.0)                   # through Reshape and MaxPool into Clip(0, 6)
    assert by_op[convs[4]] == approx((-2.5, 2.5), 1e-6)    # HardSigmoid(alpha 0.2, beta 0.5)
    assert by_op[convs[5]] is None               # read by Relu and by Add
    assert by_op[convs[6]] is None and by_op[convs[7]] is None  # Sigmoid, SiLU: never flat
    graph_outputs = {o.name for o in m.graph.output}
    assert not graph_outputs & set(bounds)       # a graph output is never clipped


def _with_clamps(m: onnx.ModelProto, bounds: dict) -> onnx.ModelProto:
    """``m`` with every tensor of ``bounds`` clamped to its interval by a Clip after its producer."""
    out = onnx.ModelProto()
    out.CopyFrom(m)
    g = out.graph
    nodes = []
    for n in m.graph.node:
        n = onnx.NodeProto.FromString(n.SerializeToString())
        n.input[:] = [f"{i}.sat" if i in bounds else i for i in n.input]
        nodes.append(n)
        for o in n.output:
            if o in bounds:
                a, b = bounds[o]
                g.initializer.extend([onnx.numpy_helper.from_array(np.array(max(a, -3e38), np.float32), o + ".lo"),
                                      onnx.numpy_helper.from_array(np.array(min(b, 3e38), np.float32), o + ".hi")])
                nodes.append(helper.make_node("Clip", [o, o + ".lo", o + ".hi"], [o + ".sat"]))
    del g.node[:]
    g.node.extend(nodes)
    onnx.checker.check_model(out)
    return out


def test_clamping_to_the_saturation_bounds_changes_no_output_of_the_float_model():
    """The property the clip rests on, in ONNX Runtime: every bounded tensor clamped to its
    interval at once, the model's outputs are the same (float rounding aside), while the
    clamps do bite on these inputs."""
    import onnxruntime as ort
    from edgec import builders
    from edgec.analysis.saturation import saturation_bounds
    from edgec.runtime import augment
    for m in (_saturating_model(), builders.mobilenet_v3(), builders.npu_mobilenet_v3()):
        bounds = saturation_bounds(m)
        assert bounds
        inp = m.graph.input[0]
        shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        x = 4.0 * np.random.default_rng(1).normal(size=[8] + shape[1:]).astype(np.float32)
        s0 = ort.InferenceSession(augment(m, list(bounds)).SerializeToString(), providers=["CPUExecutionProvider"])
        s1 = ort.InferenceSession(_with_clamps(m, bounds).SerializeToString(), providers=["CPUExecutionProvider"])
        outs = [o.name for o in m.graph.output]
        bit = 0
        for i in range(len(x)):
            feed = {inp.name: x[i:i + 1]}
            want = s0.run(outs + list(bounds), feed)
            for got, ref in zip(s1.run(outs, feed), want):
                np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(ref).max())))
            bit += sum(int(np.any((v < bounds[t][0]) | (v > bounds[t][1]))) for t, v in zip(bounds, want[len(outs):]))
        assert bit > len(x)  # beyond their intervals, several tensors per input


def test_clamped_statistics_are_the_statistics_of_the_clamped_values():
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 5.0, 100_000)
    for a, b in ((-3.0, np.inf), (-3.0, 3.0), (0.0, 6.0), (-np.inf, 2.0)):
        st, want = cal.TensorStats(), cal.TensorStats()
        st.update(x)
        want.update(np.clip(x, a, b))
        got = st.clamped(a, b)
        assert (got.min, got.max, got.count) == (want.min, want.max, want.count)
        w = 2 * st.half_range / st.bins
        for method in ("minmax", "percentile", "mse", "entropy"):
            for sym in (False, True):
                r_got = cal.compute_range(got, method, symmetric=sym)
                r_want = cal.compute_range(want, method, symmetric=sym)
                # same up to the histogram's bins (want's may be half as wide: its range is smaller)
                tol = 4 * w if method != "minmax" else 0.0
                assert abs(r_got[0] - r_want[0]) <= tol + 0.02 * abs(r_want[0]) * (method == "entropy")
                assert abs(r_got[1] - r_want[1]) <= tol + 0.02 * abs(r_want[1]) * (method == "entropy")


def test_a_hard_swish_input_is_quantized_over_what_the_hard_swish_tells_apart():
    """mobilenet_v3's convs before a hard-swish (or the hard-sigmoid of an SE gate): the range
    starts at -3, not at their most negative pre-activation (min-max; every method reads the
    same clamped statistics)."""
    from edgec import builders
    from edgec.analysis.saturation import saturation_bounds
    m = builders.mobilenet_v3()
    x = builders.structure_inputs("mobilenet_v3", m, 48, seed=0).astype(np.float32)
    name = m.graph.input[0].name
    bounds = saturation_bounds(m)
    _, stats = cal.calibrate(m, list(bounds), [{name: x[i:i + 1]} for i in range(32)])
    ranges = cal.ranges_from_stats(m, stats)
    plain = cal.ranges_from_stats(m, stats, saturation=False)
    hs = [t for t, (a, _) in bounds.items() if abs(a + 3.0) < 1e-6 and plain[t][0] < -3.0]
    assert hs, "no hard-swish input reaches below -3 on these inputs"
    for t in hs:
        assert ranges[t] == (bounds[t][0], min(plain[t][1], bounds[t][1]))


def test_the_report_counts_the_clamped_ranges(tmp_path):
    import edgec
    from edgec import builders
    from edgec.report import compile_text
    m = builders.mobilenet_v3()
    x = builders.structure_inputs("mobilenet_v3", m, 32, seed=0).astype(np.float32)
    r = edgec.compile(m, tmp_path / "q.onnx", quantize="int8", calib={m.graph.input[0].name: x})
    n = r.report["quantization"]["calibration"]["clamped"]
    assert n > 0
    assert f"ranges: {n} tensors clamped to what their readers tell apart" in compile_text(r.report)


def test_a_tensor_a_subgraph_reads_is_never_clamped():
    """An If branch may read any outer tensor (here a HardSwish's input): the analysis cannot see
    what it does with it, so that tensor keeps its whole range."""
    from edgec.analysis.saturation import saturation_bounds
    then = helper.make_graph([helper.make_node("Identity", ["c"], ["t_out"])], "then", [],
                             [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [1, 4])])
    other = helper.make_graph([helper.make_node("Identity", ["h"], ["e_out"])], "else", [],
                              [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [1, 4])])
    g = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["c"]), helper.make_node("HardSwish", ["c"], ["h"]),
         helper.make_node("Neg", ["x"], ["d"]), helper.make_node("HardSwish", ["d"], ["h2"]),
         helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)],
        "sub", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
                helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4]),
         helper.make_tensor_value_info("h2", TensorProto.FLOAT, [1, 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    bounds = saturation_bounds(m)
    assert "c" not in bounds and "d" in bounds


def test_clamped_statistics_of_a_tensor_that_never_held_a_value():
    """A tensor with no elements on the calibration data (boxes after an NMS that found none):
    its clamped statistics are empty too, and every method gives (0, 0)."""
    st = cal.TensorStats()
    st.update(np.zeros(0, np.float32))
    got = st.clamped(0.1, 1.0)
    assert got.count == 0
    for method in cal.METHODS:
        assert cal.compute_range(got, method) == (0.0, 0.0)


def test_a_clip_whose_upper_bound_is_negative_is_not_zero_below():
    """``x * Clip(x + 3, 0, m)`` is 0 below -3 only when the Clip can output 0 (m >= 0)."""
    from edgec.analysis.saturation import saturation_bounds
    def model(m):
        g = helper.make_graph(
            [helper.make_node("Neg", ["x"], ["t"]), helper.make_node("Add", ["t", "three"], ["u"]),
             helper.make_node("Clip", ["u", "zero", "m"], ["c"]), helper.make_node("Mul", ["t", "c"], ["y"])],
            "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
            [onnx.numpy_helper.from_array(np.array(v, np.float32), n)
             for n, v in (("three", 3.0), ("zero", 0.0), ("m", m))])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    assert saturation_bounds(model(6.0)).get("t") == (-3.0, float("inf"))
    assert "t" not in saturation_bounds(model(-1.0))
