"""Context parallelism in the runtime (runtime/context_parallel.py): the same training as one process.

gpt-tiny and llama-tiny (grouped-query attention, rotary) at cp=2 on 2 ranks and cp=2 x dp=2 on 4 ranks,
3 AdamW steps in fp32 on gloo, against the plain single-process loop on the same seed and global batch:
losses within 1e-5, gradient norms within 1e-4 relative. One launch per world size.
"""

from __future__ import annotations

import pytest
import torch
from runtime_harness import LOSS_TOL, NORM_RTOL, Job, launch, run_jobs, run_reference
from runtime_plans import make_plan, tiny_preset

from runtime.context_parallel import all_positions, check_context_parallel, shard_positions
from runtime.errors import RunCheckError

STEPS = 3
LR = 1e-3
# name -> (preset, plan arguments); every plan's global batch is 8
WORLD2 = {"gpt cp=2": ("gpt-tiny", dict(cp=2, num_micro_batches=4)),
          "llama cp=2": ("llama-tiny", dict(cp=2, num_micro_batches=4)),
          "gpt cp=2 zero=3 (FSDP over dp x cp)": ("gpt-tiny", dict(cp=2, num_micro_batches=4, zero_stage=3)),
          "llama cp=2 zero=3 (FSDP over dp x cp)": ("llama-tiny", dict(cp=2, num_micro_batches=4, zero_stage=3))}
WORLD4 = {"gpt cp=2 dp=2": ("gpt-tiny", dict(cp=2, dp=2, num_micro_batches=2)),
          "llama cp=2 dp=2": ("llama-tiny", dict(cp=2, dp=2, num_micro_batches=2)),
          "gpt cp=2 tp=2": ("gpt-tiny", dict(cp=2, tp=2, num_micro_batches=4)),
          "llama cp=2 tp=2": ("llama-tiny", dict(cp=2, tp=2, num_micro_batches=4)),
          "gpt cp=2 dp=2 zero=1": ("gpt-tiny", dict(cp=2, dp=2, num_micro_batches=2, zero_stage=1))}


def _jobs(cases: dict) -> list[Job]:
    return [Job(name, make_plan(preset=p, **args), steps=STEPS, preset=tiny_preset(p)) for name, (p, args) in
            cases.items()]


@pytest.fixture(scope="module")
def cp_references() -> dict:
    cases = [(name, make_plan(preset=p, **args), tiny_preset(p), LR) for name, (p, args) in {**WORLD2, **WORLD4}.items()]
    return launch(1, run_reference, cases, STEPS)[0]


def _check(result, reference) -> tuple[float, float]:
    assert result.error is None, result.error
    assert len(result.losses) == STEPS
    loss_diff = max(abs(a - b) for a, b in zip(result.losses, reference[0]))
    norm_rel = max(abs(a / b - 1) for a, b in zip(result.grad_norms, reference[1]))
    assert loss_diff <= LOSS_TOL, f"losses {result.losses} vs single process {reference[0]}"
    assert norm_rel <= NORM_RTOL, f"grad norms {result.grad_norms} vs single process {reference[1]}"
    return loss_diff, norm_rel


@pytest.mark.multiprocess
def test_cp_matches_single_process(cp_references, capsys):
    results = {**launch(2, run_jobs, _jobs(WORLD2))[0], **launch(4, run_jobs, _jobs(WORLD4))[0]}
    for name in (*WORLD2, *WORLD4):
        loss_diff, norm_rel = _check(results[name], cp_references[name])
        with capsys.disabled():
            print(f"\n{name}: max |loss diff| {loss_diff:.2e}, max rel grad-norm diff {norm_rel:.2e}")


def test_balanced_shards_cover_the_sequence_once():
    assert shard_positions(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert shard_positions(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert sorted(all_positions(64, 4).tolist()) == list(range(64))
    # equal causal work: each rank's queries see the same number of keys at or before them
    work = [int((shard_positions(64, 4, i) + 1).sum()) for i in range(4)]
    assert len(set(work)) == 1, work


def test_cp_is_refused_where_it_cannot_run():
    with pytest.raises(RunCheckError, match="parallel.cp: 2 > 1 for a user model"):
        check_context_parallel(make_plan(cp=2), None, user_model=True)
    with pytest.raises(RunCheckError, match="family 'bert'"):
        check_context_parallel(make_plan(cp=2), "bert")
    with pytest.raises(RunCheckError, match=r"not with \['pp'\]"):
        check_context_parallel(make_plan(cp=2, pp=2), "gpt")
    check_context_parallel(make_plan(cp=2), "gpt")  # runs
    assert torch.equal(shard_positions(8, 1, 0), torch.arange(8))
