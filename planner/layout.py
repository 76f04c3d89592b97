"""Where each rank sits: the one rank layout shared by the planner, the cost model and the runtime.

A plan splits ``world = pp x dp x tp`` ranks Megatron-style: tensor-parallel ranks are adjacent
(inside a node, where the links are fastest), then data-parallel, then pipeline::

    rank = (pp_index * dp + dp_index) * tp + tp_index

which is a row-major ``DeviceMesh`` of shape ``(pp, dp, tp)`` with axis names ``("pp", "dp", "tp")``.
:class:`RankLayout` is that formula and its inverse, and nothing else re-derives it: the planner
lists a stage's ranks with :meth:`RankLayout.position_ranks`, the cost model finds a data-parallel
group with :meth:`RankLayout.group`, and the runtime maps its rank to mesh coordinates with
:meth:`RankLayout.coords` (``runtime.rank_layout`` re-exports it). Pure: no processes, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from planner.errors import PlanMismatchError, SpecError

Axis = Literal["pp", "dp", "tp"]
MESH_AXES: tuple[Axis, ...] = ("pp", "dp", "tp")


@dataclass(frozen=True)
class RankCoords:
    """Where one rank sits on the ``(pp, dp, tp)`` mesh: its pipeline position, replica and tp index."""

    pp: int
    dp: int
    tp: int


@dataclass(frozen=True, kw_only=True)
class RankLayout:
    """The ``(pp, dp, tp)`` degrees of a plan and the rank formula: tp ranks adjacent, then dp, then pp."""

    pp: int
    dp: int
    tp: int

    def __post_init__(self) -> None:
        for axis in MESH_AXES:
            value = getattr(self, axis)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpecError(f"parallel.{axis}", value, "expected an integer >= 1")

    @classmethod
    def of(cls, parallel: object) -> RankLayout:
        """The layout of anything with ``pp``, ``dp`` and ``tp`` (a ``ParallelConfig``)."""
        return cls(pp=parallel.pp, dp=parallel.dp, tp=parallel.tp)  # type: ignore[attr-defined]

    @classmethod
    def from_plan(cls, plan: object) -> RankLayout:
        """The layout of a :class:`planner.plan.Plan` (its ``parallel`` degrees)."""
        return cls.of(plan.parallel)  # type: ignore[attr-defined]

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.pp, self.dp, self.tp)

    def coords(self, rank: int) -> RankCoords:
        if not 0 <= rank < self.world_size:
            raise SpecError("rank", rank, f"the plan has ranks 0..{self.world_size - 1}")
        return RankCoords(pp=rank // (self.dp * self.tp), dp=(rank // self.tp) % self.dp, tp=rank % self.tp)

    def rank_of(self, pp: int, dp: int, tp: int) -> int:
        """The rank at mesh coordinates ``(pp, dp, tp)``: the formula of the module docstring."""
        return (pp * self.dp + dp) * self.tp + tp

    def group(self, rank: int, axis: Axis) -> tuple[int, ...]:
        """The ranks that share every coordinate of ``rank`` but ``axis`` (its ``axis`` group), in axis order."""
        c = self.coords(rank)
        size = getattr(self, axis)
        return tuple(self.rank_of(**{**c.__dict__, axis: i}) for i in range(size))

    def position_ranks(self, pp: int) -> tuple[int, ...]:
        """All ``dp x tp`` ranks of pipeline position ``pp``: the ranks a plan's stage lists."""
        return tuple(self.rank_of(pp, d, t) for d in range(self.dp) for t in range(self.tp))

    def position_of(self, ranks: tuple[int, ...]) -> int:
        """The pipeline position whose ranks are exactly ``ranks`` (a plan stage's), or a clear error."""
        positions = {self.coords(r).pp for r in ranks}
        if len(positions) != 1 or tuple(sorted(ranks)) != self.position_ranks(next(iter(positions))):
            raise PlanMismatchError(
                f"stages: ranks {list(ranks)} are not the dp x tp = {self.dp * self.tp} ranks of one pipeline "
                "position (rank = (pp_index * dp + dp_index) * tp + tp_index); re-create the plan")
        return positions.pop()
