"""The tracer's op graph → intra-op op graph, and Megatron found on the traced GPT-3 block."""

from __future__ import annotations

import math

import pytest

from planner.intra_op import Replicate, Shard, op_graph_from_cost_graph, solve_layer
from planner.intra_op.strategies import CostModel, build_groups


def test_gpt_tiny_block_graph(gpt_tiny, mesh_of, device):
    graph = op_graph_from_cost_graph(gpt_tiny, 1, batch_size=8)
    ops = graph.ops
    (x,) = [op for op in ops.values() if op.is_input]
    assert x.out_shape == (8, 64, 128) and x.roles == ("batch", "seq", None)
    assert graph.outputs == ("add_2",)
    assert "blocks_0_attn_future_mask" not in ops  # a buffer: a constant, dropped
    followers = {op.kind for op in ops.values() if op.follows}
    assert followers == {"split", "chunk", "view", "transpose", "mul", "masked_fill", "softmax", "reshape", "gelu"}
    assert ops["view"].roles == ("batch", "seq", "heads", None)  # hidden cut into heads
    assert ops["transpose_3"].dim_map == (0, 1, 3, 2)  # k.transpose(-2, -1)
    qkv = ops["blocks_0_attn_qkv"]
    assert [p.name for p in qkv.params] == ["blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias"]
    assert qkv.fwd_flops == pytest.approx(2 * 8 * 64 * 128 * 384)  # traced per sample, times the batch
    groups, _ = build_groups(graph, CostModel(mesh=mesh_of(tp=4), device=device))
    assert len(groups) == len([op for op in ops.values() if not op.follows])


def test_embedding_and_tied_head(gpt3_2layer):
    embed = op_graph_from_cost_graph(gpt3_2layer, 0)
    assert embed.ops["embed_wte"].params[0].owned and embed.ops["tokens"].differentiable == (False,)
    assert embed.ops["embed_wpe"].inputs == ("embed_wpe.ids",)  # positions: a constant arange
    head = op_graph_from_cost_graph(gpt3_2layer, gpt3_2layer.num_layers - 1)
    (lm_param,) = head.ops["head_lm_head"].params
    assert lm_param.name == "embed.wte.weight" and not lm_param.owned  # tied: layout shared, memory once


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_traced_gpt3_block_is_megatron(gpt3_2layer, mesh_of, device, sequence_parallel):
    graph = op_graph_from_cost_graph(gpt3_2layer, 1, batch_size=1)
    sol = solve_layer(graph, mesh_of(tp=8), device, memory_limit_bytes=20e9, sequence_parallel=sequence_parallel)
    p = sol.params
    assert p["blocks.0.attn.qkv.weight"] == p["blocks.0.mlp.fc1.weight"] == (Shard(0),)
    assert p["blocks.0.attn.proj.weight"] == p["blocks.0.mlp.fc2.weight"] == (Shard(1),)
    kinds = sorted(c.kind for c in sol.collectives if c.phase == "fwd")
    if sequence_parallel:
        assert kinds == ["all_gather", "all_gather", "reduce_scatter", "reduce_scatter"]
        assert sol.op("blocks_0_ln1").output_layout == (Shard(1),)
    else:
        assert kinds == ["all_reduce", "all_reduce"]
        assert sol.op("blocks_0_ln1").output_layout == (Replicate(),)
    bytes_ = {c.nbytes for c in sol.collectives if c.phase != "grad_sync"}
    assert bytes_ == {2048 * 12288 * 2}


def test_batch_size_scales_costs_not_weights(gpt3_2layer):
    one = op_graph_from_cost_graph(gpt3_2layer, 1, batch_size=1)
    four = op_graph_from_cost_graph(gpt3_2layer, 1, batch_size=4)
    name = "blocks_0_mlp_fc1"
    assert four.ops[name].fwd_flops == pytest.approx(4 * one.ops[name].fwd_flops)
    assert four.ops[name].out_shape == (4, 2048, 4 * 12288)
    assert four.ops[name].params == one.ops[name].params
    weights = sum(math.prod(p.shape) for p in one.ops[name].params) * 2  # bf16, read once per step
    assert four.ops[name].bytes_moved - weights * 3 == pytest.approx(4 * (one.ops[name].bytes_moved - weights * 3))
    with pytest.raises(ValueError, match="layers 0..3"):
        op_graph_from_cost_graph(gpt3_2layer, 7)


def test_traced_llama_block_is_megatron_with_sequence_parallelism(llama_2layer, mesh_of, device):
    # RMSNorm written out (pow, mean, rsqrt, mul by weight), RoPE slices and cat, SwiGLU's gating multiply
    graph = op_graph_from_cost_graph(llama_2layer, 1)
    sol = solve_layer(graph, mesh_of(tp=8), device, memory_limit_bytes=8e9, sequence_parallel=True)
    p = sol.params
    for name in ("attn.q", "attn.k", "attn.v", "ffn.gate", "ffn.up"):
        assert p[f"blocks.0.{name}.weight"] == (Shard(0),), name
    assert p["blocks.0.attn.o.weight"] == p["blocks.0.ffn.down.weight"] == (Shard(1),)
    assert p["blocks.0.attn_norm.weight"] == (Replicate(),)  # the norm's scale, read by a plain multiply
    fwd = sorted(c.kind for c in sol.collectives if c.phase == "fwd")
    assert set(fwd) == {"all_gather", "reduce_scatter"} and fwd.count("reduce_scatter") == 2


def test_traced_mixtral_experts_are_split_by_expert(mixtral_2layer, mesh_of, device):
    graph = op_graph_from_cost_graph(mixtral_2layer, 1)
    sol = solve_layer(graph, mesh_of(ep=8), device, memory_limit_bytes=30e9)
    for w in ("w_gate", "w_up", "w_down"):  # stacked [experts, ...] weights: expert parallel
        assert sol.params[f"blocks.0.ffn.{w}"] == (Shard(0),)
    assert sol.op("bmm").strategy == "ep=expert"


def test_batch_one_trace_solved_at_a_larger_batch(llama_2layer, mesh_of, device):
    # traced at batch 1, the batch dim has size 1: views must keep it in place, or the heads split cannot pass
    graph = op_graph_from_cost_graph(llama_2layer, 1, batch_size=2)
    assert graph.notes == []
    assert graph.ops["view"].out_shape == (2, 4096, 32, 128) and graph.ops["reshape"].out_shape == (2, 4096, 4096)
    sol = solve_layer(graph, mesh_of(tp=8), device, memory_limit_bytes=math.inf)
    for name in ("attn.q", "attn.k", "attn.v"):  # were row-parallel when the views lost the batch
        assert sol.params[f"blocks.0.{name}.weight"] == (Shard(0),), name
    assert sol.op("reshape").output_layout == (Shard(2),)  # the heads split passes the merge


def _conv1d_model():
    """Two residual MLP blocks of transformers' ``Conv1D`` (GPT-2's projection: ``x @ W + b``, ``W [in, out]``)."""
    import torch
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_fc, self.c_proj = Conv1D(256, 64), Conv1D(64, 256)

        def forward(self, x):
            return x + self.c_proj(torch.relu(self.c_fc(x)))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(128, 64)
            self.blocks = nn.ModuleList(Block() for _ in range(2))

        def forward(self, tokens):
            x = self.embed(tokens)
            for block in self.blocks:
                x = block(x)
            return x

    return Model(), torch.zeros(2, 16, dtype=torch.long)


def test_transformers_conv1d_is_a_transposed_linear_split_like_megatron(mesh_of, device):
    from planner.trace import trace_model

    graph = op_graph_from_cost_graph(trace_model(*_conv1d_model(), dtype="fp32"), 1)
    conv = {op.module_path: op for op in graph.ops.values() if op.kind == "conv1d"}
    assert sorted(conv) == ["blocks.0.c_fc", "blocks.0.c_proj"]
    assert [p.shape for p in conv["blocks.0.c_fc"].params] == [(64, 256), (256,)]  # W [in, out], bias [out]
    assert conv["blocks.0.c_fc"].fwd_flops == 2 * 2 * 16 * 64 * 256  # 2·tokens·in·out, as a Linear
    sol = solve_layer(graph, mesh_of(tp=2), device, memory_limit_bytes=4e5)  # whole weights, grads and Adam: 0.53 MB
    p = sol.params
    assert p["blocks.0.c_fc.weight"] == (Shard(1),) and p["blocks.0.c_fc.bias"] == (Shard(0),)  # column
    assert p["blocks.0.c_proj.weight"] == (Shard(0),) and p["blocks.0.c_proj.bias"] == (Replicate(),)  # row
