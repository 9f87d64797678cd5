"""Small helpers shared by several passes (not a pass)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

# Ops whose result is not a pure function of their inputs: never folded or merged.
NONDETERMINISTIC = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                    "Multinomial", "Bernoulli"}
# Ops that carry quantization intent: folding them would undo a quantized model.
QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}


def has_subgraph(node: gs.Node) -> bool:
    return any(isinstance(v, gs.Graph) or (isinstance(v, list) and v and isinstance(v[0], gs.Graph))
               for v in node.attrs.values())


def is_default_domain(node: gs.Node) -> bool:
    return node.domain in (None, "", "ai.onnx")


def per_channel(value: np.ndarray, out_rank: int, channels: int, axis: int = 1) -> np.ndarray | None:
    """``value`` as a length-``channels`` vector if, right-aligned to ``out_rank`` dims (ONNX
    broadcasting), it varies along ``axis`` only; else None (it would change other elements)."""
    if value.ndim > out_rank:
        return None
    shape = (1,) * (out_rank - value.ndim) + tuple(value.shape)
    if any(d != 1 for i, d in enumerate(shape) if i != axis) or shape[axis] not in (1, channels):
        return None
    return np.broadcast_to(value.reshape(-1), (channels,)).copy()
