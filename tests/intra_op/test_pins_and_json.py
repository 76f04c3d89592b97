"""User pins (respected, or a named conflict), and the JSON form the plan and runtime read."""

from __future__ import annotations

import json

import pytest

from planner.errors import InfeasibleError
from planner.intra_op import Partial, Replicate, Shard, placement_from_str, solve_layer
from planner.intra_op.examples import gpt_block_graph

R = Replicate()


@pytest.fixture(scope="module")
def block():
    return gpt_block_graph(batch=1, seq=2048, hidden=12288, heads=96)


def test_pins_are_respected(block, mesh_of, device):
    kw = dict(memory_limit_bytes=20e9, sequence_parallel=True)
    free = solve_layer(block, mesh_of(tp=4), device, **kw)
    assert free.op("ln2").output_layout == (Shard(1),)
    pinned = solve_layer(block, mesh_of(tp=4), device, **kw,
                         pins={"mlp.fc1.weight": ["Shard(1)"], "attn.proj": "replicate", "ln2": [R]})
    assert pinned.params["mlp.fc1.weight"] == (Shard(1),)  # by parameter
    assert pinned.op("attn.proj").strategy == "replicate"  # by op, with a strategy name
    assert pinned.op("ln2").output_layout == (R,)  # by op, with the output layout
    assert pinned.objective_s > free.objective_s
    glob = solve_layer(block, mesh_of(tp=4), device, memory_limit_bytes=20e9, pins={"*.bias": "Replicate()"})
    assert all(lay == (R,) for name, lay in glob.params.items() if name.endswith(".bias"))


@pytest.mark.parametrize("backend", ["cpsat", "cbc"])
def test_pins_against_memory_give_a_named_conflict(block, mesh_of, device, backend):
    with pytest.raises(InfeasibleError) as err:
        # either weight replicated fits in 20 GB; both do not
        solve_layer(block, mesh_of(tp=4), device, memory_limit_bytes=20e9, backend=backend,
                    pins={"mlp.fc1.weight": ["Replicate()"], "mlp.fc2.weight": ["Replicate()"]})
    conflict = err.value.details["conflict"]
    assert conflict == ["memory_limit", "pin[mlp.fc1.weight]", "pin[mlp.fc2.weight]"]
    message = str(err.value)
    assert "memory_limit" in message and "pin[mlp.fc1.weight]" in message and "raise memory_limit_bytes" in message
    assert err.value.details["min_memory_bytes"] > 20e9


def test_bad_pins_are_value_errors(block, mesh_of, device):
    with pytest.raises(ValueError, match="matches no parameter.*mlp.fc1.weight"):
        solve_layer(block, mesh_of(tp=4), device, pins={"mlp.fc1.weigth": ["Shard(0)"]})
    with pytest.raises(ValueError, match=r"cannot be S\(1\).*possible layouts are"):
        solve_layer(block, mesh_of(tp=4), device, pins={"mlp.fc1.bias": ["Shard(1)"]})
    with pytest.raises(ValueError, match=r"ln2 cannot be S\(1\)"):  # the sequence: only with sequence_parallel
        solve_layer(block, mesh_of(tp=4), device, pins={"ln2": ["Shard(1)"]})
    with pytest.raises(ValueError, match="needs one per axis"):
        solve_layer(block, mesh_of(dp=2, tp=4), device, pins={"mlp.fc1.weight": ["Shard(0)"]})


def test_solution_json(block, mesh_of, device):
    sol = solve_layer(block, mesh_of(tp=8), device, memory_limit_bytes=20e9)
    data = json.loads(json.dumps(sol.to_dict()))
    assert data["schema"] == "intra_op_sharding/1"
    assert data["mesh"]["axes"] == ["tp"] and data["mesh"]["shape"] == [8]
    assert data["solver"]["status"] == "optimal" and data["solver"]["gap"] == 0.0
    assert data["solver"]["objective_s"] == pytest.approx(sol.objective_s)
    assert data["params"]["mlp.fc2.weight"] == ["Shard(1)"]
    assert {k: tuple(map(placement_from_str, v)) for k, v in data["params"].items()} == sol.params
    (layer,) = data["layers"]
    assert layer["ops"]["mlp.fc2"]["output"] == ["Partial()"]
    assert placement_from_str(layer["ops"]["mlp.fc2"]["output"][0]) == Partial()
    fwd = [c for c in layer["collectives"] if c["phase"] == "fwd"]
    assert {(c["kind"], c["axis"], c["bytes"]) for c in fwd} == {("all_reduce", "tp", 2048 * 12288 * 2)}
    assert data["predicted"]["memory_bytes"] == pytest.approx(sol.memory_bytes)
