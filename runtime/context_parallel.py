"""Context parallelism (``parallel.cp``): the ``cp`` ranks of a group share every sequence, each holding 1/cp.

What runs, as :mod:`planner.cost.context_parallel` prices it:

* **Balanced shards.** Each sequence is cut into ``2·cp`` equal chunks; cp rank ``i`` takes chunks ``i``
  and ``2·cp−1−i`` (Llama 3 §3.3.2, torch's ``context_parallel``), so every rank does the same share of
  the causal attention. :func:`shard_positions` gives those global positions; the batch (tokens and
  targets) is indexed by them (:func:`shard_batch`).
* **Positions are global.** GPT's learned position embedding reads the rank's global positions; Llama's
  rotary angles are computed at them.
* **Attention all-gathers K and V** over the cp group with autograd
  (``torch.distributed._functional_collectives.all_gather_single_autograd``: its backward reduce-scatters
  dK, dV back to their owners), before grouped-query expansion, and masks causally by global position.
* **Loss and gradients.** Every cp rank holds the same number of tokens, so the mean of the ranks' local
  mean losses is the mean over all tokens; gradients are averaged over the flattened ``dp × cp`` mesh
  (:func:`data_mesh`), torchtitan's ``dp_cp``.
* **Recomputation.** ``torch.utils.checkpoint`` re-runs a checkpointed block's forward in the backward,
  K/V all-gathers included; every cp rank checkpoints the same blocks, so each issues the same gathers in
  the same order (``tests/runtime/test_runtime_cp.py`` counts them on a fake process group).
* **Pipeline stages** hold the rank's ``seq/cp`` tokens: the first stage reads them, stages exchange
  ``[micro_batch, seq/cp, hidden]`` (:func:`runtime.pipeline_parallel.boundary_shape`), positions stay
  global, and a tied weight's copies are summed between the stages' ranks of equal cp index.
* **Sequence parallelism** splits the rank's ``seq/cp`` positions over tp (``seq/(cp·tp)`` each); its
  tp all-gather in front of the attention restores ``seq/cp``, then K and V are gathered over cp.
* **HSDP** (``dp_shard < dp``): FSDP2's 2-D mesh is the ``dp_cp`` mesh unflattened into
  ``(replicas, dp_shard·cp)``, the shard group the planner prices (:mod:`planner.cost.sharding`).

Supported: the GPT and Llama families (:data:`planner.resolve.CONTEXT_PARALLEL_FAMILIES`) without dropout or
experts, with any pp, recomputation, tp (heads split as usual, each rank gathering its heads' K and V), sequence
parallelism, ZeRO stage and HSDP over ``dp × cp``. Anything else with ``cp > 1`` is refused
(:func:`check_context_parallel`, :func:`apply_context_parallel`) naming ``cp`` and the fix; the planner leaves
cp out of the search for those presets (:func:`planner.resolve.runnable_space`).
"""

from __future__ import annotations

import math
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed._functional_collectives import all_gather_single_autograd

from planner.resolve import CONTEXT_PARALLEL_FAMILIES as SUPPORTED_FAMILIES
from runtime.errors import RunCheckError


def check_context_parallel(plan: Any, family: str | None, *, user_model: bool = False) -> None:
    """Refuse a plan with ``cp > 1`` that this runtime cannot run exactly."""
    p = plan.parallel
    if p.cp <= 1:
        return
    if user_model or family not in SUPPORTED_FAMILIES:
        what = "a user model (parallelize())" if user_model else f"family {family!r}"
        raise RunCheckError(f"parallel.cp: {p.cp} > 1 for {what}; the runtime shards sequences only for the "
                            f"{list(SUPPORTED_FAMILIES)} presets, whose attention it owns; re-plan with --cp 1")
    seq = plan.model.seq_len
    if not seq or seq % (2 * p.cp):
        raise RunCheckError(f"parallel.cp: 2*cp = {2 * p.cp} must divide the sequence length {seq}; re-plan")
    if p.sequence_parallel and (seq // p.cp) % p.tp:
        raise RunCheckError(f"parallel.cp: sequence parallelism splits each cp rank's {seq // p.cp} positions over "
                            f"tp = {p.tp}, which does not divide them; re-plan with a cp or tp that does")


def shard_positions(seq_len: int, cp: int, cp_index: int) -> torch.Tensor:
    """Global positions of cp rank ``cp_index``'s tokens: chunks ``cp_index`` and ``2·cp−1−cp_index`` of ``2·cp``."""
    chunk = seq_len // (2 * cp)
    first, second = cp_index * chunk, (2 * cp - 1 - cp_index) * chunk
    return torch.cat([torch.arange(first, first + chunk), torch.arange(second, second + chunk)])


def all_positions(seq_len: int, cp: int) -> torch.Tensor:
    """Positions of the keys after the all-gather: every rank's :func:`shard_positions`, in rank order."""
    return torch.cat([shard_positions(seq_len, cp, i) for i in range(cp)])


def shard_batch(inputs: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's tokens and targets (dim 1: the sequence)."""
    index = positions.to(inputs.device)
    return inputs.index_select(1, index), targets.index_select(1, index)


def data_mesh(mesh: Any, cp: int) -> Any:
    """The mesh gradients are averaged (and ZeRO-sharded) over: ``dp``, or ``dp × cp`` flattened (``dp_cp``,
    made once) when cp > 1."""
    if cp <= 1:
        return mesh["dp"]
    flat = getattr(mesh, "_dp_cp_mesh", None)  # kept on the root mesh: torch asks callers to keep it
    if flat is None:
        flat = mesh["dp", "cp"]._flatten("dp_cp")
        mesh._dp_cp_mesh = flat
    return flat


class _CP:
    """What a patched module needs: the cp group, its size, this rank's and every rank's positions."""

    def __init__(self, group: Any, cp: int, seq_len: int, cp_index: int, device: torch.device) -> None:
        self.group, self.cp = group, cp
        self.q_pos = shard_positions(seq_len, cp, cp_index).to(device)
        self.k_pos = all_positions(seq_len, cp).to(device)
        self.mask = self.k_pos[None, :] <= self.q_pos[:, None]  # True where the key may be attended to

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """``[b, heads, s/cp, d]`` → ``[b, heads, s, d]`` (keys in :func:`all_positions` order), with autograd."""
        return all_gather_single_autograd(t.contiguous(), gather_dim=2, group=self.group)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Causal attention of this rank's queries on every key, by global position: SDPA with the boolean
        mask (the memory-efficient kernel on a GPU: no ``heads x s/cp x s`` scores kept)."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, scale=scale)


def apply_context_parallel(stage: nn.Module, *, group: Any, cp: int, seq_len: int, cp_index: int,
                           device: torch.device) -> int:
    """Patch the embeddings and attentions of ``stage`` (GPT or Llama) for cp; returns how many were patched."""
    from planner.models.blocks import Attention
    from planner.models.gpt import CausalSelfAttention, GPTEmbedding
    from planner.models.moe import MoEFeedForward

    ctx = _CP(group, cp, seq_len, cp_index, device)
    patched = 0
    for module in stage.modules():
        if isinstance(module, MoEFeedForward):  # capacity C = ceil(k·T·cf/E) counts the tokens it is given
            raise RunCheckError("parallel.cp: a mixture-of-experts layer sizes its expert capacity from the tokens "
                                "it routes, and under cp each rank routes its seq/cp of them, so other tokens are "
                                "dropped than without cp; re-plan with --cp 1")
        forward = {GPTEmbedding: _gpt_embedding_forward, CausalSelfAttention: _gpt_attention_forward,
                   Attention: _llama_attention_forward}.get(type(module))
        if forward is not None:
            if getattr(module, "dropout", 0.0):
                raise RunCheckError(f"parallel.cp: {type(module).__name__} drops out attention probabilities, which "
                                    "the context-parallel attention does not; use a preset without dropout or --cp 1")
            module._cp = ctx  # type: ignore[assignment]
            module.forward = types.MethodType(forward, module)  # type: ignore[method-assign]
            patched += 1
    return patched


def _gpt_embedding_forward(self: Any, tokens: torch.Tensor) -> torch.Tensor:
    return self.drop(self.wte(tokens) + self.wpe(self._cp.q_pos))


def _gpt_attention_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    b, s = x.shape[0], x.shape[1]
    width = self.heads * self.head_dim
    q, k, v = (t.view(b, s, self.heads, self.head_dim).transpose(1, 2) for t in self.qkv(x).split(width, dim=2))
    cp = self._cp
    y = cp.attend(q, cp.gather(k), cp.gather(v), 1.0 / math.sqrt(self.head_dim))
    return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, s, width)))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _llama_attention_forward(self: Any, x: torch.Tensor, context: torch.Tensor | None = None,
                             bias: torch.Tensor | None = None) -> torch.Tensor:
    if context is not None or bias is not None:
        raise RunCheckError("parallel.cp: context parallelism runs causal self-attention only; re-plan with --cp 1")
    b, s = x.shape[0], x.shape[1]
    q = self.q(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
    k = self.k(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
    v = self.v(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
    cp = self._cp
    if self.rotary is not None:  # the rotary angles of the global positions (blocks.Rotary's formula)
        angles = torch.outer(cp.q_pos.to(self.rotary.inv_freq.dtype), self.rotary.inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos().to(q.dtype), angles.sin().to(q.dtype)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    k, v = cp.gather(k), cp.gather(v)  # kv heads only: grouped-query attention gathers less
    if self.kv_heads != self.heads:
        group, t = self.heads // self.kv_heads, k.shape[2]
        k = k[:, :, None].expand(b, self.kv_heads, group, t, self.head_dim).reshape(b, self.heads, t, -1)
        v = v[:, :, None].expand(b, self.kv_heads, group, t, self.head_dim).reshape(b, self.heads, t, -1)
    y = cp.attend(q, k, v, self.scale)
    return self.o(y.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))
