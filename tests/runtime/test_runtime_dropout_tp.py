"""Dropout under tensor parallelism: tp replicas stay identical, split regions get their own masks, recompute replays.

With dropout no multi-process run can equal one process (the ranks draw their masks differently),
so these runs are checked for what must hold instead (``runtime.tensor_parallel_rng``):

* every parameter replicated on tp (norms, biases of row-parallel Linears, whole embeddings) is
  bit-identical on both tp ranks after 5 AdamW steps, so the replicated regions dropped the same
  elements on both ranks (``RunOptions.verify_replicas``); a control run whose ranks seed their
  generators differently shows the measurement is not blind (its copies drift apart);
* dropout is active (the losses differ from the dropout-free single process);
* ``recompute="full"`` gives the same losses as no recompute: the recomputed forward drew the
  same masks, split regions included.

Single-process part: the split-region stream differs between tp ranks, repeats for one rank, and
moves the default generators alike on every rank.
"""

from __future__ import annotations

import pytest
import torch
from runtime_harness import LR, STEPS, WEIGHT_DECAY, Job, JobResult, launch, preset_references
from runtime_plans import make_plan, tiny_preset
from torch import nn

from runtime.tensor_parallel_rng import SplitRegionRNG, fork_dropout

P = 0.1
CASES = {  # name -> (preset, make_plan arguments)
    "gpt-tiny tp=2": ("gpt-tiny", dict(tp=2)),
    "gpt-tiny tp=2 sequence parallel": ("gpt-tiny", dict(tp=2, sequence_parallel=True)),
    "gpt-tiny tp=2 recompute full": ("gpt-tiny", dict(tp=2, recompute="full")),
    "bert-tiny tp=2": ("bert-tiny", dict(tp=2)),
    "t5-tiny tp=2": ("t5-tiny", dict(tp=2)),
}
CONTROL = "gpt-tiny tp=2, ranks seeded apart (control)"


def _job(name: str, preset: str, args: dict) -> Job:
    plan = make_plan(preset=preset, dropout=P, num_micro_batches=4, **args)
    return Job(name, plan, steps=STEPS, preset=tiny_preset(preset, dropout=P), verify_replicas=True)


def run_with_control(jobs: list[Job], control: Job) -> dict:
    """Worker: ``jobs`` as the runtime runs them, then ``control`` with each rank's generators seeded by its rank."""
    import sys

    import torch.distributed as dist

    from runtime.launch import init_distributed
    from runtime.train import RunOptions, train

    torch.set_num_threads(1)
    init_distributed(60.0)
    module = sys.modules["runtime.train"]  # the module: the package exports the function under that name
    plain = module.build_model

    def seeded_apart(preset, *, seed):
        model = plain(preset, seed=seed)
        torch.manual_seed(seed + 1000 * dist.get_rank())
        return model

    results: dict = {}
    try:
        for job in [*jobs, control]:
            module.build_model = seeded_apart if job is control else plain
            res = train(job.plan, RunOptions(steps=job.steps, lr=LR, weight_decay=WEIGHT_DECAY, verbose=False,
                                             verify_replicas=True), preset=job.preset)
            results[job.name] = JobResult(losses=res.losses, grad_norms=res.grad_norms,
                                          tp_replica_max_diff=res.tp_replica_max_diff)
    finally:
        module.build_model = plain
        dist.destroy_process_group()
    return results


@pytest.fixture(scope="module")
def results() -> dict:
    jobs = [_job(name, preset, args) for name, (preset, args) in CASES.items()]
    return launch(2, run_with_control, jobs, _job(CONTROL, "gpt-tiny", dict(tp=2)))[0]


@pytest.fixture(scope="module")
def no_dropout() -> dict:
    return preset_references(sorted({preset for preset, _ in CASES.values()}), (LR,))


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", list(CASES))
def test_tp_replicas_stay_identical_with_dropout(name, results, no_dropout):
    r = results[name]
    assert r.error is None and len(r.losses) == STEPS
    assert r.tp_replica_max_diff == 0.0
    plain = no_dropout[(CASES[name][0], LR)][0]
    assert abs(r.losses[0] - plain[0]) > 1e-4  # dropout is on
    assert max(abs(a - b) for a, b in zip(r.losses, plain)) < 0.5


@pytest.mark.multiprocess
def test_the_replica_check_sees_ranks_that_drew_apart(results):
    assert results[CONTROL].tp_replica_max_diff > 1e-4


@pytest.mark.multiprocess
def test_recompute_replays_the_same_masks(results):
    with_recompute, without = results["gpt-tiny tp=2 recompute full"].losses, results["gpt-tiny tp=2"].losses
    assert max(abs(a - b) for a, b in zip(with_recompute, without)) < 1e-6


def test_split_region_streams_differ_by_rank_and_keep_the_default_generator_in_step():
    x = torch.ones(4096)
    masks, states = [], []
    for rank in (0, 1, 0):
        torch.manual_seed(7)
        with SplitRegionRNG(rank).fork(x.device):
            masks.append(torch.nn.functional.dropout(x, P) == 0)
        states.append(torch.get_rng_state())
    assert not torch.equal(masks[0], masks[1])
    assert torch.equal(masks[0], masks[2])
    assert torch.equal(states[0], states[1])  # every rank's default generator moved by the same one draw
    torch.manual_seed(7)
    torch.randint(0, 1 << 62, (1,))
    assert torch.equal(states[0], torch.get_rng_state())


def test_a_forked_dropout_in_eval_mode_draws_nothing():
    drop = nn.Dropout(P)
    fork_dropout(drop, SplitRegionRNG(1))
    drop.eval()
    torch.manual_seed(3)
    before = torch.get_rng_state()
    assert torch.equal(drop(torch.ones(8)), torch.ones(8))
    assert torch.equal(before, torch.get_rng_state())


def table_rows() -> list[str]:
    """The markdown table of docs/runtime.md ("Dropout with tp > 1")."""
    jobs = [_job(name, preset, args) for name, (preset, args) in CASES.items()]
    runs = launch(2, run_with_control, jobs, _job(CONTROL, "gpt-tiny", dict(tp=2)))[0]
    plain = preset_references(sorted({preset for preset, _ in CASES.values()}), (LR,))
    rows = [f"| plan (dropout {P}, 2 ranks, fp32, gloo) | largest tp replica difference | step-1 loss | "
            "step-1 loss without dropout (one process) |", "|---|---|---|---|"]
    for name, r in runs.items():
        preset = CASES[name][0] if name in CASES else "gpt-tiny"
        rows.append(f"| {name} | {r.tp_replica_max_diff:.1e} | {r.losses[0]:.4f} | {plain[(preset, LR)][0][0]:.4f} |")
    return rows


if __name__ == "__main__":
    print("\n".join(table_rows()))
