"""Every file a compile writes, checked before any work and written all or none.

An :class:`Outputs` holds the paths a run will write (the model, the JSON report, a target's
side files and folders). :meth:`Outputs.claim` checks a path at once, before any work:

* it is not one of the run's input files (the model, its external data, ``--inputs``,
  ``--eval``, ``--calib``), through symbolic and hard links, and a folder output holds none;
* it is not another output of the same run (``--report`` equal to ``-o``, a side file...);
* its folder exists and a file can be created there (probed with a temporary file);
* what is already there is something edgec may replace: a regular file (a symbolic link is
  followed: its target is replaced), or for folder outputs a folder edgec wrote before. A
  directory, device, FIFO or socket is refused.

Writes go to temporary files (``.NAME.XXXX.tmp``) beside their destinations. :meth:`commit`
renames them all into place with SIGINT/SIGTERM held off; until then nothing is visible, and
:meth:`discard` (also run when the ``with`` block ends in an exception, Ctrl-C or SIGTERM
included, and at interpreter exit) removes every temporary file. A replaced file keeps its
mode; a new one gets ``0666 & ~umask`` (a new folder ``0777 & ~umask``), like any other tool.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import onnx

from .datafiles import file_kind
from .errors import UserError

_LIVE: set = set()  # every Outputs with temporary files on disk (cleaned at exit, whatever happens)
# Above this many bytes of weights a model is written with external data (protobuf's limit is 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
LAST_COMMIT: list[str] = []  # what the last commit wrote (the CLI says so if Ctrl-C lands just after)
DATASET_ENTRY = re.compile(r"^(\d{5}_\d+\.npy|dataset\.txt)$")  # what edgec writes in an RKNN dataset folder


def weights_bytes(model: onnx.ModelProto) -> int:
    """Bytes of a model's initializers (what decides whether it needs external data)."""
    total = 0
    for t in model.graph.initializer:
        total += len(t.raw_data) if t.HasField("raw_data") else t.ByteSize()
    return total


def json_default(o):
    """JSON for what reports hold besides JSON types: numpy scalars and arrays (else ``str``)."""
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class Outputs:
    """The outputs of one run (see the module doc). Use as a context manager."""

    def __init__(self, inputs: Iterable[str | os.PathLike] = ()):
        self._inputs: list[tuple[Path, str]] = []
        self._claims: dict[str, tuple[Path, str, str]] = {}  # real path -> (as given, kind, what)
        self._staged: dict[str, str] = {}  # real path -> temporary path
        self._temps: set[str] = set()
        self.committed = False
        for p in inputs:
            self.protect(p)

    # ------------------------------------------------------------------ checks, before any work
    def protect(self, path: str | os.PathLike, what: str = "input") -> None:
        """``path`` is read by this run: no output may replace it (or a folder holding it)."""
        if path is None:
            return
        p = Path(path)
        if not p.exists():
            return
        self._inputs.append((p, what))
        for key, (given, kind, out_what) in self._claims.items():  # outputs claimed before this input was known
            if _same(Path(key), p) or (kind == "dir" and _inside(p, Path(key))):
                raise UserError(f"{given}: the {out_what} would replace the {what} ({p}); edgec never overwrites "
                                f"its input")

    def real(self, path: str | os.PathLike) -> Path:
        """The path a write to ``path`` replaces (symbolic links followed)."""
        return Path(os.path.realpath(os.fspath(path)))

    def claim(self, path: str | os.PathLike, what: str = "output", *, kind: str = "file",
              replaceable: Callable[[Path], bool] | None = None) -> Path:
        """Check ``path`` as an output of this run now; raise UserError if it cannot be written.
        ``kind`` is ``file`` or ``dir``; an existing folder output is replaced only when
        ``replaceable(path)`` says edgec wrote it."""
        given = os.fspath(path)
        if not given:
            raise UserError(f"the {what} path is empty")
        if "\0" in given:
            raise UserError(f"the {what} path contains a NUL character")
        if given.endswith(os.sep) and kind == "file":
            raise UserError(f"{given}: the {what} path names a folder; give a file name")
        real = self.real(given)
        key = str(real)
        if key in self._claims:
            other = self._claims[key]
            if other[2] == what and other[1] == kind:
                return real
            raise UserError(f"{given}: the {what} would overwrite the {other[2]} ({other[0]}); give them different paths")
        for inp, in_what in self._inputs:
            if _same(real, inp):
                raise UserError(f"{given}: the {what} path is the {in_what}; edgec never overwrites its input")
            if kind == "dir" and _inside(inp, real):
                raise UserError(f"{given}: the {what} folder holds the {in_what} ({inp}), which would be replaced")
        for other_real, (other_given, other_kind, other_what) in self._claims.items():
            if other_kind == "dir" and _inside(real, Path(other_real)) or kind == "dir" and _inside(Path(other_real), real):
                raise UserError(f"{given}: the {what} would be inside or around the {other_what} ({other_given})")
        try:
            st = os.stat(real)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise UserError(f"{given}: cannot write the {what} there ({e.strerror or e})") from None
        if st is not None:
            if kind == "file" and not stat.S_ISREG(st.st_mode):
                raise UserError(f"{given}: is {file_kind(st.st_mode)}; give a file name for the {what}")
            if kind == "dir":
                if not stat.S_ISDIR(st.st_mode):
                    raise UserError(f"{given}: is {file_kind(st.st_mode) if not stat.S_ISREG(st.st_mode) else 'a file'}; "
                                    f"the {what} goes there as a folder: remove it or choose another -o")
                if replaceable is not None and not replaceable(real):
                    raise UserError(f"{given}: the folder exists and holds files edgec did not write; remove it or "
                                    f"choose another -o for the {what}")
            if kind == "file" and not os.access(real, os.W_OK):
                raise UserError(f"{given}: the {what} is not writable")
        parent = real.parent
        if not parent.is_dir():
            raise UserError(f"{given}: the {what} folder {parent} does not exist")
        try:
            name_max = os.pathconf(parent, "PC_NAME_MAX")
        except (OSError, ValueError):
            name_max = 255
        if len(os.fsencode(real.name)) > name_max:
            raise UserError(f"{given[:60]}...: the {what} file name is longer than {name_max} bytes")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UserError(f"{given}: cannot write the {what} there (the folder {parent} is not writable)")
        try:  # the only proof a file can be created there (read-only mounts, /proc, name too long)
            fd, probe = tempfile.mkstemp(dir=parent, prefix=_prefix(real), suffix=".tmp")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise UserError(f"{given}: cannot write the {what} there ({e.strerror or e})") from None
        self._claims[key] = (Path(given), kind, what)
        return real

    def claimed(self, path: str | os.PathLike) -> bool:
        return str(self.real(path)) in self._claims

    # ------------------------------------------------------------------ staging
    def _temp(self, real: Path, *, directory: bool = False) -> str:
        if str(real) not in self._claims:
            raise RuntimeError(f"{real} was not claimed as an output")  # pragma: no cover - a bug in edgec
        old = self._staged.pop(str(real), None)
        if old is not None:
            self._remove(old)
        _LIVE.add(self)
        if directory:
            tmp = tempfile.mkdtemp(dir=real.parent, prefix=_prefix(real), suffix=".tmp")
        else:
            fd, tmp = tempfile.mkstemp(dir=real.parent, prefix=_prefix(real), suffix=".tmp")
            os.close(fd)
        self._temps.add(tmp)
        self._staged[str(real)] = tmp
        return tmp

    def write_bytes(self, path: str | os.PathLike, data: bytes) -> int:
        tmp = self._temp(self.real(path))
        try:
            with open(tmp, "wb") as f:
                f.write(data)
        except OSError as e:
            raise UserError(f"{path}: cannot write it ({e.strerror or e})") from None
        return len(data)

    def write_text(self, path: str | os.PathLike, text: str) -> int:
        return self.write_bytes(path, text.encode())

    def write_json(self, path: str | os.PathLike, data) -> int:
        return self.write_text(path, json.dumps(data, indent=2, default=json_default) + "\n")

    def make_dir(self, path: str | os.PathLike) -> Path:
        """An empty temporary folder to fill; it becomes ``path`` at commit."""
        return Path(self._temp(self.real(path), directory=True))

    def write_model(self, path: str | os.PathLike, model) -> int:
        """Stage an ONNX model; one that is over the 2 GB protobuf limit gets its weights in
        ``PATH.data`` beside it (claimed here). Returns the model file's size in bytes."""
        real = self.real(path)
        if weights_bytes(model) <= EXTERNAL_DATA_THRESHOLD:
            return self.write_bytes(path, model.SerializeToString())
        data_name = real.name + ".data"
        data_real = self.claim(real.with_name(data_name), "external data of the model")
        tmp_data = self._temp(data_real)
        onnx.external_data_helper.convert_model_to_external_data(
            model, all_tensors_to_one_file=True, location=Path(tmp_data).name, size_threshold=1024)
        try:
            onnx.external_data_helper.write_external_data_tensors(model, str(real.parent))  # into tmp_data
        except OSError as e:
            raise UserError(f"{path}: cannot write the model's external data ({e.strerror or e})") from None
        for t in onnx.external_data_helper._get_all_tensors(model):
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = data_name
        return self.write_bytes(path, model.SerializeToString())

    # ------------------------------------------------------------------ all or none
    def commit(self) -> list[Path]:
        """Rename every staged output into place (signals held off meanwhile). If a rename fails,
        the outputs already renamed are put back as they were."""
        mask = _block_signals()
        done: list[tuple[Path, str | None]] = []  # (final path, backup of what it replaced)
        umask = _umask()
        try:
            for key, tmp in list(self._staged.items()):
                final = Path(key)
                is_dir = Path(tmp).is_dir()
                backup = None
                if final.exists() or final.is_symlink():
                    mode = stat.S_IMODE(os.stat(final).st_mode)
                    if is_dir:
                        backup = tempfile.mkdtemp(dir=final.parent, prefix=_prefix(final), suffix=".old.tmp")
                        self._temps.add(backup)
                        os.replace(final, backup)
                    else:
                        backup = _hard_link_backup(final)
                        if backup:
                            self._temps.add(backup)
                else:
                    mode = (0o777 if is_dir else 0o666) & ~umask
                os.chmod(tmp, mode)
                os.replace(tmp, final)
                self._temps.discard(tmp)
                done.append((final, backup))
        except BaseException as e:
            for final, backup in reversed(done):  # roll back
                try:
                    if backup is None:
                        if final.is_dir():
                            shutil.rmtree(final)
                        else:
                            os.unlink(final)
                    else:
                        os.replace(backup, final)
                        self._temps.discard(backup)
                except OSError:
                    pass
            self.discard()
            _restore_signals(mask)
            if isinstance(e, OSError):
                raise UserError(f"{getattr(e, 'filename', None) or 'output'}: cannot write it "
                                f"({e.strerror or e}); nothing was written") from None
            raise
        self.committed = True
        global LAST_COMMIT
        LAST_COMMIT = [str(final) for final, _ in done]
        self.discard()  # backups
        _restore_signals(mask)
        return [final for final, _ in done]

    def discard(self) -> None:
        """Remove every temporary file and folder of this run."""
        for tmp in list(self._temps):
            self._remove(tmp)
        self._staged.clear()
        _LIVE.discard(self)

    def _remove(self, tmp: str) -> None:
        try:
            if os.path.isdir(tmp) and not os.path.islink(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                os.unlink(tmp)
        except OSError:
            pass
        self._temps.discard(tmp)

    def __enter__(self) -> "Outputs":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self.committed:
            self.discard()


def _prefix(final: Path) -> str:
    """Temporary names: ``.NAME.XXXXXXXX.tmp`` beside NAME (NAME shortened: a 250-character
    output name must still leave room for the temporary one)."""
    return f".{final.name[:100]}."


def _same(a: Path, b: Path) -> bool:
    try:
        if a == Path(os.path.realpath(b)):
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _inside(path: Path, folder: Path) -> bool:
    try:
        Path(os.path.realpath(path)).relative_to(folder)
        return True
    except ValueError:
        return False


def _hard_link_backup(final: Path) -> str | None:
    """A hard link to the file about to be replaced, to put it back if a later rename fails."""
    for _ in range(5):
        name = final.parent / f"{_prefix(final)}{os.urandom(4).hex()}.old.tmp"
        try:
            os.link(final, name)
            return str(name)
        except FileExistsError:
            continue
        except OSError:
            return None
    return None


def edgec_dataset_folder(path: Path) -> bool:
    """True when ``path`` holds only what edgec writes in an RKNN dataset folder."""
    try:
        return all(DATASET_ENTRY.match(e.name) and e.is_file() and not e.is_symlink() for e in os.scandir(path))
    except OSError:
        return False


def _block_signals():
    if not hasattr(signal, "pthread_sigmask"):
        return None
    try:
        return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    except (ValueError, OSError):
        return None


def _restore_signals(mask) -> None:
    if mask is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


@atexit.register
def _cleanup_at_exit() -> None:
    for out in list(_LIVE):
        out.discard()
