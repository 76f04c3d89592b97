"""Errors the planner raises at its boundary.

Every error a user can cause names the field, the value and the fix, so the CLI can print it
without a traceback. Internal invariants use ``assert`` instead.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_USER_ERROR = 2  # the input is wrong: the message names the field and the fix
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT


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


def run_command(body: Callable[[], int], *, debug: bool,
                user_errors: type[Exception] = PlannerError) -> int:
    """Run one CLI command and turn the errors a user can cause into an exit code.

    ``user_errors`` (default :class:`PlannerError`) prints ``error: <message>`` on stderr and
    returns :data:`EXIT_USER_ERROR`, with the traceback first when ``debug``; Ctrl-C prints
    ``interrupted`` and returns :data:`EXIT_INTERRUPTED`. Anything else is a bug and propagates
    with its traceback. ``python -m planner`` and ``python -m runtime`` both exit through here, so
    their codes and messages cannot drift apart.
    """
    try:
        return body()
    except user_errors as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
