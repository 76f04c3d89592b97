"""Spawn real ranks once and run several plans in them; and a plain single-process oracle.

Starting a world costs seconds (processes, rendezvous), a gpt-tiny step a fraction of one, so a
test launches one world per world size and trains every plan of that size in it, one after the other.

:func:`reference_losses` is the oracle: a plain PyTorch loop (no runtime code) over the same model,
seed and synthetic data, accumulating the plan's micro-batches; the runtime must reproduce it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from runtime_plans import make_plan, tiny_preset

from planner.models import ModelPreset
from planner.plan import Plan
from runtime.data import synthetic_global_batch

LR = 1e-3
WEIGHT_DECAY = 0.01
STEPS = 5
LOSS_TOL = 1e-5  # the bar: losses within 1e-5 of the single process (fp32)
NORM_RTOL = 1e-4  # gradient norms, relative


@dataclass(frozen=True)
class Job:
    name: str
    plan: Plan
    steps: int = 5
    seed: int = 0
    preset: ModelPreset | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    expect_error: bool = False  # the job must raise RunCheckError (e.g. a corrupted checkpoint)
    user_data: bool = False  # feed the batches through train(data=...) as a user's dataloader would
    verify_replicas: bool = False  # measure how far tp copies of replicated parameters drifted (dropout tests)


@dataclass
class JobResult:
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    error: str | None = None
    step_times_s: list[float] = field(default_factory=list)
    peak_memory_bytes: int = 0
    model_state_bytes: int = 0
    tp_replica_max_diff: float | None = None


def job_for(name: str, spec: dict, steps: int = STEPS) -> Job:
    """A :class:`Job` from a ``WORLD2``/``WORLD4`` entry of :mod:`runtime_plans`."""
    args = {k: v for k, v in spec.items() if k not in ("tie", "user_data")}
    tie = spec.get("tie")
    return Job(name, make_plan(tie=tie, **args), steps=steps, preset=tiny_preset("gpt-tiny", tie),
               user_data=spec.get("user_data", False))


def run_jobs(jobs: list[Job]) -> dict[str, JobResult]:
    """Worker entry point: every rank trains every job in order; returns name -> result."""
    import torch.distributed as dist

    from runtime.errors import RunCheckError
    from runtime.launch import init_distributed
    from runtime.train import RunOptions, train

    torch.set_num_threads(1)
    init_distributed(60.0)
    results: dict[str, JobResult] = {}
    try:
        for job in jobs:
            options = RunOptions(steps=job.steps, seed=job.seed, lr=LR, weight_decay=WEIGHT_DECAY,
                                 checkpoint_dir=job.checkpoint_dir, checkpoint_every=job.checkpoint_every,
                                 resume=job.resume, timeout_s=60.0, verbose=False,
                                 verify_replicas=job.verify_replicas)
            data = _user_loader(job) if job.user_data else None
            try:
                res = train(job.plan, options, preset=job.preset, data=data)
            except RunCheckError as exc:
                if not job.expect_error:
                    raise
                results[job.name] = JobResult(error=str(exc))
                continue
            results[job.name] = JobResult(losses=res.losses, grad_norms=res.grad_norms, step_times_s=res.step_times_s,
                                          peak_memory_bytes=res.rank.peak_memory_bytes,
                                          model_state_bytes=res.rank.model_state_bytes,
                                          tp_replica_max_diff=res.tp_replica_max_diff)
    finally:
        dist.destroy_process_group()
    return results


def _user_loader(job: Job):
    """A plain generator of this dp rank's (inputs, targets), like a DistributedSampler-backed loader."""
    import torch.distributed as dist

    from runtime.data import local_rows
    from runtime.parallel_dims import ParallelDims

    dp_index = ParallelDims.from_plan(job.plan, dist.get_world_size()).coords(dist.get_rank())[1]
    rows = local_rows(job.plan, dp_index)
    for step in range(job.steps):
        x, y = synthetic_global_batch(job.preset, batch=job.plan.parallel.global_batch,
                                      seq_len=job.plan.model.seq_len, seed=job.seed, step=step)
        yield (tuple(t[rows] for t in x) if isinstance(x, tuple) else x[rows]), y[rows]


def reference_losses(plan: Plan, preset: ModelPreset, *, steps: int, seed: int = 0, first_step: int = 0,
                     lr: float = LR, dtype: torch.dtype = torch.float32) -> tuple[list[float], list[float]]:
    """Single process, no runtime code: the numbers every plan of this model and batch must give.

    ``dtype`` float64 gives the same training computed with less rounding (see :func:`rounding_rtol`).
    """
    torch.set_num_threads(1)
    model = preset.build(device="cpu", dtype=dtype, seed=seed)
    model.train()
    optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    m = plan.parallel.num_micro_batches * plan.parallel.dp  # micro-batches of the global batch
    losses, norms = [], []
    for step in range(1, first_step + steps + 1):
        x, y = synthetic_global_batch(preset, batch=plan.parallel.global_batch, seq_len=plan.model.seq_len,
                                      seed=seed, step=step - 1)
        total = 0.0
        xs = x if isinstance(x, tuple) else (x,)  # T5 takes two inputs: encoder and decoder tokens
        xs = tuple(t.to(dtype) if t.is_floating_point() else t for t in xs)
        for *xb, yb in zip(*(t.chunk(m) for t in xs), y.chunk(m)):
            logits = model(*xb)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.reshape(-1))
            (loss / m).backward()
            total += loss.item()
        norm = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters() if p.grad is not None))
        optim.step()
        optim.zero_grad(set_to_none=True)
        if step > first_step:
            losses.append(total / m)
            norms.append(float(norm))
    return losses, norms


def run_reference(cases: list[tuple[object, Plan, ModelPreset, float]], steps: int) -> dict:
    """Worker entry point for a 1-process world that only computes oracles (keeps pytest's process clean).

    ``cases``: ``(key, plan, preset, lr)``; returns key -> (losses, grad norms)."""
    return {key: reference_losses(plan, preset, steps=steps, lr=lr) for key, plan, preset, lr in cases}


def rounding_rtol(cases: list[tuple[object, Plan, ModelPreset]], steps: int) -> dict:
    """Worker entry point: key -> the gradient-norm tolerance of each case, from its own rounding error.

    The fp32 single-process run is itself off from the same run in fp64: far below 1e-4 for most tiny
    presets, but 1.1e-4 relative by step 5 for t5-tiny (``test_runtime_planner_plans.py --bars``
    prints it), whose AdamW steps amplify the rounding of near-zero gradient elements. A
    multi-process run rounds differently again, so it is
    held to ``max(NORM_RTOL, 4 x that error)``: the fixed bar wherever fp32 is that accurate, and a
    bar a few times the reference's own inaccuracy where it is not. Losses keep ``LOSS_TOL``.
    """
    out = {}
    for key, plan, preset in cases:
        single = reference_losses(plan, preset, steps=steps)[1]
        double = reference_losses(plan, preset, steps=steps, dtype=torch.float64)[1]
        out[key] = max(NORM_RTOL, 4 * max(abs(a / b - 1) for a, b in zip(single, double)))
    return out


def launch(nproc: int, fn, *args):
    """One world of ``nproc`` ranks running ``fn(*args)`` with the runtime's launcher; rank -> return value."""
    from runtime.launch import launch_workers

    return launch_workers(nproc, fn, *args)


def preset_references(presets, lrs: tuple[float, ...] = (LR, 0.0), num_micro_batches: int = 4) -> dict:
    """``(preset, lr) -> (losses, grad norms)`` of the single-process loop for each tiny preset, global batch 8
    in ``num_micro_batches``, computed in a one-rank world (pytest's own process never trains)."""
    cases = [((p, lr), make_plan(preset=p, num_micro_batches=num_micro_batches), tiny_preset(p), lr)
             for p in presets for lr in lrs]
    return launch(1, run_reference, cases, STEPS)[0]


def check_untrained_is_caught(references: dict, preset: str) -> None:
    """A run that did not train (lr 0) starts at the same loss and is far outside the tolerance by step 2."""
    trained, frozen = references[(preset, LR)][0], references[(preset, 0.0)][0]
    assert abs(trained[0] - frozen[0]) <= 1e-7
    assert max(abs(a - b) for a, b in zip(trained[1:], frozen[1:])) > 100 * LOSS_TOL


def check_matches(result: JobResult, reference: tuple[list[float], list[float]], norm_rtol: float = NORM_RTOL
                  ) -> None:
    """A run's losses and gradient norms against the single-process ``(losses, grad norms)``."""
    ref_losses, ref_norms = reference
    assert result.error is None, result.error
    assert len(result.losses) == STEPS
    diff = max(abs(a - b) for a, b in zip(result.losses, ref_losses))
    assert diff <= LOSS_TOL, f"losses {result.losses} vs single process {ref_losses}"
    rel = max(abs(a / b - 1) for a, b in zip(result.grad_norms, ref_norms))
    assert rel <= norm_rtol, f"grad norms {result.grad_norms} vs single process {ref_norms} (tolerance {norm_rtol:.1e})"


EQUIVALENCE_HEADER = ["| plan (global batch 8, fp32, gloo) | ranks | max abs loss diff | max rel grad-norm diff | "
                      "median step s |", "|---|---|---|---|---|"]


def equivalence_row(name: str, nproc: int, result: JobResult, reference: tuple[list[float], list[float]]) -> str:
    """One row of the equivalence tables in docs/runtime.md: a run against the single process."""
    ref_losses, ref_norms = reference
    loss_diff = max(abs(a - b) for a, b in zip(result.losses, ref_losses))
    norm_diff = max(abs(a / b - 1) for a, b in zip(result.grad_norms, ref_norms))
    return (f"| {name} | {nproc} | {loss_diff:.1e} | {norm_diff:.1e} | "
            f"{statistics.median(result.step_times_s[1:]):.3f} |")
