"""cpu: ONNX Runtime on x86-64 CPUs (the default target).

Profile: any opset ONNX Runtime reads (7-23), dynamic shapes allowed, channel multiple 8
(AVX2 holds 8 float32 lanes). Pipeline: the lossless clean-up. Check: the opset; that ONNX
Runtime loads the result is proved by --verify and the tests.

int8 depends on the deployment CPU (``--target-option isa=...``), because ONNX Runtime's x86
U8S8 GEMM kernels (QLinearConv, QGemm, QLinearMatMul) multiply differently by ISA:

* ``vnni`` (AVX512-VNNI or AVX-VNNI) and ``amx``: ``vpdpbusd``/AMX accumulate uint8 x int8
  products straight into int32. U8S8 is exact and the fastest: uint8 asymmetric activations,
  int8 symmetric per-channel weights in [-127, 127].
* ``avx2`` and ``avx512`` (AVX-512 without VNNI): ``vpmaddubsw`` adds each *pair* of
  uint8 x int8 products in int16 and saturates at 32767 (ONNX Runtime's quantization docs
  describe it). With full-range weights a pair reaches ``2 * 255 * 127 = 64770``: measured
  on an AVX2-only CPU (QEMU's Haswell model), the example's U8S8 model falls from 38.9 dB to
  14.9 dB SQNR on that host's kernels. Two schemes cannot saturate; both were measured side
  by side (``python benchmarks/quantization.py --schemes``; accuracy in reference arithmetic,
  which the AVX2 host's kernels matched within 0.1 dB; latency on a VNNI/AMX host, as no
  native AVX2 machine was available to time):

  - **U8U8** (the default here): uint8 weights with a zero point per channel, run by ONNX
    Runtime's U8U8 kernels, which widen to int16 and add in int32. Accuracy within about 1 dB
    of exact U8S8 on every builder model and the example (+0.5 dB on the example, -0.5 on
    MobileNetV2); slower than U8S8 (1.0-3.0x its latency on the AMX host).
  - **U8S7** (``scheme=u8s7``): weights in [-63, 63] (``2 * 255 * 63 = 32130``), on the same
    fast U8S8 kernels, but 7-bit weights cost 1.5 to 6.6 dB (MobileNetV2: 34.7 -> 28.1 dB).

  Accuracy comes first: an int8 model should be as faithful as the device allows, and the
  held-out comparison is against ONNX Runtime's own best non-saturating setting (U8U8). Depthwise
  convolutions keep int8 weights [-127, 127] in both schemes: ONNX Runtime's depthwise kernels
  widen before multiplying and were measured exact on the AVX2 model, and its U8U8 depthwise
  path is slower (1.7x on the AMX host; ``python benchmarks/host_kernels.py saturation
  depthwise`` shows both).
* U8S8 on a CPU that saturates is refused: how ONNX Runtime pairs the products depends on
  its kernels' packing, so no reference arithmetic can reproduce it, and a measured error
  would be a guess.

The default is ``isa=avx2``: the scheme that is exact on any x86-64 CPU, so the same
command gives the same model on any build host. ``isa=auto`` takes the build host's class
(detected from the CPU flags and written in the report): use it when the build host is the
deployment host. Every decision edgec makes is measured in reference arithmetic
(:mod:`edgec.runtime`), never on the build host's kernels.
"""

from __future__ import annotations

from edgec.errors import UserError
from edgec.ir import IR
from edgec.runtime import X86_ISAS, host_isa
from edgec.target import QuantScheme, Target

from . import checks
from .cleanup import lossless_pipeline

SCHEMES = ("auto", "u8s8", "u8s7", "u8u8")
SATURATING = ("avx2", "avx512", "sse")  # U8S8 GEMM kernels add uint8 x int8 pairs in saturating int16
WEIGHT_TYPE = {"u8s8": "int8", "u8s7": "int7", "u8u8": "uint8"}


def _pipeline(target: Target) -> list:
    return lossless_pipeline()


def _check(target: Target, ir: IR) -> list[str]:
    return checks.check_opset(target, ir)


def resolve_isa(requested: str) -> str:
    """``auto`` -> the build host's class; anything else is checked against the known ones."""
    isa = str(requested).lower()
    if isa == "auto":
        isa = host_isa()
        if isa not in X86_ISAS + ("sse",):
            raise UserError(f"target cpu: isa=auto found a {isa} build host, not an x86-64 CPU: name the "
                            f"deployment CPU with --target-option isa={'|'.join(X86_ISAS)}")
        return isa
    if isa not in X86_ISAS:
        raise UserError(f"target cpu: isa={requested} is not known (choose auto, {', '.join(X86_ISAS)})")
    return isa


def _configure(t: Target) -> None:
    isa = resolve_isa(t.options["isa"])
    scheme = str(t.options["scheme"]).lower()
    if scheme not in SCHEMES:
        raise UserError(f"target cpu: scheme={t.options['scheme']} is not known (choose {', '.join(SCHEMES)})")
    saturates = isa in SATURATING
    if scheme == "auto":
        scheme = "u8u8" if saturates else "u8s8"
        reason = (f"isa={isa}: ONNX Runtime's U8S8 kernels add uint8 x int8 pairs in saturating int16 there; "
                  f"U8U8 weights (zero point per channel) cannot saturate and keep 8-bit accuracy (depthwise convs "
                  f"stay int8: their kernels don't saturate); scheme=u8s7 is faster, less accurate"
                  if saturates else f"isa={isa}: int8 dot products accumulate in int32, U8S8 is exact and fastest")
    elif scheme == "u8s8" and saturates:
        raise UserError(f"target cpu: scheme=u8s8 saturates on isa={isa} (ONNX Runtime's vpmaddubsw kernels add "
                        f"pairs of products in int16); use scheme=u8s7 or u8u8, or isa=vnni if the device has VNNI")
    else:
        reason = f"scheme={scheme} chosen with --target-option (isa={isa})"
    t.quant = QuantScheme(activations="asymmetric", weights="per-channel", bias="int32", wide_activations=True,
                          weight_type=WEIGHT_TYPE[scheme], isa=isa, reason=reason)
    t.description = f"ONNX Runtime on x86-64 CPUs ({isa}, {scheme.upper()} int8)"


TARGET = Target(
    name="cpu",
    description="ONNX Runtime on x86-64 CPUs",
    min_opset=7,
    max_opset=23,
    channel_multiple=8,
    quant=QuantScheme(activations="asymmetric", weights="per-channel", bias="int32", wide_activations=True),
    options={"isa": "avx2", "scheme": "auto"},
    option_help={"isa": "deployment CPU: avx2 (default: exact on every x86-64), avx512, vnni, amx, "
                        "or auto (this build host)",
                 "scheme": "int8 scheme: auto (by isa), u8s8, u8s7, u8u8"},
    configure=_configure,
    pipeline=_pipeline,
    check=_check,
)
_configure(TARGET)
