"""Where each pipeline position runs, and which chunks each pipeline device holds.

A pipeline *position* (device) ``k`` holds ranks ``[k·dp·cp·tp, (k+1)·dp·cp·tp)``. On a mixed cluster
those ranks may belong to several node groups; :func:`positions` says which device type prices
the position (its slowest member's) and which memory limit holds it (its smallest member's).
:func:`chunks_of_device` reads the schedule's chunk -> device placement. Both are shared by
:func:`planner.cost.model.evaluate` and :class:`planner.pricing.Pricer`, so the search and the
prediction agree on what runs where.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from planner.cluster import ClusterSpec
from planner.cost.constants import CostConstants
from planner.cost.layer_table import LayerTable
from planner.cost.memory import usable_memory_bytes
from planner.plan import ParallelConfig

__all__ = ["Position", "chunk_indices", "chunks_of_device", "positions"]


def chunks_of_device(boundaries: list[tuple[int, int]], devices: tuple[int, ...],
                     device: int) -> list[tuple[int, int]]:
    """The chunks ``device`` runs, by the schedule's placement (V-shapes fold back; never j % pp)."""
    return [boundaries[j] for j in range(len(boundaries)) if devices[j] == device]


def chunk_indices(devices: tuple[int, ...], p: int) -> list[list[int]]:
    """For each of the ``p`` devices, the indices of the chunks it runs, in model order (one pass:
    :func:`chunks_of_device` for every device at once)."""
    out: list[list[int]] = [[] for _ in range(p)]
    for j, d in enumerate(devices):
        out[d].append(j)
    return out


@dataclass(frozen=True)
class Position:
    """What one pipeline position runs on: its layer table, its device type's cluster view, its
    usable memory per device and the device's name."""

    table: LayerTable
    cluster: ClusterSpec
    limit: float
    device_name: str


def positions(cluster: ClusterSpec, cfg: ParallelConfig, c: CostConstants,
              group_tables: Sequence[LayerTable]) -> list[Position]:
    """Each pipeline position with its own device type (``group_tables``: one layer table per node group).

    Position ``k`` holds ranks ``[k·dp·cp·tp, (k+1)·dp·cp·tp)`` (:meth:`planner.layout.RankLayout.position_ranks`). One whose ranks straddle node groups runs
    in lock step (tp all-reduces every layer, dp all-reduces every step), so it is priced at its
    slowest member's speed and held to its smallest member's memory (docs/inter-op.md).
    """
    if len(cluster.groups) == 1:  # every span is (0,): the loop below, without a cluster view per position
        return [Position(group_tables[0], cluster, usable_memory_bytes(cluster, c), cluster.device.name)] * cfg.pp
    out = []
    for span in cluster.position_groups(cfg.pp, cfg.dp * cfg.cp * cfg.tp):
        slow = cluster.slowest_group(span)
        limit = min(usable_memory_bytes(cluster.group_view(g), c) for g in span)
        name = "+".join(cluster.groups[g].device.name for g in span)
        out.append(Position(group_tables[slow], cluster.group_view(slow), limit, name))
    return out
