"""collapse_reshapes: collapse Reshape/Flatten chains and drop Reshapes that change nothing.

Rules
- ``Reshape(s2)(Reshape|Flatten(x))`` is ``Reshape(s2)(x)`` when ``s2`` is a constant without
  0 entries (a 0 would copy a dim of the intermediate) and the inner node is read only by
  Reshapes;
- a Reshape or Flatten whose input and output have the same static shape is removed.
Lossless: exact (Reshape never reorders data).
"""

from __future__ import annotations

import numpy as np

from edgec.ir import IR
from edgec.pipeline import Pass, PassContext, PassResult, register


@register
class CollapseReshapes(Pass):
    name = "collapse_reshapes"
    description = "collapse Reshape/Flatten chains and remove shape-preserving Reshapes"
    preserves_shapes = True
    requires = ("shapes",)

    def run(self, ir: IR, ctx: PassContext) -> PassResult:
        changed = False
        for node in list(ir.nodes):
            if node.op not in ("Reshape", "Flatten") or node.domain not in (None, "", "ai.onnx") or not node.outputs:
                continue
            if node.op == "Reshape":
                shape = ir.const_value(node.inputs[1])
                inner = ir.producer(node.inputs[0])
                if (shape is not None and not np.any(shape == 0) and inner is not None
                        and inner.op in ("Reshape", "Flatten") and inner.domain in (None, "", "ai.onnx")
                        and not ir.is_graph_output(inner.outputs[0])
                        and all(c.op == "Reshape" for c in inner.outputs[0].outputs)):
                    node.inputs[0] = inner.inputs[0]
                    changed = True
            src = IR.static_shape(node.inputs[0])
            dst = IR.static_shape(node.outputs[0])
            if src is not None and src == dst and ir.bypass(node):
                changed = True
        return PassResult(changed)
