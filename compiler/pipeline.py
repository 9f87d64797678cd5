"""Passes and the pass manager.

A pass is a small object: ``name``, a one-line ``description``, what it ``requires`` of the IR
before it runs (``"shapes"``: tensor shapes inferred; ``"order"``: nodes producers-first),
whether it is ``lossless``, and ``run(ir, ctx) -> PassResult``. The result says whether the
graph changed, carries human-readable ``notes`` (e.g. why a BatchNorm was not folded) that the
report prints, and the pass's ``data`` (a typed record such as ``PruneResult``), which the
caller reads from the pass's record, never from the pass object.

What a pass may read besides the IR comes in the :class:`PassContext`: calibration data, the
reference (float) model, calibrated ranges, a quantization plan, the target profile. Nothing is
pushed into pass objects after they are built.

The manager runs an ordered pipeline, where an item is a pass or a :class:`FixedPoint` group
(passes repeated until none changes the graph), times each pass, records what it changed
(nodes, constants, parameters), validates the graph after every pass and names the pass in
any failure. Dead nodes are dropped and topological order restored once per round (and before
a pass that ``requires`` ``"order"``), so passes may leave dead nodes behind.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import onnx_graphsurgeon as gs

from .analysis.costs import is_param_dtype
from .errors import EdgecError, InternalError, UserError
from .ir import IR


@dataclass
class PassResult:
    """What one run of a pass did: ``changed`` the graph or not, ``notes`` for the report, and
    its ``data`` (a typed result, e.g. :class:`edgec.passes.prune_channels.PruneResult`)."""

    changed: bool
    notes: list[str] = field(default_factory=list)
    data: Any = None

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


# calibration data the data-driven passes (pruning, reconstruction, 2:4 recovery) hold in memory:
# at most this many samples and this many bytes of inputs, whole batches drawn over the set
MAX_FEED_SAMPLES = 256
MAX_FEED_BYTES = 256 << 20


@dataclass
class PassContext:
    """Inputs a pass may read besides the IR (all optional; a pass that needs one and finds it
    missing raises a UserError saying which).

    ``calib``: calibration batches (any re-iterable of ``{input: array}``, e.g. a
    :class:`edgec.calibdata.CalibrationSet`); ``reference``: the float model the compile
    started from, as ONNX; ``ranges``: calibrated activation ranges (tensor -> (lo, hi));
    ``plan``: a quantization plan (:class:`edgec.quant_plan.QuantPlan`); ``target``: the target
    profile (:class:`edgec.target.Target`); ``log``: progress lines."""

    calib: Any = None
    reference: Any = None
    ranges: dict | None = None
    plan: Any = None
    target: Any = None
    log: Callable[[str], None] = field(default=lambda s: None, repr=False)
    _feeds: list | None = field(default=None, repr=False)

    def feeds(self) -> list[dict] | None:
        """The calibration batches as a list (read once, shared by every pass that asks). A set
        larger than ``MAX_FEED_SAMPLES`` samples or ``MAX_FEED_BYTES`` of inputs gives whole
        batches drawn with a fixed seed over it (:func:`edgec.calibdata.subset`), so a folder of
        thousands of images does not all sit in memory, nor in every staged run, and the draw
        is not one class of a sorted folder."""
        if self.calib is None:
            return None
        if self._feeds is None:
            if isinstance(self.calib, dict):
                self._feeds = [self.calib]
                return self._feeds
            from .calibdata import count_samples, subset
            first = next(iter(self.calib), None)
            if not first:
                self._feeds = list(self.calib)
                return self._feeds
            rows = max(1, len(next(iter(first.values()))))
            per_sample = max(1, sum(v.nbytes for v in first.values()) // rows)
            drawn = subset(self.calib, max(1, min(MAX_FEED_SAMPLES, MAX_FEED_BYTES // per_sample)))
            self._feeds = list(drawn.batches)
            known = getattr(self.calib, "length_known", True)  # (not counted by reading it all)
            total = self.calib.num_samples if hasattr(self.calib, "num_samples") else count_samples(self.calib)
            if known and total is not None and drawn.samples < total:
                self.log(f"data-driven passes use {drawn.samples} of the {total} calibration samples, whole "
                         f"batches drawn with a fixed seed over the set (at most {MAX_FEED_SAMPLES} samples and "
                         f"{MAX_FEED_BYTES >> 20} MB of inputs)")
        return self._feeds


class Pass:
    name: str = ""
    description: str = ""
    requires: tuple[str, ...] = ()
    lossless: bool = True
    # True when every tensor that survives the pass keeps its shape and new tensors get theirs:
    # the manager then skips re-running shape inference after it.
    preserves_shapes: bool = False

    def __init__(self) -> None:
        self.notes: list[str] = []  # legacy passes only (run(ir) -> bool); see _call

    def run(self, ir: IR, ctx: PassContext) -> PassResult:  # pragma: no cover - interface
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
    """Every registered pass by name once ``edgec.passes`` is imported (``import edgec`` is
    lazy: its pipeline names import the passes; the CLI's passes command imports them)."""
    return dict(_REGISTRY)


def get_pass(name: str, **kwargs) -> Pass:
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
    """What the pass at one position of the pipeline did (a pass in a FixedPoint group keeps
    one record over all its rounds; the same pass at two positions has two records)."""

    name: str
    position: int = 0
    changed: bool = False
    seconds: float = 0.0
    runs: int = 0
    nodes_removed: int = 0
    nodes_added: int = 0
    constants_removed: int = 0
    params_removed: int = 0
    notes: list = field(default_factory=list)
    data: Any = None  # the pass's typed result (its last run's, when it ran more than once)

    def as_dict(self) -> dict:
        return {
            "name": self.name, "position": self.position, "changed": self.changed, "seconds": round(self.seconds, 6),
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
    return c.dtype is not None and is_param_dtype(c.dtype)


class PassManager:
    def __init__(self, pipeline: Iterable[Pass | FixedPoint], *, validate: bool = True,
                 on_pass: Callable[[PassRecord], None] | None = None, reinfer_shapes: bool = True):
        self.pipeline = list(pipeline)
        self.validate = validate
        # False: shapes are inferred again at the end only when a pass left them stale (a
        # pipeline of shape-preserving rewrites, such as quantization's, needs no new inference)
        self.reinfer_shapes = reinfer_shapes
        self.on_pass = on_pass
        self.records: list[PassRecord] = []

    def run(self, ir: IR, ctx: PassContext | None = None) -> list[PassRecord]:
        ctx = ctx if ctx is not None else PassContext()
        self.records = []
        self._dirty = False
        self._last_changed: PassRecord | None = None
        for item in self.pipeline:
            if isinstance(item, FixedPoint):
                recs = [self._new_record(p) for p in item.passes]
                for _ in range(item.max_rounds):
                    changed = [self._run_one(ir, p, rec, ctx) for p, rec in zip(item.passes, recs)]
                    self._tidy(ir)
                    if not any(changed):
                        break
            else:
                self._run_one(ir, item, self._new_record(item), ctx)
        self._tidy(ir, force=True)
        # Forced: shape-preserving passes keep shapes valid, but folding can make unknown dims
        # knowable; outputs must leave with shapes (onnx.checker requires them) and costs need them.
        ir.infer_shapes(force=self.reinfer_shapes)
        return list(self.records)

    def _new_record(self, p: Pass) -> PassRecord:
        rec = PassRecord(p.name, position=len(self.records))
        self.records.append(rec)
        return rec

    def _tidy(self, ir: IR, force: bool = False) -> None:
        """Drop dead nodes and restore topological order: once per round, not after every pass."""
        if not (self._dirty or force):
            return
        before = _footprint(ir)
        ir.remove_dead()
        ir.analysis_cache.pop("footprint", None)
        after = _footprint(ir)
        rec = self._last_changed
        if rec is not None:  # dead code left by the last rewrite is that rewrite's doing
            rec.nodes_removed += max(0, before[0] - after[0])
            rec.constants_removed += before[1] - after[1]
            rec.params_removed += before[2] - after[2]
        try:
            ir.toposort()
        except Exception as e:
            raise InternalError(f"the graph has a cycle after {self._last}: {e}", self._last) from e
        self._dirty = False

    def _run_one(self, ir: IR, p: Pass, rec: PassRecord, ctx: PassContext) -> bool:
        if "order" in p.requires:  # the pass walks nodes producers-first
            self._tidy(ir)
        self._last = p.name
        before = _footprint(ir)
        if "shapes" in p.requires:
            ir.infer_shapes()
        shapes_valid = ir.shapes_current()
        t0 = time.perf_counter()
        try:
            result = _call(p, ir, ctx)
        except EdgecError:
            raise
        except Exception as e:
            raise InternalError(f"pass '{p.name}' failed: {type(e).__name__}: {e}", p.name) from e
        changed = result.changed
        if changed:
            ir.changed()
            if p.preserves_shapes and shapes_valid:
                ir.shapes_still_valid()
            self._dirty = True
            self._last_changed = rec
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
        for n in result.notes:
            if n not in rec.notes:
                rec.notes.append(n)
        if result.data is not None:
            rec.data = result.data
        if self.on_pass:
            self.on_pass(rec)
        return changed


def _call(p: Pass, ir: IR, ctx: PassContext) -> PassResult:
    """Run ``p``; a pass written to the old contract (``run(ir) -> bool``, notes on the pass)
    is adapted while the passes move over."""
    if len(inspect.signature(p.run).parameters) >= 2:
        result = p.run(ir, ctx)
        if not isinstance(result, PassResult):
            raise InternalError(f"pass '{p.name}' returned {type(result).__name__}, not a PassResult", p.name)
        return result
    changed = bool(p.run(ir))
    result = PassResult(changed, list(p.notes))
    p.notes.clear()
    return result


def run_passes(ir: IR, names_or_passes: Iterable[str | Pass], ctx: PassContext | None = None,
               **kwargs) -> list[PassRecord]:
    """Convenience for the Python API: run passes given by name or instance, in order."""
    passes = [get_pass(p) if isinstance(p, str) else p for p in names_or_passes]
    return PassManager(passes, **kwargs).run(ir, ctx)
