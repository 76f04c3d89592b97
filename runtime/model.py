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

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from planner.models import ModelPreset, load_preset
from planner.plan import Plan, Stage
from runtime.errors import RunCheckError
from runtime.layer_graph import StagePlan, export_layers, is_chain, run_stage, stage_plans, trace_layers


def without_cache(params: Sequence[str], positional: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with ``use_cache=False`` where a forward taking the argument names ``params`` has a
    ``use_cache`` (Hugging Face) that a call with ``positional`` positional arguments and ``kwargs`` leaves
    out. Training reads no cache, and with one filled in forward a recomputed layer runs other ops than the
    forward did (per-op checkpointing's replay refuses that); the traced stages' sample is made the same way
    (:func:`runtime.parallelize._micro_batch_kwargs`)."""
    if "use_cache" in params and params.index("use_cache") >= positional and "use_cache" not in kwargs:
        return {**kwargs, "use_cache": False}
    return kwargs


class StageModule(nn.Module):
    """A chain of the full model's layers that keeps their full-model paths as parameter names."""

    def __init__(self, model: nn.Module, layer_names: tuple[str, ...], *, stage_index: int,
                 graph: StagePlan | None = None, whole: bool = False, output_spec: Any = None) -> None:
        super().__init__()
        # Underscored names: a model may well have a layer called ``layers`` or ``index``.
        self._stage_index = stage_index
        self._paths = tuple(layer_names)
        # Stateless layers of other stages this stage's graph calls again (see layer_graph.stage_plans).
        borrowed = sorted({n.target for n in graph.nodes if n.op == "call_module"} - set(self._paths)) if graph else []
        for path in (*self._paths, *borrowed):
            parent: nn.Module = self
            *heads, leaf = path.split(".")
            for name in heads:
                if not hasattr(parent, name):
                    parent.add_module(name, nn.Module())
                parent = getattr(parent, name)
            parent.add_module(leaf, model.get_submodule(path))
        for path in loose_attributes(graph, (*self._paths, *borrowed)):  # read by this stage's glue
            _attach(self, path, model)
        self._checkpoint_layers = False  # set by runtime.recompute for recompute="full"
        self._graph = graph  # None: a chain of one-tensor layers; else the cut of the traced forward
        # whole: the only stage, run by the model's own forward (a list, so that it is not a submodule)
        self._whole = [model] if whole else []
        self._forward_params = tuple(inspect.signature(model.forward).parameters) if whole else ()
        self.output_spec = output_spec  # rebuilds the model's return value from a graph's flat outputs

    @property
    def stage_index(self) -> int:
        return self._stage_index

    @property
    def layer_paths(self) -> tuple[str, ...]:
        return self._paths

    @property
    def is_whole(self) -> bool:
        """Whether this stage is the whole model, run by the model's own forward."""
        return bool(self._whole)

    def _chain(self) -> list[nn.Module]:
        return [self.get_submodule(path) for path in self._paths]

    @property
    def input_names(self) -> tuple[str, ...] | None:
        """The model inputs this stage takes by name (a non-chain model), or ``None`` (a chain: positional)."""
        return self._graph.input_names if self._graph is not None else None

    def _call(self, layer: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self._checkpoint_layers and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(layer, *args, use_reentrant=False, **kwargs)
        return layer(*args, **kwargs)

    def forward(self, *received: torch.Tensor, **inputs: torch.Tensor):
        """A chain: ``forward(x)``. Otherwise ``forward(*what the previous stage sent, **model inputs)``."""
        if self._whole:  # the model is one stage: its own forward, on its own (sharded) layers
            return self._whole[0](*received, **without_cache(self._forward_params, len(received), inputs))
        received = tuple(_ContiguousGrad.apply(t) if t.requires_grad else t for t in received)
        if self._graph is not None:
            return _not_views(run_stage(self._graph, self, received, inputs, self._call))
        (x,) = received
        for layer in self._chain():
            x = self._call(layer, x)
        return x


def loose_attributes(graph: StagePlan | None, layer_paths: tuple[str, ...]) -> list[str]:
    """Parameters and buffers outside every layer that ``graph`` reads (``get_attr``): a learned position table
    as a bare ``nn.Parameter`` on the model. Each goes with the stage whose glue reads it."""
    if graph is None:
        return []
    targets = {str(n.target) for n in graph.nodes if n.op == "get_attr"}
    return sorted(t for t in targets if not any(t == p or t.startswith(p + ".") for p in layer_paths))


def _attach(stage: nn.Module, path: str, model: nn.Module) -> None:
    """Register ``model``'s attribute at ``path`` on ``stage`` at the same path (a parameter stays a parameter)."""
    owner_path, _, leaf = path.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    parent: nn.Module = stage
    for name in owner_path.split(".") if owner_path else []:
        if not hasattr(parent, name):
            parent.add_module(name, nn.Module())
        parent = getattr(parent, name)
    if leaf in owner._parameters:
        parent.register_parameter(leaf, owner._parameters[leaf])
    elif leaf in owner._buffers:
        parent.register_buffer(leaf, owner._buffers[leaf], persistent=leaf not in owner._non_persistent_buffers_set)
    else:  # a plain tensor attribute: read, never trained
        setattr(parent, leaf, getattr(owner, leaf))


def _not_views(out: Any) -> Any:
    """A received value sent on unchanged (a skip across several stages) is a view of what arrived; torch's
    split backward (zb-v, zb-h1: input gradients before weight gradients) detaches stage outputs in place,
    which a view refuses. Such outputs are copied."""
    if isinstance(out, tuple):
        return tuple(t.clone() if isinstance(t, torch.Tensor) and t._is_view() else t for t in out)
    return out.clone() if isinstance(out, torch.Tensor) and out._is_view() else out


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
            "it by name; give your model: on the command line --model PKG.MODULE:FACTORY (docs/train-your-own-"
            "model.md), in Python runtime.parallelize(model, plan) or runtime.train(plan, preset=...)")
    return load_preset(plan.model.preset)


def build_model(preset: ModelPreset, *, seed: int) -> nn.Module:
    """The full model in fp32 on the CPU, initialised from ``seed`` (identical on every rank)."""
    model = preset.build(device="cpu", dtype=torch.float32, seed=seed)
    model.train()
    return model


def stages_of_rank(plan: Plan, rank: int) -> list[Stage]:
    """The plan's stages that ``rank`` runs, in model order."""
    return sorted((s for s in plan.stages if rank in s.ranks), key=lambda s: s.index)


def build_stage_modules(model: nn.Module, stages: list[Stage], plan: Plan | None = None, *,
                        sample_kwargs: dict[str, Any] | None = None, device: torch.device | None = None,
                        whole_if_single: bool = False) -> list[StageModule]:
    """This rank's stages; a model that is not a chain of layers runs its traced forward, cut at the stages.

    Without ``plan`` the model is taken to be a chain (the stages' layers called in turn). The forward is
    traced with ``torch.fx``; when fx cannot trace it and ``sample_kwargs`` (one micro-batch of the model's
    inputs, by name) is given, with ``torch.export`` (:func:`runtime.layer_graph.export_layers`). With
    ``whole_if_single`` a plan of one stage runs the model's own forward: nothing is cut, so nothing is traced.
    """
    if plan is None:
        return [StageModule(model, s.layer_names, stage_index=s.index) for s in stages]
    if whole_model_plan(model, plan):  # the one stage holds the model's children and its own parameters
        out = [StageModule(model, tuple(n for n, _ in model.named_children()), stage_index=s.index, whole=True)
               for s in stages]
        for stage in out:
            for name in [*model._parameters, *model._buffers]:
                _attach(stage, name, model)
        return out
    layer_names = plan.model.layer_names or tuple(n for s in plan.stages for n in s.layer_names)
    # By tensor: a tied one is inside when any of its names is (T5's ``shared.weight`` is encoder.embed_tokens')
    inside = {id(p) for n, p in model.named_parameters(remove_duplicate=False)
              if any(n.startswith(x + ".") for x in layer_names)}
    outside = [n for n, p in model.named_parameters() if id(p) not in inside]
    if whole_if_single and len(plan.stages) == 1 and not outside:  # (a parameter outside every layer would be
        # missing from the stage's parameters: optimizer, DDP and FSDP; the cut forward below registers it)
        return [StageModule(model, s.layer_names, stage_index=s.index, whole=True) for s in stages]
    output_spec = None
    try:
        graph = trace_layers(model, layer_names)
    except RunCheckError:
        if sample_kwargs is None:
            raise
        graph, output_spec = export_layers(model, layer_names, sample_kwargs, device or torch.device("cpu"))
    graphs: list[StagePlan | None] = [None] * len(plan.stages)
    if output_spec is not None or not is_chain(graph, layer_names):
        ordered = sorted(plan.stages, key=lambda s: s.index)
        stateless = frozenset(n for n in layer_names if not any(True for _ in model.get_submodule(n).parameters())
                              and not any(True for _ in model.get_submodule(n).buffers()))
        graphs = list(stage_plans(graph, [s.layer_names for s in ordered], stateless))
        readers: dict[str, list[int]] = {}
        for k, g in enumerate(graphs):
            for attr in loose_attributes(g, layer_names):
                readers.setdefault(attr, []).append(k)
        params = dict(model.named_parameters(remove_duplicate=False))
        for attr, ks in readers.items():
            if len(ks) > 1 and attr in params:  # a buffer is read, never trained: each stage may hold it
                raise RunCheckError(f"stages: parameter {attr!r} (outside every layer) is read by stages {ks}; the "
                                    "runtime keeps it in one stage. Move it into a layer (a module of its own), or "
                                    "re-plan so that its readers share a stage")
    return [StageModule(model, s.layer_names, stage_index=s.index, graph=graphs[s.index], output_spec=output_spec)
            for s in stages]


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
        # A name outside every layer (T5's ``shared.weight``, reached as the embeddings' and head's) is dropped.
        placed = [(n, k) for n in names if (k := _stage_of_param(n, plan.stages)) >= 0]
        if len(placed) > 1:
            tied.append(TiedParameter(tuple(n for n, _ in placed), tuple(k for _, k in placed)))
    return tied


def whole_model_plan(model: nn.Module, plan: Plan) -> bool:
    """A plan whose one layer is the whole model: the planner names a model without a stack of layers (a flat
    MLP, one block called several times, a forward it could only trace whole) after its class."""
    names = plan.model.layer_names
    return (len(names) == 1 and len(plan.stages) == 1 and names[0] == type(model).__name__
            and names[0] not in dict(model.named_modules()))


def check_layer_coverage(model: nn.Module, plan: Plan) -> None:
    """Every parameter must fall in a planned stage under one of its names, or training would silently skip it."""
    if whole_model_plan(model, plan):  # one stage holding everything
        return
    placed = {id(p) for name, p in model.named_parameters(remove_duplicate=False)
              if _stage_of_param(name, plan.stages) >= 0}
    if len(placed) < len({id(p) for p in model.parameters()}):  # outside every layer: placed if the forward reads it
        placed |= _read_by_forward(model, plan)
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) not in placed:
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


def _read_by_forward(model: nn.Module, plan: Plan) -> set[int]:
    """Ids of the parameters the model's top-level forward reads directly (``get_attr``); empty if fx cannot trace."""
    layer_names = plan.model.layer_names or tuple(n for s in plan.stages for n in s.layer_names)
    try:
        graph = trace_layers(model, layer_names)
    except RunCheckError:
        return set()
    reads = [str(n.target) for n in graph.nodes if n.op == "get_attr"]
    params = dict(model.named_parameters(remove_duplicate=False))
    return {id(params[t]) for t in reads if t in params}


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
