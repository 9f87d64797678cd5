"""shuffle_to_4d: express 5-D channel shuffles with 4-D tensors.

``Reshape[N,g,C/g,H,W] -> Transpose(perm with axes 3 and 4 fixed) -> Reshape[N,C,H,W]`` is
the same data movement as ``Reshape[N,g,C/g,H*W] -> Transpose(perm restricted to 4 axes)
-> Reshape[N,C,H,W]``: the last two axes travel together. NPUs that compute on 4-D NCHW
tensors (Rockchip's) then keep the shuffle on the accelerator. Exact.
"""

from __future__ import annotations

import numpy as np

from edgec.ir import IR
from edgec.pipeline import Pass, PassContext, PassResult, register


@register
class ShuffleTo4D(Pass):
    name = "shuffle_to_4d"
    description = "rewrite 5-D Reshape-Transpose channel shuffles into 4-D equivalents"
    preserves_shapes = True
    requires = ("shapes",)

    def run(self, ir: IR, ctx: PassContext) -> PassResult:
        changed = False
        for tr in list(ir.find("Transpose")):
            perm = tr.attrs.get("perm")
            if perm is None or len(perm) != 5 or list(perm[3:]) != [3, 4]:
                continue
            r1 = ir.producer(tr.inputs[0])
            if r1 is None or r1.op != "Reshape" or ir.single_consumer(r1.outputs[0]) is not tr:
                continue
            mid = IR.static_shape(r1.outputs[0])
            if mid is None or len(mid) != 5:
                continue
            n, a, b, h, w = mid
            r1.inputs[1] = ir.make_const((r1.name or "reshape") + "_4d", np.array([n, a, b, h * w], dtype=np.int64))
            r1.outputs[0].shape = [n, a, b, h * w]
            tr.attrs["perm"] = [int(p) for p in perm[:3]] + [3]
            out_shape = IR.static_shape(tr.outputs[0])
            if out_shape is not None:
                tr.outputs[0].shape = list(out_shape[:3]) + [h * w]
            changed = True
        return PassResult(changed)
