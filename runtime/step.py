"""One training step on one rank: what the rank built, forward and backward, the gradient reductions, the loss.

:func:`runtime.train.train` (the presets) and :func:`runtime.parallelize.parallelize` (a user's own model
and loop) build a rank differently but run its step with the same code, which lives here:

* :class:`RankState`: everything one rank built from the plan (its stages, how they are wrapped, the
  schedule, the data-parallel mode, the ZeRO-1/2 optimizer shards, the tied-weight groups);
* :func:`forward_backward`: the plan's micro-batches through the pipeline schedule, or accumulated
  by hand when ``pp == 1``;
* :func:`reduce_gradients`: after the backward, in this order: DTensor gradients to their
  parameters' placements (tp), the flat dp all-reduce, the sum of tied copies across pipeline ranks,
  the ZeRO-1/2 reduction into each rank's optimizer slice;
* :func:`global_loss` and :func:`global_grad_norm`: numbers that are the same on every rank;
* :func:`tied_groups`: the process groups that sum a tied weight's copies on different ranks;
* small helpers both loops need: :func:`rank_device`, :func:`plan_autocast`,
  :func:`verified_manifest`, :func:`peak_memory`, :func:`state_bytes`.
"""

from __future__ import annotations

import contextlib
import os
import resource
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from planner.plan import Plan
from runtime import checkpoint as ckpt
from runtime.data import Inputs, input_tuple, micro_batches
from runtime.data_parallel import DataParallelMode, OptimizerShards, allreduce_gradients, hsdp_counted
from runtime.expert_parallel import counted_in_norm, reduce_expert_gradients
from runtime.model import StageModule, TiedParameter
from runtime.rank_layout import RankLayout
from runtime.tensor_parallel import reduce_partial_gradients


@dataclass
class TiedGroup:
    """Gradient sum of one tied parameter between the ranks of two stages (Megatron's embedding group).

    Only for copies on different ranks: two stages of one rank share one ``Parameter``, whose gradient
    already sums both uses (:func:`runtime.tensor_parallel_tied.share_across_stages`)."""

    names: dict[int, str]  # stage index -> parameter name in that stage
    group: Any  # this rank's process group of the copies (None: this rank holds none)
    owner: int = -1  # global rank in ``group`` holding the first stage's copy (the embedding's)

    def _local_copies(self, stages: list[StageModule]) -> list[nn.Parameter]:
        """This rank's copies, each once (the same Parameter in two local stages is one copy)."""
        out: dict[int, nn.Parameter] = {}
        for stage in stages:
            name = self.names.get(stage.stage_index)
            if name is not None and self.group is not None:
                param = stage.get_parameter(name)
                out.setdefault(id(param), param)
        return list(out.values())

    def copy_from_owner(self, stages: list[StageModule]) -> None:
        """Make every copy the first stage's: weights each rank initialised on its own (a model built on
        meta) would otherwise stay different copies of one weight, their gradients summed but never equal."""
        for param in self._local_copies(stages):
            with torch.no_grad():
                dist.broadcast(param._local_tensor if isinstance(param, DTensor) else param.data, src=self.owner,
                               group=self.group)

    def sync(self, stages: list[StageModule]) -> None:
        for param in self._local_copies(stages):
            grad = param.grad
            dist.all_reduce(grad._local_tensor if isinstance(grad, DTensor) else grad, group=self.group)


@dataclass
class RankState:
    """Everything one rank built from the plan."""

    stages: list[StageModule]  # this rank's stages, in model order (the modules checkpoints see)
    wrapped: list[nn.Module]  # the same, as DDP/FSDP wrapped them (what forward calls)
    optimizers: list[torch.optim.Optimizer]  # runtime.train: one AdamW per stage; parallelize: the caller's
    dp_mode: DataParallelMode
    tied_groups: list[TiedGroup]
    duplicate_names: set[str]  # second names of tied weights: their gradient is counted once
    loss_fn: Any
    autocast: Any
    zero: OptimizerShards | None = None  # ZeRO-1/2: this rank's slice of every parameter, for the optimizer
    schedule: Any = None  # the pipeline schedule when pp > 1
    shared: list[nn.Parameter] = field(default_factory=list)  # in two local pipeline stages: scaled once here
    holds_first: bool = True
    last_holder: bool = True
    num_inputs: int = 1  # tensors the model takes (T5: 2)
    tied_names: tuple[tuple[str, ...], ...] = ()  # every tied weight's names (a checkpoint may hold one of them)
    input_names: tuple[str, ...] | None = None  # non-chain models: every stage takes the inputs by name
    setup: dict[str, str] = field(default_factory=dict)

    def optimizer_parameters(self, stage: StageModule) -> list[nn.Parameter]:
        """What an optimizer of ``stage`` updates: its ZeRO slices, else its parameters (a parameter shared
        with an earlier local stage is left to that stage's optimizer, so it is updated once)."""
        position = self.stages.index(stage)
        if self.zero is not None:
            return self.zero.parameters(position)
        earlier = {id(p) for s in self.stages[:position] for p in s.parameters()}
        return [p for p in stage.parameters() if id(p) not in earlier]


def rank_device() -> torch.device:
    """This rank's device: GPU ``LOCAL_RANK`` when there are GPUs, else the CPU."""
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def plan_autocast(plan: Plan, device: torch.device):
    """bf16 autocast on GPUs for a bf16 plan; fp32 on the CPU (the plan's dtype is a GPU setting)."""
    if device.type == "cuda" and plan.model.dtype == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def forward_backward(r: RankState, plan: Plan, inputs: Inputs, targets: torch.Tensor) -> torch.Tensor | None:
    """One step's forward and backward over all micro-batches; the mean micro-batch loss where it is known.

    A chain's first stage takes the inputs positionally; a non-chain model's stages all take them by name
    (``runtime.layer_graph``): T5's decoder stages read the decoder tokens, not only what the encoder sent."""
    with r.autocast:
        if r.schedule is None:
            return _accumulate(r.wrapped[0], inputs, targets, plan.parallel.num_micro_batches, r.loss_fn,
                               r.dp_mode, r.input_names)
        mb_losses: list[torch.Tensor] = []
        if r.input_names is not None:
            args, kwargs = (), dict(zip(r.input_names, input_tuple(inputs)))
        else:
            args, kwargs = ((inputs,) if r.holds_first else ()), {}
        r.schedule.step(*args, target=targets if r.last_holder else None,
                        losses=mb_losses if r.last_holder else None, return_outputs=False, **kwargs)
        for param in r.shared:  # each stage left it unscaled (scale_shared_once): the mean over micro-batches
            if param.grad is not None:
                param.grad.div_(plan.parallel.num_micro_batches)
    return torch.stack([x.detach().float() for x in mb_losses]).mean() if r.last_holder else None


def scale_shared_once(pipeline_stages: list[Any]) -> list[nn.Parameter]:
    """Parameters that two of this rank's ``PipelineStage`` objects share (a tied embedding and LM head under a
    V-shaped schedule); returns them, after making each stage's ``scale_grads`` leave them alone.

    torch's schedules divide every gradient of a stage by the number of micro-batches after that stage's last
    backward. A shared parameter would be divided once per stage, the first time while the other stage is still
    adding its micro-batches' gradients; :func:`forward_backward` divides it once, after the whole schedule."""
    counts: dict[int, int] = {}
    params: dict[int, nn.Parameter] = {}
    for stage in pipeline_stages:
        for p in stage.submod.parameters():
            counts[id(p)] = counts.get(id(p), 0) + 1
            params[id(p)] = p
    shared = {i for i, n in counts.items() if n > 1}
    if not shared:
        return []

    def scaler(stage: Any):
        def scale_grads(grad_scale_factor: int) -> None:
            if grad_scale_factor != 1:
                for p in stage.submod.parameters():
                    if p.grad is not None and id(p) not in shared:
                        p.grad.div_(grad_scale_factor)
        return scale_grads

    for stage in pipeline_stages:
        stage.scale_grads = scaler(stage)
    return [params[i] for i in shared]


def _accumulate(module: nn.Module, inputs: Inputs, targets: torch.Tensor, m: int, loss_fn,
                mode: DataParallelMode, input_names: tuple[str, ...] | None) -> torch.Tensor:
    """pp == 1: ``m`` micro-batches, gradients summed as the mean over all of them."""
    total = torch.zeros((), device=targets.device)
    for i, (xs, y) in enumerate(zip(micro_batches(inputs, m), targets.chunk(m))):
        last = i == m - 1
        sync = module.no_sync() if (mode.kind == "ddp" and not last) else contextlib.nullcontext()
        with sync:
            out = module(**dict(zip(input_names, xs))) if input_names is not None else module(*xs)
            loss = loss_fn(out, y)
            (loss / m).backward()
        total += loss.detach().float()
    return total / m


def reduce_gradients(r: RankState, plan: Plan, dp_mesh) -> None:
    """After :func:`forward_backward`: every gradient as one process on the global batch would have it.

    tp first (DTensor gradients to their parameters' placements), then the flat dp all-reduce (modes
    without DDP or FSDP), the sum of tied copies on different pipeline ranks, and last the ZeRO-1/2
    reduction (the full gradients averaged over dp; each rank's slice handed to its optimizer)."""
    if plan.parallel.tp > 1:
        reduce_partial_gradients(r.stages)
    if r.dp_mode.kind == "allreduce":
        allreduce_gradients(r.stages, dp_mesh)  # expert shards left out: summed over their replicas below
    if plan.parallel.ep > 1:
        reduce_expert_gradients(r.stages)
    for group in r.tied_groups:
        group.sync(r.stages)
    if r.zero is not None:
        r.zero.reduce_gradients()


def global_loss(local: torch.Tensor | None, contributes: bool, dp: int, device: torch.device) -> float:
    """The global batch's mean loss on every rank: the last stage's tp-0 ranks contribute their dp share."""
    value = torch.zeros((), dtype=torch.float64, device=device)
    if contributes and local is not None:
        value += local.double() / dp
    dist.all_reduce(value)
    return float(value)


def global_grad_norm(stages: list[StageModule], coords: dict[str, int], *, skip: set[str], device: torch.device,
                     zero: OptimizerShards | None = None) -> float:
    """L2 norm of the whole model's gradient, each element counted once across all ranks.

    A gradient replicated over an axis (a plain tensor over dp after the all-reduce, a layer norm over
    tp, a DTensor placed ``Replicate()``) is counted on that axis's coordinate 0 only; a sharded one
    (FSDP over dp, TP over tp, a ZeRO-2 slice over dp) is counted on every coordinate. A parameter in
    two local stages is counted once.
    """
    total = torch.zeros((), dtype=torch.float64, device=device)
    seen: set[int] = set()
    for stage in stages:
        for name, param in stage.named_parameters():
            if name in skip or id(param) in seen:
                continue
            seen.add(id(param))
            grad, dp_sharded = param.grad, False
            if grad is None and zero is not None:
                grad, dp_sharded = zero.gradient_slice(param), True
            if grad is None:
                continue
            sharded_axes: set[str] = {"dp", "cp"} if dp_sharded else set()  # ZeRO slices span dp x cp
            if (expert := counted_in_norm(param)) is not None:  # an expert shard: once, in the first ep group
                if not expert:
                    continue
                sharded_axes.add("dp")
            if isinstance(param, DTensor):
                names = param.device_mesh.mesh_dim_names or ()
                placements = grad.placements if isinstance(grad, DTensor) else param.placements
                # a flattened axis ("dp_cp": FSDP over dp x cp) is sharded over each axis it joins
                sharded_axes |= {a for n, pl in zip(names, placements) if not pl.is_replicate() for a in n.split("_")}
                if (first := hsdp_counted(param)) is not None:  # HSDP: the first replica's shards, once
                    if not first:
                        continue
                    sharded_axes |= {"dp", "cp"}
            if isinstance(grad, DTensor):
                grad = grad._local_tensor
            if all(coords.get(axis, 0) == 0 for axis in ("dp", "cp", "tp") if axis not in sharded_axes):
                total += grad.double().pow(2).sum()
    dist.all_reduce(total)
    return float(total.sqrt())


def tied_groups(tied: list[TiedParameter], plan: Plan, layout: RankLayout, timeout_s: float) -> list[TiedGroup]:
    """One :class:`TiedGroup` per tied parameter whose copies sit on different pipeline positions.

    Copies on one position are one ``Parameter`` of that rank and need no group. Every rank creates
    every group (``new_group`` is collective), in the same order."""
    groups = []
    rank = dist.get_rank()
    pos = {s.index: layout.position_of(tuple(s.ranks)) for s in plan.stages}
    for t in tied:
        names = dict(zip(t.stages, t.names))
        positions = sorted({pos[s] for s in names})
        if len(positions) < 2:
            continue
        mine, owner = None, -1
        for d in range(layout.dp):
            for cp_i in range(layout.cp):  # each cp rank's copies: its own tokens' gradient
                for tp_i in range(layout.tp):
                    ranks = [layout.rank_of(p, d, tp_i, cp_i) for p in positions]
                    g = dist.new_group(ranks, timeout=timedelta(seconds=timeout_s))
                    if rank in ranks:
                        mine, owner = g, layout.rank_of(pos[min(names)], d, tp_i, cp_i)
        groups.append(TiedGroup(names=names, group=mine, owner=owner))
    return groups


def verified_manifest(path) -> dict[str, Any]:
    """Collective: rank 0 verifies a checkpoint's files (:func:`runtime.checkpoint.verify_checkpoint`) and
    every rank gets its manifest, or raises the same error if they are bad."""
    result: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            result[0] = ckpt.verify_checkpoint(path)
        except ckpt.CheckpointError as exc:
            result[0] = exc
    dist.broadcast_object_list(result, src=0)
    if isinstance(result[0], Exception):
        raise result[0]
    return result[0]


def peak_memory(device: torch.device) -> tuple[int, str]:
    """The process's peak memory and what it measures (CUDA's allocator peak, or the CPU's peak RSS)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda max_memory_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "cpu peak RSS (whole process)"


def state_bytes(stages: list[StageModule], optimizers: list[torch.optim.Optimizer],
                zero: OptimizerShards | None = None) -> int:
    """Bytes of this rank's parameters, gradients and optimizer state (local shards, each tensor once).

    Gradients are counted as planned, whether or not the last ``zero_grad`` freed them: one per parameter
    with its layout, or one per ZeRO-2 slice."""
    def local_bytes(t: torch.Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    total, seen = 0, set()
    for stage in stages:
        for p in stage.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += local_bytes(p)
            total += zero.gradient_bytes(p) if zero is not None else local_bytes(p)
    for optim in optimizers:
        for state in optim.state.values():
            total += sum(local_bytes(v) for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    return total
