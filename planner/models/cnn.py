"""A plain convolutional classifier, written as a chain of pipeline-friendly layers.

The model is ``stem → blocks.0 … blocks.{N-1} → head``; every layer takes one tensor and returns one:

* ``stem``: 3×3 convolution (stride ``stem_stride``) ``channels → widths[0]``, GroupNorm, GELU;
* ``blocks.i``: 3×3 convolution, GroupNorm, GELU. The blocks form stages, one per entry of
  ``widths`` with ``depths[k]`` blocks each; the first block of every stage after the first
  doubles the stride (halves height and width) and changes the width;
* ``head``: global average pooling, then ``Linear(widths[-1] → num_classes)``.

GroupNorm, not BatchNorm: it normalises each sample on its own and keeps no running statistics, so
a micro-batch, a data-parallel shard and the whole batch see the same numbers, and a pipelined or
data-parallel run matches one process exactly (BatchNorm's batch statistics would differ with
the micro-batch size and its running-stat buffers would need syncing).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, kw_only=True)
class CNNConfig:
    widths: tuple[int, ...] = field(default=(16, 32))
    depths: tuple[int, ...] = field(default=(1, 1))
    num_classes: int = 10
    image_size: int = 32
    channels: int = 3
    stem_stride: int = 1
    groups: int = 4  # GroupNorm groups; must divide every width

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(self.widths))
        object.__setattr__(self, "depths", tuple(self.depths))
        if not self.widths or len(self.widths) != len(self.depths):
            raise ValueError(f"CNNConfig.depths: {list(self.depths)} and widths {list(self.widths)} must be "
                             "non-empty and of the same length (one depth per stage)")
        for name in ("num_classes", "image_size", "channels", "stem_stride", "groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"CNNConfig.{name}: got {value!r}; expected a positive integer")
        for w in self.widths:
            if not isinstance(w, int) or w <= 0 or w % self.groups:
                raise ValueError(f"CNNConfig.widths: {w!r} is not a positive multiple of groups={self.groups}; "
                                 "choose widths divisible by groups")
        if any(not isinstance(d, int) or d <= 0 for d in self.depths):
            raise ValueError(f"CNNConfig.depths: {list(self.depths)}; every stage needs at least one block")

    def block_shapes(self) -> list[tuple[int, int, int]]:
        """``(c_in, c_out, stride)`` of every block, in order."""
        shapes, c_in = [], self.widths[0]
        for k, (width, depth) in enumerate(zip(self.widths, self.depths)):
            for j in range(depth):
                shapes.append((c_in, width, 2 if (k > 0 and j == 0) else 1))
                c_in = width
        return shapes

    def param_count(self) -> int:
        """Analytic parameter count: convolutions with bias, GroupNorm scale and shift, the head."""
        def conv(c_in: int, c_out: int) -> int:
            return 9 * c_in * c_out + c_out + 2 * c_out  # weight, bias, norm

        body = sum(conv(c_in, c_out) for c_in, c_out, _ in self.block_shapes())
        return conv(self.channels, self.widths[0]) + body + self.widths[-1] * self.num_classes + self.num_classes


class ConvNormAct(nn.Module):
    """3×3 convolution (padding 1), GroupNorm, GELU."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.norm = nn.GroupNorm(groups, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.norm(self.conv(x)))


class CNNHead(nn.Module):
    def __init__(self, features: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


class CNN(nn.Module):
    """``forward(images[b, channels, H, W]) -> logits[b, num_classes]``."""

    def __init__(self, cfg: CNNConfig) -> None:
        super().__init__()
        self.config = cfg
        self.stem = ConvNormAct(cfg.channels, cfg.widths[0], cfg.stem_stride, cfg.groups)
        self.blocks = nn.ModuleList(ConvNormAct(c_in, c_out, stride, cfg.groups)
                                    for c_in, c_out, stride in cfg.block_shapes())
        self.head = CNNHead(cfg.widths[-1], cfg.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images)
        for block in self.blocks:
            x = block(x)
        return self.head(x)
