"""fold_constants: evaluate nodes whose inputs are all constants.

Rules
- A node folds when every input is a constant (or the output of another folding node), it is
  in the default domain, deterministic, has no subgraph, and is not a Q/DQ node (those carry
  a quantized model's intent).
- Size cap, checked before anything is evaluated: an output becomes a constant only if it is
  at most ``max(small_bytes, bytes of the node's inputs)`` (``small_bytes`` 1 KiB; the rknn
  target's pipeline raises it to 1 MiB). A node whose inferred output is larger
  (e.g. ``ConstantOfShape`` making a big weight from a 4-element shape) is not evaluated at
  all, and neither is a node whose output size is unknown unless the op cannot make more
  elements than its inputs hold (``SIZE_BOUNDED``). Folding therefore never bloats the model
  and never allocates more than the cap.
- Constants numpy cannot hold (bfloat16, float8, int4, strings) are carried through untouched:
  nodes reading them are not folded.
- Evaluation runs once, in ONNX Runtime, over a model made of all foldable nodes.
- Generated constants stay generated: a shape-only op (Unsqueeze, Squeeze, Reshape, Flatten,
  Expand) of a ``ConstantOfShape`` becomes one ``ConstantOfShape`` of the output's static
  shape, so the chain shrinks without materialising the tensor.
Post-condition: outputs of the graph are unchanged bit for bit (same kernels compute them).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from edgec.ir import IR, is_opaque, plain_dtype
from edgec.pipeline import Pass, PassContext, PassResult, register

from ._util import NONDETERMINISTIC, QUANT_OPS, has_subgraph, is_default_domain

SMALL_BYTES = 1024
SUBGRAPH_MAX_BYTES = 1 << 20  # the largest tensor folding inside a subgraph may write
SHAPE_ONLY = ("Unsqueeze", "Squeeze", "Reshape", "Flatten", "Expand")
# Ops whose every output holds at most as many elements as all their inputs together: an output
# of unknown shape still has a size bound before evaluation (8 bytes per input element).
SIZE_BOUNDED = {
    "Abs", "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "Cast", "CastLike", "Ceil", "Cos", "Cosh", "Erf",
    "Exp", "Floor", "Identity", "IsInf", "IsNaN", "Log", "Neg", "Not", "Reciprocal", "Relu", "Round", "Sigmoid",
    "Sign", "Sin", "Sinh", "Sqrt", "Tan", "Tanh", "Softplus", "Softsign", "Elu", "Selu", "LeakyRelu", "HardSigmoid",
    "Clip", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Slice", "Concat", "Split",
    "GatherElements", "Shape", "Size", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceMean", "ReduceProd",
    "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin",
    "Softmax", "LogSoftmax",
}
SHAPE_ELEMS = 64  # Shape/Size output at most this many elements more than their input holds


def _nbytes_of_shape(t: gs.Tensor) -> int | None:
    shape = IR.static_shape(t)
    dt = plain_dtype(t.dtype)
    if shape is None or dt is None:
        return None
    return math.prod(shape) * dt.itemsize


def _const_bytes(t: gs.Constant) -> int:
    """Bytes of a constant without loading lazily stored values."""
    return math.prod(int(d) for d in t.shape) * plain_dtype(t.dtype).itemsize


@register
class FoldConstants(Pass):
    name = "fold_constants"
    description = "evaluate nodes whose inputs are all constants (size-capped: never grows the model)"
    # False: a shape input it makes constant lets shape inference know more downstream (a
    # Reshape's output), and the next Shape there folds only once that is inferred
    preserves_shapes = False
    requires = ("shapes", "order")

    def __init__(self, small_bytes: int = SMALL_BYTES):
        """``small_bytes``: an output up to this size folds even when it is larger than its
        inputs (the model grows by at most that much per node). An NPU target raises it: a
        tensor computed from constants is an op the NPU may lack (T5's relative-position
        buckets: an int64 Abs, which RKNN refused)."""
        super().__init__()
        self.small_bytes = int(small_bytes)

    def run(self, ir: IR, ctx: PassContext) -> PassResult:
        result = PassResult(self._reshape_generated(ir))
        result.changed = self._fold(ir, result) or result.changed
        result.changed = self._fold_subgraphs(ir, result) or result.changed
        return result

    @staticmethod
    def _fold_subgraphs(ir: IR, result: PassResult) -> bool:
        """Constants inside If/Loop/Scan bodies, folded by onnx-graphsurgeon (ONNX Runtime
        evaluates them, as above): a detector's post-processing computes a Slice's axes from
        constants in an If branch, which TensorRT's parser needs as an initializer. The same
        exclusions as in the main graph (other domains, random ops, Q/DQ), no inlining of
        branches, and no folded tensor over ``SUBGRAPH_MAX_BYTES``."""
        bodies = [v for node in ir.nodes for v in node.attrs.values() if isinstance(v, gs.Graph)]
        if not bodies:
            return False

        def exclude(node: gs.Node) -> bool:
            return not is_default_domain(node) or node.op in NONDETERMINISTIC or node.op in QUANT_OPS

        folded = 0
        with _quiet_stderr():  # graphsurgeon's own ONNX Runtime session logs warnings there
            for body in bodies:
                before = len(body.nodes)
                try:
                    body.fold_constants(recurse_subgraphs=True, error_ok=True, flatten_subgraphs=False,
                                        size_threshold=SUBGRAPH_MAX_BYTES, should_exclude_node=exclude)
                    body.cleanup()
                except Exception as e:  # leave the body as it was found wanting
                    result.note(f"fold_constants: a subgraph was not folded ({type(e).__name__})")
                    continue
                folded += max(0, before - len(body.nodes))
        if folded:
            result.note(f"fold_constants: {folded} nodes folded inside If/Loop/Scan bodies")
        return folded > 0

    def _reshape_generated(self, ir: IR) -> bool:
        changed = False
        for node in list(ir.nodes):
            if node.op not in SHAPE_ONLY or not is_default_domain(node) or not node.outputs or not node.inputs:
                continue
            src = ir.producer(node.inputs[0])
            out = node.outputs[0]
            shape = IR.static_shape(out)
            if (src is None or src.op != "ConstantOfShape" or not ir.is_const(node.inputs[0]) or shape is None
                    or ir.is_graph_output(out) or not all(ir.is_const(t) for t in node.inputs[1:]
                                                          if not (isinstance(t, gs.Variable) and t.is_empty()))):
                continue
            new_shape = ir.make_const(out.name + "_shape", np.array(shape, dtype=np.int64))
            node.op = "ConstantOfShape"
            node.attrs.clear()
            if "value" in src.attrs:
                node.attrs["value"] = src.attrs["value"]
            node.inputs.clear()
            node.inputs.append(new_shape)
            changed = True
        return changed

    def _fold(self, ir: IR, result: PassResult) -> bool:
        const_bytes: dict[int, int] = {}  # id(tensor) -> bytes (a bound when unknown), folded tensors
        const_elems: dict[int, int] = {}  # id(tensor) -> elements (a bound when unknown)
        foldable: list[gs.Node] = []
        for node in ir.nodes:  # nodes are kept in topological order
            if (not is_default_domain(node) or node.op in NONDETERMINISTIC or node.op in QUANT_OPS
                    or node.op == "Constant" or has_subgraph(node) or not node.outputs):
                continue
            in_bytes = 0
            in_elems = 0
            ok = True
            for t in node.inputs:
                if isinstance(t, gs.Variable) and t.is_empty():
                    continue
                if isinstance(t, gs.Constant) and not is_opaque(t):
                    in_bytes += _const_bytes(t)
                    in_elems += math.prod(int(d) for d in t.shape)
                elif id(t) in const_bytes:
                    in_bytes += const_bytes[id(t)]
                    in_elems += const_elems[id(t)]
                else:
                    ok = False
                    break
            if not ok:
                continue
            cap = max(self.small_bytes, in_bytes)
            sizes = [_nbytes_of_shape(o) for o in node.outputs]
            if any(s is not None and s > cap for s in sizes):
                continue
            if any(s is None for s in sizes) and node.op not in SIZE_BOUNDED:
                continue  # unknown size, and the op could make more data than it reads: never evaluated
            foldable.append(node)
            for o, s in zip(node.outputs, sizes):
                if s is None:  # bounded by the inputs' elements (kept only if small, after evaluation)
                    const_elems[id(o)] = in_elems + SHAPE_ELEMS
                    const_bytes[id(o)] = 8 * const_elems[id(o)]
                else:
                    const_bytes[id(o)] = s
                    const_elems[id(o)] = s // max(1, plain_dtype(o.dtype).itemsize)
        if not foldable:
            return False
        values = self._evaluate(ir, foldable, result)
        changed = False
        for node in foldable:
            in_bytes = sum(int(values[t.name].nbytes) if t.name in values else
                           (int(t.values.nbytes) if isinstance(t, gs.Constant) else 0)
                           for t in node.inputs if not (isinstance(t, gs.Variable) and t.is_empty()))
            for o in node.outputs:
                v = values.get(o.name)
                if v is None or v.nbytes > max(self.small_bytes, in_bytes) or not o.outputs:
                    continue
                if ir.is_graph_output(o):
                    continue
                const = ir.make_const(o.name + "_folded", v)
                ir.replace_uses(o, const)
                changed = True
        return changed

    def _evaluate(self, ir: IR, nodes: list[gs.Node], result: PassResult) -> dict[str, np.ndarray]:
        wanted = {o.name for n in nodes for o in n.outputs if o.name}
        try:
            return _run_subgraph(ir, nodes, wanted)
        except Exception:
            pass
        values: dict[str, np.ndarray] = {}
        for node in nodes:  # one at a time: skip what ORT cannot run
            try:
                feeds_ok = all(isinstance(t, gs.Constant) or t.name in values or
                               (isinstance(t, gs.Variable) and t.is_empty()) for t in node.inputs)
                if not feeds_ok:
                    continue
                values.update(_run_subgraph(ir, [node], {o.name for o in node.outputs if o.name}, values))
            except Exception:
                result.note(f"could not evaluate {node.op} '{node.name}'; left as is")
        return values


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 on /dev/null for the block: ONNX Runtime's C++ log writes there, and its
    level is process-wide with no getter, so setting it would change the caller's. (Python's
    sys.stderr is flushed first; what the block itself raises still propagates.)"""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _run_subgraph(ir: IR, nodes: list[gs.Node], wanted: set[str],
                  known: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    known = known or {}
    inits: dict[str, onnx.TensorProto] = {}
    node_protos = []
    exporter = gs.exporters.onnx_exporter.OnnxExporter
    for n in nodes:
        for t in n.inputs:
            if isinstance(t, gs.Constant) and t.name not in inits:
                inits[t.name] = exporter.export_tensor_proto(t)
            elif t.name in known and t.name not in inits:
                inits[t.name] = onnx.numpy_helper.from_array(known[t.name], t.name)
        node_protos.append(exporter.export_node(n))
    outputs = [onnx.ValueInfoProto(name=name) for name in sorted(wanted)]
    graph = onnx.helper.make_graph(node_protos, "fold", [], outputs, initializer=list(inits.values()))
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in ir.opsets.items()]
    model = onnx.helper.make_model(graph, opset_imports=opsets)
    model.ir_version = onnx.helper.find_min_ir_version_for(opsets, ignore_unknown=True) if opsets else 8
    model.ir_version = max(model.ir_version, 7)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 4  # a node ORT cannot fold is noted, not logged to stderr
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]  # (a model of folded values: each name once)
    return dict(zip(names, sess.run(names, {})))
