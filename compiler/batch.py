"""``edgec batch MANIFEST``: many compiles, in this process or as Ray tasks (a fleet).

A manifest is JSON (or TOML, on Python >= 3.11, with the same keys)::

    {"jobs": [{"model": "a.onnx", "target": "cpu", "output": "out/a.cpu.onnx",
               "options": {"quantize": "int8", "calib": "calib/"}}]}

``options`` are :func:`edgec.compile` keyword arguments (``report_file`` included). Relative
paths (``model``, ``output``, and the ``calib``, ``inputs``, ``eval_data`` and ``report_file``
options) are relative to the manifest's folder.

The manifest itself is checked before any job runs (its syntax, each job's keys, two jobs
writing one file): a mistake there is one user error (exit 2) and nothing runs. Then every job
runs, whatever the others do; each ends with the exit code ``edgec compile`` would give it (0,
1 or 2) and its one-line error, in the summary. The command's exit code is the worst (highest)
of the jobs'. Each compile writes its outputs all or none (:mod:`edgec.outputs`). On Ray
(:mod:`edgec.executor`), a job whose worker dies is run again (Ray's task retries); a job starts
by removing the temporary files a killed attempt may have left beside its outputs (the batch
owns those paths: no two of its jobs write the same file), so a killed worker costs only time.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from . import executor as executor_mod
from .errors import InternalError, UserError, VerificationError
from .options import KEYWORDS

JOB_KEYS = ("model", "target", "output", "options")
PATH_OPTIONS = ("calib", "inputs", "eval_data", "report_file")
OPTION_KEYS = tuple(k for k in KEYWORDS if k not in ("target", "progress")) + ("report_file",)


def read_manifest(path: str | os.PathLike) -> list[dict]:
    """The jobs of a manifest, checked, with paths made absolute (UserError on a mistake)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such manifest file")
    try:
        text = p.read_bytes()
    except OSError as e:
        raise UserError(f"{p}: cannot read the manifest ({e.strerror})") from None
    if p.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError:
            raise UserError(f"{p}: TOML manifests need Python 3.11 or later (tomllib); "
                            f"write the manifest as JSON") from None
        try:
            data = tomllib.loads(text.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise UserError(f"{p}: not a valid TOML manifest: {e}") from None
    else:
        try:
            data = json.loads(text.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{p}: not a valid JSON manifest: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("jobs"), list) or not data["jobs"]:
        raise UserError(f'{p}: a manifest holds a non-empty list "jobs" of {{"model", "output", "target", '
                        f'"options"}} tables')
    base = p.resolve().parent
    jobs, outputs = [], {}
    for n, job in enumerate(data["jobs"], 1):
        where = f"{p}: job {n}"
        if not isinstance(job, dict):
            raise UserError(f"{where}: expected a table with model, output, target, options")
        unknown = [k for k in job if k not in JOB_KEYS]
        if unknown:
            raise UserError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(JOB_KEYS)})")
        for key in ("model", "output"):
            if not isinstance(job.get(key), str) or not job[key]:
                raise UserError(f"{where}: '{key}' must be a path")
        target = job.get("target", "cpu")
        if not isinstance(target, str) or not target:
            raise UserError(f"{where}: 'target' must be a target name (see `edgec targets`)")
        options = job.get("options", {})
        if not isinstance(options, dict):
            raise UserError(f"{where}: 'options' must be a table of edgec.compile keyword arguments")
        bad = [k for k in options if k not in OPTION_KEYS]
        if bad:
            raise UserError(f"{where}: unknown option '{bad[0]}' (options are edgec.compile keyword arguments: "
                            f"{', '.join(OPTION_KEYS)})")
        options = dict(options)
        for key in PATH_OPTIONS:
            value = options.get(key)
            if isinstance(value, str) and value and not (key == "calib" and value == "random"):
                options[key] = str(base / value)
        out = {"index": n, "model": str(base / job["model"]), "output": str(base / job["output"]),
               "target": target, "options": options, "label": f"{job['model']} -> {job['output']}"}
        for f in (out["output"], options.get("report_file")):
            if isinstance(f, str):
                key = os.path.normpath(f)
                if key in outputs:
                    raise UserError(f"{where} writes {f}, which job {outputs[key]} writes too")
                outputs[key] = n
        jobs.append(out)
    return jobs


def run_job(job: dict, shared=None) -> dict:
    """One job (in this process or as an executor task): ``{"code", "error", "seconds"}``, with
    ``edgec compile``'s exit code meanings (0, 1 failed check or internal failure, 2 user mistake)."""
    from . import api

    t0 = time.perf_counter()
    for f in (job["output"], job["options"].get("report_file")):
        if isinstance(f, str):
            _remove_stale_temps(Path(f))
    try:
        api.compile(job["model"], job["output"], target=job["target"], **job["options"])
        code, error = 0, None
    except UserError as e:
        code, error = 2, f"error: {_one_line(e)}"
    except VerificationError as e:
        code, error = 1, f"verification failed: {_one_line(e)}"
    except InternalError as e:
        code, error = 1, f"internal error: {_one_line(e)}"
    except (KeyboardInterrupt, SystemExit):
        raise
    except MemoryError:
        code, error = 1, "internal error: out of memory"
    except Exception as e:  # noqa: BLE001 - a bug in a job: reported as compile would, the others go on
        code, error = 1, f"internal error: {type(e).__name__}: {_one_line(e)}"
    return {"code": code, "error": error, "seconds": round(time.perf_counter() - t0, 3)}


def run(jobs: list[dict], ex: executor_mod.Executor, *, progress=None) -> list[dict]:
    """Every job on ``ex``; the results in the jobs' order. ``progress(done, total, job, result)``
    is called as each job ends."""
    results: list[dict | None] = [None] * len(jobs)
    done = 0
    for i, result in _outcomes(jobs, ex):
        results[i] = result
        done += 1
        if progress is not None:
            progress(done, len(jobs), jobs[i], result)
    return results


def _outcomes(jobs, ex):
    """``(index, result)`` as jobs end; a task that could not be run at all (its worker died more
    often than Ray retries it) is that job's internal error, and the others still run."""
    for i, result in ex.imap(run_job, jobs, return_exceptions=True):
        if isinstance(result, BaseException):
            result = {"code": 1, "error": f"internal error: the job's worker failed: {type(result).__name__}: "
                                          f"{_one_line(result)}", "seconds": None}
        yield i, result


def summary_text(jobs: list[dict], results: list[dict]) -> str:
    rows = [("job", "exit", "seconds", "target", "model -> output", "error")]
    for job, r in zip(jobs, results):
        rows.append((str(job["index"]), str(r["code"]), "" if r["seconds"] is None else f"{r['seconds']:.2f}",
                     job["target"], job["label"], r["error"] or ""))
    widths = [max(len(row[c]) for row in rows) for c in range(5)]
    lines = ["  ".join(row[c].ljust(widths[c]) for c in range(5)).rstrip() + ("  " + row[5] if row[5] else "")
             for row in rows]
    ok = sum(1 for r in results if r["code"] == 0)
    worst = max(r["code"] for r in results)
    lines.append(f"{ok} of {len(results)} jobs succeeded" + (f"; exit {worst} (the worst job's)" if worst else ""))
    return "\n".join(lines)


def progress_line(done: int, total: int, job: dict, result: dict) -> None:
    status = "ok" if result["code"] == 0 else f"exit {result['code']}: {result['error']}"
    secs = "" if result["seconds"] is None else f" ({result['seconds']:.1f} s)"
    print(f"edgec batch: [{done}/{total}] job {job['index']} {job['label']}: {status}{secs}", file=sys.stderr,
          flush=True)


def _remove_stale_temps(final: Path) -> None:
    """Remove ``.NAME.*.tmp`` files beside ``final`` (:mod:`edgec.outputs`' temporary names) that
    an attempt killed before it could clean up left behind."""
    parent = final.parent
    if not parent.is_dir():
        return
    prefix = f".{final.name[:100]}."
    for p in parent.iterdir():
        if p.name.startswith(prefix) and p.name.endswith(".tmp") and p.is_file() and not p.is_symlink():
            try:
                p.unlink()
            except OSError:
                pass


def _one_line(e: BaseException) -> str:
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return text or type(e).__name__
