"""Shared test fixtures: the golden-file option, model helpers, ORT comparisons."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "golden"
LIGHT_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
LIGHT_MODELS = sorted(glob.glob(str(LIGHT_DIR / "*.onnx")))
EXAMPLE = ROOT / "examples" / "digits"


def _host_line() -> str:
    from edgec import runtime

    return (f"edgec: test host CPU {runtime.host_description()}; every asserted number is measured in "
            f"reference arithmetic, so it holds on any x86-64")


def pytest_report_header(config):
    return _host_line()


def pytest_terminal_summary(terminalreporter):
    """Printed once even under -q, so a CI log says which kind of machine ran the suite."""
    terminalreporter.write_line(_host_line())


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite the golden files under golden/ instead of comparing with them")


@pytest.fixture
def update_golden(request) -> bool:
    return bool(request.config.getoption("--update-golden"))


def check_golden(path: Path, text: str, update: bool) -> None:
    """Compare ``text`` with the golden file (or write it with --update-golden)."""
    if update or os.environ.get("EDGEC_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    assert path.exists(), f"missing golden file {path}; run: python -m pytest tests --update-golden"
    expected = path.read_text()
    if text != expected:
        import difflib

        diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True),
                                            "golden", "actual", n=2))
        pytest.fail(f"{path.relative_to(ROOT)} differs (python -m pytest tests --update-golden to accept):\n{diff[:4000]}")


def assert_same_outputs(original: onnx.ModelProto, rewritten: onnx.ModelProto, *, seed: int = 0,
                        rtol: float = 1e-4, atol: float = 1e-5, feeds=None) -> dict:
    """Run both models in ONNX Runtime on the same inputs; assert the outputs match."""
    from edgec import verify

    feeds = feeds if feeds is not None else verify.random_inputs(original, seed=seed)
    ref = verify.run(original, feeds)
    got = verify.run(rewritten, feeds)
    assert set(ref) == set(got), f"outputs differ: {sorted(ref)} vs {sorted(got)}"
    for name in ref:
        assert ref[name].shape == got[name].shape, name
        np.testing.assert_allclose(got[name], ref[name], rtol=rtol, atol=atol, err_msg=name)
    return ref


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def digits_data() -> dict[str, np.ndarray]:
    """The example's real data: test_x/test_y (held-out, eval.npz) and calib_x (calib.npz)."""
    with np.load(EXAMPLE / "eval.npz") as e, np.load(EXAMPLE / "calib.npz") as c:
        return {"test_x": e["input"], "test_y": e["labels"], "calib_x": c["input"]}
