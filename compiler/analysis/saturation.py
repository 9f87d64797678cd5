"""Where a tensor's readers stop telling its values apart: the lossless clip of its range.

A tensor read only by ``HardSwish`` gives the same result for every value below -3 (they all
become 0); read only by ``HardSigmoid`` (alpha 1/6, beta 1/2), for every value outside
``[-3, 3]``; by ``Clip(lo, hi)``, outside ``[lo, hi]``. Quantizing such a tensor over its full
calibrated range spends levels on values its readers cannot tell apart: a conv output whose
pre-activations reach -20 before a hard-swish gets levels about twice as coarse as the ``[-3,
hi]`` that matters. :func:`saturation_bounds` finds, for every tensor, the interval ``[a, b]``
outside which no reader's result changes, so calibration can clamp the tensor's statistics to
it (:meth:`edgec.calibration.TensorStats.clamped`) before any range method runs. The clip is
exact: the float model computes the same outputs with the tensor clamped to ``[a, b]``
(``tests/test_calibration.py`` checks it in ONNX Runtime).

A reader's interval, for the tensor ``x`` it reads:

- ``Relu``: ``[0, inf)``; ``Clip(lo, hi)`` with constant bounds: ``[lo, hi]``;
  ``HardSigmoid(alpha > 0, beta)``: ``[-beta/alpha, (1 - beta)/alpha]``; ``HardSwish``: ``[-3, inf)``;
- ``Mul(x, g)`` where ``g`` is zero wherever ``x < z`` (``HardSigmoid(x)``, ``Relu(x + c)``,
  ``Clip(x + c, 0, m)``, those times or over a constant: hard-swish as exporters write it at
  opsets before 14): ``[z, inf)``;
- ops that move or select values without changing them, or change them monotonically
  elementwise with a scalar constant (``Reshape``, ``Transpose``, ``Concat``, ``MaxPool``,
  nearest ``Resize``, ``Add``/``Sub``/``Mul``/``Div`` by a scalar, ...): the interval of their
  output, mapped back;
- anything else, and a graph output: everything (no clip). Smooth activations (Sigmoid, SiLU,
  Tanh) never reach their limits, so they are not clipped: clipping a sigmoid's input at +-8,
  within 3.4e-4 of its limits, was tried and not kept (a detector's rare-class scores, 1e-5 in
  float, became 3.4e-4, relative errors far beyond any budget).

The tensor's interval spans all its readers' (the smallest ``a``, the largest ``b``).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import numpy_helper

Interval = tuple[float, float]
EVERYTHING: Interval = (-math.inf, math.inf)

# the output holds some of the input's values, moved or selected, or (MaxPool) the largest of a
# window: clamping the input clamps the output the same way, so the output's interval holds
_MOVE = {"Identity", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Concat", "Slice", "Split",
         "Expand", "Tile", "DepthToSpace", "SpaceToDepth", "MaxPool", "Gather"}
_DATA_INPUT_ONLY = {"Reshape", "Squeeze", "Unsqueeze", "Slice", "Split", "Expand", "Tile", "Gather", "Resize"}


def saturation_bounds(model: onnx.ModelProto) -> dict[str, Interval]:
    """Tensor name -> ``(a, b)``: the model's outputs do not change when the tensor is clamped
    to ``[a, b]``. Only tensors with a finite bound are listed."""
    g = model.graph
    consts = {i.name: i for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = a.t
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    producer: dict[str, onnx.NodeProto] = {}
    for n in g.node:
        for i, x in enumerate(n.input):
            if x:
                readers.setdefault(x, []).append((n, i))
        for o in n.output:
            producer[o] = n
    # a subgraph (If/Loop/Scan) may read any outer tensor: those are never clamped
    outputs = {o.name for o in g.output} | _subgraph_reads(g)
    scalar_cache: dict[str, float | None] = {}

    def scalar(name: str) -> float | None:
        """The value of a constant whose elements are all equal, else None."""
        if name not in scalar_cache:
            v = None
            if name in consts:
                arr = numpy_helper.to_array(consts[name])
                if arr.size >= 1 and (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
                    flat = arr.reshape(-1).astype(np.float64)
                    if np.all(flat == flat[0]) and math.isfinite(flat[0]):
                        v = float(flat[0])
            scalar_cache[name] = v
        return scalar_cache[name]

    sat: dict[str, Interval] = {}

    def of(name: str) -> Interval:
        return EVERYTHING if name in outputs else sat.get(name, EVERYTHING)

    for n in reversed(g.node):  # every reader of a node's outputs comes after it
        for o in n.output:
            if o and o not in outputs and o in readers:
                sat[o] = _span([_reader(r, i, o, of, scalar, producer) for r, i in readers[o]])
    for i in g.input:
        if i.name not in consts and i.name in readers and i.name not in outputs:
            sat[i.name] = _span([_reader(r, k, i.name, of, scalar, producer) for r, k in readers[i.name]])
    return {t: ab for t, ab in sat.items() if ab != EVERYTHING}


def _subgraph_reads(g: onnx.GraphProto) -> set[str]:
    """Every tensor name a node's subgraph attribute reads, at any depth."""
    names: set[str] = set()
    for n in g.node:
        for a in n.attribute:
            subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            for sg in subs:
                for m in sg.node:
                    names.update(x for x in m.input if x)
                names.update(o.name for o in sg.output)
                names |= _subgraph_reads(sg)
    return names


def _span(intervals: list[Interval]) -> Interval:
    if not intervals:
        return EVERYTHING
    return min(a for a, _ in intervals), max(b for _, b in intervals)


def _attr(n: onnx.NodeProto, name: str, default):
    for a in n.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _other(n: onnx.NodeProto, i: int) -> str | None:
    return n.input[1 - i] if len(n.input) == 2 and i in (0, 1) else None


def _clip_limits(n: onnx.NodeProto, scalar) -> tuple[float | None, float | None] | None:
    """A Clip's constant (lo, hi) (inf for a missing one), or None when a bound is not constant."""
    if len(n.input) <= 1 and any(a.name in ("min", "max") for a in n.attribute):  # opset < 11
        return float(_attr(n, "min", -math.inf)), float(_attr(n, "max", math.inf))
    lims = []
    for k, missing in ((1, -math.inf), (2, math.inf)):
        if len(n.input) <= k or not n.input[k]:
            lims.append(missing)
            continue
        v = scalar(n.input[k])
        if v is None:
            return None
        lims.append(v)
    return lims[0], lims[1]


def _reader(r: onnx.NodeProto, i: int, x: str, of, scalar, producer) -> Interval:
    """The interval of ``x`` outside which reader ``r`` (reading it as input ``i``) gives the
    same result."""
    op = r.op_type
    if r.domain not in ("", "ai.onnx"):
        return EVERYTHING
    if op == "Relu":
        return 0.0, math.inf
    if op == "Clip" and i == 0:
        lims = _clip_limits(r, scalar)
        return lims if lims is not None else EVERYTHING
    if op == "HardSigmoid":
        alpha, beta = float(_attr(r, "alpha", 0.2)), float(_attr(r, "beta", 0.5))
        if alpha > 0:
            return -beta / alpha, (1.0 - beta) / alpha
        return EVERYTHING
    if op == "HardSwish":
        return -3.0, math.inf
    if op in _MOVE or (op == "Resize" and _attr(r, "mode", b"nearest") in (b"nearest", "nearest")):
        if op in _DATA_INPUT_ONLY and i != 0:
            return EVERYTHING
        if op == "MaxPool" and len([o for o in r.output if o]) > 1:  # the indices output
            return EVERYTHING
        return _span([of(o) for o in r.output if o])
    if op in ("Add", "Sub", "Mul", "Div"):
        other = _other(r, i)
        if other is None:
            return EVERYTHING
        c = scalar(other)
        if c is None:
            if op == "Mul":  # x * g(x), g zero below z: the product is 0 there
                z = _zero_below(other, x, producer, scalar)
                if z is not None:
                    return z, math.inf
            return EVERYTHING
        a, b = of(r.output[0])
        if (a, b) == EVERYTHING:
            return EVERYTHING
        if op == "Add":
            return a - c, b - c
        if op == "Sub":
            return (a + c, b + c) if i == 0 else (c - b, c - a)
        if op == "Mul" and c != 0:
            return (a / c, b / c) if c > 0 else (b / c, a / c)
        if op == "Div" and i == 0 and c != 0:
            return (a * c, b * c) if c > 0 else (b * c, a * c)
    return EVERYTHING


def _zero_below(t: str, x: str, producer, scalar, depth: int = 0) -> float | None:
    """``z`` such that tensor ``t`` is 0 wherever ``x < z`` (elementwise), or None if unknown."""
    n = producer.get(t)
    if n is None or depth > 4 or n.domain not in ("", "ai.onnx"):
        return None
    if n.op_type == "HardSigmoid" and n.input[0] == x:
        alpha, beta = float(_attr(n, "alpha", 0.2)), float(_attr(n, "beta", 0.5))
        return -beta / alpha if alpha > 0 else None
    lims = _clip_limits(n, scalar) if n.op_type == "Clip" else None
    if n.op_type == "Relu" or (lims is not None and lims[0] == 0.0 and lims[1] >= 0.0):
        return _root(n.input[0], x, producer, scalar)
    if n.op_type in ("Mul", "Div") and len(n.input) == 2 and scalar(n.input[1]) not in (None, 0.0):
        return _zero_below(n.input[0], x, producer, scalar, depth + 1)
    if n.op_type == "Mul" and len(n.input) == 2 and scalar(n.input[0]) not in (None, 0.0):
        return _zero_below(n.input[1], x, producer, scalar, depth + 1)
    return None


def _root(u: str, x: str, producer, scalar) -> float | None:
    """``z`` such that ``u <= 0`` wherever ``x < z``, for ``u`` = x, x + c, x - c or x * s (s > 0)."""
    if u == x:
        return 0.0
    n = producer.get(u)
    if n is None or len(n.input) != 2 or n.domain not in ("", "ai.onnx"):
        return None
    a, b = n.input
    if n.op_type == "Add" and x in (a, b):
        c = scalar(b if a == x else a)
        return -c if c is not None else None
    if n.op_type == "Sub" and a == x:
        c = scalar(b)
        return c
    if n.op_type in ("Mul", "Div") and a == x:
        c = scalar(b)
        return 0.0 if c is not None and c > 0 else None
    if n.op_type == "Mul" and b == x:
        c = scalar(a)
        return 0.0 if c is not None and c > 0 else None
    return None
