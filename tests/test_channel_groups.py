"""Channel dependency analysis: golden dumps for every builder model, rule checks, blockers."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import onnx
import numpy as np
import pytest

import edgec
from edgec.analysis.channels import RULES, GroupAttr, ParamSlice, find_groups, format_groups
from edgec import builders
from edgec.builders import ALL_MODELS, GraphBuilder

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "golden" / "groups"
LIGHT = sorted(glob.glob(str(Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "*.onnx")))


def _groups(model):
    return find_groups(edgec.from_model(model))


def _by_origin(groups, tensor):
    for g in groups:
        if any(o.tensor == tensor for o in g.origins):
            return g
    raise AssertionError(f"no group with origin {tensor}")


@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_golden_groups(name, request):
    text = format_groups(_groups(ALL_MODELS[name]()))
    path = GOLDEN / f"{name}.txt"
    update = request.config.getoption("--update-golden", default=False) or os.environ.get("EDGEC_UPDATE_GOLDEN")
    if update:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    assert path.exists(), f"missing {path}: run python -m pytest tests/test_channel_groups.py --update-golden"
    assert text == path.read_text(), f"{path.name} differs (run with --update-golden to accept)"


@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_dump_is_deterministic(name):
    assert format_groups(_groups(ALL_MODELS[name]())) == format_groups(_groups(ALL_MODELS[name]()))


def test_residual_add_ties_layers():
    groups = _groups(ALL_MODELS["resnet_basic"]())
    g = _by_origin(groups, "conv_0_out")
    assert {o.tensor for o in g.origins} == {"conv_0_out", "conv_2_out"}  # identity block: stem + block output
    assert g.prunable and g.channels == 8
    roles = {(gm.member.node.name, gm.member.role) for gm in g.members if isinstance(gm.member, ParamSlice)}
    assert ("conv_1", "weight.in") in roles and ("conv_3", "weight.in") in roles and ("bn_2", "bn.scale") in roles
    out = [g for g in groups if "graph output" in g.reason]
    assert len(out) == 1 and not out[0].prunable


def test_concat_offsets_inception():
    groups = _groups(ALL_MODELS["inception"]())
    windows = []
    for g in groups:
        for gm in g.members:
            mb = gm.member
            if isinstance(mb, ParamSlice) and mb.node.name == "conv_7" and mb.role == "weight.in":
                windows.append((gm.positions[0], gm.positions[-1]))
    assert sorted(windows) == [(0, 7), (8, 19), (20, 25), (26, 31)]


def test_depthwise_group_attr_and_split_members():
    g = _by_origin(_groups(ALL_MODELS["mobilenet_v2"]()), "conv_0_out")
    assert any(isinstance(gm.member, GroupAttr) and gm.member.attr == "group" for gm in g.members)
    groups = _groups(ALL_MODELS["shufflenet_v2"]())
    assert all(g.prunable for g in groups if "graph output" not in g.reason)
    kinds = {gm.member.kind for g in groups for gm in g.members}
    assert {"split", "shape", "attr", "param"} <= kinds


def test_flatten_block_and_se_tie():
    g = _by_origin(_groups(ALL_MODELS["flatten_gemm_head"]()), "conv_1_out")
    gemm = [gm.member for gm in g.members if gm.member.node.op == "Gemm"]
    assert gemm and gemm[0].block == 16  # each channel owns 4*4 features
    g = _by_origin(_groups(ALL_MODELS["se_block"]()), "conv_1_out")
    assert {o.tensor for o in g.origins} == {"conv_1_out", "conv_3_out"}  # gate channels = feature channels


def test_attention_heads_are_units():
    groups = _groups(ALL_MODELS["transformer_encoder"]())
    g = _by_origin(groups, "matmul_0_out")
    assert g.prunable and g.channels == 4 and g.unit_sizes() == [8, 8, 8, 8]
    assert {o.tensor for o in g.origins} == {"matmul_0_out", "matmul_1_out", "matmul_2_out"}
    residual = _by_origin(groups, "matmul_5_out")
    assert not residual.prunable and "LayerNormalization" in residual.reason
    ffn = _by_origin(groups, "matmul_6_out")
    assert ffn.prunable and ffn.channels == 64


@pytest.mark.parametrize("qkv", ["slice", "gather", "split"])
def test_fused_qkv_heads_are_units(qkv):
    """One QKV projection reshaped to [B, T, 3, heads, dh] and taken apart on the 3 axis
    (paddle2onnx's Slice + Squeeze, a Gather, PyTorch's unbind as Split + Squeeze). The reshape
    was read with the 3 slices as the units, so Q, K and V would go whole, and the Squeeze of
    that axis blocked the group: PP-OCR's recogniser lost no head. The heads, tied across the
    three slices, are the units now: a head is 3 x dh columns of the projection."""
    g = _by_origin(_groups(ALL_MODELS["transformer_encoder"](qkv=qkv)), "matmul_0_out")
    assert g.prunable and g.channels == 4 and g.unit_sizes() == [24] * 4, (g.reason, g.unit_sizes())
    cols = next(gm for gm in g.members if gm.member.node.name == "matmul_0" and gm.member.role == "weight.out")
    per_unit = {u: sorted(p for p, v in zip(cols.positions, cols.units) if v == u) for u in range(4)}
    assert per_unit[1] == [*range(8, 16), *range(40, 48), *range(72, 80)]  # head 1 of q, k and v


def test_fused_kv_heads_are_tied_to_the_separate_qs_heads():
    """SegFormer's attention (and PyTorch's cross-attention): Q alone, K and V fused as [B, T, 2,
    heads, dh]. Read as heads, the K/V heads went into a group of their own, because Q's head
    reshape was read the other way too and MatMul did not tie Q's untracked head axis: pruning
    wrote a model that failed in ONNX Runtime. Only a reshape whose slices are taken one by one
    is read the other way now, and a MatMul operand holding channels on another axis blocks the
    batch axis: Q's, K's and V's heads are one group."""
    groups = _groups(ALL_MODELS["transformer_encoder"](qkv="kv"))
    g = _by_origin(groups, "matmul_0_out")
    assert g.prunable and g.channels == 4, g.reason
    assert {o.tensor for o in g.origins} == {"matmul_0_out", "matmul_1_out"}


def test_a_matmul_operand_with_channels_on_another_axis_blocks_the_batch_axis():
    """A MatMul whose A holds its channels on the contracted axis (blocked there) and whose B
    carries channels on a batch axis: A's batch axis is not tracked, so B's channels there
    cannot shrink alone."""
    b = GraphBuilder("mm", seed=0)
    x = b.input("input", [1, 8, 4])
    heads = b.transpose(b.reshape(b.linear(x, 8), [1, 8, 2, 4]), [0, 2, 3, 1])  # B: [1, 2 heads, 4, 8]
    a_ = b.linear(b.input("other", [1, 2, 4, 4]), 4)  # A: [1, 2, 4, 4], its channels on the contracted axis
    b.output(b.matmul(a_, heads), "out")  # [1, 2, 4, 8]
    groups = _groups(b.build())
    g = _by_origin(groups, "matmul_0_out")
    assert g.channels == 2 and not g.prunable and "untracked axis" in g.reason, (g.channels, g.reason)


def test_heads_merged_back_into_nchw_reach_a_1x1_conv():
    """The heads merged back into NCHW are a block of dh input channels per head of the 1x1
    projection, which Conv refused (any block): MatMul read such blocks already."""
    g = _by_origin(_groups(builders.conv_attention()), "conv_0_out")
    assert g.prunable and g.channels == 2 and g.unit_sizes() == [24, 24], g.reason
    roles = {(gm.member.node.name, gm.member.role) for gm in g.members if isinstance(gm.member, ParamSlice)}
    assert ("conv_1", "weight.in") in roles


def test_gather_moves_the_channel_axis_and_blocks_on_it():
    def build(b, x):
        y = b.transpose(b.conv_bn(x, 8, 3), [0, 2, 3, 1])  # [1, 8, 8, C]
        i = b.const(np.asarray(0, dtype=np.int64), "index", dtype=np.int64)
        row = b.op("Gather", [y, i], [1, 8, 8], axis=1)  # [1, 8, C]: the channels move to axis 2
        b.output(b.linear(row, 4), "out")
        col = b.op("Gather", [b.conv_bn(x, 6, 3), i], [1, 8, 8], axis=1)  # along the channels
        b.output(col, "col")
    groups = _groups(_tiny(build))
    assert _by_origin(groups, "conv_0_out").prunable
    g = _by_origin(groups, "conv_1_out")
    assert not g.prunable and "gathers along the channel axis" in g.reason


def _tiny(build):
    b = GraphBuilder("tiny", seed=0)
    x = b.input("input", [1, 3, 8, 8])
    build(b, x)
    return b.build()


def test_softmax_over_channels_blocks():
    def build(b, x):
        y = b.conv_bn(b.conv_bn(x, 8, 3), 6, 3)
        b.output(b.softmax(y, axis=1), "output")
    groups = _groups(_tiny(build))
    g = _by_origin(groups, "conv_1_out")
    assert not g.prunable and "Softmax" in g.reason
    assert _by_origin(groups, "conv_0_out").prunable


def test_softmax_over_other_axis_passes():
    def build(b, x):
        y = b.conv_bn(b.conv_bn(x, 8, 3), 6, 3)
        y = b.softmax(y, axis=-1)
        b.output(b.classifier(y, 4), "output")
    assert _by_origin(_groups(_tiny(build)), "conv_1_out").prunable


def test_grouped_conv_prunes_whole_groups():
    def build(b, x):
        y = b.conv_bn(x, 8, 3)
        y = b.conv_bn(y, 12, 3, group=2)
        b.output(b.classifier(y, 4), "output")
    groups = _groups(_tiny(build))
    g = _by_origin(groups, "conv_0_out")
    assert g.prunable and g.channels == 2 and g.unit_sizes() == [6, 6]  # a unit = one conv group
    assert any(isinstance(gm.member, GroupAttr) and gm.member.div == 6 for gm in g.members)
    assert "graph output" in _by_origin(groups, "output").reason


def test_depthwise_multiplier_blocks():
    def build(b, x):
        y = b.conv_bn(x, 4, 3)
        y = b.conv(y, 8, 3, group=4)
        b.output(b.classifier(y, 4), "output")
    g = _by_origin(_groups(_tiny(build)), "conv_0_out")
    assert not g.prunable and "channel multiplier" in g.reason


def test_unknown_op_blocks_with_reason():
    def build(b, x):
        y = b.conv_bn(x, 8, 3)
        y = b.op("LpNormalization", [y], b.shape(y), axis=1)
        b.output(b.classifier(y, 4), "output")
    g = _by_origin(_groups(_tiny(build)), "conv_0_out")
    assert not g.prunable and "no channel rule for LpNormalization" in g.reason


def test_residual_with_graph_input_blocks():
    def build(b, x):
        y = b.conv_bn(x, 3, 3, act=None)
        b.output(b.classifier(b.add(x, y), 4), "output")
    g = _by_origin(_groups(_tiny(build)), "conv_0_out")
    assert not g.prunable and "input" in g.reason


def test_rule_table_covers_brief_ops():
    for op in ("Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "Relu", "LeakyRelu", "PRelu",
               "Clip", "HardSwish", "HardSigmoid", "Sigmoid", "Tanh", "Elu", "MaxPool", "AveragePool",
               "GlobalAveragePool", "GlobalMaxPool", "Resize", "Pad", "Dropout", "Identity", "Cast",
               "InstanceNormalization", "Add", "Sub", "Mul", "Div", "Sum", "Max", "Min", "Concat", "Split",
               "Flatten", "Reshape", "Transpose", "LayerNormalization", "GroupNormalization", "Softmax"):
        assert op in RULES, op


@pytest.mark.parametrize("path", LIGHT, ids=[Path(p).stem for p in LIGHT])
def test_light_models_analyse(path):
    groups = _groups(onnx.load(path))
    assert groups
    assert all(g.prunable or g.reason for g in groups)
    text = format_groups(groups)
    assert text.count("group g") == len(groups)
    if "resnet50" in path or "squeezenet" in path or "vgg19" in path:
        assert sum(g.prunable for g in groups) >= len(groups) - 1


def _prunes_dead_half(m, channels: int, x: dict, out: str, atol: float = 1e-5) -> None:
    """``m`` has one prunable group of ``channels`` whose second half is dead: L1 uniform pruning
    at 50% removes exactly that half, and the outputs stay the same in ONNX Runtime."""
    import numpy as np

    groups = find_groups(edgec.from_model(m))
    found = [gr for gr in groups if gr.channels == channels]
    assert len(found) == 1 and found[0].prunable, format_groups(groups)
    res = edgec.compile(m, None, prune=0.5, importance="l1", prune_mode="uniform", round_to=1)
    after = [gr["channels_after"] for gr in res.report["pruning"]["groups"] if gr["channels_before"] == channels]
    assert after == [channels // 2], after
    np.testing.assert_allclose(edgec.verify.run(res.model, x)[out], edgec.verify.run(m, x)[out], rtol=1e-5, atol=atol)


def test_squeeze_with_known_axes_and_a_symbolic_batch():
    """tf2onnx's classifier head with a dynamic batch: GlobalAveragePool -> Squeeze(axes 2, 3)
    -> MatMul. The squeezed axes are known, so the rank is enough; the rule asked for the whole
    static shape and called the conv's group unprunable ("shape unknown"). Pruning its dead
    half keeps the outputs (ONNX Runtime, batch 3)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    w[4:] = 0.0  # channels 4..7 dead: least L1, pruned first, and exact to remove
    fc = rng.standard_normal((8, 5)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Squeeze", ["p", "axes"], ["s"]),
             helper.make_node("MatMul", ["s", "fc"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(fc, "fc"),
                           numpy_helper.from_array(np.array([2, 3], np.int64), "axes")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    _prunes_dead_half(m, 8, {"x": rng.standard_normal((3, 3, 8, 8)).astype(np.float32)}, "y", atol=1e-6)


@pytest.mark.parametrize("along", ["tokens", "channels"])
def test_concat_with_a_constant(along):
    """A constant concatenated with tracked channels. Along another axis (ViT's class token,
    which folds to a constant at a fixed batch) it holds the same channels and is sliced with
    them; along the channel axis its channels are its own and kept. The rule used the missing
    map of a constant: an AttributeError from inspect and from every --prune of a ViT. Dead
    channels (zero weights, zero in the constant) are pruned and the outputs stay the same in
    ONNX Runtime."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 16)).astype(np.float32)
    w1[:, 8:] = 0.0  # channels 8..15 dead: least L1, pruned first
    if along == "tokens":
        const = rng.standard_normal((1, 1, 16)).astype(np.float32)
        const[..., 8:] = 0.0
        cat, width, tokens = helper.make_node("Concat", ["cls", "a"], ["c"], axis=1), 16, 5
    else:
        const = rng.standard_normal((1, 4, 4)).astype(np.float32)
        cat, width, tokens = helper.make_node("Concat", ["a", "cls"], ["c"], axis=2), 20, 4
    w2 = rng.standard_normal((width, 3)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]), cat, helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, tokens, 3])],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
                           numpy_helper.from_array(const, "cls")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    _prunes_dead_half(m, 16, {"x": rng.standard_normal((1, 4, 8)).astype(np.float32)}, "y")


def test_heads_pass_through_where_isnan_after_the_softmax():
    """PyTorch's classic exporter writes scaled_dot_product_attention with a mask as
    Where(IsNaN(p), 0, p) after the softmax (BERT, DistilBERT, GPT-2 by default). Where had no
    channel rule, so every such model's heads were unprunable. Where (and the comparisons) are
    elementwise now: the groups are those of the same model without it, and pruning both gives
    the same outputs in ONNX Runtime."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from edgec.builders import transformer_encoder

    plain = transformer_encoder()
    m = onnx.ModelProto()
    m.CopyFrom(plain)
    sm = next(n for n in m.graph.node if n.op_type == "Softmax")
    p = sm.output[0]
    for n in m.graph.node:  # the softmax's readers read Where(IsNaN(p), 0, p) instead
        n.input[:] = ["p_safe" if i == p else i for i in n.input]
    at = list(m.graph.node).index(sm) + 1
    m.graph.node.insert(at, helper.make_node("Where", ["p_nan", "zero", p], ["p_safe"], name="where"))
    m.graph.node.insert(at, helper.make_node("IsNaN", [p], ["p_nan"], name="isnan"))
    m.graph.initializer.append(numpy_helper.from_array(np.array(0.0, np.float32), "zero"))
    onnx.checker.check_model(m)

    def summary(model):
        return [(g.channels, g.unit_sizes(), g.prunable) for g in find_groups(edgec.from_model(model))]
    assert summary(m) == summary(plain)
    assert (4, [8, 8, 8, 8], True) in summary(m)  # the heads
    kw = dict(prune=0.5, importance="l1", prune_mode="uniform", round_to=1)
    a, b = edgec.compile(m, None, **kw), edgec.compile(plain, None, **kw)
    after = [[g["channels_after"] for g in r.report["pruning"]["groups"]] for r in (a, b)]
    assert after[0] == after[1] and a.report["after"]["macs"] < a.report["before"]["macs"]
    x = {"input": np.random.default_rng(1).standard_normal((1, 8, 32)).astype(np.float32)}
    np.testing.assert_allclose(edgec.verify.run(a.model, x)["output"], edgec.verify.run(b.model, x)["output"],
                               rtol=1e-5, atol=1e-5)


def test_reshape_allowzero_without_a_zero_entry_passes_channels():
    """PyTorch's dynamo exporter writes every Reshape with allowzero=1, which changes nothing
    when the target has no 0 entry; the rule refused it anyway, so no head group of a dynamo
    export (and on GPT-2 no group at all) was prunable. A 0 entry is still refused."""
    import numpy as np
    from onnx import helper

    from edgec.builders import transformer_encoder

    plain = transformer_encoder()
    m = onnx.ModelProto()
    m.CopyFrom(plain)
    for n in m.graph.node:
        if n.op_type == "Reshape":
            n.attribute.append(helper.make_attribute("allowzero", 1))

    def summary(model):
        return [(g.channels, g.unit_sizes(), g.prunable) for g in find_groups(edgec.from_model(model))]
    assert summary(m) == summary(plain) and (4, [8, 8, 8, 8], True) in summary(m)
    kw = dict(prune=0.5, importance="l1", prune_mode="uniform", round_to=1)
    a, b = edgec.compile(m, None, **kw), edgec.compile(plain, None, **kw)
    x = {"input": np.random.default_rng(1).standard_normal((1, 8, 32)).astype(np.float32)}
    np.testing.assert_allclose(edgec.verify.run(a.model, x)["output"], edgec.verify.run(b.model, x)["output"],
                               rtol=1e-5, atol=1e-5)
    zero = onnx.ModelProto()  # a 0 entry (copy that dim from the input) with allowzero=1: refused
    zero.CopyFrom(m)
    shape = next(t for t in zero.graph.initializer if t.name == next(
        n for n in zero.graph.node if n.op_type == "Reshape").input[1])
    vals = list(onnx.numpy_helper.to_array(shape))
    shape.CopyFrom(onnx.numpy_helper.from_array(np.array([0] + vals[1:], np.int64), shape.name))
    assert any("allowzero=1 with a zero" in (g.reason or "") for g in find_groups(edgec.from_model(zero)))


def test_split_by_num_outputs_prunes_its_chunks():
    """Opset 18's Split(num_outputs=k), as PyTorch's dynamo exporter writes a fused QKV: the
    rule wanted constant sizes and refused the group (GPT-2's heads). The even chunks are now
    known from the channel count, and a pruned Split gets its sizes as an input. Dead channels
    are pruned; the outputs stay the same in ONNX Runtime."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 24)).astype(np.float32)
    for c in range(3):  # channels 4..7 of each chunk dead
        w[:, c * 8 + 4:c * 8 + 8] = 0.0
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Split", ["h"], ["q", "k", "v"], axis=-1, num_outputs=3),
             helper.make_node("Add", ["q", "k"], ["s"]), helper.make_node("Mul", ["s", "v"], ["t"]),
             helper.make_node("MatMul", ["t", "w2"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 5])],
                          [numpy_helper.from_array(w, "w"),
                           numpy_helper.from_array(rng.standard_normal((8, 5)).astype(np.float32), "w2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    groups = find_groups(edgec.from_model(m))
    assert [(gr.channels, gr.prunable) for gr in groups if gr.channels == 8] == [(8, True)], format_groups(groups)
    res = edgec.compile(m, None, prune=0.5, importance="l1", prune_mode="uniform", round_to=1)
    split = next(n for n in res.model.graph.node if n.op_type == "Split")
    sizes = next(t for t in res.model.graph.initializer if t.name == split.input[1])
    assert onnx.numpy_helper.to_array(sizes).tolist() == [4, 4, 4]
    assert not any(a.name == "num_outputs" for a in split.attribute)
    x = {"x": rng.standard_normal((1, 4, 8)).astype(np.float32)}
    np.testing.assert_allclose(edgec.verify.run(res.model, x)["y"], edgec.verify.run(m, x)["y"], rtol=1e-5, atol=1e-5)
