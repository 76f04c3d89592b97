"""Collectives on one mesh axis, priced by :mod:`planner.cost.comm`, and the cost of changing a layout.

The intra-op solver keeps no alpha-beta formulas of its own: a collective of ``kind`` on mesh
axis ``i`` costs what :mod:`planner.cost.comm` says it costs on that axis's
:class:`~planner.cost.comm.Group` (``MeshSpec.group(i)``) under the run's
:class:`~planner.cost.constants.CostConstants`, so the ILP and the inter-op cost model price a
tensor-parallel all-reduce identically (ring or tree, link and network efficiency, the NICs a
group spans). ``nbytes`` means what it means there: the *whole* buffer the collective works on
(all-reduce: per rank; reduce-scatter: the full input; all-gather: the full output; all-to-all:
one rank's local tensor).

:func:`redistribute` prices a layout change the way DTensor performs it, one mesh axis at a
time: Shard→Replicate all-gathers, Partial→Replicate all-reduces, Partial→Shard
reduce-scatters, Shard(i)→Shard(j) is an all-to-all, and Replicate→anything is a local slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from planner.cost import comm
from planner.cost.comm import Group
from planner.cost.constants import CostConstants
from planner.intra_op.placement import Layout, Partial, Replicate, Shard

COLLECTIVE_KINDS = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all")

_COST = {"all_reduce": comm.all_reduce_s, "reduce_scatter": comm.reduce_scatter_s, "all_gather": comm.all_gather_s,
         "all_to_all": comm.all_to_all_s}


def collective_s(kind: str, nbytes: float, group: Group, c: CostConstants) -> float:
    """Seconds of one ``kind`` collective over ``group`` (delegates to :mod:`planner.cost.comm`)."""
    if kind not in _COST:
        raise ValueError(f"collective kind: got {kind!r}; expected one of {list(COLLECTIVE_KINDS)}")
    return _COST[kind](nbytes, group, c)


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


def redistribute_s(nbytes: float, src: Layout, dst: Layout, groups: Sequence[Group], c: CostConstants) -> float:
    """Seconds to turn ``src`` into ``dst``; ``groups[i]`` is mesh axis ``i``'s group."""
    shape = [g.size for g in groups]
    return sum(collective_s(kind, b, groups[i], c) for i, kind, b in redistribute_plan(nbytes, src, dst, shape))
