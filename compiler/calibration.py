"""Calibration: streaming activation statistics from ONNX Runtime runs, and clipping ranges.

How it works
- The model is augmented: every tensor to observe becomes an extra graph output. It runs in
  the reference executor (:mod:`edgec.runtime`: ONNX Runtime with optimisations off, whose
  float results are bit-identical on AVX2 and AVX-512 hosts; the fully optimised session's
  NCHWc kernels are not) batch by batch. After each batch only *mergeable* statistics are kept per tensor, and the batch's
  activations are dropped: memory is flat in the size of the calibration set (ONNX Runtime's
  calibrators keep every batch's outputs).
- Statistics per tensor (:class:`TensorStats`): exact running min / max / count / sum, and a
  fixed-size histogram over a range ``[-R, R]`` centred on 0 whose half-width ``R`` is a power of
  two. When a batch exceeds ``R``, the range doubles and adjacent bin pairs are merged. Bin
  widths are powers of two and bin edges are aligned, so the merged histogram is *exactly* the
  histogram a single pass over all the data with the final range gives (independent of batch
  size and order): a value's bin is ``floor(x / w)`` (exact: ``w`` is a power of two), and the
  values equal to ``R`` itself, counted in the last bin, are tracked (``at_top``) and move to the
  bin holding ``R`` when the range doubles. So statistics of shards of the data, merged
  (:meth:`TensorStats.merge`), equal one pass over all of it, bit for bit, whatever the shards:
  what lets calibration run on a Ray cluster (:mod:`edgec.executor`) with the local answer.
- Ranges from the statistics, per method (:func:`compute_range`):
  * ``minmax``: the observed min and max (symmetric: +-max|x|);
  * ``percentile``: hi = the p-th percentile, lo = the (100-p)-th (symmetric: the p-th
    percentile of |x|), interpolated inside histogram bins;
  * ``entropy``: TensorRT's KL-divergence calibration on the |x| histogram (candidate clips
    from 128 bins up, the reference distribution with its outliers folded into the last bin,
    compared with its quantized version at 128 levels (signed) or 256 levels (non-negative)).
    For non-negative tensors the bin holding the zeros is left out: a ReLU's spike of exact
    zeros costs nothing at any clip but dominates the KL and drives the clip far too low
    (measured on the example model: 10.7 dB SQNR with it, see the benchmark without);
  * ``mse``: the clip (a fraction of the min-max range) minimising the expected squared error
    of quantize-dequantize over the histogram (rounding noise inside, clipping error outside).
- One method per tensor class: ``method`` may be a dict ``{"default": ..., "bounded": ...,
  "unbounded": ..., "input": ...}``; a tensor is ``input`` (a graph input), ``bounded`` (the output
  of Relu/Clip/Sigmoid/... whose range the op bounds) or ``unbounded`` (everything else).
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import onnx
from onnx import helper

from . import executor
from .analysis.saturation import saturation_bounds
from .errors import UserError
from .runtime import augment, map_batches, output_names, reference_session

DEFAULT_BINS = 4096  # must be a multiple of 4 (exact pair merging keeps 0 on a bin edge)
METHODS = ("minmax", "percentile", "entropy", "mse")
TENSOR_CLASSES = ("input", "bounded", "unbounded")
BOUNDED_OPS = {"Relu", "Clip", "Sigmoid", "HardSigmoid", "Softmax", "Tanh", "Abs"}


@dataclass
class TensorStats:
    """Mergeable statistics of one tensor (see the module doc)."""

    bins: int = DEFAULT_BINS
    count: int = 0
    min: float = math.inf
    max: float = -math.inf
    half_range: float = 0.0  # R, a power of two (0 until data arrives)
    hist: np.ndarray = field(default=None)  # int64[bins] over [-R, R]
    histogram: bool = True  # False: min/max/count only (enough for minmax)
    channel_min: np.ndarray | None = None  # per channel (axis 1), when asked for
    channel_max: np.ndarray | None = None
    at_top: int = 0  # values equal to +R, counted in the last bin (they move up when R doubles)

    def __post_init__(self):
        if self.bins % 4:
            raise ValueError("bins must be a multiple of 4")
        if self.hist is None and self.histogram:
            self.hist = np.zeros(self.bins, dtype=np.int64)

    # -------------------------------------------------------------- updating
    def update(self, x: np.ndarray, lo: float | None = None, hi: float | None = None) -> None:
        """Add the values ``x``; ``lo``/``hi``, when given, are its min and max (computed by the
        executor, so they need no pass over ``x`` here)."""
        finite = np.asarray(x).ravel()
        if finite.size == 0:
            return
        if lo is None or hi is None:
            lo, hi = float(finite.min()), float(finite.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN/inf: statistics of the finite values
            finite = finite[np.isfinite(finite)]
            if finite.size == 0:
                return
            lo, hi = float(finite.min()), float(finite.max())
        self.min = min(self.min, lo)
        self.max = max(self.max, hi)
        self.count += int(finite.size)
        if not self.histogram:
            return
        self._grow(max(abs(lo), abs(hi)))
        self.hist += self._counts(finite)

    def update_channels(self, lo: np.ndarray, hi: np.ndarray) -> None:
        """Add a batch's per-channel min and max (axis 1)."""
        lo, hi = np.asarray(lo, dtype=np.float64).reshape(-1), np.asarray(hi, dtype=np.float64).reshape(-1)
        self.channel_min = lo if self.channel_min is None else np.minimum(self.channel_min, lo)
        self.channel_max = hi if self.channel_max is None else np.maximum(self.channel_max, hi)

    def scaled(self, divisor: np.ndarray) -> "TensorStats":
        """The min-max statistics of this tensor with channel ``c`` divided by ``divisor[c] > 0``
        (exact from the per-channel min and max)."""
        lo, hi = self.channel_min / divisor, self.channel_max / divisor
        out = TensorStats(bins=self.bins, histogram=False)
        out.update_range(float(lo.min()), float(hi.max()), self.count)
        return out

    def clamped(self, a: float, b: float) -> "TensorStats":
        """The statistics of this tensor's values clamped to ``[a, b]`` (``a <= b``; infinite
        for no bound): min and max exactly, the histogram to its bins (each value beyond a bound
        moves into the bin holding the bound)."""
        out = TensorStats(bins=self.bins, histogram=False)
        out.count, out.half_range = self.count, self.half_range
        out.min, out.max = (float(np.clip(v, a, b)) if self.count else v for v in (self.min, self.max))
        if self.channel_min is not None:
            out.channel_min, out.channel_max = np.clip(self.channel_min, a, b), np.clip(self.channel_max, a, b)
        if self.histogram and self.half_range == 0.0:  # no values yet: nothing to move
            out.histogram, out.hist, out.at_top = True, self.hist.copy(), self.at_top
        elif self.histogram:
            h, w, r = self.hist.copy(), 2 * self.half_range / self.bins, self.half_range
            top = self.at_top
            if a > -r:
                k = min(int(math.floor((a + r) / w)), self.bins - 1)
                h[k] += h[:k].sum()
                h[:k] = 0
            if b < r:
                k = max(int(math.floor((b + r) / w)), 0)
                h[k] += h[k + 1:].sum()
                h[k + 1:] = 0
                top = 0
            out.histogram, out.hist, out.at_top = True, h, top
        return out

    def update_range(self, lo: float, hi: float, count: int) -> None:
        """Add a batch known only by its (finite) min, max and size (min-max statistics)."""
        if count <= 0:
            return
        self.min = min(self.min, lo)
        self.max = max(self.max, hi)
        self.count += int(count)

    def merge(self, other: "TensorStats") -> None:
        """Add ``other``'s statistics (another shard of the data): the result is what one pass
        over both shards gives, exactly (see the module doc)."""
        if other.channel_min is not None:
            self.update_channels(other.channel_min, other.channel_max)
        if other.count == 0:
            return
        if other.bins != self.bins:
            raise ValueError("cannot merge histograms with different bin counts")
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.count += other.count
        if not (self.histogram and other.histogram):
            self.histogram, self.hist = False, None
            return
        if other.half_range == 0.0:
            return
        self._grow(other.half_range)
        h, top = other.hist.copy(), other.at_top
        r = other.half_range
        while r < self.half_range:
            h, top = _halve(h, top), 0
            r *= 2
        self.hist += h
        self.at_top += top

    def _grow(self, amax: float) -> None:
        need = _pow2_at_least(amax)
        if self.half_range == 0.0:
            self.half_range = need
            return
        while self.half_range < need:
            self.hist, self.at_top = _halve(self.hist, self.at_top), 0
            self.half_range *= 2

    def _counts(self, x: np.ndarray) -> np.ndarray:
        w = 2 * self.half_range / self.bins  # a power of two: x / w is exact
        idx = np.floor(x.astype(np.float64) / w).astype(np.int64)
        idx += self.bins // 2
        top = int(np.count_nonzero(idx >= self.bins))  # x == R (never beyond: R >= max|x|)
        if top:
            self.at_top += top
            np.minimum(idx, self.bins - 1, out=idx)
        np.maximum(idx, 0, out=idx)
        return np.bincount(idx, minlength=self.bins)

    # -------------------------------------------------------------- views
    def edges(self) -> np.ndarray:
        return np.linspace(-self.half_range, self.half_range, self.bins + 1)

    def abs_hist(self) -> tuple[np.ndarray, float]:
        """Histogram of |x| over [0, R] (bins/2 bins) and its bin width."""
        half = self.bins // 2
        neg, pos = self.hist[:half], self.hist[half:]
        return pos + neg[::-1], self.half_range / half

    def as_dict(self) -> dict:
        return {"min": self.min, "max": self.max, "count": self.count}


def _pow2_at_least(v: float) -> float:
    if not v > 0 or not math.isfinite(v):
        return 2.0 ** -20
    e = math.ceil(math.log2(v))
    r = 2.0 ** e
    if r < v:  # float rounding
        r *= 2
    return max(r, 2.0 ** -20)


def _halve(h: np.ndarray, at_top: int = 0) -> np.ndarray:
    """Double the bin width of a [-R, R] histogram to cover [-2R, 2R] (same number of bins).
    The ``at_top`` values equal to R, counted in the last bin, go to the bin starting at R."""
    n = h.size
    merged = h.reshape(-1, 2).sum(axis=1)  # n/2 bins over [-R, R] at width 2w
    out = np.zeros_like(h)
    out[n // 4: n // 4 + n // 2] = merged
    if at_top:
        out[3 * n // 4 - 1] -= at_top
        out[3 * n // 4] += at_top
    return out


# ======================================================================= ranges
def compute_range(stats: TensorStats, method: str = "minmax", *, symmetric: bool = False,
                  percentile: float = 99.99) -> tuple[float, float]:
    """The float range ``(lo, hi)`` to quantize a tensor to, from its statistics.

    ``lo <= 0 <= hi`` always (zero must be exactly representable). Symmetric ranges are
    ``(-t, t)``.
    """
    if method not in METHODS:
        raise UserError(f"unknown calibration method '{method}' (known: {', '.join(METHODS)})")
    if stats.count == 0:
        return 0.0, 0.0
    mn, mx = min(stats.min, 0.0), max(stats.max, 0.0)
    amax = max(-mn, mx)
    if method == "minmax":
        return (-amax, amax) if symmetric else (mn, mx)
    if not stats.histogram:
        raise ValueError(f"calibration method '{method}' needs histograms (collect(histograms=True))")
    if method == "percentile":
        if not 0 < percentile <= 100:
            raise UserError(f"percentile must be in (0, 100], got {percentile}")
        if symmetric:
            ah, w = stats.abs_hist()
            t = _quantile_from_hist(ah, 0.0, w, percentile / 100.0)
            t = min(t, amax)
            return -t, t
        edges_lo, w = -stats.half_range, 2 * stats.half_range / stats.bins
        hi = min(_quantile_from_hist(stats.hist, edges_lo, w, percentile / 100.0), mx)
        lo = max(_quantile_from_hist(stats.hist, edges_lo, w, 1.0 - percentile / 100.0), mn)
        return min(lo, 0.0), max(hi, 0.0)
    if method == "entropy":
        ah, w = stats.abs_hist()
        nonneg = stats.min >= 0
        if nonneg:
            # a ReLU output's spike of exact zeros (zero is exactly representable at any clip)
            # would dominate the KL and pull the clip far too low: leave the zero bin out
            ah = ah.copy()
            ah[0] = 0
        t = _entropy_threshold(ah, w, levels=256 if nonneg and not symmetric else 128)
        t = min(t, amax)
        return (-t, t) if symmetric else (max(mn, -t), min(mx, t))
    # mse
    return _mse_range(stats, mn, mx, symmetric)


def _quantile_from_hist(h: np.ndarray, lo_edge: float, w: float, q: float) -> float:
    total = h.sum()
    if total == 0:
        return 0.0
    cdf = np.cumsum(h)
    target = q * total
    i = int(np.searchsorted(cdf, target, side="left"))
    i = min(i, h.size - 1)
    before = cdf[i - 1] if i > 0 else 0
    frac = (target - before) / h[i] if h[i] else 0.0
    return float(lo_edge + (i + min(max(frac, 0.0), 1.0)) * w)


def _entropy_threshold(h: np.ndarray, w: float, levels: int = 128) -> float:
    """TensorRT-style KL calibration on an |x| histogram; returns the clip threshold."""
    nz = np.nonzero(h)[0]
    if nz.size == 0:
        return 0.0
    last = int(nz[-1]) + 1  # bins actually used
    if last <= levels:
        return last * w
    h = h[:last].astype(np.float64)
    # candidates: every bin count from `levels` to `last` (strided to <= 512 candidates)
    step = max(1, (last - levels) // 512)
    best_i, best_kl = last, math.inf
    for i in range(levels, last + 1, step):
        p = h[:i].copy()
        p[i - 1] += h[i:].sum()
        # quantize h[:i] into `levels` groups, spread each group's mass over its non-empty bins
        ref = h[:i]
        groups = np.minimum((np.arange(i) * levels) // i, levels - 1)
        gsum = np.bincount(groups, weights=ref, minlength=levels)
        gnz = np.bincount(groups, weights=(ref > 0).astype(np.float64), minlength=levels)
        qv = np.where(ref > 0, gsum[groups] / np.maximum(gnz[groups], 1), 0.0)
        ps, qs = p.sum(), qv.sum()
        if qs == 0:
            continue
        pn, qn = p / ps, qv / qs
        mask = pn > 0
        # a reference bin with mass but no quantized mass: smooth (TensorRT adds eps)
        qn_m = np.where(qn[mask] > 0, qn[mask], 1e-10)
        kl = float(np.sum(pn[mask] * np.log(pn[mask] / qn_m)))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return (best_i + 0.5) * w if best_i < last else last * w


def _mse_range(stats: TensorStats, mn: float, mx: float, symmetric: bool) -> tuple[float, float]:
    """The clip minimising the expected quantize-dequantize squared error over the histogram.

    Symmetric: ``t`` searched on a grid of fractions of max|x|. Asymmetric: ``lo`` and ``hi``
    searched separately (coordinate descent, three rounds), so a one-sided outlier tail is
    clipped without shrinking the other side.
    """
    if mx - mn <= 0:
        return mn, mx
    edges = stats.edges()
    centers = (edges[:-1] + edges[1:]) / 2
    weights = stats.hist.astype(np.float64)
    keep = weights > 0
    centers, weights = centers[keep], weights[keep]
    # the exact extremes sit in the outermost bins: use them as those bins' representatives
    centers = np.clip(centers, stats.min, stats.max)
    w = 2 * stats.half_range / stats.bins
    alphas = np.linspace(0.01, 1.0, MSE_GRID)
    if symmetric:
        t = max(-mn, mx) * alphas
        best = _grid_argmin(lambda i: _qdq_errors(centers, weights, -t[i], t[i], w, symmetric=True))
        return float(-t[best]), float(t[best])
    lo, hi = mn, mx
    for _ in range(3):
        if mx > 0:
            his = mx * alphas
            hi = float(his[_grid_argmin(lambda i: _qdq_errors(centers, weights, np.full(i.size, lo), his[i], w))])
        if mn < 0:
            los = mn * alphas
            lo = float(los[_grid_argmin(lambda i: _qdq_errors(centers, weights, los[i], np.full(i.size, hi), w))])
    return lo, hi


MSE_GRID = 200  # clip candidates: fractions 0.01..1 of the observed extreme
MSE_COARSE = 8  # the grid is searched every 8th candidate first, then around the best of those


def _grid_argmin(errors: Callable[[np.ndarray], np.ndarray]) -> int:
    """The index of the smallest of ``MSE_GRID`` candidates' errors (``errors(indices)``),
    coarse to fine: every ``MSE_COARSE``-th candidate, then every candidate within one coarse
    step of the best two (a second valley is kept). Ties go to the lowest index."""
    coarse = np.arange(0, MSE_GRID, MSE_COARSE)
    if coarse[-1] != MSE_GRID - 1:
        coarse = np.append(coarse, MSE_GRID - 1)
    e = errors(coarse)
    near = set()
    for j in np.argsort(e, kind="stable")[:2]:
        c = int(coarse[j])
        near.update(range(max(0, c - MSE_COARSE + 1), min(MSE_GRID, c + MSE_COARSE)))
    fine = np.array(sorted(near.difference(coarse.tolist())), dtype=np.int64)
    idx = np.concatenate([coarse, fine])
    err = np.concatenate([e, errors(fine)]) if fine.size else e
    order = np.lexsort((idx, err))  # smallest error, then lowest index
    return int(idx[order[0]])


def _qdq_errors(c: np.ndarray, weights: np.ndarray, lo: np.ndarray, hi: np.ndarray, w: float,
                symmetric: bool = False) -> np.ndarray:
    """Total squared quantize-dequantize error of histogram mass ``weights`` at ``c`` for each
    candidate range ``(lo[i], hi[i])``."""
    if symmetric:
        scale = hi / 127.0
        qmin, qmax = -127.0, 127.0
        zp = np.zeros_like(hi)
    else:
        scale = np.maximum(hi - lo, 1e-12) / 255.0
        qmin, qmax = 0.0, 255.0
        zp = np.round(-lo / scale)
    out = np.empty(len(hi))
    cc = c[None, :]
    step = max(1, 250_000 // max(c.size, 1))  # bound the temporaries (~2 MB each)
    for a in range(0, len(hi), step):
        sl = slice(a, a + step)
        s_, z_ = scale[sl, None], zp[sl, None]
        q = np.clip(np.round(cc / s_) + z_, qmin, qmax)
        sq = (cc - (q - z_) * s_) ** 2
        # Inside the range, rounding error is measured at bin centres when bins are fine
        # compared with the quantization step; when they are not, the uniform-noise model
        # step^2/12 is used.
        inside = (cc >= lo[sl, None]) & (cc <= hi[sl, None])
        coarse = s_ < 4 * w
        sq = np.where(inside & coarse, s_ ** 2 / 12.0, sq)
        out[sl] = (sq * weights[None, :]).sum(axis=1)
    return out


# ======================================================================= engine
def tensor_classes(model: onnx.ModelProto) -> dict[str, str]:
    """Every named tensor's class: ``input``, ``bounded`` or ``unbounded`` (see the module doc)."""
    out = {o: ("bounded" if n.op_type in BOUNDED_OPS else "unbounded") for n in model.graph.node for o in n.output}
    out.update({i.name: "input" for i in model.graph.input})
    return out


def tensor_class(model: onnx.ModelProto, name: str) -> str:
    """``input``, ``bounded`` or ``unbounded`` (see the module doc)."""
    return tensor_classes(model).get(name, "unbounded")


def method_for(method: str | dict, cls: str) -> str:
    if isinstance(method, str):
        return method
    unknown = [k for k in method if k not in TENSOR_CLASSES + ("default",)]
    if unknown:
        raise UserError(f"unknown tensor class '{unknown[0]}' in calibration methods "
                        f"(known: default, {', '.join(TENSOR_CLASSES)})")
    return method.get(cls, method.get("default", "minmax"))


class Progress:
    """A one-line stderr progress meter (``progress=True``) or a user callback."""

    def __init__(self, progress, label: str = "calibrating"):
        self.callback = progress if callable(progress) else None
        self.enabled = bool(progress)
        self.label = label
        self.t0 = time.perf_counter()

    def __call__(self, done: int, total: int | None) -> None:
        if not self.enabled:
            return
        if self.callback is not None:
            self.callback(done, total)
            return
        elapsed = time.perf_counter() - self.t0
        of = f"/{total}" if total else ""
        sys.stderr.write(f"\r{self.label}: {done}{of} samples, {elapsed:.1f}s")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.callback is None:
            sys.stderr.write("\n")
            sys.stderr.flush()


def collect(model: onnx.ModelProto, tensors: Iterable[str], batches: Iterable[dict], *,
            bins: int = DEFAULT_BINS, progress=False, total: int | None = None,
            on_batch: Callable[[int, dict], None] | None = None, histograms: bool = True,
            capture: Iterable[str] = (), capture_at: Iterable[int] = (),
            per_channel: dict[str, int] | None = None) -> dict[str, TensorStats]:
    """Run ``model`` on every batch and return :class:`TensorStats` for each of ``tensors``.

    Each tensor's min, max and size are computed by the executor itself (ReduceMin, ReduceMax
    and Size nodes added to the model: exact, and only scalars come back); the values travel
    back only for histograms (``histograms=False`` keeps min/max/count, all minmax needs) or
    when a batch's min or max is not finite (statistics then cover the finite values).
    ``on_batch(index, outputs)`` (optional) sees the graph outputs of every batch (of the batches
    at the indices ``capture_at`` at least, when sharded) and, for those, the values of
    ``capture`` too, before they are dropped.
    ``per_channel`` (tensor -> rank) adds per-channel min and max (axis 1) for those tensors.
    """
    tensors = list(dict.fromkeys(tensors))
    capture_at = frozenset(int(i) for i in capture_at)
    per_channel = {t: r for t, r in (per_channel or {}).items() if t in tensors and r >= 2}
    stats_model = with_statistics(model, tensors, raw=histograms, per_channel=per_channel)
    graph_outputs = output_names(model)
    reduced = [f"{STAT}{k}.{t}" for t in tensors for k in ("min", "max", "n")] + [
        f"{STAT}{k}.{t}" for t in per_channel for k in ("cmin", "cmax")]
    base = list(dict.fromkeys(graph_outputs + reduced + (tensors if histograms else [])))
    extra = [c for c in dict.fromkeys(capture) if c not in base]

    ex = executor.current()
    if ex.distributed:
        spec = {"model": stats_model.SerializeToString(), "tensors": tensors, "base": base, "extra": extra,
                "capture_at": sorted(capture_at), "bins": bins, "histograms": histograms}
        return _collect_sharded(ex, spec, batches, progress=progress, total=total, on_batch=on_batch)
    sess = reference_session(stats_model)

    def one(i: int, batch: dict) -> dict:
        return _run_one(sess, tensors, base + extra if i in capture_at else base, batch)

    return accumulate(map_batches(one, batches), tensors, bins=bins, progress=progress, total=total,
                      on_batch=on_batch, histograms=histograms)


def _run_one(sess, tensors: list[str], names: list[str], batch: dict) -> dict:
    """One batch through the statistics model: ``names``' values (the raw values of a tensor
    too when its min or max is not finite)."""
    outs = dict(zip(names, sess.run(names, batch)))
    bad = [t for t in tensors if t not in outs and not (
        math.isfinite(float(outs[f"{STAT}min.{t}"])) and math.isfinite(float(outs[f"{STAT}max.{t}"])))]
    if bad:  # inf/NaN in some activations: their values, to take statistics of the finite ones
        outs.update(zip(bad, sess.run(bad, batch)))
    return outs


SHARDS_PER_WORKER = 4  # shards of the calibration set per worker (load balance against task overhead)
MAX_SHARD_BATCHES = 16


def _collect_sharded(ex, spec: dict, batches: Iterable[dict], *, progress, total, on_batch) -> dict[str, TensorStats]:
    """:func:`collect` on ``ex`` (:mod:`edgec.executor`): shards of consecutive batches, each a
    task returning its statistics (and the graph outputs and captured values of the batches
    ``on_batch`` sees); merged in shard order. The statistics do not depend on the split (see
    the module doc), so the result is the in-process one, bit for bit. The batches are read and
    checked here, in order, as in-process."""
    tensors, bins, histograms = spec["tensors"], spec["bins"], spec["histograms"]
    size = getattr(batches, "batch_size", None)
    per_shard = MAX_SHARD_BATCHES
    if total and size:
        n_batches = -(-total // size)
        per_shard = max(1, min(MAX_SHARD_BATCHES, -(-n_batches // (SHARDS_PER_WORKER * ex.workers))))

    def shards():
        it, start = iter(batches), 0
        while True:
            chunk = list(itertools.islice(it, per_shard))
            if not chunk:
                return
            yield start, chunk
            start += len(chunk)

    stats = {t: TensorStats(bins=bins, histogram=histograms) for t in tensors}
    meter = Progress(progress)
    done = 0
    try:
        for shard, captured, samples in ex.map(shard_statistics, shards(), shared=spec):
            for t in tensors:
                stats[t].merge(shard[t])
            if on_batch is not None:
                for i, outs in captured:
                    on_batch(i, outs)
            done += samples
            meter(done, total)
    finally:
        meter.close()
    if done == 0:
        raise UserError("the calibration set is empty")
    return stats


def shard_statistics(item: tuple[int, list[dict]], shared) -> tuple[dict[str, TensorStats], list, int]:
    """One calibration shard (a task of :func:`_collect_sharded`): ``item`` is the index of its
    first batch and its batches; returns its statistics, ``(index, outputs)`` of the batches at
    the indices ``capture_at``, and its sample count."""
    start, batches = item
    spec, token = executor.shared_value(shared), executor.shared_token(shared)
    sess = (executor.cached(token, "calibration", lambda: reference_session(spec["model"])) if token
            else reference_session(spec["model"]))
    tensors, cap = spec["tensors"], frozenset(spec["capture_at"])
    stats = {t: TensorStats(bins=spec["bins"], histogram=spec["histograms"]) for t in tensors}
    captured, samples = [], 0
    for j, batch in enumerate(batches):
        i = start + j
        outs = _run_one(sess, tensors, spec["base"] + spec["extra"] if i in cap else spec["base"], batch)
        add_outputs(stats, tensors, outs)
        if i in cap:
            captured.append((i, outs))
        samples += len(next(iter(batch.values()))) if batch else 0
    return stats, captured, samples


STAT = "edgec.stat."


def with_statistics(model: onnx.ModelProto, tensors: list[str], *, raw: bool,
                    per_channel: dict[str, int] | None = None) -> onnx.ModelProto:
    """``model`` with, for each of ``tensors``, its min, max and size as extra (scalar)
    outputs (per channel too for ``per_channel``: tensor -> rank), and every tensor itself as
    an output (fetched only when asked for: with ``raw``, or for a non-finite batch)."""
    m = augment(model, tensors)
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 17)
    nodes = []
    for t in tensors:
        nodes.append(helper.make_node("ReduceMin", [t], [f"{STAT}min.{t}"], keepdims=0))
        nodes.append(helper.make_node("ReduceMax", [t], [f"{STAT}max.{t}"], keepdims=0))
        nodes.append(helper.make_node("Size", [t], [f"{STAT}n.{t}"]))
    for t, rank in (per_channel or {}).items():
        axes = [a for a in range(rank) if a != 1]
        for op, k in (("ReduceMin", "cmin"), ("ReduceMax", "cmax")):
            if opset >= 18:
                m.graph.initializer.append(helper.make_tensor(f"{STAT}axes.{k}.{t}", onnx.TensorProto.INT64,
                                                              [len(axes)], axes))
                nodes.append(helper.make_node(op, [t, f"{STAT}axes.{k}.{t}"], [f"{STAT}{k}.{t}"], keepdims=0))
            else:
                nodes.append(helper.make_node(op, [t], [f"{STAT}{k}.{t}"], axes=axes, keepdims=0))
    m.graph.node.extend(nodes)
    m.graph.output.extend(helper.make_empty_tensor_value_info(n.output[0]) for n in nodes)
    return m


def accumulate(runs: Iterable[tuple[dict, dict]], tensors: list[str], *, bins: int = DEFAULT_BINS, progress=False,
               total: int | None = None, on_batch: Callable[[int, dict], None] | None = None,
               histograms: bool = True) -> dict[str, TensorStats]:
    """:class:`TensorStats` of ``tensors`` over ``runs``: ``(batch, outputs)`` pairs from any
    executor (the calibration session, or the quantization probe with equalised weights)."""
    stats = {t: TensorStats(bins=bins, histogram=histograms) for t in tensors}
    meter = Progress(progress)
    done = 0
    try:
        for i, (batch, outs) in enumerate(runs):
            add_outputs(stats, tensors, outs)
            if on_batch is not None:
                on_batch(i, outs)
            del outs
            done += len(next(iter(batch.values()))) if batch else 0
            meter(done, total)
    finally:
        meter.close()
    if done == 0:
        raise UserError("the calibration set is empty")
    return stats


def add_outputs(stats: dict[str, TensorStats], tensors: list[str], outs: dict) -> None:
    """Add one batch's outputs of the statistics model to ``stats``."""
    for t in tensors:
        v = outs.get(t)
        lo, hi = outs.get(f"{STAT}min.{t}"), outs.get(f"{STAT}max.{t}")
        if f"{STAT}cmin.{t}" in outs:
            stats[t].update_channels(outs[f"{STAT}cmin.{t}"], outs[f"{STAT}cmax.{t}"])
        if v is None:  # min-max only, computed by the executor (finite: checked there)
            stats[t].update_range(float(lo), float(hi), int(outs[f"{STAT}n.{t}"]))
        elif v.dtype.kind == "f":
            stats[t].update(v, None if lo is None else float(lo), None if hi is None else float(hi))


def calibrate(model: onnx.ModelProto, tensors: Iterable[str], batches: Iterable[dict], *,
              method: str | dict = "minmax", percentile: float = 99.99, symmetric: bool = False,
              bins: int = DEFAULT_BINS, progress=False, total: int | None = None
              ) -> tuple[dict[str, tuple[float, float]], dict[str, TensorStats]]:
    """Collect statistics and turn them into ranges: ``(ranges, stats)``."""
    tensors = list(tensors)
    stats = collect(model, tensors, batches, bins=bins, progress=progress, total=total,
                    histograms=needs_histograms(method))
    return ranges_from_stats(model, stats, method=method, percentile=percentile, symmetric=symmetric), stats


def parse_method(text: str) -> str | dict:
    """A CLI value: ``mse``, ``auto`` (the method whose int8 plan measures the lowest output
    error) or ``default=minmax,unbounded=percentile`` (classes: default, input, bounded,
    unbounded)."""
    text = str(text).strip()
    if text == "auto":  # every method measured on the int8 output (edgec.quantize_api)
        return text
    if "=" not in text:
        if text not in METHODS:
            raise UserError(f"unknown calibration method '{text}' (known: auto, {', '.join(METHODS)})")
        return text
    out = {}
    for part in text.split(","):
        if not part.strip():
            continue
        k, _, v = part.partition("=")
        k, v = k.strip(), v.strip()
        if k not in TENSOR_CLASSES + ("default",):
            raise UserError(f"unknown tensor class '{k}' in '{text}' (known: default, {', '.join(TENSOR_CLASSES)})")
        if v not in METHODS:
            raise UserError(f"unknown calibration method '{v}' (known: {', '.join(METHODS)})")
        out[k] = v
    return out


def needs_histograms(method: str | dict) -> bool:
    methods = {method} if isinstance(method, str) else set(method.values())
    return methods != {"minmax"}


def ranges_from_stats(model: onnx.ModelProto, stats: dict[str, TensorStats], *, method: str | dict = "minmax",
                      percentile: float = 99.99, symmetric: bool = False,
                      saturation: bool = True, bounds: dict | None = None) -> dict[str, tuple[float, float]]:
    """Each tensor's range by its class's method. ``saturation``: a tensor's statistics are
    first clamped to the interval its readers tell apart (:mod:`edgec.analysis.saturation`: the
    -3 below which a hard-swish gives 0, a Clip's bounds), which changes no output of the float
    model and leaves every level of the range to the values that matter; ``bounds``: those
    intervals, when the caller has them already (``saturation_bounds(model)``)."""
    classes = tensor_classes(model)
    bounds = (bounds if bounds is not None else saturation_bounds(model)) if saturation else {}
    todo = [(name, st.clamped(*bounds[name]) if name in bounds else st, method_for(method, classes.get(name, "unbounded")))
            for name, st in stats.items()]

    def one(_, item):
        name, st, m = item
        return name, compute_range(st, m, symmetric=symmetric, percentile=percentile)

    if all(m == "minmax" for _, _, m in todo):
        return dict(one(0, item) for item in todo)
    # each tensor's search is independent (numpy releases the GIL in its array arithmetic), so
    # the executor's worker pool gives the same ranges, in the same order, as one by one
    return dict(r for _, r in map_batches(one, todo))
