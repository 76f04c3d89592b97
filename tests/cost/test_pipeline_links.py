"""Every pipeline cut is priced on the link it crosses, wherever the stages fall on the nodes."""

from __future__ import annotations

import dataclasses

import pytest

from planner import ParallelConfig, evaluate
from planner.cluster import ClusterSpec


def _cluster(nodes: int, inter_bw: float, inter_latency_s: float = 5e-6) -> ClusterSpec:
    base = ClusterSpec.preset("dgx-a100-80g", nodes=nodes)
    (group,) = base.groups
    link = dataclasses.replace(group.inter_node, bandwidth_bytes_per_s=inter_bw, latency_s=inter_latency_s)
    return dataclasses.replace(base, groups=(dataclasses.replace(group, inter_node=link),))


def _p2p(cluster: ClusterSpec, **degrees) -> float:
    cfg = ParallelConfig(micro_batch_size=1, num_micro_batches=32, schedule="1f1b", **degrees)
    return evaluate("gpt3-1.3b", cluster, cfg).predicted.time_breakdown_s["pp_p2p_exposed"]


def test_cuts_between_nodes_pay_the_network_even_when_a_node_holds_several_stages():
    # tp=4 pp=16 on 8 nodes of 8: two stages per node, so every other cut crosses the network.
    fast = _p2p(_cluster(8, 200e9), tp=4, pp=16)
    slow_bw = _p2p(_cluster(8, 200e7), tp=4, pp=16)
    slow_latency = _p2p(_cluster(8, 200e9, inter_latency_s=5e-3), tp=4, pp=16)
    assert slow_bw > 20 * fast
    assert slow_latency > 20 * fast


def test_cuts_inside_one_node_never_see_the_network():
    # pp=8 on one node: all cuts are NVLink, the network's figures do not matter.
    assert _p2p(_cluster(1, 200e9), pp=8) == pytest.approx(_p2p(_cluster(1, 200e5, 1.0), pp=8))
