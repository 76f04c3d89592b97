"""ResNet (He et al. 2016) with bottleneck blocks, equivalent to torchvision's ``resnet50``.

Layers::

    stem → layer1.0 … layer1.2 → layer2.0 … layer2.3 → layer3.0 … layer3.5 → layer4.0 … layer4.2 → head

``stem`` is the 7×7/2 convolution, BatchNorm, ReLU and 3×3/2 max-pool; each stage ``layerN`` is an
``nn.Sequential`` of bottlenecks (1×1 → 3×3 → 1×1, expansion 4) whose first block changes width
and, from stage 2 on, halves the resolution (stride on the 3×3, as torchvision's "v1.5") and so
carries a projection shortcut; ``head`` is global average pooling and the classifier. Blocks of a
stage after the first have equal shapes, so the tracer groups them (``2 x layer1.*``, …).
Parameter count for the default config: 25,557,032, the same as torchvision.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, kw_only=True)
class ResNetConfig:
    depths: tuple[int, ...] = field(default=(3, 4, 6, 3))
    widths: tuple[int, ...] = field(default=(64, 128, 256, 512))
    expansion: int = 4
    stem_width: int = 64
    num_classes: int = 1000
    image_size: int = 224
    channels: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths", tuple(self.depths))
        object.__setattr__(self, "widths", tuple(self.widths))
        if len(self.depths) != len(self.widths):
            raise ValueError("ResNetConfig.depths and widths must have the same length")


class Stem(nn.Module):
    def __init__(self, cfg: ResNetConfig) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cfg.channels, cfg.stem_width, 7, stride=2, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(cfg.stem_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu(self.bn(self.conv(x))), 3, stride=2, padding=1)


class Bottleneck(nn.Module):
    def __init__(self, c_in: int, width: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.project = stride != 1 or c_in != c_out
        if self.project:
            self.down_conv = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
            self.down_bn = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        shortcut = self.down_bn(self.down_conv(x)) if self.project else x
        return F.relu(y + shortcut)


class ResNetHead(nn.Module):
    def __init__(self, features: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ResNet(nn.Module):
    """``forward(images[b, 3, H, W]) -> logits[b, classes]``."""

    def __init__(self, cfg: ResNetConfig) -> None:
        super().__init__()
        self.config = cfg
        self.stem = Stem(cfg)
        c_in = cfg.stem_width
        for i, (depth, width) in enumerate(zip(cfg.depths, cfg.widths)):
            c_out = width * cfg.expansion
            blocks = [Bottleneck(c_in if j == 0 else c_out, width, c_out, 2 if (j == 0 and i > 0) else 1)
                      for j in range(depth)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            c_in = c_out
        self.head = ResNetHead(c_in, cfg.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images)
        for i in range(len(self.config.depths)):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.head(x)
