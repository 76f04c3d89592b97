"""Activation recomputation, as the plan's ``parallel.recompute`` says.

* ``"none"``: autograd keeps every activation.
* ``"full"``: each layer of a stage runs under ``torch.utils.checkpoint`` (non-reentrant): only the
  layer's input is kept and the layer is re-run in backward (Megatron's full recompute). With
  ``recompute_every = k > 1`` only one layer in ``k`` is: layer ``i`` of the model's layer list when
  ``(i + 1) % k == 0`` (:func:`planner.cost.sharding.recomputes_layer`, the rule the planner priced;
  torchtitan's ``selective_ac_option = k``); the others keep their activations.
* ``"selective"``: only the attention of each transformer block is checkpointed (the part whose
  activations grow with ``seq_len²``), as in Korthikanti et al. 2022; the rest is kept.

Applied after tensor parallelism (it wraps whatever forward TP installed) and before FSDP/DDP.
With sequence parallelism the gather of the sequence sits in ``attn.qkv``'s input hook, inside the
checkpointed forward: selective recompute keeps only the rank's ``s / tp`` shard of the attention's
input and redoes the all-gather in backward (Korthikanti et al.'s pairing of the two).
"""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

from planner.cost.sharding import recomputes_layer
from runtime.errors import RunCheckError
from runtime.model import StageModule


def apply_recompute(stage: StageModule, mode: str, *, every: int = 1, layer_names: tuple[str, ...] = ()) -> int:
    """Set up recomputation on ``stage``; returns how many modules it checkpoints. ``every`` > 1 (full only):
    one layer in ``every``, by its index in ``layer_names`` (the plan's ``model.layer_names``)."""
    if mode == "none":
        return 0
    if mode == "full" and every > 1:
        return _checkpoint_every(stage, every, layer_names)
    if mode == "full":
        stage._checkpoint_layers = True
        return len(stage.layer_paths)
    if mode == "selective":
        count = 0
        for path in stage.layer_paths:
            layer = stage.get_submodule(path)
            attn = getattr(layer, "attn", None)
            if isinstance(attn, nn.Module):
                attn.forward = functools.partial(checkpoint, attn.forward, use_reentrant=False)
                count += 1
        return count
    raise RunCheckError(f"parallel.recompute: got {mode!r}; the runtime knows 'none', 'selective' and 'full'")


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
            layer = stage.get_submodule(path)
            layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
            count += 1
    return count
