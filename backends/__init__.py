"""edgec targets: one device family per file. ``get_target(name)`` returns its profile."""

from __future__ import annotations

from edgec.errors import UserError
from edgec.target import Target


def lossless_pipeline(extra: list | tuple = ()) -> list:
    """The clean-up every target starts from: exact rewrites, repeated to a fixed point.

    ``extra`` passes (a target's own rewrites) join the fixed-point group, after the clean-up.
    """
    from edgec.passes import (CollapseReshapes, DedupInitializers, EliminateDead, EliminateIdentity,
                              FoldBatchNorm, FoldConstants, FoldConvAffine, FoldShapes, FuseTransposes,
                              InferShapes)
    from edgec.pipeline import FixedPoint

    return [
        EliminateDead(),
        InferShapes(),
        FixedPoint([FoldShapes(), FoldConstants(), EliminateIdentity(), FuseTransposes(), CollapseReshapes(),
                    FoldBatchNorm(), FoldConvAffine(), *extra]),
        DedupInitializers(),
        EliminateDead(),
    ]


def targets() -> dict[str, Target]:
    from . import cpu, jetson, neon, rknn

    return {t.name: t for t in (cpu.TARGET, neon.TARGET, jetson.TARGET, rknn.TARGET)}


def get_target(name: str, options: dict | None = None) -> Target:
    """The profile of target ``name`` with ``--target-option`` overrides applied."""
    all_targets = targets()
    if name not in all_targets:
        raise UserError(f"unknown target '{name}' (known: {', '.join(sorted(all_targets))})")
    return all_targets[name].with_options(options)
