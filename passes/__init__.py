"""edgec passes: one rewrite per file; importing this package registers them all."""

from . import (  # noqa: F401
    collapse_reshapes,
    convert_fp16,
    decompose_ops,
    dedup_initializers,
    eliminate_dead,
    equalize_layers,
    eliminate_identity,
    fold_batchnorm,
    fold_constants,
    fold_conv_affine,
    fix_input_shapes,
    fold_shapes,
    fuse_transposes,
    gemm_to_conv,
    infer_shapes,
    inline_if,
    narrow_int64,
    prune_channels,
    quantize,
    reconstruct,
    shuffle_to_4d,
    sparsify_24,
)

from .collapse_reshapes import CollapseReshapes
from .convert_fp16 import ConvertFP16
from .decompose_ops import DecomposeOps
from .dedup_initializers import DedupInitializers
from .eliminate_dead import EliminateDead
from .equalize_layers import EqualizeLayers
from .eliminate_identity import EliminateIdentity
from .fold_batchnorm import FoldBatchNorm
from .fold_constants import FoldConstants
from .fold_conv_affine import FoldConvAffine
from .fix_input_shapes import FixInputShapes
from .fold_shapes import FoldShapes
from .fuse_transposes import FuseTransposes
from .gemm_to_conv import GemmToConv
from .infer_shapes import InferShapes
from .inline_if import InlineIf
from .narrow_int64 import NarrowInt64
from .prune_channels import PruneChannels
from .quantize import QuantizeQDQ
from .reconstruct import Reconstruct
from .shuffle_to_4d import ShuffleTo4D
from .sparsify_24 import Sparsify24

__all__ = ["CollapseReshapes", "ConvertFP16", "DecomposeOps", "DedupInitializers", "EliminateDead", "EqualizeLayers", "EliminateIdentity",
           "FixInputShapes", "FoldBatchNorm", "FoldConstants", "FoldConvAffine", "FoldShapes", "FuseTransposes",
           "GemmToConv", "InferShapes", "InlineIf", "NarrowInt64", "PruneChannels", "QuantizeQDQ", "Reconstruct", "ShuffleTo4D", "Sparsify24"]
