"""Target profiles: what a device family needs, as data, plus the passes and checks it adds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .ir import IR


@dataclass
class Target:
    name: str
    description: str
    min_opset: int = 7
    max_opset: int = 23
    channel_multiple: int = 1  # pruning rounds channel counts to this (vector width)
    static_shapes: bool = False
    options: dict = field(default_factory=dict)
    # pipeline(target) -> list of passes / FixedPoint groups
    pipeline: Callable[["Target"], list] = field(default=lambda t: [], repr=False)
    # check(target, ir) -> list of problems ("op X is not supported"); empty when the graph conforms
    check: Callable[["Target", IR], list] = field(default=lambda t, ir: [], repr=False)

    def passes(self) -> list:
        return self.pipeline(self)

    def conformance(self, ir: IR) -> list[str]:
        return self.check(self, ir)
