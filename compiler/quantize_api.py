"""One call for compile(): calibrate, choose precisions, rewrite the IR, report.

:func:`quantize` mutates the IR in place and returns the report section (a JSON-able dict).

Modes
- ``int8``: static QDQ quantization (weights int8 symmetric per channel, activations uint8
  asymmetric or int8 symmetric per tensor, int32 bias) from ranges calibrated on
  ``calib_batches``; the first and last weighted layers are quantized too (use ``keep_float``
  to keep them float). Bias correction is tried and kept only where it lowers the output error
  on the calibration data.
- ``fp16``: the ``convert_fp16`` pass (no calibration data needed).
- ``mixed``: per-layer precision (fp32 / int8 / int4) chosen by
  :func:`edgec.mixed_precision.choose_plan` to meet ``max_error`` (relative L2 error of the
  outputs vs FP32 on the calibration set, see :mod:`edgec.mixed_precision`) with the smallest
  weights; the first and last weighted layers stay float by default.

Error reducers (int8 and mixed)
- Bias correction (on by default): per-channel mean shift of each quantized Conv/Gemm output,
  measured on the calibration data, absorbed into its int32 bias; kept only if the output error
  drops (:func:`_bias_correction`).
- Cross-layer equalisation (``equalize="auto"``): tried where equalisable Conv[-Relu]-Conv pairs
  exist with per-tensor weights or a depthwise conv in a pair; the model is quantized with and
  without it and the one with the lower output error on the calibration data is kept (the
  report says which, with both errors).

Error metric everywhere: ``rel_l2 = ||y_q - y_fp32|| / ||y_fp32||`` over (up to 512) calibration samples,
worst graph output; also reported as SQNR in dB (``-20 log10 rel_l2``) and cosine. Every
measurement that chooses something (bias correction, CLE keep/drop, mixed precision) and the
reported error run in the reference arithmetic of :mod:`edgec.runtime` (exact QDQ semantics),
never on the build host's fused integer kernels: the output is the same on any host.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

import numpy as np
import onnx

from . import calibration as calib_mod
from .errors import UserError, VerificationError
from .ir import IR
from .pipeline import PassManager
from .runtime import capture, error_metrics, output_error, run_outputs  # noqa: F401 (re-exported)

MODES = ("int8", "fp16", "mixed")
ERROR_SAMPLES = 512  # calibration samples the reported output error is measured on


def calibration_tensors(model: onnx.ModelProto) -> list[str]:
    """Every float activation a QDQ rewrite may need a range for (graph inputs + node outputs)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear", "Shape", "Constant"):
            continue
        names.extend(o for o in n.output if o)
    return [t for t in dict.fromkeys(names) if types.get(t, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT]


def quantize_for_target(ir: IR, target, options, calib, *, max_error: float | None = None,
                        log: Callable[[str], None] | None = None) -> dict:
    """Quantize ``ir`` in place as ``target``'s scheme wants (``options``: a
    :class:`edgec.options.QuantOptions`); the report section."""
    mode = options.mode
    if mode not in MODES:
        raise UserError(f"--quantize {mode}: choose int8, fp16 or mixed")
    if mode != "fp16" and calib is None:
        raise UserError(f"--quantize {mode} needs calibration data: --calib PATH (or --calib random, explicitly)")
    activations = options.activations or target.quant.activations
    weights = options.weights or target.quant.weights
    method = calib_mod.parse_method(options.method) if isinstance(options.method, str) else options.method
    if target.name == "jetson" and mode != "fp16":
        if mode == "mixed":
            raise UserError("target jetson: use --quantize int8 (TensorRT chooses FP16 or INT8 per layer itself "
                            "when built with --int8 --fp16); keep sensitive layers float with --keep-float")
        if activations != "symmetric":
            raise UserError("target jetson: TensorRT needs symmetric activations (zero point 0)")
        return _quantize_tensorrt(ir, calib, method=method, percentile=options.percentile,
                                  keep_float=options.keep_float, progress=options.progress)
    return quantize(ir, None, mode=mode, calib_batches=calib, method=method, percentile=options.percentile,
                    activations=activations, weights=weights, keep_float=options.keep_float, max_error=max_error,
                    max_bytes=options.max_bytes, progress=options.progress, pointwise=target.quant.pointwise,
                    weight_type=target.quant.weight_type, log=log)


def _quantize_tensorrt(ir: IR, calib_set, *, method, percentile, keep_float, progress) -> dict:
    from edgec.passes.quantize_tensorrt import QuantizeTensorRT

    t0 = time.perf_counter()
    ir.infer_shapes()
    float_model = ir.to_onnx()
    tensors = calibration_tensors(float_model)
    stats = calib_mod.collect(float_model, tensors, calib_set, progress=progress,
                              total=getattr(calib_set, "num_samples", None))
    ranges = calib_mod.ranges_from_stats(float_model, stats, method=method, percentile=percentile, symmetric=True)
    p = QuantizeTensorRT(ranges, keep_float=keep_float)
    records = PassManager([p]).run(ir)
    rep = {"mode": "int8", "method": method, "activations": "symmetric", "weights": "per-channel",
           **p.summary, "notes": [n for r in records for n in r.notes]}
    rep["error"] = output_error(float_model, ir.to_onnx(), calib_set)
    rep["seconds"] = round(time.perf_counter() - t0, 3)
    return rep


def quantize(ir: IR, original_model: onnx.ModelProto | None = None, *, mode: str = "int8",
             calib_batches: Iterable[dict] | None = None, method: str | dict = "minmax",
             percentile: float = 99.99, activations: str = "asymmetric", weights: str = "per-channel",
             keep_float: Iterable[str] = (), max_error: float | None = None, max_bytes: int | None = None,
             bias_correction: bool = True, equalize: bool | str = "auto", progress=False,
             pointwise=(), weight_type: str = "uint8", log: Callable[[str], None] | None = None) -> dict:
    """Quantize ``ir`` in place; return the report section.

    ``equalize``: cross-layer equalisation (see :func:`edgec.passes.quantize.cross_layer_equalization`):
    ``"auto"`` quantizes with and without it where it may matter (equalisable Conv[-Relu]-Conv
    pairs, with per-tensor weights or a depthwise conv in a pair) and keeps the one with the
    lower output error on the calibration data; ``"always"``; False.

    ``calib_batches`` is any re-iterable of ``dict[input name, array]`` batches (a
    :class:`edgec.calibdata.CalibrationSet`); required for ``int8`` and ``mixed``.
    ``original_model`` is unused by the rewrite (kept for the caller's accuracy checks).
    """
    log = log or (lambda s: None)
    if mode not in MODES:
        raise UserError(f"unknown quantization mode '{mode}' (known: {', '.join(MODES)})")
    t0 = time.perf_counter()
    keep_float = list(keep_float or ())
    if mode == "fp16":
        from edgec.passes.convert_fp16 import ConvertFP16

        before = ir.to_onnx()
        p = ConvertFP16(keep_float=keep_float)
        records = PassManager([p]).run(ir)
        rep = {"mode": "fp16", "notes": [n for r in records for n in r.notes], **p.summary}
        if calib_batches is not None:
            sub = calib_batches.take(ERROR_SAMPLES) if hasattr(calib_batches, "take") else calib_batches
            rep["error"] = {**output_error(before, ir.to_onnx(), sub), "samples": _samples(sub)}
        rep["seconds"] = round(time.perf_counter() - t0, 3)
        return rep
    if calib_batches is None:
        raise UserError(f"--quantize {mode} needs calibration data (--calib PATH)")
    args = dict(mode=mode, method=method, percentile=percentile, activations=activations, weights=weights,
                keep_float=keep_float, max_error=max_error, max_bytes=max_bytes,
                bias_correction=bias_correction, progress=progress, pointwise=tuple(pointwise),
                weight_type=weight_type, log=log)
    report = None
    if equalize not in (False, None, "auto", "always", True):
        raise UserError(f"equalize must be 'auto', 'always' or False, got {equalize!r}")
    if equalize:
        from edgec.passes.quantize import cle_worthwhile, cross_layer_equalization

        ir.infer_shapes()
        candidate = ir.copy()
        try_it = equalize in ("always", True) or cle_worthwhile(ir, weights == "per-tensor")
        pairs = cross_layer_equalization(candidate) if try_it else 0
        if pairs:
            reference = ir.to_onnx()
            base = ir.copy()
            rep_base = _quantize_integer(base, calib_batches, reference=reference, **args)
            rep_cle = _quantize_integer(candidate, calib_batches, reference=reference, **args)
            e0, e1 = rep_base["error"]["rel_l2"], rep_cle["error"]["rel_l2"]
            use_cle = equalize in ("always", True) or e1 < e0
            report, winner = (rep_cle, candidate) if use_cle else (rep_base, base)
            ir.graph = winner.graph
            ir.changed()
            report["cross_layer_equalization"] = {"pairs": pairs, "applied": use_cle,
                                                  "rel_l2_without": e0, "rel_l2_with": e1}
    if report is None:
        report = _quantize_integer(ir, calib_batches, **args)
        if equalize:
            report["cross_layer_equalization"] = {"pairs": 0, "applied": False}
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return report


def _quantize_integer(ir: IR, calib_batches, *, mode, method, percentile, activations, weights, keep_float,
                      max_error, max_bytes, bias_correction, progress, log, pointwise=(), weight_type="uint8",
                      reference=None) -> dict:
    """Calibrate ``ir`` and rewrite it with QDQ (int8 or mixed); the report section."""
    ir.infer_shapes()
    float_model = ir.to_onnx()
    tensors = calibration_tensors(float_model)
    total = getattr(calib_batches, "num_samples", None)
    tc = time.perf_counter()
    stats = calib_mod.collect(float_model, tensors, calib_batches, progress=progress, total=total,
                              histograms=calib_mod.needs_histograms(method))
    calib_seconds = time.perf_counter() - tc
    symmetric = activations == "symmetric"
    ranges = calib_mod.ranges_from_stats(float_model, stats, method=method, percentile=percentile,
                                         symmetric=symmetric)
    opts = dict(activations=activations, weights=weights, keep_float=keep_float, pointwise=tuple(pointwise),
                weight_type=weight_type)
    report: dict = {"mode": mode, "method": method if isinstance(method, str) else dict(method),
                    "activations": activations, "weights": weights, "weight_type": weight_type,
                    "calibration": {"samples": _samples(calib_batches),
                                    "tensors": len(tensors), "seconds": round(calib_seconds, 3)}}
    if isinstance(method, str) and method == "percentile" or isinstance(method, dict) and "percentile" in method.values():
        report["percentile"] = percentile

    plan: dict[str, str] = {}
    sensitivity: list = []
    if mode == "mixed":
        from . import mixed_precision

        plan, sensitivity, chosen = mixed_precision.choose_plan(
            ir, float_model, ranges, calib_batches, max_error=max_error, max_bytes=max_bytes, **opts, log=log)
        if max_bytes is not None and chosen["weights_bytes"] > max_bytes:  # a budget is a check, as --max-error is
            raise VerificationError(f"no precision plan fits --max-bytes {max_bytes}: the smallest has "
                                    f"{chosen['weights_bytes']} bytes of weights (everything int4); nothing was written")
        report["plan"] = plan
        report["sensitivity"] = sensitivity
        report["search"] = chosen
    shifts = {}
    if bias_correction:
        shifts = _bias_correction(ir, float_model, ranges, plan, calib_batches, opts)
        report["bias_correction"] = {"layers": sorted(shifts)} if shifts else {"layers": []}
    from edgec.passes.quantize import QuantizeQDQ

    p = QuantizeQDQ(ranges, plan=plan, bias_shift=shifts, **opts)
    records = PassManager([p]).run(ir)
    report.update(p.summary)
    report["notes"] = [n for r in records for n in r.notes]
    sub = calib_batches.take(ERROR_SAMPLES) if hasattr(calib_batches, "take") else calib_batches
    report["error"] = {**output_error(reference or float_model, ir.to_onnx(), sub), "samples": _samples(sub)}
    return report


def _samples(batches) -> int:
    n = getattr(batches, "num_samples", None)
    if n is not None:
        return int(n)
    return int(sum(len(next(iter(b.values()))) for b in batches))


# ---------------------------------------------------------------------- bias correction
def _quantized_copy(ir: IR, ranges, plan, shifts, opts) -> onnx.ModelProto:
    from edgec.passes.quantize import QuantizeQDQ

    work = ir.copy()
    PassManager([QuantizeQDQ(ranges, plan=plan, bias_shift=shifts, **opts)]).run(work)
    return work.to_onnx()


def _bias_correction(ir: IR, float_model, ranges, plan, batches, opts, max_samples: int = 128) -> dict:
    """Empirical bias correction (Nagel et al. 2019), kept only where it helps.

    For each quantized Conv/ConvTranspose/Gemm, the per-channel mean of its float output in the
    FP32 model minus that in the quantized model (both measured on the calibration data, the
    quantized model with the corrections found so far) is added to its bias. Layers are
    corrected in topological order, in at most four groups (a measuring run each, on up to
    ``max_samples`` calibration samples); the whole correction is kept only if the output
    error on those samples drops.
    """
    from edgec.passes.quantize import QuantizeQDQ, node_key, weighted_nodes

    sub = batches.take(max_samples) if hasattr(batches, "take") else batches
    cands = [n for n in weighted_nodes(ir) if n.op in ("Conv", "ConvTranspose", "Gemm")
             and plan.get(node_key(n), "int8") in ("int8", "int4")
             and not QuantizeQDQ(ranges, plan=plan, **opts)._kept(n)]
    if not cands:
        return {}
    # layer output tensor name (pre-activation) in both models: the node output name
    layer_out = {node_key(n): n.outputs[0].name for n in cands}
    axis_of = {node_key(n): (1 if n.op != "Gemm" else -1) for n in cands}
    ref_out = run_outputs(float_model, sub)
    fp_means = _channel_means(float_model, list(layer_out.values()), axis_of, layer_out, sub)
    base_model = _quantized_copy(ir, ranges, plan, {}, opts)
    base_err = output_error(float_model, base_model, sub, ref_out)["rel_l2"]
    shifts: dict[str, np.ndarray] = {}
    order = [node_key(n) for n in cands]
    chunk = max(1, -(-len(order) // 4))  # at most 4 measuring rounds
    for i in range(0, len(order), chunk):
        group = order[i:i + chunk]
        qmodel = _quantized_copy(ir, ranges, plan, shifts, opts)
        q_means = _channel_means(qmodel, [layer_out[k] for k in group], axis_of, layer_out, sub)
        for k in group:
            t = layer_out[k]
            if t in q_means and t in fp_means and q_means[t].shape == fp_means[t].shape:
                shifts[k] = shifts.get(k, 0) + (fp_means[t] - q_means[t])
    if not shifts:
        return {}
    new_err = output_error(float_model, _quantized_copy(ir, ranges, plan, shifts, opts), sub, ref_out)["rel_l2"]
    return shifts if new_err < base_err else {}


def _channel_means(model: onnx.ModelProto, tensors, axis_of, layer_out, batches) -> dict[str, np.ndarray]:
    inv = {v: k for k, v in layer_out.items()}
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}

    def on_batch(outs):
        for t in tensors:
            v = outs.get(t)
            if v is None:
                continue
            ax = axis_of[inv[t]]
            v = np.moveaxis(v.astype(np.float64), ax, 0).reshape(v.shape[ax], -1)
            sums[t] = sums.get(t, 0) + v.sum(axis=1)
            counts[t] = counts.get(t, 0) + v.shape[1]

    capture(model, tensors, batches, on_batch)  # reference arithmetic: exact QDQ, any host
    return {t: sums[t] / counts[t] for t in sums}
