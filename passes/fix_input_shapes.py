"""fix_input_shapes: give graph inputs fixed shapes (static-shape targets, known batch).

``FixInputShapes({"input": [1, 3, 224, 224]})`` replaces the input's dims (symbolic ones
included); the shapes of the rest of the graph are re-inferred, after which ``fold_shapes``
and ``fold_constants`` can fold the shape arithmetic. A given shape must agree with every
static dim the model already declares (a UserError otherwise).
"""

from __future__ import annotations

import onnx

from edgec.errors import UserError
from edgec.ir import IR
from edgec.pipeline import Pass, PassContext, PassResult, register


@register
class FixInputShapes(Pass):
    name = "fix_input_shapes"
    description = "set graph input shapes (e.g. batch 1) so shape computations fold"

    def __init__(self, shapes: dict | None = None):
        super().__init__()
        self.shapes = dict(shapes or {})

    def run(self, ir: IR, ctx: PassContext) -> PassResult:
        changed = False
        names = {t.name: t for t in ir.inputs}
        for name, shape in self.shapes.items():
            if name not in names:
                raise UserError(f"--input-shape names '{name}', which is not an input of the model "
                                f"(its inputs: {', '.join(names)})")
            t = names[name]
            shape = [int(d) for d in shape]
            old = list(t.shape) if t.shape is not None else None
            if old is not None:
                if len(old) != len(shape):
                    raise UserError(f"--input-shape {name}: rank {len(shape)} given, the model's input has rank {len(old)}")
                for d_old, d_new in zip(old, shape):
                    if isinstance(d_old, int) and d_old > 0 and d_old != d_new:
                        raise UserError(f"--input-shape {name}={shape} contradicts the model's static shape {old}")
            if old != shape:
                t.shape = shape
                changed = True
        if changed:
            inputs = {id(t) for t in ir.inputs}
            outputs = {id(t) for t in ir.outputs}
            for t in ir.graph.tensors().values():  # forget inferred shapes: they are re-derived
                if id(t) not in inputs and not hasattr(t, "values"):
                    # (a graph output keeps its rank: an op onnx cannot infer, ai.onnx.ml's or
                    # com.microsoft's, leaves it there, and an output needs a shape field)
                    t.shape = [None] * len(t.shape) if id(t) in outputs and t.shape is not None else None
            self._check(ir)
        return PassResult(changed)

    def _check(self, ir: IR) -> None:
        """Shapes the model cannot take are the user's to fix: onnx's strict shape inference
        names the op (a Flatten -> Gemm fixed at 128 features, given 12x12 pixels)."""
        given = ", ".join(f"{n}={','.join(map(str, s))}" for n, s in self.shapes.items())
        try:
            onnx.shape_inference.infer_shapes(ir._skeleton(), check_type=False, strict_mode=True, data_prop=True)
        except onnx.shape_inference.InferenceError as e:
            if self._fine_once_inlined(ir):  # the failure is in an If branch that is never taken
                return
            why = " ".join(str(e).split())
            raise UserError(f"--input-shape {given}: the model cannot take these shapes ({why[:300]})") from None
        except Exception:  # (inference itself failing is not the user's shapes: the pipeline goes on)
            pass

    @staticmethod
    def _fine_once_inlined(ir: IR) -> bool:
        """Strict inference passes once constants fold and Ifs with a constant condition are
        inlined (on a copy): an exporter's branch for another sample rate or mode may not
        type-check at the given shapes, and the clean-up drops it (inline_if)."""
        from .fold_constants import FoldConstants
        from .inline_if import InlineIf

        if not any(n.op == "If" for n in ir.nodes):
            return False
        trial = ir.copy()
        ctx = PassContext()
        try:
            trial.infer_shapes(force=True)  # (best effort: what folding needs, the condition's shape)
            FoldConstants().run(trial, ctx)
            if not InlineIf().run(trial, ctx).changed:
                return False
            onnx.shape_inference.infer_shapes(trial._skeleton(), check_type=False, strict_mode=True, data_prop=True)
        except Exception:
            return False
        return True
