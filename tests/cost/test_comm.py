"""Collective times against hand calculations on a small two-level topology."""

import math
from dataclasses import replace

import pytest

from planner.cluster import ClusterSpec, DeviceSpec, LinkSpec
from planner.cost.comm import (
    Group,
    all_gather_s,
    all_reduce_s,
    all_to_all_s,
    broadcast_s,
    group_of_ranks,
    p2p_s,
    reduce_scatter_s,
    ring_all_reduce_s,
    strided_group,
    tree_all_reduce_s,
)
from planner.cost.constants import CostConstants

# Efficiencies of 1 so that the numbers below are the raw alpha-beta formulas.
C = CostConstants(link_efficiency=1.0, network_efficiency=1.0)
GB = 1e9


def two_level(nic_node_bw: float = 40 * GB, nodes: int = 2) -> ClusterSpec:
    """``nodes`` x 4 devices; NVLink 100 GB/s, 1 µs; network 40 GB/s per node (10 per device), 10 µs."""
    device = DeviceSpec(name="dev", peak_flops={"bf16": 1e14}, memory_bytes=2**34, memory_bandwidth_bytes_per_s=1e12)
    return ClusterSpec.homogeneous(name="two-level", device=device, nodes=nodes, devices_per_node=4,
                                   intra_node=LinkSpec(kind="nvlink", bandwidth_bytes_per_s=100 * GB, latency_s=1e-6),
                                   inter_node=LinkSpec(kind="infiniband", bandwidth_bytes_per_s=nic_node_bw,
                                                       latency_s=1e-5))


def test_group_shapes_follow_the_rank_layout():
    cl = two_level()
    assert strided_group(cl, 4, 1) == Group(size=4, nodes=1, per_node=4, intra_bw=100 * GB, intra_latency_s=1e-6,
                                            nic_bw=10 * GB, inter_latency_s=1e-5)
    g = strided_group(cl, 8, 1)
    assert (g.nodes, g.per_node) == (2, 4)
    g = strided_group(cl, 2, 4)  # dp across the two nodes with tp = 4 inside each
    assert (g.nodes, g.per_node) == (2, 1)
    assert group_of_ranks(cl, [0, 1, 4, 5]).nodes == 2
    assert group_of_ranks(cl, [0, 1, 4, 5]).per_node == 2


def test_all_reduce_inside_a_node_is_the_ring_formula():
    g = strided_group(two_level(), 4, 1)
    s = 1e9
    ring = 2 * 3 / 4 * s / (100 * GB) + 2 * 3 * 1e-6
    assert ring_all_reduce_s(s, g, C) == pytest.approx(ring)
    assert all_reduce_s(s, g, C) == pytest.approx(0.015006)  # ring beats tree (0.02 s) for big buffers


def test_ring_across_nodes_is_bounded_by_the_slowest_link():
    cl = two_level()
    s = 1e9
    # 4 ranks per node drive 4 NICs of 10 GB/s: 40 GB/s < 100 GB/s NVLink.
    g = strided_group(cl, 8, 1)
    assert g.ring_bw(C) == pytest.approx(40 * GB)
    assert all_reduce_s(s, g, C) == pytest.approx(2 * 7 / 8 * s / (40 * GB) + 2 * 7 * 1e-5)
    # One rank per node: a single 10 GB/s NIC bounds the ring.
    g = strided_group(cl, 2, 4)
    assert all_reduce_s(s, g, C) == pytest.approx(s / (10 * GB) + 2 * 1e-5)
    # A much faster network does not help beyond NVLink: the NVLink hop is now the slowest.
    fast = strided_group(two_level(nic_node_bw=4000 * GB), 8, 1)
    assert fast.ring_bw(C) == pytest.approx(100 * GB)


def test_mixed_cluster_ring_takes_the_slower_group_links():
    cl = ClusterSpec.preset("mixed-a100-v100")
    g = group_of_ranks(cl, list(range(16)))
    assert (g.size, g.nodes, g.per_node) == (16, 2, 8)
    assert g.intra_bw == 150e9  # V100 NVLink, not A100's 300 GB/s
    assert g.nic_bw == 50e9 / 8  # the DGX-1's 4 x 100 Gb/s shared by 8 GPUs
    assert g.ring_bw(C) == pytest.approx(min(150e9, 8 * 50e9 / 8))


def test_tree_wins_for_small_messages():
    g = strided_group(two_level(nodes=8), 32, 1)
    s = 1e3  # latency-bound
    ring, tree = ring_all_reduce_s(s, g, C), tree_all_reduce_s(s, g, C)
    assert tree < ring
    assert all_reduce_s(s, g, C) == pytest.approx(tree)
    assert tree == pytest.approx(2 * s / (40 * GB) + 2 * math.log2(32) * 1e-5)


def test_reduce_scatter_plus_all_gather_is_one_ring_all_reduce():
    g = strided_group(two_level(), 8, 1)
    s = 3e8
    assert reduce_scatter_s(s, g, C) == pytest.approx(7 / 8 * s / (40 * GB) + 7 * 1e-5)
    assert all_gather_s(s, g, C) == reduce_scatter_s(s, g, C)
    assert reduce_scatter_s(s, g, C) + all_gather_s(s, g, C) == pytest.approx(ring_all_reduce_s(s, g, C))


def test_all_to_all_gets_no_nic_aggregation():
    g = strided_group(two_level(), 8, 1)
    s = 1e9
    intra = 3 / 8 * s / (100 * GB)
    inter = 4 / 8 * s / (10 * GB)  # half the buffer leaves the node, each rank on its own NIC
    assert all_to_all_s(s, g, C) == pytest.approx(max(intra, inter) + 7 * 1e-5)
    assert all_to_all_s(s, strided_group(two_level(), 4, 1), C) == pytest.approx(3 / 4 * s / (100 * GB) + 3e-6)


def test_broadcast_and_point_to_point():
    cl = two_level()
    s = 2e8
    assert broadcast_s(s, strided_group(cl, 8, 1), C) == pytest.approx(s / (40 * GB) + 3 * 1e-5)
    assert p2p_s(s, same_node=True, cluster=cl, c=C) == pytest.approx(s / (100 * GB) + 1e-6)
    assert p2p_s(s, same_node=False, cluster=cl, c=C) == pytest.approx(s / (10 * GB) + 1e-5)


def test_efficiencies_scale_bandwidth_terms():
    g = strided_group(two_level(), 8, 1)
    half = replace(C, network_efficiency=0.5)
    s = 1e10
    assert all_reduce_s(s, g, half) == pytest.approx(2 * 7 / 8 * s / (20 * GB) + 2 * 7 * 1e-5)


def test_trivial_groups_and_empty_buffers_cost_nothing():
    cl = two_level()
    one = strided_group(cl, 1, 1)
    for fn in (all_reduce_s, reduce_scatter_s, all_gather_s, all_to_all_s, broadcast_s):
        assert fn(1e9, one, C) == 0.0
        assert fn(0.0, strided_group(cl, 8, 1), C) == 0.0
    assert p2p_s(0.0, same_node=False, cluster=cl, c=C) == 0.0
    with pytest.raises(ValueError, match="ranks"):
        group_of_ranks(cl, [0, 99])
