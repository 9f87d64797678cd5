"""fold_conv_affine: fold a constant per-channel Mul/Add/Sub/Div after a Conv into the Conv.

Rules (``c`` a constant that, right-aligned to the Conv output's rank, is 1 on every axis
except the channel axis, or a scalar):
- ``Conv(x) * c`` / ``c * Conv(x)``: ``W[o] *= c[o]``, ``b[o] *= c[o]``;
- ``Conv(x) / c``: ``W[o] /= c[o]``, ``b[o] /= c[o]``;
- ``Conv(x) + c`` / ``c + Conv(x)``: ``b += c``;  ``Conv(x) - c``: ``b -= c``;
- ``c - Conv(x)``: ``W = -W``, ``b = c - b``.
Only when the Conv output has no other reader and is not a graph output, the weights/bias
are constants and ``c`` has the Conv's float dtype. Lossless up to float rounding.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from edgec.ir import IR
from edgec.pipeline import Pass, PassContext, PassResult, register

from ._util import per_channel

OPS = ("Mul", "Add", "Sub", "Div")


@register
class FoldConvAffine(Pass):
    name = "fold_conv_affine"
    description = "fold a constant per-channel Mul/Add/Sub/Div that follows a Conv into its weights and bias"
    preserves_shapes = True
    requires = ("shapes",)

    def run(self, ir: IR, ctx: PassContext) -> PassResult:
        changed = False
        for node in list(ir.nodes):
            if node.op not in OPS or node.domain not in (None, "", "ai.onnx") or len(node.inputs) != 2:
                continue
            if self._try(ir, node):
                changed = True
        return PassResult(changed)

    def _try(self, ir: IR, node: gs.Node) -> bool:
        a, b = node.inputs
        if ir.is_const(b) and not ir.is_const(a):
            conv_out, c, const_first = a, ir.const_value(b), False
        elif ir.is_const(a) and not ir.is_const(b) and node.op in ("Mul", "Add", "Sub"):
            conv_out, c, const_first = b, ir.const_value(a), True
        else:
            return False
        conv = ir.producer(conv_out)
        if conv is None or conv.op != "Conv" or ir.single_consumer(conv_out) is not node:
            return False
        w = ir.const_value(conv.inputs[1])
        if w is None or w.dtype.kind != "f" or c.dtype != w.dtype:
            return False
        has_bias = len(conv.inputs) > 2 and not (isinstance(conv.inputs[2], gs.Variable) and conv.inputs[2].is_empty())
        bias = ir.const_value(conv.inputs[2]) if has_bias else np.zeros(w.shape[0], dtype=w.dtype)
        if bias is None:
            return False
        rank = len(conv_out.shape) if conv_out.shape is not None else w.ndim
        vec = per_channel(c, rank, w.shape[0])
        if vec is None:
            return False
        vec = vec.astype(np.float64)
        w64, b64 = w.astype(np.float64), bias.astype(np.float64)
        col = vec.reshape((-1,) + (1,) * (w.ndim - 1))
        if node.op == "Mul":
            w64, b64 = w64 * col, b64 * vec
        elif node.op == "Div":
            if np.any(vec == 0):
                return False
            w64, b64 = w64 / col, b64 / vec
        elif node.op == "Add":
            b64 = b64 + vec
        elif node.op == "Sub" and not const_first:
            b64 = b64 - vec
        else:  # c - conv
            w64, b64 = -w64, vec - b64
        base = conv.name or conv_out.name
        conv.inputs[1] = ir.make_const(base + "_affine_W", w64.astype(w.dtype))
        bias_c = ir.make_const(base + "_affine_b", b64.astype(w.dtype))
        if len(conv.inputs) > 2:
            conv.inputs[2] = bias_c
        else:
            conv.inputs.append(bias_c)
        # The elementwise node becomes a copy of the conv output, then goes away.
        node.op = "Identity"
        node.attrs.clear()
        node.inputs.clear()
        node.inputs.append(conv_out)
        ir.bypass(node)
        return True
