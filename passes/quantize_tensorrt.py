"""quantize_tensorrt: explicit INT8 quantization in the form TensorRT's ONNX parser builds.

Rules (TensorRT's documented Q/DQ placement; NVIDIA Model Optimizer's ONNX PTQ does the same):
- every weighted op (Conv, ConvTranspose, Gemm, MatMul with a constant weight) gets Q/DQ on
  its activation input (int8, symmetric, zero point 0, one scale per tensor, shared by every
  reader of that tensor) and on its weight: the float weight stays an initializer and feeds
  QuantizeLinear -> DequantizeLinear with per-channel scales ``max|w| / 127`` (Conv axis 0,
  ConvTranspose axis 1, Gemm axis 0 with transB=1 else 1, MatMul axis 1); TensorRT folds them;
- weighted ops' outputs get no Q/DQ (TensorRT fuses Conv + BN + ReLU itself and an extra pair
  would split the fusion); biases stay float;
- the residual input of a skip-connection Add (an Add whose other input comes from a weighted
  op) is quantized too, so TensorRT fuses the add into the convolution with an int8 output;
  when both inputs come from weighted ops (a projection shortcut) the one computed first is
  quantized and the later one fuses with the add;
- grouped convolutions with fewer than 4 channels per group stay float (TensorRT's int8
  grouped kernels need a multiple of 4), as do ``keep_float`` nodes/tensors;
- nothing else is touched: TensorRT propagates Q/DQ through pooling, concat and reshapes.
Needs activation ranges (``ranges``: tensor -> (lo, hi)) from calibration.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from edgec.errors import UserError
from edgec.ir import IR
from edgec.pipeline import Pass, register

WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def weight_axis(node: gs.Node, w: np.ndarray) -> int:
    if node.op == "ConvTranspose":
        return 1
    if node.op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    if node.op == "MatMul":
        return w.ndim - 1
    return 0


@register
class QuantizeTensorRT(Pass):
    name = "quantize_tensorrt"
    description = "INT8 Q/DQ in TensorRT's explicit-quantization form (symmetric, weighted-op inputs, residual adds)"
    lossless = False
    preserves_shapes = True

    def __init__(self, ranges: dict | None = None, keep_float=()):
        super().__init__()
        self.ranges = ranges
        self.keep_float = set(keep_float or ())
        self.summary: dict = {}

    def run(self, ir: IR) -> bool:
        if self.ranges is None:
            raise UserError("quantize_tensorrt needs calibration ranges: use --quantize int8 --calib PATH")
        self._qdq: dict[int, gs.Variable] = {}
        quantized, kept = [], []
        for node in list(ir.nodes):
            if node.op not in WEIGHTED or not node.outputs or node.domain not in (None, "", "ai.onnx"):
                continue
            w = ir.const_value(node.inputs[1]) if len(node.inputs) > 1 else None
            if w is None or w.dtype.kind != "f" or ir.is_const(node.inputs[0]):
                continue
            if node.name in self.keep_float or node.outputs[0].name in self.keep_float:
                kept.append((node.name, "keep_float"))
                continue
            if node.op == "Conv":
                group = int(node.attrs.get("group", 1))
                if group > 1 and (w.shape[1] % 4 or (w.shape[0] // group) % 4):
                    kept.append((node.name, "grouped conv with channels per group not a multiple of 4"))
                    continue
            x = node.inputs[0]
            act = self._activation(ir, x)
            if act is None:
                kept.append((node.name, f"no calibrated range for '{x.name}'"))
                continue
            node.inputs[0] = act
            node.inputs[1] = self._weight(ir, node, w)
            quantized.append(node.name)
        residual = 0
        order = ir.node_index()
        for node in list(ir.nodes):  # skip-connection adds: quantize the branch that is not a weighted op
            if node.op != "Add" or len(node.inputs) != 2 or not node.outputs:
                continue
            producers = [ir.producer(t) for t in node.inputs]
            fused = [p is not None and p.op in WEIGHTED and p.name in quantized for p in producers]
            if not any(fused):
                continue
            if all(fused):  # conv + projection conv: the later conv fuses the add; quantize the earlier
                side = 0 if order[id(producers[0])] < order[id(producers[1])] else 1
            else:
                side = fused.index(False)
            other = node.inputs[side]
            if ir.is_const(other) or (ir.producer(other) is not None and ir.producer(other).op == "DequantizeLinear"):
                continue
            act = self._activation(ir, other)
            if act is not None:
                node.inputs[side] = act
                residual += 1
        self.summary = {"placement": "tensorrt", "quantized_layers": len(quantized), "float_layers": kept,
                        "residual_adds": residual}
        for name, why in kept:
            self.note(f"{name} stays float: {why}")
        return bool(quantized)

    def _scale(self, lo: float, hi: float) -> np.float32:
        amax = max(abs(float(lo)), abs(float(hi)))
        return np.float32(amax / 127.0 if amax > 0 else 1.0)

    def _activation(self, ir: IR, x: gs.Tensor) -> gs.Variable | None:
        """The dequantized copy of ``x`` (one Q/DQ pair per tensor, shared by its readers)."""
        if id(x) in self._qdq:
            return self._qdq[id(x)]
        rng = self.ranges.get(x.name)
        if rng is None:
            return None
        scale = ir.make_const(x.name + "_scale", self._scale(*rng))
        zp = ir.make_const(x.name + "_zp", np.int8(0))
        q = ir.make_var(x.name + "_q", dtype=np.int8, shape=x.shape)
        dq = ir.make_var(x.name + "_dq", dtype=x.dtype, shape=x.shape)
        ir.graph.nodes.append(gs.Node("QuantizeLinear", name=ir.unique_name(x.name + "_Q"), inputs=[x, scale, zp],
                                      outputs=[q]))
        ir.graph.nodes.append(gs.Node("DequantizeLinear", name=ir.unique_name(x.name + "_DQ"), inputs=[q, scale, zp],
                                      outputs=[dq]))
        self._qdq[id(x)] = dq
        return dq

    def _weight(self, ir: IR, node: gs.Node, w: np.ndarray) -> gs.Variable:
        axis = weight_axis(node, w)
        reduce = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.max(np.abs(w), axis=reduce) if reduce else np.abs(w)
        scales = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        base = node.name or node.outputs[0].name
        wt = ir.make_const(base + "_w", w)
        sc = ir.make_const(base + "_w_scale", scales)
        zp = ir.make_const(base + "_w_zp", np.zeros(scales.shape, dtype=np.int8))
        q = ir.make_var(base + "_wq", dtype=np.int8, shape=list(w.shape))
        dq = ir.make_var(base + "_wdq", dtype=w.dtype, shape=list(w.shape))
        ir.graph.nodes.append(gs.Node("QuantizeLinear", name=ir.unique_name(base + "_wQ"), inputs=[wt, sc, zp],
                                      outputs=[q], attrs={"axis": axis}))
        ir.graph.nodes.append(gs.Node("DequantizeLinear", name=ir.unique_name(base + "_wDQ"), inputs=[q, sc, zp],
                                      outputs=[dq], attrs={"axis": axis}))
        return dq
