"""compare, report, timeline and explain --what-if on a real plan file."""

import json

import pytest

from planner.cli import main
from planner.plan import Plan

TINY = ["--model", "gpt-tiny", "--cluster", "cpu-local", "--devices-per-node", "4"]


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("plans") / "p.json"
    assert main(["plan", *TINY, "--global-batch", "16", "--pp", "2", "-o", str(path), "--no-progress"]) == 0
    return path


def test_unconstrained_plan_is_never_slower_than_a_baseline(tmp_path, capsys):
    path = tmp_path / "free.json"
    assert main(["plan", *TINY, "--global-batch", "16", "-o", str(path), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["compare", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {b["name"] for b in data["baselines"]} == {"pure-dp", "zero3-fsdp", "megatron-lm"}
    for b in data["baselines"]:
        if b["fits"]:
            assert b["speedup_of_plan"] >= 1.0 - 1e-9
        else:
            assert b["reason"]


def test_constrained_plan_admits_a_faster_baseline(plan_file, capsys):
    plan = Plan.from_json(plan_file)  # made with --pp 2
    faster = [b for b in plan.search["baselines"] if b["fits"] and b["speedup_of_plan"] < 1]
    for b in faster:
        assert any(f"best {b['name']} configuration" in line and "exclude it" in line for line in plan.explanation)


def test_report_writes_markdown_and_pngs(plan_file, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(plan_file), "-o", str(out)]) == 0
    text = (out / "index.md").read_text()
    assert "![timeline](timeline.png)" in text and "![memory](memory.png)" in text
    for png in ("timeline.png", "memory.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    # an existing, non-empty folder is not written into without --force
    assert main(["report", str(plan_file), "-o", str(out)]) == 2


def test_timeline_png(plan_file, tmp_path, capsys):
    out = tmp_path / "t.png"
    assert main(["timeline", str(plan_file), "-o", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert "bubble" in capsys.readouterr().out


def test_what_if_replans_from_stored_graph(plan_file, capsys, monkeypatch):
    import planner.trace.tracer as tracer

    def no_trace(*a, **k):
        raise AssertionError("what-if must not retrace the model")

    monkeypatch.setattr(tracer, "trace_model", no_trace)
    capsys.readouterr()
    assert main(["explain", str(plan_file), "--what-if", "nodes=2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["after"]["devices"] == 2 * data["before"]["devices"]
    assert data["after"]["global_batch"] == data["before"]["global_batch"]
    # Twice the devices never predicts a slower step for the same batch under the same cost model.
    assert data["after"]["step_time_s"] <= data["before"]["step_time_s"] * (1 + 1e-9)


@pytest.mark.parametrize("bad, words", [("nodes", "KNOB=VALUE"), ("nodez=2", "did you mean 'nodes'"),
                                        ("memory=-1x", "positive number")])
def test_what_if_bad_input(plan_file, capsys, bad, words):
    capsys.readouterr()
    assert main(["explain", str(plan_file), "--what-if", bad]) == 2
    assert words in capsys.readouterr().err


def test_plan_stores_graph_equal_after_round_trip(plan_file):
    from planner.graph_io import graph_from_dict

    plan = Plan.from_json(plan_file)
    graph = graph_from_dict(plan.graph)
    assert graph.num_layers == plan.model.num_layers
    assert sum(layer.param_count for layer in graph.layers) == plan.model.param_count
