"""edgec passes: one rewrite per file; importing this package registers them all."""

from . import (  # noqa: F401
    collapse_reshapes,
    dedup_initializers,
    eliminate_dead,
    eliminate_identity,
    fold_batchnorm,
    fold_constants,
    fold_conv_affine,
    fold_shapes,
    fuse_transposes,
    infer_shapes,
)

from .collapse_reshapes import CollapseReshapes
from .dedup_initializers import DedupInitializers
from .eliminate_dead import EliminateDead
from .eliminate_identity import EliminateIdentity
from .fold_batchnorm import FoldBatchNorm
from .fold_constants import FoldConstants
from .fold_conv_affine import FoldConvAffine
from .fold_shapes import FoldShapes
from .fuse_transposes import FuseTransposes
from .infer_shapes import InferShapes

__all__ = ["CollapseReshapes", "DedupInitializers", "EliminateDead", "EliminateIdentity", "FoldBatchNorm",
           "FoldConstants", "FoldConvAffine", "FoldShapes", "FuseTransposes", "InferShapes"]
