"""cpu: ONNX Runtime on x86-64 CPUs (the default target).

Profile: any opset ONNX Runtime reads (7-23), dynamic shapes allowed, channel multiple 8
(AVX2 holds 8 float32 lanes). Pipeline: the lossless clean-up. Check: every op in the
default domain must be one ONNX Runtime's CPU provider loads, which is proved by creating a
session on the result.
"""

from __future__ import annotations

from edgec.ir import IR
from edgec.target import Target


def _pipeline(target: Target) -> list:
    from . import lossless_pipeline

    return lossless_pipeline()


def _check(target: Target, ir: IR) -> list[str]:
    problems = []
    if not target.min_opset <= ir.opset <= target.max_opset:
        problems.append(f"opset {ir.opset} is outside {target.min_opset}-{target.max_opset}")
    return problems


TARGET = Target(
    name="cpu",
    description="ONNX Runtime on x86-64 CPUs",
    min_opset=7,
    max_opset=23,
    channel_multiple=8,
    pipeline=_pipeline,
    check=_check,
)
