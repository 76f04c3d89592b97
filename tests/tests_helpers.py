"""Helpers shared by tests (importable as `tests_helpers`: tests/ is on the path via conftest)."""

from __future__ import annotations

import functools


@functools.cache
def traced(preset: str, seq_len: int | None = None):
    """A traced preset, cached for the whole session (tracing is the slow part)."""
    from planner.models import load_preset
    from planner.trace import trace_model

    p = load_preset(preset)
    return trace_model(p.build(device="meta"), p.sample_input(1, seq_len), name=preset)
