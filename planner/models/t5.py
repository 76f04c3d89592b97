"""T5 (Raffel et al. 2020, v1.0): an encoder-decoder transformer.

Layers, in execution order::

    embed → encoder.0 … encoder.{L-1} → enc_final → dec_embed → decoder.0 … decoder.{L-1} → head

Each decoder block takes ``(y, enc)``: its own stream and the encoder output, so the layer graph
has an edge from ``enc_final`` to every decoder block (a DAG, not a chain; pipeline stages that
hold decoder blocks receive the encoder output too). The token embedding is shared by ``embed``,
``dec_embed`` and the LM head (one parameter, owned by ``embed``, tied elsewhere).

One deliberate difference from the original: every self-attention owns its relative-position
bias table (32 buckets × heads) instead of the first block of each stack computing the bias and
passing it down. That keeps each block self-contained, so any run of blocks is a pipeline stage,
at the cost of 2·(L-1)·32·heads extra parameters (188,416 for T5-11B, 0.002%).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from planner.models.blocks import Attention, RMSNorm, init_weights


@dataclass(frozen=True, kw_only=True)
class T5Config:
    num_layers: int  # per stack
    hidden: int  # d_model
    ffn_hidden: int  # d_ff
    heads: int
    head_dim: int  # d_kv
    vocab_size: int = 32128
    seq_len: int = 512  # encoder tokens
    dec_seq_len: int = 128  # decoder tokens
    rel_buckets: int = 32
    rel_max_distance: int = 128
    dropout: float = 0.1
    eps: float = 1e-6

    def param_count(self) -> int:
        h, f, inner, n = self.hidden, self.ffn_hidden, self.heads * self.head_dim, self.num_layers
        attn = 4 * h * inner
        rel = self.rel_buckets * self.heads
        encoder = n * (attn + rel + 2 * h * f + 2 * h)
        decoder = n * (2 * attn + rel + 2 * h * f + 3 * h)
        return self.vocab_size * h + encoder + h + decoder + h


def relative_buckets(s: int, t: int, *, bidirectional: bool, buckets: int, max_distance: int,
                     device: torch.device) -> torch.Tensor:
    """T5's bucketing of ``key_pos - query_pos`` into ``buckets`` (log-spaced beyond half of them)."""
    rel = torch.arange(t, device=device)[None, :] - torch.arange(s, device=device)[:, None]
    out = torch.zeros_like(rel)
    if bidirectional:
        buckets //= 2
        out = out + (rel > 0).long() * buckets
        n = rel.abs()
    else:
        n = -torch.clamp(rel, max=0)
    exact = buckets // 2
    large = exact + (torch.log(n.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                     * (buckets - exact)).long()
    large = torch.clamp(large, max=buckets - 1)
    return out + torch.where(n < exact, n, large)


class T5SelfAttention(nn.Module):
    """Pre-norm self-attention with its own relative-position bias; no 1/sqrt(d) scaling (as in T5)."""

    def __init__(self, cfg: T5Config, *, causal: bool) -> None:
        super().__init__()
        self.cfg = cfg
        self.causal = causal
        self.norm = RMSNorm(cfg.hidden, cfg.eps)
        self.attn = Attention(cfg.hidden, cfg.heads, head_dim=cfg.head_dim, bias=False, dropout=cfg.dropout,
                              causal=causal, scale=False)
        self.rel_bias = nn.Embedding(cfg.rel_buckets, cfg.heads)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.shape[1]
        buckets = relative_buckets(s, s, bidirectional=not self.causal, buckets=self.cfg.rel_buckets,
                                   max_distance=self.cfg.rel_max_distance, device=x.device)
        bias = self.rel_bias(buckets).permute(2, 0, 1).unsqueeze(0).to(x.dtype)
        return x + self.drop(self.attn(self.norm(x), bias=bias))


class T5FeedForward(nn.Module):
    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden, cfg.eps)
        self.wi = nn.Linear(cfg.hidden, cfg.ffn_hidden, bias=False)
        self.wo = nn.Linear(cfg.ffn_hidden, cfg.hidden, bias=False)
        self.inner_drop = nn.Dropout(cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.wo(self.inner_drop(F.relu(self.wi(self.norm(x))))))


class T5EncoderBlock(nn.Module):
    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.self_attn = T5SelfAttention(cfg, causal=False)
        self.ffn = T5FeedForward(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.self_attn(x))


class T5DecoderBlock(nn.Module):
    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.self_attn = T5SelfAttention(cfg, causal=True)
        self.cross_norm = RMSNorm(cfg.hidden, cfg.eps)
        self.cross_attn = Attention(cfg.hidden, cfg.heads, head_dim=cfg.head_dim, bias=False,
                                    dropout=cfg.dropout, scale=False)
        self.cross_drop = nn.Dropout(cfg.dropout)
        self.ffn = T5FeedForward(cfg)

    def forward(self, y: torch.Tensor, enc: torch.Tensor) -> torch.Tensor:
        y = self.self_attn(y)
        y = y + self.cross_drop(self.cross_attn(self.cross_norm(y), context=enc))
        return self.ffn(y)


class T5Embedding(nn.Module):
    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.drop(self.tokens(ids))


class T5FinalNorm(nn.Module):
    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden, cfg.eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.norm(x))


class T5Head(nn.Module):
    """Final norm, then the LM head tied to the token embedding, rescaled by d_model^-1/2 (T5 v1.0)."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.final = T5FinalNorm(cfg)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        self.scale = cfg.hidden ** -0.5

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.final(y) * self.scale)


class T5(nn.Module):
    """``forward(enc_tokens[b, s], dec_tokens[b, t]) -> logits[b, t, vocab]``."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.config = cfg
        self.embed = T5Embedding(cfg)
        self.encoder = nn.ModuleList(T5EncoderBlock(cfg) for _ in range(cfg.num_layers))
        self.enc_final = T5FinalNorm(cfg)
        self.dec_embed = T5Embedding(cfg)
        self.decoder = nn.ModuleList(T5DecoderBlock(cfg) for _ in range(cfg.num_layers))
        self.head = T5Head(cfg)
        init_weights(self, std=1.0 / math.sqrt(cfg.hidden))
        self.dec_embed.tokens.weight = self.embed.tokens.weight
        self.head.lm_head.weight = self.embed.tokens.weight

    def forward(self, enc_tokens: torch.Tensor, dec_tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(enc_tokens)
        for block in self.encoder:
            x = block(x)
        enc = self.enc_final(x)
        y = self.dec_embed(dec_tokens)
        for block in self.decoder:
            y = block(y, enc)
        return self.head(y)
