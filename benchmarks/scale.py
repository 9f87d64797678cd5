#!/usr/bin/env python
"""Scaling out on Ray: calibration, a sensitivity sweep and a 12-job batch at 1 and 2 workers,
Ray's per-task overhead and the merge cost, and an Amdahl projection to 8, 32 and 128 workers.

One command (Ray installed: ``pip install -e ".[ray]"``)::

    python benchmarks/scale.py                 # the figures of benchmarks/README.md (~10 min idle)
    python benchmarks/scale.py --quick         # small sizes, to check it runs (~2 min)
    python benchmarks/scale.py --json s.json   # also the measurements as JSON

It starts a local Ray with ``--workers`` CPUs (default 2, no dashboard). "N workers" is the
Ray executor with N tasks at a time (``edgec.executor.RayExecutor(workers=N)``), each task a
single-threaded reference session in its own worker process: 1 worker is one process doing
all the work. The in-process executor (``local``: batches over a thread pool of one thread
per core) is timed too, for reference.

What is measured (wall time, median of ``--repeat`` runs, ``uptime``'s load printed beside):

* **calibration**: ``edgec.calibration.collect`` of every activation (min-max statistics, as
  ``--calib-method minmax`` needs; ``--histograms`` adds the histograms) of a ResNet-50-size
  model (``benchmarks/pruning.py``'s builder: 25.6M params, bottlenecks 3-4-6-3, 1000 classes)
  at ``--hw`` (64: smaller than 224 so that 2,000 samples take a minute, not ten; the network
  is the same size) over ``--samples`` (2,000) generated N(0,1) samples, written to an .npy
  file first and read, as a compile reads ``--calib``, by ``edgec.calibdata.load_calibration``
  (batches of 16, each checked). The statistics of every executor are checked equal.
* **sensitivity sweep**: ``edgec.compile(..., quantize="mixed", max_bytes=...)`` of the same
  network at ``--sweep-hw`` (32) with ``--sweep-samples`` (16) calibration samples: the sweep
  (2 probe runs per layer: 106 plans, one task each) timed alone, and the whole compile.
* **batch**: 12 jobs (``edgec.batch.run``), each an int8 compile (calibration, plan, bias
  correction, measured error, checked and written atomically) of a 16x32x32 ResNet bottleneck
  builder model (``edgec.builders.resnet_bottleneck(hw=96, width=32, mid=16)``, ``--job-hw``) with 64 random
  calibration samples: a job of a few seconds (a ResNet-50-size int8 compile takes minutes,
  which 3 x 12 of would make the benchmark an hour long).
* **Ray's per-task overhead**: a map of ``--tasks`` empty tasks on 2 workers, per task;
  **put**: ``ray.put`` of the model (once per map); **merge**: the driver's merging of the
  calibration shards' statistics (``TensorStats.merge``), timed inside the 2-worker run.

Projection (Amdahl): with serial fraction ``s``, ``speed-up(n) = 1 / (s + (1 - s) / n)``. Two
estimates of ``s`` are printed: *measured serial*, the work that does not spread over workers
(the driver process's CPU time during the 2-worker run: generating and checking the data,
putting the model and the shards, building each plan's inputs, collecting and merging; plus
Ray's measured per-task overhead for every task) over the 1-worker time; and *fitted*,
the ``s`` that the measured 1-to-2-worker speed-up implies (``s = 2 T2 / T1 - 1``). The fitted
one also charges to ``s`` whatever the two cores lose to the driver, Ray's own processes and
other load on this machine, so it is the pessimistic one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pruning import resnet50  # noqa: E402  (the ResNet-50-size builder)


def load() -> str:
    return "load %.2f %.2f %.2f" % os.getloadavg()


def amdahl(s: float, n: int) -> float:
    return 1.0 / (s + (1.0 - s) / n)


class Batches:
    """``n`` generated N(0,1) samples in batches of ``size`` (re-iterable, deterministic)."""

    def __init__(self, name: str, shape: tuple, n: int, size: int):
        self.name, self.shape, self.n, self.batch_size = name, shape, n, size

    def __iter__(self):
        for i, lo in enumerate(range(0, self.n, self.batch_size)):
            rng = np.random.default_rng(i)
            yield {self.name: rng.standard_normal((self.batch_size,) + self.shape).astype(np.float32)}


def timed(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def calibration(executors: dict, args, tmp: Path) -> dict:
    from edgec import executor as executor_mod
    from edgec.calibdata import load_calibration
    from edgec.calibration import TensorStats, collect

    model = resnet50(args.hw, batch=16)
    tensors = [i.name for i in model.graph.input] + [o for n in model.graph.node for o in n.output]
    # the data as a user gives it, an .npy file read by edgec's CalibrationSet (headers checked,
    # batch by batch, NaN/Inf and shapes checked): the driver's part of calibration, as in a compile
    generated = np.concatenate([b["input"] for b in Batches("input", (3, args.hw, args.hw), args.samples, 16)])
    np.save(tmp / "calib.npy", generated[:args.samples])
    del generated
    data = load_calibration(tmp / "calib.npy", model)
    t_data, _ = timed(lambda: sum(1 for _ in data), 1)
    out = {"model": f"resnet50 {args.hw}x{args.hw}", "samples": args.samples, "tensors": len(tensors),
           "histograms": args.histograms, "read_seconds": t_data, "runs": {}}
    ref = None
    merge_seconds = []
    for name, ex in executors.items():
        merge = TensorStats.merge
        spent = [0.0]

        def timed_merge(self, other, _m=merge, _s=spent):
            t = time.perf_counter()
            _m(self, other)
            _s[0] += time.perf_counter() - t

        TensorStats.merge = timed_merge
        cpu = time.process_time()
        try:
            with executor_mod.using(ex):
                secs, stats = timed(lambda: collect(model, tensors, data, histograms=args.histograms,
                                                    total=args.samples), args.repeat)
        finally:
            TensorStats.merge = merge
        out.setdefault("driver_cpu", {})[name] = (time.process_time() - cpu) / args.repeat
        if name == "ray 2":
            merge_seconds.append(spent[0] / args.repeat)
        key = {t: (s.count, s.min, s.max, None if s.hist is None else s.hist.tobytes()) for t, s in stats.items()}
        out.setdefault("identical", True)
        if ref is None:
            ref = key
        elif key != ref:
            out["identical"] = False
        out["runs"][name] = secs
        print(f"  calibration {name:8} {secs:8.2f} s   driver CPU {out['driver_cpu'][name]:6.2f} s   ({load()})",
              flush=True)
    out["merge_seconds"] = merge_seconds[0] if merge_seconds else None
    return out


def sweep(executors: dict, args) -> dict:
    import edgec
    from edgec import mixed_precision

    model = resnet50(args.sweep_hw)
    rng = np.random.default_rng(1)
    calib = [{"input": rng.standard_normal((1, 3, args.sweep_hw, args.sweep_hw)).astype(np.float32)}
             for _ in range(args.sweep_samples)]
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer if len(t.dims) > 1)
    out = {"model": f"resnet50 {args.sweep_hw}x{args.sweep_hw}", "samples": args.sweep_samples, "runs": {}}
    ref = None
    for name, ex in executors.items():
        errors = mixed_precision._Evaluator.errors
        spent = [0.0]

        def timed_errors(self, plans, _e=errors, _s=spent):
            t = time.perf_counter()
            try:
                return _e(self, plans)
            finally:
                _s[0] += time.perf_counter() - t

        mixed_precision._Evaluator.errors = timed_errors
        cpu = [0.0]

        def cpu_errors(self, plans, _e=timed_errors, _c=cpu):
            c = time.process_time()
            try:
                return _e(self, plans)
            finally:
                _c[0] += time.process_time() - c

        mixed_precision._Evaluator.errors = cpu_errors
        try:
            t = time.perf_counter()
            result = edgec.compile(model, quantize="mixed", calib=calib, max_bytes=int(params * 0.75), executor=ex)
            total = time.perf_counter() - t
        finally:
            mixed_precision._Evaluator.errors = errors
        out.setdefault("driver_cpu", {})[name] = cpu[0]
        b = result.model.SerializeToString()
        out.setdefault("identical", True)
        if ref is None:
            ref = b
        elif b != ref:
            out["identical"] = False
        out["plans"] = result.report["quantization"]["search"]["evaluations"]
        out["runs"][name] = {"sweep": spent[0], "compile": total}
        print(f"  sweep       {name:8} {spent[0]:8.2f} s   driver CPU {cpu[0]:6.2f} s   compile {total:7.2f} s   "
              f"({load()})", flush=True)
    return out


def batch_jobs(executors: dict, args, tmp: Path) -> dict:
    from edgec import batch

    from edgec.builders import resnet_bottleneck

    m = tmp / "bottleneck.onnx"
    onnx.save(resnet_bottleneck(hw=args.job_hw, width=32, mid=16), m)
    jobs = [{"model": "bottleneck.onnx", "target": "cpu", "output": f"out/{i}.onnx",
             "options": {"quantize": "int8", "calib": "random", "calib_samples": args.job_samples}}
            for i in range(args.jobs)]
    (tmp / "out").mkdir()
    (tmp / "m.json").write_text(json.dumps({"jobs": jobs}))
    jobs = batch.read_manifest(tmp / "m.json")
    out = {"jobs": args.jobs, "model": f"resnet_bottleneck {args.job_hw}x{args.job_hw} width 32, int8", "runs": {}}
    for name, ex in executors.items():
        t, cpu = time.perf_counter(), time.process_time()
        results = batch.run(jobs, ex)
        secs = time.perf_counter() - t
        out.setdefault("driver_cpu", {})[name] = time.process_time() - cpu
        assert all(r["code"] == 0 for r in results), results
        out["runs"][name] = secs
        out.setdefault("job_seconds", statistics.median(r["seconds"] for r in results))
        print(f"  batch       {name:8} {secs:8.2f} s   driver CPU {out['driver_cpu'][name]:6.2f} s   ({load()})",
              flush=True)
    return out


def overhead(ex, args) -> dict:
    import ray

    list(ex.map(_warm, range(8)))  # start the workers, with edgec imported
    t = time.perf_counter()
    list(ex.map(_nothing, range(args.tasks)))
    per_task = (time.perf_counter() - t) / args.tasks
    blob = resnet50(args.hw, batch=16).SerializeToString()
    t = time.perf_counter()
    ref = ray.put(blob)
    put = time.perf_counter() - t
    del ref
    return {"per_task_seconds": per_task, "put_model_seconds": put, "model_bytes": len(blob)}


def _nothing(item, shared):
    return item


def _warm(item, shared):
    import edgec.api  # noqa: F401

    time.sleep(0.2)  # long enough for every worker to take some
    return item


def project(name: str, t1: float, t2: float, serial: float | None) -> dict:
    out = {"t1": t1, "t2": t2, "speedup_2": t1 / t2}
    fits = {"fitted": max(0.0, min(1.0, 2 * t2 / t1 - 1))}
    if serial is not None:
        fits["measured serial"] = max(0.0, min(1.0, serial / t1))
    for how, s in fits.items():
        out[how] = {"s": s, **{str(n): amdahl(s, n) for n in (8, 32, 128)}}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--hw", type=int, default=64)
    ap.add_argument("--histograms", action="store_true", help="calibration histograms too (percentile/entropy/mse)")
    ap.add_argument("--sweep-hw", type=int, default=32)
    ap.add_argument("--sweep-samples", type=int, default=16)
    ap.add_argument("--jobs", type=int, default=12)
    ap.add_argument("--job-samples", type=int, default=64)
    ap.add_argument("--job-hw", type=int, default=96, help="the batch jobs' input size (96: a job of a few seconds)")
    ap.add_argument("--tasks", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2, help="the most workers measured (and the local Ray's CPUs)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: calibration,sweep,batch")
    ap.add_argument("--no-local", action="store_true", help="skip the in-process reference runs")
    ap.add_argument("--quick", action="store_true", help="small sizes: check that it runs")
    ap.add_argument("--json", help="write the measurements here")
    args = ap.parse_args(argv)
    if args.quick:
        args.samples, args.hw, args.sweep_samples, args.jobs, args.job_samples, args.tasks = 160, 32, 4, 4, 16, 50
    import ray

    from edgec.executor import LocalExecutor, RayExecutor
    from edgec.runtime import host_description

    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    print(f"edgec scale benchmark: host {host_description()}, {os.cpu_count()} CPUs, {load()}", flush=True)
    os.environ.setdefault("RAY_worker_niceness", "0")  # as edgec's own local Ray: workers at the driver's priority
    ray.init(address="local", num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    executors = {} if args.no_local else {"local": LocalExecutor()}
    for n in range(1, args.workers + 1):
        executors[f"ray {n}"] = RayExecutor(workers=n)
    result: dict = {"host": host_description(), "cpus": os.cpu_count(), "load_start": os.getloadavg(),
                    "args": vars(args)}
    result["overhead"] = overhead(executors[f"ray {args.workers}"], args)
    o = result["overhead"]
    print(f"  Ray per-task overhead {1000 * o['per_task_seconds']:.2f} ms; ray.put of the model "
          f"({o['model_bytes'] / 1e6:.0f} MB) {1000 * o['put_model_seconds']:.0f} ms   ({load()})", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if "calibration" not in skip:
            result["calibration"] = calibration(executors, args, Path(tmp))
        if "sweep" not in skip:
            result["sweep"] = sweep(executors, args)
        if "batch" not in skip:
            result["batch"] = batch_jobs(executors, args, Path(tmp))
    result["load_end"] = os.getloadavg()
    ray.shutdown()

    # ------------------------------------------------------------------ projection
    per_task, put = o["per_task_seconds"], o["put_model_seconds"]
    rows = []
    if "calibration" in result:
        c = result["calibration"]
        n_batches = -(-c["samples"] // 16)
        tasks = -(-n_batches // min(16, -(-n_batches // 4)))  # shards, as calibration cuts them for 1 worker
        # the driver's own CPU time while 2 workers ran (reading and checking the data, putting
        # the model and the shards, collecting and merging), plus Ray's per-task cost
        serial = c["driver_cpu"]["ray 2"] + tasks * per_task
        rows.append(("calibration", project("calibration", c["runs"]["ray 1"], c["runs"]["ray 2"], serial)))
    if "sweep" in result:
        s = result["sweep"]
        serial = s["driver_cpu"]["ray 2"] + s["plans"] * per_task  # building each plan's inputs, sending
        rows.append(("sensitivity sweep", project("sweep", s["runs"]["ray 1"]["sweep"], s["runs"]["ray 2"]["sweep"],
                                                  serial)))
    if "batch" in result:
        b = result["batch"]
        rows.append(("12-job batch", project("batch", b["runs"]["ray 1"], b["runs"]["ray 2"],
                                              b["driver_cpu"]["ray 2"] + b["jobs"] * per_task)))
    result["projection"] = dict(rows)
    print()
    print(f"| stage | 1 worker | 2 workers | speed-up | s (measured serial) | 8 | 32 | 128 | s (fitted) | 8 | 32 | 128 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, p in rows:
        m, f = p.get("measured serial"), p["fitted"]
        cells = [name, f"{p['t1']:.1f} s", f"{p['t2']:.1f} s", f"{p['speedup_2']:.2f}x"]
        cells += [f"{m['s']:.4f}", f"{m['8']:.1f}x", f"{m['32']:.1f}x", f"{m['128']:.1f}x"] if m else ["-"] * 4
        cells += [f"{f['s']:.3f}", f"{f['8']:.1f}x", f"{f['32']:.1f}x", f"{f['128']:.1f}x"]
        print("| " + " | ".join(cells) + " |")
    if "calibration" in result:
        print(f"\nmerge of the calibration shards (2 workers): {result['calibration']['merge_seconds']:.3f} s")
    same = [k for k in ("calibration", "sweep") if k in result]
    print(f"\nsame statistics / bytes on every executor: "
          + ", ".join(f"{k} {'yes' if result[k]['identical'] else 'NO'}" for k in same))
    print(f"load at the start {result['load_start'][0]:.2f}, at the end {result['load_end'][0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
