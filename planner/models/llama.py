"""Llama 2 (Touvron et al. 2023) and Mixtral (Jiang et al. 2024): pre-RMSNorm decoders.

Layers: ``embed → blocks.0 … blocks.{L-1} → head``, one tensor in and out each. Blocks use
rotary positions, grouped-query attention when ``kv_heads < heads`` (Llama-2-70B, Mixtral),
no biases, and a SwiGLU feed-forward, or with ``num_experts > 0`` the top-k mixture of experts
of :mod:`planner.models.moe` (Mixtral: 8 experts, top 2; DeepSeek-V3: 256 narrow experts, top 8, one
shared expert, the first three blocks dense, attention approximated as described in its preset). Embedding and LM head are not tied
unless ``tie_embeddings`` (Llama 3.2 1B/3B, nanotron's small benchmark models).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from planner.models.blocks import Attention, FeedForward, RMSNorm, init_weights
from planner.models.moe import MoEFeedForward


@dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    num_layers: int
    hidden: int
    heads: int
    ffn_hidden: int
    kv_heads: int | None = None
    vocab_size: int = 32000
    seq_len: int = 4096
    eps: float = 1e-5
    rope_theta: float = 10000.0
    num_experts: int = 0  # 0: dense SwiGLU; > 0: mixture of experts
    top_k: int = 2
    capacity_factor: float = 1.0
    # DeepSeek-V3's shape: each expert's FFN width (None: ffn_hidden), shared experts every token
    # passes, the first blocks dense (of ffn_hidden), and the attention heads' width (None: hidden / heads).
    moe_ffn_hidden: int | None = None
    shared_experts: int = 0
    first_dense_layers: int = 0
    head_dim: int | None = None
    fused_attention: bool = False
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"LlamaConfig.heads: {self.heads} does not divide hidden={self.hidden}")
        if self.heads % (self.kv_heads or self.heads):
            raise ValueError(f"LlamaConfig.kv_heads: {self.kv_heads} does not divide heads={self.heads}")

    def is_moe(self, index: int) -> bool:
        """Whether block ``index`` is a mixture of experts (the first ``first_dense_layers`` are dense)."""
        return bool(self.num_experts) and index >= self.first_dense_layers

    @property
    def expert_ffn(self) -> int:
        return self.moe_ffn_hidden or self.ffn_hidden

    def param_count(self) -> int:
        h, f, v = self.hidden, self.ffn_hidden, self.vocab_size
        d = self.head_dim or h // self.heads
        attn = 2 * h * self.heads * d + 2 * h * (self.kv_heads or self.heads) * d
        moe_layers = sum(self.is_moe(i) for i in range(self.num_layers))
        fe = self.expert_ffn
        moe = (self.num_experts + self.shared_experts) * 3 * h * fe + h * self.num_experts
        ffn = moe_layers * moe + (self.num_layers - moe_layers) * 3 * h * f
        return (1 if self.tie_embeddings else 2) * v * h + self.num_layers * (attn + 2 * h) + ffn + h

    def active_param_count(self) -> int:
        """Parameters a token passes through (top-k experts only): what sets FLOPs per token."""
        if not self.num_experts:
            return self.param_count()
        moe_layers = sum(self.is_moe(i) for i in range(self.num_layers))
        return self.param_count() - moe_layers * (self.num_experts - self.top_k) * 3 * self.hidden * self.expert_ffn


class LlamaBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig, index: int = 0) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden, cfg.eps)
        self.attn = Attention(cfg.hidden, cfg.heads, kv_heads=cfg.kv_heads, head_dim=cfg.head_dim, bias=False,
                              causal=True, rotary=True, rope_theta=cfg.rope_theta, fused=cfg.fused_attention)
        self.ffn_norm = RMSNorm(cfg.hidden, cfg.eps)
        self.ffn: nn.Module
        if cfg.is_moe(index):
            self.ffn = MoEFeedForward(cfg.hidden, cfg.expert_ffn, num_experts=cfg.num_experts,
                                      top_k=cfg.top_k, capacity_factor=cfg.capacity_factor,
                                      shared_experts=cfg.shared_experts)
        else:
            self.ffn = FeedForward(cfg.hidden, cfg.ffn_hidden, activation="swiglu", bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class LlamaEmbedding(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.hidden)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tokens(ids)


class LlamaHead(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden, cfg.eps)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(x))


class Llama(nn.Module):
    """``forward(tokens[b, s]) -> logits[b, s, vocab]``."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = LlamaEmbedding(cfg)
        self.blocks = nn.ModuleList(LlamaBlock(cfg, i) for i in range(cfg.num_layers))
        self.head = LlamaHead(cfg)
        if cfg.tie_embeddings:
            self.head.lm_head.weight = self.embed.tokens.weight
        init_weights(self)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)
