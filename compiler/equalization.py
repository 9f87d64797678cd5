"""Cross-layer equalisation (Nagel et al. 2019, AIMET's CLE): the arithmetic, on the float graph.

For ``Conv1 -> [Relu] -> Conv2`` where Conv1's output and the Relu's have no other reader,
output channel ``i`` of Conv1 is divided by ``s_i`` and input channel ``i`` of Conv2 multiplied
by it (ReLU is positively homogeneous), with ``s_i = sqrt(r1_i / r2_i)`` from the channel's
weight ranges in both layers: afterwards both ranges equal ``sqrt(r1_i * r2_i)``. Conv2 may be a
regular (group 1) or depthwise convolution; Conv1 any convolution. Clip/ReLU6 is not
positively homogeneous: such pairs are left alone. Repeated ``sweeps`` times so chains
converge.

:func:`equalize` only computes the new weights (``{node id: {input slot: array}}``), so
quantization can measure a plan with and without them; the ``equalize_layers`` pass
(:mod:`edgec.passes.equalize_layers`) writes them into the IR. The rewrite is lossless.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .ir import IR, is_empty
from .quant_plan import node_id



def pairs(ir: IR) -> list[tuple[gs.Node, gs.Node]]:
    """The equalisable ``(Conv1, Conv2)`` pairs, in graph order."""
    out = []
    for c1 in ir.find("Conv"):
        w1 = ir.const_value(c1.inputs[1]) if len(c1.inputs) > 1 else None
        if w1 is None or w1.dtype != np.float32 or w1.ndim < 3:
            continue
        if len(c1.inputs) > 2 and not is_empty(c1.inputs[2]) and ir.const_value(c1.inputs[2]) is None:
            continue
        nxt = ir.single_consumer(c1.outputs[0])
        if nxt is None:
            continue
        if nxt.op == "Relu":
            nxt = ir.single_consumer(nxt.outputs[0])
            if nxt is None:
                continue
        if nxt.op != "Conv":
            continue
        w2 = ir.const_value(nxt.inputs[1]) if len(nxt.inputs) > 1 else None
        if w2 is None or w2.dtype != np.float32:
            continue
        c = w1.shape[0]
        g2 = int(nxt.attrs.get("group", 1))
        if not ((g2 == 1 and w2.shape[1] == c) or (g2 == c and w2.shape[0] == c and w2.shape[1] == 1)):
            continue
        out.append((c1, nxt))
    return out


def worthwhile(ir: IR, per_tensor: bool) -> bool:
    """Whether trying equalisation is worth a measurement: equalisable pairs exist and weights
    are per-tensor or a pair involves a depthwise convolution (MobileNet-style nets, where
    per-channel scales alone leave activations unbalanced)."""
    found = pairs(ir)
    if not found:
        return False
    return per_tensor or any(int(c.attrs.get("group", 1)) > 1 for pair in found for c in pair)


def equalize(ir: IR, sweeps: int = 3) -> dict[str, dict[int, np.ndarray]]:
    """The equalised weights and biases, ``{node id: {input slot: float32 array}}`` (empty when
    nothing changes); the IR is not modified."""
    return equalize_with_scales(ir, sweeps)[0]


def equalize_with_scales(ir: IR, sweeps: int = 3) -> tuple[dict[str, dict[int, np.ndarray]], dict[str, np.ndarray]]:
    """:func:`equalize`'s weights, and by how much each changed convolution's output channels
    are divided (``{node id: per-channel divisor}``): the equalised output is the original's
    divided by it, so per-channel statistics of the original give the equalised ones."""
    found = pairs(ir)
    divisors: dict[str, np.ndarray] = {}
    cur: dict[tuple[str, int], np.ndarray] = {}

    def get(node, slot):
        key = (node_id(node), slot)
        if key not in cur:
            cur[key] = ir.const_value(node.inputs[slot]).astype(np.float64)
        return cur[key]

    changed: set[tuple[str, int]] = set()
    for _ in range(sweeps):
        for c1, c2 in found:
            w1, w2 = get(c1, 1), get(c2, 1)
            c = w1.shape[0]
            depthwise = int(c2.attrs.get("group", 1)) == c and w2.shape[1] == 1 and c > 1
            r1 = np.abs(w1.reshape(c, -1)).max(axis=1)
            r2 = (np.abs(w2.reshape(c, -1)).max(axis=1) if depthwise
                  else np.abs(np.moveaxis(w2, 1, 0).reshape(c, -1)).max(axis=1))
            ok = (r1 > 0) & (r2 > 0)
            s = np.ones(c)
            s[ok] = np.sqrt(r1[ok] / r2[ok])
            if np.allclose(s, 1.0, rtol=1e-3):
                continue
            cur[(node_id(c1), 1)] = w1 / s.reshape((-1,) + (1,) * (w1.ndim - 1))
            changed.add((node_id(c1), 1))
            divisors[node_id(c1)] = divisors.get(node_id(c1), np.ones(c)) * s
            if len(c1.inputs) > 2 and not is_empty(c1.inputs[2]):
                cur[(node_id(c1), 2)] = get(c1, 2) / s
                changed.add((node_id(c1), 2))
            if depthwise:
                cur[(node_id(c2), 1)] = w2 * s.reshape((-1,) + (1,) * (w2.ndim - 1))
            else:
                cur[(node_id(c2), 1)] = w2 * s.reshape((1, -1) + (1,) * (w2.ndim - 2))
            changed.add((node_id(c2), 1))
    out: dict[str, dict[int, np.ndarray]] = {}
    for nid, slot in sorted(changed):
        out.setdefault(nid, {})[slot] = cur[(nid, slot)].astype(np.float32)
    return out, divisors


def scaled_tensors(ir: IR, divisors: dict[str, np.ndarray]) -> dict[str, tuple[str, np.ndarray]]:
    """The activations equalisation scales per channel: each divided convolution's output and,
    when a Relu alone reads it, the Relu's output (ReLU is positively homogeneous); tensor ->
    (node id, per-channel divisor on axis 1)."""
    nodes = {node_id(n): n for n in ir.nodes if n.outputs}
    out = {}
    for nid, d in divisors.items():
        y = nodes[nid].outputs[0]
        out[y.name] = (nid, d)
        nxt = ir.single_consumer(y)
        if nxt is not None and nxt.op == "Relu":
            out[nxt.outputs[0].name] = (nid, d)
    return out
