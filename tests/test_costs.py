"""Cost analysis: parameters, MACs, bytes and peak activation memory on graphs whose costs
can be counted by hand."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import edgec
from edgec.analysis import costs
from edgec.builders import GraphBuilder


def test_conv_gemm_pool_costs_by_hand():
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    c = b.conv(x, 4, 3, bias=True)            # out 1x4x8x8, weight 4x3x3x3
    d = b.conv(c, 4, 3, group=4, bias=False)  # depthwise: weight 4x1x3x3
    p = b.maxpool(d, 2)                       # out 1x4x4x4, kernel 2x2
    y = b.gemm(b.flatten(p), 5)               # 64 -> 5
    b.output(y, "y")
    ir = edgec.from_model(b.build())
    r = costs.compute(ir)
    conv_macs = 4 * 8 * 8 * 3 * 9
    dw_macs = 4 * 8 * 8 * 1 * 9
    pool_macs = 4 * 4 * 4 * 4
    gemm_macs = 64 * 5
    assert r.macs == conv_macs + dw_macs + pool_macs + gemm_macs
    assert r.params == (4 * 3 * 9 + 4) + 4 * 9 + (5 * 64 + 5)
    assert r.bytes == 4 * r.params  # all weights are float32; Flatten has no shape tensor
    by_op = {n.op: n.macs for n in r.per_node}
    assert by_op["Gemm"] == gemm_macs


def test_peak_memory_by_liveness():
    # x(400B) -> relu a(400B) -> relu b(400B) -> add(a, b) y(400B): a lives until the add.
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [100])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [100])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    r = costs.compute(edgec.from_model(m))
    # at the Add: a, b and y are live (x died after the first Relu) = 1200 bytes
    assert r.peak_activation_bytes == 1200


def test_symbolic_batch_counts_per_item():
    w = numpy_helper.from_array(np.ones((4, 6), np.float32), "w")  # [N, 4] @ [4, 6]
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    r = costs.compute(edgec.from_model(m))
    assert r.macs == 24 and r.symbolic_dims


def test_lstm_weights_computed_in_the_graph_count():
    """An LSTM whose W and R the graph computes from initializers (PyTorch's dynamo exporter
    concatenates the gates' weights) costs what the same LSTM with constant weights costs:
    seq * batch * (|W| + |R|). It counted 0 when only constant weights were read, so the report's
    "before" MACs of such a model were far below its "after" ones (folded)."""
    seq, batch, inp, hid = 5, 2, 3, 4
    rng = np.random.default_rng(0)
    w = rng.standard_normal((1, 4 * hid, inp)).astype(np.float32)
    r = rng.standard_normal((1, 4 * hid, hid)).astype(np.float32)
    inits = [numpy_helper.from_array(w[:, :2 * hid], "w_a"), numpy_helper.from_array(w[:, 2 * hid:], "w_b"),
             numpy_helper.from_array(r[:, :2 * hid], "r_a"), numpy_helper.from_array(r[:, 2 * hid:], "r_b")]
    nodes = [helper.make_node("Concat", ["w_a", "w_b"], ["w"], axis=1),
             helper.make_node("Concat", ["r_a", "r_b"], ["r"], axis=1),
             helper.make_node("LSTM", ["x", "w", "r"], ["y"], hidden_size=hid)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [seq, batch, inp])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [seq, 1, batch, hid])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    expected = seq * batch * (w.size + r.size)
    assert costs.compute(edgec.from_model(m)).macs == expected
    res = edgec.compile(m, None, verify=True)  # folded: the weights are constants there
    assert res.report["before"]["macs"] == res.report["after"]["macs"] == expected


def test_pass_records_add_up_to_the_cost_totals():
    """What the passes say they removed equals what the before/after costs say changed, and a
    weight two layers share counts once."""
    import os

    import onnx

    path = os.path.join(os.path.dirname(onnx.__file__), "backend/test/data/light/light_resnet50.onnx")
    r = edgec.compile(path).report
    removed_nodes = sum(p["nodes_removed"] - p["nodes_added"] for p in r["passes"])
    removed_params = sum(p["params_removed"] for p in r["passes"])
    assert removed_nodes == r["before"]["nodes"] - r["after"]["nodes"]
    assert removed_params == r["before"]["params"] - r["after"]["params"]


def test_the_before_column_counts_at_the_input_shapes_given():
    """With symbolic input dims counted as 1, the report's "before" of a model compiled with
    --input-shape was a per-pixel count: a captcha recogniser read +2720% MACs after a lossless
    compile. "before" is counted at the shapes given now, as the static model's is."""
    import edgec
    from edgec.builders import plain_cnn

    static = plain_cnn()
    dynamic = onnx.ModelProto()
    dynamic.CopyFrom(static)
    for k, d in enumerate(dynamic.graph.input[0].type.tensor_type.shape.dim):
        if k >= 2:
            d.dim_param = "hw"
    shape = [d.dim_value for d in static.graph.input[0].type.tensor_type.shape.dim]
    a = edgec.compile(static, None).report["before"]
    b = edgec.compile(dynamic, None, input_shapes={static.graph.input[0].name: shape}).report["before"]
    assert b["macs"] == a["macs"] and b["params"] == a["params"], (a, b)


def test_weights_held_as_constant_nodes_inside_an_if_are_counted():
    """silero-vad keeps its weights as Constant nodes inside If branches: "before" read 0
    parameters, and the report called every weight new."""
    w = onnx.numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    branch = lambda name: onnx.helper.make_graph(
        [onnx.helper.make_node("Constant", [], [f"{name}_w"], value=w),
         onnx.helper.make_node("MatMul", ["x", f"{name}_w"], [f"{name}_y"])], name, [],
        [onnx.helper.make_tensor_value_info(f"{name}_y", onnx.TensorProto.FLOAT, [1, 4])])
    g = onnx.helper.make_graph([onnx.helper.make_node("If", ["c"], ["y"], then_branch=branch("t"), else_branch=branch("e"))],
                               "g", [onnx.helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, []),
                                     onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
                               [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])])
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)])
    import edgec

    c = costs.compute(edgec.from_model(m))
    assert c.params == 32, c.params  # both branches' weights


def test_the_before_column_counts_layers_after_a_computed_resize():
    """A Resize whose sizes a Shape computes (torchvision's SSDlite, FPN necks) leaves every
    layer after it without a shape, so 'before' (and `edgec inspect`) counted them as 0 MACs
    while 'after' counted them all. 'before' is counted with the shape arithmetic folded."""
    import edgec

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(0, .3, (4, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(0, .3, (4, 4, 3, 3)).astype(np.float32), "w2")
    c = lambda n, v: numpy_helper.from_array(np.asarray(v, np.int64), n)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["y"], pads=[1, 1, 1, 1]), helper.make_node("Shape", ["y"], ["s"]),
             helper.make_node("Slice", ["s", "two", "four"], ["hw"]),  # sizes as torchvision writes them:
             helper.make_node("Cast", ["hw"], ["hwf"], to=TensorProto.FLOAT),  # floor(hw * 2.0), which onnx's
             helper.make_node("Mul", ["hwf", "kf"], ["hwk"]), helper.make_node("Floor", ["hwk"], ["hwfl"]),  # data
             helper.make_node("Cast", ["hwfl"], ["hw2"], to=TensorProto.INT64),  # propagation does not follow
             helper.make_node("Concat", ["nc", "hw2"], ["sizes"], axis=0),
             helper.make_node("Resize", ["y", "", "", "sizes"], ["r"], mode="nearest"),
             helper.make_node("Conv", ["r", "w2"], ["z"], pads=[1, 1, 1, 1])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
                          [w1, w2, c("two", [2]), c("four", [4]), c("nc", [1, 4]),
                           numpy_helper.from_array(np.asarray([2.0], np.float32), "kf")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    r = edgec.compile(m, None)
    convs = 8 * 8 * 4 * 27 + 16 * 16 * 4 * 36
    assert r.report["before"]["macs"] == r.report["after"]["macs"] == convs, r.report["before"]
    assert edgec.inspect(m)["macs"] == r.report["before"]["macs"]
