"""Expert parallelism (runtime.expert_parallel) trains as one process does.

``mixtral-tiny`` (4 experts, top 2, capacity factor 1.0) and ``deepseek-tiny`` (8 experts, top 2, one
shared expert, a dense first block): the experts split over ep data-parallel ranks, tokens dispatched
and combined by autograd all-to-alls on gloo; 3 AdamW steps in fp32, losses within 1e-5 of a plain
single-process loop and gradient norms within 1e-4 relative. Every plan keeps micro-batches of 2 rows,
the reference's, so each rank's routing (capacity and drop order) is the single process's. One
launch per world size: dp=2 ep=2 (and ZeRO-1), tp=2 on 2 ranks; dp=4 ep=2 (and ZeRO-1, ZeRO-2),
dp=4 ep=4, pp=2 x dp=2 ep=2 and tp=2 x dp=2 ep=2 on 4. What the runtime cannot run (ZeRO-3 with ep) is refused naming ``ep`` and
``zero_stage``.

Run as a script, it prints the equivalence table of docs/runtime.md ("Expert parallelism")::

    .venv/bin/python tests/runtime/test_runtime_ep.py
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from runtime_harness import LOSS_TOL, NORM_RTOL, Job, launch, run_jobs, run_reference
from runtime_plans import make_plan, tiny_preset

from runtime.errors import RunCheckError
from runtime.expert_parallel import check_expert_parallel

STEPS = 3
WORLD2 = {"mixtral-tiny dp=2 ep=2": dict(preset="mixtral-tiny", dp=2, ep=2),
          "deepseek-tiny dp=2 ep=2": dict(preset="deepseek-tiny", dp=2, ep=2),
          "mixtral-tiny dp=2 ep=2 zero1": dict(preset="mixtral-tiny", dp=2, ep=2, zero_stage=1),
          # experts under tp: each expert's ffn dim split over the 2 tp ranks (apply_expert_tensor_parallel)
          "mixtral-tiny tp=2": dict(preset="mixtral-tiny", tp=2, ep=1, num_micro_batches=4)}
WORLD4 = {"mixtral-tiny dp=4 ep=2": dict(preset="mixtral-tiny", dp=4, ep=2, num_micro_batches=1),
          "mixtral-tiny dp=4 ep=4": dict(preset="mixtral-tiny", dp=4, ep=4, num_micro_batches=1),
          "deepseek-tiny dp=4 ep=4": dict(preset="deepseek-tiny", dp=4, ep=4, num_micro_batches=1),
          "mixtral-tiny pp=2 dp=2 ep=2": dict(preset="mixtral-tiny", pp=2, dp=2, ep=2),
          # ZeRO: the experts' optimizer slices over the 2 ranks holding them, the rest over the 4 dp ranks
          "mixtral-tiny dp=4 ep=2 zero1": dict(preset="mixtral-tiny", dp=4, ep=2, num_micro_batches=1, zero_stage=1),
          "mixtral-tiny dp=4 ep=2 zero2": dict(preset="mixtral-tiny", dp=4, ep=2, num_micro_batches=1, zero_stage=2),
          "mixtral-tiny tp=2 dp=2 ep=2": dict(preset="mixtral-tiny", tp=2, dp=2, ep=2),
          "deepseek-tiny tp=2 dp=2 ep=2 zero1": dict(preset="deepseek-tiny", tp=2, dp=2, ep=2, zero_stage=1)}
PLAIN = {"mixtral-tiny dp=2": dict(preset="mixtral-tiny", dp=2, ep=1)}
REFUSED = {"mixtral-tiny dp=2 ep=2 zero3": dict(preset="mixtral-tiny", dp=2, ep=2, zero_stage=3)}


def ep_plan(*, ep: int, **spec):
    plan = make_plan(**spec)
    return replace(plan, parallel=replace(plan.parallel, ep=ep))


def _jobs(cases: dict[str, dict], *, expect_error: bool = False) -> list[Job]:
    return [Job(name, ep_plan(**spec), steps=STEPS, preset=tiny_preset(spec["preset"]), expect_error=expect_error)
            for name, spec in cases.items()]


@pytest.fixture(scope="module")
def references() -> dict:
    """preset -> (losses, grad norms) of the single-process loop: global batch 8 in 4 micro-batches of 2."""
    return launch(1, run_reference, _reference_cases(), STEPS)[0]


def _reference_cases() -> list:
    return [(p, make_plan(preset=p, num_micro_batches=4), tiny_preset(p), 1e-3) for p in ("mixtral-tiny", "deepseek-tiny")]


@pytest.fixture(scope="module")
def world2_results() -> dict:
    return launch(2, run_jobs, _jobs(WORLD2) + _jobs(PLAIN) + _jobs(REFUSED, expect_error=True))[0]


@pytest.fixture(scope="module")
def world4_results() -> dict:
    return launch(4, run_jobs, _jobs(WORLD4))[0]


def differences(result, reference) -> tuple[float, float]:
    """(max abs loss difference, max relative grad-norm difference) against the single process."""
    assert result.error is None, result.error
    assert len(result.losses) == STEPS
    losses, norms = reference
    return (max(abs(a - b) for a, b in zip(result.losses, losses)),
            max(abs(a / b - 1) for a, b in zip(result.grad_norms, norms)))


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", list(WORLD2))
def test_two_ranks_match_single_process(name, world2_results, references):
    loss, norm = differences(world2_results[name], references[WORLD2[name]["preset"]])
    assert loss <= LOSS_TOL and norm <= NORM_RTOL, (loss, norm)


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", list(WORLD4))
def test_four_ranks_match_single_process(name, world4_results, references):
    loss, norm = differences(world4_results[name], references[WORLD4[name]["preset"]])
    assert loss <= LOSS_TOL and norm <= NORM_RTOL, (loss, norm)


@pytest.mark.multiprocess
def test_each_rank_holds_half_the_experts(world2_results):
    """fp32 weight, gradient and AdamW's two moments (16 bytes) of half of the 4 x 3 x [4, 64, 64] expert weights."""
    plain, split = world2_results["mixtral-tiny dp=2"], world2_results["mixtral-tiny dp=2 ep=2"]
    saved = plain.model_state_bytes - split.model_state_bytes
    assert saved == 16 * 4 * 3 * 4 * 64 * 64 // 2


@pytest.mark.multiprocess
def test_zero3_with_ep_is_refused(world2_results):
    error = world2_results["mixtral-tiny dp=2 ep=2 zero3"].error
    assert error is not None and error.startswith("ep:") and "zero_stage 3" in error and "--zero 1" in error


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_dry_run_splits_expert_state_over_ep_tp_and_zero(zero_stage):
    """mixtral-tiny dp=4 tp=2 on the meta device: ep=2 halves each rank's expert weights (4 MoE layers of
    4 experts x 3 x [64, 64] fp32, /tp: 24,576 elements a layer -> 12,288), while ZeRO slices them over
    the dp/ep = 2 ranks holding them instead of all 4, so the optimizer state (and ZeRO-2's gradient
    slices) are the same either way: every rank holds 1/4 of the expert states. Every unbuilt rank's
    bytes equal building it (runtime.dry_run's layout rule for expert slices)."""
    from runtime.dry_run import dry_run

    def state(ep: int, rank: int | None = None):
        plan = ep_plan(preset="mixtral-tiny", dp=4, tp=2, ep=ep, zero_stage=zero_stage, num_micro_batches=1)
        report = dry_run(plan, build_model=lambda: tiny_preset("mixtral-tiny").build(device="meta"), rank=rank)
        return {r: g.instantiated for g in report.groups for r in g.ranks}

    whole, split = state(1), state(2)
    saved = 4 * (24_576 - 12_288) * 4  # bytes of the experts a rank no longer holds
    assert whole[0].parameters - split[0].parameters == saved
    assert whole[0].optimizer == split[0].optimizer
    assert whole[0].gradients - split[0].gradients == (0 if zero_stage == 2 else saved)
    for rank in (3, 6):  # tp 1 of dp 1 (second ep group's first replica), tp 0 of dp 3
        assert state(2, rank)[rank] == split[rank]


def test_unknown_experts_and_user_loops_are_refused():
    from torch import nn

    class MyMoE(nn.Module):
        num_experts, top_k = 4, 2

    plan = ep_plan(preset="mixtral-tiny", dp=2, ep=2)
    with pytest.raises(RunCheckError, match="^ep: .*MyMoE"):
        check_expert_parallel(plan, nn.Sequential(MyMoE()))
    with pytest.raises(RunCheckError, match="^ep: .*runtime.parallelize"):
        check_expert_parallel(plan, None, user_model=True)
    with pytest.raises(RunCheckError, match="^ep: .*no mixture-of-experts"):
        check_expert_parallel(plan, nn.Linear(2, 2))
    check_expert_parallel(plan, tiny_preset("mixtral-tiny").build(device="meta"))


if __name__ == "__main__":
    refs = launch(1, run_reference, _reference_cases(), STEPS)[0]
    print("| plan (global batch 8, fp32, gloo, 3 steps) | ranks | max abs loss diff | max rel grad-norm diff |\n"
          "|---|---|---|---|")
    for cases, nproc in ((WORLD2, 2), (WORLD4, 4)):
        results = launch(nproc, run_jobs, _jobs(cases))[0]
        for name, spec in cases.items():
            loss, norm = differences(results[name], refs[spec["preset"]])
            print(f"| {name} | {nproc} | {loss:.1e} | {norm:.1e} |")
