"""Errors the planner raises at its boundary.

Every error a user can cause names the field, the value and the fix, so the CLI can print it
without a traceback. Internal invariants use ``assert`` instead.
"""

from __future__ import annotations


class PlannerError(Exception):
    """Base class for errors the CLI reports as a one-paragraph message (exit code 2)."""


class SpecError(PlannerError, ValueError):
    """A user-supplied value is wrong: names the field, the value, and how to fix it."""

    def __init__(self, field: str, value: object, fix: str, *, source: str | None = None) -> None:
        self.field = field
        self.value = value
        self.fix = fix
        self.source = source
        where = f" in {source}" if source else ""
        shown = repr(value)
        if len(shown) > 120:
            shown = shown[:117] + "..."
        super().__init__(f"{field}{where}: got {shown}; {fix}")


class InfeasibleError(PlannerError):
    """No configuration fits: says what overflows, where, and what would be enough."""

    def __init__(self, message: str, *, details: dict | None = None) -> None:
        self.details = details or {}
        super().__init__(message)


class TraceError(PlannerError):
    """The model could not be traced even at the coarsest granularity."""


class PlanMismatchError(PlannerError):
    """A plan file does not match the model, cluster, world or schema it is used with."""
