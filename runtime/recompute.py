"""Activation recomputation, as the plan's ``parallel.recompute`` says.

* ``"none"``: autograd keeps every activation.
* ``"full"``: each layer of a stage runs under ``torch.utils.checkpoint`` (non-reentrant): only the
  layer's input is kept and the layer is re-run in backward (Megatron's full recompute). With
  ``recompute_every = k > 1`` only one layer in ``k`` is: layer ``i`` of the model's layer list when
  ``(i + 1) % k == 0`` (:func:`planner.cost.sharding.recomputes_layer`, the rule the planner priced;
  torchtitan's ``selective_ac_option = k``); the others keep their activations.
* ``"selective"``: only the attention of each transformer block is checkpointed (the part whose
  activations grow with ``seq_len²``), as in Korthikanti et al. 2022; the rest is kept.
* ``"op"``: each layer runs under ``torch.utils.checkpoint`` with a selective-checkpoint policy
  (``create_selective_checkpoint_contexts``, torchtitan's ``selective_ac_option = "op"``): the outputs of
  the attention kernels, of every other matrix multiply (the layer's 1st, 3rd, ...), of tensor
  parallelism's reduce-scatters and of ``max`` (FP8 scales) are saved; the rest is recomputed. The
  rule is :mod:`planner.trace.saved_ops`, the one the planner priced; the counter restarts at each
  layer call, so the same matrix multiplies are saved every step.

Applied after tensor parallelism (it wraps whatever forward TP installed) and before FSDP/DDP.
With sequence parallelism the gather of the sequence sits in ``attn.qkv``'s input hook, inside the
checkpointed forward: selective recompute keeps only the rank's ``s / tp`` shard of the attention's
input and redoes the all-gather in backward (Korthikanti et al.'s pairing of the two).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from planner.cost.sharding import recomputes_layer
from planner.trace.saved_ops import KEPT_KERNELS, MATMULS, keeps_output
from runtime.errors import RunCheckError
from runtime.model import StageModule


def apply_recompute(stage: StageModule, mode: str, *, every: int = 1, layer_names: tuple[str, ...] = ()) -> int:
    """Set up recomputation on ``stage``; returns how many modules it checkpoints. ``every`` > 1 (full only):
    one layer in ``every``, by its index in ``layer_names`` (the plan's ``model.layer_names``)."""
    if mode == "none":
        return 0
    if mode == "full" and every > 1:
        return _checkpoint_every(stage, every, layer_names)
    if mode == "full" and not stage.is_whole:
        stage._checkpoint_layers = True  # the stage's layer loop checkpoints each call
        return len(stage.layer_paths)
    if mode in ("full", "op"):  # a whole-model stage runs the model's forward: each layer's own is wrapped
        for path in stage.layer_paths:
            checkpoint_forward(stage.get_submodule(path), op=mode == "op")
        return len(stage.layer_paths)
    if mode == "selective":
        attns = [getattr(stage.get_submodule(path), "attn", None) for path in stage.layer_paths]
        for attn in attns:
            if isinstance(attn, nn.Module):
                checkpoint_forward(attn)
        return sum(isinstance(attn, nn.Module) for attn in attns)
    raise RunCheckError(f"parallel.recompute: got {mode!r}; the runtime knows 'none', 'selective', 'op' and 'full'")


def checkpoint_forward(module: nn.Module, *, op: bool = False) -> None:
    """Run ``module``'s forward under non-reentrant ``torch.utils.checkpoint`` from now on (with the per-op
    policy where ``op``); module hooks stay outside the checkpointed region."""
    kwargs = {"context_fn": _op_contexts} if op else {}
    module.forward = functools.partial(checkpoint, module.forward, use_reentrant=False, **kwargs)


def _overloads(names: frozenset[str], namespace: Any) -> frozenset[Any]:
    """The ``.default`` overloads of the ops named ``names`` that this torch build has."""
    return frozenset(getattr(namespace, n).default for n in names if hasattr(namespace, n))


_MATMUL_OPS = _overloads(MATMULS, torch.ops.aten)
# Besides the policy's kernels: tp's reduce-scatters (a sequence-parallel block's closing collective)
# and max (torchao's FP8 scales), as torchtitan saves them; they hold no FLOPs the planner counts.
_SAVED_OPS = (_overloads(KEPT_KERNELS, torch.ops.aten) | _overloads(frozenset({"max"}), torch.ops.aten)
              | _overloads(frozenset({"reduce_scatter_tensor"}), torch.ops._c10d_functional))


def _op_contexts() -> tuple[Any, Any]:
    """The forward and recompute contexts of one checkpointed layer call, sharing one policy whose matrix
    multiply counters (one per pass) start at zero."""
    counts = {False: 0, True: 0}

    def policy(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        if func in _MATMUL_OPS:
            counts[ctx.is_recompute] += 1
            keep = keeps_output(func._overloadpacket.__name__, counts[ctx.is_recompute])
        else:
            keep = func in _SAVED_OPS
        return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def _checkpoint_every(stage: StageModule, every: int, layer_names: tuple[str, ...]) -> int:
    """Checkpoint the forward of each layer of ``stage`` that :func:`recomputes_layer` picks (the layer's own
    forward, so that it holds for a chain, a traced graph and a whole-model stage alike)."""
    index = {name: i for i, name in enumerate(layer_names)}
    count = 0
    for path in stage.layer_paths:
        if path not in index:
            raise RunCheckError(f"parallel.recompute_every: layer {path!r} is not in the plan's model.layer_names; "
                                "re-create the plan")
        if recomputes_layer(index[path], every):
            checkpoint_forward(stage.get_submodule(path))
            count += 1
    return count
