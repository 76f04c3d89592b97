"""What a trainer fusing element-wise chains does not keep (Layer.pointwise_saved_bytes) and what FP8
linears save as inputs (Layer.linear_input_bytes), against a count by hand."""

from __future__ import annotations

import pytest

from planner.models import ModelPreset
from planner.trace import trace_preset

LLAMA = {"num_layers": 2, "hidden": 256, "heads": 4, "kv_heads": 2, "ffn_hidden": 512, "vocab_size": 1000,
         "seq_len": 64, "fused_attention": True}


def test_a_llama_block_drops_its_norms_inner_products_and_the_swiglu_activation():
    """Per token, in bf16: each RMSNorm's x * rsqrt(mean(x^2)) before the weight (h elements, twice) and
    silu(gate) (f elements); the norm outputs, q/k/v, the attention output and the SwiGLU product are kept."""
    graph = trace_preset(ModelPreset(name="probe", family="llama", config=LLAMA), dtype="bf16")
    block = graph.layers[1]
    s, h, f = LLAMA["seq_len"], LLAMA["hidden"], LLAMA["ffn_hidden"]
    assert block.pointwise_saved_bytes == s * (2 * h + f) * 2
    assert block.pointwise_replicated_bytes == s * 2 * h * 2  # the two norm products have the block's width
    # linears save the two norm outputs and the SwiGLU product alone, the attention output with attention
    assert block.linear_input_bytes == s * (2 * h + f) * 2
    assert block.linear_shared_input_bytes == s * h * 2
    assert graph.layers[2].pointwise_saved_bytes == block.pointwise_saved_bytes  # a replayed copy: the same


def test_a_gpt_block_has_nothing_a_fused_trainer_would_drop():
    graph = trace_preset("gpt-tiny")
    assert graph.layers[1].pointwise_saved_bytes == 0
    assert graph.layers[1].linear_input_bytes > 0


def test_the_share_in_a_70b_llama_block():
    block = trace_preset("llama2-70b").layers[1]
    assert block.pointwise_saved_bytes / block.activation_bytes == pytest.approx(0.23, abs=0.01)


def test_the_cost_model_leaves_them_out_for_fusing_trainers_only():
    from dataclasses import replace

    from planner.cluster import ClusterSpec
    from planner.cost.constants import CostConstants, trainer_constants
    from planner.cost.layer_table import TableKnobs, layer_table

    graph = trace_preset(ModelPreset(name="probe", family="llama", config=LLAMA), dtype="bf16")
    block = graph.layers[1]
    cluster = ClusterSpec.preset("dgx-h100", nodes=1)

    def stored(c, fp8=False):
        return layer_table(graph, cluster, micro_batch=2, tp=1, sequence_parallel=False, recompute="none", c=c,
                           knobs=TableKnobs(fp8=fp8)).stored_act_bytes[1]

    megatron, eager = CostConstants(), trainer_constants("eager")
    assert stored(eager) == 2 * block.activation_bytes
    assert stored(megatron) == 2 * (block.activation_bytes - block.pointwise_saved_bytes)
    fp8_copies = (block.linear_input_bytes - block.linear_shared_input_bytes) / 2
    assert stored(megatron, fp8=True) == 2 * (block.activation_bytes - block.pointwise_saved_bytes - fp8_copies)
    assert stored(eager, fp8=True) == stored(eager)  # torchao keeps the bf16 inputs
    assert stored(replace(megatron, fused_pointwise_saves=False)) == stored(eager)


def test_a_block_replayed_after_a_replayed_block_counts_what_a_direct_trace_counts():
    """The first norm's product reads the block's input, which the block before made: when that block was
    itself replayed, the input's identity has to be the tensor that left it, or the product was missed
    (every block from the third on, in a replayed trace)."""
    from planner.trace import trace_model

    preset = ModelPreset(name="probe", family="llama", config={**LLAMA, "num_layers": 4})
    sample = preset.sample_input(1)
    replayed = trace_model(preset.build(device="meta"), sample, dtype="bf16", reuse=True)
    direct = trace_model(preset.build(device="meta"), sample, dtype="bf16", reuse=False)
    assert replayed.notes != direct.notes  # blocks were replayed in one and not in the other
    expected = LLAMA["seq_len"] * (2 * LLAMA["hidden"] + LLAMA["ffn_hidden"]) * 2
    assert [lay.pointwise_saved_bytes for lay in replayed.layers[1:5]] == [expected] * 4
    assert [lay.pointwise_saved_bytes for lay in replayed.layers] == [lay.pointwise_saved_bytes for lay in direct.layers]
