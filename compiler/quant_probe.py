"""The probe: one measuring model that evaluates any quantization plan without rewriting the IR.

Choosing how to quantize means measuring many plans: bias correction, cross-layer
equalisation kept or not, a precision per layer for ``--quantize mixed``. Writing each plan
into a copy of the IR and exporting it would serialise the model once per measurement. The
probe is built once, from the float model, and every plan is a set of *inputs* to it:

- every weighted layer's weight (and bias) is a graph input: the float weight, or the
  fake-quantized one (``DequantizeLinear``'s result, computed bit for bit in numpy by
  :mod:`edgec.quant_plan`, the functions the materialiser writes with);
- every activation tensor a plan may quantize has ``QuantizeLinear -> DequantizeLinear`` with
  its scale and zero point as graph inputs, and each of its readers reads
  ``Where(switch, dequantized, float)``, the switch a boolean input per (reader, input slot);
- a folded Relu stays: with the plan's zero-floored range, ``Q(x)`` already saturates below 0,
  so ``Relu(DQ(Q(x)))`` is ``DQ(Q(x))`` exactly;
- every activation tensor and every layer output is also a graph output (calibration with
  equalised weights, per-channel means for bias correction).

Runs go through the reference executor (:mod:`edgec.runtime`: ONNX Runtime, optimisations off),
so a plan's measured outputs are those of the materialised model in reference arithmetic: the
same float kernels on the same values (``Where`` selects exactly), bit for bit for int8 layers
(``tests/test_quantization.py``). A layer a plan keeps float may differ in its last bit: the
written model holds its weight as a constant, which ONNX Runtime may pre-pack, where the probe
feeds it. One session serves every measurement of a compile.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from . import runtime
from .ir import IR, is_empty, onnx_elem_type
from .quant_plan import QRANGE, WIDE, QuantPlan, qdq_domain, bias_form, fake_quantized_weight, node_id, out_channels, weight_arrays, weighted_nodes
from .quant_rules import table_for
from .runtime import error_metrics, reference_session, run_batches

PREFIX = "edgec.probe."


def _has_bias(node: gs.Node) -> bool:
    return len(node.inputs) > 2 and not is_empty(node.inputs[2])


class ChannelMeans:
    """Per-channel means of layers' outputs over batches (channel axis 1; Gemm's last)."""

    def __init__(self, layers: dict[str, gs.Node]):
        self.layers = layers
        self.tensors = {i: n.outputs[0].name for i, n in layers.items()}
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: dict[str, np.ndarray]) -> None:
        for i, t in self.tensors.items():
            v = values.get(t)
            if v is None or v.ndim < 2:
                continue
            ax = -1 if self.layers[i].op == "Gemm" else 1
            v = np.moveaxis(v.astype(np.float64), ax, 0).reshape(v.shape[ax], -1)
            self.sums[i] = self.sums.get(i, 0) + v.sum(axis=1)
            self.counts[i] = self.counts.get(i, 0) + v.shape[1]

    def result(self) -> dict[str, np.ndarray]:
        return {i: self.sums[i] / self.counts[i] for i in self.sums}


class Probe:
    """The measuring model for ``ir`` (the float graph, not modified) exported as
    ``float_model``, for plans of ``scheme`` that quantize at most the activations and layers of
    ``widest`` (the plan with every layer int8: other plans quantize subsets of it).

    ``switchable=False`` (int8: every plan measured has the widest plan's structure, only its
    scales, weights and biases differ) wires the Q/DQ pairs as the materialiser will, folded
    ReLUs removed, with no switches: the probe then costs what the quantized model costs.
    ``switchable=True`` (mixed precision, where plans quantize subsets) puts a switch on every
    reader edge. Every tensor of ``observe`` is also an output; with ``layer_inputs``, so are the
    data input each layer reads (``layer_input[node id]``: its dequantized copy where quantized)
    and its output. Nothing else is: ONNX Runtime keeps every graph output of a run allocated until
    the run ends, fetched or not, so on a high-resolution detector each one costs its whole map
    for every batch in flight.

    ``wide=True`` (the int8 fallback's 16-bit step) makes every Q/DQ pair 16-bit followed by a
    ``Clip`` whose bounds are inputs too: an 8-bit tensor is quantized on its own scale and zero
    point and clipped to its 8-bit levels' span, which is the 8-bit pair's result exactly
    (``round(x / s) + z`` is the same integer; a level beyond the 8-bit ones dequantizes past the
    bound and is clipped to it); a 16-bit tensor is not clipped. So a plan mixing 8- and 16-bit
    tensors is measured by one session."""

    def __init__(self, ir: IR, float_model: onnx.ModelProto, scheme, widest: QuantPlan, *, switchable: bool = True,
                 adaptive: Iterable[str] = (), observe: Iterable[str] = (), layer_inputs: bool = False,
                 wide: bool = False):
        self.ir = ir
        self.wide = wide
        self.observe = list(observe)
        self.with_layer_inputs = layer_inputs
        self.layer_input: dict[str, str] = {}
        self.adaptive = [i for i in adaptive]
        self.dtype = "int8" if scheme.activations == "symmetric" else "uint8"
        self.tensors = list(widest.activations)
        self.widest, self.switchable = widest, switchable
        table = table_for(scheme)
        self.layers = {node_id(n): n for n in weighted_nodes(ir, table) if node_id(n) in widest.weights}
        self.float_w: dict[str, np.ndarray] = {}
        self.float_b: dict[str, np.ndarray | None] = {}
        self._cache: dict = {}
        self._fpm_shape: dict[str, list[int]] = {}
        self._axes_inits: list = []
        self.model = self._build(float_model)
        self.session = reference_session(self.model)
        self.graph_outputs = runtime.output_names(float_model)
        self.runs = 0

    # ------------------------------------------------------------------ building
    def _build(self, float_model: onnx.ModelProto) -> onnx.ModelProto:
        m = onnx.ModelProto()
        m.CopyFrom(float_model)
        g = m.graph
        inits = {i.name: i for i in g.initializer}
        new_inputs = []
        by_id = {n.output[0]: n for n in g.node if n.output}
        for nid, node in self.layers.items():
            pn = by_id[nid]
            w = self.ir.const_value(node.inputs[1])
            self.float_w[nid] = w
            wname = PREFIX + "w." + nid
            pn.input[1] = wname
            new_inputs.append(helper.make_tensor_value_info(wname, TensorProto.FLOAT, list(w.shape)))
            if node.op in ("Conv", "ConvTranspose", "Gemm"):
                b = self._float_bias(node, w)
                if b is None:  # a broadcast Gemm C, or a bias that is not a constant: left as it is
                    self.float_b[nid] = None
                    continue
                self.float_b[nid] = b
                bname = PREFIX + "b." + nid
                if len(pn.input) > 2:
                    pn.input[2] = bname
                else:
                    pn.input.append(bname)
                if node.op == "Gemm":
                    for a in pn.attribute:
                        if a.name == "beta":
                            a.f = 1.0
                new_inputs.append(helper.make_tensor_value_info(bname, TensorProto.FLOAT, [b.shape[0]]))
        used = {x for n in g.node for x in n.input}
        keep = [i for i in g.initializer if i.name in used or i.name in {o.name for o in g.output}]
        del g.initializer[:]
        g.initializer.extend(keep)
        del inits

        graph_outputs = {o.name for o in g.output}
        if not self.switchable:  # folded ReLUs go, as in the materialised model
            folded = set(self.widest.folded)
            renamed = {}
            kept = []
            for pn in g.node:
                if pn.output and pn.output[0] in folded:
                    renamed[pn.output[0]] = pn.input[0]
                    if pn.output[0] not in graph_outputs:
                        continue
                kept.append(pn)
            for pn in kept:
                for i, x in enumerate(pn.input):
                    if x in renamed and not (pn.output and pn.output[0] in folded):
                        pn.input[i] = renamed[x]
            del g.node[:]
            g.node.extend(kept)

        opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 17)
        self._adaptive_ranks = {}
        for nid in self.adaptive:
            shape = self.layers[nid].outputs[0].shape if nid in self.layers else None
            if shape is not None and len(shape) >= 2:
                self._adaptive_ranks[nid] = len(shape)
        self.adaptive = list(self._adaptive_ranks)

        # Q/DQ on every probed tensor; its readers read the dequantized copy (switchable: through a
        # Where per reader edge)
        chain = WIDE[self.dtype] if self.wide else self.dtype  # the Q/DQ pairs' integer type
        qtype = onnx_elem_type(np.dtype(chain))
        qdomain = qdq_domain(chain, opset)
        if qdomain and not any(o.domain == qdomain for o in m.opset_import):
            m.opset_import.append(helper.make_opsetid(qdomain, 1))
        probed = set(self.tensors)
        self.edges: dict[str, list[tuple[str, int]]] = {}
        nodes = []
        made: set[str] = set()
        for pn in list(g.node):
            reader = pn.output[0] if pn.output else pn.name
            for slot, x in enumerate(pn.input):
                if x not in probed:
                    continue
                readers = self.widest.activations[x].readers
                if not self.switchable and readers is not None and (reader, slot) not in readers:
                    continue
                if x not in made:
                    s, z = PREFIX + "s." + x, PREFIX + "z." + x
                    new_inputs.append(helper.make_tensor_value_info(s, TensorProto.FLOAT, []))
                    new_inputs.append(helper.make_tensor_value_info(z, qtype, []))
                    nodes.append(helper.make_node("QuantizeLinear", [x, s, z], [PREFIX + "q." + x], domain=qdomain))
                    if self.wide:
                        lo, hi = PREFIX + "lo." + x, PREFIX + "hi." + x
                        new_inputs.append(helper.make_tensor_value_info(lo, TensorProto.FLOAT, []))
                        new_inputs.append(helper.make_tensor_value_info(hi, TensorProto.FLOAT, []))
                        nodes.append(helper.make_node("DequantizeLinear", [PREFIX + "q." + x, s, z],
                                                      [PREFIX + "dq16." + x], domain=qdomain))
                        nodes.append(helper.make_node("Clip", [PREFIX + "dq16." + x, lo, hi], [PREFIX + "dq." + x]))
                    else:
                        nodes.append(helper.make_node("DequantizeLinear", [PREFIX + "q." + x, s, z],
                                                      [PREFIX + "dq." + x]))
                    made.add(x)
                self.edges.setdefault(x, []).append((reader, slot))
                if not self.switchable:
                    pn.input[slot] = PREFIX + "dq." + x
                    continue
                e = f"{PREFIX}e.{slot}.{reader}"
                new_inputs.append(helper.make_tensor_value_info(e, TensorProto.BOOL, []))
                sel = f"{PREFIX}sel.{slot}.{reader}"
                nodes.append(helper.make_node("Where", [e, PREFIX + "dq." + x, x], [sel]))
                pn.input[slot] = sel
            nodes.append(pn)
            if reader in self._adaptive_ranks:
                nodes.extend(self._adaptive_nodes(pn, new_inputs, opset))
        if self.with_layer_inputs:
            for pn in nodes:
                if not pn.output or not pn.input:
                    continue
                nid = pn.output[0]
                if nid.startswith(PREFIX + "raw."):
                    nid = nid[len(PREFIX + "raw."):]
                if nid in self.layers and pn.op_type == self.layers[nid].op:
                    self.layer_input[nid] = pn.input[0]
        del g.node[:]
        g.node.extend(nodes)
        g.input.extend(new_inputs)
        g.initializer.extend(self._axes_inits)
        have = {o.name for o in g.output}
        # (a graph output stays allocated through a run, fetched or not: a weighted layer's output is
        # one only where rounding reads it, beside the layer's input)
        layer_outputs = [n.outputs[0].name for n in self.layers.values()] if self.with_layer_inputs else []
        for t in self.observe + list(self.layer_input.values()) + layer_outputs + [
                f"{PREFIX}{k}.{nid}" for nid in self.adaptive for k in ("delta", "n")]:
            if t not in have:
                g.output.append(helper.make_empty_tensor_value_info(t))
                have.add(t)
        self.input_names = {i.name for i in g.input}
        return m

    def _adaptive_nodes(self, pn, new_inputs: list, opset: int) -> list:
        """Per-batch bias correction inside the graph, for :meth:`adapt`: the layer's output
        plus ``flag * (float mean - this batch's mean)`` per channel (flag 0: unchanged)."""
        nid = pn.output[0]
        rank = self._adaptive_ranks[nid]
        gemm = self.layers[nid].op == "Gemm"
        axis = rank - 1 if gemm else 1
        axes = [a for a in range(rank) if a != axis]
        raw, mean, diff, delta = (f"{PREFIX}{k}.{nid}" for k in ("raw", "mean", "diff", "delta"))
        fpm, flag, size = PREFIX + "fpm." + nid, PREFIX + "flag." + nid, PREFIX + "n." + nid
        pn.output[0] = raw
        shape = [1] * rank
        shape[axis] = -1
        self._fpm_shape[nid] = shape
        new_inputs.append(helper.make_tensor_value_info(fpm, TensorProto.FLOAT, None))
        new_inputs.append(helper.make_tensor_value_info(flag, TensorProto.FLOAT, []))
        if opset >= 18:
            axes_name = PREFIX + "axes." + nid
            self._axes_inits.append(helper.make_tensor(axes_name, TensorProto.INT64, [len(axes)], axes))
            reduce = helper.make_node("ReduceMean", [raw, axes_name], [mean], keepdims=1)
        else:
            reduce = helper.make_node("ReduceMean", [raw], [mean], axes=axes, keepdims=1)
        return [reduce, helper.make_node("Sub", [fpm, mean], [diff]),
                helper.make_node("Mul", [diff, flag], [delta]), helper.make_node("Add", [raw, delta], [nid]),
                helper.make_node("Size", [raw], [size])]

    def _float_bias(self, node, w: np.ndarray) -> np.ndarray | None:
        out_ch = out_channels(node, w)
        if _has_bias(node):
            b = self.ir.const_value(node.inputs[2])
            if b is None or b.dtype != np.float32:
                return None
            if node.op == "Gemm":
                if b.ndim != 1 or b.shape[0] != out_ch:
                    return None
                beta = float(node.attrs.get("beta", 1.0))
                return (b * np.float32(beta)).astype(np.float32) if beta != 1.0 else b
            return b.reshape(-1) if b.size == out_ch else None
        return np.zeros(out_ch, dtype=np.float32)

    # ------------------------------------------------------------------ plan -> inputs
    def inputs_for(self, plan: QuantPlan | None, weights: dict[str, dict[int, np.ndarray]] | None = None,
                   adapt: dict[str, np.ndarray] | None = None) -> dict:
        """The probe's non-data inputs that make it compute ``plan`` (None: the float model), with
        ``weights`` (``{node id: {slot: array}}``, e.g. equalised ones) replacing the float ones,
        and per-batch bias correction towards ``adapt``'s float means (layer -> per-channel
        means) on those layers."""
        weights = weights or {}
        feeds: dict[str, np.ndarray] = {}
        for nid in self.adaptive:
            target = (adapt or {}).get(nid)
            on = target is not None
            c = self.float_b[nid].shape[0] if self.float_b.get(nid) is not None else 1
            value = np.asarray(target if on else np.zeros(c), dtype=np.float32)
            feeds[PREFIX + "fpm." + nid] = value.reshape(self._fpm_shape[nid])
            feeds[PREFIX + "flag." + nid] = np.array(1.0 if on else 0.0, dtype=np.float32)
        qdt = np.dtype(WIDE[self.dtype] if self.wide else self.dtype).type
        allowed = (self.dtype, WIDE[self.dtype]) if self.wide else (self.dtype,)
        acts = plan.activations if plan is not None else {}
        if not self.switchable and (plan is None or plan.folded != self.widest.folded or {
                k: v.readers for k, v in acts.items()} != {k: v.readers for k, v in self.widest.activations.items()}):
            raise ValueError("this probe measures plans with its widest plan's structure only (switchable=False)")
        for x, edges in self.edges.items():
            aq = acts.get(x)
            if aq is not None and aq.dtype not in allowed:
                raise ValueError(f"the probe measures {' and '.join(allowed)} activations, the plan has {aq.dtype}")
            scale = np.float32(aq.scale if aq is not None else 1.0)
            feeds[PREFIX + "s." + x] = np.array(scale, dtype=np.float32)
            feeds[PREFIX + "z." + x] = np.array(aq.zero_point if aq is not None else 0, dtype=qdt)
            if self.wide:  # an 8-bit tensor: its levels' span, as DequantizeLinear computes it
                span = (np.float32(-np.inf), np.float32(np.inf))
                if aq is not None and aq.dtype == self.dtype:
                    span = tuple(np.float32(q - aq.zero_point) * scale for q in QRANGE[aq.dtype])
                feeds[PREFIX + "lo." + x], feeds[PREFIX + "hi." + x] = (np.array(v, dtype=np.float32) for v in span)
            if not self.switchable:
                continue
            for reader, slot in edges:
                on = aq is not None and (aq.readers is None or (reader, slot) in aq.readers)
                feeds[f"{PREFIX}e.{slot}.{reader}"] = np.array(on)
        wplan = plan.weights if plan is not None else {}
        for nid, node in self.layers.items():
            over = weights.get(nid, {})
            w = over.get(1, self.float_w[nid])
            wq = wplan.get(nid)
            b_name = PREFIX + "b." + nid
            if wq is None:
                feeds[PREFIX + "w." + nid] = w
                if b_name in self.input_names:
                    feeds[b_name] = over.get(2, self.float_b[nid])
                continue
            rounded = plan.rounded.get(nid)
            key = (nid, wq.kind, wq.axis, plan.weight_format, id(over.get(1)), id(rounded))
            if key not in self._cache:  # (the arrays keyed by id are held, so no id is reused)
                self._cache[key] = (over.get(1), rounded, fake_quantized_weight(w, wq, plan.weight_format, rounded))
            feeds[PREFIX + "w." + nid] = self._cache[key][2]
            if b_name not in self.input_names:
                continue
            fb = over.get(2, self.float_b[nid])
            aq = acts.get(wq.input)
            raw = None
            has_bias = _has_bias(node)
            if has_bias:
                raw = over.get(2) if 2 in over else self.ir.const_value(node.inputs[2])
            _, w_scale, _ = weight_arrays(w, wq, rounded)
            form = bias_form(node, w, raw, has_bias, aq.scale if aq is not None else None, w_scale,
                             plan.bias_shift.get(nid), wq.bias)
            feeds[b_name] = form.value if form is not None else fb
        return feeds

    # ------------------------------------------------------------------ running
    def run(self, plan: QuantPlan | None, batches: Iterable[dict], fetch: list[str] | None = None, *,
            weights=None) -> Iterator[tuple[dict, dict[str, np.ndarray]]]:
        """``(batch, values of fetch)`` for each batch under ``plan`` (``fetch`` default: the
        graph outputs)."""
        fixed = self.inputs_for(plan, weights)
        names = list(fetch) if fetch is not None else self.graph_outputs
        self.runs += 1
        yield from run_batches(self.session, names, batches, fixed=fixed)

    def adapt(self, plan: QuantPlan, batches, fp_means: dict[str, np.ndarray], *, weights=None) -> dict:
        """Bias correction in one pass: every layer of ``fp_means`` has its output's per-channel
        mean moved to the float model's, batch by batch and in graph order (each layer sees the
        layers before it corrected), and the correction each needed is averaged over the batches
        (weighted by the values each covered). Returns layer -> per-channel shift."""
        layers = [i for i in self.adaptive if i in fp_means and i in plan.weights]
        if not layers:
            return {}
        fixed = self.inputs_for(plan, weights, adapt={i: fp_means[i] for i in layers})
        fetch = [f"{PREFIX}{k}.{i}" for i in layers for k in ("delta", "n")]
        sums: dict[str, np.ndarray] = {}
        counts: dict[str, float] = {}
        self.runs += 1
        for _, vals in run_batches(self.session, fetch, batches, fixed=fixed):
            for i in layers:
                d = vals[f"{PREFIX}delta.{i}"].astype(np.float64).reshape(-1)
                n = float(vals[f"{PREFIX}n.{i}"]) / max(d.size, 1)
                sums[i] = sums.get(i, 0) + d * n
                counts[i] = counts.get(i, 0) + n
        return {i: sums[i] / counts[i] for i in sums if counts[i] > 0}

    def measure(self, plan, batches, *, means_of: list[str] = (), weights=None) -> tuple[dict, dict]:
        """One pass under ``plan``: the graph outputs over all ``batches`` (concatenated) and the
        per-channel means of the ``means_of`` layers' outputs (see :class:`ChannelMeans`)."""
        if means_of and not self.with_layer_inputs:
            raise ValueError("Probe.measure(means_of=...) needs a probe built with layer_inputs=True "
                             "(only then are the layers' outputs graph outputs)")
        means = ChannelMeans({i: self.layers[i] for i in means_of})
        fetch = list(dict.fromkeys(self.graph_outputs + list(means.tensors.values())))
        parts: dict[str, list] = {n: [] for n in self.graph_outputs}
        for _, vals in self.run(plan, batches, fetch, weights=weights):
            for n in self.graph_outputs:
                parts[n].append(vals[n])
            means.add(vals)
        return runtime.join_batches(parts), means.result()

    def outputs(self, plan, batches, *, weights=None) -> dict[str, np.ndarray]:
        """The graph outputs over all ``batches``, concatenated."""
        return self.measure(plan, batches, weights=weights)[0]

    def output_parts(self, plan, batches, *, weights=None) -> list[dict[str, np.ndarray]]:
        """The graph outputs batch by batch (``Subset.pick`` takes a smaller subset's from them)."""
        return [vals for _, vals in self.run(plan, batches, weights=weights)]

    def error(self, plan, batches, reference: dict[str, np.ndarray], *, weights=None) -> dict:
        """rel_l2 / SQNR / cosine of the outputs under ``plan`` against ``reference`` (the float
        outputs over the same ``batches``, concatenated)."""
        return error_metrics(reference, self.outputs(plan, batches, weights=weights))
