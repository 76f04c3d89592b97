"""Shared fixtures for the runtime tests: one world per world size, run once per session.

The worlds are started with the runtime's own launcher (torch elastic, gloo on CPU); each trains
every plan of its size in turn (see ``runtime_harness.run_jobs``). The single-process oracle runs in a
one-process world too, so pytest's own process never computes (forked workers stay fork-safe).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from runtime_harness import LR, Job, run_jobs, run_reference  # noqa: E402
from runtime_plans import make_plan, tiny_preset  # noqa: E402

STEPS = 5

# name -> (make_plan arguments). Every plan trains gpt-tiny on a global batch of 8 in 4 micro-batches.
WORLD2 = {
    "pp=2 1f1b": dict(pp=2, num_micro_batches=4),
    "pp=2 gpipe": dict(pp=2, num_micro_batches=4, schedule="gpipe"),
    "pp=2 v=2 gpipe (looped BFS)": dict(pp=2, num_micro_batches=4, schedule="gpipe", virtual_stages=2),
    "pp=2 v=2 interleaved-1f1b": dict(pp=2, num_micro_batches=4, schedule="interleaved-1f1b", virtual_stages=2),
    "pp=2 zb-h1": dict(pp=2, num_micro_batches=4, schedule="zb-h1"),
    "pp=2 zb-h2": dict(pp=2, num_micro_batches=4, schedule="zb-h2"),
    "pp=2 v=2 zb-v": dict(pp=2, num_micro_batches=4, schedule="zb-v", virtual_stages=2),
    "pp=2 v=2 dualpipe-v": dict(pp=2, num_micro_batches=4, schedule="dualpipe-v", virtual_stages=2),
    "pp=2 recompute=full": dict(pp=2, num_micro_batches=4, recompute="full"),
    "pp=2 tied embeddings": dict(pp=2, num_micro_batches=4, tie=True),
    "tp=2": dict(tp=2, num_micro_batches=4),
    "tp=2 recompute=selective": dict(tp=2, num_micro_batches=4, recompute="selective"),
    "dp=2 (DDP)": dict(dp=2, num_micro_batches=2),
    "dp=2 zero=1 (FSDP2)": dict(dp=2, num_micro_batches=2, zero_stage=1),
    "dp=2 zero=3 (FSDP2)": dict(dp=2, num_micro_batches=2, zero_stage=3),
    "dp=2 user dataloader": dict(dp=2, num_micro_batches=2, user_data=True),
}
WORLD4 = {
    "pp=2 dp=2 1f1b": dict(pp=2, dp=2, num_micro_batches=2),
    "pp=2 dp=2 v=2 interleaved-1f1b": dict(pp=2, dp=2, num_micro_batches=2, schedule="interleaved-1f1b",
                                           virtual_stages=2),
    "pp=2 dp=2 zero=3": dict(pp=2, dp=2, num_micro_batches=2, zero_stage=3),
    "pp=2 dp=2 tied embeddings": dict(pp=2, dp=2, num_micro_batches=2, tie=True),
    "pp=2 tp=2": dict(pp=2, tp=2, num_micro_batches=4),
    "dp=2 tp=2": dict(dp=2, tp=2, num_micro_batches=2),
    "dp=2 tp=2 zero=2 (FSDP2 + TP)": dict(dp=2, tp=2, num_micro_batches=2, zero_stage=2),
}


def job_for(name: str, spec: dict, steps: int = STEPS) -> Job:
    args = {k: v for k, v in spec.items() if k not in ("tie", "user_data")}
    tie = spec.get("tie")
    return Job(name, make_plan(tie=tie, **args), steps=steps, preset=tiny_preset("gpt-tiny", tie),
               user_data=spec.get("user_data", False))


def launch(nproc: int, fn, *args):
    from runtime.launch import launch_workers

    return launch_workers(nproc, fn, *args)


@pytest.fixture(scope="session")
def references() -> dict:
    """tied? -> (losses, grad norms) of the single-process oracle, gpt-tiny, global batch 8 in 4 micro-batches."""
    plan = make_plan(num_micro_batches=4)
    untied, tied = tiny_preset("gpt-tiny", None), tiny_preset("gpt-tiny", True)
    cases = [(False, plan, untied, LR), (True, make_plan(num_micro_batches=4, tie=True), tied, LR),
             ("frozen", plan, untied, 0.0)]  # lr 0: shows how far a plan that does not train would be off
    return launch(1, run_reference, cases, STEPS)[0]


@pytest.fixture(scope="session")
def world2_results():
    return launch(2, run_jobs, [job_for(n, s) for n, s in WORLD2.items()])[0]


@pytest.fixture(scope="session")
def world4_results():
    return launch(4, run_jobs, [job_for(n, s) for n, s in WORLD4.items()])[0]
