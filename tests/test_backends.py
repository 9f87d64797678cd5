"""Target rewrites (checked in ONNX Runtime) and target conformance: what each device refuses
is reported as a clear error naming the op and the target."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgec
from edgec.backends import get_target, targets
from edgec.builders import GraphBuilder, resnet_basic, shufflenet_v2, transformer_encoder
from edgec.errors import UserError
from edgec.passes import DecomposeOps, FixInputShapes, GemmToConv, NarrowInt64, ShuffleTo4D
from edgec.pipeline import PassManager

from conftest import EXAMPLE, assert_same_outputs, ops


def run(model, *passes):
    ir = edgec.from_model(model)
    PassManager(list(passes)).run(ir)
    out = ir.to_onnx()
    onnx.checker.check_model(out, full_check=True)
    return out


def make(nodes, inputs, outputs, inits=(), opset=17):
    m = helper.make_model(helper.make_graph(nodes, "t", inputs, outputs, list(inits)),
                          opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def f32(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


# ------------------------------------------------------------------------ rewrites
@pytest.mark.parametrize("opset", [17, 19])
def test_decompose_ops_are_exact(opset):
    axes = [numpy_helper.from_array(np.array([1], np.int64), "ax")] if opset >= 18 else []
    red_in = ["x", "ax"] if opset >= 18 else ["x"]
    red_attr = {} if opset >= 18 else {"axes": [1]}
    nodes = [helper.make_node("Sum", ["x", "x2", "x"], ["s"]), helper.make_node("Mean", ["s", "x2"], ["m"]),
             helper.make_node("Neg", ["m"], ["n"]), helper.make_node("Abs", ["n"], ["a"]),
             helper.make_node("Softsign", ["a"], ["ss"]), helper.make_node("Reciprocal", ["ss"], ["r"]),
             helper.make_node("ReduceL2", red_in, ["l2"], keepdims=1, **red_attr),
             helper.make_node("ReduceSumSquare", red_in, ["sq"], keepdims=0, **red_attr),
             helper.make_node("Mul", ["r", "l2"], ["y"])]
    m = make(nodes, [f32("x", [2, 3, 4]), f32("x2", [2, 3, 4])], [f32("y", [2, 3, 4]), f32("sq", [2, 4])], axes,
             opset=opset)
    out = run(m, DecomposeOps())
    assert not {"Sum", "Mean", "Neg", "Abs", "Softsign", "Reciprocal", "ReduceL2", "ReduceSumSquare"} & set(ops(out))
    assert_same_outputs(m, out, rtol=1e-5, atol=1e-5)


def test_layernorm_decomposition_is_exact():
    m = transformer_encoder()
    out = run(m, DecomposeOps(ops=("LayerNormalization",)))
    assert "LayerNormalization" not in ops(out)
    assert_same_outputs(m, out, rtol=1e-4, atol=1e-5)


def test_gemm_to_conv_after_global_pool_and_plain():
    b = GraphBuilder()
    x = b.input("x", [2, 3, 4, 4])
    g = b.gemm(b.flatten(b.gap(b.conv(x, 8, 3))), 5)     # GAP -> Flatten -> Gemm: conv on the 4-D tensor
    b.output(b.gemm(b.relu(g), 3, trans_b=0), "y")        # a Gemm on a plain [N, K] tensor
    m = b.build()
    out = run(m, GemmToConv())
    assert "Gemm" not in ops(out) and ops(out).count("Conv") == 3
    assert_same_outputs(m, out)


def test_matmul_on_feature_vectors_to_conv():
    b = GraphBuilder()
    x = b.input("x", [3, 12])
    b.output(b.matmul(b.relu(b.matmul(x, 8)), 4), "y")
    m = b.build()
    out = run(m, GemmToConv())
    assert "MatMul" not in ops(out) and ops(out).count("Conv") == 2
    assert_same_outputs(m, out)


def test_shuffle_to_4d_is_exact_and_4d():
    m = shufflenet_v2()
    out = run(m, ShuffleTo4D())
    ranks = [len(n.attribute[0].ints) for n in out.graph.node if n.op_type == "Transpose"]
    assert ranks and all(r == 4 for r in ranks)
    assert_same_outputs(m, out)


def test_narrow_int64_only_where_readers_accept_int32():
    nodes = [helper.make_node("Gather", ["x", "idx"], ["g"], axis=1),           # indices: int32 allowed
             helper.make_node("Reshape", ["g", "shape"], ["y"])]                # shape: int64 only
    m = make(nodes, [f32("x", [2, 5])], [f32("y", [6])],
             [numpy_helper.from_array(np.array([0, 2, 4], np.int64), "idx"),
              numpy_helper.from_array(np.array([6], np.int64), "shape")])
    out = run(m, NarrowInt64())
    types = {i.name: i.data_type for i in out.graph.initializer}
    assert sorted(types.values()) == sorted([TensorProto.INT32, TensorProto.INT64])
    assert_same_outputs(m, out)


def test_fix_input_shapes_then_shapes_fold():
    m = onnx.load(EXAMPLE / "model.onnx")
    out = run(m, FixInputShapes({"input": [4, 1, 8, 8]}))
    dims = [d.dim_value for d in out.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [4, 1, 8, 8]
    assert [d.dim_value for d in out.graph.output[0].type.tensor_type.shape.dim] == [4, 10]
    from edgec import verify

    feeds = verify.random_inputs(out)
    np.testing.assert_allclose(verify.run(out, feeds)["logits"], verify.run(m, feeds)["logits"], rtol=1e-6)


def test_fix_input_shapes_contradiction_is_a_user_error():
    with pytest.raises(UserError, match="contradicts"):
        run(resnet_basic(), FixInputShapes({"input": [1, 3, 32, 32]}))


# ------------------------------------------------------------------------ conformance
def custom_op_model():
    return make([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Frob", ["r"], ["y"], domain="com.acme")],
                [f32("x", [1, 3])], [f32("y", [1, 3])])


def test_every_target_accepts_the_builder_models():
    for name in targets():
        result = edgec.compile(resnet_basic(), target=name, verify=True)
        assert result.report["target"] == name and result.report["verify"]["passed"]


@pytest.mark.parametrize("target,opts,model,message", [
    # (Gelu is new in opset 20 and Mish in 18: onnx's converter cannot take them below, so the model
    # keeps its opset; a Relu model is converted down, test_a_newer_opset_is_taken_down_...)
    ("rknn", {}, lambda: make([helper.make_node("Gelu", ["x"], ["y"])], [f32("x", [1, 3])], [f32("y", [1, 3])], opset=21),
     "opset 21 is outside"),
    ("rknn", {}, lambda: onnx.load(EXAMPLE / "model.onnx"), "needs static input shapes: input 'input'"),
    ("rknn", {}, custom_op_model, "com.acme::Frob 'Frob_y': custom domain 'com.acme'"),
    ("rknn", {}, lambda: make([helper.make_node("Cos", ["x"], ["c"]), helper.make_node("Erf", ["c"], ["d"]),
                               helper.make_node("Trilu", ["d"], ["y"])], [f32("x", [1, 3, 3])], [f32("y", [1, 3, 3])]),
     "Trilu 'Trilu_y': not supported by RKNN-Toolkit2"),
    ("jetson", {"trt": "8.5"}, lambda: make([helper.make_node("Mish", ["x"], ["y"])], [f32("x", [1, 3])],
                                            [f32("y", [1, 3])], opset=19), "opset 19 is outside"),
    ("jetson", {"trt": "10"}, custom_op_model, "the TensorRT 10 parser needs a plugin"),
    ("jetson", {"trt": "10"}, lambda: make([helper.make_node("Col2Im", ["x", "s", "k"], ["y"])],
                                           [f32("x", [1, 4, 4])], [f32("y", None)],
                                           [numpy_helper.from_array(np.array([3, 3], np.int64), "s"),
                                            numpy_helper.from_array(np.array([2, 2], np.int64), "k")], opset=18),
     "Col2Im 'Col2Im_y': not supported by the TensorRT 10 ONNX parser"),
])
def test_bad_input_per_target(target, opts, model, message):
    with pytest.raises(UserError) as e:
        edgec.compile(model(), target=target, target_options=opts)
    assert message in str(e.value) and target in str(e.value)


def test_tensorrt_refuses_asymmetric_qdq():
    q = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(3, np.int8), "zp")]
    m = make([helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
              helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"])], [f32("x", [1, 4])], [f32("y", [1, 4])], q)
    with pytest.raises(UserError, match="zero point 0"):
        edgec.compile(m, target="jetson")


def test_unknown_target_option_lists_the_known_ones():
    with pytest.raises(UserError, match="has no option 'chip'.*platform"):
        get_target("rknn", {"chip": "rk3588"})


def test_rknn_writes_its_build_config(tmp_path):
    out = tmp_path / "m.onnx"
    result = edgec.compile(EXAMPLE / "model.onnx", out, target="rknn", input_shapes={"input": [1, 1, 8, 8]},
                           target_options={"platform": "rk3566", "mean": "0", "std": "1"})
    cfg = __import__("json").loads((tmp_path / "m.onnx.rknn.json").read_text())
    assert cfg["target_platform"] == "rk3566" and cfg["config"]["mean_values"] == [[0.0]]
    assert cfg["inputs"] == [{"name": "input", "shape": [1, 1, 8, 8]}]
    assert str(tmp_path / "m.onnx.rknn.json") in result.report["extra_files"]


def test_rv1106_without_quantization_is_refused(tmp_path):
    with pytest.raises(UserError, match="no float mode"):
        edgec.compile(EXAMPLE / "model.onnx", tmp_path / "m.onnx", target="rknn",
                      input_shapes={"input": [1, 1, 8, 8]}, target_options={"platform": "rv1106"})
    assert not (tmp_path / "m.onnx.rknn.json").exists()


# ------------------------------------------------------------------------ 2:4 sparsity
def _is_24(w: np.ndarray, layout: str) -> bool:
    rows = w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1) if layout == "conv" else w
    return bool(np.all((rows.reshape(rows.shape[0], -1, 4) != 0).sum(axis=2) <= 2))


@pytest.mark.parametrize("builder", ["resnet_basic", "mobilenet_v2"])
def test_sparsity_24_pattern_and_least_squares_recovery(builder):
    from edgec import builders, verify

    model = builders.ALL_MODELS[builder](width=16)
    calib = {"input": np.random.default_rng(1).normal(size=(16, 3, 16, 16)).astype(np.float32)}
    held_out = {"input": np.random.default_rng(2).normal(size=(8, 3, 16, 16)).astype(np.float32)}
    def outputs(m):  # the builder models have a static batch of 1
        return np.concatenate([verify.run(m, {"input": x[None]})["output"] for x in held_out["input"]])

    ref = outputs(model)
    errors = {}
    for name, kw in (("magnitude", {}), ("refit", {"calib": calib})):
        result = edgec.compile(model, target="jetson", target_options={"sparsity": "2:4"}, **kw)
        out = result.model
        convs = [i for n in out.graph.node if n.op_type == "Conv" for i in out.graph.initializer if i.name == n.input[1]]
        sparse = [numpy_helper.to_array(i) for i in convs if numpy_helper.to_array(i).shape[1] % 4 == 0]
        assert sparse and all(_is_24(w, "conv") for w in sparse)
        # at least half zero: the re-fit may also zero an input channel the data never excites
        assert all(float(np.mean(w == 0)) >= 0.5 for w in sparse)
        layers = result.report["sparsity"]["layers"]
        assert len(layers) == len(sparse) + sum(n.op_type in ("Gemm",) for n in out.graph.node)
        got = outputs(out)
        errors[name] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    print(f"\n{builder} 2:4 relative output error: magnitude {errors['magnitude']:.2f}, re-fit {errors['refit']:.2f}")
    assert errors["refit"] < 0.3 * errors["magnitude"], errors


def test_sparsity_is_refused_outside_known_patterns():
    with pytest.raises(UserError, match="sparsity=1:8"):
        edgec.compile(resnet_basic(), target="jetson", target_options={"sparsity": "1:8"})


def test_rknn_large_transposes_warn_or_fail_by_platform():
    """RKNN runs a Transpose whose input is larger than 8192 (H x W) on the CPU; rv1106 cannot."""
    m = make([helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1, 3]), helper.make_node("Relu", ["t"], ["y"])],
             [f32("x", [1, 4, 128, 128])], [f32("y", [1, 128, 4, 128])])
    r = edgec.compile(m, target="rknn").report
    assert any("fall back to the CPU" in n for n in r["notes"])
    with pytest.raises(UserError, match="rv1106 cannot run it on the NPU"):
        edgec.compile(m, target="rknn", target_options={"platform": "rv1106"}, calib="random")


def test_rknn_build_config_lets_rknn_quantize_with_the_chosen_method(tmp_path):
    import json

    out = tmp_path / "m.onnx"
    edgec.compile(EXAMPLE / "model.onnx", out, target="rknn", input_shapes={"input": [1, 1, 8, 8]},
                  calib=EXAMPLE / "calib.npz", calib_samples=20, calib_method="mse")
    cfg = json.loads((tmp_path / "m.onnx.rknn.json").read_text())
    assert cfg["build"]["do_quantization"] is True and cfg["config"]["quantized_algorithm"] == "mmse"
    lines = (tmp_path / "m.onnx.dataset" / "dataset.txt").read_text().split()
    assert len(lines) == 20 and all(np.load(p).shape == (1, 1, 8, 8) for p in lines)


def test_quantize_vendor_hands_rknn_a_float_model_its_dataset_and_a_build_script(tmp_path):
    """``--quantize vendor``: the model stays float (exact rewrites only), and beside it RKNN's
    build config with do_quantization, the NCHW dataset and a build script; the report says so."""
    import json

    from edgec.cli import main

    out = tmp_path / "m.onnx"
    code = main(["compile", str(EXAMPLE / "model.onnx"), "-o", str(out), "-t", "rknn", "--quantize", "vendor",
                 "--calib", str(EXAMPLE / "calib.npz"), "--calib-samples", "16", "--input-shape", "input=1,1,8,8",
                 "--target-option", "quantized_algorithm=mmse", "--target-option", "quantized_method=layer",
                 "--verify", "-q"])
    assert code == 0
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in onnx.load(out).graph.node)
    cfg = json.loads((tmp_path / "m.onnx.rknn.json").read_text())
    assert cfg["build"]["do_quantization"] is True and cfg["dataset_dir"] == "m.onnx.dataset"
    assert cfg["config"]["quantized_algorithm"] == "mmse" and cfg["config"]["quantized_method"] == "layer"
    assert len((tmp_path / "m.onnx.dataset" / "dataset.txt").read_text().split()) == 16
    script = (tmp_path / "m.onnx.rknn_build.py").read_text()
    compile(script, "m.onnx.rknn_build.py", "exec")  # valid Python (it runs in RKNN's own environment)
    assert "m.onnx.rknn.json" in script and "do_quantization" in script


def test_quantize_vendor_is_refused_where_no_toolchain_quantizes(tmp_path):
    with pytest.raises(UserError, match="--quantize vendor: target cpu"):
        edgec.compile(EXAMPLE / "model.onnx", tmp_path / "m.onnx", quantize="vendor", calib=EXAMPLE / "calib.npz")
    with pytest.raises(UserError, match="needs calibration data"):
        edgec.compile(EXAMPLE / "model.onnx", tmp_path / "m.onnx", target="rknn", quantize="vendor")
    with pytest.raises(UserError, match="quantized_method=row is not known"):
        edgec.compile(EXAMPLE / "model.onnx", tmp_path / "m.onnx", target="rknn", quantize="vendor",
                      calib=EXAMPLE / "calib.npz", target_options={"quantized_method": "row"})


def test_rknn_simulator_option_must_name_an_executable(tmp_path):
    """A simulator path that is not an executable is refused up front, in one line."""
    from edgec.cli import main

    src = tmp_path / "m.onnx"
    onnx.save(resnet_basic(), src)
    with pytest.raises(UserError, match="simulator=.*not an executable file"):
        edgec.compile(src, tmp_path / "o.onnx", target="rknn", quantize="int8", calib="random",
                      target_options={"simulator": str(tmp_path / "no-python")})
    assert main(["compile", str(src), "-o", str(tmp_path / "o.onnx"), "-t", "rknn", "--quantize", "int8",
                 "--calib", "random", "--target-option", f"simulator={tmp_path / 'no-python'}", "-q"]) == 2
    assert not (tmp_path / "o.onnx").exists()
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\nexit 1\n")
    python.chmod(0o755)
    with pytest.raises(UserError, match="simulator= measures a model with static input shapes"):
        edgec.compile(src, tmp_path / "o.onnx", target="rknn", quantize="int8", calib="random",
                      target_options={"simulator": str(python), "dynamic_input": "1x3x32x32;2x3x32x32"})


def test_rknn_simulator_option_without_int8_says_it_simulated_nothing(tmp_path):
    """The simulator measures --quantize int8 only; given with another mode, the report says so."""
    src = tmp_path / "m.onnx"
    onnx.save(resnet_basic(), src)
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    r = edgec.compile(src, tmp_path / "o.onnx", target="rknn", quantize="vendor", calib="random",
                      target_options={"simulator": str(fake)})
    assert any("only --quantize int8 is measured" in n for n in r.report["notes"])
    # with int8, a toolkit Python that runs neither build is a user mistake, in one line
    with pytest.raises(UserError, match="neither build ran in RKNN-Toolkit2"):
        edgec.compile(src, tmp_path / "o2.onnx", target="rknn", quantize="int8", calib="random",
                      target_options={"simulator": str(fake)})
    assert not (tmp_path / "o2.onnx").exists()


@pytest.mark.parametrize("opset", [18, 19])
def test_a_newer_opset_is_taken_down_to_what_the_target_reads(opset, tmp_path):
    """PyTorch's exporters write opset 18 and later; TensorRT 8.5 reads up to 17. The model is
    converted down with onnx's version converter when the result gives the same outputs in ONNX
    Runtime, and the report says so; --verify then compares the compiled model with the
    original (opset ``opset``) model."""
    model = onnx.version_converter.convert_version(resnet_basic(), opset)
    out = tmp_path / "m.onnx"
    r = edgec.compile(model, out, target="jetson", verify=True)
    assert r.report["verify"]["passed"]
    assert any(n.startswith(f"opset {opset} converted down to 17") for n in r.report["notes"])
    assert max(o.version for o in onnx.load(out).opset_import if o.domain in ("", "ai.onnx")) == 17


def test_an_opset_the_converter_cannot_take_down_is_refused_with_the_reason():
    """Mish is new in opset 18, and onnx's converter has no way down for it: the target's opset
    check refuses the model in one line and says why it was kept."""
    g = helper.make_graph([helper.make_node("Mish", ["x"], ["y"])], "mish",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(UserError, match=r"opset 18 is outside what TensorRT 8.5 .* \(7-17\): opset 18 kept.*"
                                        r"TensorRT 10 reads opsets up to 20 \(--target-option trt=10\)"):
        edgec.compile(model, None, target="jetson")


def test_default_valued_attributes_do_not_stop_the_conversion_down():
    """PyTorch's dynamo exporter (opset 18+) writes ReduceMean's ``noop_with_empty_axes=0``, its
    default, and onnx's converter keeps it below 18, where it is invalid: a torchvision ResNet-18
    exported so was refused for jetson. Attributes holding their default are dropped before the
    conversion (the same model); the result verifies against the original."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 8, 1, 1)).astype(np.float32), "w")
    axes = numpy_helper.from_array(np.array([2, 3], np.int64), "axes")
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
                           helper.make_node("ReduceMean", ["c", "axes"], ["y"], keepdims=1, noop_with_empty_axes=0,
                                            name="gap")],
                          "g", [f32("x", [1, 8, 4, 4])], [f32("y", [1, 8, 1, 1])], [axes, w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])
    with pytest.raises(Exception, match="noop_with_empty_axes"):  # the converter keeps it: invalid at 17
        onnx.checker.check_model(onnx.version_converter.convert_version(model, 17))
    r = edgec.compile(model, None, target="jetson", verify=True)
    assert r.report["verify"]["passed"]
    assert any(n.startswith("opset 20 converted down to 17") for n in r.report["notes"])


def test_constants_inside_an_if_body_are_folded_for_tensorrt():
    """A detector's post-processing (torchvision's SSDLite, classic exporter) computes a Slice's
    axes inside an If branch, Unsqueeze(Constant): TensorRT's parser needs them as an
    initializer, and jetson refused the model. Constants inside If/Loop/Scan bodies are now
    folded, and the compiled model verifies against the original."""
    def branch(name, start):
        c = lambda n, v: helper.make_node("Constant", [], [n], value=numpy_helper.from_array(np.array(v, np.int64)))
        nodes = [c(f"{name}_st", [start]), c(f"{name}_en", [start + 2]), c(f"{name}_ax0", 1),
                 helper.make_node("Unsqueeze", [f"{name}_ax0", "zero"], [f"{name}_ax"]),
                 helper.make_node("Slice", ["x", f"{name}_st", f"{name}_en", f"{name}_ax"], [f"{name}_y"])]
        return helper.make_graph(nodes, name, [], [f32(f"{name}_y", ["a", "b", "c"])])
    zero = numpy_helper.from_array(np.array([0], np.int64), "zero")
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "thr"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=branch("then", 0), else_branch=branch("else", 2))]
    g = helper.make_graph(nodes, "if_slice", [f32("x", [1, 4, 4])], [f32("y", ["a", "b", "c"])],
                          [zero, numpy_helper.from_array(np.array(0.0, np.float32), "thr")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    r = edgec.compile(model, None, target="jetson", verify=True)
    assert r.report["verify"]["passed"]


@pytest.mark.parametrize("channels", [6, 5])
def test_an_opset_18_split_is_taken_down_with_its_sizes_as_an_input(channels):
    """PyTorch's dynamo exporter writes ShuffleNetV2's channel split as opset 18's
    ``Split(num_outputs=2)``, and onnx's converter has no way down for it. The Split gets its
    sizes as a constant input (ONNX's rule for an uneven split: chunks of ceil(n / k), the last
    smaller; 5 channels give 3 and 2) and the model goes down to 17, its outputs the same."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((channels, 3, 1, 1)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Split", ["c"], ["a", "b"], axis=1, num_outputs=2, name="split"),
             helper.make_node("Relu", ["a"], ["ra"], name="relu"),
             helper.make_node("Concat", ["b", "ra"], ["y"], axis=1, name="cat")]
    g = helper.make_graph(nodes, "split18", [f32("x", [1, 3, 4, 4])], [f32("y", [1, channels, 4, 4])], [w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model, full_check=True)
    with pytest.raises(Exception, match="Split"):
        onnx.version_converter.convert_version(model, 17)
    r = edgec.compile(model, None, target="jetson", verify=True)
    assert r.report["verify"]["passed"]
    assert any(n.startswith("opset 18 converted down to 17") for n in r.report["notes"])


def test_folding_subgraphs_leaves_onnx_runtimes_log_level_alone(monkeypatch):
    """ONNX Runtime's log level is process-wide with no getter: folding inside an If body used to
    set it to 4 and back to 2, whatever the caller had set (session-28 review)."""
    import onnxruntime as ort
    calls = []
    monkeypatch.setattr(ort, "set_default_logger_severity", lambda level: calls.append(level))
    test_constants_inside_an_if_body_are_folded_for_tensorrt()
    assert calls == []


def test_the_split_sizes_constant_takes_a_free_name():
    """The sizes given to an opset-18 Split on the way down take a name no tensor has: a model
    that already had ``a__split_sizes`` was refused with a type error (session-28 review)."""
    g = helper.make_graph([helper.make_node("Split", ["x"], ["a", "b"], axis=1, num_outputs=2),
                           helper.make_node("Add", ["a", "a__split_sizes"], ["y"])], "g",
                          [f32("x", [1, 4])], [f32("y", [1, 2]), f32("b", [1, 2])],
                          [numpy_helper.from_array(np.array([[5, 7]], np.float32), "a__split_sizes")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    r = edgec.compile(model, None, target="jetson", verify=True)
    assert r.report["verify"]["passed"]
    assert any(n.startswith("opset 18 converted down to 17") for n in r.report["notes"])


def test_rknn_folds_a_constant_computation_larger_than_its_inputs():
    """T5's relative-position buckets, exported with a dynamic sequence and then given fixed
    shapes: |k_pos - q_pos| over constant positions, an int64 [32, 32] made from two 256-byte
    inputs. The default fold cap (an output no larger than max(1 KiB, its inputs)) left it, and
    rknn refused the int64 Abs. The rknn pipeline folds such tensors up to 1 MiB; cpu keeps the
    default cap."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    q = numpy_helper.from_array(np.arange(32, dtype=np.int64).reshape(32, 1), "q_pos")
    k = numpy_helper.from_array(np.arange(32, dtype=np.int64).reshape(1, 32), "k_pos")
    nodes = [helper.make_node("Sub", ["k_pos", "q_pos"], ["rel"]), helper.make_node("Abs", ["rel"], ["absrel"]),
             helper.make_node("Cast", ["absrel"], ["relf"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["x", "relf"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 32, 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 32, 32])], [q, k])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    r = edgec.compile(m, None, target="rknn", verify=True)
    assert r.report["verify"]["passed"] and [n.op_type for n in r.model.graph.node] == ["Add"]
    assert "Abs" in [n.op_type for n in edgec.compile(m, None).model.graph.node]  # cpu: the default cap


def test_input_shapes_the_model_cannot_take_are_a_user_error():
    """Symbolic H/W before a Flatten -> Gemm fixed at 128 features: --input-shape 12x12 gave an
    internal error (onnx's checker on the written model; on rknn, gemm_to_conv's reshape). onnx's
    strict shape inference now names the op in one line; 8x8 compiles."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Gemm", ["f", "w"], ["y"], transB=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, "H", "W"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
                          [numpy_helper.from_array(np.ones((5, 128), np.float32), "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    for target in ("cpu", "rknn"):
        with pytest.raises(UserError, match=r"--input-shape x=1,2,12,12: the model cannot take these shapes .*Gemm"):
            edgec.compile(m, None, target=target, input_shapes={"x": [1, 2, 12, 12]})
        assert edgec.compile(m, None, target=target, input_shapes={"x": [1, 2, 8, 8]}, verify=True).report["verify"]["passed"]


def test_input_shapes_before_an_op_onnx_cannot_infer():
    """An output computed by an op onnx's shape inference does not know (com.microsoft's, or
    ai.onnx.ml's) lost its shape field when --input-shape forgot the inferred shapes: an
    internal error from onnx's checker. The output keeps its rank now."""
    g = helper.make_graph([helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    r = edgec.compile(m, None, input_shapes={"x": [1, 4]}, verify=True)
    assert r.report["verify"]["passed"]


def test_target_checks_read_nodes_inside_nested_bodies():
    """checks.all_nodes walks If/Loop/Scan bodies at any depth (through ir.subgraphs): an op a
    target refuses, two bodies deep, is named by the target's check."""
    from edgec.backends import checks

    def body(name, inner):
        node = (helper.make_node("If", ["c"], [f"{name}_y"], then_branch=inner("t"), else_branch=inner("e"))
                if callable(inner) else helper.make_node(inner, ["x"], [f"{name}_y"], name=f"{name}_op"))
        return helper.make_graph([node], name, [], [f32(f"{name}_y", [1, 4])])

    leaf = lambda name: body(name, "Relu")
    g = helper.make_graph([helper.make_node("If", ["c"], ["y"], then_branch=body("a", leaf), else_branch=leaf("b"))],
                          "nested", [helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, []), f32("x", [1, 4])],
                          [f32("y", [1, 4])])
    ir = edgec.from_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    assert sorted(n.name for n in checks.all_nodes(ir.graph) if n.op == "Relu") == ["b_op", "e_op", "t_op"]
    problems = checks.check_ops(ir, lambda n: "refused here" if n.name == "e_op" else None)
    assert len(problems) == 1 and "e_op" in problems[0], problems


def _sequence_first(t: int = 20):
    """[T, B, C] (PyTorch's sequence-first layout): MatMul, Softmax and Slice on a first dim of T."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((64, 64)) * 0.1).astype(np.float32), "w")
    c = lambda n, v: numpy_helper.from_array(np.asarray(v, np.int64), n)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Softmax", ["h"], ["s"], axis=-1),
             helper.make_node("Slice", ["s", "st", "en", "ax"], ["y"])]
    g = helper.make_graph(nodes, "seq_first", [f32("x", [t, 1, 64])], [f32("y", [t, 1, 32])],
                          [w, c("st", [8]), c("en", [40]), c("ax", [2])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_rknn_warns_not_refuses_softmax_on_a_first_dim_above_one():
    """A sequence-first model ([T, B, C]) was refused for rknn: 'Softmax with batch size 1 only
    (batch is 20)', the input's first dim read as a batch. RKNN-Toolkit2's simulator builds and
    runs it (tests/test_rknn_simulator.py); the op list's remark is now a warning."""
    r = edgec.compile(_sequence_first(), None, target="rknn")
    assert any("batch size 1" in n and "Softmax" in n for n in r.report["notes"]), r.report["notes"]
