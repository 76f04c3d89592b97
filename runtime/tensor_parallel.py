"""Tensor parallelism on the ``tp`` mesh axis: the runtime's one entry point, for every model.

Every model (the project's presets of every family, a user's ``nn.Module``, a Hugging Face model)
is split by the same code, :mod:`runtime.tensor_parallel_generic`, from the plan's placements:
Linears (and transformers' ``Conv1D``) column- or row-wise, Embeddings by hidden dim or vocabulary,
attention modules by heads. What is family-specific is only the layout of sequence parallelism
(:mod:`runtime.sequence_parallel_gpt`, :mod:`runtime.sequence_parallel_llama`). This module holds
what the trainer, the checks and the checkpoints call:

* :func:`check_tensor_parallel`: refuse, before any process starts, what cannot be split exactly;
* :func:`apply_tensor_parallel`: split one stage in place;
* :func:`reduce_partial_gradients`: bring DTensor gradients to their parameter's placement after
  the step's backward;
* the row order of packed projections (GPT's fused ``qkv``, rows ``[q; k; v]``): a plain
  ``Shard(0)`` of it would give rank 0 all of ``q`` and half of ``k``, so before sharding its rows
  are reordered to ``[q_0; k_0; v_0; q_1; k_1; v_1 …]`` (``_r``: the heads of tp rank ``r``,
  :func:`to_tp_rows`). The stage records those tensors under ``QKV_ATTR`` (``{fqn: tp}``), and
  checkpoints store them in the model's own order (:func:`canonical_from_tp`,
  :mod:`runtime.checkpoint`), so they do not depend on ``tp``.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from planner.models import ModelPreset
from planner.plan import Plan
from runtime.model import StageModule
from runtime.tensor_parallel_generic import (
    QKV_ATTR,
    apply_generic_tensor_parallel,
    canonical_from_tp,
    check_generic_tensor_parallel,
    to_tp_rows,
)

__all__ = ["QKV_ATTR", "apply_tensor_parallel", "canonical_from_tp", "check_tensor_parallel",
           "reduce_partial_gradients", "to_tp_rows"]


def check_tensor_parallel(plan: Plan, preset: ModelPreset) -> None:
    """Refuse, before any process starts, what the runtime cannot split exactly (see the generic path)."""
    check_generic_tensor_parallel(plan, preset)


def apply_tensor_parallel(stage: StageModule, tp_mesh: DeviceMesh, plan: Plan) -> None:
    """Split the modules of ``stage`` that the plan splits over ``tp_mesh`` (in place)."""
    apply_generic_tensor_parallel(stage, tp_mesh, plan)


def reduce_partial_gradients(modules: list[nn.Module]) -> int:
    """Bring every DTensor gradient to its parameter's placement (in place); returns how many changed.

    Run after the whole step's backward. A ``Partial`` gradient (a norm that saw only this rank's
    sequence positions) is a partial sum: after all micro-batches have added theirs, one redistribute
    (an all-reduce over tp) per parameter makes it the full gradient. A ``Replicate`` gradient of a
    sharded parameter (DTensor's backward of a vocabulary-parallel embedding gives one) becomes this
    rank's shard, a local slice with no communication. Either way the optimizer, the dp all-reduce,
    the sum of tied copies across pipeline stages and the gradient norm then see each rank's shard.
    """
    count = 0
    for module in modules:
        for param in module.parameters():
            grad = param.grad
            if isinstance(grad, DTensor) and tuple(grad.placements) != tuple(param.placements):
                param.grad = grad.redistribute(placements=param.placements)
                count += 1
    return count
