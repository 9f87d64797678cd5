"""Runs INSIDE the OpenVINO virtual environment (never imported by edgec or pytest).

    python openvino_run.py jobs.json results.json

Each job: {"model", "inputs" (.npz keyed by input name), "out" (.npz)}. Each result: {"ok",
"error", "precisions": {layer type: [runtime precisions]}} from the compiled model's runtime
graph (rt_info "runtimePrecision"), so a test can see that int8 kernels were chosen.
"""

import json
import sys
import traceback

import numpy as np
import openvino as ov


def run(core, job):
    model = core.read_model(job["model"])
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    with np.load(job["inputs"]) as z:
        feeds = {k: z[k] for k in z.files}
    request = compiled.create_infer_request()
    result = request.infer(feeds)
    outs = {o.get_any_name(): np.asarray(v) for o, v in result.items()}
    np.savez(job["out"], **outs)
    precisions = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer = _text(info["layerType"]) if "layerType" in info else op.get_type_name()
        prec = _text(info["runtimePrecision"]) if "runtimePrecision" in info else "?"
        precisions.setdefault(layer, set()).add(prec)
    return {"ok": True, "error": None, "precisions": {k: sorted(v) for k, v in precisions.items()}}


def _text(value) -> str:
    """rt_info values are OVAny objects: ask for their string form."""
    for attr in ("astype",):
        if hasattr(value, attr):
            try:
                return value.astype(str)
            except Exception:
                pass
    return str(getattr(value, "value", value))


def main():
    core = ov.Core()
    results = []
    for job in json.load(open(sys.argv[1])):
        try:
            results.append(run(core, job))
        except Exception as e:
            results.append({"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]})
    json.dump(results, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
