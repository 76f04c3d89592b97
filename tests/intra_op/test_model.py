"""solve_model: repeated blocks are solved once, so GPT-3 175B costs about one layer."""

from __future__ import annotations

import math

import pytest

from planner.intra_op import Shard, solve_model
from planner.intra_op import model as model_module


@pytest.fixture(scope="module")
def full(gpt3_full, mesh_of, device):
    return solve_model(gpt3_full, mesh_of(tp=8), device, memory_limit_bytes=math.inf)


def test_96_layers_cost_one_ilp(full, gpt3_full, gpt3_2layer, mesh_of, device, monkeypatch):
    sol = full
    two = solve_model(gpt3_2layer, mesh_of(tp=8), device, memory_limit_bytes=math.inf)
    assert sol.num_variables == two.num_variables  # the ILP does not grow with the depth
    assert [layer.name for layer in sol.layers] == [layer.name for layer in gpt3_full.layers]
    assert all(layer.reuses == "blocks.0" for layer in sol.layers[2:-1])
    # 94 more copies of the block: each adds exactly what one reused copy reports
    block = sol.layers[2]
    assert sol.objective_s - two.objective_s == pytest.approx(94 * (block.compute_s + block.comm_s), rel=1e-4)
    for i in range(96):
        assert sol.params[f"blocks.{i}.mlp.fc1.weight"] == (Shard(0),)
        assert sol.params[f"blocks.{i}.mlp.fc2.weight"] == (Shard(1),)
    # the whole model costs about one block layer: each distinct layer's op graph is built and grouped
    # once (embedding, block, head), whatever the depth (the wall time is a benchmark: make bench)
    built: list[str] = []
    real = model_module.build_groups
    monkeypatch.setattr(model_module, "build_groups", lambda graph, cm: built.append(graph.name) or real(graph, cm))
    for graph in (gpt3_2layer, gpt3_full):
        built.clear()
        solve_model(graph, mesh_of(tp=8), device, memory_limit_bytes=math.inf)
        assert len(built) == 3, built


def test_vocab_parallel_embedding_and_tied_head(full):
    sol = full
    assert sol.params["embed.wte.weight"] == (Shard(0),)  # Megatron's VocabParallelEmbedding
    head = sol.layers[-1].ops["head_lm_head"]
    assert head.param_layouts["embed.wte.weight"] == (Shard(0),)  # the tied weight keeps one layout
    embed = [(c.kind, c.phase) for c in sol.layers[0].collectives]
    assert embed == [("all_reduce", "fwd")]  # the partial lookups summed once


def test_pipeline_stage_under_memory_limit(gpt3_full, mesh_of, device):
    stage = range(1, 13)  # 12 of the 96 blocks: one of 8 pipeline stages
    sol = solve_model(gpt3_full, mesh_of(tp=8), device, layers=stage, memory_limit_bytes=80e9)
    assert [layer.name for layer in sol.layers] == [f"blocks.{i}" for i in range(12)]
    assert sol.memory_bytes <= 80e9
    last = sol.layers[-1]
    ats = {c.at for c in last.collectives}
    assert "blocks_11_attn_proj -> blocks_11_attn_resid_drop" in ats  # names of that copy, not of blocks.0
    with pytest.raises(Exception, match="memory_limit"):
        solve_model(gpt3_full, mesh_of(tp=8), device, layers=stage, memory_limit_bytes=20e9)


def test_pin_on_one_copy_pins_every_copy(gpt3_2layer, mesh_of, device):
    sol = solve_model(gpt3_2layer, mesh_of(tp=8), device, memory_limit_bytes=math.inf,
                      pins={"blocks.1.mlp.fc1.weight": ["Shard(1)"]})
    assert sol.params["blocks.0.mlp.fc1.weight"] == sol.params["blocks.1.mlp.fc1.weight"] == (Shard(1),)
    with pytest.raises(ValueError, match="layers"):
        solve_model(gpt3_2layer, mesh_of(tp=8), device, layers=[9])
