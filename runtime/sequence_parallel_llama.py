"""Sequence parallelism for the Llama family (dense and Mixtral), as torchtitan lays it out.

Korthikanti et al. 2022: between the tensor-parallel regions the residual stream ``[b, s, h]`` is
split along the sequence, so each tp rank holds ``[b, s / tp, h]``, runs the RMSNorms on its
positions only and keeps ``1 / tp`` of their activations. Each region gathers the sequence on entry
and scatters it on exit, where tensor parallelism alone would all-reduce:

=============================  ====================================================================
module                         torch, with ``sequence_parallel``
=============================  ====================================================================
``attn_norm``, ``ffn_norm``,   ``SequenceParallel()``: the norm on this rank's positions (its weight
the head's ``norm``            gradient is a partial sum, summed over tp after the step)
``attn``, ``ffn``              ``PrepareModuleInput``: all-gather the sequence; inside, the plan's
                               splits as without sequence parallelism
their last Linear (``o``,      planned ``rowwise``: ``output_layouts=Shard(1)``, a reduce-scatter onto
``down``)                      the sequence shards instead of the all-reduce; otherwise (whole, or a
                               Mixtral expert layer) ``PrepareModuleOutput`` keeps this rank's positions
``embed`` (the layer)          ``PrepareModuleOutput``: keep this rank's positions of the lookup
``head.lm_head``               ``PrepareModuleInput``: all-gather the sequence, then its plan style
=============================  ====================================================================

Every op between those regions (the residual adds) acts on each position alone, and rotary
positions, the causal mask and Mixtral's routing capacity are computed inside the regions on the
whole gathered sequence, so the run equals tensor parallelism without it, as the equivalence tests
check (tests/runtime/test_runtime_planner_plans.py). Stages exchange the shard.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from runtime.errors import RunCheckError

_GATHER = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True)
_KEEP_MINE = PrepareModuleOutput(output_layouts=(Replicate(),), desired_output_layouts=(Shard(1),),
                                 use_local_output=True)
_REGIONS = {"attn": "o", "ffn": "down"}  # a block's tensor-parallel region -> the Linear that ends it


def apply_llama_sequence_parallel(layer: nn.Module, path: str, styles: dict[str, ParallelStyle],
                                  tp_mesh: DeviceMesh) -> dict[str, ParallelStyle]:
    """Lay ``layer`` out for sequence parallelism; returns its Linear styles (``styles``, relative) adjusted.

    The gathers and scatters that are not a Linear's own style are applied here, before the caller's
    ``parallelize_module`` of the returned styles, so that a gather runs ahead of its Linear's hooks.
    """
    from planner.models.llama import LlamaBlock, LlamaEmbedding, LlamaHead

    out = dict(styles)
    if isinstance(layer, LlamaEmbedding):
        parallelize_module(layer, tp_mesh, _KEEP_MINE)
    elif isinstance(layer, LlamaBlock):
        for norm in ("attn_norm", "ffn_norm"):
            parallelize_module(layer.get_submodule(norm), tp_mesh, SequenceParallel(use_local_output=True))
        for region, last in _REGIONS.items():
            module = layer.get_submodule(region)
            parallelize_module(module, tp_mesh, _GATHER)
            name = f"{region}.{last}"
            style = out.get(name)
            if isinstance(style, RowwiseParallel) and hasattr(module, last):
                out[name] = RowwiseParallel(input_layouts=style.input_layouts[0], output_layouts=Shard(1))
            else:
                parallelize_module(module, tp_mesh, _KEEP_MINE)
    elif isinstance(layer, LlamaHead):
        parallelize_module(layer.get_submodule("norm"), tp_mesh, SequenceParallel(use_local_output=True))
        parallelize_module(layer.get_submodule("lm_head"), tp_mesh, _GATHER)
    else:
        raise RunCheckError(f"parallel.sequence_parallel: layer {path} ({type(layer).__name__}) is not a Llama "
                            "embedding, block or head, the layers the runtime splits along the sequence in this "
                            "family; re-plan without --sequence-parallel")
    return out
