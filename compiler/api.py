"""``edgec.compile``: the one entry point the CLI and the Python API share.

A compile is a short sequence of stages over one :class:`_Run` (the options, the target and
what each stage leaves for the next): load the model, build the pipeline, read the data it
learns from, run the pipeline (pruning and input shapes in front, the target's passes, then
quantization), check the result against the target, verify it, report, write.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx

from edgec.backends import get_target
from edgec.backends.cleanup import prune_cleanup
from edgec.passes import FixInputShapes, FoldConstants, FoldShapes, InferShapes
from edgec.passes.prune_channels import PruneChannels, PruneResult
from edgec.passes.sparsify_24 import SparsityResult

from . import data_tail, datafiles, loader, quantize_api, runtime, strategy, verify as verify_mod
from . import executor as executor_mod
from .analysis import costs as costs_mod
from .analysis.channels import find_groups, format_groups
from . import calibdata
from .calibdata import CalibrationSet, load_calibration
from .errors import EdgecError, InternalError, UserError, VerificationError
from .ir import IR, dtype_name, plain_dtype
from .options import KEYWORDS, CompileOptions, PruneOptions, boolean, check_compile_options, number, path_like
from .outputs import Outputs
from .pipeline import FixedPoint, Pass, PassContext, PassManager, PassRecord, get_pass
from .target import Target


@dataclass
class CompileResult:
    ir: IR
    model: onnx.ModelProto
    report: dict
    records: list[PassRecord] = field(default_factory=list)
    output: Path | None = None


def compile(model: str | os.PathLike | onnx.ModelProto, output: str | os.PathLike | None = None, *,
            target: str = "cpu", target_options: dict | None = None, input_shapes: dict | None = None,
            passes: Sequence[str | Pass] | None = None, verify: bool = False,
            inputs: str | os.PathLike | dict | None = None, eval_data: str | os.PathLike | None = None,
            rtol: float = 1e-4, atol: float = 1e-5, max_error: float | None = None,
            calib=None, calib_samples: int | None = None,
            prune: float | None = None, prune_macs: float | None = None, importance: str = "auto",
            prune_mode: str = "auto", prune_steps: int = 1, round_to: int | None = None,
            max_layer_ratio: float = 0.9, reconstruct: bool = True, bench: bool = False,
            quantize: str | None = None, calib_method: str = "auto", percentile: float = 99.99,
            activations: str | None = None, weights: str | None = None, keep_float: Sequence[str] = (),
            max_bytes: int | None = None, progress: bool = False, goal: str | None = None,
            calib_preprocess=None, strict_int8: bool = False, rounding: str = "nearest", sixteen_bit: bool = True,
            log: Callable[[str], None] | None = None, report_file: str | os.PathLike | None = None,
            options: CompileOptions | None = None, executor: str | executor_mod.Executor | None = None,
            ray_address: str | None = None, _outputs=None) -> CompileResult:
    """Compile ``model`` for ``target``; write it to ``output`` (atomically) if given.

    Every option is checked first (:mod:`edgec.options`), then every path the run will write
    (``output``, ``report_file`` for the report as JSON, the target's side files): a mistake in
    either raises :class:`~edgec.errors.UserError` before any work. The outputs are written
    all or none (:mod:`edgec.outputs`); the input model is never modified.

    ``target_options`` overrides the target profile's options (``--target-option k=v``);
    ``input_shapes`` fixes graph input shapes (``{"input": [1, 3, 224, 224]}``) before any pass.
    ``passes`` replaces the target's pipeline with the named passes. ``verify`` compares ONNX
    Runtime outputs of the result with the original's on ``inputs`` (an .npz/.npy path or a
    dict; random inputs from the model's signature when absent) and raises VerificationError
    when they differ beyond ``rtol``/``atol``. ``eval_data`` (an .npz with the model's input
    names and ``labels``) adds top-1 accuracy before and after to the report.

    Lossy steps: ``prune`` (channel ratio) or ``prune_macs`` (fraction of MACs to remove) runs
    dependency-aware channel pruning first, with ``importance`` (auto, l1, l2, bn, activation,
    fused, wanda, obs), ``prune_mode`` (``uniform``, ``global``, ``sensitivity``: per-group ratios from the
    output error measured on ``calib``; ``balanced``: the same, no group beyond 1.5x the ratio; ``local``:
    per-group ratios from the error each removal leaves after the re-fit of the layers reading the
    group (OBS), no group beyond 1.5x; or ``auto``,
    the default with ``importance="auto"``: L1/uniform, Wanda/sensitivity, OBS/sensitivity, OBS/balanced
    and OBS/local each prune and re-fit on three quarters of ``calib`` and the
    lowest output error on the held-out quarter wins; without ``calib``, L1/uniform), ``prune_steps`` progressive steps, channel counts rounded to ``round_to`` (default:
    the target's channel multiple) and at most ``max_layer_ratio`` of any group removed; with
    ``calib`` data (a path, ``"random"``, or arrays) each consumer layer is re-fitted by least
    squares unless ``reconstruct`` is False. For lossy compiles ``verify`` measures the output
    error (relative L2, cosine) on the calibration/eval inputs and fails only above ``max_error``.
    ``bench`` adds ONNX Runtime latency before and after.

    ``quantize`` = ``int8`` (static QDQ from ``calib``), ``fp16`` or ``mixed`` (a precision per
    layer, FP32/FP16/INT8/INT4, from measured sensitivity, meeting ``max_error`` or
    ``max_bytes``) runs after the target's pipeline, in the target's int8 scheme unless
    ``activations``/``weights`` override it: ONNX Runtime's fusable QDQ groups for cpu/neon/rknn,
    TensorRT's explicit-quantization placement for jetson.

    ``quantize="vendor"`` leaves the model float and hands quantization to the target's own
    toolchain: the target writes the calibration dataset and a build config and script beside
    the model (rknn: RKNN-Toolkit2's ``build(do_quantization=True)``); targets without one refuse it.

    ``goal`` (latency, size, accuracy) lets edgec choose pruning and precision for the target
    within ``max_error``/``max_bytes`` (see :mod:`edgec.strategy`); the report says what was
    tried and why the winner was chosen.

    ``options`` (an :class:`edgec.options.CompileOptions`) gives every option at once, instead
    of the keywords above (not both).

    ``executor`` (``"local"``, ``"ray"`` or an :class:`edgec.executor.Executor`; None: the one in
    force, local by default) says where calibration shards, sensitivity runs and ``goal``
    candidates run; ``ray_address`` names a Ray cluster (default ``EDGEC_RAY_ADDRESS``, else a
    local Ray started for this call). The output is the same, byte for byte, on any executor.
    """
    executor_mod.check(executor if executor is not None else "local", ray_address)
    run = _start(dict(locals()))  # every argument, as given: checked, then the options and the outputs
    if executor is None and ray_address is None:
        return _compile_run(run)
    with executor_mod.open_executor(executor or "local", ray_address):
        return _compile_run(run)


def _compile_run(run: "_Run") -> CompileResult:
    if run.options.goal is not None:
        return _by_goal(run)
    _load(run)
    _build_pipeline(run)
    _load_data(run)
    _run_pipeline(run)
    _prune_error(run)
    _quantize(run)
    _conformance(run)
    _verify(run)
    _report(run)
    return _write(run)


@dataclass
class _Run:
    """One compile: what it was given (the model, the checked options, the target, where the
    outputs go) and what each stage leaves for the next."""

    model: str | os.PathLike | onnx.ModelProto
    options: CompileOptions
    target: Target
    log: Callable[[str], None]
    output: str | os.PathLike | None = None
    report_file: str | os.PathLike | None = None
    outs: Outputs | None = None  # every output path, claimed up front (None: nothing to write)
    owned: bool = False  # this call commits the outputs (a --goal candidate's are its caller's)
    src_path: Path | None = None
    t_start: float = field(default_factory=time.perf_counter)
    # _load
    original: onnx.ModelProto | None = None
    source_opset: int = 0
    # _build_pipeline
    pipeline: list = field(default_factory=list)
    prune_pass: Pass | None = None
    # _load_data
    calib: CalibrationSet | None = None
    feeds: dict | None = None  # --inputs
    evaluation: tuple | None = None  # --eval: (inputs, labels)
    # _run_pipeline, _quantize, _conformance
    ir: IR | None = None
    before: costs_mod.Costs | None = None
    records: list[PassRecord] = field(default_factory=list)
    quant_report: dict | None = None
    handed_off: bool = False  # the target's simulator check chose its toolchain's own int8 (the model stays float)
    prune_error: dict | None = None  # the pruned float model's output error (with calibration data)
    prune_warning: str | None = None
    after: costs_mod.Costs | None = None
    result_model: onnx.ModelProto | None = None
    warnings: list[str] = field(default_factory=list)
    # _verify
    verified: dict | None = None
    latency_ms: dict | None = None
    accuracy: dict | None = None
    # _report
    report: dict = field(default_factory=dict)


def _start(args: dict) -> _Run:
    """The checked options of a compile() call (its keywords, or ``options=``), its target, and
    every output path claimed before any work."""
    opts = _options(args)
    tgt = get_target(opts.target, opts.target_options)
    if opts.quant.mode == "vendor" and not getattr(tgt.extras, "vendor_quantizer", False):
        raise UserError(f"--quantize vendor: target {tgt.name} has no toolchain quantizer to hand off to "
                        f"(targets with one: rknn); use --quantize int8")
    model, output, report_file, outs = args["model"], args["output"], args["report_file"], args["_outputs"]
    src_path = None if isinstance(model, onnx.ModelProto) else loader.check_input_file(model)
    owned = outs is None and (output is not None or report_file is not None)
    outs = outs if outs is not None else (Outputs() if owned else None)
    if outs is not None:  # every output path checked before any work
        v = opts.verify
        _claim_outputs(outs, tgt, src_path, output, report_file, inputs=v.inputs, eval_data=v.eval_data,
                       calib=opts.calib,
                       quantized=(None if opts.goal is not None or tgt.options.get("simulator")
                                  else opts.quant.mode in ("int8", "mixed")))
    return _Run(model=model, options=opts, target=tgt, log=args["log"] or (lambda s: None), output=output,
                report_file=report_file, outs=outs, owned=owned, src_path=src_path)


def _options(args: dict) -> CompileOptions:
    given = args["options"]
    if given is not None:
        if not isinstance(given, CompileOptions):
            raise UserError(f"options: expected an edgec.options.CompileOptions, got {type(given).__name__}")
        defaults = CompileOptions().as_kwargs()
        mixed = [k for k in KEYWORDS if not _is_default(args[k], defaults[k])]
        if mixed:
            raise UserError(f"give options= or keyword options, not both ({', '.join(mixed)} given as keywords)")
        args = {**args, **given.as_kwargs()}
    args = {**args, **check_compile_options(args)}
    return CompileOptions.from_kwargs(**{k: args[k] for k in KEYWORDS})


def _is_default(value, default) -> bool:
    return value is default or (type(value) is type(default) and isinstance(default, (str, int, float, tuple))
                                and value == default)


def _by_goal(run: _Run) -> CompileResult:
    """``--goal``: :mod:`edgec.strategy` compiles candidates; the winner's outputs are staged in
    this run's and written all or none."""

    def candidate(options: CompileOptions, output) -> CompileResult:
        return compile(run.model, output, options=options, log=run.log,
                       _outputs=run.outs if output is not None else None)

    def trials(options: list[CompileOptions]) -> list | None:
        """Every trial compile at once, as tasks, when the executor distributes work (None: the
        strategy compiles them one by one, in process, until one fits)."""
        ex = executor_mod.current()
        if not ex.distributed:
            return None
        model = os.path.abspath(run.model) if isinstance(run.model, (str, os.PathLike)) else run.model
        return list(ex.map(trial_compile, [_for_task(o) for o in options], shared=model))

    with run.outs if run.owned else _nothing():
        result = strategy.run(candidate, run.model, run.output, run.options, target_profile=run.target, log=run.log,
                              trials=trials)
        if run.owned:
            if run.report_file is not None:
                run.outs.write_json(run.report_file, result.report)
            run.outs.commit()
    return result


def trial_compile(options: CompileOptions, shared) -> dict | EdgecError:
    """A ``--goal`` trial (an executor task): the parts of its report the strategy reads, or the
    EdgecError it raised."""
    try:
        result = compile(executor_mod.shared_value(shared), None, options=options)
    except EdgecError as e:
        return e
    return {"verify": result.report.get("verify", {}), "after": result.report["after"],
            "pruned": strategy.pruned_channels(result.report)}


def _for_task(o: CompileOptions) -> CompileOptions:
    """``o`` for a task: data paths absolute (it may run in another working directory), no
    progress meter."""
    def absolute(p):
        return os.path.abspath(p) if isinstance(p, (str, os.PathLike)) and os.fspath(p) != "random" else p

    return replace(o, calib=absolute(o.calib), quant=replace(o.quant, progress=False),
                   verify=replace(o.verify, inputs=absolute(o.verify.inputs), eval_data=absolute(o.verify.eval_data)))


def _load(run: _Run) -> None:
    """Read and check the model (the file's external data is protected from the outputs)."""
    if run.src_path is not None:
        external: list[Path] = []
        run.original = loader.load_model(run.src_path, external_files=external)
        for f in external:  # no output may replace the model's external data either
            if run.outs is not None:
                run.outs.protect(f, "input model's external data")
    else:
        run.original = loader.validate_model(run.model, "model")
    v = run.options.verify
    if v.verify or v.max_error is not None or v.inputs is not None or v.bench:
        _check_verifiable(run.original)
    run.source_opset = loader.check_opset(run.original, str(run.src_path or "model"))


def _build_pipeline(run: _Run) -> None:
    """The target's passes (or ``--passes``), with channel pruning and fixed input shapes in front."""
    o = run.options
    pipeline = run.target.passes() if o.passes is None else [get_pass(p) if isinstance(p, str) else p
                                                              for p in o.passes]
    if o.prune.enabled:
        run.prune_pass = _prune_pass(o.prune, run.target, has_calib=o.calib is not None)
        pipeline = prune_cleanup() + [run.prune_pass] + pipeline
    if o.input_shapes:
        pipeline = [FixInputShapes(o.input_shapes)] + pipeline
    run.pipeline = pipeline


def _prune_pass(o: PruneOptions, tgt: Target, *, has_calib: bool) -> PruneChannels:
    reconstruct = bool(o.reconstruct and has_calib)
    kwargs = dict(mode=o.mode, macs_target=o.macs, importance=o.importance, round_to=o.round_to or tgt.channel_multiple,
                  max_layer_ratio=o.max_layer_ratio, steps=o.steps)
    return PruneChannels(o.ratio, **kwargs, reconstruct=reconstruct)


def _load_data(run: _Run) -> None:
    """The calibration set (checked to run through the model), ``--inputs`` and ``--eval``."""
    o = run.options
    if o.calib is not None:
        if isinstance(o.calib, str) and o.calib == "random":
            run.log("warning: calibrating on random data (--calib random): pruning and quantization will not "
                    "reflect the real input distribution")
        run.calib = load_calibration(o.calib, _signature(run.original, o.input_shapes), max_samples=o.calib_samples,
                                     preprocess=o.calib_preprocess)
        run.calib.check_constant = True  # ranges from constant data (all zeros, ...) mean nothing: refused
        _check_calibration_runs(run.original, run.calib, o.calib, o.input_shapes)
    v = o.verify
    run.feeds = _feeds(v.inputs, run.original) if v.inputs is not None else None
    run.evaluation = _eval_set(v.eval_data, run.original) if v.eval_data is not None else None


def _run_pipeline(run: _Run) -> None:
    """The IR of the (opset-normalised) model, run through the pipeline."""
    normalized, notes = loader.normalize_opset(run.original)
    if normalized is not run.original:
        normalized, notes = _prove_upgrade(run.original, normalized, notes)
    if loader.check_opset(normalized) > run.target.max_opset:
        normalized, lowered = _lower_opset(normalized, run.target)
        notes = notes + lowered
    run.ir = IR.from_onnx(normalized, info=loader.ModelInfo(
        source_opset=run.source_opset, notes=notes, source_path=str(run.src_path) if run.src_path else None))
    run.before = _costs_before(run.ir, run.options.input_shapes)
    if run.target.static_shapes:
        _require_static(run.target, run.ir, run.options.input_shapes or {})
    ctx = PassContext(calib=run.calib, reference=normalized, target=run.target, log=run.log)
    run.records = PassManager(run.pipeline).run(run.ir, ctx)


# layers whose MACs need their output shape ("before" folds the shape arithmetic when one lacks it);
# not quant_rules.WEIGHTED_OPS, which lists what int8 quantizes by weight
SHAPED_LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN", "Einsum")


def _costs_before(ir: IR, input_shapes: dict | None) -> "costs_mod.Costs":
    """The input model's costs, at the input shapes given (with symbolic dims counted as 1 the
    "before" of a model compiled with --input-shape was a per-pixel count, and the report's
    change column read +2720% MACs), and with its shape arithmetic folded: a Resize whose sizes
    a Shape computes leaves every layer after it without a shape, so SSDlite's head counted no
    MACs before and hundreds of millions after (the folding is exact; ``edgec inspect`` counts
    the same way)."""
    try:
        if input_shapes:
            fixed = ir.copy()
            FixInputShapes(input_shapes).run(fixed, PassContext())
            fixed.infer_shapes(force=True)
        else:  # the IR itself: its shapes are inferred once, here, and the pipeline reuses them
            fixed = ir
        raw = costs_mod.compute(fixed)  # nodes, parameters and bytes: the model as given
        if all(IR.static_shape(n.outputs[0]) is not None for n in fixed.nodes
               if n.op in SHAPED_LAYER_OPS and n.outputs):  # every layer's shape known: nothing to fold for
            return raw
        folded = fixed.copy()
        PassManager([InferShapes(), FixedPoint([FoldShapes(), FoldConstants()])]).run(folded, PassContext())
    except EdgecError:  # (the pipeline's own passes say so, with their messages)
        return costs_mod.compute(ir)
    f = costs_mod.compute(folded)  # MACs and activations: where the shapes are known
    return replace(raw, macs=f.macs, per_node=f.per_node, peak_activation_bytes=f.peak_activation_bytes,
                   symbolic_dims=f.symbolic_dims)


def _wide_qdq_types(model: onnx.ModelProto) -> str | None:
    """The zero-point types of Q/DQ nodes that opsets below 21 do not have (16-bit, 4-bit), named."""
    consts = {t.name: t.data_type for t in model.graph.initializer}
    names = {onnx.TensorProto.INT16: "int16", onnx.TensorProto.UINT16: "uint16", onnx.TensorProto.INT4: "int4",
             onnx.TensorProto.UINT4: "uint4"}
    found = sorted({names[consts[n.input[2]]] for n in model.graph.node
                    if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2
                    and consts.get(n.input[2]) in names})
    return " and ".join(found) + " zero points" if found else None


def _prove_upgrade(original: onnx.ModelProto, converted: onnx.ModelProto,
                   notes: list[str]) -> tuple[onnx.ModelProto, list[str]]:
    """An old model converted up by onnx's version converter, kept only if ONNX Runtime gives the
    same outputs on generated inputs: the converter changed Resize-10, Upsample-9 and Hardmax-11
    outputs by up to 1.6, and an opset-8 Scan's input shapes, and onnx's checker passed them
    all. When the original cannot run on generated inputs, the conversion stands unproved, as
    before."""
    opset = loader.check_opset(original)
    try:
        feeds = verify_mod.random_inputs(original)
        ref = verify_mod.run(original, feeds)
    except Exception:
        return converted, notes
    try:
        same = _same_outputs(ref, verify_mod.run(converted, feeds))
    except Exception:
        same = False
    if same:
        return converted, notes
    return original, [loader.OpsetKept(f"opset {opset} kept: onnx's version converter changed the outputs taking it "
                                       f"to {loader.CANONICAL_OPSET} (checked in ONNX Runtime)")]


def _same_outputs(ref: dict, got: dict) -> bool:
    """The same outputs: float ones within rtol 1e-4, atol 1e-5, NaN where ``ref`` has NaN (random
    inputs to a Log give NaN in both models); the others exactly."""
    if set(got) != set(ref):
        return False
    for k, r in ref.items():
        g = got[k]
        if g.shape != r.shape:
            return False
        close = (np.allclose(g, r, rtol=1e-4, atol=1e-5, equal_nan=True) if r.dtype.kind in "fc"
                 else np.array_equal(g, r))
        if not close:
            return False
    return True


def _lower_opset(model: onnx.ModelProto, tgt) -> tuple[onnx.ModelProto, list[str]]:
    """A model newer than the target reads (PyTorch's exporters write opset 18 and later,
    TensorRT 8.x reads up to 17), taken down to the target's newest opset with onnx's version
    converter, when the converted model passes onnx's checker and gives the same outputs in ONNX
    Runtime on generated inputs (:func:`_same_outputs`, as the upgrade's proof: NaN where the
    original has NaN is the same). Otherwise the model is kept, with a note saying why, and the
    target's opset check refuses it."""
    opset, goal = loader.check_opset(model), tgt.max_opset
    try:
        converted = loader.lower_opset(model, goal)
    except Exception as e:
        wide = _wide_qdq_types(model)  # (the converter's own words: an assertion in its C++ source)
        why = (f"its QuantizeLinear/DequantizeLinear use {wide}, which need opset 21" if wide and goal < 21
               else loader.one_line(e)[:160])
        return model, [loader.OpsetKept(f"opset {opset} kept: onnx's version converter cannot take this model down "
                                        f"to {goal} ({why})")]
    try:
        feeds = verify_mod.random_inputs(model)
        same = _same_outputs(verify_mod.run(model, feeds), verify_mod.run(converted, feeds))
    except Exception as e:
        return model, [loader.OpsetKept(f"opset {opset} kept: the model converted to {goal} could not be checked in "
                                        f"ONNX Runtime ({loader.one_line(e)[:160]})")]
    if not same:
        return model, [loader.OpsetKept(f"opset {opset} kept: onnx's version converter changed the outputs taking it "
                                        f"down to {goal}")]
    return converted, [f"opset {opset} converted down to {goal}, the newest {tgt.description} reads (same outputs "
                       f"in ONNX Runtime)"]


def _quantize(run: _Run) -> None:
    """The lossy precision stage: the target's quantization scheme (:mod:`edgec.quantize_api`)."""
    q = run.options.quant
    if run.target.options.get("simulator") and q.mode != "int8":
        run.warnings.append(f"target option simulator: only --quantize int8 is measured in the simulator "
                            f"(here: {q.mode or 'no quantization'}); nothing was simulated")
    if q.mode == "vendor":  # the toolchain quantizes: the model stays float, the target writes the hand-off
        run.quant_report = {"mode": "vendor", "placement": f"{run.target.name} toolchain",
                            **run.target.extras.vendor_quantizer(run.target, q)}
    elif q.mode is not None:
        with data_tail.detached(run.ir) as tail:  # a model ending in NMS: what NMS reads is measured
            _quantize_measured(run, q)
        if tail is not None:
            run.quant_report["measured_before_tail"] = {"ops": tail.ops, "tensors": tail.cut}
            run.quant_report.setdefault("notes", []).append(
                f"the error is measured on {_some(tail.cut)}, what {_some(tail.ops)} reads: its outputs change "
                f"shape with the data; it and everything after it stay as they were")


def _quant_budget(run: _Run) -> float | None:
    """The quantizer's error budget: ``--max-error``, less what pruning already spent of it.
    Pruning's and int8's output errors are close to independent, so their relative L2s add in
    quadrature: int8 gets ``sqrt(max_error^2 - pruning^2)``, measured (as int8 measures) against
    the pruned float model. Pruning alone over the budget leaves nothing to share: ``max_error``."""
    budget = run.options.verify.max_error
    spent = (run.prune_error or {}).get("rel_l2")
    if budget is None or spent is None or spent >= budget:
        return budget
    return float(np.sqrt(budget * budget - spent * spent))


def _some(names: list[str], n: int = 4) -> str:
    """The first ``n`` names, and how many more (SSDlite's tail reads 95 tensors after 180 ops)."""
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _quantize_measured(run: _Run, q) -> None:
    """Quantize ``run.ir`` (whose outputs can be measured) for the target, with the simulator's
    check where asked."""
    tgt = run.target
    simulate = getattr(tgt.extras, "simulate", None) if q.mode == "int8" and tgt.options.get("simulator") else None
    float_ir = run.ir.copy() if simulate is not None else None
    run.quant_report = quantize_api.quantize_for_target(run.ir, tgt, q, run.calib,
                                                        max_error=_quant_budget(run), log=run.log)
    run.ir.infer_shapes()
    if simulate is not None:  # the target's own toolchain measures both int8s; the more faithful is written
        check = _simulator_check(run, simulate, float_ir)
        if check["chosen"] == "edgec strict":  # all int8 measured more faithful on the target
            dropped = [f["node"] for f in (run.quant_report.get("fallback") or {}).get("float", [])]
            strict_ir = float_ir.copy()
            try:
                strict_report = quantize_api.quantize_for_target(strict_ir, tgt, replace(q, strict=True), run.calib,
                                                                 max_error=_quant_budget(run), log=run.log)
            except EdgecError as e:  # all int8 refused on all the samples (it ran on 3/4): keep the fallback's
                check.update(chosen="edgec", why=check["why"] + f"; but all int8 on every sample was refused ({e}), "
                                                                "so the fallback's float ops stay")
            else:
                strict_ir.infer_shapes()
                run.ir, run.quant_report = strict_ir, strict_report
                run.quant_report["simulator_dropped_float"] = dropped
        elif check["chosen"] == "vendor":
            edgec_int8 = {k: run.quant_report[k] for k in ("method", "error") if k in run.quant_report}
            run.ir, run.handed_off = float_ir, True
            run.quant_report = {"mode": "vendor", "placement": f"{tgt.name} toolchain",
                                **tgt.extras.vendor_quantizer(tgt, q), "edgec_int8": edgec_int8}
        run.quant_report["simulator_check"] = check


PRUNE_ERROR_SAMPLES = 64  # calibration samples the pruned model's output error is measured on


def _prune_error(run: _Run) -> None:
    """Pruning with calibration data measures what it removed: the pruned float model's output
    error against the original on ``PRUNE_ERROR_SAMPLES`` calibration samples (whole batches
    spread over the set: :func:`edgec.calibdata.subset`; reconstruction fitted on them too) and,
    when auto pruning chose, the chosen candidate's error on
    its held-out samples. Both go to the report. Beyond ``quantize_api.COLLAPSE`` the report
    warns, and does not refuse: unlike int8 noise, a pruned model's outputs can move far while
    its task holds (PP-LCNet's orientation logits: held-out relative L2 1.14 at 30%, top-1 still
    1.000), so the output error alone cannot call it collapsed; ``--eval`` can."""
    if run.prune_pass is None or run.calib is None:
        return
    pruned = _prune_result(run)
    if not any(g.get("removed") for g in pruned.groups):
        return
    batches = list(calibdata.subset(run.calib, PRUNE_ERROR_SAMPLES).batches)  # as the model takes them (a fixed batch size stays)
    original, pruned_model, _ = _measurable_heads(run.original, run.ir.to_onnx())
    err = runtime.output_error(original, pruned_model, batches)
    n = sum(int(len(next(iter(b.values())))) for b in batches)
    run.prune_error = {"rel_l2": err["rel_l2"], "sqnr_db": err.get("sqnr_db"), "cosine": err.get("cosine"),
                       "samples": n, "on": "calibration samples (the ones reconstruction fitted on)"}
    chosen = (pruned.choice or {}).get("chosen")
    held = next((c.get("held_out_rel_l2") for c in (pruned.choice or {}).get("candidates", [])
                 if chosen and (c["importance"], c["mode"]) == (chosen["importance"], chosen["mode"])), None)
    if held is not None:
        run.prune_error["held_out_rel_l2"] = held
    worst = max(err["rel_l2"], held or 0.0)
    if worst > quantize_api.COLLAPSE:
        run.prune_warning = (
            f"the pruned model's outputs are far from the original's: relative L2 {worst:.3g}"
            + (" on held-out calibration samples" if held is not None and held >= err["rel_l2"] else "")
            + "; check its task metric (--eval) before deploying it, or prune less")
        run.log("warning: " + run.prune_warning)


def _simulator_check(run: _Run, simulate, float_ir: IR) -> dict:
    """The target's simulator check (rknn's ``simulator`` option): edgec's int8 and the toolchain's
    own, each calibrated on 3/4 of the calibration samples, scored in the simulator on the held-out
    quarter (drawn by a fixed seed: :func:`edgec.passes.prune_channels.split_feeds`); with fewer
    than 8 samples, both on all of them, scored on those.
    When edgec's fallback kept ops float, the same QDQ all int8 is a third candidate
    (:func:`_strict_candidate`)."""
    from edgec.passes.prune_channels import split_feeds

    q, tgt = run.options.quant, run.target
    batches = list(run.calib)
    split = split_feeds(batches, 0.25, fixed_batch=tgt.static_shapes)
    if split is None:
        strict = _strict_candidate(run, float_ir, run.quant_report, batches)
        check = simulate(tgt, float_ir, run.ir, batches, batches, q.method, run.log, strict_ir=strict)
        check["scored_on"] = "the calibration samples themselves (fewer than 8: none held out)"
        return check
    fit, held = split
    trial = float_ir.copy()
    rep = quantize_api.quantize_for_target(trial, tgt, q, fit, max_error=_quant_budget(run),
                                           log=lambda s: None)
    trial.infer_shapes()
    strict = _strict_candidate(run, float_ir, rep, fit)
    return simulate(tgt, float_ir, trial, fit, held, q.method, run.log, strict_ir=strict)


def _strict_candidate(run: _Run, float_ir: IR, quant_report: dict, batches) -> IR | None:
    """When the int8 in ``quant_report`` kept ops float (the fallback), the same quantization all
    int8 (``--strict-int8``) on ``batches``, for the simulator to compare: None when nothing was
    kept float or all int8 is refused (a collapse)."""
    if run.options.quant.strict or not (quant_report.get("fallback") or {}).get("float"):
        return None
    strict = float_ir.copy()
    try:
        quantize_api.quantize_for_target(strict, run.target, replace(run.options.quant, strict=True), batches,
                                         max_error=_quant_budget(run), log=lambda s: None)
    except EdgecError as e:
        run.log(f"rknn simulator: no all-int8 candidate ({e})")
        return None
    strict.infer_shapes()
    return strict


def _conformance(run: _Run) -> None:
    """The compiled model: costs, onnx's full checker, and the target's conformance check
    (problems refuse the model; warnings go to the report)."""
    tgt = run.target
    run.after = costs_mod.compute(run.ir)
    run.result_model = run.ir.to_onnx()
    loader.check_model(run.result_model)
    _require_loadable(run)
    found = tgt.conformance(run.ir)
    run.warnings += [p[len("warning:"):].strip() for p in found if p.startswith("warning:")]
    problems = [p for p in found if not p.startswith("warning:")]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"the model does not fit target {tgt.name} ({tgt.description}): "
                        + "; ".join(problems[:3]) + more)


LOAD_CHECK_BYTES = 1 << 30  # a larger model is not loaded again for the check (its session would cost GBs)


def _require_loadable(run: _Run) -> None:
    """The compiled model loads in ONNX Runtime wherever the original does. onnx's checker passes
    models ONNX Runtime refuses: an If's branch that is never taken must still type-check, and
    fixed input shapes can make an exporter's other branch ill-typed (silero-vad's 8 kHz branch at
    16 kHz shapes). Such a model was written with exit 0."""
    model = run.result_model
    if model.ByteSize() > LOAD_CHECK_BYTES:
        return
    try:
        runtime.reference_session(model)
        return
    except Exception as e:
        why = loader.one_line(e)[:300]
    try:
        runtime.reference_session(run.original)
    except Exception:  # the original does not load either (a custom op ...): not something edgec made
        return
    if run.options.input_shapes:
        raise UserError(f"ONNX Runtime cannot load the model with the input shapes given (--input-shape), though it "
                        f"loads the original ({why}); nothing was written")
    raise InternalError(f"ONNX Runtime cannot load the compiled model, though it loads the original ({why}); "
                        f"nothing was written")


def _verify(run: _Run) -> None:
    """Measure the compiled model against the original: outputs (``--verify``/``--max-error``,
    or ``--inputs`` given: a failed check raises VerificationError), latency, accuracy."""
    o, v, result_model = run.options, run.options.verify, run.result_model
    lossy = ((o.quant.mode not in (None, "vendor") and not run.handed_off)
             or any(not getattr(p, "lossless", True) for p in _flatten(run.pipeline)))
    feeds, source = run.feeds, "given" if v.inputs is not None else "random"
    if (v.verify or v.max_error is not None) and feeds is None:
        if lossy and run.evaluation is not None:  # lossy: measure on real data when there is some
            feeds, source = run.evaluation[0], "eval"
        elif lossy and run.calib is not None:
            feeds, source = _calib_samples(run.calib, 256), "calibration"
        else:  # random inputs from the compiled signature (input shapes may be fixed now)
            feeds = verify_mod.random_inputs(result_model)
    if feeds is not None:
        original, compared, measured = (_measurable_heads(run.original, result_model) if lossy
                                        else (run.original, result_model, None))
        comparison, ref_outputs, feeds = _compare(original, compared, feeds, rtol=v.rtol, atol=v.atol,
                                                  generated=source == "random")
        passed = comparison.allclose if not lossy else (v.max_error is None or comparison.rel_l2 <= v.max_error)
        run.verified = {**comparison.as_dict(), "inputs": source, "lossy": lossy, "passed": passed,
                        "max_error": v.max_error, "arithmetic": "reference"}
        if measured:
            run.verified["measured_before_tail"] = measured
        if v.verify:
            run.verified["host"] = _host_check(ref_outputs, compared, feeds, comparison, run.target)
            if not lossy and "error" in run.verified["host"] and _host_runs(run.original, feeds):
                # a lossless compile ONNX Runtime cannot run at its default settings where it runs the
                # original (onnx's affine_grid node tests: a folded If condition exposed a rank-1 value
                # where Range needs a scalar) is not written
                raise VerificationError(f"ONNX Runtime runs the original model at its default settings but not the "
                                        f"compiled one ({run.verified['host']['error']}); nothing was written")
        if (v.verify or v.max_error is not None) and not passed:
            if lossy:
                raise VerificationError(
                    f"the compiled model's output error (relative L2 {comparison.rel_l2:.4g}) is above "
                    f"--max-error {v.max_error}; nothing was written", measured=run.verified)
            raise VerificationError(f"the compiled model differs from the original: {_worst(comparison)} "
                                    f"(max abs error {comparison.max_abs_error:.3g}, rtol {v.rtol}, atol {v.atol}"
                                    f"{_floor_said(comparison)}); nothing was written")
    if v.bench:
        bench_feeds = verify_mod.random_inputs(result_model)
        try:
            before = verify_mod.latency_ms(run.original, bench_feeds)
        except Exception as e:  # a float64 model, an op with no kernel here: the model's, not a failed rewrite
            raise UserError(f"--bench: ONNX Runtime cannot run the original model on this host: "
                            f"{str(e).strip().splitlines()[0][:300]}") from None
        try:
            after = verify_mod.latency_ms(result_model, bench_feeds)
        except Exception as e:
            raise InternalError(f"--bench: the compiled model fails in ONNX Runtime where the original runs: "
                                f"{str(e).strip().splitlines()[0][:300]}") from None
        run.latency_ms = {"before": before, "after": after}
    if run.evaluation is not None:
        x, labels = run.evaluation
        run.accuracy = {"samples": int(len(labels)), "before": _accuracy(run.original, x, labels),
                        "after": _accuracy(result_model, x, labels, original=False)}


def _report(run: _Run) -> None:
    """The report (a JSON-able dict; :mod:`edgec.report` prints it)."""
    o, tgt, ir = run.options, run.target, run.ir
    report = run.report
    report.update({
        "model": str(run.src_path) if run.src_path else None,
        "output": str(run.output) if run.output is not None else None,
        "target": tgt.name,
        "target_profile": {"description": tgt.description, "options": dict(tgt.options),
                           "opsets": [tgt.min_opset, tgt.max_opset], "channel_multiple": tgt.channel_multiple,
                           "static_shapes": tgt.static_shapes, "float_precision": tgt.float_precision,
                           "int8": dict(tgt.quant.__dict__)},
        "build_host": runtime.host_description(),
        "opset": {"source": run.source_opset, "output": ir.opset},
        "notes": (list(ir.info.notes) + run.warnings + ([run.prune_warning] if run.prune_warning else [])
                  + _scheme_notes(tgt, o.quant.mode, o.target_options)),
        "before": run.before.as_dict(),
        "after": run.after.as_dict(),
        "passes": [r.as_dict() for r in run.records],
    })
    if run.verified is not None:
        report["verify"] = run.verified
    if run.prune_pass is not None:
        po, pruned = o.prune, _prune_result(run)
        report["pruning"] = {"ratio": pruned.ratio if po.macs is not None else po.ratio, "macs_target": po.macs,
                             "importance": pruned.importance, "mode": pruned.mode,
                             "choice": pruned.choice, "steps": po.steps,
                             "round_to": po.round_to or tgt.channel_multiple,
                             "reconstruct": bool(po.reconstruct and run.calib is not None),
                             "groups": pruned.groups, "reconstruction": pruned.reconstruction}
        if run.prune_error is not None:
            report["pruning"]["error"] = run.prune_error
    if run.quant_report is not None:
        report["quantization"] = run.quant_report
    sparse = _sparsity_result(run)
    if sparse is not None:
        report["sparsity"] = {"pattern": sparse.pattern, "layers": sparse.layers}
    if run.latency_ms is not None:
        report["latency_ms"] = run.latency_ms
    if run.accuracy is not None:
        report["accuracy"] = run.accuracy
    report["seconds"] = round(time.perf_counter() - run.t_start, 4)


def _record_of(run: _Run, p: Pass) -> PassRecord:
    """The record of pass ``p`` (records follow the flattened pipeline, one per position)."""
    return next(rec for q, rec in zip(_flatten(run.pipeline), run.records) if q is p)


def _prune_result(run: _Run) -> PruneResult:
    return _record_of(run, run.prune_pass).data


def _sparsity_result(run: _Run) -> SparsityResult | None:
    """What the pipeline's first ``sparsify_24`` did (None: the pipeline has none)."""
    p = next((q for q in _flatten(run.pipeline) if getattr(q, "name", "") == "sparsify_24"), None)
    if p is None:
        return None
    return _record_of(run, p).data


def _write(run: _Run) -> CompileResult:
    """All outputs or none: staged beside their destinations, renamed together."""
    tgt, report, outs = run.target, run.report, run.outs
    if outs is not None:
        with outs if run.owned else _nothing():
            if run.output is not None:
                if tgt.extras is not None:
                    extra_files = tgt.extras(tgt, run.ir, Path(run.output), calib_batches=run.calib,
                                             quantized_model=(run.options.quant.mode in ("int8", "mixed")
                                                              and not run.handed_off),
                                             calib_method=run.options.quant.method, writer=outs)
                    report["extra_files"] = [str(f) for f in extra_files]
                report["output_file_bytes"] = outs.write_model(run.output, run.result_model)
            if run.owned:
                if run.report_file is not None:
                    outs.write_json(run.report_file, report)
                outs.commit()
    return CompileResult(ir=run.ir, model=run.result_model, report=report, records=run.records,
                         output=Path(run.output) if run.output is not None else None)


def _claim_outputs(outs, tgt, src_path, output, report_file, *, inputs, eval_data, calib, quantized) -> None:
    """Check every path this compile will write, against its inputs and each other (UserError)."""
    outs.protect(src_path, "input model")
    for path, what in ((inputs, "--inputs file"), (eval_data, "--eval file"), (calib, "calibration data")):
        if isinstance(path, (str, os.PathLike)) and os.fspath(path) != "random":
            outs.protect(path, what)
    if output is not None:
        outs.claim(output, "output model")
        side = getattr(tgt.extras, "paths", None) if tgt.extras is not None else None
        if side is not None:
            for path, kind, what, replaceable in side(tgt, Path(output), calib=calib is not None,
                                                      quantized_model=quantized):
                outs.claim(path, what, kind=kind, replaceable=replaceable)
    if report_file is not None:
        outs.claim(report_file, "report")


def _check_verifiable(model: onnx.ModelProto) -> None:
    """--verify/--max-error/--bench run the model in ONNX Runtime and compare numbers: say up
    front when a model's inputs or outputs are not numbers numpy can hold."""
    for kind, vis in (("input", model.graph.input), ("output", model.graph.output)):
        inits = {t.name for t in model.graph.initializer}
        for v in vis:
            if v.name in inits or not v.type.HasField("tensor_type"):
                continue
            elem = v.type.tensor_type.elem_type
            try:
                dt = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)) if elem else None
            except (KeyError, TypeError, ValueError):
                dt = None
            if elem and (dt is None or dt.kind not in "biufc" and not (kind == "input" and dt.kind == "O")):
                name = onnx.TensorProto.DataType.Name(elem) if elem in onnx.TensorProto.DataType.values() else elem
                raise UserError(f"{kind} '{v.name}' is a {name} tensor: --verify, --max-error and --bench compare "
                                f"numeric tensors that ONNX Runtime's Python API exchanges; compile without them")


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


SYMBOLIC_FILLS = (1, 8, 16, 32, 64, 224)


def _worst(c: "verify_mod.Comparison") -> str:
    """The element furthest outside its tolerance, in words."""
    for name, o in c.per_output.items():
        w = o.get("worst")
        if w is not None:
            return (f"output '{name}' at {w['index']} is {w['actual']:.7g} against {w['reference']:.7g} "
                    f"(allowed difference {w['allowed']:.3g})")
    return "outputs differ"


def _floor_said(c: "verify_mod.Comparison") -> str:
    floors = [o["float_floor"] for o in c.per_output.values() if "float_floor" in o]
    return (f"; float rounding alone moves the outputs by up to {max(floors):.3g}, and {verify_mod.FLOOR_FACTOR} "
            f"times that is allowed" if floors else "")


def _measurable_heads(original: onnx.ModelProto, result: onnx.ModelProto):
    """Both models without their data-dependent tails, ending at what the tails read (a detector's
    boxes and scores before NMS): ``(original, result, the original's names of those)``; both as
    they are, and None, when the original has no tail. The clean-up may rename those tensors (a
    Cast before NMS removed) and reorder the nodes: they pair by where the tails read them (the
    reading node's output and the input slot), else by name."""
    if not data_tail.has_tail((n.op_type, n.domain) for n in original.graph.node):
        return original, result, None
    cuts = data_tail.cut(original), data_tail.cut(result)
    if cuts[0] is None or cuts[1] is None:
        raise UserError("the model's outputs change shape with the data (NonMaxSuppression, NonZero, ...) and edgec "
                        "cannot find what they are computed from to measure the compiled model's error on")
    (h0, t0), (h1, t1) = cuts
    outs = [{o.name: o.type.tensor_type for o in h.graph.output} for h in (h0, h1)]

    def same_kind(a: str, b: str) -> bool:  # the same element type, and the same shape where both are static
        ta, tb = outs[0][a], outs[1][b]
        da = [d.dim_value if d.HasField("dim_value") else None for d in ta.shape.dim]
        db = [d.dim_value if d.HasField("dim_value") else None for d in tb.shape.dim]
        return ta.elem_type == tb.elem_type and (None in da or None in db or da == db)

    by_reader = {t1.where[n]: n for n in t1.cut if n in t1.where}
    pairs = [(n, n) for n in outs[0] if n not in t0.cut and n in outs[1] and n not in t1.cut and same_kind(n, n)]
    for a in t0.cut:  # by where the tails read them (the reader's output and slot survive the clean-up)
        b = by_reader.get(t0.where.get(a)) or (a if a in t1.cut else None)
        if b is not None and same_kind(a, b):
            pairs.append((a, b))
    if not pairs:
        raise UserError("the model's outputs change shape with the data (NonMaxSuppression, NonZero, ...) and the "
                        "tensors they are computed from have other names in the compiled model: nothing to measure on")
    for h, side in ((h0, 0), (h1, 1)):
        outs = {o.name: o for o in h.graph.output}
        del h.graph.output[:]
        for k, (a, b) in enumerate(pairs):  # a renamed pair is read under one new name in both
            name, key = (a, b)[side], a if a == b else f"edgec_measured_{k}"
            if name != key:
                h.graph.node.append(onnx.helper.make_node("Identity", [name], [key], name=f"{key}_identity"))
            vi = onnx.ValueInfoProto()
            vi.CopyFrom(outs[name])
            vi.name = key
            h.graph.output.append(vi)
    return h0, h1, [a for a, _ in pairs]


def _compare(original, result_model, feeds, *, rtol, atol, generated: bool):
    """Run both models and compare: ``(comparison, the original's outputs, the feeds used)``.
    Generated inputs retry other sizes for symbolic non-batch dims (a UNet with dynamic H/W
    cannot run at 1x1); a model that never runs is the user's to feed (--inputs), a compiled
    model that fails where the original ran is edgec's bug."""
    symbolic = generated and any(not isinstance(d, int) or d <= 0 for spec in verify_mod.input_specs(result_model)
                                 for d in spec.shape[1:])
    tries = SYMBOLIC_FILLS if symbolic else (None,)
    last = None
    for fill in tries:
        if fill is not None:
            feeds = verify_mod.random_inputs(result_model, fill=fill)
        try:
            reference = verify_mod.run(original, feeds)
        except Exception as e:  # ORT refuses these inputs for the original model
            last = e
            continue
        _refuse_nan_reference(reference, generated)
        try:
            actual = verify_mod.run(result_model, feeds)
        except Exception as e:
            raise InternalError(f"the compiled model fails in ONNX Runtime where the original runs: "
                                f"{str(e).strip().splitlines()[0][:300]}") from None
        c = verify_mod.compare(reference, actual, rtol=rtol, atol=atol)
        if not c.allclose:  # is it more than float rounding moves these outputs? (measured only then)
            floor = verify_mod.float_floor(original, feeds, reference)
            if floor:
                c = verify_mod.compare(reference, actual, rtol=rtol, atol=atol, floor=floor)
        return c, reference, feeds
    first = str(last).strip().splitlines()[0][:200] if last else ""
    raise UserError(f"the original model does not run in ONNX Runtime on {'generated' if generated else 'these'} "
                    f"inputs" + (" (symbolic dims tried as " + ", ".join(map(str, tries)) + ")" if symbolic else "")
                    + (": pass real inputs with --inputs F.npz" if generated else "") + f" ({first})")


def _scheme_notes(tgt, quantize, target_options) -> list[str]:
    """Say so when the default portable scheme was used on a build host whose CPU class has a
    faster exact one: the deployment CPU is the user's to name, edgec does not guess it."""
    if tgt.name != "cpu" or quantize not in ("int8", "mixed") or "isa" in (target_options or {}):
        return []
    host = runtime.host_isa()
    if host in ("vnni", "amx") and tgt.quant.isa != host:
        return [f"int8 built for isa={tgt.quant.isa} (exact on every x86-64 CPU); this build host is {host}: if the "
                f"device is too, --target-option isa={host} gives U8S8, ONNX Runtime's fastest int8 kernels there"]
    return []


def _host_check(ref_outputs: dict, result_model, feeds, reference: "verify_mod.Comparison", tgt) -> dict:
    """``--verify``'s second line: the compiled model on *this host's* kernels (every ONNX
    Runtime optimisation on, QDQ fused into its integer kernels) on the feeds the reference
    comparison used, against the original's reference outputs (``ref_outputs``). Reported,
    never used to decide or to fail: the deployment CPU may differ from the build host. A note says when this host adds error the reference does not
    have (the int16 saturation of a no-VNNI CPU running a model built for isa=vnni, say)."""
    isa = runtime.host_isa()
    out = {"kernels": "this host's, ONNX Runtime with all optimisations", "host": runtime.host_description()}
    try:
        got = verify_mod.run(result_model, feeds, host=True)
    except Exception as e:  # the host's kernels refuse what the reference runs: report, don't fail
        out["error"] = str(e).strip().splitlines()[0][:200]
        return out
    c = verify_mod.compare(ref_outputs, got, rtol=reference.rtol, atol=reference.atol)
    out.update({"max_abs_error": c.max_abs_error, "rel_l2": c.rel_l2, "sqnr_db": runtime.sqnr_db(c.rel_l2),
                "min_cosine": c.min_cosine})
    built_for = tgt.quant.isa
    if c.rel_l2 > 2 * reference.rel_l2 + 1e-4:
        out["note"] = (f"this host's kernels add error (relative L2 {c.rel_l2:.3g} against {reference.rel_l2:.3g} in "
                       f"reference arithmetic)" + (f": the model was built for isa={built_for}, this host is {isa}"
                                                   if built_for and built_for != isa else ""))
    return out


def _host_runs(model, feeds) -> bool:
    """Whether ONNX Runtime, as deployed on this host (every optimisation on), runs ``model``."""
    try:
        verify_mod.run(model, feeds, host=True)
        return True
    except Exception:
        return False


def _refuse_nan_reference(reference: dict, generated: bool) -> None:
    """NaN in the original model's own outputs makes any comparison fail (NaN != NaN): the
    model (its weights) or the inputs are the user's to fix, not a failed rewrite."""
    bad = next((k for k, v in reference.items() if v.dtype.kind in "fc" and np.isnan(v).any()), None)
    if bad is not None:
        raise UserError(f"the original model's output '{bad}' holds NaN on the {'generated ' if generated else ''}inputs, "
                        f"so outputs cannot be compared: check its weights, or give inputs in its valid range with "
                        f"--inputs F.npz")


def _check_calibration_runs(model: onnx.ModelProto, calib_set, source, input_shapes) -> None:
    """The first calibration batch must run through the model: data that does not (symbolic
    spatial dims filled with 1 by --calib random, wrong value ranges, ...) is the user's to fix,
    said once here instead of as an ONNX Runtime failure deep inside calibration or pruning."""
    first = next(iter(calib_set), None)
    if first is None:
        raise UserError(f"{source}: the calibration data holds no samples")
    try:
        verify_mod.run(model, first)
    except Exception as e:
        hint = ("random calibration data fills symbolic dims with 1; give --input-shape NAME=D1,D2,... "
                "or real data" if isinstance(source, str) and source == "random" and not input_shapes
                else "check its shapes and value ranges")
        raise UserError(f"the calibration data does not run through the model in ONNX Runtime ({hint}): "
                        f"{str(e).strip().splitlines()[0][:200]}") from None


def _signature(model: onnx.ModelProto, input_shapes: dict | None) -> onnx.ModelProto:
    """A model holding only ``model``'s inputs, with ``input_shapes`` applied: what calibration
    batches must match once the compiled model's inputs are fixed."""
    if not input_shapes:
        return model
    stub = onnx.ModelProto()
    stub.graph.input.extend(model.graph.input)
    stub.graph.initializer.extend(onnx.TensorProto(name=i.name) for i in model.graph.initializer)
    for vi in stub.graph.input:
        if vi.name in input_shapes:
            del vi.type.tensor_type.shape.dim[:]
            for d in input_shapes[vi.name]:
                vi.type.tensor_type.shape.dim.add().dim_value = int(d)
    return stub


def _flatten(pipeline):
    for item in pipeline:
        if isinstance(item, FixedPoint):
            yield from item.passes
        else:
            yield item


def _calib_samples(calib_set, n: int) -> dict[str, np.ndarray]:
    """Up to ``n`` calibration samples, whole batches spread over the set, as one feed."""
    batches = list(calibdata.subset(calib_set, n).batches)
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _require_static(tgt, ir: IR, given: dict) -> None:
    for t in ir.inputs:
        if t.name in given:
            continue
        dims = list(t.shape) if t.shape is not None else None
        if dims is None or any(not isinstance(d, (int, np.integer)) or d <= 0 for d in dims):
            shown = "[" + ", ".join(str(d) for d in dims) + "]" if dims is not None else "unknown"
            example = ",".join(str(d) if isinstance(d, (int, np.integer)) and d > 0 else "1" for d in (dims or [1]))
            raise UserError(f"target {tgt.name} needs static input shapes: input '{t.name}' has shape {shown}; "
                            f"give --input-shape {t.name}={example}")


def _feeds(inputs, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    if isinstance(inputs, dict):
        return verify_mod.check_feeds(inputs, verify_mod.input_specs(model), "inputs")
    return verify_mod.load_inputs(inputs, model)


def _eval_set(path, model: onnx.ModelProto):
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such evaluation file")
    if p.suffix == ".npy":
        raise UserError(f"{p}: an evaluation set is an .npz with the model's inputs and a 'labels' array")
    data = datafiles.read_arrays(p, "evaluation file")  # headers checked, size capped, never unpickled
    if "labels" not in data:
        raise UserError(f"{p}: an evaluation set needs a 'labels' array beside the inputs")
    labels = data.pop("labels")
    if labels.ndim != 1 or labels.dtype.kind not in "iuf" or (labels.dtype.kind == "f" and (
            not np.isfinite(labels).all() or np.any(labels != np.round(labels)))):
        raise UserError(f"{p}: 'labels' must be a 1-D array of class indices (got {labels.dtype} "
                        f"{list(labels.shape)})")
    if len(labels) == 0:
        raise UserError(f"{p}: the evaluation set holds no samples")
    specs = verify_mod.input_specs(model)
    if len(specs) == 1 and specs[0].name not in data and len(data) == 1:
        data = {specs[0].name: next(iter(data.values()))}
    feeds = verify_mod.check_feeds(data, specs, str(p))
    n = {len(v) for v in feeds.values()}
    if n != {len(labels)}:
        raise UserError(f"{p}: {len(labels)} labels but {sorted(n)} input samples")
    return feeds, labels


def _accuracy(model: onnx.ModelProto, feeds: dict[str, np.ndarray], labels: np.ndarray, *,
              original: bool = True) -> float:
    """Top-1 accuracy on the evaluation set. The original model failing on the user's data is
    the user's to fix (UserError); the compiled model failing where the original ran is edgec's."""
    try:
        out = next(iter(verify_mod.run(model, feeds).values()))
    except Exception as e:  # noqa: BLE001 - ONNX Runtime's exceptions have no common base
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        if original:
            raise UserError(f"the model does not run on the evaluation data in ONNX Runtime (check its shapes and "
                            f"batch size): {first}") from None
        raise InternalError(f"the compiled model fails on the evaluation data where the original runs: {first}") from None
    if out.size % max(len(labels), 1) or out.size == 0:
        raise UserError(f"the model's first output has {out.size} values for {len(labels)} labels: --eval expects "
                        f"one row of class scores per sample")
    pred = out.reshape(len(labels), -1).argmax(axis=1)
    return float(np.mean(pred == labels.reshape(-1)))


def inspect(model: str | os.PathLike | onnx.ModelProto, *, top: int = 10, groups: bool = False) -> dict:
    """What is inside a model and what it costs (``edgec inspect``). A model that is not valid
    ONNX is refused with a UserError naming the problem, as in :func:`compile`."""
    number("top", top, lo=0, integer=True)
    boolean("groups", groups)
    if isinstance(model, onnx.ModelProto):
        proto, where = loader.validate_model(model, "model"), "model"
    else:
        path_like("model", model, optional=False)
        proto, where = loader.load_model(model), str(model)
    opset = loader.check_opset(proto, where)
    normalized, notes = loader.normalize_opset(proto)  # costs as compile sees them ("before")
    ir = IR.from_onnx(normalized)
    c = _costs_before(ir, None)
    info = {
        "model": where if not isinstance(model, onnx.ModelProto) else None,
        "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
        "ir_version": proto.ir_version,
        "opset": opset,
        "opsets": {(o.domain or "ai.onnx"): o.version for o in proto.opset_import},
        "notes": notes,
        "inputs": [_tensor_info(t) for t in ir.inputs],
        "outputs": [_tensor_info(t) for t in ir.outputs],
        **c.as_dict(top=top),
    }
    if groups:  # on the graph pruning reads: after its exact clean-up
        cleaned = ir.copy()
        PassManager(prune_cleanup()).run(cleaned, PassContext())
        found = find_groups(cleaned)
        info["groups"] = [{"id": g.id, "channels": g.channels, "units": g.units, "prunable": g.prunable,
                           "reason": g.reason, "origins": list(g.origins)} for g in found]
        info["groups_text"] = format_groups(found)
    return info


def _tensor_info(t) -> dict:
    return {"name": t.name, "dtype": _dtype_str(t.dtype),
            "shape": [d if isinstance(d, (int, np.integer)) else str(d) for d in t.shape] if t.shape is not None else None}


def _dtype_str(dtype) -> str | None:
    dt = plain_dtype(dtype)
    return str(dt) if dt is not None else dtype_name(dtype)
