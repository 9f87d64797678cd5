"""Runs INSIDE the RKNN-Toolkit2 virtual environment (never imported by edgec or pytest).

    python rknn_run.py jobs.json results.json

Each job: {"model", "platform", "inputs" (.npz, arrays in input order, NCHW), "out" (.npz to
write outputs to), "do_quantization" (bool), "dataset" (dataset.txt or null), "log"}, and
optionally "config" (more keyword arguments of RKNN.config: quantized_algorithm,
quantized_method, mean_values, ...), "samples" (a list of .npz files like "inputs", each run
once; outputs go to "out" as "<sample>_<output>") and "analysis" ({"inputs": [.npy files],
"output_dir"}: RKNN.accuracy_analysis in the simulator, per-layer cosine in its output_dir).
Each result: {"ok", "error", "cpu_ops": [[op_type, full_name], ...], "npu_ops": n}. The op
table is read from RKNN's verbose log (lines "ID OpType DataType Target ...").
"""

import json
import re
import sys
import traceback

import numpy as np
from rknn.api import RKNN

ROW = re.compile(r"D RKNN: \[[^\]]*\] (\d+)\s+(\S+)\s+(\S+)\s+(NPU|CPU)\s+.*\s(\S+)\s*$")


def run(job):
    r = RKNN(verbose=True, verbose_file=job["log"])
    try:
        r.config(target_platform=job["platform"], **(job.get("config") or {}))
        if r.load_onnx(model=job["model"]) != 0:
            return {"ok": False, "error": "load_onnx failed"}
        kw = {"do_quantization": bool(job.get("do_quantization"))}
        if job.get("dataset"):
            kw["dataset"] = job["dataset"]
        if r.build(**kw) != 0:
            return {"ok": False, "error": "build failed"}
        if job.get("analysis"):
            a = job["analysis"]
            if r.accuracy_analysis(inputs=a["inputs"], output_dir=a["output_dir"]) != 0:
                return {"ok": False, "error": "accuracy_analysis failed"}
        if r.init_runtime() != 0:
            return {"ok": False, "error": "init_runtime failed"}
        if job.get("samples"):
            saved = {}
            for i, path in enumerate(job["samples"]):
                with np.load(path) as z:
                    outs = r.inference(inputs=[z[k] for k in z.files], data_format="nchw")
                saved.update({f"{i}_{k}": np.asarray(o) for k, o in enumerate(outs)})
            np.savez(job["out"], **saved)
        else:
            with np.load(job["inputs"]) as z:
                inputs = [z[k] for k in z.files]
            outs = r.inference(inputs=inputs, data_format="nchw")
            np.savez(job["out"], *[np.asarray(o) for o in outs])
    finally:
        r.release()
    cpu, npu = [], 0
    with open(job["log"], errors="replace") as f:
        for line in f:
            m = ROW.search(line)
            if m:
                if m.group(4) == "CPU":
                    cpu.append([m.group(2), m.group(5)])
                else:
                    npu += 1
    return {"ok": True, "error": None, "cpu_ops": cpu, "npu_ops": npu}


def main():
    jobs = json.load(open(sys.argv[1]))
    results = []
    for job in jobs:
        try:
            results.append(run(job))
        except Exception as e:  # report, keep going with the next job
            results.append({"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]})
    json.dump(results, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
