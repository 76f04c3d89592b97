"""Weights on a rank: free the layers it does not run, materialise a meta model shard by shard, load shards.

* :func:`free_other_layers`: after the cut, the layers of other ranks' stages are moved to the meta
  device in the caller's model, so no rank keeps the full model (the caller's ``model`` object still
  names them, without storage).
* :func:`materialize`: a model built on the meta device is parallelized first (tensor-parallel
  DTensors and FSDP2 shards are made on meta too), then ``to_empty`` allocates only this rank's
  shards and ``init_fn`` fills them (default: every submodule's ``reset_parameters``).
* :func:`load_safetensors`: Hugging Face ``*.safetensors`` files are read slice by slice, each rank
  reading only the rows and columns of its shards.
* :func:`resident_parameter_bytes` / :func:`planned_parameter_bytes`: what a rank holds, and what the
  plan says it should hold (its stages' parameters, divided as its tensor-parallel styles and ZeRO
  stage split them), for the materialisation test.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from planner.plan import Plan
from runtime.errors import RunCheckError
from runtime.model import StageModule, stages_of_rank
from runtime.rank_layout import TensorSplits


def is_meta(model: nn.Module) -> bool:
    """Whether the model was built on the meta device (every parameter is a meta tensor)."""
    params = list(model.parameters())
    return bool(params) and all(p.is_meta for p in params)


def free_other_layers(model: nn.Module, plan: Plan, stages: list[StageModule]) -> int:
    """Move the parameters and buffers of every layer this rank does not run to meta; returns how many layers.

    Each tensor gets a meta replacement of its own, so a weight tied to a local layer keeps its storage there.
    """
    if any(stage.is_whole for stage in stages):  # the only stage: every layer is this rank's
        return 0
    mine = {path for stage in stages for path in stage.layer_paths}
    freed = 0
    for name in plan.model.layer_names:
        if name in mine:
            continue
        for module in model.get_submodule(name).modules():
            for key, p in list(module._parameters.items()):
                if p is not None and not p.is_meta:
                    module._parameters[key] = nn.Parameter(torch.empty_like(p, device="meta"),
                                                           requires_grad=p.requires_grad)
            for key, b in list(module._buffers.items()):
                if b is not None and not b.is_meta:
                    module._buffers[key] = torch.empty_like(b, device="meta")
        freed += 1
    return freed


def reset_parameters(module: nn.Module) -> None:
    """The default ``init_fn``: every submodule's own ``reset_parameters`` (what its constructor ran)."""
    for sub in module.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()


def materialize(stages: list[StageModule], device: torch.device, init_fn: Callable[[nn.Module], None] | None
                ) -> None:
    """Allocate this rank's shards of meta ``stages`` on ``device`` and initialise them with ``init_fn``.

    Buffers computed in a constructor (a rotary table) are lost on meta, and checkpoints do not hold the
    non-persistent ones: ``init_fn`` must recompute them (a Hugging Face model's ``_init_weights`` does),
    also when a checkpoint is loaded afterwards."""
    for stage in stages:
        stage.to_empty(device=device)
        with torch.no_grad():
            (init_fn or reset_parameters)(stage)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def load_safetensors(folder: Path, stages: list[StageModule]) -> int:
    """Copy each local shard's slice out of the ``*.safetensors`` files in ``folder``; returns the tensors read.

    A parameter missing from the files (Hugging Face leaves out a weight tied to another) is read under
    the name of the weight it is tied to."""
    from safetensors import safe_open
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    where: dict[str, Path] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as handle:
            where.update({key: f for key in handle.keys()})
    count = 0
    for stage in stages:
        aliases = _tied_aliases(stage)
        for name, tensor in [*stage.named_parameters(remove_duplicate=False), *stage.named_buffers()]:
            key = name if name in where else next((a for a in aliases.get(name, ()) if a in where), None)
            if key is None:
                if name in dict(stage.named_buffers()):
                    continue  # a non-persistent buffer (rotary tables) is not saved
                raise RunCheckError(f"checkpoint {folder}: no tensor {name!r} in its safetensors files; they hold "
                                    "another model's weights")
            if isinstance(tensor, DTensor):
                shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh,
                                                                      tensor.placements)
            else:
                shape, offset = tuple(tensor.shape), (0,) * tensor.dim()
            with safe_open(str(where[key]), framework="pt") as handle:
                sliced = handle.get_slice(key)
                full = tuple(sliced.get_shape())
                if full != tuple(tensor.shape):
                    raise RunCheckError(f"checkpoint {folder}: {key} has shape {list(full)}, the model's {name} "
                                        f"{list(tensor.shape)}; the files hold another model's weights")
                part = sliced[tuple(slice(o, o + n) for o, n in zip(offset, shape))] if tensor.dim() else \
                    handle.get_tensor(key)
            with torch.no_grad():
                _local(tensor).copy_(part)
            count += 1
    return count


def _tied_aliases(stage: nn.Module) -> dict[str, list[str]]:
    by_id: dict[int, list[str]] = {}
    for name, p in stage.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {n: [m for m in names if m != n] for names in by_id.values() for n in names}


def resident_parameter_bytes(modules: list[nn.Module]) -> int:
    """Bytes of the storages behind the parameters of ``modules`` on this rank (each storage counted once)."""
    seen: dict[int, int] = {}
    for module in modules:
        for p in module.parameters():
            storage = _local(p).untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def planned_parameter_bytes(plan: Plan, model: nn.Module, rank: int) -> int:
    """Parameter bytes the plan puts on ``rank``: its stages' parameters of the full ``model`` (meta is fine),
    each divided by tp where the plan's styles split it and over dp (padded to equal shards, as FSDP2
    allocates) when the plan shards parameters (ZeRO-3)."""
    par = plan.parallel
    splits = TensorSplits.from_plan(plan)
    # A tied parameter is counted once, split as the module that splits it says (BERT's decoder bias, also held
    # whole by its parent ``cls.predictions``: runtime.tensor_parallel_tied), also when two of the rank's stages
    # hold it (a V-shaped schedule's embedding and tied head: one parameter on the rank).
    held: dict[int, tuple[torch.Tensor, int | None]] = {}
    for stage in stages_of_rank(plan, rank):
        for layer in stage.layer_names:
            for mname, module in model.get_submodule(layer).named_modules(prefix=layer, remove_duplicate=False):
                for pname, p in module.named_parameters(recurse=False):
                    dim = _split_dim(module, pname, splits.style_of(mname)) if par.tp > 1 else None
                    if held.get(id(p), (p, None))[1] is None:
                        held[id(p)] = (p, dim)
    total = 0
    for p, dim in held.values():
        shape = list(p.shape)
        if dim is not None:
            shape[dim] //= par.tp
        if par.zero_stage >= 3 and shape:  # FSDP2; ZeRO-1/2 keep the parameters whole
            shape[0] = math.ceil(shape[0] / par.dp)
        total += math.prod(shape) * p.element_size()
    return total


def _split_dim(module: nn.Module, param: str, style: str) -> int | None:
    """The dim of ``module.<param>`` that the generic tensor-parallel path splits for ``style`` (None: whole)."""
    from runtime.tensor_parallel_tied import param_split_dim

    return param_split_dim(module, param, style)
