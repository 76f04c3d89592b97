"""Plans say how sure they are: the validation residuals of their regime, kept current."""

from __future__ import annotations

import pytest

from planner import ParallelConfig, evaluate
from planner.uncertainty import (
    bands_from_ratios,
    dominant_effects,
    load_bands,
    quantile,
    regime,
    summary_line,
)


def test_quantile_interpolates_like_numpy():
    xs = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert quantile(xs, 0.5) == 3.0
    assert quantile(xs, 0.1) == pytest.approx(1.4)
    assert quantile(xs, 0.9) == pytest.approx(4.6)
    with pytest.raises(ValueError):
        quantile([], 0.5)


def test_regimes_and_small_regimes_are_left_out():
    assert regime(1, 1) == "1 node, no pipeline"
    assert regime(8, 4) == "2-16 nodes, pipelined"
    assert regime(8, 4, tp=8) == "2-16 nodes, pipelined with tensor parallelism"
    assert regime(1, 4, tp=8) == "1 node, pipelined"  # one node: no pipeline send crosses the network
    assert regime(64, 1, tp=8) == "over 16 nodes, no pipeline"
    assert regime(64, 1) == "over 16 nodes, no pipeline"
    bands = bands_from_ratios({"a": [1.0, 1.1, 1.2, 1.3, 2.0], "b": [1.0, 2.0]})
    assert list(bands) == ["a"] and bands["a"].runs == 5 and bands["a"].median == 1.2


def test_a_gpu_plan_carries_its_regimes_band_and_a_cpu_plan_says_it_has_none():
    bands = load_bands()
    cfg = ParallelConfig(dp=4, tp=8, pp=4, micro_batch_size=1, num_micro_batches=32)
    p = evaluate("gpt3-13b", "dgx-a100-80g", cfg, nodes=16)
    u = p.predicted.uncertainty
    band = bands["2-16 nodes, pipelined with tensor parallelism"]
    assert u["regime"] == band.regime and u["runs"] == band.runs
    # a pipeline over nodes under tp has a band of its own (nanotron's floor under its collectives)
    assert band != bands["2-16 nodes, pipelined"] and band.low <= 1 <= band.high
    assert u["step_time_low_s"] == pytest.approx(p.predicted.step_time_s * band.low)
    assert u["step_time_high_s"] == pytest.approx(p.predicted.step_time_s * band.high)
    assert "error band" in summary_line(u)
    cpu = evaluate("gpt-tiny", "cpu-local", ParallelConfig(dp=2, micro_batch_size=4, num_micro_batches=1),
                   devices_per_node=2)
    assert cpu.predicted.uncertainty["runs"] == 0 and "host-process" in cpu.predicted.uncertainty["note"]


def test_dominant_effects_name_the_largest_uncertain_parts():
    effects = dominant_effects({"compute": 6.0, "tp_comm": 2.0, "pp_bubble": 1.5, "optimizer": 0.5,
                                "dp_comm_exposed": 0.1}, 10.0)
    assert effects[0].startswith("tensor-parallel collectives (20%")
    assert effects[1].startswith("the pipeline bubble (15%")
    assert "data-parallel" not in " ".join(effects)  # under 5% of the step
    assert effects[-1].startswith("the achieved GEMM and attention rates (60%")


@pytest.mark.slow
def test_the_committed_bands_are_what_the_current_cost_model_gives():
    """A cost-model change that moves the validation residuals must regenerate the bands:
    `python -m planner validate --write-bands`."""
    from planner.validation.cases import load_cases
    from planner.validation.price import validate_cases

    fresh = validate_cases(load_cases("all").cases).residual_bands()
    assert fresh == load_bands(), "datasets/measured/error_bands.json is stale: run " \
                                  "`python -m planner validate --write-bands`"


def test_the_trainer_option_prices_the_trainers_state_layout(capsys):
    """--trainer torch is this runtime: fp32 parameters and gradients, Adam m and v (16 bytes per parameter);
    the default, Megatron-LM, keeps bf16 weights, fp32 gradients and an fp32 master copy (18)."""
    import json

    from planner.cli import main

    state = {}
    for trainer in ("megatron", "torch"):
        argv = ["evaluate", "--model", "gpt3-1.3b", "--cluster", "dgx-a100-80g", "--global-batch", "8", "--tp", "1",
                "--pp", "1", "--dp", "8", "--micro-batch", "1", "--json", "--trainer", trainer]
        assert main(argv) == 0
        mem = json.loads(capsys.readouterr().out)["memory_breakdown_bytes"]
        state[trainer] = mem["weights"] + mem["gradients"] + mem["optimizer"]
    assert state["torch"] / state["megatron"] == pytest.approx(16 / 18, rel=1e-6)
    assert main(["evaluate", "--trainer", "jax"]) == 2  # the error names the choices
    assert "--trainer: got 'jax'; use one of compiled, eager, megatron, nanotron, torch" in capsys.readouterr().err
