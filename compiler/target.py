"""Target profiles: what a device family needs, as data, plus the passes and checks it adds.

A profile says which opsets the device's toolchain reads, whether it needs static shapes, the int8 scheme its kernels want, what float precision it falls back to, the
channel multiple pruning should round to, and the user-settable options (``--target-option
k=v``) with their defaults. ``pipeline(target)`` returns the passes the target runs and
``check(target, ir)`` returns what in the graph the device would not accept.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

from .errors import UserError
from .ir import IR


@dataclass
class QuantScheme:
    """How a target wants int8: what the QDQ pass and the backends agree on."""

    rules: str = "ort-fusable"       # the rule table (edgec.quant_rules.TABLES): "ort-fusable" or "tensorrt"
    activations: str = "asymmetric"  # "asymmetric" (uint8) or "symmetric" (int8, zero point 0)
    weights: str = "per-channel"     # "per-channel" or "per-tensor"
    bias: str = "int32"              # "int32" (quantized bias) or "float" (left as it is)
    weight_format: str = "integer"   # "integer" (int initializer -> DQ) or "float-qdq" (float -> Q -> DQ)
    mixed: bool = True               # --quantize mixed (per-layer FP32/INT8/INT4) is offered
    pointwise: tuple = ()            # unary ops whose outputs get Q/DQ too (toolchains that want all tensors int8)
    fixed_ranges: bool = True        # the rule table's fixed output ranges (Sigmoid/Softmax [0, 1]) are used
    weight_type: str = "int8"        # "int8" [-127, 127], "int7" [-63, 63] (no int16 saturation), "uint8" (U8U8)
    isa: str | None = None           # the deployment CPU class the scheme was chosen for (cpu/neon)
    # the int8 fallback's last step may give activations 16 bits (uint16/int16 Q/DQ, which ONNX
    # Runtime runs; the toolchains of jetson and rknn take 8-bit Q/DQ only)
    wide_activations: bool = False
    # a tensor's statistics are clamped to what its readers tell apart before its range is chosen
    # (edgec.analysis.saturation: a hard-swish's input below -3 is all one value)
    saturation: bool = True
    # weighted ops reading the same tensor share a precision: all get output Q/DQ when one does, and
    # all stay float when one is kept float. RKNN-Toolkit2 2.5 cannot build a layer it computes in
    # FP16 (float weights, or int8 weights with a float output) beside an int8 one reading the
    # same tensor ("Invalid w_par['dtype'] = float16", ddddocr's YOLOX head)
    sibling_outputs: bool = False
    reason: str = ""                 # why this scheme, for the report
    # what else to try when int8 collapses (a refusal names it): the options this target takes
    alternatives: str = "--quantize mixed, or --quantize fp16"


@dataclass
class Target:
    name: str
    description: str
    min_opset: int = 7
    max_opset: int = 23
    channel_multiple: int = 1  # pruning rounds channel counts to this (vector width)
    static_shapes: bool = False
    float_precision: str = "fp32"  # what float layers run in on the device
    quant: QuantScheme = field(default_factory=QuantScheme)
    options: dict = field(default_factory=dict)  # name -> value (defaults; overridable)
    option_help: dict = field(default_factory=dict)  # name -> "what it is (choices)"
    configure: Callable[["Target"], None] | None = field(default=None, repr=False)
    # pipeline(target) -> list of passes / FixedPoint groups
    pipeline: Callable[["Target"], list] = field(default=lambda t: [], repr=False)
    # check(target, ir) -> list of problems ("op X is not supported"); empty when the graph conforms
    check: Callable[["Target", IR], list] = field(default=lambda t, ir: [], repr=False)
    # write_extras(target, ir, output_path, context) -> list of extra files written (build configs, ...)
    extras: Callable | None = field(default=None, repr=False)

    def passes(self) -> list:
        return self.pipeline(self)

    def conformance(self, ir: IR) -> list[str]:
        return self.check(self, ir)

    def with_options(self, overrides: dict[str, str] | None) -> "Target":
        """A copy with ``--target-option`` values applied (validated) and the profile re-derived."""
        t = copy.deepcopy(self)
        for key, value in (overrides or {}).items():
            if key not in t.options:
                known = ", ".join(f"{k} ({t.option_help.get(k, '')})" for k in t.options) or "none"
                raise UserError(f"target '{t.name}' has no option '{key}' (its options: {known})")
            default = t.options[key]
            try:
                t.options[key] = type(default)(value) if not isinstance(default, (list, type(None))) else value
            except ValueError:
                raise UserError(f"target option {key}={value!r}: expected a {type(default).__name__}") from None
        if t.configure is not None:
            t.configure(t)
        return t
