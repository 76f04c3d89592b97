"""Tensor parallelism on the ``tp`` mesh axis, module by module as the plan says (GPT family).

Which module is split how comes from ``plan.placements["style"]`` (written by the planner's intra-op
solver, format ``intra_op_sharding/1``: ``{module fqn: style}``); a plan without placements gets
Megatron's recipe: in every block ``attn.qkv`` and ``mlp.fc1`` column-parallel, ``attn.proj`` and
``mlp.fc2`` row-parallel, everything else replicated. Styles become ``parallelize_module`` entries:

=============  ===========================  ==================================================
style          module                       torch
=============  ===========================  ==================================================
``colwise``    Linear in a block            ``ColwiseParallel()``, feeding the block's
                                            row-parallel partner (qkv → proj, fc1 → fc2)
``rowwise``    Linear in a block            ``RowwiseParallel()`` (one all-reduce)
``colwise``    Linear outside a block       ``ColwiseParallel(output_layouts=Replicate())``
               (the LM head)                (logits split by vocabulary, then gathered)
``colwise``    Embedding                    ``ColwiseParallel(output_layouts=Replicate())``
                                            (hidden dim split, then gathered)
``vocab``      Embedding                    ``RowwiseParallel(input_layouts=Replicate())``
                                            (vocab-parallel lookup, one all-reduce)
``replicate``  any                          nothing
``sequence``   LayerNorm                    ``SequenceParallel()`` (needs ``sequence_parallel``)
=============  ===========================  ==================================================

Sequence parallelism (``parallel.sequence_parallel: true``, Korthikanti et al. 2022) keeps the
residual stream between the tensor-parallel regions split along the sequence (dim 1): every LayerNorm
runs ``SequenceParallel()`` on ``s / tp`` positions (whether or not the plan's placements mark it
``sequence``: the split is all or nothing in a GPT), and each all-reduce of a row-parallel layer
becomes a reduce-scatter plus an all-gather in the next column-parallel one:

=============  ===========================  ==================================================
style          module                       torch, with ``sequence_parallel``
=============  ===========================  ==================================================
``colwise``    Linear in a block            ``ColwiseParallel(input_layouts=Shard(1))``
                                            (all-gathers the sequence)
``rowwise``    Linear in a block            ``RowwiseParallel(output_layouts=Shard(1))``
                                            (reduce-scatter onto the sequence shards)
``replicate``  attn / mlp pair of a block   ``PrepareModuleInputOutput``: gather the sequence
                                            in, keep this rank's shard of the output
``colwise``    LM head                      ``ColwiseParallel(input_layouts=Shard(1),
                                            output_layouts=Replicate())``
``replicate``  LM head                      ``PrepareModuleInput``: gather the sequence
any            the embedding layer          as above, then ``PrepareModuleOutput``:
                                            ``Replicate`` → ``Shard(1)`` (a local slice; its
                                            backward all-gathers the gradient)
=============  ===========================  ==================================================

So a block reads and writes its rank's ``[b, s / tp, h]`` shard as a plain tensor (the residual adds
are local), and the head returns full logits: the loss is the single-device loss on every tp rank.
A LayerNorm on a shard gives only its positions' share of its weight gradient (DTensor marks it
``Partial``); :func:`reduce_partial_gradients` sums those over tp once per step, after the last
micro-batch (Megatron's all-reduce of the sequence-parallel LayerNorm gradients).
Dropout draws the same mask on every tp rank where they hold the same values and a rank's own mask
where they differ (attention probabilities of its heads; under SP, a block's output dropouts on its
positions): see :mod:`runtime.tensor_parallel_rng`.

The fused ``qkv`` weight stores its rows as ``[q; k; v]``; a plain ``Shard(0)`` of that would give
rank 0 all of ``q`` and half of ``k``. So before sharding, its rows are reordered to
``[q_0; k_0; v_0; q_1; k_1; v_1 …]`` (``_r``: the heads of tp rank ``r``), and the attention's
forward is swapped for one that reads its local ``heads / tp`` heads. Checkpoints store ``qkv`` in the
model's own order (see :func:`canonical_from_tp` and :mod:`runtime.checkpoint`), so they do not
depend on ``tp``.
"""

from __future__ import annotations

import contextlib
import math
import types

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
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

from planner.models import ModelPreset
from planner.models.gpt import GPTBlock, GPTEmbedding, GPTHead
from planner.plan import Plan
from runtime.errors import RunCheckError
from runtime.model import StageModule
from runtime.tensor_parallel_rng import SplitRegionRNG, fork_dropout
from runtime.tensor_parallel_tied import check_tied_splits, retie, tied_uses

GPT_BLOCK_STYLES = {"attn.qkv": "colwise", "attn.proj": "rowwise", "mlp.fc1": "colwise", "mlp.fc2": "rowwise"}
_PAIRS = (("attn.qkv", "attn.proj"), ("mlp.fc1", "mlp.fc2"))  # column-parallel -> its row-parallel partner
_OUTPUT_DROPOUT = {"attn.proj": "attn.resid_drop", "mlp.fc2": "mlp.drop"}  # the dropout after each row-parallel one
_BLOCK_NORMS = ("ln1", "ln2")  # the LayerNorms of a GPT block: "sequence" is the one split they take
QKV_ATTR = "_tp_qkv_groups"  # on a StageModule: {fqn: tp} of tensors stored in the tp row order
PLACEMENTS_SCHEMA = "intra_op_sharding/1"


def check_tensor_parallel(plan: Plan, preset: ModelPreset) -> None:
    """Refuse, before any process starts, what this file cannot shard exactly."""
    tp = plan.parallel.tp
    if tp == 1:
        return
    if preset.family != "gpt":  # other families: any Linear, as the plan says (runtime/tensor_parallel_generic.py)
        from runtime.tensor_parallel_generic import check_generic_tensor_parallel

        return check_generic_tensor_parallel(plan, preset)
    cfg = preset.config
    seq_len = plan.model.seq_len or cfg.get("seq_len", 2048)  # GPTConfig's default when the plan has none
    if plan.parallel.sequence_parallel and seq_len % tp:
        raise RunCheckError(f"parallel.sequence_parallel: tp={tp} does not divide the sequence length "
                            f"model.seq_len={seq_len}, which sequence parallelism splits; re-plan with a tp "
                            "that divides it or without --sequence-parallel")
    hidden, heads = cfg["hidden"], cfg["heads"]
    ffn = cfg.get("ffn_hidden") or 4 * hidden
    for name, value in (("heads", heads), ("ffn_hidden", ffn), ("hidden", hidden),
                        ("vocab_size", cfg.get("vocab_size", 51200))):
        if value % tp:
            raise RunCheckError(f"parallel.tp: tp={tp} does not divide the model's {name}={value}; "
                                f"re-plan with a tp that divides it")
    check_tied_splits(preset.build(device="meta"), tp_styles(plan))


def tp_styles(plan: Plan) -> dict[str, str]:
    """``{module fqn: style}`` for every module the plan splits on tp (see the module docstring)."""
    if not plan.placements:
        return {f"{layer}.{suffix}": style for layer in plan.model.layer_names if layer.startswith("blocks.")
                for suffix, style in GPT_BLOCK_STYLES.items()}
    styles = plan.placements.get("style")
    schema = plan.placements.get("schema", PLACEMENTS_SCHEMA)
    if schema != PLACEMENTS_SCHEMA or not isinstance(styles, dict):
        raise RunCheckError(f"placements: schema {schema!r} without a 'style' table is not readable by the runtime, "
                            f"which reads {PLACEMENTS_SCHEMA} ({{'style': {{module: style}}}}); re-create the plan")
    out = {m: s for m, s in styles.items() if s != "replicate"}
    for module, style in out.items():
        if style == "sequence" and not plan.parallel.sequence_parallel:
            raise RunCheckError(f"placements.style.{module}: 'sequence' splits a norm on the sequence, but "
                                "parallel.sequence_parallel is false; re-plan with --sequence-parallel, or mark "
                                "the module 'replicate'")
        if style not in ("colwise", "rowwise", "vocab", "sequence"):
            raise RunCheckError(f"placements.style.{module}: unknown style {style!r}; the runtime applies colwise, "
                                "rowwise, vocab, sequence and replicate")
    _check_pairs(out)
    return out


def _check_pairs(styles: dict[str, str]) -> None:
    """Inside a block the only splits are Megatron's pairs: column-parallel then its row-parallel partner."""
    blocks = {".".join(m.split(".")[:2]) for m in styles if m.startswith("blocks.")}  # blocks.3.ln1 -> blocks.3
    for block in blocks:
        for col, row in _PAIRS:
            pair = (styles.get(f"{block}.{col}", "replicate"), styles.get(f"{block}.{row}", "replicate"))
            if pair not in (("colwise", "rowwise"), ("replicate", "replicate")):
                raise RunCheckError(f"placements.style: {block}.{col} / {block}.{row} are {pair[0]} / {pair[1]}; "
                                    "the runtime splits a block only as Megatron does (column then row parallel)")
        known = {f"{block}.{name}" for pair in _PAIRS for name in pair}
        extra = [m for m, s in styles.items() if m.startswith(block + ".") and m not in known
                 and not (s == "sequence" and m.rsplit(".", 1)[1] in _BLOCK_NORMS)]
        if extra:
            raise RunCheckError(f"placements.style: {extra} inside {block} are split; the runtime splits only "
                                f"{sorted(known)} inside a block, and the norms {list(_BLOCK_NORMS)} on the "
                                "sequence")


def to_tp_rows(t: torch.Tensor, tp: int) -> torch.Tensor:
    """``[q; k; v]`` rows (dim 0) → ``[q_0; k_0; v_0; q_1; …]`` so that ``Shard(0)`` gives each rank its heads."""
    return t.reshape(3, tp, t.shape[0] // (3 * tp), *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def canonical_from_tp(t: torch.Tensor, tp: int) -> torch.Tensor:
    """Inverse of :func:`to_tp_rows`."""
    return t.reshape(tp, 3, t.shape[0] // (3 * tp), *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def apply_tensor_parallel(stage: StageModule, tp_mesh: DeviceMesh, plan: Plan) -> None:
    """Split the modules of ``stage`` that the plan splits over ``tp_mesh`` (in place)."""
    from runtime.tensor_parallel_generic import apply_generic_tensor_parallel, is_gpt_stage

    if not is_gpt_stage(stage):  # by its modules: plan.model.family is None for a model planned as a module
        return apply_generic_tensor_parallel(stage, tp_mesh, plan)
    tp = tp_mesh.size()
    styles = tp_styles(plan)
    sp = plan.parallel.sequence_parallel
    groups: dict[str, int] = {}
    tied = tied_uses(stage)
    rng = SplitRegionRNG(tp_mesh.get_local_rank())
    for path in stage.layer_paths:
        mine = {m[len(path) + 1:]: s for m, s in styles.items() if m.startswith(path + ".")}
        layer = stage.get_submodule(path)
        if sp:
            _apply_sequence_parallel(layer, path, mine, tp_mesh)
        if not mine:
            continue
        plan_map = {name: _parallel_style(layer.get_submodule(name), style, in_block=path.startswith("blocks."),
                                          sequence_parallel=sp)
                    for name, style in mine.items()}
        if mine.get("attn.qkv") == "colwise":
            qkv = layer.get_submodule("attn.qkv")
            with torch.no_grad():
                for name, param in qkv.named_parameters():
                    param.copy_(to_tp_rows(param, tp))
                    groups[f"{path}.attn.qkv.{name}"] = tp
            attn = layer.get_submodule("attn")
            attn.forward = types.MethodType(_tp_attention_forward, attn)
            attn.split_rng = rng  # its probabilities' dropout acts on this rank's heads
        if sp and isinstance(layer, GPTBlock):  # a split pair's output dropout acts on this rank's positions
            for row, dropout in _OUTPUT_DROPOUT.items():
                if mine.get(row) == "rowwise":
                    fork_dropout(layer.get_submodule(dropout), rng)
        parallelize_module(layer, tp_mesh, plan_map, src_data_rank=None)  # every rank built the same weights
    retie(stage, tied)
    setattr(stage, QKV_ATTR, groups)


def reduce_partial_gradients(modules: list[nn.Module]) -> int:
    """Bring every DTensor gradient to its parameter's placement (in place); returns how many changed.

    Run after the whole step's backward. A ``Partial`` gradient (a LayerNorm that saw only this rank's
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


def _apply_sequence_parallel(layer: nn.Module, path: str, styles: dict[str, str], tp_mesh: DeviceMesh) -> None:
    """Lay ``layer`` out for sequence parallelism (see the module docstring); ``styles`` are its own, in place.

    Every LayerNorm of the layer gets the ``sequence`` style (added to ``styles``, so that the Linear
    styles see it); what cannot be said as a style of a child module (the embedding layer's output,
    the gather in front of replicated attention / MLP / LM head) is applied here.
    """
    gather = {"input_layouts": (Shard(1),), "desired_input_layouts": (Replicate(),)}
    scatter = {"output_layouts": (Replicate(),), "desired_output_layouts": (Shard(1),)}
    if isinstance(layer, GPTEmbedding):
        # Whatever split the lookup had, its output is whole here: keep this rank's positions.
        parallelize_module(layer, tp_mesh, PrepareModuleOutput(**scatter, use_local_output=True))
    elif isinstance(layer, GPTBlock):
        styles.update(dict.fromkeys(_BLOCK_NORMS, "sequence"))
        for col, row in _PAIRS:
            if styles.get(col, "replicate") == "replicate" and styles.get(row, "replicate") == "replicate":
                parent = col.split(".")[0]  # attn / mlp: runs whole on the gathered sequence
                parallelize_module(layer.get_submodule(parent), tp_mesh, PrepareModuleInputOutput(
                    **gather, use_local_input=True, **scatter, use_local_output=True))
    elif isinstance(layer, GPTHead):
        styles["ln_f"] = "sequence"
        if styles.get("lm_head", "replicate") == "replicate":
            parallelize_module(layer.get_submodule("lm_head"), tp_mesh,
                               PrepareModuleInput(**gather, use_local_output=True))
    else:
        raise RunCheckError(f"parallel.sequence_parallel: layer {path} ({type(layer).__name__}) is not a GPT "
                            "embedding, block or head, the layers the runtime's sequence parallelism knows; "
                            "re-plan without --sequence-parallel")


def _parallel_style(module: nn.Module, style: str, *, in_block: bool, sequence_parallel: bool = False
                    ) -> ParallelStyle:
    seq = {"input_layouts": Shard(1)} if sequence_parallel else {}
    if isinstance(module, nn.Embedding):
        if style == "vocab":
            return RowwiseParallel(input_layouts=Replicate())
        if style == "colwise":
            return ColwiseParallel(output_layouts=Replicate())
    elif isinstance(module, nn.Linear):
        if style == "colwise":
            return ColwiseParallel(**seq) if in_block else ColwiseParallel(**seq, output_layouts=Replicate())
        if style == "rowwise" and in_block:
            return RowwiseParallel(output_layouts=Shard(1)) if sequence_parallel else RowwiseParallel()
    elif isinstance(module, nn.LayerNorm):
        if style == "sequence" and sequence_parallel:
            return SequenceParallel()
    raise RunCheckError(f"placements.style: {style!r} for a {type(module).__name__} "
                        f"{'inside' if in_block else 'outside'} a block is not something the runtime applies")


def _tp_attention_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``CausalSelfAttention.forward`` on the local heads of a column-parallel ``qkv`` (same math)."""
    b, s, _ = x.shape
    q, k, v = self.qkv(x).chunk(3, dim=-1)
    local_heads = q.shape[-1] // self.head_dim
    q = q.reshape(b, s, local_heads, self.head_dim).transpose(1, 2)
    k = k.reshape(b, s, local_heads, self.head_dim).transpose(1, 2)
    v = v.reshape(b, s, local_heads, self.head_dim).transpose(1, 2)
    rng = getattr(self, "split_rng", None)
    own_stream = rng.fork(x.device) if rng is not None and self.training and self.dropout > 0 else \
        contextlib.nullcontext()
    with own_stream:  # dropout on this rank's heads: its own mask (runtime.tensor_parallel_rng)
        if self.fused:
            p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
            scores = scores.masked_fill(self.future_mask[:s, :s], float("-inf"))
            y = self.attn_drop(F.softmax(scores, dim=-1)) @ v
    y = y.transpose(1, 2).reshape(b, s, local_heads * self.head_dim)
    return self.resid_drop(self.proj(y))
