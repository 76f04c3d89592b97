"""Errors the planner raises at its boundary.

Every error a user can cause names the field, the value and the fix, so the CLI can print it
without a traceback. Internal invariants use ``assert`` instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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


def read_json_file(path: str | Path, field: str, *, what: str, damaged_fix: str) -> Any:
    """Parse a user's JSON file; unreadable or malformed files become a SpecError naming the fix."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(field, str(path), f"cannot read {what} ({exc.strerror}); check the path") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(field, str(path), f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                        f"{damaged_fix}") from exc
