"""Vision Transformer (Dosovitskiy et al. 2021): patchify, pre-norm encoder, class-token head.

Layers: ``embed → blocks.0 … blocks.{L-1} → head``. ``embed`` is the patch convolution plus the
class token and learned position embedding, so an image ``[b, 3, H, W]`` becomes a sequence of
``(H/p)·(W/p) + 1`` tokens; ``head`` is the final LayerNorm and a linear classifier on the class
token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from planner.models.blocks import Attention, FeedForward, init_weights


@dataclass(frozen=True, kw_only=True)
class ViTConfig:
    num_layers: int
    hidden: int
    heads: int
    ffn_hidden: int
    patch_size: int = 16
    image_size: int = 224
    channels: int = 3
    num_classes: int = 1000
    dropout: float = 0.1
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"ViTConfig.patch_size: {self.patch_size} does not divide image_size="
                             f"{self.image_size}")

    @property
    def seq_len(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    def param_count(self) -> int:
        h, f, p = self.hidden, self.ffn_hidden, self.patch_size
        embed = self.channels * p * p * h + h + h + self.seq_len * h
        block = 4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h
        head = 2 * h + h * self.num_classes + self.num_classes
        return embed + self.num_layers * block + head


class PatchEmbedding(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cfg.channels, cfg.hidden, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden))
        self.position = nn.Parameter(torch.zeros(1, cfg.seq_len, cfg.hidden))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.proj(images).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return self.drop(torch.cat([cls, x], dim=1) + self.position)


class ViTBlock(nn.Module):
    """Pre-norm: ``x += drop(attn(LN(x)))``, ``x += drop(mlp(LN(x)))``."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.attn = Attention(cfg.hidden, cfg.heads, dropout=cfg.dropout)
        self.drop1 = nn.Dropout(cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.mlp = FeedForward(cfg.hidden, cfg.ffn_hidden, activation="gelu", dropout=cfg.dropout)
        self.drop2 = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop1(self.attn(self.norm1(x)))
        return x + self.drop2(self.mlp(self.norm2(x)))


class ViTHead(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.classifier = nn.Linear(cfg.hidden, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.norm(x)[:, 0])


class ViT(nn.Module):
    """``forward(images[b, 3, H, W]) -> logits[b, classes]``."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = PatchEmbedding(cfg)
        self.blocks = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.num_layers))
        self.head = ViTHead(cfg)
        init_weights(self)
        nn.init.normal_(self.embed.position, std=0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images)
        for block in self.blocks:
            x = block(x)
        return self.head(x)
