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
from runtime.layer_graph import StagePlan, is_chain, run_stage, stage_plans, trace_layers


class StageModule(nn.Module):
    """A chain of the full model's layers that keeps their full-model paths as parameter names."""

    def __init__(self, model: nn.Module, layer_names: tuple[str, ...], *, stage_index: int,
                 graph: StagePlan | None = None) -> None:
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
        self._graph = graph  # None: a chain of one-tensor layers; else the cut of the traced forward

    @property
    def stage_index(self) -> int:
        return self._stage_index

    @property
    def layer_paths(self) -> tuple[str, ...]:
        return self._paths

    def _chain(self) -> list[nn.Module]:
        return [self.get_submodule(path) for path in self._paths]

    @property
    def input_names(self) -> tuple[str, ...] | None:
        """The model inputs this stage takes by name (a non-chain model), or ``None`` (a chain: positional)."""
        return self._graph.input_names if self._graph is not None else None

    def _call(self, layer: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        if self._checkpoint_layers and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def forward(self, *received: torch.Tensor, **inputs: torch.Tensor):
        """A chain: ``forward(x)``. Otherwise ``forward(*what the previous stage sent, **model inputs)``."""
        received = tuple(_ContiguousGrad.apply(t) if t.requires_grad else t for t in received)
        if self._graph is not None:
            return run_stage(self._graph, self, received, inputs, self._call)
        (x,) = received
        for layer in self._chain():
            x = self._call(layer, x)
        return x


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous.

    The gradient of a stage's input is sent to the previous stage, and torch's pipelining allocates the
    receive buffer with the strides of that gradient (its backward metadata); gloo refuses a
    non-contiguous buffer. Layers that reshape their input (Deep Speech 2's first GRU flattens
    ``[b, c, f, t]`` and transposes to ``[b, t, c·f]``) produce a strided gradient, hence this.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


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


def build_stage_modules(model: nn.Module, stages: list[Stage], plan: Plan | None = None) -> list[StageModule]:
    """This rank's stages; a model that is not a chain of layers runs its traced forward, cut at the stages.

    Without ``plan`` the model is taken to be a chain (the stages' layers called in turn)."""
    if plan is None:
        return [StageModule(model, s.layer_names, stage_index=s.index) for s in stages]
    layer_names = plan.model.layer_names or tuple(n for s in plan.stages for n in s.layer_names)
    graph = trace_layers(model, layer_names)
    graphs: list[StagePlan | None] = [None] * len(plan.stages)
    if not is_chain(graph, layer_names):
        ordered = sorted(plan.stages, key=lambda s: s.index)
        graphs = list(stage_plans(graph, [s.layer_names for s in ordered]))
    return [StageModule(model, s.layer_names, stage_index=s.index, graph=graphs[s.index]) for s in stages]


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
