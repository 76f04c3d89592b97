"""Build the planned model and cut it into the plan's pipeline stages.

Every preset model is a chain of layers (``embed, blocks.0 … blocks.{L-1}, head`` for a GPT), each
taking one tensor and returning one. A stage is the contiguous run ``layer_names[start:stop]`` that
the plan gives it, so a :class:`StageModule` is an ``nn.Sequential`` of those layers with one
difference: it keeps every layer at its path in the full model (``blocks.3`` stays ``blocks.3``, not
``0``). Parameter names therefore never depend on the plan, which is what lets a checkpoint saved
under one plan be loaded under another.

The full model is built on every rank from the same seed on the CPU and the layers a rank does not
run are dropped, so all ranks start from the weights a single process would have.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from planner.models import ModelPreset, load_preset
from planner.plan import Plan, Stage
from runtime.errors import RunCheckError


class StageModule(nn.Module):
    """A chain of the full model's layers that keeps their full-model paths as parameter names."""

    def __init__(self, model: nn.Module, layer_names: tuple[str, ...], *, stage_index: int) -> None:
        super().__init__()
        # Underscored names: a model may well have a layer called ``layers`` or ``index``.
        self._stage_index = stage_index
        self._paths = tuple(layer_names)
        for path in self._paths:
            parent: nn.Module = self
            *heads, leaf = path.split(".")
            for name in heads:
                if not hasattr(parent, name):
                    parent.add_module(name, nn.Module())
                parent = getattr(parent, name)
            parent.add_module(leaf, model.get_submodule(path))
        self._checkpoint_layers = False  # set by runtime.recompute for recompute="full"

    @property
    def stage_index(self) -> int:
        return self._stage_index

    @property
    def layer_paths(self) -> tuple[str, ...]:
        return self._paths

    def _chain(self) -> list[nn.Module]:
        return [self.get_submodule(path) for path in self._paths]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self._chain():
            if self._checkpoint_layers and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint

                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x


@dataclass(frozen=True)
class TiedParameter:
    """One parameter reachable under several names (a tied embedding): ``names[i]`` lives in ``stages[i]``."""

    names: tuple[str, ...]
    stages: tuple[int, ...]


def resolve_preset(plan: Plan, preset: ModelPreset | None = None) -> ModelPreset:
    if preset is not None:
        return preset
    if not plan.model.preset:
        raise RunCheckError(
            f"model.preset: the plan's model {plan.model.name!r} is not a preset, so the runtime cannot rebuild "
            "it by name; pass the model preset with runtime.train(plan, preset=...) or plan a preset model")
    return load_preset(plan.model.preset)


def build_model(preset: ModelPreset, *, seed: int) -> nn.Module:
    """The full model in fp32 on the CPU, initialised from ``seed`` (identical on every rank)."""
    model = preset.build(device="cpu", dtype=torch.float32, seed=seed)
    model.train()
    return model


def stages_of_rank(plan: Plan, rank: int) -> list[Stage]:
    """The plan's stages that ``rank`` runs, in model order."""
    return sorted((s for s in plan.stages if rank in s.ranks), key=lambda s: s.index)


def build_stage_modules(model: nn.Module, stages: list[Stage]) -> list[StageModule]:
    return [StageModule(model, s.layer_names, stage_index=s.index) for s in stages]


def _stage_of_param(name: str, stages: tuple[Stage, ...]) -> int:
    for stage in stages:
        if any(name == layer or name.startswith(layer + ".") for layer in stage.layer_names):
            return stage.index
    return -1


def tied_parameters(model: nn.Module, plan: Plan) -> list[TiedParameter]:
    """Parameters shared by several names, with the stage each name falls in."""
    by_id: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
    tied = []
    for names in by_id.values():
        if len(names) > 1:
            tied.append(TiedParameter(tuple(names), tuple(_stage_of_param(n, plan.stages) for n in names)))
    return tied


def check_layer_coverage(model: nn.Module, plan: Plan) -> None:
    """Every parameter must fall in exactly one planned stage, or training would silently skip it."""
    for name, _ in model.named_parameters(remove_duplicate=False):
        if _stage_of_param(name, plan.stages) < 0:
            raise RunCheckError(
                f"stages: parameter {name!r} of model {plan.model.name} is in no planned stage (the stages cover "
                f"layers {[n for s in plan.stages for n in s.layer_names]}); re-create the plan for this model")
    for stage in plan.stages:
        for layer in stage.layer_names:
            try:
                model.get_submodule(layer)
            except AttributeError as exc:
                raise RunCheckError(f"stages[{stage.index}].layer_names: {layer!r} is not a module of model "
                                    f"{plan.model.name}; re-create the plan for this model") from exc


def loss_function(preset: ModelPreset) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Mean loss of one micro-batch, as the model family defines it."""
    kind = preset.spec.loss
    if kind == "lm-cross-entropy":
        def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return lm_loss
    if kind == "cross-entropy":
        def ce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(logits.float(), targets)
        return ce_loss
    raise RunCheckError(f"loss: model family {preset.family!r} uses loss {kind!r}, which the runtime does not know; "
                        "use 'lm-cross-entropy' or 'cross-entropy'")
