"""A non-editable install plans: the wheel carries the presets and schemas (planner/_data), read with
importlib.resources, and the checkout is not needed. ``make check-wheel`` runs the same check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tools.check_wheel import SMALL, check

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # builds a wheel and starts three interpreters: about 15 s
def test_the_installed_wheel_plans_from_outside_the_checkout_and_writes_the_same_bytes(tmp_path):
    report = check(tmp_path / "work")
    site = Path(report["site"])
    assert REPO not in site.parents and tmp_path in site.parents
    # every preset, the measured data and both schemas ship, as files
    shipped = {p.relative_to(site / "planner" / "_data").as_posix()
               for p in (site / "planner" / "_data").rglob("*.json")}
    expected = {"plan.schema.json", "cluster.schema.json"} | {
        p.relative_to(REPO).as_posix() for sub in ("clusters", "models", "measured")
        for p in (REPO / "datasets" / sub).glob("*.json")}
    assert shipped == expected and report["data_files"] == len(expected)
    small = report["small"]
    assert small["dp"] * small["tp"] * small["pp"] == 2
    assert small["micro_batch_size"] * small["num_micro_batches"] * small["dp"] == 8
    # same inputs, same plan bytes: the package data is the checkout's data, error bands included
    here = subprocess.run([sys.executable, "-m", "planner", *SMALL, "-o", str(tmp_path / "checkout.json")],
                          cwd=REPO, capture_output=True, text=True)
    assert here.returncode == 0, here.stderr
    installed = (tmp_path / "work" / "cwd" / "small.plan.json").read_bytes()
    assert installed == (tmp_path / "checkout.json").read_bytes()
    assert "uncertainty" in json.loads(installed)["predicted"]
