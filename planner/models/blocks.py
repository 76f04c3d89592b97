"""Transformer pieces shared by the model families (BERT, T5, ViT, wav2vec 2.0, Llama, Mixtral).

Attention is written out by default (``q @ kᵀ → softmax → dropout → @ v``) so that what autograd
saves for backward is what a non-fused kernel keeps, and the tracer can see the ``s × s`` score
tensors (``Layer.attention_activation_bytes``) that a flash-attention kernel or selective
recomputation would drop. ``fused=True`` calls ``scaled_dot_product_attention`` instead.

Everything here is shape-static and free of ``.item()``, so it traces with ``torch.fx`` and runs
on the meta device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class HeadLayout:
    """Which Linears of an attention module make its heads and which reads them back (tensor parallelism's view).

    ``columns``: the Linears whose output features are ``heads × head_dim`` values, each holding
    ``packed`` such blocks one after another (GPT's fused ``qkv`` holds ``[q; k; v]``: 3); ``row``:
    the Linear that reads the heads back. An attention module that has a ``head_layout``, ``heads``
    (and ``kv_heads`` if its key/value heads differ) and shapes its projections by those counts can be
    split by heads: ``runtime.tensor_parallel_generic`` gives each rank its heads' columns and sets the
    counts to the rank's share, and the module's own forward does the rest. Its random ops on the
    heads run on the rank's own stream: the module's ``attend`` method if it has one (the per-head
    part, when the forward also drops out the output, which every rank holds alike), else its forward.
    """

    columns: tuple[str, ...]
    row: str
    packed: int = 1


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), as in T5 and Llama: no mean, no bias."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021) in the half-split layout Llama uses.

    Only ``inv_freq`` is stored (a non-persistent buffer); cos/sin are recomputed in each block
    from the positions, so every block is self-contained and any run of blocks is a stage.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = q.shape[-2]
        positions = torch.arange(s, device=q.device, dtype=self.inv_freq.dtype)
        angles = torch.outer(positions, self.inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos().to(q.dtype), angles.sin().to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class Attention(nn.Module):
    """Multi-head attention with optional grouped-query heads, rotary, causal mask and position bias.

    ``forward(x, context=None, bias=None)``: self-attention on ``x [b, s, h]``, or cross-attention
    to ``context [b, t, h]``; ``bias [1 or b, heads, s, t]`` is added to the scores (T5).
    """

    head_layout = HeadLayout(columns=("q", "k", "v"), row="o")

    def __init__(self, hidden: int, heads: int, *, kv_heads: int | None = None, head_dim: int | None = None,
                 bias: bool = True, dropout: float = 0.0, causal: bool = False, rotary: bool = False,
                 rope_theta: float = 10000.0, scale: bool = True, fused: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.kv_heads = kv_heads or heads
        if heads % self.kv_heads:
            raise ValueError(f"Attention.kv_heads: {self.kv_heads} does not divide heads={heads}")
        self.head_dim = head_dim or hidden // heads
        self.causal = causal
        self.scale = 1.0 / math.sqrt(self.head_dim) if scale else 1.0
        self.fused = fused
        self.dropout = dropout
        inner, kv_inner = heads * self.head_dim, self.kv_heads * self.head_dim
        self.q = nn.Linear(hidden, inner, bias=bias)
        self.k = nn.Linear(hidden, kv_inner, bias=bias)
        self.v = nn.Linear(hidden, kv_inner, bias=bias)
        self.o = nn.Linear(inner, hidden, bias=bias)
        self.attn_drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.rotary = Rotary(self.head_dim, rope_theta) if rotary else None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        b, s = x.shape[0], x.shape[1]  # indexing, not unpacking: fx traces it without bytecode scans
        src = x if context is None else context
        t = src.shape[1]
        q = self.q(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(src).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(src).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.rotary is not None:
            q, k = self.rotary(q, k)
        if self.kv_heads != self.heads:  # grouped-query attention: each kv head serves a group of q heads
            group = self.heads // self.kv_heads
            k = k[:, :, None].expand(b, self.kv_heads, group, t, self.head_dim).reshape(b, self.heads, t, -1)
            v = v[:, :, None].expand(b, self.kv_heads, group, t, self.head_dim).reshape(b, self.heads, t, -1)
        if self.fused:
            p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p,
                                               is_causal=self.causal and bias is None, scale=self.scale)
        else:
            scores = (q @ k.transpose(-2, -1)) * self.scale
            if bias is not None:
                scores = scores + bias
            if self.causal:
                # True where the key comes after the query: those scores are masked out.
                future = torch.arange(t, device=x.device)[None, :] > torch.arange(s, device=x.device)[:, None]
                scores = scores.masked_fill(future, float("-inf"))
            y = self.attn_drop(F.softmax(scores, dim=-1)) @ v
        return self.o(y.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


class FeedForward(nn.Module):
    """Position-wise MLP: ``gelu``/``relu`` (two matrices) or ``swiglu`` (three, Shazeer 2020)."""

    def __init__(self, hidden: int, ffn: int, *, activation: str = "gelu", bias: bool = True,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if activation not in ("gelu", "relu", "swiglu"):
            raise ValueError(f"FeedForward.activation: got {activation!r}; use 'gelu', 'relu' or 'swiglu'")
        self.activation = activation
        self.up = nn.Linear(hidden, ffn, bias=bias)
        self.gate = nn.Linear(hidden, ffn, bias=bias) if activation == "swiglu" else None
        self.down = nn.Linear(ffn, hidden, bias=bias)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            h = F.silu(self.gate(x)) * self.up(x)
        elif self.activation == "relu":
            h = F.relu(self.up(x))
        else:
            h = F.gelu(self.up(x))
        return self.down(self.drop(h))


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Normal(0, std) for matrices and embeddings, zeros for biases, ones for norm scales."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
