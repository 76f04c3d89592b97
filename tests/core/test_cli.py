"""The public CLI: JSON output keys, exit codes, clear errors without tracebacks, safe writes."""

import json
import subprocess
import sys

import pytest

from planner.cli import main
from planner.plan import Plan

TINY = ["--model", "gpt-tiny", "--cluster", "cpu-local", "--devices-per-node", "2"]
REQUIRED_KEYS = {"step_time_s", "mfu", "peak_memory_bytes", "fits", "tp", "pp", "dp", "micro_batch", "schedule"}


def run_cli(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_json_has_required_keys_and_writes_plan(tmp_path, capsys):
    out_file = tmp_path / "p.json"
    code, out, _ = run_cli(["plan", *TINY, "--global-batch", "8", "--pp", "2", "--json", "-o", str(out_file)], capsys)
    assert code == 0
    data = json.loads(out)
    assert REQUIRED_KEYS <= set(data)
    assert data["pp"] == 2 and data["dp"] * data["tp"] * data["pp"] == 2
    plan = Plan.from_json(out_file)
    assert plan.parallel.pp == 2 and len(plan.stages) == 2
    assert plan.stages[0].layer_start == 0 and plan.stages[-1].layer_stop == plan.model.num_layers


def test_evaluate_prices_a_given_configuration(tmp_path, capsys):
    out_file = tmp_path / "e.json"
    code, out, _ = run_cli(["evaluate", *TINY, "--global-batch", "8", "--tp", "1", "--pp", "2", "--dp", "1",
                            "--micro-batch", "2", "--schedule", "gpipe", "--json", "-o", str(out_file)], capsys)
    assert code == 0
    data = json.loads(out)
    assert (data["tp"], data["pp"], data["dp"], data["micro_batch"], data["schedule"]) == (1, 2, 1, 2, "gpipe")
    assert data["num_micro_batches"] == 4
    again = Plan.from_json(out_file)
    assert again.parallel.schedule == "gpipe"
    # --plan re-evaluates the same configuration to the same prediction.
    code, out2, _ = run_cli(["evaluate", "--plan", str(out_file), "--json"], capsys)
    assert code == 0
    assert json.loads(out2)["step_time_s"] == pytest.approx(data["step_time_s"], rel=1e-12)


def test_output_is_not_overwritten_without_force(tmp_path, capsys):
    target = tmp_path / "keep.json"
    target.write_text("precious")
    code, _, err = run_cli(["plan", *TINY, "--global-batch", "8", "-o", str(target)], capsys)
    assert code == 2 and "--force" in err
    assert target.read_text() == "precious"


@pytest.mark.parametrize(
    "args, words",
    [
        (["plan", "--model", "gpt-tinyy", "--cluster", "cpu-local", "--global-batch", "8"], "gpt-tiny"),
        (["plan", "--model", "gpt-tiny", "--cluster", "cpu-locl", "--global-batch", "8"], "cpu-local"),
        (["plan", *TINY, "--global-batch", "0"], "global_batch"),
        (["evaluate", *TINY, "--global-batch", "8", "--tp", "2", "--pp", "2", "--dp", "1", "--micro-batch", "1"],
         "multiply to the cluster's 2 devices"),
        (["evaluate", *TINY, "--global-batch", "7", "--tp", "1", "--pp", "2", "--dp", "1", "--micro-batch", "2"],
         "multiple of dp x micro-batch"),
        (["plan", *TINY, "--global-batch", "8", "--schedule", "zigzag"], "did you mean"),
        (["explain", "/nonexistent/plan.json"], "cannot read the plan file"),
    ],
)
def test_bad_input_exits_2_with_clear_message(args, words, capsys):
    code, _, err = run_cli(args, capsys)
    assert code == 2
    assert words in err
    assert "Traceback" not in err


def test_subprocess_has_no_traceback_and_debug_shows_it():
    cmd = [sys.executable, "-m", "planner", "plan", "--model", "nope", "--cluster", "cpu-local", "--global-batch", "8"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "no such model preset" in r.stderr
    r = subprocess.run(cmd[:3] + ["--debug"] + cmd[3:], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" in r.stderr


def test_explain_prints_reasons(tmp_path, capsys):
    out_file = tmp_path / "p.json"
    assert main(["plan", *TINY, "--global-batch", "8", "-o", str(out_file), "--no-progress"]) == 0
    capsys.readouterr()
    code, out, _ = run_cli(["explain", str(out_file)], capsys)
    assert code == 0 and "why:" in out and "Step time breakdown" in out


def test_models_lists_required_presets(capsys):
    code, out, _ = run_cli(["models"], capsys)
    assert code == 0
    for name in ("gpt3-125m", "gpt3-175b", "megatron-22b", "mt-nlg-530b", "megatron-1t", "gpt-tiny"):
        assert name in out
