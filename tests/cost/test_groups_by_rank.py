"""One rule prices every communicating group: its real ranks, their nodes and the node groups they touch.

A homogeneous cluster is the one-group case of a mixed one: these tests fail if pricing forks on
``is_homogeneous`` again (a mixed cluster summarised by its slowest links, a homogeneous one by the
``devices_per_node // stride`` formula, measured data only for one group).
"""

from __future__ import annotations

import dataclasses

import pytest

from planner.cluster import ClusterSpec, LinkSpec
from planner.cost.calibrate import gpt_graph
from planner.cost.comm import (
    Group,
    all_reduce_s,
    group_of_ranks,
    p2p_s,
    pair_group,
    step_collective_notes,
    strided_group,
)
from planner.cost.constants import CostConstants
from planner.cost.model import layer_table
from planner.cost.pipeline_links import tied_sync_s
from planner.cost.sharding import shard_groups
from planner.plan import ParallelConfig

C = CostConstants(link_efficiency=1.0, network_efficiency=1.0)
GB = 1e9
SIZES = (2**12, 2**20, 2**30)


def _a100(nodes: int = 1) -> ClusterSpec:
    return ClusterSpec.preset("dgx-a100-80g", nodes=nodes)


def _mixed(fast: ClusterSpec | None = None, slow_intra_bw: float = 150 * GB, slow_nic_bw: float = 12.5 * GB,
           **slow_fields) -> ClusterSpec:
    """Two node groups of one 8-device node each: the A100 node first (NVSwitch 300 GB/s, 25 GB/s of NIC per
    device), then one with slower links (``slow_nic_bw`` per device)."""
    (g,) = (fast or _a100()).groups
    slow = dataclasses.replace(
        g, intra_node=LinkSpec(kind="nvlink", bandwidth_bytes_per_s=slow_intra_bw, latency_s=5e-6),
        inter_node=LinkSpec(kind="infiniband", bandwidth_bytes_per_s=slow_nic_bw * 8, latency_s=8e-6), **slow_fields)
    return ClusterSpec(name="mixed", groups=(g, slow))


def _measured(scale: float = 1.0) -> ClusterSpec:
    """One dgx-a100-80g node with measured all-reduce / all-gather / reduce-scatter / send-recv curves."""
    points = [{"nodes": n, "message_bytes": s, "bus_bandwidth_bytes_per_s": b * scale}
              for n, values in {1: (1e9, 5e10, 2e11), 2: (5e8, 1e10, 4e10)}.items() for s, b in zip(SIZES, values)]
    d = _a100().to_dict()
    d["collectives"] = {"all_reduce": points, "all_gather": points, "reduce_scatter": points, "send_recv": points}
    return ClusterSpec.from_dict(d)


def test_a_mixed_clusters_group_inside_one_node_group_gets_that_groups_links():
    mixed = _mixed()
    first = strided_group(mixed, 8, 1, first=0)  # tp = 8 on the A100 node
    assert (first.intra_bw, first.intra_latency_s, first.nodes) == (300 * GB, 3e-6, 1)
    second = strided_group(mixed, 8, 1, first=8)  # the same tp group on the slower node
    assert (second.intra_bw, second.intra_latency_s, second.nodes) == (150 * GB, 5e-6, 1)
    assert all_reduce_s(2**28, first, C) < all_reduce_s(2**28, second, C)
    # without a position, the slowest placement over the node groups (a whole-cluster summary)
    assert strided_group(mixed, 8, 1) == second and strided_group(_a100(2), 8, 1) == strided_group(_a100(2), 8, 1, 0)
    across = strided_group(mixed, 2, 8)  # one rank on each node: the slower NVLink and NIC, the larger latency
    assert (across.nodes, across.per_node) == (2, 1)
    assert (across.intra_bw, across.nic_bw, across.inter_latency_s) == (150 * GB, 12.5 * GB, 8e-6)
    assert across == group_of_ranks(mixed, [0, 8])


def test_a_mixed_clusters_shard_groups_are_each_positions_own():
    mixed = _mixed()
    cfg = ParallelConfig(pp=2, dp=4, tp=2, zero_stage=1)
    fast, slow = (shard_groups(mixed, cfg, k).shard for k in (0, 1))
    assert fast == group_of_ranks(mixed, [0, 2, 4, 6]) and fast.intra_bw == 300 * GB
    assert slow == group_of_ranks(mixed, [8, 10, 12, 14]) and slow.intra_bw == 150 * GB


def test_a_homogeneous_cluster_with_a_non_dividing_layout_gets_its_real_per_node_counts():
    cluster = _a100(nodes=3)  # 24 devices; tp = 3 does not divide a node of 8
    dp = strided_group(cluster, 8, 3)  # ranks 0, 3, ..., 21: 3 + 3 + 2 on the three nodes
    assert (dp.nodes, dp.per_node) == (3, 2)  # the formula devices_per_node // stride said 4 nodes of 2
    assert dp == group_of_ranks(cluster, range(0, 24, 3))
    straddling = strided_group(cluster, 3, 1, first=6)  # the third tp group: ranks 6, 7 | 8
    assert (straddling.nodes, straddling.per_node) == (2, 1)
    cfg = ParallelConfig(pp=1, dp=8, tp=3, zero_stage=1)
    assert shard_groups(cluster, cfg).shard == dp


def test_uneven_groups_are_bounded_by_their_emptiest_node():
    cluster = _a100(nodes=2)
    g = group_of_ranks(cluster, [0, 2, 4, 6, 8, 10])  # 4 ranks on node 0, 2 on node 1
    assert (g.nodes, g.per_node) == (2, 2)
    assert g.ring_bw(C) == pytest.approx(2 * 25 * GB)  # two of node 1's NICs, not four of node 0's


def test_a_group_past_the_clusters_devices_continues_on_nodes_like_its_last():
    one = _a100(nodes=1)
    assert strided_group(one, 4, 8) == strided_group(_a100(nodes=4), 4, 8)  # a what-if's larger layout
    with pytest.raises(ValueError, match="outside the cluster"):
        group_of_ranks(one, [0, 8])


def test_shared_measured_data_is_the_one_groups_or_what_every_group_agrees_on():
    measured = _measured()
    (g,) = measured.groups
    assert measured.shared_collectives is g.collectives
    assert ClusterSpec(name="same", groups=(g, g)).shared_collectives is g.collectives
    other = dataclasses.replace(g, collectives=_measured(0.5).groups[0].collectives)
    assert ClusterSpec(name="differ", groups=(g, other)).shared_collectives is None
    bigger = dataclasses.replace(g, devices_per_node=4)  # the same figures on nodes of another size
    assert ClusterSpec(name="sizes", groups=(g, bigger)).shared_collectives is None
    assert _mixed().shared_collectives is None and _a100().shared_gemm is None
    assert ClusterSpec(name="sizes", groups=(g, bigger)).min_devices_per_node == 4


def test_a_mixed_cluster_whose_groups_share_measured_collectives_uses_them():
    measured = _measured()
    same = _mixed(measured, slow_intra_bw=300 * GB, slow_nic_bw=20 * GB)  # the A100 node's curves on both
    plain = _mixed(slow_intra_bw=300 * GB, slow_nic_bw=20 * GB)
    two_measured = ClusterSpec(name="two", groups=(measured.groups[0], measured.groups[0]))
    both = strided_group(same, 16, 1)  # both whole nodes: the 2-node curve
    assert both.measured is measured.groups[0].collectives and both.devices_per_node == 8
    assert all_reduce_s(2**30, both, C) == pytest.approx(2 * 15 / 16 * 2**30 / 4e10, rel=1e-12)
    assert all_reduce_s(2**30, both, C) == all_reduce_s(2**30, strided_group(two_measured, 16, 1), C)
    assert all_reduce_s(2**30, both, C) != all_reduce_s(2**30, strided_group(plain, 16, 1), C)
    # send/recv between the two node groups reads the measured 2-node curve too
    assert pair_group(same, same_node=False).measured is measured.groups[0].collectives
    assert p2p_s(2**30, same_node=False, cluster=same, c=C) == pytest.approx(2**30 / 4e10, rel=1e-12)
    assert p2p_s(2**30, same_node=False, cluster=plain, c=C) == pytest.approx(2**30 / (20 * GB) + 8e-6)
    cfg = ParallelConfig(pp=2, dp=1, tp=8)
    notes = step_collective_notes(same, cfg, C, tp_bytes=[2**20], dp_bytes=[], p2p_bytes=[2**20])
    assert any("pp send_recv" in n and "measured bus bandwidth" in n for n in notes)


def test_a_mixed_cluster_prices_its_shared_measured_gemms():
    d = _a100().to_dict()
    d["gemm"] = [{"m": 4096, "n": 4096, "k": 4096, "dtype": "bf16", "flops_per_s": 2.5e14},
                 {"m": 1024, "n": 4096, "k": 4096, "dtype": "bf16", "flops_per_s": 2.0e14}]
    gemm = ClusterSpec.from_dict(d)
    graph = gpt_graph(32, 4096, 2, seq_len=512, vocab=8192)

    def fwd_s(cluster: ClusterSpec) -> float:
        table = layer_table(graph, cluster, micro_batch=2, tp=1, sequence_parallel=False, recompute="none", c=C)
        return float(table.fwd_s.sum())

    shared = _mixed(gemm)  # both groups carry the A100 node's GEMM points
    assert fwd_s(shared) == fwd_s(gemm) != fwd_s(_a100())
    assert fwd_s(_mixed(gemm, gemm=None)) == fwd_s(_a100())  # one group measured, the other not: the formula for both


def test_tied_parameters_on_one_node_of_a_mixed_cluster_sync_over_its_nvlink():
    mixed = _mixed()
    cfg = ParallelConfig(pp=4, dp=2, tp=2)  # positions 0 and 1 on the A100 node, 2 and 3 on the other
    grad_bytes, numel = 2.0, 10**8
    near = tied_sync_s(None, [], 0, cfg, mixed, C, grad_bytes, holders=[(numel, {0, 1})])  # type: ignore[arg-type]
    one_node = Group(size=2, nodes=1, per_node=2, intra_bw=300 * GB, intra_latency_s=3e-6, nic_bw=25 * GB,
                     inter_latency_s=5e-6)
    assert near == pytest.approx(all_reduce_s(grad_bytes * numel / cfg.tp, one_node, C), rel=1e-12)
    far = tied_sync_s(None, [], 0, cfg, mixed, C, grad_bytes, holders=[(numel, {0, 3})])  # type: ignore[arg-type]
    assert far == pytest.approx(all_reduce_s(grad_bytes * numel / cfg.tp, group_of_ranks(mixed, [0, 12]), C))
    assert group_of_ranks(mixed, [0, 12]).nodes == 2 and far > 5 * near
