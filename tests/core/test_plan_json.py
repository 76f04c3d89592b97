import json

import pytest

from planner.errors import SpecError
from planner.plan import ModelInfo, ParallelConfig, Plan, Prediction, SolverReport, Stage


def make_plan(**overrides) -> Plan:
    cfg = ParallelConfig(dp=2, tp=1, pp=2, micro_batch_size=2, num_micro_batches=4, schedule="1f1b")
    stages = (Stage(index=0, layer_start=0, layer_stop=3, layer_names=("embed", "blocks.0", "blocks.1"),
                    ranks=(0, 1), device_index=0),
              Stage(index=1, layer_start=3, layer_stop=6, layer_names=("blocks.2", "blocks.3", "head"),
                    ranks=(2, 3), device_index=1))
    base = dict(
        model=ModelInfo(name="gpt-tiny", preset="gpt-tiny", family="gpt", fingerprint="sha256:0123456789abcdef",
                        param_count=2898688, num_layers=6, layer_names=("embed", "blocks.0", "blocks.1", "blocks.2",
                                                                         "blocks.3", "head"),
                        seq_len=64, dtype="fp32", global_batch=16, flops_per_sample=1.5e9),
        cluster={"name": "cpu-local"}, cluster_fingerprint="sha256:00ff", parallel=cfg, stages=stages,
        predicted=Prediction(step_time_s=0.5, mfu=0.25, peak_memory_bytes=123, memory_per_device_bytes=(123, 100, 90, 90),
                             fits=True, throughput_samples_per_s=32.0, time_breakdown_s={"compute": 0.4},
                             memory_breakdown_bytes={"weights": 10}, stages=({"device_index": 0},)),
        solver=SolverReport(method="dp", status="optimal", objective=0.5, bound=0.5, gap=0.0, time_s=0.01),
        explanation=("because",), planner_version="0.1.0",
    )
    base.update(overrides)
    return Plan(**base)


def test_round_trip_unchanged(tmp_path):
    plan = make_plan()
    path = plan.to_json(tmp_path / "p.json")
    again = Plan.from_json(path)
    assert again == plan
    assert again.to_json_text() == plan.to_json_text()
    assert json.loads(path.read_text())["mesh"] == {"axes": ["pp", "dp", "tp"], "shape": [2, 2, 1]}


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
    ],
)
def test_schema_violations_name_the_field(tmp_path, mutate, field):
    d = make_plan().to_dict()
    mutate(d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(SpecError) as err:
        Plan.from_json(path)
    assert err.value.field == field


def test_future_major_version_refused(tmp_path):
    from planner.errors import PlanMismatchError

    d = make_plan().to_dict()
    d["schema_version"] = "2.0"
    path = tmp_path / "future.json"
    path.write_text(json.dumps(d))
    with pytest.raises(PlanMismatchError, match="schema_version 2.0"):
        Plan.from_json(path)


def test_parallel_config_validation():
    with pytest.raises(SpecError, match="sequence parallelism needs tp > 1"):
        ParallelConfig(tp=1, sequence_parallel=True)
    with pytest.raises(SpecError, match="recompute"):
        ParallelConfig(recompute="sometimes")
    assert ParallelConfig(dp=4, micro_batch_size=2, num_micro_batches=3).global_batch == 24
