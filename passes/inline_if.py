"""inline_if: an If whose condition is a constant becomes the branch it takes.

Rules
- The condition is a constant (after constant folding: an exporter's ``Equal(sr, 16000)`` once
  ``sr`` is fixed), the node is in the default domain.
- The taken branch's nodes move into the graph; each If output is an ``Identity`` of the
  branch's output (eliminate_identity removes them where names allow), so graph outputs keep
  their names. Names the branch defines that the graph already uses are renamed.
- Why: a branch never taken still has to type-check. Once input shapes are static, the other
  branch of an exporter's ``If`` can be ill-typed for them (silero-vad's 8 kHz branch squeezes
  a dim that is 2 at 16 kHz), and ONNX Runtime then refuses the whole model.
Post-condition: outputs unchanged bit for bit (the same nodes compute them).
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx_graphsurgeon as gs

from edgec.ir import IR, subgraphs
from edgec.pipeline import Pass, PassContext, PassResult, register


@register
class InlineIf(Pass):
    name = "inline_if"
    description = "replace an If with a constant condition by the branch it takes"
    preserves_shapes = False
    requires = ("order",)

    def run(self, ir: IR, ctx: PassContext) -> PassResult:
        result = PassResult(False)
        for node in ir.find("If"):
            if not node.inputs:
                continue
            cond = ir.const_value(node.inputs[0])
            if cond is None or cond.size != 1:
                continue
            taken = "then_branch" if bool(np.asarray(cond).reshape(-1)[0]) else "else_branch"
            body = node.attrs.get(taken)
            if not isinstance(body, gs.Graph) or len(body.outputs) != len(node.outputs):
                continue
            self._inline(ir, node, body)
            result.changed = True
            result.note(f"inline_if: If '{node.name}' takes its {taken.split('_')[0]} branch always "
                        f"({len(body.nodes)} nodes inlined)")
        if result.changed:
            ir.toposort()
            ir.changed()
        return result

    @staticmethod
    def _inline(ir: IR, node: gs.Node, body: gs.Graph) -> None:
        outer = {name: t for name, t in ir.tensors().items()}
        used = set(outer) | {n.name for n in ir.nodes if n.name}
        for other in ir.nodes:  # names defined in the other bodies too: sibling bodies may share one
            if other is node:
                continue
            for sub in subgraphs(other):
                used.update(sub.tensors())
                used.update(n.name for n in sub.nodes if n.name)
        for sub in subgraphs(node):  # (and the other branch of this If, and bodies inside this one)
            if sub is not body:
                used.update(sub.tensors())
        fresh = itertools.count()

        def rename(name: str) -> str:
            new = f"{name}__inlined"
            while new in used:
                new = f"{name}__inlined{next(fresh)}"
            used.add(new)
            return new

        for t in body.tensors().values():  # names the branch defines that are used elsewhere: renamed
            if t.name in used and outer.get(t.name) is not t:
                t.name = rename(t.name)
        for n in body.nodes:
            if n.name and n.name in used:
                n.name = rename(n.name)
        ir.reserved |= used  # (unique_name sees the top level only)
        outs = list(node.outputs)
        sources = list(body.outputs)
        node.outputs.clear()
        node.inputs.clear()
        ir.graph.nodes.remove(node)
        ir.graph.nodes.extend(body.nodes)
        for out, src in zip(outs, sources):
            ir.graph.nodes.append(gs.Node("Identity", name=ir.unique_name(f"{out.name}_inlined"),
                                          inputs=[src], outputs=[out]))
