"""BERT (Devlin et al. 2019): a post-norm transformer encoder with a masked-LM head.

Layers: ``embed → blocks.0 … blocks.{L-1} → head``, each one tensor in and one out. The head is
the MLM head (dense → GELU → LayerNorm → decoder tied to the word embedding, plus a vocabulary
bias); the next-sentence head and the pooler are left out (they are 0.3% of BERT-large and not
on the path of the MLM loss). Token types are all zero, so a batch is one ``[b, s]`` id tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from planner.models.blocks import Attention, FeedForward, init_weights


@dataclass(frozen=True, kw_only=True)
class BertConfig:
    num_layers: int
    hidden: int
    heads: int
    ffn_hidden: int | None = None
    vocab_size: int = 30522
    max_positions: int = 512
    type_vocab_size: int = 2
    seq_len: int = 512
    dropout: float = 0.1
    eps: float = 1e-12

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"BertConfig.heads: {self.heads} does not divide hidden={self.hidden}")
        if self.seq_len > self.max_positions:
            raise ValueError(f"BertConfig.seq_len: {self.seq_len} exceeds max_positions={self.max_positions}")

    @property
    def ffn(self) -> int:
        return self.ffn_hidden or 4 * self.hidden

    def param_count(self) -> int:
        """Embeddings + L blocks + MLM head (decoder weight tied to the word embedding)."""
        h, f, v = self.hidden, self.ffn, self.vocab_size
        embed = (v + self.max_positions + self.type_vocab_size) * h + 2 * h
        block = 4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h
        head = h * h + h + 2 * h + v
        return embed + self.num_layers * block + head


class BertEmbedding(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.position = nn.Embedding(cfg.max_positions, cfg.hidden)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden)
        self.norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.word(tokens) + self.position(positions) + self.token_type(torch.zeros_like(tokens))
        return self.drop(self.norm(x))


class BertBlock(nn.Module):
    """Post-norm: ``x = LN(x + drop(attn(x)))``, ``x = LN(x + drop(ffn(x)))``."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attn = Attention(cfg.hidden, cfg.heads, dropout=cfg.dropout)
        self.attn_drop = nn.Dropout(cfg.dropout)
        self.norm1 = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.ffn = FeedForward(cfg.hidden, cfg.ffn, activation="gelu")
        self.ffn_drop = nn.Dropout(cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.hidden, eps=cfg.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attn_drop(self.attn(x)))
        return self.norm2(x + self.ffn_drop(self.ffn(x)))


class BertMLMHead(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden, cfg.hidden)
        self.norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.decoder = nn.Linear(cfg.hidden, cfg.vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(x))))


class Bert(nn.Module):
    """``forward(tokens[b, s]) -> logits[b, s, vocab]``."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = BertEmbedding(cfg)
        self.blocks = nn.ModuleList(BertBlock(cfg) for _ in range(cfg.num_layers))
        self.head = BertMLMHead(cfg)
        init_weights(self)
        self.head.decoder.weight = self.embed.word.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)
