"""rknn: RKNN-compatible ONNX for Rockchip NPUs (RKNN-Toolkit2 2.x).

Options: ``platform`` = rk3588 (default), rk3576, rk3568, rk3566, rk3562, rv1106, rv1103;
``dynamic_input`` = shapes RKNN should build for when inputs stay dynamic, as
``1x3x224x224;4x3x224x224`` (RKNN's ``config(dynamic_input=...)``); ``mean``/``std`` =
per-channel normalisation the NPU applies before the model (default none: the ONNX input is
already normalised); ``quantized_algorithm`` (normal, mmse, kl_divergence; default from
--calib-method) and ``quantized_method`` (channel, layer) = RKNN's own int8 calibration;
``optimization_level`` (0-3) = RKNN's ``config(optimization_level=...)`` for the build; by default
2 for edgec's pre-quantized QDQ model without hard-swish/hard-sigmoid, else RKNN's own default (3);
``simulator`` = the Python where rknn-toolkit2 2.x is installed: ``--quantize int8`` then builds
edgec's QDQ and RKNN's own int8 in its simulator (a separate process, the build scripts this
target writes), scores both on held-out calibration samples and writes the more faithful
(:func:`simulator_check`).

Side files: ``OUT.rknn.json`` (RKNN's config/build arguments) and ``OUT.rknn_build.py`` (builds
the .rknn from them, optionally runs the simulator). ``--quantize vendor`` (or ``--calib``
without --quantize) leaves the model float and adds ``OUT.dataset/`` so that RKNN-Toolkit2's
own quantizer does the int8: measured more faithful than edgec's QDQ on hard-swish/hard-sigmoid
nets, hard-swish with sigmoid SE gates and ResNet bottlenecks in its simulator; edgec's QDQ tied or
led on the other CNNs measured (benchmarks/rknn_vendor.py, README "Targets").

Profile: opset <= 19, fixed input shapes (or ``dynamic_input``), 4-D NCHW, int8 asymmetric
activations with per-channel weights, float layers in FP16; rv1106/rv1103 have no float mode.
Pipeline: the lossless clean-up plus rewrites into what the NPU runs: ops it lacks decomposed
(Sum, Mean, Neg, Reciprocal, Abs, ReduceL2, ReduceSumSquare, Softsign), Gemm on feature
vectors as 1x1 Conv, 5-D channel shuffles as 4-D, a BatchNormalization that cannot fold as a
depthwise 1x1 Conv.
Check: RKNN-Toolkit2's ONNX op list (backends/op_tables.py): unsupported ops, batch-1
remarks (a warning: its simulator runs them above batch 1), Resize modes, custom domains, data-dependent ops, opset and static shapes, and
Transposes too large for the NPU (a warning; an error on rv1106/rv1103, which cannot fall back).
Transposes that cancel or compose are already gone (fuse_transposes) before the check.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from edgec.errors import UserError
from edgec.ir import IR
from edgec.outputs import Outputs, edgec_dataset_folder
from edgec.passes import DecomposeOps, GemmToConv, ShuffleTo4D
from edgec.passes.fold_batchnorm import inference_affine
from edgec.pipeline import Pass, PassContext, PassResult
from edgec.target import QuantScheme, Target

from . import checks, op_tables
from .cleanup import lossless_pipeline

PLATFORMS = ("rk3588", "rk3576", "rk3568", "rk3566", "rk3562", "rv1106", "rv1103")
NO_FLOAT = ("rv1106", "rv1103")
DECOMPOSE = ("Sum", "Mean", "Neg", "Reciprocal", "Abs", "ReduceL2", "ReduceSumSquare", "Softsign")
BATCH1_OPS = {op for op, why in op_tables.RKNN_RESTRICTED.items() if "batch size 1" in why}
# RKNN-Toolkit2 puts a Transpose on the CPU when its input's height x width exceeds this ("Transpose
# will fallback to CPU, because input shape has exceeded the max limit, height(H) * width(W) = N,
# required product no larger than 8192!", airockchip/rknn-toolkit2#490; older releases said 16384).
# rv1106/rv1103 have no CPU Transpose at all: such a model fails at rknn_init (#145, #316).
TRANSPOSE_HW_LIMIT = 8192
FOLD_BYTES = 1 << 20  # a tensor computed from constants folds up to this size (see _pipeline)


def _floats(t: Target, key: str, positive: bool = False) -> list[float]:
    """``mean``/``std``: comma-separated finite numbers (std > 0), one per channel or one for all."""
    text = str(t.options[key]).strip()
    if not text:
        return []
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        vals = []
    if not vals or not all(math.isfinite(v) and (v > 0 or not positive) for v in vals):
        raise UserError(f"target rknn: {key}={text!r}: expected comma-separated finite numbers"
                        + (" above 0" if positive else "") + ", e.g. 123.7,116.3,103.5")
    return vals


def _dynamic_input(t: Target) -> list[list[int]]:
    """``dynamic_input``: shapes joined by ';', dims by 'x' (positive integers)."""
    text = str(t.options["dynamic_input"]).strip()
    shapes = []
    for item in filter(None, (x.strip() for x in text.split(";"))):
        try:
            dims = [int(d) for d in item.split("x")]
        except ValueError:
            dims = []
        if not dims or any(d <= 0 for d in dims):
            raise UserError(f"target rknn: dynamic_input={text!r}: expected shapes of positive dims joined by x, "
                            f"separated by ; (e.g. 1x3x224x224;4x3x224x224)")
        shapes.append(dims)
    if text and not shapes:
        raise UserError(f"target rknn: dynamic_input={text!r}: expected shapes such as 1x3x224x224;4x3x224x224")
    return shapes


def _configure(t: Target) -> None:
    t.options["optimization_level"] = str(t.options["optimization_level"])
    if t.options["platform"] not in PLATFORMS:
        raise UserError(f"target rknn: platform={t.options['platform']} is not known (choose one of {', '.join(PLATFORMS)})")
    _floats(t, "mean")
    _floats(t, "std", positive=True)
    _dynamic_input(t)
    for key, known in (("quantized_algorithm", ALGORITHMS + ("",)), ("quantized_method", METHODS),
                       ("optimization_level", OPTIMIZATION_LEVELS + ("",))):
        if t.options[key] not in known:
            raise UserError(f"target rknn: {key}={t.options[key]} is not known (choose one of {', '.join(filter(None, known))})")
    sim = str(t.options["simulator"]).strip()
    if sim and not (Path(sim).is_file() and os.access(sim, os.X_OK)):
        raise UserError(f"target rknn: simulator={sim}: not an executable file (the Python where rknn-toolkit2 2.x "
                        f"is installed, e.g. ~/rknn-venv/bin/python)")
    if sim and str(t.options["dynamic_input"]).strip():
        raise UserError("target rknn: simulator= measures a model with static input shapes; give --input-shape "
                        "instead of dynamic_input=")
    t.static_shapes = not t.options["dynamic_input"]
    t.description = f"Rockchip {t.options['platform']} NPU (RKNN-Toolkit2 2.x)"


class BatchNormToConv(Pass):
    """A BatchNormalization left after fold_batchnorm (its input comes from a Concat, an Add, a
    pool, or a conv output read elsewhere: DenseNet's BN-ReLU after each concat) becomes the
    depthwise 1x1 Conv it computes: ``W[c] = gamma / sqrt(var + eps)``, ``b[c] = beta - W[c] * mean``.

    For int8 it is then a weighted op like any conv: per-channel weights with one value per
    channel quantize exactly, its input and output get Q/DQ, and a ReLU after it folds into the
    conv output's range as after every conv. Left a BatchNormalization, the rule table keeps it
    float; quantized with the ReLU folded into its range, RKNN-Toolkit2 re-derives that range on
    import and loses the ReLU (densenet cosine 0.84 in its simulator). As a depthwise conv,
    densenet's QDQ measured 0.99994 in the rk3588 simulator (RKNN's own int8 0.99984, its best 0.99993;
    benchmarks/rknn_vendor.py). Exact up to float rounding; inference-mode 4-D BNs with constant
    statistics only."""

    name = "rknn_batchnorm_to_conv"
    description = "rewrite a BatchNormalization that cannot fold as a depthwise 1x1 Conv (rknn)"
    preserves_shapes = True
    requires = ("shapes",)

    def run(self, ir: IR, ctx: PassContext) -> PassResult:
        result = PassResult(False)
        for bn in list(ir.find("BatchNormalization")):
            x, y = bn.inputs[0], bn.outputs[0]
            affine = inference_affine(ir, bn)
            if (isinstance(affine, str) or bn.domain not in (None, "", "ai.onnx")
                    or any(o.name for o in bn.outputs[1:]) or x.shape is None or len(x.shape) != 4
                    or (x.dtype is not None and np.dtype(x.dtype) != np.float32)):
                continue
            s, shift = (a.reshape(-1) for a in affine)
            c = x.shape[1]
            if not isinstance(c, (int, np.integer)) or s.shape[0] != c:
                continue
            base = bn.name or y.name
            w = ir.make_const(base + "_dw_W", s.astype(np.float32).reshape(c, 1, 1, 1))
            b = ir.make_const(base + "_dw_b", shift.astype(np.float32))
            bn.inputs.clear()
            bn.outputs.clear()
            ir.graph.nodes.remove(bn)
            ir.graph.nodes.append(gs.Node("Conv", name=ir.unique_name(base + "_dw"), inputs=[x, w, b], outputs=[y],
                                          attrs={"group": int(c), "kernel_shape": [1, 1]}))
            result.changed = True
            result.note(f"BatchNormalization '{base}' (not foldable) runs as a depthwise 1x1 Conv")
        return result


def _pipeline(t: Target) -> list:
    # constants computed in the graph fold up to 1 MiB: such a tensor is an op the NPU may lack (T5's
    # relative-position buckets compute an int64 Abs), and RKNN refuses the model for it
    steps = lossless_pipeline(extra=[DecomposeOps(ops=DECOMPOSE), GemmToConv(), ShuffleTo4D()],
                              fold_bytes=FOLD_BYTES)
    # after the fixed point, so that every BN that can fold into its producer has
    steps.insert(len(steps) - 2, BatchNormToConv())
    return steps


def _unsupported(name: str) -> bool:
    if name in op_tables.RKNN_UNSUPPORTED:
        return True
    return any(p.endswith("*") and name.startswith(p[:-1]) for p in op_tables.RKNN_UNSUPPORTED)


def _check(t: Target, ir: IR) -> list[str]:
    problems = checks.check_opset(t, ir)
    for shape in _dynamic_input(t):
        ranks = {len(i.shape) for i in ir.inputs if i.shape is not None}
        if ranks and len(shape) not in ranks:
            problems.append(f"dynamic_input shape {'x'.join(map(str, shape))} has rank {len(shape)}, the model's "
                            f"inputs have rank {', '.join(map(str, sorted(ranks)))}")
    channels = {int(i.shape[1]) for i in ir.inputs if i.shape and len(i.shape) == 4
                and isinstance(i.shape[1], (int, np.integer))}
    for key in ("mean", "std"):
        vals = _floats(t, key, positive=key == "std")
        if vals and len(vals) != 1 and channels and len(vals) not in channels:
            problems.append(f"{key} has {len(vals)} values, the input has {', '.join(map(str, sorted(channels)))} "
                            f"channels")
    if t.static_shapes:
        problems += checks.check_static(t, ir)
    batch = max((int(i.shape[0]) for i in ir.inputs if i.shape and isinstance(i.shape[0], (int, np.integer))), default=1)

    def verdict(node: gs.Node) -> str | None:
        if node.domain not in (None, "", "ai.onnx"):
            return f"custom domain '{node.domain}': RKNN-Toolkit2 cannot build it"
        if _unsupported(node.op):
            return "not supported by RKNN-Toolkit2 (no NPU or CPU kernel in its ONNX op list)"
        if node.op == "Resize" and node.attrs.get("mode", "nearest") not in ("nearest", "linear"):
            return f"resize mode {node.attrs.get('mode')} is not supported (nearest, bilinear)"
        if node.op in ("EyeLike", "If") and not all(ir.is_const(i) for i in node.inputs[:1]):
            return "RKNN needs a constant input here"
        return None

    problems += checks.check_ops(ir, verdict)
    batch1 = sorted({n.op for n in checks.all_nodes(ir.graph) if n.op in BATCH1_OPS})
    if batch1 and batch > 1:
        # RKNN-Toolkit2's op list says batch size 1 for these, but its 2.5.0 simulator builds and runs
        # Softmax and Slice on a first dim of 4 and 20, and a sequence-first transformer ([T, B, C],
        # whose first dim is no batch), matching ONNX Runtime (tests/test_rknn_simulator.py): a
        # refusal turned such models away, so it is a warning
        problems.append(f"warning: RKNN-Toolkit2's op list gives {', '.join(batch1)} for batch size 1 only, and the "
                        f"first input dim is {batch}; its simulator runs them there, but check on the device")
    for node in ir.find("Transpose"):
        shape = IR.static_shape(node.inputs[0])
        if shape is None or len(shape) < 3 or shape[-2] * shape[-1] <= TRANSPOSE_HW_LIMIT:
            continue
        hw = shape[-2] * shape[-1]
        if t.options["platform"] in NO_FLOAT:
            problems.append(f"Transpose '{node.name}': input height x width = {hw} > {TRANSPOSE_HW_LIMIT}: "
                            f"{t.options['platform']} cannot run it on the NPU and has no CPU Transpose")
        else:
            problems.append(f"warning: Transpose '{node.name}' on height x width = {hw} > {TRANSPOSE_HW_LIMIT} "
                            f"will fall back to the CPU on {t.options['platform']} (slow: NPU<->CPU copies)")
    return problems


# edgec's calibration methods and RKNN-Toolkit2's quantized_algorithm names for the same idea
RKNN_ALGORITHM = {"minmax": "normal", "percentile": "normal", "mse": "mmse", "entropy": "kl_divergence"}
ALGORITHMS = ("normal", "mmse", "kl_divergence")
METHODS = ("channel", "layer")


# RKNN's config(optimization_level=...): 3 is its default. Loading a pre-quantized (QAT) model it
# warns that "some performance optimization passes will affect the accuracy" at 3 and suggests 2.
# At 3 its quant_optimizer re-derives quantization parameters (adjust_avgpool, adjust_hardswish,
# adjust_tanh_sigmoid, adjust_no_change_node) and its fuse_ops rewrite quantized ops
# (convert_global_avgpool_to_conv, fuse_concat_conv, seperate_conv_split); at 2 it runs the QDQ as
# written. Measured in its rk3588 simulator on edgec's QDQ (benchmarks/rknn_vendor.py, cosine to
# fp32): 2 was more faithful on ReLU, Concat, BatchNorm, channel-shuffle and SE nets (inception
# 0.99973 -> 0.99996, shufflenet_v2 0.99933 -> 0.99977, resnet_bottleneck 0.99969 -> 0.99982) and
# less on hard-swish/hard-sigmoid nets (mobilenet_v3 0.99668 -> 0.99530, the PP-OCR DB detector
# 0.98463 -> 0.98412), where RKNN's adjust_hardswish/adjust_tanh_sigmoid repair part of edgec's
# double rounding. So: 2 for edgec's QDQ unless the graph has those ops, RKNN's default otherwise.
OPTIMIZATION_LEVELS = ("0", "1", "2", "3")
HARD_ACTIVATIONS = ("HardSwish", "HardSigmoid")


def optimization_level(t: Target, ir: IR, quantized_model: bool) -> int | None:
    """RKNN's optimization_level for this build: the option, else 2 for edgec's pre-quantized QDQ
    model without hard-swish/hard-sigmoid, else None (RKNN's default, 3)."""
    if t.options["optimization_level"]:
        return int(t.options["optimization_level"])
    if quantized_model and not any(n.op in HARD_ACTIVATIONS for n in ir.nodes):
        return 2
    return None


def _algorithm(t: Target, calib_method) -> str:
    """RKNN's quantized_algorithm: the ``quantized_algorithm`` option, else the one named like --calib-method."""
    return t.options["quantized_algorithm"] or RKNN_ALGORITHM.get(calib_method if isinstance(calib_method, str)
                                                                  else "minmax", "normal")


def vendor_quantizer(t: Target, quant) -> dict:
    """``--quantize vendor``: the report's quantization section (the model stays float; RKNN
    quantizes it from the dataset this target writes)."""
    return {"quantizer": "RKNN-Toolkit2 build(do_quantization=True)", "quantized_dtype": "w8a8",
            "quantized_algorithm": _algorithm(t, quant.method), "quantized_method": t.options["quantized_method"],
            "method": f"RKNN {_algorithm(t, quant.method)}/{t.options['quantized_method']}"}


def side_paths(t: Target, output: Path, *, calib: bool, quantized_model: bool | None) -> list[tuple]:
    """What :func:`write_build_config` may write beside ``output``: (path, kind, what, replaceable).
    ``quantized_model`` None: not known yet (``--goal``), so every possible path."""
    if t.options["platform"] in NO_FLOAT and not calib and quantized_model is False:
        raise UserError(f"{t.options['platform']} has no float mode: give --calib (RKNN quantizes) or --quantize int8")
    paths = [(output.with_name(output.name + ".rknn.json"), "file", "RKNN build config", None),
             (output.with_name(output.name + ".rknn_build.py"), "file", "RKNN build script", None)]
    if calib and quantized_model is not True:
        paths.append((output.with_name(output.name + ".dataset"), "dir", "RKNN dataset folder", edgec_dataset_folder))
    return paths


BUILD_SCRIPT = '''#!/usr/bin/env python3
"""Build {rknn} from {model} with RKNN-Toolkit2 2.x, as {config} says (written by edgec).

Run it with the Python where rknn-toolkit2 is installed:

    python {script}                                   # writes {rknn}
    python {script} --simulate in.npz --outputs out.npz   # and runs inputs in the x86 simulator

in.npz: one array per model input (by name, NCHW), samples stacked on the batch axis.
out.npz: out_0, out_1, ... (one per model output, samples stacked the same way).
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG = HERE / {config!r}


def dataset_list(cfg, tmp):
    """The dataset's list with this folder's paths (the folder may have moved since edgec wrote it)."""
    folder = HERE / cfg["dataset_dir"]
    lines = []
    for line in (folder / "dataset.txt").read_text().splitlines():
        if line.strip():
            lines.append(" ".join(str(folder / Path(p).name) for p in line.split()))
    path = Path(tmp) / "dataset.txt"
    path.write_text("\\n".join(lines) + "\\n")
    return str(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rknn", default=str(HERE / {rknn!r}), help="where to write the .rknn model")
    ap.add_argument("--simulate", help=".npz of inputs to run in the simulator after the build")
    ap.add_argument("--outputs", help="--simulate: .npz to write the outputs to")
    ap.add_argument("--quantized-algorithm", help="override the config's (normal, mmse, kl_divergence)")
    ap.add_argument("--quantized-method", help="override the config's (channel, layer)")
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args()
    cfg = json.loads(CONFIG.read_text())
    config = dict(cfg["config"])
    for key in ("quantized_algorithm", "quantized_method"):
        if getattr(a, key):
            config[key] = getattr(a, key)
    from rknn.api import RKNN
    rknn = RKNN(verbose=a.verbose)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            steps = [("config", lambda: rknn.config(**config)),
                     ("load_onnx", lambda: rknn.load_onnx(model=str(HERE / cfg["model"]))),
                     ("build", lambda: rknn.build(**dict(cfg["build"], **(
                         {{"dataset": dataset_list(cfg, tmp)}} if cfg["build"].get("do_quantization") else {{}})))),
                     ("export_rknn", lambda: rknn.export_rknn(a.rknn))]
            for name, step in steps:
                if step() != 0:
                    sys.exit(f"{{CONFIG.name}}: RKNN {{name}} failed")
        print(f"wrote {{a.rknn}}")
        if a.simulate:
            import numpy as np
            if rknn.init_runtime() != 0:
                sys.exit("RKNN init_runtime (simulator) failed")
            with np.load(a.simulate) as z:
                arrays = [z[i["name"]] if i["name"] in z.files else z[z.files[k]] for k, i in enumerate(cfg["inputs"])]
            batch = int(cfg["inputs"][0]["shape"][0]) if cfg["inputs"][0]["shape"] else 1
            outs = []
            for s in range(0, len(arrays[0]), batch):
                outs.append(rknn.inference(inputs=[x[s:s + batch] for x in arrays], data_format="nchw"))
            np.savez(a.outputs or "outputs.npz",
                     **{{f"out_{{k}}": np.concatenate([np.asarray(o[k]) for o in outs]) for k in range(len(outs[0]))}})
    finally:
        rknn.release()


if __name__ == "__main__":
    main()
'''


def write_build_config(t: Target, ir: IR, output: Path, calib_batches=None, quantized_model: bool = False,
                       calib_method: str = "auto", writer=None) -> list[Path]:
    """Write ``OUT.rknn.json`` (the arguments of RKNN's config/build) and, with calibration data,
    ``OUT.dataset/NNNN.npy`` + ``dataset.txt`` (NCHW .npy files, as RKNN's build wants them).
    With ``writer`` (an :class:`edgec.outputs.Outputs`) the files are staged there, to appear
    with the model or not at all."""
    if t.options["platform"] in NO_FLOAT and calib_batches is None and not quantized_model:
        raise UserError(f"{t.options['platform']} has no float mode: give --calib (RKNN quantizes) or --quantize int8")
    own = writer is None
    if own:
        writer = Outputs()
        for path, kind, what, replaceable in side_paths(t, output, calib=calib_batches is not None,
                                                        quantized_model=quantized_model):
            writer.claim(path, what, kind=kind, replaceable=replaceable)
    written = []
    cfg = {
        "target_platform": t.options["platform"],
        "model": output.name,
        "build_script": output.name + ".rknn_build.py",
        "config": {"target_platform": t.options["platform"]},
        "build": {"do_quantization": False},
        "inputs": [{"name": i.name, "shape": [int(d) if isinstance(d, (int, np.integer)) else str(d) for d in (i.shape or [])]}
                   for i in ir.inputs],
    }
    if t.options["mean"]:
        cfg["config"]["mean_values"] = [_floats(t, "mean")]
    if t.options["std"]:
        cfg["config"]["std_values"] = [_floats(t, "std", positive=True)]
    if t.options["dynamic_input"]:
        cfg["config"]["dynamic_input"] = [[s] for s in _dynamic_input(t)]
    level = optimization_level(t, ir, quantized_model)
    if level is not None:
        cfg["config"]["optimization_level"] = level
    if quantized_model:
        cfg["note"] = "pre-quantized QDQ model: build with do_quantization=False (RKNN treats it as QAT)"
        if level == 2 and not t.options["optimization_level"]:
            cfg["note"] += ("; optimization_level 2: at 3 RKNN re-derives the quantized parameters of pools, "
                            "concat-conv and split-conv and measured less faithful (benchmarks/rknn_vendor.py)")
    elif calib_batches is not None:
        ds_dir = output.with_name(output.name + ".dataset")
        final = writer.real(ds_dir)  # where the folder will be: dataset.txt names its files there
        tmp_dir = writer.make_dir(ds_dir)
        lines = []
        count = 0
        for batch in calib_batches:
            arrays = list(batch.values())
            for k in range(len(arrays[0])):
                names = []
                for j, arr in enumerate(arrays):
                    name = f"{count:05d}_{j}.npy"
                    np.save(tmp_dir / name, np.ascontiguousarray(arr[k:k + 1]))
                    names.append(str(final / name))
                lines.append(" ".join(names))
                count += 1
        (tmp_dir / "dataset.txt").write_text("\n".join(lines) + "\n")
        cfg["build"] = {"do_quantization": True, "dataset": str(final / "dataset.txt")}
        cfg["dataset_dir"] = ds_dir.name
        cfg["config"].update({"quantized_dtype": "w8a8", "quantized_algorithm": _algorithm(t, calib_method),
                              "quantized_method": t.options["quantized_method"]})
        written.append(ds_dir)
    path = output.with_name(output.name + ".rknn.json")
    writer.write_text(path, json.dumps(cfg, indent=2) + "\n")
    written.append(path)
    script = output.with_name(output.name + ".rknn_build.py")
    writer.write_text(script, BUILD_SCRIPT.format(model=output.name, config=path.name, script=script.name,
                                                  rknn=output.stem + ".rknn"))
    written.append(script)
    if own:
        writer.commit()
    return written


SIM_SAMPLES = 16  # calibration samples the simulator check scores both builds on
SIM_TIMEOUT = 3600  # seconds for one build and simulation
SIM_TIE = 1e-5  # cosine: RKNN's own int8 replaces edgec's QDQ only when more faithful by more than this
LABELS = {"edgec": "edgec's QDQ", "edgec strict": "edgec's QDQ all int8", "vendor": "RKNN's own int8"}


def _cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def _clearly_better(a: np.ndarray, b: np.ndarray, section: dict) -> bool:
    """Per-sample cosines ``a`` better than ``b`` beyond noise: their mean paired difference above
    ``SIM_TIE`` and above twice its standard error (the held-out samples are few; a hand-off on a
    difference the samples cannot tell from noise would trade edgec's plan for a coin toss)."""
    d = a - b
    stderr = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("inf")
    section["difference"] = {"mean": float(d.mean()), "stderr": stderr}
    return float(d.mean()) > max(SIM_TIE, 2 * stderr)


def simulator_check(t: Target, float_ir: IR, qdq_ir: IR, fit_batches, held_batches, calib_method="auto",
                    log=None, strict_ir: IR | None = None) -> dict:
    """``--target-option simulator=PYTHON`` with ``--quantize int8``: edgec's QDQ and RKNN's own
    int8 (the ``--quantize vendor`` hand-off: the float graph and the calibration dataset) are both
    built and run in RKNN-Toolkit2's simulator by the build scripts this target writes, in the
    toolkit's own Python (a separate process). ``qdq_ir`` was quantized on ``fit_batches``, and
    RKNN's dataset is those same samples; each build is scored against ``float_ir`` in ONNX
    Runtime on ``held_batches`` (at most ``SIM_SAMPLES`` of them): the mean over samples of the
    cosine of each output, the worst output. ``strict_ir``: when edgec's fallback kept ops float in
    ``qdq_ir``, the same QDQ all int8 (``--strict-int8``), built and scored too: RKNN-Toolkit2 does
    not run a QDQ model's float islands as ONNX Runtime does (on the resnet_bottleneck builder
    they took the simulator's cosine from 0.9998 all-int8 to 0.9979), so which of the two is more
    faithful is measured on the target. Returns the report section; ``chosen`` is ``"vendor"``
    when RKNN's own int8 is clearly more faithful (:func:`_clearly_better`) than edgec's better
    build or edgec's do not build, ``"edgec strict"`` when the all-int8 QDQ measured more
    faithful than the one with float islands (by more than ``SIM_TIE``), else ``"edgec"``."""
    from edgec import runtime

    log = log or (lambda s: None)
    python = str(t.options["simulator"])
    batches = list(fit_batches)
    names = [i.name for i in float_ir.inputs]
    stacked = {n: np.concatenate([b[n] for b in held_batches])[:SIM_SAMPLES] for n in names}
    count = len(next(iter(stacked.values())))
    float_model = float_ir.to_onnx()
    batch = int(float_ir.inputs[0].shape[0]) if float_ir.inputs[0].shape else 1
    sess = runtime.reference_session(float_model)
    refs = [sess.run(None, {n: stacked[n][s:s + batch] for n in names}) for s in range(0, count, batch)]
    section = {"simulator": python, "platform": t.options["platform"], "samples": count,
               "fit_samples": sum(len(next(iter(b.values()))) for b in batches),
               "scored_on": "held-out calibration samples, against the float graph in ONNX Runtime (mean cosine, "
                            "worst output)"}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgec-rknn-sim-") as td:
        td = Path(td)
        np.savez(td / "in.npz", **stacked)
        errors, samples = {}, {}  # kind -> why it failed; kind -> per-sample cosines
        builds = [("edgec", qdq_ir, True)] + ([("edgec strict", strict_ir, True)] if strict_ir is not None else [])
        for kind, ir, quantized in builds + [("vendor", float_ir, False)]:
            d = td / kind
            d.mkdir()
            out = d / "model.onnx"
            onnx.save(ir.to_onnx() if ir is not float_ir else float_model, out)
            write_build_config(t, ir, out, calib_batches=None if quantized else batches, quantized_model=quantized,
                               calib_method=calib_method)
            log(f"rknn simulator: building {LABELS[kind]}")
            try:
                proc = subprocess.run([python, str(out.with_name(out.name + ".rknn_build.py")), "--rknn",
                                       str(d / "model.rknn"), "--simulate", str(td / "in.npz"), "--outputs",
                                       str(d / "out.npz")], capture_output=True, text=True, cwd=d, timeout=SIM_TIMEOUT)
            except subprocess.TimeoutExpired:
                errors[kind] = f"the build and simulation took more than {SIM_TIMEOUT} s"
                continue
            if proc.returncode != 0 or not (d / "out.npz").exists():
                tail = [ln for ln in (proc.stdout + proc.stderr).strip().splitlines() if ln.strip()]
                errors[kind] = (tail[-1] if tail else f"exit {proc.returncode}")[:300]
                continue
            with np.load(d / "out.npz") as z:
                outs = [z[f"out_{k}"] for k in range(len(refs[0]))]
            per_sample = []
            for j, ref in enumerate(refs):
                got = [o[j * batch:(j + 1) * batch].reshape(r.shape) for o, r in zip(outs, ref)]
                per_sample.append(min(_cosine(g, r) for g, r in zip(got, ref)))
            samples[kind] = np.array(per_sample)
    cosines = {kind: float(c.mean()) for kind, c in samples.items()}
    section["seconds"] = round(time.perf_counter() - t0, 2)
    section["cosine"] = {{"edgec": "edgec QDQ", "edgec strict": "edgec QDQ all int8"}[kind]: cosines.get(kind)
                         for kind, _, _ in builds}
    section["cosine"][f"RKNN {_algorithm(t, calib_method)}/{t.options['quantized_method']}"] = cosines.get("vendor")
    if errors:
        section["errors"] = errors
    ours = "edgec" if "edgec" in cosines else "edgec strict" if "edgec strict" in cosines else None
    strict_note = ""
    if ours == "edgec" and "edgec strict" in cosines:
        if cosines["edgec strict"] > cosines["edgec"] + SIM_TIE:
            ours = "edgec strict"
            strict_note = (f"; all int8, edgec's QDQ measured more faithful than with the fallback's float ops "
                           f"({cosines['edgec strict']:.5f} against {cosines['edgec']:.5f})")
        else:
            strict_note = (f"; the fallback's float ops kept: all int8 measured {cosines['edgec strict']:.5f} "
                           f"against {cosines['edgec']:.5f}")
    if ours is None and "vendor" in cosines:
        section.update(chosen="vendor", why=f"edgec's QDQ did not build or run in RKNN-Toolkit2 ({errors['edgec']})")
    elif "vendor" in cosines and _clearly_better(samples["vendor"], samples[ours], section):
        section.update(chosen="vendor", why=(f"RKNN's own int8 measured more faithful in its simulator: cosine "
                                             f"{cosines['vendor']:.5f} against {LABELS[ours]} {cosines[ours]:.5f}, "
                                             f"more than twice the standard error of the per-sample difference"
                                             + strict_note))
    elif ours is not None:
        section.update(chosen=ours, why=(f"RKNN's own int8 not clearly more faithful in its simulator: {LABELS[ours]} "
                                         f"cosine {cosines[ours]:.5f}" + (f" against RKNN's own int8 {cosines['vendor']:.5f}"
                                                                          if "vendor" in cosines else
                                                                          f" (RKNN's own int8 failed: {errors['vendor']})")
                                         + strict_note))
    else:
        raise UserError(f"target rknn: simulator={python}: neither build ran in RKNN-Toolkit2 ("
                        + "; ".join(f"{k}: {v}" for k, v in errors.items()) + ")")
    return section


write_build_config.paths = side_paths
write_build_config.simulate = simulator_check
write_build_config.vendor_quantizer = vendor_quantizer


TARGET = Target(
    name="rknn",
    description="Rockchip rk3588 NPU (RKNN-Toolkit2 2.x)",
    min_opset=7,
    max_opset=19,
    channel_multiple=16,
    static_shapes=True,
    float_precision="fp16",
    quant=QuantScheme(activations="asymmetric", weights="per-channel", bias="int32",
                      # (on the PP-PicoDet layout detector edgec's int8 collapses, and so does RKNN's
                      # default normal/channel, while its kl_divergence/channel holds: benchmarks/rknn_vendor.py)
                      alternatives="--quantize vendor (RKNN-Toolkit2 quantizes; try --target-option "
                                   "quantized_algorithm=kl_divergence), or no --quantize (the NPU runs FP16)",
                      pointwise=("Sigmoid", "HardSwish", "HardSigmoid", "Tanh", "LeakyRelu"),
                      sibling_outputs=True,
                      # calibrated Sigmoid/HardSigmoid ranges: RKNN re-derives them on import
                      # (adjust_tanh_sigmoid), and the fixed [0, 1] range measured less faithful in its
                      # simulator (EfficientNet-style SiLU/SE: cosine 0.9961 against 0.9970 calibrated)
                      fixed_ranges=False,
                      # unclamped ranges: RKNN re-derives hard-swish parameters at optimization level 3
                      # (adjust_hardswish), and a hard-swish input clamped at -3 measured less faithful
                      # in its simulator (the MobileNetV3 builder: cosine 0.9958 against 0.9967)
                      saturation=False,
                      reason="RKNN-Toolkit2 builds this QDQ as a pre-quantized (QAT) model (do_quantization=False; "
                             "optimization_level 2 unless the net has hard-swish/hard-sigmoid). In its rk3588 simulator "
                             "(benchmarks/rknn_vendor.py) it tied or led RKNN's own int8 on MobileNetV2/ReLU6, "
                             "Inception/Concat, DenseNet/BatchNorm, ShuffleNet, EfficientNet/SiLU-SE and ConvNeXt-style "
                             "CNNs, and trailed it on: hard-swish/hard-sigmoid nets (MobileNetV3 by 0.001 cosine, the "
                             "PP-OCR DB detector by 0.005: edgec rounds a conv's output and the activation after it, RKNN "
                             "fuses them and rounds once, and RKNN 2.5.0 cannot build the QDQ without that pair), "
                             "hard-swish with sigmoid SE gates (by 0.0001) and ResNet bottlenecks (by 0.0001: edgec's plan "
                             "is less faithful there in ONNX Runtime too). For those structures --quantize vendor hands "
                             "int8 to RKNN's own quantizer"),
    options={"platform": "rk3588", "dynamic_input": "", "mean": "", "std": "", "quantized_algorithm": "",
             "quantized_method": "channel", "optimization_level": "", "simulator": ""},
    option_help={"platform": "/".join(PLATFORMS), "dynamic_input": "e.g. 1x3x224x224;4x3x224x224",
                 "quantized_algorithm": "RKNN's own int8 (--quantize vendor, or --calib alone): "
                                        "/".join(ALGORITHMS) + " (default: from --calib-method)",
                 "quantized_method": "RKNN's own int8: " + "/".join(METHODS),
                 "optimization_level": "RKNN's build optimization_level: " + "/".join(OPTIMIZATION_LEVELS)
                                       + " (default: 2 for --quantize int8 without hard-swish/hard-sigmoid, else RKNN's 3)",
                 "simulator": "a Python with rknn-toolkit2 2.x: --quantize int8 then builds edgec's QDQ and RKNN's own "
                              "int8 in its simulator and writes the more faithful (default: off)",
                 "mean": "per-channel mean the NPU subtracts, e.g. 123.7,116.3,103.5",
                 "std": "per-channel std the NPU divides by"},
    configure=_configure,
    pipeline=_pipeline,
    check=_check,
    extras=write_build_config,
)
_configure(TARGET)
