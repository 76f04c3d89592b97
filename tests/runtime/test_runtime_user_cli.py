"""``python -m runtime run --model/--data/--loss``: the user's own model, data and loss, through ``parallelize``.

* a factory that returns the gpt-tiny preset's module (seed 0), on a pp=2 plan, with the user's loss,
  gives the single-process losses (<= 1e-5): the user path computes what the preset path does;
* a ``--data`` loader is called with ``rank=``/``world=``: on a dp=2 plan each rank's first batch is its
  own half of the global batch (they differ, and together they are the global batch), and the losses
  match again;
* a bad flag (import error, a factory that raises or returns no module, a loader that takes no
  ``rank``/``world`` or yields the wrong rows, a malformed spec) fails in the launcher before any process
  starts: exit code 2 and one line naming the flag and the fix, no traceback.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from runtime_plans import make_plan, write_plan
from user_cli_models import RECORD_ENV

from planner.models import load_preset
from runtime.cli import main
from runtime.data import synthetic_global_batch

REPO = Path(__file__).resolve().parents[2]
HERE = str(Path(__file__).resolve().parent)


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    path = os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "runtime", "run", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": path, **(env or {})})


def _losses(out: Path) -> list[float]:
    return [s["loss"] for s in json.loads(out.read_text())["steps"]]


@pytest.mark.multiprocess
def test_user_factory_and_loss_match_the_single_process(tmp_path, references):
    plan = write_plan(make_plan(pp=2, num_micro_batches=4), tmp_path / "pp2.json")
    out = tmp_path / "m.json"
    proc = _cli(plan, "--nproc", "2", "--steps", "5", "--out", str(out), "--model", "user_cli_models:gpt_tiny",
                "--loss", "user_cli_models:mean_ce")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "through runtime.parallelize" in proc.stdout
    ref, frozen = references[False][0], references["frozen"][0]
    losses = _losses(out)
    assert len(losses) == 5
    assert max(abs(a - b) for a, b in zip(losses, ref)) <= 1e-5
    assert max(abs(a - b) for a, b in zip(losses, frozen)) > 1e-4  # a run that did not train would be caught


@pytest.mark.multiprocess
def test_user_loader_gets_rank_and_world_and_each_rank_its_rows(tmp_path, references):
    plan = make_plan(dp=2, num_micro_batches=2)
    path = write_plan(plan, tmp_path / "dp2.json")
    out = tmp_path / "m.json"
    proc = _cli(path, "--nproc", "2", "--steps", "5", "--out", str(out), "--model", "user_cli_models:gpt_tiny",
                "--data", "user_cli_models:recording_loader", env={RECORD_ENV: str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert max(abs(a - b) for a, b in zip(_losses(out), references[False][0])) <= 1e-5
    first = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [(f["rank"], f["world"]) for f in first] == [(0, 2), (1, 2)]
    assert not torch.equal(first[0]["inputs"], first[1]["inputs"])
    preset = load_preset("gpt-tiny")
    x, y = synthetic_global_batch(preset, batch=plan.parallel.global_batch, seq_len=preset.seq_len, seed=0, step=0)
    assert torch.equal(torch.cat([f["inputs"] for f in first]), x)
    assert torch.equal(torch.cat([f["targets"] for f in first]), y)


@pytest.mark.multiprocess
@pytest.mark.parametrize("config", ["dp=2", "pp=2"])
def test_an_image_model_runs_from_the_plan_alone(tmp_path, config):
    """A CNN's plan records its sample input (a float image, not token ids), so ``run --model`` can check and
    cut the module without being handed one; the losses fall."""
    from user_cli_models import IMAGE, small_cnn

    from planner import ParallelConfig, evaluate

    dp, pp = (2, 1) if config == "dp=2" else (1, 2)
    cfg = ParallelConfig(dp=dp, pp=pp, micro_batch_size=4, num_micro_batches=2)
    plan = evaluate(small_cnn(), "cpu-local", cfg, sample_input=torch.zeros(1, *IMAGE), devices_per_node=2,
                    dtype="fp32")
    assert plan.model.sample_input == {"tensor": {"shape": [1, *IMAGE], "dtype": "float32"}}
    path = str(tmp_path / "cnn.json")
    plan.to_json(path)
    out = tmp_path / "m.json"
    proc = _cli(path, "--nproc", "2", "--steps", "4", "--out", str(out), "--model", "user_cli_models:small_cnn",
                "--data", "user_cli_models:image_loader", "--lr", "0.01")
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = _losses(out)
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)


@pytest.mark.multiprocess
def test_a_sequence_length_that_changes_under_pp_is_one_line(tmp_path):
    """pipelining sizes its buffers at the first step: a shorter batch later is named, with the fix."""
    plan = write_plan(make_plan(pp=2, num_micro_batches=4), tmp_path / "pp2.json")
    proc = _cli(plan, "--nproc", "2", "--steps", "2", "--model", "user_cli_models:gpt_tiny",
                "--data", "user_cli_models:varying_loader")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "under pipeline parallelism (pp=2) every step takes one shape" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_resumed_loader_without_first_step_skips_what_was_trained():
    """A loader that cannot seek starts over on resume; the run skips the batches the checkpoint trained."""
    from runtime.user_model import user_batches

    plan = make_plan(dp=2, num_micro_batches=2)
    fresh = user_batches("user_cli_models:counting_loader", plan, data_rank=0, data_world=2, seed=0, first_step=0)
    resumed = user_batches("user_cli_models:counting_loader", plan, data_rank=0, data_world=2, seed=0, first_step=3)
    assert int(next(fresh)[1][0]) == 0
    assert [int(next(resumed)[1][0]) for _ in range(2)] == [3, 4]


@pytest.mark.parametrize("flags, expected", [
    (["--model", "no_such_module_xyz:build"], "--model: cannot import 'no_such_module_xyz'"),
    (["--model", "user_cli_models:raises"], "--model: user_cli_models:raises() raised ValueError: no weights"),
    (["--model", "user_cli_models:not_a_module"], "--model: user_cli_models:not_a_module() returned a int"),
    (["--model", "gpt_tiny"], "--model: got 'gpt_tiny'; write --model pkg.module:name"),
    (["--loss", "user_cli_models:nope"], "--loss: module 'user_cli_models' has no 'nope'"),
    (["--model", "user_cli_models:gpt_tiny", "--data", "user_cli_models:no_rank"],
     "it must take rank= and world="),
    (["--model", "user_cli_models:gpt_tiny", "--data", "user_cli_models:wrong_shape"],
     "--data user_cli_models:wrong_shape: inputs has shape (3, 4); each data-parallel rank takes "
     "micro_batch_size x num_micro_batches = 2 x 4 = 8 rows"),
])
def test_bad_user_code_is_one_line_naming_the_flag(tmp_path, capsys, flags, expected):
    plan = write_plan(make_plan(pp=2, num_micro_batches=4), tmp_path / "pp2.json")
    code = main(["run", plan, "--nproc", "2", "--steps", "1", *flags])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], captured.err
    assert "Traceback" not in captured.err and "step" not in captured.out
