"""edgec targets: one device family per file. ``get_target(name)`` returns its profile."""

from __future__ import annotations

from edgec.errors import UserError
from edgec.target import Target


def lossless_pipeline() -> list:
    """The clean-up every target starts from: exact rewrites, repeated to a fixed point."""
    from edgec.passes import (CollapseReshapes, DedupInitializers, EliminateDead, EliminateIdentity,
                              FoldBatchNorm, FoldConstants, FoldConvAffine, FoldShapes, FuseTransposes,
                              InferShapes)
    from edgec.pipeline import FixedPoint

    return [
        EliminateDead(),
        InferShapes(),
        FixedPoint([FoldShapes(), FoldConstants(), EliminateIdentity(), FuseTransposes(), CollapseReshapes(),
                    FoldBatchNorm(), FoldConvAffine()]),
        DedupInitializers(),
        EliminateDead(),
    ]


def targets() -> dict[str, Target]:
    from . import cpu

    return {t.name: t for t in (cpu.TARGET,)}


def get_target(name: str) -> Target:
    all_targets = targets()
    if name not in all_targets:
        raise UserError(f"unknown target '{name}' (known: {', '.join(sorted(all_targets))})")
    return all_targets[name]
