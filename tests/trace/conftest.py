"""Shared fixtures for the tracer tests: traces are cached per session (tracing is the slow part)."""

from __future__ import annotations

import functools

import pytest
from torch import nn

from planner.models import load_preset
from planner.trace import CostGraph, trace_model


@functools.cache
def _trace(name: str, dtype: str) -> tuple[CostGraph, nn.Module]:
    preset = load_preset(name)
    model = preset.build(device="meta")
    graph = trace_model(model, preset.sample_input(1), name=name, dtype=dtype, seq_len=preset.seq_len,
                        copy_model=False)
    return graph, model


@pytest.fixture(scope="session")
def traced():
    """``traced(preset, dtype="fp16") -> CostGraph``, each traced once per session."""
    return lambda name, dtype="fp16": _trace(name, dtype)[0]


@pytest.fixture(scope="session")
def traced_model():
    """``traced_model(preset) -> nn.Module``: the meta model ``traced(preset)`` traced."""
    return lambda name, dtype="fp16": _trace(name, dtype)[1]
