"""Collective and point-to-point communication times on a hierarchical topology (alpha-beta).

A process group is summarised by its size ``n``, how many nodes it spans and how many of its
ranks share a node (``k``). Inside a node ranks talk over NVLink/NVSwitch (or PCIe) at
``intra_bw``; between nodes every rank has its own share of the node's network injection
bandwidth (``nic_bw = node_bw / devices_per_node``: one NIC per GPU on DGX machines). A ring
over the group crosses the network once per node, and NCCL runs one ring per NIC, so a group
with ``k`` ranks per node drives ``k`` NICs at once. The ring is bounded by its slowest hop::

    B_ring = min(intra_bw · e_intra,  k · nic_bw · e_net)        (one node: intra_bw · e_intra)

A tree (NCCL's double binary tree) moves the same bytes per rank at about the same bus bandwidth
but needs only ``log2 n`` latency steps; each collective takes the faster of ring and tree, as
NCCL's tuner does. ``e_intra``/``e_net`` are ``link_efficiency``/``network_efficiency``.

Formulas (S = bytes per rank, B = bus bandwidth above, α = latency of the slowest hop):
  all-reduce      ring 2(n−1)/n·S/B + 2(n−1)α      tree 2·S/B + 2·log2(n)·α
  reduce-scatter  (n−1)/n·S/B + (n−1)α            (S = the full, unscattered buffer)
  all-gather      (n−1)/n·S/B + (n−1)α            (S = the gathered buffer)
  all-to-all      max((k−1)/n·S/(intra_bw·e_intra), (n−k)/n·S/(nic_bw·e_net)) + (n−1)α
                  (every rank's off-node share crosses its own NIC: no k-fold aggregation)
  broadcast       S/B + log2(n)·α  (pipelined ring/tree)
  point-to-point  S/b + α, b = the NVLink or the one NIC between the two ranks
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from planner.cluster import ClusterSpec
from planner.cost.constants import CostConstants


@dataclass(frozen=True)
class Group:
    """A communicating set of ranks, as the alpha-beta formulas see it.

    ``intra_bw`` and ``nic_bw`` are raw link bandwidths (bytes/s, unidirectional); the achievable
    fractions come from :class:`CostConstants`.
    """

    size: int
    nodes: int
    per_node: int
    intra_bw: float
    intra_latency_s: float
    nic_bw: float  # one rank's share of its node's network bandwidth
    inter_latency_s: float

    @property
    def bus_bw(self) -> float:
        """Raw bandwidth of the slowest hop of a ring over this group (no efficiency applied)."""
        if self.size <= 1:
            return math.inf
        if self.nodes <= 1:
            return self.intra_bw
        return min(self.intra_bw, self.per_node * self.nic_bw)

    def ring_bw(self, c: CostConstants) -> float:
        """Achievable ring bandwidth: the slower of the NVLink hop and the node's k NICs."""
        if self.size <= 1:
            return math.inf
        intra = self.intra_bw * c.link_efficiency
        if self.nodes <= 1:
            return intra
        return min(intra, self.per_node * self.nic_bw * c.network_efficiency)

    @property
    def latency_s(self) -> float:
        return self.inter_latency_s if self.nodes > 1 else self.intra_latency_s


def _nic_bw(cluster: ClusterSpec) -> float:
    return min(g.inter_node.bandwidth_bytes_per_s / g.devices_per_node for g in cluster.groups)


def strided_group(cluster: ClusterSpec, size: int, stride: int) -> Group:
    """The group ``{r0 + i·stride}`` of ``size`` ranks (tp: stride 1; dp: stride tp; pp: stride dp·tp).

    Ranks are laid out node by node, so ``devices_per_node // stride`` members share a node.
    Mixed clusters are summarised by their slowest links (the inter-op solver treats them exactly).
    """
    dpn = cluster.devices_per_node if cluster.is_homogeneous else min(g.devices_per_node for g in cluster.groups)
    per_node = max(1, min(size, dpn // stride)) if stride < dpn else 1
    nodes = max(1, math.ceil(size / per_node))
    intra = cluster.intra_node
    return Group(size=size, nodes=nodes, per_node=per_node, intra_bw=intra.bandwidth_bytes_per_s,
                 intra_latency_s=intra.latency_s, nic_bw=_nic_bw(cluster), inter_latency_s=cluster.inter_node.latency_s)


def group_of_ranks(cluster: ClusterSpec, ranks: Sequence[int]) -> Group:
    """The :class:`Group` of an explicit rank list: its nodes, its largest per-node count, and the
    slowest NVLink and NIC among the node groups it touches (the slowest link bounds a ring)."""
    if not ranks:
        raise ValueError("ranks: got an empty list; a group needs at least one rank")
    per_node: dict[int, int] = {}
    groups = []
    for r in ranks:
        if not 0 <= r < cluster.num_devices:
            raise ValueError(f"ranks: rank {r} is outside the cluster's {cluster.num_devices} devices")
        node = cluster.node_of_rank(r)
        per_node[node] = per_node.get(node, 0) + 1
        g = cluster.group_of_rank(r)
        if g not in groups:
            groups.append(g)
    intra = min(groups, key=lambda g: g.intra_node.bandwidth_bytes_per_s).intra_node
    nic = min(g.inter_node.bandwidth_bytes_per_s / g.devices_per_node for g in groups)
    inter_lat = max(g.inter_node.latency_s for g in groups)
    return Group(size=len(ranks), nodes=len(per_node), per_node=min(per_node.values()),
                 intra_bw=intra.bandwidth_bytes_per_s, intra_latency_s=intra.latency_s, nic_bw=nic,
                 inter_latency_s=inter_lat)


def ring_all_reduce_s(nbytes: float, g: Group, c: CostConstants) -> float:
    n = g.size
    return 2 * (n - 1) / n * nbytes / g.ring_bw(c) + 2 * (n - 1) * g.latency_s


def tree_all_reduce_s(nbytes: float, g: Group, c: CostConstants) -> float:
    return 2 * nbytes / g.ring_bw(c) + 2 * math.log2(g.size) * g.latency_s


def all_reduce_s(nbytes: float, g: Group, c: CostConstants) -> float:
    """All-reduce of ``nbytes`` per rank: the faster of ring and tree."""
    if g.size <= 1 or nbytes <= 0:
        return 0.0
    return min(ring_all_reduce_s(nbytes, g, c), tree_all_reduce_s(nbytes, g, c))


def reduce_scatter_s(nbytes: float, g: Group, c: CostConstants) -> float:
    """``nbytes`` is the full (unscattered) buffer size per rank."""
    n = g.size
    if n <= 1 or nbytes <= 0:
        return 0.0
    return (n - 1) / n * nbytes / g.ring_bw(c) + (n - 1) * g.latency_s


def all_gather_s(nbytes: float, g: Group, c: CostConstants) -> float:
    """``nbytes`` is the gathered (full) buffer size per rank."""
    return reduce_scatter_s(nbytes, g, c)


def all_to_all_s(nbytes: float, g: Group, c: CostConstants) -> float:
    """Each rank sends ``nbytes/n`` to every other rank (``nbytes`` is its whole buffer).

    The off-node share of every rank crosses that rank's own NIC, so unlike a ring there is no
    aggregation over the node's NICs; the on-node share moves over NVLink at the same time.
    """
    n = g.size
    if n <= 1 or nbytes <= 0:
        return 0.0
    k = g.per_node if g.nodes > 1 else n
    intra = (k - 1) / n * nbytes / (g.intra_bw * c.link_efficiency)
    inter = (n - k) / n * nbytes / (g.nic_bw * c.network_efficiency) if g.nodes > 1 else 0.0
    return max(intra, inter) + (n - 1) * g.latency_s


def broadcast_s(nbytes: float, g: Group, c: CostConstants) -> float:
    if g.size <= 1 or nbytes <= 0:
        return 0.0
    return nbytes / g.ring_bw(c) + math.log2(g.size) * g.latency_s


def p2p_s(nbytes: float, *, same_node: bool, cluster: ClusterSpec, c: CostConstants) -> float:
    """One rank sends ``nbytes`` to one rank; every rank of a stage does so at once, on its own NIC."""
    if nbytes <= 0:
        return 0.0
    if same_node:
        link = cluster.intra_node
        return nbytes / (link.bandwidth_bytes_per_s * c.link_efficiency) + link.latency_s
    return nbytes / (_nic_bw(cluster) * c.network_efficiency) + cluster.inter_node.latency_s
