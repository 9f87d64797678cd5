"""Validation of ``edgec.compile`` options, before any work is done.

One function, :func:`check_compile_options`, checks every option's type and range (NaN and
infinities included) and the combinations that cannot work (``--prune`` with
``--prune-macs``, int8 without calibration data, ...). The Python API calls it at the start
of :func:`edgec.compile`; the command line goes through the same call, so both refuse the same
mistakes with the same one-line :class:`~edgec.errors.UserError` (exit 2), before a model is
read or anything is written.

Flag names in the messages are the CLI's (``--max-error``); the Python keyword is the same
name with underscores.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from .calibdata import Preprocess
from .calibration import parse_method
from .errors import UserError
from .pipeline import Pass

IMPORTANCES = ("auto", "l1", "l2", "bn", "activation", "fused", "wanda", "obs")
PRUNE_MODES = ("auto", "uniform", "global", "sensitivity", "balanced", "local")
QUANTIZE_MODES = ("int8", "fp16", "mixed", "vendor")  # vendor: the target's toolchain quantizes
ACTIVATIONS = ("asymmetric", "symmetric")
WEIGHTS = ("per-channel", "per-tensor")
ROUNDINGS = ("nearest", "gptq")
GOALS = ("latency", "size", "accuracy")
MAX_DIM = 1 << 31  # an input dimension above this is a typo (and no runtime could allocate it)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_bool(v) -> bool:
    return isinstance(v, bool) or type(v).__name__ == "bool_"


def number(name: str, value, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
           hi_open: bool = False, integer: bool = False) -> float | int:
    """``value`` as a finite number within the bounds; else UserError naming the option."""
    kind = "an integer" if integer else "a number"
    if _is_bool(value) or not isinstance(value, numbers.Real) or (integer and not isinstance(value, numbers.Integral)):
        raise UserError(f"{flag(name)} {value!r}: must be {kind}")
    if not math.isfinite(value):
        raise UserError(f"{flag(name)} {value}: must be a finite number")
    low_bad = lo is not None and (value <= lo if lo_open else value < lo)
    high_bad = hi is not None and (value >= hi if hi_open else value > hi)
    if low_bad or high_bad:
        left = "any" if lo is None else (f"({lo}" if lo_open else f"[{lo}")
        right = "" if hi is None else (f"{hi})" if hi_open else f"{hi}]")
        rng = f"in {left}, {right}" if lo is not None and hi is not None else (
            f"{'>' if lo_open else '>='} {lo}" if lo is not None else f"{'<' if hi_open else '<='} {hi}")
        raise UserError(f"{flag(name)} {value}: must be {rng}")
    return int(value) if integer else float(value)


def choice(name: str, value, choices, *, optional: bool = True):
    if value is None and optional:
        return None
    if not isinstance(value, str) or value not in choices:
        raise UserError(f"{flag(name)} {value!r}: choose one of {', '.join(choices)}")
    return value


def boolean(name: str, value) -> bool:
    if _is_bool(value) or (isinstance(value, numbers.Integral) and value in (0, 1)):
        return bool(value)
    raise UserError(f"{name}={value!r}: must be True or False")


def path_like(name: str, value, *, optional: bool = True):
    if value is None and optional:
        return None
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise UserError(f"{flag(name)} {value!r}: must be a file path")
    if "\0" in os.fspath(value):
        raise UserError(f"{flag(name)}: the path contains a NUL character")
    return value


def check_compile_options(o: dict[str, Any]) -> dict[str, Any]:
    """Check the arguments of :func:`edgec.compile` (a dict: its options, ``model``, ``output``,
    ``report_file`` and ``log``) and return the normalised values of those that may be given in
    a looser form (``passes`` and ``keep_float`` as one comma-separated string). Raises
    UserError on the first mistake."""
    fixed: dict[str, Any] = {}
    model = o["model"]
    if not isinstance(model, (onnx.ModelProto, str, os.PathLike)):
        raise UserError(f"model: expected a path to an .onnx file or an onnx.ModelProto, got {type(model).__name__}")
    if not isinstance(model, onnx.ModelProto):
        path_like("model", model, optional=False)
    path_like("output", o["output"])
    path_like("report_file", o.get("report_file"))
    if not isinstance(o["target"], str) or not o["target"]:
        raise UserError(f"-t/--target {o['target']!r}: name a target (see `edgec targets`)")
    opts = o["target_options"]
    if opts is not None:
        if not isinstance(opts, dict) or not all(isinstance(k, str) and k for k in opts):
            raise UserError("--target-option: expected KEY=VALUE pairs (a dict of option names to values)")
        bad = [k for k, v in opts.items() if v is None or isinstance(v, (dict, list, tuple, set))]
        if bad:
            raise UserError(f"--target-option {bad[0]}: expected a single value")
    shapes = o["input_shapes"]
    if shapes is not None:
        if not isinstance(shapes, dict):
            raise UserError("--input-shape: expected NAME=D1,D2,... (a dict of input names to dims)")
        for name, dims in shapes.items():
            if not isinstance(name, str) or not name:
                raise UserError(f"--input-shape {name!r}: expected an input name")
            if isinstance(dims, (str, bytes)) or not hasattr(dims, "__iter__"):
                raise UserError(f"--input-shape {name}={dims!r}: expected a list of dims")
            dims = list(dims)
            for d in dims:
                if _is_bool(d) or not isinstance(d, numbers.Integral) or not 0 < d < MAX_DIM:
                    raise UserError(f"--input-shape {name}={','.join(map(str, dims))}: dims must be positive integers"
                                    f" (below {MAX_DIM})")
    passes = o["passes"]
    if passes is not None:
        if isinstance(passes, str):
            passes = [p.strip() for p in passes.split(",") if p.strip()]
            fixed["passes"] = passes
        if not hasattr(passes, "__iter__") or isinstance(passes, (bytes, dict)):
            raise UserError(f"--passes {passes!r}: expected pass names")
        passes = list(passes)
        if not passes:
            raise UserError("--passes is empty; name at least one pass (see `edgec passes`)")
        for p in passes:
            if not isinstance(p, (str, Pass)) or (isinstance(p, str) and not p.strip()):
                raise UserError(f"--passes: {p!r} is not a pass name (see `edgec passes`)")
        fixed["passes"] = passes
    for name in ("verify", "reconstruct", "bench", "strict_int8", "sixteen_bit"):
        boolean(name, o[name])
    if not callable(o["progress"]):  # True/False, or a callback(done, total)
        boolean("progress", o["progress"])
    inputs = o["inputs"]
    if inputs is not None and not isinstance(inputs, dict):
        path_like("inputs", inputs)
    path_like("eval", o["eval_data"])
    number("rtol", o["rtol"], lo=0)
    number("atol", o["atol"], lo=0)
    if o["max_error"] is not None:
        number("max_error", o["max_error"], lo=0)
    calib = o["calib"]
    if calib is not None and not isinstance(calib, (str, os.PathLike, dict, list, tuple)):
        raise UserError(f"--calib: expected a path, 'random', a dict of arrays or a list of such dicts, "
                        f"got {type(calib).__name__}")
    if isinstance(calib, (str, os.PathLike)):
        path_like("calib", calib)
    if isinstance(calib, (list, tuple)):
        if not calib:
            raise UserError("--calib: the list of calibration batches is empty")
        if not all(isinstance(b, dict) for b in calib):
            raise UserError("--calib: a list of calibration batches must hold dicts of arrays keyed by input name")
    if o["calib_samples"] is not None:
        number("calib_samples", o["calib_samples"], lo=1, integer=True)
    if o["prune"] is not None:
        number("prune", o["prune"], lo=0, hi=1, lo_open=True, hi_open=True)
    if o["prune_macs"] is not None:
        number("prune_macs", o["prune_macs"], lo=0, hi=1, lo_open=True, hi_open=True)
    if o["prune"] is not None and o["prune_macs"] is not None:
        raise UserError("give --prune or --prune-macs, not both")
    choice("importance", o["importance"], IMPORTANCES, optional=False)
    choice("prune_mode", o["prune_mode"], PRUNE_MODES, optional=False)
    number("prune_steps", o["prune_steps"], lo=1, hi=1000, integer=True)
    if o["round_to"] is not None:
        number("round_to", o["round_to"], lo=1, hi=1 << 20, integer=True)
    number("max_layer_ratio", o["max_layer_ratio"], lo=0, hi=1, hi_open=True)
    choice("quantize", o["quantize"], QUANTIZE_MODES)
    method = o["calib_method"]
    if not isinstance(method, (str, dict)):
        raise UserError(f"--calib-method {method!r}: expected a method name (auto, minmax, percentile, entropy, mse)")
    if isinstance(method, dict):
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in method.items()) or not method:
            raise UserError(f"--calib-method {method!r}: expected tensor class -> method names")
        parse_method(",".join(f"{k}={v}" for k, v in method.items()))
    elif not method.strip():
        raise UserError("--calib-method is empty (auto, minmax, percentile, entropy or mse)")
    else:
        parse_method(method)
    number("percentile", o["percentile"], lo=0, hi=100, lo_open=True)
    choice("activations", o["activations"], ACTIVATIONS)
    choice("weights", o["weights"], WEIGHTS)
    choice("rounding", o["rounding"], ROUNDINGS, optional=False)
    keep = o["keep_float"]
    if isinstance(keep, str):
        keep = [k.strip() for k in keep.split(",") if k.strip()]
        fixed["keep_float"] = keep
    if keep is None or not hasattr(keep, "__iter__") or isinstance(keep, (bytes, dict)) \
            or not all(isinstance(k, str) for k in keep):
        raise UserError(f"--keep-float {keep!r}: expected node or tensor names")
    if o["max_bytes"] is not None:
        number("max_bytes", o["max_bytes"], lo=1, integer=True)
    choice("goal", o["goal"], GOALS)
    pre = o["calib_preprocess"]
    if pre is not None:
        if not isinstance(pre, Preprocess):
            raise UserError(f"calib_preprocess: expected an edgec.calibdata.Preprocess, got {type(pre).__name__}")
    if o["log"] is not None and not callable(o["log"]):
        raise UserError("log: expected a function taking one string")
    # combinations that cannot work, said before any work
    if o["goal"] is None:
        if o["quantize"] in ("int8", "mixed", "vendor") and calib is None:
            raise UserError(f"--quantize {o['quantize']} needs calibration data: --calib PATH "
                            f"(or --calib random, explicitly)")
        if o["importance"] in ("activation", "wanda", "obs") and (o["prune"] is not None or o["prune_macs"] is not None) \
                and calib is None:
            raise UserError(f"--importance {o['importance']} needs calibration data (--calib PATH)")
        if o["prune_mode"] in ("sensitivity", "balanced", "local") and (o["prune"] is not None or o["prune_macs"] is not None) and calib is None:
            raise UserError(f"--prune-mode {o['prune_mode']} measures output errors: it needs calibration data (--calib PATH)")
    else:
        for key in ("prune", "prune_macs", "quantize"):
            if o[key] is not None:
                raise UserError(f"--goal chooses pruning and precision itself: drop {flag(key)}")
    if isinstance(calib, (str, os.PathLike)) and os.fspath(calib) != "random" and not Path(calib).exists():
        raise UserError(f"{calib}: no such calibration file or folder")
    for path, what in ((inputs if not isinstance(inputs, dict) else None, "input file"), (o["eval_data"], "evaluation file")):
        if path is not None and not Path(path).exists():
            raise UserError(f"{path}: no such {what}")
    return fixed


# ---------------------------------------------------------------------- option groups
# The same groups as the command line's (``edgec compile --help``): what compile() runs on.
@dataclass(frozen=True)
class PruneOptions:
    """Structured channel pruning: ``ratio`` of channels or ``macs`` fraction of MACs removed."""

    ratio: float | None = None
    macs: float | None = None
    importance: str = "auto"
    mode: str = "auto"
    steps: int = 1
    round_to: int | None = None  # None: the target's channel multiple
    max_layer_ratio: float = 0.9
    reconstruct: bool = True

    @property
    def enabled(self) -> bool:
        return self.ratio is not None or self.macs is not None


@dataclass(frozen=True)
class QuantOptions:
    """``mode`` int8 / fp16 / mixed (None: no quantization); ``activations``/``weights`` None
    mean the target's scheme; ``max_bytes`` is the size budget of ``mixed``."""

    mode: str | None = None
    method: Any = "auto"  # a method name, or {tensor: method}
    percentile: float = 99.99
    activations: str | None = None
    weights: str | None = None
    keep_float: tuple = ()
    max_bytes: int | None = None
    progress: bool = False
    strict: bool = False  # --strict-int8: no fallback to float when int8 misses the error budget
    rounding: str = "nearest"  # --rounding: "nearest", or "gptq" (kept where it measures better)
    # the int8 fallback's last step may give activations 16 bits where the target runs them
    # (--no-16bit: float steps only; --goal latency turns it off: those ops run at float speed)
    sixteen_bit: bool = True


@dataclass(frozen=True)
class VerifyOptions:
    """``verify``: compare with the original in ONNX Runtime; ``max_error`` is the budget of a
    lossy compile (relative L2 of the outputs); ``bench`` adds latency before and after."""

    verify: bool = False
    inputs: Any = None
    eval_data: Any = None
    rtol: float = 1e-4
    atol: float = 1e-5
    max_error: float | None = None
    bench: bool = False


# The keywords of :func:`edgec.compile` that are options, in its order. The others say what to
# compile (``model``), where the outputs go (``output``, ``report_file``) and whom to tell (``log``).
KEYWORDS = ("target", "target_options", "input_shapes", "passes", "verify", "inputs", "eval_data", "rtol", "atol",
            "max_error", "calib", "calib_samples", "prune", "prune_macs", "importance", "prune_mode", "prune_steps",
            "round_to", "max_layer_ratio", "reconstruct", "bench", "quantize", "calib_method", "percentile",
            "activations", "weights", "keep_float", "max_bytes", "progress", "goal", "calib_preprocess",
            "strict_int8", "rounding", "sixteen_bit")


@dataclass(frozen=True)
class CompileOptions:
    """What :func:`edgec.compile` runs on: the target, the pipeline, the calibration data and the
    option groups (the command line's). ``edgec.compile(model, out, options=CompileOptions(...))``
    takes one as is; ``compile``'s keyword arguments build one with :meth:`from_kwargs`.

    ``passes`` (None: the target's pipeline) holds pass names or instances; ``calib`` is a path,
    ``"random"``, a dict of arrays or a list of such dicts; ``progress`` (True/False or a
    ``callback(done, total)``) is copied into ``quant.progress`` by :meth:`from_kwargs`."""

    target: str = "cpu"
    target_options: dict | None = None
    input_shapes: dict | None = None
    passes: tuple | None = None
    calib: Any = None
    calib_samples: int | None = None
    calib_preprocess: Any = None
    prune: PruneOptions = field(default_factory=PruneOptions)
    quant: QuantOptions = field(default_factory=QuantOptions)
    verify: VerifyOptions = field(default_factory=VerifyOptions)
    goal: str | None = None
    progress: Any = False

    @classmethod
    def from_kwargs(cls, **kw) -> CompileOptions:
        """The options given by ``edgec.compile``'s keyword arguments (:data:`KEYWORDS`; those not
        given keep their defaults), as :func:`check_compile_options` accepted them."""
        unknown = sorted(set(kw) - set(KEYWORDS))
        if unknown:
            raise TypeError(f"unknown compile option(s): {', '.join(unknown)}")
        o = {**cls().as_kwargs(), **kw}
        return cls(
            target=o["target"], target_options=o["target_options"], input_shapes=o["input_shapes"],
            passes=_names(o["passes"]) if o["passes"] is not None else None,
            calib=o["calib"], calib_samples=o["calib_samples"], calib_preprocess=o["calib_preprocess"],
            prune=PruneOptions(ratio=o["prune"], macs=o["prune_macs"], importance=o["importance"], mode=o["prune_mode"],
                               steps=o["prune_steps"], round_to=o["round_to"], max_layer_ratio=o["max_layer_ratio"],
                               reconstruct=o["reconstruct"]),
            quant=QuantOptions(mode=o["quantize"], method=o["calib_method"], percentile=o["percentile"],
                               activations=o["activations"], weights=o["weights"], keep_float=_names(o["keep_float"]),
                               max_bytes=o["max_bytes"], progress=o["progress"], strict=o["strict_int8"],
                               rounding=o["rounding"], sixteen_bit=o["sixteen_bit"]),
            verify=VerifyOptions(verify=o["verify"], inputs=o["inputs"], eval_data=o["eval_data"], rtol=o["rtol"],
                                 atol=o["atol"], max_error=o["max_error"], bench=o["bench"]),
            goal=o["goal"], progress=o["progress"])

    def as_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``edgec.compile`` that give these options (the inverse of
        :meth:`from_kwargs`)."""
        p, q, v = self.prune, self.quant, self.verify
        return {"target": self.target, "target_options": self.target_options, "input_shapes": self.input_shapes,
                "passes": self.passes, "verify": v.verify, "inputs": v.inputs, "eval_data": v.eval_data,
                "rtol": v.rtol, "atol": v.atol, "max_error": v.max_error, "calib": self.calib,
                "calib_samples": self.calib_samples, "prune": p.ratio, "prune_macs": p.macs,
                "importance": p.importance, "prune_mode": p.mode, "prune_steps": p.steps, "round_to": p.round_to,
                "max_layer_ratio": p.max_layer_ratio, "reconstruct": p.reconstruct, "bench": v.bench,
                "quantize": q.mode, "calib_method": q.method, "percentile": q.percentile,
                "activations": q.activations, "weights": q.weights, "keep_float": q.keep_float,
                "max_bytes": q.max_bytes, "progress": self.progress, "goal": self.goal,
                "calib_preprocess": self.calib_preprocess, "strict_int8": q.strict,
                "rounding": q.rounding, "sixteen_bit": q.sixteen_bit}


def _names(value) -> tuple:
    """Pass or node names given as a list or as one comma-separated string, as a tuple."""
    if isinstance(value, str):
        return tuple(k.strip() for k in value.split(",") if k.strip())
    return tuple(value)
