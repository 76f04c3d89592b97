"""Checkpoint and resume: 4 steps straight == 2 steps + checkpoint + 2 steps, under the same plan and others.

Checkpoints are saved by full-model parameter names with DCP, so a checkpoint written under pp=2 loads
under dp=2 or tp=2, and one written under tp=2, ZeRO-1 or ZeRO-3 loads under pp=2, tp=2 or ZeRO-1/2; sequence parallelism
(tp=2 + sp) loads from pp=2 and saves for dp=2 (tp=1). A damaged checkpoint
is refused before loading, with the file named.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from runtime_harness import Job, run_jobs
from runtime_plans import make_plan, solver_styles

from runtime.checkpoint import MANIFEST, latest_checkpoint, verify_checkpoint, write_manifest
from runtime.errors import CheckpointError
from runtime.launch import launch_workers as launch

PP2 = dict(pp=2, num_micro_batches=4)
DP2 = dict(dp=2, num_micro_batches=2)
TP2 = dict(tp=2, num_micro_batches=4)
ZERO3 = dict(dp=2, num_micro_batches=2, zero_stage=3)
ZERO1 = dict(dp=2, num_micro_batches=2, zero_stage=1)
ZERO2 = dict(dp=2, num_micro_batches=2, zero_stage=2)
TP2_SOLVED = dict(tp=2, num_micro_batches=4, styles=solver_styles())
TP2_SP = dict(tp=2, num_micro_batches=4, sequence_parallel=True)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    a, b, c, d, e = (str(root / x) for x in "abcde")
    pp2, dp2, tp2, z3, tp2s, tp2sp, z1, z2 = (make_plan(**s) for s in (PP2, DP2, TP2, ZERO3, TP2_SOLVED, TP2_SP,
                                                                         ZERO1, ZERO2))
    jobs = [
        Job("straight", pp2, steps=4),
        Job("save under pp=2", pp2, steps=2, checkpoint_dir=a, checkpoint_every=2),
        Job("pp=2 -> pp=2", pp2, steps=4, checkpoint_dir=a, resume=True),
        Job("pp=2 -> dp=2", dp2, steps=4, checkpoint_dir=a, resume=True),
        Job("pp=2 -> tp=2", tp2, steps=4, checkpoint_dir=a, resume=True),
        Job("pp=2 -> tp=2 split embeddings", tp2s, steps=4, checkpoint_dir=a, resume=True),
        Job("save under tp=2", tp2, steps=2, checkpoint_dir=b, checkpoint_every=2),
        Job("tp=2 -> pp=2", pp2, steps=4, checkpoint_dir=b, resume=True),
        Job("save under zero=3", z3, steps=2, checkpoint_dir=c, checkpoint_every=2),
        Job("zero=3 -> tp=2", tp2, steps=4, checkpoint_dir=c, resume=True),
        Job("pp=2 -> tp=2 sp", tp2sp, steps=4, checkpoint_dir=a, resume=True),
        Job("save under tp=2 sp", tp2sp, steps=2, checkpoint_dir=d, checkpoint_every=2),
        Job("tp=2 sp -> dp=2", dp2, steps=4, checkpoint_dir=d, resume=True),  # tp=1
        # ZeRO-1/2: the optimizer's 1/dp slices are saved whole and sliced again on load, whatever the plan
        Job("save under zero=1", z1, steps=2, checkpoint_dir=e, checkpoint_every=2),
        Job("zero=1 -> zero=1", z1, steps=4, checkpoint_dir=e, resume=True),
        Job("zero=1 -> tp=2", tp2, steps=4, checkpoint_dir=e, resume=True),
        Job("pp=2 -> zero=2", z2, steps=4, checkpoint_dir=a, resume=True),
    ]
    return root, launch(2, run_jobs, jobs)[0]


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["pp=2 -> pp=2", "pp=2 -> dp=2", "pp=2 -> tp=2", "pp=2 -> tp=2 split embeddings",
                                  "tp=2 -> pp=2", "zero=3 -> tp=2", "pp=2 -> tp=2 sp", "tp=2 sp -> dp=2",
                                  "zero=1 -> zero=1", "zero=1 -> tp=2", "pp=2 -> zero=2"])
def test_resume_continues_the_straight_run(name, resumed):
    _, results = resumed
    straight = results["straight"].losses
    assert len(straight) == 4
    if name == "pp=2 -> pp=2":  # same plan: bit for bit
        assert results[name].losses == straight[2:]
    else:
        assert max(abs(x - y) for x, y in zip(results[name].losses, straight[2:])) <= 1e-5
    first_half = results[f"save under {name.split(' -> ')[0]}"].losses
    assert max(abs(x - y) for x, y in zip(first_half, straight[:2])) <= 1e-5


@pytest.mark.multiprocess
def test_checkpoint_layout_and_manifest(resumed):
    root, _ = resumed
    folder = latest_checkpoint(root / "a")
    assert folder.name == "step-000002"
    manifest = verify_checkpoint(folder)
    assert manifest["step"] == 2 and manifest["seed"] == 0
    assert ".metadata" in manifest["files"] and any(f.endswith(".distcp") for f in manifest["files"])
    assert not list((root / "a").glob("*.tmp"))


def _fake_checkpoint(tmp_path: Path) -> Path:
    folder = tmp_path / "step-000004"
    folder.mkdir()
    (folder / ".metadata").write_bytes(b"meta" * 100)
    (folder / "__0_0.distcp").write_bytes(bytes(range(256)) * 64)
    write_manifest(folder, step=4, info={"seed": 0})
    return folder


def test_intact_checkpoint_verifies(tmp_path):
    assert verify_checkpoint(_fake_checkpoint(tmp_path))["step"] == 4


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "delete a file", "no manifest", "bad manifest"])
def test_damaged_checkpoint_is_refused_with_the_file_named(tmp_path, damage):
    folder = _fake_checkpoint(tmp_path)
    shard = folder / "__0_0.distcp"
    if damage == "flip a byte":
        data = bytearray(shard.read_bytes())
        data[1000] ^= 0xFF
        shard.write_bytes(bytes(data))
        expected = "__0_0.distcp is corrupted"
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:100])
        expected = "__0_0.distcp has 100 bytes"
    elif damage == "delete a file":
        shard.unlink()
        expected = "__0_0.distcp is missing"
    elif damage == "no manifest":
        (folder / MANIFEST).unlink()
        expected = "the save did not finish"
    else:
        (folder / MANIFEST).write_text("{not json")
        expected = "manifest.json is damaged"
    with pytest.raises(CheckpointError, match=expected) as info:
        verify_checkpoint(folder)
    assert "--resume" in str(info.value)  # says how to get going again


def test_resume_without_checkpoint_says_so(tmp_path):
    with pytest.raises(CheckpointError, match="no step-NNNNNN folder"):
        latest_checkpoint(tmp_path)


def test_manifest_records_sizes(tmp_path):
    folder = _fake_checkpoint(tmp_path)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["files"]["__0_0.distcp"]["bytes"] == 256 * 64
    shutil.rmtree(folder)
