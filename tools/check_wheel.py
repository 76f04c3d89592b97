"""Build the wheel, install it outside the checkout, and plan (and optionally train) from it.

    python -m tools.check_wheel            # build, install into a temp dir, plan gpt-tiny on cpu-local
    python -m tools.check_wheel --big      # also plan GPT-3 175B on 128 DGX A100 nodes
    python -m tools.check_wheel --run      # also train the gpt-tiny plan for 2 steps on 2 processes

``make check-wheel`` runs it. The wheel is built from a copy of the files a build reads (so stale
``build/`` output never ships), installed with ``pip install --target`` and no dependencies (the
venv running this has them), and every command runs from a folder outside the repository with the
install first on ``PYTHONPATH``: the checkout is not on ``sys.path`` and ``$PLANNER_DATASETS`` is
unset, so presets and schemas can only come from the installed package data.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What `pip wheel` reads: the project files, the packages, and what planner/_data links to.
BUILD_INPUTS = ("pyproject.toml", "README.md", "planner", "runtime", "datasets", "docs/plan.schema.json",
                "docs/cluster.schema.json")
SMALL = ["plan", "--model", "gpt-tiny", "--cluster", "cpu-local", "--devices-per-node", "2", "--global-batch", "8"]
BIG = ["plan", "--model", "gpt3-175b", "--cluster", "dgx-a100-80g", "--nodes", "128", "--global-batch", "1536"]


def _copy_sources(dest: Path) -> None:
    for name in BUILD_INPUTS:
        src, dst = REPO / name, dest / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dst)


def build_and_install(work: Path) -> Path:
    """Build the wheel from a clean copy of the sources and install it into ``work/site``; returns that."""
    src, dist, site = work / "src", work / "dist", work / "site"
    _copy_sources(src)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip[:3], "wheel", *pip[3:], "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
                   check=True, cwd=work)
    wheels = sorted(dist.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel in {dist}, found {[w.name for w in wheels]}")
    subprocess.run([*pip[:3], "install", *pip[3:], "--no-deps", "--no-index", "--target", str(site), str(wheels[0])],
                   check=True, cwd=work)
    return site


def installed_env(site: Path) -> dict[str, str]:
    """The environment of a command that must see only the installed planner."""
    env = {k: v for k, v in os.environ.items() if k not in ("PLANNER_DATASETS", "PYTHONPATH")}
    env["PYTHONPATH"] = str(site)
    return env


def run_installed(site: Path, args: list[str], cwd: Path, *, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=installed_env(site), capture_output=True, text=True,
                          timeout=timeout)


def _ok(done: subprocess.CompletedProcess, what: str) -> str:
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout


def check(work: Path, *, big: bool = False, run: bool = False) -> dict[str, object]:
    """Build, install and plan from ``work`` (a folder outside the repository); what it found."""
    site = build_and_install(work)
    cwd = work / "cwd"
    cwd.mkdir(exist_ok=True)
    where = _ok(run_installed(site, ["-c", "import planner, runtime; print(planner.__file__); "
                                           "print(runtime.__file__)"], cwd), "import")
    files = [Path(line) for line in where.split()]
    if not all(site in f.parents for f in files):
        raise RuntimeError(f"imported {files}, not the install in {site}")
    links = [p for p in (site / "planner" / "_data").rglob("*") if p.is_symlink()]
    if links:
        raise RuntimeError(f"the wheel holds links, not files: {links}")
    report: dict[str, object] = {"site": str(site), "data_files": sum(1 for p in (site / "planner" / "_data").rglob(
        "*.json"))}
    _ok(run_installed(site, ["-m", "planner", *SMALL, "-o", "small.plan.json", "--force"], cwd), "plan gpt-tiny")
    plan = json.loads((cwd / "small.plan.json").read_text())
    _ok(run_installed(site, ["-c", "from planner.plan import Plan; Plan.from_json('small.plan.json')"], cwd),
        "load the plan (schema check)")
    report["small"] = plan["parallel"]
    if big:
        _ok(run_installed(site, ["-m", "planner", *BIG, "-o", "big.plan.json", "--force"], cwd), "plan gpt3-175b")
        report["big"] = json.loads((cwd / "big.plan.json").read_text())["parallel"]
    if run:
        _ok(run_installed(site, ["-m", "runtime", "run", "small.plan.json", "--nproc", "2", "--steps", "2",
                                 "--out", "metrics.json", "--force"], cwd), "runtime run")
        report["run"] = json.loads((cwd / "metrics.json").read_text())
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.check_wheel", description=__doc__.splitlines()[0])
    parser.add_argument("--big", action="store_true", help="also plan GPT-3 175B on 128 DGX A100 nodes")
    parser.add_argument("--run", action="store_true", help="also train the small plan for 2 steps on 2 processes")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temp folder)")
    args = parser.parse_args(argv)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        report = check(args.keep.resolve(), big=args.big, run=args.run)
    else:
        with tempfile.TemporaryDirectory(prefix="check_wheel_") as tmp:
            report = check(Path(tmp), big=args.big, run=args.run)
    for key, value in report.items():
        print(f"{key}: {json.dumps(value) if not isinstance(value, str) else value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
