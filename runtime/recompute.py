"""Activation recomputation, as the plan's ``parallel.recompute`` says.

* ``"none"``: autograd keeps every activation.
* ``"full"``: each layer of a stage runs under ``torch.utils.checkpoint`` (non-reentrant): only the
  layer's input is kept and the layer is re-run in backward (Megatron's full recompute).
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

from runtime.errors import RunCheckError
from runtime.model import StageModule


def apply_recompute(stage: StageModule, mode: str) -> int:
    """Set up recomputation on ``stage``; returns how many modules it checkpoints."""
    if mode == "none":
        return 0
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
