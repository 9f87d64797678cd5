"""eliminate_dead: remove nodes whose outputs nothing reads, and unused constants.

Graph inputs are never removed (they are the model's signature); nodes inside If/Loop/Scan
bodies and the outer tensors they read are kept. Lossless: exact.
"""

from __future__ import annotations

from edgec.ir import IR
from edgec.pipeline import Pass, PassContext, PassResult, register


@register
class EliminateDead(Pass):
    name = "eliminate_dead"
    description = "remove nodes whose outputs are never read and unused initializers"
    preserves_shapes = True

    def run(self, ir: IR, ctx: PassContext) -> PassResult:
        before = (len(ir.nodes), len(ir.tensors()))
        ir.remove_dead()
        return PassResult((len(ir.nodes), len(ir.tensors())) != before)
