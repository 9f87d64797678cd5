"""infer_shapes: annotate every tensor with its shape and dtype (onnx shape inference with
data propagation; symbolic dims keep their names). Changes no node: its result says unchanged."""

from __future__ import annotations

from edgec.ir import IR
from edgec.pipeline import Pass, PassContext, PassResult, register


@register
class InferShapes(Pass):
    name = "infer_shapes"
    description = "annotate tensors with shapes and dtypes (onnx shape inference, data propagation)"

    def run(self, ir: IR, ctx: PassContext) -> PassResult:
        ir.infer_shapes()
        return PassResult(False)
