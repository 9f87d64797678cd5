"""Loading what real exporters write, and saving it back."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgec
from edgec import loader, outputs
from edgec.builders import resnet_basic
from edgec.errors import UserError

from conftest import LIGHT_DIR, assert_same_outputs, ops


def conv_model(opset=17, with_constant_node=False, init_as_input=False):
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])]
    inits = [w]
    if with_constant_node:
        nodes.insert(0, helper.make_node("Constant", [], ["w"], value=w))
        inits = []
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])]
    if init_as_input:
        inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3, 3, 3]))
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 3 if init_as_input else 8
    return m


def test_old_opset_is_converted_and_said():
    light = str(LIGHT_DIR / "light_squeezenet.onnx")
    ir = edgec.load(light)
    assert ir.opset == loader.CANONICAL_OPSET
    assert ir.info.source_opset == 9
    assert any("converted to 17" in n for n in ir.info.notes)


def test_initializers_listed_as_inputs_become_constants():
    m = conv_model(init_as_input=True)
    ir = edgec.from_model(m)
    assert [t.name for t in ir.inputs] == ["x"]
    assert ir.const_value(ir.tensors()["w"]) is not None
    out = ir.to_onnx()
    onnx.checker.check_model(out, full_check=True)
    assert_same_outputs(m, out)


def test_constant_nodes_are_lowered_to_constants():
    m = conv_model(with_constant_node=True)
    ir = edgec.from_model(m)
    assert [n.op for n in ir.nodes] == ["Conv", "Relu"]
    assert_same_outputs(m, ir.to_onnx())


def test_round_trip_keeps_metadata_and_numerics(tmp_path):
    m = resnet_basic()
    m.metadata_props.append(onnx.StringStringEntryProto(key="author", value="me"))
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    ir = edgec.load(src)
    out = tmp_path / "o.onnx"
    edgec.save(ir, out)
    back = onnx.load(out)
    onnx.checker.check_model(back, full_check=True)
    assert {p.key: p.value for p in back.metadata_props} == {"author": "me"}
    assert back.producer_name == "edgec"
    assert_same_outputs(m, back)


def test_external_data_is_loaded_and_large_models_saved_with_external_data(tmp_path, monkeypatch):
    m = resnet_basic()
    src = tmp_path / "ext.onnx"
    onnx.save(resnet_basic(), src, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.weights",
              size_threshold=64)
    assert (tmp_path / "ext.weights").exists()
    ir = edgec.load(src)
    # Pretend the weights are over the protobuf limit: the output gets one external-data file.
    monkeypatch.setattr(outputs, "EXTERNAL_DATA_THRESHOLD", 1000)
    out = tmp_path / "out" / "big.onnx"
    out.parent.mkdir()
    edgec.save(ir, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["big.onnx", "big.onnx.data"]
    onnx.checker.check_model(str(out))
    assert_same_outputs(m, onnx.load(str(out)))


def test_missing_external_data_is_a_user_error(tmp_path):
    src = tmp_path / "ext.onnx"
    onnx.save(resnet_basic(), src, save_as_external_data=True, location="gone.bin", size_threshold=64)
    os.unlink(tmp_path / "gone.bin")
    with pytest.raises(UserError, match="external data"):
        edgec.load(src)


def test_custom_domain_ops_are_carried_through():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["i"]),
             helper.make_node("MyOp", ["i"], ["y"], domain="com.acme", alpha=2.0)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.acme", 1)])
    result = edgec.compile(m)
    out = result.model
    assert ops(out) == ["Relu", "MyOp"]
    assert out.graph.node[1].domain == "com.acme" and out.graph.node[1].attribute[0].f == 2.0
    assert {o.domain: o.version for o in out.opset_import}["com.acme"] == 1


def test_if_subgraph_is_carried_through_and_verified():
    then_g = helper.make_graph([helper.make_node("Relu", ["x"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 3])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 3])])
    nodes = [helper.make_node("Identity", ["x"], ["xi"]),
             helper.make_node("ReduceSum", ["xi"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                          [numpy_helper.from_array(np.array(0, np.float32), "zero")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    result = edgec.compile(m, verify=True)
    assert "If" in ops(result.model)
    for seed in range(3):
        assert_same_outputs(m, result.model, seed=seed)


@pytest.mark.parametrize("opset", [5, 30])
def test_unsupported_opset_is_a_user_error(opset):
    with pytest.raises(UserError, match=f"opset {opset} is not supported"):
        edgec.from_model(conv_model(opset=opset))


def test_opsets_7_to_23_load_and_compile():
    """Every opset in the supported range loads (converted up to 17 or kept) and compiles."""
    for opset in (7, 9, 11, 13, 17, 19, 21, 23):
        m = conv_model(opset=opset)
        result = edgec.compile(m, verify=True)
        assert result.ir.opset == max(opset, loader.CANONICAL_OPSET)


def test_names_stay_unique_after_rewrites():
    ir = edgec.from_model(resnet_basic())
    names = {ir.unique_name("conv") for _ in range(100)}
    assert len(names) == 100 and not names & set(ir.tensors())


def test_copy_is_independent_and_needs_no_serialisation(monkeypatch):
    """IR.copy() copies nodes, tensors, attributes and shapes (constant arrays are shared, never
    modified in place) without exporting the model: the copy computes the same outputs, and
    rewriting it leaves the original as it was."""
    model = resnet_basic()
    ir = edgec.from_model(model)
    ir.infer_shapes()
    before = onnx.printer.to_text(ir.to_onnx().graph)
    exports = []
    monkeypatch.setattr(edgec.IR, "to_onnx", lambda self, **kw: exports.append(1) or onnx.ModelProto())
    dup = ir.copy()
    monkeypatch.undo()
    assert not exports
    conv = next(n for n in dup.nodes if n.op == "Conv")
    conv.attrs["strides"] = [2, 2]
    conv.outputs[0].shape[0] = 99
    dup.graph.nodes.remove(next(n for n in dup.nodes if n.op == "Relu"))
    assert onnx.printer.to_text(ir.to_onnx().graph) == before
    assert_same_outputs(model, edgec.from_model(model).copy().to_onnx())
