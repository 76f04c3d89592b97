"""Errors the runtime raises before or during a run.

A user-caused problem (a plan for another world size, a corrupted checkpoint, an unsupported
schedule) is a :class:`RunCheckError`: one paragraph that names what does not match and the fix.
The CLI prints it without a traceback and exits with code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

from planner.errors import PlannerError


class RunCheckError(PlannerError):
    """A plan, launch or checkpoint does not fit this run: says what, where, and the fix."""


class CheckpointError(RunCheckError):
    """A checkpoint is missing, incomplete or corrupted."""
