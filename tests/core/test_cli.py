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
        (["plan", *TINY, "--global-batch", "0"], "--global-batch: got 0; expected an integer >= 1"),
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
    assert [tuple(x) for x in phases] == [tuple(p) for s in plan.predicted.stages for p in s["chunk_phase_times_s"]]




# -- issue 19: every bad argument at once, labels explained, the user's umask, units and plurals ------------


def _error_lines(err):
    return [line for line in err.splitlines() if line.startswith("error: ")]


def test_negative_micro_batch_blames_micro_batch_not_global_batch(capsys):
    code, _, err = run_cli(["evaluate", *TINY, "--global-batch", "8", "--tp", "1", "--pp", "2", "--dp", "1",
                            "--micro-batch", "-1"], capsys)
    assert code == 2
    assert _error_lines(err) == ["error: --micro-batch: got -1; expected an integer >= 1"]


def test_every_missing_required_option_is_named_in_one_answer(capsys):
    code, _, err = run_cli(["evaluate", *TINY, "--global-batch", "8", "--pp", "2"], capsys)
    assert code == 2 and "Traceback" not in err
    assert [line.split(":")[1].strip() for line in _error_lines(err)] == ["--tp", "--dp", "--micro-batch"]
    assert all("required for `evaluate`" in line for line in _error_lines(err))


def test_unreadable_unknown_and_out_of_range_arguments_reported_together_in_help_order(capsys):
    code, _, err = run_cli(["evaluate", "--model", "gpt3-175", "--cluster", "cpu-local", "--global-batch", "8",
                            "--tp", "x", "--pp", "0", "--dp", "-1", "--micro-batchs", "4", "--dtype", "bf32",
                            "--zero", "5"], capsys)
    assert code == 2
    fields = [line.removeprefix("error: ").split(":")[0] for line in _error_lines(err)]
    assert fields == ["model", "--dtype", "--tp", "--pp", "--dp", "--micro-batch", "--zero", "--micro-batchs"]
    assert "error: --tp: got 'x'; expected an integer" in err
    assert "error: --dtype: got 'bf32'; did you mean fp32? use one of bf16, fp16, fp32" in err
    assert "did you mean --micro-batch?" in err and "did you mean one of ['gpt3-175b'" in err


def test_config_checks_against_model_and_cluster_are_reported_together(capsys):
    # 4 devices asked of a 2-device cluster, and 8 pipeline stages of a 6-layer model: both at once
    code, _, err = run_cli(["evaluate", *TINY, "--global-batch", "8", "--tp", "1", "--pp", "8", "--dp", "1",
                            "--micro-batch", "1", "--virtual-stages", "1"], capsys)
    assert code == 2
    lines = _error_lines(err)
    assert len(lines) == 2
    assert "multiply to the cluster's 2 devices" in lines[0] and "the model has 6 layers" in lines[1]


def test_spec_errors_is_a_spec_error_and_one_error_stays_itself():
    from planner.errors import SpecError, SpecErrors, raise_all

    a, b = SpecError("--tp", 0, "expected an integer >= 1"), SpecError("--dp", None, "required")
    with pytest.raises(SpecError) as one:
        raise_all([a])
    assert one.value is a
    with pytest.raises(SpecError) as both:
        raise_all([a, b])
    assert isinstance(both.value, SpecErrors) and both.value.fields == ("--tp", "--dp")
    assert str(both.value) == "--tp: got 0; expected an integer >= 1\n--dp: got None; required"
    raise_all([])  # nothing to raise


def test_runtime_cli_reports_every_bad_argument_at_once(capsys):
    from runtime.cli import main as runtime_main

    code = runtime_main(["run", "plan.json", "--nproc", "0", "--steps", "-1", "--lr", "abc", "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert [line.split(":")[1].strip() for line in _error_lines(err)] == ["--nproc", "--steps", "--lr", "--resume"]


def test_plan_output_ends_with_a_legend_of_its_own_labels(tmp_path, capsys):
    out_file = tmp_path / "e.json"
    code, out, _ = run_cli(["evaluate", *TINY, "--global-batch", "8", "--tp", "1", "--pp", "2", "--dp", "1",
                            "--micro-batch", "2", "--schedule", "gpipe", "-o", str(out_file)], capsys)
    assert code == 0
    legend = [line.strip() for line in out.splitlines() if line.strip().startswith("legend:")]
    assert len(legend) == 1
    assert "mb=2x4 = 4 micro-batches of 2 samples per data-parallel replica per step" in legend[0]
    assert "gpipe = GPipe" in legend[0] and "1f1b" not in legend[0]
    assert "binding (what limits a device): compute = " in legend[0]
    assert "zero" not in legend[0] and "sp =" not in legend[0]  # only the labels this output shows
    code, out, _ = run_cli(["explain", str(out_file)], capsys)
    assert code == 0 and sum(line.strip().startswith("legend:") for line in out.splitlines()) == 1


def test_legend_names_each_label_once():
    from planner.cli import legend

    text = legend(["dp=2 tp=1 pp=1 mb=4x1 1f1b, zero3", "dp=1 tp=2 pp=4 mb=8x1 zb-v, v=2, recompute=full, sp, zero1"],
                  ["memory", "memory (over the limit)"])
    assert text.count("mb=SxN") == 1 and "zero1 = optimizer state sharded over dp" in text
    assert "zero3 = weights, gradients and optimizer state sharded over dp (FSDP)" in text
    assert "zb-v = ZB-V" in text and "v = model chunks per device" in text and "recompute=full = " in text
    assert "memory = within 10% of the usable memory; memory (over the limit) = " in text
    assert legend(["dp=1 tp=1 pp=1 mb=1x1 1f1b"]).count(";") == 2  # degrees; mb; schedule


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_the_cli_writes_follow_the_umask(tmp_path, capsys, umask):
    import os
    import stat

    from runtime.checkpoint import write_manifest

    old = os.umask(umask)
    try:
        plan_file = tmp_path / "p.json"
        assert main(["evaluate", *TINY, "--global-batch", "8", "--tp", "1", "--pp", "2", "--dp", "1",
                     "--micro-batch", "2", "-o", str(plan_file), "--json"]) == 0
        assert main(["timeline", str(plan_file), "-o", str(tmp_path / "t.png")]) == 0
        assert main(["report", str(plan_file), "-o", str(tmp_path / "report")]) == 0
        ckpt = tmp_path / "ckpt"
        ckpt.mkdir()
        (ckpt / "__0_0.distcp").write_bytes(b"weights")
        write_manifest(ckpt, step=1, info={})
    finally:
        os.umask(old)
    capsys.readouterr()
    written = [plan_file, tmp_path / "t.png", *sorted((tmp_path / "report").iterdir()), ckpt / "manifest.json"]
    assert len(written) >= 5
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def test_parameter_counts_read_in_k_m_b_t():
    from planner.units import format_count

    cases = {4562: "4.6K", 512: "512", 999_960: "1.0M", 2_915_456: "2.9M", 125_951_232: "126M",
             174_615_800_000: "175B", 1_317_700_000: "1.3B", 1_008_038_800_000: "1.0T", 0: "0"}
    assert {n: format_count(n) for n in cases} == cases


def test_models_prints_small_models_in_thousands(capsys):
    code, out, _ = run_cli(["models"], capsys)
    presets = out.split("\n\n")[0].splitlines()  # the presets, before any further section
    rows = {line.split()[0]: line.split()[2] for line in presets}
    assert code == 0 and rows["cnn-tiny"] == "4.6K" and rows["gpt3-175b"] == "175B"
    assert not any(v in ("0.0M", "0M") for v in rows.values())


def test_plurals_agree_with_their_number():
    from planner.units import plural
    from runtime.errors import RunCheckError
    from runtime.parallel_dims import ParallelDims

    assert (plural(1, "device"), plural(2, "device"), plural(1, "process", "processes")) == \
        ("1 device", "2 devices", "1 process")
    with pytest.raises(RunCheckError) as exc:
        ParallelDims(dp=2, tp=1, pp=1, world_size=1)
    assert "needs dp*tp*pp = 2*1*1 = 2 processes but 1 process was launched" in str(exc.value)
    assert "re-plan for 1 device with" in str(exc.value)


def test_help_lists_every_subcommand_with_a_description(capsys):
    from planner.cli import build_parser

    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    names = list(sub.choices)
    assert {"plan", "evaluate", "explain", "compare", "report", "timeline", "models", "clusters",
            "profile-cluster", "validate"} <= set(names)
    helps = {c.dest: c.help for c in sub._choices_actions}
    for name in names:
        assert helps.get(name), f"{name} has no one-line description"
        assert name in out and helps[name].split()[0] in out


def test_constants_file_prices_the_plan_and_bad_fields_are_named(tmp_path, capsys):
    """plan --constants FILE: its fields over the trainer's, stored in the plan; a wrong name or type is
    refused naming the field (the demo plans on this machine's profiled constants this way)."""
    good = tmp_path / "c.json"
    good.write_text(json.dumps({"op_dispatch_s": 2e-5, "async_dispatch": False, "optimizer_step_bytes_per_param": 20.5,
                                "attention_kernel": ""}))
    out = tmp_path / "p.json"
    base = ["plan", "--model", "gpt-tiny", "--cluster", "cpu-local", "--global-batch", "8", "--no-progress"]
    code, _, _ = run_cli([*base, "--constants", str(good), "-o", str(out)], capsys)
    assert code == 0
    c = Plan.from_json(out).cost_constants
    assert (c["op_dispatch_s"], c["async_dispatch"], c["optimizer_step_bytes_per_param"]) == (2e-5, False, 20.5)
    assert c["attention_kernel"] == ""
    for bad, words in (({"no_such": 1}, "not CostConstants fields"), ({"async_dispatch": 1}, "async_dispatch"),
                       ({"attention_kernel": 1}, "attention_kernel: got 1; expected a string"),
                       ({"reserved_bytes": 1.5}, "reserved_bytes"),
                       ({"fp8_cast_bytes_per_element": -3}, "fp8_cast_bytes_per_element: got -3; expected a value >= 0")):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(bad))
        code, _, err = run_cli([*base, "--constants", str(path), "-o", str(tmp_path / "q.json")], capsys)
        assert code == 2 and words in err and "Traceback" not in err
