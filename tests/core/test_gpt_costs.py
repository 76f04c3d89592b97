"""Traced GPT costs equal the published analytic formulas."""

import pytest

from planner.models import load_preset
from planner.models.gpt import GPTConfig
from planner.trace import trace_model


@pytest.mark.parametrize("preset", ["gpt-tiny", "gpt3-125m", "gpt3-1.3b"])
def test_train_flops_match_megatron_formula(preset):
    p = load_preset(preset)
    graph = trace_model(p.build(), p.sample_input(1), name=preset)
    cfg = GPTConfig(**p.config)
    # 72·B·L·s·h²·(1 + s/6h + v/12hL), B = 1 sample.
    assert graph.train_flops == pytest.approx(cfg.flops_per_step(1), rel=0.01)
    assert graph.param_count == cfg.param_count() == sum(x.numel() for x in p.build().parameters())


def test_block_activations_match_korthikanti_formula():
    p = load_preset("gpt3-125m")
    graph = trace_model(p.build(), p.sample_input(1), name="gpt3-125m", dtype="fp16")
    cfg = GPTConfig(**p.config)
    s, h, a = cfg.seq_len, cfg.hidden, cfg.heads
    block = graph.layers[1]
    assert block.name == "blocks.0"
    # s·b·h·(34 + 5·a·s/h) bytes per layer in fp16 (Korthikanti et al. 2022), b = 1.
    assert block.activation_bytes == pytest.approx(s * h * (34 + 5 * a * s / h), rel=0.10)
    assert block.attention_activation_bytes == pytest.approx(5 * a * s * s, rel=0.01)


def test_tied_embedding_counted_once_and_referenced_by_head():
    p = load_preset("gpt3-125m")
    graph = trace_model(p.build(), p.sample_input(1), name="gpt3-125m")
    head = graph.layers[-1]
    assert [t.name for t in head.tied_params] == ["embed.wte.weight"]
    assert head.tied_params[0].owner == 0
    assert sum(layer.param_count for layer in graph.layers) == graph.param_count


def test_repeated_blocks_are_grouped():
    p = load_preset("gpt3-125m")
    graph = trace_model(p.build(), p.sample_input(1), name="gpt3-125m")
    groups = graph.groups()
    assert [len(idx) for _, idx in groups] == [1, 12, 1]
    assert graph.is_chain()
