"""Model presets: JSON configs in ``datasets/models/`` built into ``nn.Module`` by family builders.

A preset names a *family* (the architecture code in this package) and its config. Building on
the meta device is free, so a 175B-parameter model is planned without allocating its weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from planner.errors import SpecError
from planner.paths import datasets_dir


@dataclass(frozen=True, kw_only=True)
class Family:
    """How to build a family's module, make a synthetic batch for it, and score its output."""

    build: Callable[[dict[str, Any]], nn.Module]
    sample_input: Callable[[dict[str, Any], int, int | None, torch.device | str], tuple[torch.Tensor, ...]]
    targets: Callable[[dict[str, Any], int, int | None, torch.Generator | None], torch.Tensor]
    loss: str  # "lm-cross-entropy" or "cross-entropy"
    seq_len: Callable[[dict[str, Any]], int | None]


def _gpt_build(cfg: dict[str, Any]) -> nn.Module:
    from planner.models.gpt import GPT, GPTConfig

    return GPT(GPTConfig(**cfg))


def _gpt_sample(cfg: dict[str, Any], batch: int, seq_len: int | None, device: torch.device | str):
    s = seq_len or cfg.get("seq_len", 2048)
    return (torch.zeros(batch, s, dtype=torch.long, device=device),)


def _gpt_targets(cfg: dict[str, Any], batch: int, seq_len: int | None, gen: torch.Generator | None):
    s = seq_len or cfg.get("seq_len", 2048)
    return torch.randint(0, cfg.get("vocab_size", 51200), (batch, s), generator=gen)


FAMILIES: dict[str, Family] = {
    "gpt": Family(build=_gpt_build, sample_input=_gpt_sample, targets=_gpt_targets, loss="lm-cross-entropy",
                  seq_len=lambda cfg: cfg.get("seq_len", 2048)),
}


@dataclass(frozen=True, kw_only=True)
class ModelPreset:
    """A named model config from ``datasets/models/<name>.json``."""

    name: str
    family: str
    config: dict[str, Any]
    description: str = ""
    source: str = ""
    tags: tuple[str, ...] = field(default=())

    @property
    def spec(self) -> Family:
        return FAMILIES[self.family]

    @property
    def seq_len(self) -> int | None:
        return self.spec.seq_len(self.config)

    def build(self, *, device: str | torch.device = "meta", dtype: torch.dtype = torch.float32,
              seed: int | None = None) -> nn.Module:
        """The module, with weights on ``device`` (``meta`` allocates nothing)."""
        if seed is not None:
            torch.manual_seed(seed)
        with torch.device(device):
            model = self.spec.build(dict(self.config))
        return model.to(dtype=dtype)

    def sample_input(self, batch: int, seq_len: int | None = None,
                     device: str | torch.device = "meta") -> tuple[torch.Tensor, ...]:
        return self.spec.sample_input(self.config, batch, seq_len, device)

    def param_count(self) -> int:
        model = self.build(device="meta")
        return sum(p.numel() for p in model.parameters())


def list_presets() -> list[str]:
    return sorted(p.stem for p in (datasets_dir() / "models").glob("*.json"))


def load_preset(name: str) -> ModelPreset:
    """Read a preset by name; a bad name lists the close matches."""
    from planner.cluster import _edit_distance

    path = datasets_dir() / "models" / f"{name}.json"
    if not path.is_file():
        known = list_presets()
        close = sorted(known, key=lambda k: _edit_distance(k, name))[:3]
        raise SpecError("model", name, f"no such model preset; did you mean one of {close}? "
                        "`python -m planner models` lists them all")
    data = json.loads(path.read_text())
    family = data.get("family")
    if family not in FAMILIES:
        raise SpecError("family", family, f"unknown model family in {path}; known: {sorted(FAMILIES)}")
    return ModelPreset(name=data.get("name", name), family=family, config=data.get("config", {}),
                       description=data.get("description", ""), source=data.get("source", ""),
                       tags=tuple(data.get("tags", ())))
