"""Placements, meshes and the alpha-beta collective costs: the small pieces, checked on numbers."""

from __future__ import annotations

import math

import pytest

from planner.cluster import LinkSpec
from planner.cost import comm
from planner.cost.constants import CostConstants
from planner.intra_op import (
    MeshSpec,
    Partial,
    Replicate,
    Shard,
    from_dims_mapping,
    placement_from_str,
    to_dims_mapping,
)
from planner.intra_op.collectives import collective_s, redistribute_plan, redistribute_s
from planner.intra_op.strategies import CostModel

LINK = LinkSpec(kind="nvswitch", bandwidth_bytes_per_s=100e9, latency_s=5e-6)


def test_torch_strings_and_parse_round_trip():
    assert [p.to_torch_str() for p in (Shard(2), Replicate(), Partial())] == ["Shard(2)", "Replicate()", "Partial()"]
    for p in (Shard(0), Shard(3), Replicate(), Partial()):
        assert placement_from_str(p.to_torch_str()) == p
    # torch's own reprs parse too
    assert placement_from_str("Shard(dim=1)") == Shard(1)
    assert placement_from_str("Partial(sum)") == Partial()
    assert placement_from_str("S(0)") == Shard(0) and placement_from_str("R") == Replicate()
    with pytest.raises(ValueError, match="Partial"):
        placement_from_str("Partial(max)")
    with pytest.raises(ValueError, match="non-negative"):
        placement_from_str("Shard(-1)")


def test_torch_accepts_the_strings():
    tensor = pytest.importorskip("torch.distributed.tensor")
    names = {"Shard": tensor.Shard, "Replicate": tensor.Replicate, "Partial": tensor.Partial}
    for ours, theirs in ((Shard(1), tensor.Shard(1)), (Replicate(), tensor.Replicate()), (Partial(), tensor.Partial())):
        assert eval(ours.to_torch_str(), {}, names) == theirs  # noqa: S307 - our own fixed strings


def test_gshard_dims_mapping_round_trip():
    axes = ("dp", "tp")
    layout = from_dims_mapping([None, "tp", "dp"], axes)
    assert layout == (Shard(2), Shard(1))
    assert to_dims_mapping(layout, 3, axes) == [[], ["tp"], ["dp"]]
    with pytest.raises(ValueError, match="used twice"):
        from_dims_mapping(["tp", "tp"], axes)
    with pytest.raises(ValueError, match="mesh axes"):
        from_dims_mapping(["ep"], axes)


def test_collectives_are_priced_by_cost_comm():
    """One source of truth: the ILP's collective times are planner.cost.comm's on the axis's group."""
    c = CostConstants()
    mesh = MeshSpec.one_axis("tp", 8, LINK)
    g = mesh.group(0)
    assert (g.size, g.nodes, g.intra_bw, g.latency_s) == (8, 1, 100e9, 5e-6)
    b = 1e9
    bw = 100e9 * c.link_efficiency
    ring = 2 * 7 / 8 * b / bw + 14 * 5e-6
    tree = 2 * b / bw + 2 * 3 * 5e-6
    assert collective_s("all_reduce", b, g, c) == pytest.approx(min(ring, tree)) == comm.all_reduce_s(b, g, c)
    assert collective_s("all_gather", b, g, c) == pytest.approx(7 / 8 * b / bw + 7 * 5e-6)
    assert collective_s("reduce_scatter", b, g, c) == comm.reduce_scatter_s(b, g, c)
    assert collective_s("all_to_all", b, g, c) == comm.all_to_all_s(b, g, c)
    assert collective_s("all_reduce", b, mesh.group(0), CostConstants(link_efficiency=0.4)) > ring
    # Megatron-SP's identity holds for the ring: reduce-scatter + all-gather = a ring all-reduce
    assert (collective_s("reduce_scatter", b, g, c) + collective_s("all_gather", b, g, c)
            == pytest.approx(comm.ring_all_reduce_s(b, g, c)))
    assert collective_s("all_reduce", b, MeshSpec.one_axis("tp", 1, LINK).group(0), c) == 0.0
    with pytest.raises(ValueError, match="collective kind"):
        collective_s("broadcast_all", b, g, c)
    # the cost model and redistribute_s go through the same function
    cm = CostModel(mesh=mesh, device=None, constants=c)  # type: ignore[arg-type]  # device unused here
    t, steps = cm.transfer(800.0, (Partial(),), (Replicate(),))
    assert steps == ((0, "all_reduce", 800.0),) and t == comm.all_reduce_s(800.0, g, c)
    assert redistribute_s(800.0, (Partial(),), (Replicate(),), [g], c) == t


def test_mesh_groups_follow_the_cluster_topology(node):
    """from_cluster gives each axis strided_group's group: the one the inter-op model prices tp with."""
    mesh = MeshSpec.from_cluster(node, {"tp": 8})
    assert mesh.group(0) == comm.strided_group(node, 8, 1)
    two = node.resized(nodes=2)
    mesh = MeshSpec.from_cluster(two, (("dp", 2), ("tp", 8)))
    assert mesh.group(0) == comm.strided_group(two, 2, 8) and mesh.group(0).nodes == 2
    with pytest.raises(ValueError, match="MeshSpec.groups"):
        MeshSpec(axes=("tp",), shape=(4,), links=(LINK,), groups=(comm.strided_group(node, 8, 1),))


@pytest.mark.parametrize(("src", "dst", "expect"), [
    ((Partial(),), (Replicate(),), [(0, "all_reduce", 800.0)]),
    ((Shard(0),), (Replicate(),), [(0, "all_gather", 800.0)]),
    ((Partial(),), (Shard(1),), [(0, "reduce_scatter", 800.0)]),
    ((Shard(0),), (Shard(1),), [(0, "all_to_all", 100.0)]),
    ((Replicate(),), (Shard(1),), []),
    ((Shard(1),), (Shard(1),), []),
])
def test_redistribute_one_axis(src, dst, expect):
    assert redistribute_plan(800.0, src, dst, (8,)) == expect


def test_redistribute_two_axes_uses_local_bytes():
    # dim 0 split on dp=2: the tp all-reduce works on half the tensor
    assert redistribute_plan(800.0, (Shard(0), Partial()), (Shard(0), Replicate()), (2, 4)) == [(1, "all_reduce", 400.0)]


def test_mesh_from_cluster_links(node):
    mesh = MeshSpec.from_cluster(node, {"dp": 2, "tp": 4})
    assert mesh.links == (node.intra_node, node.intra_node) and mesh.num_devices == 8
    two_nodes = node.resized(nodes=2)
    mesh = MeshSpec.from_cluster(two_nodes, (("dp", 2), ("tp", 8)))
    assert mesh.links[1] == two_nodes.intra_node
    assert mesh.links[0].bandwidth_bytes_per_s == pytest.approx(two_nodes.inter_node.bandwidth_bytes_per_s / 8)
    with pytest.raises(ValueError, match="needs 16 devices"):
        MeshSpec.from_cluster(node, {"tp": 16})
    with pytest.raises(ValueError, match="one or two axis"):
        MeshSpec(axes=("a", "b", "c"), shape=(1, 1, 1), links=(LINK,) * 3)
    assert math.prod(mesh.shape) == 16
