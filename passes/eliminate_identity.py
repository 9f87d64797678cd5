"""eliminate_identity: remove nodes that only copy their input.

Rules
- ``Identity``;
- ``Dropout`` in inference (no ``training_mode`` input, or a constant False one; opsets < 12
  are always inference at export) when its mask output is unused;
- ``Cast`` to the dtype its input already has.
Graph outputs keep their names (the producer is made to write them). Lossless: exact.
"""

from __future__ import annotations

import numpy as np

from edgec.ir import IR, onnx_elem_type
from edgec.pipeline import Pass, PassContext, PassResult, register


@register
class EliminateIdentity(Pass):
    name = "eliminate_identity"
    description = "remove Identity, inference Dropout and no-op Cast nodes"
    preserves_shapes = True
    requires = ("shapes",)

    def run(self, ir: IR, ctx: PassContext) -> PassResult:
        changed = False
        for node in list(ir.nodes):
            if node.domain not in (None, "", "ai.onnx") or not node.inputs or not node.outputs:
                continue
            if node.op == "Identity" or (node.op == "Dropout" and self._inference_dropout(ir, node)) \
                    or (node.op == "Cast" and self._noop_cast(node)):
                if ir.bypass(node):
                    changed = True
        return PassResult(changed)

    @staticmethod
    def _inference_dropout(ir: IR, node) -> bool:
        if any(o.outputs or ir.is_graph_output(o) for o in node.outputs[1:]):
            return False
        if len(node.inputs) >= 3 and not (hasattr(node.inputs[2], "is_empty") and node.inputs[2].is_empty()):
            mode = ir.const_value(node.inputs[2])
            return mode is not None and not bool(np.asarray(mode).reshape(-1)[0])
        return True

    @staticmethod
    def _noop_cast(node) -> bool:
        src = node.inputs[0].dtype
        to = node.attrs.get("to")
        if src is None or to is None:
            return False
        try:
            return onnx_elem_type(src) == int(to)
        except (TypeError, KeyError, ValueError):
            return False
