"""The command line: success paths, reports, and every user-error path (exit code, one-line
message, no output file left behind, input untouched)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest

from edgec import cli
from edgec.builders import plain_cnn, resnet_basic

from conftest import EXAMPLE


def edgec_main(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def model_path(tmp_path):
    p = tmp_path / "model.onnx"
    onnx.save(plain_cnn(), p)
    return p


def sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_compile_verify_report(capsys, tmp_path, model_path):
    before = sha(model_path)
    out, rep = tmp_path / "out.onnx", tmp_path / "report.json"
    code, stdout, err = edgec_main(capsys, "compile", model_path, "-o", out, "--verify", "--report", rep)
    assert code == 0, err
    assert sha(model_path) == before
    onnx.checker.check_model(onnx.load(out), full_check=True)
    r = json.loads(rep.read_text())
    for side in ("before", "after"):
        for key in ("params", "macs", "bytes"):
            assert isinstance(r[side][key], int)
    assert r["after"]["nodes"] < r["before"]["nodes"]
    assert r["after"]["params"] <= r["before"]["params"] and r["after"]["macs"] <= r["before"]["macs"]
    assert {p["name"] for p in r["passes"]} >= {"fold_batchnorm", "eliminate_identity", "fold_constants"}
    assert all({"name", "changed", "seconds"} <= set(p) for p in r["passes"])
    assert r["verify"]["max_abs_error"] < 1e-4 and "max_rel_error" in r["verify"]
    assert "verify" in stdout and "OK" in stdout and "params" in stdout
    assert not list(tmp_path.glob(".*.tmp"))


def test_compile_json_and_passes_option(capsys, tmp_path, model_path):
    out = tmp_path / "out.onnx"
    code, stdout, _ = edgec_main(capsys, "compile", model_path, "-o", out, "--passes",
                                 "eliminate_identity,eliminate_dead", "--json")
    assert code == 0
    r = json.loads(stdout)
    assert [p["name"] for p in r["passes"]] == ["eliminate_identity", "eliminate_dead"]
    ops = [n.op_type for n in onnx.load(out).graph.node]
    assert "Identity" not in ops and "BatchNormalization" in ops


def test_inspect_text_and_json(capsys, model_path):
    code, stdout, _ = edgec_main(capsys, "inspect", model_path)
    assert code == 0 and "Conv" in stdout and "MACs" in stdout and "largest layers" in stdout
    code, stdout, _ = edgec_main(capsys, "inspect", model_path, "--json")
    info = json.loads(stdout)
    assert info["opset"] == 17 and info["inputs"][0]["shape"] == [1, 3, 16, 16]
    assert info["op_histogram"]["Conv"] == 3 and info["macs"] > 0 and info["peak_activation_bytes"] > 0


def test_passes_and_targets_listing(capsys):
    code, stdout, _ = edgec_main(capsys, "passes")
    assert code == 0 and "fold_batchnorm" in stdout and len(stdout.splitlines()) >= 9
    code, stdout, _ = edgec_main(capsys, "targets")
    assert code == 0 and "cpu" in stdout


def test_given_inputs_are_used(capsys, tmp_path, model_path):
    inputs = tmp_path / "in.npz"
    np.savez(inputs, input=np.random.default_rng(1).normal(size=(1, 3, 16, 16)).astype(np.float32))
    code, stdout, err = edgec_main(capsys, "compile", model_path, "-o", tmp_path / "o.onnx", "--verify",
                                   "--inputs", inputs, "--json")
    assert code == 0, err
    assert json.loads(stdout)["verify"]["inputs"] == "given"


def garbage(tmp_path, name, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return p


@pytest.mark.parametrize("make_input,message", [
    (lambda t: t / "missing.onnx", "no such file"),
    (lambda t: t, "is a directory"),
    (lambda t: garbage(t, "empty.onnx", b""), "empty"),
    (lambda t: garbage(t, "text.onnx", b"hello, this is not a model\n" * 10), "not an ONNX model"),
    (lambda t: garbage(t, "trunc.onnx", resnet_basic().SerializeToString()[:5000]), "not an ONNX model"),
])
def test_unreadable_inputs(capsys, tmp_path, make_input, message):
    src = make_input(tmp_path)
    out = tmp_path / "out.onnx"
    code, stdout, err = edgec_main(capsys, "compile", src, "-o", out)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_unsupported_opset(capsys, tmp_path, model_path):
    m = onnx.load(model_path)
    m.opset_import[0].version = 99
    src = tmp_path / "new.onnx"
    onnx.save(m, src)
    code, _, err = edgec_main(capsys, "compile", src, "-o", tmp_path / "o.onnx")
    assert code == 2 and "opset 99 is not supported" in err
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("args,message", [
    (["--passes", "fold_everything"], "unknown pass 'fold_everything'"),
    (["--passes", ","], "--passes is empty"),
    (["-t", "tpu"], "unknown target 'tpu'"),
])
def test_bad_options(capsys, tmp_path, model_path, args, message):
    out = tmp_path / "o.onnx"
    code, _, err = edgec_main(capsys, "compile", model_path, "-o", out, *args)
    assert code == 2 and message in err and "Traceback" not in err
    assert not out.exists()


def test_output_equal_to_input_is_refused(capsys, model_path):
    before = sha(model_path)
    code, _, err = edgec_main(capsys, "compile", model_path, "-o", model_path)
    assert code == 2 and "is the input model" in err
    assert sha(model_path) == before


@pytest.mark.parametrize("where,message", [
    (lambda t: t / "nodir" / "o.onnx", "does not exist"),
    (lambda t: t, "is a directory"),
    (lambda t: "/proc/edgec-test/o.onnx", "does not exist"),
])
def test_unwritable_outputs(capsys, tmp_path, model_path, where, message):
    code, _, err = edgec_main(capsys, "compile", model_path, "-o", where(tmp_path))
    assert code == 2 and message in err


def test_write_failure_is_a_user_error_and_leaves_nothing(capsys, tmp_path, model_path):
    # /proc exists and is a directory, but no file can be created in it (even as root).
    code, _, err = edgec_main(capsys, "compile", model_path, "-o", "/proc/edgec-out.onnx")
    assert code == 2 and "cannot write" in err


@pytest.mark.parametrize("payload,message", [
    ({"input": np.zeros((1, 3, 8, 8), np.float32)}, "has shape [1, 3, 8, 8], the model expects [1, 3, 16, 16]"),
    ({"image": np.zeros((1, 3, 16, 16), np.float32)}, "missing input 'input'"),
    ({"input": np.zeros((1, 3, 16, 16), np.int32)}, "has dtype int32"),
])
def test_inputs_that_do_not_match(capsys, tmp_path, model_path, payload, message):
    inputs = tmp_path / "in.npz"
    np.savez(inputs, **payload)
    out = tmp_path / "o.onnx"
    code, _, err = edgec_main(capsys, "compile", model_path, "-o", out, "--verify", "--inputs", inputs)
    assert code == 2 and message in err
    assert not out.exists()


def test_internal_failure_names_the_pass(capsys, tmp_path, model_path, monkeypatch):
    from edgec import pipeline
    from edgec.passes import fold_batchnorm

    def boom(self, ir, ctx):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(fold_batchnorm.FoldBatchNorm, "run", boom)
    out = tmp_path / "o.onnx"
    code, _, err = edgec_main(capsys, "compile", model_path, "-o", out)
    assert code == 1 and "fold_batchnorm" in err and "kaboom" in err
    assert not out.exists()
    del pipeline


def test_verification_failure_exits_1_and_writes_nothing(capsys, tmp_path, model_path, monkeypatch):
    """A rewrite that changes numerics is caught by --verify."""
    from edgec.passes import fold_conv_affine

    original = fold_conv_affine.FoldConvAffine.run

    def wrong(self, ir, ctx):
        result = original(self, ir, ctx)
        for c in ir.constants():
            if "_affine_b" in c.name:
                c.values = c.values + 1.0  # break it on purpose
        return result

    monkeypatch.setattr(fold_conv_affine.FoldConvAffine, "run", wrong)
    out = tmp_path / "o.onnx"
    code, _, err = edgec_main(capsys, "compile", model_path, "-o", out, "--verify")
    assert code == 1 and "differs from the original" in err
    assert re.search(r"output '[^']+' at \[[0-9, ]+\] is \S+ against \S+ \(allowed difference", err), err
    assert not out.exists()


def test_console_script_runs_the_example(tmp_path):
    """The README's first command, through the installed `edgec` entry point."""
    out = tmp_path / "digits.onnx"
    proc = subprocess.run([sys.executable, "-m", "edgec.cli", "compile", str(EXAMPLE / "model.onnx"), "-o", str(out),
                           "--verify", "--eval", str(EXAMPLE / "eval.npz")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "accuracy" in proc.stdout and out.exists()


def test_passes_command_lists_the_built_in_passes_in_a_fresh_process():
    """`edgec passes` in its own process: the registry fills when the passes are imported, and
    this command path imported none (an internal error on an empty registry; `--json` printed [])."""
    for extra in ([], ["--json"]):
        proc = subprocess.run([sys.executable, "-m", "edgec.cli", "passes", *extra], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert "fold_batchnorm" in proc.stdout and "prune_channels" in proc.stdout, proc.stdout


def test_calibration_from_an_image_folder_with_preprocessing(capsys, tmp_path):
    """What edge teams have: a folder of images plus the model's preprocessing (here the digits'
    8-bit grayscale PGMs, /255 then (x - mean) / std)."""
    meta = json.loads((EXAMPLE / "metadata.json").read_text())
    with np.load(EXAMPLE / "calib.npz") as z:
        x = z["input"][:48]
    pixels = np.clip(np.round((x[:, 0] * meta["std"] + meta["mean"]) * 255), 0, 255).astype(np.uint8)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, img in enumerate(pixels):
        (folder / f"{i:03d}.pgm").write_bytes(b"P5 8 8 255\n" + img.tobytes())
    out = tmp_path / "q.onnx"
    code, stdout, err = edgec_main(capsys, "compile", EXAMPLE / "model.onnx", "-o", out, "--quantize", "int8",
                                   "--calib", folder, "--image-channels", "GRAY", "--image-mean", meta["mean"],
                                   "--image-std", meta["std"], "--eval", EXAMPLE / "eval.npz", "--json")
    assert code == 0, err
    acc = json.loads(stdout)["accuracy"]
    assert acc["after"] >= acc["before"] - 0.01
    code, _, err = edgec_main(capsys, "compile", EXAMPLE / "model.onnx", "-o", out, "--quantize", "int8",
                              "--calib", folder, "--image-size", "eight")
    assert code == 2 and "bad image size" in err


def test_wanda_importance_prunes_from_the_cli_and_needs_calibration(tmp_path, capsys):
    """--importance wanda (activation RMS x downstream weight norm) is reachable from the CLI;
    without --calib it is a one-line user error, exit 2."""
    model = EXAMPLE / "model.onnx"
    calib = EXAMPLE / "calib.npz"
    rc = cli.main(["compile", str(model), "-o", str(tmp_path / "w.onnx"), "--prune", "0.3", "--round-to", "1",
                   "--importance", "wanda", "--calib", str(calib), "--report", str(tmp_path / "r.json")])
    assert rc == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["pruning"]["importance"] == "wanda" and rep["after"]["params"] < rep["before"]["params"]
    rc = cli.main(["compile", str(model), "-o", str(tmp_path / "x.onnx"), "--prune", "0.3", "--importance", "wanda"])
    err = capsys.readouterr().err
    assert rc == 2 and "--importance wanda needs calibration data" in err and "Traceback" not in err
    assert not (tmp_path / "x.onnx").exists()
