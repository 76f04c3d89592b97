"""What crosses the pipeline's cuts and joins its devices: activations at each cut, tied parameters.

:func:`pipeline_p2p_s` prices handing one micro-batch's activation (or its gradient) across the
slowest pipeline cut on the link it crosses; :func:`tied_sync_s` the all-reduce of tied parameters'
gradients (a shared word embedding) between the pipeline devices that hold them. Both are read by
:func:`planner.cost.model.evaluate`.
"""

from __future__ import annotations

import bisect

from planner.cluster import ClusterSpec
from planner.cost.comm import all_gather_s, all_reduce_s, cut_link, group_of_ranks, p2p_s, strided_group
from planner.cost.constants import CostConstants
from planner.cost.layer_table import LayerTable
from planner.plan import ParallelConfig
from planner.schedules import chunk_devices


def pipeline_p2p_s(table: LayerTable, boundaries: list[tuple[int, int]], devices: tuple[int, ...],
                    cfg: ParallelConfig, cluster: ClusterSpec, c: CostConstants) -> float:
    """Seconds to hand one micro-batch's activation (or its gradient) across the slowest pipeline cut.

    Every cut is priced on the link it crosses. Rank ``((k·dp + d)·cp + c)·tp + t`` of position ``k`` sends
    to the same ``(d, c, t)`` of the next chunk's position (its 1/cp of the tokens: the table's output bytes): the node's link (NVLink) when every such pair
    shares a node, else the network: the node group's when both ends are in one group, else the
    slower of the two groups' (``p2p_s`` on the whole cluster). So a node holding several stages
    sends over NVLink inside and over its NICs at the cuts between nodes, wherever they fall.
    With Megatron's scatter/gather each tp rank sends ``1/tp`` on its own link and the receiver
    all-gathers over its own group; sequence-parallel outputs are already split. Consecutive chunks
    on one device (the fold of a V-shape) hand over in memory.

    Which link a cut crosses: :func:`planner.cost.comm.cut_link`.
    """
    if len(boundaries) <= 1:
        return 0.0
    per = cfg.dp * cfg.cp * cfg.tp  # ranks per position (planner.layout.RankLayout.position_ranks)
    scatter = cfg.tp > 1 and not cfg.sequence_parallel and c.pp_scatter_gather
    links: dict[tuple[int, int], tuple[ClusterSpec, bool]] = {}  # a V or interleaved pipeline repeats its cuts
    priced: dict[tuple, float] = {}  # and most cuts hand over the same bytes on the same link
    worst = 0.0
    for j, (_, b) in enumerate(boundaries[:-1]):
        src, dst = devices[j], devices[j + 1]
        if src == dst:
            continue
        pair = (min(src, dst), max(src, dst))
        if pair not in links:
            links[pair] = cut_link(cluster, pair[0] * per, (pair[1] + 1) * per - 1)
        net, same_node = links[pair]
        nbytes = float(table.output_bytes[b - 1])
        key = (id(net), same_node, nbytes, dst if scatter else -1)
        t = priced.get(key)
        if t is None:
            if scatter:
                receiver = strided_group(cluster, cfg.tp, 1, first=dst * per)  # the receiving position's tp group
                t = p2p_s(nbytes / cfg.tp, same_node=same_node, cluster=net, c=c) + all_gather_s(nbytes, receiver, c)
            else:
                t = p2p_s(nbytes, same_node=same_node, cluster=net, c=c)
            priced[key] = t
        worst = max(worst, t)
    return worst



def tied_holder_devices(table: LayerTable, boundaries: list[tuple[int, int]],
                         cfg: ParallelConfig) -> list[tuple[int, set[int]]]:
    """``(numel, pipeline devices holding it)`` per tied parameter, in first-use order.

    A device holds a tied parameter when one of its chunks owns or uses it. Computed once per
    :func:`evaluate` call (it does not depend on the device asked about), not once per device.
    """
    holders: dict[str, tuple[int, set[int]]] = {}
    for i, entries in enumerate(table.tied):
        for name, numel, owner in entries:
            holders.setdefault(name, (numel, set()))[1].update((owner, i))
    if not holders:
        return []
    chunk_device = chunk_devices(cfg.schedule, cfg.pp, cfg.virtual_stages)
    starts = [a for a, _ in boundaries]  # contiguous chunks in model order: layer i is in the last start <= i
    return [(numel, {chunk_device[bisect.bisect_right(starts, i) - 1] for i in layers})
            for numel, layers in holders.values()]


def tied_sync_s(table: LayerTable, boundaries: list[tuple[int, int]], device: int, cfg: ParallelConfig,
                 cluster: ClusterSpec, c: CostConstants, grad_bytes: float,
                 holders: list[tuple[int, set[int]]] | None = None) -> float:
    """All-reduce of tied parameters' gradients between the pipeline devices that hold them
    (Megatron's embedding group: the first and last stage share the word embedding).

    Each ``(d, c, t)`` rank of a holder syncs with the same ``(d, c, t)`` of the others, all such groups at
    once; the holders' first ranks stand for them (:func:`group_of_ranks` on real ranks): the group
    shares a node exactly when they do, and gets the links (and measured curves, where shared) of the
    node groups they sit in.

    ``holders`` is :func:`tied_holder_devices` of the same arguments, when the caller has it.
    """
    if cfg.pp <= 1:
        return 0.0
    if holders is None:
        holders = tied_holder_devices(table, boundaries, cfg)
    per = cfg.dp * cfg.cp * cfg.tp  # ranks per position (planner.layout.RankLayout.position_ranks)
    total = 0.0
    for numel, holders_dev in holders:
        if device not in holders_dev or len(holders_dev) < 2 or not numel:  # numel 0: frozen, nothing to sync
            continue
        group = group_of_ranks(cluster, [k * per for k in sorted(holders_dev)])
        total += all_reduce_s(grad_bytes * numel / cfg.tp, group, c)
    return total
