"""On a real local Ray cluster: the same output bytes as in-process (calibration methods,
reconstruction, a mixed plan, --goal), ``edgec batch`` on Ray, a worker killed mid-batch, and a
cluster started with ``ray start --head`` in another process, reached by its address.

Skipped only when Ray is not importable (``pip install -e ".[ray]"``; .ci/run installs it)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")

import edgec  # noqa: E402
from edgec import batch, cli  # noqa: E402
from edgec.builders import resnet_basic, resnet_bottleneck  # noqa: E402
from edgec.executor import RayExecutor  # noqa: E402

from conftest import EXAMPLE  # noqa: E402


@pytest.fixture(scope="module")
def ex():
    """A Ray started inside the test session: 2 CPUs (2 workers), no dashboard."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=400 << 20)  # a new one, never a cluster some other program started
    try:
        yield RayExecutor()
    finally:
        ray.shutdown()


def _bytes(result) -> bytes:
    return result.model.SerializeToString()


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_calibration_on_ray_gives_the_same_bytes(ex, method):
    kw = dict(quantize="int8", calib=EXAMPLE / "calib.npz", calib_method=method)
    local = edgec.compile(EXAMPLE / "model.onnx", **kw)
    on_ray = edgec.compile(EXAMPLE / "model.onnx", executor=ex, **kw)
    assert _bytes(on_ray) == _bytes(local)
    assert on_ray.report["quantization"]["error"] == local.report["quantization"]["error"]


def test_reconstruction_and_a_mixed_plan_on_ray_give_the_same_bytes(ex, tmp_path):
    model = resnet_bottleneck(hw=16)
    rng = np.random.default_rng(0)
    calib = [{"input": rng.standard_normal((8, 3, 16, 16)).astype(np.float32)} for _ in range(6)]
    kw = dict(prune=0.3, calib=calib, quantize="int8")
    assert _bytes(edgec.compile(model, executor=ex, **kw)) == _bytes(edgec.compile(model, **kw))
    kw = dict(quantize="mixed", calib=EXAMPLE / "calib.npz", max_error=0.05)
    local = edgec.compile(EXAMPLE / "model.onnx", **kw)
    on_ray = edgec.compile(EXAMPLE / "model.onnx", executor=ex, **kw)
    assert _bytes(on_ray) == _bytes(local)
    q, r = local.report["quantization"], on_ray.report["quantization"]
    assert q["plan"] == r["plan"] and q["sensitivity"] == r["sensitivity"] and len(set(q["plan"].values())) > 1


@pytest.mark.slow
def test_goal_candidates_on_ray_choose_the_same_winner(ex):
    kw = dict(goal="size", calib=EXAMPLE / "calib.npz", max_error=0.05)
    local = edgec.compile(EXAMPLE / "model.onnx", **kw)
    on_ray = edgec.compile(EXAMPLE / "model.onnx", executor=ex, **kw)
    assert _bytes(on_ray) == _bytes(local)
    strip = lambda s: {**s, "tried": [{k: v for k, v in t.items()} for t in s["tried"]]}  # noqa: E731
    assert strip(on_ray.report["strategy"]) == strip(local.report["strategy"])


def _jobs(tmp_path, n, *, slow=False):
    """``n`` jobs on builder models (one with a mistake when not ``slow``)."""
    model = tmp_path / "m.onnx"
    onnx.save(resnet_basic(hw=32 if slow else 16, width=16 if slow else 8), model)
    opts = {"quantize": "int8", "calib": "random", "calib_samples": 512 if slow else 32, "verify": True}
    jobs = [{"model": "m.onnx", "target": "cpu", "output": f"out/j{i}.onnx", "options": opts} for i in range(n)]
    if not slow:
        jobs.append({"model": "m.onnx", "output": "out/bad.onnx", "options": {"quantize": "int8"}})
    (tmp_path / "out").mkdir(exist_ok=True)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"jobs": jobs}))
    return path


def test_batch_on_ray_matches_local(ex, capsys, tmp_path):
    manifest = _jobs(tmp_path, 3)
    code = cli.main(["batch", str(manifest), "--executor", "ray", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 2 and [j["code"] for j in out["jobs"]] == [0, 0, 0, 2] and out["executor"] == "ray"
    assert "needs calibration data" in out["jobs"][3]["error"]
    on_ray = [(tmp_path / "out" / f"j{i}.onnx").read_bytes() for i in range(3)]
    code = cli.main(["batch", str(manifest)])
    assert code == 2
    assert [(tmp_path / "out" / f"j{i}.onnx").read_bytes() for i in range(3)] == on_ray
    assert on_ray[0] == on_ray[1]
    assert not (tmp_path / "out" / "bad.onnx").exists() and not list((tmp_path / "out").glob(".*.tmp"))


def _task_pids(name: str) -> list[int]:
    """Processes of this machine's Ray workers whose title is ``ray::NAME`` (running that task)."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if cmd.startswith(f"ray::{name}"):
                pids.append(int(p.name))
    return pids


@pytest.mark.slow
def test_a_worker_killed_mid_batch_costs_only_time(ex, tmp_path):
    jobs = batch.read_manifest(_jobs(tmp_path, 4, slow=True))
    before = set(_task_pids("edgec.run_job"))
    results: list = []
    runner = threading.Thread(target=lambda: results.extend(batch.run(jobs, ex)))
    runner.start()
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and time.monotonic() < deadline and runner.is_alive():
        pids = [p for p in _task_pids("edgec.run_job") if p not in before]
        if pids:
            time.sleep(1.0)  # mid-job
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)  # a worker this test's cluster started, by its id
        time.sleep(0.1)
    runner.join(600)
    assert killed is not None, "no worker ran a job"
    assert [r["code"] for r in results] == [0] * 4, results
    for i in range(4):
        onnx.checker.check_model(onnx.load(tmp_path / "out" / f"j{i}.onnx"))
    assert not list((tmp_path / "out").glob(".*.tmp"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_cluster_started_with_ray_start_reached_by_address(tmp_path):
    """``ray start --head`` in its own process (blocking, so that stopping that process, by its
    id, stops its cluster), then ``edgec compile`` and ``edgec batch`` with --ray-address."""
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="edgecray", dir="/tmp")  # short: Ray's socket paths must fit
    ray_cli = Path(sys.executable).with_name("ray")
    head = subprocess.Popen([str(ray_cli), "start", "--head", f"--port={port}", "--num-cpus=2", "--block",
                             "--include-dashboard=false", f"--temp-dir={temp}",
                             f"--object-store-memory={300 << 20}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        env = {**os.environ, "EDGEC_RAY_ADDRESS": f"127.0.0.1:{port}"}
        env.pop("RAY_ADDRESS", None)
        manifest = _jobs(tmp_path, 2)
        deadline, proc = time.monotonic() + 120, None
        while time.monotonic() < deadline:  # the head takes a few seconds to listen
            proc = subprocess.run([sys.executable, "-m", "edgec.cli", "batch", str(manifest), "--executor", "ray",
                                   "--json"], env=env, capture_output=True, text=True, timeout=300)
            if "cannot start or reach" not in proc.stderr:
                break
            time.sleep(2)
        assert proc.returncode == 2, proc.stderr
        assert [j["code"] for j in json.loads(proc.stdout)["jobs"]] == [0, 0, 2]
        out = tmp_path / "c.onnx"
        proc = subprocess.run([sys.executable, "-m", "edgec.cli", "compile", str(EXAMPLE / "model.onnx"), "-o",
                               str(out), "--quantize", "int8", "--calib", str(EXAMPLE / "calib.npz"), "--executor",
                               "ray", "--ray-address", f"127.0.0.1:{port}", "-q"],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        edgec.compile(EXAMPLE / "model.onnx", tmp_path / "local.onnx", quantize="int8", calib=EXAMPLE / "calib.npz")
        assert out.read_bytes() == (tmp_path / "local.onnx").read_bytes()
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # the process group this test started
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(30)
        shutil.rmtree(temp, ignore_errors=True)
