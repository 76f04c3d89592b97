"""plan() / evaluate(): determinism, memory limits honoured, infeasibility explained."""

import pytest
import torch
from torch import nn

from planner import ClusterSpec, ParallelConfig, evaluate, plan
from planner.errors import InfeasibleError, SpecError


def test_plan_is_deterministic_byte_for_byte():
    a = plan("gpt3-125m", "dgx-a100-80g", global_batch=64)
    b = plan("gpt3-125m", "dgx-a100-80g", global_batch=64)
    assert a.to_json_text() == b.to_json_text()
    assert a.timings and "time_s" not in a.to_json_text().split('"predicted"')[0]


def test_best_plan_fits_and_beats_every_alternative():
    p = plan("gpt3-1.3b", ClusterSpec.preset("dgx-a100-40g"), global_batch=64)
    assert p.predicted.fits
    limit = p.predicted.peak_memory_bytes
    assert all(m <= 40 * 2**30 for m in p.predicted.memory_per_device_bytes) and limit > 0
    for alt in p.search["alternatives"]:
        assert alt["step_time_s"] >= p.predicted.step_time_s


def test_plan_accepts_a_user_module_on_meta():
    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(*[nn.Linear(256, 256) for _ in range(6)])

        def forward(self, x):
            return self.layers(x)

    with torch.device("meta"):
        model = Chain()
    p = plan(model, "cpu-local", global_batch=16, sample_input=torch.zeros(1, 256), devices_per_node=2)
    assert p.model.num_layers == 6 and p.model.param_count == 6 * (256 * 256 + 256)


def test_module_without_sample_input_is_a_clear_error():
    with pytest.raises(SpecError, match="sample_input"):
        plan(nn.Linear(4, 4), "cpu-local", global_batch=8)


def test_infeasible_reports_missing_memory_and_part():
    with pytest.raises(InfeasibleError) as err:
        plan("gpt3-175b", ClusterSpec.preset("dgx-a100-80g", nodes=1), global_batch=8)
    msg = str(err.value)
    assert "GiB" in msg and ("optimizer" in msg or "weights" in msg)


def test_evaluate_flags_a_configuration_that_does_not_fit():
    cfg = ParallelConfig(dp=8, tp=1, pp=1, micro_batch_size=1, num_micro_batches=1)
    p = evaluate("gpt3-13b", ClusterSpec.preset("dgx-a100-80g"), cfg)
    assert not p.predicted.fits
    assert p.predicted.peak_memory_bytes > 80 * 2**30
    assert p.solver.status == "infeasible"


def test_public_names_survive_submodule_imports():
    import planner.plan  # noqa: F401  (the JSON-contract module has the same name as the function)
    from planner import ClusterSpec as C
    from planner import Plan as P
    from planner import plan as plan_fn

    assert callable(plan_fn) and plan_fn.__module__ == "planner.api"
    assert C.__name__ == "ClusterSpec" and P.__name__ == "Plan"


def test_time_limit_returns_labelled_plan_with_proven_gap():
    full = plan("gpt3-1.3b", ClusterSpec.preset("dgx-a100-80g", nodes=4), global_batch=128, baselines=False)
    quick = plan("gpt3-1.3b", ClusterSpec.preset("dgx-a100-80g", nodes=4), global_batch=128, baselines=False,
                 time_limit_s=1e-9)
    assert full.solver.status == "optimal" and full.solver.gap == 0.0
    assert quick.solver.status in ("time_limit", "optimal")
    # the bound is a true lower bound on the optimum the full search found
    assert quick.solver.bound <= full.predicted.step_time_s * (1 + 1e-9)
    assert quick.predicted.step_time_s >= full.predicted.step_time_s * (1 - 1e-9)
    if quick.solver.status == "time_limit":
        assert 0 < quick.solver.gap <= 1


def test_tensor_parallel_plan_is_deterministic_and_carries_placements():
    from planner import evaluate

    cfg = ParallelConfig(dp=1, tp=2, pp=1, micro_batch_size=2, num_micro_batches=2)
    a = evaluate("gpt-tiny", "cpu-local", cfg, devices_per_node=2)
    b = evaluate("gpt-tiny", "cpu-local", cfg, devices_per_node=2)
    assert a.to_json_text() == b.to_json_text()
    style = a.placements["style"]
    assert style["blocks.0.attn.qkv"] == "colwise" and style["blocks.0.attn.proj"] == "rowwise"
    assert style["blocks.0.mlp.fc1"] == "colwise" and style["blocks.0.mlp.fc2"] == "rowwise"


def test_evaluate_uniform_partition_is_equal_layers_and_labelled_given():
    from planner import evaluate

    cfg = ParallelConfig(dp=1, tp=1, pp=2, micro_batch_size=2, num_micro_batches=4)
    p = evaluate("gpt-tiny", "cpu-local", cfg, devices_per_node=2, partition="uniform")
    assert [(s.layer_start, s.layer_stop) for s in p.stages] == [(0, 3), (3, 6)]
    assert p.solver.status == "given" and p.predicted.fits
