"""Every ``--json`` a script calls prints one object that matches its schema in docs/json-output.md.

The schemas are read from the page itself (each follows a ``<!-- schema: NAME -->`` line), so the page
and the commands cannot drift apart: a field printed but not documented, or documented as required
but not printed, fails here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
from referencing import Registry, Resource

from planner.cli import main as planner_main
from runtime.cli import main as runtime_main

PAGE = Path(__file__).resolve().parents[2] / "docs" / "json-output.md"
TINY = ["--model", "gpt-tiny", "--cluster", "cpu-local", "--devices-per-node", "2", "--global-batch", "8"]


def schemas() -> dict[str, dict]:
    found = re.findall(r"<!-- schema: ([\w-]+) -->\s*```json\n(.*?)\n```", PAGE.read_text(), flags=re.S)
    return {name: json.loads(text) for name, text in found}


def validator(name: str) -> jsonschema.Draft202012Validator:
    all_schemas = schemas()
    summary = all_schemas["summary"]
    registry = Registry().with_resource(summary["$id"], Resource.from_contents(summary))
    schema = all_schemas[name]
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, registry=registry)


def printed(capsys, main, argv: list[str], code: int = 0) -> dict:
    capsys.readouterr()
    assert main(argv) == code
    out = capsys.readouterr().out
    return json.loads(out)  # exactly one JSON document: json.loads refuses anything after it


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("json") / "plan.json"
    assert planner_main(["plan", *TINY, "--pp", "2", "-o", str(path), "--no-progress"]) == 0
    return path


def test_the_page_documents_every_command():
    assert set(schemas()) == {"summary", "plan", "explain", "what-if", "compare", "validate", "dry-run"}


def test_plan_and_evaluate(capsys, tmp_path, plan_file):
    out = printed(capsys, planner_main, ["plan", *TINY, "--json", "-o", str(tmp_path / "p.json")])
    validator("plan").validate(out)
    assert out["plan_file"] == str(tmp_path / "p.json") and out["devices"] == 2
    out = printed(capsys, planner_main, ["evaluate", *TINY, "--tp", "1", "--pp", "2", "--dp", "1",
                                         "--micro-batch", "4", "--json"])
    validator("plan").validate(out)
    assert out["plan_file"] is None and out["pp"] == 2 and out["timings_s"] == {}


def test_explain(capsys, plan_file):
    from planner.plan import Plan

    out = printed(capsys, planner_main, ["explain", str(plan_file), "--json"])
    validator("explain").validate(out)
    plan = Plan.from_json(plan_file)
    assert out["explanation"] == list(plan.explanation)
    assert out["summary"]["step_time_s"] == plan.predicted.step_time_s


def test_explain_what_if(capsys, plan_file):
    out = printed(capsys, planner_main, ["explain", str(plan_file), "--what-if", "nodes=2x", "--json"])
    validator("what-if").validate(out)
    assert out["after"]["devices"] == 2 * out["before"]["devices"]


def test_compare(capsys, plan_file):
    out = printed(capsys, planner_main, ["compare", str(plan_file), "--json"])
    validator("compare").validate(out)
    assert {b["name"] for b in out["baselines"]} == {"pure-dp", "zero3-fsdp", "megatron-lm"}


def test_validate(capsys):
    out = printed(capsys, planner_main, ["validate", "--json", "--source", "sweep", "--group", "old_bench-llama-1B:8"])
    validator("validate").validate(out)
    assert out["sweep"]["overall"]["groups"] == 1
    assert {r["group"] for r in out["sweep"]["runs"]} == {"old_bench-llama-1B:8"}


def test_dry_run(capsys, plan_file):
    out = printed(capsys, runtime_main, ["dry-run", str(plan_file), "--json"])
    validator("dry-run").validate(out)
    assert out["world_size"] == 2 and [g["position"] for g in out["groups"]] == [0, 1]


def test_the_schemas_can_fail(capsys, plan_file):
    """An undocumented field, a missing one or a wrong type is caught (the top level is closed)."""
    out = printed(capsys, planner_main, ["explain", str(plan_file), "--json"])
    check = validator("explain")
    for bad in ({**out, "extra": 1}, {k: v for k, v in out.items() if k != "alternatives"},
                {**out, "summary": {**out["summary"], "fits": "yes"}}):
        with pytest.raises(jsonschema.ValidationError):
            check.validate(bad)


@pytest.mark.parametrize("argv", [["explain", "nowhere.json", "--json"], ["compare", "nowhere.json", "--json"]])
def test_a_user_error_prints_nothing_on_stdout(capsys, argv):
    assert planner_main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "nowhere.json" in captured.err
