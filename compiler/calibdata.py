"""Calibration data: where the samples come from, and batches of them.

Sources (:func:`load_calibration`):
- an ``.npz`` file keyed by input name (a one-input model may use any single key), each array
  holding samples along axis 0;
- an ``.npy`` file (one-input models);
- a directory of ``.npy``/``.npz`` files, read one file at a time in sorted name order. A file
  whose array has the model input's rank holds a batch; one with one dimension less holds one
  sample (a batch axis is added);
- an image folder (``.ppm``/``.pgm`` decoded here, ``.npy`` HxW or HxWxC arrays, and
  ``.png``/``.jpg``/``.jpeg``/``.bmp`` through Pillow when it is installed: without Pillow
  those raise a UserError) with a :class:`Preprocess` spec (resize nearest/bilinear in numpy,
  NCHW/NHWC layout, RGB/BGR order, scale then mean/std). A folder is an image folder when it
  holds image files, or ``.npy`` files while ``preprocess`` is given;
- ``"random"``: N(0,1) samples from the input signature, only when asked for by that exact name
  (the caller warns: ranges from random data are rarely right).

Batches are ``dict[input name, np.ndarray]`` checked with :func:`edgec.verify.check_feeds`
(a wrong shape or dtype, NaN or infinite values are a UserError naming the input). Models with a
fixed batch dimension get batches of exactly that size. Data is streamed: a
:class:`CalibrationSet` can be iterated several times and holds one chunk of rows per input
at a time; ``.npy``/``.npz`` files are opened by their headers and read only as far as the
samples used (:mod:`edgec.datafiles`: truncated, pickled or absurdly large arrays are refused).
A set whose float inputs are constant over a whole pass (all zeros, say) is refused when the
pass ends: ranges and statistics measured on it would be meaningless.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnx

from . import datafiles
from .errors import UserError
from .verify import InputSpec, check_feeds, input_specs, random_array

IMAGE_EXTS = {".ppm", ".pgm", ".png", ".jpg", ".jpeg", ".bmp"}
PILLOW_EXTS = {".png", ".jpg", ".jpeg", ".bmp"}
CHUNK_ROWS = 256  # samples read from a file at a time
MAX_IMAGE_PIXELS = 4096 * 4096  # one calibration image (decoded or resized) at most this many pixels
MAX_SAMPLE_BYTES = 256 << 20  # one generated (--calib random) sample at most this big


@dataclass
class Preprocess:
    """How an image becomes an input tensor.

    ``size`` (H, W) resizes with ``resize`` = ``nearest`` | ``bilinear`` (None: from the model's
    input shape when static, else the image's own size); pixels are divided by ``scale`` (255
    maps 8-bit images to [0, 1]), then ``(x - mean) / std`` per channel; ``channels`` = ``RGB`` |
    ``BGR`` | ``GRAY``; ``layout`` = ``NCHW`` | ``NHWC``.
    """

    size: tuple[int, int] | None = None
    resize: str = "bilinear"
    layout: str = "NCHW"
    channels: str = "RGB"
    scale: float = 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def __post_init__(self):

        if self.size is not None:
            try:
                h, w = (int(v) for v in self.size)
            except (TypeError, ValueError):
                raise UserError(f"bad image size {self.size!r} (expected (H, W), e.g. (224, 224))") from None
            if h <= 0 or w <= 0 or h * w > MAX_IMAGE_PIXELS:
                raise UserError(f"image size {h}x{w}: must be positive and at most {MAX_IMAGE_PIXELS} pixels")
            self.size = (h, w)
        for name, values, positive in (("--image-mean", self.mean, False), ("--image-std", self.std, True)):
            try:
                vals = tuple(float(v) for v in (values if hasattr(values, "__iter__") else (values,)))
            except (TypeError, ValueError):
                raise UserError(f"{name} {values!r}: expected numbers") from None
            if not vals or not all(math.isfinite(v) for v in vals) or (positive and not all(v > 0 for v in vals)):
                raise UserError(f"{name} {','.join(map(str, vals))}: must be finite"
                                + (" and positive" if positive else "") + " numbers")
            setattr(self, "mean" if name == "--image-mean" else "std", vals)
        try:
            scale = float(self.scale)
        except (TypeError, ValueError):
            raise UserError(f"--image-scale {self.scale!r}: expected a number") from None
        if not math.isfinite(scale) or scale <= 0:
            raise UserError(f"--image-scale {self.scale}: must be a finite positive number")
        if self.resize not in ("nearest", "bilinear"):
            raise UserError(f"unknown resize mode '{self.resize}' (nearest, bilinear)")
        if self.layout not in ("NCHW", "NHWC"):
            raise UserError(f"unknown layout '{self.layout}' (NCHW, NHWC)")
        if self.channels not in ("RGB", "BGR", "GRAY"):
            raise UserError(f"unknown channel order '{self.channels}' (RGB, BGR, GRAY)")


class CalibrationSet:
    """A re-iterable source of calibration batches for one model."""

    def __init__(self, specs: list[InputSpec], samples_fn, *, batch_size: int = 32,
                 max_samples: int | None = None, where: str = "calibration data", count: int | None = None,
                 check_constant: bool = False):
        self.specs = specs
        self.check_constant = check_constant  # refuse a set whose float inputs never vary
        self._samples_fn = samples_fn  # () -> iterator of dict[name, array with batch axis]
        self.max_samples = max_samples
        self.where = where
        self._count = count
        fixed = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0}
        self.batch_size = fixed.pop() if len(fixed) == 1 else max(1, int(batch_size))
        self.fixed_batch = bool(fixed) or any(
            s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0 for s in specs)

    @property
    def length_known(self) -> bool:
        """Whether the source's sample count is known before reading (a folder of array files'
        is not: ``num_samples`` is then ``max_samples``, an upper bound, or None)."""
        return self._count is not None

    @property
    def num_samples(self) -> int | None:
        """Number of samples a full iteration yields (None if unknown before reading)."""
        if self._count is None:
            return self.max_samples
        return min(self._count, self.max_samples) if self.max_samples else self._count

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        pending: dict[str, list[np.ndarray]] = {s.name: [] for s in self.specs}
        pending_n = 0
        yielded = 0
        limit = self.max_samples
        self._ranges: dict[str, list[float]] = {}
        for chunk in self._samples_fn():
            n = {len(v) for v in chunk.values()}
            if len(n) != 1:
                raise _different_counts(self.where, {k: len(v) for k, v in chunk.items()})
            k = n.pop()
            if limit is not None:
                k = min(k, limit - yielded - pending_n)
                if k <= 0:
                    break
                chunk = {name: v[:k] for name, v in chunk.items()}
            for name, v in chunk.items():
                pending[name].append(v)
            pending_n += k
            while pending_n >= self.batch_size:
                batch, pending, pending_n = _take(pending, pending_n, self.batch_size)
                yield self._check(batch)
                yielded += self.batch_size
            if limit is not None and yielded + pending_n >= limit:
                break
        if pending_n:
            if self.fixed_batch:
                # a fixed-batch model cannot take a short batch: pad by repeating (statistics
                # are barely affected; min/max/histograms see repeated samples only)
                batch, _, _ = _take(pending, pending_n, pending_n)
                reps = -(-self.batch_size // pending_n)
                batch = {k: np.concatenate([v] * reps)[: self.batch_size] for k, v in batch.items()}
                yield self._check(batch)
            else:
                batch, _, _ = _take(pending, pending_n, pending_n)
                yield self._check(batch)
        if self.check_constant:
            self._refuse_constant(yielded + pending_n)

    def _check(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = check_feeds(batch, self.specs, self.where)  # shapes, dtypes, NaN/Inf
        for name, arr in batch.items():
            if arr.dtype.kind == "f" and arr.size:
                lo, hi = float(arr.min()), float(arr.max())
                seen = self._ranges.setdefault(name, [lo, hi])
                seen[0], seen[1] = min(seen[0], lo), max(seen[1], hi)
        return batch

    def _refuse_constant(self, samples: int) -> None:
        ranges = getattr(self, "_ranges", {})
        if ranges and all(lo == hi for lo, hi in ranges.values()):
            name, (lo, _) = next(iter(ranges.items()))
            raise UserError(f"{self.where}: the calibration data is constant (input '{name}' is {lo:g} in all "
                            f"{samples} samples): ranges and statistics measured on it would be meaningless; "
                            f"give real samples")

    def first(self) -> dict[str, np.ndarray]:
        for b in self:
            return b
        raise UserError(f"{self.where}: no samples")

    def take(self, n: int) -> "CalibrationSet":
        """The same source limited to ``n`` samples."""
        lim = n if self.max_samples is None else min(n, self.max_samples)
        return CalibrationSet(self.specs, self._samples_fn, batch_size=self.batch_size,
                              max_samples=lim, where=self.where, count=self._count, check_constant=False)


def count_samples(batches) -> int:
    """Samples in calibration ``batches``: a :class:`CalibrationSet`'s count when it knows it,
    else the sum of the batches' sizes (each batch's first input)."""
    n = getattr(batches, "num_samples", None)
    if n is not None:
        return int(n)
    return int(sum(len(next(iter(b.values()))) for b in batches if b))


def seeded_positions(total: int, count: int) -> np.ndarray:
    """``count`` of ``total`` positions (all when ``count >= total``), drawn with a fixed seed,
    sorted: a subset of calibration samples or batches that is neither the first ones (a folder
    read in order is often grouped by class or source) nor every k-th (a set interleaved with a
    period aliases with the stride), and the same on every run."""
    if count >= total:
        return np.arange(total)
    return np.sort(seeded_order(total)[:max(count, 0)])


def seeded_order(total: int) -> np.ndarray:
    """The positions ``0..total-1`` in one fixed-seed order: its prefixes are
    :func:`seeded_positions`' draws, so a smaller draw is part of every larger one."""
    return np.random.default_rng(0).permutation(total)


MAX_KEPT_BYTES = 1 << 30  # a spread subset's input batches kept in memory up to this size (else re-read per use)


@dataclass
class Subset:
    """Whole batches of the calibration stream, up to a number of samples, iterated again for
    measuring runs. When the stream holds more, they are drawn at seeded positions spread over it
    (:func:`spread`), not the first ones: a folder read in order is often grouped by class or
    source, and a prefix would measure one of them. The subsets of one compile nest (each a prefix
    of one seeded order of the batches), so calibration captures the float outputs of the largest
    and every smaller one is part of it."""

    batches: Iterable[dict]
    positions: tuple[int, ...]  # the batches' indices in the stream, ascending
    samples: int

    @property
    def count(self) -> int:
        return len(self.positions)

    def pick(self, parts: list, within: "Subset") -> list:
        """This subset's entries of ``parts`` (one per batch of ``within``, which holds this one)."""
        mine = set(self.positions)
        return [p for p, i in zip(parts, within.positions) if i in mine]


def spread(sizes: list[int], n: int) -> tuple[int, ...]:
    """Batch indices, ascending: batches taken in a seeded order (:func:`seeded_order`, the
    full-size batches first) while their samples stay within ``n`` (one at least).
    All of them when they fit: the order of a set measured whole does not matter."""
    if sum(sizes) <= n:
        return tuple(range(len(sizes)))
    chosen, seen = [], 0
    # full batches first (a short last batch drawn first would leave no room for the others)
    full = max(sizes)
    for i in sorted(seeded_order(len(sizes)), key=lambda i: sizes[i] < full):
        if chosen and seen + sizes[i] > n:
            break
        chosen.append(int(i))
        seen += sizes[i]
    return tuple(sorted(chosen))


class _Selected:
    """The batches of a calibration set at ``positions``, read by streaming the set up to the
    last of them; kept in memory after the first whole read when they fit ``MAX_KEPT_BYTES``."""

    def __init__(self, calib: CalibrationSet, positions: tuple[int, ...], samples: int):
        self.calib, self.positions, self.num_samples = calib, positions, samples
        self.kept: list[dict] | None = None

    def __iter__(self):
        if self.kept is not None:
            yield from self.kept
            return
        want, last = set(self.positions), self.positions[-1]
        got: list[dict] | None = []
        size = 0
        for i, b in enumerate(self.calib):
            if i in want:
                size += sum(v.nbytes for v in b.values())
                if got is not None and size <= MAX_KEPT_BYTES:
                    got.append(b)
                else:
                    got = None
                yield b
            if i >= last:
                break
        if got is not None and len(got) == len(self.positions):
            self.kept = got


def subset(calib, n: int) -> Subset:
    """Up to ``n`` samples of ``calib`` (a :class:`CalibrationSet` or a list of batches) in whole
    batches, spread over the set (:class:`Subset`). A set whose length is unknown before
    reading (a folder of array files) gives its first batches (as many as it has: the positions
    past its end are not read, and :class:`Subset` users skip them)."""
    if isinstance(calib, CalibrationSet):
        total, bs = calib.num_samples, calib.batch_size
        if total is None or not calib.length_known:  # (positions past its end may not exist)
            m = max(bs, n - n % bs)
            return Subset(calib.take(m), tuple(range(-(-m // bs))), m)
        k = -(-total // bs)
        sizes = [bs] * (k - 1) + [total - bs * (k - 1)]
        positions = spread(sizes, n)
        samples = sum(sizes[i] for i in positions)
        if positions == tuple(range(len(positions))):  # the first batches (the whole set, say)
            return Subset(calib.take(samples), positions, samples)
        return Subset(_Selected(calib, positions, samples), positions, samples)
    batches = calib if isinstance(calib, (list, tuple)) else list(calib)
    sizes = [len(next(iter(b.values()))) if b else 0 for b in batches]
    positions = spread(sizes, n)
    return Subset([batches[i] for i in positions], positions, sum(sizes[i] for i in positions))


def _take(pending, n_pending, k):
    batch, rest = {}, {}
    for name, parts in pending.items():
        arr = np.concatenate(parts) if len(parts) > 1 else parts[0]
        batch[name] = arr[:k]
        rest[name] = [arr[k:]] if k < len(arr) else []
    return batch, rest, n_pending - k


def parse_size(text: str) -> tuple[int, int]:
    """``"224x224"`` or ``"224"`` -> (H, W) (for a CLI flag)."""
    parts = str(text).lower().replace(",", "x").split("x")
    try:
        vals = [int(p) for p in parts if p.strip()]
    except ValueError:
        vals = []
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or min(vals) <= 0:
        raise UserError(f"bad image size '{text}' (expected HxW, e.g. 224x224)")
    if vals[0] * vals[1] > MAX_IMAGE_PIXELS:
        raise UserError(f"image size {text}: at most {MAX_IMAGE_PIXELS} pixels")
    return vals[0], vals[1]


def parse_floats(text: str, flag: str = "") -> tuple[float, ...]:
    """``"0.485,0.456,0.406"`` -> floats (for --mean/--std style flags; ``flag`` names it in errors)."""

    try:
        vals = tuple(float(p) for p in str(text).split(",") if p.strip())
    except ValueError:
        vals = ()
    if not vals or not all(math.isfinite(v) for v in vals):
        raise UserError(f"{flag + ' ' if flag else ''}bad list of numbers '{text}' (expected finite numbers, "
                        f"e.g. 0.485,0.456,0.406)")
    return vals


# ====================================================================== sources
def load_calibration(source, model: onnx.ModelProto, *, max_samples: int | None = None,
                     batch_size: int = 32, preprocess: Preprocess | None = None,
                     seed: int = 0) -> CalibrationSet:
    """A :class:`CalibrationSet` for ``model`` from ``source`` (see the module doc).

    ``source`` is a path, ``"random"``, a dict of arrays keyed by input name, or a list of such
    dicts (batches).
    """
    specs = input_specs(model)
    if not specs:
        raise UserError("the model has no inputs to calibrate with")
    scalars = [s.name for s in specs if len(s.shape) == 0]
    if scalars:  # (calibration batches samples along a leading axis, which a rank-0 input has none of)
        raise UserError(f"input '{scalars[0]}' is a scalar (rank 0): edgec calibrates only inputs with a batch axis; "
                        f"give the model that input as a 1-D tensor, or compile it without calibration data")
    if max_samples is not None and max_samples <= 0:
        raise UserError(f"the number of calibration samples must be positive, got {max_samples}")
    if isinstance(source, dict):
        data = _rekey(dict(source), specs, "calibration data")
        n = _count(data, "calibration data")
        return CalibrationSet(specs, lambda: iter([data]), batch_size=batch_size, max_samples=max_samples,
                              where="calibration data", count=n)
    if isinstance(source, (list, tuple)):
        batches = [_rekey(dict(b), specs, "calibration data") for b in source]
        n = sum(_count(b, "calibration data") for b in batches)
        return CalibrationSet(specs, lambda: iter(batches), batch_size=batch_size, max_samples=max_samples,
                              where="calibration data", count=n)
    if isinstance(source, str) and source == "random":
        n = max_samples or 64
        for spec in specs:
            per_sample = math.prod(d if isinstance(d, int) and d > 0 else 1 for d in spec.shape[1:]) * spec.dtype.itemsize
            if per_sample > MAX_SAMPLE_BYTES:
                raise UserError(f"--calib random: one sample of input '{spec.name}' {_expected(spec)} would be "
                                f"{per_sample / 2**20:.0f} MB; give real data or a smaller --input-shape")
        return CalibrationSet(specs, lambda: _random_chunks(specs, n, seed, batch_size), batch_size=batch_size,
                              max_samples=n, where="random calibration data", count=n)
    if not isinstance(source, (str, os.PathLike)):
        raise UserError(f"calibration data: expected a path, 'random', a dict of arrays or a list of them, "
                        f"got {type(source).__name__}")
    p = Path(source)
    if not p.exists():
        raise UserError(f"{p}: no such calibration file or folder")
    where = str(p)
    chunk = min(CHUNK_ROWS, max_samples) if max_samples else CHUNK_ROWS
    if not p.is_dir():
        datafiles.check_regular(p, "calibration file")
        if p.suffix == ".npz":
            refs = _npz_refs(datafiles.open_npz(p, "calibration file"), specs, where)
            n = _ref_count(refs, specs, where)
            return CalibrationSet(specs, lambda: _ref_chunks(refs, specs, where, chunk), batch_size=batch_size,
                                  max_samples=max_samples, where=where, count=n)
        if p.suffix == ".npy":
            if len(specs) != 1:
                raise UserError(f"{p}: a .npy file feeds a one-input model; this model has {len(specs)} inputs "
                                f"({', '.join(s.name for s in specs)}): use an .npz keyed by input name")
            refs = {specs[0].name: datafiles.open_npy(p, "calibration file")}
            n = _ref_count(refs, specs, where)
            return CalibrationSet(specs, lambda: _ref_chunks(refs, specs, where, chunk), batch_size=batch_size,
                                  max_samples=max_samples, where=where, count=n)
        if p.suffix.lower() in IMAGE_EXTS:
            raise UserError(f"{p}: give the folder that holds the calibration images, not one image")
        raise UserError(f"{p}: calibration data must be an .npz/.npy file or a folder (got '{p.suffix}')")
    files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
    images = [f for f in files if f.suffix.lower() in IMAGE_EXTS]
    arrays = [f for f in files if f.suffix in (".npy", ".npz")]
    if images or (preprocess is not None and arrays):
        imgs = images + ([f for f in arrays if f.suffix == ".npy"] if preprocess is not None else [])
        imgs.sort()
        if len(specs) != 1:
            raise UserError(f"{p}: an image folder feeds a one-input model; this model has {len(specs)} inputs")
        if any(f.suffix.lower() in PILLOW_EXTS for f in imgs):
            _require_pillow(p)
        pre = preprocess or Preprocess()
        return CalibrationSet(specs, lambda: _image_chunks(imgs, specs[0], pre), batch_size=batch_size,
                              max_samples=max_samples, where=where, count=len(imgs))
    if not arrays:
        raise UserError(f"{p}: the folder holds no .npy/.npz files or images")
    return CalibrationSet(specs, lambda: _file_chunks(arrays, specs, chunk), batch_size=batch_size,
                          max_samples=max_samples, where=where, count=None)


def _rekey(data: dict, specs: list[InputSpec], where: str) -> dict:
    if len(specs) == 1 and specs[0].name not in data and len(data) == 1:
        data = {specs[0].name: next(iter(data.values()))}
    names = {s.name for s in specs}
    for k in data:
        if k not in names:
            raise UserError(f"{where}: '{k}' is not an input of the model (its inputs: {', '.join(sorted(names))})")
    missing = [s.name for s in specs if s.name not in data]
    if missing:
        raise UserError(f"{where}: missing input '{missing[0]}' (the model's inputs: {', '.join(sorted(names))})")
    return {s.name: _as_batch(np.asarray(data[s.name]), s, where) for s in specs}


def _different_counts(where: str, counts: dict[str, int]) -> UserError:
    """The error for inputs whose first axes disagree, naming each input's count: edgec reads
    samples along every input's first axis, which a recurrent state laid out [layers, batch,
    hidden] (silero-vad's) does not hold."""
    said = ", ".join(f"'{k}' {v}" for k, v in counts.items())
    return UserError(f"{where}: inputs have different sample counts along their first axis ({said}); edgec reads "
                     f"calibration samples along each input's first axis, so an input whose batch is on another "
                     f"axis (a recurrent state [layers, batch, hidden]) needs the model to take it batch-first")


def _count(data: dict, where: str) -> int:
    n = {len(v) for v in data.values()}
    if len(n) != 1:
        raise _different_counts(where, {k: len(v) for k, v in data.items()})
    return n.pop()


def _expected(spec: InputSpec) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in spec.shape) + "]"


def _as_batch(arr: np.ndarray, spec: InputSpec, where: str) -> np.ndarray:
    """``arr`` with a batch axis: samples of rank len(shape)-1 get one."""
    rank = len(spec.shape)
    if arr.ndim == rank - 1 and rank >= 1:
        arr = arr[None]
    if arr.ndim != rank:
        raise UserError(f"{where}: input '{spec.name}' has shape {list(arr.shape)}, the model expects {_expected(spec)}")
    return arr


def _npz_refs(refs: dict, specs, path) -> dict:
    """input name -> the archive's array for it."""
    files = list(refs)
    if len(specs) == 1 and specs[0].name not in files:
        if len(files) == 1:
            return {specs[0].name: refs[files[0]]}
        raise UserError(f"{path}: no array named '{specs[0].name}' (the model's input) and "
                        + (f"more than one array ({', '.join(files)}): name the array after the input" if files
                           else "no arrays at all"))
    names = {s.name for s in specs}
    unknown = [k for k in files if k not in names]
    if unknown:
        raise UserError(f"{path}: '{unknown[0]}' is not an input of the model (its inputs: {', '.join(sorted(names))})")
    missing = [s.name for s in specs if s.name not in files]
    if missing:
        raise UserError(f"{path}: missing input '{missing[0]}' (the model's inputs: {', '.join(sorted(names))})")
    return {s.name: refs[s.name] for s in specs}


def _ref_count(refs: dict, specs, where: str) -> int:
    """Samples per input from the arrays' headers (a sample without a batch axis counts 1)."""
    counts: dict[str, int] = {}
    for s in specs:
        ref = refs[s.name]
        rank = len(s.shape)
        if len(ref.shape) == rank - 1 and rank >= 1:
            counts[s.name] = 1
        elif len(ref.shape) == rank:
            counts[s.name] = len(ref)
        else:
            raise UserError(f"{ref.where}: input '{s.name}' has shape {list(ref.shape)}, the model expects {_expected(s)}")
    if len(set(counts.values())) != 1:
        raise _different_counts(where, counts)
    n = next(iter(counts.values()))
    if n == 0:
        raise UserError(f"{where}: the calibration data holds no samples")
    return n


def _ref_chunks(refs: dict, specs, where: str, chunk: int) -> Iterator[dict[str, np.ndarray]]:
    """Chunks of ``chunk`` samples from every input's array, read as they are used."""
    rank = {s.name: len(s.shape) for s in specs}
    if any(len(refs[s.name].shape) == rank[s.name] - 1 for s in specs):  # single samples, no batch axis
        yield {s.name: _as_batch(refs[s.name].read(), s, refs[s.name].where) for s in specs}
        return
    streams = {name: ref.rows(chunk) for name, ref in refs.items()}
    try:
        while True:
            out = {}
            for name, it in streams.items():
                arr = next(it, None)
                if arr is None:
                    return
                out[name] = arr
            yield out
    finally:
        for it in streams.values():
            it.close()


def _load_npy(path: Path) -> np.ndarray:
    ref = datafiles.open_npy(path, "calibration file")
    if ref.nbytes > datafiles.MAX_READ_BYTES:
        raise UserError(f"{path}: {ref.nbytes / 2**20:.0f} MB is too large for one calibration image or sample")
    return ref.read()


def _file_chunks(files: list[Path], specs, chunk: int = CHUNK_ROWS) -> Iterator[dict[str, np.ndarray]]:
    for f in files:
        if f.suffix == ".npz":
            refs = _npz_refs(datafiles.open_npz(f, "calibration file"), specs, str(f))
        else:
            if len(specs) != 1:
                raise UserError(f"{f}: a .npy file feeds a one-input model; this model has {len(specs)} "
                                f"inputs: use .npz files keyed by input name")
            refs = {specs[0].name: datafiles.open_npy(f, "calibration file")}
        _ref_count(refs, specs, str(f))
        yield from _ref_chunks(refs, specs, str(f), chunk)


def _random_chunks(specs, n: int, seed: int, batch: int = 32) -> Iterator[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    for start in range(0, n, batch):  # one batch at a time: memory does not grow with n
        k = min(batch, n - start)
        chunk = {}
        for s in specs:
            shape = [k] + [d if isinstance(d, int) and d > 0 else 1 for d in s.shape[1:]]
            chunk[s.name] = random_array(rng, shape, s.dtype)
        yield chunk


# ====================================================================== images
def _require_pillow(where) -> None:
    try:
        import PIL.Image  # noqa: F401
    except ImportError:
        raise UserError(f"{where}: PNG/JPEG/BMP images need Pillow (pip install pillow), which is not "
                        f"installed; convert them to .ppm/.pgm or .npy arrays, or use an .npz") from None


def read_pnm(path: str | os.PathLike) -> np.ndarray:
    """Decode a binary (P5/P6) or ASCII (P2/P3) PGM/PPM: HxW (gray) or HxWx3 uint8/uint16."""
    p = datafiles.check_regular(Path(path), "image")
    if p.stat().st_size > datafiles.MAX_READ_BYTES:
        raise UserError(f"{path}: the image file is over {datafiles.MAX_READ_BYTES >> 20} MB")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})") from None
    if data[:2] not in (b"P2", b"P3", b"P5", b"P6"):
        raise UserError(f"{path}: not a PPM/PGM image (magic {data[:2]!r})")
    tokens: list[bytes] = []
    pos = 0
    while len(tokens) < 4:
        while pos < len(data) and data[pos:pos + 1].isspace():
            pos += 1
        if pos < len(data) and data[pos:pos + 1] == b"#":
            while pos < len(data) and data[pos:pos + 1] not in (b"\n", b"\r"):
                pos += 1
            continue
        start = pos
        while pos < len(data) and not data[pos:pos + 1].isspace():
            pos += 1
        if start == pos:
            raise UserError(f"{path}: truncated PPM/PGM header")
        tokens.append(data[start:pos])
    magic = tokens[0]
    if magic not in (b"P2", b"P3", b"P5", b"P6"):
        raise UserError(f"{path}: not a PPM/PGM image (magic {magic[:2]!r})")
    try:
        w, h, maxval = int(tokens[1]), int(tokens[2]), int(tokens[3])
    except ValueError:
        raise UserError(f"{path}: bad PPM/PGM header") from None
    if w <= 0 or h <= 0 or not 0 < maxval < 65536 or w * h > MAX_IMAGE_PIXELS:
        raise UserError(f"{path}: bad PPM/PGM header ({w}x{h}, maxval {maxval}): sizes must be positive, at most "
                        f"{MAX_IMAGE_PIXELS} pixels, and maxval 1..65535")
    ch = 3 if magic in (b"P3", b"P6") else 1
    dtype = np.uint8 if maxval < 256 else np.dtype(">u2")
    if magic in (b"P5", b"P6"):
        pos += 1  # one whitespace after maxval
        need = w * h * ch * np.dtype(dtype).itemsize
        raw = data[pos:pos + need]
        if len(raw) != need:
            raise UserError(f"{path}: truncated image data")
        arr = np.frombuffer(raw, dtype=dtype)
    else:
        arr = np.array(data[pos:].split()[: w * h * ch], dtype=np.int64)
        if arr.size != w * h * ch:
            raise UserError(f"{path}: truncated image data")
    arr = arr.astype(np.uint16 if maxval >= 256 else np.uint8).reshape((h, w, ch) if ch == 3 else (h, w))
    return arr


def _read_image(path: Path) -> np.ndarray:
    ext = path.suffix.lower()
    if ext in (".ppm", ".pgm"):
        return read_pnm(path)
    if ext == ".npy":
        return np.asarray(_load_npy(path))
    _require_pillow(path)
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im)


def resize(img: np.ndarray, size: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """Resize an HxW or HxWxC image to ``size`` = (H, W) with numpy (half-pixel centres)."""
    h, w = img.shape[:2]
    oh, ow = int(size[0]), int(size[1])
    if (h, w) == (oh, ow):
        return img.astype(np.float32)
    ys = (np.arange(oh) + 0.5) * h / oh - 0.5
    xs = (np.arange(ow) + 0.5) * w / ow - 0.5
    src = img.astype(np.float32)
    if mode == "nearest":
        yi = np.clip(np.floor(ys + 0.5), 0, h - 1).astype(int)
        xi = np.clip(np.floor(xs + 0.5), 0, w - 1).astype(int)
        return src[yi][:, xi]
    y0 = np.clip(np.floor(ys), 0, h - 1).astype(int)
    x0 = np.clip(np.floor(xs), 0, w - 1).astype(int)
    y1 = np.minimum(y0 + 1, h - 1)
    x1 = np.minimum(x0 + 1, w - 1)
    wy = np.clip(ys - y0, 0, 1).astype(np.float32)
    wx = np.clip(xs - x0, 0, 1).astype(np.float32)
    if src.ndim == 3:
        wy = wy[:, None, None]
        wx = wx[None, :, None]
    else:
        wy = wy[:, None]
        wx = wx[None, :]
    top = src[y0][:, x0] * (1 - wx) + src[y0][:, x1] * wx
    bot = src[y1][:, x0] * (1 - wx) + src[y1][:, x1] * wx
    return top * (1 - wy) + bot * wy


def preprocess_image(img: np.ndarray, spec: InputSpec, pre: Preprocess, where: str = "image") -> np.ndarray:
    """One image -> one sample (no batch axis) laid out for ``spec``."""
    if len(spec.shape) != 4:
        raise UserError(f"{where}: images feed a 4-D input; input '{spec.name}' expects {_expected(spec)}")
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]
    if pre.layout == "NCHW":
        c_exp, h_exp, w_exp = spec.shape[1], spec.shape[2], spec.shape[3]
    else:
        h_exp, w_exp, c_exp = spec.shape[1], spec.shape[2], spec.shape[3]
    size = pre.size
    if size is None and isinstance(h_exp, int) and isinstance(w_exp, int) and h_exp > 0 and w_exp > 0:
        size = (h_exp, w_exp)
    x = resize(img, size, pre.resize) if size is not None else img.astype(np.float32)
    want_c = c_exp if isinstance(c_exp, int) and c_exp > 0 else (1 if pre.channels == "GRAY" else 3)
    if x.ndim == 2:
        x = x[:, :, None]
    if x.shape[2] == 1 and want_c == 3:
        x = np.repeat(x, 3, axis=2)
    elif x.shape[2] == 3 and want_c == 1:
        x = (x @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[:, :, None]
    if x.shape[2] == 3 and pre.channels == "BGR":
        x = x[:, :, ::-1]
    x = x / np.float32(pre.scale)
    mean = np.asarray(pre.mean, dtype=np.float32).reshape(1, 1, -1)
    std = np.asarray(pre.std, dtype=np.float32).reshape(1, 1, -1)
    if mean.size not in (1, x.shape[2]) or std.size not in (1, x.shape[2]):
        raise UserError(f"{where}: mean/std have {mean.size}/{std.size} values for {x.shape[2]} channels")
    x = (x - mean) / std
    if pre.layout == "NCHW":
        x = np.transpose(x, (2, 0, 1))
    return np.ascontiguousarray(x.astype(spec.dtype if spec.dtype.kind == "f" else np.float32))


def _image_chunks(files: list[Path], spec: InputSpec, pre: Preprocess) -> Iterator[dict[str, np.ndarray]]:
    for f in files:
        yield {spec.name: preprocess_image(_read_image(f), spec, pre, str(f))[None]}
