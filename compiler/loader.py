"""Loading and saving models.

Loading turns whatever a real exporter wrote into the IR: it refuses non-models with one clear
line, pulls in external data stored next to the model, upgrades the default-domain opset to
the canonical one where onnx's version converter can (and says so in ``ir.info.notes``
where it cannot), and lowers old-exporter quirks (initializers listed as graph inputs,
``Constant`` nodes) to one representation.

Saving is atomic: the model (and its external-data file, for models over the 2 GB protobuf
limit) is written to a temporary file in the destination folder and renamed into place.
"""

from __future__ import annotations

import math
import os
from collections import deque
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper, version_converter

from . import datafiles, outputs
from .ir import captured, proto_bodies
from .errors import InternalError, UserError
from .ir import IR, ModelInfo

MIN_OPSET = 7
MAX_OPSET = 23
CANONICAL_OPSET = 17


# The largest model file read (protobuf cannot parse more than 2 GiB; weights beyond it must be
# stored as external data, which is read separately).
MAX_MODEL_FILE_BYTES = (2 << 30) - 1


def check_input_file(path: str | os.PathLike, what: str = "model") -> Path:
    """Refuse a path that is not a regular file before opening it: FIFOs and devices would hang
    or never end, folders are not files. Raises UserError."""
    return datafiles.check_regular(path, what, missing="file",
                                   expected=f"an {'.onnx model' if what == 'model' else what} file",
                                   hint=f"; give the {what} as a file")


def load_model(path: str | os.PathLike, *, external_files: list | None = None) -> onnx.ModelProto:
    """Read and check an ONNX file (external data included): a file that is not a valid ONNX
    model is refused here with one line naming the problem (:func:`validate_model`). Raises
    UserError. The external-data files read are appended to ``external_files`` when given."""
    p = check_input_file(path)
    size = p.stat().st_size
    if size > MAX_MODEL_FILE_BYTES:
        raise UserError(f"{p}: {size / 1e9:.1f} GB is over protobuf's 2 GB limit; store the weights as "
                        f"external data (onnx.save(..., save_as_external_data=True))")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise UserError(f"{p}: cannot read the file ({e.strerror or e})") from None
    if not data:
        raise UserError(f"{p}: the file is empty, not an ONNX model")
    try:
        model = onnx.ModelProto()
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError):
        raise UserError(f"{p}: not an ONNX model (the protobuf does not parse: truncated or another format)") from None
    del data
    if model.ir_version <= 0 or not model.HasField("graph") or not model.opset_import:
        raise UserError(f"{p}: not an ONNX model (no IR version, graph or opset import)")
    if not model.graph.output:
        raise UserError(f"{p}: the model's graph has no outputs")
    if _uses_external_data(model):
        found = _check_external_locations(model, p)
        if external_files is not None:
            external_files.extend(found)
        try:
            onnx.external_data_helper.load_external_data_for_model(model, str(p.parent))
        except FileNotFoundError as e:
            raise UserError(f"{p}: external data file not found next to the model ({Path(e.filename or '').name or e})") from None
        except Exception as e:  # path outside the model folder, short file, ...
            raise UserError(f"{p}: cannot load its external data: {one_line(e)}") from None
    return validate_model(model, str(p), owned=True)


def _check_external_locations(model: onnx.ModelProto, p: Path) -> list[Path]:
    """External data must be regular files inside the model's folder (onnx checks the folder;
    a FIFO or device there would hang or never end). Returns the files."""
    files = []
    for t in onnx.external_data_helper._get_all_tensors(model):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        loc = next((e.value for e in t.external_data if e.key == "location"), "")
        if not loc:
            raise UserError(f"{p}: tensor '{t.name}' is stored externally but names no file")
        target = p.parent / loc
        if Path(loc).is_absolute() or ".." in Path(loc).parts:
            raise UserError(f"{p}: tensor '{t.name}' points outside the model's folder ({loc}); edgec reads "
                            f"external data only from files beside the model")
        if target.exists() and not target.is_file():
            raise UserError(f"{p}: the external data of '{t.name}' ({loc}) is not a regular file")
        files.append(target)
    return files


def check_opset(model: onnx.ModelProto, where: str = "model") -> int:
    versions = {o.domain: o.version for o in model.opset_import}
    opset = versions.get("", versions.get("ai.onnx"))
    if opset is None:
        raise UserError(f"{where}: declares no default-domain (ai.onnx) opset; edgec needs one")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserError(f"{where}: opset {opset} is not supported (edgec reads opsets {MIN_OPSET} to {MAX_OPSET})")
    return opset


class OpsetKept(str):
    """A note saying why the model's opset was kept where a conversion was wanted (onnx's
    converter could not, or changed the outputs); a target that cannot read that opset quotes it
    (``backends.checks.check_opset``)."""


def normalize_opset(model: onnx.ModelProto, target: int = CANONICAL_OPSET) -> tuple[onnx.ModelProto, list[str]]:
    """Upgrade the default-domain opset to ``target`` where onnx's converter can."""
    opset = check_opset(model)
    if opset >= target:
        return model, []
    try:
        converted = version_converter.convert_version(model, target)
        onnx.checker.check_model(converted)
    except Exception as e:
        return model, [OpsetKept(f"opset {opset} kept: onnx's version converter cannot take this model to "
                                 f"{target} ({one_line(e)[:160]})")]
    return converted, [f"opset {opset} converted to {target}"]


def lower_opset(model: onnx.ModelProto, goal: int) -> onnx.ModelProto:
    """``model`` converted down to opset ``goal`` with onnx's version converter, checked by onnx's
    checker (raises when either fails). Attributes holding their default are dropped first, and
    opset 18's Splits are held out of the converter's way (see the helpers below). The caller
    proves the outputs the same (``edgec.api``: in ONNX Runtime)."""
    stripped = _without_default_attributes(model, check_opset(model))
    held = _hold_splits(stripped, goal)
    converted = version_converter.convert_version(stripped, goal)
    _release_splits(converted, held)
    onnx.checker.check_model(converted)
    return converted


HOLD_DOMAIN = "edgec.held"  # a default-domain op the converter cannot take down, held out of its way


def _hold_splits(model: onnx.ModelProto, goal: int) -> list[str]:
    """Opset 18 gave Split ``num_outputs`` (PyTorch's dynamo exporter writes it for a channel
    split); below 18 the sizes are an input. onnx's converter has no way down for it, although
    a Split with its sizes as an input means the same at 13 and 18. So, in ``model`` (a copy),
    each main-graph Split gets its sizes as a constant input (from the inferred shape; ONNX's
    rule: chunks of ceil(n / k), the last one smaller) and moves to ``HOLD_DOMAIN`` for the
    conversion; :func:`_release_splits` moves them back. Returns the held nodes' outputs; none
    when ``goal`` is 18 or more, or a Split's size along its axis is unknown."""
    if goal >= 18 or check_opset(model) < 18:
        return []
    splits = [n for n in model.graph.node if n.op_type == "Split" and n.domain in ("", "ai.onnx")]
    if not splits:
        return []
    shapes = {}
    inferred = onnx.shape_inference.infer_shapes(model)
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    plan = []
    for n in splits:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if "num_outputs" in attrs:
            shape = shapes.get(n.input[0])
            axis = int(attrs.get("axis", 0))
            if not shape or not -len(shape) <= axis < len(shape) or shape[axis] is None:
                return []
            dim, k = shape[axis], int(attrs["num_outputs"])
            chunk = -(-dim // k)
            sizes = [chunk] * (k - 1) + [dim - chunk * (k - 1)]
            if min(sizes) < 0:
                return []
            plan.append((n, np.array(sizes, np.int64)))
        elif len(n.input) < 2 or not n.input[1]:
            return []  # (opset 18 Split without either: even chunks by output count, as at 13)
        else:
            plan.append((n, None))
    held = []
    taken = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output} | \
        {i.name for i in model.graph.input}
    for n, sizes in plan:
        if sizes is not None:
            name, k = f"{n.output[0]}__split_sizes", 1
            while name in taken:
                name, k = f"{n.output[0]}__split_sizes_{k}", k + 1
            taken.add(name)
            model.graph.initializer.append(numpy_helper.from_array(sizes, name))
            del n.input[1:]
            n.input.append(name)
            keep = [a for a in n.attribute if a.name != "num_outputs"]
            del n.attribute[:]
            n.attribute.extend(keep)
        n.domain = HOLD_DOMAIN
        held.append(n.output[0])
    model.opset_import.append(onnx.helper.make_opsetid(HOLD_DOMAIN, 1))
    return held


def _release_splits(model: onnx.ModelProto, held: list[str]) -> None:
    """Undo :func:`_hold_splits` in the converted ``model``."""
    if not held:
        return
    outs = set(held)
    for n in model.graph.node:
        if n.domain == HOLD_DOMAIN and n.output and n.output[0] in outs:
            n.domain = ""
    keep = [o for o in model.opset_import if o.domain != HOLD_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def _without_default_attributes(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """A copy of ``model`` without the default-domain attributes that hold their schema's default
    value (the same model): PyTorch's dynamo exporter writes ``noop_with_empty_axes=0`` on
    ReduceMean, which onnx's converter cannot take below opset 18 although the default needs no
    attribute there."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in _all_node_protos(copy.graph):
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            schema = onnx.defs.get_schema(node.op_type, opset, "")
        except Exception:  # not a known op at this opset: the converter will say so
            continue
        keep = []
        for a in node.attribute:
            d = schema.attributes[a.name].default_value if a.name in schema.attributes else None
            if d is None or d.type == onnx.AttributeProto.UNDEFINED or a.type != d.type or \
                    onnx.helper.get_attribute_value(a) != onnx.helper.get_attribute_value(d):
                keep.append(a)
        if len(keep) < len(node.attribute):
            del node.attribute[:]
            node.attribute.extend(keep)
    return copy


def load(path: str | os.PathLike, *, normalize: bool = True) -> IR:
    """Load an ONNX file into the IR."""
    model = load_model(path)  # validated
    source_opset = check_opset(model, str(path))
    notes: list[str] = []
    if normalize:
        model, notes = normalize_opset(model)
    info = ModelInfo(source_opset=source_opset, source_path=str(path), notes=notes)
    try:
        return IR.from_onnx(model, info=info)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}: the graph cannot be read: {one_line(e)}") from None


def from_model(model: onnx.ModelProto, *, normalize: bool = True) -> IR:
    """The IR of an in-memory ModelProto (the Python API's entry point). ``model`` is checked
    (:func:`validate_model`) and never modified."""
    model = validate_model(model, "model")
    source_opset = check_opset(model)
    notes: list[str] = []
    if normalize:
        model, notes = normalize_opset(model)
    return IR.from_onnx(model, info=ModelInfo(source_opset=source_opset, notes=notes))


def check_model(model: onnx.ModelProto) -> None:
    """onnx's full checker (with shape inference); custom domains get the structural check."""
    try:
        if outputs.weights_bytes(model) > outputs.EXTERNAL_DATA_THRESHOLD:
            return  # the in-memory checker cannot take > 2 GB; save() checks the file instead
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        custom = any(o.domain not in (None, "", "ai.onnx") for o in model.opset_import)
        if custom:
            try:
                onnx.checker.check_model(model, full_check=False)
                return
            except onnx.checker.ValidationError:
                pass
        raise InternalError(f"the rewritten model fails onnx.checker: {one_line(e)}") from None
    except onnx.shape_inference.InferenceError as e:
        raise InternalError(f"the rewritten model fails shape inference: {one_line(e)}") from None


def check_output_path(out: str | os.PathLike, inp: str | os.PathLike | None = None) -> Path:
    """Refuse an output path we must not or cannot write, before any work is done (see
    :meth:`edgec.outputs.Outputs.claim`)."""
    return outputs.Outputs([inp] if inp is not None else []).claim(out, "output model")


def save(model_or_ir, path: str | os.PathLike, *, check: bool = True) -> Path:
    """Write a model atomically (a temporary file renamed into place; nothing is left behind on
    failure). Large models get one external-data file beside them."""
    if isinstance(model_or_ir, IR):
        model_or_ir.infer_shapes()
        model = model_or_ir.to_onnx()
    else:
        model = model_or_ir
    if check:
        check_model(model)
    with outputs.Outputs() as out:
        out.claim(path, "output model")
        out.write_model(path, model)
        out.commit()
    return Path(path)


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL
               for t in onnx.external_data_helper._get_all_tensors(model))


def one_line(e: BaseException) -> str:
    """The first line of an exception's text (its class name when it has none)."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__



# ====================================================================== validation of user models
# Storage bits per element of each ONNX element type (sub-byte types are packed).
_BITS = {"FLOAT": 32, "UINT8": 8, "INT8": 8, "UINT16": 16, "INT16": 16, "INT32": 32, "INT64": 64, "BOOL": 8,
         "FLOAT16": 16, "DOUBLE": 64, "UINT32": 32, "UINT64": 64, "COMPLEX64": 64, "COMPLEX128": 128,
         "BFLOAT16": 16, "FLOAT8E4M3FN": 8, "FLOAT8E4M3FNUZ": 8, "FLOAT8E5M2": 8, "FLOAT8E5M2FNUZ": 8,
         "UINT4": 4, "INT4": 4, "FLOAT4E2M1": 4, "FLOAT8E8M0": 8, "UINT2": 2, "INT2": 2}
_BITS = {getattr(onnx.TensorProto, k): v for k, v in _BITS.items() if hasattr(onnx.TensorProto, k)}
_COMPLEX = {onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128}


def validate_model(model: onnx.ModelProto, where: str = "model", *, owned: bool = False) -> onnx.ModelProto:
    """Refuse a model that is not valid ONNX, with one line naming the problem (UserError).

    edgec's own checks come first, because they name the problem plainly: every tensor has at
    most one producer (node, graph input or initializer), every tensor a node reads and every
    graph output is produced, the graph has no cycle, op types are not empty, initializer
    names are unique, and every tensor's data matches its dims and type (dims >= 0; short
    external data shows up here). Then onnx's full checker (with strict shape inference) runs.

    Nodes listed out of topological order (but acyclic) are sorted: in ``model`` itself when
    ``owned``, else in a copy (the caller's ModelProto is never modified). Returns the model.
    """
    if not isinstance(model, onnx.ModelProto):
        raise UserError(f"{where}: expected an onnx.ModelProto or a path to an .onnx file, got {type(model).__name__}")
    if model.ir_version <= 0 or not model.HasField("graph") or not model.opset_import:
        raise UserError(f"{where}: not an ONNX model (no IR version, graph or opset import)")
    if not model.graph.output:
        raise UserError(f"{where}: the model's graph has no outputs")
    versions: dict[str, set] = {}
    for o in model.opset_import:
        versions.setdefault(o.domain if o.domain != "ai.onnx" else "", set()).add(o.version)
    dup = next((d for d, v in versions.items() if len(v) > 1), None)
    if dup is not None:
        raise UserError(f"{where}: the opset of domain '{dup or 'ai.onnx'}' is declared more than once, with "
                        f"different versions ({', '.join(map(str, sorted(versions[dup])))})")
    # the same version twice (skl2onnx 1.20 writes it; onnx's checker and ONNX Runtime accept it): once, in a copy
    repeated = len(model.opset_import) > len(versions)
    check_opset(model, where)
    for t in onnx.external_data_helper._get_all_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            raise UserError(f"{where}: tensor '{t.name}' is stored as external data that is not loaded; give the "
                            f"model's path (or onnx.load it with its external data)")
    order = _check_graph(model.graph, where, outer=set())
    unnamed = any(not all(names) or len(set(names)) < len(names)
                  for names in ([n.name for n in g.node] for g in _all_graphs(model.graph)))
    if (order is not None or unnamed or repeated) and not owned:  # the changes below go to a copy: the caller's stays
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        model = copy
    if repeated:
        first = {}
        for o in model.opset_import:
            first.setdefault(o.domain if o.domain != "ai.onnx" else "", o)
        kept = [onnx.helper.make_opsetid(o.domain, o.version) for o in first.values()]
        del model.opset_import[:]
        model.opset_import.extend(kept)
    if order is not None:  # acyclic but listed out of order: sort
        nodes = list(model.graph.node)
        del model.graph.node[:]
        model.graph.node.extend(nodes[i] for i in order)
    if unnamed:
        for g in _all_graphs(model.graph):
            name_nodes(g)
    _run_checker(model, where)
    return model


def _all_graphs(g: onnx.GraphProto):
    """``g`` and every If/Loop/Scan body in it, at any depth."""
    yield g
    for n in g.node:
        for sub in proto_bodies(n):
            yield from _all_graphs(sub)


def name_nodes(g: onnx.GraphProto) -> int:
    """Give every node of ``g`` (not of its subgraphs: :func:`validate_model` names each graph)
    without a name, or sharing one, a name of its own, ``<op>_<first output>``: ONNX Runtime
    refuses a graph whose nodes share a name, in a subgraph too, and edgec's passes tell layers
    apart by name. Returns how many were named."""
    taken = {n.name for n in g.node} | {o for n in g.node for o in n.output} | {i.name for i in g.input} | \
        {t.name for t in g.initializer}
    seen: set[str] = set()
    done = 0
    for n in g.node:
        if n.name and n.name not in seen:  # the first node of a shared name keeps it
            seen.add(n.name)
            continue
        base = f"{n.op_type}_{next((o for o in n.output if o), 'node')}"
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        n.name = name
        done += 1
    return done


def _check_graph(g: onnx.GraphProto, where: str, outer: set[str]) -> list[int] | None:
    """Structural checks of one graph (subgraphs recursively, with the names they capture).
    Returns a topological order of the nodes when they are not listed in one, else None."""
    label = where if not outer else f"{where}: subgraph '{g.name}'"
    available: dict[str, str] = {}  # name -> what defines it

    def define(name: str, what: str) -> None:
        if not name:
            raise UserError(f"{label}: {what} has an empty name")
        if name in available:
            raise UserError(f"{label}: tensor '{name}' is defined twice (as {available[name]} and as {what}): "
                            f"ONNX graphs must be in single static assignment form")
        available[name] = what

    for vi in g.input:
        define(vi.name, "a graph input")
        if not outer:
            _check_value_info(vi, "input", label)
    init_names: set[str] = set()
    for t in g.initializer:
        if t.name in init_names:
            raise UserError(f"{label}: initializer '{t.name}' is listed twice")
        init_names.add(t.name)
        _check_tensor(t, label, f"initializer '{t.name}'")
        if t.name not in available:
            available[t.name] = "an initializer"
        elif available[t.name] != "a graph input":
            raise UserError(f"{label}: tensor '{t.name}' is defined twice")
    for st in g.sparse_initializer:
        if st.values.name in available:
            raise UserError(f"{label}: tensor '{st.values.name}' is defined twice")
        available[st.values.name] = "a sparse initializer"
    producer: dict[str, int] = {}
    for i, n in enumerate(g.node):
        what = f"node '{n.name}' ({n.op_type})" if n.name else f"node #{i} ({n.op_type or 'no op type'})"
        if not n.op_type.strip():
            raise UserError(f"{label}: node #{i}{' ' + repr(n.name) if n.name else ''} has an empty op type")
        for o in n.output:
            if not o:
                continue  # an optional output left out
            if o in available or o in producer:
                first = available.get(o) or f"node #{producer[o]} ({g.node[producer[o]].op_type})"
                raise UserError(f"{label}: tensor '{o}' is produced by {what} and also by {first}: ONNX graphs "
                                f"must be in single static assignment form")
            producer[o] = i
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                _check_tensor(a.t, label, f"attribute '{a.name}' of {what}")
            elif a.type == onnx.AttributeProto.TENSORS:
                for t in a.tensors:
                    _check_tensor(t, label, f"attribute '{a.name}' of {what}")
    known = set(available) | set(producer)
    deps: list[set[int]] = []
    for i, n in enumerate(g.node):
        what = f"node '{n.name}' ({n.op_type})" if n.name else f"node #{i} ({n.op_type})"
        reads = [x for x in n.input if x]
        for sub in proto_bodies(n):  # names a subgraph captures from this scope are dependencies too
            _check_graph(sub, where, outer | known)
            reads.extend(captured(sub))
        d = set()
        for x in n.input:
            if x and x not in known and x not in outer:
                raise UserError(f"{label}: {what} reads '{x}', which no node, graph input or initializer produces")
        for x in reads:
            if x in producer:
                d.add(producer[x])
        deps.append(d)
    for o in g.output:
        if o.name not in known and o.name not in outer:
            raise UserError(f"{label}: graph output '{o.name}' is not produced by any node, input or initializer")
        if not outer:
            _check_value_info(o, "output", label)
    return _topological_order(g, deps, label)


def _topological_order(g: onnx.GraphProto, deps: list[set[int]], label: str) -> list[int] | None:
    if all(all(d < i for d in ds) for i, ds in enumerate(deps)):
        return None  # already in order
    users: list[list[int]] = [[] for _ in deps]
    missing = [0] * len(deps)
    for i, ds in enumerate(deps):
        for d in ds:
            if d == i:
                n = g.node[i]
                raise UserError(f"{label}: the graph has a cycle: node '{n.name or '#' + str(i)}' ({n.op_type}) "
                                f"reads its own output")
            users[d].append(i)
            missing[i] += 1
    ready = deque(i for i, m in enumerate(missing) if m == 0)
    order = []
    while ready:
        i = ready.popleft()
        order.append(i)
        for u in users[i]:
            missing[u] -= 1
            if missing[u] == 0:
                ready.append(u)
    if len(order) != len(deps):
        stuck = next(i for i, m in enumerate(missing) if m > 0)
        n = g.node[stuck]
        raise UserError(f"{label}: the graph has a cycle (node '{n.name or '#' + str(stuck)}' ({n.op_type}) "
                        f"depends on its own output)")
    return order


def _check_value_info(vi: onnx.ValueInfoProto, kind: str, label: str) -> None:
    which = vi.type.WhichOneof("value")
    if which is None:
        if kind == "input":
            raise UserError(f"{label}: graph input '{vi.name}' has no type")
        return
    if which != "tensor_type":
        raise UserError(f"{label}: graph {kind} '{vi.name}' is a {which.replace('_type', '')}, not a tensor; "
                        f"edgec compiles models whose inputs and outputs are tensors")
    tt = vi.type.tensor_type
    if kind == "input" and tt.elem_type not in _BITS and tt.elem_type != onnx.TensorProto.STRING:
        raise UserError(f"{label}: graph input '{vi.name}' has no valid element type ({tt.elem_type})")
    if tt.HasField("shape"):
        for d in tt.shape.dim:
            if d.HasField("dim_value") and d.dim_value < 0:
                raise UserError(f"{label}: graph {kind} '{vi.name}' has a negative dimension ({d.dim_value})")


def _check_tensor(t: onnx.TensorProto, label: str, what: str) -> None:
    if any(d < 0 for d in t.dims):
        raise UserError(f"{label}: {what} has a negative dimension {list(t.dims)}")
    if t.HasField("segment") or t.data_location == onnx.TensorProto.EXTERNAL:
        return
    n = math.prod(t.dims)
    if t.data_type == onnx.TensorProto.STRING:
        if len(t.string_data) != n:
            raise UserError(f"{label}: {what} holds {len(t.string_data)} strings but its dims {list(t.dims)} "
                            f"need {n}")
        return
    bits = _BITS.get(t.data_type)
    if bits is None:
        raise UserError(f"{label}: {what} has an unknown data type ({t.data_type})")
    need = (n * bits + 7) // 8
    if t.HasField("raw_data"):
        got = len(t.raw_data)
        if got != need:
            raise UserError(f"{label}: {what} holds {got} bytes of data but its dims {list(t.dims)} and type "
                            f"{onnx.TensorProto.DataType.Name(t.data_type)} need {need}"
                            + (" (truncated external data?)" if got < need else ""))
        return
    field = onnx.helper.tensor_dtype_to_field(t.data_type)
    got = len(getattr(t, field))
    want = {n * 2} if t.data_type in _COMPLEX else ({n, need} if bits < 8 else {n})
    if got not in want:
        raise UserError(f"{label}: {what} holds {got} values but its dims {list(t.dims)} need {min(want)}")


def _run_checker(model: onnx.ModelProto, where: str) -> None:
    """onnx's full checker on a user's model (custom domains: the structural check only, as
    their ops have no schema to infer shapes with)."""
    if outputs.weights_bytes(model) > outputs.EXTERNAL_DATA_THRESHOLD:
        return  # the in-memory checker cannot take > 2 GB; the structural checks above still ran
    declared = {o.domain for o in model.opset_import}
    used = {n.domain for n in _all_node_protos(model.graph)} - declared - {"", "ai.onnx"}
    if used:  # custom domains used but not declared (edgec declares them on output): check as if declared
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        copy.opset_import.extend(onnx.helper.make_opsetid(d, 1) for d in sorted(used))
        model = copy
    custom = any(o.domain not in ("", "ai.onnx") for o in model.opset_import)
    try:
        if any(not o.type.HasField("tensor_type") or not o.type.tensor_type.HasField("shape") for o in model.graph.output):
            # outputs declared without a type or shape (ONNX Runtime and edgec infer them; the checker
            # wants them written): check the model as inference completes it
            model = onnx.shape_inference.infer_shapes(model)
        try:
            onnx.checker.check_model(model, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            if custom:
                onnx.checker.check_model(model, full_check=False)
            elif not (isinstance(e, onnx.shape_inference.InferenceError) and _only_stale_shapes(model)):
                raise
    except Exception as e:  # noqa: BLE001 - ValidationError, InferenceError, ...: all about the input
        raise UserError(f"{where}: not a valid ONNX model: {_checker_message(e)}") from None


def _only_stale_shapes(model: onnx.ModelProto) -> bool:
    """True when strict shape inference fails only on shapes the model declares (stale
    value_info, output shapes that disagree with the graph): ONNX Runtime runs such models and
    edgec re-infers every shape, so they are not refused. Types must still agree."""
    if not model.graph.value_info and not any(o.type.tensor_type.HasField("shape") for o in model.graph.output):
        return False
    relaxed = onnx.ModelProto()
    relaxed.CopyFrom(model)
    for vi in list(relaxed.graph.value_info) + list(relaxed.graph.output):  # shapes go, types stay
        vi.type.tensor_type.ClearField("shape")
    try:
        relaxed = onnx.shape_inference.infer_shapes(relaxed)
        if any(not o.type.tensor_type.HasField("shape") for o in relaxed.graph.output):
            return False
        onnx.checker.check_model(relaxed, full_check=True)
        return True
    except Exception:  # noqa: BLE001 - still invalid without the declared shapes
        return False


def _checker_message(e: BaseException) -> str:
    text = " ".join(line.strip() for line in str(e).strip().splitlines() if line.strip())
    text = text.replace("[ShapeInferenceError] ", "").replace("[TypeInferenceError] ", "")
    return (text[:300] + "...") if len(text) > 300 else (text or type(e).__name__)


def _all_node_protos(g: onnx.GraphProto):
    for sub in _all_graphs(g):
        yield from sub.node
