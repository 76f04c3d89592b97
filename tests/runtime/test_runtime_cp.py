"""Context parallelism in the runtime (runtime/context_parallel.py): the same training as one process.

gpt-tiny and llama-tiny (grouped-query attention, rotary) at cp=2 on 2 ranks and on 4 ranks with dp, tp,
sequence parallelism, pp and HSDP, with and without recomputation, 3 AdamW steps in fp32 on gloo, against the
plain single-process loop on the same seed and global batch: losses within 1e-5, gradient norms within 1e-4
relative. One launch per world size. The K/V all-gathers a recomputed block re-runs are counted on a fake
process group (no ranks): the same on every cp rank, so no rank waits on a gather another never issues.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from runtime_harness import LOSS_TOL, NORM_RTOL, Job, launch, run_jobs, run_reference
from runtime_plans import make_plan, tiny_preset

import runtime.context_parallel as cpm
from planner.errors import SpecError
from planner.resolve import resolve_model, runnable_space
from planner.space import SearchSpace
from runtime.context_parallel import (
    all_positions,
    apply_context_parallel,
    check_context_parallel,
    shard_positions,
)
from runtime.data_parallel import fsdp_mesh
from runtime.dry_run import fake_world
from runtime.errors import RunCheckError
from runtime.model import build_model, build_stage_modules, stages_of_rank
from runtime.parallel_dims import ParallelDims
from runtime.rank_layout import RankLayout
from runtime.recompute import apply_recompute

STEPS = 3
LR = 1e-3
# name -> (preset, plan arguments; "tie": the preset's tie_embeddings); every plan's global batch is 8
WORLD2 = {"gpt cp=2": ("gpt-tiny", dict(cp=2, num_micro_batches=4)),
          "llama cp=2": ("llama-tiny", dict(cp=2, num_micro_batches=4)),
          "gpt cp=2 zero=3 (FSDP over dp x cp)": ("gpt-tiny", dict(cp=2, num_micro_batches=4, zero_stage=3)),
          "llama cp=2 zero=3 (FSDP over dp x cp)": ("llama-tiny", dict(cp=2, num_micro_batches=4, zero_stage=3)),
          "gpt cp=2 recompute=full": ("gpt-tiny", dict(cp=2, num_micro_batches=4, recompute="full")),
          "llama cp=2 recompute=selective": ("llama-tiny", dict(cp=2, num_micro_batches=4, recompute="selective")),
          "gpt cp=2 recompute=full every 2": ("gpt-tiny", dict(cp=2, num_micro_batches=4, recompute="full",
                                                              recompute_every=2)),
          "llama cp=2 recompute=full zero=3": ("llama-tiny", dict(cp=2, num_micro_batches=4, recompute="full",
                                                                 zero_stage=3))}
WORLD4 = {"gpt cp=2 dp=2": ("gpt-tiny", dict(cp=2, dp=2, num_micro_batches=2)),
          "llama cp=2 dp=2": ("llama-tiny", dict(cp=2, dp=2, num_micro_batches=2)),
          "gpt cp=2 tp=2": ("gpt-tiny", dict(cp=2, tp=2, num_micro_batches=4)),
          "llama cp=2 tp=2": ("llama-tiny", dict(cp=2, tp=2, num_micro_batches=4)),
          "gpt cp=2 dp=2 zero=1": ("gpt-tiny", dict(cp=2, dp=2, num_micro_batches=2, zero_stage=1)),
          "gpt cp=2 pp=2 1f1b recompute=full, tied": ("gpt-tiny", dict(cp=2, pp=2, num_micro_batches=4,
                                                                        recompute="full", tie=True)),
          "llama cp=2 pp=2 interleaved-1f1b": ("llama-tiny", dict(cp=2, pp=2, num_micro_batches=4,
                                                                  schedule="interleaved-1f1b", virtual_stages=2)),
          "gpt cp=2 pp=2 zb-v recompute=selective": ("gpt-tiny", dict(cp=2, pp=2, num_micro_batches=4,
                                                                      schedule="zb-v", virtual_stages=2,
                                                                      recompute="selective")),
          "gpt cp=2 tp=2 sp": ("gpt-tiny", dict(cp=2, tp=2, num_micro_batches=4, sequence_parallel=True)),
          "llama cp=2 tp=2 sp recompute=selective": ("llama-tiny", dict(cp=2, tp=2, num_micro_batches=4,
                                                                        sequence_parallel=True,
                                                                        recompute="selective")),
          "gpt cp=2 dp=2 HSDP (dp_shard=1)": ("gpt-tiny", dict(cp=2, dp=2, num_micro_batches=2, zero_stage=3,
                                                               dp_shard=1)),
          "llama cp=2 dp=2 HSDP recompute=full": ("llama-tiny", dict(cp=2, dp=2, num_micro_batches=2,
                                                                     zero_stage=3, dp_shard=1,
                                                                     recompute="full"))}


def _case(preset: str, args: dict):
    """``(plan, preset)`` of a table entry."""
    args = dict(args)
    tie = args.pop("tie", None)
    return make_plan(preset=preset, tie=tie, **args), tiny_preset(preset, tie)


def _jobs(cases: dict) -> list[Job]:
    jobs = []
    for name, (p, args) in cases.items():
        plan, preset = _case(p, args)
        jobs.append(Job(name, plan, steps=STEPS, preset=preset))
    return jobs


@pytest.fixture(scope="module")
def cp_references() -> dict:
    cases = [(name, *_case(p, args), LR) for name, (p, args) in {**WORLD2, **WORLD4}.items()]
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


def _at_seq(plan, seq_len: int) -> SimpleNamespace:
    """What check_context_parallel reads of ``plan``, at another sequence length."""
    return SimpleNamespace(parallel=plan.parallel, model=SimpleNamespace(seq_len=seq_len))


def test_cp_is_refused_where_it_cannot_run():
    with pytest.raises(RunCheckError, match="parallel.cp: 2 > 1 for a user model"):
        check_context_parallel(make_plan(cp=2), None, user_model=True)
    with pytest.raises(RunCheckError, match="family 'bert'"):
        check_context_parallel(make_plan(cp=2), "bert")
    with pytest.raises(RunCheckError, match=r"2\*cp = 8 must divide the sequence length 60"):
        check_context_parallel(_at_seq(make_plan(cp=4), 60), "gpt")
    with pytest.raises(RunCheckError, match="splits each cp rank's 18 positions over tp = 4"):
        check_context_parallel(_at_seq(make_plan(cp=2, tp=4, sequence_parallel=True), 36), "gpt")
    with pytest.raises(RunCheckError, match="parallel.cp: a mixture-of-experts layer"):
        apply_context_parallel(build_model(tiny_preset("mixtral-tiny"), seed=0), group=None, cp=2, seq_len=32,
                               cp_index=0, device=torch.device("cpu"))
    for runs in (dict(pp=2), dict(recompute="full"), dict(tp=2, sequence_parallel=True),
                 dict(dp=2, zero_stage=3, dp_shard=1)):  # what the equivalence tables run
        check_context_parallel(make_plan(cp=2, **runs), "gpt")
    assert torch.equal(shard_positions(8, 1, 0), torch.arange(8))


@pytest.mark.parametrize("mode, every, gathers", [("none", 1, 8), ("full", 1, 16), ("selective", 1, 16),
                                                  ("full", 2, 12)])
def test_recompute_reissues_the_kv_gathers_alike_on_every_cp_rank(monkeypatch, mode, every, gathers):
    """llama-tiny's 4 attentions gather K and V once each in the forward (8); a recomputed attention gathers
    them again in the backward. Each cp rank of a fake 2-rank group issues the same count."""
    plan, preset = make_plan(preset="llama-tiny", cp=2, recompute=mode, recompute_every=every), \
        tiny_preset("llama-tiny")
    counts = []
    for rank in (0, 1):
        calls: list[int] = []
        real = cpm.all_gather_single_autograd

        def counting(t, *args, real=real, calls=calls, **kwargs):
            calls.append(1)
            return real(t, *args, **kwargs)

        monkeypatch.setattr(cpm, "all_gather_single_autograd", counting)
        with fake_world(2, rank):
            stage = build_stage_modules(build_model(preset, seed=0), stages_of_rank(plan, rank), plan)[0]
            assert apply_context_parallel(stage, group=dist.group.WORLD, cp=2, seq_len=plan.model.seq_len,
                                          cp_index=rank, device=torch.device("cpu")) == 4
            apply_recompute(stage, mode, every=every, layer_names=plan.model.layer_names)
            stage(torch.randint(0, 256, (2, plan.model.seq_len // 2))).float().sum().backward()
        counts.append(len(calls))
    assert counts == [gathers, gathers]


def test_hsdp_shard_groups_are_the_planned_dp_shard_times_cp_ranks():
    """dp=4 cp=2, dp_shard=2: FSDP2's (replicate, shard) mesh rows are the planner's shard groups, 2 consecutive
    dp indices x every cp index (planner/cost/sharding.py), two replicas of each shard."""
    layout = RankLayout(pp=1, dp=4, tp=1, cp=2)
    with fake_world(8, 0):
        mesh = ParallelDims(dp=4, tp=1, pp=1, cp=2, world_size=8).build_mesh("cpu")
        rows = fsdp_mesh(cpm.data_mesh(mesh, 2), 2).mesh.tolist()
    assert rows == [[layout.rank_of(0, d, 0, k) for d in range(2 * r, 2 * r + 2) for k in range(2)] for r in range(2)]
    assert rows == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_runnable_space_drops_cp_where_the_runtime_cannot_run_it():
    space = SearchSpace()
    for name in ("gpt-tiny", "llama-tiny"):  # the runtime runs them: the search keeps its choice
        assert runnable_space(resolve_model(name, dtype="fp32"), space).cp is None
    for name in ("bert-tiny", "mixtral-tiny", "gpt3-125m"):  # another family; experts; dropout 0.1
        assert runnable_space(resolve_model(name, dtype="fp32"), space).cp == (1,), name
    with pytest.raises(SpecError) as err:
        runnable_space(resolve_model("bert-tiny", dtype="fp32"), SearchSpace(cp=(2,)))
    assert err.value.field == "cp" and "drop --cp" in str(err.value)
