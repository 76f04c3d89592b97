"""Megatron-style tensor parallelism for the GPT family on the ``tp`` mesh axis.

Inside every transformer block: ``attn.qkv`` and ``mlp.fc1`` are column-parallel (weight
``Shard(0)``), ``attn.proj`` and ``mlp.fc2`` row-parallel (weight ``Shard(1)``, one all-reduce of the
output), applied with ``parallelize_module``. Embedding, layer norms and the LM head stay replicated.
When ``plan.placements`` is filled (by the intra-op solver) the styles come from it instead: a
Linear weight placed ``Shard(0)`` on the ``tp`` axis is column-parallel, ``Shard(1)`` row-parallel.

The fused ``qkv`` weight stores its rows as ``[q; k; v]``; a plain ``Shard(0)`` of that would give
rank 0 all of ``q`` and half of ``k``. So before sharding, its rows are reordered to
``[q_0; k_0; v_0; q_1; k_1; v_1 …]`` (``_r``: the heads of tp rank ``r``), and the attention's
forward is swapped for one that reads its local ``heads / tp`` heads. Checkpoints store ``qkv`` in the
model's own order (see :func:`canonical_from_tp` and :mod:`runtime.checkpoint`), so they do not
depend on ``tp``.
"""

from __future__ import annotations

import math
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from planner.models import ModelPreset
from planner.plan import Plan
from runtime.errors import RunCheckError
from runtime.model import StageModule

GPT_STYLES = {"attn.qkv": "colwise", "attn.proj": "rowwise", "mlp.fc1": "colwise", "mlp.fc2": "rowwise"}
QKV_ATTR = "_tp_qkv_groups"  # on a StageModule: {fqn: tp} of tensors stored in the tp row order


def check_tensor_parallel(plan: Plan, preset: ModelPreset) -> None:
    """Refuse, before any process starts, what this file cannot shard exactly."""
    tp = plan.parallel.tp
    if tp == 1:
        return
    if preset.family != "gpt":
        raise RunCheckError(f"parallel.tp: tp={tp} for model family {preset.family!r}; the runtime's tensor "
                            "parallelism is written for the 'gpt' family only; re-plan with tp=1")
    if plan.parallel.sequence_parallel:
        raise RunCheckError("parallel.sequence_parallel: true is not implemented by the runtime yet; re-plan "
                            "without --sequence-parallel")
    cfg = preset.config
    hidden, heads = cfg["hidden"], cfg["heads"]
    ffn = cfg.get("ffn_hidden") or 4 * hidden
    for name, value in (("heads", heads), ("ffn_hidden", ffn)):
        if value % tp:
            raise RunCheckError(f"parallel.tp: tp={tp} does not divide the model's {name}={value}; "
                                f"re-plan with a tp that divides it")
    if cfg.get("dropout", 0.1) > 0:
        raise RunCheckError(f"parallel.tp: tp={tp} with dropout={cfg.get('dropout', 0.1)} needs a tensor-parallel "
                            "RNG tracker (Megatron's), which the runtime does not have; use a preset with "
                            "dropout 0 or tp=1")


def tp_styles(plan: Plan) -> dict[str, str]:
    """``{module suffix inside a block: "colwise"|"rowwise"}``, from ``plan.placements`` when present."""
    if not plan.placements:
        return dict(GPT_STYLES)
    styles: dict[str, str] = {}
    for fqn, placement in plan.placements.items():
        if not fqn.endswith(".weight") or ".blocks." not in f".{fqn}":
            continue
        tp_place = _tp_placement(fqn, placement, plan)
        suffix = fqn.split(".", 2)[2].removesuffix(".weight") if fqn.startswith("blocks.") else None
        if suffix is None or tp_place == "Replicate()":
            continue
        style = {"Shard(0)": "colwise", "Shard(1)": "rowwise"}.get(tp_place)
        if style is None:
            raise RunCheckError(f"placements.{fqn}: tp placement {tp_place!r} is not a column (Shard(0)) or row "
                                "(Shard(1)) split of a Linear weight; the runtime applies only those")
        if styles.setdefault(suffix, style) != style:
            raise RunCheckError(f"placements.{fqn}: blocks disagree on {suffix} ({styles[suffix]} vs {style}); "
                                "the runtime applies one style per block position")
    return styles


def _tp_placement(fqn: str, placement: Any, plan: Plan) -> str:
    axes = list(plan.mesh_axes)
    if isinstance(placement, dict) and "tp" in placement:
        return str(placement["tp"])
    if isinstance(placement, (list, tuple)) and len(placement) == len(axes):
        return str(placement[axes.index("tp")])
    raise RunCheckError(f"placements.{fqn}: got {placement!r}; the runtime reads one placement string per mesh "
                        f"axis ({axes}), as a list in axis order or a dict by axis name, e.g. "
                        '["Replicate()", "Replicate()", "Shard(0)"]')


def to_tp_rows(t: torch.Tensor, tp: int) -> torch.Tensor:
    """``[q; k; v]`` rows (dim 0) → ``[q_0; k_0; v_0; q_1; …]`` so that ``Shard(0)`` gives each rank its heads."""
    return t.reshape(3, tp, t.shape[0] // (3 * tp), *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def canonical_from_tp(t: torch.Tensor, tp: int) -> torch.Tensor:
    """Inverse of :func:`to_tp_rows`."""
    return t.reshape(tp, 3, t.shape[0] // (3 * tp), *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def apply_tensor_parallel(stage: StageModule, tp_mesh: DeviceMesh, plan: Plan) -> None:
    """Shard every GPT block of ``stage`` over ``tp_mesh`` (in place)."""
    tp = tp_mesh.size()
    styles = tp_styles(plan)
    groups: dict[str, int] = {}
    for path in stage.layer_paths:
        if not path.startswith("blocks."):
            continue
        block = stage.get_submodule(path)
        plan_map = {}
        for suffix, style in styles.items():
            plan_map[suffix] = ColwiseParallel() if style == "colwise" else RowwiseParallel()
        if styles.get("attn.qkv") == "colwise":
            qkv = block.get_submodule("attn.qkv")
            with torch.no_grad():
                for name, param in qkv.named_parameters():
                    param.copy_(to_tp_rows(param, tp))
                    groups[f"{path}.attn.qkv.{name}"] = tp
            attn = block.get_submodule("attn")
            attn.forward = types.MethodType(_tp_attention_forward, attn)
        elif any(k.startswith("attn.") for k in styles):
            raise RunCheckError("placements: attention projections sharded without a column-parallel qkv; "
                                "the runtime shards attention only as Megatron does (qkv column, proj row)")
        parallelize_module(block, tp_mesh, plan_map)
    setattr(stage, QKV_ATTR, groups)


def _tp_attention_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``CausalSelfAttention.forward`` on the local heads of a column-parallel ``qkv`` (same math)."""
    b, s, _ = x.shape
    q, k, v = self.qkv(x).chunk(3, dim=-1)
    local_heads = q.shape[-1] // self.head_dim
    q = q.reshape(b, s, local_heads, self.head_dim).transpose(1, 2)
    k = k.reshape(b, s, local_heads, self.head_dim).transpose(1, 2)
    v = v.reshape(b, s, local_heads, self.head_dim).transpose(1, 2)
    if self.fused:
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
    else:
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        scores = scores.masked_fill(self.future_mask[:s, :s], float("-inf"))
        y = self.attn_drop(F.softmax(scores, dim=-1)) @ v
    y = y.transpose(1, 2).reshape(b, s, local_heads * self.head_dim)
    return self.resid_drop(self.proj(y))
