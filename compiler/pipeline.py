"""Passes and the pass manager.

A pass is a small object: ``name``, a one-line ``description``, what it ``requires`` of the IR
before it runs (``"shapes"``: tensor shapes inferred), whether it is ``lossless``, and
``run(ir) -> changed``. A pass may leave human-readable ``notes`` (e.g. why a BatchNorm was not
folded) that the report prints.

The manager runs an ordered pipeline, where an item is a pass or a :class:`FixedPoint` group
(passes repeated until none changes the graph), times each pass, records what it changed
(nodes, constants, parameters), validates the graph after every pass and names the pass in
any failure. Dead nodes are dropped and topological order restored once per round (and before
a pass that ``requires`` ``"order"``), so passes may leave dead nodes behind.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import onnx_graphsurgeon as gs

from .errors import EdgecError, InternalError
from .ir import IR


class Pass:
    name: str = ""
    description: str = ""
    requires: tuple[str, ...] = ()
    lossless: bool = True
    # True when every tensor that survives the pass keeps its shape and new tensors get theirs:
    # the manager then skips re-running shape inference after it.
    preserves_shapes: bool = False

    def __init__(self) -> None:
        self.notes: list[str] = []

    def run(self, ir: IR) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def __repr__(self) -> str:
        return f"<pass {self.name}>"


_REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by name (CLI ``--passes``, ``edgec passes``)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Pass]]:
    import edgec.passes  # noqa: F401  (registers every pass)

    return dict(_REGISTRY)


def get_pass(name: str, **kwargs) -> Pass:
    from .errors import UserError

    reg = registry()
    if name not in reg:
        raise UserError(f"unknown pass '{name}' (see `edgec passes`; known: {', '.join(sorted(reg))})")
    return reg[name](**kwargs)


@dataclass
class FixedPoint:
    """Run ``passes`` in order, again and again, until a round changes nothing."""

    passes: Sequence[Pass]
    max_rounds: int = 8


@dataclass
class PassRecord:
    name: str
    changed: bool = False
    seconds: float = 0.0
    runs: int = 0
    nodes_removed: int = 0
    nodes_added: int = 0
    constants_removed: int = 0
    params_removed: int = 0
    notes: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "name": self.name, "changed": self.changed, "seconds": round(self.seconds, 6),
            "runs": self.runs, "nodes_removed": self.nodes_removed, "nodes_added": self.nodes_added,
            "constants_removed": self.constants_removed, "params_removed": self.params_removed,
            "notes": list(self.notes),
        }


def _footprint(ir: IR) -> tuple[int, int, int]:
    cached = ir.analysis_cache.get("footprint")
    if cached is None:
        consts = ir.constants()
        params = sum(math.prod(c.shape) for c in consts if _is_param(c))
        live = 0
        for n in ir.nodes:
            if not n.outputs:
                continue  # detached nodes are gone already
            live += 1
            if n.op == "ConstantOfShape" and n.outputs[0].outputs and n.inputs and isinstance(n.inputs[0], gs.Constant):
                fill = n.attrs.get("value")  # generated weights are parameters too (as costs.compute counts them)
                if fill is None or (isinstance(fill, gs.Constant) and _is_param(fill)):
                    params += math.prod(int(d) for d in ir.const_value(n.inputs[0]))
        cached = ir.analysis_cache["footprint"] = (live, len(consts), params)
    return cached


def _is_param(c: gs.Constant) -> bool:
    from .analysis.costs import _is_param_dtype

    return c.dtype is not None and _is_param_dtype(c.dtype)


class PassManager:
    def __init__(self, pipeline: Iterable[Pass | FixedPoint], *, validate: bool = True,
                 on_pass: Callable[[PassRecord], None] | None = None):
        self.pipeline = list(pipeline)
        self.validate = validate
        self.on_pass = on_pass
        self.records: dict[str, PassRecord] = {}

    def run(self, ir: IR) -> list[PassRecord]:
        self.records = {}
        self._dirty = False
        for item in self.pipeline:
            if isinstance(item, FixedPoint):
                for _ in range(item.max_rounds):
                    changed = [self._run_one(ir, p) for p in item.passes]
                    self._tidy(ir)
                    if not any(changed):
                        break
            else:
                self._run_one(ir, item)
        self._tidy(ir, force=True)
        # Forced: shape-preserving passes keep shapes valid, but folding can make unknown dims
        # knowable; outputs must leave with shapes (onnx.checker requires them) and costs need them.
        ir.infer_shapes(force=True)
        return list(self.records.values())

    def _tidy(self, ir: IR, force: bool = False) -> None:
        """Drop dead nodes and restore topological order: once per round, not after every pass."""
        if not (self._dirty or force):
            return
        before = _footprint(ir)
        ir.remove_dead()
        ir.analysis_cache.pop("footprint", None)
        after = _footprint(ir)
        rec = self.records.get(getattr(self, "_last_changed", None))
        if rec is not None:  # dead code left by the last rewrite is that rewrite's doing
            rec.nodes_removed += max(0, before[0] - after[0])
            rec.constants_removed += before[1] - after[1]
            rec.params_removed += before[2] - after[2]
        try:
            ir.toposort()
        except Exception as e:
            raise InternalError(f"the graph has a cycle after {self._last}: {e}", self._last) from e
        self._dirty = False

    def _run_one(self, ir: IR, p: Pass) -> bool:
        rec = self.records.setdefault(p.name, PassRecord(p.name))
        if "order" in p.requires:  # the pass walks nodes producers-first
            self._tidy(ir)
        self._last = p.name
        before = _footprint(ir)
        if "shapes" in p.requires:
            ir.infer_shapes()
        shapes_valid = ir.shapes_current()
        t0 = time.perf_counter()
        try:
            changed = bool(p.run(ir))
        except EdgecError:
            raise
        except Exception as e:
            raise InternalError(f"pass '{p.name}' failed: {type(e).__name__}: {e}", p.name) from e
        if changed:
            ir.changed()
            if p.preserves_shapes and shapes_valid:
                ir.shapes_still_valid()
            self._dirty = True
            self._last_changed = p.name
            if self.validate:
                try:
                    ir.validate()
                except InternalError as e:
                    raise InternalError(f"pass '{p.name}' left a broken graph: {e}", p.name) from None
        rec.seconds += time.perf_counter() - t0
        rec.runs += 1
        rec.changed |= changed
        after = _footprint(ir)
        rec.nodes_removed += max(0, before[0] - after[0])
        rec.nodes_added += max(0, after[0] - before[0])
        rec.constants_removed += before[1] - after[1]
        rec.params_removed += before[2] - after[2]
        for n in p.notes:
            if n not in rec.notes:
                rec.notes.append(n)
        p.notes.clear()
        if self.on_pass:
            self.on_pass(rec)
        return changed


def run_passes(ir: IR, names_or_passes: Iterable[str | Pass], **kwargs) -> list[PassRecord]:
    """Convenience for the Python API: run passes given by name or instance, in order."""
    passes = [get_pass(p) if isinstance(p, str) else p for p in names_or_passes]
    return PassManager(passes, **kwargs).run(ir)
