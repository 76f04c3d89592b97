"""Where each rank sits: the one rank layout shared by the planner, the cost model and the runtime.

A plan splits ``world = pp x dp x cp x tp`` ranks Megatron-style: tensor-parallel ranks are adjacent
(inside a node, where the links are fastest), then context-parallel (the ranks that split one
sequence), then data-parallel, then pipeline (torchtitan's order)::

    rank = ((pp_index * dp + dp_index) * cp + cp_index) * tp + tp_index

which is a row-major ``DeviceMesh`` of shape ``(pp, dp, cp, tp)`` with axis names
``("pp", "dp", "cp", "tp")``; with ``cp = 1`` it is the ``(pp, dp, tp)`` formula of schema 2.0.
Expert parallelism and HSDP do not add ranks: they group the data-parallel ranks (``ep`` and
``dp_shard`` consecutive dp indices, :meth:`RankLayout.sub_group`).
:class:`RankLayout` is that formula and its inverse, and nothing else re-derives it: the planner
lists a stage's ranks with :meth:`RankLayout.position_ranks`, the cost model prices a position's groups
from its first rank (:meth:`RankLayout.rank_of`) at this formula's axis strides (tp 1, cp tp, dp cp·tp:
:func:`planner.cost.comm.strided_group`), and the runtime maps its rank to mesh coordinates with
:meth:`RankLayout.coords` (``runtime.rank_layout`` re-exports it). Pure: no processes, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from planner.errors import PlanMismatchError, SpecError

Axis = Literal["pp", "dp", "cp", "tp"]
MESH_AXES: tuple[Axis, ...] = ("pp", "dp", "cp", "tp")


@dataclass(frozen=True)
class RankCoords:
    """Where one rank sits on the ``(pp, dp, cp, tp)`` mesh: its pipeline position, replica, sequence
    shard and tp index."""

    pp: int
    dp: int
    tp: int
    cp: int = 0


@dataclass(frozen=True, kw_only=True)
class RankLayout:
    """The ``(pp, dp, cp, tp)`` degrees of a plan and the rank formula: tp ranks adjacent, then cp, dp, pp."""

    pp: int
    dp: int
    tp: int
    cp: int = 1

    def __post_init__(self) -> None:
        for axis in MESH_AXES:
            value = getattr(self, axis)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpecError(f"parallel.{axis}", value, "expected an integer >= 1")

    @classmethod
    def of(cls, parallel: object) -> RankLayout:
        """The layout of anything with ``pp``, ``dp``, ``tp`` and (optionally) ``cp`` (a ``ParallelConfig``)."""
        return cls(pp=parallel.pp, dp=parallel.dp, tp=parallel.tp,  # type: ignore[attr-defined]
                   cp=getattr(parallel, "cp", 1))

    @classmethod
    def from_plan(cls, plan: object) -> RankLayout:
        """The layout of a :class:`planner.plan.Plan` (its ``parallel`` degrees)."""
        return cls.of(plan.parallel)  # type: ignore[attr-defined]

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.cp * self.tp

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The mesh shape, in :data:`MESH_AXES` order ``(pp, dp, cp, tp)``."""
        return (self.pp, self.dp, self.cp, self.tp)

    def coords(self, rank: int) -> RankCoords:
        if not 0 <= rank < self.world_size:
            raise SpecError("rank", rank, f"the plan has ranks 0..{self.world_size - 1}")
        return RankCoords(pp=rank // (self.dp * self.cp * self.tp), dp=(rank // (self.cp * self.tp)) % self.dp,
                          tp=rank % self.tp, cp=(rank // self.tp) % self.cp)

    def rank_of(self, pp: int, dp: int, tp: int, cp: int = 0) -> int:
        """The rank at mesh coordinates ``(pp, dp, cp, tp)``: the formula of the module docstring."""
        return ((pp * self.dp + dp) * self.cp + cp) * self.tp + tp

    def sub_group(self, rank: int, size: int) -> tuple[int, ...]:
        """The ``size`` ranks of ``rank``'s dp group that share its block of ``size`` consecutive dp indices:
        an expert-parallel group (``size = ep``) or an HSDP shard group (``size = dp_shard``)."""
        if size < 1 or self.dp % size:
            raise SpecError("group size", size, f"must divide dp = {self.dp}")
        c = self.coords(rank)
        first = c.dp - c.dp % size
        return tuple(self.rank_of(c.pp, first + i, c.tp, c.cp) for i in range(size))

    def group(self, rank: int, axis: Axis) -> tuple[int, ...]:
        """The ranks that share every coordinate of ``rank`` but ``axis`` (its ``axis`` group), in axis order."""
        c = self.coords(rank)
        size = getattr(self, axis)
        return tuple(self.rank_of(**{**c.__dict__, axis: i}) for i in range(size))

    def position_ranks(self, pp: int) -> tuple[int, ...]:
        """All ``dp x cp x tp`` ranks of pipeline position ``pp``: the ranks a plan's stage lists."""
        return tuple(self.rank_of(pp, d, t, k) for d in range(self.dp) for k in range(self.cp) for t in range(self.tp))

    def position_of(self, ranks: tuple[int, ...]) -> int:
        """The pipeline position whose ranks are exactly ``ranks`` (a plan stage's), or a clear error."""
        positions = {self.coords(r).pp for r in ranks}
        if len(positions) != 1 or tuple(sorted(ranks)) != self.position_ranks(next(iter(positions))):
            raise PlanMismatchError(
                f"stages: ranks {list(ranks)} are not the dp x cp x tp = {self.dp * self.cp * self.tp} ranks of one "
                "pipeline position (rank = ((pp_index * dp + dp_index) * cp + cp_index) * tp + tp_index); "
                "re-create the plan")
        return positions.pop()
