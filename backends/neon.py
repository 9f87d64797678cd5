"""neon: ONNX Runtime on ARM64 CPUs (NEON; dot-product int8 kernels where the core has them).

Profile: like ``cpu`` (any opset ONNX Runtime reads, dynamic shapes allowed), but int8 is
S8S8 (signed, symmetric activations: ONNX Runtime's recommended scheme on ARM) and channel
counts round to 4 (a 128-bit NEON register holds 4 float32 lanes).
"""

from __future__ import annotations

from edgec.target import QuantScheme, Target

from .cpu import _check, _pipeline  # same runtime, same clean-up and checks; only the profile differs


TARGET = Target(
    name="neon",
    description="ONNX Runtime on ARM64 CPUs (NEON)",
    min_opset=7,
    max_opset=23,
    channel_multiple=4,
    quant=QuantScheme(activations="symmetric", weights="per-channel", bias="int32", quantize_outputs=True),
    pipeline=_pipeline,
    check=_check,
)
