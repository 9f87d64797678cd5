"""Host-independent numerics: decisions in reference arithmetic, the deployment ISA, determinism.

What is asserted here is measured in edgec's reference executor (ONNX Runtime with
optimisations off, exact QDQ semantics); the build host's fused kernels never decide anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import edgec
from edgec import runtime
from edgec.backends import get_target
from edgec.builders import ALL_MODELS

from conftest import EXAMPLE, ROOT

CALIB = str(EXAMPLE / "calib.npz")
MODEL = str(EXAMPLE / "model.onnx")


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# ------------------------------------------------------------------ the deployment ISA
@pytest.mark.parametrize("isa, weight_type", [("avx2", "uint8"), ("avx512", "uint8"), ("vnni", "int8"),
                                              ("amx", "int8")])
def test_cpu_scheme_follows_the_isa(isa, weight_type):
    t = get_target("cpu", {"isa": isa})
    assert t.quant.weight_type == weight_type and t.quant.isa == isa
    assert t.quant.activations == "asymmetric" and t.quant.reason


def test_cpu_default_is_exact_on_every_x86_cpu():
    t = get_target("cpu")
    assert t.options["isa"] == "avx2" and t.quant.weight_type == "uint8"


def test_cpu_scheme_option_and_refusals():
    assert get_target("cpu", {"scheme": "u8s7"}).quant.weight_type == "int7"
    assert get_target("cpu", {"isa": "vnni", "scheme": "u8s7"}).quant.weight_type == "int7"
    with pytest.raises(edgec.UserError, match="saturates on isa=avx2"):
        get_target("cpu", {"isa": "avx2", "scheme": "u8s8"})
    with pytest.raises(edgec.UserError, match="isa=sse4 is not known"):
        get_target("cpu", {"isa": "sse4"})
    with pytest.raises(edgec.UserError, match="scheme=s8s8 is not known"):
        get_target("cpu", {"scheme": "s8s8"})


def test_isa_auto_is_the_build_host(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setattr(runtime.platform, "machine", lambda: "x86_64")
    assert get_target("cpu", {"isa": "auto"}).quant.isa == "avx2"
    assert get_target("cpu", {"isa": "auto"}).quant.weight_type == "uint8"
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2", "avx512bw", "avx512vnni"})
    assert get_target("cpu", {"isa": "auto"}).quant.weight_type == "int8"
    monkeypatch.setattr(runtime.platform, "machine", lambda: "aarch64")
    with pytest.raises(edgec.UserError, match="not an x86-64 CPU"):
        get_target("cpu", {"isa": "auto"})


@pytest.mark.parametrize("flags, isa", [({"avx2"}, "avx2"), ({"avx2", "avx512bw"}, "avx512"),
                                        ({"avx2", "avx_vnni"}, "vnni"), ({"avx512bw", "avx512vnni"}, "vnni"),
                                        ({"avx512bw", "avx512vnni", "amx_int8"}, "amx"), ({"sse4_2"}, "sse")])
def test_host_isa_from_flags(flags, isa):
    assert runtime.host_isa(flags, "x86_64") == isa


def test_neon_isa_option():
    for isa in ("dotprod", "i8mm", "armv8"):
        t = get_target("neon", {"isa": isa})
        assert t.quant.weight_type == "int8" and t.quant.activations == "symmetric" and t.quant.isa == isa
    with pytest.raises(edgec.UserError, match="not the ARM device"):
        get_target("neon", {"isa": "auto"})


def test_targets_command_shows_the_isa_option(capsys):
    from edgec.cli import main

    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    assert "--target-option isa=avx2" in out and "--target-option isa=dotprod" in out
    assert main(["targets", "--json"]) == 0
    cpu = next(t for t in json.loads(capsys.readouterr().out) if t["name"] == "cpu")
    assert cpu["options"]["isa"]["default"] == "avx2" and cpu["int8"]["weight_type"] == "uint8"


# ------------------------------------------------------------------ no pair can saturate
def _weights_of_gemm_path_layers(model: onnx.ModelProto):
    """(op, is_depthwise, int weight array) for every quantized weighted layer."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    for n in model.graph.node:
        if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in dq:
            w = inits[dq[n.input[1]].input[0]]
            group = next((a.i for a in n.attribute if a.name == "group"), 1)
            yield n.op_type, group > 1 and w.shape[1] == 1 and w.shape[0] == group, w


@pytest.mark.parametrize("name", ["mobilenet_v2", "transformer_encoder", "flatten_gemm_head", "densenet"])
@pytest.mark.parametrize("scheme", ["auto", "u8s7"])
def test_no_vnni_schemes_cannot_saturate_an_int16_pair(name, scheme):
    """On isa=avx2 every GEMM-path layer has uint8 weights (U8U8 kernels add in int32) or int8
    weights within [-63, 63] (two uint8 x int8 products < 2^15); depthwise convs (kernels that
    widen first) may use the full int8 range."""
    model = ALL_MODELS[name](batch=2)
    out = edgec.compile(model, None, quantize="int8", calib="random", calib_samples=8,
                        target_options={"scheme": scheme}).model
    layers = list(_weights_of_gemm_path_layers(out))
    assert layers
    for op, depthwise, w in layers:
        if depthwise:
            assert w.dtype == np.int8
            continue
        if scheme == "auto":
            assert w.dtype == np.uint8, op
        else:
            assert w.dtype == np.int8 and 2 * 255 * int(np.abs(w.astype(np.int32)).max()) < 2 ** 15, op


def test_vnni_scheme_uses_full_range_int8_weights():
    model = ALL_MODELS["resnet_basic"](batch=2)
    out = edgec.compile(model, None, quantize="int8", calib="random", calib_samples=8,
                        target_options={"isa": "vnni"}).model
    ws = [w for _, _, w in _weights_of_gemm_path_layers(out)]
    assert ws and all(w.dtype == np.int8 for w in ws) and max(int(np.abs(w.astype(np.int32)).max()) for w in ws) == 127


# ------------------------------------------------------------------ determinism
def test_two_compiles_give_identical_bytes(tmp_path):
    for opts in (dict(quantize="int8"), dict(quantize="mixed", max_error=0.02)):
        a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
        edgec.compile(MODEL, a, calib=CALIB, **opts)
        edgec.compile(MODEL, b, calib=CALIB, **opts)
        assert _sha(a) == _sha(b), opts


def test_host_kernels_on_or_off_change_no_output_byte(tmp_path, monkeypatch):
    """The host's fused integer kernels are used for --verify's host line and --bench only:
    forcing them off (every session unoptimised) must not change a byte of what is written."""
    shas = {}
    for mode in ("on", "off"):
        monkeypatch.setenv(runtime.HOST_KERNELS_ENV, mode)
        for name, opts in {"int8": dict(quantize="int8"), "mixed": dict(quantize="mixed", max_error=0.02),
                           "mobilenet": dict(quantize="int8")}.items():
            src = MODEL if name != "mobilenet" else ALL_MODELS["mobilenet_v2"](batch=2)
            calib = CALIB if name != "mobilenet" else "random"
            out = tmp_path / f"{name}.{mode}.onnx"
            r = edgec.compile(src, out, calib=calib, verify=True, bench=True, calib_samples=32, **opts)
            assert "host" in r.report["verify"]
            shas[name, mode] = _sha(out)
    for name in ("int8", "mixed", "mobilenet"):
        assert shas[name, "on"] == shas[name, "off"], name


def test_verify_reports_reference_and_host_lines(tmp_path):
    r = edgec.compile(MODEL, tmp_path / "q.onnx", calib=CALIB, quantize="int8", verify=True,
                      eval_data=str(EXAMPLE / "eval.npz"))
    v = r.report["verify"]
    assert v["arithmetic"] == "reference" and v["passed"]
    assert v["host"]["host"].startswith(runtime.host_isa())
    # the default scheme cannot saturate, so this host's kernels agree with the reference
    assert abs(v["host"]["rel_l2"] - v["rel_l2"]) < 0.1 * v["rel_l2"]
    assert r.report["target_profile"]["int8"]["isa"] == "avx2"
    assert r.report["build_host"].startswith(runtime.host_isa())
    assert r.report["quantization"]["error"]["sqnr_db"] > 30


# ------------------------------------------------------------------ an AVX2-only CPU, emulated
def _qemu():
    return shutil.which("qemu-x86_64")


@pytest.mark.slow
@pytest.mark.skipif(not _qemu() or platform.machine() != "x86_64",
                    reason="needs an x86-64 host and qemu-x86_64 (Debian qemu-user; .ci/run installs it)")
def test_an_avx2_only_host_builds_the_same_bytes_and_runs_them_exactly(tmp_path):
    """The example compiled under QEMU's Haswell CPU (AVX2, no AVX-512, no VNNI: ONNX Runtime
    picks its saturating U8S8 kernels there) and natively: the same bytes, and on the AVX2
    host's own kernels the default model keeps its reference accuracy (>= 30 dB). (Two to
    four minutes: the emulator runs ONNX Runtime's vector kernels some 300x slower.)"""
    script = str(ROOT / "tests" / "emulated_host.py")
    python = os.path.realpath(sys.executable)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    native = subprocess.run([python, script, str(tmp_path / "native")], capture_output=True, text=True, env=env)
    assert native.returncode == 0, native.stderr[-2000:]
    emu = subprocess.run([_qemu(), "-cpu", "Haswell-noTSX", python, script, str(tmp_path / "avx2")],
                         capture_output=True, text=True, env=env, timeout=1500)
    assert emu.returncode == 0, emu.stderr[-2000:]
    a, b = json.loads(native.stdout.splitlines()[-1]), json.loads(emu.stdout.splitlines()[-1])
    print(f"\nnative {a['host_isa']}: {a['models']}\nemulated {b['host_isa']}: {b['models']}")
    assert b["host_isa"] == "avx2"
    for name in a["models"]:
        assert a["models"][name]["sha256"] == b["models"][name]["sha256"], name
        assert a["models"][name]["reference_sqnr_db"] == b["models"][name]["reference_sqnr_db"], name
    d = b["models"]["default"]
    assert d["host_sqnr_db"] >= 30 and abs(d["host_sqnr_db"] - d["reference_sqnr_db"]) < 0.5
    # the premise: this emulated CPU really saturates U8S8 (the isa=vnni model loses > 6 dB on it)
    v = b["models"]["vnni"]
    assert v["host_sqnr_db"] < v["reference_sqnr_db"] - 6
