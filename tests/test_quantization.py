"""QDQ quantization: numerics against numpy, placement/fusion in ONNX Runtime, the example model."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgec
from edgec import calibdata, executor, quantize_api, report, runtime, verify
from edgec.builders import ALL_MODELS, GraphBuilder
from edgec.errors import UserError
from edgec.passes.quantize import QuantizeQDQ

from conftest import digits_data

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "digits"


def _opset17(g: onnx.GraphProto) -> onnx.ModelProto:
    """``g`` as an opset-17, IR-version-8 model (the hand-built graphs of this file)."""
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


# ------------------------------------------------------------------ numpy references
def np_quantize(x, scale, zp, qmin, qmax, axis=None):
    """ONNX QuantizeLinear: round half to even, saturate."""
    x = np.asarray(x, dtype=np.float64)
    if axis is not None:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale = np.asarray(scale, dtype=np.float64).reshape(shape)
        zp = np.asarray(zp, dtype=np.float64).reshape(shape)
    return np.clip(np.rint(x / scale) + zp, qmin, qmax)


def np_fake_quant(x, scale, zp, qmin, qmax, axis=None):
    q = np_quantize(x, scale, zp, qmin, qmax, axis)
    if axis is not None:
        shape = [1] * q.ndim
        shape[axis] = -1
        scale = np.asarray(scale, dtype=np.float64).reshape(shape)
        zp = np.asarray(zp, dtype=np.float64).reshape(shape)
    return ((q - zp) * scale).astype(np.float32)


def session(model, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL, optimized_path=None):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 3
    if optimized_path:
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def fused_ops(model, tmp_path, level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED) -> Counter:
    path = tmp_path / "ort_optimized.onnx"
    session(model, level, path)
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def one_layer_model(op: str, *, trans_b: int = 1, group: int = 1, seed: int = 0):
    rng = np.random.default_rng(seed)
    if op in ("Conv", "ConvTranspose"):
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 6, 6])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
        wshape = [6, 4 // group, 3, 3] if op == "Conv" else [4, 6 // group, 3, 3]
        w = rng.normal(0, 0.3, wshape).astype(np.float32)
        w[0] *= 10  # a channel with a much larger range: per-channel scales matter
        b = rng.normal(0, 0.5, 6).astype(np.float32)
        node = helper.make_node(op, ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1], group=group)
    else:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 8])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
        w = rng.normal(0, 0.3, [6, 8] if (op == "Gemm" and trans_b) else [8, 6]).astype(np.float32)
        b = rng.normal(0, 0.5, 6).astype(np.float32)
        if op == "Gemm":
            node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=trans_b)
        else:
            node = helper.make_node("MatMul", ["x", "w"], ["y"])
    inits = [numpy_helper.from_array(w, "w")] + ([numpy_helper.from_array(b, "b")] if node.op_type != "MatMul" else [])
    g = helper.make_graph([node], "one", [x], [y], inits)
    return _opset17(g), w, (b if node.op_type != "MatMul" else None)


def quantize_with_ranges(model, ranges, **kw) -> onnx.ModelProto:
    ir = edgec.from_model(model)
    edgec.run_passes(ir, [QuantizeQDQ(ranges, **kw)])
    return ir.to_onnx()


def dq_values(model: onnx.ModelProto, feeds) -> dict[str, np.ndarray]:
    """Every DequantizeLinear output of ``model`` computed by ONNX Runtime."""
    names = [n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"]
    from edgec.calibration import augment

    sess = session(augment(model, names))
    outs = sess.run(names, feeds)
    return dict(zip(names, outs))


# ------------------------------------------------------------------ numerics
SCHEMES = [
    ("Conv", "asymmetric", "per-channel", "int8", {}),
    ("Conv", "symmetric", "per-tensor", "int8", {}),
    ("Conv", "asymmetric", "per-channel", "int4", {}),
    ("Conv", "symmetric", "per-channel", "int4", {"group": 2}),
    ("ConvTranspose", "asymmetric", "per-channel", "int8", {}),
    ("Gemm", "asymmetric", "per-channel", "int8", {"trans_b": 1}),
    ("Gemm", "symmetric", "per-channel", "int8", {"trans_b": 0}),
    ("Gemm", "asymmetric", "per-tensor", "int4", {"trans_b": 0}),
    ("MatMul", "asymmetric", "per-channel", "int8", {}),
    ("MatMul", "symmetric", "per-channel", "int4", {}),
]


@pytest.mark.parametrize("op,acts,wmode,bits,kw", SCHEMES, ids=[f"{s[0]}-{s[1]}-{s[2]}-{s[3]}-{s[4]}" for s in SCHEMES])
def test_qdq_numerics_match_numpy(op, acts, wmode, bits, kw):
    model, w, b = one_layer_model(op, **kw)
    rng = np.random.default_rng(1)
    xshape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = rng.normal(0.3, 1.0, xshape).astype(np.float32)
    lo, hi = -1.25, 2.0  # the calibrated range: values outside must saturate
    x.flat[:4] = [5.0, -5.0, 0.0, hi]
    ref_y = verify.run(model, {"x": x})["y"]
    q = quantize_with_ranges(model, {"x": (lo, hi), "y": (float(ref_y.min()), float(ref_y.max()))},
                             activations=acts, weights=wmode, precisions={model.graph.node[0].output[0]: bits})
    onnx.checker.check_model(q, full_check=True)

    # activation parameters, by the book
    if acts == "asymmetric":
        s_x = np.float32((hi - lo) / 255)
        zp_x = int(np.rint(-lo / s_x))
        qmin, qmax = 0, 255  # QuantizeLinear saturates to the full uint8 range
        # half-way points between two levels round to even
        x.flat[4:6] = [(2.5 - zp_x) * s_x, (3.5 - zp_x) * s_x]
    else:
        s_x, zp_x = np.float32(max(-lo, hi) / 127), 0
        qmin, qmax = -128, 127  # the scale uses [-127, 127]; QuantizeLinear saturates to int8's range
        x.flat[4:6] = [2.5 * s_x, -3.5 * s_x]
    x_ref = np_fake_quant(x, s_x, zp_x, qmin, qmax)
    # weights
    axis = {"Conv": 0, "ConvTranspose": 1, "Gemm": 0 if kw.get("trans_b", 1) else 1, "MatMul": 1}[op]
    if op == "Conv" and kw.get("group", 1) > 1:
        axis = 0
    qw = 127 if bits == "int8" else 7
    if wmode == "per-channel":
        moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        s_w = (np.abs(moved).max(axis=1) / qw).astype(np.float32)
        w_ref = np_fake_quant(w, s_w, np.zeros_like(s_w), -qw - 1, qw, axis=axis)
    else:
        s_w = np.float32(np.abs(w).max() / qw)
        w_ref = np_fake_quant(w, s_w, 0, -qw - 1, qw)
    if bits == "int4":
        wq = [numpy_helper.to_array(i) for i in q.graph.initializer if i.name.endswith("_weight_quantized")][0]
        assert wq.min() >= -8 and wq.max() <= 7, "int4 weights must be in [-8, 7]"

    dqs = dq_values(q, {"x": x})
    got_x = [v for k, v in dqs.items() if k.startswith("x_dequantized")][0]
    np.testing.assert_array_equal(got_x, x_ref)  # exact: round-half-even + saturation
    got_w = [v for k, v in dqs.items() if "_weight_dequantized" in k][0]
    np.testing.assert_allclose(got_w, w_ref, rtol=1e-6, atol=1e-7)

    # bias: int32 with scale s_x * s_w (per output channel)
    if b is not None:
        got_b = [v for k, v in dqs.items() if "_bias_dequantized" in k][0]
        s_b = (np.float64(s_x) * np.broadcast_to(np.asarray(s_w, dtype=np.float64), (b.shape[0],))).astype(np.float32)
        b_ref = (np.rint(b / s_b.astype(np.float64)) * s_b).astype(np.float32)
        np.testing.assert_allclose(got_b, b_ref, rtol=1e-6, atol=1e-7)
        bq = [numpy_helper.to_array(i) for i in q.graph.initializer if i.name.endswith("_bias_quantized")][0]
        assert bq.dtype == np.int32

    # the layer on the numpy-fake-quantized operands, run as float: same result as the QDQ model
    float_ref = onnx.ModelProto()
    float_ref.CopyFrom(model)
    for init in float_ref.graph.initializer:
        if init.name == "w":
            init.CopyFrom(numpy_helper.from_array(w_ref, "w"))
        if init.name == "b" and b is not None:
            init.CopyFrom(numpy_helper.from_array(b_ref, "b"))
    y_ref = verify.run(float_ref, {"x": x_ref})["y"]
    y_q = session(q).run(None, {"x": x})[0]
    out_ranges = (float(ref_y.min()), float(ref_y.max()))
    if op == "Gemm":  # graph output read by no quantized op: QGemm's float output, no Q
        np.testing.assert_allclose(y_q, y_ref, rtol=1e-5, atol=1e-5)
    else:
        # graph outputs stay float: no Q after the layer
        assert not any(n.op_type == "QuantizeLinear" and n.input[0] == "y" for n in q.graph.node)
        np.testing.assert_allclose(y_q, y_ref, rtol=1e-5, atol=1e-5)
    del out_ranges


@pytest.mark.parametrize("op,kw", [("Conv", {}), ("Gemm", {"trans_b": 1}), ("MatMul", {})])
@pytest.mark.parametrize("weight_type", ["int7", "uint8"])
def test_no_vnni_weight_types_match_numpy(op, kw, weight_type):
    """The two weight types that cannot saturate a no-VNNI CPU's int16 pairs, by the book: int7
    is symmetric [-63, 63]; uint8 is asymmetric per channel over [min(w, 0), max(w, 0)] with a
    zero point (depthwise convs keep int8: test_numerics.py). The QDQ layer computes the float
    layer on those fake-quantized operands (reference arithmetic)."""
    model, w, b = one_layer_model(op, **kw)
    rng = np.random.default_rng(2)
    x = rng.normal(0.3, 1.0, [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]).astype(np.float32)
    ref_y = verify.run(model, {"x": x})["y"]
    q = quantize_with_ranges(model, {"x": (-1.25, 2.0), "y": (float(ref_y.min()), float(ref_y.max()))},
                             weight_type=weight_type)
    onnx.checker.check_model(q, full_check=True)
    axis = {"Conv": 0, "Gemm": 0, "MatMul": 1}[op]
    moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1).astype(np.float64)
    wq = [numpy_helper.to_array(i) for i in q.graph.initializer if i.name.endswith("_weight_quantized")][0]
    if weight_type == "int7":
        qw = 63
        s_w = (np.abs(moved).max(axis=1) / qw).astype(np.float32)
        w_ref = np_fake_quant(w, s_w, np.zeros_like(s_w), -qw, qw, axis=axis)
        assert wq.dtype == np.int8 and np.abs(wq.astype(np.int32)).max() == qw
    else:
        lo, hi = np.minimum(moved.min(axis=1), 0), np.maximum(moved.max(axis=1), 0)
        s_w = ((hi - lo) / 255).astype(np.float32)
        zp = np.clip(np.rint(-lo / s_w.astype(np.float64)), 0, 255)
        w_ref = np_fake_quant(w, s_w, zp, 0, 255, axis=axis)
        assert wq.dtype == np.uint8 and wq.min() == 0 and wq.max() == 255
    got_w = [v for k, v in dq_values(q, {"x": x}).items() if "_weight_dequantized" in k][0]
    np.testing.assert_allclose(got_w, w_ref, rtol=1e-6, atol=1e-7)
    # the float layer on the fake-quantized weights and input, against the QDQ model
    s_x = np.float32(3.25 / 255)
    x_ref = np_fake_quant(x, s_x, int(np.rint(1.25 / s_x)), 0, 255)
    float_ref = onnx.ModelProto()
    float_ref.CopyFrom(model)
    dqs = dq_values(q, {"x": x})
    for init in float_ref.graph.initializer:
        if init.name == "w":
            init.CopyFrom(numpy_helper.from_array(w_ref, "w"))
        if init.name == "b" and b is not None:
            init.CopyFrom(numpy_helper.from_array([v for k, v in dqs.items() if "_bias_dequantized" in k][0], "b"))
    np.testing.assert_allclose(session(q).run(None, {"x": x})[0], verify.run(float_ref, {"x": x_ref})["y"],
                               rtol=1e-5, atol=1e-5)


def test_activation_params_and_weight_quantizer_by_hand():
    from edgec.quant_plan import activation_params, quantize_weight

    s, zp = activation_params(-1.0, 3.0, symmetric=False)
    assert np.isclose(s, 4 / 255) and zp == 64
    s, zp = activation_params(0.0, 6.0, symmetric=False)
    assert zp == 0  # ReLU-floored ranges keep 0 at the bottom: the Q saturation is the ReLU
    s, zp = activation_params(-2.0, 1.0, symmetric=True)
    assert np.isclose(s, 2 / 127) and zp == 0
    w = np.array([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0], [-3.0, 1.5, 0.1]], dtype=np.float32)
    q, sc = quantize_weight(w, 0, 8)
    np.testing.assert_allclose(sc, [1 / 127, 1.0, 3 / 127], rtol=1e-6)
    np.testing.assert_array_equal(q[0], [127, -64, 32])  # -63.5 -> -64 (half to even), 31.75 -> 32
    q4, sc4 = quantize_weight(np.array([[-7.0, 3.5, 2.5, -0.5]], dtype=np.float32), 0, 4)
    assert float(sc4[0]) == 1.0
    np.testing.assert_array_equal(q4[0], [-7, 4, 2, 0])  # halves to even


# ------------------------------------------------------------------ placement and fusion
@pytest.fixture(scope="module")
def digits():
    d = digits_data()
    model = onnx.load(str(EXAMPLE / "model.onnx"))
    return model, d


def _accuracy(model, x, y) -> float:
    """Top-1 in reference arithmetic (exact QDQ): the same on any host, whatever its kernels."""
    out = session(model).run(None, {"input": x})[0]
    return float(np.mean(out.argmax(axis=1) == y))


def _compile_int8(model, calib, **kw):
    ir = edgec.from_model(model)
    edgec.run_passes(ir, ["fold_batchnorm", "eliminate_dead"])
    rep = quantize_api.quantize(ir, calib, **kw)
    return ir.to_onnx(), rep


@pytest.fixture(scope="module")
def digits_int8(digits):
    model, d = digits
    calib = calibdata.load_calibration({"input": d["calib_x"]}, model, batch_size=50)
    return _compile_int8(model, calib, mode="int8")


def test_example_int8_accuracy_within_one_percent(digits, digits_int8):
    model, d = digits
    q, rep = digits_int8
    fp32 = _accuracy(model, d["test_x"], d["test_y"])
    int8 = _accuracy(q, d["test_x"], d["test_y"])
    assert int8 >= fp32 - 0.01, (fp32, int8)
    assert rep["layers_int8"] == 8 and rep["error"]["sqnr_db"] > 25


def test_ort_fuses_every_qdq_group_into_integer_kernels(digits_int8, tmp_path):
    q, _ = digits_int8
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        ops = fused_ops(q, tmp_path, level)
        assert ops["QLinearConv"] == 7, ops
        assert "Conv" not in ops and "Relu" not in ops and "DequantizeLinear" not in ops, ops
        assert ops["QLinearAdd"] == 1 and ops["QLinearConcat"] == 1 and ops["QLinearGlobalAveragePool"] == 1, ops
        assert ops["QGemm"] == 1 and "Gemm" not in ops, ops


def test_graph_outputs_stay_float_and_keep_their_names(digits, digits_int8):
    model, _ = digits
    q, _ = digits_int8
    assert [o.name for o in q.graph.output] == [o.name for o in model.graph.output]
    assert q.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == "logits" for n in q.graph.node)


def test_relu_folded_into_zero_floored_ranges(digits_int8):
    q, rep = digits_int8
    assert rep["relu_folded"] == 7
    assert not any(n.op_type == "Relu" for n in q.graph.node)
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    # the Q after each op that fed a ReLU has zero point 0 (uint8): its saturation is the ReLU
    prod = {o: n for n in q.graph.node for o in n.output}
    floored = [n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in prod
               and prod[n.input[0]].op_type in ("Conv", "Add") and int(inits[n.input[2]]) == 0]
    assert len(floored) == 7
    assert all(inits[n.input[2]].dtype == np.uint8 for n in floored)


def test_concat_inputs_share_one_scale(digits_int8):
    q, _ = digits_int8
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    prod = {o: n for n in q.graph.node for o in n.output}
    concat = [n for n in q.graph.node if n.op_type == "Concat"][0]
    scales = {float(inits[prod[i].input[1]]) for i in concat.input}  # DQ scale of each input
    consumers = [n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == concat.output[0]]
    scales.add(float(inits[consumers[0].input[1]]))
    assert len(scales) == 1


def test_symmetric_activations_and_per_tensor_weights(digits, tmp_path):
    model, d = digits
    calib = calibdata.load_calibration({"input": d["calib_x"]}, model, batch_size=100)
    q, rep = _compile_int8(model, calib, mode="int8", activations="symmetric", weights="per-tensor",
                           bias_correction=False)
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    for n in q.graph.node:
        if n.op_type == "QuantizeLinear":
            zp = inits[n.input[2]]
            assert zp.dtype == np.int8 and int(zp) == 0
        if n.op_type == "DequantizeLinear" and "_weight_" in n.input[0]:
            assert inits[n.input[1]].ndim == 0
    assert _accuracy(q, d["test_x"], d["test_y"]) >= _accuracy(model, d["test_x"], d["test_y"]) - 0.03
    # (symmetric int8 cannot fold a ReLU into a zero-floored range: ONNX Runtime keeps those
    # ReLUs in float between DQ and Q, so fewer groups fuse than with asymmetric activations)
    assert fused_ops(q, tmp_path)["QLinearConv"] >= 1


def test_keep_float_keeps_a_layer_float(digits, tmp_path):
    model, d = digits
    calib = calibdata.load_calibration({"input": d["calib_x"]}, model, batch_size=100)
    q, rep = _compile_int8(model, calib, mode="int8", keep_float=["/stem/stem.0/Conv", "logits"],
                           bias_correction=False)
    assert rep["layers_int8"] == 6
    conv = [n for n in q.graph.node if n.name == "/stem/stem.0/Conv"][0]
    assert conv.input[1].endswith("bnfolded_W")  # float weight, no DQ
    gemm = [n for n in q.graph.node if n.op_type == "Gemm"][0]
    assert gemm.input[1] == "fc.weight"
    ops = fused_ops(q, tmp_path)
    assert ops["Conv"] >= 1 and ops["QLinearConv"] == 6


@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_builder_models_quantize_fuse_and_stay_close(name, tmp_path):
    model = ALL_MODELS[name]()
    q, rep = _compile_int8(model, calibdata.load_calibration("random", model, max_samples=32, seed=1),
                           mode="int8", bias_correction=False)
    onnx.checker.check_model(q, full_check=True)
    test = calibdata.load_calibration("random", model, max_samples=16, seed=2)
    err = runtime.output_error(model, q, test)
    assert err["sqnr_db"] > 25, err
    ops = fused_ops(q, tmp_path)
    float_convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert ops.get("Conv", 0) == 0 and ops.get("QLinearConv", 0) == len(float_convs), ops
    if any(n.op_type == "MatMul" for n in q.graph.node if "weight" in "".join(n.input)):
        assert ops["QLinearMatMul"] >= 1, ops


def test_pass_by_name_without_ranges_is_a_user_error():
    ir = edgec.from_model(ALL_MODELS["plain_cnn"]())
    with pytest.raises(UserError, match="calibrated activation ranges"):
        edgec.run_passes(ir, ["quantize_qdq"])


def test_unknown_mode_and_missing_calibration_are_user_errors(digits):
    model, _ = digits
    ir = edgec.from_model(model)
    with pytest.raises(UserError, match="unknown quantization mode"):
        quantize_api.quantize(ir, mode="int2")
    with pytest.raises(UserError, match="calibration data"):
        quantize_api.quantize(ir, None, mode="int8")


# ------------------------------------------------------------------ fp16
def test_fp16_example_accuracy_unchanged_and_interface_float32(digits):
    model, d = digits
    ir = edgec.from_model(model)
    edgec.run_passes(ir, ["fold_batchnorm", "eliminate_dead"])
    rep = quantize_api.quantize(ir, mode="fp16")
    q = ir.to_onnx()
    onnx.checker.check_model(q, full_check=True)
    assert _accuracy(q, d["test_x"], d["test_y"]) == _accuracy(model, d["test_x"], d["test_y"])
    assert [(i.name, i.type.tensor_type.elem_type) for i in q.graph.input] == [("input", TensorProto.FLOAT)]
    assert [(o.name, o.type.tensor_type.elem_type) for o in q.graph.output] == [("logits", TensorProto.FLOAT)]
    assert all(numpy_helper.to_array(i).dtype != np.float32 for i in q.graph.initializer if "weight" in i.name
               or "bnfolded" in i.name)
    assert rep["nodes_fp16"] > 0 and q.ByteSize() < 0.6 * ir_bytes(model)


def ir_bytes(model) -> int:
    return model.ByteSize()


def test_fp16_keeps_overflow_prone_ops_in_float32():
    model = ALL_MODELS["transformer_encoder"]()
    ir = edgec.from_model(model)
    quantize_api.quantize(ir, mode="fp16")
    q = ir.to_onnx()
    inferred = onnx.shape_inference.infer_shapes(q)
    types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for n in q.graph.node:
        if n.op_type in ("Softmax", "LayerNormalization"):
            assert types[n.output[0]] == TensorProto.FLOAT, n.op_type
        if n.op_type == "MatMul":
            assert types[n.output[0]] == TensorProto.FLOAT16
    feeds = verify.random_inputs(model, seed=3)
    ref, got = verify.run(model, feeds)["output"], verify.run(q, feeds)["output"]
    err = runtime.error_metrics({"o": ref}, {"o": got})
    assert err["sqnr_db"] > 45, err


def test_fp16_saturates_out_of_range_constants_with_a_note():
    b = GraphBuilder(seed=0)
    x = b.input("input", [1, 4])
    b.output(b.mul(b.add(x, np.full(4, 1e6, np.float32)), np.float32(1e-3)), "output")
    model = b.build()
    ir = edgec.from_model(model)
    rep = quantize_api.quantize(ir, mode="fp16")
    assert any("saturated" in n for n in rep["notes"])


# ------------------------------------------------------------------ mixed precision
def test_mixed_meets_the_error_budget_with_smaller_weights(digits):
    model, d = digits
    calib = calibdata.load_calibration({"input": d["calib_x"]}, model, batch_size=100)
    test = calibdata.load_calibration({"input": d["test_x"]}, model, batch_size=360)
    sizes = {}
    for budget in (0.01, 0.1):
        q, rep = _compile_int8(model, calib, mode="mixed", max_error=budget, bias_correction=False)
        search = rep["search"]
        assert search["within_budget"] and search["error_rel_l2"] <= budget
        # measured on held-out data: within the budget up to calibration/test mismatch
        assert runtime.output_error(model, q, test)["rel_l2"] <= 1.5 * budget
        assert _accuracy(q, d["test_x"], d["test_y"]) >= _accuracy(model, d["test_x"], d["test_y"]) - 0.01
        table = rep["sensitivity"]
        assert len(table) == 8 and {"layer", "op", "params", "precision", "int8_sqnr_db", "int4_sqnr_db"} <= set(table[0])
        assert table[0]["precision"] == "fp32" and table[-1]["precision"] == "fp32"  # ends stay float
        assert all(r["int4_rel_l2"] > r["int8_rel_l2"] for r in table)  # int4 hurts more than int8
        sizes[budget] = search["weights_bytes"]
    assert sizes[0.1] < sizes[0.01] < 28032  # a looser budget buys a smaller model
    assert rep["layers_int4"] >= 1


def test_mixed_size_budget():
    model = ALL_MODELS["flatten_gemm_head"]()
    calib = calibdata.load_calibration("random", model, max_samples=32, seed=0)
    ir = edgec.from_model(model)
    rep = quantize_api.quantize(ir, calib, mode="mixed", max_error=None,
                                bias_correction=False, max_bytes=4000)
    assert rep["search"]["weights_bytes"] <= 4000 < 5208 and rep["layers_int4"] >= 1  # all-int8 is 5208 B


def test_mixed_size_budget_that_no_plan_meets_fails_and_writes_nothing(tmp_path):
    out = tmp_path / "q.onnx"
    with pytest.raises(edgec.VerificationError, match="no precision plan fits --max-bytes 1"):
        edgec.compile(str(EXAMPLE / "model.onnx"), out, quantize="mixed", max_bytes=1,
                      calib=str(EXAMPLE / "calib.npz"), calib_samples=32)
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ bias correction
def test_bias_correction_is_kept_only_when_it_lowers_the_error(digits):
    model, d = digits
    calib = calibdata.load_calibration({"input": d["calib_x"]}, model, batch_size=100)
    test = calibdata.load_calibration({"input": d["test_x"]}, model, batch_size=360)
    q0, r0 = _compile_int8(model, calib, mode="int8", bias_correction=False)
    q1, r1 = _compile_int8(model, calib, mode="int8", bias_correction=True)
    assert r1["error"]["rel_l2"] <= r0["error"]["rel_l2"]  # on the calibration data: by construction
    if r1["bias_correction"]["layers"]:
        # and it carries over to held-out data
        assert runtime.output_error(model, q1, test)["rel_l2"] < runtime.output_error(model, q0, test)["rel_l2"]
        changed = [i.name for i in q1.graph.initializer if i.name.endswith("_bias_quantized")]
        assert changed


class _ShardedHere(executor.LocalExecutor):
    """The sharded calibration path (a distributed executor's), run in this process."""

    distributed = True

    @property
    def workers(self) -> int:
        return 2


@pytest.mark.parametrize("sharded", [False, True])
def test_a_class_sorted_set_is_measured_on_batches_spread_over_it(digits, monkeypatch, sharded):
    """Calibration data sorted by class (a folder read in order): the error, bias and fallback
    subsets are whole batches spread over the set (``calibdata.subset``), and the float outputs
    calibration captured for them are those batches' (sharded too): the reported error is the
    quantized model's error on exactly those batches, which here differs from the first ones'."""
    model, d = digits
    order = np.argsort(_labels(model, d["calib_x"]), kind="stable")
    calib = calibdata.load_calibration({"input": d["calib_x"][order]}, model, batch_size=8)
    monkeypatch.setattr(quantize_api, "ERROR_SAMPLES", 96)
    monkeypatch.setattr(quantize_api, "BIAS_SAMPLES", 48)
    with executor.using(_ShardedHere() if sharded else executor.LocalExecutor()):
        q, rep = _compile_int8(model, calib, mode="int8", bias_correction=True)
    measured = calibdata.subset(calib, 96)
    assert rep["error"]["samples"] == measured.samples == 96 and measured.positions != tuple(range(12))
    on_spread = runtime.output_error(model, q, measured.batches)["rel_l2"]
    on_first = runtime.output_error(model, q, list(calib.take(96)))["rel_l2"]
    assert rep["error"]["rel_l2"] == pytest.approx(on_spread, rel=1e-4)
    assert abs(on_first - on_spread) > 1e-3 * on_spread  # (so the check above can tell them apart)


def test_a_folder_of_unknown_length_is_measured_on_what_it_has(digits, tmp_path):
    """A folder of .npy batches has no length before reading: its measuring subsets are its first
    batches, and a set shorter than a subset's nominal size is measured on all it has."""
    model, d = digits
    for k in range(2):
        np.save(tmp_path / f"part{k}.npy", d["calib_x"][k * 40:(k + 1) * 40])
    calib = calibdata.load_calibration(tmp_path, model, batch_size=32)
    q, rep = _compile_int8(model, calib, mode="int8")
    on_all = runtime.output_error(model, q, list(calib))["rel_l2"]
    assert rep["error"]["rel_l2"] == pytest.approx(on_all, rel=1e-4)


def test_float_capture_keeps_each_subsets_batches_by_position():
    """The float outputs calibration hands over are kept by batch index: every measuring subset
    (the bias and fallback ones sit inside the error one, not at its start) gets its own batches'."""
    batches = [{"y": np.full((4, 2), float(i), np.float32)} for i in range(40)]
    error, bias, fallback = (calibdata.subset(batches, n) for n in (64, 32, 8))
    capture = quantize_api._FloatCapture(["y"], {}, error, bias)
    assert capture.positions == set(error.positions)
    for i, b in enumerate(batches):  # as calibration calls it, every batch in stream order
        capture(i, b)
    for sub in (error, bias, fallback):
        got = capture.reference(sub)["y"][::4, 0]
        assert list(got) == [float(i) for i in sub.positions] and sub.positions != tuple(range(sub.count))


def _labels(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.argmax(sess.run(None, {"input": x})[0], axis=1)


# ------------------------------------------------------------------ cross-layer equalisation
def _dw_chain_model():
    """conv -> relu -> depthwise -> relu -> pointwise, with badly balanced channel ranges."""
    b = GraphBuilder(seed=3)
    x = b.input("input", [2, 3, 8, 8])
    y = b.relu(b.conv(x, 8, 3))
    y = b.relu(b.dwconv(y, 3, bias=True))
    y = b.conv(y, 8, 1)
    b.output(b.flatten(b.gap(y)), "output")
    m = b.build()
    scale = np.array([8.0, 0.05, 1, 20, 0.2, 1, 3, 0.02], np.float32)
    for init in m.graph.initializer:  # unbalance the first conv's output channels
        if init.name in ("conv_0.weight", "conv_0.bias"):
            v = numpy_helper.to_array(init)
            v = v * scale.reshape((-1,) + (1,) * (v.ndim - 1))
            init.CopyFrom(numpy_helper.from_array(v.astype(np.float32), init.name))
    return m


def test_cross_layer_equalization_is_lossless_and_balances_ranges():
    from edgec import equalization
    from edgec.passes.equalize_layers import EqualizeLayers

    model = _dw_chain_model()
    ir = edgec.from_model(model)
    assert len(equalization.pairs(ir)) == 2
    assert edgec.run_passes(ir, [EqualizeLayers()])[0].changed
    eq = ir.to_onnx()
    feeds = verify.random_inputs(model, seed=0, batch=2)
    np.testing.assert_allclose(verify.run(eq, feeds)["output"], verify.run(model, feeds)["output"], rtol=1e-4, atol=1e-5)
    inits = {i.name: numpy_helper.to_array(i) for i in eq.graph.initializer}
    w = {n.name: inits[n.input[1]] for n in eq.graph.node if n.op_type == "Conv"}
    r1 = np.abs(w["conv_0"].reshape(8, -1)).max(1)
    r2 = np.abs(w["conv_1"].reshape(8, -1)).max(1)
    assert np.max(np.abs(np.log(r1 / r2))) < np.log(1.5)  # ranges close after equalisation
    assert np.ptp(np.log(r1)) < np.ptp(np.log(np.abs(numpy_helper.to_array(model.graph.initializer[0])).reshape(8, -1).max(1)))


def test_equalize_auto_keeps_the_better_model_per_tensor():
    model = _dw_chain_model()
    calib = calibdata.load_calibration("random", model, max_samples=32, seed=1)
    ir = edgec.from_model(model)
    rep = quantize_api.quantize(ir, calib, mode="int8", weights="per-tensor",
                                weight_type="int8", bias_correction=False, equalize="auto", rounding="nearest")
    cle = rep["cross_layer_equalization"]
    assert cle["pairs"] == 2
    assert rep["error"]["rel_l2"] == min(cle["rel_l2_without"], cle["rel_l2_with"])
    assert cle["applied"] == (cle["rel_l2_with"] < cle["rel_l2_without"])
    # per-tensor weights with channel ranges spread over 3 decades: equalisation must help
    assert cle["applied"] and cle["rel_l2_with"] < 0.9 * cle["rel_l2_without"]


def test_equalised_minmax_ranges_follow_from_per_channel_statistics():
    """Equalisation divides a convolution's output channels (and its Relu's) by known factors,
    so the equalised model's min-max statistics are derived from per-channel ones taken while
    calibrating the float model, instead of a second calibration: they match one."""
    from edgec import calibration, equalization

    model = _dw_chain_model()
    calib = list(calibdata.load_calibration("random", model, max_samples=32, seed=3))
    ir = edgec.from_model(model)
    ir.infer_shapes()
    updates, divisors = equalization.equalize_with_scales(ir)
    scaled = equalization.scaled_tensors(ir, divisors)
    assert len(scaled) >= 2
    tensors = quantize_api.calibration_tensors(ir)
    shapes = ir.tensors()
    stats = calibration.collect(ir.to_onnx(), tensors, calib, histograms=False,
                                per_channel={t: len(shapes[t].shape) for t in scaled})
    eq = edgec.from_model(model)
    edgec.run_passes(eq, ["equalize_layers"])
    direct = calibration.collect(eq.to_onnx(), tensors, calib, histograms=False)
    for t in tensors:
        derived = stats[t].scaled(scaled[t][1]) if t in scaled else stats[t]
        np.testing.assert_allclose([derived.min, derived.max], [direct[t].min, direct[t].max], rtol=1e-5, atol=1e-7,
                                   err_msg=t)
        assert derived.count == direct[t].count


def _collapsing_model(outlier: float = 1000.0):
    """conv1's first output channel is ``outlier`` x the others and conv2 ignores it: one scale
    for the tensor crushes every channel conv2 reads, so at 1000x all-int8 collapses (about 1 dB
    SQNR); at 10x it leaves a relative L2 of about 0.04 (tests/test_strategy.py)."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.3, (8, 4, 3, 3)).astype(np.float32)
    w1[0] *= outlier
    w2 = rng.normal(0, 0.3, (4, 8, 1, 1)).astype(np.float32)
    w2[:, 0] = 0
    w3 = rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32)
    g = helper.make_graph([
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3"], ["y"], pads=[1, 1, 1, 1], name="conv3")],
        "collapse", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 8, 8])],
        [numpy_helper.from_array(w, n) for w, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"))])
    return _opset17(g)


def test_int8_that_collapses_falls_back_by_measured_contribution():
    """Above the default error budget, the quantized tensor whose scale does the damage goes
    back to float with the ops that quantize it (found by measuring each one's contribution),
    the report says which and why, and the written model meets the budget."""
    model = _collapsing_model()
    r = edgec.compile(model, quantize="int8", calib="random", verify=True)
    q = r.report["quantization"]
    fb = q["fallback"]
    assert fb["error_before"] > 0.5 and fb["met"] and fb["error_after"] <= quantize_api.DEFAULT_INT8_BUDGET
    assert {f["node"] for f in fb["float"]} == {"conv1", "relu1", "conv2"}
    assert all("measured contribution" in f["why"] for f in fb["float"])
    assert r.report["verify"]["rel_l2"] < quantize_api.DEFAULT_INT8_BUDGET
    producers = {o: n for n in r.model.graph.node for o in n.output}
    convs = {n.name: n for n in r.model.graph.node if n.op_type == "Conv"}
    assert producers[convs["conv3"].input[1]].op_type == "DequantizeLinear"  # the rest stays int8
    assert convs["conv1"].input[1] not in producers or producers[convs["conv1"].input[1]].op_type != "DequantizeLinear"
    # the trace, in graph order, points at the crushed tensor
    trace = q["trace"]
    assert [t["tensor"] for t in trace][0] == "x"
    assert max(trace, key=lambda t: t["quant_rel_l2"])["tensor"] == "c1"


@pytest.mark.parametrize("opset", [17, 21])
def test_sixteen_bit_activations_are_the_fallbacks_last_step(monkeypatch, opset):
    """Where keeping ops float is not allowed to reach the budget (no float steps here), the
    fallback gives the noisiest activation tensors 16 bits, measured, until the budget is met:
    uint16 Q/DQ (com.microsoft's before opset 21, ai.onnx's from 21) that ONNX Runtime runs, the
    crushed tensor among them, the weights still int8, and the report says so and why."""
    monkeypatch.setattr(quantize_api, "MAX_STEPS", 0)
    model = _collapsing_model()
    if opset != 17:
        model.opset_import[0].version = opset
        model.ir_version = 10
    r = edgec.compile(model, quantize="int8", calib="random", verify=True)
    q = r.report["quantization"]
    fb = q["fallback"]
    assert fb["float"] == [] and fb["met"] and fb["error_after"] <= quantize_api.DEFAULT_INT8_BUDGET
    wide = fb["sixteen_bit"]
    assert "c1" in {t["tensor"] for t in wide["tensors"]} and len(wide["tensors"]) < wide["groups"] + 2
    assert wide["error_after"] <= quantize_api.DEFAULT_INT8_BUDGET < wide["error_before"]
    assert r.report["verify"]["rel_l2"] < quantize_api.DEFAULT_INT8_BUDGET  # ONNX Runtime, the written model
    q16 = [n for n in r.model.graph.node if n.op_type == "QuantizeLinear"
           and any(i.name == n.input[2] and i.data_type == TensorProto.UINT16 for i in r.model.graph.initializer)]
    assert q16 and {n.domain for n in q16} == {"com.microsoft" if opset < 21 else ""}
    assert {n.input[0] for n in q16} == {t["tensor"] for t in wide["tensors"]}
    producers = {o: n for n in r.model.graph.node for o in n.output}
    assert all(producers[n.input[1]].op_type == "DequantizeLinear"
               for n in r.model.graph.node if n.op_type == "Conv")  # every weight int8
    assert q["int8_coverage"]["weighted_16bit_input"] >= 1
    text = report.compile_text(r.report)
    assert "activation tensors on 16 bits" in text and "16-bit: " in text
    # a budget 16 bits cannot meet (the int8 weights alone miss it): none kept, the report says why
    rb = ALL_MODELS["resnet_basic"]()
    ir = edgec.from_model(rb)
    tight = quantize_api.quantize(ir, list(calibdata.load_calibration("random", rb, max_samples=16, seed=1)),
                                  mode="int8", max_error=1e-6)
    sb = tight["fallback"]["sixteen_bit"]
    assert sb["tensors"] == [] and "none kept" in sb["why"] and min(sb["measured"].values()) > 1e-6
    assert not any(i.data_type == TensorProto.UINT16 for i in ir.to_onnx().graph.initializer)
    # --no-16bit (and --goal latency, whose candidates turn it off): float steps only, here none
    with pytest.raises(edgec.VerificationError, match="even with 0 ops kept float;"):
        edgec.compile(model, quantize="int8", calib="random", sixteen_bit=False)
    from edgec import strategy
    from edgec.options import CompileOptions
    cands, _ = strategy.candidates(edgec.backends.get_target("cpu"), "latency",
                                   CompileOptions(calib="random", quant=dataclasses.replace(CompileOptions().quant)))
    assert cands and all(not c.quant.sixteen_bit for c in cands)
    # a target whose toolchain takes 8-bit Q/DQ only has no 16-bit step: with no float step
    # either, the collapse is refused
    with pytest.raises(edgec.VerificationError, match="even with 0 ops kept float;"):
        edgec.compile(model, target="rknn", quantize="int8", calib="random")


def _cancelling_depthwise_model():
    """conv1 -> a depthwise conv whose two large taps cancel (kernel sums 0.02-0.1 beside taps of
    +-50) -> a 1x1 conv. On flat inputs the depthwise output is its kernel sum times the level,
    which int8 weights (a step of 50/127) round away: 16-bit activations cannot help."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.3, (8, 4, 1, 1)).astype(np.float32)
    wd = np.zeros((8, 1, 3, 3), np.float32)
    wd[:, 0, 1, 0] = 50.0
    wd[:, 0, 1, 1] = -50.0 + rng.uniform(0.02, 0.1, 8)
    w3 = rng.normal(0, 0.3, (4, 8, 1, 1)).astype(np.float32)
    g = helper.make_graph([
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
        helper.make_node("Conv", ["c1", "wd"], ["d"], group=8, name="dw"),
        helper.make_node("Conv", ["d", "w3"], ["y"], name="conv3")],
        "cancel", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        [numpy_helper.from_array(w, n) for w, n in ((w1, "w1"), (wd, "wd"), (w3, "w3"))])
    return _opset17(g)


def _flat_inputs(n, seed):
    rng = np.random.default_rng(seed)
    return [{"x": (rng.uniform(0.5, 2.0, (1, 4, 1, 1)) + rng.normal(0, 1e-3, (1, 4, 8, 8))).astype(np.float32)}
            for _ in range(n)]


def test_weights_16_bits_cannot_save_go_float_when_every_activation_is_wide(monkeypatch):
    """When every activation on 16 bits still misses the budget, what is left is the weights'
    rounding: the fallback measures the weighted ops whose int8 weights round most kept float
    (here with no float steps before it), finds the depthwise conv whose taps cancel, keeps it
    float, and searches the 16-bit tensors again with it float (its input's rounding, which its
    taps amplify, still needs them). The report says which op and why, and the written model
    meets the budget on held-out flat inputs in ONNX Runtime."""
    monkeypatch.setattr(quantize_api, "MAX_STEPS", 0)
    model = _cancelling_depthwise_model()
    w = numpy_helper.to_array(model.graph.initializer[1])
    assert quantize_api.weight_rounding(w, np.round(w / (50 / 127)) * (50 / 127), 0) > 0.5  # the kernel sums
    r = edgec.compile(model, quantize="int8", calib=_flat_inputs(16, 1))
    fb = r.report["quantization"]["fallback"]
    sb = fb["sixteen_bit"]
    assert fb["met"] and [w["node"] for w in sb["float_weights"]] == ["dw"], sb
    assert sb["error_before"] > quantize_api.DEFAULT_INT8_BUDGET >= sb["error_after"]
    assert "c1" in {t["tensor"] for t in sb["tensors"]} and "weights" in sb["float_weights"][0]["why"]
    assert [f["node"] for f in fb["float"]] == ["dw"]
    producers = {o: n for n in r.model.graph.node for o in n.output}
    convs = {n.name: n for n in r.model.graph.node if n.op_type == "Conv"}
    assert convs["dw"].input[1] not in producers  # float weights
    assert producers[convs["conv3"].input[1]].op_type == "DequantizeLinear"
    held = _flat_inputs(8, 2)
    err = runtime.error_metrics(*[{k: np.concatenate([verify.run(m, f)[k] for f in held]) for k in ("y",)}
                                  for m in (model, r.model)])
    assert err["rel_l2"] < quantize_api.DEFAULT_INT8_BUDGET, err


def test_strict_int8_never_writes_a_collapsed_model(tmp_path, capsys):
    from edgec import cli

    src, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(_collapsing_model(), src)
    code = cli.main(["compile", str(src), "-o", str(out), "--quantize", "int8", "--calib", "random", "--strict-int8"])
    err = capsys.readouterr().err
    assert code == 1 and not out.exists()
    assert "int8 collapses this model" in err and "'c1'" in err and "--keep-float" in err


def _detection_head_model():
    """A detector's head: sigmoid class scores in [0, 1] concatenated with box coordinates in
    pixels (x200), channels last, as exported detectors end."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)
    wc = rng.normal(0, 0.3, (4, 8, 1, 1)).astype(np.float32)
    wb = rng.normal(0, 0.3, (4, 8, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["f"], pads=[1, 1, 1, 1], name="stem"),
             helper.make_node("Relu", ["f"], ["fr"], name="stem_relu"),
             helper.make_node("Conv", ["fr", "wc"], ["cl"], name="cls"),
             helper.make_node("Sigmoid", ["cl"], ["sc"], name="scores"),
             helper.make_node("Conv", ["fr", "wb"], ["bx"], name="box"),
             helper.make_node("Mul", ["bx", "k"], ["bxs"], name="to_pixels"),
             helper.make_node("Concat", ["sc", "bxs"], ["cat"], axis=1, name="head_concat"),
             helper.make_node("Transpose", ["cat"], ["y"], perm=[0, 2, 3, 1], name="to_nhwc")]
    g = helper.make_graph(nodes, "det", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w, n) for w, n in ((w1, "w1"), (wc, "wc"), (wb, "wb"))]
                          + [numpy_helper.from_array(np.array(200.0, np.float32), "k")])
    return _opset17(g)


def _score_error(model, q, feeds):
    ref, got = verify.run(model, feeds)["y"], verify.run(q, feeds)["y"]
    return float(np.abs(ref[..., :4] - got[..., :4]).max())


def test_the_channel_error_judges_channels_not_anchors():
    """A sigmoid score map [batch, anchors, classes] is judged per class, not per anchor: a
    background anchor (every score near zero) with the same absolute noise as the rest is not
    "a channel" 10x off. A class channel whose values are crushed beside pixel-scale boxes is
    still seen, channels last and NCHW."""
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.0, 0.9, (2, 400, 10)).astype(np.float32)
    scores[:, ::2] = 1e-3  # background anchors
    noisy = scores + rng.normal(0, 0.01, scores.shape).astype(np.float32)
    assert runtime.channel_axes(scores.shape) == [2]
    err = runtime.error_metrics({"s": scores}, {"s": noisy})
    assert err["worst_channel_rel_l2"] < 0.05 and err["rel_l2"] < 0.05, err
    boxes = np.concatenate([rng.uniform(0, 600, (2, 400, 4)), scores], axis=-1).astype(np.float32)
    crushed = boxes.copy()
    crushed[..., 4:] = np.round(crushed[..., 4:] / 2.5) * 2.5  # one 600/255 step for everything
    err = runtime.error_metrics({"y": boxes}, {"y": crushed})
    assert err["rel_l2"] < 0.01 and err["worst_channel_rel_l2"] > 0.9, err
    nchw = np.moveaxis(boxes, -1, 1).reshape(2, 14, 20, 20)
    assert runtime.channel_axes(nchw.shape) == [1]
    err = runtime.error_metrics({"y": nchw}, {"y": np.moveaxis(crushed, -1, 1).reshape(nchw.shape)})
    assert err["worst_channel_rel_l2"] > 0.9, err
    # a 1-D conv's [batch, channels, length] with length <= channels: its channels are still judged
    ncl = rng.normal(0, 1, (2, 64, 32)).astype(np.float32)
    dead = ncl.copy()
    dead[:, 5] = 0
    assert 1 in runtime.channel_axes(ncl.shape)
    assert runtime.error_metrics({"y": ncl}, {"y": dead})["worst_channel_rel_l2"] > 0.9


def test_concat_of_scores_and_pixel_boxes_is_not_crushed_under_one_scale(monkeypatch):
    """A Concat whose inputs' ranges differ by orders of magnitude stays float, with a note (one
    shared scale would leave the scores 2 levels). When such a scale is shared anyway (and the
    Concat's output, moved to the graph output by a Transpose only, is quantized too), the
    per-channel error guard sees the collapsed score channels, though the output's overall error
    is low, and falls back by measurement."""
    from edgec import quant_plan

    model = _detection_head_model()
    calib = list(calibdata.load_calibration("random", model, max_samples=16, seed=1))
    feeds = verify.random_inputs(model, seed=5)
    r = edgec.compile(model, target="rknn", quantize="int8", calib=calib)  # rknn quantizes Sigmoid too
    notes = r.report["quantization"]["notes"]
    assert any("head_concat stays float" in n and "ranges differ" in n for n in notes), notes
    assert _score_error(model, r.model, feeds) < 0.05
    monkeypatch.setattr(quant_plan, "MAX_SHARED_SPAN_RATIO", 1e9)
    monkeypatch.setattr(quant_plan, "FLOAT_OUTPUT_TAILS", False)
    r = edgec.compile(model, target="rknn", quantize="int8", calib=calib)
    q = r.report["quantization"]
    assert q["fallback"]["error_before"] > quantize_api.DEFAULT_INT8_BUDGET and q["fallback"]["met"]
    assert q["error"]["worst_channel_rel_l2"] < 4 * quantize_api.DEFAULT_INT8_BUDGET
    assert _score_error(model, r.model, feeds) < 0.05


@pytest.mark.parametrize("name", ["resnet_basic", "mobilenet_v2", "inception", "transformer_encoder"])
@pytest.mark.parametrize("kind", ["uint8", "int8-mixed", "tensorrt", "uint8-wide", "int8-wide"])
def test_the_probe_computes_what_the_materialised_model_computes(name, kind):
    """Every plan edgec chooses is measured on the probe, never written: the probe's outputs must
    be those of the model the materialiser writes, bit for bit, in the reference executor (with
    bias shifts; with a per-layer precision plan on the switchable probe; TensorRT's float-Q->DQ
    weights; every other scale group on 16 bits, uint16 and, symmetric, int16, on the wide probe
    that emulates 8-bit tensors with 16-bit Q/DQ and a clip)."""
    from edgec import calibration, quant_plan, quant_probe, rounding
    from edgec.pipeline import PassContext
    from edgec.target import QuantScheme

    model = ALL_MODELS[name]()
    ir = edgec.from_model(model)
    edgec.run_passes(ir, ["fold_constants", "fold_batchnorm", "eliminate_dead"])
    ir.infer_shapes()
    float_model = ir.to_onnx()
    calib = list(calibdata.load_calibration("random", model, max_samples=16, seed=1))
    sym = kind in ("tensorrt", "int8-wide")
    ranges, stats = calibration.calibrate(float_model, quantize_api.calibration_tensors(ir), calib, symmetric=sym,
                                          method="percentile" if kind.endswith("-wide") else "minmax",
                                          percentile=99.0)
    if kind.endswith("-wide"):  # clipped 8-bit ranges: the 16-bit tensors cover the observed (min-max) range
        ranges = quant_plan.Ranges(ranges, full=calibration.ranges_from_stats(float_model, stats, symmetric=sym))
    scheme = {"uint8": QuantScheme(weight_type="uint8"), "int8-mixed": QuantScheme(weight_type="int8"),
              "uint8-wide": QuantScheme(weight_type="uint8", wide_activations=True),
              "int8-wide": QuantScheme(activations="symmetric", weight_type="int8", wide_activations=True),
              "tensorrt": QuantScheme(rules="tensorrt", activations="symmetric", bias="float",
                                      weight_format="float-qdq")}[kind]
    widest = quant_plan.build_plan(ir, scheme, ranges)
    layers = [n for n in ir.nodes if n.outputs and quant_plan.node_id(n) in widest.weights]
    precisions = {}
    if kind == "int8-mixed":  # every third layer float, every third int4
        precisions = {quant_plan.node_key(n): ("fp32", "int4", "int8")[i % 3] for i, n in enumerate(layers)}
    plan = quant_plan.build_plan(ir, scheme, ranges, precisions=precisions)
    if kind.endswith("-wide"):
        groups = list(quant_plan.scale_groups(ir, plan).values())
        narrow = plan
        plan = quant_plan.with_wide(plan, [t for g in groups[::2] for t in g])
        base = kind.split("-")[0]
        assert {a.dtype for a in plan.activations.values()} == {base, quant_plan.WIDE[base]}
        levels = {"uint8": 255, "int8": 127, "uint16": 65535, "int16": 32767}
        spans = [(levels[w.dtype] * float(w.scale), levels[a.dtype] * float(a.scale))
                 for t, (a, w) in ((t, (narrow.activations[t], plan.activations[t])) for t in plan.activations)
                 if w.dtype != a.dtype]
        assert all(wide >= eight * (1 - 1e-6) for wide, eight in spans)
        assert any(wide > 1.01 * eight for wide, eight in spans)  # somewhere beyond the clipped range
    rng = np.random.default_rng(0)
    shifts = {quant_plan.node_id(n): rng.normal(0, 0.01, quant_plan.out_channels(n, ir.const_value(n.inputs[1])))
              for n in layers if n.op != "MatMul" and quant_plan.node_id(n) in plan.weights}
    plan = plan.with_bias_shift(shifts)
    probe = quant_probe.Probe(ir, float_model, scheme, widest, switchable=kind == "int8-mixed" or kind.endswith("-wide"),
                              adaptive=[quant_plan.node_id(n) for n in layers], layer_inputs=True,
                              wide=kind.endswith("-wide"))
    # GPTQ levels on every layer it can take: levels other than nearest rounding's are written too
    rounded = rounding.optimise(plan, probe, calib)
    assert rounded and any(
        not np.array_equal(q, quant_plan.weight_arrays(probe.float_w[k], plan.weights[k])[0])
        for k, (q, _, _) in rounded.items())
    plan = dataclasses.replace(plan, rounded=rounded)
    measured = probe.outputs(plan, calib)
    written = ir.copy()
    edgec.run_passes(written, [QuantizeQDQ()], PassContext(plan=plan))
    computed = runtime.run_outputs(written.to_onnx(), calib)
    assert plan.weights and set(measured) == set(computed)
    for k in computed:
        if kind == "int8-mixed":  # fp32 layers: their constant weights may be pre-packed by ONNX Runtime in the
            # written model (the probe feeds them as inputs): the last float bit may differ, nothing more
            np.testing.assert_allclose(measured[k], computed[k], rtol=1e-5, atol=1e-6 * np.abs(computed[k]).max(),
                                       err_msg=k)
        else:
            np.testing.assert_array_equal(measured[k], computed[k], err_msg=k)


# ------------------------------------------------------------------ --calib-method auto
def _outlier_model():
    """A conv whose input has rare huge values that a Tanh saturates later: min-max spends the
    int8 levels on the outliers, a clipped range keeps them for the bulk of the data."""
    rng = np.random.default_rng(3)
    w1 = (rng.standard_normal((16, 3, 3, 3)) * 0.3).astype(np.float32)
    w2 = (rng.standard_normal((8, 16, 1, 1)) * 0.3).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
         helper.make_node("Tanh", ["c1"], ["t1"]),
         helper.make_node("Conv", ["t1", "w2"], ["y"])],
        "outliers", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8, 8, 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _outlier_data(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3, 8, 8)).astype(np.float32)
    spikes = rng.random(x.shape) < 0.002
    return np.where(spikes, x * 20, x).astype(np.float32)


def test_auto_method_keeps_the_lowest_measured_error_and_equals_that_method(tmp_path):
    model = _outlier_model()
    calib = {"x": _outlier_data(64, 0)}
    auto = edgec.compile(model, tmp_path / "auto.onnx", calib=calib, quantize="int8", calib_method="auto")
    q = auto.report["quantization"]
    choice = q["method_choice"]
    assert set(choice["rel_l2"]) == set(quantize_api.AUTO_METHODS)
    e, g = choice["rel_l2"], choice["guarded"]
    best_clip = min(quantize_api.AUTO_METHODS[1:], key=lambda m: (e[m], quantize_api.AUTO_METHODS.index(m)))
    assert e[best_clip] < (1 - quantize_api.AUTO_MARGIN) * e["minmax"]  # clipping earns its place here
    assert g[best_clip] <= g["minmax"]
    assert q["method"] == choice["chosen"] == best_clip
    assert choice["rel_l2"]["minmax"] > 1.2 * choice["rel_l2"][choice["chosen"]], choice
    # the chosen method's compile, asked for by name, writes the same bytes
    named = edgec.compile(model, tmp_path / "named.onnx", calib=calib, quantize="int8",
                          calib_method=choice["chosen"])
    assert (tmp_path / "auto.onnx").read_bytes() == (tmp_path / "named.onnx").read_bytes()
    # and on held-out data it beats min-max too, in reference arithmetic
    minmax = edgec.compile(model, tmp_path / "mm.onnx", calib=calib, quantize="int8", calib_method="minmax")
    test = [{"x": _outlier_data(64, 1)}]
    e_auto = runtime.output_error(model, onnx.load(str(tmp_path / "auto.onnx")), test)["rel_l2"]
    e_mm = runtime.output_error(model, onnx.load(str(tmp_path / "mm.onnx")), test)["rel_l2"]
    assert e_auto < e_mm, (e_auto, e_mm)
    assert minmax.report["quantization"]["method"] == "minmax" and "method_choice" not in minmax.report["quantization"]


def test_auto_method_on_the_cli_reports_its_choice(tmp_path, capsys):
    from edgec import cli
    model = _outlier_model()
    onnx.save(model, str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "calib.npz", x=_outlier_data(32, 0))
    rc = cli.main(["compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx"), "--quantize", "int8",
                   "--calib", str(tmp_path / "calib.npz"), "--calib-method", "auto", "--report",
                   str(tmp_path / "r.json")])
    assert rc == 0
    import json
    rep = json.loads((tmp_path / "r.json").read_text())
    chosen = rep["quantization"]["method_choice"]["chosen"]
    assert chosen == rep["quantization"]["method"]
    out = capsys.readouterr()
    assert f"calibration method: auto chose {chosen}" in out.out + out.err


def test_auto_method_with_equalisation_equals_the_named_method(tmp_path, monkeypatch):
    """The example's conv pairs make equalisation a candidate; it is measured with the chosen
    method's ranges (a histogram method re-calibrates the equalised model). With no margin the
    example's MSE clip (1% below min-max) is chosen, so that path runs."""
    monkeypatch.setattr(quantize_api, "AUTO_MARGIN", 0.0)
    model, calib = EXAMPLE / "model.onnx", EXAMPLE / "calib.npz"
    auto = edgec.compile(model, tmp_path / "auto.onnx", calib=calib, quantize="int8", calib_method="auto")
    q = auto.report["quantization"]
    chosen = q["method_choice"]["chosen"]
    assert q["method_choice"]["rel_l2"][chosen] == min(q["method_choice"]["rel_l2"].values())
    assert chosen != "minmax" and q["cross_layer_equalization"]["pairs"] > 0, q["method_choice"]
    assert q["method_choice"]["margin"] == 0.0
    edgec.compile(model, tmp_path / "named.onnx", calib=calib, quantize="int8", calib_method=chosen)
    assert (tmp_path / "auto.onnx").read_bytes() == (tmp_path / "named.onnx").read_bytes()


def test_trace_compares_a_folded_relu_tensor_after_the_relu():
    """A Conv whose Relu is folded into its output range: the dequantized copy is the Relu's
    output, so the trace measures its rounding against the float value after the Relu too. (It
    compared with the value before, counting every dropped negative as rounding noise: about
    3 dB for a zero-mean conv output, which made such tensors look like the noisiest of a net.)"""
    rng = np.random.default_rng(5)
    w1 = rng.normal(0, 0.3, (8, 4, 3, 3)).astype(np.float32)
    w2 = rng.normal(0, 0.3, (4, 8, 1, 1)).astype(np.float32)
    g = helper.make_graph([
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2")],
        "folded", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, 8, 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    calib = {"x": rng.standard_normal((32, 4, 8, 8)).astype(np.float32)}
    # strict with a budget nothing meets: the trace is measured and reported, nothing goes float
    q = quantize_api.quantize(edgec.from_model(model), [calib], max_error=1e-6, strict=True)
    assert q["relu_folded"] == 1
    rows = {t["tensor"]: t for t in q["trace"]}
    assert rows["c1"]["quant_sqnr_db"] > 35 and rows["c1"]["sqnr_db"] > 30, rows["c1"]  # 8-bit rounding, not 3 dB
    assert q["error"]["sqnr_db"] > 25


def test_the_trace_in_chunks_is_the_trace_and_probes_hold_only_what_they_are_asked(monkeypatch):
    """The per-layer trace observes every activation, before Q and after DQ, beside the float
    model's: on a high-resolution detector that is gigabytes per batch in flight, so it observes
    them in chunks within ``TRACE_MEMORY``. Cut to one tensor a chunk, it reports the same rows.
    A probe's graph outputs stay allocated through each run, fetched or not: the weighted layers'
    outputs are among them only where rounding reads them (``layer_inputs``)."""
    model = _collapsing_model()
    x = np.random.default_rng(3).standard_normal((16, 4, 8, 8)).astype(np.float32)
    calib = [{"x": x[i:i + 2]} for i in range(0, 16, 2)]  # (the model's batch is 2)

    def trace():  # the fallback's (it collapses, strict or not, so the default falls back)
        q = edgec.compile(model, quantize="int8", calib=calib).report["quantization"]
        assert q["fallback"]["met"]
        return q["trace"]

    whole = trace()
    cuts = []
    real = quantize_api._by_bytes
    monkeypatch.setattr(quantize_api, "_by_bytes", lambda names, nbytes, budget: cuts.append(
        real(names, nbytes, budget)) or cuts[-1])
    monkeypatch.setattr(quantize_api, "TRACE_MEMORY", 1)  # below any tensor: one a chunk
    chunked = trace()
    assert len(whole) >= 4 and cuts and all(len(c) == 1 for c in cuts[0]) and len(cuts[0]) == len(whole)
    assert chunked == whole
    # the bytes it counts, from the sample batch's shapes (dynamic batch, height and width too):
    # c1 is [3, 8, 10, 12] float32 for a [3, 4, 10, 12] batch; a tensor of unknown shape counts
    # as the largest known one
    dynamic = onnx.ModelProto()
    dynamic.CopyFrom(model)
    for d, name in zip(dynamic.graph.input[0].type.tensor_type.shape.dim, ("N", None, "H", "W")):
        if name:
            d.dim_param = name
    del dynamic.graph.output[0].type.tensor_type.shape.dim[:]
    sample = {"x": np.zeros((3, 4, 10, 12), np.float32)}
    assert quantize_api._tensor_bytes(dynamic, ["c1", "r2", "nowhere"], sample) == {
        "c1": 3 * 8 * 10 * 12 * 4, "r2": 3 * 4 * 10 * 12 * 4, "nowhere": 3 * 8 * 10 * 12 * 4}
    # the probe: no layer output among the graph outputs unless rounding reads layer inputs
    from edgec import quant_plan
    from edgec.quant_probe import Probe
    from edgec.target import QuantScheme
    ir = edgec.from_model(model)
    scheme = QuantScheme(weight_type="int8")
    plan = quant_plan.build_plan(ir, scheme, {t: (-4.0, 4.0) for t in ("x", "c1", "r1", "c2", "r2", "y")})
    assert plan.weights
    plain = Probe(ir, ir.to_onnx(), scheme, plan, switchable=True)
    assert {o.name for o in plain.model.graph.output} == {"y"}
    gptq = Probe(ir, ir.to_onnx(), scheme, plan, switchable=True, layer_inputs=True)
    assert {"c1", "c2"} <= {o.name for o in gptq.model.graph.output}
    # and a measuring session does not keep the most it ever held between runs (ONNX Runtime's
    # CPU arena would, until the session goes: gigabytes on a high-resolution detector's probes)
    assert not runtime.reference_session(model).get_session_options().enable_cpu_mem_arena


def test_fallback_keeps_the_fewest_steps_near_the_lowest_error():
    """PP-OCRv4's detector: one op removed 0.034 of 0.161 and seven more 0.001 between them;
    with all eight float its held-out box F1 fell from 0.957 to 0.943. Only steps that matter stay."""
    def steps(*errs):
        return [{"candidate": f"c{i}", "error_after": e} for i, e in enumerate(errs)]
    det = steps(0.127, 0.1263, 0.1265, 0.127, 0.127, 0.1262)
    assert [s["candidate"] for s in quantize_api.kept_steps(det, 0.161)] == ["c0"]
    assert [s["candidate"] for s in quantize_api.kept_steps(steps(0.3, 0.2, 0.05), 0.5)] == ["c0", "c1", "c2"]
    assert quantize_api.kept_steps(steps(0.48, 0.47), 0.5) == []  # under a tenth: nothing goes float
    assert quantize_api.kept_steps([], 0.5) == []
    # the step that met the budget stays, even within the tolerance of an earlier one
    met = steps(0.101, 0.0995)
    assert [s["candidate"] for s in quantize_api.kept_steps(met, 0.2, budget=0.1)] == ["c0", "c1"]
    assert [s["candidate"] for s in quantize_api.kept_steps(met, 0.2)] == ["c0"]


def test_sixteen_bits_cover_the_observed_range_and_keep_a_folded_relus_floor():
    """A 16-bit tensor covers its group's observed (min-max) range, not a clipped 8-bit one
    (clipping error does not shrink with more levels); a folded ReLU's group keeps its floor at
    0 even when the range it is given reaches below (its zero point stays 0: the Q is the ReLU)."""
    from edgec import calibration, quant_plan
    from edgec.target import QuantScheme
    model = ALL_MODELS["resnet_basic"]()
    ir = edgec.from_model(model)
    edgec.run_passes(ir, ["fold_constants", "fold_batchnorm", "eliminate_dead"])
    ir.infer_shapes()
    float_model = ir.to_onnx()
    calib = list(calibdata.load_calibration("random", model, max_samples=16, seed=1))
    clipped, stats = calibration.calibrate(float_model, quantize_api.calibration_tensors(ir), calib,
                                           method="percentile", percentile=99.0)
    # min-max of unclamped statistics: a ReLU's input reaches below 0 there
    full = calibration.ranges_from_stats(float_model, stats, saturation=False)
    scheme = QuantScheme(weight_type="uint8", wide_activations=True)
    plan = quant_plan.build_plan(ir, scheme, quant_plan.Ranges(clipped, full=full))
    assert plan.folded
    every = list(plan.activations)
    wide = quant_plan.with_wide(plan, every)
    folded_inputs = {n.inputs[0].name for n in ir.nodes if quant_plan.node_id(n) in plan.folded}
    assert folded_inputs
    for t in every:
        a = wide.activations[t]
        lo, hi = -a.zero_point * float(a.scale), (65535 - a.zero_point) * float(a.scale)
        if t in folded_inputs:
            assert a.zero_point == 0
        else:
            assert lo <= min(full[t][0], 0.0) + float(a.scale) and hi >= full[t][1] - float(a.scale)
    # a plain dict of ranges: 16 bits span the 8-bit range, as before
    plain = quant_plan.with_wide(quant_plan.build_plan(ir, scheme, clipped), every)
    assert any(plain.activations[t].scale < wide.activations[t].scale for t in every)


@pytest.mark.parametrize("target,said", [("cpu", "--quantize mixed"), ("rknn", "--quantize vendor"),
                                         ("jetson", "no --quantize (TensorRT builds")])
def test_a_collapse_refusal_names_what_the_target_takes(target, said):
    """The refusal offered --quantize mixed on every target, which jetson and rknn refuse. It
    names the target's own ways out: RKNN-Toolkit2's quantizer (on the PP-PicoDet layout
    detector RKNN's kl_divergence held where edgec's int8 and RKNN's default collapsed), or the
    float model the device runs in FP16."""
    with pytest.raises(edgec.VerificationError, match="int8 collapses") as e:
        edgec.compile(_collapsing_model(), None, target=target, quantize="int8", calib=_flat_inputs(16, 1),
                      strict_int8=True)
    assert said in str(e.value), str(e.value)
