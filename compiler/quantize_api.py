"""Quantization as compile() runs it: calibrate, plan, refine the plan by measurement, write it.

:func:`quantize_for_target` is the one call compile() makes; :func:`quantize` is the same for a
given scheme (tests, benchmarks, other toolchains). Both rewrite the IR in place and return the
report section (a JSON-able dict).

Stages (``int8`` and ``mixed``)
1. **Calibrate** the float graph (:mod:`edgec.calibration`, reference executor): streaming
   statistics, then ranges per method.
2. **Plan**: the target's rule table (:mod:`edgec.quant_rules`) with the scheme's switches and
   the ranges give a :class:`~edgec.quant_plan.QuantPlan` (:func:`edgec.quant_plan.build_plan`).
3. **Refine by measurement** on the probe (:mod:`edgec.quant_probe`: one measuring model, one
   session, no IR copies), in reference arithmetic:
   - ``mixed``: a precision per layer (FP32 / INT8 / INT4) from measured sensitivity
     (:mod:`edgec.mixed_precision`), meeting ``max_error`` or ``max_bytes``;
   - bias correction (int32-bias schemes): the per-channel mean shift of each quantized
     Conv/ConvTranspose/Gemm output, measured layer after layer in one adaptive pass, absorbed
     into its bias; kept only if the output error drops;
   - cross-layer equalisation (``equalize="auto"``, where equalisable Conv[-Relu]-Conv pairs
     exist with per-tensor weights or a depthwise conv in a pair): the int8 plan is measured
     with and without equalised weights (their min-max ranges follow from per-channel
     statistics; histogram methods re-calibrate) and the lower error wins; the report gives both.
   - the int8 guard (``int8``): above the error budget, ops go back to float by measured
     contribution, then (schemes with ``wide_activations``: ONNX Runtime's cpu and neon) the
     noisiest activation tensors get 16 bits, until the budget is met; beyond ``COLLAPSE``
     nothing is written.
4. **Write** the winning plan: the ``equalize_layers`` pass when equalisation won, then the
   ``quantize_qdq`` materialiser with the plan in its context.

``fp16`` runs the ``convert_fp16`` pass (no calibration data needed).

Error metric everywhere: ``rel_l2 = ||y_q - y_fp32|| / ||y_fp32||`` over (up to 512) calibration
samples (all of them, or whole batches spread over the set: :class:`Subset`), worst graph output; also SQNR in dB and cosine. Every measurement runs in the
reference arithmetic of :mod:`edgec.runtime` (exact QDQ), so the output is the same on any host.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable, Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from . import calibration as calib_mod
from .analysis.saturation import saturation_bounds
from . import equalization, mixed_precision, rounding as rounding_mod
from .errors import UserError, VerificationError
from .ir import IR, plain_dtype
from .options import QuantOptions
from .pipeline import PassContext, PassManager
from . import calibdata
from .calibdata import Subset, count_samples
from .quant_plan import (QuantPlan, Ranges, build_plan, clip_bounds, fake_quantized_weight, is_wide, node_id, node_key,
                         scale_groups, weighted_nodes, with_wide)
from .quant_probe import PREFIX as PROBE_PREFIX
from .quant_probe import ChannelMeans, Probe
from .quant_rules import PRE_QUANTIZED, table_for
from . import runtime
from .runtime import augment, error_metrics, join_batches, output_error, reference_session, run_batches, sqnr_db
from .target import QuantScheme

from edgec.passes.convert_fp16 import ConvertFP16
from edgec.passes.equalize_layers import EqualizeLayers
from edgec.passes.quantize import QuantizeQDQ

MODES = ("int8", "fp16", "mixed")
ERROR_SAMPLES = 512  # calibration samples the reported output error is measured on
BIAS_SAMPLES = 128  # samples bias correction measures on
DEFAULT_INT8_BUDGET = 0.1  # int8 output error (relative L2, 20 dB SQNR) above which ops fall back to float
COLLAPSE = 0.5  # an int8 result whose output error is beyond this (6 dB SQNR, cosine ~0.87) is refused, not written
MAX_FALLBACK = 0.25  # at most this fraction of the quantized ops go back to float
MAX_CANDIDATES = 16  # candidates whose contribution is measured one by one (the trace's noisiest first)
MAX_STEPS = 8  # fallback steps, each measured
# fallback steps beyond the first that comes within this of the lowest error are not kept: on PP-OCRv4's
# detector one op removed 0.034 of 0.161, the next seven 0.001 between them, and with all eight
# float the held-out box F1 fell from 0.957 to 0.943
STEP_TOLERANCE = 0.02
FALLBACK_SAMPLES = 32  # calibration samples the fallback's measurements run on (a whole batch at least)
TRACE_MEMORY = 2 << 30  # bytes the per-layer trace's observed tensors may take at once, all batches in flight
# the 16-bit step (schemes with wide_activations): scale groups go to 16 bits noisiest first, in
# prefixes of 1, 2, 4, ... groups until one meets the budget, then bisected down; at most this
# many measurements
MAX_WIDE_MEASUREMENTS = 16
# ... after ranking the noisiest groups by measurement: each of these goes 16-bit alone, and the
# ones that lower the error go first (on PP-OCRv4's detector, noise order needed 24 tensors on 16
# bits, the 23rd group giving most of the gain; measured order, 3)
MAX_WIDE_CANDIDATES = 32
# ... and when every activation on 16 bits still misses, the weighted ops measured kept float
# (those whose int8 weights round most; 64 covers every op of a MobileNet-sized net)
MAX_WEIGHT_CANDIDATES = 64
WIDE_RANK_SAMPLES = 8  # calibration samples the ranking measures on (an order, not a verdict; a whole batch at least)
# the budget also holds per output channel, this much looser: one collapsed channel (a detector's
# class scores beside its box coordinates) fails it even when the output's overall error is small
CHANNEL_FACTOR = 4.0
# --calib-method auto measures the int8 plan of each of these and keeps the lowest output error.
# Not entropy: its search is the slowest, and on the trained models and the example it never
# measured lowest (named, it is still there)
AUTO_METHODS = ("minmax", "percentile", "mse")
# a clipping method (percentile, mse) replaces min-max only when its error is this much lower:
# clipped ranges fit the calibration set's extremes, and held-out data beyond them saturates
# (a transformer's outlier dimensions: percentile measured 3% lower on the calibration data and
# its worst held-out token fell from cosine 0.987 to 0.977); min-max saturates nothing it saw
AUTO_MARGIN = 0.1
ROUNDING_FLOOR = 0.2  # GPTQ rounding is tried when the int8 output error is at least this fraction of the budget


def _trace_bounds(ir: IR, plan: QuantPlan, saturation: dict) -> dict[str, tuple[float, float]]:
    """Tensor -> the interval its dequantized copy is clamped to besides rounding: a Relu (0, inf)
    or Clip(0, c) (0, c) folded into its range, or the interval its readers tell apart
    (:mod:`edgec.analysis.saturation`), which calibration clamped its range to."""
    bounds = dict(saturation)
    folded = set(plan.folded)
    for n in ir.nodes:
        if node_id(n) not in folded or not n.inputs:
            continue
        hi = clip_bounds(ir, n)[1] if n.op == "Clip" else None
        a, b = bounds.get(n.inputs[0].name, (-np.inf, np.inf))
        bounds[n.inputs[0].name] = (max(a, 0.0), min(b, float(hi) if hi is not None else np.inf))
    return bounds


def kept_steps(steps: list[dict], full: float, budget: float | None = None) -> list[dict]:
    """The fallback steps kept: the fewest that come within ``STEP_TOLERANCE`` of the lowest
    ``error_after`` (the steps after them float ops for gains the measurement cannot tell from
    noise), but never fewer than the first that meets ``budget`` when one does; none unless they
    cut the error ``full`` by a tenth."""
    best = min(range(len(steps)), key=lambda i: steps[i]["error_after"], default=None)
    if best is None or steps[best]["error_after"] > 0.9 * full:
        return []
    low = steps[best]["error_after"]
    cut = next(i for i in range(best + 1) if steps[i]["error_after"] <= low * (1 + STEP_TOLERANCE))
    if budget is not None and steps[cut]["error_after"] > budget:
        cut = next((i for i in range(best + 1) if steps[i]["error_after"] <= budget), cut)
    return steps[:cut + 1]


def weight_rounding(w: np.ndarray, fq: np.ndarray, axis: int | None) -> float:
    """How much int8 rounding changes a weight ``w`` (``fq``: dequantized): the relative L2 of
    the whole weight, or the median output channel's relative change of its kernel sum (its gain
    on a flat input), whichever is larger. A kernel whose large taps cancel (a BN-folded
    depthwise conv that finds edges) has a small relative weight error and a large gain error,
    which on the flat regions of an image is the output's."""
    w64 = w.astype(np.float64)
    d = fq.astype(np.float64) - w64
    rel = float(np.linalg.norm(d) / np.linalg.norm(w64))
    if axis is None or w.ndim < 2:
        return rel
    other = tuple(a for a in range(w.ndim) if a != axis)
    sums, drift, norms = np.sum(w64, axis=other), np.sum(d, axis=other), np.sqrt(np.sum(w64 * w64, axis=other))
    live = norms > 0
    if not live.any():
        return rel
    # (the kernel sum's floor keeps one summing to zero by chance finite; the median, rare)
    gain = np.abs(drift[live]) / np.maximum(np.abs(sums[live]), norms[live] * 1e-4)
    return max(rel, float(np.median(gain)))


def guarded_error(metrics: dict) -> float:
    """The error the int8 budget is checked against: the worst output's relative L2, or its
    worst channel's over ``CHANNEL_FACTOR``, whichever is larger."""
    return max(metrics["rel_l2"], metrics.get("worst_channel_rel_l2", 0.0) / CHANNEL_FACTOR)


def quantize_for_target(ir: IR, target, options: QuantOptions, calib, *, max_error: float | None = None,
                        log: Callable[[str], None] | None = None) -> dict:
    """Quantize ``ir`` in place as ``target``'s scheme wants (``options``: a
    :class:`edgec.options.QuantOptions`); the report section."""
    mode = options.mode
    if mode not in MODES:
        raise UserError(f"--quantize {mode}: choose int8, fp16 or mixed")
    if mode != "fp16" and calib is None:
        raise UserError(f"--quantize {mode} needs calibration data: --calib PATH (or --calib random, explicitly)")
    scheme = target.quant
    if mode == "mixed" and not scheme.mixed:
        raise UserError(f"target {target.name}: use --quantize int8 (the device's toolchain chooses FP16 or INT8 per "
                        f"layer itself); keep sensitive layers float with --keep-float")
    if scheme.rules == "tensorrt" and (options.activations or scheme.activations) != "symmetric":
        raise UserError(f"target {target.name}: TensorRT needs symmetric activations (zero point 0)")
    return quantize(ir, calib, mode=mode, scheme=scheme, method=options.method, percentile=options.percentile,
                    activations=options.activations, weights=options.weights, keep_float=options.keep_float,
                    max_error=max_error, max_bytes=options.max_bytes, progress=options.progress,
                    strict=options.strict, rounding=options.rounding, sixteen_bit=options.sixteen_bit, log=log)


def quantize(ir: IR, calib: Iterable[dict] | None = None, *, mode: str = "int8", scheme: QuantScheme | None = None,
             method: str | dict = "auto", percentile: float = 99.99, activations: str | None = None,
             weights: str | None = None, weight_type: str | None = None, keep_float: Iterable[str] = (),
             max_error: float | None = None, max_bytes: int | None = None, bias_correction: bool = True,
             equalize: bool | str = "auto", rounding: str = "nearest", progress=False, strict: bool = False,
             sixteen_bit: bool = True, saturation: bool = True,
             log: Callable[[str], None] | None = None) -> dict:
    """Quantize ``ir`` in place under ``scheme`` (default: ONNX Runtime's fusable QDQ, uint8
    activations, per-channel uint8 weights); ``activations``, ``weights`` and ``weight_type``
    override the scheme's switches. ``calib`` is any re-iterable of ``{input: array}`` batches
    (a :class:`edgec.calibdata.CalibrationSet`); required for ``int8`` and ``mixed``.
    ``equalize``: ``"auto"``, ``"always"`` or False (see the module doc). ``rounding``:
    ``"nearest"`` or ``"gptq"`` (int8: GPTQ levels where they lower the measured output error;
    float64 linear algebra, so the chosen levels can differ between BLAS builds and thread counts,
    which is why it is not the default). ``saturation``: each activation's statistics are clamped to
    the interval its readers tell apart before its range is chosen (:mod:`edgec.analysis.saturation`;
    False only to measure what that gives)."""
    log = log or (lambda s: None)
    if mode not in MODES:
        raise UserError(f"unknown quantization mode '{mode}' (known: {', '.join(MODES)})")
    if equalize not in (False, None, "auto", "always", True):
        raise UserError(f"equalize must be 'auto', 'always' or False, got {equalize!r}")
    if rounding not in ("nearest", "gptq"):
        raise UserError(f"rounding must be 'nearest' or 'gptq', got {rounding!r}")
    t0 = time.perf_counter()
    if mode == "fp16":
        return _fp16(ir, calib, keep_float, t0)
    if calib is None:
        raise UserError(f"--quantize {mode} needs calibration data (--calib PATH)")
    scheme = scheme or QuantScheme(weight_type="uint8", wide_activations=True)
    overrides = {k: v for k, v in (("activations", activations), ("weights", weights), ("weight_type", weight_type))
                 if v is not None}
    scheme = replace(scheme, **overrides)
    method = calib_mod.parse_method(method) if isinstance(method, str) else method
    # an already-quantized input (ONNX Runtime's QDQ or QOperator output): its quantized ops are
    # kept as they are, and the report must not read as if edgec had quantized them
    already = sorted({n.op for n in ir.nodes if n.op in PRE_QUANTIZED})
    report = _Quantizer(ir, calib, scheme, mode=mode, method=method, percentile=percentile,
                        keep_float=tuple(keep_float or ()), max_error=max_error, max_bytes=max_bytes,
                        bias_correction=bias_correction, equalize=equalize, rounding=rounding, progress=progress,
                        strict=strict, sixteen_bit=sixteen_bit, saturation=saturation, log=log).run()
    report["seconds"] = round(time.perf_counter() - t0, 3)
    if already:
        report.setdefault("notes", []).insert(0, (
            f"the input model is already quantized ({', '.join(already)}): those ops were kept as they are, not "
            f"re-quantized; the error above is only what edgec's own quantization added"))
    return report


# ops whose outputs are sequences or optionals, not tensors: no range to calibrate (ONNX Runtime
# refuses the statistics ops on them)
NOT_TENSORS = {"SequenceConstruct", "SequenceInsert", "SequenceErase", "SequenceEmpty", "SplitToSequence",
               "SequenceMap", "Optional"}


def calibration_tensors(ir: IR) -> list[str]:
    """Every float activation a plan may need a range for (graph inputs + node outputs)."""
    names = [t.name for t in ir.inputs]
    for n in ir.nodes:
        if n.op in ("QuantizeLinear", "DequantizeLinear", "Shape", "Constant") or n.op in NOT_TENSORS:
            continue
        names.extend(o.name for o in n.outputs if o.name)
    tensors = ir.tensors()
    out = []
    for t in dict.fromkeys(names):
        tensor = tensors.get(t)
        dt = plain_dtype(tensor.dtype) if tensor is not None and tensor.dtype is not None else np.dtype(np.float32)
        if dt == np.float32:
            out.append(t)
    return out


def concat_parts(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return join_batches({n: [p[n] for p in parts] for n in (parts[0] if parts else {})})


def _tensor_bytes(model: onnx.ModelProto, names: list[str], sample: dict) -> dict[str, int]:
    """float32 bytes of each tensor for one batch: shapes inferred with the inputs fixed to the
    ``sample`` batch's (so a dynamic batch, height or width counts as that batch's); a tensor
    whose shape stays unknown counts as the largest known one."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for i in m.graph.input:
        if i.name in sample and i.type.HasField("tensor_type"):
            shape = np.shape(sample[i.name])
            dims = i.type.tensor_type.shape.dim
            if len(dims) == len(shape):
                for d, v in zip(dims, shape):
                    d.ClearField("dim_param")
                    d.dim_value = int(v)
    del m.graph.value_info[:]
    try:
        m = onnx.shape_inference.infer_shapes(m)
    except Exception:  # (a model onnx cannot infer: every tensor counts as unknown)
        pass
    known: dict[str, int] = {}
    for vi in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output):
        dims = vi.type.tensor_type.shape.dim if vi.type.HasField("tensor_type") else []
        if vi.name in names and dims and all(d.HasField("dim_value") and d.dim_value > 0 for d in dims):
            known[vi.name] = 4 * int(np.prod([d.dim_value for d in dims], dtype=np.int64))
    largest = max(known.values(), default=4)
    return {n: known.get(n, largest) for n in names}


def _by_bytes(names: list[str], nbytes: dict[str, int], budget: float) -> list[list[str]]:
    """``names`` in order, cut into runs whose bytes stay within ``budget`` (one at least)."""
    chunks: list[list[str]] = []
    size = 0.0
    for n in names:
        if not chunks or (size + nbytes[n] > budget and chunks[-1]):
            chunks.append([])
            size = 0.0
        chunks[-1].append(n)
        size += nbytes[n]
    return chunks


class _FloatCapture:
    """What the float model computes on the measurement subsets, kept while calibration (or an
    equalised re-calibration) runs anyway: the graph outputs per batch on the error subset, and
    the per-channel means of the layer outputs bias correction compares with, on its subset."""

    def __init__(self, outputs: list[str], layers: dict, error: Subset, bias: Subset):
        self.outputs, self.error, self.bias = outputs, error, bias
        self.parts: dict[int, dict[str, np.ndarray]] = {}  # batch index -> graph outputs
        self.means = ChannelMeans(layers)
        self.divisors: dict[str, np.ndarray] = {}  # layer -> per-channel divisor (an equalised model's)
        self._error, self._bias = set(error.positions), set(bias.positions)

    @property
    def positions(self) -> set[int]:
        """The batches whose values calibration must hand over (``capture_at``)."""
        return self._error | self._bias

    def __call__(self, i: int, values: dict) -> None:
        if i in self._error:
            self.parts[i] = {n: values[n] for n in self.outputs}
        if i in self._bias:
            self.means.add(values)

    def reference(self, subset: Subset) -> dict[str, np.ndarray]:
        """The float outputs on ``subset`` (the error subset or one it holds). Positions past the
        end of a set whose length was unknown were never read, so they are not here either."""
        return join_batches({n: [self.parts[i][n] for i in subset.positions if i in self.parts] for n in self.outputs})

    def layer_means(self) -> dict[str, np.ndarray]:
        means = self.means.result()
        return {k: (v / self.divisors[k] if k in self.divisors else v) for k, v in means.items()}

    def equalized(self, divisors: dict[str, np.ndarray]) -> "_FloatCapture":
        """The same capture for the equalised model: its outputs are the same (equalisation is
        exact), the divided convolutions' channel means are divided too."""
        other = _FloatCapture(self.outputs, {}, self.error, self.bias)
        other.parts, other.means, other.divisors = self.parts, self.means, dict(divisors)
        return other


class _Quantizer:
    """One int8/mixed quantization: calibrate, plan, refine, write (the module doc's stages)."""

    def __init__(self, ir: IR, calib, scheme: QuantScheme, *, mode, method, percentile, keep_float, max_error,
                 max_bytes, bias_correction, equalize, progress, log, strict=False, rounding="nearest",
                 sixteen_bit=True, saturation=True):
        self.ir, self.calib, self.scheme, self.mode = ir, calib, scheme, mode
        self.method, self.percentile, self.keep_float = method, percentile, keep_float
        self.max_error, self.max_bytes = max_error, max_bytes
        self.bias_correction = bias_correction and scheme.bias == "int32"
        self.equalize = equalize if scheme.rules == "ort-fusable" else False
        self.progress, self.log = progress, log
        self.strict = strict
        self.saturation = saturation and scheme.saturation
        self.sixteen_bit = sixteen_bit and scheme.wide_activations
        self.rounding = rounding == "gptq" and mode == "int8"
        self._known_parts = None
        self._sw_probe: Probe | None = None
        self._sw16_probe: Probe | None = None
        self.wide: tuple[str, ...] = ()  # activation tensors the fallback gave 16 bits

    def run(self) -> dict:
        ir, scheme = self.ir, self.scheme
        ir.infer_shapes()
        float_model = ir.to_onnx()  # the one measuring copy: calibration and the probe are built from it
        self.float_model = float_model
        # tensor -> the interval its readers tell apart: what calibration clamps to (computed once)
        self.bounds = saturation_bounds(float_model) if self.saturation else {}
        self.tensors = calibration_tensors(ir)
        self.outputs = runtime.output_names(float_model)
        self.error_set = calibdata.subset(self.calib, ERROR_SAMPLES)
        self.bias_set = calibdata.subset(self.calib, min(BIAS_SAMPLES, ERROR_SAMPLES))
        self.layers = {node_id(n): n for n in weighted_nodes(ir, table_for(scheme))
                       if n.op in ("Conv", "ConvTranspose", "Gemm")}
        capture = _FloatCapture(self.outputs, self.layers, self.error_set, self.bias_set)
        self.cle = self._equalization_candidate()
        per_channel = {}
        if self.cle is not None and (self.method == "auto" or not calib_mod.needs_histograms(self.method)):
            # min-max of the equalised model follows from per-channel min-max of the tensors it scales
            shapes = ir.tensors()
            per_channel = {t: len(shapes[t].shape) for t in equalization.scaled_tensors(ir, self.cle[1])
                           if shapes[t].shape is not None}
        tc = time.perf_counter()
        stats = calib_mod.collect(float_model, self.tensors, self.calib, progress=self.progress,
                                  total=getattr(self.calib, "num_samples", None), on_batch=capture,
                                  histograms=calib_mod.needs_histograms(self.method),
                                  capture=list(capture.means.tensors.values()),
                                  capture_at=capture.positions, per_channel=per_channel)
        self.stats = stats
        calib_seconds = time.perf_counter() - tc
        self.reference = capture.reference(self.error_set)
        choice = None
        if self.method == "auto":
            ranges, choice = self._choose_method(stats)
        else:
            ranges = self._ranges(stats)
            self.widest = build_plan(ir, scheme, ranges, keep_float=self.keep_float)
            self.probe = self._new_probe(self.widest)

        report: dict = {"mode": self.mode, "method": self.method if isinstance(self.method, str) else dict(self.method),
                        "activations": scheme.activations, "weights": scheme.weights}
        if choice is not None:
            report["method_choice"] = choice
        if scheme.rules == "tensorrt":
            report["placement"] = "tensorrt"
        else:
            report["weight_type"] = scheme.weight_type
        report["calibration"] = {"samples": count_samples(self.calib), "tensors": len(self.tensors),
                                 "seconds": round(calib_seconds, 3)}
        if self.saturation:  # tensors whose observed values reach where every reader is flat
            report["calibration"]["clamped"] = sum(
                1 for t, (a, b) in self.bounds.items()
                if t in stats and stats[t].count and (stats[t].min < a or stats[t].max > b))
        if _uses_percentile(self.method):
            report["percentile"] = self.percentile

        weights, cle = None, None
        if self.equalize:
            ranges, weights, capture, cle = self._equalization(ranges, capture)
        plan, rep = self._refine(ranges, weights, capture)
        if cle is not None:
            rep["cross_layer_equalization"] = cle
        if self.mode == "int8":
            plan, rep = self._guard(plan, rep, ranges, weights, capture)
        report.update(rep)
        total = len(weighted_nodes(ir, table_for(scheme)))  # before the weights become DequantizeLinear outputs
        records = PassManager(([EqualizeLayers()] if weights else []) + [QuantizeQDQ()], reinfer_shapes=False).run(
            ir, PassContext(plan=plan))
        # a layer reading a 16-bit tensor runs ONNX Runtime's float kernel between the Q/DQ
        wide_in = sum(1 for w in plan.weights.values()
                      if plan.activations.get(w.input) is not None and is_wide(plan.activations[w.input].dtype))
        int8 = len(plan.weights) - wide_in
        report["int8_coverage"] = {"weighted_int8": int8, "weighted": total,
                                   "ratio": round(int8 / total, 4) if total else None}
        if wide_in:
            report["int8_coverage"]["weighted_16bit_input"] = wide_in
        report["float_layers"] = [list(f) for f in plan.float_layers]
        if scheme.rules == "tensorrt":
            report.update({"quantized_layers": len(plan.weights), "residual_adds": plan.residual_adds})
        else:
            report.update(plan.summary())
        report["notes"] = [n for r in records for n in r.notes]
        report["measurements"] = self.probe.runs
        return report

    def _new_probe(self, widest: QuantPlan, **kw) -> Probe:
        """A probe of ``widest`` with this compile's bias-correction layers and layer inputs;
        ``kw``: :class:`Probe`'s ``switchable`` (default: mixed mode's), ``wide``, ``observe``,
        ``layer_inputs`` (default: with GPTQ rounding, which reads them)."""
        kw.setdefault("switchable", self.mode == "mixed")
        kw.setdefault("layer_inputs", self.rounding)
        return Probe(self.ir, self.float_model, self.scheme, widest,
                     adaptive=list(self.layers) if self.bias_correction else (), **kw)

    def _choose_method(self, stats) -> tuple[dict, dict]:
        """``--calib-method auto``: the ranges of every method in ``AUTO_METHODS`` (one
        calibration pass gave the statistics all of them need), each int8 plan measured on the
        error subset in reference arithmetic; the clipping method with the lowest output error
        (relative L2, as equalisation and bias correction compare) wins if it is ``AUTO_MARGIN``
        below min-max's and its :func:`guarded_error` (the budget's) is no worse, else min-max.
        (Ranking by the guarded error let one output channel's error pick percentile on a
        ShuffleNet whose overall error it raised, on held-out data too.) The winner's method is
        used from here on (equalisation re-calibrates with it) and its measured outputs are reused. Plans whose structure differs
        (a Concat shares a scale under one method's ranges and not another's) get their own
        probe; the winner's becomes the compile's. Returns (ranges, report section)."""
        t0 = time.perf_counter()
        probes: dict = {}
        measured = []
        for m in AUTO_METHODS:
            self.method = m
            ranges = self._ranges(stats)
            plan = build_plan(self.ir, self.scheme, ranges, keep_float=self.keep_float)
            key = (plan.folded, tuple(sorted((k, None if v.readers is None else tuple(sorted(v.readers)))
                                             for k, v in plan.activations.items())), tuple(sorted(plan.weights)))
            if key not in probes:
                probes[key] = self._new_probe(plan)
            probe = probes[key]
            parts = probe.output_parts(plan, self.error_set.batches)
            metrics = error_metrics(self.reference, concat_parts(parts))
            measured.append((guarded_error(metrics), m, ranges, plan, probe, parts, metrics))
            self.log(f"calibration method {m}: int8 output error {metrics['rel_l2']:.4g} (relative L2)")
        best = measured[0]  # min-max
        clipped = min(measured[1:], key=lambda r: r[6]["rel_l2"])  # min() keeps the first of equal errors
        if clipped[6]["rel_l2"] < (1.0 - AUTO_MARGIN) * best[6]["rel_l2"] and clipped[0] <= best[0]:
            best = clipped
        _, self.method, ranges, self.widest, self.probe, parts, _ = best
        if self.mode == "int8":
            self._known_parts = parts
        section = {"chosen": self.method, "measured": "int8 plan before bias correction, error subset",
                   "margin": AUTO_MARGIN,
                   "samples": self.error_set.samples, "seconds": round(time.perf_counter() - t0, 3),
                   "rel_l2": {r[1]: round(r[6]["rel_l2"], 6) for r in measured},
                   "guarded": {r[1]: round(r[0], 6) for r in measured}}
        return ranges, section

    def _equalization_candidate(self):
        """(equalised weights, per-channel divisors) when equalisation is worth measuring."""
        if not self.equalize:
            return None
        ir = self.ir
        if self.equalize not in ("always", True) and not equalization.worthwhile(ir, self.scheme.weights == "per-tensor"):
            return None
        updates, divisors = equalization.equalize_with_scales(ir)
        return (updates, divisors) if updates else None

    def _equalization(self, ranges: dict, capture: "_FloatCapture"):
        """Cross-layer equalisation, kept only where it lowers the error: the int8 plan is
        measured with the float weights and with equalised ones, and the better one goes on to
        the rest of the refinement (precisions, bias correction). The equalised model's min-max
        ranges and layer means follow from per-channel statistics taken while calibrating;
        histogram methods re-calibrate it. Returns (ranges, equalised weights or None, float
        capture, report section)."""
        ir = self.ir
        if self.cle is None:
            return ranges, None, capture, {"pairs": 0, "applied": False}
        updates, divisors = self.cle
        scaled = equalization.scaled_tensors(ir, divisors)
        if not calib_mod.needs_histograms(self.method) and all(
                t in self.stats and self.stats[t].channel_min is not None for t in scaled):
            cle_stats = {t: (st.scaled(scaled[t][1]) if t in scaled else st) for t, st in self.stats.items()}
            cle_capture = capture.equalized(divisors)
        else:
            cle_capture = _FloatCapture(self.outputs, self.layers, self.error_set, self.bias_set)
            cle_stats = calib_mod.collect(_with_weights(self.float_model, updates), self.tensors, self.calib,
                                          on_batch=cle_capture, histograms=calib_mod.needs_histograms(self.method),
                                          capture=list(cle_capture.means.tensors.values()),
                                          capture_at=cle_capture.positions)
        cle_ranges = self._ranges(cle_stats)
        errors, parts = [], []
        for r, w in ((ranges, None), (cle_ranges, updates)):
            plan = build_plan(ir, self.scheme, r, keep_float=self.keep_float)
            parts.append(self.probe.output_parts(plan, self.error_set.batches, weights=w))
            errors.append(error_metrics(self.reference, concat_parts(parts[-1]))["rel_l2"])
        use = self.equalize in ("always", True) or errors[1] < errors[0]
        section = {"pairs": len(equalization.pairs(ir)), "applied": use, "rel_l2_without": errors[0],
                   "rel_l2_with": errors[1], "measured": "int8 plan before bias correction"}
        if self.mode == "int8":  # the winner's int8 plan is the one refined next: its outputs are known
            self._known_parts = parts[1] if use else parts[0]
        return (cle_ranges, updates, cle_capture, section) if use else (ranges, None, capture, section)

    # ------------------------------------------------------------------ no collapse
    def _guard(self, plan: QuantPlan, rep: dict, ranges: dict, weights, capture: _FloatCapture):
        """An int8 result above the error budget (``max_error``, default ``DEFAULT_INT8_BUDGET``)
        falls back, measured step by step (:meth:`_fall_back`); one still beyond
        ``COLLAPSE`` is refused with the per-layer trace that says where the error comes from.
        ``strict`` keeps everything int8 and only reports."""
        budget = self.max_error if self.max_error is not None else DEFAULT_INT8_BUDGET
        err = guarded_error(rep["error"])
        if err <= budget:
            return plan, rep
        self.log(f"int8 error {err:.4g} (relative L2 {rep['error']['rel_l2']:.4g}, worst channel "
                 f"{rep['error'].get('worst_channel_rel_l2', 0):.4g}) is above the budget {budget:g}: measuring "
                 f"where it comes from")
        if not self.strict:
            plan, rep = self._fall_back(plan, rep, ranges, weights, capture, budget)
        else:
            rep["trace"] = self._trace(plan, weights)
            rep["budget"] = {"max_error": budget, "met": False, "strict_int8": True}
        if rep["error"]["rel_l2"] > max(COLLAPSE, budget):  # (the per-channel check drives the fallback only)
            worst = sorted(rep.get("trace", []), key=lambda r: r["quant_rel_l2"], reverse=True)[:3]
            where = "; ".join(f"'{r['tensor']}' after {r['op']} (its own int8 rounding {r['quant_sqnr_db']:.1f} dB)"
                              for r in worst) or "no single tensor stands out"
            fb = rep.get("fallback", {})
            tried = ("with --strict-int8 nothing was kept float" if self.strict else
                     f"even with {len(fb.get('float', []))} ops kept float"
                     + (f" and {len(fb['sixteen_bit']['tensors'])} tensors on 16 bits"
                        if fb.get("sixteen_bit", {}).get("tensors") else ""))
            raise VerificationError(
                f"int8 collapses this model: output error (relative L2) {rep['error']['rel_l2']:.3g}, worst output "
                f"channel {rep['error'].get('worst_channel_rel_l2', 0):.3g}, SQNR {rep['error']['sqnr_db']:.1f} dB, "
                f"{tried}; the worst layers: {where}. Use --keep-float NAME,... for them, "
                f"{self.scheme.alternatives}; nothing was written")
        return plan, rep

    def _fall_back(self, plan: QuantPlan, rep: dict, ranges: dict, weights, capture: _FloatCapture, budget: float):
        """Quantized tensors back to float, most harmful first, until the error meets ``budget``.

        A unit is one quantized activation tensor with the ops that quantize it: its producer
        (whose output Q/DQ it is) and its quantized readers (a weighted op quantizes its input).
        Each unit's contribution is measured (the error with that unit float, everything else
        int8), then units go float in that order, each step measured, at most ``MAX_FALLBACK``
        of the quantized ops (beyond the first unit) and ``MAX_STEPS`` steps. With more than
        ``MAX_CANDIDATES`` candidates, the ones whose own quantization is noisiest (the trace)
        are measured. Measurements run on ``FALLBACK_SAMPLES`` calibration samples (:class:`Subset`).
        Still above the budget, where the scheme has 16-bit activations, the last step gives the
        noisiest tensors 16 bits (:meth:`_widen`)."""
        ir = self.ir
        probe = self._switchable_probe()
        on = calibdata.subset(self.calib, min(FALLBACK_SAMPLES, self.bias_set.samples))  # part of the bias subset
        batches, ref = on.batches, capture.reference(on)
        keep = list(self.keep_float)

        def error(extra: list[str]) -> float:
            p = build_plan(ir, self.scheme, ranges, keep_float=keep + extra)
            return guarded_error(error_metrics(ref, probe.outputs(p, batches, weights=weights)))

        trace = self._trace(plan, weights, batches)
        noise = {r["tensor"]: r["quant_rel_l2"] for r in trace}
        groups = self._units(plan)
        # candidates: each scale group (a tensor with everything sharing its scale) and each op
        # of it alone, noisiest groups first
        units: dict[str, list[str]] = {}
        for rank, t in enumerate(sorted(groups, key=lambda t: noise.get(t, 0.0), reverse=True)):
            singles = [(f"op {k}", [k]) for k in groups[t]] if rank < 4 else []
            for name, ops in [(t, groups[t])] + singles:
                if len(units) < MAX_CANDIDATES and name not in units and ops not in units.values():
                    units[name] = ops
        full = error([])
        after = {u: error(ops) for u, ops in units.items()}
        contribution = {u: full - after[u] for u in units}
        fixers = [u for u in units if after[u] <= budget]
        if fixers:  # one candidate meets the budget alone: the one floating fewest ops
            order = [min(fixers, key=lambda u: (len(units[u]), after[u]))]
        else:  # the most error removed per op kept float first
            order = sorted((u for u in units if contribution[u] > 0),
                           key=lambda u: -contribution[u] / len(units[u]))
        limit = max(1, int(MAX_FALLBACK * max(len({k for ops in groups.values() for k in ops}), 1)))
        floats: list[str] = []
        steps = []
        for u in order[:MAX_STEPS]:
            extra = [k for k in units[u] if k not in floats]
            if not extra:
                continue
            if floats and len(floats) + len(extra) > limit:  # (the first candidate goes float in any case)
                break
            floats += extra
            err = error(floats)
            steps.append({"candidate": u, "float": extra, "contribution": round(contribution[u], 6),
                          "error_after": err})
            self.log(f"fallback: {u} float ({', '.join(extra)}), error {err:.4g}")
            if err <= budget:
                break
        steps = kept_steps(steps, full, budget)
        floats = [k for st in steps for k in st["float"]]
        section = {"max_error": budget, "error_before": guarded_error(rep["error"]), "steps": steps,
                   "float": [{"node": k, "why": (f"measured contribution {st['contribution']:.3g} to the output error"
                                                 + ("" if st["candidate"].startswith("op ") else
                                                    f" (with the ops sharing the scale of '{st['candidate']}')"))}
                             for st in steps for k in st["float"]],
                   "contributions": [{"candidate": u, "ops": units[u], "contribution": round(contribution[u], 6)}
                                     for u in sorted(units, key=lambda u: -contribution[u])[:10]]}
        wide: list[str] = []
        now = steps[-1]["error_after"] if steps else full
        if now > budget and self.sixteen_bit:
            wide, section["sixteen_bit"] = self._widen(ranges, weights, keep + floats, batches, ref, noise, budget, now,
                                                       capture)
            float_weights = section["sixteen_bit"].get("float_weights", [])
            floats += [w["node"] for w in float_weights]
            section["float"] += float_weights
        if not floats and not wide:
            rep.update({"trace": trace, "fallback": {**section, "met": False}})
            return plan, rep
        self.keep_float, self.wide = tuple(keep + floats), tuple(wide)
        # the fallback plan is a subset of the int8 one: the switchable probe measures it (the wide one, 16-bit tensors)
        self.probe, fixed_probe = (self._wide_probe() if wide else probe), self.probe
        self._known_parts = None
        new_plan, new_rep = self._refine(ranges, weights, capture)
        self.probe = fixed_probe
        section["met"] = guarded_error(new_rep["error"]) <= budget
        section["error_after"] = guarded_error(new_rep["error"])
        new_rep.update({k: v for k, v in rep.items() if k not in new_rep})
        new_rep.update({"trace": trace, "fallback": section})
        return new_plan, new_rep

    def _widen(self, ranges: dict, weights, keep: list[str], batches, ref, noise: dict, budget: float,
               before: float, capture: _FloatCapture) -> tuple[list[str], dict]:
        """The fallback's last step, where the scheme has 16-bit activations: with the ops in
        ``keep`` float, which activation tensors get 16 bits. Scale groups (a tensor with every
        tensor sharing its scale) are ranked: the ``MAX_WIDE_CANDIDATES`` noisiest (``noise``: the
        trace's own-rounding error) are each measured on 16 bits alone (on
        ``WIDE_RANK_SAMPLES`` calibration samples: a model whose fallback runs long is a big
        one), and those that lower the
        error go first, most first, then the rest, noisiest first. Prefixes of 1, 2, 4, ... groups
        of that order are measured until one meets ``budget``; the shortest prefix that meets it
        is bisected for, within ``MAX_WIDE_MEASUREMENTS`` (:meth:`_shortest_prefix`). When every
        tensor on 16 bits still misses, the weights' rounding is what is left: :meth:`_weights_step`
        keeps the weighted ops whose int8 weights matter float, and the groups are searched again
        with them float (the report's ``float_weights``). None meeting it, none is kept: the ops
        around a 16-bit tensor run at float speed, which only a met budget pays for. Returns
        (tensors, report)."""
        t0 = time.perf_counter()
        probe = self._wide_probe()
        base = build_plan(self.ir, self.scheme, ranges, keep_float=keep)
        groups = sorted(scale_groups(self.ir, base).values(), key=lambda g: -max(noise.get(t, 0.0) for t in g))

        def measure(tensors, on=(batches, ref), plan=None) -> float:
            p = with_wide(plan if plan is not None else base, tensors)
            return guarded_error(error_metrics(on[1], probe.outputs(p, on[0], weights=weights)))

        rank = calibdata.subset(self.calib, min(WIDE_RANK_SAMPLES, self.bias_set.samples))
        rank_on = (rank.batches, capture.reference(rank))
        rank_before = measure([], rank_on)
        gain = {}
        for i, g in enumerate(groups[:MAX_WIDE_CANDIDATES]):
            gain[i] = rank_before - measure(g, rank_on)
            self.log(f"fallback: 16-bit ranking {i + 1}/{min(len(groups), MAX_WIDE_CANDIDATES)}: '{g[0]}' alone, "
                     f"error {rank_before - gain[i]:.4g} on {rank.samples} samples")
        first = sorted((i for i in gain if gain[i] > 0), key=lambda i: -gain[i])
        groups = [groups[i] for i in first] + [g for i, g in enumerate(groups) if i not in set(first)]
        self.log(f"fallback: {len(first)} of the {len(gain)} noisiest scale groups lower the error on 16 bits alone")
        chosen, measured = self._shortest_prefix(groups, measure, budget)
        weight_ops: list[dict] = []
        if not chosen and groups and measured.get(len(groups), 0.0) > budget:
            # every activation on 16 bits misses: what is left is the weights' rounding
            every = [t for g in groups for t in g]
            found = self._weights_step(ranges, keep, every, rank_on, measure, budget)
            if found:  # with those ops float, the 16-bit groups again: fewer may do
                weight_ops = found
                base = build_plan(self.ir, self.scheme, ranges, keep_float=keep + [w["node"] for w in found])
                groups = [g for g in groups if set(g) & set(base.activations)]
                none_wide = measure([], plan=base)
                chosen, again = 0, {0: none_wide}
                if none_wide > budget:
                    chosen, again = self._shortest_prefix(groups, partial(measure, plan=base), budget)
                    again[0] = none_wide
        tensors = [t for g in groups[:chosen] for t in g]
        lowest = min(measured.values(), default=before)
        met = bool(chosen or weight_ops)
        section = {"float_weights": weight_ops,  # the search again with them float: its errors by prefix length
                   "measured_with_float_weights": {str(j): round(e, 6) for j, e in sorted(again.items())}} \
            if weight_ops else {}
        section = {**section, "tensors": [{"tensor": t, "noise": round(noise.get(t, 0.0), 6)} for t in tensors
                               if t not in base.folded],  # (a folded ReLU's output is its input's Q/DQ)
                   "groups": len(groups), "ranked": len(gain), "error_before": round(before, 6),
                   "error_after": round((again if weight_ops else measured)[chosen], 6) if met else None,
                   "measured": {str(j): round(e, 6) for j, e in sorted(measured.items())},
                   "seconds": round(time.perf_counter() - t0, 3),
                   "why": ("ONNX Runtime's CPU kernels run the ops reading or writing a 16-bit tensor in float "
                           "between its Q/DQ (there are no fused 16-bit kernels): the weights stay int8"
                           + (" but those of the float_weights ops" if weight_ops else "") + ", the speed is "
                           "float's") if tensors else
                          ("none needed with those weighted ops float") if weight_ops else
                          (f"16-bit activations measured at best {lowest:.4g}, still above the budget {budget:g}: "
                           f"none kept (the ops around them would run at float speed for a budget still missed)")}
        return tensors, section

    def _shortest_prefix(self, groups: list[list[str]], measure: Callable, budget: float) -> tuple[int, dict]:
        """The fewest leading ``groups`` on 16 bits that meet ``budget``: prefixes of 1, 2, 4, ...
        until one does, then bisected, within ``MAX_WIDE_MEASUREMENTS``. Returns (how many, 0 when
        none meets it; the error measured per prefix length)."""
        measured: dict[int, float] = {}

        def error(k: int) -> float:
            if k not in measured:
                measured[k] = measure([t for g in groups[:k] for t in g])
                self.log(f"fallback: 16-bit activations on {k} of {len(groups)} scale groups, error {measured[k]:.4g}")
            return measured[k]

        k, miss = 1, 0
        while groups and len(measured) < MAX_WIDE_MEASUREMENTS:
            if error(k) <= budget or k == len(groups):
                break
            miss, k = k, min(2 * k, len(groups))
        chosen = 0
        if groups and measured.get(k, np.inf) <= budget:
            lo, hi = miss, k  # lo misses (0: nothing wide), hi meets
            while hi - lo > 1 and len(measured) < MAX_WIDE_MEASUREMENTS:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if error(mid) <= budget else (mid, hi)
            chosen = hi
        return chosen, measured

    def _weights_step(self, ranges: dict, keep: list[str], every: list[str], rank_on, measure: Callable,
                      budget: float) -> list[dict]:
        """Every activation on 16 bits still misses ``budget``: what is left is the weights'
        rounding, which the ops around a 16-bit tensor pay nothing to keep float (ONNX Runtime runs
        them in float already). The weighted ops whose weights int8 rounds most
        (:func:`weight_rounding`, the ``MAX_WEIGHT_CANDIDATES`` largest) are each measured kept float
        with every activation on 16 bits (on the ranking samples); those that lower the error go
        float in that order, in prefixes of 1, 2, 4, ... until one meets the budget on the
        fallback's samples. (On PP-OCRv4's recogniser one depthwise conv, whose weights alone
        moved the output by most of the budget, did not show kept float alone with the other
        activations int8: their noise hid it.) Returns the ops kept float with why, or []."""
        base = build_plan(self.ir, self.scheme, ranges, keep_float=keep)
        nodes = {node_id(n): n for n in self.ir.nodes}
        rounding = {}
        for nid, wq in base.weights.items():
            w = self.ir.const_value(nodes[nid].inputs[1]) if nid in nodes else None
            if w is not None and np.any(w):
                w = np.asarray(w, dtype=np.float32)
                fq = fake_quantized_weight(w, wq, self.scheme.weight_format)
                rounding[wq.layer] = weight_rounding(w, fq, wq.axis)
        ops = sorted(rounding, key=lambda o: -rounding[o])[:MAX_WEIGHT_CANDIDATES]
        if not ops:
            return []

        def with_float(extra: list[str], **on) -> float:
            return measure(every, plan=build_plan(self.ir, self.scheme, ranges, keep_float=keep + extra), **on)

        start = with_float([], on=rank_on)
        gain = {o: start - with_float([o], on=rank_on) for o in ops}
        order = sorted((o for o in ops if gain[o] > 0), key=lambda o: -gain[o])
        self.log(f"fallback: every activation on 16 bits, {len(order)} of the {len(ops)} weighted ops whose int8 "
                 f"weights round most lower the error kept float")
        k = 1
        while k <= len(order):
            err = with_float(order[:k])
            self.log(f"fallback: every activation on 16 bits and {k} weighted ops float, error {err:.4g}")
            if err <= budget:
                return [{"node": o, "why": f"its int8 weights: kept float, the error with every activation on 16 "
                                          f"bits fell by {gain[o]:.3g} (its weights' own rounding {rounding[o]:.3g})"}
                        for o in order[:k]]
            if k == len(order):
                break
            k = min(2 * k, len(order))
        return []

    def _wide_probe(self) -> Probe:
        """A switchable probe whose Q/DQ pairs are 16-bit (8-bit tensors clipped to their span:
        the same values), for plans mixing 8- and 16-bit activations."""
        if self._sw16_probe is None:
            self._sw16_probe = self._new_probe(self.widest, switchable=True, wide=True)
        return self._sw16_probe

    def _units(self, plan: QuantPlan) -> dict[str, list[str]]:
        """Quantized tensor -> the ops to keep float so that it, and every tensor sharing its
        scale through an op (a folded ReLU, a data-movement op, a Concat), is not quantized: the
        quantized ops producing or reading any of them."""
        ir, table = self.ir, table_for(self.scheme)
        quantized = set(plan.weights) | set(plan.folded) | {
            node_id(n) for n in ir.nodes if n.outputs and table.get(n.op) is not None and table[n.op].follows
            and n.outputs[0].name in plan.activations}
        tensors = ir.tensors()
        units = {}
        for root, members in scale_groups(ir, plan).items():
            ops = []
            for t in members:
                tensor = tensors.get(t)
                if tensor is None:
                    continue
                prod = ir.producer(tensor)
                nodes = ([prod] if prod is not None else []) + [c for c in tensor.outputs if c.outputs]
                ops.extend(node_key(n) for n in nodes if node_id(n) in quantized)
            ops = list(dict.fromkeys(ops))
            if ops:
                units[root] = ops
        return units

    def _switchable_probe(self) -> Probe:
        """A probe that measures any subset of the int8 plan (built once, when a fallback needs it).
        It observes nothing: the trace builds its own probes, one per chunk of the activations
        with their dequantized copies as outputs, and drops each (as outputs they stay allocated
        through a run, on an 800x608 detector gigabytes, which the measurements do not need)."""
        if self._sw_probe is None:
            self._sw_probe = self._new_probe(self.widest, switchable=True)
        return self._sw_probe

    def _trace(self, plan: QuantPlan, weights, batches=None) -> list[dict]:
        """Per quantized activation tensor, in graph order, on the fallback's samples: its
        error against the float model once quantized (``sqnr_db``: everything upstream plus its
        own rounding) and the error of its own quantization alone (``quant_sqnr_db``: its
        dequantized copy against its value before Q; or its median channel's, when that is worse:
        a scale one large channel sets crushes the others, which the whole tensor's error hides).
        Where the error grows, int8 hurts."""
        position = {o.name: i for i, n in enumerate(self.ir.nodes) for o in n.outputs}
        observable, widest = set(self.tensors), set(self.widest.activations)
        tensors = sorted((t for t in plan.activations if t in observable and t in widest),
                         key=lambda t: position.get(t, -1))
        if not tensors:
            return []
        acc = {t: np.zeros(3) for t in tensors}  # [sum float^2, sum (dq - float)^2, sum (dq - raw)^2]
        batches = list(batches if batches is not None else calibdata.subset(self.calib, FALLBACK_SAMPLES).batches)
        # a tensor whose Relu/Clip(0, c) is folded into its range: its dequantized copy is that
        # activation's output, so the float and raw values it is compared with get it too (else
        # the negatives the activation drops count as rounding noise: an SE squeeze conv read as 7 dB);
        # so does one whose range calibration clamped to what its readers tell apart (a hard-swish's -3)
        caps = _trace_bounds(self.ir, plan, self.bounds)
        per_channel: dict[str, np.ndarray] = {}  # tensor -> [2, channels]: sum float^2, sum (dq - raw)^2
        # observed in chunks: each tensor is held three times per batch (float, before Q, after DQ),
        # for every batch in flight, so all of a high-resolution detector's at once take gigabytes
        sizes = _tensor_bytes(self.float_model, tensors, batches[0]) if batches else {t: 4 for t in tensors}
        for chunk in _by_bytes(tensors, sizes, TRACE_MEMORY / (3 * runtime.batches_in_flight(len(batches)))):
            self._trace_chunk(chunk, plan, weights, batches, caps, acc, per_channel)
        producers = {o.name: n for n in self.ir.nodes for o in n.outputs}
        rows = []
        for t in tensors:
            ff, total, own = acc[t]
            rel = float(np.sqrt(total / ff)) if ff > 0 else 0.0
            qrel = float(np.sqrt(own / ff)) if ff > 0 else 0.0
            pc = per_channel.get(t)
            if pc is not None and np.any(pc[0] > 0):  # the median channel's own rounding, when worse
                qrel = max(qrel, float(np.median(np.sqrt(pc[1][pc[0] > 0] / pc[0][pc[0] > 0]))))
            prod = producers.get(t)
            rows.append({"tensor": t, "producer": node_key(prod) if prod is not None else None,
                         "op": prod.op if prod is not None else "input", "sqnr_db": sqnr_db(rel),
                         "rel_l2": round(rel, 6), "quant_sqnr_db": sqnr_db(qrel), "quant_rel_l2": round(qrel, 6)})
        return rows

    def _trace_chunk(self, tensors: list[str], plan: QuantPlan, weights, batches: list, caps: dict,
                     acc: dict, per_channel: dict) -> None:
        """:meth:`_trace`'s sums for ``tensors``, from a probe that observes them alone."""
        probe = self._new_probe(self.widest, switchable=True, layer_inputs=False, observe=tensors + [
            PROBE_PREFIX + "dq." + t for t in tensors])
        sess = reference_session(augment(self.float_model, tensors))
        fetch = tensors + [PROBE_PREFIX + "dq." + t for t in tensors]
        for b, got in run_batches(probe.session, fetch, batches, fixed=probe.inputs_for(plan, weights)):
            want = dict(zip(tensors, sess.run(tensors, b)))
            for t in tensors:
                f = want[t].astype(np.float64).ravel()
                raw, dq = got[t].astype(np.float64).ravel(), got[PROBE_PREFIX + "dq." + t].astype(np.float64).ravel()
                if t in caps:  # (dq too: a scale group wider than this tensor's interval reaches beyond it)
                    f, raw, dq = np.clip(f, *caps[t]), np.clip(raw, *caps[t]), np.clip(dq, *caps[t])
                if f.shape == dq.shape == raw.shape:
                    acc[t] += [np.sum(f * f), np.sum((dq - f) ** 2), np.sum((dq - raw) ** 2)]
                    shape = got[t].shape
                    # per channel (axis 1 of NCHW and [batch, features], the last axis of [batch,
                    # tokens, hidden]): a scale that one large channel sets crushes the others
                    axis = (len(shape) - 1 if len(shape) == 3 else 1) if len(shape) >= 2 else None
                    if axis is not None and shape[axis] > 1:
                        other = tuple(a for a in range(len(shape)) if a != axis)
                        c = np.stack([np.sum(np.square(f.reshape(shape)), axis=other),
                                      np.sum(np.square((dq - raw).reshape(shape)), axis=other)])
                        per_channel[t] = per_channel[t] + c if t in per_channel and per_channel[t].shape == c.shape else c

    def _ranges(self, stats) -> dict:
        symmetric = self.scheme.activations == "symmetric"
        ranges = calib_mod.ranges_from_stats(self.float_model, stats, method=self.method, percentile=self.percentile,
                                             symmetric=symmetric, saturation=self.saturation, bounds=self.bounds)
        # what a 16-bit tensor covers: the observed range (clamped as the 8-bit ranges are), not a
        # clipped 8-bit one; the planner keeps a folded ReLU's floor
        full = calib_mod.ranges_from_stats(self.float_model, stats, method="minmax", symmetric=symmetric,
                                           saturation=self.saturation, bounds=self.bounds)
        return Ranges(ranges, full=full)

    def _refine(self, ranges: dict, weights, capture: _FloatCapture) -> tuple[QuantPlan, dict]:
        """The plan for ``ranges`` (and equalised ``weights``, or None), refined by measurement:
        precisions (mixed), bias correction; with its report and measured error."""
        rep: dict = {}
        precisions: dict[str, str] = {}
        if self.mode == "mixed":
            precisions, table, search = mixed_precision.choose_plan(
                self.ir, self.probe, self.scheme, ranges, self.bias_set.batches, capture.reference(self.bias_set),
                max_error=self.max_error, max_bytes=self.max_bytes, keep_float=self.keep_float, weights=weights,
                log=self.log)
            if self.max_bytes is not None and search["weights_bytes"] > self.max_bytes:
                raise VerificationError(f"no precision plan fits --max-bytes {self.max_bytes}: the smallest has "
                                        f"{search['weights_bytes']} bytes of weights (everything int4); nothing was "
                                        f"written")
            rep.update({"plan": precisions, "sensitivity": table, "search": search})
        plan = build_plan(self.ir, self.scheme, ranges, precisions=precisions, keep_float=self.keep_float,
                          wide=self.wide)
        known = self._known_parts if self.mode == "int8" else None  # this plan's outputs, error subset
        plan, outs = self._settle(plan, weights, capture, known, rep)
        if self.rounding:
            ref = capture.reference(self.bias_set)
            if outs is None:
                outs = self.probe.outputs(plan, self.bias_set.batches, weights=weights)
            e0 = error_metrics(ref, outs)["rel_l2"]
            floor = ROUNDING_FLOOR * (self.max_error if self.max_error is not None else DEFAULT_INT8_BUDGET)
            if e0 < floor:  # nothing to gain that a user would see: nearest rounding, no GPTQ cost
                rep["rounding"] = {"method": "nearest", "applied": False, "rel_l2_nearest": round(e0, 6),
                                   "why": f"output error {e0:.3g} is below {floor:.3g} (a fifth of the budget)"}
            else:
                rounded, section = self._rounding(plan, weights)
                section["rel_l2_nearest"] = round(e0, 6)
                if rounded:  # nearest and chosen rounding, each with its bias correction: the lower error wins
                    cand_rep: dict = {}
                    cand, cand_outs = self._settle(replace(plan, rounded=rounded, bias_shift={}), weights, capture,
                                                   None, cand_rep)
                    if cand_outs is None:
                        cand_outs = self.probe.outputs(cand, self.bias_set.batches, weights=weights)
                    e1 = error_metrics(ref, cand_outs)["rel_l2"]
                    section.update({"rel_l2_chosen": round(e1, 6), "applied": e1 < e0})
                    if e1 < e0:
                        plan, outs = cand, cand_outs
                        rep.update(cand_rep)
                rep["rounding"] = section
        if outs is not None and self.bias_set.count != self.error_set.count:
            outs = None
        if outs is None:
            outs = (concat_parts(known) if known is not None and not plan.rounded and not plan.bias_shift
                    else self.probe.outputs(plan, self.error_set.batches, weights=weights))
        rep["error"] = {**error_metrics(self.reference, outs), "samples": self.error_set.samples}
        return plan, rep

    def _settle(self, plan: QuantPlan, weights, capture: _FloatCapture, known: list | None, rep: dict):
        """``plan`` with its bias correction (when the scheme has it), and its outputs on the bias
        subset (None when not measured)."""
        if not self.bias_correction:
            return plan, (concat_parts(self.bias_set.pick(known, self.error_set)) if known is not None else None)
        plan, outs = self._bias_correction(plan, weights, capture, known)
        rep["bias_correction"] = {"layers": sorted(plan.weights[k].layer for k in plan.bias_shift)}
        return plan, outs

    def _rounding(self, plan: QuantPlan, weights) -> tuple[dict, dict]:
        """GPTQ levels (:mod:`edgec.rounding`) from the layer inputs under ``plan`` (nearest
        rounding). Returns (levels per layer, report section)."""
        t0 = time.perf_counter()
        rounded = rounding_mod.optimise(replace(plan, bias_shift={}), self.probe, self.bias_set.batches,
                                        weights=weights, log=self.log)
        return rounded, {"method": "gptq", "layers": len(rounded), "applied": False,
                         "seconds": round(time.perf_counter() - t0, 3)}

    def _bias_correction(self, plan: QuantPlan, weights, capture: _FloatCapture,
                         known: list | None = None) -> tuple[QuantPlan, dict | None]:
        """Empirical bias correction (Nagel et al. 2019), kept only where it helps.

        For each quantized Conv/ConvTranspose/Gemm, the per-channel mean of its output in the
        float model (kept while calibrating) minus that under the plan is added to its bias.
        One adaptive pass on the probe (:meth:`edgec.quant_probe.Probe.adapt`, on
        ``BIAS_SAMPLES`` calibration samples, :class:`Subset`) corrects every layer batch by batch in graph order,
        so each layer's shift is measured with the layers before it corrected (sequential
        correction, layer by layer), and averages the shifts; a second pass measures the
        corrected plan, which is kept only if the output error on those samples drops.
        ``known``: the plan's outputs per batch on the error subset, when measured already.
        Returns the plan and its outputs on the bias subset."""
        cands = [k for k, w in plan.weights.items() if w.op in ("Conv", "ConvTranspose", "Gemm")]
        if not cands:
            return plan, None
        probe, batches = self.probe, self.bias_set.batches
        ref, fp_means = capture.reference(self.bias_set), capture.layer_means()
        shifts = probe.adapt(plan, batches, {k: fp_means[k] for k in cands if k in fp_means}, weights=weights)
        base_outs = (concat_parts(self.bias_set.pick(known, self.error_set)) if known is not None
                     else probe.outputs(plan, batches, weights=weights))
        if not shifts:
            return plan, base_outs
        corrected = plan.with_bias_shift(shifts)
        new_outs = probe.outputs(corrected, batches, weights=weights)
        if error_metrics(ref, new_outs)["rel_l2"] < error_metrics(ref, base_outs)["rel_l2"]:
            return corrected, new_outs
        return plan, base_outs


def _with_weights(model: onnx.ModelProto, updates: dict[str, dict[int, np.ndarray]]) -> onnx.ModelProto:
    """A copy of the float ``model`` whose layers read the ``updates`` (node id -> {input slot:
    array}) as new initializers."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    nodes = {n.output[0]: n for n in m.graph.node if n.output}
    for nid, slots in updates.items():
        for slot, value in slots.items():
            name = f"edgec.cle.{slot}.{nid}"
            m.graph.initializer.append(numpy_helper.from_array(value, name))
            nodes[nid].input[slot] = name
    return m


def _fp16(ir: IR, calib, keep_float, t0) -> dict:
    before = ir.to_onnx() if calib is not None else None
    records = PassManager([ConvertFP16(keep_float=list(keep_float or ()))]).run(ir)
    rep = {"mode": "fp16", "notes": [n for r in records for n in r.notes], **records[0].data.as_dict()}
    if calib is not None:
        sub = _take(calib, ERROR_SAMPLES)
        rep["error"] = {**output_error(before, ir.to_onnx(), sub), "samples": count_samples(sub)}
    rep["seconds"] = round(time.perf_counter() - t0, 3)
    return rep


def _take(batches, n: int):
    return batches.take(n) if hasattr(batches, "take") else batches


def _uses_percentile(method) -> bool:
    return method == "percentile" if isinstance(method, str) else "percentile" in method.values()
