"""Drivers for vendor toolchains: each runs in its own virtual environment, as a subprocess.

``ensure_venv(name)`` creates the environment on first use (cached under
$EDGEC_VENDOR_DIR, default ~/.cache/edgec-vendor) with the recipe from
shared/reference/vendor-validators.md; ``run_jobs(name, jobs)`` runs the matching
``<name>_run.py`` over a batch of jobs and returns its results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENDOR_DIR = Path(os.environ.get("EDGEC_VENDOR_DIR", Path.home() / ".cache" / "edgec-vendor"))

RECIPES = {
    # RKNN-Toolkit2 pins old numpy/onnx/protobuf and hard-imports torch: its own venv, torch 2.13.0
    # (a CPU wheel on this machine's disk) instead of its declared torch<=2.4 (a multi-GB CUDA build).
    "rknn": [
        ["--no-deps", "rknn-toolkit2==2.5.0"],
        ["numpy==1.26.4", "onnx==1.18.0", "onnxruntime==1.26.0", "protobuf==4.25.4", "opencv-python==4.11.0.86",
         "scipy==1.17.1", "fast-histogram==0.14", "ruamel.yaml==0.19.1", "psutil", "tqdm", "setuptools>=77,<81",
         "torch==2.13.0"],
    ],
    "openvino": [["openvino", "numpy"]],
    # NVIDIA's polygraphy without TensorRT: ONNX-only checks (lint, inspect).
    "polygraphy": [["polygraphy", "onnx", "onnxruntime", "numpy", "onnx-graphsurgeon", "colored"]],
}
CHECK = {"rknn": "from rknn.api import RKNN", "openvino": "import openvino", "polygraphy": "import polygraphy"}
NETWORK_ERRORS = ("Could not find a version", "No matching distribution", "Temporary failure in name resolution",
                  "Failed to establish a new connection", "Network is unreachable", "ConnectionError")


class Unavailable(Exception):
    """The registry could not be reached: the only reason a vendor test may skip."""


def python_of(name: str) -> Path:
    return VENDOR_DIR / name / "bin" / "python"


def ensure_venv(name: str) -> Path:
    py = python_of(name)
    if py.exists() and subprocess.run([str(py), "-c", CHECK[name]], capture_output=True).returncode == 0:
        return py
    VENDOR_DIR.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENDOR_DIR / name)], check=True)
    for args in RECIPES[name]:
        proc = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            text = proc.stdout + proc.stderr
            if any(e in text for e in NETWORK_ERRORS):
                raise Unavailable(f"{name}: the package registry is unreachable: {text.strip().splitlines()[-1]}")
            raise RuntimeError(f"installing {name} failed:\n{text[-3000:]}")
    check = subprocess.run([str(py), "-c", CHECK[name]], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"{name} installed but does not import:\n{check.stderr[-3000:]}")
    return py


def require(name: str) -> Path:
    """For a test fixture: the environment's python, or skip the test when (and only when)
    the package registry cannot be reached to install it."""
    import pytest

    try:
        return ensure_venv(name)
    except Unavailable as e:
        pytest.skip(str(e))


def tool(name: str, command: str) -> Path:
    """A console script installed in the ``name`` environment (e.g. polygraphy)."""
    return require(name).parent / command


def run_jobs(name: str, jobs: list[dict], timeout: int = 900) -> list[dict]:
    py = ensure_venv(name)
    with tempfile.TemporaryDirectory() as d:
        jobs_file, results_file = Path(d) / "jobs.json", Path(d) / "results.json"
        jobs_file.write_text(json.dumps(jobs))
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        proc = subprocess.run([str(py), str(HERE / f"{name}_run.py"), str(jobs_file), str(results_file)],
                              capture_output=True, text=True, timeout=timeout, env=env, cwd=d)
        if proc.returncode != 0 or not results_file.exists():
            raise RuntimeError(f"{name} runner exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")
        return json.loads(results_file.read_text())
