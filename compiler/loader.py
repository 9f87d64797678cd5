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

import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import version_converter

from .errors import InternalError, UserError
from .ir import IR, ModelInfo

MIN_OPSET = 7
MAX_OPSET = 23
CANONICAL_OPSET = 17
# Above this many bytes of weights the model is saved with external data (protobuf's limit is 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read and sanity-check an ONNX file (external data included). Raises UserError."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such file")
    if p.is_dir():
        raise UserError(f"{p}: is a directory, expected an .onnx model file")
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
    if model.ir_version <= 0 or not model.HasField("graph") or not model.opset_import:
        raise UserError(f"{p}: not an ONNX model (no IR version, graph or opset import)")
    if not model.graph.output:
        raise UserError(f"{p}: the model's graph has no outputs")
    if _uses_external_data(model):
        try:
            onnx.external_data_helper.load_external_data_for_model(model, str(p.parent))
        except FileNotFoundError as e:
            raise UserError(f"{p}: external data file not found next to the model ({Path(e.filename or '').name or e})") from None
        except Exception as e:  # path outside the model folder, short file, ...
            raise UserError(f"{p}: cannot load its external data: {_one_line(e)}") from None
    return model


def check_opset(model: onnx.ModelProto, where: str = "model") -> int:
    versions = {o.domain: o.version for o in model.opset_import}
    opset = versions.get("", versions.get("ai.onnx"))
    if opset is None:
        raise UserError(f"{where}: declares no default-domain (ai.onnx) opset; edgec needs one")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserError(f"{where}: opset {opset} is not supported (edgec reads opsets {MIN_OPSET} to {MAX_OPSET})")
    return opset


def normalize_opset(model: onnx.ModelProto, target: int = CANONICAL_OPSET) -> tuple[onnx.ModelProto, list[str]]:
    """Upgrade the default-domain opset to ``target`` where onnx's converter can."""
    opset = check_opset(model)
    if opset >= target:
        return model, []
    try:
        converted = version_converter.convert_version(model, target)
        onnx.checker.check_model(converted)
    except Exception as e:
        return model, [f"opset {opset} kept: onnx's version converter cannot take this model to "
                       f"{target} ({_one_line(e)[:160]})"]
    return converted, [f"opset {opset} converted to {target}"]


def load(path: str | os.PathLike, *, normalize: bool = True) -> IR:
    """Load an ONNX file into the IR."""
    model = load_model(path)
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
        raise UserError(f"{path}: the graph cannot be read: {_one_line(e)}") from None


def from_model(model: onnx.ModelProto, *, normalize: bool = True) -> IR:
    """The IR of an in-memory ModelProto (the Python API's entry point)."""
    source_opset = check_opset(model)
    notes: list[str] = []
    if normalize:
        model, notes = normalize_opset(model)
    return IR.from_onnx(model, info=ModelInfo(source_opset=source_opset, notes=notes))


def check_model(model: onnx.ModelProto) -> None:
    """onnx's full checker (with shape inference); custom domains get the structural check."""
    try:
        if _weights_bytes(model) > EXTERNAL_DATA_THRESHOLD:
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
        raise InternalError(f"the rewritten model fails onnx.checker: {_one_line(e)}") from None
    except onnx.shape_inference.InferenceError as e:
        raise InternalError(f"the rewritten model fails shape inference: {_one_line(e)}") from None


def check_output_path(out: str | os.PathLike, inp: str | os.PathLike | None = None) -> Path:
    """Refuse an output path we must not or cannot write, before any work is done."""
    o = Path(out)
    if inp is not None:
        i = Path(inp)
        if o.resolve() == i.resolve() or (o.exists() and i.exists() and os.path.samefile(o, i)):
            raise UserError(f"{o}: the output path is the input model; edgec never overwrites its input")
    if o.is_dir():
        raise UserError(f"{o}: is a directory; give a file name for the output model")
    parent = o.resolve().parent
    if not parent.is_dir():
        raise UserError(f"{o}: the output folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (o.exists() and not os.access(o, os.W_OK)):
        raise UserError(f"{o}: not writable")
    return o


def save(model_or_ir, path: str | os.PathLike, *, check: bool = True) -> Path:
    """Write a model atomically. Large models get one external-data file beside them."""
    if isinstance(model_or_ir, IR):
        model_or_ir.infer_shapes()
        model = model_or_ir.to_onnx()
    else:
        model = model_or_ir
    if check:
        check_model(model)
    p = Path(path)
    parent = p.resolve().parent
    external = _weights_bytes(model) > EXTERNAL_DATA_THRESHOLD
    try:
        tmp_model = tempfile.NamedTemporaryFile(dir=parent, prefix=f".{p.name}.", suffix=".tmp", delete=False)
    except OSError as e:
        raise UserError(f"{p}: cannot write there ({e.strerror or e})") from None
    tmp_model.close()
    tmp_paths = [tmp_model.name]
    try:
        if external:
            data_name = p.name + ".data"
            tmp_data = parent / f".{data_name}.{os.getpid()}.tmp"
            tmp_paths.append(str(tmp_data))
            onnx.external_data_helper.convert_model_to_external_data(
                model, all_tensors_to_one_file=True, location=tmp_data.name, size_threshold=1024)
            onnx.external_data_helper.write_external_data_tensors(model, str(parent))  # into tmp_data
            # Point the model at the final data file name, write it once, rename data, then model.
            for t in onnx.external_data_helper._get_all_tensors(model):
                for entry in t.external_data:
                    if entry.key == "location":
                        entry.value = data_name
            with open(tmp_model.name, "wb") as f:
                f.write(model.SerializeToString())
            os.replace(tmp_data, parent / data_name)
            if check:
                onnx.checker.check_model(tmp_model.name)
        else:
            with open(tmp_model.name, "wb") as f:
                f.write(model.SerializeToString())
        os.replace(tmp_model.name, p)
    except BaseException as e:
        for t in tmp_paths:
            try:
                os.unlink(t)
            except OSError:
                pass
        if isinstance(e, OSError):
            raise UserError(f"{p}: cannot write the model ({e.strerror or e})") from None
        raise
    return p


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL
               for t in onnx.external_data_helper._get_all_tensors(model))


def _weights_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for t in model.graph.initializer:
        total += len(t.raw_data) if t.HasField("raw_data") else t.ByteSize()
    return total


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
