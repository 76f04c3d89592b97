"""The training loop: build what the plan says on this rank, then run AdamW steps and measure them.

``train(plan, options)`` runs inside an initialised process group (``runtime.launch`` starts one) and
parallelizes in this order, each step one small function in its own file:

1. build the full model from the seed and keep this rank's stages (:mod:`runtime.model`);
2. tensor parallelism on the ``tp`` axis (:mod:`runtime.tensor_parallel`);
3. activation recomputation (:mod:`runtime.recompute`);
4. data parallelism on the ``dp`` axis: DDP or FSDP2 (:mod:`runtime.data_parallel`);
5. pipeline stages and the plan's schedule on the ``pp`` axis (:mod:`runtime.pipeline_parallel`).

With ``pp == 1`` the loop accumulates the plan's ``num_micro_batches`` micro-batches itself. The
reported loss of a step is the mean over the whole global batch, the same on every rank.

``options.steps`` is the step a run ends at: resumed from a checkpoint of step ``K``, it trains steps
``K+1 … steps``. SIGTERM (a scheduler's preemption, or the launcher shutting down) ends the run after
the step in progress, on every rank at the same step (:class:`StopRequest`), saving a checkpoint there
when ``checkpoint_dir`` is set.
"""

from __future__ import annotations

import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from planner.layout import RankCoords
from planner.models import ModelPreset
from planner.plan import Plan
from runtime import checkpoint as ckpt
from runtime.checks import check_manifest_model, static_checks
from runtime.context_parallel import (
    apply_context_parallel,
    check_context_parallel,
    data_mesh,
    shard_batch,
    shard_positions,
)
from runtime.data import SyntheticData, as_iterator, check_local_batch, map_inputs
from runtime.data_parallel import DataParallelMode, OptimizerShards, apply_data_parallel
from runtime.expert_parallel import apply_expert_tensor_parallel, apply_plan_experts, check_expert_parallel
from runtime.float8 import convert_float8
from runtime.model import (
    StageModule,
    build_model,
    build_stage_modules,
    loss_function,
    resolve_preset,
    stages_of_rank,
    tied_parameters,
)
from runtime.parallel_dims import ParallelDims
from runtime.pipeline_parallel import build_schedule, choose_schedule
from runtime.recompute import apply_recompute
from runtime.step import (
    RankState,
    forward_backward,
    global_grad_norm,
    global_loss,
    peak_memory,
    plan_autocast,
    rank_device,
    reduce_gradients,
    scale_shared_once,
    state_bytes,
    tied_groups,
    verified_manifest,
)
from runtime.tensor_parallel import apply_tensor_parallel
from runtime.tensor_parallel_rng import replica_divergence
from runtime.tensor_parallel_tied import share_across_stages

EXIT_STOPPED = 128 + signal.SIGTERM  # 143, as for a process SIGTERM killed: schedulers read it as "preempted"


class StopRequest:
    """SIGTERM ends the run after the current step, on every rank at the same one.

    The handler only records the signal (a collective cannot run inside it). After each step the ranks
    all-reduce the flag (one scalar), so a signal that reached any rank (the launcher forwards its own
    to every worker; a scheduler may signal a single process) stops all of them after that step.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name

    def agreed(self, device: torch.device) -> bool:
        """Collective: whether any rank was asked to stop."""
        flag = torch.tensor(1.0 if self.signal_name else 0.0, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 and self.signal_name is None:
            self.signal_name = "SIGTERM"  # another rank got it
        return bool(flag.item() > 0)


def stop_message(signal_name: str, step: int, saved: str | None, checkpoint_dir: str | None) -> str:
    """The one line a stopped run prints (rank 0)."""
    if saved:
        return (f"runtime: stopped by {signal_name} after step {step}; checkpoint saved to {saved}: continue with "
                f"--resume --checkpoint-dir {checkpoint_dir}")
    return (f"runtime: stopped by {signal_name} after step {step}; no checkpoint was saved (pass --checkpoint-dir "
            "to save one when stopped)")


def resume_message(first_step: int, steps: int, path: str) -> str:
    if first_step >= steps:
        return (f"runtime: resumed from step {first_step} ({path}); --steps {steps} is the step to end at, so there is "
                f"nothing to train: pass --steps N with N > {first_step} to continue")
    return f"runtime: resumed from step {first_step} ({path}); training steps {first_step + 1}-{steps}"


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    steps: int  # the step to end at (a resumed run continues from its checkpoint's step up to this one)
    seed: int = 0
    lr: float = 1e-3
    weight_decay: float = 0.01
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    timeout_s: float = 120.0
    verbose: bool = True
    verify_replicas: bool = False  # after the last step, measure how far tp replicas of a parameter drifted apart

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"steps: got {self.steps}; expected >= 0")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ValueError("checkpoint_every: needs checkpoint_dir (--checkpoint-dir)")
        if self.resume and not self.checkpoint_dir:
            raise ValueError("resume: needs checkpoint_dir (--checkpoint-dir) to resume from")


@dataclass
class RankMetrics:
    rank: int
    coords: dict[str, int]
    stages: list[int]
    step_times_s: list[float] = field(default_factory=list)
    peak_memory_bytes: int = 0
    memory_kind: str = ""
    model_state_bytes: int = 0


@dataclass
class RunResult:
    """What one rank returns; ``ranks`` (every rank's metrics) is filled on rank 0 only."""

    first_step: int
    losses: list[float]
    grad_norms: list[float]  # global L2 norm of the averaged gradient, before the optimizer step
    step_times_s: list[float]  # slowest rank per step
    rank: RankMetrics
    ranks: list[RankMetrics] = field(default_factory=list)
    setup: dict[str, str] = field(default_factory=dict)
    checkpoints: list[str] = field(default_factory=list)
    tp_replica_max_diff: float | None = None  # with verify_replicas and tp > 1: 0.0 when every copy is identical
    stopped_by: str | None = None  # "SIGTERM" when a signal ended the run early


def train(plan: Plan, options: RunOptions, *, data: Any = None, preset: ModelPreset | None = None) -> RunResult:
    """Train ``plan`` on this rank up to step ``options.steps`` (collective over the world)."""
    from runtime.launch import join_process_group  # launch imports this module

    join_process_group("train()", "start the ranks with torchrun or runtime.launch.launch_workers", options.timeout_s)
    world, rank = dist.get_world_size(), dist.get_rank()
    device = rank_device()
    dims = ParallelDims.from_plan(plan, world)
    mesh = dims.build_mesh(device.type, timeout=timedelta(seconds=options.timeout_s))
    coords = dims.layout.coords(rank)
    preset = resolve_preset(plan, preset)
    static_checks(plan, preset, device_type=device.type)
    check_context_parallel(plan, preset.family)
    r = _build(plan, preset, options, mesh, dims, device)

    first_step, checkpoints = 0, []
    if options.resume:
        first_step = _resume(plan, options, r)
        if rank == 0 and options.verbose:
            print(resume_message(first_step, options.steps, str(ckpt.latest_checkpoint(options.checkpoint_dir))),
                  flush=True)
    data_iter = as_iterator(data, SyntheticData(plan, preset, seed=options.seed, dp_index=coords.dp,
                                                first_step=first_step))
    metrics = RankMetrics(rank=rank, coords={"pp": coords.pp, "dp": coords.dp, "cp": coords.cp, "tp": coords.tp},
                          stages=[s.stage_index for s in r.stages])
    losses: list[float] = []
    grad_norms: list[float] = []
    if rank == 0 and options.verbose:
        print(f"runtime: {plan.model.name} | {plan.parallel.label()} | world {world} on {device.type} | "
              + " | ".join(f"{k}: {v}" for k, v in r.setup.items()), flush=True)

    stopped_by = None
    with StopRequest() as stop:
        for step in range(first_step + 1, options.steps + 1):
            seconds, loss, norm = _step(r, plan, next(data_iter), mesh, device, coords)
            metrics.step_times_s.append(seconds)
            losses.append(loss)
            grad_norms.append(norm)
            if rank == 0 and options.verbose:
                print(f"step {step:4d} | loss {loss:.6f} | grad norm {norm:.6f} | {seconds:.3f} s", flush=True)
            if options.checkpoint_every and step % options.checkpoint_every == 0:
                checkpoints.append(_save(plan, options, r, step))
            if stop.agreed(device):  # SIGTERM on any rank: every rank stops after this step
                stopped_by = stop.signal_name
                _stop_after(plan, options, r, step, stopped_by, checkpoints)
                break

    replica_diff = _replica_check(plan, options, r, mesh)
    return gather_result(metrics, device, r.stages, r.optimizers, r.zero, first_step=first_step, losses=losses,
                         grad_norms=grad_norms, setup=r.setup, checkpoints=checkpoints, stopped_by=stopped_by,
                         tp_replica_max_diff=replica_diff)


def gather_result(metrics: RankMetrics, device: torch.device, stages: list[nn.Module], optimizers: list[Any],
                  zero: OptimizerShards | None, *, first_step: int, losses: list[float], grad_norms: list[float],
                  setup: dict[str, str], checkpoints: list[str], stopped_by: str | None,
                  tp_replica_max_diff: float | None = None) -> RunResult:
    """This rank's :class:`RunResult` once its steps are done (collective: every rank's metrics reach
    rank 0). A step's time is its slowest rank's."""
    metrics.peak_memory_bytes, metrics.memory_kind = peak_memory(device)
    metrics.model_state_bytes = state_bytes(stages, optimizers, zero)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, metrics)
    step_times = [max(m.step_times_s[i] for m in gathered) for i in range(len(losses))]
    return RunResult(first_step=first_step, losses=losses, grad_norms=grad_norms, step_times_s=step_times,
                     rank=metrics, ranks=gathered if dist.get_rank() == 0 else [], setup=setup,
                     checkpoints=checkpoints, tp_replica_max_diff=tp_replica_max_diff, stopped_by=stopped_by)


def _step(r: RankState, plan: Plan, batch: Any, mesh: DeviceMesh, device: torch.device,
          coords: RankCoords) -> tuple[float, float, float]:
    """One optimizer step of this rank on its local ``batch``: (seconds, the global loss, the global
    gradient norm before the update). The seconds cover forward, backward, the gradient reduction and
    the update, between two device synchronisations; the loss's all-reduce is outside them."""
    inputs, targets = check_local_batch(batch, plan, r.num_inputs)
    if plan.parallel.cp > 1:  # this cp rank's tokens of every sequence (runtime/context_parallel.py)
        inputs, targets = shard_batch(inputs, targets, shard_positions(plan.model.seq_len, plan.parallel.cp, coords.cp))
    _sync(device)
    start = time.perf_counter()
    local_loss = forward_backward(r, plan, map_inputs(inputs, lambda t: t.to(device)), targets.to(device))
    reduce_gradients(r, plan, data_mesh(mesh, plan.parallel.cp))  # dp, or dp x cp
    norm = global_grad_norm(r.stages, {"dp": coords.dp, "tp": coords.tp, "cp": coords.cp}, skip=r.duplicate_names,
                            device=device, zero=r.zero)
    for optim in r.optimizers:
        optim.step()
        optim.zero_grad(set_to_none=True)
    if r.zero is not None:  # every rank's updated slices into every replica
        r.zero.gather_parameters()
    _sync(device)
    seconds = time.perf_counter() - start
    loss = global_loss(local_loss, r.last_holder and coords.tp == 0, plan.parallel.dp * plan.parallel.cp, device)
    return seconds, loss, norm


def _stop_after(plan: Plan, options: RunOptions, r: RankState, step: int, signal_name: str, checkpoints: list[str]) -> None:
    """A stop signal ended the run after ``step``: checkpoint it unless that step just was, and say so."""
    if options.checkpoint_dir and not (checkpoints and checkpoints[-1].endswith(f"step-{step:06d}")):
        checkpoints.append(_save(plan, options, r, step))
    if dist.get_rank() == 0:
        print(stop_message(signal_name, step, checkpoints[-1] if options.checkpoint_dir else None,
                           options.checkpoint_dir), file=sys.stderr, flush=True)


def _replica_check(plan: Plan, options: RunOptions, r: RankState, mesh: DeviceMesh) -> float | None:
    """With ``verify_replicas`` and tp > 1: the largest difference between the tp ranks' copies of a
    replicated parameter (0.0 when identical); else None."""
    if not (options.verify_replicas and plan.parallel.tp > 1):
        return None
    diff = replica_divergence(r.stages, mesh["tp"].get_group())
    if dist.get_rank() == 0 and options.verbose:
        print(f"tp replicas: largest difference between copies of a replicated parameter {diff:.3g}", flush=True)
    return diff


def _tp_label(plan: Plan, preset: ModelPreset) -> str:
    """How the run splits tensors, for the run log: which code path, tp, and sequence parallelism."""
    par = plan.parallel
    if par.tp == 1:
        return "none"
    kind = "GPT column/row pairs" if preset.family == "gpt" else "Linear column/row pairs"
    return f"{kind} tp={par.tp}" + (" + sequence parallel" if par.sequence_parallel else "")


def _build(plan: Plan, preset: ModelPreset, options: RunOptions, mesh, dims: ParallelDims,
           device: torch.device) -> RankState:
    """Steps 1-5 of the module docstring, in that order."""
    par = plan.parallel
    model = build_model(preset, seed=options.seed)
    check_expert_parallel(plan, model, checkpoint_dir=options.checkpoint_dir)  # ep > 1: what it can run
    tied = [t for t in tied_parameters(model, plan) if len(set(t.stages)) > 1]
    stages, wrapped, dp_mode = parallelize_stages(model, plan, mesh, device)
    del model
    r = RankState(stages=stages, wrapped=wrapped, dp_mode=dp_mode, optimizers=[],
                  zero=OptimizerShards(stages, data_mesh(mesh, par.cp), dp_mode.zero_stage) if dp_mode.kind == "zero" else None,
                  tied_groups=tied_groups(tied, plan, dims.layout, options.timeout_s),
                  duplicate_names={n for t in tied for n in t.names[1:]}, tied_names=tuple(t.names for t in tied),
                  loss_fn=loss_function(preset),
                  autocast=plan_autocast(plan, device), num_inputs=len(preset.sample_input(1, plan.model.seq_len)),
                  input_names=stages[0].input_names if stages else None,
                  setup={"data_parallel": dp_mode.describe(), "recompute": par.recompute,
                         "tensor_parallel": _tp_label(plan, preset)})
    r.optimizers = [torch.optim.AdamW(r.optimizer_parameters(s), lr=options.lr, weight_decay=options.weight_decay)
                    for s in stages]
    if par.pp > 1:
        choice = choose_schedule(plan)
        r.schedule, pipeline_stages = build_schedule(choice, wrapped, [s.stage_index for s in stages], plan,
                                                     pp_group=mesh["pp"].get_group(), device=device,
                                                     loss_fn=r.loss_fn, preset=preset)
        r.shared = scale_shared_once(pipeline_stages)
        r.holds_first = any(s.stage_index == 0 for s in stages)
        r.last_holder = any(s.stage_index == len(plan.stages) - 1 for s in stages)
        r.setup["schedule"] = choice.describe()
    return r


def parallelize_stages(model: nn.Module, plan: Plan, mesh, device: torch.device
                       ) -> tuple[list[StageModule], list[nn.Module], DataParallelMode]:
    """Steps 1-4 on ``model`` (real, or on the meta device for ``runtime.dry_run``): this rank's stages,
    tensor parallel, recompute, data parallel. Returns the stages, the same as wrapped, and the dp mode.

    On the meta device DDP is left out: it keeps the parameters as they are (its gradient buckets are
    working memory, not model state), and it would broadcast the weights at construction. A tied weight
    whose stages are both on this rank stays one ``Parameter`` (:func:`share_across_stages`). ZeRO-1/2's
    :class:`~runtime.data_parallel.OptimizerShards` is the caller's to build, once the weights are in place."""
    par = plan.parallel
    stages = build_stage_modules(model, stages_of_rank(plan, dist.get_rank()), plan)
    dp_mode = DataParallelMode.for_plan(par.dp * par.cp, par.tp, par.pp, par.zero_stage,  # cp ranks: one more dp axis
                                        reshard_after_forward=par.reshard_after_forward,
                                        replicas=par.dp // par.shard_group)  # HSDP (runtime/data_parallel.py)
    wrapped: list[nn.Module] = []
    for stage in stages:
        stage.to(device)
        if par.fp8 and device.type == "cuda":  # torchao's float8 linears (runtime/float8.py; checked before)
            convert_float8(stage, plan)
    grads_mesh = data_mesh(mesh, par.cp)  # dp, or dp x cp flattened
    if par.ep > 1:  # each rank keeps 1/ep of the experts, tokens routed by all-to-all (runtime/expert_parallel.py)
        dp_mode = apply_plan_experts(stages, plan, dp_mode)
    if par.tp > 1:  # each expert's ffn dim split over tp, as the planner prices it (runtime/expert_parallel.py)
        apply_expert_tensor_parallel(stages, mesh["tp"])
    if par.cp > 1:  # sequence shards at global positions, K/V all-gathers (runtime/context_parallel.py)
        for stage in stages:
            apply_context_parallel(stage, group=mesh["cp"].get_group(), cp=par.cp, seq_len=plan.model.seq_len,
                                   cp_index=mesh["cp"].get_local_rank(), device=device)
    with share_across_stages(stages):
        for stage in stages:
            if par.tp > 1:
                apply_tensor_parallel(stage, mesh["tp"], plan)
            apply_recompute(stage, par.recompute, every=par.recompute_every, layer_names=plan.model.layer_names)
    for stage in stages:
        if device.type == "meta" and dp_mode.kind == "ddp":
            wrapped.append(stage)
            continue
        wrapped.append(apply_data_parallel(stage, dp_mode, grads_mesh, device))
    return stages, wrapped, dp_mode


def _save(plan: Plan, options: RunOptions, r: RankState, step: int) -> str:
    info = {"seed": options.seed, "model_fingerprint": plan.model.fingerprint, "model": plan.model.name,
            "parallel": plan.parallel.label()}
    return str(ckpt.save_checkpoint(options.checkpoint_dir, step, r.stages, r.optimizers, info=info, zero=r.zero))


def _resume(plan: Plan, options: RunOptions, r: RankState) -> int:
    """Load the newest checkpoint into this rank's stages and optimizers; returns the step it ends."""
    path = ckpt.latest_checkpoint(options.checkpoint_dir)
    manifest = verified_manifest(path)
    check_manifest_model(manifest, plan, path)
    ckpt.load_checkpoint(path, r.stages, r.optimizers, r.zero, aliases=r.tied_names)
    if manifest.get("seed") != options.seed and dist.get_rank() == 0:
        print(f"warning: resuming a run saved with seed {manifest.get('seed')} using seed {options.seed}; "
              "the synthetic data after the checkpoint differs from the original run's", flush=True)
    return int(manifest["step"])


def median_step_time_s(step_times: list[float]) -> float:
    """Median over steps, leaving out the first (warm-up: allocation, p2p set-up) when there are more."""
    usable = step_times[1:] if len(step_times) > 1 else step_times
    return statistics.median(usable) if usable else 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

