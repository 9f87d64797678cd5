"""The executor seam without Ray: sharded statistics equal one pass, the local executor, the
options, and ``edgec batch`` in process (tests/test_ray.py runs the same on Ray)."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
from hypothesis import given, settings, strategies as st

import edgec
from edgec import cli, executor
from edgec.builders import plain_cnn
from edgec.calibration import TensorStats

from conftest import EXAMPLE


def _stats(parts, bins=64):
    s = TensorStats(bins=bins)
    for p in parts:
        s.update(p)
    return s


def _same(a: TensorStats, b: TensorStats) -> bool:
    return (a.count, a.min, a.max, a.half_range) == (b.count, b.min, b.max, b.half_range) \
        and np.array_equal(a.hist, b.hist)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from([0.0, 1.0, -1.0, 2.0, 4.0, -4.0, 0.5, 3.0, 7.9, -0.25, 1e-20, -1e-20,
                                          8.0, 0.0625]), min_size=1, max_size=6), min_size=1, max_size=6),
       st.data())
def test_merged_shards_equal_one_pass_whatever_the_split(batches, data):
    """Values equal to a power of two (the histogram's range edge) are the hard case: counted in
    the last bin at one range, in the next bin up once the range doubles."""
    arrays = [np.array(b, dtype=np.float32) for b in batches]
    one_pass = _stats(arrays)
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(arrays) - 1)), max_size=len(arrays))))
    shards, lo = [], 0
    for c in cuts + [len(arrays)]:
        if c > lo:
            shards.append(arrays[lo:c])
            lo = c
    merged = TensorStats(bins=64)
    for sh in shards:
        merged.merge(_stats(sh))
    assert _same(merged, one_pass)
    # and one pass with the final range from the start (the module doc's claim)
    direct = TensorStats(bins=64)
    direct._grow(one_pass.half_range)
    for a in arrays:
        direct.update(a)
    assert _same(direct, one_pass)


def test_local_executor_is_in_order_and_raises():
    ex = executor.LocalExecutor()
    assert list(ex.map(lambda x, s: x * s, [1, 2, 3], shared=10)) == [10, 20, 30]
    with pytest.raises(ZeroDivisionError):
        list(ex.map(lambda x, s: 1 / x, [1, 0]))
    got = dict(ex.imap(lambda x, s: 1 / x, [1, 0], return_exceptions=True))
    assert got[0] == 1 and isinstance(got[1], ZeroDivisionError)
    assert executor.current().name == "local" and not executor.current().distributed


@pytest.mark.parametrize("kwargs, needle", [
    ({"executor": "spark"}, "--executor 'spark'"),
    ({"ray_address": "127.0.0.1:1"}, "--ray-address needs --executor ray"),
    ({"executor": "ray", "ray_address": " "}, "--ray-address"),
])
def test_executor_option_mistakes_are_user_errors(tmp_path, kwargs, needle):
    with pytest.raises(edgec.UserError, match=needle.replace("(", r"\(")):
        edgec.compile(EXAMPLE / "model.onnx", tmp_path / "o.onnx", **kwargs)
    assert not list(tmp_path.iterdir())


def test_executor_ray_without_ray_installed_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    code = cli.main(["compile", str(EXAMPLE / "model.onnx"), "-o", str(tmp_path / "o.onnx"), "--executor", "ray"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "needs Ray" in err and "edgec[ray]" in err
    assert not list(tmp_path.iterdir())


def _manifest(tmp_path, jobs, name="m.json"):
    p = tmp_path / name
    p.write_text(json.dumps({"jobs": jobs}))
    return p


@pytest.fixture
def cnn(tmp_path):
    onnx.save(plain_cnn(), tmp_path / "cnn.onnx")
    return "cnn.onnx"


def test_batch_runs_every_job_and_exits_with_the_worst(capsys, tmp_path, cnn):
    m = _manifest(tmp_path, [
        {"model": cnn, "target": "cpu", "output": "out/a.onnx"},
        {"model": "missing.onnx", "output": "out/b.onnx"},
        {"model": cnn, "target": "neon", "output": "out/c.onnx", "options": {"quantize": "int8", "calib": "random",
                                                                              "report_file": "out/c.json"}},
        {"model": cnn, "output": "out/d.onnx", "options": {"prune": 2.0}},
    ])
    (tmp_path / "out").mkdir()
    code = cli.main(["batch", str(m)])
    out, err = capsys.readouterr()
    assert code == 2, out + err
    assert (tmp_path / "out" / "a.onnx").is_file() and (tmp_path / "out" / "c.onnx").is_file()
    assert json.loads((tmp_path / "out" / "c.json").read_text())["quantization"]["mode"] == "int8"
    assert not (tmp_path / "out" / "b.onnx").exists() and not (tmp_path / "out" / "d.onnx").exists()
    assert "missing.onnx" in out and "--prune 2.0" in out and "2 of 4 jobs succeeded" in out
    assert err.count("edgec batch: [") == 4
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_batch_json_and_toml(capsys, tmp_path, cnn):
    pytest.importorskip("tomllib", reason="TOML manifests need Python 3.11")
    (tmp_path / "m.toml").write_text(f'[[jobs]]\nmodel = "{cnn}"\noutput = "x.onnx"\ntarget = "cpu"\n'
                                     f'[jobs.options]\nverify = true\n')
    code = cli.main(["batch", str(tmp_path / "m.toml"), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["jobs"][0]["code"] == 0 and (tmp_path / "x.onnx").is_file()


@pytest.mark.parametrize("content, needle", [
    ("{", "not a valid JSON manifest"),
    ('{"jobs": []}', "non-empty list"),
    ('{"jobs": [{"model": "a.onnx"}]}', "'output' must be a path"),
    ('{"jobs": [{"model": "a.onnx", "output": "o.onnx", "options": {"bogus": 1}}]}', "unknown option 'bogus'"),
    ('{"jobs": [{"model": "a.onnx", "output": "o.onnx", "extra": 1}]}', "unknown key 'extra'"),
    ('{"jobs": [{"model": "a.onnx", "output": "o.onnx"}, {"model": "b.onnx", "output": "./o.onnx"}]}',
     "job 1 writes too"),
])
def test_batch_manifest_mistakes_are_one_line_and_nothing_runs(capsys, tmp_path, content, needle):
    (tmp_path / "m.json").write_text(content)
    code = cli.main(["batch", str(tmp_path / "m.json")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_edgec_threads_limits_the_batches_run_at_once(monkeypatch):
    """A Ray task holds one CPU: EDGEC_THREADS=1 (set inside every task) makes its compile run
    one batch at a time; unset, the process's cores (at most 8); junk is ignored."""
    from edgec import runtime

    monkeypatch.delenv(runtime.THREADS_ENV, raising=False)
    cores = runtime.workers()
    monkeypatch.setenv(runtime.THREADS_ENV, "1")
    assert runtime.workers() == 1
    monkeypatch.setenv(runtime.THREADS_ENV, "0")
    assert runtime.workers() == cores
    monkeypatch.setenv(runtime.THREADS_ENV, "many")
    assert runtime.workers() == cores


def _recording(value):
    """A batch function returning ``{"v": value(i, batch)}`` after a short sleep, and the list of
    the batch indices it started (with its lock)."""
    import threading
    import time
    started: list[int] = []
    lock = threading.Lock()

    def fn(i, b):
        with lock:
            started.append(i)
        time.sleep(0.002)
        return {"v": value(i, b)}

    return fn, started, lock


@pytest.mark.parametrize("result_mb, budget_mb, expected", [(1, 3, 3), (1, 0.5, 1), (1, 1000, 8)])
def test_batches_in_flight_stay_within_the_memory_bound(monkeypatch, result_mb, budget_mb, expected):
    """Runs that fetch every activation of a high-resolution model return gigabytes a batch,
    and every core has two batches in flight: the first batch runs alone, and its result's size
    sets how many may be in flight at once (within ``in_flight_bytes``; two per worker at most).
    The results are those of a sequential run, in order."""
    from edgec import runtime

    monkeypatch.setattr(runtime, "workers", lambda: 4)  # 8 in flight at most
    monkeypatch.setattr(runtime, "in_flight_bytes", lambda: int(budget_mb * 2 ** 20))
    fn, started, lock = _recording(lambda i, b: np.full(int(result_mb * 2 ** 20) // 8, float(b["x"])))

    seen, widest = [], 0
    for b, out in runtime.map_batches(fn, ({"x": k} for k in range(24))):
        with lock:
            widest = max(widest, max(started) - len(seen))  # batches started but not yet handed over
        assert out["v"][0] == b["x"]
        seen.append(b["x"])
    assert seen == list(range(24))
    assert min(expected, 4) <= widest + 1 <= expected  # (4 workers: at least that many run at once)


def test_the_in_flight_bound_follows_the_largest_result_and_the_container(monkeypatch, tmp_path):
    """A later, larger result lowers how many batches may be in flight (a calibration pass whose
    captured batches are not the first); a run_batches call remembers its session's result size,
    so a second call does not run its first batch alone; and the bound is a sixth of a
    container's memory limit where that is below the machine's."""
    from edgec import runtime

    monkeypatch.setattr(runtime, "workers", lambda: 4)
    monkeypatch.setattr(runtime, "in_flight_bytes", lambda: 4 * 2 ** 20)
    fn, started, lock = _recording(lambda i, b: np.zeros((2 ** 20 if i >= 8 else 1024) // 8))  # 1 KiB, then 1 MiB

    widest_after = 0
    for k, (b, out) in enumerate(runtime.map_batches(fn, ({"x": k} for k in range(40)))):
        with lock:
            if k >= 12:  # (batches 8..11 may have been in flight before the first large result)
                widest_after = max(widest_after, max(started) - k + 1)
    assert widest_after <= 4  # 4 MiB / 1 MiB

    sizes: dict = {}
    list(runtime.map_batches(fn, ({"x": k} for k in range(10)), sizes=sizes, key="k"))
    assert sizes["k"] == 2 ** 20
    # remembered: the first batch no longer runs alone
    started.clear()
    first = None
    for b, out in runtime.map_batches(fn, ({"x": k} for k in range(10)), sizes=sizes, key="k"):
        if first is None:
            with lock:
                first = max(started)
    assert first >= 1

    monkeypatch.undo()
    limit = tmp_path / "memory.max"
    limit.write_text(str(12 * 2 ** 30))
    monkeypatch.setattr(runtime, "_CGROUP_LIMITS", (str(limit),))
    assert runtime.in_flight_bytes() == 2 * 2 ** 30
    limit.write_text("max")
    assert runtime.in_flight_bytes() >= 2 ** 30
