#!/usr/bin/env python
"""What this host's ONNX Runtime kernels do with int8, beside edgec's reference arithmetic.

Three probes, each printed as a table with this host's CPU class in the header:

* ``saturation``: uint8 255 x int8 127 everywhere, the worst case for ONNX Runtime's x86
  U8S8 kernels, through MatMulInteger and QLinearConv (regular, grouped, depthwise): the exact
  result against this host's. Without VNNI the GEMM-based ones add pairs of products in
  saturating int16 and come out halved; the depthwise kernel does not.
* ``identity``: a hash of each builder model's (and the example's) float outputs in reference
  arithmetic (optimisations off) and on the optimised session. Run it on two kinds of CPU (or
  under ``qemu-x86_64 -cpu Haswell-noTSX``) and compare: the reference hashes agree, the
  optimised ones need not.
* ``depthwise``: latency of a QDQ depthwise convolution with int8 and with uint8 weights on
  this host (why the U8U8 scheme keeps depthwise convs int8).

    python benchmarks/host_kernels.py [saturation identity depthwise]
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgec import runtime  # noqa: E402
from edgec.builders import ALL_MODELS  # noqa: E402


def _model(nodes, inputs, outputs, inits) -> bytes:
    g = helper.make_graph(nodes, "probe", inputs, outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def saturation() -> None:
    print(f"{'kernel':38s} {'exact':>10s} {'this host':>10s}")
    k = 64
    w = numpy_helper.from_array(np.full((k, 4), 127, np.int8), "w")
    m = _model([helper.make_node("MatMulInteger", ["x", "w"], ["y"])],
               [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, k])],
               [helper.make_tensor_value_info("y", TensorProto.INT32, None)], [w])
    got = runtime.host_session(m).run(None, {"x": np.full((1, k), 255, np.uint8)})[0][0, 0]
    print(f"{'MatMulInteger (K=64)':38s} {255 * 127 * k:10d} {int(got):10d}")
    for label, c, group, ksize in (("QLinearConv 3x3, 16 ch", 16, 1, 3), ("QLinearConv 1x1, 16 ch", 16, 1, 1),
                                   ("QLinearConv 3x3, groups of 4", 16, 4, 3),
                                   ("QLinearConv 3x3, depthwise", 16, 16, 3)):
        acc = ksize * ksize * (c // group) * 255 * 127  # the accumulator at the centre pixel
        consts = {"xs": np.float32(1), "xz": np.uint8(0), "ws": np.float32(1), "wz": np.int8(0),
                  "ys": np.float32(acc / 250.0), "yz": np.uint8(0)}
        inits = [numpy_helper.from_array(np.full((c, c // group, ksize, ksize), 127, np.int8), "w")]
        inits += [numpy_helper.from_array(np.array(v), n) for n, v in consts.items()]
        m = _model([helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"],
                                     group=group, pads=[1, 1, 1, 1] if ksize == 3 else [0, 0, 0, 0])],
                   [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, c, 6, 6])],
                   [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)
        got = runtime.host_session(m).run(None, {"x": np.full((1, c, 6, 6), 255, np.uint8)})[0][0, 0, 2, 2]
        print(f"{label:38s} {250:10d} {int(got):10d}   (output scaled so that exact = 250)")


def identity() -> None:
    models = {"digits": onnx.load(str(ROOT / "examples" / "digits" / "model.onnx"))}
    models.update({k: f(batch=4) for k, f in ALL_MODELS.items()})
    print(f"{'model':22s} {'reference':>14s} {'optimised':>14s}")
    for name, m in models.items():
        rng = np.random.default_rng(0)
        inits = {i.name for i in m.graph.initializer}
        feeds = {vi.name: rng.standard_normal([d.dim_value or 4 for d in vi.type.tensor_type.shape.dim])
                 .astype(np.float32) for vi in m.graph.input if vi.name not in inits}
        row = []
        for sess in (runtime.reference_session(m), runtime.session(m, optimize=True)):
            ys = sess.run(None, feeds)
            row.append(hashlib.sha1(b"".join(np.ascontiguousarray(y).tobytes() for y in ys)).hexdigest()[:12])
        print(f"{name:22s} {row[0]:>14s} {row[1]:>14s}")


def depthwise(runs: int = 200) -> None:
    c, hw = 64, 56
    print(f"{'depthwise 3x3, 64 ch, 56x56':30s} {'p10 ms':>8s}")
    for wtype, wdt, zp in (("int8", np.int8, 0), ("uint8", np.uint8, 128)):
        rng = np.random.default_rng(0)
        w = (rng.integers(-100, 100, (c, 1, 3, 3)) + zp).astype(wdt)
        inits = [numpy_helper.from_array(w, "wq"), numpy_helper.from_array(np.float32(0.01), "ws"),
                 numpy_helper.from_array(np.array(zp, wdt), "wz"), numpy_helper.from_array(np.float32(0.02), "xs"),
                 numpy_helper.from_array(np.uint8(128), "xz")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
                 helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
                 helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"]),
                 helper.make_node("Conv", ["xd", "wd"], ["c"], group=c, pads=[1, 1, 1, 1]),
                 helper.make_node("QuantizeLinear", ["c", "xs", "xz"], ["yq"]),
                 helper.make_node("DequantizeLinear", ["yq", "xs", "xz"], ["y"])]
        m = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, hw, hw])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
        sess = runtime.session(m, optimize=True, threads=1)
        x = {"x": rng.standard_normal((1, c, hw, hw)).astype(np.float32)}
        for _ in range(10):
            sess.run(None, x)
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            sess.run(None, x)
            times.append(time.perf_counter() - t)
        print(f"{wtype + ' weights':30s} {np.percentile(times, 10) * 1e3:8.3f}")


def main(argv=None) -> int:
    which = (argv if argv is not None else sys.argv[1:]) or ["saturation", "identity", "depthwise"]
    print(f"this host: {runtime.host_description()}")
    for name in which:
        print(f"\n== {name}")
        {"saturation": saturation, "identity": identity, "depthwise": depthwise}[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
