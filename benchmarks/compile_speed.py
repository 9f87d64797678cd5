#!/usr/bin/env python
"""Compile-speed benchmark: edgec's lossless pipeline against onnxsim, onnxoptimizer and
the plain ``onnx.load`` + ``onnx.save`` floor.

Models: the onnx wheel's light model zoo (``onnx/backend/test/data/light/*.onnx``) and a
generated deep residual CNN (``deep``, >= 5,000 nodes, built with ``edgec.builders``).

Every tool is timed end to end on the same file, from path to written file:

* ``floor``          onnx.load + onnx.save
* ``edgec``          edgec.compile(path, out)  (load, lossless pipeline, checker, save)
* ``onnxsim``        onnx.load + onnxsim.simplify (defaults) + onnx.save
* ``onnxoptimizer``  onnx.load + onnxoptimizer.optimize(model, PASSES) + onnx.save

One untimed warm-up run, then the median of ``--repeat`` runs. onnxsim and onnxoptimizer
are optional (not edgec dependencies): they are imported lazily and reported as not
installed when missing. Targets: edgec no slower than onnxsim, within 3x of load+save.

    python benchmarks/compile_speed.py                     # everything, 3 runs each
    python benchmarks/compile_speed.py --models deep,resnet --repeat 5 --json out.json
    python benchmarks/compile_speed.py --models deep --profile   # + cProfile of edgec
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import glob
import io
import json
import math
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import onnx

import edgec
from edgec.builders import GraphBuilder

ONNXOPT_PASSES = [
    "fuse_bn_into_conv", "eliminate_identity", "eliminate_nop_transpose", "fuse_consecutive_transposes",
    "eliminate_deadend", "eliminate_unused_initializer", "fuse_add_bias_into_conv", "eliminate_nop_dropout",
]
NOT_INSTALLED = "not installed (pip install onnxsim onnxoptimizer)"
TARGET_VS_ONNXSIM = 1.0  # edgec time / onnxsim time
TARGET_VS_FLOOR = 3.0    # edgec time / (load + save) time
TOOLS = ("floor", "edgec", "onnxsim", "onnxoptimizer")


# ------------------------------------------------------------------------------ models

def light_models() -> list[tuple[str, str]]:
    d = os.path.join(os.path.dirname(onnx.__file__), "backend/test/data/light")
    out = []
    for p in sorted(glob.glob(os.path.join(d, "*.onnx"))):
        name = os.path.basename(p)[:-5]
        out.append((name[len("light_"):] if name.startswith("light_") else name, p))
    return out


def deep_model(blocks: int = 460, channels: int = 8, hw: int = 8, seed: int = 0) -> onnx.ModelProto:
    """A long chain of residual blocks with clean-up work in each (11 nodes a block):

    conv-BN-ReLU, Identity, conv-BN, Dropout, Transpose(NHWC)+Transpose(NCHW), Add, ReLU.
    edgec should fold every BN, drop every Identity/Dropout and cancel every Transpose pair
    (11 -> 4 nodes a block). Small channels and spatial size keep it memory-light.
    """
    b = GraphBuilder("deep_residual", seed)
    x = b.input("input", [1, 3, hw, hw])
    x = b.conv_bn(x, channels, 3)
    for _ in range(blocks):
        y = b.identity(b.conv_bn(x, channels, 3))
        y = b.dropout(b.conv_bn(y, channels, 3, act=None))
        y = b.transpose(b.transpose(y, [0, 2, 3, 1]), [0, 3, 1, 2])
        x = b.relu(b.add(y, x))
    b.output(b.classifier(x, 10), "output")
    return b.build("edgec compile-speed benchmark: deep residual chain")


# ------------------------------------------------------------------------------ tools

@dataclass
class Timing:
    seconds: float | None = None       # median
    runs: list = field(default_factory=list)
    nodes_after: int | None = None
    out_bytes: int | None = None
    error: str | None = None           # shown instead of the time
    warmup_only: bool = False          # the warm-up took > --max-seconds: its time is the result


def _lazy(module: str):
    try:
        return __import__(module), None
    except ImportError:
        return None, NOT_INSTALLED
    except Exception as e:  # a broken install (ABI mismatch with this onnx, ...)
        return None, f"import failed: {type(e).__name__}"


def _load_save(path: str, out: str, transform=None) -> onnx.ModelProto:
    m = onnx.load(path)
    if transform is not None:
        m = transform(m)
    onnx.save(m, out)
    return m


def run_floor(path: str, out: str):
    m = _load_save(path, out)
    return len(m.graph.node), {}


def run_edgec(path: str, out: str):
    r = edgec.compile(path, out)
    return r.report["after"]["nodes"], {"report": r.report}


def run_onnxsim(path: str, out: str):
    onnxsim, _ = _lazy("onnxsim")

    def simplify(m):
        s, ok = onnxsim.simplify(m)
        return s

    m = _load_save(path, out, simplify)
    return len(m.graph.node), {}


def run_onnxoptimizer(path: str, out: str):
    onnxoptimizer, _ = _lazy("onnxoptimizer")
    m = _load_save(path, out, lambda m: onnxoptimizer.optimize(m, ONNXOPT_PASSES))
    return len(m.graph.node), {}


RUNNERS = {"floor": run_floor, "edgec": run_edgec, "onnxsim": run_onnxsim, "onnxoptimizer": run_onnxoptimizer}
OPTIONAL = {"onnxsim": "onnxsim", "onnxoptimizer": "onnxoptimizer"}


def time_tool(tool: str, path: str, workdir: str, repeat: int, max_seconds: float) -> tuple[Timing, dict]:
    if tool in OPTIONAL:
        mod, err = _lazy(OPTIONAL[tool])
        if mod is None:
            return Timing(error=err), {}
    out = os.path.join(workdir, f"{tool}.onnx")
    fn = RUNNERS[tool]
    t = Timing()
    extra: dict = {}
    for i in range(repeat + 1):  # run 0 is the warm-up
        gc.collect()
        t0 = time.perf_counter()
        try:
            nodes, extra = fn(path, out)
        except Exception as e:
            t.error = type(e).__name__
            t.runs = []
            print(f"    {tool}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
                  file=sys.stderr)
            return t, {}
        dt = time.perf_counter() - t0
        if i:
            t.runs.append(round(dt, 6))
        t.nodes_after = nodes
        t.out_bytes = _file_bytes(out)
        _remove(out)
        if i == 0 and dt > max_seconds:  # too slow to repeat: report the warm-up run
            t.runs, t.warmup_only = [round(dt, 6)], True
            break
    t.seconds = statistics.median(t.runs)
    return t, extra


def _file_bytes(path: str) -> int:
    n = os.path.getsize(path) if os.path.exists(path) else 0
    if os.path.exists(path + ".data"):  # edgec writes > 1.8 GB of weights beside the model
        n += os.path.getsize(path + ".data")
    return n


def _remove(path: str) -> None:
    for p in (path, path + ".data"):
        if os.path.exists(p):
            os.remove(p)


# ------------------------------------------------------------------------------ profile

# (label, file suffix or None for builtins, function-name substring): where edgec's time goes.
PHASES = [
    ("edgec.compile (total)", "compiler/api.py", "compile"),
    ("  loader.load_model (read + parse)", "compiler/loader.py", "load_model"),
    ("  loader.normalize_opset (version converter)", "compiler/loader.py", "normalize_opset"),
    ("  IR.from_onnx (gs.import_onnx)", "compiler/ir.py", "from_onnx"),
    ("  costs.compute (before + after)", "analysis/costs.py", "compute"),
    ("  PassManager.run", "compiler/pipeline.py", "run"),
    ("    IR.infer_shapes (export + onnx shape inference)", "compiler/ir.py", "infer_shapes"),
    ("    IR.remove_dead (gs Graph.cleanup)", "compiler/ir.py", "remove_dead"),
    ("    IR.toposort (gs Graph.toposort)", "compiler/ir.py", "toposort"),
    ("    IR.validate", "compiler/ir.py", "validate"),
    ("    pipeline._footprint (nodes/consts/params)", "compiler/pipeline.py", "_footprint"),
    ("  IR.to_onnx (all calls, incl. inside infer_shapes)", "compiler/ir.py", "to_onnx"),
    ("  loader.check_model (onnx.checker full_check)", "compiler/loader.py", "check_model"),
    ("  loader.save (serialize + write)", "compiler/loader.py", "save"),
    ("gs.export_onnx (all calls)", "exporters/onnx_exporter.py", "export_onnx"),
    ("onnx.shape_inference.infer_shapes (all calls)", "onnx/shape_inference.py", "infer_shapes"),
    ("onnx.checker.check_model (all calls)", "onnx/checker.py", "check_model"),
]


def _phase_seconds(stats: pstats.Stats) -> list[tuple[str, int, float]]:
    rows = []
    for label, suffix, func in PHASES:
        calls, ct = 0, 0.0
        for (fname, _line, fn), (_cc, nc, _tt, cum, _callers) in stats.stats.items():
            if suffix is None:
                hit = fname == "~" and func in fn
            else:
                hit = fn == func and fname.replace(os.sep, "/").endswith(suffix)
            if hit:
                calls += nc
                ct += cum
        rows.append((label, calls, ct))
    return rows


def profile_edgec(name: str, path: str, workdir: str, top: int = 15) -> dict:
    out = os.path.join(workdir, "profile.onnx")
    edgec.compile(path, out)  # warm-up
    gc.collect()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    edgec.compile(path, out)
    prof.disable()
    wall = time.perf_counter() - t0
    _remove(out)
    stats = pstats.Stats(prof)
    total = max(wall, 1e-9)

    print(f"\ncProfile of edgec.compile on {name} ({wall:.3f} s under the profiler)")
    print("\nwhere the time goes (cumulative seconds; nested rows are included in their parents):")
    phases = _phase_seconds(stats)
    for label, calls, ct in phases:
        print(f"  {label:<52} {calls:>6} calls {ct:>8.3f} s {100 * ct / total:>5.1f}%")

    def fmt(key):
        fname, line, fn = key
        if fname == "~":
            return fn
        parts = fname.replace(os.sep, "/").split("/")
        short = "/".join(parts[-2:]) if "site-packages" not in fname else "/".join(
            parts[parts.index("site-packages") + 1:])
        return f"{short}:{line}({fn})"

    items = sorted(stats.stats.items(), key=lambda kv: kv[1][3], reverse=True)
    print(f"\ntop {top} by cumulative time:")
    print(f"  {'ncalls':>9} {'tottime':>8} {'cumtime':>8}  function")
    top_cum = []
    for key, (cc, nc, tt, ct, _) in items[:top]:
        print(f"  {nc:>9} {tt:>8.3f} {ct:>8.3f}  {fmt(key)}")
        top_cum.append({"function": fmt(key), "ncalls": nc, "tottime": round(tt, 4), "cumtime": round(ct, 4)})
    items = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)
    print(f"\ntop {top} by own (tottime) time:")
    print(f"  {'ncalls':>9} {'tottime':>8} {'cumtime':>8}  function")
    top_tot = []
    for key, (cc, nc, tt, ct, _) in items[:top]:
        print(f"  {nc:>9} {tt:>8.3f} {ct:>8.3f}  {fmt(key)}")
        top_tot.append({"function": fmt(key), "ncalls": nc, "tottime": round(tt, 4), "cumtime": round(ct, 4)})
    return {"model": name, "wall_seconds": round(wall, 4),
            "phases": [{"phase": l.strip(), "calls": c, "seconds": round(s, 4)} for l, c, s in phases],
            "top_cumulative": top_cum, "top_tottime": top_tot}


def print_passes(name: str, report: dict, compile_seconds: float) -> list[dict]:
    passes = report.get("passes", [])
    in_passes = sum(p["seconds"] for p in passes)
    print(f"\nedgec per-pass seconds on {name} (last timed run; a pass's time includes the "
          f"dead-code/toposort/validate it triggers, not the shape inference before it):")
    print(f"  {'pass':<22} {'runs':>4} {'seconds':>8} {'share':>6} {'nodes -':>8} {'nodes +':>8}")
    for p in sorted(passes, key=lambda p: -p["seconds"]):
        print(f"  {p['name']:<22} {p['runs']:>4} {p['seconds']:>8.3f} {100 * p['seconds'] / compile_seconds:>5.1f}%"
              f" {p['nodes_removed']:>8} {p['nodes_added']:>8}")
    rest = compile_seconds - in_passes
    print(f"  {'(sum of passes)':<22} {'':>4} {in_passes:>8.3f} {100 * in_passes / compile_seconds:>5.1f}%")
    print(f"  {'(outside the passes)':<22} {'':>4} {rest:>8.3f} {100 * rest / compile_seconds:>5.1f}%"
          "   load, import, costs, shape inference, export, checker, save")
    print(f"  {'(edgec total, median)':<22} {'':>4} {compile_seconds:>8.3f}")
    return [{k: p[k] for k in ("name", "runs", "seconds", "nodes_removed", "nodes_added")} for p in passes]


# ------------------------------------------------------------------------------ table

def _s(t: Timing) -> str:
    if t.error:
        return t.error
    if t.seconds is None:
        return "-"
    return f"{t.seconds:.3f}" + ("*" if t.warmup_only else "")


def _n(t: Timing) -> str:
    return "-" if t.error or t.nodes_after is None else str(t.nodes_after)


def _ratio(a: Timing, b: Timing) -> float | None:
    if a.seconds is None or b.seconds is None or a.error or b.error or b.seconds <= 0:
        return None
    return a.seconds / b.seconds


def _r(x: float | None, target: float) -> str:
    if x is None:
        return "n/a"
    return f"{x:.2f}{'' if x <= target else ' MISS'}"


def _mb(t: Timing) -> str:
    return "-" if t.error or t.out_bytes is None else f"{t.out_bytes / 1e6:.1f}"


def print_table(rows: list[dict]) -> None:
    header = ["model", "nodes", "floor s", "edgec s", "edgec n", "edgec MB", "onnxsim s", "sim n", "sim MB",
              "onnxopt s", "opt n", "edgec/sim", "edgec/floor"]
    table = []
    for r in rows:
        t = r["_t"]
        table.append([r["model"], str(r["nodes_before"]), _s(t["floor"]), _s(t["edgec"]), _n(t["edgec"]),
                      _mb(t["edgec"]), _s(t["onnxsim"]), _n(t["onnxsim"]), _mb(t["onnxsim"]),
                      _s(t["onnxoptimizer"]), _n(t["onnxoptimizer"]),
                      _r(r["edgec_over_onnxsim"], TARGET_VS_ONNXSIM), _r(r["edgec_over_floor"], TARGET_VS_FLOOR)])
    widths = [max(len(row[i]) for row in [header] + table) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    print(line(header))
    print("-" * len(line(header)))
    for row in table:
        print(line(row))


def _geomean(xs):
    xs = [x for x in xs if x]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


# ------------------------------------------------------------------------------ main

def _versions() -> dict:
    v = {"python": platform.python_version(), "onnx": onnx.__version__, "edgec": getattr(edgec, "__version__", "?")}
    for mod in ("onnxsim", "onnxoptimizer", "onnxruntime", "onnx_graphsurgeon"):
        m, err = _lazy(mod)
        v[mod] = (getattr(m, "__version__", "?") if m else err)
    v["cpus"] = os.cpu_count()
    v["machine"] = platform.machine()
    return v


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per tool and model (median); default 3")
    ap.add_argument("--models", default="", help="comma-separated name substrings (e.g. 'deep,resnet'); default all")
    ap.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated subset of {','.join(TOOLS)}")
    ap.add_argument("--json", metavar="FILE", help="also write the rows (and profile) as JSON")
    ap.add_argument("--profile", nargs="?", const="deep", metavar="MODEL",
                    help="cProfile edgec on MODEL (default: the deep model) and print the top 15")
    ap.add_argument("--max-seconds", type=float, default=30.0,
                    help="a tool whose warm-up run takes longer is not repeated; its one run is reported "
                         "with a '*' (default 30)")
    ap.add_argument("--deep-blocks", type=int, default=460,
                    help="residual blocks in the generated deep model (11 nodes each); default 460 (5,066 nodes)")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    bad = [t for t in tools if t not in TOOLS]
    if bad:
        ap.error(f"unknown tool(s) {bad}; known: {', '.join(TOOLS)}")
    wanted = [m.strip().lower() for m in args.models.split(",") if m.strip()]

    with tempfile.TemporaryDirectory(prefix="edgec_bench_") as workdir:
        deep = deep_model(args.deep_blocks)
        deep_name = f"deep{len(deep.graph.node)}"
        deep_path = os.path.join(workdir, f"{deep_name}.onnx")
        onnx.save(deep, deep_path)
        del deep
        models = light_models() + [(deep_name, deep_path)]
        if wanted:
            models = [(n, p) for n, p in models if any(w in n.lower() for w in wanted)]
        if not models:
            print(f"no model matches --models {args.models!r}", file=sys.stderr)
            return 2

        versions = _versions()
        print("edgec compile-speed benchmark: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
        print(f"median of {args.repeat} timed run(s) after 1 warm-up; every time is path -> written file "
              "(load + work + save)")
        print(f"targets: edgec/onnxsim <= {TARGET_VS_ONNXSIM:g} (edgec no slower than onnxsim), "
              f"edgec/floor <= {TARGET_VS_FLOOR:g} (within {TARGET_VS_FLOOR:g}x of onnx.load + onnx.save); "
              "MISS marks a miss\n")

        rows = []
        deep_report = None
        for name, path in models:
            print(f"  timing {name} ...", file=sys.stderr, flush=True)
            nodes_before = len(onnx.load(path, load_external_data=False).graph.node)
            t: dict[str, Timing] = {}
            extras: dict[str, dict] = {}
            for tool in TOOLS:
                if tool in tools:
                    t[tool], extras[tool] = time_tool(tool, path, workdir, args.repeat, args.max_seconds)
                else:
                    t[tool], extras[tool] = Timing(error="skipped"), {}
            report = extras.get("edgec", {}).get("report")
            if name == deep_name and report:
                deep_report = report
            rows.append({
                "model": name,
                "nodes_before": nodes_before,
                "edgec_nodes_before": report["before"]["nodes"] if report else None,
                **{tool: asdict(t[tool]) for tool in TOOLS},
                "edgec_over_onnxsim": _ratio(t["edgec"], t["onnxsim"]),
                "edgec_over_floor": _ratio(t["edgec"], t["floor"]),
                "_t": t,
            })

        print_table(rows)
        over_sim = [r["edgec_over_onnxsim"] for r in rows if r["edgec_over_onnxsim"] is not None]
        over_floor = [r["edgec_over_floor"] for r in rows if r["edgec_over_floor"] is not None]
        summary = {}
        if over_sim:
            summary["edgec_over_onnxsim_geomean"] = _geomean(over_sim)
            summary["meets_onnxsim_target"] = sum(x <= TARGET_VS_ONNXSIM for x in over_sim)
            print(f"\nedgec/onnxsim: geomean {summary['edgec_over_onnxsim_geomean']:.2f}, "
                  f"target met on {summary['meets_onnxsim_target']}/{len(over_sim)} models")
        if over_floor:
            summary["edgec_over_floor_geomean"] = _geomean(over_floor)
            summary["meets_floor_target"] = sum(x <= TARGET_VS_FLOOR for x in over_floor)
            print(f"edgec/floor:   geomean {summary['edgec_over_floor_geomean']:.2f}, "
                  f"target met on {summary['meets_floor_target']}/{len(over_floor)} models")
        if any(r["_t"][k].warmup_only for r in rows for k in TOOLS):
            print(f"*: one run only (the warm-up took > --max-seconds {args.max_seconds:g})")
        print("columns: 'n' = nodes after, 'MB' = written file size; onnxsim runs with its defaults "
              "(it materializes ConstantOfShape weights, hence large files on the zoo's light models); "
              f"onnxoptimizer passes: {', '.join(ONNXOPT_PASSES)} (its fuse_bn_into_conv emits the BN "
              "arithmetic as nodes for a later constant folding, so 'opt n' can grow)")

        passes = None
        if deep_report is not None:
            deep_row = next(r for r in rows if r["model"] == deep_name)
            passes = print_passes(deep_name, deep_report, deep_row["_t"]["edgec"].seconds)

        prof = None
        if args.profile:
            target = [(n, p) for n, p in light_models() + [(deep_name, deep_path)]
                      if args.profile.lower() in n.lower()]
            if not target:
                print(f"--profile: no model matches {args.profile!r}", file=sys.stderr)
            else:
                prof = profile_edgec(*target[0], workdir)

        if args.json:
            for r in rows:
                r.pop("_t", None)
            doc = {"versions": versions, "repeat": args.repeat,
                   "targets": {"edgec_over_onnxsim": TARGET_VS_ONNXSIM, "edgec_over_floor": TARGET_VS_FLOOR},
                   "onnxoptimizer_passes": ONNXOPT_PASSES, "rows": rows, "summary": summary,
                   "deep_passes": passes, "profile": prof}
            with open(args.json, "w") as f:
                json.dump(doc, f, indent=2)
            print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
