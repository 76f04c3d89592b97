"""Alpha-beta costs of collectives on one mesh axis, and of changing a tensor's layout.

Ring algorithms on ``n`` ranks, link bandwidth ``bw`` (bytes/s one device sends) and per-step
latency ``alpha``; ``nbytes`` is the size of the *whole* buffer the collective works on:

    all-reduce      2(n-1)/n · nbytes/bw + 2(n-1)·alpha
    reduce-scatter   (n-1)/n · nbytes/bw +  (n-1)·alpha     (nbytes: the full input)
    all-gather       (n-1)/n · nbytes/bw +  (n-1)·alpha     (nbytes: the full output)
    all-to-all       (n-1)/n · nbytes/bw +  (n-1)·alpha     (nbytes: one rank's local tensor)

These are deliberately small and local to the intra-op solver; they should be unified with
``planner/cost`` (being written at the same time) once that settles.

:func:`redistribute` prices a layout change the way DTensor performs it, one mesh axis at a
time: Shard→Replicate all-gathers, Partial→Replicate all-reduces, Partial→Shard
reduce-scatters, Shard(i)→Shard(j) is an all-to-all, and Replicate→anything is a local slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from planner.cluster import LinkSpec
from planner.intra_op.placement import Layout, Partial, Replicate, Shard

COLLECTIVE_KINDS = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all")


def all_reduce_s(nbytes: float, n: int, link: LinkSpec) -> float:
    if n <= 1 or nbytes <= 0:
        return 0.0
    return 2 * (n - 1) / n * nbytes / link.bandwidth_bytes_per_s + 2 * (n - 1) * link.latency_s


def reduce_scatter_s(nbytes: float, n: int, link: LinkSpec) -> float:
    if n <= 1 or nbytes <= 0:
        return 0.0
    return (n - 1) / n * nbytes / link.bandwidth_bytes_per_s + (n - 1) * link.latency_s


def all_gather_s(nbytes: float, n: int, link: LinkSpec) -> float:
    if n <= 1 or nbytes <= 0:
        return 0.0
    return (n - 1) / n * nbytes / link.bandwidth_bytes_per_s + (n - 1) * link.latency_s


def all_to_all_s(nbytes: float, n: int, link: LinkSpec) -> float:
    if n <= 1 or nbytes <= 0:
        return 0.0
    return (n - 1) / n * nbytes / link.bandwidth_bytes_per_s + (n - 1) * link.latency_s


_COST = {"all_reduce": all_reduce_s, "reduce_scatter": reduce_scatter_s, "all_gather": all_gather_s,
         "all_to_all": all_to_all_s}


def collective_s(kind: str, nbytes: float, n: int, link: LinkSpec) -> float:
    return _COST[kind](nbytes, n, link)


@dataclass(frozen=True, kw_only=True)
class Collective:
    """One collective the chosen sharding runs: where, on which axis, how many bytes, how long.

    ``phase`` is ``fwd``, ``bwd`` (activation gradients) or ``grad_sync`` (weight gradients,
    once per step). ``at`` names the op, or the edge ``producer -> consumer``, that needs it.
    """

    kind: str
    axis: str
    nbytes: float
    phase: str
    at: str
    time_s: float

    def to_dict(self) -> dict:
        return {"kind": self.kind, "axis": self.axis, "bytes": self.nbytes, "phase": self.phase, "at": self.at,
                "time_s": self.time_s}


def _transition(src, dst) -> str | None:
    """The collective that turns placement ``src`` into ``dst`` on one axis (None: local)."""
    if src == dst or isinstance(src, Replicate):
        return None
    if isinstance(src, Shard):
        if isinstance(dst, Replicate):
            return "all_gather"
        if isinstance(dst, Shard):
            return "all_to_all"
        return None  # Shard → Partial: place the shard in a zero tensor, no traffic
    assert isinstance(src, Partial)
    return "all_reduce" if isinstance(dst, Replicate) else "reduce_scatter"


def redistribute_plan(nbytes: float, src: Layout, dst: Layout,
                      mesh_shape: Sequence[int]) -> list[tuple[int, str, float]]:
    """``(axis index, collective kind, buffer bytes)`` steps that turn layout ``src`` into ``dst``."""
    steps: list[tuple[int, str, float]] = []
    cur = list(src)
    for i in range(len(mesh_shape)):
        kind = _transition(cur[i], dst[i])
        if kind is not None and mesh_shape[i] > 1:
            other = 1
            for j, p in enumerate(cur):
                if j != i and isinstance(p, Shard):
                    other *= mesh_shape[j]
            local = nbytes / other  # the buffer on this axis's ranks, already cut by the other axes
            if kind == "all_to_all":
                local /= mesh_shape[i]
            steps.append((i, kind, local))
        cur[i] = dst[i]
    return steps


def redistribute_s(nbytes: float, src: Layout, dst: Layout, mesh_shape: Sequence[int],
                   links: Sequence[LinkSpec]) -> float:
    return sum(collective_s(kind, b, mesh_shape[i], links[i])
               for i, kind, b in redistribute_plan(nbytes, src, dst, mesh_shape))
