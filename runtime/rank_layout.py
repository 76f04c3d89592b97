"""The typed boundary the runtime reads from a plan: where each rank sits, and how tensors are split.

Two small dataclasses replace formulas and dict lookups that used to be repeated wherever the runtime
read a plan:

* :class:`RankLayout`: the ``(pp, dp, tp)`` degrees and the one rank formula of the plan contract,
  ``rank = (pp_index * dp + dp_index) * tp + tp_index`` (a row-major mesh of shape ``(pp, dp, tp)``,
  see :mod:`planner.plan`): a rank's coordinates and back, and the ranks of each axis group.
* :class:`TensorSplits`: the plan's tensor-parallel placements (``placements["style"]``, format
  ``intra_op_sharding/1``: ``{module fqn: colwise | rowwise | vocab | sequence | replicate}``), read
  and checked once; code asks ``splits.style_of(fqn)`` instead of indexing an untyped dict.

Neither changes the plan's JSON: they are views of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from planner.plan import Plan
from runtime.errors import RunCheckError

Axis = Literal["pp", "dp", "tp"]
Style = Literal["colwise", "rowwise", "vocab", "sequence", "replicate"]
STYLES: tuple[str, ...] = ("colwise", "rowwise", "vocab", "sequence", "replicate")
PLACEMENTS_SCHEMA = "intra_op_sharding/1"


@dataclass(frozen=True)
class RankCoords:
    """Where one rank sits on the ``(pp, dp, tp)`` mesh."""

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
        for axis in ("pp", "dp", "tp"):
            value = getattr(self, axis)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RunCheckError(f"parallel.{axis}: got {value!r}; expected an integer >= 1")

    @classmethod
    def from_plan(cls, plan: Plan) -> RankLayout:
        p = plan.parallel
        return cls(pp=p.pp, dp=p.dp, tp=p.tp)

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.pp, self.dp, self.tp)

    def coords(self, rank: int) -> RankCoords:
        if not 0 <= rank < self.world_size:
            raise RunCheckError(f"rank: got {rank}; the plan has ranks 0..{self.world_size - 1}")
        return RankCoords(pp=rank // (self.dp * self.tp), dp=(rank // self.tp) % self.dp, tp=rank % self.tp)

    def rank_of(self, pp: int, dp: int, tp: int) -> int:
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
            raise RunCheckError(
                f"stages: ranks {list(ranks)} are not the dp x tp = {self.dp * self.tp} ranks of one pipeline "
                "position (rank = (pp_index * dp + dp_index) * tp + tp_index); re-create the plan")
        return positions.pop()


@dataclass(frozen=True)
class TensorSplits:
    """The plan's tensor-parallel placements: ``{module fqn: style}``, checked once when read.

    ``given`` is false for a plan without placements (the runtime then finds Megatron's pairs itself).
    """

    styles: dict[str, str] = field(default_factory=dict)
    given: bool = False

    @classmethod
    def from_plan(cls, plan: Plan) -> TensorSplits:
        if not plan.placements:
            return cls()
        table = plan.placements.get("style")
        schema = plan.placements.get("schema", PLACEMENTS_SCHEMA)
        if schema != PLACEMENTS_SCHEMA or not isinstance(table, dict):
            raise RunCheckError(f"placements: schema {schema!r} without a 'style' table is not readable by the "
                                f"runtime, which reads {PLACEMENTS_SCHEMA} ({{'style': {{module: style}}}}); "
                                "re-create the plan")
        for module, style in table.items():
            if style not in STYLES:
                raise RunCheckError(f"placements.style.{module}: unknown style {style!r}; the runtime applies "
                                    f"{', '.join(STYLES)}")
        return cls(styles=dict(table), given=True)

    def style_of(self, module: str) -> str:
        """The style of ``module`` (``"replicate"`` when the plan does not list it)."""
        return self.styles.get(module, "replicate")

    def split(self) -> dict[str, str]:
        """Every module the plan splits (all styles but ``replicate``)."""
        return {m: s for m, s in self.styles.items() if s != "replicate"}
