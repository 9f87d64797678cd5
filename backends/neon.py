"""neon: ONNX Runtime on ARM64 CPUs (NEON; dot-product int8 kernels where the core has them).

Profile: like ``cpu`` (any opset ONNX Runtime reads, dynamic shapes allowed), but int8 is
S8S8 (signed, symmetric activations: ONNX Runtime's recommended scheme on ARM) and channel
counts round to 4 (a 128-bit NEON register holds 4 float32 lanes).

``--target-option isa=`` names the deployment core, as ``cpu`` does for x86:

* ``dotprod`` (the default; ARMv8.2 ``sdot``/``udot``: Cortex-A55/A75 and later, the
  RK3588's A76/A55, Jetson Orin's A78AE): products accumulate in int32, S8S8 is exact.
* ``i8mm`` (ARMv8.6 ``smmla``: Cortex-A510/A710 and later, Neoverse V1/N2): int32 too.
* ``armv8`` (plain NEON: Cortex-A53/A72, e.g. RK3399, Raspberry Pi 4): ONNX Runtime's S8S8
  kernel widens each product to int16 and adds two of them before widening to int32. Weights
  are symmetric in [-127, 127], so a pair is at most ``2 * 128 * 127 = 32512 < 2**15``: it
  cannot saturate, unlike x86's no-VNNI U8S8 path, and S8S8 stays exact.

So the scheme is the same S8S8 on every ARM64 class and the output does not depend on the
option; the report records the class it was built for. (This follows ONNX Runtime's MLAS kernel
design; no ARM CPU was available to measure it on.) ``isa=auto`` is refused: the build host is
not the ARM device.
"""

from __future__ import annotations

from edgec.errors import UserError
from edgec.ir import IR
from edgec.target import QuantScheme, Target

from . import checks
from .cleanup import lossless_pipeline

ISAS = ("dotprod", "i8mm", "armv8")
REASONS = {
    "dotprod": "isa=dotprod: sdot accumulates int8 products in int32; S8S8 is exact",
    "i8mm": "isa=i8mm: smmla accumulates int8 products in int32; S8S8 is exact",
    "armv8": "isa=armv8: pairs of int8 products are added in int16, at most 2*128*127 < 2^15 with weights in "
             "[-127, 127]; S8S8 cannot saturate",
}


def _pipeline(target: Target) -> list:  # the same runtime as cpu: the same clean-up and check
    return lossless_pipeline()


def _check(target: Target, ir: IR) -> list[str]:
    return checks.check_opset(target, ir)


def _configure(t: Target) -> None:
    isa = str(t.options["isa"]).lower()
    if isa == "auto":
        raise UserError("target neon: isa=auto would describe the build host, not the ARM device: "
                        f"name the device's cores with --target-option isa={'|'.join(ISAS)}")
    if isa not in ISAS:
        raise UserError(f"target neon: isa={t.options['isa']} is not known (choose {', '.join(ISAS)})")
    t.quant = QuantScheme(activations="symmetric", weights="per-channel", bias="int32", wide_activations=True,
                          weight_type="int8", isa=isa, reason=REASONS[isa])
    t.description = f"ONNX Runtime on ARM64 CPUs (NEON, {isa})"


TARGET = Target(
    name="neon",
    description="ONNX Runtime on ARM64 CPUs (NEON)",
    min_opset=7,
    max_opset=23,
    channel_multiple=4,
    quant=QuantScheme(activations="symmetric", weights="per-channel", bias="int32", wide_activations=True),
    options={"isa": "dotprod"},
    option_help={"isa": "deployment cores: dotprod (default, ARMv8.2+), i8mm (ARMv8.6+), armv8 (no dot product)"},
    configure=_configure,
    pipeline=_pipeline,
    check=_check,
)
_configure(TARGET)
