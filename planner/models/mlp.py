"""A residual MLP classifier on feature vectors, written as a chain of pipeline-friendly layers.

The model is ``embed → blocks.0 … blocks.{L-1} → head``; every layer takes one tensor and returns
one, so any contiguous run of layers is a valid pipeline stage (as for :mod:`planner.models.gpt`):

* ``embed``: ``Linear(input_dim → hidden)``;
* ``blocks.i``: ``x + fc2(gelu(fc1(norm(x))))`` with ``fc1: hidden → ffn`` and ``fc2: ffn → hidden``,
  the transformer's feed-forward block without the attention. ``fc1 → gelu → fc2`` is exactly the
  pair Megatron splits column- then row-parallel, which is why the family exists: it is the
  smallest model on which the planner's tensor splits and the runtime's generic tensor
  parallelism (:mod:`runtime.tensor_parallel_generic`) can be checked against one process;
* ``head``: ``LayerNorm`` then ``Linear(hidden → num_classes)``.

The residual and the pre-norm keep deep stacks trainable; they add no matmul FLOPs, so a block's
training FLOPs are the GEMM count ``3 · 2 · b · (hidden · ffn + ffn · hidden)`` (forward, input
gradient, weight gradient).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, kw_only=True)
class MLPConfig:
    input_dim: int
    hidden: int
    num_layers: int
    num_classes: int
    ffn_hidden: int | None = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("input_dim", "hidden", "num_layers", "num_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"MLPConfig.{name}: got {value!r}; expected a positive integer")
        if self.ffn_hidden is not None and (not isinstance(self.ffn_hidden, int) or self.ffn_hidden <= 0):
            raise ValueError(f"MLPConfig.ffn_hidden: got {self.ffn_hidden!r}; expected a positive integer "
                             "or null (4 x hidden)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MLPConfig.dropout: got {self.dropout}; expected 0 <= dropout < 1")

    @property
    def ffn(self) -> int:
        return self.ffn_hidden or 4 * self.hidden

    def param_count(self) -> int:
        """Analytic parameter count: weights, biases and the norms' scale and shift."""
        d, h, f, c, n = self.input_dim, self.hidden, self.ffn, self.num_classes, self.num_layers
        block = 2 * h + (h * f + f) + (f * h + h)
        return (d * h + h) + n * block + 2 * h + (h * c + c)

    def flops_per_sample(self) -> int:
        """Matmul FLOPs of one sample, forward + backward.

        Every GEMM costs 3 x its forward (forward, input gradient, weight gradient) except the first:
        the features need no gradient, so ``embed`` skips its input-gradient GEMM (``2 · d · h``).
        """
        d, h, f, c, n = self.input_dim, self.hidden, self.ffn, self.num_classes, self.num_layers
        return 3 * 2 * (d * h + n * 2 * h * f + h * c) - 2 * d * h


class MLPEmbed(nn.Module):
    def __init__(self, cfg: MLPConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(cfg.input_dim, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class MLPBlock(nn.Module):
    """Pre-norm residual feed-forward block: ``x + drop(fc2(gelu(fc1(norm(x)))))``."""

    def __init__(self, cfg: MLPConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.hidden)
        self.fc1 = nn.Linear(cfg.hidden, cfg.ffn)
        self.fc2 = nn.Linear(cfg.ffn, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.norm(x)))))


class MLPHead(nn.Module):
    def __init__(self, cfg: MLPConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.hidden)
        self.fc = nn.Linear(cfg.hidden, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))


class MLP(nn.Module):
    """``forward(features[b, input_dim]) -> logits[b, num_classes]``."""

    def __init__(self, cfg: MLPConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = MLPEmbed(cfg)
        self.blocks = nn.ModuleList(MLPBlock(cfg) for _ in range(cfg.num_layers))
        self.head = MLPHead(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)
