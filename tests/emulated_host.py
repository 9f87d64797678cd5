"""Compile the example on this host and measure it: run natively and under an emulated CPU.

``python tests/emulated_host.py OUTDIR`` compiles ``examples/digits`` two ways (the default
``cpu`` target and ``isa=vnni``'s U8S8; 32 calibration samples, so that it stays quick under
an emulator, which runs ONNX Runtime's vector kernels some 300x slower), writes the models to
OUTDIR, and prints one JSON object: the host's ISA class, each model's sha256, and its SQNR
against FP32 on 100 held-out images in reference arithmetic and on this host's kernels.
``tests/test_numerics.py`` runs it natively and under ``qemu-x86_64 -cpu Haswell`` (an AVX2
CPU without AVX-512 or VNNI) and compares.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "digits"
BUILDS = {
    "default": dict(quantize="int8"),
    "vnni": dict(quantize="int8", target_options={"isa": "vnni"}),
}


def main(outdir: str) -> None:
    import edgec
    from edgec import runtime

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    x = np.load(EXAMPLE / "eval.npz")["input"][:100]
    ref = runtime.run_outputs(edgec.load(EXAMPLE / "model.onnx").to_onnx(), [{"input": x}])
    result = {"host_isa": runtime.host_isa(), "models": {}}
    for name, opts in BUILDS.items():
        path = out / f"{name}.onnx"
        edgec.compile(str(EXAMPLE / "model.onnx"), str(path), calib=str(EXAMPLE / "calib.npz"), calib_samples=32,
                      **opts)
        model = edgec.load(path).to_onnx()
        row = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        for host in (False, True):
            got = runtime.run_outputs(model, [{"input": x}], host=host)
            row["host_sqnr_db" if host else "reference_sqnr_db"] = runtime.error_metrics(ref, got)["sqnr_db"]
        result["models"][name] = row
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
