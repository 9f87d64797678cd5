"""prune_channels, reconstruct and sparsify_24 under the pass contract: calibration data and the
reference model come from the PassContext, results are the typed ``data`` of the pass record."""

from __future__ import annotations

import numpy as np

import edgec
from edgec import verify
from edgec.analysis.channels import find_groups
from edgec.builders import ALL_MODELS
from edgec.passes.prune_channels import PruneChannels, PruneResult, apply_pruning, select
from edgec.passes.reconstruct import Reconstruct, ReconstructionResult
from edgec.passes.sparsify_24 import Sparsify24, SparsityResult
from edgec.pipeline import PassContext, PassManager


def _calib(model, n=8, seed=0):
    return [verify.random_inputs(model, seed=seed + s) for s in range(n)]


def _mse(a, b, feeds) -> float:
    return float(np.mean([np.mean((verify.run(a, f)[k] - verify.run(b, f)[k]) ** 2)
                          for f in feeds for k in verify.run(a, f)]))


def test_passes_keep_no_results_or_feeds():
    for p in (PruneChannels(0.3), Reconstruct(), Sparsify24()):
        for attr in ("summary", "reconstruction", "solved_ratio", "report", "feeds"):
            assert not hasattr(p, attr), (p.name, attr)


def test_prune_reads_calibration_from_the_context():
    model = ALL_MODELS["resnet_basic"](batch=4)
    calib = _calib(model)
    ir = edgec.from_model(model)
    rec = PassManager([PruneChannels(0.4)]).run(ir, PassContext(calib=calib))[0]
    assert isinstance(rec.data, PruneResult) and rec.data.ratio == 0.4
    assert any(r.get("refit") for r in rec.data.reconstruction)
    assert any("reconstruction" in n for n in rec.notes)
    assert sum(g["removed"] for g in rec.data.groups) > 0
    # no calibration data, or reconstruct=False: no re-fit
    for ctx, p in ((PassContext(), PruneChannels(0.4)), (PassContext(calib=calib), PruneChannels(0.4, reconstruct=False))):
        rec = PassManager([p]).run(edgec.from_model(model), ctx)[0]
        assert rec.changed and rec.data.reconstruction == []


def test_reconstruct_pass_reads_reference_and_feeds_from_the_context():
    model = ALL_MODELS["resnet_basic"](batch=4)
    calib, held_out = _calib(model, 12), _calib(model, 3, seed=100)
    ir = edgec.from_model(model)
    reference = ir.to_onnx()
    groups = find_groups(ir)
    scores = {g.id: np.arange(g.channels, dtype=float) for g in groups if g.prunable}
    kept = apply_pruning(ir, groups, select(groups, scores, ratio=0.4))
    plain = ir.to_onnx()
    nothing = PassManager([Reconstruct(kept=kept)]).run(edgec.from_model(plain))[0]
    assert not nothing.changed and "nothing done" in nothing.notes[0]
    rec = PassManager([Reconstruct(kept=kept)]).run(ir, PassContext(calib=calib, reference=reference))[0]
    assert rec.changed and isinstance(rec.data, ReconstructionResult)
    assert any(r.get("refit") for r in rec.data.layers)
    assert _mse(reference, ir.to_onnx(), held_out) < _mse(reference, plain, held_out)


def test_sparsify_24_reads_calibration_from_the_context():
    model = ALL_MODELS["plain_cnn"](batch=4)
    rec = PassManager([Sparsify24()]).run(edgec.from_model(model), PassContext(calib=_calib(model, 4)))[0]
    assert isinstance(rec.data, SparsityResult) and rec.data.pattern == "2:4" and rec.data.layers
    assert any(e["refit"] for e in rec.data.layers)
    rec = PassManager([Sparsify24()]).run(edgec.from_model(model))[0]
    assert rec.changed and not any(e["refit"] for e in rec.data.layers)


def test_pruning_reports_its_output_error_and_warns_when_far(tmp_path, capsys):
    """With calibration data, a compile measures the pruned model's output error against the
    original (the report and the text say it); pruned so far that the outputs are no longer the
    original's (relative L2 beyond 0.5) it warns, on stderr and in the report's notes, and still
    writes: the output error alone cannot tell a collapse from logits that moved with the task
    intact, so the warning points at --eval."""
    import onnx

    from edgec import report
    from edgec.cli import main

    model = ALL_MODELS["resnet_basic"](batch=1)
    src, out = tmp_path / "m.onnx", tmp_path / "p.onnx"
    onnx.save(model, src)
    samples = _calib(model, 16)
    np.savez(tmp_path / "calib.npz", **{k: np.concatenate([c[k] for c in samples]) for k in samples[0]})
    calib = str(tmp_path / "calib.npz")
    ok = edgec.compile(src, out, prune=0.3, calib=calib, round_to=1)
    err = ok.report["pruning"]["error"]
    assert 0 < err["rel_l2"] < 0.5 and err["samples"] == 16
    held = err.get("held_out_rel_l2")
    assert held is None or held > 0
    text = report.compile_text(ok.report)
    assert "pruned float model's output error" in text
    # the re-fit's line: how many layers, which prior each took, the least recovered one
    rec = [e for e in ok.report["pruning"]["reconstruction"] if "val_mse_before" in e]
    refit = [e for e in rec if e["refit"]]
    worst = max(rec, key=lambda e: e["val_rel_l2"])
    assert refit and all(e["prior"] in ("zero", "current") for e in refit)
    assert all(0 <= e["val_rel_l2"] < 1 for e in rec)
    assert f"re-fitted {len(refit)} of {len(rec)} layers reading pruned channels" in text
    assert f"least recovered: {worst['layer']} (held-out relative L2 {worst['val_rel_l2']:.3g})" in text
    assert not any("far from the original" in n for n in ok.report["notes"])
    far = edgec.compile(src, out, prune=0.9, calib=calib, reconstruct=False, round_to=1)
    assert far.report["pruning"]["error"]["rel_l2"] > 0.5
    assert any("far from the original" in n and "--eval" in n for n in far.report["notes"])
    out.unlink()
    assert main(["compile", str(src), "-o", str(out), "--prune", "0.9", "--calib", calib, "--no-reconstruct",
                 "--round-to", "1"]) == 0 and out.exists()
    assert "far from the original" in capsys.readouterr().err
