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


def test_both_clis_turn_errors_into_exit_codes_through_one_helper(capsys):
    import runtime.cli
    from planner.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, PlannerError, SpecError, run_command
    from runtime.errors import RunCheckError

    assert runtime.cli.run_command is run_command  # python -m runtime exits through the same code

    def bad_nodes():
        raise SpecError("--nodes", 0, "expected an integer >= 1")

    assert run_command(bad_nodes, debug=False) == EXIT_USER_ERROR == 2
    assert capsys.readouterr().err == "error: --nodes: got 0; expected an integer >= 1\n"
    assert run_command(bad_nodes, debug=True) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.endswith("error: --nodes: got 0; expected an integer >= 1\n")

    def interrupted():
        raise KeyboardInterrupt

    assert run_command(interrupted, debug=False) == EXIT_INTERRUPTED == 130
    assert capsys.readouterr().err == "interrupted\n"
    assert run_command(lambda: 3, debug=False) == 3  # a command's own exit code passes through
    with pytest.raises(ZeroDivisionError):  # a bug is not a user error: it keeps its traceback
        run_command(lambda: 1 // 0, debug=False)

    def not_a_run_check():
        raise PlannerError("a planner error")

    with pytest.raises(PlannerError):  # the runtime CLI reports only RunCheckError as a user error
        run_command(not_a_run_check, debug=False, user_errors=RunCheckError)


def test_building_the_plan_prices_nothing_the_search_did_not(monkeypatch):
    from planner import api, plan_build, pricing
    from planner.cost.constants import CostConstants
    from planner.cost.model import evaluate as evaluate_cost
    from planner.search import SearchSpace, search

    resolved = api.resolve_model("gpt-tiny", dtype="fp32")
    spec = api.resolve_cluster("cpu-local", devices_per_node=2)
    c = CostConstants()
    pricer = pricing.Pricer(resolved.graph, spec, c)
    result = search(resolved.graph, spec, 8, space=SearchSpace(pp=(2,)), pricer=pricer, explain=True)
    best, cfg = result.best, result.best.config
    options = {o.schedule: o for o in result.schedule_options}
    assert options[cfg.schedule].step_time_s == best.step_time_s  # its own schedule, priced the same way
    assert len(options) >= 3 and all(o.step_time_s is None or o.step_time_s >= best.step_time_s
                                     for o in options.values())

    def refuse(*a, **k):
        raise AssertionError("build_plan priced something")

    for name in ("evaluate", "table", "split", "partition", "tp_solve"):
        monkeypatch.setattr(pricing.Pricer, name, refuse)
    monkeypatch.setattr(pricing, "evaluate", refuse)
    monkeypatch.setattr(pricing, "tp_pricing", refuse)
    plan = plan_build.build_plan(resolved, spec, best, c, global_batch=8, result=result,
                                 schedule_options=result.schedule_options, tp_solve=result.tp_solve)
    assert any(line.startswith(f"Schedule {cfg.schedule} chosen") for line in plan.explanation)
    monkeypatch.undo()
    # the phase times the plan shows are the ones the search priced the schedule with
    phases = best.prediction.chunk_phase_times_s
    assert len(phases) == 2 and all(f > 0 and b > 0 for f, b, _ in phases)
    again = evaluate_cost(resolved.graph, spec, cfg, list(best.boundaries), c, table=pricer.table(
        (cfg.tp, cfg.micro_batch_size, cfg.sequence_parallel, cfg.recompute)))
    assert again.chunk_phase_times_s == phases
    assert [list(x) for x in phases] == [p for s in plan.predicted.stages for p in s["chunk_phase_times_s"]]


