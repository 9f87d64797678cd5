"""dedup_initializers: merge constants with identical dtype, shape and bytes.

Every reader of a duplicate is pointed at the first copy (in node order); the others become
dead and are dropped. Lossless: exact.
"""

from __future__ import annotations

import hashlib

import numpy as np

from edgec.ir import IR
from edgec.pipeline import Pass, PassContext, PassResult, register


@register
class DedupInitializers(Pass):
    name = "dedup_initializers"
    description = "merge constants that hold identical values"
    preserves_shapes = True

    def run(self, ir: IR, ctx: PassContext) -> PassResult:
        first: dict[tuple, object] = {}
        changed = False
        for const in ir.constants():
            v = ir.const_value(const)
            if v is None:
                continue
            key = (str(v.dtype), v.shape, hashlib.sha1(np.asarray(v).tobytes()).hexdigest())
            keep = first.setdefault(key, const)
            if keep is const or not np.array_equal(ir.const_value(keep), v):
                continue
            ir.replace_uses(const, keep)
            changed = True
        return PassResult(changed)
