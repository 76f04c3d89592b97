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

import contextlib
import os
import resource
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
from torch.distributed.tensor import DTensor

from planner.models import ModelPreset
from planner.plan import Plan
from runtime import checkpoint as ckpt
from runtime.checks import check_manifest_model, static_checks
from runtime.data import (
    Inputs,
    SyntheticData,
    as_iterator,
    check_local_batch,
    input_tuple,
    map_inputs,
    micro_batches,
)
from runtime.data_parallel import DataParallelMode, allreduce_gradients, apply_data_parallel
from runtime.errors import RunCheckError
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
from runtime.tensor_parallel import apply_tensor_parallel, reduce_partial_gradients
from runtime.tensor_parallel_rng import replica_divergence

# For fault tests: "kill:RANK:STEP" (that rank SIGKILLs itself in the middle of that step) or "hang:RANK:STEP"
# (it stops communicating there, sleeping until it is killed).
FAULT_ENV = "RUNTIME_FAULT"


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
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise RunCheckError("train() runs on every rank of a process group: start the ranks with torchrun or "
                                "runtime.launch.launch_workers, or call torch.distributed.init_process_group first")
        from runtime.launch import init_distributed

        init_distributed(options.timeout_s)
    world, rank = dist.get_world_size(), dist.get_rank()
    device = _device()
    dims = ParallelDims.from_plan(plan, world)
    mesh = dims.build_mesh(device.type, timeout=timedelta(seconds=options.timeout_s))
    pp_i, dp_i, tp_i = dims.coords(rank)
    preset = resolve_preset(plan, preset)
    static_checks(plan, preset, device_type=device.type)
    r = _build(plan, preset, options, mesh, dims, device)

    first_step, checkpoints = 0, []
    if options.resume:
        first_step = _resume(plan, options, r)
        if rank == 0 and options.verbose:
            print(resume_message(first_step, options.steps, str(ckpt.latest_checkpoint(options.checkpoint_dir))),
                  flush=True)
    data_iter = as_iterator(data, SyntheticData(plan, preset, seed=options.seed, dp_index=dp_i,
                                                first_step=first_step))
    metrics = RankMetrics(rank=rank, coords={"pp": pp_i, "dp": dp_i, "tp": tp_i},
                          stages=[s.stage_index for s in r.stages])
    losses: list[float] = []
    grad_norms: list[float] = []
    fault = _fault_for(rank)
    if rank == 0 and options.verbose:
        print(f"runtime: {plan.model.name} | {plan.parallel.label()} | world {world} on {device.type} | "
              + " | ".join(f"{k}: {v}" for k, v in r.setup.items()), flush=True)

    stopped_by = None
    with StopRequest() as stop:
        for step in range(first_step + 1, options.steps + 1):
            inputs, targets = check_local_batch(next(data_iter), plan, r.num_inputs)
            if fault is not None and fault[1] == step:
                _arm_fault(r.stages[0], plan.parallel.num_micro_batches, fault[0])
            _sync(device)
            start = time.perf_counter()
            local_loss = _forward_backward(r, plan, map_inputs(inputs, lambda t: t.to(device)), targets.to(device))
            if plan.parallel.tp > 1:  # DTensor gradients to their parameters' placements (see the function)
                reduce_partial_gradients(r.stages)
            if r.dp_mode.kind == "allreduce":
                allreduce_gradients(r.stages, mesh["dp"])
            for group in r.tied_groups:
                group.sync(r.stages)
            grad_norms.append(global_grad_norm(r.stages, {"dp": dp_i, "tp": tp_i}, skip=r.duplicate_names,
                                               device=device))
            for optim in r.optimizers:
                optim.step()
                optim.zero_grad(set_to_none=True)
            _sync(device)
            metrics.step_times_s.append(time.perf_counter() - start)
            losses.append(_global_loss(local_loss, r.last_holder and tp_i == 0, plan.parallel.dp, device))
            if rank == 0 and options.verbose:
                print(f"step {step:4d} | loss {losses[-1]:.6f} | grad norm {grad_norms[-1]:.6f} | "
                      f"{metrics.step_times_s[-1]:.3f} s", flush=True)
            if options.checkpoint_every and step % options.checkpoint_every == 0:
                checkpoints.append(_save(plan, options, r, step))
            if stop.agreed(device):  # SIGTERM on any rank: every rank stops after this step
                stopped_by = stop.signal_name
                if options.checkpoint_dir and not (checkpoints and checkpoints[-1].endswith(f"step-{step:06d}")):
                    checkpoints.append(_save(plan, options, r, step))
                if rank == 0:
                    print(stop_message(stopped_by, step, checkpoints[-1] if options.checkpoint_dir else None,
                                       options.checkpoint_dir), file=sys.stderr, flush=True)
                break

    replica_diff = None
    if options.verify_replicas and plan.parallel.tp > 1:
        replica_diff = replica_divergence(r.stages, mesh["tp"].get_group())
        if rank == 0 and options.verbose:
            print(f"tp replicas: largest difference between copies of a replicated parameter {replica_diff:.3g}",
                  flush=True)
    metrics.peak_memory_bytes, metrics.memory_kind = _peak_memory(device)
    metrics.model_state_bytes = _state_bytes(r.stages, r.optimizers)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, metrics)
    step_times = [max(m.step_times_s[i] for m in gathered) for i in range(len(losses))]
    return RunResult(first_step=first_step, losses=losses, grad_norms=grad_norms, step_times_s=step_times,
                     rank=metrics, ranks=gathered if rank == 0 else [], setup=r.setup, checkpoints=checkpoints,
                     tp_replica_max_diff=replica_diff, stopped_by=stopped_by)


@dataclass
class _Rank:
    """Everything one rank built from the plan."""

    stages: list[StageModule]  # this rank's stages, in model order (the modules checkpoints see)
    wrapped: list[nn.Module]  # the same, as DDP/FSDP wrapped them (what forward calls)
    optimizers: list[torch.optim.Optimizer]  # one AdamW per stage
    dp_mode: DataParallelMode
    tied_groups: list[_TiedGroup]
    duplicate_names: set[str]  # second names of tied weights: their gradient is counted once
    loss_fn: Any
    autocast: Any
    schedule: Any = None  # the pipeline schedule when pp > 1
    holds_first: bool = True
    last_holder: bool = True
    num_inputs: int = 1  # tensors the model takes (T5: 2)
    input_names: tuple[str, ...] | None = None  # non-chain models: every stage takes the inputs by name
    setup: dict[str, str] = field(default_factory=dict)


def _tp_label(plan: Plan, preset: ModelPreset) -> str:
    """How the run splits tensors, for the run log: which code path, tp, and sequence parallelism."""
    par = plan.parallel
    if par.tp == 1:
        return "none"
    kind = "GPT column/row pairs" if preset.family == "gpt" else "Linear column/row pairs"
    return f"{kind} tp={par.tp}" + (" + sequence parallel" if par.sequence_parallel else "")


def _build(plan: Plan, preset: ModelPreset, options: RunOptions, mesh, dims: ParallelDims,
           device: torch.device) -> _Rank:
    """Steps 1-5 of the module docstring, in that order."""
    par = plan.parallel
    model = build_model(preset, seed=options.seed)
    tied = [t for t in tied_parameters(model, plan) if len(set(t.stages)) > 1]
    stages, wrapped, dp_mode = parallelize_stages(model, plan, mesh, device)
    del model
    r = _Rank(stages=stages, wrapped=wrapped, dp_mode=dp_mode,
              optimizers=[torch.optim.AdamW(s.parameters(), lr=options.lr, weight_decay=options.weight_decay)
                          for s in stages],
              tied_groups=_tied_groups(tied, plan, dims, options.timeout_s),
              duplicate_names={n for t in tied for n in t.names[1:]}, loss_fn=loss_function(preset),
              autocast=_autocast(plan, device), num_inputs=len(preset.sample_input(1, plan.model.seq_len)),
              input_names=stages[0].input_names if stages else None,
              setup={"data_parallel": dp_mode.describe(), "recompute": par.recompute,
                     "tensor_parallel": _tp_label(plan, preset)})
    if par.pp > 1:
        choice = choose_schedule(plan)
        r.schedule, _ = build_schedule(choice, wrapped, [s.stage_index for s in stages], plan,
                                       pp_group=mesh["pp"].get_group(), device=device, loss_fn=r.loss_fn,
                                       preset=preset)
        r.holds_first = any(s.stage_index == 0 for s in stages)
        r.last_holder = any(s.stage_index == len(plan.stages) - 1 for s in stages)
        r.setup["schedule"] = choice.describe()
    return r


def parallelize_stages(model: nn.Module, plan: Plan, mesh, device: torch.device
                       ) -> tuple[list[StageModule], list[nn.Module], DataParallelMode]:
    """Steps 1-4 on ``model`` (real, or on the meta device for ``runtime.dry_run``): this rank's stages,
    tensor parallel, recompute, data parallel. Returns the stages, the same as wrapped, and the dp mode.

    On the meta device DDP is left out: it keeps the parameters as they are (its gradient buckets are
    working memory, not model state), and it would broadcast the weights at construction."""
    par = plan.parallel
    stages = build_stage_modules(model, stages_of_rank(plan, dist.get_rank()), plan)
    dp_mode = DataParallelMode.for_plan(par.dp, par.tp, par.pp, par.zero_stage)
    wrapped: list[nn.Module] = []
    for stage in stages:
        stage.to(device)
        if par.tp > 1:
            apply_tensor_parallel(stage, mesh["tp"], plan)
        apply_recompute(stage, par.recompute)
        if device.type == "meta" and dp_mode.kind == "ddp":
            wrapped.append(stage)
            continue
        wrapped.append(apply_data_parallel(stage, dp_mode, mesh["dp"], device))
    return stages, wrapped, dp_mode


def _forward_backward(r: _Rank, plan: Plan, inputs: Inputs, targets: torch.Tensor) -> torch.Tensor | None:
    """One step's forward and backward over all micro-batches; the mean micro-batch loss where it is known.

    A chain's first stage takes the inputs positionally; a non-chain model's stages all take them by name
    (``runtime.layer_graph``): T5's decoder stages read the decoder tokens, not only what the encoder sent."""
    with r.autocast:
        if r.schedule is None:
            return _accumulate(r.wrapped[0], inputs, targets, plan.parallel.num_micro_batches, r.loss_fn,
                               r.dp_mode, r.input_names)
        mb_losses: list[torch.Tensor] = []
        if r.input_names is not None:
            args, kwargs = (), dict(zip(r.input_names, input_tuple(inputs)))
        else:
            args, kwargs = ((inputs,) if r.holds_first else ()), {}
        r.schedule.step(*args, target=targets if r.last_holder else None,
                        losses=mb_losses if r.last_holder else None, return_outputs=False, **kwargs)
    return torch.stack([x.detach().float() for x in mb_losses]).mean() if r.last_holder else None


def _save(plan: Plan, options: RunOptions, r: _Rank, step: int) -> str:
    info = {"seed": options.seed, "model_fingerprint": plan.model.fingerprint, "model": plan.model.name,
            "parallel": plan.parallel.label()}
    return str(ckpt.save_checkpoint(options.checkpoint_dir, step, r.stages, r.optimizers, info=info))


def _resume(plan: Plan, options: RunOptions, r: _Rank) -> int:
    """Load the newest checkpoint into this rank's stages and optimizers; returns the step it ends."""
    path = ckpt.latest_checkpoint(options.checkpoint_dir)
    manifest = _verified_manifest(path)
    check_manifest_model(manifest, plan, path)
    ckpt.load_checkpoint(path, r.stages, r.optimizers)
    if manifest.get("seed") != options.seed and dist.get_rank() == 0:
        print(f"warning: resuming a run saved with seed {manifest.get('seed')} using seed {options.seed}; "
              "the synthetic data after the checkpoint differs from the original run's", flush=True)
    return int(manifest["step"])


def median_step_time_s(step_times: list[float]) -> float:
    """Median over steps, leaving out the first (warm-up: allocation, p2p set-up) when there are more."""
    usable = step_times[1:] if len(step_times) > 1 else step_times
    return statistics.median(usable) if usable else 0.0


def _device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _autocast(plan: Plan, device: torch.device):
    """bf16 autocast on GPUs for a bf16 plan; fp32 on the CPU (the plan's dtype is a GPU setting)."""
    if device.type == "cuda" and plan.model.dtype == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _accumulate(module: nn.Module, inputs: Inputs, targets: torch.Tensor, m: int, loss_fn,
                mode: DataParallelMode, input_names: tuple[str, ...] | None) -> torch.Tensor:
    """pp == 1: ``m`` micro-batches, gradients summed as the mean over all of them."""
    total = torch.zeros((), device=targets.device)
    for i, (xs, y) in enumerate(zip(micro_batches(inputs, m), targets.chunk(m))):
        last = i == m - 1
        sync = module.no_sync() if (mode.kind == "ddp" and not last) else contextlib.nullcontext()
        with sync:
            out = module(**dict(zip(input_names, xs))) if input_names is not None else module(*xs)
            loss = loss_fn(out, y)
            (loss / m).backward()
        total += loss.detach().float()
    return total / m


def global_grad_norm(stages, coords: dict[str, int], *, skip: set[str], device: torch.device) -> float:
    """L2 norm of the whole model's gradient, each element counted once across all ranks.

    A gradient replicated over an axis (a plain tensor over dp after the all-reduce, a layer norm over
    tp, a DTensor placed ``Replicate()``) is counted on that axis's coordinate 0 only; a sharded one
    (FSDP over dp, TP over tp) is counted on every coordinate.
    """
    total = torch.zeros((), dtype=torch.float64, device=device)
    for stage in stages:
        for name, param in stage.named_parameters():
            if param.grad is None or name in skip:
                continue
            grad = param.grad
            sharded_axes: set[str] = set()
            if isinstance(grad, DTensor):
                names = grad.device_mesh.mesh_dim_names or ()
                sharded_axes = {n for n, pl in zip(names, grad.placements) if not pl.is_replicate()}
                grad = grad._local_tensor
            if all(coords[axis] == 0 for axis in ("dp", "tp") if axis not in sharded_axes):
                total += grad.double().pow(2).sum()
    dist.all_reduce(total)
    return float(total.sqrt())


def _global_loss(local: torch.Tensor | None, contributes: bool, dp: int, device: torch.device) -> float:
    value = torch.zeros((), dtype=torch.float64, device=device)
    if contributes and local is not None:
        value += local.double() / dp
    dist.all_reduce(value)
    return float(value)


@dataclass
class _TiedGroup:
    """Gradient sum of one tied parameter between the ranks of two stages (Megatron's embedding group)."""

    names: dict[int, str]  # stage index -> parameter name in that stage
    group: Any

    def sync(self, stages) -> None:
        for stage in stages:
            name = self.names.get(stage.stage_index)
            if name is None or self.group is None:
                continue
            grad = stage.get_parameter(name).grad
            dist.all_reduce(grad._local_tensor if isinstance(grad, DTensor) else grad, group=self.group)


def _tied_groups(tied, plan: Plan, dims: ParallelDims, timeout_s: float) -> list[_TiedGroup]:
    groups = []
    rank = dist.get_rank()
    pos = {s.index: s.ranks[0] // (dims.dp * dims.tp) for s in plan.stages}
    for t in tied:
        names = dict(zip(t.stages, t.names))
        positions = sorted({pos[s] for s in names})
        mine = None
        for d in range(dims.dp):
            for tp_i in range(dims.tp):
                ranks = [dims.rank_of(p, d, tp_i) for p in positions]
                g = dist.new_group(ranks, timeout=timedelta(seconds=timeout_s))
                if rank in ranks:
                    mine = g
        groups.append(_TiedGroup(names=names, group=mine))
    return groups


def _verified_manifest(path) -> dict[str, Any]:
    """Rank 0 verifies the files; every rank raises the same error if they are bad."""
    result: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            result[0] = ckpt.verify_checkpoint(path)
        except ckpt.CheckpointError as exc:
            result[0] = exc
    dist.broadcast_object_list(result, src=0)
    if isinstance(result[0], Exception):
        raise result[0]
    return result[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda max_memory_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "cpu peak RSS (whole process)"


def _state_bytes(stages, optimizers) -> int:
    """Bytes of this rank's parameters, gradients and optimizer state (local shards)."""
    def local_bytes(t: torch.Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    total = 0
    for stage in stages:
        for p in stage.parameters():
            total += 2 * local_bytes(p)  # weights + gradients (freed after the step, counted as planned)
    for optim in optimizers:
        for state in optim.state.values():
            total += sum(local_bytes(v) for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    return total


def _fault_for(rank: int) -> tuple[str, int] | None:
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return None
    kind, fault_rank, fault_step = spec.split(":")
    if kind not in ("kill", "hang"):
        raise ValueError(f"{FAULT_ENV}: got {spec!r}; use kill:RANK:STEP or hang:RANK:STEP")
    return (kind, int(fault_step)) if int(fault_rank) == rank else None


def _arm_fault(stage: nn.Module, num_micro_batches: int, kind: str) -> None:
    calls = {"n": 0}

    def hook(module, args):
        calls["n"] += 1
        if calls["n"] == min(2, num_micro_batches):  # second micro-batch: peers are mid-step, waiting on us
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            while True:
                time.sleep(60)

    stage.register_forward_pre_hook(hook)
