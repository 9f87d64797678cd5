"""The ``edgec`` command line. It only parses arguments and calls the public API.

Exit codes: 0 success, 2 a user mistake (one line on stderr), 1 an internal failure (the pass
that failed is named; set EDGEC_DEBUG=1 for the traceback) or a failed check, 130 on Ctrl-C and
143 on SIGTERM (one line; nothing is written). This module imports only the standard library
until arguments are parsed, so an interrupt during the heavy imports is handled like any other.
When stderr is not a terminal, warnings and progress are held back and printed only when the
command does not end in a user error, so a user error is exactly one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
import warnings

from .errors import InternalError, UserError, VerificationError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is a UserError: one line, exit 2 (no usage dump)."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message} (see `{self.prog} --help`)")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that temporary files are cleaned up."""


_SIGNALLED: list[int] = []  # the signals received: an exception after one is the signal's doing


def _on_signal(signum, frame):
    _SIGNALLED.append(signum)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="edgec", description="Compile ONNX models for edge devices.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    c = sub.add_parser("compile", help="optimise a model for a target and write it")
    c.add_argument("model", help="input .onnx file (never modified)")
    c.add_argument("-o", "--output", required=True, help="output .onnx file (written atomically)")
    c.add_argument("-t", "--target", default="cpu", help="target device family (see `edgec targets`; default cpu)")
    c.add_argument("--target-option", action="append", default=[], metavar="KEY=VALUE",
                   help="override a target profile option, e.g. trt=10 or platform=rk3566 (repeatable)")
    c.add_argument("--input-shape", action="append", default=[], metavar="NAME=D1,D2,...",
                   help="fix an input's shape, e.g. input=1,3,224,224 (repeatable; static-shape targets need it)")
    c.add_argument("--passes", help="comma-separated passes to run instead of the target's pipeline")
    c.add_argument("--verify", action="store_true",
                   help="compare ONNX Runtime outputs with the original; fail (exit 1, nothing written) on a mismatch")
    c.add_argument("--inputs", help=".npz keyed by input name (or .npy for one input) used by --verify")
    c.add_argument("--eval", dest="eval_data", help=".npz with the model's inputs and 'labels': top-1 accuracy before/after")
    c.add_argument("--rtol", type=float, default=1e-4, help="--verify relative tolerance (default 1e-4)")
    c.add_argument("--atol", type=float, default=1e-5, help="--verify absolute tolerance (default 1e-5)")
    c.add_argument("--max-error", type=float, help="lossy compiles: fail (exit 1, nothing written) when the output's "
                   "relative L2 error against the original exceeds this (e.g. 0.01)")
    c.add_argument("--calib", help="calibration data: .npz keyed by input name, .npy, a folder of them or of images, "
                   "or 'random' (explicitly, with a warning)")
    c.add_argument("--calib-samples", type=int, help="use at most this many calibration samples")
    im = c.add_argument_group("calibration images (a --calib folder of images)")
    im.add_argument("--image-size", metavar="HxW", help="resize to HxW (default: the model's input size)")
    im.add_argument("--image-resize", choices=["bilinear", "nearest"], default="bilinear")
    im.add_argument("--image-layout", choices=["NCHW", "NHWC"], default="NCHW")
    im.add_argument("--image-channels", choices=["RGB", "BGR", "GRAY"], default="RGB")
    im.add_argument("--image-scale", type=float, default=255.0, help="divide pixels by this first (255: 8-bit -> [0,1])")
    im.add_argument("--image-mean", metavar="M,...", help="per-channel mean subtracted after scaling")
    im.add_argument("--image-std", metavar="S,...", help="per-channel std divided by after the mean")
    g = c.add_argument_group("pruning (dependency-aware structured channel pruning)")
    g.add_argument("--prune", type=float, metavar="RATIO", help="remove this fraction of channels (e.g. 0.3)")
    g.add_argument("--prune-macs", type=float, metavar="FRACTION", help="remove this fraction of MACs (solves for the ratio)")
    g.add_argument("--importance", default="auto", choices=["auto", "l1", "l2", "bn", "activation", "fused", "wanda", "obs"],
                   help="channel importance (default auto: with --calib, l1, wanda or obs, whichever --prune-mode "
                        "auto measures best; without it l1; activation/fused/wanda/obs use --calib; wanda: activation "
                        "RMS x the norm of the weights that read the channel; obs: the error the channel's removal "
                        "leaves in the layers that read it after their least-squares re-fit)")
    g.add_argument("--prune-mode", default="auto", choices=["auto", "uniform", "global", "sensitivity", "balanced", "local"],
                   help="same ratio in every group, one global ranking, or per-group ratios from the output "
                        "error measured on --calib (balanced: no group beyond 1.5x the ratio; sensitivity: 2x), or "
                        "from the error each group's removal leaves after the re-fit of the layers reading it "
                        "(local, OBS; no group beyond 1.5x); default auto: with --calib, l1/uniform, "
                        "wanda/sensitivity, obs/sensitivity, obs/balanced and obs/local each prune and re-fit on 3/4 "
                        "of the samples and the lowest output error on "
                        "the other 1/4 wins; without --calib, uniform")
    g.add_argument("--prune-steps", type=int, default=1, help="prune progressively in K steps, re-fitting after each")
    g.add_argument("--round-to", type=int, help="keep channel counts multiples of N (default: the target's)")
    g.add_argument("--max-layer-ratio", type=float, default=0.9, help="never remove more than this from a group (0.9)")
    g.add_argument("--no-reconstruct", action="store_true", help="skip the least-squares re-fit of pruned layers")
    q = c.add_argument_group("quantization")
    q.add_argument("--quantize", choices=["int8", "fp16", "mixed", "vendor"],
                   help="int8 static QDQ, fp16, mixed (per-layer FP32/FP16/INT8/INT4 from measured sensitivity), or "
                        "vendor (-t rknn: a float model, the calibration dataset and a build script for the "
                        "toolchain's own int8 quantizer)")
    q.add_argument("--calib-method", default="auto",
                   help="auto (each method's int8 plan measured on the calibration data, the lowest output error kept), "
                        "minmax, percentile, entropy or mse; or per tensor class, e.g. "
                        "default=minmax,unbounded=percentile")
    q.add_argument("--percentile", type=float, default=99.99, help="percentile for --calib-method percentile (99.99)")
    q.add_argument("--activations", choices=["asymmetric", "symmetric"], help="activation scheme (default: the target's)")
    q.add_argument("--weights", choices=["per-channel", "per-tensor"], help="weight scales (default: the target's)")
    q.add_argument("--keep-float", default="", metavar="NAME,...", help="nodes or tensors that stay float")
    q.add_argument("--max-bytes", type=int, help="--quantize mixed: the smallest plan whose weights fit this size")
    q.add_argument("--strict-int8", action="store_true",
                   help="--quantize int8: keep every op int8 even above the error budget (no fallback to float; "
                        "a collapsed result still fails)")
    q.add_argument("--no-16bit", action="store_true",
                   help="--quantize int8: the fallback keeps ops float only, never 16-bit activations (cpu, neon: "
                        "ONNX Runtime runs the ops around a 16-bit tensor at float speed)")
    q.add_argument("--rounding", choices=["nearest", "gptq"], default="nearest",
                   help="--quantize int8: nearest (default), or gptq: weight rounding chosen for each layer's "
                        "output, kept where it measures better (its float64 linear algebra can choose other "
                        "levels on another BLAS build)")
    c.add_argument("--goal", choices=["latency", "size", "accuracy"],
                   help="let edgec choose pruning and precision for the target within --max-error/--max-bytes")
    _executor_arguments(c)
    c.add_argument("--bench", action="store_true", help="measure ONNX Runtime latency before and after")
    c.add_argument("--report", help="write the report as JSON to this file")
    c.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    c.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")

    i = sub.add_parser("inspect", help="what is inside a model and what it costs")
    i.add_argument("model")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.add_argument("--top", type=int, default=10, help="how many of the largest layers to list (default 10)")
    i.add_argument("--groups", action="store_true", help="list every channel group: prunable or not, and why")

    b = sub.add_parser("batch", help="run the compiles of a manifest (JSON or TOML), here or on a Ray cluster")
    b.add_argument("manifest", help='{"jobs": [{"model": ..., "target": ..., "output": ..., "options": {...}}]}')
    _executor_arguments(b)
    b.add_argument("--json", action="store_true", help="print the summary as JSON")

    ps = sub.add_parser("passes", help="list every pass")
    ps.add_argument("--json", action="store_true")
    ts = sub.add_parser("targets", help="list the targets")
    ts.add_argument("--json", action="store_true")
    return p


def _executor_arguments(p) -> None:
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="where calibration shards, sensitivity runs, --goal candidates and batch jobs run: in this "
                        "process (default) or as Ray tasks (pip install \"edgec[ray]\")")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="the Ray cluster to use with --executor ray (default: $EDGEC_RAY_ADDRESS, else a local Ray "
                        "started for this command)")


def _key_values(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UserError(f"{flag} {item!r}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def _shapes(items: list[str]) -> dict[str, list[int]]:
    shapes = {}
    for name, value in _key_values(items, "--input-shape").items():
        try:
            dims = [int(d) for d in value.replace("x", ",").split(",")]
        except ValueError:
            raise UserError(f"--input-shape {name}={value}: dims must be integers, e.g. {name}=1,3,224,224") from None
        if any(d <= 0 for d in dims):
            raise UserError(f"--input-shape {name}={value}: dims must be positive")
        shapes[name] = dims
    return shapes


def _preprocess(args):
    """The image preprocessing spec, when any --image-* flag is given."""
    from . import calibdata

    given = any(getattr(args, k) not in (None, d) for k, d in (("image_size", None), ("image_resize", "bilinear"),
                                                               ("image_layout", "NCHW"), ("image_channels", "RGB"),
                                                               ("image_scale", 255.0), ("image_mean", None),
                                                               ("image_std", None)))
    if not given:
        return None
    return calibdata.Preprocess(  # checks every value (finite, positive std and scale, sizes)
        size=calibdata.parse_size(args.image_size) if args.image_size is not None else None, resize=args.image_resize,
        layout=args.image_layout, channels=args.image_channels, scale=args.image_scale,
        mean=calibdata.parse_floats(args.image_mean, "--image-mean") if args.image_mean is not None else (0.0,),
        std=calibdata.parse_floats(args.image_std, "--image-std") if args.image_std is not None else (1.0,))


def _compile(args, log) -> int:
    from . import api, report
    from .outputs import json_default

    passes = None
    if args.passes is not None:  # every other option is checked by api.compile (edgec.options), first thing
        passes = [p.strip() for p in args.passes.split(",") if p.strip()]
        if not passes:
            raise UserError("--passes is empty; name at least one pass (see `edgec passes`)")
    if args.quiet or args.json:
        log = lambda s: None  # noqa: E731
    result = api.compile(args.model, args.output, target=args.target,
                         target_options=_key_values(args.target_option, "--target-option"),
                         input_shapes=_shapes(args.input_shape), passes=passes, verify=args.verify,
                         inputs=args.inputs, eval_data=args.eval_data, rtol=args.rtol, atol=args.atol,
                         max_error=args.max_error, calib=args.calib, calib_samples=args.calib_samples,
                         prune=args.prune, prune_macs=args.prune_macs, importance=args.importance,
                         prune_mode=args.prune_mode, prune_steps=args.prune_steps, round_to=args.round_to,
                         max_layer_ratio=args.max_layer_ratio, reconstruct=not args.no_reconstruct,
                         bench=args.bench, quantize=args.quantize, calib_method=args.calib_method,
                         percentile=args.percentile, activations=args.activations, weights=args.weights,
                         keep_float=[k.strip() for k in args.keep_float.split(",") if k.strip()],
                         strict_int8=args.strict_int8, rounding=args.rounding, sixteen_bit=not args.no_16bit,
                         max_bytes=args.max_bytes, progress=not (args.quiet or args.json) and _interactive(),
                         goal=args.goal, calib_preprocess=_preprocess(args), log=log, report_file=args.report,
                         executor=args.executor, ray_address=args.ray_address)
    if args.json:
        print(json.dumps(result.report, indent=2, default=json_default))
    elif not args.quiet:
        print(report.compile_text(result.report))
    return 0


def _interactive() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _batch(args, log=None) -> int:
    from . import batch, executor

    executor.check(args.executor, args.ray_address)
    jobs = batch.read_manifest(args.manifest)  # the whole manifest checked before any job runs
    with executor.open_executor(args.executor, args.ray_address) as ex:
        results = batch.run(jobs, ex, progress=None if args.json else batch.progress_line)
    if args.json:
        print(json.dumps({"executor": ex.name, "jobs": [{**{k: j[k] for k in ("index", "model", "target", "output")},
                                                         **r} for j, r in zip(jobs, results)]}, indent=2))
    else:
        print(batch.summary_text(jobs, results))
    return max(r["code"] for r in results)


def _inspect(args, log=None) -> int:
    from . import api, report
    from .outputs import json_default

    info = api.inspect(args.model, top=args.top, groups=args.groups)
    print(json.dumps(info, indent=2, default=json_default) if args.json else report.inspect_text(info))
    return 0


def _passes(args, log=None) -> int:
    import edgec.passes  # noqa: F401  (registers the built-in passes: `import edgec` is lazy)

    from .pipeline import registry

    reg = registry()
    if args.json:
        print(json.dumps([{"name": n, "description": c.description, "lossless": c.lossless,
                           "requires": list(c.requires)} for n, c in sorted(reg.items())], indent=2))
    else:
        width = max(len(n) for n in reg)
        for n, cls in sorted(reg.items()):
            print(f"{n:{width}}  {cls.description}")
    return 0


def _targets(args, log=None) -> int:
    from edgec.backends import targets

    ts = targets()
    if args.json:
        print(json.dumps([{"name": t.name, "description": t.description, "opsets": [t.min_opset, t.max_opset],
                           "channel_multiple": t.channel_multiple, "static_shapes": t.static_shapes,
                           "options": {k: {"default": v, "help": t.option_help.get(k, "")} for k, v in t.options.items()},
                           "int8": {"activations": t.quant.activations, "weight_type": t.quant.weight_type,
                                    "isa": t.quant.isa, "reason": t.quant.reason}}
                          for t in ts.values()], indent=2))
    else:
        for t in ts.values():
            print(f"{t.name:8}  {t.description} (opsets {t.min_opset}-{t.max_opset}, channel multiple {t.channel_multiple})")
            for k, v in t.options.items():
                print(f"{'':10}--target-option {k}={v}  ({t.option_help.get(k, '')})")
    return 0


def main(argv: list[str] | None = None) -> int:
    if hasattr(signal, "SIGPIPE") and argv is None:  # `edgec inspect m.onnx | head` ends quietly
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    previous = {}
    try:  # Ctrl-C and SIGTERM raise where the program is: temporary files are removed on the way out
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _on_signal)
    except ValueError:  # not the main thread: leave signals alone
        pass
    _SIGNALLED.clear()
    for stream in (sys.stdout, sys.stderr):  # paths that are not valid UTF-8 print, escaped
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):
            pass
    held: list[str] = []  # warnings and notes, printed unless the run ends in a user error
    interactive = _interactive()

    def log(line: str) -> None:
        if interactive:
            print(line, file=sys.stderr)
        elif line not in held:
            held.append(line)

    def flush() -> None:
        for line in held:
            print(line, file=sys.stderr)
        held.clear()

    try:
        return _main(argv, log, flush)
    finally:
        for sig, handler in previous.items():
            try:  # the command line's process only exits now: its outcome (and outputs) are final,
                # so a signal during the interpreter's shutdown must not turn them into a kill
                signal.signal(sig, signal.SIG_IGN if argv is None else handler)
            except (ValueError, TypeError):
                pass


def _main(argv, log, flush) -> int:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = lambda message, category, *a, **k: log(
                f"warning: {category.__name__}: {str(message).splitlines()[0] if str(message) else ''}")
            try:
                args = _parser().parse_args(argv)
            except SystemExit as e:  # --help
                return e.code if isinstance(e.code, int) else 0
            handler = {"compile": _compile, "batch": _batch, "inspect": _inspect, "passes": _passes,
                       "targets": _targets}[args.command]
            code = handler(args, log)
        flush()
        return code
    except UserError as e:
        print(f"edgec: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except VerificationError as e:
        flush()
        print(f"edgec: verification failed: {_one_line(e)}", file=sys.stderr)
        return 1
    except InternalError as e:
        flush()
        if os.environ.get("EDGEC_DEBUG"):
            traceback.print_exc()
        print(f"edgec: internal error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        return _interrupted(isinstance(e, Terminated))
    except MemoryError:
        flush()
        if os.environ.get("EDGEC_DEBUG"):
            traceback.print_exc()
        print("edgec: internal error: out of memory (EDGEC_DEBUG=1 shows where)", file=sys.stderr)
        return 1
    except Exception as e:  # a bug: say so in one line, traceback on request
        if _SIGNALLED:  # an import (numpy's C init, ...) turned the interrupt into another exception
            return _interrupted(_SIGNALLED[-1] == signal.SIGTERM)
        flush()
        if os.environ.get("EDGEC_DEBUG"):
            traceback.print_exc()
        print(f"edgec: internal error: {type(e).__name__}: {_one_line(e)} (EDGEC_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


def _interrupted(terminated: bool) -> int:
    done = getattr(sys.modules.get("edgec.outputs"), "LAST_COMMIT", [])
    print(f"edgec: {'terminated' if terminated else 'interrupted'}"
          + ("; the outputs were already written" if done else "; nothing was written"), file=sys.stderr)
    return 143 if terminated else 130


def _one_line(e: BaseException) -> str:
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return text or type(e).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
