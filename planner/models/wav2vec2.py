"""wav2vec 2.0 (Baevski et al. 2020), in its fine-tuning shape: conv feature encoder + transformer.

Layers::

    features.0 … features.6 → project → pos_embed → blocks.0 … blocks.{L-1} → head

``features`` is the 7-layer 1-D convolution stack (512 channels, strides 5,2,2,2,2,2,2, i.e. one
frame per 20 ms of 16 kHz audio) with layer norm after each conv (the LARGE "LV-60" variant);
``project`` is LayerNorm + Linear to the model width; ``pos_embed`` adds the grouped-convolution
relative position embedding; blocks are pre-norm (``do_stable_layer_norm``); ``head`` is the
final LayerNorm and a per-frame character classifier (the CTC fine-tuning head).

Differences from the original, on purpose: the pre-training quantizer and contrastive loss are
not modelled (the head's per-frame cross-entropy stands in for CTC; same FLOPs up to the loss),
and the position convolution carries a plain weight instead of a weight-norm pair (128 fewer
parameters), so that the module traces without parametrizations.

``seq_len`` means transformer frames throughout: a batch of ``frames`` frames is
``320·(frames-1) + 400`` audio samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from planner.models.blocks import Attention, FeedForward, init_weights


@dataclass(frozen=True, kw_only=True)
class Wav2Vec2Config:
    num_layers: int
    hidden: int
    heads: int
    ffn_hidden: int
    conv_channels: int = 512
    conv_kernels: tuple[int, ...] = field(default=(10, 3, 3, 3, 3, 2, 2))
    conv_strides: tuple[int, ...] = field(default=(5, 2, 2, 2, 2, 2, 2))
    conv_bias: bool = True
    pos_kernel: int = 128
    pos_groups: int = 16
    vocab_size: int = 32
    seq_len: int = 781  # frames; 250,000 samples = the paper's 15.6 s crop
    dropout: float = 0.1
    eps: float = 1e-5

    def __post_init__(self) -> None:
        object.__setattr__(self, "conv_kernels", tuple(self.conv_kernels))
        object.__setattr__(self, "conv_strides", tuple(self.conv_strides))
        if len(self.conv_kernels) != len(self.conv_strides):
            raise ValueError("Wav2Vec2Config.conv_kernels and conv_strides must have the same length")

    def samples_for(self, frames: int) -> int:
        """Audio samples that the conv stack turns into exactly ``frames`` frames."""
        n = frames
        for k, s in zip(reversed(self.conv_kernels), reversed(self.conv_strides)):
            n = (n - 1) * s + k
        return n

    def frames_for(self, samples: int) -> int:
        n = samples
        for k, s in zip(self.conv_kernels, self.conv_strides):
            n = (n - k) // s + 1
        return n


class ConvLayer(nn.Module):
    """Conv1d → LayerNorm over channels → GELU."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, eps: float, bias: bool) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride=stride, bias=bias)
        self.norm = nn.LayerNorm(c_out, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return F.gelu(self.norm(x.transpose(1, 2)).transpose(1, 2))


class FeatureProjection(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.conv_channels, eps=cfg.eps)
        self.proj = nn.Linear(cfg.conv_channels, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(self.norm(features.transpose(1, 2))))


class ConvPositionEmbedding(nn.Module):
    """``x + GELU(grouped_conv(x))`` with the extra right frame (even kernel) removed."""

    def __init__(self, cfg: Wav2Vec2Config) -> None:
        super().__init__()
        self.conv = nn.Conv1d(cfg.hidden, cfg.hidden, cfg.pos_kernel, padding=cfg.pos_kernel // 2,
                              groups=cfg.pos_groups)
        self.trim = 1 if cfg.pos_kernel % 2 == 0 else 0
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = self.conv(x.transpose(1, 2))
        if self.trim:
            pos = pos[:, :, :-self.trim]
        return self.drop(x + F.gelu(pos).transpose(1, 2))


class Wav2Vec2Block(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.attn = Attention(cfg.hidden, cfg.heads, dropout=cfg.dropout)
        self.drop1 = nn.Dropout(cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.ffn = FeedForward(cfg.hidden, cfg.ffn_hidden, activation="gelu", dropout=cfg.dropout)
        self.drop2 = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop1(self.attn(self.norm1(x)))
        return x + self.drop2(self.ffn(self.norm2(x)))


class CTCHead(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.hidden, cfg.vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.drop(self.norm(x)))


class Wav2Vec2(nn.Module):
    """``forward(audio[b, samples]) -> logits[b, frames, vocab]``."""

    def __init__(self, cfg: Wav2Vec2Config) -> None:
        super().__init__()
        self.config = cfg
        channels = [1] + [cfg.conv_channels] * len(cfg.conv_kernels)
        self.features = nn.ModuleList(
            ConvLayer(channels[i], channels[i + 1], k, s, cfg.eps, cfg.conv_bias)
            for i, (k, s) in enumerate(zip(cfg.conv_kernels, cfg.conv_strides)))
        self.project = FeatureProjection(cfg)
        self.pos_embed = ConvPositionEmbedding(cfg)
        self.blocks = nn.ModuleList(Wav2Vec2Block(cfg) for _ in range(cfg.num_layers))
        self.head = CTCHead(cfg)
        init_weights(self)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        x = audio.unsqueeze(1)
        for layer in self.features:
            x = layer(x)
        x = self.pos_embed(self.project(x))
        for block in self.blocks:
            x = block(x)
        return self.head(x)
