"""A GPT decoder (GPT-2/GPT-3/Megatron style), written as a chain of pipeline-friendly layers.

The model is ``embed → blocks.0 … blocks.{L-1} → head``; every layer takes one tensor and returns
one tensor, so any contiguous run of layers is a valid pipeline stage. Attention is written out
(not fused) by default so that the activations autograd saves are the ones the published
per-layer formula counts; ``fused_attention=True`` uses ``scaled_dot_product_attention`` instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from planner.models.blocks import HeadLayout


@dataclass(frozen=True, kw_only=True)
class GPTConfig:
    num_layers: int
    hidden: int
    heads: int
    vocab_size: int = 51200
    seq_len: int = 2048
    ffn_hidden: int | None = None
    dropout: float = 0.1
    tie_embeddings: bool = True
    fused_attention: bool = False

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden", "heads", "vocab_size", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name}: got {value!r}; expected a positive integer")
        if self.hidden % self.heads:
            raise ValueError(f"GPTConfig.heads: {self.heads} does not divide hidden={self.hidden}; "
                             "choose heads so that hidden / heads is an integer")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout: got {self.dropout}; expected 0 <= dropout < 1")

    @property
    def ffn(self) -> int:
        return self.ffn_hidden or 4 * self.hidden

    def param_count(self) -> int:
        """Analytic parameter count (biases and layer norms included, tied embedding counted once)."""
        h, f, v, s, n = self.hidden, self.ffn, self.vocab_size, self.seq_len, self.num_layers
        block = (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h) + 4 * h
        head = 2 * h + (0 if self.tie_embeddings else v * h)
        return v * h + s * h + n * block + head

    def flops_per_step(self, batch: int) -> float:
        """Megatron-LM's count of matmul FLOPs for forward + backward: 72·B·L·s·h²·(1 + s/6h + v/12hL)."""
        b, n, s, h, v = batch, self.num_layers, self.seq_len, self.hidden, self.vocab_size
        return 72 * b * n * s * h * h * (1 + s / (6 * h) + v / (12 * h * n))


class GPTEmbedding(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.drop(self.wte(tokens) + self.wpe(positions))


class CausalSelfAttention(nn.Module):
    """Causal self-attention with one fused ``qkv`` projection (rows ``[q; k; v]``) and an output ``proj``.

    Tensor parallelism splits it by heads as it splits :class:`planner.models.blocks.Attention`
    (``head_layout``): each rank holds its heads' rows of each of ``q``, ``k``, ``v``, ``heads`` is set
    to the rank's share, and this forward, which sizes everything by ``heads``, computes those heads.
    """

    head_layout = HeadLayout(columns=("qkv",), row="proj", packed=3)

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.head_dim = cfg.hidden // cfg.heads
        self.fused = cfg.fused_attention
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.attn_drop = nn.Dropout(cfg.dropout)
        self.resid_drop = nn.Dropout(cfg.dropout)
        self.dropout = cfg.dropout
        # True above the diagonal: the positions a token must not attend to.
        # On meta (planning) the mask has no values, only its shape and dtype matter; ``triu`` on
        # meta runs a Python reference kernel (about 1 ms a layer, 0.1 s of building GPT-3 175B).
        future = torch.ones(cfg.seq_len, cfg.seq_len, dtype=torch.bool)
        if not future.is_meta:
            future = future.triu(1)
        self.register_buffer("future_mask", future, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The hidden size is read from x (h) so that the traced graph, and with it every plan, keeps
        # its shape-query nodes; the width of q, k, v is the heads', which tp sets to this rank's share.
        b, s, h = x.shape[0], x.shape[1], x.shape[2]  # noqa: F841 - h: see above
        width = self.heads * self.head_dim
        qkv = self.qkv(x).split(width, dim=2)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q.view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(b, s, self.heads, self.head_dim).transpose(1, 2)
        v = v.view(b, s, self.heads, self.head_dim).transpose(1, 2)
        y = self.attend(q, k, v, s)
        y = y.transpose(1, 2).reshape(b, s, width)
        return self.resid_drop(self.proj(y))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: int) -> torch.Tensor:
        """``softmax(q kᵀ / √d, causal) v`` per head, ``[b, heads, s, d]``: the part that acts on each head alone."""
        if self.fused:
            p = self.dropout if self.training else 0.0
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        scores = scores.masked_fill(self.future_mask[:s, :s], float("-inf"))
        return self.attn_drop(F.softmax(scores, dim=-1)) @ v


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden, cfg.ffn)
        self.fc2 = nn.Linear(cfg.ffn, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(x))))


class GPTBlock(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.hidden)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.hidden)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPTHead(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_f = nn.LayerNorm(cfg.hidden)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(x))


class GPT(nn.Module):
    """Decoder-only transformer; ``forward(tokens[b, s]) -> logits[b, s, vocab]``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = GPTEmbedding(cfg)
        self.blocks = nn.ModuleList(GPTBlock(cfg) for _ in range(cfg.num_layers))
        self.head = GPTHead(cfg)
        if cfg.tie_embeddings:
            self.head.lm_head.weight = self.embed.wte.weight
        self.apply(_init_weights)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
