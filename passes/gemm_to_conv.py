"""gemm_to_conv: run fully-connected layers on feature vectors as 1x1 convolutions.

NPUs such as Rockchip's compute Conv natively and place Gemm/MatMul on feature vectors less
well. Rules:
- ``Gemm(Flatten|Reshape(x[N,C,1,1]) -> [N,C], B, C?)`` with ``transA=0`` and a constant
  ``B`` becomes ``Conv(x, W[M,C,1,1], bias)`` followed by the ``Flatten`` (moved after it),
  so the 4-D tensor from global pooling feeds the conv directly;
- any other ``Gemm`` on a 2-D input ``[N,K]`` with constant ``B`` becomes
  ``Reshape[N,K,1,1] -> Conv 1x1 -> Reshape[N,M]``;
- ``alpha`` is folded into the weights and ``beta * C`` into the bias (``C`` must be a
  constant that broadcasts per output feature);
- ``MatMul`` of a 2-D ``[N, K]`` activation by a constant ``[K, M]`` matrix is handled as a
  Gemm without bias.
Exact up to float rounding.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from edgec.ir import IR
from edgec.pipeline import Pass, PassContext, PassResult, register


@register
class GemmToConv(Pass):
    name = "gemm_to_conv"
    description = "rewrite Gemm/MatMul on feature vectors as a 1x1 Conv (NPU-friendly)"
    preserves_shapes = True
    requires = ("shapes",)

    def run(self, ir: IR, ctx: PassContext) -> PassResult:
        changed = False
        for node in list(ir.find("Gemm")) + list(ir.find("MatMul")):
            if self._rewrite(ir, node):
                changed = True
        return PassResult(changed)

    def _rewrite(self, ir: IR, gemm: gs.Node) -> bool:
        a, y = gemm.inputs[0], gemm.outputs[0]
        b = ir.const_value(gemm.inputs[1])
        if b is None or b.ndim != 2 or gemm.attrs.get("transA", 0) or a.shape is None or len(a.shape) != 2:
            return False
        if b.dtype not in (np.float32, np.float16):  # (ONNX Runtime has no float64 Conv: the model would not load)
            return False
        n, k = a.shape
        if not isinstance(k, (int, np.integer)):
            return False
        if gemm.op == "MatMul" and b.ndim == 2:  # [N, K] x [K, M]: a Gemm without bias
            gemm.attrs.clear()
        w = b if gemm.attrs.get("transB", 0) else b.T  # [M, K]
        m = w.shape[0]
        alpha = float(gemm.attrs.get("alpha", 1.0))
        beta = float(gemm.attrs.get("beta", 1.0))
        bias = np.zeros(m, dtype=w.dtype)
        if len(gemm.inputs) > 2 and not (isinstance(gemm.inputs[2], gs.Variable) and gemm.inputs[2].is_empty()):
            c = ir.const_value(gemm.inputs[2])
            if c is None or c.size not in (1, m) or (c.ndim == 2 and c.shape[0] != 1):
                return False
            bias = (beta * np.broadcast_to(c.reshape(-1), (m,))).astype(w.dtype)
        weight = (alpha * w).astype(w.dtype).reshape(m, k, 1, 1)
        base = gemm.name or y.name
        # Pattern 1: the Gemm input is a 4-D [N, C, 1, 1] tensor flattened: convolve it directly.
        flat = ir.producer(a)
        src = flat.inputs[0] if flat is not None and flat.op in ("Flatten", "Reshape") else None
        if (src is not None and src.shape is not None and len(src.shape) == 4 and list(src.shape[2:]) == [1, 1]
                and src.shape[1] == k and len(a.outputs) == 1 and not ir.is_graph_output(a)):
            conv_in = src
        else:
            shape4 = ir.make_const(base + "_to4d", np.array([0, k, 1, 1], dtype=np.int64))
            conv_in = ir.make_var(base + "_4d", dtype=a.dtype, shape=[n, k, 1, 1])
            ir.graph.nodes.append(gs.Node("Reshape", name=ir.unique_name(base + "_to4d"), inputs=[a, shape4],
                                          outputs=[conv_in]))
        conv_out = ir.make_var(base + "_conv", dtype=y.dtype, shape=[n, m, 1, 1])
        ir.graph.nodes.append(gs.Node("Conv", name=ir.unique_name(base + "_conv"),
                                      inputs=[conv_in, ir.make_const(base + "_W", weight),
                                              ir.make_const(base + "_b", bias)],
                                      outputs=[conv_out], attrs={"kernel_shape": [1, 1]}))
        gemm.op = "Flatten"
        gemm.attrs.clear()
        gemm.attrs["axis"] = 1
        gemm.inputs.clear()
        gemm.inputs.append(conv_out)
        return True
