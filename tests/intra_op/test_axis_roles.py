"""Axis roles: a ``"model"`` axis never splits the batch and splits every weight it can (the plan's
``tp``); a ``"data"`` axis splits only the batch (the plan's ``dp``); no role changes nothing."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planner.intra_op import MeshSpec, Replicate, Shard, op_graph_from_cost_graph, solve_layer, solve_model
from planner.intra_op.examples import gpt_block_graph, mlp_graph, moe_graph
from planner.intra_op.strategies import batch_labels

R = Replicate()
MEGATRON = {"attn.qkv": (Shard(0),), "attn.proj": (Shard(1),), "mlp.fc1": (Shard(0),), "mlp.fc2": (Shard(1),)}


def batch_splits(graph, sol, axis: int) -> list[str]:
    """Every place where ``sol`` cuts a batch dim (by the op graph's roles and labels) on mesh axis ``axis``."""
    found = []
    for name, op in graph.ops.items():
        s = sol.op(name)
        out = s.output_layout[axis]
        if isinstance(out, Shard) and op.roles and op.roles[out.dim] == "batch":
            found.append(f"{name} output {out}")
        if op.follows or op.is_input:
            continue
        for src, lay in zip(op.inputs, s.input_layouts):
            roles = graph.ops[src].roles
            if isinstance(lay[axis], Shard) and roles and roles[lay[axis].dim] == "batch":
                found.append(f"{name} reads {src} as {lay[axis]}")
        if s.head == name and s.strategy != "replicate":
            labels = batch_labels(op)
            names = {op.name_of_label(c) for c in labels}
            axis_name = sol.mesh.axes[axis]
            for part in s.strategy.split(","):
                mesh_axis, label = part.split("=")
                if mesh_axis == axis_name and label in names:
                    found.append(f"{name} strategy {s.strategy}")
    return found


def weights_split(graph, sol, axis: int) -> list[str]:
    """Linear and embedding weights left replicated on ``axis`` (a model axis must split them)."""
    return [p.name for op in graph.ops.values() if op.kind in ("linear", "embedding") for p in op.params[:1]
            if not isinstance(sol.params[p.name][axis], Shard)]


def model_mesh(node, **axes: int) -> MeshSpec:
    return MeshSpec.from_cluster(node, axes, roles={"tp": "model"})


@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.sampled_from([2, 8, 64]), seq=st.sampled_from([128, 512, 2048]), hidden=st.sampled_from([128, 1024, 8192]),
       tp=st.sampled_from([2, 4, 8]), sp=st.booleans(), kind=st.sampled_from(["block", "mlp", "moe"]))
def test_model_axis_never_splits_the_batch(node, device, batch, seq, hidden, tp, sp, kind):
    if kind == "block":
        graph = gpt_block_graph(batch=batch, seq=seq, hidden=hidden, heads=max(hidden // 64, 8))  # tp divides heads
    elif kind == "mlp":
        graph = mlp_graph(batch=batch, seq=seq, hidden=hidden)
    else:
        graph = moe_graph(groups=batch, group_size=seq, model=hidden, ffn=2 * hidden, experts=8)
    sol = solve_layer(graph, model_mesh(node, tp=tp), device, memory_limit_bytes=math.inf, sequence_parallel=sp)
    assert batch_splits(graph, sol, 0) == []
    assert weights_split(graph, sol, 0) == []
    if kind != "moe":
        assert all(sol.params[f"{name}.weight"] == lay for name, lay in MEGATRON.items() if f"{name}.weight" in
                   sol.params)


@pytest.mark.parametrize("sp", [False, True], ids=["no-sp", "sp"])
@pytest.mark.parametrize("case", ["gpt-tiny", "llama", "mixtral"])
def test_model_axis_never_splits_the_batch_of_traced_layers(request, node, device, case, sp):
    cost_graph = request.getfixturevalue({"gpt-tiny": "gpt_tiny", "llama": "llama_2layer",
                                          "mixtral": "mixtral_2layer"}[case])
    graph = op_graph_from_cost_graph(cost_graph, 1, batch_size=4)
    assert not graph.notes or case == "mixtral"  # the MoE routing is opaque (replicated), nothing else is
    sol = solve_layer(graph, model_mesh(node, tp=4), device, memory_limit_bytes=math.inf, sequence_parallel=sp)
    assert batch_splits(graph, sol, 0) == []
    assert weights_split(graph, sol, 0) == []


def test_small_model_large_batch_becomes_megatron_on_a_model_axis(node, device, mesh_of):
    # without roles this is data parallelism (test_rediscover): every weight replicated, the batch split
    graph = gpt_block_graph(batch=64, seq=512, hidden=256, heads=8)
    free = solve_layer(graph, mesh_of(tp=8), device)
    assert batch_splits(graph, free, 0) and all(lay == (R,) for lay in free.params.values())
    sol = solve_layer(graph, model_mesh(node, tp=8), device)
    assert batch_splits(graph, sol, 0) == []
    for name, lay in MEGATRON.items():
        assert sol.params[f"{name}.weight"] == lay, name
    assert sol.params["ln1.weight"] == sol.params["ln2.weight"] == (R,)  # nothing to split: stays replicated
    assert sol.objective_s > free.objective_s  # the role costs time here; the plan chose tp for memory


def test_gpt_tiny_whole_model_is_megatron_at_tp2(gpt_tiny, node, device, mesh_of):
    # the issue: on an unconstrained axis the tiny model is best replicated (or batch split)
    free = solve_model(gpt_tiny, mesh_of(tp=2), device, batch_size=2, memory_limit_bytes=math.inf)
    assert all(free.params[f"blocks.{i}.mlp.fc1.weight"] == (R,) for i in range(4))
    sol = solve_model(gpt_tiny, model_mesh(node, tp=2), device, batch_size=2, memory_limit_bytes=math.inf)
    for i in range(4):
        for name, lay in MEGATRON.items():
            assert sol.params[f"blocks.{i}.{name}.weight"] == lay, (i, name)
        assert sol.params[f"blocks.{i}.ln1.weight"] == (R,)
    assert sol.op("blocks_0_attn_attn_drop").output_layout == (Shard(1),)  # attention split by heads
    assert sol.params["head.lm_head.weight"] == (Shard(0),)  # column-parallel over the vocabulary


def test_data_and_model_axes(node, device):
    graph = gpt_block_graph(batch=8, seq=2048, hidden=4096, heads=32)
    mesh = MeshSpec.from_cluster(node, {"dp": 2, "tp": 4}, roles={"dp": "data", "tp": "model"})
    sol = solve_layer(graph, mesh, device, memory_limit_bytes=math.inf, sequence_parallel=True)
    for name, (lay,) in MEGATRON.items():
        assert sol.params[f"{name}.weight"] == (R, lay), name
    for s in sol.layers[0].ops.values():  # dp cuts the batch (dim 0) or nothing
        assert all(p.dim == 0 for p in (s.output_layout[0], *(lay[0] for lay in s.input_layouts))
                   if isinstance(p, Shard)), s.op
    assert {c.axis for c in sol.collectives if c.phase == "grad_sync"} == {"dp", "tp"}  # norms' weights on tp


def test_roles_on_the_mesh(node):
    plain = MeshSpec.from_cluster(node, {"dp": 2, "tp": 4})
    assert plain.roles == () and plain.axis_roles == (None, None) and "roles" not in plain.to_dict()
    mesh = MeshSpec.from_cluster(node, {"dp": 2, "tp": 4}, roles={"tp": "model", "dp": "data"})
    assert mesh.roles == (("dp", "data"), ("tp", "model"))  # axis order, whatever the mapping's order
    assert mesh == MeshSpec.from_cluster(node, [("dp", 2), ("tp", 4)], roles=[("dp", "data"), ("tp", "model")])
    assert hash(mesh) != hash(plain) and mesh.role("tp") == "model"
    assert mesh.to_dict()["roles"] == {"dp": "data", "tp": "model"}
    assert mesh.describe() == "dp=2 x tp=4 (dp: data, tp: model)"
    with pytest.raises(ValueError, match="MeshSpec.roles"):
        MeshSpec.from_cluster(node, {"tp": 8}, roles={"tp": "tensor"})
    with pytest.raises(ValueError, match="MeshSpec.roles"):
        MeshSpec.from_cluster(node, {"tp": 8}, roles={"pp": "model"})
