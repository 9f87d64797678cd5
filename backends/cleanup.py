"""The clean-up every target's pipeline starts from (exact rewrites only)."""

from __future__ import annotations

from edgec.passes import (CollapseReshapes, DedupInitializers, EliminateDead, EliminateIdentity, FoldBatchNorm,
                          FoldConstants, FoldConvAffine, FoldShapes, FuseTransposes, InferShapes)
from edgec.pipeline import FixedPoint


def lossless_pipeline(extra: list | tuple = ()) -> list:
    """The clean-up every target starts from: exact rewrites, repeated to a fixed point.

    ``extra`` passes (a target's own rewrites) join the fixed-point group, after the clean-up.
    """
    return [
        EliminateDead(),
        InferShapes(),
        FixedPoint([FoldShapes(), FoldConstants(), EliminateIdentity(), FuseTransposes(), CollapseReshapes(),
                    FoldBatchNorm(), FoldConvAffine(), *extra]),
        DedupInitializers(),
        EliminateDead(),
    ]
