"""The clean-up every target's pipeline starts from (exact rewrites only)."""

from __future__ import annotations

from edgec.passes import (CollapseReshapes, DedupInitializers, EliminateDead, EliminateIdentity, FoldBatchNorm,
                          FoldConstants, FoldConvAffine, FoldShapes, FuseTransposes, InferShapes, InlineIf)
from edgec.pipeline import FixedPoint


def lossless_pipeline(extra: list | tuple = (), fold_bytes: int | None = None) -> list:
    """The clean-up every target starts from: exact rewrites, repeated to a fixed point.

    ``extra`` passes (a target's own rewrites) join the fixed-point group, after the clean-up.
    ``fold_bytes``: how large a tensor computed from constants may fold even where it is larger
    than its inputs (``FoldConstants(small_bytes=...)``; default 1 KiB).
    """
    fold = FoldConstants() if fold_bytes is None else FoldConstants(small_bytes=fold_bytes)
    return [
        EliminateDead(),
        InferShapes(),
        FixedPoint([FoldShapes(), fold, InlineIf(), EliminateIdentity(), FuseTransposes(), CollapseReshapes(),
                    FoldBatchNorm(), FoldConvAffine(), *extra]),
        DedupInitializers(),
        EliminateDead(),
    ]


def prune_cleanup() -> list:
    """The exact clean-up channel pruning reads its graph after: shapes and constants folded,
    identities and dead nodes removed, everything else (BatchNorm, transposes, reshapes) as the
    exporter wrote it. PyTorch's exporter writes an initializer equal to an earlier one as an
    ``Identity`` of it; read through that Identity, the layer's bias or scale looks computed and
    its channel group unprunable."""
    return [EliminateDead(), InferShapes(), FixedPoint([FoldShapes(), FoldConstants(), InlineIf(), EliminateIdentity()]),
            EliminateDead()]
