"""Model tests: make the repo importable when the package is not installed; cached preset traces."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, when not installed

from planner.trace import CostGraph, trace_preset  # noqa: E402


@functools.cache
def _trace(name: str, dtype: str) -> CostGraph:
    return trace_preset(name, dtype=dtype)


@pytest.fixture(scope="session")
def traced():
    """``traced(preset, dtype="fp16") -> CostGraph``, each traced once per session."""
    return lambda name, dtype="fp16": _trace(name, dtype)
