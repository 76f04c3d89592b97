"""Flags that imply others, and flags whose wrong values must be named: the sharding flags of `plan`,
`--constants` fractions, `--what-if` values, and `evaluate --plan` given what the plan file fixes."""

import json

import pytest
import torch

from planner import Plan, plan
from planner.cli import main
from planner.models import ModelPreset
from planner.search import SearchSpace

A100 = ["--model", "gpt-tiny", "--cluster", "dgx-a100-80g", "--global-batch", "8"]


def run_cli(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("flag, expect", [
    (["--dp-shard", "2"], {"zero_stage": 3}),
    (["--no-reshard-after-forward"], {"zero_stage": 3}),
    (["--recompute-every", "2"], {"recompute": "full"}),
])
def test_a_sharding_flag_alone_implies_its_zero_stage_or_recompute(flag, expect, capsys):
    code, out, err = run_cli(["plan", *A100, *flag, "--json", "--no-progress"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert {k: data[k] for k in expect} == expect


@pytest.mark.parametrize("shard", ["3", "16"])
def test_a_dp_shard_that_divides_no_dp_is_named_not_dropped(shard, capsys):
    code, out, err = run_cli(["plan", *A100, "--zero", "3", "--dp-shard", shard, "--no-progress"], capsys)
    assert code != 0 and not out
    assert f"--dp-shard {shard} does not divide the 8 devices" in err


@pytest.mark.parametrize("field, value, words", [
    ("gemm_efficiency_max", 0, "(0, 1]"),
    ("memory_bandwidth_efficiency", 1e308, "(0, 1]"),
    ("allocator_usable_fraction", 3, "(0, 1]"),
    ("comm_compute_overlap", 5, "[0, 1]"),
])
def test_constants_fractions_out_of_range_are_named(tmp_path, capsys, field, value, words):
    path = tmp_path / "k.json"
    path.write_text(json.dumps({field: value}))
    code, _, err = run_cli(["plan", "--model", "gpt-tiny", "--cluster", "cpu-local", "--global-batch", "8",
                            "--constants", str(path), "--no-progress"], capsys)
    assert code == 2
    assert f"--constants: {field}" in err and words in err and "Traceback" not in err


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
    path = tmp_path_factory.mktemp("plans") / "p.json"
    assert main(["plan", "--model", "gpt-tiny", "--cluster", "cpu-local", "--global-batch", "8", "-o", str(path),
                 "--no-progress"]) == 0
    return path


@pytest.mark.parametrize("what_if, words", [
    ("memory=nanx", "positive number"), ("global_batch=nan", "positive number"),
    ("nodes=1e400", "positive number"), ("inter_node_bandwidth=infx", "positive number"),
    ("nodes=1.5", "whole number"), ("devices_per_node=2.5", "whole number"), ("nodes=1e300", "whole number"),
])
def test_what_if_values_that_are_not_numbers_or_counts_are_named(tiny_plan, capsys, what_if, words):
    code, _, err = run_cli(["explain", str(tiny_plan), "--what-if", what_if], capsys)
    assert code == 2
    assert "--what-if" in err and words in err and "Traceback" not in err


def test_evaluate_plan_refuses_flags_the_plan_file_fixes(tiny_plan, capsys):
    code, out, err = run_cli(["evaluate", "--plan", str(tiny_plan), "--cluster", "dgx-h100", "--global-batch", "16",
                              "--tp", "1"], capsys)
    assert code == 2 and not out
    for flag in ("--cluster", "--global-batch", "--tp"):
        assert f"{flag}: got" in err
    assert run_cli(["evaluate", "--plan", str(tiny_plan), "--json"], capsys)[0] == 0


def test_evaluate_plan_reprices_a_plan_without_a_preset_from_its_stored_graph(tmp_path, capsys):
    """A plan of a Python module (or a Hugging Face config) has no preset to rebuild: its stored cost graph
    is priced again. The stored graph is layer-level (no op graph for the intra-op solver), so its tensor
    parallelism is priced by the Megatron formula: near the plan's prediction, not equal to it."""
    model = ModelPreset(name="m", family="gpt", config={"num_layers": 2, "hidden": 64, "heads": 4, "vocab_size": 128,
                                                        "seq_len": 32}).build(device="meta")
    made = plan(model, "dgx-a100-80g", global_batch=8, sample_input=torch.zeros(1, 32, dtype=torch.long),
                space=SearchSpace(tp=(2,), sequence_parallel=(False,)))
    assert made.model.preset is None
    path = made.to_json(tmp_path / "module.json")
    code, out, err = run_cli(["evaluate", "--plan", str(path), "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert (data["tp"], data["dp"]) == (made.parallel.tp, made.parallel.dp)
    assert data["step_time_s"] == pytest.approx(made.predicted.step_time_s, rel=0.02)
    # written back, the re-priced plan keeps the file's placements: a module of one's own has no other split
    code, _, err = run_cli(["evaluate", "--plan", str(path), "-o", str(tmp_path / "again.json")], capsys)
    assert code == 0, err
    again = Plan.from_json(tmp_path / "again.json")
    assert made.placements.style and again.placements.style == made.placements.style
    assert any("placements kept from the plan file" in line for line in again.explanation)
