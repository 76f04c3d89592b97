"""The example scripts of docs/train-your-own-model.md run as the page says: planned, then under torchrun.

``docs/examples/train_module.py`` is planned at pp=2 (its head reads the embedding across the two
stages), trained for 2 steps on 2 gloo processes started by ``torch.distributed.run`` (torchrun), and
its printed losses are held to 1e-5 of the same script's plain single-process run (gradient clipping
included, so ``pm.clip_grad_norm_`` is checked across the pipeline too).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "docs" / "examples" / "train_module.py"


def _losses(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"^step \d+ loss ([-\d.]+)$", text, flags=re.M)]


def _run(*args: str, timeout: int = 300) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


@pytest.mark.multiprocess
def test_the_module_example_trains_under_torchrun_as_one_process(tmp_path):
    plan = tmp_path / "module.plan.json"
    assert "pp=2" in _run(str(EXAMPLE), "plan", str(plan), "--devices", "2", "--pp", "2")
    parallel = _losses(_run("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(EXAMPLE),
                            "train", str(plan), "--steps", "2"))
    single = _losses(_run(str(EXAMPLE), "single", str(plan), "--steps", "2"))
    assert len(parallel) == len(single) == 2
    assert max(abs(a - b) for a, b in zip(parallel, single)) <= 1e-5, (parallel, single)
