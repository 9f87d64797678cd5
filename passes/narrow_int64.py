"""narrow_int64: store INT64 constants as INT32 where every reader accepts INT32.

TensorRT computes in INT32 (8.5/8.6 cast INT64 down with warnings; 10.x supports INT64 but
INT32 is its native index type). A constant is narrowed when its values fit in INT32 and, for
every node that reads it, the ONNX schema allows ``tensor(int32)`` at that input and the
input's type variable is not shared with another input or an output (so no other tensor
would have to change type with it). Shape, axes and other INT64-only inputs are left alone.
Exact.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from edgec.ir import IR, plain_dtype
from edgec.pipeline import Pass, PassContext, PassResult, register

I32 = np.iinfo(np.int32)


def _accepts_int32(node: gs.Node, index: int, opset: int) -> bool:
    if node.domain not in (None, "", "ai.onnx"):
        return False
    try:
        schema = onnx.defs.get_schema(node.op, opset)
    except onnx.defs.SchemaError:
        return False
    formal = schema.inputs[min(index, len(schema.inputs) - 1)]
    var = formal.type_str
    if var.startswith("tensor("):
        return var == "tensor(int32)"
    shared = [i for i, f in enumerate(schema.inputs) if f.type_str == var and i != index]
    if any(i < len(node.inputs) and not (isinstance(node.inputs[i], gs.Variable) and node.inputs[i].is_empty())
           for i in shared) or any(o.type_str == var for o in schema.outputs):
        return False
    allowed = {t for c in schema.type_constraints if c.type_param_str == var for t in c.allowed_type_strs}
    return "tensor(int32)" in allowed


@register
class NarrowInt64(Pass):
    name = "narrow_int64"
    description = "store INT64 constants as INT32 where values fit and every reader accepts INT32"
    preserves_shapes = True

    def run(self, ir: IR, ctx: PassContext) -> PassResult:
        changed = False
        for const in ir.constants():
            if plain_dtype(const.dtype) != np.int64:
                continue
            v = ir.const_value(const)
            if v.size and (v.min() < I32.min or v.max() > I32.max):
                continue
            readers = [(n, i) for n in const.outputs for i, t in enumerate(n.inputs) if t is const]
            if not readers or not all(_accepts_int32(n, i, ir.opset) for n, i in readers):
                continue
            narrow = ir.make_const(const.name + "_i32", v.astype(np.int32))
            for n, i in readers:
                n.inputs[i] = narrow
            changed = True
        return PassResult(changed)
