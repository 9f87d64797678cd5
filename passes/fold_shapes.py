"""fold_shapes: replace Shape/Size of statically shaped tensors with constants.

Rules
- ``Shape(x)`` (with ``start``/``end``, opset 15) becomes an int64 constant when the selected
  dims of ``x`` are known integers; ``Size(x)`` when all dims are.
- The shape arithmetic that follows (Gather, Concat, Unsqueeze, ...) then folds in
  ``fold_constants``.
Only valid for the shapes the model is compiled for: symbolic dims are never folded.
"""

from __future__ import annotations

import numpy as np

from edgec.ir import IR
from edgec.pipeline import Pass, PassContext, PassResult, register


@register
class FoldShapes(Pass):
    name = "fold_shapes"
    description = "replace Shape/Size of statically shaped tensors with constants"
    # False: a shape input it makes constant lets shape inference know more downstream (a
    # Reshape's output), and the next Shape there folds only once that is inferred
    preserves_shapes = False
    requires = ("shapes",)

    def run(self, ir: IR, ctx: PassContext) -> PassResult:
        changed = False
        for node in list(ir.nodes):
            if node.op not in ("Shape", "Size") or node.domain not in (None, "", "ai.onnx"):
                continue
            x, out = node.inputs[0], node.outputs[0]
            if x.shape is None or ir.is_graph_output(out):
                continue
            dims = list(x.shape)
            if node.op == "Shape":
                rank = len(dims)
                start = int(node.attrs.get("start", 0))
                end = int(node.attrs.get("end", rank))
                start = min(max(start + rank if start < 0 else start, 0), rank)
                end = min(max(end + rank if end < 0 else end, 0), rank)
                dims = dims[start:end]
            if not all(isinstance(d, (int, np.integer)) and d >= 0 for d in dims):
                continue
            value = np.array(dims, dtype=np.int64) if node.op == "Shape" else np.array(int(np.prod(dims)), dtype=np.int64)
            ir.replace_uses(out, ir.make_const(out.name + "_static", value))
            changed = True
        return PassResult(changed)
