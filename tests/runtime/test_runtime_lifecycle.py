"""Runs that end cleanly, and never twice.

* SIGKILL to the launcher: within a few seconds no worker (nor the fork server) is left running;
* SIGTERM to the launcher: the workers stop after the step in progress, save a checkpoint there, and the
  run prints one line (no traceback) and exits 143;
* ``--steps N --resume`` trains up to step N in total and says "resumed from step K"; with N <= K it
  trains nothing and says so;
* a top-level parameter (a learned position table as a bare ``nn.Parameter``) lives in the stage that
  reads it: pp=2 and dp=2 runs of such a model give the single-process losses, and a run that left it
  untrained would not (the dp=2 one did, before: a one-stage plan ran the model whole, without it);
* every data-parallel rank gets its own rows of the global batch from the first step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from runtime_harness import launch
from runtime_plans import make_plan, write_plan
from user_cli_models import position_batches, position_table_model

from planner.models import load_preset
from runtime.data import SyntheticData, synthetic_global_batch

REPO = Path(__file__).resolve().parents[2]
HERE = str(Path(__file__).resolve().parent)


def _start(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-u", "-m", "runtime", "run", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc: subprocess.Popen, step: int) -> list[str]:
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(f"step {step:4d}"):
            return lines
    raise AssertionError(f"the run ended before step {step}: {proc.stderr.read()[-2000:]}")


def _descendants(pid: int) -> list[int]:
    parents = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        found += kids
        todo += kids
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie (a dead child this container's init may never reap)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.multiprocess
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_of_the_launcher_leaves_no_worker(tmp_path):
    plan = write_plan(make_plan(pp=2, num_micro_batches=4), tmp_path / "pp2.json")
    proc = _start(plan, "--nproc", "2", "--steps", "100000", "--checkpoint-dir", str(tmp_path / "ck"),
                  "--checkpoint-every", "1")
    try:
        _wait_for_step(proc, 2)
        workers = _descendants(proc.pid)
        assert len(workers) >= 2  # the two ranks (and the fork server, the resource tracker)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        start = time.monotonic()
        while any(_running(p) for p in workers) and time.monotonic() - start < 10:
            time.sleep(0.1)
        left = [p for p in workers if _running(p)]
        assert not left, f"{len(left)} processes of the run outlived the launcher"
        assert time.monotonic() - start < 5
        saved = sorted(p.name for p in (tmp_path / "ck").glob("step-*"))
        time.sleep(1.0)
        assert sorted(p.name for p in (tmp_path / "ck").glob("step-*")) == saved  # nobody writes checkpoints
    finally:
        for p in _descendants(proc.pid) + [proc.pid]:
            if _running(p):
                os.kill(p, signal.SIGKILL)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A run stopped by SIGTERM after step 2 or later: (plan path, checkpoint dir, stdout, stderr, code)."""
    tmp = tmp_path_factory.mktemp("sigterm")
    plan = write_plan(make_plan(pp=2, num_micro_batches=4), tmp / "pp2.json")
    ck = tmp / "ck"
    proc = _start(plan, "--nproc", "2", "--steps", "100000", "--checkpoint-dir", str(ck))
    try:
        out = "".join(_wait_for_step(proc, 2))
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return plan, ck, out + rest, err, proc.returncode


@pytest.mark.multiprocess
def test_sigterm_saves_and_prints_one_line(stopped):
    _, ck, out, err, code = stopped
    assert code == 143
    assert "Traceback" not in err and "Traceback" not in out
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1, err
    last = max(int(x.split()[1]) for x in out.splitlines() if x.startswith("step "))
    assert last >= 2
    assert lines[0] == (f"runtime: stopped by SIGTERM after step {last}; checkpoint saved to {ck}/step-{last:06d}: "
                        f"continue with --resume --checkpoint-dir {ck}")
    assert sorted(p.name for p in ck.iterdir()) == [f"step-{last:06d}"]
    assert json.loads((ck / f"step-{last:06d}" / "manifest.json").read_text())["step"] == last


@pytest.mark.multiprocess
def test_resume_trains_up_to_steps_in_total(stopped, tmp_path):
    plan, ck, out, _, _ = stopped
    k = max(int(x.split()[1]) for x in out.splitlines() if x.startswith("step "))
    metrics = tmp_path / "m.json"
    proc = subprocess.run([sys.executable, "-m", "runtime", "run", plan, "--nproc", "2", "--steps", str(k + 2),
                           "--resume", "--checkpoint-dir", str(ck), "--out", str(metrics)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"runtime: resumed from step {k} ({ck}/step-{k:06d}); training steps {k + 1}-{k + 2}" in proc.stdout
    assert [x.split("|")[0].strip() for x in proc.stdout.splitlines() if x.startswith("step ")] == \
        [f"step {k + 1:4d}".strip(), f"step {k + 2:4d}".strip()]
    report = json.loads(metrics.read_text())
    assert report["run"]["first_step"] == k and [s["step"] for s in report["steps"]] == [k + 1, k + 2]
    # --steps at or below the checkpoint's step: nothing to train, and the line says how to continue
    again = subprocess.run([sys.executable, "-m", "runtime", "run", plan, "--nproc", "2", "--steps", str(k),
                            "--resume", "--checkpoint-dir", str(ck)], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resumed from step {k}" in again.stdout and "nothing to train" in again.stdout
    assert not [x for x in again.stdout.splitlines() if x.startswith("step ")]


def _position_plan(pp: int = 2, dp: int = 1):
    from planner.api import plan
    from planner.search import SearchSpace

    space = SearchSpace(tp=(1,), pp=(pp,), dp=(dp,), micro_batch_size=(2,), schedules=("1f1b",), virtual_stages=(1,),
                        recompute=("none",), zero_stage=(0,), sequence_parallel=(False,))
    return plan(position_table_model(), "cpu-local", global_batch=8, sample_input=torch.zeros(1, 8, dtype=torch.long),
                nodes=1, devices_per_node=2, space=space, baselines=False)


def test_top_level_parameter_lives_in_the_stage_that_reads_it():
    from runtime.model import build_stage_modules, check_layer_coverage

    plan = _position_plan()
    model = position_table_model()
    check_layer_coverage(model, plan)  # was: "parameter 'pos' ... is in no planned stage"
    stages = build_stage_modules(model, sorted(plan.stages, key=lambda s: s.index), plan)
    owners = [[n for n, _ in s.named_parameters() if n == "pos"] for s in stages]
    assert owners == [["pos"], []]  # embed + pos, then blocks: pos is read by stage 0's glue
    assert stages[0].get_parameter("pos") is model.pos
    assert torch.equal(stages[0].get_buffer("scale"), model.scale)
    assert sum(p.numel() for s in stages for p in s.parameters()) == sum(p.numel() for p in model.parameters())


POS_LR = 0.05  # large enough that 4 steps of training the position table move the loss visibly


def _single_process(steps: int, train_pos: bool) -> list[float]:
    """Plain PyTorch: the global batch of 8 in 4 micro-batches, AdamW as the CLI runs it."""
    torch.set_num_threads(1)
    model = position_table_model()
    model.pos.requires_grad_(train_pos)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=POS_LR, weight_decay=0.01)
    batches, losses = position_batches(0, 1, 8, 0, 0), []
    for _ in range(steps):
        x, y = next(batches)
        total = 0.0
        for xb, yb in zip(x.chunk(4), y.chunk(4)):
            loss = F.cross_entropy(model(xb).reshape(-1, 64), yb.reshape(-1))
            (loss / 4).backward()
            total += loss.item() / 4
        optim.step()
        optim.zero_grad()
        losses.append(total)
    return losses


@pytest.fixture(scope="module")
def position_references():
    return launch(1, _references, 4)[0]


@pytest.mark.multiprocess
@pytest.mark.parametrize("pp, dp", [(2, 1), (1, 2)])  # cut at a stage boundary; one stage run whole, dp=2
def test_top_level_parameter_trains(tmp_path, position_references, pp, dp):
    plan = _position_plan(pp, dp).to_json(tmp_path / "pos.json")
    out = tmp_path / "m.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "runtime", "run", str(plan), "--nproc", "2", "--steps", "4", "--out",
                           str(out), "--lr", str(POS_LR), "--model", "user_cli_models:position_table_model", "--data",
                           "user_cli_models:position_batches"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [s["loss"] for s in json.loads(out.read_text())["steps"]]
    reference, frozen_pos = position_references
    assert max(abs(a - b) for a, b in zip(losses, reference)) <= 1e-5
    assert max(abs(a - b) for a, b in zip(reference, frozen_pos)) > 1e-3  # leaving pos untrained would show


def _references(steps: int) -> tuple[list[float], list[float]]:
    return _single_process(steps, True), _single_process(steps, False)


def test_each_dp_rank_gets_its_own_rows_from_the_first_step():
    plan = make_plan(dp=4, num_micro_batches=2)
    preset = load_preset("gpt-tiny")
    firsts = [next(iter(SyntheticData(plan, preset, seed=0, dp_index=d))) for d in range(4)]
    x, y = synthetic_global_batch(preset, batch=plan.parallel.global_batch, seq_len=preset.seq_len, seed=0, step=0)
    assert all(f[0].shape[0] == 4 for f in firsts)
    assert len({tuple(f[0].flatten().tolist()) for f in firsts}) == 4  # all different
    assert torch.equal(torch.cat([f[0] for f in firsts]), x) and torch.equal(torch.cat([f[1] for f in firsts]), y)
    resumed = next(iter(SyntheticData(plan, preset, seed=0, dp_index=1, first_step=3)))  # after a resume: step 3
    x3, _ = synthetic_global_batch(preset, batch=plan.parallel.global_batch, seq_len=preset.seq_len, seed=0, step=3)
    assert torch.equal(resumed[0], x3[4:8])


def test_a_stopped_launcher_gives_its_workers_the_runs_timeout(monkeypatch):
    """SIGTERM to the launcher: the agent waits the run's --timeout-s (not torch elastic's 30 s) for the workers
    to finish their step and save before it kills them."""
    import torch.distributed.launcher.api as elastic

    from runtime.launch import launch_workers

    seen = {}

    def fake_launch(config, entrypoint):
        seen["shutdown_timeout"] = config.shutdown_timeout
        return lambda *args: {0: None}

    monkeypatch.setattr(elastic, "elastic_launch", fake_launch)
    monkeypatch.setenv("RUNTIME_START_METHOD", "spawn")  # no fork server to start for a launch that never runs
    launch_workers(1, print, shutdown_timeout_s=120.0)
    assert seen["shutdown_timeout"] == 120
    launch_workers(1, print, shutdown_timeout_s=7.5)
    assert seen["shutdown_timeout"] == 8
    launch_workers(1, print)
    assert seen["shutdown_timeout"] == int(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30"))
