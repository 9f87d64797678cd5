"""decompose_ops: rewrite ops a target lacks into ops it has.

Rules (each exact in float arithmetic, up to rounding):
- ``Sum(a, b, c, ...)``          -> ``Add(Add(a, b), c) ...``
- ``Mean(a, b, ...)``            -> ``Mul(Add(...), 1/n)``
- ``Neg(x)``                     -> ``Mul(x, -1)``
- ``Reciprocal(x)``              -> ``Div(1, x)``
- ``Abs(x)``                     -> ``Add(Relu(x), Relu(Mul(x, -1)))``
- ``ReduceL2(x)``                -> ``Sqrt(ReduceSum(Mul(x, x)))``
- ``ReduceSumSquare(x)``         -> ``ReduceSum(Mul(x, x))``
- ``Softsign(x)``                -> ``Div(x, Add(Abs-decomposition(x), 1))``
- ``LayerNormalization(x, s, b)`` (first output only) -> ``ReduceMean``/``Sub``/``Mul``/
  ``ReduceMean``/``Add eps``/``Sqrt``/``Div``/``Mul s``/``Add b`` over the normalised axes
  (TensorRT 8.5/8.6's parser has no LayerNormalization).
Only float tensors are decomposed; reduce axes are taken from the attribute (opset < 18) or
a constant input (opset >= 18) and the form matching the model's opset is emitted.
``ops`` selects which rules run (a target passes what its toolchain lacks).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from edgec.ir import IR, plain_dtype
from edgec.pipeline import Pass, PassContext, PassResult, register

ALL = ("Sum", "Mean", "Neg", "Reciprocal", "Abs", "ReduceL2", "ReduceSumSquare", "Softsign",
       "LayerNormalization")


@register
class DecomposeOps(Pass):
    name = "decompose_ops"
    description = "rewrite ops a target lacks (Sum, Mean, Neg, Reciprocal, Abs, ReduceL2, LayerNorm, ...) into ones it has"
    requires = ("shapes",)

    def __init__(self, ops=ALL):
        super().__init__()
        self.ops = tuple(ops)

    def run(self, ir: IR, ctx: PassContext) -> PassResult:
        result = PassResult(False)
        for node in list(ir.nodes):
            if node.op not in self.ops or node.domain not in (None, "", "ai.onnx"):
                continue
            x = node.inputs[0] if node.inputs else None
            if x is None or plain_dtype(x.dtype) is None or plain_dtype(x.dtype).kind != "f":
                result.note(f"{node.op} '{node.name}' kept: not a float tensor of known dtype")
                continue
            self._dtype = x.dtype  # rules clear the node's inputs before emitting replacements
            outcome = getattr(self, "_" + node.op)(ir, node)  # False: not applicable; a str: kept, and why
            if isinstance(outcome, str):
                result.note(outcome)
            elif outcome is not False:
                result.changed = True
        return result

    # -- helpers -------------------------------------------------------------------------
    def _emit(self, ir: IR, node: gs.Node, op: str, inputs, out=None, **attrs) -> gs.Variable:
        out = out if out is not None else ir.make_var(f"{node.name or node.op}_{op.lower()}", dtype=self._dtype)
        ir.graph.nodes.append(gs.Node(op, name=ir.unique_name(f"{node.name or node.op}_{op}"),
                                      inputs=list(inputs), outputs=[out], attrs=attrs))
        return out

    def _scalar(self, ir: IR, node: gs.Node, value: float) -> gs.Constant:
        return ir.make_const(f"{node.name or node.op}_k", np.array(value, dtype=np.dtype(self._dtype)))

    def _finish(self, node: gs.Node) -> None:
        node.inputs.clear()
        node.outputs.clear()

    def _reduce(self, ir: IR, node: gs.Node, op: str, x, axes, keepdims: int, out=None):
        if ir.opset >= 18 or op == "ReduceSum" and ir.opset >= 13:
            inputs = [x] if axes is None else [x, ir.make_const(f"{node.name}_axes", np.array(axes, dtype=np.int64))]
            return self._emit(ir, node, op, inputs, out, keepdims=keepdims)
        attrs = {"keepdims": keepdims}
        if axes is not None:
            attrs["axes"] = list(axes)
        return self._emit(ir, node, op, [x], out, **attrs)

    @staticmethod
    def _axes(ir: IR, node: gs.Node):
        if "axes" in node.attrs:
            return [int(a) for a in node.attrs["axes"]]
        if len(node.inputs) > 1 and not (isinstance(node.inputs[1], gs.Variable) and node.inputs[1].is_empty()):
            v = ir.const_value(node.inputs[1])
            return None if v is None else [int(a) for a in v.reshape(-1)]
        return None

    # -- rules ---------------------------------------------------------------------------
    def _Sum(self, ir, node):
        acc = node.inputs[0]
        rest = list(node.inputs[1:])
        if not rest:
            return ir.bypass(node)
        y = node.outputs[0]
        self._finish(node)
        for i, t in enumerate(rest):
            acc = self._emit(ir, node, "Add", [acc, t], y if i == len(rest) - 1 else None)
        return True

    def _Mean(self, ir, node):
        n = len(node.inputs)
        y = node.outputs[0]
        inputs = list(node.inputs)
        self._finish(node)
        acc = inputs[0]
        for t in inputs[1:]:
            acc = self._emit(ir, node, "Add", [acc, t])
        self._emit(ir, node, "Mul", [acc, self._scalar(ir, node, 1.0 / n)], y)
        return True

    def _Neg(self, ir, node):
        x, y = node.inputs[0], node.outputs[0]
        self._finish(node)
        self._emit(ir, node, "Mul", [x, self._scalar(ir, node, -1.0)], y)

    def _Reciprocal(self, ir, node):
        x, y = node.inputs[0], node.outputs[0]
        self._finish(node)
        self._emit(ir, node, "Div", [self._scalar(ir, node, 1.0), x], y)

    def _abs(self, ir, node, x, out=None):
        pos = self._emit(ir, node, "Relu", [x])
        neg = self._emit(ir, node, "Relu", [self._emit(ir, node, "Mul", [x, self._scalar(ir, node, -1.0)])])
        return self._emit(ir, node, "Add", [pos, neg], out)

    def _Abs(self, ir, node):
        x, y = node.inputs[0], node.outputs[0]
        self._finish(node)
        self._abs(ir, node, x, y)

    def _reduce_args(self, ir, node):
        """(x, y, axes, keepdims) of a Reduce node, or None where the rewrite does not apply."""
        if node.attrs.get("noop_with_empty_axes", 0):
            return None
        axes = self._axes(ir, node)
        if axes is None and len(node.inputs) > 1:
            return None  # axes given but not constant
        return node.inputs[0], node.outputs[0], axes, int(node.attrs.get("keepdims", 1))

    def _ReduceL2(self, ir, node):
        args = self._reduce_args(ir, node)
        if args is None:
            return False
        x, y, axes, keep = args
        self._finish(node)
        sq = self._emit(ir, node, "Mul", [x, x])
        self._emit(ir, node, "Sqrt", [self._reduce(ir, node, "ReduceSum", sq, axes, keep)], y)

    def _ReduceSumSquare(self, ir, node):
        args = self._reduce_args(ir, node)
        if args is None:
            return False
        x, y, axes, keep = args
        self._finish(node)
        self._reduce(ir, node, "ReduceSum", self._emit(ir, node, "Mul", [x, x]), axes, keep, y)

    def _Softsign(self, ir, node):
        x, y = node.inputs[0], node.outputs[0]
        self._finish(node)
        denom = self._emit(ir, node, "Add", [self._abs(ir, node, x), self._scalar(ir, node, 1.0)])
        self._emit(ir, node, "Div", [x, denom], y)

    def _LayerNormalization(self, ir, node):
        if any(o.outputs or ir.is_graph_output(o) for o in node.outputs[1:]):
            return f"LayerNormalization '{node.name}' kept: its mean/inv-std outputs are used"
        x = node.inputs[0]
        if x.shape is None:
            return f"LayerNormalization '{node.name}' kept: input rank unknown"
        rank = len(x.shape)
        axis = int(node.attrs.get("axis", -1))
        axis = axis + rank if axis < 0 else axis
        axes = list(range(axis, rank))
        eps = float(node.attrs.get("epsilon", 1e-5))
        scale = node.inputs[1]
        bias = node.inputs[2] if len(node.inputs) > 2 and not (isinstance(node.inputs[2], gs.Variable)
                                                               and node.inputs[2].is_empty()) else None
        y = node.outputs[0]
        self._finish(node)
        mean = self._reduce(ir, node, "ReduceMean", x, axes, 1)
        d = self._emit(ir, node, "Sub", [x, mean])
        var = self._reduce(ir, node, "ReduceMean", self._emit(ir, node, "Mul", [d, d]), axes, 1)
        std = self._emit(ir, node, "Sqrt", [self._emit(ir, node, "Add", [var, self._scalar(ir, node, eps)])])
        normed = self._emit(ir, node, "Div", [d, std])
        scaled = self._emit(ir, node, "Mul", [normed, scale], None if bias is not None else y)
        if bias is not None:
            self._emit(ir, node, "Add", [scaled, bias], y)
