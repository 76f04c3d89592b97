"""Collective and point-to-point communication times on a hierarchical topology (alpha-beta).

A process group is summarised by its size ``n``, how many nodes it spans and how many of its
ranks share a node. Inside a node ranks talk over NVLink/NVSwitch at ``intra_bw``; between
nodes each rank has its share of the node's network bandwidth (``node_bw / devices_per_node``,
one NIC per GPU on DGX machines), and a group with ``k`` ranks per node drives ``k`` NICs at
once (NCCL runs one ring per NIC). A ring is bounded by its slowest hop; a tree trades
bandwidth for ``log n`` latency. Each collective takes the faster of ring and tree, as NCCL does.

Formulas (S = bytes per rank, B = bandwidth, α = latency):
  all-reduce      ring 2(n−1)/n·S/B + 2(n−1)α      tree 2·S/B + 2·log2(n)·α
  reduce-scatter  (n−1)/n·S/B + (n−1)α            all-gather: same, S = gathered size
  all-to-all      (n−1)/n·S/B_a2a + (n−1)α, B_a2a bounded by the inter-node share when n spans nodes
  broadcast       S/B + log2(n)·α                  point-to-point: S/B + α
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from planner.cluster import ClusterSpec
from planner.cost.constants import CostConstants


@dataclass(frozen=True)
class Group:
    size: int
    nodes: int
    per_node: int
    intra_bw: float
    intra_latency_s: float
    nic_bw: float  # one rank's share of its node's network bandwidth
    inter_latency_s: float

    @property
    def bus_bw(self) -> float:
        """Bandwidth of the slowest hop of a ring over this group."""
        if self.size <= 1:
            return math.inf
        if self.nodes <= 1:
            return self.intra_bw
        return min(self.intra_bw, self.per_node * self.nic_bw)

    @property
    def latency_s(self) -> float:
        return self.inter_latency_s if self.nodes > 1 else self.intra_latency_s


def strided_group(cluster: ClusterSpec, size: int, stride: int) -> Group:
    """The group ``{r0 + i·stride}`` of ``size`` ranks (tp: stride 1; dp: stride tp; pp: stride dp·tp).

    Mixed clusters are summarised by their slowest group (the inter-op solver treats them exactly).
    """
    dpn = cluster.devices_per_node if cluster.is_homogeneous else min(g.devices_per_node for g in cluster.groups)
    per_node = max(1, min(size, dpn // stride)) if stride < dpn else 1
    nodes = max(1, math.ceil(size / per_node))
    intra = cluster.intra_node
    nic = min(g.inter_node.bandwidth_bytes_per_s / g.devices_per_node for g in cluster.groups)
    return Group(size=size, nodes=nodes, per_node=per_node, intra_bw=intra.bandwidth_bytes_per_s,
                 intra_latency_s=intra.latency_s, nic_bw=nic, inter_latency_s=cluster.inter_node.latency_s)


def all_reduce_s(nbytes: float, g: Group, c: CostConstants) -> float:
    n = g.size
    if n <= 1 or nbytes <= 0:
        return 0.0
    bw = g.bus_bw * c.link_efficiency
    ring = 2 * (n - 1) / n * nbytes / bw + 2 * (n - 1) * g.latency_s
    tree = 2 * nbytes / bw + 2 * math.log2(n) * g.latency_s
    return min(ring, tree)


def reduce_scatter_s(nbytes: float, g: Group, c: CostConstants) -> float:
    """``nbytes`` is the full (unscattered) buffer size per rank."""
    n = g.size
    if n <= 1 or nbytes <= 0:
        return 0.0
    return (n - 1) / n * nbytes / (g.bus_bw * c.link_efficiency) + (n - 1) * g.latency_s


def all_gather_s(nbytes: float, g: Group, c: CostConstants) -> float:
    """``nbytes`` is the gathered (full) buffer size per rank."""
    return reduce_scatter_s(nbytes, g, c)


def all_to_all_s(nbytes: float, g: Group, c: CostConstants) -> float:
    n = g.size
    if n <= 1 or nbytes <= 0:
        return 0.0
    bw = g.intra_bw if g.nodes <= 1 else min(g.intra_bw, g.nic_bw * g.per_node)
    return (n - 1) / n * nbytes / (bw * c.link_efficiency) + (n - 1) * g.latency_s


def broadcast_s(nbytes: float, g: Group, c: CostConstants) -> float:
    if g.size <= 1 or nbytes <= 0:
        return 0.0
    return nbytes / (g.bus_bw * c.link_efficiency) + math.log2(g.size) * g.latency_s


def p2p_s(nbytes: float, *, same_node: bool, cluster: ClusterSpec, c: CostConstants) -> float:
    """One rank sends ``nbytes`` to one rank; every rank of a stage does so at once, on its own NIC."""
    if nbytes <= 0:
        return 0.0
    if same_node:
        link = cluster.intra_node
        return nbytes / (link.bandwidth_bytes_per_s * c.link_efficiency) + link.latency_s
    nic = min(g.inter_node.bandwidth_bytes_per_s / g.devices_per_node for g in cluster.groups)
    return nbytes / (nic * c.link_efficiency) + cluster.inter_node.latency_s
