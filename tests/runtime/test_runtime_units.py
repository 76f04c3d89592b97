"""Single-process checks of the pieces: mesh coordinates, stage cutting, TP row order, schedule choice, checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from runtime_plans import make_plan, sequence_norms, solver_styles, tiny_preset
from torch.distributed.tensor.parallel import RowwiseParallel

from planner.errors import SpecError
from runtime.checks import Launch, preflight
from runtime.data_parallel import DataParallelMode
from runtime.errors import RunCheckError
from runtime.model import StageModule, build_stage_modules
from runtime.parallel_dims import ParallelDims
from runtime.pipeline_parallel import SUPPORTED_SCHEDULES, boundary_shape, choose_schedule, stage_io_examples
from runtime.tensor_parallel import canonical_from_tp, check_tensor_parallel, to_tp_rows
from runtime.tensor_parallel_generic import _planned_styles, generic_styles

LOCAL2 = Launch(world_size=2, procs_per_node=2, nodes=1, device_type="cpu")


def test_rank_layout_is_the_plans():
    dims = ParallelDims(dp=3, tp=2, pp=2, world_size=12)
    assert dims.shape == (2, 3, 1, 2)
    for rank in range(12):
        pp_i, dp_i, tp_i = dims.coords(rank)
        assert rank == (pp_i * 3 + dp_i) * 2 + tp_i == dims.rank_of(pp_i, dp_i, tp_i)
    with_cp = ParallelDims(dp=3, tp=2, pp=2, cp=2, world_size=24)
    assert with_cp.shape == (2, 3, 2, 2)
    for rank in range(24):
        c = with_cp.layout.coords(rank)
        assert rank == ((c.pp * 3 + c.dp) * 2 + c.cp) * 2 + c.tp == with_cp.rank_of(c.pp, c.dp, c.tp, c.cp)
    assert with_cp.layout.group(5, "cp") == (5, 7) and with_cp.layout.sub_group(0, 3) == (0, 4, 8)


def test_world_size_mismatch_names_both_numbers():
    with pytest.raises(RunCheckError, match=r"dp\*tp\*pp = 2\*1\*2 = 4 processes but 3 processes were launched"):
        ParallelDims(dp=2, tp=1, pp=2, world_size=3)


def test_stage_modules_keep_full_model_names_and_chain_to_the_full_model():
    plan = make_plan(pp=2, num_micro_batches=4, schedule="interleaved-1f1b", virtual_stages=2)
    model = tiny_preset().build(device="cpu", seed=0)
    stages = build_stage_modules(model, list(plan.stages))
    names = [n for s in stages for n, _ in s.named_parameters()]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert [s.layer_paths for s in stages] == [st.layer_names for st in plan.stages]
    x = torch.randint(0, 8192, (2, 16))
    with torch.no_grad():
        y = x
        for s in stages:
            y = s(y)
        assert torch.equal(y, model(x))


def test_tp_row_order_gives_each_rank_whole_heads():
    hidden, tp = 8, 2
    rows = torch.arange(3 * hidden)  # q rows 0-7, k rows 8-15, v rows 16-23
    reordered = to_tp_rows(rows, tp)
    assert reordered[:12].tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19]  # rank 0: q, k, v of heads 0-1
    assert torch.equal(canonical_from_tp(reordered, tp), rows)
    w = torch.randn(3 * hidden, 5)
    assert torch.equal(canonical_from_tp(to_tp_rows(w, 4), 4), w)


def _gpt_styles(plan) -> dict[str, str]:
    """The styles the one tensor-parallel path reads for gpt-tiny (the plan's, or the pairs it finds)."""
    model = tiny_preset().build(device="meta")
    return _planned_styles(plan, model, plan.model.layer_names)


def _torch_styles(plan) -> dict[str, str]:
    """``{module: torch style}`` the one path applies to gpt-tiny, with its layouts."""
    model = tiny_preset().build(device="meta")
    out = {}
    for module, style in generic_styles(plan, model, plan.model.layer_names).items():
        layouts = style.input_layouts[0] if isinstance(style, RowwiseParallel) else style.output_layouts[0]
        out[module] = f"{type(style).__name__}({layouts})"
    return out


def test_gpt_default_styles_are_megatrons_pairs_found_not_hard_coded():
    plan = make_plan(tp=2, num_micro_batches=4)
    default = _gpt_styles(plan)  # no placements: the pairs the generic path finds (fx for the MLP, head_layout)
    assert default["blocks.0.attn.qkv"] == "colwise" and default["blocks.3.mlp.fc2"] == "rowwise"
    assert "embed.wte" not in default and "head.lm_head" not in default and len(default) == 16
    solved = make_plan(tp=2, num_micro_batches=4, styles=solver_styles())
    assert _gpt_styles(solved) == solver_styles()
    torch_styles = _torch_styles(solved)
    assert torch_styles["blocks.0.attn.qkv"] == "ColwiseParallel(S(-1))"  # stays split: the heads' pair
    assert torch_styles["blocks.0.attn.proj"] == "RowwiseParallel(S(-1))"
    assert torch_styles["blocks.2.mlp.fc1"] == "ColwiseParallel(S(-1))"
    assert torch_styles["head.lm_head"] == "ColwiseParallel(R)"  # logits gathered
    assert "embed.wpe" not in _gpt_styles(make_plan(tp=2, num_micro_batches=4,
                                                    styles=solver_styles(embedding="vocab")))


def test_gpt_half_split_attention_is_gathered_not_refused():
    """A plan that splits ``qkv`` but not ``proj`` runs exactly (qkv's output gathered; heads not localized)."""
    plan = make_plan(tp=2, num_micro_batches=4, styles=solver_styles() | {"blocks.0.attn.proj": "replicate"})
    torch_styles = _torch_styles(plan)
    assert torch_styles["blocks.0.attn.qkv"] == "ColwiseParallel(R)" and "blocks.0.attn.proj" not in torch_styles
    assert torch_styles["blocks.1.attn.qkv"] == "ColwiseParallel(S(-1))"
    check_tensor_parallel(plan, tiny_preset())


@pytest.mark.parametrize("change, message", [
    ({"blocks.0.ln1": "sequence"}, "sequence_parallel true"),
    ({"blocks.0.ln1": "colwise"}, "on a LayerNorm"),
])
def test_gpt_styles_the_runtime_cannot_apply_are_refused(change, message):
    plan = make_plan(tp=2, num_micro_batches=4, styles=solver_styles() | change)
    with pytest.raises(RunCheckError, match=message):
        check_tensor_parallel(plan, tiny_preset())


def test_unknown_styles_and_formats_are_refused_when_the_plan_is_read():
    """The typed contract (planner.plan_types.TensorSplits) checks the splits once, when the plan is built or read."""
    with pytest.raises(SpecError, match="placements.style.blocks.0.mlp.fc1: got 'diagonal'; unknown style"):
        make_plan(tp=2, num_micro_batches=4, styles=solver_styles() | {"blocks.0.mlp.fc1": "diagonal"})
    plan = make_plan(tp=2, num_micro_batches=4, styles=solver_styles())
    with pytest.raises(SpecError, match="intra_op_sharding/1"):
        dataclasses.replace(plan, placements={"schema": "something/9", "style": {}, "params": {}})


def test_sequence_styles_are_read_with_sequence_parallelism():
    styles = solver_styles() | sequence_norms()
    plan = make_plan(tp=2, num_micro_batches=4, sequence_parallel=True, styles=styles)
    assert _gpt_styles(plan) == solver_styles()  # the norms: sequence parallelism applies them all anyway
    check_tensor_parallel(plan, tiny_preset())
    default = make_plan(tp=2, num_micro_batches=4, sequence_parallel=True)
    assert _gpt_styles(default) == _gpt_styles(make_plan(tp=2, num_micro_batches=4))


def test_sequence_style_outside_a_norm_is_refused():
    plan = make_plan(tp=2, num_micro_batches=4, sequence_parallel=True,
                     styles=solver_styles() | {"blocks.0.attn.qkv": "sequence"})
    with pytest.raises(RunCheckError, match="'sequence' splits a norm along the sequence, and this is a Linear"):
        check_tensor_parallel(plan, tiny_preset())


def test_sequence_parallelism_checks_name_the_field():
    plan = make_plan(tp=2, num_micro_batches=4, sequence_parallel=True)
    odd = dataclasses.replace(plan, model=dataclasses.replace(plan.model, seq_len=63))
    with pytest.raises(RunCheckError, match=r"parallel.sequence_parallel: tp=2 does not divide .*seq_len=63"):
        check_tensor_parallel(odd, tiny_preset())


def test_stages_exchange_the_sequence_shard_under_sequence_parallelism():
    sp = make_plan(pp=2, tp=2, num_micro_batches=4, sequence_parallel=True)
    assert boundary_shape(sp, 128) == (2, 32, 128)  # micro-batch 2, 64 / tp positions, hidden 128
    assert boundary_shape(make_plan(pp=2, tp=2, num_micro_batches=4), 128) == (2, 64, 128)
    first_in, first_out = stage_io_examples(sp, tiny_preset(), 0, torch.device("cpu"))
    last_in, last_out = stage_io_examples(sp, tiny_preset(), 1, torch.device("cpu"))
    assert (first_in.shape, first_in.dtype) == ((2, 64), torch.long)  # token ids, whole
    assert first_out.shape == last_in.shape == (2, 32, 128) and last_in.requires_grad
    assert last_out.shape == (2, 64, 8192)  # logits, whole: the loss sees every position


@pytest.mark.parametrize("schedule, v, expected", [
    ("gpipe", 1, "ScheduleGPipe"), ("gpipe", 2, "ScheduleLoopedBFS"), ("1f1b", 1, "Schedule1F1B"),
    ("interleaved-1f1b", 2, "ScheduleInterleaved1F1B"), ("zb-v", 2, "ScheduleZBVZeroBubble"),
    ("dualpipe-v", 2, "ScheduleDualPipeV"), ("zb-h1", 1, None), ("zb-h2", 1, None),
])
def test_each_schedule_maps_to_what_runs_it(schedule, v, expected):
    choice = choose_schedule(make_plan(pp=2, num_micro_batches=4, schedule=schedule, virtual_stages=v))
    assert choice.torch_class == expected
    if schedule in ("zb-v", "dualpipe-v"):
        assert choice.stage_to_pp_index == {0: 0, 1: 1, 2: 1, 3: 0}  # V placement


def test_a_plan_whose_placement_differs_from_its_schedule_is_refused():
    plan = make_plan(pp=2, num_micro_batches=4, schedule="interleaved-1f1b", virtual_stages=2)  # loop placement
    wrong = dataclasses.replace(plan, parallel=dataclasses.replace(plan.parallel, schedule="zb-v"))
    with pytest.raises(RunCheckError, match="does not move stages the plan placed"):
        choose_schedule(wrong)


@pytest.mark.parametrize("schedule", ["pipedream", "pipedream-2bw", "pipelined-backprop", "pipemare"])
def test_asynchronous_schedules_are_refused_listing_the_supported_ones(schedule):
    plan = make_plan(pp=2, num_micro_batches=4)
    plan = dataclasses.replace(plan, parallel=dataclasses.replace(plan.parallel, schedule=schedule))
    with pytest.raises(RunCheckError, match="asynchronous") as info:
        choose_schedule(plan)
    assert all(name in str(info.value) for name in SUPPORTED_SCHEDULES)


@pytest.mark.parametrize("dp, tp, pp, zero, kind, reshard", [
    (1, 1, 1, 0, "none", False), (2, 1, 1, 0, "ddp", False), (2, 2, 1, 0, "allreduce", False),
    (2, 1, 2, 0, "allreduce", False), (2, 1, 1, 1, "zero", False), (2, 2, 2, 2, "zero", False),
    (1, 1, 1, 1, "none", False), (2, 1, 1, 3, "fsdp", True), (1, 1, 1, 3, "fsdp", True),
])
def test_zero_stage_to_data_parallel_mode(dp, tp, pp, zero, kind, reshard):
    """ZeRO-1/2 shard the optimizer (and gradients) with runtime.data_parallel.OptimizerShards, not FSDP2."""
    mode = DataParallelMode.for_plan(dp, tp, pp, zero)
    assert (mode.kind, mode.reshard_after_forward) == (kind, reshard)
    assert mode.zero_stage == (zero if kind in ("zero", "fsdp") else 0)


def test_preflight_accepts_a_good_plan_and_names_bad_fields():
    plan = make_plan(pp=2, num_micro_batches=4)
    assert preflight(plan, LOCAL2).name == "gpt-tiny"
    with pytest.raises(RunCheckError, match="1 node.s. x 2 devices per node.*2 node.s. x 1 processes"):
        preflight(plan, Launch(world_size=2, procs_per_node=1, nodes=2, device_type="cpu"))
    odd = dataclasses.replace(plan, model=dataclasses.replace(plan.model, global_batch=7))
    with pytest.raises(RunCheckError, match="global_batch"):
        preflight(odd, LOCAL2)


def test_tied_weights_on_one_rank_share_one_parameter_but_not_under_zero3():
    """V placement puts stages 0 and 3 on rank 0: they share the tied weight, which FSDP2 (ZeRO-3) cannot."""
    plan = make_plan(pp=2, num_micro_batches=4, schedule="zb-v", virtual_stages=2, tie=True)
    assert preflight(plan, LOCAL2, preset=tiny_preset("gpt-tiny", True)).name == "gpt-tiny"
    zero3 = make_plan(pp=2, num_micro_batches=4, schedule="zb-v", virtual_stages=2, tie=True, zero_stage=3)
    with pytest.raises(RunCheckError, match="tied parameter .* ZeRO-3"):
        preflight(zero3, LOCAL2, preset=tiny_preset("gpt-tiny", True))


def test_stage_module_forward_is_a_chain():
    model = tiny_preset().build(device="meta")
    stage = StageModule(model, ("blocks.1", "blocks.2"), stage_index=1)
    assert [n for n, _ in stage.named_children()] == ["blocks"]
    assert stage.get_submodule("blocks.2") is model.blocks[2]


def test_train_outside_a_process_group_says_how_to_start_one(monkeypatch):
    from runtime import RunOptions, train

    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RunCheckError, match="torchrun or runtime.launch.launch_workers"):
        train(make_plan(), RunOptions(steps=1))
