"""Reading user arrays (``.npy`` files and ``.npz`` archives) without trusting them.

``np.load`` reads an ``.npz`` member whole, and a 1 MB archive can inflate to gigabytes. Here
every array is opened by its header first (:func:`open_arrays`): its dtype, shape and order
are checked against what the archive or file actually holds before any data is read, so

* a member whose header and stored size disagree (truncated, corrupt) is refused;
* a member that declares an absurd size (over ``MAX_ARRAY_BYTES``) is refused;
* pickled Python objects are refused (never unpickled);
* only the rows that are used are read (:meth:`ArrayRef.rows` streams along axis 0), so
  ``--calib-samples 64`` reads 64 samples of a million-sample archive;
* arrays read whole (``--inputs``, ``--eval``) are capped at ``MAX_READ_BYTES`` in total.

Every problem is a :class:`~edgec.errors.UserError` naming the file (and member).
"""

from __future__ import annotations

import ast
import math
import os
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import UserError

MAX_ARRAY_BYTES = 64 << 30  # one declared array beyond this is not data, it is a mistake
MAX_READ_BYTES = 256 << 20  # what --inputs / --eval read into memory at once
_READ_ERRORS = (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError,
                zipfile.LargeZipFile)


@dataclass
class ArrayRef:
    """One array in a file: its header, and how to read rows of it."""

    path: Path
    member: str | None  # the npz member (None: a .npy file)
    shape: tuple
    dtype: np.dtype
    fortran: bool
    data_offset: int  # bytes of header before the data (within the member)

    @property
    def where(self) -> str:
        return f"{self.path}" + (f" (array '{self.key}')" if self.member is not None else "")

    @property
    def key(self) -> str:
        return self.member[:-4] if self.member and self.member.endswith(".npy") else (self.member or "")

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def __len__(self) -> int:
        return int(self.shape[0]) if self.shape else 1

    def _open(self):
        try:
            if self.member is None:
                f = open(self.path, "rb")
            else:
                z = zipfile.ZipFile(self.path)
                f = _ZipMember(z, z.open(self.member))
            _skip(f, self.data_offset)
            return f
        except _READ_ERRORS as e:
            raise UserError(f"{self.where}: cannot read it ({_why(e)})") from None

    def read(self) -> np.ndarray:
        """The whole array."""
        return self._read_rows(0, len(self)) if self.shape else self._read_scalar()

    def _read_scalar(self) -> np.ndarray:
        with self._open() as f:
            data = _read_exactly(f, self.dtype.itemsize, self.where)
        return np.frombuffer(data, dtype=self.dtype).reshape(()).copy()

    def _read_rows(self, start: int, stop: int) -> np.ndarray:
        for chunk in self.rows(max(1, stop - start), start=start, stop=stop):
            return chunk
        return np.empty((0,) + tuple(self.shape[1:]), dtype=self.dtype)

    def rows(self, chunk: int, *, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        """Rows ``[start, stop)`` along axis 0, ``chunk`` rows at a time (read as they are used)."""
        if not self.shape:
            yield self._read_scalar()[None]
            return
        n = len(self)
        stop = n if stop is None else min(stop, n)
        row_shape = tuple(self.shape[1:])
        row_bytes = math.prod(row_shape) * self.dtype.itemsize
        if self.fortran and len(self.shape) > 1:
            if self.nbytes > MAX_READ_BYTES:
                raise UserError(f"{self.where}: a {_size(self.nbytes)} array in Fortran order cannot be read in "
                                f"parts; save it in C order (np.ascontiguousarray)")
            with self._open() as f:
                data = _read_exactly(f, self.nbytes, self.where)
            whole = np.frombuffer(data, dtype=self.dtype).reshape(self.shape, order="F")
            for i in range(start, stop, chunk):
                yield np.ascontiguousarray(whole[i:min(i + chunk, stop)])
            return
        with self._open() as f:
            _skip(f, start * row_bytes, self.where)
            for i in range(start, stop, chunk):
                k = min(chunk, stop - i)
                data = _read_exactly(f, k * row_bytes, self.where)
                yield np.frombuffer(data, dtype=self.dtype).reshape((k,) + row_shape).copy()


class _ZipMember:
    def __init__(self, z, f):
        self.z, self.f = z, f

    def read(self, n=-1):
        return self.f.read(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()
        self.z.close()

    def close(self):
        self.__exit__()


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:120]}" if text else type(e).__name__


def _size(n: int) -> str:
    for div, unit in ((1 << 30, "GB"), (1 << 20, "MB"), (1 << 10, "kB")):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} bytes"


def _read_exactly(f, n: int, where: str) -> bytes:
    try:
        data = f.read(n)
    except _READ_ERRORS as e:
        raise UserError(f"{where}: the data is corrupt or truncated ({_why(e)})") from None
    if len(data) != n:
        raise UserError(f"{where}: the data is truncated (expected {n} more bytes, got {len(data)})")
    return data


def _skip(f, n: int, where: str = "") -> None:
    left = n
    while left > 0:
        got = _read_exactly(f, min(left, 16 << 20), where) if where else f.read(min(left, 16 << 20))
        if not got:
            raise EOFError("unexpected end of data")
        left -= len(got)


def _header(f, where: str) -> tuple[tuple, np.dtype, bool, int]:
    """Parse a .npy header from a stream; returns (shape, dtype, fortran, header bytes)."""
    try:
        magic = f.read(8)
        if len(magic) < 8 or magic[:6] != b"\x93NUMPY":
            raise UserError(f"{where}: not a NumPy array (.npy) file")
        major = magic[6]
        if major == 1:
            hlen_bytes = f.read(2)
            hlen = int.from_bytes(hlen_bytes, "little")
            prefix = 10
        elif major in (2, 3):
            hlen_bytes = f.read(4)
            hlen = int.from_bytes(hlen_bytes, "little")
            prefix = 12
        else:
            raise UserError(f"{where}: unsupported .npy format version {major}")
        if hlen > 1 << 20:
            raise UserError(f"{where}: the .npy header is corrupt")
        raw = f.read(hlen)
        if len(raw) != hlen:
            raise UserError(f"{where}: the .npy header is truncated")

        text = raw.decode("latin1" if major < 3 else "utf8")
        d = ast.literal_eval(text)
        if not isinstance(d, dict) or not {"descr", "fortran_order", "shape"} <= set(d):
            raise ValueError("bad header dict")
        shape, fortran = d["shape"], d["fortran_order"]
        if not isinstance(shape, tuple) or not all(isinstance(x, int) and x >= 0 for x in shape) \
                or not isinstance(fortran, bool):
            raise ValueError("bad shape or order")
        dtype = np.lib.format.descr_to_dtype(d["descr"])
    except UserError:
        raise
    except (*_READ_ERRORS, SyntaxError, TypeError, KeyError, MemoryError, RecursionError) as e:
        raise UserError(f"{where}: the .npy header is corrupt ({_why(e)})") from None
    if dtype.hasobject:
        raise UserError(f"{where}: holds pickled Python objects; edgec reads plain numeric arrays only "
                        f"(and never unpickles)")
    if dtype.kind not in "biufcUS" or dtype.fields is not None or dtype.subdtype is not None:
        raise UserError(f"{where}: has dtype {dtype}, which is not a plain numeric array")
    return shape, dtype, fortran, prefix + hlen


def file_kind(mode: int) -> str:
    """What a non-regular file is, for one-line errors ("a FIFO", "a character device", ...)."""
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def check_regular(path: str | os.PathLike, what: str, *, missing: str | None = None, expected: str | None = None,
                  hint: str = "") -> Path:
    """Refuse a path that is not a regular file before opening it (FIFOs and devices would hang
    or never end, folders are not files): one UserError naming ``what`` the file should be.
    ``missing``/``expected`` word the not-found and is-a-directory messages (default: ``what``,
    ``an .npz or .npy <what>``); ``hint`` follows the not-a-regular-file message."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise UserError(f"{p}: no such {missing or what}"
                        + (" (a broken symbolic link)" if p.is_symlink() else "")) from None
    except OSError as e:
        raise UserError(f"{p}: cannot read the {what} ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"{p}: is a directory, expected {expected or f'an .npz or .npy {what}'}")
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{p}: is not a regular file ({file_kind(st.st_mode)}){hint}")
    return p


def open_npy(path: str | os.PathLike, what: str = "data file") -> ArrayRef:
    p = check_regular(Path(path), what)
    try:
        with open(p, "rb") as f:
            shape, dtype, fortran, offset = _header(f, str(p))
    except OSError as e:
        raise UserError(f"{p}: cannot read it ({e.strerror or e})") from None
    ref = ArrayRef(p, None, shape, dtype, fortran, offset)
    _check_size(ref, p.stat().st_size - offset)
    return ref


def open_npz(path: str | os.PathLike, what: str = "data file") -> dict[str, ArrayRef]:
    """The arrays of an .npz archive by key, from their headers (no data read)."""
    p = check_regular(Path(path), what)
    out: dict[str, ArrayRef] = {}
    try:
        with zipfile.ZipFile(p) as z:
            infos = z.infolist()
            if len(infos) > 10000:
                raise UserError(f"{p}: the archive holds {len(infos)} files; an .npz of calibration or input "
                                f"arrays holds one per model input")
            for info in infos:
                if info.is_dir():
                    continue
                key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                where = f"{p} (array '{key}')"
                with z.open(info) as f:
                    shape, dtype, fortran, offset = _header(f, where)
                ref = ArrayRef(p, info.filename, shape, dtype, fortran, offset)
                _check_size(ref, info.file_size - offset)
                out[key] = ref
    except UserError:
        raise
    except _READ_ERRORS as e:
        raise UserError(f"{p}: cannot read it as .npz ({_why(e)})") from None
    return out


def _check_size(ref: ArrayRef, stored: int) -> None:
    if ref.nbytes > MAX_ARRAY_BYTES:
        raise UserError(f"{ref.where}: declares {_size(ref.nbytes)} of data {list(ref.shape)}, more than edgec "
                        f"reads ({_size(MAX_ARRAY_BYTES)}); the file is corrupt or not what you meant")
    if stored != ref.nbytes:
        raise UserError(f"{ref.where}: its header says {_size(ref.nbytes)} of data {list(ref.shape)} but the file "
                        f"holds {_size(max(stored, 0))}: truncated or corrupt")


def open_arrays(path: str | os.PathLike, what: str = "data file") -> dict[str, ArrayRef]:
    """The arrays of an .npz (by key) or of an .npy (key ''), from their headers."""
    p = Path(path)
    if p.suffix == ".npy":
        return {"": open_npy(p, what)}
    return open_npz(p, what)


def read_arrays(path: str | os.PathLike, what: str = "data file", limit: int = MAX_READ_BYTES) -> dict[str, np.ndarray]:
    """Every array of an .npz/.npy, read whole, at most ``limit`` bytes in total."""
    refs = open_arrays(path, what)
    total = sum(r.nbytes for r in refs.values())
    if total > limit:
        raise UserError(f"{path}: holds {_size(total)} of arrays, more than edgec reads at once for "
                        f"{what}s ({_size(limit)}); use fewer samples")
    return {k: r.read() for k, r in refs.items()}
