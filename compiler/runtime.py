"""Running models: the reference executor every decision is measured with, and the host's kernels.

Two ways to run a model in ONNX Runtime, and what each is for:

* **Reference arithmetic** (:func:`reference_session`, :func:`run_outputs`, :func:`capture`,
  :func:`output_error`): ONNX Runtime with every graph optimisation off. A QDQ model then runs
  exactly as the ONNX spec defines it: ``DequantizeLinear`` -> float op -> ``QuantizeLinear``,
  which is what every target's integer pipeline computes (int8 x int8 products summed in int32,
  then requantized with the output scale), up to the rounding of a float accumulation. No
  fusion, no NCHWc layout, no integer kernel of the build host takes part. Measured here: on
  every builder model and the example, the float outputs of this executor are bit-identical
  under an AVX2-only CPU (QEMU's Haswell model) and an AVX-512 VNNI one
  (``benchmarks/host_kernels.py identity``), and so are the int8 models built with it
  (``tests/test_numerics.py``), while the fully optimised sessions differ in their last bits
  (float) or by the int16 saturation of the no-VNNI U8S8 kernels (int8). Calibration statistics, bias correction, cross-layer
  equalisation keep/drop, mixed-precision sensitivity, the ``--goal`` winner, the
  ``--max-error`` check and the reported error all go through it, so the same model, options
  and data give the same output bytes on any build host. Each reference run is
  single-threaded, so no host's core count changes how a kernel splits its sums; batches run
  in parallel instead, one per core (:func:`run_batches`), and are consumed in their order.
  How each target's integer pipeline relates to it:
  - ONNX Runtime CPU (cpu, neon): QLinearConv/QGemm/QLinearMatMul accumulate int32 and
    requantize with a float multiplier, rounding half to even; the reference computes the same
    sum in float and rounds the same way at QuantizeLinear. They differ by at most one step
    where float rounding lands on a tie: measured within 0.1 dB SQNR on every model, on an
    AMX host and on an emulated AVX2 host, for every scheme that cannot saturate
    (``benchmarks/quantization.py --schemes``). The int16
    pair saturation of U8S8 on a no-VNNI CPU is *not* emulated: it depends on how ONNX
    Runtime packs the reduction dimension, so the cpu profile never emits U8S8 for such a CPU
    (``backends/cpu.py``).
  - TensorRT (jetson): explicit quantization is defined by the Q/DQ placement, with int8
    weights and activations, int32 accumulation and float requantization, so QDQ semantics
    are its specification; the layers it runs in FP16 are not emulated (FP32 here).
  - RKNN (rknn): the pre-quantized QDQ hand-off is read by RKNN-Toolkit2 as these scales and
    zero points; its simulator is checked against this executor in the tests
    (``tests/test_rknn_simulator.py``, cosine >= 0.999).
* **The host's kernels** (:func:`host_session`): every optimisation on, QDQ groups fused into
  ONNX Runtime's integer kernels for *this* CPU. Used for ``--bench`` and for the
  "this host, its kernels" part of ``--verify``: reported, never used to choose anything.

Error metric everywhere: ``rel_l2 = ||y - y_ref|| / ||y_ref||`` (worst graph output), with
SQNR ``-20 log10(rel_l2)`` dB and the cosine; the sums are taken with numpy's pairwise
summation (not BLAS dot products, whose summation order depends on the CPU).

Also here: :func:`host_isa`, the build host's x86 int8 capability (``vnni``, ``amx``,
``avx512``, ``avx2``, ...), which the ``cpu`` target's ``isa=auto`` resolves to.
"""

from __future__ import annotations

import os
import platform
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from .errors import UserError

HOST_KERNELS_ENV = "EDGEC_HOST_KERNELS"  # "off": host sessions run unoptimised too (tests, debugging)


# ---------------------------------------------------------------------- sessions
def output_names(source) -> list[str]:
    """The output names of an ONNX Runtime session or of a ModelProto, each once: a tensor listed
    twice as a graph output is fetched, joined and measured once."""
    outs = source.get_outputs() if hasattr(source, "get_outputs") else source.graph.output
    return list(dict.fromkeys(o.name for o in outs))


def session(model: onnx.ModelProto | bytes | str, *, optimize: bool | str = False,
            threads: int = 0) -> ort.InferenceSession:
    """An ONNX Runtime CPU session; ``optimize=False`` is the reference executor, without ONNX
    Runtime's CPU memory arena: the arena keeps the most a session ever held until the session
    goes, and edgec's measuring sessions (a probe with every Q/DQ pair, runs on every core at
    once) would keep gigabytes of a high-resolution model's activations between their runs.
    ``optimize="basic"``: ONNX Runtime's basic level only (provider-independent rewrites)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if optimize == "basic"
                                   else ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.enable_cpu_mem_arena = bool(optimize)
    so.log_severity_level = 4  # failures surface as exceptions, reported by edgec in one line
    if threads:
        so.intra_op_num_threads = threads
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def reference_session(model, *, threads: int = 1) -> ort.InferenceSession:
    """The reference executor: exact QDQ semantics, host-independent float kernels. One thread
    per run (the result then cannot depend on how a host's core count splits the work); runs
    over many batches go in parallel instead, one batch per core (:func:`run_batches`)."""
    return session(model, optimize=False, threads=threads)


THREADS_ENV = "EDGEC_THREADS"  # at most this many batches at once (a Ray task sets 1: it holds one CPU)


def workers() -> int:
    """How many batches run at once: this process's cores, at most 8 (and at most
    ``$EDGEC_THREADS``)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    limit = os.environ.get(THREADS_ENV, "")
    if limit.isdigit() and int(limit) >= 1:
        n = min(n, int(limit))
    return max(1, min(8, n))


def run_batches(sess: ort.InferenceSession, names: list[str], batches: Iterable[dict], *,
                fixed: dict | None = None) -> Iterator[tuple[dict, dict[str, np.ndarray]]]:
    """``(batch, {name: value})`` for each batch, in the batches' order, computed
    :func:`workers` batches at a time (see :func:`map_batches`); ``fixed`` inputs are added to
    every batch."""
    fixed = fixed or {}

    def one(i, b):
        return dict(zip(names, sess.run(names, {**b, **fixed} if fixed else b)))

    try:  # the result size of an earlier call with these outputs: no batch need run alone first
        sizes = _RESULT_BYTES.setdefault(sess, {})
    except TypeError:
        sizes = {}
    return map_batches(one, batches, sizes=sizes, key=tuple(names))


_RESULT_BYTES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # session -> {outputs: bytes}


def batches_in_flight(count: int | None = None) -> int:
    """How many batches :func:`map_batches` runs or holds at once, by count alone: one with one
    worker, else two per worker (and no more than ``count``, the batches there are)."""
    n = workers()
    return 1 if n == 1 else max(1, min(2 * n, count if count is not None else 2 * n))


_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def in_flight_bytes() -> int:
    """What the results of batches in flight may take at once (:func:`map_batches`): a sixth of
    the memory this process may use (the machine's, or its container's limit when lower), 1 GiB
    at least."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        total = 8 << 30
    for path in _CGROUP_LIMITS:  # cgroup v2, v1 ("max" or a huge number: no limit)
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return max(1 << 30, total // 6)


def _nbytes(value) -> int:
    """The bytes of the arrays in a result (a dict, list or tuple of them, or one)."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def map_batches(fn: Callable[[int, dict], object], batches: Iterable[dict], *, sizes: dict | None = None,
                key=None) -> Iterator[tuple[dict, object]]:
    """``(batch, fn(index, batch))`` for each batch, in order, :func:`workers` at a time: ONNX
    Runtime releases the GIL while it runs, and each reference run is single-threaded, so the
    values are those of a sequential run. At most two batches per worker are in flight, and
    their results within :func:`in_flight_bytes`, as the largest result so far estimates them (a
    run that fetches every activation of a high-resolution model returns gigabytes, on every
    core): the first batch runs alone, unless ``sizes[key]`` remembers an earlier call's largest
    result (it is updated)."""
    n = workers()
    if n == 1:
        for i, b in enumerate(batches):
            yield b, fn(i, b)
        return
    pool = _pool(n)
    pending: deque = deque()
    sizes = sizes if sizes is not None else {}
    largest, budget, most = sizes.get(key), in_flight_bytes(), batches_in_flight()

    def limit() -> int:
        return 1 if largest is None else max(1, min(most, budget // max(largest, 1)))

    def take() -> tuple[dict, object]:
        nonlocal largest
        b0, f = pending.popleft()
        value = f.result()
        largest = sizes[key] = max(largest or 0, _nbytes(value))
        return b0, value

    try:
        for i, b in enumerate(batches):
            pending.append((b, pool.submit(fn, i, b)))
            while len(pending) >= limit():
                yield take()
        while pending:
            yield take()
    finally:  # a consumer that stops early (or an error) leaves nothing running
        for _, f in pending:
            f.cancel()


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(n: int) -> ThreadPoolExecutor:
    """One thread pool per size for the process (starting threads per call costs more than the
    runs of a small model)."""
    if n not in _POOLS:
        _POOLS[n] = ThreadPoolExecutor(n, thread_name_prefix="edgec-run")
    return _POOLS[n]


def host_session(model, *, threads: int = 0) -> ort.InferenceSession:
    """This host's kernels, as a deployment on this machine runs the model (all optimisations
    on). ``EDGEC_HOST_KERNELS=off`` turns them off (the tests use it to show that nothing edgec
    writes depends on them)."""
    return session(model, optimize=os.environ.get(HOST_KERNELS_ENV, "on") != "off", threads=threads)


# ---------------------------------------------------------------------- running
def augment(model: onnx.ModelProto, tensors: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose outputs are its own followed by ``tensors``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for t in tensors:
        if t not in have:
            m.graph.output.append(helper.make_empty_tensor_value_info(t))
            have.add(t)
    return m


def capture(model: onnx.ModelProto, tensors: Iterable[str], batches: Iterable[dict],
            on_batch: Callable[[dict], None]) -> None:
    """Run ``model`` (reference arithmetic) on each batch; ``on_batch`` sees the values of
    ``tensors`` and of the graph outputs, batch by batch (constant memory)."""
    sess = reference_session(augment(model, tensors))
    names = output_names(sess)
    for _, values in run_batches(sess, names, batches):
        on_batch(values)


def run_outputs(model: onnx.ModelProto, batches: Iterable[dict], *, host: bool = False) -> dict[str, np.ndarray]:
    """Every graph output over all ``batches``, concatenated (for small evaluation sets)."""
    if host:  # this host's kernels, as deployed: one run at a time, every core on it
        sess = host_session(model)
        names = output_names(sess)
        runs = ((b, dict(zip(names, sess.run(names, b)))) for b in batches)
    else:
        sess = reference_session(model)
        names = output_names(sess)
        runs = run_batches(sess, names, batches)
    parts: dict[str, list] = {n: [] for n in names}
    for _, values in runs:
        for n in names:
            parts[n].append(np.asarray(values[n]))
    return join_batches(parts)


def join_batches(parts: dict[str, list]) -> dict[str, np.ndarray]:
    """Each output's batches joined along the batch axis (a rank-0 output: one value per batch).
    An output whose other dims change from batch to batch (NonZero's count) is a
    :class:`DataDependentOutput`."""
    out = {}
    for n, v in parts.items():
        arrays = [np.atleast_1d(a) for a in v]
        other = next((a.shape for a in arrays if a.shape[1:] != arrays[0].shape[1:]), None)
        if other is not None:
            raise DataDependentOutput(n, arrays[0].shape, other)
        out[n] = np.concatenate(arrays) if arrays else np.zeros(0)
    return out


# ---------------------------------------------------------------------- error metrics
class DataDependentOutput(UserError):
    """An output whose shape depends on the values (NonZero, a threshold's survivors): the
    reference and the rewritten model give different shapes, so no error can be measured on it."""

    def __init__(self, name: str, a, b):
        super().__init__(f"output '{name}' has a shape that depends on the data (here {tuple(a)} against "
                         f"{tuple(b)}): edgec cannot measure a lossy compile's error on it; compile a model that ends "
                         f"before the data-dependent op (NonZero, NonMaxSuppression, ...)")


MAX_CHANNELS = 4096  # slices per axis the per-channel error looks at (axes longer than this are not channels)
POSITIONS_RATIO = 8  # [batch, N, C]: N >= 8 C is anchors or tokens, not channels (channel_axes)
QUIET_CHANNEL = 1e-8  # a channel below this share of the mean channel energy (1e-4 of its RMS) is not judged


def channel_axes(shape: tuple) -> list[int]:
    """The axes of an output whose slices are channels: axis 1 (NCHW, [batch, classes], [batch,
    steps, ...]), and the last axis when it is short (<= 256) and no longer than any other
    non-batch axis (channels last, [batch, anchors, 4 + classes]); never a spatial axis of a
    one-channel map such as a text detector's probability map. In ``[batch, anchors, channels]``
    axis 1 is then positions, not channels: an anchor of background, all its scores near zero,
    would be "a channel" whose relative error is its rounding noise over nothing. The shape
    alone cannot tell that from a 1-D conv's ``[batch, channels, length]``: axis 1 counts as
    positions when it is at least ``POSITIONS_RATIO`` times the last axis (anchors outnumber
    classes by far; a conv's channels seldom outnumber its positions so), else both are judged."""
    last = len(shape) - 1
    channels_last = last > 1 and 1 < shape[last] <= 256 and all(shape[last] <= d for d in shape[1:last])
    positions = channels_last and last == 2 and shape[1] >= POSITIONS_RATIO * shape[last]
    axes = [1] if 1 < shape[1] <= MAX_CHANNELS and not positions else []
    if channels_last:
        axes.append(last)
    return axes


class ErrorAccumulator:
    """Streaming sums for rel_l2 / cosine per output (constant memory, deterministic order), and
    the worst *channel*: per slice along the channel axes of every output of rank >= 2
    (:func:`channel_axes`), so an output whose small-range channels collapse (detection scores concatenated with
    pixel-scale boxes) is seen even when its large channels keep the overall error low."""

    def __init__(self):
        self.sums: dict[str, np.ndarray] = {}  # [sum r^2, sum g^2, sum (g-r)^2, sum r*g]
        self.channels: dict[tuple[str, int], np.ndarray] = {}  # (output, axis) -> [2, n]: sum r^2, sum d^2

    def add(self, ref: dict, got: dict) -> None:
        for name, r in ref.items():
            r = np.asarray(r, dtype=np.float64)
            g = np.asarray(got[name], dtype=np.float64)
            if r.shape != g.shape:
                raise DataDependentOutput(name, r.shape, g.shape)
            r64, g64 = r.ravel(), g.ravel()
            d = g64 - r64
            v = np.array([np.sum(r64 * r64), np.sum(g64 * g64), np.sum(d * d), np.sum(r64 * g64)])
            self.sums[name] = self.sums.get(name, 0) + v
            if r.ndim < 2 or r.shape != g.shape:
                continue
            for axis in channel_axes(r.shape):
                other = tuple(a for a in range(r.ndim) if a != axis)
                c = np.stack([np.sum(r * r, axis=other), np.sum((g - r) ** 2, axis=other)])
                key = (name, axis)
                if key in self.channels and self.channels[key].shape != c.shape:
                    continue
                self.channels[key] = self.channels.get(key, 0) + c

    def worst_channel(self) -> float:
        worst = 0.0
        for rr, dd in self.channels.values():
            judged = rr > QUIET_CHANNEL * max(float(np.mean(rr)), 1e-30)
            if judged.any():
                worst = max(worst, float(np.max(np.sqrt(dd[judged] / rr[judged]))))
        return worst

    def result(self) -> dict:
        worst_rel, worst_cos = 0.0, 1.0
        for rr, gg, dd, rg in self.sums.values():
            rel = float(np.sqrt(dd / rr)) if rr > 0 else float(np.sqrt(dd))
            den = np.sqrt(rr * gg)
            cos = float(rg / den) if den > 0 else 1.0
            worst_rel, worst_cos = max(worst_rel, rel), min(worst_cos, cos)
        return {"rel_l2": worst_rel, "sqnr_db": sqnr_db(worst_rel), "cosine": worst_cos,
                "worst_channel_rel_l2": self.worst_channel()}


def sqnr_db(rel_l2: float) -> float:
    return round(float(-20 * np.log10(rel_l2)), 3) if rel_l2 > 0 else float("inf")


def error_metrics(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict:
    """rel_l2 (worst output), sqnr_db, cosine (worst output)."""
    acc = ErrorAccumulator()
    acc.add(ref, got)
    return acc.result()


def output_error(reference: onnx.ModelProto, model: onnx.ModelProto, batches, ref_outputs=None, *,
                 host: bool = False) -> dict:
    """Output error of ``model`` against ``reference`` over ``batches``: both in reference
    arithmetic, or ``model`` on this host's kernels with ``host=True``. Streamed (constant
    memory) unless ``ref_outputs`` (the reference's outputs, concatenated) is given."""
    if ref_outputs is not None:
        return error_metrics(ref_outputs, run_outputs(model, batches, host=host))
    s_ref = reference_session(reference)
    s_got = host_session(model) if host else reference_session(model)
    names = [o.name for o in s_ref.get_outputs()]
    acc = ErrorAccumulator()
    for b in batches:
        acc.add(dict(zip(names, s_ref.run(names, b))), dict(zip(names, s_got.run(names, b))))
    return acc.result()


# ---------------------------------------------------------------------- the build host
X86_ISAS = ("avx2", "avx512", "vnni", "amx")


def cpu_flags() -> set[str]:
    """This CPU's feature flags, lower case: what the CPUID instruction reports to this process
    (numpy's runtime dispatch reads it, as ONNX Runtime's MLAS does), plus /proc/cpuinfo's
    ``avx_vnni``/``amx_int8`` (which numpy does not name) when /proc/cpuinfo describes the same CPU
    (under an emulator it describes the real one, and is ignored)."""
    flags: set[str] = set()
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # numpy < 2
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as features
        except ImportError:
            features = {}
    flags = {k.lower() for k, v in features.items() if v}
    proc: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    proc = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    if not flags:
        return proc
    same_cpu = ("avx512f" in proc) == ("avx512f" in flags) and ("avx2" in proc) == ("avx2" in flags)
    if same_cpu:
        flags |= {f for f in ("avx_vnni", "amx_int8") if f in proc}
    return flags


def host_isa(flags: set[str] | None = None, machine: str | None = None) -> str:
    """The build host's int8 class, as the ``cpu`` target names it: ``amx`` (AMX-INT8),
    ``vnni`` (AVX512-VNNI or AVX-VNNI: int8 dot products accumulate in int32), ``avx512``
    (AVX-512BW without VNNI), ``avx2``; ``sse`` for older x86 and the machine name (``aarch64``,
    ...) off x86. ONNX Runtime's U8S8 kernels saturate on ``avx512``, ``avx2`` and ``sse``."""
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return machine or "unknown"
    flags = cpu_flags() if flags is None else {f.lower() for f in flags}
    if "amx_int8" in flags:
        return "amx"
    if flags & {"avx512vnni", "avx512_vnni", "avx_vnni"}:
        return "vnni"
    if "avx512bw" in flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    return "sse"


def host_description() -> str:
    flags = cpu_flags()
    shown = sorted(f for f in flags if f in ("avx2", "avx512bw", "avx512vnni", "avx_vnni", "amx_int8"))
    return f"{host_isa(flags)} ({platform.machine()}{': ' + ' '.join(shown) if shown else ''})"
