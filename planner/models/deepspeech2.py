"""Deep Speech 2 (Amodei et al. 2016): 2-D convolutions over a spectrogram, then bidirectional GRUs.

Layers::

    convs.0 → convs.1 → convs.2 → rnns.0 … rnns.{L-1} → head

Each conv block is Conv2d → BatchNorm2d → clipped ReLU (``min(max(x, 0), 20)``) over
``[b, channels, freq, time]``; the first recurrent layer flattens channels × freq into features.
Every recurrent layer is sequence-wise BatchNorm (not on the first) → bidirectional GRU, with
the two directions summed (as in the paper), so the width stays ``rnn_hidden``. ``head`` is
BatchNorm + a per-frame linear classifier over characters (the CTC output layer; the per-frame
cross-entropy the planner's runtime uses stands in for CTC, same FLOPs up to the loss).

``seq_len`` is the number of input spectrogram frames (10 ms hop); the first conv halves it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, kw_only=True)
class DeepSpeech2Config:
    freq_bins: int = 161  # 20 ms window, 16 kHz audio
    conv_channels: tuple[int, ...] = field(default=(32, 32, 96))
    conv_kernels: tuple[tuple[int, int], ...] = field(default=((41, 11), (21, 11), (21, 11)))
    conv_strides: tuple[tuple[int, int], ...] = field(default=((2, 2), (2, 1), (2, 1)))
    rnn_layers: int = 7
    rnn_hidden: int = 1024
    vocab_size: int = 29
    seq_len: int = 1500

    def __post_init__(self) -> None:
        object.__setattr__(self, "conv_channels", tuple(self.conv_channels))
        object.__setattr__(self, "conv_kernels", tuple(tuple(k) for k in self.conv_kernels))
        object.__setattr__(self, "conv_strides", tuple(tuple(s) for s in self.conv_strides))
        if not len(self.conv_channels) == len(self.conv_kernels) == len(self.conv_strides):
            raise ValueError("DeepSpeech2Config: conv_channels, conv_kernels and conv_strides differ in "
                             "length; give one entry per conv layer in each")

    def conv_out(self, freq: int, time: int) -> tuple[int, int]:
        """(freq, time) after the conv stack (padding k//2 on both axes)."""
        for (kf, kt), (sf, st) in zip(self.conv_kernels, self.conv_strides):
            freq = (freq + 2 * (kf // 2) - kf) // sf + 1
            time = (time + 2 * (kt // 2) - kt) // st + 1
        return freq, time

    @property
    def rnn_input(self) -> int:
        return self.conv_channels[-1] * self.conv_out(self.freq_bins, self.seq_len)[0]


class ConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: tuple[int, int], stride: tuple[int, int]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=(kernel[0] // 2, kernel[1] // 2))
        self.norm = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.hardtanh(self.norm(self.conv(x)), 0.0, 20.0)


class BiGRULayer(nn.Module):
    """``[b, t, features] → [b, t, hidden]``; the first layer also flattens ``[b, c, f, t]`` input."""

    def __init__(self, features: int, hidden: int, *, first: bool) -> None:
        super().__init__()
        self.first = first
        self.hidden = hidden
        self.norm = None if first else nn.BatchNorm1d(features)
        self.rnn = nn.GRU(features, hidden, batch_first=True, bidirectional=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            b, c, f, t = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
            x = x.reshape(b, c * f, t).transpose(1, 2)
        if self.norm is not None:
            x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        y = self.rnn(x)[0]
        b, t = y.shape[0], y.shape[1]
        return y.view(b, t, 2, self.hidden).sum(2)


class DS2Head(nn.Module):
    def __init__(self, cfg: DeepSpeech2Config) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(cfg.rnn_hidden)
        self.classifier = nn.Linear(cfg.rnn_hidden, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.norm(x.transpose(1, 2)).transpose(1, 2))


class DeepSpeech2(nn.Module):
    """``forward(spectrogram[b, 1, freq, time]) -> logits[b, ceil(time/2), vocab]``."""

    def __init__(self, cfg: DeepSpeech2Config) -> None:
        super().__init__()
        self.config = cfg
        channels = (1,) + cfg.conv_channels
        self.convs = nn.ModuleList(
            ConvBlock(channels[i], channels[i + 1], k, s)
            for i, (k, s) in enumerate(zip(cfg.conv_kernels, cfg.conv_strides)))
        self.rnns = nn.ModuleList(
            BiGRULayer(cfg.rnn_input if i == 0 else cfg.rnn_hidden, cfg.rnn_hidden, first=i == 0)
            for i in range(cfg.rnn_layers))
        self.head = DS2Head(cfg)

    def forward(self, spectrogram: torch.Tensor) -> torch.Tensor:
        x = spectrogram
        for conv in self.convs:
            x = conv(x)
        for rnn in self.rnns:
            x = rnn(x)
        return self.head(x)
