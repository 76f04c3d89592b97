"""The command line: the foundation run, the report, and what happens when things go wrong.

* ``python -m runtime run`` on a 2-stage pipeline plan gives the single-process losses (<= 1e-5) and
  writes measured next to predicted step time and memory;
* a plan for another world size, model, schema or an asynchronous schedule fails before any process
  starts, with exit code 2, one paragraph and no traceback;
* a rank killed mid-step ends the whole run with a non-zero code well within 60 s, both under the
  runtime's launcher and with processes started the torchrun way (``RANK``/``WORLD_SIZE`` set);
* a corrupted checkpoint is refused before resuming, naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fault_injection import fault_env
from runtime_plans import make_plan, write_plan

from planner.plan import restamp
from runtime.cli import main

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str, env: dict | None = None, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "runtime", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    return proc, time.monotonic() - start


@pytest.fixture(scope="module")
def foundation(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    plan = write_plan(make_plan(pp=2, num_micro_batches=4), tmp / "pp2.json")
    out = tmp / "metrics.json"
    proc, _ = _cli("run", plan, "--nproc", "2", "--steps", "5", "--out", str(out),
                   "--checkpoint-dir", str(tmp / "ckpt"), "--checkpoint-every", "5")
    return proc, out, tmp


@pytest.mark.multiprocess
def test_two_process_pipeline_matches_one_process(foundation, references):
    proc, out, _ = foundation
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    losses = [s["loss"] for s in report["steps"]]
    ref_losses, _ = references[False]
    assert len(losses) == 5
    assert max(abs(a - b) for a, b in zip(losses, ref_losses)) <= 1e-5


@pytest.mark.multiprocess
def test_report_puts_measured_next_to_predicted(foundation):
    proc, out, _ = foundation
    report = json.loads(out.read_text())
    assert report["predicted"]["step_time_s"] == pytest.approx(0.05)
    assert report["measured"]["step_time_s"] > 0
    assert report["measured_over_predicted"]["step_time"] == pytest.approx(report["measured"]["step_time_s"] / 0.05)
    assert [r["rank"] for r in report["ranks"]] == [0, 1]
    assert all(r["peak_memory_bytes"] > r["model_state_bytes"] > 0 for r in report["ranks"])
    assert report["run"]["backend"] == "gloo" and report["run"]["schedule"].startswith("1f1b -> torch Schedule1F1B")
    assert "predicted vs measured step time" in proc.stdout
    assert "step    5" in proc.stdout


@pytest.mark.multiprocess
def test_world_size_mismatch_fails_before_start(tmp_path):
    plan = write_plan(make_plan(pp=2, num_micro_batches=4), tmp_path / "pp2.json")
    proc, elapsed = _cli("run", plan, "--nproc", "3", "--steps", "1")
    assert proc.returncode == 2
    assert "world size" in proc.stderr and "launch 2" in proc.stderr
    assert "Traceback" not in proc.stderr and "step" not in proc.stdout


def _edited(tmp_path: Path, *, by_hand: bool = False, **changes) -> str:
    """The plan with ``changes``: as a planner would have written it (fingerprint restamped), or, with
    ``by_hand``, edited after planning (its fingerprint no longer matches)."""
    data = json.loads(make_plan(pp=2, num_micro_batches=4).to_json_text())
    for dotted, value in changes.items():
        node = data
        *path, leaf = dotted.split("__")
        for key in path:
            node = node[key]
        node[leaf] = value
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data if by_hand else restamp(data)))
    return str(path)


@pytest.mark.parametrize("changes, expected", [
    ({"model__fingerprint": "sha256:0123456789abcdef"}, "model.fingerprint"),
    ({"schema_version": "3.0"}, "schema_version 3.0"),
    ({"parallel__schedule": "pipedream"}, "asynchronous"),
    ({"parallel__schedule": "pipemare"}, "asynchronous"),
    ({"parallel__schedule": "chimera"}, "not supported"),
    ({"cluster__devices_per_node": 1, "cluster__nodes": 2}, "2 node(s) x 1 devices per node"),
    ({"parallel__sequence_parallel": True, "parallel__tp": 1}, "sequence_parallel"),
])
def test_bad_plan_is_refused_with_the_fix(tmp_path, capsys, changes, expected):
    code = main(["run", _edited(tmp_path, **changes), "--nproc", "2", "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err
    if "schedule" in str(changes):
        assert "1f1b" in err and "zb-v" in err  # lists what the runtime does run


def test_plan_edited_by_hand_is_refused_before_start(tmp_path, capsys):
    plan = _edited(tmp_path, by_hand=True, parallel__micro_batch_size=1, parallel__num_micro_batches=8)
    code = main(["run", plan, "--nproc", "2", "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"{plan} was edited after planning: parallel.micro_batch_size 2 -> 1; parallel.num_micro_batches 4 -> 8" in err
    assert f"python -m planner evaluate --plan {plan}" in err


@pytest.mark.multiprocess
def test_schema_1_plan_runs_with_a_warning(tmp_path):
    """A plan written by the planner at schema 1.0 (tests/fixtures) runs: read unverified, with a warning."""
    out = tmp_path / "metrics.json"
    proc, _ = _cli("run", str(REPO / "tests" / "fixtures" / "plan-v1.json"), "--nproc", "2", "--steps", "2",
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "schema 1.0, which records no fingerprint: it is read unverified" in proc.stderr
    report = json.loads(out.read_text())
    assert report["run"]["schedule"].startswith("1f1b") and report["plan"]["schema_version"] == "1.0"
    losses = [s["loss"] for s in report["steps"]]
    assert len(losses) == 2 and all(0 < loss < 20 for loss in losses)


@pytest.mark.multiprocess
def test_killed_rank_ends_the_run(tmp_path):
    plan = write_plan(make_plan(pp=2, num_micro_batches=4), tmp_path / "pp2.json")
    proc, elapsed = _cli("run", plan, "--nproc", "2", "--steps", "8", env=fault_env("kill:1:3"))
    assert proc.returncode == 1
    assert elapsed < 60
    assert "run failed" in proc.stderr and "Traceback" not in proc.stderr
    # The launcher reports the first failure it sees: the killed rank, or the peer that lost it.
    assert "rank 1" in proc.stderr and "SIGKILL" in proc.stderr or "lost contact with another rank" in proc.stderr
    assert "step    2" in proc.stdout and "step    3" not in proc.stdout


def _free_port() -> int:
    """A port for the two hand-started ranks' MASTER_PORT (torchrun's own launcher would bind port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_style(plan: str, steps: int, timeout_s: int, env1: dict | None = None) -> list[subprocess.Popen]:
    """Two ranks started as torchrun starts them (RANK/WORLD_SIZE set): no runtime launcher above them."""
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2"}
    cmd = [sys.executable, "-u", "-m", "runtime", "run", plan, "--steps", str(steps), "--timeout-s", str(timeout_s)]
    return [subprocess.Popen(cmd, cwd=REPO, env={**base, "RANK": str(r), "LOCAL_RANK": str(r),
                                                 **((env1 or {}) if r == 1 else {})},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]


@pytest.mark.multiprocess
def test_torchrun_style_survivor_exits_when_peer_dies(tmp_path):
    plan = write_plan(make_plan(pp=2, num_micro_batches=4), tmp_path / "pp2.json")
    start = time.monotonic()
    procs = _torchrun_style(plan, 8, 30, fault_env("kill:1:3"))
    try:
        out0, err0 = procs[0].communicate(timeout=90)
        procs[1].communicate(timeout=30)
    finally:
        for p in procs:
            p.kill()
    assert procs[1].returncode == -9
    assert procs[0].returncode == 1, err0[-2000:]
    assert time.monotonic() - start < 60
    assert "lost contact with another rank" in err0
    assert "step    2" in out0


@pytest.mark.multiprocess
def test_hung_rank_is_timed_out(tmp_path):
    """A rank that stops communicating mid-step makes its peer fail after --timeout-s instead of hanging."""
    plan = write_plan(make_plan(pp=2, num_micro_batches=4), tmp_path / "pp2.json")
    proc, elapsed = _cli("run", plan, "--nproc", "2", "--steps", "8", "--timeout-s", "8",
                         env=fault_env("hang:1:3"))
    assert proc.returncode == 1
    assert elapsed < 60
    assert "Timed out" in proc.stderr and "lost contact with another rank" in proc.stderr
    assert "step    2" in proc.stdout and "step    3" not in proc.stdout


@pytest.mark.multiprocess
def test_corrupted_checkpoint_is_detected(foundation, tmp_path, capsys):
    _, _, tmp = foundation
    saved = tmp / "ckpt" / "step-000005"
    assert (saved / "manifest.json").is_file()
    copy = tmp_path / "ckpt"
    shutil.copytree(saved, copy / saved.name)
    shard = sorted((copy / saved.name).glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    plan = str(tmp / "pp2.json")
    code = main(["run", plan, "--nproc", "2", "--steps", "1", "--resume", "--checkpoint-dir", str(copy)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{shard.name} is corrupted" in err and "Traceback" not in err


def test_a_run_of_no_steps_reports_no_measured_step_time(tmp_path):
    """``--steps 0`` (a resumed run already at its last step) measured nothing: the report says so, never 0 s."""
    from runtime.report import build_report, format_table
    from runtime.train import RankMetrics, RunOptions, RunResult

    plan = make_plan(dp=2)
    rank = RankMetrics(rank=0, coords={"pp": 0, "dp": 0, "tp": 0}, stages=[0])
    result = RunResult(first_step=0, losses=[], grad_norms=[], step_times_s=[], rank=rank, ranks=[rank])
    launch = type("L", (), {"world_size": 2, "nodes": 1, "procs_per_node": 2, "device_type": "cpu"})()
    report = build_report(plan, "p.json", RunOptions(steps=0), result, launch)
    assert report["measured"]["step_time_s"] is None and report["measured_over_predicted"]["step_time"] is None
    assert "not measured" in format_table(report)
