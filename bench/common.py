"""What every benchmark section shares: its context, Markdown tables, subprocesses, a log-log fit.

A section is a function ``(ctx: Context) -> str`` returning Markdown. It writes figures under
``ctx.fig_dir`` (linked from the page as ``benchmarks/<name>.png``) and scratch files (plans,
metrics) under ``ctx.work_dir``; every command it runs is printed on the page as the user would
type it (``python -m ...`` from the repository root).
"""

from __future__ import annotations

import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Context:
    quick: bool
    fig_dir: Path  # PNGs go here; the page links them as f"{fig_link}/<name>.png"
    fig_link: str
    work_dir: Path  # plans, metrics, logs of subprocesses
    log: list[str] = field(default_factory=list)

    def figure_path(self, name: str) -> tuple[Path, str]:
        """(where to write the PNG, how the page links it)."""
        self.fig_dir.mkdir(parents=True, exist_ok=True)
        return self.fig_dir / f"{name}.png", f"{self.fig_link}/{name}.png"


def say(msg: str) -> None:
    print(f"[bench]   {msg}", flush=True)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def fmt_s(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:.{digits}g}"


def meets(seconds: float, bar_s: float) -> str:
    """The "meets the bar" cell of a speed bar: ``yes`` when ``seconds`` is under ``bar_s``."""
    return "yes" if seconds < bar_s else "no"


def fmt_ratio(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "—"
    return f"{x:.2f}"


def shown(cmd: Sequence[str]) -> str:
    """A command as the page prints it: ``python`` for this interpreter, paths relative to the repo."""
    parts = ["python" if c == sys.executable else rel_path(c) for c in cmd]
    return shlex.join(parts)


def rel_path(arg: str) -> str:
    try:
        p = Path(arg)
        if p.is_absolute() and p.resolve().is_relative_to(REPO):
            return str(p.resolve().relative_to(REPO))
    except (OSError, ValueError):
        pass
    return arg


@dataclass
class CmdResult:
    cmd: str
    returncode: int
    stdout: str
    stderr: str
    wall_s: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def error_line(self) -> str:
        lines = [ln for ln in (self.stderr or self.stdout).strip().splitlines() if ln.strip()]
        return lines[-1][:300] if lines else f"exit status {self.returncode}"


def run_cmd(cmd: Sequence[str], *, timeout_s: float = 600.0) -> CmdResult:
    """Run ``cmd`` from the repository root; never raises on failure (the page reports it)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    try:
        proc = subprocess.run(list(cmd), cwd=REPO, capture_output=True, text=True, timeout=timeout_s, env=env)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, out, err = 124, _text(exc.stdout), _text(exc.stderr) + f"\ntimed out after {timeout_s:.0f} s"
    return CmdResult(shown(cmd), code, out, err, time.perf_counter() - start)


def _text(b: bytes | str | None) -> str:
    if b is None:
        return ""
    return b if isinstance(b, str) else b.decode(errors="replace")


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``log y = slope · log x + c``: the growth exponent of ``y`` in ``x``; (slope, c)."""
    x = np.log(np.asarray(xs, dtype=float))
    y = np.log(np.asarray(ys, dtype=float))
    if len(x) < 2 or np.ptp(x) == 0:
        return math.nan, math.nan
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(intercept)
