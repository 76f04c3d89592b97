"""Collective and point-to-point communication times on a hierarchical topology (alpha-beta).

A process group is summarised by its size ``n``, how many nodes it spans and how many of its
ranks share a node (``k``), all read off its real ranks (:func:`group_of_ranks`; :func:`strided_group`
for the rank layout's ``first + i·stride`` groups) with the links and measured curves of the node
groups they touch: one rule, of which a homogeneous cluster is the one-group case. Inside a node
ranks talk over NVLink/NVSwitch (or PCIe) at ``intra_bw``; between nodes every rank has its own
share of the node's network injection bandwidth (``nic_bw = node_bw / devices_per_node``: one NIC
per GPU on DGX machines). A ring over the group crosses the network once per node, and NCCL runs
one ring per NIC, so a group with ``k`` ranks per node drives ``k`` NICs at once. The ring is
bounded by its slowest hop::

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

**Measured curves.** When the cluster file has ``collectives`` (nccl-tests bus bandwidth of whole
nodes, :mod:`planner.cost.measured`), a collective is priced from them instead
(:func:`measured_time_s`), and by the formulas above only outside the measured range
(:func:`measured_notes` says which). A group of whole nodes reads the curve directly. A group
inside one node reads the one-node curve at its own message size: bus bandwidth is a per-device
link figure, and on a switched node (NVSwitch) a subset of devices gets the same links. A group
spread over ``n`` nodes with ``k`` of a node's ``d`` devices (dp under tp: one per tp rank) drives
``k`` of the node's ``d`` NICs: it gets ``k/d`` of the measured bus bandwidth, read at the
message size that puts the same bytes on each NIC (``S·d/k``) and at the node count whose whole
nodes hold as many ranks (``n·k/d``, at least two): measured bus bandwidth falls with scale at
constant NIC bandwidth (per-hop latency along a longer ring, fabric contention), and that is a
matter of the ring's ranks, not of the nodes it visits. All-to-all and send/recv are
bounded by each rank's own NIC share, so they read the curve unscaled; a send/recv between
nodes reads the smallest measured node count above one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from planner.cluster import ClusterSpec, MeasuredCollectives, shared_collectives
from planner.cost.constants import CostConstants
from planner.cost.measured import CollectiveTable, collective_tables, format_bytes
from planner.plan import ParallelConfig


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
    # The node group's measured bus bandwidth (None: alpha-beta only) and its devices per node.
    measured: MeasuredCollectives | None = None
    devices_per_node: int = 0

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


def _place(cluster: ClusterSpec, rank: int) -> tuple[int, int]:
    """``(node, node group index)`` of ``rank``. A rank past the cluster's devices lies on further nodes
    of its last node group: callers price layouts of a larger cluster of the same kind (a what-if's,
    a mesh's), and on a homogeneous cluster that is ``rank // devices_per_node`` as before."""
    if rank < cluster.num_devices:
        return cluster.node_of_rank(rank), cluster.group_index_of_rank(rank)
    last = len(cluster.groups) - 1
    return cluster.nodes + (rank - cluster.num_devices) // cluster.groups[last].devices_per_node, last


def _ranks_group(cluster: ClusterSpec, ranks: Sequence[int]) -> Group:
    """The one rule behind :func:`group_of_ranks` and :func:`strided_group` (ranks already checked)."""
    per_node: dict[int, int] = {}
    touched: list[int] = []
    for r in ranks:
        node, gi = _place(cluster, r)
        per_node[node] = per_node.get(node, 0) + 1
        if gi not in touched:
            touched.append(gi)
    groups = [cluster.groups[gi] for gi in touched]
    intra = min(groups, key=lambda g: g.intra_node.bandwidth_bytes_per_s).intra_node
    nic = min(g.inter_node.bandwidth_bytes_per_s / g.devices_per_node for g in groups)
    inter_lat = max(g.inter_node.latency_s for g in groups)
    measured = shared_collectives(groups)  # curves describe whole nodes: only where every group has the same
    return Group(size=len(ranks), nodes=len(per_node), per_node=min(per_node.values()),
                 intra_bw=intra.bandwidth_bytes_per_s, intra_latency_s=intra.latency_s, nic_bw=nic,
                 inter_latency_s=inter_lat, measured=measured,
                 devices_per_node=groups[0].devices_per_node if measured is not None else 0)


def group_of_ranks(cluster: ClusterSpec, ranks: Sequence[int]) -> Group:
    """The :class:`Group` of an explicit rank list: its size, its nodes, its *smallest* per-node count,
    the slowest NVLink and NIC and the largest network latency among the node groups it touches, and
    their measured curves where they all share them (:func:`planner.cluster.shared_collectives`).

    A ring is bounded by its slowest hop, so links are the slowest; for the same reason ``per_node`` is
    the smallest count: the node where the group has fewest ranks drives fewest NICs, and every byte of
    the ring crosses it. On the layouts a plan uses (equal counts on every node) smallest and largest
    agree; only uneven groups (tp = 3 on nodes of 8) tell them apart.
    """
    key = (cluster.fingerprint(), tuple(ranks))
    group = _GROUPS.get(key)
    if group is None:
        if not ranks:
            raise ValueError("ranks: got an empty list; a group needs at least one rank")
        for r in ranks:
            if not 0 <= r < cluster.num_devices:
                raise ValueError(f"ranks: rank {r} is outside the cluster's {cluster.num_devices} devices")
        group = _remember(key, _ranks_group(cluster, ranks))
    return group


# Groups priced so far, by cluster contents (ClusterSpec.fingerprint) and ranks: the search asks for the
# same few for every configuration it prices. Cleared when full (a long session over many clusters).
_GROUPS: dict[tuple, Group] = {}
_GROUPS_MAX = 8192


def _remember(key: tuple, group: Group) -> Group:
    if len(_GROUPS) >= _GROUPS_MAX:
        _GROUPS.clear()
    _GROUPS[key] = group
    return group


def strided_group(cluster: ClusterSpec, size: int, stride: int, first: int | None = None) -> Group:
    """The group ``{first + i·stride : i < size}`` (tp: stride 1; dp: stride tp·cp; pp: stride dp·cp·tp),
    priced by :func:`group_of_ranks`' rule on those very ranks: their nodes and per-node counts, and the
    links and measured curves of the node groups they touch.

    ``first`` is the group's first rank: a pipeline position's ``k·dp·cp·tp`` prices that position's own
    group (on a mixed cluster its own device type's links). Without it (a caller pricing the whole
    cluster, not one position), the slowest of the groups that start at each node group's first rank:
    a homogeneous cluster's group at rank 0, a mixed cluster's on its slowest device type, as a ring
    there would run. A homogeneous cluster is the one-group case: ``devices_per_node // stride``
    members share a node when the stride divides the node. Ranks past the cluster's devices continue on
    further nodes of its last node group (:func:`_place`), so callers may price a larger layout of the
    same cluster. Cached (``_GROUPS``), as :func:`group_of_ranks` is.
    """
    if first is None:
        starts = [sum(g.num_devices for g in cluster.groups[:i]) for i in range(len(cluster.groups))]
        return min((strided_group(cluster, size, stride, s) for s in starts),
                   key=lambda g: (g.bus_bw, -g.latency_s))
    if size < 1 or stride < 1 or first < 0:
        raise ValueError(f"strided_group: size {size}, stride {stride}, first {first}; expected size >= 1, "
                         "stride >= 1 and first >= 0")
    key = (cluster.fingerprint(), size, stride, first)
    group = _GROUPS.get(key)
    if group is None:
        group = _remember(key, _ranks_group(cluster, range(first, first + size * stride, stride)))
    return group


def _measured_query(collective: str, nbytes: float, g: Group) -> tuple[float, float, float] | None:
    """``(nodes, message bytes, share)`` to read from the whole-node curves for ``g`` (module docstring)."""
    if g.nodes <= 1:
        return 1, nbytes, 1.0
    if collective == "send_recv":
        table = collective_tables(g.measured)["send_recv"]  # type: ignore[arg-type]
        above_one = [k for k in table.nodes if k >= 2]
        return (above_one[0], nbytes, 1.0) if above_one else None
    if collective == "all_to_all" or g.devices_per_node <= 0:
        return g.nodes, nbytes, 1.0
    share = min(1.0, g.per_node / g.devices_per_node)
    # Its ring has the ranks of nodes·share whole nodes (never fewer than two: every hop but the
    # node's own crosses the network), and the measured drop of bus bandwidth with scale is per ring.
    return min(g.nodes, max(2.0, g.nodes * share)), nbytes / share, share


def _from_curves(collective: str, nbytes: float, g: Group, read: Callable[..., float | None]) -> float | None:
    """Seconds of ``collective`` on ``g`` at the bus bandwidth ``read(table, nodes, bytes)`` gives for the
    query :func:`_measured_query` makes of it, or ``None`` where it gives none.

    nccl-tests conventions: all-reduce ``2(n−1)/n·S/busbw``; all-gather, reduce-scatter and
    all-to-all ``(n−1)/n·S/busbw``; send/recv ``S/busbw`` (``S`` the full buffer).
    """
    if g.measured is None:
        return None
    query = _measured_query(collective, nbytes, g)
    if query is None:
        return None
    nodes, lookup_bytes, share = query
    busbw = read(collective_tables(g.measured)[collective], nodes, lookup_bytes)
    if busbw is None:
        return None
    n = g.size
    factor = 1.0 if collective == "send_recv" else (2 * (n - 1) / n if collective == "all_reduce" else (n - 1) / n)
    return factor * nbytes / (busbw * share)


def measured_time_s(collective: str, nbytes: float, g: Group) -> float | None:
    """Seconds of ``collective`` on ``g`` from the measured bus bandwidth, or ``None`` outside its range."""
    return _from_curves(collective, nbytes, g, CollectiveTable.bus_bandwidth)


def measured_floor_s(collective: str, nbytes: float, g: Group) -> float | None:
    """A lower bound on ``collective`` from the measured curves where the message is smaller than any
    they measured at the group's node count: its time at the smallest measured size's bus bandwidth
    (a ceiling: bus bandwidth only rises with the message size). ``None`` where the curves say nothing."""
    return _from_curves(collective, nbytes, g, CollectiveTable.ceiling_below_range)


def _bounded(collective: str, nbytes: float, g: Group, alpha_beta_s: float) -> float:
    """The alpha-beta time of a collective the curves do not cover, never faster than their bound."""
    floor = measured_floor_s(collective, nbytes, g)
    return alpha_beta_s if floor is None else max(alpha_beta_s, floor)


def measured_notes(priced: Sequence[tuple[str, str, float, Group]]) -> list[str]:
    """Plan notes for collectives on a measured cluster: ``priced`` holds ``(label, collective,
    bytes, group)`` of what a configuration runs; one line per label that fell outside the
    measured curves (priced by the alpha-beta formulas instead, bounded by the curves below their
    smallest message), or one line saying all were measured. Groups without measurements are left out."""
    outside: dict[str, list[tuple[float, Group, str, str]]] = {}
    inside: list[str] = []
    for label, collective, nbytes, g in priced:
        if g.measured is None or g.size <= 1 or nbytes <= 0:
            continue
        if measured_time_s(collective, nbytes, g) is not None:
            if label not in inside:
                inside.append(label)
            continue
        query = _measured_query(collective, nbytes, g)
        table = collective_tables(g.measured)[collective]
        where = (f"{query[0]:g} node(s) at {format_bytes(query[1])}" if query else f"{g.nodes} node(s)")
        outside.setdefault(label, []).append((nbytes, g, f"{where}; measured: {table.describe()}", collective))
    notes = []
    for label, items in outside.items():
        sizes = sorted(x for x, _, _, _ in items)
        span = format_bytes(sizes[0]) if sizes[0] == sizes[-1] else f"{format_bytes(sizes[0])}-{format_bytes(sizes[-1])}"
        bounded = any(measured_floor_s(kind, x, g) is not None for x, g, _, kind in items)
        how = ("priced by the alpha-beta links, never faster than the smallest measured message's bus "
               "bandwidth" if bounded else "priced by the alpha-beta links instead")
        notes.append(f"{label} ({len(items)} message size(s), {span}) is outside the cluster's measured "
                     f"collectives ({items[0][2]}): {how}")
    measured_only = [x for x in inside if x not in outside]
    if measured_only:
        notes.append(f"{', '.join(measured_only)} priced from the cluster's measured bus bandwidth (docs/cluster.md)")
    return notes


def step_collective_notes(cluster: ClusterSpec, cfg: ParallelConfig, c: CostConstants, *, tp_bytes: Sequence[float],
                          dp_bytes: Sequence[float], p2p_bytes: Sequence[float]) -> list[str]:
    """:func:`measured_notes` for one configuration's collectives, as :mod:`planner.cost.model` prices
    them: ``tp_bytes`` each tensor-parallel all-reduce of a micro-batch (a reduce-scatter plus an
    all-gather under sequence parallelism), ``dp_bytes`` each pipeline device's gradients,
    ``p2p_bytes`` each pipeline cut's activation (``1/tp`` of it per rank under Megatron's
    scatter/gather)."""
    priced: list[tuple[str, str, float, Group]] = []
    if cfg.tp > 1:
        tp_group = strided_group(cluster, cfg.tp, 1)
        kinds = ("reduce_scatter", "all_gather") if cfg.sequence_parallel else ("all_reduce",)
        priced += [(f"tp {kind}", kind, x, tp_group) for x in sorted(set(tp_bytes)) for kind in kinds]
    if cfg.dp > 1:
        dp_group = strided_group(cluster, cfg.dp, cfg.tp)
        kinds = ("all_reduce",) if cfg.zero_stage == 0 else ("reduce_scatter", "all_gather")
        priced += [(f"dp {kind}", kind, x, dp_group) for x in sorted(set(dp_bytes)) for kind in kinds]
    if p2p_bytes and cfg.pp > 1:  # the cut between the first two positions, as pipeline_p2p_s prices it
        net, same_node = cut_link(cluster, 0, 2 * cfg.layout.rank_of(1, 0, 0) - 1)
        split = cfg.tp if cfg.tp > 1 and not cfg.sequence_parallel and c.pp_scatter_gather else 1
        priced += [("pp send_recv", "send_recv", x / split, pair_group(net, same_node=same_node))
                   for x in sorted(set(p2p_bytes))]
    return measured_notes(priced)


def cut_link(cluster: ClusterSpec, lo: int, hi: int) -> tuple[ClusterSpec, bool]:
    """What a pipeline send/recv between two positions crosses, given the ranks ``lo..hi`` the two span:
    ``(network, same_node)``. Every rank sends to its counterpart in the other position, so they all
    share a node exactly when the whole span lies in one node (ranks, nodes and node groups are
    contiguous ranges). The network is the node group's own when the span lies in one group, else the
    whole cluster's (the slower group's links bound it)."""
    group = cluster.group_index_of_rank(lo)
    if group != cluster.group_index_of_rank(hi):
        return cluster, False
    net = cluster if len(cluster.groups) == 1 else cluster.group_view(group)
    return net, cluster.node_of_rank(lo) == cluster.node_of_rank(hi)


def pair_group(cluster: ClusterSpec, *, same_node: bool) -> Group:
    """Two ranks that exchange a pipeline send/recv, on one node or on two (what :func:`p2p_s` prices):
    the cluster's slowest links, and the measured curves its node groups share (a homogeneous cluster's
    own; see :func:`cut_link` for the network a cut crosses)."""
    intra = cluster.intra_node
    measured = cluster.shared_collectives
    return Group(size=2, nodes=1 if same_node else 2, per_node=1, intra_bw=intra.bandwidth_bytes_per_s,
                 intra_latency_s=intra.latency_s, nic_bw=_nic_bw(cluster), inter_latency_s=cluster.inter_node.latency_s,
                 measured=measured, devices_per_node=cluster.min_devices_per_node if measured else 0)


def ring_all_reduce_s(nbytes: float, g: Group, c: CostConstants) -> float:
    n = g.size
    return 2 * (n - 1) / n * nbytes / g.ring_bw(c) + 2 * (n - 1) * g.latency_s


def tree_all_reduce_s(nbytes: float, g: Group, c: CostConstants) -> float:
    return 2 * nbytes / g.ring_bw(c) + 2 * math.log2(g.size) * g.latency_s


def all_reduce_s(nbytes: float, g: Group, c: CostConstants) -> float:
    """All-reduce of ``nbytes`` per rank: the faster of ring and tree."""
    if g.size <= 1 or nbytes <= 0:
        return 0.0
    if g.measured is not None and (t := measured_time_s("all_reduce", nbytes, g)) is not None:
        return t
    return _bounded("all_reduce", nbytes, g, min(ring_all_reduce_s(nbytes, g, c), tree_all_reduce_s(nbytes, g, c)))


def reduce_scatter_s(nbytes: float, g: Group, c: CostConstants) -> float:
    """``nbytes`` is the full (unscattered) buffer size per rank."""
    n = g.size
    if n <= 1 or nbytes <= 0:
        return 0.0
    if g.measured is not None and (t := measured_time_s("reduce_scatter", nbytes, g)) is not None:
        return t
    return _bounded("reduce_scatter", nbytes, g, (n - 1) / n * nbytes / g.ring_bw(c) + (n - 1) * g.latency_s)


def all_gather_s(nbytes: float, g: Group, c: CostConstants) -> float:
    """``nbytes`` is the gathered (full) buffer size per rank."""
    if g.measured is not None and g.size > 1 and nbytes > 0 and \
            (t := measured_time_s("all_gather", nbytes, g)) is not None:
        return t
    return _bounded("all_gather", nbytes, g,
                    reduce_scatter_s(nbytes, replace(g, measured=None) if g.measured is not None else g, c))


def all_to_all_s(nbytes: float, g: Group, c: CostConstants) -> float:
    """Each rank sends ``nbytes/n`` to every other rank (``nbytes`` is its whole buffer).

    The off-node share of every rank crosses that rank's own NIC, so unlike a ring there is no
    aggregation over the node's NICs; the on-node share moves over NVLink at the same time.
    """
    n = g.size
    if n <= 1 or nbytes <= 0:
        return 0.0
    if g.measured is not None and g.measured.all_to_all and (t := measured_time_s("all_to_all", nbytes, g)) is not None:
        return t
    k = g.per_node if g.nodes > 1 else n
    intra = (k - 1) / n * nbytes / (g.intra_bw * c.link_efficiency)
    inter = (n - k) / n * nbytes / (g.nic_bw * c.network_efficiency) if g.nodes > 1 else 0.0
    t = max(intra, inter) + (n - 1) * g.latency_s
    return _bounded("all_to_all", nbytes, g, t) if g.measured is not None and g.measured.all_to_all else t


def broadcast_s(nbytes: float, g: Group, c: CostConstants) -> float:
    if g.size <= 1 or nbytes <= 0:
        return 0.0
    return nbytes / g.ring_bw(c) + math.log2(g.size) * g.latency_s


def p2p_s(nbytes: float, *, same_node: bool, cluster: ClusterSpec, c: CostConstants) -> float:
    """One rank sends ``nbytes`` to one rank; every rank of a stage does so at once, on its own NIC."""
    if nbytes <= 0:
        return 0.0
    pair = None
    if (m := cluster.shared_collectives) is not None and m.send_recv:
        pair = pair_group(cluster, same_node=same_node)
        if (t := measured_time_s("send_recv", nbytes, pair)) is not None:
            return t
    if same_node:
        link = cluster.intra_node
        t = nbytes / (link.bandwidth_bytes_per_s * c.link_efficiency) + link.latency_s
    else:
        t = nbytes / (_nic_bw(cluster) * c.network_efficiency) + cluster.inter_node.latency_s
    return t if pair is None else _bounded("send_recv", nbytes, pair, t)


def overlapped_comm_s(comm_s: float, compute_s: float, c: CostConstants) -> float:
    """What ``comm_s`` of background communication adds to a step when it runs beside ``compute_s``
    of compute: the part the compute does not cover, plus the compute's own slowdown while the two
    share the device (``overlap_compute_slowdown`` of the hidden time)."""
    hidden = min(comm_s, c.comm_compute_overlap * compute_s)
    return with_overlap_slowdown(comm_s - hidden, hidden, c)


def with_overlap_slowdown(exposed_s: float, hidden_s: float, c: CostConstants) -> float:
    """What background communication adds to a step: its ``exposed_s``, plus the slowdown its
    ``hidden_s`` causes the compute it hides behind (``overlap_compute_slowdown`` of it)."""
    return exposed_s + c.overlap_compute_slowdown * hidden_s
