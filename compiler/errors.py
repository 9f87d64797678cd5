"""Error types. The CLI maps them to exit codes: UserError -> 2, everything else -> 1."""

from __future__ import annotations


class EdgecError(Exception):
    """Base class of every error edgec raises on purpose."""


class UserError(EdgecError):
    """A mistake in what the user gave us (file, option, data). One clear line, exit 2."""


class InternalError(EdgecError):
    """A failure inside edgec (a pass broke the graph, ...). Exit 1; names the pass that failed."""

    def __init__(self, message: str, pass_name: str | None = None):
        super().__init__(message)
        self.pass_name = pass_name


class VerificationError(EdgecError):
    """The rewritten model does not compute what the original computed (within tolerance).
    ``measured``: the comparison that failed (the report's ``verify`` section), when there was one."""

    def __init__(self, message: str, measured: dict | None = None):
        super().__init__(message)
        self.measured = measured
