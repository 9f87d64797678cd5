"""Golden files: the graph after each pass (and after each target's pipeline) for every builder
model, as readable text (``edgec.printer``: weights summarised by dtype, shape and hash).

A golden file exists for every (pass, model) pair the pass changes; where the pass changes
nothing the test asserts exactly that. Regenerate all of them with:

    python -m pytest tests --update-golden

and review the diff like code.
"""

from __future__ import annotations

import pytest

import edgec
from edgec import builders, printer
from edgec.backends import get_target, targets
from edgec.pipeline import PassManager, get_pass

from conftest import GOLDEN, assert_same_outputs, check_golden

PASSES = ["fold_constants", "fold_shapes", "eliminate_identity", "fuse_transposes", "collapse_reshapes",
          "fold_batchnorm", "fold_conv_affine", "dedup_initializers", "eliminate_dead"]
MODELS = sorted(builders.ALL_MODELS)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("pass_name", PASSES)
def test_pass_golden(pass_name, model_name, update_golden):
    model = builders.ALL_MODELS[model_name]()
    ir = edgec.from_model(model)
    ir.infer_shapes()
    before = printer.dump(ir)
    PassManager([get_pass(pass_name)]).run(ir)
    after = printer.dump(ir)
    path = GOLDEN / pass_name / f"{model_name}.txt"
    if after == before:
        if update_golden and path.exists():
            path.unlink()
        assert not path.exists(), f"{path} exists but {pass_name} no longer changes {model_name}"
        return
    check_golden(path, after, update_golden)
    assert_same_outputs(model, ir.to_onnx())


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("target", sorted(targets()))
def test_target_golden(target, model_name, update_golden):
    model = builders.ALL_MODELS[model_name]()
    ir = edgec.from_model(model)
    profile = get_target(target)
    PassManager(profile.passes()).run(ir)
    check_golden(GOLDEN / "backends" / target / f"{model_name}.txt", printer.dump(ir), update_golden)
    assert_same_outputs(model, ir.to_onnx())
    assert profile.conformance(ir) == []
