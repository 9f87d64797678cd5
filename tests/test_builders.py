"""Tests for edgec.builders: every model is valid, runnable, deterministic and has the promised structure."""

from __future__ import annotations

import functools
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from edgec.builders import ALL_MODELS, IR_VERSION, OPSET, GraphBuilder

NAMES = sorted(ALL_MODELS)

# Ops each model promises to contain (beyond the generic checks).
EXPECTED_OPS = {
    "resnet_basic": {"Conv", "BatchNormalization", "Relu", "Add", "GlobalAveragePool", "Flatten", "Gemm"},
    "resnet_bottleneck": {"Conv", "BatchNormalization", "Relu", "Add", "GlobalAveragePool", "Gemm"},
    "mobilenet_v2": {"Conv", "BatchNormalization", "Clip", "Add", "GlobalAveragePool", "Reshape", "Gemm"},
    "inception": {"Conv", "BatchNormalization", "Relu", "MaxPool", "Concat", "Gemm"},
    "densenet": {"Conv", "BatchNormalization", "Relu", "Concat", "AveragePool", "Gemm"},
    "shufflenet_v2": {"Split", "Concat", "Reshape", "Transpose", "Conv", "BatchNormalization"},
    "se_block": {"GlobalAveragePool", "Conv", "Sigmoid", "Mul", "HardSwish"},
    "flatten_gemm_head": {"Conv", "BatchNormalization", "Relu", "Flatten", "Gemm"},
    "transformer_encoder": {"MatMul", "Add", "Reshape", "Transpose", "Softmax", "LayerNormalization", "Erf", "Div"},
    "plain_cnn": {"Identity", "Dropout", "Transpose", "Reshape", "Mul", "Add", "MaxPool", "Flatten", "Gemm"},
}


@functools.lru_cache(maxsize=None)
def _model(name: str, seed: int = 0) -> onnx.ModelProto:
    return ALL_MODELS[name](seed=seed)


@functools.lru_cache(maxsize=None)
def _run(name: str):
    m = _model(name)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal(_static_shape(m.graph.input[0])).astype(np.float32)
    return sess.run(None, {m.graph.input[0].name: x})


def _static_shape(vi: onnx.ValueInfoProto) -> list[int]:
    dims = vi.type.tensor_type.shape.dim
    assert all(d.HasField("dim_value") for d in dims), f"{vi.name} has a dynamic shape"
    return [d.dim_value for d in dims]


def _inits(m: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _nodes(m: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    return [n for n in m.graph.node if n.op_type == op_type]


def test_all_models_nonempty():
    assert set(EXPECTED_OPS) == set(ALL_MODELS)


@pytest.mark.parametrize("name", NAMES)
def test_model_valid_and_runs(name):
    m = _model(name)
    onnx.checker.check_model(m, full_check=True)
    assert m.ir_version == IR_VERSION
    assert [(o.domain, o.version) for o in m.opset_import] == [("", OPSET)]
    assert len(m.graph.input) == 1 and len(m.graph.output) == 1
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    (y,) = _run(name)
    assert y.dtype == np.float32
    assert list(y.shape) == _static_shape(m.graph.output[0])
    assert np.all(np.isfinite(y))
    assert np.std(y) > 1e-3  # not degenerate


@pytest.mark.parametrize("name", NAMES)
def test_model_deterministic(name):
    a = _model(name).SerializeToString()
    assert ALL_MODELS[name](seed=0).SerializeToString() == a
    assert _model(name, 1).SerializeToString() != a


@pytest.mark.parametrize("name", NAMES)
def test_model_structure(name):
    m = _model(name)
    ops = Counter(n.op_type for n in m.graph.node)
    missing = EXPECTED_OPS[name] - set(ops)
    assert not missing, f"{name} lacks {missing}"
    names = [n.name for n in m.graph.node]
    assert len(set(names)) == len(names) and all(names)
    if name != "plain_cnn":
        assert "Identity" not in ops and "Dropout" not in ops

    inits = _inits(m)
    for bn in _nodes(m, "BatchNormalization"):
        g, b, mean, var = (inits[i] for i in bn.input[1:])
        assert np.all(var > 0)
        assert not np.allclose(g, 1) and not np.allclose(b, 0) and not np.allclose(mean, 0)
        assert _attr(bn, "epsilon") == pytest.approx(1e-5)


def test_conv_bias_present_and_absent():
    convs = [n for name in NAMES for n in _nodes(_model(name), "Conv")]
    assert any(len(c.input) == 3 for c in convs)
    assert any(len(c.input) == 2 for c in convs)
    # Realistic: a conv feeding BN directly has no bias, except where plain_cnn plants one.
    for name in NAMES:
        m = _model(name)
        producer = {o: n for n in m.graph.node for o in n.output}
        for bn in _nodes(m, "BatchNormalization"):
            p = producer.get(bn.input[0])
            if p is not None and p.op_type == "Conv" and name != "plain_cnn":
                assert len(p.input) == 2


def test_resnet_structure():
    m = _model("resnet_basic")
    assert len(_nodes(m, "Add")) == 2
    inits = _inits(m)
    one_by_one_strided = [
        c for c in _nodes(m, "Conv") if inits[c.input[1]].shape[2:] == (1, 1) and _attr(c, "strides") == [2, 2]
    ]
    assert len(one_by_one_strided) == 1  # downsample projection
    mb = _model("resnet_bottleneck")
    assert len(_nodes(mb, "Add")) >= 2
    kernels = [_inits(mb)[c.input[1]].shape[2] for c in _nodes(mb, "Conv")]
    assert kernels.count(1) > kernels.count(3)


def test_mobilenet_depthwise_and_relu6():
    m = _model("mobilenet_v2")
    inits = _inits(m)
    dw = [c for c in _nodes(m, "Conv") if _attr(c, "group", 1) > 1]
    assert dw
    for c in dw:
        w = inits[c.input[1]]
        assert w.shape[1] == 1 and _attr(c, "group") == w.shape[0]
    for clip in _nodes(m, "Clip"):
        assert float(inits[clip.input[1]]) == 0.0 and float(inits[clip.input[2]]) == 6.0
    assert len(_nodes(m, "Add")) >= 2


def test_inception_concat_four_branches():
    m = _model("inception")
    (cat,) = _nodes(m, "Concat")
    assert len(cat.input) == 4 and _attr(cat, "axis") == 1
    consumers = [n for n in m.graph.node if cat.output[0] in n.input]
    assert [n.op_type for n in consumers] == ["Conv"]


def test_densenet_concat_grows():
    m = _model("densenet")
    cats = _nodes(m, "Concat")
    assert len(cats) == 3
    for c in cats[1:]:
        assert c.input[0] in {o for prev in cats for o in prev.output}


def test_shufflenet_split_and_shuffle():
    m = _model("shufflenet_v2")
    inits = _inits(m)
    for sp in _nodes(m, "Split"):
        assert len(sp.input) == 2 and inits[sp.input[1]].dtype == np.int64
        assert len(set(inits[sp.input[1]].tolist())) == 1  # equal halves
    transposes = _nodes(m, "Transpose")
    assert transposes and all(_attr(t, "perm") == [0, 2, 1, 3, 4] for t in transposes)
    five_d = [r for r in _nodes(m, "Reshape") if len(inits[r.input[1]]) == 5]
    assert len(five_d) == len(transposes)
    assert all(inits[r.input[1]].dtype == np.int64 for r in _nodes(m, "Reshape"))


def test_se_block_gating():
    m = _model("se_block")
    ops = Counter(n.op_type for n in m.graph.node)
    assert ops["Sigmoid"] >= 2 and ops["Mul"] >= 2  # SE gate + SiLU
    sig_outs = {n.output[0]: n for n in _nodes(m, "Sigmoid")}
    # SiLU: Mul(x, Sigmoid(x))
    assert any(
        n.input[1] in sig_outs and sig_outs[n.input[1]].input[0] == n.input[0] for n in _nodes(m, "Mul")
    )


def test_flatten_gemm_head_features():
    m = _model("flatten_gemm_head")
    inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    shapes = {v.name: _static_shape(v) for v in inferred.graph.value_info}
    (flat,) = _nodes(m, "Flatten")
    n, c, h, w = shapes[flat.input[0]]
    assert h > 1 and w > 1
    gemm = _nodes(m, "Gemm")[0]
    assert gemm.input[0] == flat.output[0] and _attr(gemm, "transB") == 1
    assert _inits(m)[gemm.input[1]].shape[1] == c * h * w


def test_transformer_structure():
    m = _model("transformer_encoder")
    assert _attr(_nodes(m, "Softmax")[0], "axis") == -1
    assert len(_nodes(m, "LayerNormalization")) == 2
    perms = [_attr(t, "perm") for t in _nodes(m, "Transpose")]
    assert perms.count([0, 2, 1, 3]) == 3 and perms.count([0, 2, 3, 1]) == 1
    assert len(_nodes(m, "MatMul")) == 8  # q, k, v, qk, av, out, ffn1, ffn2


def test_plain_cnn_cleanup_fodder():
    m = _model("plain_cnn")
    inits = _inits(m)
    producer = {o: n for n in m.graph.node for o in n.output}
    # consecutive Transposes that cancel
    pairs = [
        (producer[t.input[0]], t) for t in _nodes(m, "Transpose")
        if t.input[0] in producer and producer[t.input[0]].op_type == "Transpose"
    ]
    assert pairs
    p1, p2 = (_attr(t, "perm") for t in pairs[0])
    assert [p1[i] for i in p2] == list(range(len(p1)))
    # Reshape chain
    assert any(producer.get(r.input[0]) is not None and producer[r.input[0]].op_type == "Reshape"
               for r in _nodes(m, "Reshape"))
    # Conv -> Mul[1,C,1,1] -> Add[1,C,1,1]
    (mul,) = _nodes(m, "Mul")
    assert producer[mul.input[0]].op_type == "Conv" and inits[mul.input[1]].shape[::2] == (1, 1)
    add = next(n for n in m.graph.node if mul.output[0] in n.input)
    assert add.op_type == "Add" and inits[add.input[1]].ndim == 4


def test_graph_builder_shapes_match_inference():
    """Tracked shapes agree with ONNX strict shape inference and onnxruntime for every builder op."""
    b = GraphBuilder("adhoc", seed=3)
    x = b.input("x", [2, 4, 9, 9])
    y = b.conv(x, 8, 3, stride=2, bias=True)
    y = b.hardswish(b.bn(y))
    y = b.add(y, b.conv(x, 8, (1, 1), stride=2, pad=0, bias=False))
    a, c = b.split(y, [3, 5])
    y = b.concat([c, b.clip(a, -1.0, 1.0)])
    y = b.channel_shuffle(b.dwconv(y), 2)
    y = b.maxpool(b.relu(b.conv(y, 6, 3, dilation=2, group=2)), 3, 1, 1)
    y = b.avgpool(b.silu(b.mul(y, b.sigmoid(b.gap(y)))), 2)
    y = b.gemm(b.flatten(y), 12)
    t = b.reshape(y, [2, 3, -1])
    t = b.layernorm(b.linear(t, 6))
    t = b.softmax(b.matmul(t, b.transpose(t, [0, 2, 1])), axis=-1)
    t = b.gelu(b.sub(b.div(t, 2.0), b.tanh(t)))
    out = b.output(b.dropout(b.identity(t)), "out")
    assert out == "out"
    m = b.build(value_info=True)
    onnx.checker.check_model(m, full_check=True)

    bare = b.build()
    inferred = onnx.shape_inference.infer_shapes(bare, strict_mode=True)
    got = {v.name: _static_shape(v) for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for node in bare.graph.node:
        for o in node.output:
            assert got[o] == b.shape(o), (node.op_type, o)

    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    (res,) = sess.run(None, {"x": np.ones([2, 4, 9, 9], np.float32)})
    assert list(res.shape) == b.shape("out") == [2, 3, 3] and np.all(np.isfinite(res))


def test_graph_builder_unique_names():
    b = GraphBuilder(seed=0)
    x = b.input("input", [1, 2, 4, 4])
    ys = [b.relu(x) for _ in range(3)]
    assert len(set(ys)) == 3
    with pytest.raises(ValueError):
        b.input("input", [1])
    with pytest.raises(ValueError):
        b.conv(x, 3, group=2)
    # outputting an input needs an Identity; outputting a node output renames in place
    b.output(x, "passthrough")
    b.output(b.concat(ys), "cat")
    m = b.build()
    onnx.checker.check_model(m, full_check=True)
    assert [o.name for o in m.graph.output] == ["passthrough", "cat"]
    assert Counter(n.op_type for n in m.graph.node)["Identity"] == 1


NPU_EXPECTED = {
    "efficientnet": {"Conv", "BatchNormalization", "Sigmoid", "Mul", "Add", "GlobalAveragePool", "Gemm"},
    "mobilenet_v3": {"Conv", "BatchNormalization", "HardSwish", "HardSigmoid", "Relu", "Mul", "Gemm"},
    "convnext": {"Conv", "Transpose", "LayerNormalization", "MatMul", "Erf", "Mul", "Add", "Gemm"},
}


@pytest.mark.parametrize("name", sorted(NPU_EXPECTED))
def test_npu_style_models_are_valid_deterministic_and_have_their_structure(name):
    from edgec.builders import NPU_MODELS

    m = NPU_MODELS[name]()
    onnx.checker.check_model(m, full_check=True)
    assert NPU_EXPECTED[name] <= {n.op_type for n in m.graph.node}
    assert NPU_MODELS[name]().SerializeToString() == m.SerializeToString()
    if name != "efficientnet":  # depthwise 5x5 / 7x7 where the structure says so
        k = 7 if name == "convnext" else 5
        kernels = [list(a.ints) for n in m.graph.node if n.op_type == "Conv" for a in n.attribute
                   if a.name == "kernel_shape"]
        assert [k, k] in kernels
    x = np.random.default_rng(0).normal(size=(1, 3, 64, 64)).astype(np.float32)
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert y.shape == (1, 10) and np.isfinite(y).all() and y.std() > 1e-3
