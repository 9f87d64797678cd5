"""Regressions found by trying edgec as a new user on real PyTorch exports (legacy and dynamo
exporters, opsets 9-18, training-mode BN, dynamic H/W, RNNs, If branches)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgec
from edgec.errors import UserError

from conftest import assert_same_outputs

RNG = np.random.default_rng(0)


def bn_training_model(n_out: int, opset: int = 13):
    c = 4
    inits = [numpy_helper.from_array(RNG.standard_normal((c, 3, 3, 3)).astype(np.float32), "W")] + \
            [numpy_helper.from_array(a.astype(np.float32), n) for a, n in
             [(RNG.uniform(0.5, 1.5, c), "g"), (RNG.uniform(-.5, .5, c), "b"), (RNG.uniform(-.5, .5, c), "m"),
              (RNG.uniform(.5, 2, c), "v")]]
    outs = ["y"] + [f"stat{i}" for i in range(1, n_out)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], outs, epsilon=1e-5, momentum=0.9)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, c, 8, 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def test_training_mode_batchnorm_below_opset_14_is_not_folded():
    """BN-9..13 with its statistics outputs declared runs in training mode (torch exports it with
    training=PRESERVE on a model in train mode): folding it would be silently wrong."""
    model = bn_training_model(5)
    result = edgec.compile(model)  # no --verify: the written model must still be right
    assert "BatchNormalization" in [n.op_type for n in result.model.graph.node]
    assert any("training mode" in n for p in result.report["passes"] for n in p["notes"])
    assert_same_outputs(model, result.model)


def test_inference_batchnorm_below_opset_14_still_folds():
    model = bn_training_model(1)
    result = edgec.compile(model, verify=True)
    assert "BatchNormalization" not in [n.op_type for n in result.model.graph.node]


def test_scalar_results_stay_scalars():
    """mean = ReduceSum / Size folds Size to a 0-d constant, which must not become shape [1]."""
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0), helper.make_node("Size", ["x"], ["n"]),
             helper.make_node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT), helper.make_node("Div", ["s", "nf"], ["y"])]
    m = helper.make_model(helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])]),
                          opset_imports=[helper.make_opsetid("", 17)])
    out = edgec.compile(m, verify=True).model
    assert [d for d in out.graph.output[0].type.tensor_type.shape.dim] == []
    assert_same_outputs(m, out)


def test_verify_with_dynamic_spatial_dims():
    """A UNet-like graph whose skip Concat needs H, W >= 2 verifies on generated inputs."""
    w = numpy_helper.from_array(RNG.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Resize", ["c", "", "scales"], ["u"], mode="nearest"),
             helper.make_node("Concat", ["u", "x"], ["y"], axis=1)]
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 7, "H", "W"])], [w, scales])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    result = edgec.compile(m, verify=True)
    assert result.report["verify"]["passed"]


def test_model_that_cannot_run_on_generated_inputs_is_a_user_error():
    """Gather with data-dependent indices out of range for random ints: ask for real inputs.
    (Generated ids that index a table directly stay inside it since session 29; an offset
    computed in the graph still takes them out.)"""
    nodes = [helper.make_node("Add", ["ids", "five"], ["shifted"]),
             helper.make_node("Gather", ["table", "shifted"], ["y"], axis=0)]
    table = numpy_helper.from_array(RNG.standard_normal((2, 4)).astype(np.float32), "table")
    five = numpy_helper.from_array(np.array(5, np.int64), "five")
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])], [table, five])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UserError, match="--inputs"):
        edgec.compile(m, verify=True)


def test_compile_report_and_inspect_agree_on_costs(tmp_path):
    from edgec import builders

    m = builders.shufflenet_v2()
    src = tmp_path / "s.onnx"
    onnx.save(m, src)
    r = edgec.compile(src, tmp_path / "o.onnx").report
    info = edgec.inspect(tmp_path / "o.onnx")
    assert r["after"]["macs"] == info["macs"] and not r["after"]["symbolic_dims"]
    assert r["before"]["macs"] == edgec.inspect(src)["macs"]


def test_rnn_macs_and_if_branch_weights_are_counted():
    h, i, seq = 8, 5, 7
    w = numpy_helper.from_array(RNG.standard_normal((1, 4 * h, i)).astype(np.float32), "W")
    r = numpy_helper.from_array(RNG.standard_normal((1, 4 * h, h)).astype(np.float32), "R")
    nodes = [helper.make_node("LSTM", ["x", "W", "R"], ["", "y"], hidden_size=h)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [seq, 1, i])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, h])], [w, r])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    assert edgec.inspect(m)["macs"] == seq * (4 * h * i + 4 * h * h)

    k = numpy_helper.from_array(RNG.standard_normal((10, 10)).astype(np.float32), "k")
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "k"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 10])], [k])
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 10])])
    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                                       helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 10])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 10])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    assert edgec.inspect(m)["params"] == 100


def test_calibration_data_that_cannot_run_is_a_user_error(tmp_path):
    """--calib random on a model with dynamic H/W (a UNet skip Concat needs H, W >= 2) says what
    to do instead of failing inside calibration; with --input-shape it compiles."""
    w = numpy_helper.from_array(RNG.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Resize", ["r", "", "scales"], ["u"], mode="nearest"),
             helper.make_node("Concat", ["u", "x"], ["y"], axis=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 7, "H", "W"])], [w, scales])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UserError, match="give --input-shape"):
        edgec.compile(m, quantize="int8", calib="random")
    r = edgec.compile(m, quantize="int8", calib="random", input_shapes={"x": [1, 3, 16, 16]}, verify=True)
    assert r.report["quantization"]["mode"] == "int8"
