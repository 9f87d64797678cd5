"""The CLI contract on hostile input and faults (issue 9): every class of defect the bad-input
corpus found, as a regression test, plus a hypothesis test that mutates valid models and option
sets and checks the contract on each.

The contract (README, "What edgec promises"): exit 0 on success; exit 2 with exactly one stderr
line and no traceback for a user mistake; exit 1 for an internal failure or a failed check; the
input is never modified; outputs are written all or none, through temporary files that never
stay behind; memory stays bounded.
"""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import stat
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto as T, helper, numpy_helper

import edgec
from edgec import cli, runtime
from edgec.builders import plain_cnn, resnet_basic
from edgec.errors import EdgecError, UserError

RNG = np.random.default_rng(0)
X = RNG.standard_normal((8, 3, 16, 16)).astype(np.float32)


# ---------------------------------------------------------------------------------- helpers
def vi(name, dt=T.FLOAT, shape=(1, 4)):
    return helper.make_tensor_value_info(name, dt, list(shape) if shape is not None else None)


def make(nodes, inputs, outputs, inits=(), opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def tiny():
    w = numpy_helper.from_array(np.arange(4, dtype=np.float32).reshape(1, 4), "w")
    return make([helper.make_node("Add", ["x", "w"], ["a"], name="add"), helper.make_node("Relu", ["a"], ["y"])],
                [vi("x")], [vi("y")], [w])


def snapshot(folder: Path) -> dict:
    out = {}
    for p in sorted(folder.rglob("*")):
        st_ = os.lstat(p)
        key = str(p.relative_to(folder))
        if stat.S_ISREG(st_.st_mode):
            out[key] = (hashlib.sha256(p.read_bytes()).hexdigest(), stat.S_IMODE(st_.st_mode))
        else:
            out[key] = (stat.S_IFMT(st_.st_mode),)
    return out


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code, err, *needles):
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("edgec: error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


def assert_refused(capsys, folder: Path, argv, *needles):
    """exit 2, one line, and the folder exactly as before (input untouched, nothing written)."""
    before = snapshot(folder)
    code, _, err = run_cli(capsys, *argv)
    assert_user_error(code, err, *needles)
    assert snapshot(folder) == before
    return err


@pytest.fixture
def cnn(tmp_path):
    p = tmp_path / "model.onnx"
    onnx.save(plain_cnn(), p)
    return p


# ---------------------------------------------------------------------------------- High: silent wrong models
def _nan(a, where=(0, 0, 0, 0)):
    a = a.copy()
    a[where] = np.nan
    return a


@pytest.mark.parametrize("data,needle", [
    (_nan(X), "NaN or infinite"),
    (np.full_like(X, np.nan), "NaN or infinite"),
    (np.where(X > 2, np.inf, X).astype(np.float32), "NaN or infinite"),
    (np.zeros_like(X), "constant"),
    (np.full_like(X, 0.5), "constant"),
])
def test_nan_inf_and_constant_calibration_data_are_refused(capsys, tmp_path, cnn, data, needle):
    np.savez(tmp_path / "calib.npz", input=data)
    assert_refused(capsys, tmp_path, ["compile", cnn, "-o", tmp_path / "q.onnx", "--quantize", "int8",
                                      "--calib", tmp_path / "calib.npz", "--report", tmp_path / "r.json"], needle)


def test_nan_in_a_later_calibration_batch_and_when_pruning(capsys, tmp_path, cnn):
    data = np.concatenate([X] * 6)  # 48 samples: the NaN is in the second batch of 32
    data[40, 1, 2, 3] = np.nan
    np.save(tmp_path / "calib.npy", data)
    for extra in (["--quantize", "int8"], ["--prune", "0.3"]):
        assert_refused(capsys, tmp_path, ["compile", cnn, "-o", tmp_path / "o.onnx", "--calib", tmp_path / "calib.npy",
                                          *extra], "NaN")


@pytest.mark.parametrize("opt,value", [("--image-std", "0"), ("--image-std", "nan"), ("--image-std", "-1"),
                                       ("--image-mean", "inf"), ("--image-scale", "0"), ("--image-scale", "nan"),
                                       ("--image-size", "100000x100000")])
def test_image_preprocessing_that_makes_nan_or_absurd_sizes_is_refused(capsys, tmp_path, cnn, opt, value):
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        px = RNG.integers(0, 256, (20, 20, 3), dtype=np.uint8)
        (tmp_path / "imgs" / f"{i}.ppm").write_bytes(b"P6 20 20 255\n" + px.tobytes())
    assert_refused(capsys, tmp_path, ["compile", cnn, "-o", tmp_path / "q.onnx", "--quantize", "int8",
                                      "--calib", tmp_path / "imgs", opt, value], opt if opt != "--image-size" else "size")


def test_nan_in_inputs_and_eval_data_is_refused(capsys, tmp_path, cnn):
    np.savez(tmp_path / "in.npz", input=_nan(X[:1]))
    assert_refused(capsys, tmp_path, ["compile", cnn, "-o", tmp_path / "o.onnx", "--verify", "--inputs",
                                      tmp_path / "in.npz"], "NaN")
    np.savez(tmp_path / "ev.npz", input=_nan(X[:1]), labels=np.zeros(1, np.int64))
    assert_refused(capsys, tmp_path, ["compile", cnn, "-o", tmp_path / "o.onnx", "--eval", tmp_path / "ev.npz"], "NaN")


@pytest.mark.parametrize("report,output", [("model.onnx", "out.onnx"), ("out.onnx", "out.onnx"),
                                           ("./out.onnx", "out.onnx"), ("rd", "out.onnx")])
def test_report_never_replaces_the_input_or_the_model(capsys, tmp_path, cnn, report, output, monkeypatch):
    (tmp_path / "rd").mkdir()
    monkeypatch.chdir(tmp_path)
    assert_refused(capsys, tmp_path, ["compile", "model.onnx", "-o", output, "--report", report])


@pytest.mark.parametrize("target,side,extra", [
    ("jetson", ".trtexec.txt", []),
    ("rknn", ".rknn.json", ["--input-shape", "input=1,3,16,16"]),
])
def test_target_side_files_never_replace_the_input(capsys, tmp_path, target, side, extra):
    src = tmp_path / f"out.onnx{side}"
    onnx.save(plain_cnn(), src)
    assert_refused(capsys, tmp_path, ["compile", src, "-o", tmp_path / "out.onnx", "-t", target, *extra], "input")


def test_rknn_dataset_folder_checks(capsys, tmp_path, cnn):
    rknn = ["-t", "rknn", "--input-shape", "input=1,3,16,16", "--calib", "random"]
    out = tmp_path / "out.onnx"
    ds = tmp_path / "out.onnx.dataset"
    ds.write_text("a file where the dataset folder goes")
    assert_refused(capsys, tmp_path, ["compile", cnn, "-o", out, *rknn], "folder")
    ds.unlink()
    ds.mkdir()
    (ds / "precious.txt").write_text("not edgec's")
    assert_refused(capsys, tmp_path, ["compile", cnn, "-o", out, *rknn], "did not write")
    (ds / "precious.txt").unlink()
    code, _, err = run_cli(capsys, "compile", cnn, "-o", out, *rknn, "-q")
    assert code == 0, err
    first = sorted(p.name for p in ds.iterdir())
    assert "dataset.txt" in first and all(str(ds) in line for line in (ds / "dataset.txt").read_text().split())
    code, _, err = run_cli(capsys, "compile", cnn, "-o", out, *rknn, "-q", "--calib-samples", "2")
    assert code == 0, err  # edgec's own dataset folder is replaced as a whole
    assert sorted(p.name for p in ds.iterdir()) == ["00000_0.npy", "00001_0.npy", "dataset.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_late_failures_leave_nothing_behind(capsys, tmp_path, cnn):
    """A failed budget after an rknn compile: no model, no side files, no report (all or none)."""
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, "compile", cnn, "-o", tmp_path / "o.onnx", "-t", "rknn", "--input-shape",
                           "input=1,3,16,16", "--calib", "random", "--quantize", "int8", "--max-error", "1e-9",
                           "--report", tmp_path / "r.json")
    assert code == 1 and "--max-error" in err and "Traceback" not in err
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------- Medium: dtypes
DTYPES = ["BFLOAT16", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "INT4", "UINT4", "STRING"]


def dtype_model(dt: int, constant_node: bool = False) -> onnx.ModelProto:
    if dt == T.STRING:  # strings in and out, a string constant joined on
        w = helper.make_tensor("w", T.STRING, [2], [b"a", b"bb"])
        return make([helper.make_node("Concat", ["x", "w"], ["y"], axis=0)], [vi("x", T.STRING, (2,))],
                    [vi("y", T.STRING, (4,))], [w], opset=21)
    vals = [1, -2, 3, 4] if dt == T.INT4 else [1, 2, 3, 4] if dt == T.UINT4 else [0.5, 1.0, 1.5, 2.0]
    w = helper.make_tensor("w", dt, [4], vals)
    nodes = [helper.make_node("Cast", ["w"], ["wf"], to=T.FLOAT), helper.make_node("Add", ["x", "wf"], ["a"]),
             helper.make_node("Relu", ["a"], ["y"])]
    if constant_node:
        nodes.insert(0, helper.make_node("Constant", [], ["w"], value=w))
        return make(nodes, [vi("x", shape=(4,))], [vi("y", shape=(4,))], opset=21)
    return make(nodes, [vi("x", shape=(4,))], [vi("y", shape=(4,))], [w], opset=21)


@pytest.mark.parametrize("name", DTYPES)
def test_tensors_numpy_cannot_hold_are_carried_through_untouched(capsys, tmp_path, name):
    m = dtype_model(getattr(T, name))
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(m, src)
    if name == "STRING":  # string outputs cannot be compared numerically: said up front
        code, _, err = run_cli(capsys, "compile", src, "-o", out, "--verify")
        assert_user_error(code, err, "STRING tensor")
    code, _, err = run_cli(capsys, "compile", src, "-o", out, *(["--verify"] if name != "STRING" else []), "-q")
    assert code == 0, err
    got = {t.name: t for t in onnx.load(out).graph.initializer}
    assert got["w"].SerializeToString() == m.graph.initializer[0].SerializeToString()
    code, stdout, err = run_cli(capsys, "inspect", src)
    assert code == 0 and "params" in stdout, err
    if name != "STRING":  # the same tensor as a Constant node's value
        r = edgec.compile(dtype_model(getattr(T, name), constant_node=True), verify=True)
        value = next(a.t for n in r.model.graph.node if n.op_type == "Constant" for a in n.attribute)
        assert value.data_type == getattr(T, name) and list(value.dims) == [4]


def test_int4_weights_behind_dequantize_compile_for_every_cpu_target():
    wq = helper.make_tensor("wq", T.INT4, [4, 2], [1, -2, 3, -4, 5, -6, 7, -8])
    s = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    m = make([helper.make_node("DequantizeLinear", ["wq", "s"], ["w"]), helper.make_node("MatMul", ["x", "w"], ["y"])],
             [vi("x")], [vi("y", shape=(1, 2))], [wq, s], opset=21)
    for target in ("cpu", "neon"):
        r = edgec.compile(m, target=target, verify=True)
        assert r.report["verify"]["passed"]
        assert any(t.data_type == T.INT4 for t in r.model.graph.initializer)


# ---------------------------------------------------------------------------------- Medium: invalid graphs
def _two_producers():
    return make([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Sigmoid", ["x"], ["a"]),
                 helper.make_node("Identity", ["a"], ["y"])], [vi("x")], [vi("y")])


def _cycle():
    return make([helper.make_node("Add", ["x", "b"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
                 helper.make_node("Identity", ["a"], ["y"])], [vi("x")], [vi("y")])


def _with(mutate):
    m = tiny()
    mutate(m)
    return m


def _dims(t, dims):
    del t.dims[:]
    t.dims.extend(dims)


INVALID = {
    "two producers": (_two_producers, "single static assignment"),
    "cycle": (_cycle, "cycle"),
    "undefined input": (lambda: make([helper.make_node("Add", ["x", "ghost"], ["y"])], [vi("x")], [vi("y")]),
                        "'ghost', which no node"),
    "undefined output": (lambda: make([helper.make_node("Relu", ["x"], ["a"])], [vi("x")], [vi("y"), vi("a")]),
                         "graph output 'y' is not produced"),
    "empty op type": (lambda: make([helper.make_node("", ["x"], ["y"])], [vi("x")], [vi("y")]), "empty op type"),
    "data size": (lambda: _with(lambda m: setattr(m.graph.initializer[0], "raw_data", b"\0" * 8)),
                  "holds 8 bytes of data"),
    "huge dims": (lambda: _with(lambda m: _dims(m.graph.initializer[0], [1 << 40, 1 << 20])), "need"),
    "negative dims": (lambda: _with(lambda m: _dims(m.graph.initializer[0], [-1, 4])), "negative dimension"),
    "negative input dim": (lambda: _with(lambda m: setattr(m.graph.input[0].type.tensor_type.shape.dim[1],
                                                           "dim_value", -4)), "negative dimension"),
    "duplicate initializer": (lambda: _with(lambda m: m.graph.initializer.append(
        numpy_helper.from_array(np.zeros((1, 4), np.float32), "w"))), "listed twice"),
    "node writes an input": (lambda: make([helper.make_node("Relu", ["x"], ["x"])], [vi("x")], [vi("x")]),
                             "single static assignment"),
    "sequence input": (lambda: make([helper.make_node("SequenceAt", ["s", "i"], ["y"])],
                                    [helper.make_tensor_sequence_value_info("s", T.FLOAT, [1, 4]), vi("i", T.INT64, ())],
                                    [vi("y")]), "not a tensor"),
    "missing attribute (checker)": (lambda: make([helper.make_node("Cast", ["x"], ["y"])], [vi("x")], [vi("y")]),
                                    "not a valid ONNX model"),
}


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_graphs_are_user_errors_at_load(capsys, tmp_path, name):
    build, needle = INVALID[name]
    src = tmp_path / "bad.onnx"
    src.write_bytes(build().SerializeToString())
    assert_refused(capsys, tmp_path, ["compile", src, "-o", tmp_path / "o.onnx"], needle)
    assert_refused(capsys, tmp_path, ["inspect", src], needle)
    with pytest.raises(UserError, match="|".join([needle.replace("(", r"\(").replace(")", r"\)")])):
        edgec.compile(build())
    with pytest.raises(UserError):
        edgec.inspect(build())


def test_short_external_data_is_refused(capsys, tmp_path):
    m = tiny()
    t = m.graph.initializer[0]
    raw = t.raw_data
    t.ClearField("raw_data")
    t.data_location = T.EXTERNAL
    e = t.external_data.add()
    e.key, e.value = "location", "w.bin"
    (tmp_path / "w.bin").write_bytes(raw[:6])
    src = tmp_path / "m.onnx"
    src.write_bytes(m.SerializeToString())
    assert_refused(capsys, tmp_path, ["compile", src, "-o", tmp_path / "o.onnx"], "truncated external data")


def test_nodes_out_of_order_are_sorted_and_the_callers_proto_is_untouched():
    m = tiny()
    nodes = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(reversed(nodes))
    before = m.SerializeToString()
    r = edgec.compile(m, verify=True)
    assert r.report["verify"]["passed"] and m.SerializeToString() == before


def test_stale_declared_shapes_are_not_invalid():
    """ONNX Runtime runs models whose value_info or output shapes are stale (exporters leave
    them); edgec re-infers shapes, so the checker's strict mode must not refuse them. Types
    must still agree."""
    m = tiny()
    m.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 7
    m.graph.value_info.append(helper.make_tensor_value_info("a", T.FLOAT, [5, 5]))
    r = edgec.compile(m, verify=True)
    assert [d.dim_value for d in r.model.graph.output[0].type.tensor_type.shape.dim] == [1, 4]
    m.graph.value_info[0].type.tensor_type.elem_type = T.INT64
    with pytest.raises(UserError, match="not a valid ONNX model"):
        edgec.compile(m)


def test_nan_in_the_original_models_outputs_is_not_a_failed_rewrite(capsys, tmp_path):
    m = tiny()
    m.graph.initializer[0].raw_data = np.array([[0, np.nan, 2, 3]], np.float32).tobytes()
    onnx.save(m, tmp_path / "m.onnx")
    assert_refused(capsys, tmp_path, ["compile", tmp_path / "m.onnx", "-o", tmp_path / "o.onnx", "--verify"],
                   "holds NaN")
    code, _, err = run_cli(capsys, "compile", tmp_path / "m.onnx", "-o", tmp_path / "o.onnx", "-q")
    assert code == 0, err  # without --verify the model compiles: NaN weights are carried as they are


# ---------------------------------------------------------------------------------- Medium: memory bombs
def _cos_model(n=16384):
    a = numpy_helper.from_array(np.array([n], np.int64), "a")
    nodes = [helper.make_node("Concat", ["a", "a"], ["shape"], axis=0),
             helper.make_node("ConstantOfShape", ["shape"], ["big"],
                              value=numpy_helper.from_array(np.array([1.0], np.float32))),
             helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
             helper.make_node("Add", ["x", "s"], ["y"])]
    return make(nodes, [vi("x", shape=(1,))], [vi("y", shape=(1,))], [a])


def test_size_cap_applies_before_constant_folding_evaluates(monkeypatch):
    """A 300-byte model whose ConstantOfShape takes a computed shape (1 GiB if built)."""
    from edgec.passes import fold_constants

    evaluated = []
    real = fold_constants._run_subgraph
    monkeypatch.setattr(fold_constants, "_run_subgraph",
                        lambda ir, nodes, *a, **k: (evaluated.extend(n.op for n in nodes), real(ir, nodes, *a, **k))[1])
    m = _cos_model()
    assert m.ByteSize() < 400
    r = edgec.compile(m)
    assert "ConstantOfShape" not in evaluated and "ReduceSum" not in evaluated
    assert "ConstantOfShape" in [n.op_type for n in r.model.graph.node]
    assert r.model.ByteSize() < 1000


def _npz_bomb(path: Path, samples: int, *, declared: int | None = None):
    """An .npz whose member inflates to samples x 3x16x16 float32 (zeros compress ~1000:1)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        shape = (declared or samples, 3, 16, 16)
        with z.open("input.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": shape})
            row = X[0].tobytes()
            for i in range(samples):
                f.write(row if i % 2 else bytes(len(row)))


def test_npz_reads_only_the_samples_used(monkeypatch, tmp_path):
    from edgec import calibdata, datafiles

    _npz_bomb(tmp_path / "c.npz", 20000)  # 61 MB inflated, ~0.1 MB on disk
    read = []
    real = datafiles._read_exactly
    monkeypatch.setattr(datafiles, "_read_exactly", lambda f, n, where: (read.append(n), real(f, n, where))[1])
    cs = calibdata.load_calibration(tmp_path / "c.npz", plain_cnn(), max_samples=64)
    assert sum(len(b["input"]) for b in cs) == 64
    assert sum(read) <= 64 * X[0].nbytes


def test_npz_members_that_lie_about_their_size_are_refused(capsys, tmp_path, cnn):
    _npz_bomb(tmp_path / "absurd.npz", 4, declared=10 ** 12)
    assert_refused(capsys, tmp_path, ["compile", cnn, "-o", tmp_path / "o.onnx", "--quantize", "int8", "--calib",
                                      tmp_path / "absurd.npz"], "declares")
    _npz_bomb(tmp_path / "short.npz", 4, declared=8)
    assert_refused(capsys, tmp_path, ["compile", cnn, "-o", tmp_path / "o.onnx", "--quantize", "int8", "--calib",
                                      tmp_path / "short.npz"], "truncated or corrupt")


def test_huge_input_dims_under_verify_are_a_user_error(capsys, tmp_path):
    m = make([helper.make_node("Relu", ["x"], ["y"])], [vi("x", shape=(1, 3, 100000, 100000))],
             [vi("y", shape=(1, 3, 100000, 100000))])
    onnx.save(m, tmp_path / "m.onnx")
    assert_refused(capsys, tmp_path, ["compile", tmp_path / "m.onnx", "-o", tmp_path / "o.onnx", "--verify"],
                   "--inputs")


# ---------------------------------------------------------------------------------- Low: rough edges
BAD_OPTIONS = [
    ["--prune-macs", "0"], ["--prune", "nan"], ["--prune", "1.5"], ["--max-error", "nan"], ["--max-error", "-1"],
    ["--rtol", "nan"], ["--rtol", "-1"], ["--atol", "-1"], ["--quantize", "mixed", "--calib", "random", "--max-bytes", "-1"],
    ["--percentile", "nan", "--quantize", "int8", "--calib", "random"], ["--calib-samples", "0"],
    ["--prune", "0.3", "--prune-steps", "0"], ["--prune", "0.3", "--round-to", "0"], ["--quantize", "int8"],
    ["--prune", "0.3", "--prune-macs", "0.3"], ["--prune", "abc"], ["--quantize", "int3"], ["--bogus"],
    ["-t", "rknn", "--target-option", "mean=a,b"], ["-t", "rknn", "--target-option", "std=0"],
    ["-t", "rknn", "--target-option", "dynamic_input=abc"], ["-t", "jetson", "--target-option", "profile=x:1:2"],
    ["-t", "jetson", "--target-option", "sparsity=1:2"], ["--input-shape", "input=0,3,16,16"],
    ["--calib-method", "bogus", "--quantize", "int8", "--calib", "random"], ["--goal", "latency", "--prune", "0.3"],
]


@pytest.mark.parametrize("args", BAD_OPTIONS, ids=lambda a: " ".join(a))
def test_bad_options_are_one_line_before_any_work(capsys, tmp_path, cnn, args, monkeypatch):
    from edgec import loader

    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("the model was read before the options"))
    assert_refused(capsys, tmp_path, ["compile", cnn, "-o", tmp_path / "o.onnx", *args])


@pytest.mark.parametrize("kwargs", [
    {"prune": 1.5}, {"prune": "0.3"}, {"prune": True}, {"prune_macs": 0}, {"rtol": -1}, {"atol": float("nan")},
    {"max_error": float("nan")}, {"calib_samples": 0, "quantize": "int8", "calib": "random"},
    {"quantize": "int3"}, {"quantize": "int8"}, {"target": 5}, {"target_options": ["trt=10"]},
    {"input_shapes": {"input": "1,3,16,16"}}, {"input_shapes": [1, 3]}, {"passes": [5]}, {"passes": []},
    {"keep_float": 5}, {"verify": "yes"}, {"log": 5}, {"calib": 5}, {"calib": []},
    {"max_bytes": 1.5, "quantize": "mixed", "calib": "random"}, {"goal": "speed"}, {"importance": "x", "prune": 0.3},
    {"calib_preprocess": "x", "quantize": "int8", "calib": "random"},
])
def test_python_api_raises_user_error_for_every_mistake(kwargs):
    with pytest.raises(UserError):
        edgec.compile(plain_cnn(), **kwargs)


@pytest.mark.parametrize("call", [lambda: edgec.compile(123), lambda: edgec.compile(None),
                                  lambda: edgec.compile(plain_cnn(), 123), lambda: edgec.inspect(5),
                                  lambda: edgec.inspect(plain_cnn(), top="x"),
                                  lambda: edgec.calibdata.Preprocess(std=(0.0,))])
def test_python_api_bad_arguments_are_user_errors_not_type_errors(call):
    import edgec.calibdata  # noqa: F401

    with pytest.raises(UserError):
        call()


@pytest.mark.parametrize("payload,needle", [
    (lambda p: np.savez(p, input=np.array([{"a": 1}], dtype=object)), "pickled"),
    (lambda p: p.write_bytes(b"PK\x03\x04" + b"\0" * 40), "cannot read"),
])
def test_pickled_and_broken_npz_are_user_errors(capsys, tmp_path, cnn, payload, needle):
    payload(tmp_path / "d.npz")
    for flag in (["--quantize", "int8", "--calib"], ["--verify", "--inputs"], ["--eval"]):
        assert_refused(capsys, tmp_path, ["compile", cnn, "-o", tmp_path / "o.onnx", *flag, tmp_path / "d.npz"], needle)


def test_fifo_model_and_device_or_fifo_outputs_are_refused(capsys, tmp_path, cnn):
    os.mkfifo(tmp_path / "fifo.onnx")
    assert_refused(capsys, tmp_path, ["compile", tmp_path / "fifo.onnx", "-o", tmp_path / "o.onnx"], "FIFO")
    assert_refused(capsys, tmp_path, ["inspect", tmp_path / "fifo.onnx"], "FIFO")
    assert_refused(capsys, tmp_path, ["compile", cnn, "-o", tmp_path / "fifo.onnx"], "FIFO")
    try:
        os.mknod(tmp_path / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a private /dev/null
    except (PermissionError, OSError):
        return  # not root: the FIFO cases above cover non-regular outputs
    assert_refused(capsys, tmp_path, ["compile", cnn, "-o", tmp_path / "null"], "character device")
    assert_refused(capsys, tmp_path, ["compile", cnn, "-o", tmp_path / "o.onnx", "--report", tmp_path / "null"],
                   "character device")


def test_symlinked_outputs_cannot_reach_the_input(capsys, tmp_path, cnn):
    os.symlink(cnn, tmp_path / "link.onnx")
    os.link(cnn, tmp_path / "hard.onnx")
    for out in ("link.onnx", "hard.onnx"):
        assert_refused(capsys, tmp_path, ["compile", cnn, "-o", tmp_path / out], "input")


@pytest.mark.parametrize("umask,existing,want", [(0o022, None, 0o644), (0o077, None, 0o600), (0o002, None, 0o664),
                                                 (0o022, 0o640, 0o640), (0o077, 0o644, 0o644)])
def test_outputs_respect_the_umask_and_keep_a_replaced_files_mode(capsys, tmp_path, cnn, umask, existing, want):
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    if existing is not None:
        for p in (out, rep):
            p.write_text("old")
            os.chmod(p, existing)
    old = os.umask(umask)
    try:
        code, _, err = run_cli(capsys, "compile", cnn, "-o", out, "--report", rep, "-q")
    finally:
        os.umask(old)
    assert code == 0, err
    assert stat.S_IMODE(out.stat().st_mode) == want and stat.S_IMODE(rep.stat().st_mode) == want


# ---------------------------------------------------------------------------------- signals (subprocesses)
def _script(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    code = "import os, signal, sys\n" + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_ctrl_c_during_the_imports_is_one_line_and_exit_130(tmp_path, cnn):
    # deterministic: the interrupt lands inside `import onnx` (as Ctrl-C in the first second does)
    r = _script(tmp_path, f"""
        import builtins
        real = builtins.__import__
        def imp(name, *a, **k):
            if name == "onnx":
                raise KeyboardInterrupt
            return real(name, *a, **k)
        builtins.__import__ = imp
        from edgec.cli import main
        sys.exit(main(["compile", {str(cnn)!r}, "-o", "o.onnx"]))
    """)
    assert r.returncode == 130 and r.stderr == "edgec: interrupted; nothing was written\n", r.stderr
    # numpy's C initialisation turns an interrupt into ImportError: still an interrupt
    r = _script(tmp_path, f"""
        import builtins
        real = builtins.__import__
        def imp(name, *a, **k):
            if name == "numpy":
                os.kill(os.getpid(), signal.SIGINT)
                raise ImportError("initialization failed")
            return real(name, *a, **k)
        from edgec.cli import main
        builtins.__import__ = imp
        sys.exit(main(["compile", {str(cnn)!r}, "-o", "o.onnx"]))
    """)
    assert r.returncode == 130 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]


def test_sigterm_while_writing_removes_the_temporary_files(tmp_path, cnn):
    r = _script(tmp_path, f"""
        from edgec import outputs
        real = outputs.Outputs.write_bytes
        def write(self, path, data):
            n = real(self, path, data)
            os.kill(os.getpid(), signal.SIGTERM)  # lands after the temporary file is written
            return n
        outputs.Outputs.write_bytes = write
        from edgec.cli import main
        sys.exit(main(["compile", {str(cnn)!r}, "-o", "o.onnx", "--report", "r.json"]))
    """)
    assert r.returncode == 143 and r.stderr == "edgec: terminated; nothing was written\n", r.stderr
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]


def test_real_sigint_in_the_first_fraction_of_a_second(tmp_path, cnn):
    import time

    p = subprocess.Popen([sys.executable, "-m", "edgec.cli", "compile", str(cnn), "-o", "o.onnx", "--verify"],
                         cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.25)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode in (130, 0), err
    if p.returncode == 130:
        assert err.count("\n") == 1 and "Traceback" not in err, err
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


# ---------------------------------------------------------------------------------- the contract, at random
MODELS = {"tiny": tiny, "cnn": plain_cnn, "resnet": resnet_basic}
OPTIONS = [[], ["--verify"], ["--prune", "0.3"], ["--prune-macs", "0.2"], ["--quantize", "fp16"],
           ["--quantize", "int8", "--calib", "CALIB"], ["--prune", "0.3", "--calib", "CALIB"],
           ["--max-error", "0.5", "--quantize", "fp16"], ["-t", "jetson"], ["-t", "neon", "--verify"],
           ["-t", "rknn", "--input-shape", "INPUT=1,3,16,16", "--calib", "CALIB"], ["--report", "r.json"],
           ["--passes", "fold_constants,eliminate_dead"], ["--prune", "nan"], ["--rtol", "-1"],
           ["--calib-samples", "0", "--calib", "CALIB"], ["--report", "model.onnx"], ["--max-bytes", "-5"]]


def _mutate(model: onnx.ModelProto, how: str, k: int) -> bytes:
    g = model.graph
    if how == "drop node" and g.node:
        del g.node[k % len(g.node)]
    elif how == "duplicate node" and g.node:
        g.node.insert(k % len(g.node), g.node[k % len(g.node)])
    elif how == "corrupt dims":
        ts = list(g.initializer)
        if ts:
            t = ts[k % len(ts)]
            dims = list(t.dims) or [1]
            dims[k % len(dims)] = [-1, 0, 3, 1 << 33][k % 4]
            del t.dims[:]
            t.dims.extend(dims)
        else:
            g.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    elif how == "inject nan":
        floats = [t for t in g.initializer if t.data_type == T.FLOAT and t.raw_data]
        if floats:
            t = floats[k % len(floats)]
            a = numpy_helper.to_array(t).copy()
            a.reshape(-1)[k % a.size] = np.nan
            t.raw_data = a.tobytes()
    elif how == "rename input":
        g.node[k % len(g.node)].input[0] = "nowhere"
    data = model.SerializeToString()
    if how == "truncate bytes":
        data = data[: max(1, len(data) * (k % 97) // 100)]
    elif how == "flip byte":
        b = bytearray(data)
        b[k % len(b)] ^= 0x5A
        data = bytes(b)
    return data


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(sorted(MODELS)),
       how=st.sampled_from(["none", "drop node", "duplicate node", "corrupt dims", "truncate bytes", "flip byte",
                            "inject nan", "rename input"]),
       k=st.integers(0, 10 ** 6), opts=st.sampled_from(OPTIONS), calib_nan=st.booleans())
def test_the_contract_holds_on_mutated_models_and_options(tmp_path_factory, name, how, k, opts, calib_nan):
    import io
    from contextlib import redirect_stderr, redirect_stdout

    d = tmp_path_factory.mktemp("h")
    model = MODELS[name]()
    src = d / "model.onnx"
    src.write_bytes(_mutate(model, how, k))
    inp = model.graph.input[0]
    shape = [max(1, x.dim_value) for x in inp.type.tensor_type.shape.dim]
    calib = RNG.standard_normal([8] + shape[1:]).astype(np.float32)
    if calib_nan:
        calib.reshape(-1)[k % calib.size] = np.nan
    np.savez(d / "calib.npz", **{inp.name: calib})
    args = [a.replace("CALIB", str(d / "calib.npz")).replace("INPUT", inp.name) for a in opts]
    args = [str(d / a) if a in ("r.json", "model.onnx") else a for a in args]
    before = snapshot(d)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main(["compile", str(src), "-o", str(d / "out.onnx"), "-q", *args])
    err = err.getvalue()
    event(f"exit {code}")
    assert code in (0, 1, 2), (code, err)
    assert "Traceback" not in err
    if code == 2:
        assert err.count("\n") == 1 and err.startswith("edgec: error: "), err
    after = snapshot(d)
    for f in ("model.onnx", "calib.npz"):
        assert after[f] == before[f], f"{f} changed"
    assert not [f for f in after if Path(f).name.startswith(".") or f.endswith(".tmp")], after
    if code != 0:
        assert after == before, "a failed run wrote something"
    else:
        onnx.checker.check_model(onnx.load(d / "out.onnx"), full_check=True)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 2_000_000, "memory is not bounded"


def test_every_user_error_class_is_an_edgec_error():
    assert issubclass(UserError, EdgecError) and not issubclass(UserError, (ValueError, TypeError, SystemExit))


# ------------------------------------------------------------- node names, float64, float16
@pytest.mark.parametrize("names", ["shared", "empty"])
def test_unnamed_or_shared_node_names_are_named_on_load(names, tmp_path):
    """The onnx checker accepts nodes that share a name, ONNX Runtime refuses them ("two nodes with
    same node name"), and edgec's passes tell layers apart by name. Found by the session-28
    sweep: a plain compile wrote a model ONNX Runtime cannot load, calibration blamed the user's
    data, and with empty names pruning gave every layer the last one's MACs. Now such nodes are
    named on load (the first of a shared name keeps it), the caller's proto stays as it was, and
    pruning picks what it picks for the named model."""
    import onnxruntime as ort
    m = plain_cnn()
    for n in m.graph.node:
        n.name = "n" if names == "shared" else ""
    before = m.SerializeToString()
    out = tmp_path / "out.onnx"
    r = edgec.compile(m, out, verify=True)
    assert r.report["verify"]["passed"] and m.SerializeToString() == before
    got = [n.name for n in onnx.load(out).graph.node]
    assert all(got) and len(set(got)) == len(got)
    ort.InferenceSession(str(out))
    kw = dict(calib={"input": X}, prune=0.3, prune_mode="sensitivity", importance="l1", round_to=1)
    named = edgec.compile(plain_cnn(), None, **kw).report
    renamed = edgec.compile(m, None, **kw).report
    assert renamed["after"]["macs"] == named["after"]["macs"] < named["before"]["macs"]
    assert [g["channels_after"] for g in renamed["pruning"]["groups"]] == \
        [g["channels_after"] for g in named["pruning"]["groups"]]


def test_name_nodes_keeps_the_first_of_a_shared_name_and_avoids_every_other_name():
    from edgec.loader import name_nodes
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["Relu_y"], name="a"),
                           helper.make_node("Relu", ["Relu_y"], ["y"], name="a"),
                           helper.make_node("Relu", ["y"], ["z"]),
                           helper.make_node("Relu", ["z"], ["w"], name="Relu_y")], "g",
                          [helper.make_tensor_value_info("x", T.FLOAT, [1])],
                          [helper.make_tensor_value_info("w", T.FLOAT, [1])])
    assert name_nodes(g) == 2
    assert [n.name for n in g.node] == ["a", "Relu_y_1", "Relu_z", "Relu_y"]


def _plain_cnn_in(dtype, elem_type) -> onnx.ModelProto:
    """plain_cnn with its float weights, inputs and outputs in another float type, as an export
    in that precision writes it."""
    m = plain_cnn()
    for t in m.graph.initializer:
        if t.data_type == T.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(dtype), t.name))
    for v in list(m.graph.input) + list(m.graph.output):
        v.type.tensor_type.elem_type = elem_type
    return m


def test_bench_of_a_model_onnx_runtime_cannot_run_here_is_a_user_error():
    """A float64 export has no ONNX Runtime Conv kernel: --bench said so with ONNX Runtime's own
    exception (a traceback in Python, "internal error" in the CLI); verification already said it
    in one line."""
    m = _plain_cnn_in(np.float64, T.DOUBLE)
    with pytest.raises(UserError, match="--bench: ONNX Runtime cannot run the original model"):
        edgec.compile(m, None, bench=True)


def test_a_float16_model_verifies_within_its_own_precision():
    """Folding BN into a conv in float16 rounds once where the original rounds twice: one ulp
    (9.8e-4) was a failed --verify at the float32 tolerances. float16 outputs are compared within
    10 of their ulps, which a real difference still fails."""
    from edgec import verify
    m = _plain_cnn_in(np.float16, T.FLOAT16)
    r = edgec.compile(m, None, verify=True)
    assert r.report["verify"]["passed"]
    ref = np.linspace(-4, 4, 64, dtype=np.float16)
    assert verify.compare({"y": ref}, {"y": ref + np.float16(0.01)}).allclose
    assert not verify.compare({"y": ref}, {"y": (ref * np.float16(1.05))}).allclose
    assert not verify.compare({"y": ref.astype(np.float32)}, {"y": ref.astype(np.float32) + 0.01}).allclose


def _badly_conditioned_bn():
    """Conv -> BatchNormalization with a scale of 300 and means near the conv's outputs: outputs
    near zero computed from terms in the hundreds of thousands, as in random-weight exports."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((16, 3, 3, 3)) * 30).astype(np.float32)
    s, var, beta = np.full(16, 300.0, np.float32), np.ones(16, np.float32), np.zeros(16, np.float32)
    mean = (rng.standard_normal(16) * 100).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 16, 8, 8])],
                          [numpy_helper.from_array(a, n) for a, n in
                           ((w, "w"), (s, "s"), (beta, "b"), (mean, "m"), (var, "v"))])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_exact_bn_folding_verifies_on_a_badly_conditioned_float32_model():
    """paddle2onnx's ResNet-18 and MobileNetV3 (random weights, BN kept) failed --verify after
    nothing but BN folding: an output near zero beside outputs in the hundreds moved by more than
    atol 1e-5, as ONNX Runtime's own Conv+BN fusion moves it. The float floor (ONNX Runtime's
    basic optimisations against the reference run) is measured when the plain check fails, and 4
    times it is allowed; a difference of 10 times it still fails, and the message names the
    element."""
    from edgec import verify
    m = _badly_conditioned_bn()
    r = edgec.compile(m, None, verify=True)
    v = r.report["verify"]
    assert v["passed"] and v["outputs"]["y"]["float_floor"] > 1e-3, v
    feeds = verify.random_inputs(m)
    ref, got = verify.run(m, feeds), verify.run(r.model, feeds)
    assert not verify.compare(ref, got).allclose  # what failed before
    floor = verify.float_floor(m, feeds, ref)
    assert verify.compare(ref, got, floor=floor).allclose
    worse = {"y": got["y"] + np.float32(10 * floor["y"])}
    c = verify.compare(ref, worse, floor=floor)
    assert not c.allclose and c.per_output["y"]["worst"]["allowed"] >= 4 * floor["y"]


def test_generated_ids_stay_inside_the_tables_they_index():
    """BERT's token-type embedding has 2 rows, and --verify drew random ids up to 3: the
    original model failed in ONNX Runtime, and the message spoke of symbolic dims the model does
    not have. Random integer inputs that (through casts and reshapes) index a constant table
    with Gather now stay below its length; a model that still cannot run on generated inputs
    says so without the symbolic-dims clause when it has none."""
    from edgec import verify
    table = numpy_helper.from_array(np.arange(8, dtype=np.float32).reshape(2, 4), "types")
    words = numpy_helper.from_array(np.ones((50, 4), np.float32), "words")
    nodes = [helper.make_node("Cast", ["tt"], ["tt64"], to=T.INT64),
             helper.make_node("Gather", ["types", "tt64"], ["e1"]),
             helper.make_node("Gather", ["words", "ids"], ["e2"]),
             helper.make_node("Add", ["e1", "e2"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", T.INT64, [1, 8]),
                                       helper.make_tensor_value_info("tt", T.INT32, [1, 8])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 8, 4])], [table, words])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    assert verify.index_bounds(m) == {"ids": 50, "tt": 2}
    for seed in range(5):
        assert verify.random_inputs(m, seed=seed)["tt"].max() <= 1
    assert edgec.compile(m, None, verify=True).report["verify"]["passed"]
    bad = onnx.ModelProto()  # a model no generated input can run: its table is empty along axis 0
    bad.CopyFrom(m)
    bad.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.zeros((0, 4), np.float32), "types"))
    with pytest.raises(UserError) as e:
        edgec.compile(bad, None, verify=True)
    assert "on generated inputs: pass real inputs with --inputs" in str(e.value)
    assert "symbolic" not in str(e.value)


@pytest.mark.parametrize("op, opset, attrs", [("Resize", 10, {"mode": "linear"}),
                                              ("Upsample", 9, {"mode": "linear"}),
                                              ("Hardmax", 11, {"axis": 1})])
def test_an_opset_upgrade_that_changes_outputs_is_not_kept(op, opset, attrs):
    """onnx's version converter takes Resize-10 and Upsample-9 'linear' and Hardmax-11 to 17
    with other outputs (by up to 1.6), and onnx's checker passes the result: a plain compile
    wrote a model computing something else and exited 0. The upgrade is now checked in ONNX
    Runtime and, where the outputs move, the original opset is kept with a note."""
    from edgec import verify
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "sc")
    node = helper.make_node(op, ["x", "sc"] if op != "Hardmax" else ["x"], ["y"], **attrs)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 4, 6, 6])],
                          [helper.make_tensor_value_info("y", T.FLOAT, None)], [scales] if op != "Hardmax" else [])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    r = edgec.compile(m, None, verify=True)
    assert r.report["verify"]["passed"] and r.model.opset_import[0].version == opset
    assert any("kept" in n and "changed the outputs" in n for n in r.report["notes"]), r.report["notes"]
    feeds = verify.random_inputs(m, seed=3)
    np.testing.assert_array_equal(verify.run(r.model, feeds)["y"], verify.run(m, feeds)["y"])


def test_an_opset_upgrade_is_kept_when_both_give_nan_in_the_same_places():
    """The upgrade's proof runs generated inputs, and a Log of negative ones gives NaN in both
    models: NaN is not close to NaN, so the proof kept opset 11 for a model the converter takes
    up exactly. NaN in the same places now counts as the same."""
    g = helper.make_graph([helper.make_node("Log", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 8])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 8])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)])
    r = edgec.compile(m, None)
    assert r.model.opset_import[0].version == 17 and "opset 11 converted to 17" in r.report["notes"]


def test_an_opset_downgrade_is_kept_when_both_give_nan_in_the_same_places():
    """The twin of the upgrade's proof: taking an opset-18 model down to TensorRT 8.x's 17
    compared outputs with NaN unequal to NaN, so a Log of generated negative inputs kept opset
    18, and -t jetson refused a model the converter takes down exactly."""
    g = helper.make_graph([helper.make_node("Log", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 8])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 8])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    r = edgec.compile(m, None, target="jetson")
    assert r.model.opset_import[0].version == 17
    assert any("converted down to 17" in n for n in r.report["notes"]), r.report["notes"]


def test_a_float64_matmul_stays_a_matmul_for_rknn():
    """gemm_to_conv turned a float64 MatMul into a float64 Conv, which ONNX Runtime has no
    kernel for: -t rknn wrote a model it could not load."""
    w = numpy_helper.from_array(np.ones((4, 3), np.float64), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", T.DOUBLE, [1, 4])],
                          [helper.make_tensor_value_info("y", T.DOUBLE, [1, 3])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    r = edgec.compile(m, None, target="rknn", verify=True)
    assert r.report["verify"]["passed"] and [n.op_type for n in r.model.graph.node] == ["MatMul"]


def test_the_same_opset_declared_twice_is_read_once():
    """skl2onnx 1.20 declares the default-domain opset twice with the same version; onnx's
    checker and ONNX Runtime accept it, edgec refused it. It is read once now (in a copy: the
    caller's model keeps both); two different versions are still refused."""
    m = _plain_cnn_in(np.float32, T.FLOAT)
    m.opset_import.append(helper.make_opsetid("", m.opset_import[0].version))
    r = edgec.compile(m, None, verify=True)
    assert r.report["verify"]["passed"] and len(m.opset_import) == 2
    assert [o.domain for o in r.model.opset_import].count("") <= 1
    m.opset_import[-1].version = m.opset_import[0].version - 1
    with pytest.raises(UserError, match="declared more than once, with different versions"):
        edgec.compile(m, None)


def test_a_static_zero_dim_verifies():
    """A static 0 dim became 1 in the generated inputs and then a modulo by zero: the original
    model 'did not run', though ONNX Runtime runs it."""
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", T.FLOAT, [0, 4])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [0, 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    assert edgec.compile(m, None, verify=True).report["verify"]["passed"]


def test_fp16_with_nothing_to_convert_is_not_an_error():
    """--quantize fp16 on a model with no float32 compute raised an AttributeError."""
    g = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", T.INT64, [1, 4])],
                          [helper.make_tensor_value_info("y", T.INT64, [1, 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    r = edgec.compile(m, None, quantize="fp16")
    assert r.report["quantization"]["nodes_fp16"] == 0


@pytest.mark.parametrize("kind", ["listed twice", "rank 0"])
def test_int8_with_an_output_listed_twice_or_of_rank_0(kind):
    """Valid outputs the int8 measurements could not take: a tensor listed twice as a graph
    output (its batches were gathered twice: a broadcast error) and a rank-0 output (numpy
    cannot concatenate 0-d arrays). Both compile now, verified on the calibration inputs."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.3, (8, 4, 3, 3)).astype(np.float32), "W")
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1])]
    outs = [helper.make_tensor_value_info("y", T.FLOAT, [1, 8, 8, 8])]
    if kind == "listed twice":
        outs = outs * 2
    else:
        nodes.append(helper.make_node("ReduceMean", ["y"], ["s"], keepdims=0))
        outs.append(helper.make_tensor_value_info("s", T.FLOAT, []))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 4, 8, 8])], outs, [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    calib = {"x": rng.normal(0, 1, (16, 4, 8, 8)).astype(np.float32)}
    r = edgec.compile(m, None, quantize="int8", calib=calib, verify=True)
    assert r.report["verify"]["passed"] and len(r.model.graph.output) == len(outs)


def test_int8_of_an_already_quantized_model_says_so():
    """An ONNX Runtime QDQ model given to --quantize int8: its Q/DQ ops are kept, and the report
    read 'int8 ... error 0, SQNR inf' as if edgec had quantized it. It now says the input was
    already quantized and that those ops were kept."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(0.02, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int16), "z"),
             numpy_helper.from_array(rng.normal(0, 0.3, (8, 4, 3, 3)).astype(np.float32), "W")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("Conv", ["xd", "W"], ["y"], pads=[1, 1, 1, 1])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 4, 8, 8])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 8, 8, 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    r = edgec.compile(m, None, quantize="int8", calib={"x": rng.normal(0, 1, (8, 4, 8, 8)).astype(np.float32)})
    notes = r.report["quantization"]["notes"]
    assert notes and notes[0].startswith("the input model is already quantized (DequantizeLinear, QuantizeLinear)")
    from edgec.report import compile_text
    assert "already quantized" in compile_text(r.report)


def test_pruning_an_already_quantized_model_says_why_nothing_was_pruned(tmp_path):
    """ONNX Runtime's quantize_dynamic output (ConvInteger: ddddocr's default recogniser ships so)
    given to --prune: no group was found and the report said only '0 of 0 groups pruned'. It now
    says the layers were already quantized and asks for the float model; the graph is unchanged."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (16, 4, 3, 3)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.normal(0, 0.3, (8, 16, 3, 3)).astype(np.float32), "W2")]
    nodes = [helper.make_node("Conv", ["x", "W1"], ["h"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "W2"], ["y"], pads=[1, 1, 1, 1])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 4, 8, 8])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 8, 8, 8])], inits)
    src, dyn = tmp_path / "f.onnx", tmp_path / "dyn.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    quantize_dynamic(str(src), str(dyn), weight_type=QuantType.QUInt8, op_types_to_quantize=["Conv"])
    assert "ConvInteger" in {n.op_type for n in onnx.load(str(dyn)).graph.node}
    calib = {"x": rng.normal(0, 1, (8, 4, 8, 8)).astype(np.float32)}
    r = edgec.compile(str(dyn), None, prune=0.3, calib=calib)
    pr = r.report["pruning"]
    assert not any(s["removed"] for s in pr["groups"])
    notes = [n for p in r.report["passes"] for n in p.get("notes", [])]
    assert any(n.startswith("the input model is already quantized (ConvInteger") and "float model" in n
               for n in notes), notes
    assert r.report["after"]["params"] == r.report["before"]["params"]


def test_a_16bit_qdq_model_refused_by_a_target_says_why():
    """A 16-bit QDQ model (opset 21) for rknn, which reads up to 19: the refusal quoted the
    converter's C++ assertion (type_restriction.h: isUnallowed ...). It names the types now."""
    inits = [numpy_helper.from_array(np.array(0.02, np.float32), "s"), numpy_helper.from_array(np.array(0, np.uint16), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    with pytest.raises(UserError, match="QuantizeLinear/DequantizeLinear use uint16 zero points, which need opset 21"):
        edgec.compile(m, None, target="rknn")


@pytest.mark.parametrize("kind", ["sequence", "optional"])
def test_int8_with_a_sequence_or_optional_inside(kind):
    """Calibration added min/max/Size statistics to every value, a sequence (SequenceConstruct)
    or an optional (Optional) too, and ONNX Runtime refused the statistics model: an internal
    error. Those values have no range to calibrate and are left out."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.3, (8, 4, 3, 3)).astype(np.float32), "W")
    conv = helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1])
    if kind == "sequence":
        nodes = [conv, helper.make_node("Relu", ["c"], ["r"]), helper.make_node("SequenceConstruct", ["c", "r"], ["sq"]),
                 helper.make_node("ConcatFromSequence", ["sq"], ["y"], axis=1)]
        out, opset = [1, 16, 8, 8], 17
    else:
        nodes = [conv, helper.make_node("Optional", ["c"], ["opt"]), helper.make_node("OptionalGetElement", ["opt"], ["y"])]
        out, opset = [1, 8, 8, 8], 18
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 4, 8, 8])],
                          [helper.make_tensor_value_info("y", T.FLOAT, out)], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    calib = {"x": rng.normal(0, 1, (16, 4, 8, 8)).astype(np.float32)}
    assert edgec.compile(m, None, quantize="int8", calib=calib, verify=True).report["verify"]["passed"]


def test_int8_measures_what_a_nonzero_reads():
    """An output whose shape depends on the values (NonZero's count changes from batch to
    batch, and between the float and the int8 model) failed inside numpy, then became a user
    error naming it. The error is now measured on what NonZero reads (the conv's output), and
    the NonZero stays as it was."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.3, (8, 4, 3, 3)).astype(np.float32), "W")
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("NonZero", ["c"], ["nz"]),
             helper.make_node("Relu", ["c"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 4, 8, 8])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 8, 8, 8]),
                           helper.make_tensor_value_info("nz", T.INT64, [4, None])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    calib = {"x": rng.normal(0, 1, (16, 4, 8, 8)).astype(np.float32)}
    r = edgec.compile(m, None, quantize="int8", calib=calib, verify=True)
    assert r.report["quantization"]["measured_before_tail"]["tensors"] == ["c"]
    assert r.report["verify"]["passed"] and [o.name for o in r.model.graph.output] == ["y", "nz"]
    assert "NonZero" in [n.op_type for n in r.model.graph.node]


def test_int8_with_another_data_dependent_output_is_a_user_error():
    """A length computed from the values (a Slice whose end is data) is no op edgec knows starts a
    data-dependent tail: a one-line user error names the output."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.3, (8, 4, 3, 3)).astype(np.float32), "W")
    c = lambda n, v: numpy_helper.from_array(np.asarray(v), n)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["c", "flat"], ["f"]),
             helper.make_node("ReduceMax", ["f"], ["mx"], keepdims=1),
             helper.make_node("Mul", ["mx", "ten"], ["mx10"]),
             helper.make_node("Cast", ["mx10"], ["end"], to=T.INT64),
             helper.make_node("Slice", ["f", "zero", "end"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 4, 8, 8])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [None])],
                          [w, c("flat", np.asarray([-1], np.int64)), c("ten", np.float32(100.0)),
                           c("zero", np.asarray([0], np.int64))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    calib = {"x": rng.normal(0, 1, (16, 4, 8, 8)).astype(np.float32)}
    with pytest.raises(UserError, match="output 'y' has a shape that depends on the data"):
        edgec.compile(m, None, quantize="int8", calib=calib)


def test_fp16_leaves_a_node_reading_a_custom_ops_output_in_float32():
    """ONNX Runtime's FusedMatMul (com.microsoft) feeding an Add with a float input: the Add
    went to float16, the custom op's output (of a type onnx cannot infer) got no Cast, and the
    written model mixed float and float16: ONNX Runtime refused it, after an exit 0. A node
    reading a value of unknown type now stays float32."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.3, (8, 8)).astype(np.float32), "W")
    nodes = [helper.make_node("FusedMatMul", ["x", "W"], ["m"], domain="com.microsoft"),
             helper.make_node("Add", ["m", "mask"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [2, 8]),
                                       helper.make_tensor_value_info("mask", T.FLOAT, [2, 8])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [2, 8])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    r = edgec.compile(m, None, quantize="fp16", verify=True)
    assert r.report["verify"]["passed"]
    import onnxruntime as ort
    ort.InferenceSession(r.model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_fp16_keeps_a_value_an_if_body_reads_in_float32():
    """An If whose branches read a conv's output from the main graph: fp16 made that output
    float16 and left the branches adding it to a float32 constant (an internal error from
    shape inference). Values a subgraph reads stay float32."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(np.ones((1, 4, 1, 1), np.float32), "B4")]

    def branch(name, op):
        return helper.make_graph([helper.make_node(op, ["c", "B4"], [f"{name}_y"])], name, [],
                                 [helper.make_tensor_value_info(f"{name}_y", T.FLOAT, [1, 4, 8, 8])])
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("If", ["cond"], ["y"], then_branch=branch("t", "Add"), else_branch=branch("e", "Sub"))]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8]),
                                       helper.make_tensor_value_info("cond", T.BOOL, [])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 4, 8, 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    assert edgec.compile(m, None, quantize="fp16", verify=True).report["verify"]["passed"]


def test_fp16_leaves_qoperator_ops_alone():
    """ONNX Runtime's QOperator output (QLinearConv) given to --quantize fp16: its float scales
    became float16, an invalid model (an internal error from shape inference)."""
    rng = np.random.default_rng(0)
    c = lambda v, n: numpy_helper.from_array(v, n)  # noqa: E731
    inits = [c(np.array(0.05, np.float32), "xs"), c(np.array(128, np.uint8), "xz"),
             c(rng.integers(-20, 20, (4, 3, 3, 3)).astype(np.int8), "w"), c(np.array(0.01, np.float32), "ws"),
             c(np.array(0, np.int8), "wz"), c(np.array(0.1, np.float32), "ys"), c(np.array(128, np.uint8), "yz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("QLinearConv", ["xq", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["yq"], pads=[1, 1, 1, 1]),
             helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["d"]), helper.make_node("Relu", ["d"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 4, 8, 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    r = edgec.compile(m, None, quantize="fp16", verify=True)
    assert r.report["verify"]["passed"]


def test_calibrating_a_scalar_input_says_what_is_unsupported():
    """A rank-0 input with calibration data: every form of the data was refused with 'has shape
    [1], the model expects []', a message no data could satisfy. It now says that scalar inputs
    cannot be calibrated."""
    g = helper.make_graph([helper.make_node("Mul", ["x", "s"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", T.FLOAT, [1, 4]), helper.make_tensor_value_info("s", T.FLOAT, [])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    data = {"x": np.ones((4, 4), np.float32), "s": np.ones(4, np.float32)}
    with pytest.raises(UserError, match="input 's' is a scalar \\(rank 0\\): edgec calibrates only inputs with a batch axis"):
        edgec.compile(m, None, quantize="int8", calib=data)


def test_a_lossless_compile_the_host_cannot_run_is_not_written(tmp_path, monkeypatch):
    """onnx's affine_grid node tests compiled to models that ONNX Runtime loads with its
    optimisations off but not at its defaults (a folded If condition exposes a rank-1 value
    where Range needs a scalar): --verify's host line reported it and the model was written
    with exit 0. A lossless compile that the host cannot run where it runs the original now
    fails and writes nothing; when the host cannot run the original either, it is only
    reported, as before. (Simulated here: which graphs ONNX Runtime refuses is its own.)"""
    from edgec import api
    from edgec.errors import VerificationError
    m = _plain_cnn_in(np.float32, T.FLOAT)
    monkeypatch.setattr(api, "_host_check", lambda *a, **k: {"error": "Range wants scalars"})
    out = tmp_path / "o.onnx"
    with pytest.raises(VerificationError, match="runs the original model at its default settings but not the compiled"):
        edgec.compile(m, out, verify=True)
    assert not out.exists()
    monkeypatch.setattr(api, "_host_runs", lambda *a, **k: False)
    assert edgec.compile(m, out, verify=True).report["verify"]["passed"] and out.exists()


def test_nodes_sharing_a_name_inside_an_if_body_are_named_too(tmp_path):
    """ONNX Runtime checks node names inside subgraphs as well: an If branch with two nodes named
    "dup" compiled to a model it could not load (session-28 review)."""
    import onnxruntime as ort
    def branch(name, op):
        nodes = [helper.make_node(op, ["x"], [f"{name}_a"], name="dup"),
                 helper.make_node("Neg", [f"{name}_a"], [f"{name}_y"], name="dup")]
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_y", T.FLOAT, [1, 4])])
    g = helper.make_graph([helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
                           helper.make_node("Greater", ["s", "z"], ["c"]),
                           helper.make_node("If", ["c"], ["y"], then_branch=branch("t", "Relu"),
                                            else_branch=branch("e", "Abs"))], "g",
                          [helper.make_tensor_value_info("x", T.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 4])],
                          [numpy_helper.from_array(np.array(0, np.float32), "z")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    out = tmp_path / "out.onnx"
    assert edgec.compile(m, out, verify=True).report["verify"]["passed"]
    ort.InferenceSession(str(out))


def _if_model(cond_nodes, cond_inits):
    """x [1, n] -> If(cond): then Relu(x), else Squeeze(x, axis 1) then Unsqueeze back. With n
    fixed to 4 the else branch no longer type-checks (a dim of 4 squeezed), as silero-vad's 8 kHz
    branch does at 16 kHz shapes."""
    ax = numpy_helper.from_array(np.asarray([1], np.int64), "ax")
    then = helper.make_graph([helper.make_node("Relu", ["x"], ["t_y"])], "then", [],
                             [helper.make_tensor_value_info("t_y", T.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Squeeze", ["x", "ax"], ["e_s"]),
                               helper.make_node("Unsqueeze", ["e_s", "ax"], ["e_y"])], "else", [],
                              [helper.make_tensor_value_info("e_y", T.FLOAT, None)])
    nodes = cond_nodes + [helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, "n"])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, "n"])], [ax] + cond_inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_an_if_with_a_constant_condition_is_inlined():
    """An exporter's If on a value that is constant (silero-vad's sample rate, once fixed): the
    branch never taken was kept, and with static input shapes it no longer type-checked, so
    ONNX Runtime refused the written model after an exit 0. The taken branch is inlined now."""
    sr = [numpy_helper.from_array(np.asarray(16000, np.int64), n) for n in ("sr", "want")]
    m = _if_model([helper.make_node("Equal", ["sr", "want"], ["cond"])], sr)
    r = edgec.compile(m, None, input_shapes={"x": [1, 4]}, verify=True)
    assert r.report["verify"]["passed"] and "If" not in [n.op_type for n in r.model.graph.node]
    runtime.reference_session(r.model)  # loads
    notes = next(p["notes"] for p in r.report["passes"] if p["name"] == "inline_if")
    assert any("takes its then branch" in n for n in notes), notes


def _nested_if(n):
    """If(sum(x) > 0): Relu(x), else If(...) whose else squeezes axis 1 of x [1, n]: at n = 4 ONNX
    Runtime refuses the model, while onnx's checker and strict inference pass it (they do not
    look into the nested branch), as with silero-vad at fixed shapes."""
    ax = numpy_helper.from_array(np.asarray([1], np.int64), "ax")
    zero = numpy_helper.from_array(np.asarray(0.0, np.float32), "zero")
    vi = lambda name: helper.make_tensor_value_info(name, T.FLOAT, None)
    inner = [helper.make_graph([helper.make_node("Relu", ["x"], ["it"])], "it", [], [vi("it")]),
             helper.make_graph([helper.make_node("Squeeze", ["x", "ax"], ["s1"]),
                                helper.make_node("Unsqueeze", ["s1", "ax"], ["ie"])], "ie", [], [vi("ie")])]
    then = helper.make_graph([helper.make_node("Relu", ["x"], ["t"])], "then", [], [vi("t")])
    other = helper.make_graph([helper.make_node("If", ["c"], ["e"], then_branch=inner[0], else_branch=inner[1])],
                              "else", [], [vi("e")])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0), helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, n])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, n])], [ax, zero])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_a_compiled_model_onnx_runtime_cannot_load_is_not_written():
    """silero-vad with fixed shapes compiled to a model onnx's checker passes and ONNX Runtime
    refuses (an If branch never taken no longer type-checks), and edgec exited 0. The compiled
    model must load wherever the original does: a one-line error otherwise, naming the input
    shapes when they were given."""
    from types import SimpleNamespace

    from edgec import api
    from edgec.errors import InternalError

    original, fixed = _nested_if("n"), _nested_if(4)
    onnx.checker.check_model(fixed, full_check=True)
    runtime.reference_session(original)
    with pytest.raises(Exception):
        runtime.reference_session(fixed)
    run = lambda shapes: SimpleNamespace(result_model=fixed, original=original,
                                         options=SimpleNamespace(input_shapes=shapes))
    with pytest.raises(UserError, match="cannot load the model with the input shapes given"):
        api._require_loadable(run({"x": [1, 4]}))
    with pytest.raises(InternalError, match="cannot load the compiled model, though it loads the original"):
        api._require_loadable(run(None))
    api._require_loadable(SimpleNamespace(result_model=original, original=original,
                                          options=SimpleNamespace(input_shapes=None)))  # loads: nothing said
    api._require_loadable(SimpleNamespace(result_model=fixed, original=fixed,
                                          options=SimpleNamespace(input_shapes=None)))  # neither loads: not edgec's


def test_an_inlined_branch_does_not_clash_with_a_sibling_bodys_names():
    """Two If bodies may define the same name ('t'); inlining one made it shadow the other's, and a
    plain lossless compile failed ('t' used as output name twice). The inlined names are kept
    apart from every body's."""
    vi = lambda n: helper.make_tensor_value_info(n, T.FLOAT, None)
    then1 = helper.make_graph([helper.make_node("Relu", ["x"], ["t"]), helper.make_node("Neg", ["t"], ["u"])], "then1", [],
                              [vi("u")])
    else1 = helper.make_graph([helper.make_node("Neg", ["x"], ["e1"])], "else1", [], [vi("e1")])
    then2 = helper.make_graph([helper.make_node("Sigmoid", ["x"], ["t"])], "then2", [], [vi("t")])
    else2 = helper.make_graph([helper.make_node("Neg", ["x"], ["e2"])], "else2", [], [vi("e2")])
    nodes = [helper.make_node("Constant", [], ["c1"], value=numpy_helper.from_array(np.array(True))),
             helper.make_node("If", ["c1"], ["y1"], then_branch=then1, else_branch=else1),
             helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0), helper.make_node("Greater", ["s", "zero"], ["c2"]),
             helper.make_node("If", ["c2"], ["y2"], then_branch=then2, else_branch=else2)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y1", T.FLOAT, [1, 4]), helper.make_tensor_value_info("y2", T.FLOAT, [1, 4])],
                          [numpy_helper.from_array(np.array(0, np.float32), "zero")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    r = edgec.compile(m, None, verify=True)
    assert r.report["verify"]["passed"] and [n.op_type for n in r.model.graph.node].count("If") == 1
