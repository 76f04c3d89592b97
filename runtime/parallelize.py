"""``parallelize(model, plan, loss_fn=...)``: the runtime trains the user's own model in the user's own loop.

Under ``torchrun`` (or any launcher that sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``) a training script
hands its model and the plan made for it to :func:`parallelize`, which applies the plan on this rank
in the order :mod:`runtime.train` applies it to presets, with the same code:

1. check the model against the plan: the planner's fingerprint (:func:`runtime.checks.check_module_fingerprint`),
   every parameter in a planned stage, the tensor-parallel styles, the schedule;
2. keep this rank's stages (:func:`runtime.model.build_stage_modules`): one stage runs the model's own
   forward; several are cut from an fx trace, or a ``torch.export`` graph when fx cannot trace the
   forward (Hugging Face models). The layers of other stages are freed (moved to the meta device);
3. tensor parallelism (:func:`runtime.tensor_parallel.apply_tensor_parallel`: generic Linear/Embedding
   splits from the plan's placements), recompute, then data parallelism (:mod:`runtime.data_parallel`:
   DDP or a flat all-reduce, ZeRO-1/2 optimizer slices, FSDP2 for ZeRO-3). A tied weight whose two
   stages are both on this rank (a V-shaped schedule) stays one parameter
   (:func:`runtime.tensor_parallel_tied.share_across_stages`);
4. a model built on the meta device is materialised now, shard by shard, on the rank's device
   (``to_empty``), and initialised by ``init_fn`` (default: each submodule's ``reset_parameters``), or
   loaded from a checkpoint (``checkpoint=``: a DCP folder or Hugging Face safetensors files);
5. the plan's pipeline schedule over the stages (:mod:`runtime.pipeline_parallel`).

The returned :class:`ParallelModel` runs one step of the plan (``pm.step(inputs, targets)``: forward and
backward over the plan's micro-batches, with :mod:`runtime.step`, the code ``runtime.train`` runs; the
optimizer step stays the caller's, over ``pm.parameters()``) and saves and loads DCP
checkpoints keyed by the full model's parameter names (:mod:`runtime.checkpoint`), so a run resumes under
another plan of the same model.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh

from planner.plan import Plan
from runtime import checkpoint as ckpt
from runtime.checks import check_user_model, plan_sample_input
from runtime.context_parallel import check_context_parallel
from runtime.data_parallel import DataParallelMode, OptimizerShards, apply_data_parallel
from runtime.errors import RunCheckError
from runtime.expert_parallel import check_expert_parallel
from runtime.float8 import check_float8, convert_float8
from runtime.launch import join_process_group
from runtime.materialize import free_other_layers, is_meta, load_safetensors, materialize
from runtime.model import (
    StageModule,
    build_stage_modules,
    check_layer_coverage,
    stages_of_rank,
    tied_parameters,
    without_cache,
)
from runtime.parallel_dims import ParallelDims
from runtime.pipeline_parallel import build_schedule, choose_schedule
from runtime.rank_layout import RankCoords, RankLayout
from runtime.recompute import apply_recompute
from runtime.step import (
    RankState,
    forward_backward,
    global_grad_norm,
    global_loss,
    plan_autocast,
    rank_device,
    reduce_gradients,
    scale_shared_once,
    tied_groups,
    verified_manifest,
)
from runtime.tensor_parallel import apply_tensor_parallel
from runtime.tensor_parallel_generic import check_module_tensor_parallel
from runtime.tensor_parallel_tied import share_across_stages

LossFn = Callable[[Any, torch.Tensor], torch.Tensor]
Inputs = torch.Tensor | tuple[torch.Tensor, ...] | dict[str, torch.Tensor]


class ParallelModel:
    """This rank's part of a planned model: its stages, shards and schedule (made by :func:`parallelize`)."""

    def __init__(self, plan: Plan, rank: RankState, mesh: Any, layout: RankLayout, coords: RankCoords,
                 device: torch.device) -> None:
        self.plan = plan
        self._r = rank
        self._stepped = False  # ZeRO-1/2: a step ran since the replicas last gathered the optimizer's slices
        self._first_shapes: list[tuple[str, tuple[int, ...]]] | None = None  # pp > 1: every step's must equal them
        self._mesh = mesh
        self.layout = layout
        self.coords = coords
        self.device = device

    # -- where this rank sits ---------------------------------------------------------------------------
    @property
    def data_rank(self) -> int:
        """This rank's index on the dp axis: which share of each global batch its loader yields."""
        return self.coords.dp

    @property
    def data_world(self) -> int:
        return self.layout.dp

    @property
    def pp_rank(self) -> int:
        return self.coords.pp

    @property
    def tp_rank(self) -> int:
        return self.coords.tp

    @property
    def stages(self) -> list[StageModule]:
        return self._r.stages

    @property
    def optimizer_shards(self) -> OptimizerShards | None:
        """ZeRO-1/2: this rank's slices of the parameters, which :meth:`parameters` yields; else ``None``."""
        return self._r.zero

    @property
    def module(self) -> nn.Module:
        """This rank's local modules: its stage (layers at their full-model paths), or a ``ModuleList`` of several."""
        return self.stages[0] if len(self.stages) == 1 else nn.ModuleList(self.stages)

    def parameters(self) -> Iterator[nn.Parameter]:
        """What the caller's optimizer updates on this rank, each tensor once: its parameters (DTensor shards
        under tp or FSDP), or under ZeRO-1/2 its 1/dp slice of each (:class:`runtime.data_parallel.OptimizerShards`:
        views into the parameters, so the optimizer holds the state of that slice only)."""
        for _, p in self.named_parameters():
            yield p

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        if self._r.zero is not None:
            yield from self._r.zero.named_parameters()
            return
        seen: set[int] = set()
        for stage in self.stages:
            for name, p in stage.named_parameters():
                if id(p) not in seen:  # a tied weight whose two stages are both on this rank: once
                    seen.add(id(p))
                    yield name, p

    # -- training ---------------------------------------------------------------------------------------
    def step(self, inputs: Inputs, targets: torch.Tensor) -> float:
        """Forward and backward of this dp rank's share of one global batch; returns the global batch's mean loss.

        ``inputs``: a tensor, a tuple (the forward's positional arguments) or a dict (by name), with
        ``micro_batch_size x num_micro_batches`` rows; the plan's micro-batches and schedule run it. The
        gradients are then what one process gets from the whole global batch: call ``optimizer.step()``.
        """
        r, par = self._r, self.plan.parallel
        values, names = self._arrange(inputs)
        rows = par.micro_batch_size * par.num_micro_batches
        for name, t in [*zip(names or [f"inputs[{i}]" for i in range(len(values))], values), ("targets", targets)]:
            if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != rows:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise RunCheckError(f"step: {name} has shape {got}; each dp rank takes micro_batch_size x "
                                    f"num_micro_batches = {par.micro_batch_size} x {par.num_micro_batches} = {rows} "
                                    f"samples per step (the loader gets rank={self.data_rank}, "
                                    f"world={self.data_world})")
        self._check_fixed_shapes(names, values, targets)
        r.input_names = names
        values = tuple(t.to(self.device) for t in values)
        self._gather()
        local = forward_backward(r, self.plan, values[0] if len(values) == 1 and names is None else values,
                                 targets.to(self.device))
        reduce_gradients(r, self.plan, self._mesh["dp"])
        self._stepped = True
        return global_loss(local, r.last_holder and self.coords.tp == 0, par.dp, self.device)

    def _check_fixed_shapes(self, names: tuple[str, ...] | None, values: tuple[torch.Tensor, ...],
                            targets: torch.Tensor) -> None:
        """Under pipeline parallelism every step must bring the first step's shapes: torch.distributed.pipelining
        sizes the stages' send and receive buffers once, and another shape fails deep inside it."""
        if self.plan.parallel.pp == 1:
            return
        shapes = [(n, tuple(t.shape)) for n, t in zip(names or [f"inputs[{i}]" for i in range(len(values))], values)]
        shapes.append(("targets", tuple(targets.shape)))
        if self._first_shapes is None:
            self._first_shapes = shapes
            return
        for (name, first), (_, now) in zip(self._first_shapes, shapes):
            if first != now:
                raise RunCheckError(f"step: {name} has shape {now}, and {first} at the first step; under pipeline "
                                    f"parallelism (pp={self.plan.parallel.pp}) every step takes one shape (the "
                                    "stages' send and receive buffers are sized once): pad or cut your batches to "
                                    "one sequence length, or plan without pp")

    def _gather(self) -> None:
        """ZeRO-1/2: after the caller's optimizer step, every rank's updated slices into every replica (collective).

        Run before the next step and before the weights are read (``state_dict``, ``save``); it also drops
        the whole gradients of the last step (ZeRO-1 keeps them until then, as its slices' gradients)."""
        if self._r.zero is not None and self._stepped:
            self._r.zero.gather_parameters()
            self._stepped = False

    def _arrange(self, inputs: Inputs) -> tuple[tuple[torch.Tensor, ...], tuple[str, ...] | None]:
        """The inputs as a tuple, and the names the stages take them by (``None``: positionally)."""
        first = self._r.stages[0]
        graph_names = first.input_names
        if isinstance(inputs, dict):
            if graph_names is None:  # the model's own forward takes them by name; a chain's first layer in order
                return tuple(inputs.values()), (tuple(inputs) if first.is_whole else None)
            missing = [n for n in graph_names if n not in inputs]
            if missing:
                raise RunCheckError(f"step: inputs lacks {missing}; the model was traced with inputs "
                                    f"{list(graph_names)}: pass them all")
            return tuple(inputs[n] for n in graph_names), graph_names
        values = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        return values, (graph_names[:len(values)] if graph_names is not None else None)

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Scale the gradients so that the whole model's gradient norm is at most ``max_norm``; returns the norm.

        The norm is over every element once, across tp (DTensor shards), pp (a sum of squares over all
        ranks) and FSDP or ZeRO-2 shards (:func:`runtime.step.global_grad_norm`), so every rank scales alike."""
        norm = global_grad_norm(self.stages, {"dp": self.coords.dp, "tp": self.coords.tp},
                                skip=self._r.duplicate_names, device=self.device, zero=self._r.zero)
        scale = max_norm / (norm + 1e-6)
        if scale < 1.0:
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
        return norm

    # -- state --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's shards keyed by the full model's parameter names (DTensors where split).

        Under ZeRO-1/2 it is collective after a step (the replicas first gather the optimizer's slices)."""
        self._gather()
        out: dict[str, Any] = {}
        for stage in self.stages:
            out.update(get_model_state_dict(stage))
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for stage in self.stages:
            mine = get_model_state_dict(stage)
            set_model_state_dict(stage, {k: v for k, v in state.items() if k in mine})

    def save(self, directory: str | Path, *, step: int = 0, optimizer: torch.optim.Optimizer | None = None) -> Path:
        """Collective: a verified DCP checkpoint ``directory/step-NNNNNN`` (:mod:`runtime.checkpoint`)."""
        self._gather()
        info = {"model_fingerprint": self.plan.model.fingerprint, "model": self.plan.model.name,
                "parallel": self.plan.parallel.label()}
        return ckpt.save_checkpoint(directory, step, self.stages, self._optimizers(optimizer), info=info,
                                    zero=self._r.zero)

    def load(self, directory: str | Path, *, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Collective: load a DCP checkpoint (a ``step-*`` folder or the newest under ``directory``) or Hugging
        Face ``*.safetensors`` files into this rank's shards, whatever plan saved them."""
        load_into(directory, self.stages, self._optimizers(optimizer), self.plan, zero=self._r.zero,
                  aliases=self._r.tied_names)

    def _optimizers(self, optimizer: torch.optim.Optimizer | None) -> list[torch.optim.Optimizer]:
        if optimizer is None:
            return []
        if len(self.stages) != 1:
            raise RunCheckError("optimizer: saving or loading optimizer state needs one stage per rank (this rank "
                                f"runs {len(self.stages)}); save the model alone, or plan without virtual stages")
        return [optimizer]


def parallelize(model: nn.Module, plan: Plan, *, loss_fn: LossFn, sample_input: Any = None,
                init_fn: Callable[[nn.Module], None] | None = None, checkpoint: str | Path | None = None,
                timeout_s: float = 120.0) -> ParallelModel:
    """This rank's part of ``model`` as ``plan`` says (collective: every rank of the plan calls it).

    ``loss_fn(output, targets)`` returns the mean loss of one micro-batch; ``output`` is what the model's
    forward returns (a tensor, or an object with ``.logits``). ``sample_input`` is the input the plan was
    made with (``planner.plan(..., sample_input=...)``; default: ``[1, seq_len]`` token ids when the plan
    has a sequence length). A model on the meta device is materialised on this rank's shards and
    initialised by ``init_fn(stage)`` (default: every submodule's ``reset_parameters``) or loaded from
    ``checkpoint``. Joins the process group, or creates it from torchrun's environment.
    """
    loss_fn = _scalar_loss(loss_fn)
    check_context_parallel(plan, None, user_model=True)  # the runtime owns the attention of its presets only
    check_expert_parallel(plan, None, user_model=True)  # experts are split in the presets' loop only
    join_process_group("parallelize()", "start the script with torchrun (torchrun --nproc-per-node N script.py)",
                       timeout_s)
    world, rank = dist.get_world_size(), dist.get_rank()
    device = rank_device()
    check_float8(plan, device.type)  # every rank alike: no collective needed
    dims = ParallelDims.from_plan(plan, world)
    layout = dims.layout
    sample = plan_sample_input(plan, sample_input)
    _check(model, plan, sample)
    mesh = dims.build_mesh(device.type, timeout=timedelta(seconds=timeout_s))
    par = plan.parallel
    tied = [t for t in tied_parameters(model, plan) if len(set(t.stages)) > 1]
    meta = is_meta(model)
    stages = build_stage_modules(model, stages_of_rank(plan, rank), plan, whole_if_single=True,
                                 sample_kwargs=_micro_batch_kwargs(model, sample, par.micro_batch_size),
                                 device=device)
    free_other_layers(model, plan, stages)
    dp_mode = DataParallelMode.for_plan(par.dp, par.tp, par.pp, par.zero_stage,
                                        reshard_after_forward=par.reshard_after_forward,
                                        replicas=par.dp // par.shard_group)  # HSDP (runtime/data_parallel.py)
    _split(stages, plan, mesh, device, on_meta=meta)
    early = meta and dp_mode.kind == "ddp"  # DDP checks and broadcasts real weights as it wraps them
    if early:
        materialize(stages, device, init_fn)
    wrapped = [apply_data_parallel(stage, dp_mode, mesh["dp"], device) for stage in stages]
    if meta and not early:
        materialize(stages, device, init_fn)
    if checkpoint is not None:
        load_into(checkpoint, stages, [], plan)
    zero = None
    if dp_mode.kind == "zero":  # slices are views into the weights: made once they are in place
        zero = OptimizerShards(stages, mesh["dp"], dp_mode.zero_stage)
        if meta:  # each rank initialised its replica; its own slices now stand for every rank's
            zero.gather_parameters()
    groups = tied_groups(tied, plan, layout, timeout_s)
    if meta and checkpoint is None:  # each position initialised its own copy of a tied weight
        for group in groups:
            group.copy_from_owner(stages)
    r = RankState(stages=stages, wrapped=wrapped, optimizers=[], dp_mode=dp_mode, zero=zero,
                  tied_groups=groups,
                  duplicate_names={n for t in tied for n in t.names[1:]}, tied_names=tuple(t.names for t in tied),
                  loss_fn=loss_fn, autocast=plan_autocast(plan, device), input_names=stages[0].input_names)
    if par.pp > 1:
        _pipeline(r, plan, loss_fn, mesh, device)
    return ParallelModel(plan, r, mesh, layout, layout.coords(rank), device)


def _split(stages: list[StageModule], plan: Plan, mesh: DeviceMesh, device: torch.device, *, on_meta: bool) -> None:
    """This rank's stages, in place, as the plan runs them before data parallelism wraps them: on the
    device (unless still on meta), float8 linears, tensor-parallel splits, activation recompute."""
    par = plan.parallel
    for stage in stages:
        if not on_meta:
            stage.to(device)
        if par.fp8:  # torchao's float8 linears (runtime/float8.py: check_float8 refused what cannot run)
            convert_float8(stage, plan)
    with share_across_stages(stages):  # a tied weight with both stages on this rank stays one Parameter
        for stage in stages:
            if par.tp > 1:
                apply_tensor_parallel(stage, mesh["tp"], plan)
            _recompute(stage, par.recompute, every=par.recompute_every, layer_names=plan.model.layer_names)


def _pipeline(r: RankState, plan: Plan, loss_fn: LossFn, mesh: DeviceMesh, device: torch.device) -> None:
    """The plan's pipeline schedule over this rank's wrapped stages, into ``r``."""
    stages = r.stages
    r.loss_fn = _rebuilding_output(loss_fn, stages)
    r.schedule, pipeline_stages = build_schedule(choose_schedule(plan), r.wrapped, [s.stage_index for s in stages],
                                                 plan, pp_group=mesh["pp"].get_group(), device=device,
                                                 loss_fn=r.loss_fn)
    r.shared = scale_shared_once(pipeline_stages)
    r.holds_first = any(s.stage_index == 0 for s in stages)
    r.last_holder = any(s.stage_index == len(plan.stages) - 1 for s in stages)


def _recompute(stage: StageModule, mode: str, *, every: int = 1, layer_names: tuple[str, ...] = ()) -> None:
    """:func:`runtime.recompute.apply_recompute`, refusing a selective recompute that finds no attention."""
    count = apply_recompute(stage, mode, every=every, layer_names=layer_names)
    if mode == "selective" and count == 0:
        raise RunCheckError("parallel.recompute: 'selective' checkpoints the `attn` submodule of each layer, and "
                            "no layer of this model has one; re-plan with recompute 'full' or 'none'")


def _check(model: nn.Module, plan: Plan, sample: Any) -> None:
    """Step 1 of the module docstring. Rank 0 traces the model; every rank raises the same error."""
    result: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            check_user_model(plan, model, sample)
            check_layer_coverage(model, plan)
            if plan.parallel.zero_stage >= 3:
                _check_no_shared_stage_parameter(model, plan)
            if plan.parallel.sequence_parallel:
                raise RunCheckError("parallel.sequence_parallel: the runtime splits sequences for the project's "
                                    "gpt and llama presets only; re-plan this model without --sequence-parallel")
            if plan.parallel.tp > 1:
                check_module_tensor_parallel(plan, model)
            if plan.parallel.pp > 1:
                choose_schedule(plan)
        except RunCheckError as exc:
            result[0] = str(exc)
    dist.broadcast_object_list(result, src=0)
    if result[0] is not None:
        raise RunCheckError(result[0])


def _check_no_shared_stage_parameter(model: nn.Module, plan: Plan) -> None:
    """ZeRO-3 shards each stage in FSDP2 groups of its own, so two stages of one rank cannot share a parameter."""
    ranks = {s.index: tuple(s.ranks) for s in plan.stages}
    for tied in tied_parameters(model, plan):
        stages = sorted(set(tied.stages))
        if len({ranks[s] for s in stages}) < len(stages):
            raise RunCheckError(
                f"stages: the tied parameter {list(tied.names)} lies in stages {stages}, which the plan puts on the "
                "same ranks; there the stages share one parameter, which ZeRO-3 (FSDP2, one group of parameters "
                "per stage) cannot shard twice. Re-plan with zero_stage 0-2 or another schedule")


def _micro_batch_kwargs(model: nn.Module, sample: Any, micro_batch: int) -> dict[str, Any]:
    """One micro-batch of zeros shaped like ``sample``, by the forward's argument names, on the device of the
    model's weights as given (for ``torch.export``, before the stages move to the rank's device).

    A forward with a ``use_cache`` argument (Hugging Face) gets ``use_cache=False`` (:func:`without_cache`)."""
    params = list(inspect.signature(model.forward).parameters)
    if isinstance(sample, dict):
        named = dict(sample)
    else:
        values = sample if isinstance(sample, (tuple, list)) else (sample,)
        named = dict(zip(params, values))
    where = next(model.parameters()).device

    def rows(t: Any) -> Any:
        return torch.zeros((micro_batch, *t.shape[1:]), dtype=t.dtype, device=where) \
            if isinstance(t, torch.Tensor) else t

    return without_cache(params, 0, {k: rows(v) for k, v in named.items()})


def _scalar_loss(loss_fn: LossFn) -> LossFn:
    """``loss_fn``, refusing what is not one number per micro-batch (``reduction="none"``) with the fix."""
    def loss(output: Any, targets: torch.Tensor) -> torch.Tensor:
        value = loss_fn(output, targets)
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            got = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise RunCheckError(f"loss_fn (--loss): returned {got}; return the mean loss of one micro-batch, a "
                                "0-dim tensor (e.g. cross_entropy with reduction='mean', or .mean() of the losses)")
        return value
    return loss


def _rebuilding_output(loss_fn: LossFn, stages: list[StageModule]) -> LossFn:
    """The last stage returns the forward's flat outputs; give ``loss_fn`` the value the forward returns."""
    spec = stages[-1].output_spec
    if spec is None:
        return loss_fn

    def loss(output: Any, targets: torch.Tensor) -> torch.Tensor:
        leaves = list(output) if isinstance(output, tuple) else [output]
        return loss_fn(pytree.tree_unflatten(leaves, spec), targets)
    return loss


def load_into(source: str | Path, stages: list[StageModule], optimizers: list[torch.optim.Optimizer],
              plan: Plan, *, zero: OptimizerShards | None = None,
              aliases: tuple[tuple[str, ...], ...] = ()) -> None:
    """Fill ``stages`` from a DCP checkpoint or Hugging Face safetensors files (see :meth:`ParallelModel.load`)."""
    path = Path(source)
    if any(path.glob("*.safetensors")):
        if optimizers:
            raise RunCheckError(f"checkpoint {path}: safetensors files hold weights only; load the optimizer "
                                "from a DCP checkpoint, or pass no optimizer")
        load_safetensors(path, stages)
        return
    if not (path / ckpt.MANIFEST).is_file():
        path = ckpt.latest_checkpoint(path)
    manifest = verified_manifest(path)
    if manifest.get("model_fingerprint") not in (None, plan.model.fingerprint):
        raise RunCheckError(f"checkpoint {path}: saved for model fingerprint {manifest.get('model_fingerprint')}, "
                            f"but the plan's model is {plan.model.fingerprint}; load a checkpoint of this model")
    ckpt.load_checkpoint(path, stages, optimizers, zero, aliases=aliases)
