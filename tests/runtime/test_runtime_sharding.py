"""What runs for HSDP, reshard after forward, recompute every k-th layer and FP8 (no processes: one fake rank).

The equivalence with one process (losses within 1e-5) is in test_runtime_equivalence.py (WORLD2 / WORLD4 of
runtime_plans.py); these tests show that the knob really ran: the HSDP shards are half the FSDP ones, the
gathered weights stay after a forward, one block in two is checkpointed, and an FP8 plan is refused here.
"""

from __future__ import annotations

import functools

import pytest
import torch
from runtime_plans import make_plan, tiny_preset

from planner.cost.sharding import recomputes_layer
from runtime.dry_run import _build_rank, dry_run, fake_world
from runtime.errors import RunCheckError
from runtime.float8 import check_float8
from runtime.model import build_model, build_stage_modules, stages_of_rank
from runtime.parallel_dims import ParallelDims
from runtime.recompute import apply_recompute


def _state_by_rank(**kw) -> dict[int, int]:
    report = dry_run(make_plan(**kw))
    return {r: g.instantiated.total for g in report.groups for r in g.ranks}


def test_hsdp_shards_over_half_the_ranks():
    fsdp = _state_by_rank(dp=4, zero_stage=3, num_micro_batches=1)
    hsdp = _state_by_rank(dp=4, zero_stage=3, dp_shard=2, num_micro_batches=1)
    assert sorted(hsdp) == [0, 1, 2, 3]
    assert all(hsdp[r] == 2 * fsdp[r] for r in range(4))  # 1/2 of the state per rank instead of 1/4


def test_hsdp_mesh_and_reshard_flag_reach_fsdp():
    plan = make_plan(dp=4, zero_stage=3, dp_shard=2, num_micro_batches=1, reshard_after_forward=False)
    dims = ParallelDims.from_plan(plan, 4)
    with fake_world(4, 3):
        stages, _, _ = _build_rank(plan, dims, tiny_preset("gpt-tiny").build(device="meta"))
        weight = stages[0].get_parameter("blocks.0.attn.qkv.weight")
        mesh = weight.device_mesh
        assert mesh.mesh_dim_names == ("dp_replicate", "dp_shard") and tuple(mesh.shape) == (2, 2)
        assert mesh.mesh.tolist() == [[0, 1], [2, 3]]  # shard groups of consecutive dp ranks, replicated across
        assert [p.is_replicate() for p in weight.placements] == [True, False]
        group = stages[0].get_submodule("blocks.0")._get_fsdp_state()._fsdp_param_group
        assert group.post_forward_mesh_info is None  # FSDP2's reshard_after_forward=False: no reshard after forward


def test_recompute_every_second_layer_checkpoints_half_the_blocks():
    plan = make_plan(pp=2, num_micro_batches=4, recompute="full", recompute_every=2)
    names = plan.model.layer_names
    model = build_model(tiny_preset("gpt-tiny"), seed=0)
    counts = []
    for rank in (0, 1):
        (stage,) = build_stage_modules(model, stages_of_rank(plan, rank))
        counts.append(apply_recompute(stage, "full", every=2, layer_names=names))
        for path in stage.layer_paths:
            wrapped = isinstance(stage.get_submodule(path).forward, functools.partial)
            assert wrapped == recomputes_layer(names.index(path), 2), path
        assert not stage._checkpoint_layers  # the others keep their activations
    assert sum(counts) == len(names) // 2  # gpt-tiny: embed, 4 blocks, head -> layers 1, 3, 5
    with pytest.raises(RunCheckError, match="recompute_every"):
        apply_recompute(stage, "full", every=2, layer_names=("other",))


def test_fp8_is_refused_without_cuda():
    plan = make_plan(dp=2, num_micro_batches=2, fp8=True)
    with pytest.raises(RunCheckError, match=r"parallel\.fp8: .*CUDA"):
        check_float8(plan, "cpu")
    check_float8(make_plan(dp=2, num_micro_batches=2), "cpu")  # no fp8: nothing to refuse
    if not torch.cuda.is_available():
        with pytest.raises(RunCheckError, match=r"parallel\.fp8"):  # a run's own checks refuse it too
            from runtime.checks import static_checks

            static_checks(plan, tiny_preset("gpt-tiny"), device_type="cpu")
