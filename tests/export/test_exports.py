"""Each export, loaded by its framework's parser, carries the plan's knobs; what a framework cannot express is
reported and the nearest expressible plan is priced by the plan's own cost model."""

from __future__ import annotations

import functools
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from planner.api import evaluate
from planner.export import FRAMEWORKS, export_plan
from planner.export.common import block_counts, boundaries_of, price
from planner.plan import ParallelConfig, Stage

sys.path.insert(0, str(Path(__file__).parent))
import framework_check  # noqa: E402

MODEL, CLUSTER = "gpt3-1.3b", "dgx-a100-80g"  # 24 blocks between the embedding and the head: 26 traced layers

CONFIGS = {
    "1f1b-sp-zero1": ParallelConfig(dp=2, tp=2, pp=2, micro_batch_size=2, num_micro_batches=8, schedule="1f1b",
                                    recompute="selective", sequence_parallel=True, zero_stage=1),
    "interleaved-full": ParallelConfig(dp=1, tp=2, pp=4, micro_batch_size=1, num_micro_batches=8, virtual_stages=2,
                                       schedule="interleaved-1f1b", recompute="full"),
    "zbv": ParallelConfig(dp=2, tp=1, pp=4, micro_batch_size=1, num_micro_batches=8, virtual_stages=2,
                          schedule="zb-v", recompute="none"),
    "fsdp": ParallelConfig(dp=8, tp=1, pp=1, micro_batch_size=4, num_micro_batches=2, zero_stage=3),
    "fsdp-op": ParallelConfig(dp=8, tp=1, pp=1, micro_batch_size=4, num_micro_batches=2, zero_stage=3, recompute="op"),
    "pp-op": ParallelConfig(dp=2, tp=2, pp=2, micro_batch_size=1, num_micro_batches=8, sequence_parallel=True,
                            recompute="op", zero_stage=1),
    "ddp-gpipe": ParallelConfig(dp=4, tp=1, pp=2, micro_batch_size=2, num_micro_batches=4, schedule="gpipe"),
    # plan schema 2.1's knobs, on H100s (FP8)
    "cp-hsdp-fp8": ParallelConfig(dp=4, cp=2, micro_batch_size=1, num_micro_batches=2, zero_stage=3, dp_shard=2,
                                  reshard_after_forward=False, recompute="full", recompute_every=2, fp8=True),
    "pp-every3": ParallelConfig(dp=2, tp=2, pp=2, micro_batch_size=1, num_micro_batches=8, sequence_parallel=True,
                                recompute="full", recompute_every=3, zero_stage=1),
    "moe-ep": ParallelConfig(dp=4, tp=2, ep=2, micro_batch_size=2, num_micro_batches=2, zero_stage=1),
    # FSDP under a pipeline keeping the gathered weights (the Llama-2 70B reference plan's kind)
    "pp-fsdp-keep": ParallelConfig(dp=4, pp=2, micro_batch_size=1, num_micro_batches=8, zero_stage=3,
                                   reshard_after_forward=False),
}
WHERE = {"cp-hsdp-fp8": ("llama2-7b", "dgx-h100"), "pp-every3": (MODEL, "dgx-h100"), "moe-ep": ("mixtral-tiny", "dgx-h100")}
KNOBS_21 = ("cp", "ep", "fp8")


@functools.cache
def plan_of(name: str):
    model, cluster = WHERE.get(name, (MODEL, CLUSTER))
    return evaluate(model, cluster, CONFIGS[name], nodes=1)


def with_split(plan, sizes: list[int]):
    """The plan with its stages cut into ``sizes`` traced layers each (model order)."""
    cuts = [0]
    for s in sizes:
        cuts.append(cuts[-1] + s)
    names = plan.model.layer_names
    old = sorted(plan.stages, key=lambda s: s.index)
    stages = tuple(Stage(index=i, layer_start=a, layer_stop=b, layer_names=tuple(names[a:b]), ranks=st.ranks,
                         virtual_chunk=st.virtual_chunk, device_index=st.device_index)
                   for i, ((a, b), st) in enumerate(zip(zip(cuts, cuts[1:]), old)))
    return replace(plan, stages=stages)


def write(result, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in result.files.items():
        (folder / name).write_text(text)
    return folder


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_parsed_export_carries_the_plans_knobs(name, framework, tmp_path):
    if framework == "deepspeed":
        pytest.importorskip("deepspeed")
    if framework == "megatron":
        pytest.importorskip("megatron.core")
    plan = plan_of(name)
    cfg = plan.parallel
    result = export_plan(plan, framework)
    near = result.nearest or cfg
    lost = {x.knob for x in result.lost}
    written = near if "cp" in lost else cfg  # the cp ranks became data-parallel replicas
    got = framework_check.CHECKS[framework](write(result, tmp_path), written.dp)
    assert (got.get("tp", cfg.tp), got["pp"], got.get("dp", written.dp)) == (cfg.tp, cfg.pp, written.dp)
    assert (got["micro_batch"], got["num_micro_batches"], got["global_batch"]) == (
        written.micro_batch_size, written.num_micro_batches, written.global_batch)
    assert written.global_batch == cfg.global_batch
    keeps_gathered = near.zero_stage == 3 and not near.reshard_after_forward  # torchtitan: "never", as its ZeRO-2
    assert got["zero"] == (2 if framework == "torchtitan" and keeps_gathered else near.zero_stage)
    for knob in KNOBS_21:  # each is written, or lost and the nearest priced without it
        if knob in got:
            assert got[knob] == getattr(near, knob), knob
        assert (knob in lost) == (getattr(near, knob) != getattr(cfg, knob)), knob
    if framework == "torchtitan":
        assert got["shard"] == (cfg.shard_group if cfg.zero_stage else 1) and not lost & {"dp_shard", "reshard_after_forward"}
        if cfg.recompute_every > 1:
            assert (got["recompute"], got["ac_option"]) == ("selective", str(cfg.recompute_every))
    if framework == "megatron" and near.recompute_every > 1:
        assert got["recompute_per_chunk"] == max(block_counts(plan, boundaries_of(plan))) // near.recompute_every
    if framework in ("deepspeed", "nanotron") and cfg.pp > 1 and cfg.zero_stage > 1:  # their engines: ZeRO 0-1
        assert "zero" in lost and near.zero_stage == 1 and near.reshard_after_forward
    if cfg.recompute_every > 1 and framework in ("deepspeed", "nanotron") and cfg.pp > 1:
        assert "recompute_every" in lost and near.recompute_every == 1
    if "zero" not in lost and not (framework == "torchtitan" and keeps_gathered):
        assert got["zero"] == cfg.zero_stage
    layer_sac = framework == "torchtitan" and near.recompute_every > 1  # "selective" with a layer interval
    if "recompute" in got and not layer_sac:
        assert got["recompute"] == (near.recompute if framework != "nanotron" else
                                    ("full" if near.recompute == "full" else "none"))
    if "recompute" not in lost and framework != "nanotron" and not layer_sac:
        assert got.get("recompute", cfg.recompute) == cfg.recompute
    if framework == "megatron" and cfg.pp > 1:
        assert got["v"] == cfg.virtual_stages
    if framework == "torchtitan" and cfg.pp > 1:
        expect = {"1f1b": "Schedule1F1B", "gpipe": "ScheduleGPipe", "interleaved-1f1b": "ScheduleInterleaved1F1B",
                  "zb-v": "ScheduleZBVZeroBubble"}[near.schedule]
        assert got["schedule_class"] == expect
    if framework == "nanotron" and cfg.pp > 1:
        assert got["engine"] == ("afab" if cfg.schedule == "gpipe" else "1f1b")
    if framework == "deepspeed" and cfg.pp > 1:
        assert got["parts_match"]


def test_pricing_the_plans_own_configuration_reproduces_its_prediction():
    plan = plan_of("1f1b-sp-zero1")
    step, fits = price(plan, plan.parallel, boundaries_of(plan))
    assert step == pytest.approx(plan.predicted.step_time_s, rel=1e-9)
    assert fits == plan.predicted.fits


def test_uneven_split_megatron_layout_keeps_it_deepspeed_and_nanotron_lose_it(tmp_path):
    plan = with_split(plan_of("1f1b-sp-zero1"), [6, 20])  # embedding + 5 blocks | 19 blocks + head
    assert block_counts(plan, boundaries_of(plan)) == [5, 19]
    mg = export_plan(plan, "megatron")
    assert "--pipeline-model-parallel-layout Et*5|t*19L" in mg.files["megatron_args.txt"]
    assert not mg.lost
    if pytest.importorskip("megatron.core"):
        got = framework_check.check_megatron(write(mg, tmp_path / "mg"), plan.parallel.dp)
        assert got["layout"] == "Et*5|t*19L"
    ds = export_plan(plan, "deepspeed")
    split = [x for x in ds.lost if x.knob == "stage split"]
    assert split and split[0].plan_value == "[6, 20]" and split[0].written == "[13, 13]"
    assert ds.nearest_boundaries == ((0, 13), (13, 26))
    step, _ = price(plan, ds.nearest, ((0, 13), (13, 26)))
    assert ds.nearest_step_s == pytest.approx(step) and ds.nearest_step_s != pytest.approx(ds.plan_step_s)
    nt = export_plan(plan, "nanotron")  # nanotron's own split by weights: 14 blocks | 10 blocks + the head
    assert any(x.knob == "stage split" and x.written == "[15, 11]" and "by their weights" in x.why for x in nt.lost)
    assert nt.nearest_boundaries == ((0, 15), (15, 26))
    tt = export_plan(plan, "torchtitan")
    assert not any(x.knob == "stage split" for x in tt.lost)
    assert 'pipeline_parallel_split_points = ["layers.5"]' in tt.files["torchtitan.toml"]


def test_nanotron_export_falls_back_to_the_even_split_where_its_rule_leaves_a_rank_empty():
    """gpt-tiny's LM head outweighs all its blocks: nanotron's rule would put every layer on the first
    of two ranks, so the nearest plan is priced with the even split, and the loss says why."""
    plan = evaluate("gpt-tiny", "dgx-h100", ParallelConfig(dp=4, tp=1, pp=2, micro_batch_size=1, num_micro_batches=4),
                    nodes=1)
    plan = with_split(plan, [2, 4])  # embedding + 1 block | 3 blocks + head
    nt = export_plan(plan, "nanotron")
    (split,) = [x for x in nt.lost if x.knob == "stage split"]
    assert "leaves 1 of 2 pipeline ranks" in split.why and "even split" in split.why
    assert split.written == "[3, 3]" and nt.nearest_boundaries == ((0, 3), (3, 6))


def test_head_alone_on_a_stage_is_lost_in_torchtitan():
    plan = with_split(plan_of("1f1b-sp-zero1"), [25, 1])
    tt = export_plan(plan, "torchtitan")
    split = [x for x in tt.lost if x.knob == "stage split"]
    assert split and split[0].written == "[13, 13]"
    assert tt.nearest_step_s is not None and tt.nearest_step_s > 0


def test_a_schedule_the_framework_lacks_is_reported_and_the_nearest_priced():
    plan = plan_of("zbv")
    mg = export_plan(plan, "megatron")
    assert [(x.knob, x.plan_value, x.written) for x in mg.lost] == [("schedule", "zb-v", "interleaved-1f1b")]
    assert mg.nearest.schedule == "interleaved-1f1b" and mg.nearest.virtual_stages == 2
    step, fits = price(plan, mg.nearest, boundaries_of(plan))
    assert (mg.nearest_step_s, mg.nearest_fits) == (pytest.approx(step), fits)
    assert "zb-v" in mg.lost_markdown() and f"{mg.nearest_step_s:.4g} s" in mg.lost_markdown()
    tt = export_plan(plan, "torchtitan")
    assert not any(x.knob == "schedule" for x in tt.lost)  # torch has ZBVZeroBubble
    for fw in ("deepspeed", "nanotron"):
        r = export_plan(plan, fw)
        assert any(x.knob == "schedule" for x in r.lost)
        assert r.nearest.virtual_stages == 1 and len(r.nearest_boundaries) == 4


def test_cli_writes_the_files_and_lost_md(tmp_path, capsys):
    from planner.cli import main

    path = plan_of("zbv").to_json(tmp_path / "plan.json")
    assert main(["export", str(path), "--to", "megatron", "-o", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "LOST schedule: plan zb-v -> written interleaved-1f1b" in printed
    assert (tmp_path / "out" / "megatron_args.txt").exists() and (tmp_path / "out" / "LOST.md").exists()
    assert main(["export", str(path), "--to", "megatron", "-o", str(tmp_path / "out")]) == 2  # exists: --force
    assert main(["export", str(path), "--to", "jax", "-o", str(tmp_path / "x")]) == 2
