"""Property tests: on random DAGs of Conv/BN/Relu/Add/Concat/pooling/Gemm/Reshape/Transpose
(plus Identity/Dropout/affine constants), the target's lossless pipeline keeps ONNX Runtime
outputs equal (rtol 1e-4, atol 1e-5) and never grows MACs or params."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import edgec
from edgec.analysis import costs
from edgec.backends import get_target
from edgec.builders import GraphBuilder
from edgec.pipeline import PassManager

from conftest import assert_same_outputs

OPS = ["conv", "conv_bn", "dwconv_bn", "relu", "add", "concat", "maxpool", "avgpool", "transpose_pair",
       "reshape_pair", "identity", "dropout", "affine", "bn"]


@st.composite
def random_model(draw):
    seed = draw(st.integers(0, 2**16))
    b = GraphBuilder(seed=seed)
    c0 = draw(st.integers(1, 6))
    hw = draw(st.sampled_from([4, 6, 8]))
    x = b.input("input", [1, c0, hw, hw])
    live = [x]
    for op in draw(st.lists(st.sampled_from(OPS), min_size=1, max_size=12)):
        cur = live[-1]
        n, c, h, w = b.shape(cur)
        if op == "conv":
            cur = b.conv(cur, draw(st.integers(1, 8)), draw(st.sampled_from([1, 3])), bias=draw(st.booleans()))
        elif op == "conv_bn":
            cur = b.bn(b.conv(cur, draw(st.integers(1, 8)), draw(st.sampled_from([1, 3])), bias=draw(st.booleans())))
        elif op == "dwconv_bn":
            cur = b.bn(b.dwconv(cur))
        elif op == "bn":
            cur = b.bn(cur)
        elif op == "relu":
            cur = b.relu(cur)
        elif op == "add":
            same = [t for t in live[:-1] if b.shape(t) == b.shape(cur)]
            if not same:
                continue
            cur = b.add(cur, draw(st.sampled_from(same)))
        elif op == "concat":
            same = [t for t in live[:-1] if b.shape(t)[2:] == [h, w]]
            if not same:
                continue
            cur = b.concat([draw(st.sampled_from(same)), cur])
        elif op in ("maxpool", "avgpool"):
            if h < 2:
                continue
            cur = b.maxpool(cur) if op == "maxpool" else b.avgpool(cur)
        elif op == "transpose_pair":
            cur = b.transpose(b.transpose(cur, [0, 2, 3, 1]), [0, 3, 1, 2])
        elif op == "reshape_pair":
            cur = b.reshape(b.reshape(cur, [1, c, h * w]), [1, c, h, w])
        elif op == "identity":
            cur = b.identity(cur)
        elif op == "dropout":
            cur = b.dropout(cur)
        elif op == "affine":
            cur = b.channel_affine(cur, scale=draw(st.booleans()), shift=True)
        live.append(cur)
    y = b.gemm(b.flatten(b.gap(live[-1])), draw(st.integers(1, 5)))
    b.output(y, "output")
    return b.build()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=random_model())
def test_lossless_pipeline_preserves_outputs_and_never_grows(model):
    ir = edgec.from_model(model)
    before = costs.compute(ir)
    PassManager(get_target("cpu").passes()).run(ir)
    after = costs.compute(ir)
    out = ir.to_onnx()
    for seed in (0, 1):
        assert_same_outputs(model, out, seed=seed, rtol=1e-4, atol=1e-5)
    assert after.macs <= before.macs
    assert after.params <= before.params
    assert after.nodes <= before.nodes
