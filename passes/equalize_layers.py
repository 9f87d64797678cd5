"""equalize_layers: cross-layer equalisation of Conv[-Relu]-Conv pairs (lossless).

Rules (the arithmetic is :mod:`edgec.equalization`)
- ``Conv1 -> [Relu] -> Conv2`` with no other reader in between: Conv1's output channel ``i``
  (weight and bias) divided by ``s_i``, Conv2's input channel ``i`` multiplied by it, with
  ``s_i = sqrt(r1_i / r2_i)`` from the channels' weight ranges; Conv2 regular or depthwise.
- Clip/ReLU6 in between: left alone (not positively homogeneous).
- New constants are created; shared weights are never modified in place.
Post-condition: same outputs up to float rounding. Quantization applies it only where it
measurably lowers the quantized model's error (:mod:`edgec.quantize_api`).
"""

from __future__ import annotations

from edgec.equalization import equalize
from edgec.ir import IR
from edgec.pipeline import Pass, PassContext, PassResult, register
from edgec.quant_plan import node_id


@register
class EqualizeLayers(Pass):
    name = "equalize_layers"
    description = "cross-layer equalisation: balance the weight ranges of Conv[-Relu]-Conv pairs (lossless)"
    preserves_shapes = True

    def __init__(self, sweeps: int = 3):
        super().__init__()
        self.sweeps = sweeps

    def run(self, ir: IR, ctx: PassContext) -> PassResult:
        updates = equalize(ir, self.sweeps)
        if not updates:
            return PassResult(False)
        for node in ir.nodes:
            for slot, value in updates.get(node_id(node), {}).items() if node.outputs else ():
                base = node.name or node.outputs[0].name
                node.inputs[slot] = ir.make_const(base + ("_cle_W" if slot == 1 else "_cle_b"), value)
        return PassResult(True, [f"equalised {len(updates)} layers' weight ranges across Conv pairs"],
                          data={"layers": sorted(updates)})
