"""The command line's user code: ``run --model pkg.module:factory [--data …] [--loss …]``.

Each flag names a callable as ``pkg.module:name`` (imported with the current folder on ``sys.path``, as
``python -m`` has it):

* ``--model``: ``factory()`` returns the ``nn.Module`` the plan was made for, with real weights or on the
  meta device (then :func:`runtime.parallelize.parallelize` materialises this rank's shards);
* ``--data``: ``loader(rank=data_rank, world=data_world, ...)`` returns an iterable of ``(inputs,
  targets)``, this data-parallel rank's share of each global batch (``micro_batch_size x
  num_micro_batches`` rows). It is also given, when its signature takes them: ``batch_size`` (those
  rows), ``seq_len``, ``seed`` and ``first_step`` (the step a resumed run continues after, so the loader
  can skip what was trained; one that does not take it has that many batches skipped). Default: the
  preset's synthetic data;
* ``--loss``: ``loss_fn(output, targets)`` returns the mean loss of one micro-batch. Default: the
  preset's loss, else cross-entropy over the output's last dim (its ``.logits`` when it has them).

The user model trains through one seam, :func:`runtime.parallelize.parallelize` (the Python API a
``torchrun`` script calls), in the loop that API documents: ``pm.step`` then AdamW, with the CLI's
checkpoints, resume and SIGTERM handling around it. A flag that cannot be imported or called, or a
loader that yields the wrong thing, is one line naming the flag and the fix (exit code 2).
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from planner.plan import Plan
from runtime import checkpoint as ckpt
from runtime.checks import Launch, _check_cluster, check_manifest_model
from runtime.errors import RunCheckError
from runtime.parallel_dims import ParallelDims

if TYPE_CHECKING:  # the training stack loads when train_user runs, not when the launcher checks
    from runtime.parallelize import ParallelModel

_FORMS = {"--model": "factory() -> nn.Module", "--data": "loader(rank=, world=) -> iterable of (inputs, targets)",
          "--loss": "loss_fn(output, targets) -> scalar tensor"}


@dataclass(frozen=True)
class UserCode:
    """What ``--model``, ``--data`` and ``--loss`` name (``pkg.module:name``), travelling to the workers."""

    model: str | None = None
    data: str | None = None
    loss: str | None = None

    def check_importable(self) -> None:
        for flag, spec in (("--model", self.model), ("--data", self.data), ("--loss", self.loss)):
            if spec:
                resolve(flag, spec)

    def preflight(self, plan: Plan, *, seed: int) -> None:
        """In the launcher, before any worker starts: every flag imports, the factory builds a module on the
        meta device (no memory), and data rank 0's first batch has the plan's shape."""
        self.check_importable()
        if self.model:
            meta_factory(self.model)()
        if self.data:
            batches = user_batches(self.data, plan, data_rank=0, data_world=plan.parallel.dp, seed=seed,
                                   first_step=0)
            next_batch(batches, self.data, plan, 1)


def resolve(flag: str, spec: str) -> Callable[..., Any]:
    """The callable ``spec`` names, or a :class:`RunCheckError` naming ``flag`` and the fix."""
    module_name, sep, attr = spec.partition(":")
    form = f"{flag} pkg.module:name, where name is {_FORMS[flag]}"
    if not sep or not module_name or not attr:
        raise RunCheckError(f"{flag}: got {spec!r}; write {form}")
    if os.getcwd() not in sys.path:  # as `python -m` has it, also in workers forked from the fork server
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raises while importing
        raise RunCheckError(f"{flag}: cannot import {module_name!r} ({type(exc).__name__}: {_first(exc)}); run from "
                            f"the folder that holds it, or add that folder to PYTHONPATH") from exc
    try:
        fn = getattr(module, attr)
    except AttributeError as exc:
        raise RunCheckError(f"{flag}: module {module_name!r} has no {attr!r}; write {form}") from exc
    if not callable(fn):
        raise RunCheckError(f"{flag}: {spec} is a {type(fn).__name__}, not a callable; write {form}")
    return fn


def build_user_model(spec: str) -> nn.Module:
    factory = resolve("--model", spec)
    try:
        model = factory()
    except Exception as exc:
        raise RunCheckError(f"--model: {spec}() raised {type(exc).__name__}: {_first(exc)}; fix the factory (it is "
                            "called with no arguments on every rank; run with --debug for the traceback)") from exc
    if not isinstance(model, nn.Module):
        raise RunCheckError(f"--model: {spec}() returned a {type(model).__name__}; it must return the torch.nn.Module "
                            "the plan was made for")
    return model


def meta_factory(spec: str) -> Callable[[], nn.Module]:
    """``--model`` for ``dry-run``: the factory called under ``torch.device("meta")`` (no memory)."""
    resolve("--model", spec)

    def build() -> nn.Module:
        with torch.device("meta"):
            return build_user_model(spec)
    return build


def default_loss(output: Any, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the last dim of the output (or its ``.logits``): language models and classifiers."""
    logits = getattr(output, "logits", output)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def user_loss(spec: str | None, plan: Plan) -> Callable[[Any, torch.Tensor], torch.Tensor]:
    if spec:
        return resolve("--loss", spec)
    if plan.model.preset:
        from runtime.model import loss_function, resolve_preset

        return loss_function(resolve_preset(plan))
    return default_loss


def user_batches(spec: str | None, plan: Plan, *, data_rank: int, data_world: int, seed: int,
                 first_step: int) -> Iterator[Any]:
    """This dp rank's batches: the ``--data`` loader's, or the preset's synthetic ones."""
    rows = plan.parallel.micro_batch_size * plan.parallel.num_micro_batches
    if not spec:
        if not plan.model.preset:
            raise RunCheckError(f"--data: the plan's model {plan.model.name!r} is not a preset, so there is no "
                                "synthetic data for it; pass --data pkg.module:loader, a loader(rank=, world=) "
                                f"yielding (inputs, targets) of {rows} rows")
        from runtime.data import SyntheticData
        from runtime.model import resolve_preset

        return iter(SyntheticData(plan, resolve_preset(plan), seed=seed, dp_index=data_rank, first_step=first_step))
    loader = resolve("--data", spec)
    offered = {"rank": data_rank, "world": data_world, "batch_size": rows, "seq_len": plan.model.seq_len,
               "seed": seed, "first_step": first_step}
    params = inspect.signature(loader).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in offered.items() if takes_all or k in params}
    if "rank" not in kwargs or "world" not in kwargs:
        raise RunCheckError(f"--data: {spec} takes {list(params)}; it must take rank= and world= (this data-parallel "
                            "rank and their number) and yield that rank's share of each global batch")
    try:
        batches = iter(loader(**kwargs))
    except Exception as exc:
        raise RunCheckError(f"--data: {spec}(rank={data_rank}, world={data_world}, ...) raised "
                            f"{type(exc).__name__}: {_first(exc)}; fix the loader (--debug shows the traceback)") from exc
    if first_step and "first_step" not in kwargs:  # it starts over: skip what the checkpoint already trained
        if dist.is_initialized() and dist.get_rank() == 0:
            print(f"--data {spec} takes no first_step=: skipping its first {first_step} batches so the resumed run "
                  "does not train them again (take first_step= to seek instead)", file=sys.stderr, flush=True)
        batches = itertools.islice(batches, first_step, None)
    return batches


def next_batch(batches: Iterator[Any], spec: str | None, plan: Plan, step: int) -> tuple[Any, torch.Tensor]:
    """The next ``(inputs, targets)``, checked: the loader's flag and the fix in every error."""
    rows = plan.parallel.micro_batch_size * plan.parallel.num_micro_batches
    where = f"--data {spec}" if spec else "synthetic data"
    try:
        batch = next(batches)
    except StopIteration:
        raise RunCheckError(f"{where}: the loader ran out before step {step}; yield a batch for every step "
                            "(loop over the data), or lower --steps") from None
    except Exception as exc:  # a generator loader fails here, not when called (a missing file, a bad path)
        raise RunCheckError(f"{where}: raised {type(exc).__name__} while yielding the batch of step {step}: "
                            f"{_first(exc)}; fix the loader (--debug shows the traceback)") from exc
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise RunCheckError(f"{where}: yielded a {type(batch).__name__}; yield (inputs, targets) tuples, inputs a "
                            "tensor, a tuple or a dict of tensors, with micro_batch_size x num_micro_batches = "
                            f"{rows} rows")
    inputs, targets = batch
    values = list(inputs.values()) if isinstance(inputs, dict) else \
        list(inputs) if isinstance(inputs, (tuple, list)) else [inputs]
    for name, t in [*(("inputs", v) for v in values), ("targets", targets)]:
        if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != rows:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise RunCheckError(f"{where}: {name} has shape {got}; each data-parallel rank takes micro_batch_size x "
                                f"num_micro_batches = {plan.parallel.micro_batch_size} x "
                                f"{plan.parallel.num_micro_batches} = {rows} rows per step (the loader is called "
                                "with rank= and world=: yield only that rank's share)")
    return inputs, targets


def preflight_user(plan: Plan, launch: Launch, *, resume_dir: str | None, checkpoint_dir: str | None = None) -> None:
    """What the launcher can check before starting workers for a user model (parallelize checks the model)."""
    ParallelDims.from_plan(plan, launch.world_size)
    _check_cluster(plan, launch)
    if checkpoint_dir is not None:
        busiest = max(sum(1 for s in plan.stages if rank in s.ranks) for rank in range(launch.world_size))
        if busiest > 1:  # ParallelModel._optimizers: optimizer state is saved per stage of one rank
            raise RunCheckError(f"--checkpoint-dir: this plan gives a rank {busiest} stages ({plan.parallel.schedule}, "
                                f"virtual stages {plan.parallel.virtual_stages}), and a run of your own model saves "
                                "its optimizer state with one stage per rank; plan without virtual stages (a "
                                "schedule such as 1f1b or zb-h1), or drop --checkpoint-dir")
    if resume_dir is not None:
        check_manifest_model(ckpt.verify_checkpoint(ckpt.latest_checkpoint(resume_dir)), plan, resume_dir)


def train_user(plan: Plan, options: Any, user: UserCode) -> Any:
    """The CLI's loop over :func:`runtime.parallelize.parallelize` (collective; in an initialised group)."""
    from runtime.parallelize import parallelize  # the Python API: one path for scripts and the CLI
    from runtime.train import RankMetrics, StopRequest, gather_result, stop_message

    rank = dist.get_rank()
    if user.model:
        model = build_user_model(user.model)
    else:
        from runtime.model import build_model, resolve_preset

        model = build_model(resolve_preset(plan), seed=options.seed)
    pm = parallelize(model, plan, loss_fn=user_loss(user.loss, plan), timeout_s=options.timeout_s)
    del model
    optim = torch.optim.AdamW(pm.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    first_step = _resume(pm, optim, options) if options.resume else 0
    batches = user_batches(user.data, plan, data_rank=pm.data_rank, data_world=pm.data_world, seed=options.seed,
                           first_step=first_step)
    metrics = RankMetrics(rank=rank, coords={"pp": pm.pp_rank, "dp": pm.data_rank, "tp": pm.tp_rank},
                          stages=[s.stage_index for s in pm.stages])
    losses, norms, checkpoints, stopped_by = [], [], [], None
    device = pm.device
    if rank == 0 and options.verbose:
        print(f"runtime: {plan.model.name} ({user.model or 'preset'}) | {plan.parallel.label()} | world "
              f"{dist.get_world_size()} on {device.type} | through runtime.parallelize", flush=True)
    with StopRequest() as stop:
        for step in range(first_step + 1, options.steps + 1):
            inputs, targets = next_batch(batches, user.data, plan, step)
            start = time.perf_counter()
            losses.append(pm.step(inputs, targets))
            norms.append(pm.clip_grad_norm_(float("inf")))
            optim.step()
            optim.zero_grad(set_to_none=True)
            metrics.step_times_s.append(time.perf_counter() - start)
            if rank == 0 and options.verbose:
                print(f"step {step:4d} | loss {losses[-1]:.6f} | grad norm {norms[-1]:.6f} | "
                      f"{metrics.step_times_s[-1]:.3f} s", flush=True)
            saved_now = options.checkpoint_every and step % options.checkpoint_every == 0
            if saved_now:
                checkpoints.append(str(pm.save(options.checkpoint_dir, step=step, optimizer=optim)))
            if stop.agreed(device):
                stopped_by = stop.signal_name
                if options.checkpoint_dir and not saved_now:
                    checkpoints.append(str(pm.save(options.checkpoint_dir, step=step, optimizer=optim)))
                if rank == 0:
                    print(stop_message(stopped_by, step, checkpoints[-1] if options.checkpoint_dir else None,
                                       options.checkpoint_dir), file=sys.stderr, flush=True)
                break
    return gather_result(metrics, device, pm.stages, [optim], pm.optimizer_shards, first_step=first_step,
                         losses=losses, grad_norms=norms, setup={"path": "runtime.parallelize"},
                         checkpoints=checkpoints, stopped_by=stopped_by)


def _resume(pm: ParallelModel, optim: torch.optim.Optimizer, options: Any) -> int:
    """Load the latest checkpoint of ``options.checkpoint_dir`` into ``pm`` and ``optim``; the step it
    holds, as rank 0 read it (collective)."""
    from runtime.train import resume_message

    path = ckpt.latest_checkpoint(options.checkpoint_dir)
    pm.load(path, optimizer=optim)
    box = [int(ckpt.verify_checkpoint(path)["step"]) if dist.get_rank() == 0 else 0]
    dist.broadcast_object_list(box, src=0)
    if dist.get_rank() == 0 and options.verbose:
        print(resume_message(box[0], options.steps, str(path)), flush=True)
    return box[0]


def _first(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else ""
