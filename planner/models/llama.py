"""Llama 2 (Touvron et al. 2023) and Mixtral (Jiang et al. 2024): pre-RMSNorm decoders.

Layers: ``embed → blocks.0 … blocks.{L-1} → head``, one tensor in and out each. Blocks use
rotary positions, grouped-query attention when ``kv_heads < heads`` (Llama-2-70B, Mixtral),
no biases, and a SwiGLU feed-forward, or with ``num_experts > 0`` the top-k mixture of experts
of :mod:`planner.models.moe` (Mixtral: 8 experts, top 2). Embedding and LM head are not tied
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
    fused_attention: bool = False
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"LlamaConfig.heads: {self.heads} does not divide hidden={self.hidden}")
        if self.heads % (self.kv_heads or self.heads):
            raise ValueError(f"LlamaConfig.kv_heads: {self.kv_heads} does not divide heads={self.heads}")

    def param_count(self) -> int:
        h, f, v = self.hidden, self.ffn_hidden, self.vocab_size
        kv = (self.kv_heads or self.heads) * (h // self.heads)
        attn = 2 * h * h + 2 * h * kv
        ffn = self.num_experts * 3 * h * f + h * self.num_experts if self.num_experts else 3 * h * f
        return (1 if self.tie_embeddings else 2) * v * h + self.num_layers * (attn + ffn + 2 * h) + h

    def active_param_count(self) -> int:
        """Parameters a token passes through (top-k experts only): what sets FLOPs per token."""
        if not self.num_experts:
            return self.param_count()
        h, f = self.hidden, self.ffn_hidden
        return self.param_count() - self.num_layers * (self.num_experts - self.top_k) * 3 * h * f


class LlamaBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden, cfg.eps)
        self.attn = Attention(cfg.hidden, cfg.heads, kv_heads=cfg.kv_heads, bias=False, causal=True,
                              rotary=True, rope_theta=cfg.rope_theta, fused=cfg.fused_attention)
        self.ffn_norm = RMSNorm(cfg.hidden, cfg.eps)
        self.ffn: nn.Module
        if cfg.num_experts:
            self.ffn = MoEFeedForward(cfg.hidden, cfg.ffn_hidden, num_experts=cfg.num_experts,
                                      top_k=cfg.top_k, capacity_factor=cfg.capacity_factor)
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
        self.blocks = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.num_layers))
        self.head = LlamaHead(cfg)
        if cfg.tie_embeddings:
            self.head.lm_head.weight = self.embed.tokens.weight
        init_weights(self)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)
