"""Numeric verification with ONNX Runtime: run two models on the same inputs and compare.

Inputs come from the user (``.npz`` keyed by input name, or one ``.npy`` for a one-input
model) or are generated from the model's input shapes and dtypes (symbolic dims become 1).
Both models run in the reference arithmetic (ONNX Runtime with its graph optimisations off,
see :mod:`edgec.runtime`), so what is compared is edgec's rewrite and not ORT's own, and the
result is the same on any build host. :func:`run` with ``host=True`` runs this host's kernels
instead (``--verify``'s "this host, its kernels" line).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from . import datafiles, runtime
from .errors import UserError

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16,
    "tensor(bool)": np.bool_,
}


def session(model: onnx.ModelProto | bytes | str, *, optimize: bool = False, threads: int = 0) -> ort.InferenceSession:
    """An ONNX Runtime session (``optimize=False``: the reference executor, see :mod:`edgec.runtime`)."""
    return runtime.session(model, optimize=optimize, threads=threads)


@dataclass
class InputSpec:
    name: str
    shape: list  # ints, or str/None for symbolic dims
    dtype: np.dtype


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    inits = {i.name for i in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except (KeyError, TypeError, ValueError):
            raise UserError(f"input '{vi.name}' has element type {tt.elem_type}, which edgec cannot feed") from None
        specs.append(InputSpec(vi.name, dims, dtype))
    return specs


# Random inputs for --verify/--bench: at most this many bytes in all (a typo'd dim is not a test).
MAX_GENERATED_BYTES = 256 << 20


def _feedable(spec: InputSpec) -> None:
    """ONNX Runtime's Python API takes numpy's own dtypes only (no bfloat16, float8, int4)."""
    if spec.dtype.kind not in "biufcOUS":
        raise UserError(f"input '{spec.name}' has type {spec.dtype}, which ONNX Runtime's Python API cannot "
                        f"take as input: --verify and --bench cannot run this model (compile without them)")


def random_inputs(model: onnx.ModelProto, *, seed: int = 0, batch: int = 1, fill: int = 1) -> dict[str, np.ndarray]:
    """Inputs drawn from the model's input types: N(0,1) floats, small non-negative ints.
    A symbolic first dim becomes ``batch``, other symbolic dims ``fill``."""
    rng = np.random.default_rng(seed)
    feeds = {}
    specs = input_specs(model)
    shapes = {}
    total = 0
    for spec in specs:
        _feedable(spec)
        shapes[spec.name] = [d if isinstance(d, int) and d >= 0 else (batch if i == 0 else fill)
                             for i, d in enumerate(spec.shape)]  # (a static 0 stays 0: ONNX Runtime runs it)
        total += int(np.prod(shapes[spec.name], dtype=np.float64)) * max(spec.dtype.itemsize, 1)
        if total > MAX_GENERATED_BYTES:
            raise UserError(f"input '{spec.name}' {shapes[spec.name]} would need {total / 2**30:.3g} GB of random "
                            f"values to verify or benchmark; give real inputs (--inputs) or a smaller --input-shape")
    bounds = index_bounds(model)
    for spec in specs:
        feeds[spec.name] = random_array(rng, shapes[spec.name], spec.dtype, high=min(4, bounds.get(spec.name, 4)))
    return feeds


# ops that carry an integer input's values through unchanged (on the way to a Gather's indices)
_INDEX_CARRIERS = {"Cast", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Expand", "Transpose"}


def index_bounds(model: onnx.ModelProto) -> dict[str, int]:
    """Per integer graph input that (through ops in ``_INDEX_CARRIERS``) indexes a constant
    table with Gather: the smallest such table's length. BERT's token-type table has 2 rows,
    and random ids up to 3 made the original model fail."""
    tables = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            tables[n.output[0]] = tuple(n.attribute[0].t.dims)
    readers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    out: dict[str, int] = {}
    for vi in model.graph.input:
        if vi.name in tables:
            continue
        todo, seen = [vi.name], set()
        while todo:
            t = todo.pop()
            if t in seen:
                continue
            seen.add(t)
            for n in readers.get(t, []):
                if n.op_type in _INDEX_CARRIERS and n.input and n.input[0] == t:
                    todo.extend(n.output)
                elif n.op_type == "Gather" and len(n.input) > 1 and n.input[1] == t and n.input[0] in tables:
                    shape = tables[n.input[0]]
                    axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
                    if shape and -len(shape) <= axis < len(shape) and shape[axis] > 0:
                        out[vi.name] = min(out.get(vi.name, shape[axis]), int(shape[axis]))
    return out


def random_array(rng: np.random.Generator, shape, dtype: np.dtype, high: int = 4) -> np.ndarray:
    """N(0,1) floats, 0/1 bools, small non-negative ints below ``high`` (valid as indices of small
    tables: :func:`index_bounds`)."""
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.kind in "OUS":  # strings
        return rng.integers(0, 4, shape).astype(str).astype(object)
    return rng.integers(0, max(1, high), shape).astype(dtype)


def load_inputs(path: str | Path, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Read user inputs and check them against the model's inputs (names, ranks, dims, dtypes)."""
    p = Path(path)
    specs = input_specs(model)
    if not p.exists():
        raise UserError(f"{p}: no such input file")
    if p.suffix == ".npy" and len(specs) != 1:
        raise UserError(f"{p}: a .npy file feeds a one-input model; this model has "
                        f"{len(specs)} inputs ({', '.join(s.name for s in specs)}): use an .npz keyed by name")
    data = datafiles.read_arrays(p, "input file")  # headers checked, size capped, never unpickled
    if p.suffix == ".npy":
        data = {specs[0].name: data[""]}
    return check_feeds(data, specs, str(p))


def check_feeds(data: dict[str, np.ndarray], specs: list[InputSpec], where: str) -> dict[str, np.ndarray]:
    names = {s.name for s in specs}
    missing = [s.name for s in specs if s.name not in data]
    if missing:
        raise UserError(f"{where}: missing input '{missing[0]}' (the model's inputs: {', '.join(sorted(names))})")
    unknown = [k for k in data if k not in names]
    if unknown:
        raise UserError(f"{where}: '{unknown[0]}' is not an input of the model (its inputs: {', '.join(sorted(names))})")
    feeds = {}
    for s in specs:
        arr = np.asarray(data[s.name])
        expected = "[" + ", ".join(str(d) if d is not None else "?" for d in s.shape) + "]"
        if arr.ndim != len(s.shape) or any(isinstance(d, int) and d > 0 and d != a for d, a in zip(s.shape, arr.shape)):
            raise UserError(f"{where}: input '{s.name}' has shape {list(arr.shape)}, the model expects {expected}")
        if arr.dtype != s.dtype:
            if arr.dtype.kind == s.dtype.kind or (arr.dtype.kind in "iu" and s.dtype.kind in "iu"):
                arr = arr.astype(s.dtype)
            else:
                raise UserError(f"{where}: input '{s.name}' has dtype {arr.dtype}, the model expects {s.dtype}")
        if arr.size == 0 and 0 not in s.shape:
            raise UserError(f"{where}: input '{s.name}' is empty (shape {list(arr.shape)})")
        if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
            bad = int(np.argwhere(~np.isfinite(arr.reshape(len(arr), -1) if arr.ndim else arr.reshape(1, 1)))[0][0])
            raise UserError(f"{where}: input '{s.name}' holds NaN or infinite values (sample {bad}); edgec compares "
                            f"and calibrates on finite data only")
        feeds[s.name] = arr
    return feeds


def run(model: onnx.ModelProto | bytes, feeds: dict[str, np.ndarray], *, host: bool = False) -> dict[str, np.ndarray]:
    """Outputs of ``model`` on ``feeds`` (reference arithmetic; this host's kernels with
    ``host=True``). When the model's batch dim is a fixed size smaller than the data's
    (``--input-shape`` batch 1, say), the data runs in chunks of that size."""
    sess = runtime.host_session(model) if host else runtime.reference_session(model, threads=0)  # one run: every core
    return _run_session(sess, feeds)


def _run_session(sess, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output of ``sess`` on ``feeds``, in chunks of a fixed batch smaller than the data's."""
    names = runtime.output_names(sess)
    chunk = _static_batch(sess, feeds)
    if chunk is None:
        return dict(zip(names, sess.run(names, feeds)))
    n = len(next(iter(feeds.values())))
    parts = [sess.run(names, {k: v[i:i + chunk] for k, v in feeds.items()}) for i in range(0, n, chunk)]
    return runtime.join_batches({name: [p[j] for p in parts] for j, name in enumerate(names)})


def _static_batch(sess, feeds) -> int | None:
    chunk = None
    for inp in sess.get_inputs():
        dim0 = inp.shape[0] if inp.shape else None
        data = feeds.get(inp.name)
        if isinstance(dim0, int) and dim0 > 0 and data is not None and data.ndim and len(data) != dim0:
            if len(data) % dim0:
                return None  # let ONNX Runtime report the mismatch
            chunk = dim0
    return chunk


F16_EPS = float(np.finfo(np.float16).eps)
F16_ULPS = 10  # a float16 output is compared within rtol and atol of at least this many of its ulps
# (atol: of its largest value): folding a BatchNormalization into a conv in float16 rounds the
# product once where the original rounds twice, and so on down the graph; 1e-4 is below one ulp.


FLOOR_FACTOR = 4  # a float output is also within this many times the float floor (below)


def float_floor(model: onnx.ModelProto | bytes, feeds: dict[str, np.ndarray],
                reference: dict[str, np.ndarray]) -> dict[str, float]:
    """How far float rounding alone moves each output of ``model`` on ``feeds``: the largest
    difference between ONNX Runtime's basic graph optimisations (constant folding, Conv+BN and
    Conv+Add fusion: rewrites exact up to rounding, as edgec's lossless ones) and ``reference``,
    the model's reference run. Where an output is badly conditioned (large activations, outputs
    near zero beside outputs in the hundreds), those exact rewrites move it by more than a fixed
    ``atol``. Empty when the optimised session cannot run (nothing is widened then)."""
    try:
        got = _run_session(runtime.session(model, optimize="basic"), feeds)
    except Exception:
        return {}
    out = {}
    for name, ref in reference.items():
        g = got.get(name)
        if g is None or g.shape != ref.shape or ref.dtype.kind != "f" or not ref.size:
            continue
        d = np.abs(g.astype(np.float64) - ref.astype(np.float64))
        out[name] = float(np.max(d)) if np.all(np.isfinite(d)) else 0.0
    return out


@dataclass
class Comparison:
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0  # max |a - b| / max |reference|, per output, worst output
    min_cosine: float = 1.0
    rel_l2: float = 0.0  # ||a - b|| / ||reference||, worst output: what --max-error bounds
    per_output: dict = field(default_factory=dict)
    allclose: bool = True
    rtol: float = 1e-4
    atol: float = 1e-5

    def as_dict(self) -> dict:
        return {"max_abs_error": self.max_abs_error, "max_rel_error": self.max_rel_error,
                "min_cosine": self.min_cosine, "rel_l2": self.rel_l2, "allclose": self.allclose, "rtol": self.rtol,
                "atol": self.atol, "outputs": self.per_output}


def compare(reference: dict[str, np.ndarray], actual: dict[str, np.ndarray], *, rtol: float = 1e-4,
            atol: float = 1e-5, floor: dict[str, float] | None = None) -> Comparison:
    """Per output: close when every element is within ``atol + rtol * |reference|``. A float16
    output's tolerances are at least :data:`F16_ULPS` of its ulps; an output with a ``floor``
    (:func:`float_floor`) has ``atol`` at least :data:`FLOOR_FACTOR` times it. The worst element
    against its tolerance is kept for the message (``per_output[name]["worst"]``)."""
    res = Comparison(rtol=rtol, atol=atol)
    for name, ref in reference.items():
        if name not in actual:
            raise AssertionError(f"output '{name}' is missing from the rewritten model")
        got = actual[name]
        if ref.shape != got.shape:
            raise AssertionError(f"output '{name}' has shape {got.shape}, the original {ref.shape}")
        r = ref.astype(np.float64)
        g = got.astype(np.float64)
        abs_err = float(np.max(np.abs(r - g))) if r.size else 0.0
        scale = float(np.max(np.abs(r))) if r.size else 0.0
        rel = abs_err / scale if scale > 0 else abs_err
        denom = np.linalg.norm(r) * np.linalg.norm(g)
        cos = float(np.dot(r.ravel(), g.ravel()) / denom) if denom > 0 else (1.0 if abs_err == 0 else 0.0)
        o_rtol, o_atol = rtol, atol
        if ref.dtype == np.float16:  # a rewrite rounds in other places: float16 holds 3 digits, not 7
            o_rtol, o_atol = max(rtol, F16_ULPS * F16_EPS), max(atol, F16_ULPS * F16_EPS * scale)
        if floor and floor.get(name):
            o_atol = max(o_atol, FLOOR_FACTOR * floor[name])
        close = bool(np.allclose(g, r, rtol=o_rtol, atol=o_atol))
        norm = float(np.linalg.norm(r))
        rel_l2 = float(np.linalg.norm(r - g)) / norm if norm > 0 else float(np.linalg.norm(r - g))
        res.per_output[name] = {"max_abs_error": abs_err, "max_rel_error": rel, "cosine": cos, "rel_l2": rel_l2,
                                "allclose": close}
        if (o_rtol, o_atol) != (rtol, atol):
            res.per_output[name].update(rtol=o_rtol, atol=o_atol)
        if floor and name in floor:
            res.per_output[name]["float_floor"] = floor[name]
        if not close and r.size:
            with np.errstate(invalid="ignore"):
                excess = np.abs(g - r) - (o_atol + o_rtol * np.abs(r))
            i = np.unravel_index(int(np.nanargmax(np.where(np.isnan(excess), np.inf, excess))), r.shape)
            res.per_output[name]["worst"] = {"index": [int(k) for k in i], "reference": float(r[i]),
                                             "actual": float(g[i]), "allowed": o_atol + o_rtol * abs(float(r[i]))}
        res.rel_l2 = max(res.rel_l2, rel_l2)
        res.max_abs_error = max(res.max_abs_error, abs_err)
        res.max_rel_error = max(res.max_rel_error, rel)
        res.min_cosine = min(res.min_cosine, cos)
        res.allclose &= close
    return res


def latency_ms(model: onnx.ModelProto, feeds: dict[str, np.ndarray], *, runs: int = 30, warmup: int = 5) -> float:
    """Median ONNX Runtime latency on this host's kernels (all graph optimisations on, as
    deployed here), milliseconds."""
    sess = runtime.host_session(model)
    names = runtime.output_names(sess)
    for _ in range(warmup):
        sess.run(names, feeds)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(names, feeds)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)
