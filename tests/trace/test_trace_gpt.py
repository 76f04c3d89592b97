"""GPT presets against the published analytic counts: FLOPs, parameters, activation memory.

* training FLOPs = 72·B·L·s·h²·(1 + s/6h + v/12hL) (Narayanan et al. 2021), ``GPTConfig.flops_per_step``;
* parameters = ``GPTConfig.param_count`` (tied embedding counted once);
* activations saved per block, fp16, unfused attention with dropout = s·b·h·(34 + 5·a·s/h) bytes
  (Korthikanti et al. 2022, Table 2), of which 5·a·s²·b are attention scores.
"""

from __future__ import annotations

import pytest

from planner.models import load_preset
from planner.models.gpt import GPTConfig

PRESETS = ["gpt3-125m", "gpt3-1.3b", "gpt3-175b", "imbalanced-gpt"]


@pytest.mark.parametrize("name", PRESETS)
def test_flops_and_params_match_analytic(traced, name):
    g = traced(name)
    cfg = GPTConfig(**load_preset(name).config)
    assert g.train_flops == pytest.approx(cfg.flops_per_step(1), rel=1e-6)
    assert g.param_count == cfg.param_count()
    assert sum(layer.param_count for layer in g.layers) == cfg.param_count()


@pytest.mark.parametrize("name", PRESETS)
def test_block_activations_match_korthikanti(traced, name):
    g = traced(name)
    cfg = GPTConfig(**load_preset(name).config)
    s, h, a = cfg.seq_len, cfg.hidden, cfg.heads
    block = g.layers[1]
    assert block.name == "blocks.0"
    assert block.activation_bytes == pytest.approx(s * h * (34 + 5 * a * s / h), rel=1e-3)
    # Scores, probabilities and the 1-byte dropout mask: 2 + 2 + 1 bytes per score.
    assert block.attention_activation_bytes == 5 * a * s * s
    # QK^T and PV: 2·s²·h FLOPs each.
    assert block.attention_fwd_flops == 4 * s * s * h


def test_hidden_equal_to_sequence_is_not_mistaken_for_attention(traced):
    """gpt3-1.3b has h = s = 2048: [s, h] activations must not count as [s, s] scores."""
    g = traced("gpt3-1.3b")
    cfg = GPTConfig(**load_preset("gpt3-1.3b").config)
    assert cfg.hidden == cfg.seq_len
    assert g.layers[1].attention_activation_bytes == 5 * cfg.heads * cfg.seq_len ** 2


def test_gpt3_175b_structure_and_backward_split(traced):
    g = traced("gpt3-175b")
    assert g.method == "fx"
    assert g.num_layers == 98 and g.is_chain()
    assert g.group_summary() == "embed, 96 x blocks.* (GPTBlock), head"
    block = g.layers[1]
    h, s = 12288, 2048
    # Matmuls with a weight: backward = 2x forward (input + weight grads); attention GEMMs have no weight.
    weight_gemm = 24 * s * h * h
    assert block.bwd_weight_flops == weight_gemm
    assert block.bwd_input_flops == weight_gemm + 2 * block.attention_fwd_flops
    # The QKV projection's GEMM shape: m = tokens per sample, n = 3h, k = h.
    assert any((c.m, c.n, c.k) == (s, 3 * h, h) for c in block.op_costs)
    # Tied embedding: the head uses the embedding's weight, owned by layer 0.
    head = g.layers[-1]
    assert [(t.name, t.owner) for t in head.tied_params] == [("embed.wte.weight", 0)]
    assert head.param_count == 2 * h  # only ln_f is its own


def test_imbalanced_gpt_is_imbalanced(traced):
    g = traced("imbalanced-gpt")
    block, head = g.layers[1], g.layers[-1]
    assert head.param_count > 20 * block.param_count
    assert g.layers[0].param_count > 20 * block.param_count
    assert head.fwd_flops > 10 * block.fwd_flops
