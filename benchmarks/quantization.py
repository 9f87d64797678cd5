#!/usr/bin/env python
"""Quantization benchmark: edgec against ONNX Runtime's ``quantize_static`` on the same data.

Models: the digits example (``examples/digits``: accuracy on its 360 test digits, calibration
on its 200 ``calib_x`` samples) and the builder models (``edgec.builders.ALL_MODELS`` at batch
8: output SQNR against FP32 on 64 held-out N(0,1) samples, calibration on 64 others).

Variants (all static QDQ, uint8 activations, int8 per-channel weights unless stated):

* ``ort-minmax`` / ``ort-percentile``: ``onnxruntime.quantization.quantize_static`` after
  ``quant_pre_process`` (ORT's recommended preprocessing: shape inference + graph
  optimisation, BN folded), QDQ, ``per_channel=True``, MinMax / Percentile (99.999, ORT's
  default);
* ``edgec-minmax`` / ``edgec-percentile`` (99.99) / ``edgec-mse`` / ``edgec-entropy``:
  ``edgec.quantize_api.quantize(mode="int8")`` after edgec's lossless folding passes (bias
  correction on, kept only when it helps on the calibration data);
* ``edgec-mixed``: ``mode="mixed"``, ``max_error=0.02`` (2% relative L2, ~34 dB);
* ``edgec-fp16``: ``mode="fp16"``.

Columns: accuracy (digits) or SQNR in dB vs FP32 (higher is better); quantization wall time
(calibration included, one run); peak Python-heap memory during quantization (tracemalloc:
numpy arrays included, ORT's C++ arena not); ORT CPU latency of one batch (10th percentile of the runs, 1 thread,
ORT_ENABLE_ALL) relative to FP32; model bytes. Ratios compare each edgec variant with the
ORT variant of the same method (minmax <-> MinMax, everything else <-> Percentile).

``--scale`` also calibrates the digits model on 10x the samples (the calibration set tiled with
noise) to show how peak memory grows with the calibration set for each tool.

    python benchmarks/quantization.py
    python benchmarks/quantization.py --models digits,mobilenet_v2 --scale --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import edgec  # noqa: E402
from edgec import calibdata, quantize_api, runtime  # noqa: E402
from edgec.builders import ALL_MODELS, NPU_MODELS, STRUCTURE_MODELS, structure_inputs  # noqa: E402

LOSSLESS = ["fold_constants", "eliminate_identity", "fold_batchnorm", "fold_conv_affine", "eliminate_dead"]
EDGEC_VARIANTS = {
    "edgec-auto": dict(mode="int8", method="auto"),  # the default: each method measured, the lowest error kept
    "edgec-auto-nosat": dict(mode="int8", method="auto", saturation=False),  # ranges not clamped to what readers tell apart
    "edgec-minmax": dict(mode="int8", method="minmax"),
    "edgec-gptq": dict(mode="int8", method="minmax", rounding="gptq"),
    "edgec-percentile": dict(mode="int8", method="percentile", percentile=99.99),
    "edgec-mse": dict(mode="int8", method="mse"),
    "edgec-entropy": dict(mode="int8", method="entropy"),
    "edgec-mixed": dict(mode="mixed", method="minmax", max_error=0.02),
    "edgec-fp16": dict(mode="fp16"),
}
ORT_VARIANTS = {"ort-minmax": "MinMax", "ort-percentile": "Percentile"}


# ---------------------------------------------------------------------- data
def load_case(name: str):
    """(model, calib dict, test dict, labels or None)."""
    if name == "digits":
        # (calibration in batches of 40: ORT's Percentile calibrator fails on a short last batch)
        e, c = (np.load(ROOT / "examples" / "digits" / f) for f in ("eval.npz", "calib.npz"))
        d = {"test_x": e["input"], "test_y": e["labels"], "calib_x": c["input"]}
        model = onnx.load(str(ROOT / "examples" / "digits" / "model.onnx"))
        return model, {"input": d["calib_x"]}, {"input": d["test_x"]}, d["test_y"]
    if name in ALL_MODELS:
        model = ALL_MODELS[name](batch=8)
        spec = model.graph.input[0]
        shape = [d.dim_value for d in spec.type.tensor_type.shape.dim]
        rng = np.random.default_rng(0)
        calib = rng.standard_normal([64] + shape[1:]).astype(np.float32)
        test = np.random.default_rng(1).standard_normal([64] + shape[1:]).astype(np.float32)
        return model, {spec.name: calib}, {spec.name: test}, None
    # the structure and NPU builders (names prefixed "npu_" for the latter): trained-like weights
    # and realistic inputs (smooth images, embeddings, sequences), at batch 1
    npu = name.startswith("npu_")
    model = (NPU_MODELS[name[4:]] if npu else STRUCTURE_MODELS[name])()
    spec = model.graph.input[0]
    kind = "mobilenet_v3" if npu else name  # structure_inputs picks the input kind by the builder's name
    x = structure_inputs(kind, model, 128, seed=0).astype(np.float32)
    return model, {spec.name: x[:64]}, {spec.name: x[64:]}, None


def batches_of(data: dict, batch: int | None):
    n = len(next(iter(data.values())))
    b = batch or n
    return [{k: v[i:i + b] for k, v in data.items()} for i in range(0, n, b)]


def fixed_batch(model) -> int | None:
    """The batch the calibration/test data is fed in (the model's own when it is static)."""
    d = model.graph.input[0].type.tensor_type.shape.dim[0]
    return d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 40


# ---------------------------------------------------------------------- metrics
def session(model_bytes: bytes, threads: int = 1):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def outputs(model_bytes: bytes, data: dict, batch: int | None, reference: bool = False) -> np.ndarray:
    """Outputs on this host's kernels (all optimisations), or in edgec's reference arithmetic."""
    sess = runtime.reference_session(model_bytes) if reference else session(model_bytes, threads=0)
    name = sess.get_outputs()[0].name
    return np.concatenate([sess.run([name], b)[0] for b in batches_of(data, batch)])


def latency(model_bytes: bytes, data: dict, batch: int | None, repeat: int) -> float:
    sess = session(model_bytes)
    feed = batches_of(data, batch or 8)[0]
    for _ in range(10):
        sess.run(None, feed)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return float(np.percentile(times, 10))  # p10: robust to other load on the machine


def quality(ref: np.ndarray, got: np.ndarray, labels) -> float:
    if labels is not None:
        return float(np.mean(got.reshape(len(labels), -1).argmax(1) == labels))
    err = np.linalg.norm(got.astype(np.float64) - ref) / np.linalg.norm(ref)
    return float(-20 * np.log10(err)) if err > 0 else float("inf")


TIME_RUNS = 5


def measured(fn):
    """-> (result, seconds, peak python-heap bytes): the median of ``TIME_RUNS`` runs timed
    without tracemalloc (it slows Python allocation several-fold), then one traced for memory."""
    times = []
    for _ in range(TIME_RUNS):
        gc.collect()
        t = time.perf_counter()
        res = fn()
        times.append(time.perf_counter() - t)
    secs = sorted(times)[len(times) // 2]
    gc.collect()
    tracemalloc.start()
    try:
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return res, secs, peak


# ---------------------------------------------------------------------- tools
def run_edgec(model, calib: dict, opts: dict, batch: int | None) -> bytes:
    ir = edgec.from_model(model)
    edgec.run_passes(ir, LOSSLESS)
    cs = calibdata.load_calibration(calib, model, batch_size=batch or 32)
    quantize_api.quantize(ir, cs if opts["mode"] != "fp16" else None, **opts)
    return ir.to_onnx().SerializeToString()


def run_ort(model, calib: dict, method: str, batch: int | None, workdir: Path, *, weight_type: str = "QInt8",
            reduce_range: bool = False) -> bytes:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src = workdir / "in.onnx"
    pre = workdir / "pre.onnx"
    out = workdir / "out.onnx"
    onnx.save(model, str(src))
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches_of(calib, batch or 32))

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=getattr(QuantType, weight_type),
                    calibrate_method=getattr(CalibrationMethod, method), reduce_range=reduce_range)
    return out.read_bytes()


def calib_only_ort(model, calib: dict, method: str, batch: int | None, workdir: Path) -> dict:
    """ONNX Runtime's calibrator alone: augment, run every batch, compute the ranges."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    src = workdir / "in.onnx"
    onnx.save(model, str(src))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches_of(calib, batch or 32))

        def get_next(self):
            return next(self.it, None)

    cal = create_calibrator(str(src), augmented_model_path=str(workdir / "aug.onnx"),
                            calibrate_method=getattr(CalibrationMethod, method))
    cal.collect_data(Reader())
    return cal.compute_data()


def calib_only_edgec(float_model, ir, calib: dict, method: str, batch: int | None) -> dict:
    """edgec's calibration alone: streaming statistics over every batch, then the ranges (the
    tensors to observe come from the IR being compiled, as in a compile)."""
    from edgec import calibration

    cs = calibdata.load_calibration(calib, float_model, batch_size=batch or 32)
    tensors = quantize_api.calibration_tensors(ir)
    stats = calibration.collect(float_model, tensors, cs, histograms=calibration.needs_histograms(method))
    return calibration.ranges_from_stats(float_model, stats, method=method)


def calibration_table(names: list[str]) -> list[dict]:
    """Calibration time and memory alone (no quantization, no error measuring), same data,
    same (lossless-compiled) float model for both tools."""
    rows = []
    for name in names:
        model, calib, _, _ = load_case(name)
        batch = fixed_batch(model)
        ir = edgec.from_model(model)
        edgec.run_passes(ir, LOSSLESS)
        float_model = ir.to_onnx()
        for ort_method, ours in (("MinMax", "minmax"), ("Percentile", "percentile")):
            with tempfile.TemporaryDirectory() as td, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _, t_ort, m_ort = measured(lambda: calib_only_ort(float_model, calib, ort_method, batch, Path(td)))
                _, t_ours, m_ours = measured(lambda: calib_only_edgec(float_model, ir, calib, ours, batch))
            rows.append({"model": name, "method": ours, "ort_s": t_ort, "edgec_s": t_ours,
                         "ort_mb": m_ort / 2**20, "edgec_mb": m_ours / 2**20})
    return rows


def fmt_calibration(rows: list[dict]) -> str:
    lines = [f"{'model':20s} {'method':11s} {'ORT s':>8s} {'edgec s':>8s} {'ratio':>6s} {'ORT MB':>8s} "
             f"{'edgec MB':>9s} {'ratio':>6s}"]
    for r in rows:
        lines.append(f"{r['model']:20s} {r['method']:11s} {r['ort_s']:8.3f} {r['edgec_s']:8.3f} "
                     f"{r['edgec_s'] / r['ort_s']:6.2f} {r['ort_mb']:8.2f} {r['edgec_mb']:9.2f} "
                     f"{r['edgec_mb'] / max(r['ort_mb'], 1e-9):6.2f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- int8 schemes by ISA
SCHEMES = {  # name -> how it is built
    "edgec U8S8 (isa=vnni)": ("edgec", dict(weight_type="int8")),
    "edgec U8U8 (isa=avx2)": ("edgec", dict(weight_type="uint8")),
    "edgec U8S7 (scheme=u8s7)": ("edgec", dict(weight_type="int7")),
    "ORT U8S8": ("ort", dict(weight_type="QInt8")),
    "ORT U8U8": ("ort", dict(weight_type="QUInt8")),
    "ORT U8S8 reduce_range": ("ort", dict(weight_type="QInt8", reduce_range=True)),
}


def schemes_table(names: list[str], repeat: int) -> list[dict]:
    """Each int8 scheme, edgec's and ONNX Runtime's quantize_static (MinMax, per-channel, QDQ):
    SQNR against FP32 in reference arithmetic (exact QDQ, the same on any host) and on this
    host's kernels (where a no-VNNI CPU's int16 saturation shows), and latency on this host."""
    rows = []
    for name in names:
        model, calib, test, labels = load_case(name)
        batch = fixed_batch(model)
        fp32 = model.SerializeToString()
        ref = outputs(fp32, test, batch, reference=True).astype(np.float64)
        lat0 = latency(fp32, test, batch, repeat)
        for label, (tool, opts) in SCHEMES.items():
            with tempfile.TemporaryDirectory() as td, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                qb = (run_edgec(model, calib, dict(mode="int8", method="minmax", **opts), batch) if tool == "edgec"
                      else run_ort(model, calib, "MinMax", batch, Path(td), **opts))
            row = {"model": name, "scheme": label,
                   "reference_db": quality(ref, outputs(qb, test, batch, reference=True), None),
                   "host_db": quality(ref, outputs(qb, test, batch), None),
                   "latency_vs_fp32": latency(qb, test, batch, repeat) / lat0}
            if labels is not None:
                row["host_accuracy"] = quality(ref, outputs(qb, test, batch), labels)
            rows.append(row)
        print(f"[done] {name}", file=sys.stderr)
    return rows


def fmt_schemes(rows: list[dict]) -> str:
    lines = [f"{'model':20s} {'scheme':26s} {'reference dB':>12s} {'host dB':>8s} {'host top-1':>10s} {'lat/fp32':>8s}"]
    for r in rows:
        acc = f"{r['host_accuracy'] * 100:9.2f}%" if "host_accuracy" in r else f"{'-':>10s}"
        lines.append(f"{r['model']:20s} {r['scheme']:26s} {r['reference_db']:12.1f} {r['host_db']:8.1f} {acc} "
                     f"{r['latency_vs_fp32']:8.2f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- main
def bench_model(name: str, variants: list[str], repeat: int) -> list[dict]:
    model, calib, test, labels = load_case(name)
    batch = fixed_batch(model)
    fp32 = model.SerializeToString()
    ref = outputs(fp32, test, batch).astype(np.float64)
    rows = [{"model": name, "variant": "fp32", "quality": quality(ref, ref, labels) if labels is not None else float("inf"),
             "seconds": 0.0, "peak_mb": 0.0, "latency_ms": latency(fp32, test, batch, repeat) * 1e3,
             "bytes": len(fp32)}]
    for v in variants:
        with tempfile.TemporaryDirectory() as td, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                if v in ORT_VARIANTS:
                    qb, secs, peak = measured(lambda: run_ort(model, calib, ORT_VARIANTS[v], batch, Path(td)))
                else:
                    qb, secs, peak = measured(lambda: run_edgec(model, calib, EDGEC_VARIANTS[v], batch))
            except Exception as e:  # a tool failing on a model is a result, not a crash
                rows.append({"model": name, "variant": v, "error": f"{type(e).__name__}: {str(e)[:120]}"})
                continue
        got = outputs(qb, test, batch)
        rows.append({"model": name, "variant": v, "quality": quality(ref, got, labels), "seconds": secs,
                     "peak_mb": peak / 2**20, "latency_ms": latency(qb, test, batch, repeat) * 1e3, "bytes": len(qb)})
    lat0 = rows[0]["latency_ms"]
    for r in rows:
        if "latency_ms" in r:
            r["latency_vs_fp32"] = r["latency_ms"] / lat0
    return rows


def scale_memory(samples: list[int]) -> list[dict]:
    """Quantization time and peak memory of the digits model against the calibration-set size."""
    model, calib, _, _ = load_case("digits")
    base = calib["input"]
    rows = []
    for n in samples:
        reps = -(-n // len(base))
        rng = np.random.default_rng(0)
        x = (np.concatenate([base] * reps)[:n] + rng.normal(0, 0.01, (n,) + base.shape[1:])).astype(np.float32)
        data = {"input": x}
        for v in ("ort-minmax", "edgec-minmax", "ort-percentile", "edgec-percentile"):
            with tempfile.TemporaryDirectory() as td, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if v.startswith("ort"):
                    _, secs, peak = measured(lambda: run_ort(model, data, ORT_VARIANTS[v], 40, Path(td)))
                else:
                    opts = dict(EDGEC_VARIANTS[v], bias_correction=False)
                    _, secs, peak = measured(lambda: run_edgec(model, data, opts, 40))
            rows.append({"samples": n, "variant": v, "seconds": secs, "peak_mb": peak / 2**20})
    return rows


def fmt_table(rows: list[dict]) -> str:
    lines = [f"{'model':20s} {'variant':17s} {'quality':>8s} {'vs ORT':>7s} {'quant s':>8s} {'vs ORT':>7s} "
             f"{'peak MB':>8s} {'vs ORT':>7s} {'lat/fp32':>8s} {'bytes':>8s} {'vs ORT':>7s}"]
    by_key = {(r["model"], r["variant"]): r for r in rows}
    for r in rows:
        if "error" in r:
            lines.append(f"{r['model']:20s} {r['variant']:17s} FAILED: {r['error']}")
            continue
        peer = None
        if r["variant"].startswith("edgec-") and r["variant"] != "edgec-fp16":
            peer = by_key.get((r["model"], "ort-minmax" if r["variant"] == "edgec-minmax" else "ort-percentile"))
            if peer is not None and "error" in peer:
                peer = None

        def ratio(key, fmt="{:.2f}"):
            if peer is None or not peer.get(key):
                return "-"
            return fmt.format(r[key] / peer[key])

        q = r["quality"]
        is_acc = r["model"] == "digits"
        qs = f"{q * 100:7.2f}%" if is_acc else (f"{q:6.1f}dB" if np.isfinite(q) else "     ref")
        dq = "-" if peer is None else (f"{(q - peer['quality']) * 100:+.2f}" if is_acc else f"{q - peer['quality']:+.1f}")
        lines.append(f"{r['model']:20s} {r['variant']:17s} {qs:>8s} {dq:>7s} {r['seconds']:8.2f} {ratio('seconds'):>7s} "
                     f"{r['peak_mb']:8.2f} {ratio('peak_mb'):>7s} {r['latency_vs_fp32']:8.2f} {r['bytes']:8d} "
                     f"{ratio('bytes'):>7s}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="digits," + ",".join(ALL_MODELS),
                    help="digits, the builders (" + ",".join(ALL_MODELS) + "), the structure builders ("
                    + ",".join(STRUCTURE_MODELS) + ") and the NPU builders (" + ",".join("npu_" + m for m in NPU_MODELS)
                    + ")")
    ap.add_argument("--variants", default=",".join(list(ORT_VARIANTS) + list(EDGEC_VARIANTS)))
    ap.add_argument("--repeat", type=int, default=200, help="latency runs per model (median)")
    ap.add_argument("--scale", action="store_true", help="also measure memory vs calibration-set size")
    ap.add_argument("--json", help="write the rows to this file")
    ap.add_argument("--schemes", action="store_true",
                    help="only the int8 schemes by ISA (U8S8/U8U8/U8S7, edgec and ORT): reference and host SQNR")
    args = ap.parse_args(argv)
    if args.schemes:
        names = [m for m in args.models.split(",") if m]
        rows = schemes_table(names, min(args.repeat, 50))
        print(f"onnxruntime {ort.__version__}, edgec {edgec.__version__}, {os.cpu_count()} cores, "
              f"this host: {runtime.host_description()}")
        print("SQNR of the first output against FP32 on held-out data; 'reference' = exact QDQ arithmetic "
              "(what edgec decides with, the same on any host), 'host' = this host's fused int8 kernels; "
              "latency on this host, 1 thread, relative to FP32")
        print(fmt_schemes(rows))
        if args.json:
            Path(args.json).write_text(json.dumps({"host": runtime.host_description(), "schemes": rows}, indent=1,
                                                  default=float))
        return 0
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in ORT_VARIANTS and v not in EDGEC_VARIANTS]
    if unknown:
        ap.error(f"unknown variant {unknown[0]}")
    rows = []
    for name in [m for m in args.models.split(",") if m]:
        if name != "digits" and name not in ALL_MODELS and name not in STRUCTURE_MODELS \
                and not (name.startswith("npu_") and name[4:] in NPU_MODELS):
            ap.error(f"unknown model {name}")
        rows.extend(bench_model(name, variants, args.repeat))
        print(f"[done] {name}", file=sys.stderr)
    print(f"onnxruntime {ort.__version__}, edgec {edgec.__version__}, {os.cpu_count()} cores")
    print("quality: top-1 accuracy (digits, delta in points) or output SQNR vs FP32 (dB, delta in dB); "
          "'vs ORT' compares with ort-minmax (edgec-minmax) or ort-percentile (other edgec variants)")
    print(fmt_table(rows))
    out = {"rows": rows}
    crows = calibration_table([m for m in args.models.split(",") if m])
    print("\ncalibration alone (statistics + ranges; no QDQ rewrite, no error measuring): edgec vs ORT's calibrator")
    print(fmt_calibration(crows))
    out["calibration"] = crows
    if args.scale:
        srows = scale_memory([200, 2000, 8000])
        print("\ncalibration memory vs samples (digits, batches of 40, bias correction off)")
        print(f"{'samples':>8s} {'variant':14s} {'seconds':>8s} {'peak MB':>8s}")
        for r in srows:
            print(f"{r['samples']:8d} {r['variant']:14s} {r['seconds']:8.2f} {r['peak_mb']:8.2f}")
        out["scale"] = srows
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
