"""Data parallelism over the ``dp`` mesh axis: DDP, FSDP2, or a plain gradient all-reduce.

The plan's ``zero_stage`` picks the wrapper (applied last, after tensor parallelism and recompute):

=========  ===========================================  ==========================================
zero       what is sharded over dp (ZeRO)               torch
=========  ===========================================  ==========================================
0          nothing                                      ``DistributedDataParallel`` when pp = tp = 1
                                                        (bucketed all-reduce overlapping backward);
                                                        otherwise one flat all-reduce of all
                                                        gradients after the pipeline flush: DDP takes
                                                        no DTensor parameters (tp), and its reducer
                                                        asserts under a schedule's several backward
                                                        passes per step (pp)
1          optimizer state                              :class:`OptimizerShards`: parameters and
                                                        gradients stay whole on every dp rank; the
                                                        gradients are all-reduced, and the optimizer
                                                        updates this rank's slice of every parameter
                                                        (a view into it), whose slices are then
                                                        all-gathered (Megatron's distributed optimizer)
2          optimizer state and gradients                :class:`OptimizerShards` as for 1, but each
                                                        gradient is reduce-scattered into this rank's
                                                        slice and the whole gradient freed
3          parameters too                               ``fully_shard(reshard_after_forward=...)``
                                                        as the plan says: True re-gathers the
                                                        parameters for backward, False keeps them
                                                        gathered from forward to backward. HSDP
                                                        (``dp_shard`` < dp): the same over a 2-D
                                                        mesh ``(dp_replicate, dp_shard)`` of the dp
                                                        ranks (:func:`fsdp_mesh`): shards within
                                                        groups of ``dp_shard`` consecutive dp
                                                        ranks, gradients all-reduced across them
=========  ===========================================  ==========================================

FSDP2 wraps every layer of a stage and then the stage itself (torchtitan's order), so one layer's
parameters are gathered at a time. Every mode averages gradients over dp, so the update equals
single-process training on the global batch.

ZeRO-1/2 is not FSDP2's ``reshard_after_forward=False``: that mode also shards the parameters between
steps and gathers them (in fp32) during one, which is neither the memory the plan prices (whole
parameters and gradients, only the optimizer state over dp) nor torch's ``ZeroRedundancyOptimizer``,
which assigns *whole* parameters to ranks (a pipeline stage of a few large matrices then splits very
unevenly over 12 dp ranks). :class:`OptimizerShards` instead gives every parameter's local tensor
(its tensor-parallel shard) an even 1/dp slice per rank, as a ``Parameter`` that is a view into it:
the caller's optimizer, built over those slices, holds the state of 1/dp of every parameter and
updates the parameter in place; one all-gather per parameter then makes the replicas equal again.
Plain AdamW is element-wise, so the update is exactly single-process training's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from runtime.expert_parallel import zero_expert_slices
from runtime.model import StageModule


@dataclass(frozen=True)
class DataParallelMode:
    kind: str  # "none" | "ddp" | "allreduce" | "zero" (ZeRO-1/2: OptimizerShards) | "fsdp" (ZeRO-3)
    reshard_after_forward: bool = False
    zero_stage: int = 0
    replicas: int = 1  # HSDP: copies of each FSDP shard (dp / dp_shard); 1: one shard group of all dp ranks

    @staticmethod
    def for_plan(dp: int, tp: int, pp: int, zero_stage: int, *, reshard_after_forward: bool = True,
                 replicas: int = 1) -> DataParallelMode:
        if zero_stage >= 3:
            # Even with dp == 1: the plan asked for FSDP's memory layout, and FSDP on one rank is exact.
            return DataParallelMode("fsdp", reshard_after_forward=reshard_after_forward, zero_stage=zero_stage,
                                    replicas=replicas)
        if zero_stage >= 1 and dp > 1:
            return DataParallelMode("zero", zero_stage=zero_stage)
        if dp == 1:
            return DataParallelMode("none")
        return DataParallelMode("ddp" if tp == 1 and pp == 1 else "allreduce")

    def describe(self) -> str:
        return {
            "none": "no data parallelism",
            "ddp": "DDP (bucketed gradient all-reduce during backward)",
            "allreduce": "flat gradient all-reduce after the pipeline flush",
            "zero": (f"ZeRO-{self.zero_stage}: whole parameters, "
                     + ("gradients all-reduced" if self.zero_stage == 1 else "gradients reduce-scattered")
                     + ", optimizer state of a 1/dp slice of each parameter per rank"),
            "fsdp": f"FSDP2 fully_shard(reshard_after_forward={self.reshard_after_forward})"
                    + (f", HSDP over {self.replicas} replicas" if self.replicas > 1 else ""),
        }[self.kind]


def apply_data_parallel(stage: StageModule, mode: DataParallelMode, dp_mesh: DeviceMesh,
                        device: torch.device) -> nn.Module:
    """Wrap ``stage``; returns the module the pipeline stage / training loop calls."""
    if mode.kind in ("none", "allreduce", "zero"):  # zero: OptimizerShards, built once the weights are in place
        return stage
    if mode.kind == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(stage, device_ids=ids, process_group=dp_mesh.get_group())
    mesh = fsdp_mesh(dp_mesh, mode.replicas)
    for group in _layer_groups(stage):
        fully_shard(group if len(group) > 1 else group[0], mesh=mesh,
                    reshard_after_forward=mode.reshard_after_forward)
    fully_shard(stage, mesh=mesh, reshard_after_forward=mode.reshard_after_forward)
    return stage


HSDP_AXES = ("dp_replicate", "dp_shard")


def fsdp_mesh(dp_mesh: DeviceMesh, replicas: int) -> DeviceMesh:
    """The mesh FSDP2 shards over: ``dp_mesh`` itself, or for HSDP (``replicas > 1``) its 2-D view
    ``(dp_replicate, dp_shard)`` of shape ``(replicas, dp / replicas)``: consecutive dp ranks share a shard
    group (``planner.layout.RankLayout.sub_group``), and ``fully_shard`` on a 2-D mesh replicates over the
    first axis and shards over the second. Made once per dp mesh, kept on it (every rank calls it in the same
    order; a cache outside the mesh would outlive its process group)."""
    if replicas == 1:
        return dp_mesh
    made = getattr(dp_mesh, "_hsdp_mesh", None)
    if made is None or made.shape[0] != replicas:
        size = dp_mesh.size()
        if size % replicas:
            raise ValueError(f"replicas: {replicas} does not divide the {size} data-parallel ranks")
        made = dp_mesh._unflatten(0, (replicas, size // replicas), HSDP_AXES)
        dp_mesh._hsdp_mesh = made  # type: ignore[attr-defined]
    return made


def hsdp_counted(param: nn.Parameter) -> bool | None:
    """For the global gradient norm: ``None`` when ``param`` is not HSDP-sharded; else whether this rank's
    shard is counted (the first replica's: every replica holds the same shards after the all-reduce)."""
    mesh = getattr(param, "device_mesh", None)
    if not isinstance(param, DTensor) or mesh is None or HSDP_AXES[0] not in (mesh.mesh_dim_names or ()):
        return None
    return mesh.get_local_rank(HSDP_AXES[0]) == 0


def _layer_groups(stage: StageModule) -> list[list[nn.Module]]:
    """The stage's layers, one FSDP group each, except that layers sharing a parameter (a tied embedding and
    LM head) form one group: FSDP2 refuses a parameter managed by two groups, and sharding it twice would
    untie it."""
    layers = [stage.get_submodule(path) for path in stage.layer_paths]
    group_of: dict[int, int] = {}  # parameter id -> index of the first layer holding it
    parent = list(range(len(layers)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i, layer in enumerate(layers):
        for param in layer.parameters():
            j = group_of.setdefault(id(param), i)
            if j != i:
                parent[root(i)] = root(j)
    groups: dict[int, list[nn.Module]] = {}
    for i, layer in enumerate(layers):
        groups.setdefault(root(i), []).append(layer)
    return list(groups.values())


def allreduce_gradients(modules: list[nn.Module], dp_mesh: DeviceMesh) -> None:
    """Average gradients over dp (the ``allreduce`` mode): one all-reduce of all of them, flattened."""
    group = dp_mesh.get_group()
    params = list({id(p): p for module in modules for p in module.parameters()
                   if not hasattr(p, "_expert_parallel")}.values())  # shared ones once; expert shards: expert_parallel
    _allreduce_flat([_local(p.grad) for p in params if p.grad is not None], group, dist.get_world_size(group))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


@dataclass(frozen=True)
class _Slice:
    """This rank's slice ``[start, stop)`` of one parameter's flattened local tensor."""

    name: str  # the parameter's name in its stage (the full model's)
    param: nn.Parameter  # the module's parameter (a DTensor under tp)
    shard: nn.Parameter  # the slice, a view into ``param``'s local tensor: what the optimizer updates
    start: int
    chunk: int  # every rank's slice length before clipping to the tensor (the all-gather pads to it)
    numel: int
    group: Any = None  # the ranks sharing the parameter's slices: dp (x cp), or an expert's replicas under ep
    world: int = 1  # their number
    divisor: int = 1  # the gradient mean's: dp (x cp) (an expert's gradient sums its ep group's tokens too)


class OptimizerShards:
    """ZeRO-1/2 over the dp axis: each rank's optimizer updates a 1/dp slice of every parameter.

    Build it after the weights are in place (materialised, loaded): the slices are views into them. The
    step is then: backward into the whole gradients; :meth:`reduce_gradients` (ZeRO-1: all-reduce, the
    slice's gradient a view of the whole one; ZeRO-2: reduce-scatter into the slice, the whole gradient
    freed); the optimizer steps over :meth:`parameters`; :meth:`gather_parameters` all-gathers every
    parameter's slices so the replicas agree again (it also drops the whole gradients of the step).
    """

    def __init__(self, stages: list[nn.Module], dp_mesh: DeviceMesh, zero_stage: int) -> None:
        if zero_stage not in (1, 2):
            raise ValueError(f"zero_stage: got {zero_stage}; OptimizerShards is ZeRO-1 or ZeRO-2")
        self.zero_stage = zero_stage
        self.group = dp_mesh.get_group()
        self.world = dp_mesh.size()
        index = dp_mesh.get_local_rank()
        self._slices: list[list[_Slice]] = []
        self._by_param: dict[int, _Slice] = {}
        for stage in stages:
            mine = []
            for name, param in stage.named_parameters():
                if id(param) in self._by_param:  # shared with an earlier local stage: one slice, one update
                    continue
                local = _local(param)
                if not local.is_contiguous():
                    raise RuntimeError(f"ZeRO-{zero_stage}: parameter {name} is not contiguous; its slices would "
                                       "not be views of it")
                flat = local.detach().view(-1)
                n = flat.numel()
                # an expert's slices span the dp/ep ranks holding it (runtime/expert_parallel.py)
                group, world, at, divisor = zero_expert_slices(param, zero_stage) or (self.group, self.world,
                                                                                      index, self.world)
                chunk = math.ceil(n / world)
                start = min(at * chunk, n)
                stop = min(start + chunk, n)
                piece = _Slice(name=name, param=param, start=start, chunk=chunk, numel=n,
                               shard=nn.Parameter(flat[start:stop], requires_grad=param.requires_grad),
                               group=group, world=world, divisor=divisor)
                mine.append(piece)
                self._by_param[id(param)] = piece
            self._slices.append(mine)

    def parameters(self, stage_index: int | None = None) -> list[nn.Parameter]:
        """The slices the optimizer updates: of every local stage, or of the ``stage_index``-th one."""
        groups = self._slices if stage_index is None else [self._slices[stage_index]]
        return [s.shard for group in groups for s in group]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(s.name, s.shard) for group in self._slices for s in group]

    def gradient_slice(self, param: nn.Parameter) -> torch.Tensor | None:
        """The gradient of this rank's slice of ``param`` (ZeRO-2 keeps only that)."""
        piece = self._by_param.get(id(param))
        return None if piece is None else piece.shard.grad

    def gradient_bytes(self, param: nn.Parameter) -> int:
        """Bytes of the gradient this rank holds for ``param`` after the reduction."""
        piece = self._by_param[id(param)]
        size = piece.numel if self.zero_stage == 1 else piece.shard.numel()
        return size * _local(param).element_size()

    def slices(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """``(parameter, this rank's slice of it)`` for every parameter, each once."""
        return [(s.param, s.shard) for group in self._slices for s in group]

    def attach_gradients(self) -> None:
        """Hand each slice its part of the whole gradient as the reduction leaves it, without communicating
        (``runtime.dry_run`` counts what a step holds): a view (ZeRO-1), or a slice of its own (ZeRO-2)."""
        for group in self._slices:
            for s in group:
                if s.param.grad is None:
                    continue
                part = _local(s.param.grad).reshape(-1)[s.start:s.start + s.shard.numel()]
                s.shard.grad = part if self.zero_stage == 1 else part.clone()
                if self.zero_stage == 2:
                    s.param.grad = None

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Collective over dp: average the gradients; give each slice its part (see the class docstring)."""
        pieces = [s for group in self._slices for s in group if s.param.grad is not None]
        if self.zero_stage == 1:  # the flat all-reduce of every whole gradient, as without ZeRO
            _allreduce_flat([_local(s.param.grad) for s in pieces if s.group is self.group], self.group, self.world)
            experts = [s for s in pieces if s.group is not self.group]  # over their replicas (expert_parallel.py)
            for group in dict.fromkeys(s.group for s in experts):
                mine = [s for s in experts if s.group is group]
                _allreduce_flat([_local(s.param.grad) for s in mine], group, mine[0].divisor)
            for s in pieces:
                s.shard.grad = _local(s.param.grad).view(-1)[s.start:s.start + s.shard.numel()]
            return
        for s in pieces:
            flat = _local(s.param.grad).reshape(-1)
            padded = torch.zeros(s.chunk * s.world, dtype=flat.dtype, device=flat.device)
            padded[:s.numel] = flat
            out = torch.empty(s.chunk, dtype=flat.dtype, device=flat.device)
            dist.reduce_scatter_single(out, padded, group=s.group)
            s.shard.grad = out[:s.shard.numel()].div_(s.divisor)
            s.param.grad = None

    @torch.no_grad()
    def gather_parameters(self) -> None:
        """Collective over dp, after the optimizer step: every rank's updated slices into every replica."""
        for group in self._slices:
            for s in group:
                s.param.grad = None
                padded = torch.zeros(s.chunk, dtype=s.shard.dtype, device=s.shard.device)
                padded[:s.shard.numel()] = s.shard
                out = torch.empty(s.chunk * s.world, dtype=s.shard.dtype, device=s.shard.device)
                dist.all_gather_single(out, padded, group=s.group)
                _local(s.param).view(-1).copy_(out[:s.numel])


    # -- checkpoints: the optimizer state as every other plan saves it ------------------------------------
    def optimizer_state(self, optimizer: torch.optim.Optimizer, stage_index: int) -> dict[str, Any]:
        """Collective over dp: ``optimizer``'s state for stage ``stage_index`` in the layout
        ``get_optimizer_state_dict(..., flatten_optimizer_state_dict=True)`` gives for an unsharded
        optimizer (``state.<fqn>.<key>``, ``param_groups.<fqn>.<hyper>``), each slice-shaped tensor
        gathered back to its parameter's shape (a DTensor under tp), so that a checkpoint saved under
        ZeRO-1/2 loads into any plan and any plan's loads here (:meth:`load_optimizer_state`)."""
        out: dict[str, Any] = {}
        for s in self._slices[stage_index]:
            for key, value in optimizer.state.get(s.shard, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.numel() == s.shard.numel():
                    value = self._gathered(s, value)
                out[f"state.{s.name}.{key}"] = value
        names = {id(s.shard): s.name for s in self._slices[stage_index]}
        for group in optimizer.param_groups:
            for p in group["params"]:
                for hyper, value in group.items():
                    if hyper != "params" and id(p) in names:
                        out[f"param_groups.{names[id(p)]}.{hyper}"] = value
        return out

    def optimizer_state_template(self, stage_index: int, keys: dict[str, tuple[torch.Size, torch.dtype]]
                                 ) -> dict[str, Any]:
        """Empty tensors to load ``state.<fqn>.<key>`` entries into: ``keys`` maps each saved key of this
        stage's parameters to its saved (whole) shape and dtype; parameter-shaped ones come back as the
        parameter's layout (a DTensor under tp), the others (Adam's ``step``) as saved."""
        out: dict[str, Any] = {}
        by_name = {s.name: s for s in self._slices[stage_index]}
        for key, (shape, dtype) in keys.items():
            fqn = next((n for n in by_name if key.startswith(f"state.{n}.")), None)
            if fqn is None:
                continue
            param = by_name[fqn].param
            if tuple(shape) == tuple(param.shape) and len(shape) > 0:
                local = torch.empty(_local(param).shape, dtype=dtype, device=_local(param).device)
                out[key] = (DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                                               shape=param.shape, stride=param.stride())
                            if isinstance(param, DTensor) else local)
            else:
                out[key] = torch.empty(shape, dtype=dtype)
        return out

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, stage_index: int, state: dict[str, Any]) -> None:
        """Take this rank's slice of every parameter-shaped entry of ``state`` (the layout of
        :meth:`optimizer_state`) into ``optimizer``; scalars and hyper-parameters as they are."""
        for s in self._slices[stage_index]:
            prefix = f"state.{s.name}."
            entry = {}
            for key, value in state.items():
                if not key.startswith(prefix):
                    continue
                if isinstance(value, torch.Tensor) and value.dim() > 0 and _local(value).numel() == s.numel:
                    value = _local(value).reshape(-1)[s.start:s.start + s.shard.numel()]
                entry[key[len(prefix):]] = value.clone() if isinstance(value, torch.Tensor) else value
            if entry:
                optimizer.state[s.shard] = entry
            for group in optimizer.param_groups:
                if any(p is s.shard for p in group["params"]):
                    for hyper in group:
                        saved = state.get(f"param_groups.{s.name}.{hyper}")
                        if hyper != "params" and saved is not None:
                            group[hyper] = saved

    def _gathered(self, s: _Slice, value: torch.Tensor) -> torch.Tensor:
        padded = torch.zeros(s.chunk, dtype=value.dtype, device=value.device)
        padded[:value.numel()] = value.reshape(-1)
        out = torch.empty(s.chunk * s.world, dtype=value.dtype, device=value.device)
        dist.all_gather_single(out, padded, group=s.group)
        local = out[:s.numel].view(_local(s.param).shape)
        if isinstance(s.param, DTensor):
            return DTensor.from_local(local, s.param.device_mesh, s.param.placements, run_check=False,
                                      shape=s.param.shape, stride=s.param.stride())
        return local


def _allreduce_flat(grads: list[torch.Tensor], group, world: int) -> None:
    """Average ``grads`` over ``group`` (``world`` ranks) with one all-reduce of their concatenation, in place."""
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat.div_(world)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
