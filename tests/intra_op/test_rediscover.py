"""The ILP rediscovers the published shardings without being told them.

GPT-3 175B sizes (hidden 12288, 96 heads, sequence 2048, micro-batch 1, bf16) on a DGX A100:
Megatron-LM's column-then-row tensor parallelism, Megatron-SP's reduce-scatter / all-gather,
data parallelism when the model is small and the batch large, GShard's expert parallelism.
"""

from __future__ import annotations

import pytest

from planner.intra_op import Partial, Replicate, Shard, solve_layer
from planner.intra_op.examples import attention_graph, gpt_block_graph, mlp_graph, moe_graph

R, P = Replicate(), Partial()
H, S = 12288, 2048
ACT_BYTES = 1 * S * H * 2  # one [batch, seq, hidden] bf16 activation


def moved(sol, phase):
    return sorted((c.kind, c.at) for c in sol.collectives if c.phase == phase)


@pytest.fixture(scope="module")
def block():
    return gpt_block_graph(batch=1, seq=S, hidden=H, heads=96)


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_megatron_column_then_row(block, mesh_of, device, tp):
    sol = solve_layer(block, mesh_of(tp=tp), device, memory_limit_bytes=20e9)
    params = sol.params
    for name in ("attn.qkv", "mlp.fc1"):  # column-parallel: output features split
        assert params[f"{name}.weight"] == (Shard(0),) and params[f"{name}.bias"] == (Shard(0),)
    for name in ("attn.proj", "mlp.fc2"):  # row-parallel: input features split, output a partial sum
        assert params[f"{name}.weight"] == (Shard(1),) and params[f"{name}.bias"] == (R,)
        assert sol.op(name).output_layout == (P,)
    assert params["ln1.weight"] == params["ln2.weight"] == (R,)
    assert sol.op("scores").output_layout == (Shard(1),)  # attention split by heads
    # one all-reduce forward and one backward per block half, on the [b, s, h] activation
    assert moved(sol, "fwd") == [("all_reduce", "attn.proj -> resid_drop"), ("all_reduce", "mlp.fc2 -> mlp_drop")]
    assert moved(sol, "bwd") == [("all_reduce", "ln1 -> attn.qkv"), ("all_reduce", "ln2 -> mlp.fc1")]
    assert all(c.nbytes == ACT_BYTES for c in sol.collectives if c.phase != "grad_sync")
    assert moved(sol, "grad_sync") == []
    assert sol.status == "optimal" and sol.gap == 0.0


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_sequence_parallel_swaps_all_reduce_for_reduce_scatter_all_gather(block, mesh_of, device, tp):
    sol = solve_layer(block, mesh_of(tp=tp), device, memory_limit_bytes=20e9, sequence_parallel=True)
    assert sol.params["attn.qkv.weight"] == sol.params["mlp.fc1.weight"] == (Shard(0),)
    assert sol.params["attn.proj.weight"] == sol.params["mlp.fc2.weight"] == (Shard(1),)
    for norm in ("ln1", "ln2"):
        assert sol.op(norm).output_layout == (Shard(1),)  # split along the sequence
    assert moved(sol, "fwd") == [("all_gather", "ln1 -> attn.qkv"), ("all_gather", "ln2 -> mlp.fc1"),
                                 ("reduce_scatter", "attn.proj -> resid_drop"),
                                 ("reduce_scatter", "mlp.fc2 -> mlp_drop")]
    assert moved(sol, "bwd") == [("all_gather", "attn.proj -> resid_drop"), ("all_gather", "mlp.fc2 -> mlp_drop"),
                                 ("reduce_scatter", "ln1 -> attn.qkv"), ("reduce_scatter", "ln2 -> mlp.fc1")]
    # the only all-reduces left are the norms' weight gradients
    assert {c.at for c in sol.collectives if c.kind == "all_reduce"} <= {"ln1", "ln2"}
    plain = solve_layer(block, mesh_of(tp=tp), device, memory_limit_bytes=20e9)
    assert sol.objective_s < plain.objective_s and sol.memory_bytes < plain.memory_bytes


@pytest.mark.parametrize(("graph", "fwd", "bwd"), [
    (mlp_graph(batch=1, seq=S, hidden=H), "mlp.fc2 -> mlp_drop", "ln -> mlp.fc1"),
    (attention_graph(batch=1, seq=S, hidden=H, heads=96), "attn.proj -> resid_drop", "ln1 -> attn.qkv"),
])
def test_each_half_alone(mesh_of, device, graph, fwd, bwd):
    sol = solve_layer(graph, mesh_of(tp=4), device, memory_limit_bytes=10e9)
    assert moved(sol, "fwd") == [("all_reduce", fwd)] and moved(sol, "bwd") == [("all_reduce", bwd)]


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_backends_agree(block, mesh_of, device, sequence_parallel):
    kw = dict(memory_limit_bytes=20e9, sequence_parallel=sequence_parallel)
    a = solve_layer(block, mesh_of(tp=8), device, backend="cpsat", **kw)
    b = solve_layer(block, mesh_of(tp=8), device, backend="cbc", **kw)
    assert (a.backend, b.backend) == ("cpsat", "cbc")
    assert a.objective_s == pytest.approx(b.objective_s, rel=1e-12)
    assert a.params == b.params


def test_small_model_large_batch_is_data_parallel(mesh_of, device):
    graph = gpt_block_graph(batch=64, seq=512, hidden=256, heads=4)
    sol = solve_layer(graph, mesh_of(dp=8), device)
    assert set(sol.params.values()) == {(R,)}  # every weight replicated
    assert sol.activations["x"] == (Shard(0),)  # the batch is split
    assert moved(sol, "fwd") == moved(sol, "bwd") == []
    syncs = [c for c in sol.collectives if c.phase == "grad_sync"]
    assert {c.kind for c in syncs} == {"all_reduce"} and len(syncs) == len(sol.params)


def test_mixture_of_experts_is_expert_parallel(mesh_of, device):
    graph = moe_graph(groups=64, group_size=1024, model=1024, ffn=4096, experts=8)
    sol = solve_layer(graph, mesh_of(ep=8), device)
    assert sol.params["experts.fc1.weight"] == sol.params["experts.fc2.weight"] == (Shard(0),)
    assert sol.op("dispatch").output_layout == (Shard(1),)  # still split by group...
    assert sol.op("expert_fc1").input_layouts == ((Shard(0),),)  # ...but the experts read it split by expert
    assert moved(sol, "fwd") == [("all_to_all", "dispatch -> expert_fc1"), ("all_to_all", "expert_fc2 -> combine")]
    assert moved(sol, "bwd") == moved(sol, "fwd")
    cbc = solve_layer(graph, mesh_of(ep=8), device, backend="cbc")
    assert cbc.objective_s == pytest.approx(sol.objective_s, rel=1e-12)


def test_two_dimensional_mesh_is_data_times_tensor_parallel(mesh_of, device):
    graph = gpt_block_graph(batch=8, seq=S, hidden=H, heads=96)
    sol = solve_layer(graph, mesh_of(dp=2, tp=4), device, memory_limit_bytes=20e9)
    for name in ("attn.qkv", "mlp.fc1"):
        assert sol.params[f"{name}.weight"] == (R, Shard(0))
    for name in ("attn.proj", "mlp.fc2"):
        assert sol.params[f"{name}.weight"] == (R, Shard(1))
    assert sol.activations["x"][0] == Shard(0)
    dp_syncs = {c.at for c in sol.collectives if c.phase == "grad_sync" and c.axis == "dp"}
    assert {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"} <= dp_syncs
    assert {(c.kind, c.axis) for c in sol.collectives if c.phase == "fwd"} <= {
        ("all_reduce", "tp"), ("all_gather", "tp"), ("reduce_scatter", "tp")}
