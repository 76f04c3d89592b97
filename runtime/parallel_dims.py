"""The parallel degrees of a run and the named ``DeviceMesh`` built from them.

``ParallelDims`` is the one place that checks the plan's degrees against the launched world
(``dp * cp * tp * pp == WORLD_SIZE``) and builds the row-major mesh of shape ``(pp, dp, cp, tp)`` with
axis names ``("pp", "dp", "cp", "tp")``, so that ``rank = ((pp_index * dp + dp_index) * cp + cp_index)
* tp + tp_index`` exactly as the plan's stages list them (:class:`planner.layout.RankLayout`). Vocabulary: an *axis* is a mesh axis, a *dim* a tensor dimension.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from planner.plan import MESH_AXES, Plan
from planner.units import plural, verb
from runtime.errors import RunCheckError
from runtime.rank_layout import RankLayout


@dataclass(frozen=True, kw_only=True)
class ParallelDims:
    dp: int
    tp: int
    pp: int
    world_size: int
    cp: int = 1

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp", "cp", "world_size"):
            if getattr(self, name) < 1:
                raise RunCheckError(f"{name}: got {getattr(self, name)}; expected an integer >= 1")
        need = self.dp * self.cp * self.tp * self.pp
        if need != self.world_size:
            product = (f"dp*cp*tp*pp = {self.dp}*{self.cp}*{self.tp}*{self.pp}" if self.cp > 1
                       else f"dp*tp*pp = {self.dp}*{self.tp}*{self.pp}")
            raise RunCheckError(
                f"world size: the plan needs {product} = "
                f"{plural(need, 'process', 'processes')} but "
                f"{plural(self.world_size, 'process', 'processes')} {verb(self.world_size, 'was', 'were')} launched; "
                f"launch {need} (--nproc, or torchrun --nnodes x --nproc-per-node), or re-plan "
                f"for {plural(self.world_size, 'device')} with `python -m planner plan`")

    @classmethod
    def from_plan(cls, plan: Plan, world_size: int) -> ParallelDims:
        if tuple(plan.mesh_axes) != MESH_AXES:
            raise RunCheckError(f"mesh.axes: got {list(plan.mesh_axes)}; this runtime reads plans whose mesh axes "
                                f"are {list(MESH_AXES)}; re-create the plan with `python -m planner plan`")
        p = plan.parallel
        return cls(dp=p.dp, tp=p.tp, pp=p.pp, cp=p.cp, world_size=world_size)

    @property
    def layout(self) -> RankLayout:
        """The rank formula of the plan contract (:class:`runtime.rank_layout.RankLayout`)."""
        return RankLayout(pp=self.pp, dp=self.dp, tp=self.tp, cp=self.cp)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.layout.shape

    def coords(self, rank: int) -> tuple[int, int, int]:
        """``(pp_index, dp_index, tp_index)`` of ``rank`` (its cp index: ``layout.coords(rank).cp``)."""
        c = self.layout.coords(rank)
        return (c.pp, c.dp, c.tp)

    def rank_of(self, pp_index: int, dp_index: int, tp_index: int, cp_index: int = 0) -> int:
        return self.layout.rank_of(pp_index, dp_index, tp_index, cp_index)

    def build_mesh(self, device_type: str, *, timeout: timedelta | None = None) -> DeviceMesh:
        """The ``(pp, dp, cp, tp)`` mesh; every axis group gets ``timeout`` so a dead peer cannot hang a rank."""
        mesh = init_device_mesh(device_type, self.shape, mesh_dim_names=MESH_AXES)
        if timeout is not None:
            for axis in MESH_AXES:
                dist.distributed_c10d._set_pg_timeout(timeout, mesh.get_group(axis))
        return mesh
