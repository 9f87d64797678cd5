#!/usr/bin/env python
"""Pruning benchmark: structured channel pruning at several ratios, with and without
least-squares reconstruction.

Models: the digits example (``examples/digits``: top-1 accuracy on its 360 test digits,
calibration on its 200 ``calib.npz`` samples) and the builder models
(``edgec.builders.ALL_MODELS`` at static batch 1: output relative L2 error against the
unpruned model on 16 held-out N(0,1) samples, calibration on 32 others, each fed as a list
of batch-1 dicts; ``--held-out`` and ``--calib-samples`` change the counts).

For every model and ratio (``--ratios``, fraction of the channels of every prunable group),
``edgec.compile(model, None, prune=ratio, calib=..., reconstruct=False|True, round_to=1,
prune_mode=--prune-mode, importance=--importance)`` (L1 importance by default; ``--prune-mode``
uniform by default: every group the same ratio; ``sensitivity``: per-group ratios from the
measured output error). Columns:

* ``params`` / ``MACs``: ``report["after"]`` over ``report["before"]`` (the input model, BN
  still unfolded); the ``0%`` row is the lossless compile (``edgec.compile(model, None)``),
  which already folds BN;
* ``groups``: groups pruned / groups found (the rest are unprunable; reasons listed below);
* ``lat``: ONNX Runtime latency of the batch-1 input (``edgec.verify.latency_ms``, median of
  ``--repeat`` runs, graph optimisations on) over that of the lossless-compiled unpruned model,
  so BN folding does not count as a pruning gain. The two are measured in ``--rounds``
  alternating rounds (a fresh session each) and the ratio is of the medians over the rounds:
  these models run in tens of microseconds, where machine load is otherwise the signal.
  The 0% row gives the reference's absolute latency;
* ``plain`` / ``recon``: accuracy (digits, higher is better) or output relative L2 error
  ||y - y0|| / ||y0|| on the held-out inputs (builders, lower is better; y0 = unpruned model),
  without / with least-squares reconstruction; ``refit``: layers re-fitted / considered;
* ``compile s``: wall time of the reconstructed compile (one run).

A ratio that fails shows the exception class in its row instead of the numbers.

Also times the channel-group analysis alone
(``edgec.analysis.channels.find_groups(edgec.from_model(m))``, median of 3) on the generated
deep residual model of ``benchmarks/compile_speed.py`` (>= 5,000 nodes).

Reconstruction speed (model name ``resnet50``): a ResNet-50-size model generated with
``edgec.builders.GraphBuilder`` (7x7 stem, bottleneck blocks 3-4-6-3, 64..2048 channels,
1000 classes; 25.6M params, 4.1 GMACs at ``--r50-hw 224``), pruned ``--r50-ratio`` (30%) with
``--r50-samples`` (64) batch-1 N(0,1) calibration samples. Printed: the wall time of
``edgec.compile(..., prune=0.3, calib=..., round_to=1, prune_mode="uniform", importance="l1")`` with and without reconstruction, of
the reconstruction step alone (``edgec.passes.reconstruct.reconstruct`` on the same pruning,
median of ``--r50-runs``), and its speed-up over the implementation before the staged run
(commit 859006d: one export + session + full pass per layer), either run here once
(``--old-recon``, it takes minutes) or the figure measured on the development machine; the
relative L2 output error on 8 held-out inputs of the unpruned, plain-pruned and
reconstructed models; and the time of the channel scores alone (``importance.compute``) for
l1, wanda and obs on the first 16 of those samples. Times depend on the machine's load, which
is printed.

    python benchmarks/pruning.py
    python benchmarks/pruning.py --models digits,resnet --ratios 0.3 --repeat 500 --json out.json
    python benchmarks/pruning.py --models resnet50 --old-recon
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import types
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).parent))
from compile_speed import deep_model  # noqa: E402

import edgec  # noqa: E402
from edgec import importance, runtime, verify  # noqa: E402
from edgec.analysis import costs  # noqa: E402
from edgec.analysis.channels import find_groups  # noqa: E402
from edgec.builders import ALL_MODELS, GraphBuilder  # noqa: E402
from edgec.passes.prune_channels import apply_pruning, select  # noqa: E402
from edgec.passes.reconstruct import reconstruct  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "examples" / "digits"
N_CALIB = 32  # --calib-samples
N_HELD = 16  # --held-out
OLD_COMMIT = "859006d"  # the last commit with one export + session + full pass per re-fitted layer
# reconstruct() of OLD_COMMIT on resnet50(224), 30%, 64 samples, on the development machine
# (2 cores, AVX-512, shared): 262.3 s with the load average falling from 2.4 to 0.1 during the
# run (the lower of two runs: 514.3 s at load 5-6). The new code on the same machine: 34.9 s at
# load 0.1-1.1, 84-89 s at load 3; after the float32 Gram products and kept held-out rows:
# 30.2 and 30.9 s at load 2-3.
OLD_RECON_SECONDS = {(224, 64, 0.3): 262.3}


# ---------------------------------------------------------------------- data
class Case:
    """A model with its calibration data and its held-out metric."""

    def __init__(self, name: str, n_calib: int = N_CALIB, n_held: int = N_HELD):
        self.name = name
        if name == "digits":
            self.model = onnx.load(str(DIGITS / "model.onnx"))
            e = np.load(DIGITS / "eval.npz")
            self.input = self.model.graph.input[0].name
            self.test_x, self.labels = e["input"], e["labels"]
            self.calib = str(DIGITS / "calib.npz")
            self.metric = "acc"
        else:
            self.model = ALL_MODELS[name](batch=1)
            spec = self.model.graph.input[0]
            self.input = spec.name
            shape = [d.dim_value or 1 for d in spec.type.tensor_type.shape.dim]
            rng = np.random.default_rng(0)
            self.calib = [{self.input: rng.standard_normal(shape).astype(np.float32)} for _ in range(n_calib)]
            held = np.random.default_rng(1).standard_normal([n_held] + shape[1:]).astype(np.float32)
            self.test_x, self.labels = held, None
            self.metric = "relL2"
        self.batch1 = {self.input: self.test_x[:1]}
        self.reference = None if self.labels is not None else self.outputs(self.model)

    def outputs(self, model: onnx.ModelProto) -> np.ndarray:
        if self.labels is not None:
            return list(verify.run(model, {self.input: self.test_x}).values())[0]
        # static batch 1: one run a sample, then stacked
        outs = [list(verify.run(model, {self.input: self.test_x[i:i + 1]}).values())[0]
                for i in range(len(self.test_x))]
        return np.concatenate(outs)

    def score(self, model: onnx.ModelProto) -> float:
        y = self.outputs(model)
        if self.labels is not None:
            return float((y.argmax(axis=1) == self.labels).mean())
        y0 = self.reference
        return float(np.linalg.norm((y - y0).ravel()) / max(np.linalg.norm(y0.ravel()), 1e-30))


def case_names() -> list[str]:
    return ["digits"] + list(ALL_MODELS)


# ---------------------------------------------------------------------- measurements
def _err(e: BaseException) -> str:
    return type(e).__name__


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:200] if s else ""


def measure_case(case: Case, ratios: list[float], repeat: int, rounds: int, debug: bool,
                 round_to: int = 1, prune_mode: str = "uniform", importance: str = "l1") -> list[dict]:
    rows = []
    base = None
    # ratio 0: the lossless compile, the latency reference
    row = {"model": case.name, "ratio": 0.0, "metric": case.metric}
    try:
        t0 = time.perf_counter()
        r0 = edgec.compile(case.model, None)
        row["compile_seconds"] = round(time.perf_counter() - t0, 4)
        rep = r0.report
        row.update(params_before=rep["before"]["params"], params_after=rep["after"]["params"],
                   macs_before=rep["before"]["macs"], macs_after=rep["after"]["macs"])
        row["latency_ms"] = statistics.median(verify.latency_ms(r0.model, case.batch1, runs=repeat)
                                              for _ in range(rounds))
        base = r0.model
        row["latency_ratio"] = 1.0
        s = case.score(r0.model)
        row["plain"] = row["recon"] = s
        row["input_score"] = case.score(case.model)  # the unmodified model (digits: 0.9889)
    except Exception as e:
        row["error"] = _err(e)
        print(f"    {case.name} lossless: {_err(e)}: {_first_line(e)}", file=sys.stderr)
        if debug:
            traceback.print_exc()
    rows.append(row)

    for ratio in ratios:
        print(f"  {case.name} prune {ratio:g} ...", file=sys.stderr, flush=True)
        row = {"model": case.name, "ratio": ratio, "metric": case.metric}
        try:
            res = {}
            for rec in (False, True):
                t0 = time.perf_counter()
                res[rec] = edgec.compile(case.model, None, prune=ratio, calib=case.calib, reconstruct=rec,
                                         round_to=round_to, prune_mode=prune_mode, importance=importance)
                row["compile_seconds"] = round(time.perf_counter() - t0, 4)
            rep = res[True].report
            row.update(params_before=rep["before"]["params"], params_after=rep["after"]["params"],
                       macs_before=rep["before"]["macs"], macs_after=rep["after"]["macs"])
            plain_rep = res[False].report["after"]
            if (plain_rep["params"], plain_rep["macs"]) != (rep["after"]["params"], rep["after"]["macs"]):
                row["note"] = (f"plain and reconstructed differ in size: params {plain_rep['params']} vs "
                               f"{rep['after']['params']}, MACs {plain_rep['macs']} vs {rep['after']['macs']}"
                               " (the refit adds a bias to layers that had none)")
            pr = rep.get("pruning", {})
            groups = pr.get("groups", [])
            row["groups_found"] = len(groups)
            row["groups_pruned"] = sum(1 for g in groups if g.get("removed"))
            row["unprunable"] = sorted({g.get("reason", "") for g in groups if not g.get("prunable")})
            refit = pr.get("reconstruction", []) or []
            row["refit"] = sum(1 for x in refit if x.get("refit"))
            row["refit_considered"] = len(refit)
            try:
                # alternate the reference and the pruned model, one fresh session each, so machine
                # load drifts hit both: the ratio is median(pruned) / median(reference)
                ref, pruned = [], []
                for _ in range(rounds):
                    if base is not None:
                        ref.append(verify.latency_ms(base, case.batch1, runs=repeat))
                    pruned.append(verify.latency_ms(res[True].model, case.batch1, runs=repeat))
                row["latency_ms"] = statistics.median(pruned)
                row["latency_ms_reference"] = statistics.median(ref) if ref else None
                row["latency_ratio"] = row["latency_ms"] / row["latency_ms_reference"] if ref else None
            except Exception as e:
                row["latency_error"] = _err(e)
                print(f"    {case.name} {ratio:g} latency: {_err(e)}: {_first_line(e)}", file=sys.stderr)
            for rec, key in ((False, "plain"), (True, "recon")):
                try:
                    row[key] = case.score(res[rec].model)
                except Exception as e:
                    row[key + "_error"] = _err(e)
                    print(f"    {case.name} {ratio:g} {key} eval: {_err(e)}: {_first_line(e)}", file=sys.stderr)
        except Exception as e:
            row["error"] = _err(e)
            row["error_message"] = _first_line(e)
            print(f"    {case.name} {ratio:g}: {_err(e)}: {_first_line(e)}", file=sys.stderr)
            if debug:
                traceback.print_exc()
        rows.append(row)
    return rows


def measure_analysis(blocks: int, runs: int = 3) -> dict:
    m = deep_model(blocks)
    out = {"model": f"deep{len(m.graph.node)}", "nodes": len(m.graph.node)}
    times = []
    try:
        t0 = time.perf_counter()
        edgec.from_model(m)
        out["import_seconds"] = round(time.perf_counter() - t0, 4)
        for _ in range(runs):
            ir = edgec.from_model(m)  # a fresh IR each run; only find_groups is timed
            t0 = time.perf_counter()
            groups = find_groups(ir)
            times.append(time.perf_counter() - t0)
        out["groups"] = len(groups)
        out["prunable"] = sum(1 for g in groups if g.prunable)
        out["unprunable_reasons"] = sorted({g.reason for g in groups if not g.prunable})
        out["seconds"] = round(statistics.median(times), 4)
        out["runs"] = [round(t, 4) for t in times]
    except Exception as e:
        out["error"] = _err(e)
        print(f"    analysis: {_err(e)}: {_first_line(e)}", file=sys.stderr)
    return out


# ---------------------------------------------------------------------- reconstruction speed
def resnet50(hw: int = 224, batch: int = 1, num_classes: int = 1000, seed: int = 0) -> onnx.ModelProto:
    """ResNet-50's shape from edgec's builder: 7x7/2 stem, 3x3/2 max pool, bottleneck blocks
    3-4-6-3 (1x1-3x3-1x1, 64..512 wide, 256..2048 out, projection shortcuts), GAP-Gemm."""
    b = GraphBuilder("resnet50", seed)
    x = b.input("input", [batch, 3, hw, hw])
    y = b.maxpool(b.conv_bn(x, 64, 7, 2), 3, 2, 1)
    for stage, (mid, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
        for i in range(blocks):
            stride = 2 if i == 0 and stage > 0 else 1
            z = b.conv_bn(b.conv_bn(b.conv_bn(y, mid, 1), mid, 3, stride), 4 * mid, 1, act=None)
            skip = b.conv_bn(y, 4 * mid, 1, stride, act=None) if i == 0 else y
            y = b.relu(b.add(z, skip))
    b.output(b.classifier(y, num_classes), "output")
    return b.build(resnet50.__doc__)


def old_reconstruct():
    """``reconstruct`` as of OLD_COMMIT, read with git from this checkout (None without git)."""
    try:
        src = subprocess.run(["git", "show", f"{OLD_COMMIT}:passes/reconstruct.py"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    mod = types.ModuleType("old_reconstruct")
    sys.modules[mod.__name__] = mod  # dataclasses look their module up
    exec(compile(src.split("@register")[0], f"{OLD_COMMIT}:passes/reconstruct.py", "exec"), mod.__dict__)
    return mod.reconstruct


def _pruned_ir(model: onnx.ModelProto, ratio: float):
    """(unpruned ONNX, IR pruned as compile prunes it: uniform, L1, round_to 1, kept map)."""
    ir = edgec.from_model(model)
    original = ir.to_onnx()
    groups = find_groups(ir)
    kept = apply_pruning(ir, groups, select(groups, importance.compute(ir, groups, "l1", None), ratio=ratio))
    return original, ir, kept


IMPORTANCE_TIMED = ("l1", "wanda", "obs")  # channel scores timed on the resnet50 model
IMPORTANCE_SAMPLES = 16


def measure_recon_speed(hw: int, n: int, ratio: float, runs: int, old: bool) -> dict:
    model = resnet50(hw)
    rng = np.random.default_rng(0)
    calib = [{"input": rng.standard_normal((1, 3, hw, hw)).astype(np.float32)} for _ in range(n)]
    held = [{"input": rng.standard_normal((1, 3, hw, hw)).astype(np.float32)} for _ in range(8)]
    out = {"model": f"resnet50 {hw}x{hw}", "hw": hw, "samples": n, "ratio": ratio, "load_before": os.getloadavg()}
    ir0 = edgec.from_model(model)
    c = costs.compute(ir0)
    out.update(params=c.params, macs=c.macs)
    groups0 = find_groups(ir0)
    out["importance_seconds"] = {}
    for method in IMPORTANCE_TIMED:  # the channel scores alone, on the first IMPORTANCE_SAMPLES samples
        t0 = time.perf_counter()
        importance.compute(ir0, groups0, method, calib[:IMPORTANCE_SAMPLES])
        out["importance_seconds"][method] = round(time.perf_counter() - t0, 2)
    for rec in (False, True):
        t0 = time.perf_counter()
        res = edgec.compile(model, None, prune=ratio, calib=calib, reconstruct=rec, round_to=1, prune_mode="uniform",
                            importance="l1")
        out["compile_seconds" if rec else "compile_seconds_plain"] = round(time.perf_counter() - t0, 2)
    times, cpu, report = [], [], []
    for _ in range(runs):
        original, ir, kept = _pruned_ir(model, ratio)
        plain = ir.to_onnx()
        t0, c0 = time.perf_counter(), time.process_time()
        report = reconstruct(ir, original, calib, kept)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    # the same step without the residual targets (each layer matching its own output), once:
    # what fitting the blocks' sums costs
    original, ir_plain, kept = _pruned_ir(model, ratio)
    t0 = time.perf_counter()
    reconstruct(ir_plain, original, calib, kept, residual=False)
    out["recon_seconds_no_residual"] = round(time.perf_counter() - t0, 2)
    out["recon_seconds"] = round(statistics.median(times), 2)
    out["recon_runs"] = [round(t, 2) for t in times]
    # CPU seconds (all threads of this process): far less sensitive to other jobs than wall time
    out["recon_cpu_seconds"] = round(statistics.median(cpu), 2)
    out["solves"] = sum(r.get("solves", 0) for r in report)
    out["layers"] = len(report)
    out["refit"] = sum(1 for r in report if r.get("refit"))
    out["parts"] = max((r.get("part", 0) for r in report), default=0)
    out["rel_l2_plain"] = runtime.output_error(original, plain, held)["rel_l2"]
    out["rel_l2_recon"] = runtime.output_error(original, ir.to_onnx(), held)["rel_l2"]
    out["rel_l2_compile"] = runtime.output_error(original, res.model, held)["rel_l2"]
    if old:
        fn = old_reconstruct()
        if fn is None:
            out["old_error"] = f"git show {OLD_COMMIT} failed"
        else:
            original, ir, kept = _pruned_ir(model, ratio)
            t0 = time.perf_counter()
            fn(ir, original, calib, kept)
            out["old_seconds"] = round(time.perf_counter() - t0, 2)
            out["old_source"] = "measured now"
            out["rel_l2_old"] = runtime.output_error(original, ir.to_onnx(), held)["rel_l2"]
    elif (hw, n, ratio) in OLD_RECON_SECONDS:
        out["old_seconds"] = OLD_RECON_SECONDS[(hw, n, ratio)]
        out["old_source"] = "measured on the development machine (--old-recon runs it here)"
    out["load_after"] = os.getloadavg()
    return out


def print_recon_speed(r: dict) -> None:
    print(f"\nreconstruction speed: {r['model']} ({r['params'] / 1e6:.1f}M params, {r['macs'] / 1e9:.2f} GMACs), "
          f"{100 * r['ratio']:.0f}% of channels, {r['samples']} batch-1 calibration samples; load average "
          f"{r['load_before'][0]:.1f} before, {r['load_after'][0]:.1f} after ({os.cpu_count()} cores)")
    print(f"  compile with reconstruction   {r['compile_seconds']:8.2f} s   (without: {r['compile_seconds_plain']:.2f} s)")
    print(f"  reconstruction step alone     {r['recon_seconds']:8.2f} s   (median of {len(r['recon_runs'])}: "
          f"{', '.join(f'{t:.1f}' for t in r['recon_runs'])}; {r['refit']}/{r['layers']} layers re-fitted "
          f"in {r['parts']} staged parts)")
    print(f"  without residual targets      {r['recon_seconds_no_residual']:8.2f} s   (one run, after the ones above)")
    print(f"  channel scores ({IMPORTANCE_SAMPLES} samples)   " + ", ".join(
        f"{m} {t:.2f} s" for m, t in r["importance_seconds"].items()))
    print(f"  reconstruction CPU time       {r['recon_cpu_seconds']:8.2f} s   (all threads; {r['solves']} "
          f"factorisations choosing the ridge)")
    if "old_seconds" in r:
        print(f"  before ({OLD_COMMIT}, a pass per layer) {r['old_seconds']:8.2f} s   ({r['old_source']}): "
              f"speed-up {r['old_seconds'] / r['recon_seconds']:.1f}x")
    elif "old_error" in r:
        print(f"  before: {r['old_error']}")
    old = f", old implementation {r['rel_l2_old']:.4f}" if "rel_l2_old" in r else ""
    print(f"  rel L2 on 8 held-out inputs: pruned {r['rel_l2_plain']:.4f}, reconstructed {r['rel_l2_recon']:.4f} "
          f"(compiled: {r['rel_l2_compile']:.4f}){old}")


# ---------------------------------------------------------------------- table
def _ratio_str(after, before) -> str:
    if after is None or before in (None, 0):
        return "-"
    return f"{after}/{before} ({after / before:.2f})"


def _score(row, key) -> str:
    if key + "_error" in row:
        return row[key + "_error"]
    v = row.get(key)
    if v is None:
        return "-"
    return f"{v:.4f}" if row["metric"] == "acc" else f"{v:.2e}"


def print_table(rows: list[dict]) -> None:
    header = ["model", "ratio", "params", "MACs", "groups", "lat", "metric", "plain", "recon", "refit",
              "compile s"]
    table = []
    for r in rows:
        name, ratio = r["model"], f"{100 * r['ratio']:.0f}%"
        if "error" in r:
            table.append([name, ratio, r["error"]] + ["-"] * (len(header) - 3))
            continue
        lat = r.get("latency_error") or (f"{r['latency_ratio']:.2f}" if r.get("latency_ratio") is not None else "-")
        if r["ratio"] == 0:
            lat = f"1 ({r['latency_ms'] * 1000:.0f}us)" if r.get("latency_ms") is not None else "-"
        groups = f"{r['groups_pruned']}/{r['groups_found']}" if "groups_found" in r else "-"
        refit = f"{r['refit']}/{r['refit_considered']}" if "refit" in r else "-"
        table.append([name, ratio, _ratio_str(r.get("params_after"), r.get("params_before")),
                      _ratio_str(r.get("macs_after"), r.get("macs_before")), groups, lat, r["metric"],
                      _score(r, "plain"), _score(r, "recon"), refit, f"{r.get('compile_seconds', 0):.2f}"])
    widths = [max(len(row[i]) for row in [header] + table) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    print(line(header))
    print("-" * len(line(header)))
    prev = None
    for r, row in zip(rows, table):
        if prev is not None and r["model"] != prev:
            print()
        prev = r["model"]
        print(line(row))


def findings(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r["ratio"] == 0 or "error" in r:
            continue
        p, q = r.get("plain"), r.get("recon")
        if p is None or q is None:
            continue
        worse = q < p if r["metric"] == "acc" else q > p
        if worse:
            out.append(f"reconstruction did not help: {r['model']} at {100 * r['ratio']:.0f}% "
                       f"({r['metric']} plain {p:.4g}, recon {q:.4g})")
    for r in rows:
        if r["ratio"] and "error" not in r and r.get("groups_pruned") == 0:
            out.append(f"nothing pruned: {r['model']} at {100 * r['ratio']:.0f}% "
                       f"(unprunable: {'; '.join(r.get('unprunable', [])) or '-'})")
        if "note" in r:
            out.append(f"{r['model']} at {100 * r['ratio']:.0f}%: {r['note']}")
        if "error" in r and r["ratio"]:
            out.append(f"failed: {r['model']} at {100 * r['ratio']:.0f}%: {r['error']}: {r.get('error_message', '')}")
    return out


def _versions() -> dict:
    v = {"python": platform.python_version(), "onnx": onnx.__version__, "edgec": getattr(edgec, "__version__", "?")}
    for mod in ("onnxruntime", "numpy"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception as e:
            v[mod] = f"unavailable ({type(e).__name__})"
    v["cpus"] = os.cpu_count()
    v["machine"] = platform.machine()
    return v


# ---------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--ratios", default="0.2,0.3,0.5", help="comma-separated pruning ratios; default 0.2,0.3,0.5")
    ap.add_argument("--models", default="",
                    help="comma-separated name substrings (e.g. 'digits,resnet,deep'); default all")
    ap.add_argument("--repeat", type=int, default=200, help="ONNX Runtime latency runs (median); default 200")
    ap.add_argument("--rounds", type=int, default=5,
                    help="latency rounds, alternating the unpruned reference and the pruned model "
                         "(median over the rounds of each one's --repeat-run median); default 5")
    ap.add_argument("--round-to", type=int, default=1,
                    help="channel multiple (default 1: the ratio exactly; the cpu target's default is 8)")
    ap.add_argument("--prune-mode", default="uniform", choices=["uniform", "global", "sensitivity", "auto"],
                    help="channel allocation for the table (default uniform; auto: the compile default, measured per model)")
    ap.add_argument("--importance", default="l1",
                    help="channel importance for the table (default l1; activation and fused use the calibration data)")
    ap.add_argument("--calib-samples", type=int, default=N_CALIB,
                    help=f"builders: batch-1 N(0,1) calibration samples; default {N_CALIB}")
    ap.add_argument("--held-out", type=int, default=N_HELD,
                    help=f"builders: batch-1 N(0,1) held-out samples for the error; default {N_HELD}")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    ap.add_argument("--deep-blocks", type=int, default=460,
                    help="residual blocks in the generated deep model for the analysis timing "
                         "(11 nodes each); default 460 (5,066 nodes)")
    ap.add_argument("--r50-hw", type=int, default=224, help="resnet50 input size; default 224")
    ap.add_argument("--r50-samples", type=int, default=64, help="resnet50 calibration samples; default 64")
    ap.add_argument("--r50-ratio", type=float, default=0.3, help="resnet50 pruning ratio; default 0.3")
    ap.add_argument("--r50-runs", type=int, default=3, help="resnet50 reconstruction runs (median); default 3")
    ap.add_argument("--old-recon", action="store_true",
                    help=f"also run the reconstruction of commit {OLD_COMMIT} once on resnet50 (minutes)")
    ap.add_argument("--debug", action="store_true", help="print tracebacks of failures")
    args = ap.parse_args(argv)
    if args.repeat < 1 or args.rounds < 1 or args.calib_samples < 1 or args.held_out < 1 or args.round_to < 1:
        ap.error("--repeat, --rounds, --calib-samples and --held-out must be >= 1")
    try:
        ratios = [float(x) for x in args.ratios.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--ratios: not a list of numbers: {args.ratios!r}")
    if not ratios or any(not 0 < r < 1 for r in ratios):
        ap.error("--ratios must be in (0, 1)")
    wanted = [m.strip().lower() for m in args.models.split(",") if m.strip()]

    def selected(name):
        return not wanted or any(w in name.lower() for w in wanted)

    names = [n for n in case_names() if selected(n)]
    do_r50 = not wanted or "resnet50" in wanted  # by exact name: "resnet" alone does not start it
    deep_name = "deep"
    do_deep = selected(deep_name) or any(w in f"deep{11 * args.deep_blocks + 6}" for w in wanted)
    if not names and not do_deep and not do_r50:
        print(f"no model matches --models {args.models!r}; known: {', '.join(case_names())}, deep, resnet50",
              file=sys.stderr)
        return 2

    versions = _versions()
    print("edgec pruning benchmark: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"{args.importance} channel importance, --prune-mode {args.prune_mode}, round_to={args.round_to}; digits: accuracy on 360 test digits, calibration on "
          f"calib.npz (200); builders: batch 1, relative L2 output error on {args.held_out} held-out N(0,1) inputs, "
          f"calibration on {args.calib_samples} others")
    print(f"lat = ORT latency (batch 1, median of {args.repeat} runs, median of {args.rounds} rounds alternating with "
          "the reference) / lossless-compiled unpruned model; "
          "params/MACs = after/before (before = input model, BN unfolded)\n")

    t_start = time.perf_counter()
    rows: list[dict] = []
    for name in names:
        print(f"  {name} ...", file=sys.stderr, flush=True)
        try:
            case = Case(name, args.calib_samples, args.held_out)
        except Exception as e:
            print(f"    {name} setup: {_err(e)}: {_first_line(e)}", file=sys.stderr)
            rows.append({"model": name, "ratio": 0.0, "metric": "-", "error": _err(e)})
            continue
        rows.extend(measure_case(case, ratios, args.repeat, args.rounds, args.debug, args.round_to, args.prune_mode,
                                 args.importance))

    if rows:
        print_table(rows)
        notes = findings(rows)
        unprunable = {}
        for r in rows:
            for reason in r.get("unprunable", []):
                unprunable.setdefault(r["model"], set()).add(reason)
        digits_input = next((r["input_score"] for r in rows if r["model"] == "digits" and "input_score" in r), None)
        print("\nmetric: acc = top-1 accuracy (higher is better), relL2 = ||y - y0|| / ||y0|| against the "
              "unpruned model (lower is better); 0% row: the lossless compile"
              + (f" (digits input model accuracy {digits_input:.4f})" if digits_input is not None else ""))
        if unprunable:
            print("unprunable groups (reasons):")
            for m, reasons in unprunable.items():
                print(f"  {m}: {'; '.join(sorted(reasons))}")
        if notes:
            print("findings:")
            for n in notes:
                print(f"  - {n}")

    recon_speed = None
    if do_r50:
        print("  reconstruction speed on resnet50 ...", file=sys.stderr, flush=True)
        try:
            recon_speed = measure_recon_speed(args.r50_hw, args.r50_samples, args.r50_ratio, args.r50_runs,
                                              args.old_recon)
            print_recon_speed(recon_speed)
        except Exception as e:
            recon_speed = {"error": _err(e), "error_message": _first_line(e)}
            print(f"\nreconstruction speed: {_err(e)}: {_first_line(e)}")
            if args.debug:
                traceback.print_exc()

    analysis = None
    if do_deep:
        print("  channel-group analysis on the deep model ...", file=sys.stderr, flush=True)
        analysis = measure_analysis(args.deep_blocks)
        print("\nchannel-group analysis (find_groups on edgec.from_model(m); median of 3, IR import "
              "not included):")
        hdr = f"  {'model':<10} {'nodes':>6} {'groups':>7} {'prunable':>9} {'seconds':>8} {'import s':>9}"
        print(hdr)
        if "error" in analysis:
            print(f"  {analysis['model']:<10} {analysis['nodes']:>6} {analysis['error']}")
        else:
            print(f"  {analysis['model']:<10} {analysis['nodes']:>6} {analysis['groups']:>7} "
                  f"{analysis['prunable']:>9} {analysis['seconds']:>8.3f} {analysis['import_seconds']:>9.3f}")
            if analysis["unprunable_reasons"]:
                print(f"  unprunable: {'; '.join(analysis['unprunable_reasons'])}")

    total = time.perf_counter() - t_start
    print(f"\ntotal {total:.0f} s")
    if args.json:
        doc = {"versions": versions, "ratios": ratios, "repeat": args.repeat, "rounds": args.rounds,
               "n_calib": args.calib_samples, "n_held_out": args.held_out, "rows": rows, "analysis": analysis,
               "reconstruction_speed": recon_speed, "total_seconds": round(total, 2)}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2, default=str)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
