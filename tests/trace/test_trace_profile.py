"""Profile mode: real per-layer timings on the local device, keyed like the cost graph's layers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from planner.models import FAMILIES
from planner.trace import trace_model
from planner.trace.profile import ProfiledTime, profile_layers

CFG = dict(num_layers=2, hidden=32, heads=4, vocab_size=100, seq_len=16, dropout=0.0)


def test_profile_times_every_layer_of_a_meta_model():
    spec = FAMILIES["gpt"]
    with torch.device("meta"):
        model = spec.build(dict(CFG))
    sample = spec.sample_input(CFG, 2, None, "meta")
    times = profile_layers(model, sample, device="cpu", warmup=1, repeats=2)
    graph = trace_model(model, sample)
    assert list(times) == [layer.name for layer in graph.layers] == ["embed", "blocks.0", "blocks.1", "head"]
    for t in times.values():
        assert isinstance(t, ProfiledTime) and t.fwd_s > 0 and t.bwd_s >= 0
        assert t.total_s == t.fwd_s + t.bwd_s
    assert all(p.is_meta for p in model.parameters())  # the caller's model is not materialised


def test_profile_rejects_bad_repeats():
    with pytest.raises(ValueError, match="repeats"):
        profile_layers(torch.nn.Linear(2, 2), torch.randn(1, 2), repeats=0)


def test_planner_never_imports_torch_distributed():
    for path in Path(__file__).resolve().parents[2].joinpath("planner", "trace").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, (ast.Import, ast.ImportFrom)) else []
            module = node.module if isinstance(node, ast.ImportFrom) else ""
            assert not any("torch.distributed" in n for n in names + [module or ""]), path.name
