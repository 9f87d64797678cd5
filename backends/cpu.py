"""cpu: ONNX Runtime on x86-64 CPUs (the default target).

Profile: any opset ONNX Runtime reads (7-23), dynamic shapes allowed, channel multiple 8
(AVX2 holds 8 float32 lanes), int8 as U8S8 (uint8 asymmetric activations, int8 per-channel
weights: the fast path with VNNI). Pipeline: the lossless clean-up. Check: the opset; that
ONNX Runtime loads the result is proved by --verify and the tests.
"""

from __future__ import annotations

from edgec.ir import IR
from edgec.target import QuantScheme, Target

from . import _checks


def _pipeline(target: Target) -> list:
    from . import lossless_pipeline

    return lossless_pipeline()


def _check(target: Target, ir: IR) -> list[str]:
    return _checks.check_opset(target, ir)


TARGET = Target(
    name="cpu",
    description="ONNX Runtime on x86-64 CPUs",
    min_opset=7,
    max_opset=23,
    channel_multiple=8,
    quant=QuantScheme(activations="asymmetric", weights="per-channel", bias="int32", quantize_outputs=True),
    pipeline=_pipeline,
    check=_check,
)
