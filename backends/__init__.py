"""edgec targets: one device family per file. ``get_target(name)`` returns its profile."""

from __future__ import annotations

from edgec.errors import UserError
from edgec.target import Target

from . import cpu, jetson, neon, rknn
from .cleanup import lossless_pipeline

__all__ = ["get_target", "lossless_pipeline", "targets"]


def targets() -> dict[str, Target]:
    return {t.name: t for t in (cpu.TARGET, neon.TARGET, jetson.TARGET, rknn.TARGET)}


def get_target(name: str, options: dict | None = None) -> Target:
    """The profile of target ``name`` with ``--target-option`` overrides applied."""
    all_targets = targets()
    if name not in all_targets:
        raise UserError(f"unknown target '{name}' (known: {', '.join(sorted(all_targets))})")
    return all_targets[name].with_options(options)
