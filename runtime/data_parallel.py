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
1, 2       optimizer state (1), and gradients (2)       ``fully_shard(reshard_after_forward=False)``:
                                                        parameters stay gathered from forward to
                                                        backward, gradients are reduce-scattered, so
                                                        ZeRO-1 runs as ZeRO-2 (FSDP2 has no mode that
                                                        all-reduces gradients and shards only Adam's
                                                        state; memory is at most what ZeRO-1 plans)
3          parameters too                               ``fully_shard(reshard_after_forward=True)``:
                                                        parameters are re-gathered for backward
=========  ===========================================  ==========================================

FSDP2 wraps every layer of a stage and then the stage itself (torchtitan's order), so one layer's
parameters are gathered at a time. Every mode averages gradients over dp, so the update equals
single-process training on the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from runtime.model import StageModule


@dataclass(frozen=True)
class DataParallelMode:
    kind: str  # "none" | "ddp" | "allreduce" | "fsdp"
    reshard_after_forward: bool = False

    @staticmethod
    def for_plan(dp: int, tp: int, pp: int, zero_stage: int) -> DataParallelMode:
        if zero_stage >= 1:
            # Even with dp == 1: the plan asked for FSDP's memory layout, and FSDP on one rank is exact.
            return DataParallelMode("fsdp", reshard_after_forward=zero_stage == 3)
        if dp == 1:
            return DataParallelMode("none")
        return DataParallelMode("ddp" if tp == 1 and pp == 1 else "allreduce")

    def describe(self) -> str:
        return {
            "none": "no data parallelism",
            "ddp": "DDP (bucketed gradient all-reduce during backward)",
            "allreduce": "flat gradient all-reduce after the pipeline flush",
            "fsdp": f"FSDP2 fully_shard(reshard_after_forward={self.reshard_after_forward})",
        }[self.kind]


def apply_data_parallel(stage: StageModule, mode: DataParallelMode, dp_mesh: DeviceMesh,
                        device: torch.device) -> nn.Module:
    """Wrap ``stage``; returns the module the pipeline stage / training loop calls."""
    if mode.kind in ("none", "allreduce"):
        return stage
    if mode.kind == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(stage, device_ids=ids, process_group=dp_mesh.get_group())
    for group in _layer_groups(stage):
        fully_shard(group if len(group) > 1 else group[0], mesh=dp_mesh,
                    reshard_after_forward=mode.reshard_after_forward)
    fully_shard(stage, mesh=dp_mesh, reshard_after_forward=mode.reshard_after_forward)
    return stage


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
    grads = [_local(p.grad) for module in modules for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat.div_(dist.get_world_size(group))
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t
