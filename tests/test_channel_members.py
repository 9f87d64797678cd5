"""Each kind of channel-group member applies a kept-channel list to the IR.

For every kind (parameter slice, shape entry, split size, group attribute, slice window, and a
ConstantOfShape weight) a small builder model is pruned after the pruned units were made dead
(the layers reading them get zero weights for them): the rewritten member is checked, and the
pruned model must give the original outputs in ONNX Runtime.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import numpy_helper

import edgec
from edgec import verify
from edgec.analysis.channels import (ConstantEdits, GroupAttr, ParamSlice, ShapeEntry, SliceWindow, SplitSize,
                                     find_groups)
from edgec.builders import GraphBuilder
from edgec.passes.prune_channels import apply_pruning


def _group(groups, tensor):
    return next(g for g in groups if any(o.tensor == tensor for o in g.origins))


def _members(g, kind):
    return [gm for gm in g.members if isinstance(gm.member, kind)]


def _prune_dead(model, origin: str, units: list[int]):
    """Prune ``units`` of the group of ``origin`` after making them dead; check the outputs in
    ONNX Runtime against the model before pruning. Returns (IR after pruning, the group)."""
    ir = edgec.from_model(model)
    groups = find_groups(ir)
    g = _group(groups, origin)
    assert g.prunable, g.reason
    dead = set(units)
    for gm in _members(g, ParamSlice):
        mb = gm.member
        if mb.role != "weight.in":
            continue
        v = np.array(ir.const_value(mb.node.inputs[mb.slot]), copy=True)
        cols = [p * mb.block + k for p, u in zip(gm.positions, gm.units) if u in dead for k in range(mb.block)]
        sl = [slice(None)] * v.ndim
        sl[mb.axis] = cols
        v[tuple(sl)] = 0
        mb.node.inputs[mb.slot].values = v
    reference = ir.to_onnx()
    apply_pruning(ir, groups, {g.id: units})
    ir.validate()
    pruned = ir.to_onnx()
    onnx.checker.check_model(pruned)
    feeds = verify.random_inputs(reference, seed=0, batch=2)
    ref, got = verify.run(reference, feeds), verify.run(pruned, feeds)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], atol=1e-5, rtol=1e-5, err_msg=k)
    return ir, g


def _any_ir():
    b, x = _start()
    b.output(b.relu(x), "output")
    return edgec.from_model(b.build())


def _node(ir, name):
    return next(n for n in ir.nodes if n.name == name)


def _start(b=None, shape=(1, 3, 8, 8)):
    b = b or GraphBuilder("members", seed=0)
    return b, b.input("input", list(shape))


# ---------------------------------------------------------------------------- parameter slices
def test_param_slices_weights_bias_and_bn():
    b, x = _start()
    y = b.relu(b.bn(b.conv(x, 8, 3)))
    b.output(b.classifier(b.conv(y, 6, 3), 4), "output")
    model = b.build()
    g = _group(find_groups(edgec.from_model(model)), "conv_0_out")
    assert {gm.member.role for gm in _members(g, ParamSlice)} >= {"weight.out", "bias", "bn.scale", "bn.var",
                                                                     "weight.in"}
    ir, _ = _prune_dead(model, "conv_0_out", [1, 4, 6])
    assert ir.const_value(_node(ir, "conv_0").inputs[1]).shape[0] == 5
    assert ir.const_value(_node(ir, "conv_0").inputs[2]).shape == (5,)
    assert ir.const_value(_node(ir, "conv_1").inputs[1]).shape[1] == 5
    assert all(ir.const_value(t).shape == (5,) for t in _node(ir, "bn_0").inputs[1:])


# ---------------------------------------------------------------------------- group attributes
def test_group_attr_depthwise():
    b, x = _start()
    y = b.conv_bn(x, 8, 3)
    y = b.conv_bn(y, 8, 3, group=8)
    b.output(b.classifier(b.conv(y, 6, 1), 4), "output")
    model = b.build()
    g = _group(find_groups(edgec.from_model(model)), "conv_0_out")
    (gm,) = _members(g, GroupAttr)
    assert gm.member.attr == "group" and gm.member.div == 1 and gm.member.kind == "attr"
    ir, _ = _prune_dead(model, "conv_0_out", [0, 7])
    assert _node(ir, "conv_1").attrs["group"] == 6


def test_group_attr_grouped_conv_whole_groups():
    b, x = _start()
    y = b.conv_bn(x, 8, 3)
    y = b.conv_bn(y, 12, 3, group=4)
    b.output(b.classifier(b.conv(y, 6, 1), 4), "output")
    model = b.build()
    g = _group(find_groups(edgec.from_model(model)), "conv_0_out")
    assert g.channels == 4
    (gm,) = _members(g, GroupAttr)
    assert gm.member.div == 3  # 12 output channels, 3 per group
    ir, _ = _prune_dead(model, "conv_0_out", [2])
    conv = _node(ir, "conv_1")
    assert conv.attrs["group"] == 3 and ir.const_value(conv.inputs[1]).shape[:2] == (9, 2)


def test_group_attr_groupnorm_num_groups():
    b, x = _start()
    y = b.conv(x, 8, 3)
    y = b.op("GroupNormalization", [y, b.const(b.rng.uniform(0.5, 1.5, 8)), b.const(b.rng.normal(0, 0.2, 8))],
             b.shape(y), num_groups=4, epsilon=1e-5)
    b.output(b.gemm(b.flatten(b.gap(b.conv(b.relu(y), 6, 1))), 3), "output")
    model = b.build()
    model.opset_import[0].version = 21  # GroupNormalization with per-channel scale/bias
    model.ir_version = 10
    ir, _ = _prune_dead(model, "conv_0_out", [1, 3])
    gn = next(n for n in ir.nodes if n.op == "GroupNormalization")
    assert gn.attrs["num_groups"] == 2 and ir.const_value(gn.inputs[1]).shape == (4,)


# ---------------------------------------------------------------------------- split sizes
def test_split_sizes_input():
    b, x = _start()
    y = b.conv_bn(x, 8, 3)
    p, q = b.split(y, [3, 5])
    y = b.concat([b.conv(p, 4, 1), b.conv(q, 4, 1)])
    b.output(b.classifier(y, 4), "output")
    model = b.build()
    g = _group(find_groups(edgec.from_model(model)), "conv_0_out")
    assert sorted(gm.member.index for gm in _members(g, SplitSize)) == [0, 1]
    ir, _ = _prune_dead(model, "conv_0_out", [0, 5, 6])
    split = next(n for n in ir.nodes if n.op == "Split")
    assert list(ir.const_value(split.inputs[1])) == [2, 3]


def test_split_size_attribute_and_slice_attributes_apply():
    """The opset < 13 forms (Split ``split`` and Slice ``starts``/``ends`` attributes)."""
    x = gs.Variable("x", dtype=np.float32, shape=[1, 8])
    outs = [gs.Variable(f"o{i}", dtype=np.float32) for i in range(2)]
    split = gs.Node("Split", name="s", attrs={"axis": 1, "split": [3, 5]}, inputs=[x], outputs=outs)
    sl = gs.Node("Slice", name="sl", attrs={"starts": [0, 2], "ends": [1, 7], "axes": [0, 1]}, inputs=[x],
                 outputs=[gs.Variable("y", dtype=np.float32)])
    edits = ConstantEdits(_any_ir())
    SplitSize(node=split, slot=-1, index=1, elems=list(range(5))).apply(edits, [0, 2, 4])
    assert split.attrs["split"] == [3, 3]
    # window 2:7 of elements 0..7; 1, 3 and 6 go: one element before the window is left, and
    # three in it (2, 4, 5), so the window becomes 1:4
    win = SliceWindow(node=sl, slot=-1, entry=1, elems=list(range(8)), start=2, end=7)
    win.apply(edits, [0, 2, 4, 5, 7])
    assert sl.attrs["starts"] == [0, 1] and sl.attrs["ends"] == [1, 4]
    with pytest.raises(ValueError, match="would empty"):
        SliceWindow(node=sl, slot=-1, entry=1, elems=list(range(8)), start=2, end=4).apply(edits, [0, 1, 5])


# ---------------------------------------------------------------------------- slice windows
def test_slice_window_inputs():
    b, x = _start()
    y = b.conv_bn(x, 8, 3)
    shape = b.shape(y)
    shape[1] = 4
    y = b.op("Slice", [y, b.const([2], "st", np.int64), b.const([6], "en", np.int64), b.const([1], "ax", np.int64)],
             shape)
    b.output(b.classifier(b.conv(y, 6, 1), 4), "output")
    model = b.build()
    g = _group(find_groups(edgec.from_model(model)), "conv_0_out")
    (gm,) = _members(g, SliceWindow)
    assert (gm.member.start, gm.member.end) == (2, 6)
    ir, _ = _prune_dead(model, "conv_0_out", [0, 3, 7])  # one unit before the window, one inside
    sl = next(n for n in ir.nodes if n.op == "Slice")
    assert list(ir.const_value(sl.inputs[1])) == [1] and list(ir.const_value(sl.inputs[2])) == [4]


# ---------------------------------------------------------------------------- shape entries
def test_shape_entry_reshape_flatten():
    b, x = _start(shape=(1, 3, 4, 4))
    y = b.conv_bn(x, 8, 3)
    y = b.reshape(y, [1, 8 * 16])
    b.output(b.gemm(y, 5), "output")
    model = b.build()
    g = _group(find_groups(edgec.from_model(model)), "conv_0_out")
    (gm,) = _members(g, ShapeEntry)
    assert gm.member.entry == 1 and gm.member.block == 16 and gm.member.role == "shape"
    ir, _ = _prune_dead(model, "conv_0_out", [2, 5])
    rs = next(n for n in ir.nodes if n.op == "Reshape")
    assert list(ir.const_value(rs.inputs[1])) == [1, 6 * 16]


def test_shape_entry_channel_shuffle():
    b, x = _start()
    y = b.conv_bn(x, 8, 1)
    y = b.channel_shuffle(y, 2)
    b.output(b.classifier(b.conv(y, 6, 1), 4), "output")
    model = b.build()
    g = _group(find_groups(edgec.from_model(model)), "conv_0_out")
    assert g.channels == 4  # channel j of both shuffle groups is one unit
    roles = sorted((gm.member.role, gm.member.div) for gm in _members(g, ShapeEntry))
    assert roles == [("shape", 1), ("shuffle", 2)]
    ir, _ = _prune_dead(model, "conv_0_out", [1])
    first, second = [n for n in ir.nodes if n.op == "Reshape"]
    assert list(ir.const_value(first.inputs[1]))[1:3] == [2, 3] and list(ir.const_value(second.inputs[1]))[1] == 6


def test_shape_entry_resize_sizes():
    b, x = _start()
    y = b.conv_bn(x, 8, 3)
    shape = b.shape(y)
    shape[2] *= 2
    shape[3] *= 2
    y = b.op("Resize", [y, "", "", b.const(shape, "sizes", np.int64)], shape, mode="nearest")
    b.output(b.classifier(b.conv(y, 6, 1), 4), "output")
    model = b.build()
    g = _group(find_groups(edgec.from_model(model)), "conv_0_out")
    (gm,) = _members(g, ShapeEntry)
    assert gm.member.role == "sizes"
    ir, _ = _prune_dead(model, "conv_0_out", [4])
    rs = next(n for n in ir.nodes if n.op == "Resize")
    assert list(ir.const_value(rs.inputs[3])) == [1, 7, 16, 16]


def test_counted_member_refuses_a_fraction():
    node = gs.Node("Conv", name="c", attrs={"group": 4})
    with pytest.raises(ValueError, match="not divisible"):
        GroupAttr(node=node, elems=list(range(8)), attr="group", div=2).apply(ConstantEdits(_any_ir()), [0, 1, 2])


# ---------------------------------------------------------------------------- ConstantOfShape weights
def test_constant_of_shape_weight_stays_generated():
    """A uniform weight made by ConstantOfShape (as in ONNX's "light" test models) gets a new
    ConstantOfShape of the pruned shape, also when it is sliced on two axes."""
    b, x = _start()
    w_shape = b.const(np.asarray([8, 8, 3, 3], dtype=np.int64), "w_shape", dtype=np.int64)
    fill = numpy_helper.from_array(np.asarray([0.01], dtype=np.float32))
    y = b.conv_bn(x, 8, 3)
    w = b.op("ConstantOfShape", [w_shape], [8, 8, 3, 3], value=fill)
    y = b.op("Conv", [y, w], b.shape(y), node_name="conv_gen", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    b.output(b.classifier(b.conv(b.relu(y), 6, 1), 4), "output")
    model = b.build()
    ir = edgec.from_model(model)
    groups = find_groups(ir)
    g_in, g_out = _group(groups, "conv_0_out"), _group(groups, "conv_gen_out")
    apply_pruning(ir, groups, {g_in.id: [0, 1], g_out.id: [5]})
    conv = _node(ir, "conv_gen")
    prod = ir.producer(conv.inputs[1])
    assert prod is not None and prod.op == "ConstantOfShape"
    assert list(ir.const_value(prod.inputs[0])) == [7, 6, 3, 3]
    assert sum(n.op == "ConstantOfShape" for n in ir.nodes) == 1
    onnx.checker.check_model(ir.to_onnx())
