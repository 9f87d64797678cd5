"""Human-readable text for compile reports and inspections (the JSON is the dict itself)."""

from __future__ import annotations

import os

from . import verify as verify_mod
from .outputs import Outputs


def human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{int(n)}{unit}"


def _change(a: float, b: float) -> str:
    if a == 0:
        return "" if b == 0 else "new"
    return f"{(b - a) / a * 100:+.1f}%"


WROTE = {"edgec": "edgec QDQ", "edgec strict": "edgec QDQ, all int8 (the fallback's float ops dropped)",
         "vendor": "the float graph for RKNN own int8"}


def compile_text(r: dict) -> str:
    b, a = r["before"], r["after"]
    lines = [f"edgec: {r.get('model') or 'model'} -> {r.get('output') or '(not written)'}  "
             f"[target {r['target']}, opset {r['opset']['source']} -> {r['opset']['output']}]"]
    for note in r.get("notes", []):
        lines.append(f"  note: {note}")
    lines.append(f"  {'':22}{'before':>12}{'after':>12}{'change':>10}")
    rows = [("params", "params", ""), ("MACs", "macs", ""), ("weight bytes", "bytes", "B"),
            ("peak activations", "peak_activation_bytes", "B"), ("nodes", "nodes", "")]
    for label, key, unit in rows:
        lines.append(f"  {label:22}{human(b[key], unit):>12}{human(a[key], unit):>12}{_change(b[key], a[key]):>10}")
    if b.get("symbolic_dims"):
        lines.append("  (symbolic dims counted as 1: MACs and activations are per batch item)")
    lines.append("  passes:")
    for p in r["passes"]:
        what = []
        if p["nodes_removed"]:
            what.append(f"-{p['nodes_removed']} nodes")
        if p["nodes_added"]:
            what.append(f"+{p['nodes_added']} nodes")
        if p["constants_removed"]:
            what.append(f"{-p['constants_removed']:+d} constants")
        if p["params_removed"]:
            what.append(f"{-p['params_removed']:+d} params")
        status = "changed" if p["changed"] else "-"
        lines.append(f"    {p['name']:22}{status:>8}{p['seconds'] * 1000:9.1f} ms  {', '.join(what)}")
        for n in p["notes"][:8]:
            lines.append(f"      {n}")
        if len(p["notes"]) > 8:
            lines.append(f"      ... and {len(p['notes']) - 8} more notes (see --report)")
    st = r.get("strategy")
    if st:
        budget = ", ".join(f"{k} {st[k]}" for k in ("max_error", "max_bytes") if st.get(k) is not None) or "no budget"
        chosen = ", ".join(f"{k}={v}" for k, v in st["chosen"].items()) or "exact rewrites only"
        lines.append(f"  goal {st['goal']} ({budget}): chose {chosen}")
        for why in st["reasons"]:
            lines.append(f"    - {why}")
        for t in st["tried"]:
            label = ", ".join(f"{k}={v}" for k, v in t["settings"].items()) or "exact"
            err = f"rel L2 {t['rel_l2']:.4g}, " if t.get("rel_l2") is not None else ""
            size = f"{human(t['bytes'], 'B')}, " if t.get("bytes") is not None else ""
            lines.append(f"    tried {label:28} {err}{size}{'ok' if t['ok'] else 'rejected'}: {t['why'][:100]}")
    q = r.get("quantization")
    if q:
        err = q.get("error", {})
        lines.append(f"  quantization: {q.get('mode')} ({q.get('placement', 'onnxruntime')} placement"
                     + (f", {q.get('method')}" if q.get("method") else "")
                     + (f", activations {q.get('activations')}, weights {q.get('weights')}" if q.get("activations") else "")
                     + (f" {q['weight_type']}" if q.get("weight_type") else "")
                     + ")" + (f": calibration-set error rel L2 {err['rel_l2']:.4g}, SQNR {err.get('sqnr_db')} dB"
                              if err.get("rel_l2") is not None else ""))
        for n in q.get("notes") or []:
            if n.startswith(("the input model is already quantized", "the error is measured on")):
                lines.append(f"    note: {n}")
        sim = q.get("simulator_check")
        if sim:
            scores = ", ".join(f"{k} {v:.5f}" if v is not None else f"{k} failed" for k, v in sim["cosine"].items())
            lines.append(f"    {sim['platform']} simulator ({sim['samples']} calibration samples, cosine to float): "
                         f"{scores}: wrote {WROTE.get(sim['chosen'], sim['chosen'])}"
                         f" ({sim['why']})")
        why = (r.get("target_profile") or {}).get("int8", {}).get("reason")
        if why and q.get("mode") not in ("fp16", "vendor") and not sim:
            lines.append(f"    scheme: {why}")
        if q.get("plan"):
            counts = {}
            for prec in q["plan"].values():
                counts[prec] = counts.get(prec, 0) + 1
            lines.append("    precision plan: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        if q.get("calibration", {}).get("clamped"):
            lines.append(f"    ranges: {q['calibration']['clamped']} tensors clamped to what their readers tell apart "
                         "(a hard-swish's input below -3, a hard-sigmoid's outside [-3, 3], a Clip's bounds)")
        mc = q.get("method_choice")
        if mc:
            lines.append(f"    calibration method: auto chose {mc['chosen']} (int8 relative L2 before bias correction: "
                         + ", ".join(f"{m} {e:.4g}" for m, e in mc["rel_l2"].items()) + ")")
        cov = q.get("int8_coverage")
        if cov and cov.get("weighted"):
            lines.append(f"    int8 coverage: {cov['weighted_int8']} of {cov['weighted']} weighted ops")
        rnd = q.get("rounding")
        if rnd:
            if rnd.get("method") == "gptq" and "rel_l2_chosen" in rnd:
                lines.append(f"    rounding: GPTQ levels on {rnd['layers']} layers, relative L2 {rnd['rel_l2_nearest']:.4g} "
                             f"(nearest) -> {rnd['rel_l2_chosen']:.4g}: "
                             + ("kept" if rnd["applied"] else "nearest kept (GPTQ measured no better)"))
            elif rnd.get("why"):
                lines.append(f"    rounding: nearest ({rnd['why']})")
        fb = q.get("fallback")
        if fb:
            wide = (fb.get("sixteen_bit") or {}).get("tensors") or []
            done = " and ".join(x for x in (f"{len(fb['float'])} ops kept float" if fb["float"] else "",
                                            f"{len(wide)} activation tensors on 16 bits" if wide else "") if x)
            lines.append(f"    int8 error {fb['error_before']:.4g} was above the budget {fb['max_error']:g}: "
                         + (f"{done} -> {fb.get('error_after', fb['error_before']):.4g}"
                            + (" (budget met)" if fb.get("met") else " (budget NOT met)")
                            if done else "no op's fallback helped"))
            weights_step = {w["node"] for w in (fb.get("sixteen_bit") or {}).get("float_weights") or []}
            shown = [f for f in fb["float"] if f["node"] not in weights_step][:8]
            shown += [f for f in fb["float"] if f["node"] in weights_step]  # (each with why, however many steps came first)
            for f in shown:
                lines.append(f"      float {f['node']}: {f['why']}")
            if len(shown) < len(fb["float"]):
                lines.append(f"      ... and {len(fb['float']) - len(shown)} more ops float (the report's fallback.float)")
            if wide:
                lines.append(f"      16-bit: {', '.join(w['tensor'] for w in wide[:6])}"
                             + (f" and {len(wide) - 6} more" if len(wide) > 6 else "")
                             + f" ({fb['sixteen_bit']['why']})")
            elif fb.get("sixteen_bit"):
                lines.append(f"      16-bit: {fb['sixteen_bit']['why']}")
        if cov and cov.get("weighted_16bit_input"):
            lines.append(f"    {cov['weighted_16bit_input']} weighted ops read a 16-bit tensor (float kernels in ONNX Runtime)")
        if q.get("trace"):
            worst = sorted(q["trace"], key=lambda t: t["quant_rel_l2"], reverse=True)[:5]
            lines.append("    error trace, noisiest int8 tensors (own rounding / accumulated SQNR): "
                         + "; ".join(f"{t['tensor']} {t['quant_sqnr_db']:.1f}/{t['sqnr_db']:.1f} dB" for t in worst))
    pr = r.get("pruning")
    if pr:
        groups = pr["groups"]
        pruned = [g for g in groups if g.get("removed")]
        blocked = [g for g in groups if not g.get("prunable")]
        how = f"ratio {pr['ratio']:.3f}" if pr.get("ratio") is not None else ""
        if pr.get("macs_target") is not None:
            how = f"MACs target -{pr['macs_target']:.0%} (solved {how})"
        lines.append(f"  pruning: {how}, importance {pr['importance']}, {pr['mode']}, {pr['steps']} step(s), "
                     f"round to {pr['round_to']}, reconstruct {'on' if pr['reconstruct'] else 'off'}: "
                     f"{len(pruned)} of {len(groups)} groups pruned, {len(blocked)} unprunable"
                     + (f", {len(groups) - len(pruned) - len(blocked)} kept whole (rounding, the per-group cap or "
                        f"the allocation)" if len(groups) - len(pruned) - len(blocked) else ""))
        ch = pr.get("choice")
        if ch and ch.get("why"):
            lines.append(f"    auto: kept {ch['chosen']['importance']}/{ch['chosen']['mode']} without measuring: {ch['why']}")
        elif ch:
            lines.append(f"    auto chose {ch['chosen']['importance']}/{ch['chosen']['mode']}: held-out output error "
                         "(the typical sample's relative L2) "
                         + ", ".join(f"{c['importance']}/{c['mode']} {c['said']}" for c in ch["candidates"])
                         + f" on {ch['held_out_samples']} held-out calibration samples ({ch['seconds']:.1f} s)")
        pe = pr.get("error")
        if pe:
            lines.append(f"    pruned float model's output error (relative L2): {pe['rel_l2']:.4g} on {pe['samples']} "
                         f"calibration samples" + (f", {pe['held_out_rel_l2']:.4g} held out (auto's trial)"
                                                   if pe.get("held_out_rel_l2") is not None else ""))
        rec = [e for e in pr.get("reconstruction") or [] if "val_mse_before" in e]
        if rec:
            refit = [e for e in rec if e.get("refit")]
            pooled = sum(1 for e in refit if e.get("rows_of"))
            priors = {p: sum(1 for e in refit if e.get("prior") == p) for p in ("zero", "current")}
            worst = max((e for e in rec if e.get("val_rel_l2") is not None), key=lambda e: e["val_rel_l2"], default=None)
            lines.append(f"    re-fitted {len(refit)} of {len(rec)} layers reading pruned channels"
                         + (f" ({pooled} on the pixels before a global pool)" if pooled else "")
                         + f"; ridge towards zero {priors['zero']}, towards the pruned weights {priors['current']}"
                         + (f"; least recovered: {worst['layer']} (held-out relative L2 {worst['val_rel_l2']:.3g})"
                            if worst else ""))
        for g in pruned[:12]:
            lines.append(f"    {g['id']:>5} {g['channels_before']:>5} -> {g['channels_after']:<5} "
                         f"{'-%.0f%%' % (100 * g['removed'] / max(g['channels_before'], 1)):>5}  {', '.join(g.get('origins', [])[:2])[:60]}")
        if len(pruned) > 12:
            lines.append(f"    ... {len(pruned) - 12} more groups (see --report)")
        for g in blocked[:5]:
            lines.append(f"    {g['id']:>5} kept: {g.get('reason')}")
    lat = r.get("latency_ms")
    if lat:
        lines.append(f"  latency (ONNX Runtime, median): {lat['before']:.3f} ms -> {lat['after']:.3f} ms "
                     f"({lat['before'] / lat['after']:.2f}x)")
    v = r.get("verify")
    if v:
        verdict = "OK" if v["passed"] else "MISMATCH"
        budget = f" (budget {v['max_error']})" if v.get("max_error") is not None else ""
        lines.append(f"  verify ({v['inputs']} inputs, reference arithmetic): max abs error {v['max_abs_error']:.3g}, "
                     f"max rel error {v['max_rel_error']:.3g}, relative L2 {v['rel_l2']:.3g}{budget}, "
                     f"min cosine {v['min_cosine']:.6f}  {verdict}")
        floors = [o["float_floor"] for o in (v.get("outputs") or {}).values() if "float_floor" in o]
        if floors:
            lines.append(f"    float rounding alone (ONNX Runtime's own exact fusions) moves these outputs by up to "
                         f"{max(floors):.3g}; within {verify_mod.FLOOR_FACTOR} times that counts as equal")
        h = v.get("host")
        if h and "rel_l2" in h:
            lines.append(f"    this host, its kernels ({h['host']}): relative L2 "
                         f"{h['rel_l2']:.3g}, SQNR {h['sqnr_db']} dB, min cosine {h['min_cosine']:.6f}"
                         + (f"  note: {h['note']}" if h.get("note") else ""))
        elif h and h.get("error"):
            lines.append(f"    this host, its kernels: ONNX Runtime failed ({h['error']})")
    acc = r.get("accuracy")
    if acc:
        lines.append(f"  accuracy (top-1, {acc['samples']} samples): {acc['before']:.4f} -> {acc['after']:.4f}")
    if "output_file_bytes" in r:
        lines.append(f"  wrote {r['output']} ({human(r['output_file_bytes'], 'B')}) in {r['seconds']:.2f} s")
    return "\n".join(lines)


def inspect_text(info: dict) -> str:
    lines = [f"{info.get('model') or 'model'}: ir_version {info['ir_version']}, opsets "
             + ", ".join(f"{k} {v}" for k, v in info["opsets"].items())
             + (f", producer {info['producer']}" if info["producer"] else "")]
    for note in info.get("notes", []):
        lines.append(f"  note: {note} (costs below are for the converted model, as compile sees it)")
    for kind in ("inputs", "outputs"):
        for t in info[kind]:
            shape = "[" + ", ".join(str(d) for d in t["shape"]) + "]" if t["shape"] is not None else "?"
            lines.append(f"  {kind[:-1]:7} {t['name']}: {t['dtype']}{shape}")
    lines.append(f"  nodes {info['nodes']}, params {human(info['params'])}, MACs {human(info['macs'])}, "
                 f"weight bytes {human(info['bytes'], 'B')}, peak activations {human(info['peak_activation_bytes'], 'B')}"
                 + (" (per batch item)" if info.get("symbolic_dims") else ""))
    lines.append("  ops: " + ", ".join(f"{op} {n}" for op, n in info["op_histogram"].items()))
    if info.get("groups_text"):
        lines.append("  channel groups:")
        lines.extend("    " + line for line in info["groups_text"].rstrip().splitlines())
    if info.get("largest_layers"):
        lines.append("  largest layers:")
        for c in info["largest_layers"]:
            lines.append(f"    {c['op']:18} {c['name'][:40]:40} MACs {human(c['macs']):>9}  params {human(c['params']):>8}")
    return "\n".join(lines)


def write_json(data: dict, path: str | os.PathLike) -> None:
    """Atomic JSON write (checked and written like every output: :mod:`edgec.outputs`)."""
    with Outputs() as out:
        out.claim(path, "report")
        out.write_json(path, data)
        out.commit()

