"""``python -m runtime dry-run plan.json``: build a plan's ranks on the meta device and count what they hold.

No real ranks and no memory: the process joins a *fake* process group (torch's ``fake`` backend, whose
collectives do nothing) as the rank being examined, builds the model on the meta device, and runs the
same parallelization steps as a real run (:func:`runtime.train.parallelize_stages`: this rank's stages,
tensor parallel as DTensor placements, recompute, the ZeRO-1/2 optimizer slices or FSDP2 for ZeRO-3),
then gives every parameter a gradient of its own layout and has AdamW create its state (what its
``step`` does first) over what a run's optimizer updates. What it counts is therefore what those
objects are, not a formula:

* ``parameters``: the local shard of every parameter (DTensor ``to_local()``), in its dtype, each
  once (a tied weight whose two stages share a rank is one parameter there);
* ``gradients``: one gradient per parameter with the parameter's layout (what the step leaves after the
  data-parallel reduce), or under ZeRO-2 one per optimizer slice;
* ``optimizer``: AdamW's state tensors (the moments; the scalar step counters are left out, as in
  the run report's ``model_state_bytes``), under ZeRO-1/2 those of this rank's 1/dp slice of each
  parameter (:class:`runtime.data_parallel.OptimizerShards`);
* ``gathered``: what FSDP2 all-gathers during a step (its recorded unsharded sizes): the largest layer,
  and the whole stage;
* ``step peak``: the model state held at the step's peak, by torch's rules for those gathers
  (:func:`step_peak_bytes`): under a pipeline schedule torch keeps an FSDP stage gathered across the
  micro-batches and accumulates unsharded gradients until the last one (the whole stage, twice, where
  the sharded gradients were: the run frees them with ``zero_grad(set_to_none=True)``), which is what the
  plan predicts for such a stage, so the report compares that peak with it;
  ZeRO-3 gathers a layer and prefetches the next, with one layer's unsharded gradient. Without FSDP
  (ZeRO-0/1/2) it is the state itself.

Ranks are grouped by role: all the ranks of one pipeline position build the same modules and differ
only in which shard of each tensor they keep. One rank per position is built (``dp`` and ``tp``
coordinate 0, whose shards are the largest); the bytes of every other rank of the position are those
same DTensor layouts evaluated at its coordinate (torch's own shard-size rule). ``--rank R`` builds
rank ``R`` itself. Each group is printed next to the plan's prediction for that position
(``plan.predicted.stages[d].memory_bytes``: weights, gradients, optimizer). For a preset the checks a run
makes before training (:func:`runtime.checks.static_checks`) run too, and a refusal is reported (the
bytes are still counted).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import _StridedShard

from planner.cost.sharding import keeps_gathered_weights, keeps_unsharded_grads, shard_size
from planner.plan import Plan
from runtime.data_parallel import HSDP_AXES, OptimizerShards
from runtime.errors import RunCheckError
from runtime.expert_parallel import expert_slice_at
from runtime.parallel_dims import ParallelDims

AGREE_RTOL = 0.02  # the bar: predicted and instantiated model-state bytes within 2%


@dataclass(frozen=True)
class StateBytes:
    """Bytes of one rank's model state, as instantiated."""

    parameters: int
    gradients: int
    optimizer: int
    gathered_layer_max: int = 0  # FSDP2: the largest layer, unsharded
    gathered_stage: int = 0  # FSDP2: every layer of the rank's stages, unsharded
    elements: int = 0  # parameter elements before the dp split (tensor-parallel shards, FSDP unsharded)

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer


@dataclass
class RoleGroup:
    """Ranks with the same bytes: one pipeline position, and one shard size of every tensor."""

    position: int  # pipeline position (pp index)
    stages: tuple[int, ...]
    ranks: tuple[int, ...]
    built_rank: int  # the rank whose modules were built (its bytes measured; the others' from its layouts)
    instantiated: StateBytes
    predicted: dict[str, int] | None  # weights, gradients, optimizer, ... of the plan for this position
    predicted_elements: float | None = None  # the plan's weights / weight_bytes, before the dp split
    step_peak: int = 0  # model state at the step's peak, FSDP's gathers included (step_peak_bytes)
    # the plan predicts the step's peak (ZeRO-3 under a pipeline keeps the stage gathered and its gradients
    # unsharded: planner.cost.sharding.keeps_unsharded_grads), so the step peak is what to compare with
    peak_predicted: bool = False

    @property
    def predicted_total(self) -> int | None:
        if not self.predicted:
            return None
        return sum(int(self.predicted.get(k, 0)) for k in ("weights", "gradients", "optimizer"))

    @property
    def ratio(self) -> float | None:
        pred = self.predicted_total
        held = self.step_peak if self.peak_predicted else self.instantiated.total
        return held / pred if pred else None

    @property
    def elements_ratio(self) -> float | None:
        """Instantiated over planned parameter count: separates what is held from how it is stored."""
        return self.instantiated.elements / self.predicted_elements if self.predicted_elements else None


@dataclass
class DryRunReport:
    model: str
    parallel: str
    world_size: int
    parameter_dtype: str
    plan_bytes_per_parameter: dict[str, Any]  # weight_bytes, grad_bytes, optimizer_bytes the plan priced
    groups: list[RoleGroup] = field(default_factory=list)
    wall_s: float = 0.0
    refused: str | None = None  # what a real run's checks say about this plan (None: it would run)

    def busiest(self) -> RoleGroup:
        return max(self.groups, key=lambda g: (g.instantiated.total, -g.ranks[0]))

    def to_dict(self) -> dict[str, Any]:
        groups = [{**asdict(g), "ranks": _ranges(g.ranks), "num_ranks": len(g.ranks),
                   "instantiated": {**asdict(g.instantiated), "total": g.instantiated.total},
                   "predicted_total": g.predicted_total, "instantiated_over_predicted": g.ratio,
                   "elements_instantiated_over_predicted": g.elements_ratio}
                  for g in self.groups]
        busiest = self.busiest()
        return {"model": self.model, "parallel": self.parallel, "world_size": self.world_size, "refused": self.refused,
                "parameter_dtype": self.parameter_dtype, "plan_bytes_per_parameter": self.plan_bytes_per_parameter,
                "wall_s": self.wall_s, "busiest_rank": busiest.ranks[0], "groups": groups}


@contextlib.contextmanager
def fake_world(world_size: int, rank: int) -> Iterator[None]:
    """This process as ``rank`` of a ``world_size`` fake process group (collectives do nothing)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RunCheckError("dry-run: a process group is already initialised in this process; run the dry run in "
                            "a process of its own (python -m runtime dry-run)")
    dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def dry_run(plan: Plan, *, rank: int | None = None,
            build_model: Callable[[], nn.Module] | None = None) -> DryRunReport:
    """Every rank's model-state bytes (``rank=None``), or rank ``rank``'s alone, next to the plan's."""
    start = time.perf_counter()
    world = plan.parallel.world_size
    dims = ParallelDims.from_plan(plan, world)
    if rank is not None and not 0 <= rank < world:
        raise RunCheckError(f"--rank: got {rank}; the plan has ranks 0..{world - 1}")
    refused = None
    if build_model is None:  # a preset: the checks a run makes before any process trains
        from runtime.checks import static_checks
        from runtime.model import resolve_preset

        try:
            static_checks(plan, resolve_preset(plan), device_type="cuda")
        except RunCheckError as exc:
            refused = str(exc)
    # One meta model for every position: a position parallelizes only its own layers (a real rank drops the
    # others), and positions hold disjoint layers, so each finds its layers as a freshly built model has them.
    model = (build_model or _preset_builder(plan))()
    if build_model is not None:  # a user's model: the run's first check, that it is the model the plan was made for
        from runtime.checks import check_user_model, plan_sample_input

        check_user_model(plan, model, plan_sample_input(plan))
    positions = [dims.coords(rank)[0]] if rank is not None else list(range(dims.pp))
    groups: list[RoleGroup] = []
    dtypes: set[str] = set()
    for position in positions:
        built = rank if rank is not None else dims.rank_of(position, 0, 0)
        with fake_world(world, built):
            stages, optimizers, zero = _build_rank(plan, dims, model)
            measured = measure(stages, optimizers, zero)
            dtypes |= {str(p.dtype).removeprefix("torch.") for s in stages for p in s.parameters()}
            stage_indices = tuple(s.stage_index for s in stages)
            if rank is not None:
                by_rank = {rank: measured}
            else:
                members = [dims.rank_of(position, d, t) for d in range(dims.dp) for t in range(dims.tp)]
                by_rank = _bytes_at(stages, optimizers, zero, dims, members, measured)
                if by_rank[built] != measured:  # the layout rule must reproduce the rank that was built
                    raise AssertionError(f"dry-run: rank {built} computed {by_rank[built]} but measured {measured}")
        predicted = _predicted(plan, position)
        planned_elements = _predicted_elements(plan, predicted)
        for value in dict.fromkeys(by_rank.values()):
            groups.append(RoleGroup(position=position, stages=stage_indices,
                                    ranks=tuple(r for r, b in by_rank.items() if b == value), built_rank=built,
                                    instantiated=value, predicted=predicted, predicted_elements=planned_elements,
                                    step_peak=step_peak_bytes(plan, value),
                                    peak_predicted=keeps_unsharded_grads(plan.parallel)))
    constants = plan_bytes_per_parameter(plan)
    return DryRunReport(model=plan.model.name, parallel=plan.parallel.label(), world_size=world,
                        parameter_dtype="/".join(sorted(dtypes)), plan_bytes_per_parameter=constants,
                        groups=groups, wall_s=time.perf_counter() - start, refused=refused)


def plan_bytes_per_parameter(plan: Plan) -> dict[str, Any]:
    """The weight, gradient and optimizer bytes per parameter the plan priced: its cost constants' rule for its
    dtype (:meth:`planner.cost.constants.CostConstants.state_bytes`); ``None`` for a plan that records none."""
    if not plan.cost_constants:
        return {"weight_bytes": None, "grad_bytes": None, "optimizer_bytes": None}
    from planner.cost.constants import CostConstants

    known = {f.name for f in dataclasses.fields(CostConstants)}
    constants = CostConstants(**{k: v for k, v in plan.cost_constants.items() if k in known})
    w, g, o = constants.state_bytes(plan.model.dtype)
    return {"weight_bytes": w, "grad_bytes": g, "optimizer_bytes": o}


def step_peak_bytes(plan: Plan, state: StateBytes) -> int:
    """Model state at a step's peak: the sharded state plus what FSDP2 holds gathered (module docstring)."""
    if not state.gathered_stage:
        return state.total
    if plan.parallel.pp > 1:  # gathered for all micro-batches, unsharded gradients accumulated until the last,
        # in place of the sharded ones the run's zero_grad(set_to_none=True) freed after the last step
        return state.total - state.gradients + 2 * state.gathered_stage
    return state.total + 3 * state.gathered_layer_max  # a layer, the prefetched next one, a layer's gradient


def _preset_builder(plan: Plan) -> Callable[[], nn.Module]:
    from runtime.model import resolve_preset

    preset = resolve_preset(plan)
    return lambda: preset.build(device="meta")


def _build_rank(plan: Plan, dims: ParallelDims, model: nn.Module
                ) -> tuple[list[nn.Module], list[torch.optim.Optimizer], OptimizerShards | None]:
    """This (fake) rank's stages of ``model``, parallelized as a run does, with gradients and AdamW's state
    over what the run's optimizer updates (the ZeRO-1/2 slices, returned too, or the parameters)."""
    from runtime.train import parallelize_stages

    device = torch.device("meta")
    mesh = dims.build_mesh("cpu")
    stages, _, dp_mode = parallelize_stages(model, plan, mesh, device)
    zero = OptimizerShards(stages, mesh["dp"], dp_mode.zero_stage) if dp_mode.kind == "zero" else None
    for param in _unique_parameters(stages):
        param.grad = torch.zeros_like(param)
    if zero is not None:
        zero.attach_gradients()
    optimizers = []
    for index, stage in enumerate(stages):
        params = zero.parameters(index) if zero is not None else \
            [p for p in stage.parameters() if not any(p is q for s in stages[:index] for q in s.parameters())]
        if not params:
            continue
        optim = torch.optim.AdamW(params, lr=0.0)
        for group in optim.param_groups:  # what step() does first: create the state of every parameter
            optim._init_group(group, [], [], [], [], [], [])  # (the arithmetic after it would add seconds)
        optimizers.append(optim)
    return stages, optimizers, zero


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _local_bytes(t: torch.Tensor) -> int:
    t = _local(t)
    return t.numel() * t.element_size()


def _state_tensors(optim: torch.optim.Optimizer) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
    for param, state in optim.state.items():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                yield param, value


def _unique_parameters(stages: list[nn.Module]) -> list[nn.Parameter]:
    return list({id(p): p for s in stages for p in s.parameters()}.values())


def _gradients(stages: list[nn.Module], zero: OptimizerShards | None) -> list[torch.Tensor]:
    """The gradients this rank holds after the reduce: whole (or FSDP-sharded) ones, or ZeRO-2's slices."""
    if zero is not None and zero.zero_stage == 2:
        return [p.grad for _, p in zero.named_parameters() if p.grad is not None]
    return [p.grad for p in _unique_parameters(stages) if p.grad is not None]


def measure(stages: list[nn.Module], optimizers: list[torch.optim.Optimizer],
            zero: OptimizerShards | None = None) -> StateBytes:
    """The bytes the objects of this rank hold (local shards)."""
    params = _unique_parameters(stages)
    layer_max, stage_total, unsharded = _gathered(stages)
    elements = unsharded if unsharded else sum(_local(p).numel() for p in params)
    return StateBytes(elements=elements, parameters=sum(_local_bytes(p) for p in params),
                      gradients=sum(_local_bytes(g) for g in _gradients(stages, zero)),
                      optimizer=sum(_local_bytes(v) for o in optimizers for _, v in _state_tensors(o)),
                      gathered_layer_max=layer_max, gathered_stage=stage_total)


def _gathered(stages: list[nn.Module]) -> tuple[int, int, int]:
    """FSDP2's unsharded bytes (largest FSDP module, all of them) and elements; zeros without FSDP."""
    from torch.distributed.fsdp import FSDPModule

    sizes, elements, seen = [], 0, []
    for stage in stages:
        for module in stage.modules():
            if not isinstance(module, FSDPModule):
                continue
            group = module._get_fsdp_state()._fsdp_param_group
            if group is None or any(group is g for g in seen):  # fully_shard([a, b]): one group, two modules
                continue
            seen.append(group)
            sizes.append(sum(math.prod(fp._orig_size) * _gathered_dtype(fp).itemsize
                             for fp in group.fsdp_params))
            elements += sum(math.prod(fp._orig_size) for fp in group.fsdp_params)
    return (max(sizes), sum(sizes), elements) if sizes else (0, 0, 0)


_Layout = tuple  # (global shape, mesh axis names, mesh shape, placements, element size): a tensor's sharding


def _layouts(tensors: Iterable[torch.Tensor]) -> Counter:
    """How many tensors have each layout (many layers share theirs, so each is evaluated once per rank)."""
    counts: Counter = Counter()
    for t in tensors:
        if isinstance(t, DTensor):
            mesh = t.device_mesh
            if mesh.mesh_dim_names is None or not set(mesh.mesh_dim_names) <= {"pp", "dp", "cp", "tp", *HSDP_AXES}:
                raise AssertionError(f"dry-run: a DTensor on mesh axes {mesh.mesh_dim_names}")
            counts[(tuple(t.shape), mesh.mesh_dim_names, tuple(mesh.shape), tuple(t.placements),
                    t.element_size())] += 1
        else:
            counts[(tuple(t.shape), (), (), (), t.element_size())] += 1
    return counts


def _gathered_dtype(fsdp_param: Any) -> torch.dtype:
    """The dtype FSDP2 gathers a parameter in: a mixed-precision policy's ``param_dtype`` (set on the first
    forward), else the parameter's own."""
    return getattr(fsdp_param, "param_dtype", None) or fsdp_param.sharded_param.dtype


def _bytes_at(stages: list[nn.Module], optimizers: list[torch.optim.Optimizer], zero: OptimizerShards | None,
              dims: ParallelDims, ranks: list[int], built: StateBytes) -> dict[int, StateBytes]:
    """Each rank's bytes: the built rank's tensors with their DTensor layouts evaluated at its coordinate.

    A ZeRO-1/2 slice is a plain tensor whose length depends on the dp coordinate: it is counted as its
    parameter's local layout at the rank's coordinate, cut to that dp index's slice (:func:`_slice_bytes`)."""
    params = _unique_parameters(stages)
    sliced = zero is not None
    slice_of = {id(shard): param for param, shard in zero.slices()} if sliced else {}
    grads = [] if sliced and zero.zero_stage == 2 else [p.grad for p in params if p.grad is not None]
    kinds = (_layouts(iter(params)), _layouts(grads),
             _layouts(v for o in optimizers for p, v in _state_tensors(o) if id(p) not in slice_of))
    slice_states = [(slice_of[id(p)], v.element_size()) for o in optimizers for p, v in _state_tensors(o)
                    if id(p) in slice_of]
    if sliced and zero.zero_stage == 2:
        slice_grads = [(param, shard.grad.element_size()) for param, shard in zero.slices() if shard.grad is not None]
    else:
        slice_grads = []
    out = {}
    shard = next((layout[2][layout[1].index("dp_shard")] for kind in kinds for layout in kind
                  if "dp_shard" in layout[1]), 1)  # HSDP: the shard group's size (runtime/data_parallel.fsdp_mesh)
    for rank in ranks:
        c = dims.layout.coords(rank)
        coords = {"pp": c.pp, "dp": c.dp, "cp": c.cp, "tp": c.tp}
        flat = c.dp * dims.cp + c.cp  # the rank's index among the dp (x cp) ranks FSDP shards over
        coords |= {"dp_replicate": flat // shard, "dp_shard": flat % shard}
        sizes = [sum(n * _bytes_at_coord(layout, coords) for layout, n in kind.items()) for kind in kinds]
        if sliced:
            sizes[1] += sum(_slice_bytes(p, size, coords, zero.world) for p, size in slice_grads)
            sizes[2] += sum(_slice_bytes(p, size, coords, zero.world) for p, size in slice_states)
        out[rank] = StateBytes(parameters=sizes[0], gradients=sizes[1], optimizer=sizes[2],
                               gathered_layer_max=built.gathered_layer_max, gathered_stage=built.gathered_stage,
                               elements=built.elements)
    return out


def _slice_bytes(param: torch.Tensor, element_size: int, coords: dict[str, int], dp: int) -> int:
    """Bytes of the ZeRO slice at ``coords`` of ``param``: its local numel there, cut into ``dp`` even slices."""
    (layout, _), = _layouts([param]).items()
    numel = _bytes_at_coord(layout, coords) // layout[4]
    ranks, index = expert_slice_at(param, coords["dp"]) or (dp, coords["dp"])  # an expert: over its dp/ep holders
    return _chunk_size(numel, ranks, index) * element_size


@functools.cache
def _bytes_at_coord_cached(layout: _Layout, coordinate: tuple[int, ...]) -> int:
    """Local bytes at ``coordinate``: each ``Shard`` placement keeps ``torch.chunk``'s piece of its dim.

    A ``_StridedShard`` (FSDP2 over a tensor-parallel DTensor) shards what the plain ``Shard`` placements
    left, so it is applied after them. (torch's ``_compute_local_shape_and_global_offset`` gives the
    same sizes but builds index tensors as long as the dim: minutes for a 3,072-rank plan.)"""
    shape, names, mesh_shape, placements, element_size = layout
    local = list(shape)
    order = sorted(range(len(placements)), key=lambda i: isinstance(placements[i], _StridedShard))
    for i in order:
        if placements[i].is_shard() or isinstance(placements[i], _StridedShard):
            dim = placements[i].dim
            local[dim] = _chunk_size(local[dim], mesh_shape[i], coordinate[i])
    return math.prod(local) * element_size


def _chunk_size(n: int, chunks: int, index: int) -> int:
    """Size of piece ``index`` of ``torch.chunk`` over ``n`` rows in ``chunks`` pieces (0 past the end)."""
    size = -(-n // chunks)
    return max(0, min(size, n - index * size))


def _bytes_at_coord(layout: _Layout, coords: dict[str, int]) -> int:
    return _bytes_at_coord_cached(layout, tuple(coords[name] for name in layout[1]))


def _predicted(plan: Plan, position: int) -> dict[str, int] | None:
    for stage in plan.predicted.stages:
        if stage.get("device_index") == position:
            return {k: int(v) for k, v in stage.get("memory_bytes", {}).items()}
    if plan.parallel.pp == 1 and plan.predicted.memory_breakdown_bytes:
        return {k: int(v) for k, v in plan.predicted.memory_breakdown_bytes.items()}
    return None


def _predicted_elements(plan: Plan, predicted: dict[str, int] | None) -> float | None:
    weight_bytes = plan_bytes_per_parameter(plan)["weight_bytes"]
    if not predicted or not weight_bytes:
        return None
    par, shards = plan.parallel, shard_size(plan.parallel)  # ZeRO-3's shard group (HSDP: dp_shard)
    if keeps_gathered_weights(par):  # + the gathered copy the plan counts (no reshard, or under a pipeline)
        return predicted.get("weights", 0) / weight_bytes / (1 / shards + 1)
    return predicted.get("weights", 0) / weight_bytes * (shards if par.zero_stage >= 3 else 1)


def _ranges(ranks: tuple[int, ...]) -> str:
    """``0-3,8-11``: a compact form of a sorted rank list."""
    parts, ordered = [], sorted(ranks)
    start = prev = ordered[0]
    for r in ordered[1:] + [None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        if r is not None:
            start = prev = r
    return ",".join(parts)


def _size(n: int | None, unit: int) -> str:
    return "-" if n is None else f"{n / unit:.3f}"


def format_report(report: DryRunReport) -> str:
    """The table the CLI prints: one row per group of ranks, instantiated next to predicted."""
    c = report.plan_bytes_per_parameter
    priced = (f"the plan prices {c['weight_bytes']:g} + {c['grad_bytes']:g} + {c['optimizer_bytes']:g} bytes per "
              "parameter (weights + gradients + optimizer)") if all(c.values()) else \
        "the plan records no bytes per parameter"
    unit, name = (2**30, "GiB") if max(g.instantiated.total for g in report.groups) >= 2**30 else (2**20, "MiB")
    lines = [f"dry-run: {report.model} | {report.parallel} | {report.world_size} ranks on the meta device (fake "
             f"process group) | parameters {report.parameter_dtype}; {priced}",
             f"{name} per rank: predicted (weights/gradients/optimizer = total) vs instantiated (parameters/gradients/"
             "optimizer = total); inst/pred of those totals (of the step peak, where the plan predicts the peak: "
             "ZeRO-3 under a pipeline), and of the parameter count before the dp split; what FSDP gathers during "
             "a step: largest layer, whole stage; the model state at the step's peak",
             f"{'pos':>3} {'stages':>8} {'ranks':>6} {'predicted':>34} {'instantiated':>34} {'inst/pred':>9} "
             f"{'count':>7} {'gathered':>17} {'step peak':>9}  ranks"]
    for g in report.groups:
        p, i = g.predicted or {}, g.instantiated
        pred = (f"{_size(p.get('weights'), unit)}/{_size(p.get('gradients'), unit)}/"
                f"{_size(p.get('optimizer'), unit)} = {_size(g.predicted_total, unit)}") if p else "-"
        inst = (f"{_size(i.parameters, unit)}/{_size(i.gradients, unit)}/{_size(i.optimizer, unit)} = "
                f"{_size(i.total, unit)}")
        ratio = f"{g.ratio:.4f}" if g.ratio is not None else "-"
        count = f"{g.elements_ratio:.4f}" if g.elements_ratio is not None else "-"
        gathered = (f"{_size(i.gathered_layer_max, unit)}, {_size(i.gathered_stage, unit)}"
                    if i.gathered_stage else "-")
        stages = ",".join(map(str, g.stages))
        lines.append(f"{g.position:>3} {stages:>8} {len(g.ranks):>6} {pred:>34} {inst:>34} {ratio:>9} "
                     f"{count:>7} {gathered:>17} {_size(g.step_peak, unit):>9}  {_ranges(g.ranks)}")
    b = report.busiest()
    if b.ratio is None:
        verdict = "the plan has no per-position weights/gradients/optimizer prediction to compare with"
    else:
        within = "within" if abs(b.ratio - 1) <= AGREE_RTOL else "NOT within"
        peak = f"step peak {_size(b.step_peak, unit)} {name}, " if b.peak_predicted else ""
        verdict = f"{peak}predicted {_size(b.predicted_total, unit)} {name} ({within} {AGREE_RTOL:.0%})"
    if report.refused:
        lines.append(f"note: a run of this plan would be refused before training: {report.refused}")
    lines.append(f"busiest rank {b.ranks[0]}: instantiated {_size(b.instantiated.total, unit)} {name} of model state; "
                 f"{verdict}; {len(report.groups)} groups of ranks, {report.wall_s:.1f} s")
    return "\n".join(lines)
