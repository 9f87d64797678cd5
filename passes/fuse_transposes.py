"""fuse_transposes: compose consecutive Transposes; drop identity ones.

Rules
- ``Transpose(p2)(Transpose(p1)(x))`` is ``Transpose(c)(x)`` with ``c[j] = p1[p2[j]]``;
  applied when the inner Transpose is read only by Transposes (so it dies afterwards and the
  node count never grows);
- a Transpose whose permutation is the identity is removed.
A missing ``perm`` (reverse the axes) is resolved from the input's rank when it is known.
Lossless: exact.
"""

from __future__ import annotations

from edgec.ir import IR
from edgec.pipeline import Pass, PassContext, PassResult, register


def _perm(node) -> list[int] | None:
    perm = node.attrs.get("perm")
    if perm is not None:
        return [int(p) for p in perm]
    shape = node.inputs[0].shape
    return list(range(len(shape)))[::-1] if shape is not None else None


@register
class FuseTransposes(Pass):
    name = "fuse_transposes"
    description = "compose consecutive Transposes and remove identity permutations"
    preserves_shapes = True
    requires = ("shapes",)

    def run(self, ir: IR, ctx: PassContext) -> PassResult:
        changed = False
        for node in list(ir.find("Transpose")):
            if not node.outputs or not node.inputs:
                continue  # removed earlier in this run
            p2 = _perm(node)
            inner = ir.producer(node.inputs[0])
            if p2 is not None and inner is not None and inner.op == "Transpose" and inner.domain in (None, "", "ai.onnx"):
                mid = inner.outputs[0]
                p1 = _perm(inner)
                readers_all_transpose = all(c.op == "Transpose" for c in mid.outputs)
                if p1 is not None and len(p1) == len(p2) and readers_all_transpose and not ir.is_graph_output(mid):
                    node.attrs["perm"] = [p1[j] for j in p2]
                    node.inputs[0] = inner.inputs[0]
                    changed = True
                    p2 = node.attrs["perm"]
            if p2 is not None and p2 == list(range(len(p2))):
                if ir.bypass(node):
                    changed = True
        return PassResult(changed)
