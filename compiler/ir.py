"""The edgec IR: an onnx-graphsurgeon graph plus the facts passes need.

What this adds on top of ``gs.Graph``:

* producers/consumers, graph input/output tests;
* one representation of constants: ``Constant`` nodes are lowered to ``gs.Constant``
  tensors at import, and :meth:`IR.const_value` also sees through ``ConstantOfShape`` of a
  constant shape (the model-zoo "light" models store their weights that way);
* shapes and dtypes of every tensor from onnx shape inference with data propagation
  (symbolic dims kept as their names), refreshed by :meth:`IR.infer_shapes`;
* unique-name generation, safe rewiring helpers (``replace_uses``, ``bypass``);
* opset awareness (``ir.opset`` is the default-domain opset, other domains in ``ir.opsets``).

Nodes carrying subgraphs (If/Loop/Scan) and custom-domain nodes are kept as they are; passes
only touch nodes they understand.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from .errors import InternalError

# graphsurgeon logs a warning for every tensor it can't type; we report problems ourselves.
logging.getLogger("onnx_graphsurgeon").setLevel(logging.ERROR)
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR

DEFAULT_DOMAINS = (None, "", "ai.onnx")
SMALL_CONST = 64  # constants up to this many elements carry their values into shape inference
# A generated constant (ConstantOfShape of a constant shape) larger than this is never built in
# memory: passes see it as a non-constant tensor and leave it alone.
MAX_MATERIALIZE_BYTES = 1 << 30


@dataclass
class ModelInfo:
    """What the IR keeps of the ModelProto besides the graph."""

    ir_version: int = 8
    producer_name: str = ""
    producer_version: str = ""
    domain: str = ""
    model_version: int = 0
    doc_string: str = ""
    metadata: dict = field(default_factory=dict)
    source_opset: int = 0
    source_path: str | None = None
    notes: list = field(default_factory=list)  # what loading did (opset conversion, ...)


class IR:
    """A model under compilation. Wraps (and owns) a ``gs.Graph``."""

    def __init__(self, graph: gs.Graph, opsets: dict[str, int], info: ModelInfo | None = None):
        self.graph = graph
        self.opsets = dict(opsets)
        self.info = info or ModelInfo()
        self._names: set[str] | None = None
        self._counter = itertools.count()
        self.version = 0  # bumped by every change; analyses cache on it
        self._shapes_version = -1
        self.analysis_cache: dict = {}
        self.reserved: set[str] = set()  # names unique_name never gives (a detached tail's: data_tail)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_onnx(cls, model: onnx.ModelProto, info: ModelInfo | None = None) -> "IR":
        opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}
        graph = gs.import_onnx(model)
        info = info or ModelInfo()
        info.ir_version = model.ir_version
        info.producer_name = model.producer_name
        info.producer_version = model.producer_version
        info.domain = model.domain
        info.model_version = model.model_version
        info.doc_string = model.doc_string
        info.metadata = {p.key: p.value for p in model.metadata_props}
        if not info.source_opset:
            info.source_opset = opsets.get("", 0)
        ir = cls(graph, opsets, info)
        ir._lower_constant_nodes()
        return ir

    def to_onnx(self, *, check_types: bool = False) -> onnx.ModelProto:
        """Export to a ModelProto (weights included)."""
        self.graph.opset = self.opset
        model = gs.export_onnx(self.graph, do_type_check=check_types)
        del model.opset_import[:]
        for domain, version in sorted(self.opsets.items()):
            model.opset_import.append(helper.make_opsetid(domain, version))
        # Custom domains used by nodes (incl. subgraphs) but not declared: declare them.
        declared = {o.domain for o in model.opset_import}
        for node in _all_nodes_proto(model.graph):
            if node.domain not in declared and node.domain not in DEFAULT_DOMAINS:
                model.opset_import.append(helper.make_opsetid(node.domain, 1))
                declared.add(node.domain)
        min_ir = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
        model.ir_version = max(min_ir, min(self.info.ir_version, onnx.IR_VERSION), 7)
        model.producer_name = "edgec"
        from . import __version__

        model.producer_version = __version__
        model.domain = self.info.domain
        model.model_version = self.info.model_version
        model.doc_string = self.info.doc_string
        for k, v in self.info.metadata.items():
            model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
        return model

    def copy(self) -> "IR":
        """An independent IR without a serialisation round trip: nodes, tensors, attribute dicts
        and shapes are copied; constant arrays are shared (no pass modifies an array in place:
        rewrites make new constants)."""
        graph = self.graph.copy()
        for t in graph.tensors().values():
            if isinstance(t, gs.Variable) and isinstance(t.shape, list):
                t.shape = list(t.shape)
        ir = IR(graph, self.opsets, info=_copy_info(self.info))
        ir.reserved = set(self.reserved)
        if self.shapes_current():
            ir.shapes_still_valid()
        return ir

    # ------------------------------------------------------------------ basic facts
    @property
    def opset(self) -> int:
        return self.opsets.get("", 0)

    @property
    def nodes(self) -> list[gs.Node]:
        return self.graph.nodes

    @property
    def inputs(self) -> list[gs.Variable]:
        return self.graph.inputs

    @property
    def outputs(self) -> list[gs.Variable]:
        return self.graph.outputs

    def tensors(self) -> dict[str, gs.Tensor]:
        return self.graph.tensors()

    def constants(self) -> list[gs.Constant]:
        """Every constant tensor used by a node of the main graph (deduplicated)."""
        seen: dict[int, gs.Constant] = {}
        for node in self.graph.nodes:
            for t in node.inputs:
                if isinstance(t, gs.Constant):
                    seen[id(t)] = t
        return list(seen.values())

    @staticmethod
    def producer(t: gs.Tensor) -> gs.Node | None:
        return t.inputs[0] if t.inputs else None

    @staticmethod
    def consumers(t: gs.Tensor) -> list[gs.Node]:
        return list(t.outputs)

    def is_graph_output(self, t: gs.Tensor) -> bool:
        return any(o is t for o in self.graph.outputs)

    def is_graph_input(self, t: gs.Tensor) -> bool:
        return any(i is t for i in self.graph.inputs)

    def node_index(self) -> dict[int, int]:
        return {id(n): i for i, n in enumerate(self.graph.nodes)}

    # ------------------------------------------------------------------ constants
    def const_value(self, t: gs.Tensor | None) -> np.ndarray | None:
        """The value of ``t`` if it is a compile-time constant, else None.

        Constants numpy cannot hold natively (bfloat16, float8, int4, strings: see
        :func:`is_opaque`) and generated constants over ``MAX_MATERIALIZE_BYTES`` are not
        constants to passes: they are carried through untouched."""
        if t is None or is_empty(t):
            return None
        if isinstance(t, gs.Constant):
            return None if is_opaque(t) else _values(t)
        fill_arr = self._generated(t)
        if fill_arr is None:
            return None
        return np.full(self.generated_shape(t), fill_arr.reshape(-1)[0], dtype=fill_arr.dtype)

    def is_const(self, t: gs.Tensor | None) -> bool:
        if t is None or is_empty(t):
            return False
        if isinstance(t, gs.Constant):
            return not is_opaque(t)
        return self._generated(t) is not None

    def generated_shape(self, t: gs.Tensor | None) -> tuple[int, ...] | None:
        """The shape of ``t`` when it is made by a ConstantOfShape of a constant shape (a weight
        the model generates instead of storing), whatever its size; else None."""
        prod = self.producer(t) if t is not None and not isinstance(t, gs.Constant) else None
        if (prod is None or prod.domain not in DEFAULT_DOMAINS or prod.op != "ConstantOfShape"
                or len(prod.inputs) != 1 or not isinstance(prod.inputs[0], gs.Constant) or is_opaque(prod.inputs[0])):
            return None
        shape = np.asarray(_values(prod.inputs[0])).reshape(-1)
        if shape.dtype.kind not in "iu" or np.any(shape < 0):
            return None
        return tuple(int(d) for d in shape)

    def _generated(self, t: gs.Tensor) -> np.ndarray | None:
        """The fill value of ``t`` when ``t`` is a generated constant that may be built in memory
        (a numpy dtype, at most MAX_MATERIALIZE_BYTES), else None."""
        shape = self.generated_shape(t)
        if shape is None:
            return None
        fill = self.producer(t).attrs.get("value")
        if fill is None:
            fill_arr = np.zeros(1, dtype=np.float32)
        elif isinstance(fill, gs.Constant):
            if is_opaque(fill):
                return None
            fill_arr = _values(fill)
        else:
            fill_arr = np.asarray(fill)
        if fill_arr.size < 1 or plain_dtype(fill_arr.dtype) is None:
            return None
        if math.prod(shape) * fill_arr.dtype.itemsize > MAX_MATERIALIZE_BYTES:
            return None
        return fill_arr

    def make_const(self, hint: str, value: np.ndarray) -> gs.Constant:
        value = np.asarray(value)
        # np.ascontiguousarray would turn a 0-d scalar into shape [1]: a per-tensor Q/DQ scale
        # must stay a scalar (a 1-D scale means per-axis).
        return gs.Constant(self.unique_name(hint), np.ascontiguousarray(value) if value.ndim else value.copy())

    def make_var(self, hint: str, dtype=None, shape=None) -> gs.Variable:
        return gs.Variable(self.unique_name(hint), dtype=dtype, shape=shape)

    # ------------------------------------------------------------------ names
    def unique_name(self, hint: str) -> str:
        if self._names is None:
            self._names = set(self.graph.tensors().keys())
            self._names.update(n.name for n in self.graph.nodes if n.name)
            self._names.update(self.reserved)
        base = hint or "t"
        name = base
        while name in self._names:
            name = f"{base}__{next(self._counter)}"
        self._names.add(name)
        return name

    # ------------------------------------------------------------------ rewiring
    def replace_uses(self, old: gs.Tensor, new: gs.Tensor, *, except_node: gs.Node | None = None) -> None:
        """Make every consumer of ``old`` read ``new`` instead (graph outputs not touched)."""
        for node in list(old.outputs):
            if node is except_node:
                continue
            for i, t in enumerate(node.inputs):
                if t is old:
                    node.inputs[i] = new

    def bypass(self, node: gs.Node, data_input: int = 0) -> bool:
        """Remove a node that passes ``inputs[data_input]`` through unchanged to ``outputs[0]``.

        Keeps graph-output names stable: if the node's output is a graph output, the
        producer of its input is made to produce that output directly. Returns False (and
        leaves the graph alone) where that is impossible.
        """
        x = node.inputs[data_input]
        y = node.outputs[0]
        if self.is_graph_output(y):
            prod = self.producer(x)
            if (prod is None or self.is_graph_output(x) or self.is_graph_input(x)
                    or isinstance(x, gs.Constant)):
                return False
            # Producer writes y directly; other readers of x read y.
            self.replace_uses(x, y, except_node=node)
            idx = [i for i, t in enumerate(prod.outputs) if t is x][0]
            node.outputs.clear()
            node.inputs.clear()
            prod.outputs[idx] = y
            if y.dtype is None:
                y.dtype = x.dtype
            if y.shape is None:
                y.shape = x.shape
            return True
        self.replace_uses(y, x)
        node.outputs.clear()
        node.inputs.clear()
        return True

    def remove_dead(self) -> None:
        self.graph.cleanup(remove_unused_node_outputs=False, remove_unused_graph_inputs=False)

    def toposort(self) -> None:
        self.graph.toposort()

    def changed(self) -> None:
        """Record that the graph was modified (invalidates cached analyses)."""
        self.version += 1
        self.analysis_cache.clear()
        self._names = None

    # ------------------------------------------------------------------ shapes
    def infer_shapes(self, *, force: bool = False) -> None:
        """Annotate every tensor with the shape and dtype onnx shape inference finds.

        Inference runs on a skeleton of the graph: weights travel as typed graph inputs (no
        data) and only small constants (shapes, axes, scales) carry values for data
        propagation, so the cost does not grow with the model's weight bytes.
        """
        if not force and self._shapes_version == self.version:
            return
        try:
            inferred = onnx.shape_inference.infer_shapes(self._skeleton(), check_type=False, strict_mode=False,
                                                         data_prop=True)
        except Exception:  # inference is best effort: keep what we have
            self._shapes_version = self.version
            return
        infos = {}
        for vi in itertools.chain(inferred.graph.value_info, inferred.graph.output, inferred.graph.input):
            if vi.type.HasField("tensor_type"):
                infos[vi.name] = vi.type.tensor_type
        for name, t in self.graph.tensors().items():
            if isinstance(t, gs.Constant):
                continue
            tt = infos.get(name)
            if tt is None:
                continue
            if tt.elem_type and tt.elem_type not in _NON_NUMPY:
                try:
                    dt = helper.tensor_dtype_to_np_dtype(tt.elem_type)
                except (KeyError, ValueError, TypeError):  # a type this onnx has no numpy type for
                    dt = None
                # bfloat16/float8/int4 keep their ONNX enum: graphsurgeon maps some ml_dtypes back wrongly
                t.dtype = dt if plain_dtype(dt) is not None else tt.elem_type
            if tt.HasField("shape"):
                dims = []
                for d in tt.shape.dim:
                    if d.HasField("dim_value"):
                        dims.append(int(d.dim_value))
                    elif d.HasField("dim_param"):
                        dims.append(d.dim_param)
                    else:
                        dims.append(None)
                if t.shape is None or _more_specific(dims, t.shape):
                    t.shape = dims
        self._shapes_version = self.version

    def shapes_current(self) -> bool:
        return self._shapes_version == self.version

    def shapes_still_valid(self) -> None:
        """A pass that kept every surviving tensor's shape (and set the shapes of tensors it
        created) calls this after :meth:`changed` so shapes are not re-inferred for it."""
        self._shapes_version = self.version

    def _skeleton(self) -> onnx.ModelProto:
        exporter = gs.exporters.onnx_exporter.OnnxExporter
        g = self.graph
        nodes = [exporter.export_node(n) for n in g.nodes]
        inputs = [exporter.export_value_info_proto(t, do_type_check=False) for t in g.inputs]
        inits = []
        for t in g.tensors().values():
            if not isinstance(t, gs.Constant):
                continue
            if math.prod(t.shape) <= SMALL_CONST and not is_opaque(t):
                inits.append(exporter.export_tensor_proto(t))
            else:
                inputs.append(helper.make_tensor_value_info(t.name, onnx_elem_type(t.dtype), list(t.shape)))
        outputs = [onnx.ValueInfoProto(name=t.name) for t in g.outputs]
        graph = helper.make_graph(nodes, g.name or "g", inputs, outputs, initializer=inits)
        opsets = [helper.make_opsetid(d, v) for d, v in self.opsets.items()]
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = max(8, min(self.info.ir_version, onnx.IR_VERSION))
        model.functions.extend(exporter.export_function(f) for f in getattr(g, "functions", []))
        return model

    @staticmethod
    def static_shape(t: gs.Tensor) -> tuple[int, ...] | None:
        """The shape of ``t`` if every dim is a known integer."""
        if isinstance(t, gs.Constant):
            return tuple(int(d) for d in t.shape)
        if t.shape is None:
            return None
        if all(isinstance(d, (int, np.integer)) and d >= 0 for d in t.shape):
            return tuple(int(d) for d in t.shape)
        return None

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Cheap structural check between passes: raises InternalError on a broken graph."""
        produced: dict[str, gs.Node] = {}
        graph_inputs = {t.name for t in self.graph.inputs}
        for node in self.graph.nodes:
            for t in node.outputs:
                if not t.name:
                    continue
                if t.name in produced or t.name in graph_inputs:
                    raise InternalError(f"tensor '{t.name}' is produced twice")
                produced[t.name] = node
        known = set(produced) | graph_inputs
        for node in self.graph.nodes:
            for t in node.inputs:
                if is_empty(t) or isinstance(t, gs.Constant):
                    continue
                if t.name not in known:
                    raise InternalError(f"node '{node.name}' ({node.op}) reads '{t.name}', which nothing produces")
        for t in self.graph.outputs:
            if not isinstance(t, gs.Constant) and t.name not in known:
                raise InternalError(f"graph output '{t.name}' is not produced")

    # ------------------------------------------------------------------ lowering
    def _lower_constant_nodes(self) -> bool:
        """Constant nodes become gs.Constant tensors (one representation for constants)."""
        lowered: set[int] = set()
        for node in self.graph.nodes:
            if node.op != "Constant" or node.domain not in DEFAULT_DOMAINS or len(node.outputs) != 1:
                continue
            out = node.outputs[0]
            if self.is_graph_output(out):
                continue
            value = _constant_node_value(node)
            if value is None:  # no numpy value (bfloat16, float8, int4, string, sparse): kept as a node
                continue
            const = gs.Constant(out.name, value)
            for consumer in list(out.outputs):
                for i, t in enumerate(consumer.inputs):
                    if t is out:
                        consumer.inputs[i] = const
            node.outputs.clear()
            lowered.add(id(node))
        if lowered:  # one rebuild: list.remove() is quadratic with gs.Node's deep __eq__
            self.graph.nodes = [n for n in self.graph.nodes if id(n) not in lowered]
        return bool(lowered)

    # ------------------------------------------------------------------ iteration helpers
    def find(self, op: str) -> Iterator[gs.Node]:
        for node in list(self.graph.nodes):
            if node.op == op and node.domain in DEFAULT_DOMAINS and node.outputs:  # skip detached nodes
                yield node

    def single_consumer(self, t: gs.Tensor) -> gs.Node | None:
        """The one node reading ``t``, if exactly one does and ``t`` is no graph output."""
        if self.is_graph_output(t) or len(t.outputs) != 1:
            return None
        return t.outputs[0]


_NON_NUMPY = {onnx.TensorProto.STRING}
_PLAIN_KINDS = "biufc"  # numpy's own bool/int/uint/float/complex (ml_dtypes' bfloat16, float8, int4 are kind 'V')
_SUB_BYTE_BITS = {getattr(onnx.TensorProto, n): 4 for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, n)}


def plain_dtype(dtype) -> np.dtype | None:
    """``dtype`` (a numpy dtype, a numpy type, or the ONNX enum graphsurgeon keeps for types numpy
    lacks) as a numpy dtype when numpy holds it natively; None for bfloat16, float8, int4,
    float4, strings and anything unknown. Passes compute only on plain dtypes."""
    if dtype is None or isinstance(dtype, (int, np.integer)) and not isinstance(dtype, bool):
        return None
    try:
        dt = np.dtype(dtype)
    except TypeError:
        return None
    return dt if dt.kind in _PLAIN_KINDS else None


def onnx_elem_type(dtype) -> int:
    """The ONNX element type of a graphsurgeon dtype (numpy, ml_dtypes, object, or an ONNX enum)."""
    if isinstance(dtype, (int, np.integer)) and not isinstance(dtype, bool):
        return int(dtype)
    dt = np.dtype(dtype)
    if dt.kind in "OUS":
        return onnx.TensorProto.STRING
    return helper.np_dtype_to_tensor_dtype(dt)


def dtype_name(dtype) -> str | None:
    """A readable name for a graphsurgeon dtype: ``float32``, ``bfloat16``, ``int4``, ``string``."""
    if dtype is None:
        return None
    try:
        return helper.tensor_dtype_to_string(onnx_elem_type(dtype)).replace("TensorProto.", "").lower()
    except Exception:  # noqa: BLE001 - a name for display only
        return str(dtype)


def dtype_bits(dtype) -> int:
    """Storage bits per element (4 for int4/uint4/float4, 8 per byte otherwise; 64 for strings)."""
    dt = plain_dtype(dtype)
    if dt is not None:
        return dt.itemsize * 8
    try:
        elem = onnx_elem_type(dtype)
    except Exception:  # noqa: BLE001
        return 8
    if elem in _SUB_BYTE_BITS:
        return _SUB_BYTE_BITS[elem]
    if elem == onnx.TensorProto.STRING:
        return 64
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem)).itemsize * 8
    except Exception:  # noqa: BLE001
        return 8


def is_opaque(t) -> bool:
    """A constant whose values numpy cannot hold natively (bfloat16, float8, int4, float4,
    string): it is carried through as the original TensorProto and never computed on."""
    return isinstance(t, gs.Constant) and plain_dtype(t.dtype) is None


def _copy_info(info: ModelInfo) -> ModelInfo:
    return ModelInfo(**{**info.__dict__, "metadata": dict(info.metadata), "notes": list(info.notes)})


def subgraphs(node: gs.Node) -> Iterator[gs.Graph]:
    """Every If/Loop/Scan body inside ``node``, at any depth."""
    for v in node.attrs.values():
        for g in (v if isinstance(v, list) else [v]):
            if isinstance(g, gs.Graph):
                yield g
                for inner in g.nodes:
                    yield from subgraphs(inner)


def is_empty(t) -> bool:
    """An absent optional input: None, or graphsurgeon's empty Variable."""
    return t is None or (isinstance(t, gs.Variable) and t.is_empty())


def _values(c: gs.Constant) -> np.ndarray:
    v = c.values
    if not isinstance(v, np.ndarray):  # LazyValues
        v = v.load()
        c.values = v
    return v


def _more_specific(new: list, old) -> bool:
    if len(new) != len(old):
        return True
    score = lambda dims: sum(isinstance(d, (int, np.integer)) for d in dims)  # noqa: E731
    return score(new) >= score(old)


def _constant_node_value(node: gs.Node) -> np.ndarray | None:
    a = node.attrs
    if "value" in a:
        v = a["value"]
        return _values(v) if isinstance(v, gs.Constant) and not is_opaque(v) else None
    if "value_float" in a:
        return np.array(a["value_float"], dtype=np.float32)
    if "value_floats" in a:
        return np.array(a["value_floats"], dtype=np.float32)
    if "value_int" in a:
        return np.array(a["value_int"], dtype=np.int64)
    if "value_ints" in a:
        return np.array(a["value_ints"], dtype=np.int64)
    return None


def proto_bodies(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The If/Loop/Scan bodies held in ``node``'s attributes (one level: not the bodies inside them)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def captured(g: onnx.GraphProto) -> set[str]:
    """Names a body reads that it does not define itself (outer-scope captures), through the
    bodies inside it too."""
    defined = {vi.name for vi in g.input} | {t.name for t in g.initializer}
    reads: set[str] = set()
    for n in g.node:
        reads.update(x for x in n.input if x)
        defined.update(o for o in n.output if o)
        for sub in proto_bodies(n):
            reads.update(captured(sub))
    reads.update(o.name for o in g.output)
    return reads - defined


def node_reads(node: onnx.NodeProto) -> set[str]:
    """Names a node reads: its inputs and what its bodies capture from the outer scope."""
    out = {x for x in node.input if x}
    for g in proto_bodies(node):
        out |= captured(g)
    return out


def _all_nodes_proto(graph: onnx.GraphProto) -> Iterable[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for g in proto_bodies(node):
            yield from _all_nodes_proto(g)
