"""The plan file: typed blocks, round trip, schema, fingerprint, and the schema 1.x read path.

``tests/fixtures/plan-v1.json`` (pp=2) and ``plan-v1-tp2.json`` (tp=2, with the intra-op solve's tensor
splits) were written by the planner at schema 1.0, before the typed contract, with::

    python -m planner evaluate --model gpt-tiny --cluster cpu-local --devices-per-node 2 --global-batch 8 \\
        --tp 1 --pp 2 --dp 1 --micro-batch 2 -o tests/fixtures/plan-v1.json --json
    (the same with --tp 2 --pp 1 for plan-v1-tp2.json)
"""

import dataclasses
import json
import logging
from pathlib import Path
from typing import get_args

import pytest

from planner.cli import main
from planner.cluster import ClusterSpec
from planner.errors import PlanMismatchError, SpecError
from planner.layout import RankLayout
from planner.plan import (
    SCHEMA_VERSION,
    DevicePrediction,
    ModelInfo,
    ParallelConfig,
    Plan,
    PlanEditedError,
    Prediction,
    ScheduleName,
    SearchReport,
    SolverReport,
    Stage,
    TensorSplits,
    restamp,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def make_plan(**overrides) -> Plan:
    cfg = ParallelConfig(dp=2, tp=1, pp=2, micro_batch_size=2, num_micro_batches=4, schedule="1f1b")
    stages = (Stage(index=0, layer_start=0, layer_stop=3, layer_names=("embed", "blocks.0", "blocks.1"),
                    ranks=(0, 1), device_index=0),
              Stage(index=1, layer_start=3, layer_stop=6, layer_names=("blocks.2", "blocks.3", "head"),
                    ranks=(2, 3), device_index=1))
    devices = tuple(DevicePrediction(device_index=d, time_per_step_s=0.4, memory_bytes={"total": 123 - d},
                                     in_flight_micro_batches=2.0 - d, binding="compute",
                                     chunk_phase_times_s=((0.01, 0.02, 0.01),)) for d in range(2))
    base = dict(
        model=ModelInfo(name="gpt-tiny", preset="gpt-tiny", family="gpt", fingerprint="sha256:0123456789abcdef",
                        param_count=2898688, num_layers=6, layer_names=("embed", "blocks.0", "blocks.1", "blocks.2",
                                                                         "blocks.3", "head"),
                        seq_len=64, dtype="fp32", global_batch=16, flops_per_sample=1.5e9),
        cluster=ClusterSpec.preset("cpu-local", devices_per_node=4), cluster_fingerprint="sha256:00ff", parallel=cfg,
        stages=stages,
        predicted=Prediction(step_time_s=0.5, mfu=0.25, peak_memory_bytes=123, memory_per_device_bytes=(123, 123, 122, 122),
                             fits=True, throughput_samples_per_s=32.0, time_breakdown_s={"compute": 0.4},
                             memory_breakdown_bytes={"weights": 10}, devices=devices),
        solver=SolverReport(method="dp", status="optimal", objective=0.5, bound=0.5, gap=0.0, time_s=0.01),
        explanation=("because",), planner_version="0.1.0",
    )
    base.update(overrides)
    return Plan(**base)


def _write(tmp_path: Path, d: dict, name: str = "plan.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(d))
    return path


def test_round_trip_unchanged(tmp_path):
    plan = make_plan()
    path = plan.to_json(tmp_path / "p.json")
    again = Plan.from_json(path)
    assert again == plan
    assert again.to_json_text() == plan.to_json_text()
    d = json.loads(path.read_text())
    assert d["mesh"] == {"axes": ["pp", "dp", "cp", "tp"], "shape": [2, 2, 1, 1]}
    assert d["schema_version"] == SCHEMA_VERSION == "2.1"
    assert d["predicted"]["devices"][1] == {"device_index": 1, "time_per_step_s": 0.4, "memory_bytes": {"total": 122},
                                            "in_flight_micro_batches": 1.0, "binding": "compute",
                                            "chunk_phase_times_s": [[0.01, 0.02, 0.01]]}
    assert again.fingerprint is not None and again.fingerprint.parallel == d["parallel"]


def test_refuses_to_overwrite_without_force(tmp_path):
    plan = make_plan()
    path = plan.to_json(tmp_path / "p.json")
    before = path.read_text()
    with pytest.raises(SpecError, match="--force"):
        make_plan(explanation=("other",)).to_json(path)
    assert path.read_text() == before
    make_plan(explanation=("other",)).to_json(path, force=True)
    assert "other" in path.read_text()
    assert not list(tmp_path.glob(".p.json.*"))  # no temp files left behind


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d["parallel"].update(tp=0), "parallel.tp"),
        (lambda d: d["parallel"].update(schedule="zigzag"), "parallel.schedule"),
        (lambda d: d.pop("stages"), "(top level)"),
        (lambda d: d["model"].update(fingerprint="md5:xx"), "model.fingerprint"),
        (lambda d: d["predicted"]["devices"][0].update(binding=3), "predicted.devices.0.binding"),
        (lambda d: d["cluster"]["device"].update(memory_bytes="lots"), "cluster.device.memory_bytes"),
        (lambda d: d["search"].update(evaluated=-1), "search.evaluated"),
        (lambda d: d.pop("fingerprint"), "(top level)"),
    ],
)
def test_schema_violations_name_the_field(tmp_path, mutate, field):
    d = make_plan(search=SearchReport(evaluated=3, pruned=0, infeasible=0, timed_out=False)).to_dict()
    mutate(d)
    with pytest.raises(SpecError) as err:
        Plan.from_json(_write(tmp_path, d, "bad.json"))
    assert err.value.field == field


def test_future_major_version_refused(tmp_path):
    d = make_plan().to_dict()
    d["schema_version"] = "3.0"
    with pytest.raises(PlanMismatchError, match=r"schema_version 3.0 is not readable .*reads 1.x, 2.x"):
        Plan.from_json(_write(tmp_path, d, "future.json"))


def test_parallel_config_validation():
    from planner.schedules import SCHEDULE_NAMES

    with pytest.raises(SpecError, match="sequence parallelism needs tp > 1"):
        ParallelConfig(tp=1, sequence_parallel=True)
    with pytest.raises(SpecError, match="recompute"):
        ParallelConfig(recompute="sometimes")
    with pytest.raises(SpecError, match="unknown schedule; valid names: gpipe, 1f1b"):
        ParallelConfig(schedule="zigzag")
    assert get_args(ScheduleName) == SCHEDULE_NAMES  # the Literal is the simulator's table
    assert ParallelConfig(dp=4, micro_batch_size=2, num_micro_batches=3).global_batch == 24


def test_stage_ranks_follow_the_one_layout():
    layout = RankLayout(pp=3, dp=2, tp=4)
    assert layout.rank_of(2, 1, 3) == (2 * 2 + 1) * 4 + 3 == 23
    assert layout.coords(23) == layout.coords(layout.rank_of(2, 1, 3))
    assert layout.position_ranks(1) == tuple(range(8, 16))
    assert layout.group(9, "dp") == (9, 13) and layout.group(9, "pp") == (1, 9, 17)
    assert [layout.position_of(layout.position_ranks(k)) for k in range(3)] == [0, 1, 2]
    with pytest.raises(PlanMismatchError, match="not the dp x cp x tp = 8 ranks"):
        layout.position_of((0, 8))
    plan = make_plan()
    assert [s.ranks for s in plan.stages] == [plan.layout.position_ranks(s.device_index) for s in plan.stages]


# -- the typed blocks, read from the planner's own schema 1.0 files -------------------------------------------

def test_schema_1_plan_is_read_unverified_with_a_warning(caplog):
    path = FIXTURES / "plan-v1.json"
    with caplog.at_level(logging.WARNING, logger="planner.plan"):
        plan = Plan.from_json(path)
    assert "schema 1.0, which records no fingerprint: it is read unverified" in caplog.text
    assert "evaluate --plan" in caplog.text
    old = json.loads(path.read_text())
    assert plan.schema_version == "1.0" and plan.fingerprint is None
    # Converted, not re-priced: the same numbers under the new names.
    assert [d.to_dict() for d in plan.predicted.devices] == old["predicted"]["stages"]
    assert plan.predicted.devices[1].chunk_phase_times_s[0] == tuple(old["predicted"]["stages"][1]["chunk_phase_times_s"][0])
    assert plan.predicted.stages is plan.predicted.devices  # the 1.x name still reads them
    assert plan.predicted.stages[0]["memory_bytes"]["total"] == old["predicted"]["stages"][0]["memory_bytes"]["total"]
    assert isinstance(plan.cluster, ClusterSpec) and plan.cluster.to_dict() == old["cluster"]
    assert plan.search == SearchReport() and not plan.placements
    new = plan.to_dict()
    old["predicted"]["devices"] = old["predicted"].pop("stages")
    # Schema 2.1: the (pp, dp, tp) mesh is the (pp, dp, cp, tp) one with cp = 1; the new knobs at their defaults.
    pp, dp, tp = old["mesh"]["shape"]
    old["mesh"] = {"axes": ["pp", "dp", "cp", "tp"], "shape": [pp, dp, 1, tp]}
    old["parallel"].update(cp=1, ep=1, dp_shard=None, reshard_after_forward=True, fp8=False, recompute_every=1)
    assert {k: v for k, v in new.items() if k not in ("schema_version", "fingerprint")} == \
        {k: v for k, v in old.items() if k != "schema_version"}


def test_schema_1_tensor_splits_are_typed(tmp_path):
    old = json.loads((FIXTURES / "plan-v1-tp2.json").read_text())
    plan = Plan.from_json(FIXTURES / "plan-v1-tp2.json")
    splits = plan.placements
    assert isinstance(splits, TensorSplits) and splits.given and TensorSplits.from_plan(plan) is splits
    assert splits.style_of("blocks.0.attn.qkv") == "colwise" and splits.style_of("blocks.0.ln1") == "replicate"
    assert splits.split() == {m: s for m, s in old["placements"]["style"].items() if s != "replicate"}
    assert splits.layers[0].collectives[0].kind == old["placements"]["layers"][0]["collectives"][0]["kind"]
    assert splits.mesh.links[0].bandwidth_bytes_per_s == old["placements"]["mesh"]["links"][0]["bandwidth_bytes_per_s"]
    assert plan.search.intra_op == splits.solver and splits.solver.status == "optimal"
    assert splits.to_dict() == old["placements"] and plan.search.to_dict() == old["search"]
    again = Plan.from_json(plan.to_json(tmp_path / "v2.json"))  # written at 2.0: verified on read
    assert again == plan and again.fingerprint is not None and again.schema_version == "2.1"


def test_unknown_style_is_refused_when_read(tmp_path):
    d = json.loads((FIXTURES / "plan-v1-tp2.json").read_text())
    d["placements"]["style"]["blocks.0.mlp.fc1"] = "diagonal"
    with pytest.raises(SpecError) as err:
        Plan.from_json(_write(tmp_path, d))
    assert err.value.field == "placements.style.blocks.0.mlp.fc1"


# -- fingerprints: a plan edited by hand is refused, `evaluate --plan` re-prices it ----------------------------

@pytest.mark.parametrize("edit, named", [
    (lambda d: d["parallel"].update(dp=2), ["parallel.dp 1 -> 2"]),
    (lambda d: d["parallel"].update(micro_batch_size=1, num_micro_batches=8),
     ["parallel.micro_batch_size 2 -> 1", "parallel.num_micro_batches 4 -> 8"]),
    (lambda d: d["model"].update(global_batch=16), ["model changed"]),
    (lambda d: d["cluster"]["device"].update(memory_bytes=2**33), ["cluster changed"]),
    (lambda d: d["stages"][0].update(ranks=[1]), ["stages changed"]),
    (lambda d: d["cost_constants"].update(link_efficiency=0.5), ["cost_constants changed"]),
    (lambda d: d["predicted"].update(step_time_s=0.1), ["predicted changed"]),
    (lambda d: d["fingerprint"]["parts"].update(graph="sha256:00"), ["fingerprint.parts", "graph changed"]),
])
def test_a_plan_edited_by_hand_is_refused(tmp_path, edit, named):
    d = Plan.from_json(FIXTURES / "plan-v1.json").to_dict()  # a verified 2.0 plan of the planner's
    edit(d)
    path = _write(tmp_path, d)
    with pytest.raises(PlanEditedError) as err:
        Plan.from_json(path)
    assert all(any(n in e for e in err.value.edits) for n in named), err.value.edits
    assert len(err.value.edits) == len(named)
    assert f"{path} was edited after planning: " in str(err.value)
    assert f"python -m planner evaluate --plan {path}" in str(err.value)
    assert Plan.from_json(path, verify=False).fingerprint is not None  # read on purpose
    assert Plan.from_dict(restamp(d)).fingerprint is not None  # a tool that rewrites it on purpose restamps it


def test_explain_compare_report_refuse_an_edited_plan_and_read_an_old_one(tmp_path, capsys, caplog):
    d = Plan.from_json(FIXTURES / "plan-v1.json").to_dict()
    d["parallel"]["dp"] = 2
    edited = _write(tmp_path, d)
    for argv in (["explain", str(edited)], ["compare", str(edited)], ["report", str(edited), "-o", str(tmp_path / "r")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "was edited after planning: parallel.dp 1 -> 2" in err and "evaluate --plan" in err
        assert "Traceback" not in err
    with caplog.at_level(logging.WARNING, logger="planner.plan"):  # on stderr outside pytest
        assert main(["explain", str(FIXTURES / "plan-v1.json")]) == 0
    assert "read unverified" in caplog.text


def test_evaluate_plan_reprices_an_edited_plan(tmp_path, capsys):
    from planner.api import evaluate

    d = Plan.from_json(FIXTURES / "plan-v1.json").to_dict()
    d["parallel"].update(micro_batch_size=1, num_micro_batches=8)  # same global batch, other micro-batching
    edited, fresh = _write(tmp_path, d), tmp_path / "fresh.json"
    assert main(["evaluate", "--plan", str(edited), "-o", str(fresh), "--json"]) == 0
    capsys.readouterr()
    plan = Plan.from_json(fresh)  # consistent again: verified on read
    cfg = ParallelConfig(**d["parallel"])
    direct = evaluate("gpt-tiny", "cpu-local", cfg, devices_per_node=2, dtype=plan.model.dtype)
    assert plan.parallel == cfg
    assert plan.predicted.step_time_s == direct.predicted.step_time_s
    assert plan.predicted.step_time_s != d["predicted"]["step_time_s"]  # the edit changed the prediction


def test_dict_read_path_of_the_typed_blocks():
    plan = Plan.from_json(FIXTURES / "plan-v1-tp2.json")
    assert plan.placements["style"] is plan.placements.style
    assert plan.placements.get("nothing", 7) == 7 and "mesh" in plan.placements
    assert plan.search.get("baselines", []) == [] and "evaluated" not in plan.search
    with pytest.raises(KeyError):
        plan.search["nothing"]
    assert dataclasses.replace(plan, placements={}).placements == TensorSplits()
