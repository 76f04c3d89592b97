"""Sequence parallelism for the GPT family (Korthikanti et al. 2022), as Megatron-LM lays it out.

Between the tensor-parallel regions the residual stream ``[b, s, h]`` is split along the sequence
(dim 1): every LayerNorm runs ``SequenceParallel()`` on ``s / tp`` positions (whether or not the
plan's placements mark it ``sequence``: the split is all or nothing in a GPT), and the all-reduce of
each row-parallel Linear becomes a reduce-scatter plus an all-gather in the next column-parallel one.
This recipe adjusts the Linear styles :mod:`runtime.tensor_parallel_generic` chose for a layer:

=============================  ====================================================================
module                         torch, with ``sequence_parallel``
=============================  ====================================================================
``ln1``, ``ln2``, ``ln_f``     ``SequenceParallel()`` (the norm's weight gradient is a partial sum,
                               summed over tp after the step: ``reduce_partial_gradients``)
a split pair's column Linear   ``ColwiseParallel(input_layouts=Shard(1))``: all-gathers the sequence
(``attn.qkv``, ``mlp.fc1``)
its row Linear (``attn.proj``, ``RowwiseParallel(output_layouts=Shard(1))``: reduce-scatter onto the
``mlp.fc2``)                   sequence shards; the dropout after it acts on this rank's positions
a whole region (``attn`` or    ``PrepareModuleInputOutput``: gather the sequence in, keep this rank's
``mlp`` not split as a pair)   shard of the output
``head.lm_head``               split column-wise: ``input_layouts=Shard(1)``; otherwise a gather in front
``embed`` (the layer)          ``PrepareModuleOutput``: ``Replicate`` → ``Shard(1)`` (a local slice; its
                               backward all-gathers the gradient)
=============================  ====================================================================

So a block reads and writes its rank's ``[b, s / tp, h]`` shard as a plain tensor (the residual adds
are local), and the head returns full logits: the loss is the single-device loss on every tp rank.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from runtime.errors import RunCheckError
from runtime.tensor_parallel_rng import SplitRegionRNG, fork_dropout

_REGIONS = {"attn": ("qkv", "proj", "resid_drop"), "mlp": ("fc1", "fc2", "drop")}  # region -> col, row, its dropout
_GATHER = {"input_layouts": (Shard(1),), "desired_input_layouts": (Replicate(),)}
_SCATTER = {"output_layouts": (Replicate(),), "desired_output_layouts": (Shard(1),)}


def is_gpt_layer(layer: nn.Module) -> bool:
    from planner.models.gpt import GPTBlock, GPTEmbedding, GPTHead

    return isinstance(layer, (GPTEmbedding, GPTBlock, GPTHead))


def apply_gpt_sequence_parallel(layer: nn.Module, path: str, styles: dict[str, ParallelStyle], tp_mesh: DeviceMesh,
                                rng: SplitRegionRNG) -> dict[str, ParallelStyle]:
    """Lay ``layer`` out for sequence parallelism; returns its Linear styles (``styles``, relative) adjusted.

    The norms, gathers and scatters that are not a Linear's own style are applied here, before the
    caller's ``parallelize_module`` of the returned styles.
    """
    from planner.models.gpt import GPTBlock, GPTEmbedding, GPTHead

    out = dict(styles)
    if isinstance(layer, GPTEmbedding):
        # Whatever split the lookup had, its output is whole here: keep this rank's positions.
        parallelize_module(layer, tp_mesh, PrepareModuleOutput(**_SCATTER, use_local_output=True))
    elif isinstance(layer, GPTBlock):
        for norm in ("ln1", "ln2"):
            parallelize_module(layer.get_submodule(norm), tp_mesh, SequenceParallel())
        for region, (col, row, dropout) in _REGIONS.items():
            col_style, row_style = out.get(f"{region}.{col}"), out.get(f"{region}.{row}")
            if _is_split_pair(col_style, row_style):
                out[f"{region}.{col}"] = ColwiseParallel(input_layouts=Shard(1))
                out[f"{region}.{row}"] = RowwiseParallel(output_layouts=Shard(1))
                fork_dropout(layer.get_submodule(f"{region}.{dropout}"), rng)  # on this rank's positions
            else:  # runs whole (its Linears gathered, if split) on the gathered sequence
                parallelize_module(layer.get_submodule(region), tp_mesh, PrepareModuleInputOutput(
                    **_GATHER, use_local_input=True, **_SCATTER, use_local_output=True))
    elif isinstance(layer, GPTHead):
        parallelize_module(layer.get_submodule("ln_f"), tp_mesh, SequenceParallel())
        style = out.get("lm_head")
        if isinstance(style, ColwiseParallel):
            out["lm_head"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())
        else:
            parallelize_module(layer.get_submodule("lm_head"), tp_mesh,
                               PrepareModuleInput(**_GATHER, use_local_output=True))
    else:
        raise RunCheckError(f"parallel.sequence_parallel: layer {path} ({type(layer).__name__}) is not a GPT "
                            "embedding, block or head, the layers the runtime splits along the sequence in this "
                            "family; re-plan without --sequence-parallel")
    return out


def _is_split_pair(col: ParallelStyle | None, row: ParallelStyle | None) -> bool:
    """Whether the generic path kept ``col`` → ``row`` split between them (Megatron's pair, no gather)."""
    return isinstance(col, ColwiseParallel) and isinstance(row, RowwiseParallel) \
        and not row.input_layouts[0].is_replicate()
