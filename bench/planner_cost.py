"""Section ``planner_cost``: how the planner's own wall time and memory grow with the problem.

Two sweeps, each point a fresh process (``python -m bench.point``): GPT-3 175B at batch 1536 on
8 → 4096 A100s (1 → 512 DGX nodes), and a GPT of fixed width (GPT-3 6.7B: hidden 4096, 32 heads)
with 12 → 128 blocks on 128 A100s. Time is ``plan()`` end to end (trace, search, baselines);
memory is the resident-set high-water mark ``plan()`` adds to its process (reset just before the
call, see ``bench/point.py``), next to the process's lifetime peak (``VmHWM``; not
``resource.getrusage``, which a child inherits from its parent on Linux).
The growth rate is the least-squares slope of log(cost) against log(size) over the points where a
plan exists (where no configuration fits, the planner proves that instead, a different amount of
work).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass

from bench.common import Context, fmt_s, loglog_slope, md_table, run_cmd, say


@dataclass(frozen=True)
class Sweep:
    name: str
    axis: str  # "gpus" or "blocks"
    model: str
    cluster: str
    global_batch: int
    nodes: tuple[int, ...] = ()  # gpus axis: one point per node count
    blocks: tuple[int, ...] = ()  # blocks axis: one point per block count
    fixed_nodes: int = 1

    def commands(self, *, one_process: bool) -> list[list[str]]:
        """One command per point, or (``one_process``) one command for the whole sweep."""
        base = [sys.executable, "-m", "bench.point", "--model", self.model, "--cluster", self.cluster,
                "--global-batch", str(self.global_batch)]
        if self.axis == "gpus":
            sizes = [[str(n)] for n in self.nodes]
            flag, fixed = "--nodes", []
        else:
            sizes = [[str(b)] for b in self.blocks]
            flag, fixed = "--layers", ["--nodes", str(self.fixed_nodes)]
        if one_process:
            sizes = [[x for s in sizes for x in s]]
        return [base + fixed + [flag, *s] for s in sizes]


FULL = (
    Sweep("GPT-3 175B, batch 1536, DGX A100 nodes", "gpus", "gpt3-175b", "dgx-a100-80g", 1536,
          nodes=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512)),
    Sweep("GPT of width 4096 (GPT-3 6.7B), 128 A100s, batch 512", "blocks", "gpt3-6.7b", "dgx-a100-80g", 512,
          blocks=(12, 16, 24, 32, 48, 64, 96, 128), fixed_nodes=16),
)
QUICK = (
    Sweep("GPT-3 125M, batch 64", "gpus", "gpt3-125m", "dgx-a100-80g", 64, nodes=(1, 2)),
    Sweep("GPT of width 768, 8 A100s, batch 64", "blocks", "gpt3-125m", "dgx-a100-80g", 64, blocks=(4, 8)),
)


def run_sweep(sweep: Sweep, *, one_process: bool) -> tuple[list[dict], list[str]]:
    points, commands = [], []
    for cmd in sweep.commands(one_process=one_process):
        say(" ".join(cmd[3:]))
        res = run_cmd(cmd, timeout_s=900)
        commands.append(res.cmd)
        got = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
        for point in got:
            point["size"] = point["gpus"] if sweep.axis == "gpus" else point["blocks"]
            points.append(point)
        if not res.ok:
            points.append({"size": cmd[-1], "error": res.error_line()})
    return points, commands


def fit(points: list[dict], key: str) -> float:
    ok = [p for p in points if p.get("feasible") and p.get(key, 0) > 0]
    return loglog_slope([p["size"] for p in ok], [p[key] for p in ok]) if len(ok) >= 2 else (math.nan, math.nan)


def _figure(ctx: Context, results: list[tuple[Sweep, list[dict]]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter, NullLocator

    path, link = ctx.figure_path("planner_cost")
    fig, axes = plt.subplots(2, len(results), figsize=(5.2 * len(results), 7), squeeze=False)
    for col, (sweep, points) in enumerate(results):
        for row, (key, ylabel) in enumerate((("wall_s", "plan() wall time (s)"),
                                             ("peak_delta_mib", "peak RSS added by plan() (MiB)"))):
            ax = axes[row][col]
            good = [p for p in points if p.get("feasible") and p.get(key, 0) > 0]
            bad = [p for p in points if p.get("feasible") is False and p.get(key, 0) > 0]
            ax.loglog([p["size"] for p in good], [p[key] for p in good], "o-", color="C0", label="plan found")
            if bad:
                ax.loglog([p["size"] for p in bad], [p[key] for p in bad], "x", ms=8, color="C3",
                          label="no configuration fits")
            slope, c = fit(points, key)
            if math.isfinite(slope):
                xs = np.array([min(p["size"] for p in good), max(p["size"] for p in good)], dtype=float)
                ax.loglog(xs, np.exp(c) * xs ** slope, "--", color="grey", label=f"fit: slope {slope:.2f}")
            if key == "wall_s" and good and "search_s" in good[0]:
                ax.loglog([p["size"] for p in good], [p["search_s"] for p in good], "s:", ms=4, color="C2",
                          label="search only")
            sizes = sorted({p["size"] for p in points if isinstance(p.get("size"), int)})
            ax.set_xticks(sizes, [str(x) for x in sizes], fontsize=7, rotation=45 if len(sizes) > 8 else 0)
            ax.xaxis.set_minor_locator(NullLocator())
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("GPUs" if sweep.axis == "gpus" else "transformer blocks")
            ax.set_ylabel(ylabel)
            ax.set_title(sweep.name, fontsize=9)
            ax.legend(fontsize=7)
            ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return link


def section(ctx: Context) -> str:
    sweeps = QUICK if ctx.quick else FULL
    results, commands = [], []
    for sweep in sweeps:
        points, cmds = run_sweep(sweep, one_process=ctx.quick)
        results.append((sweep, points))
        commands += cmds
    lines = ["## Planner cost: wall time and memory as the problem grows\n", __doc__.split("\n\n", 1)[1].strip(), ""]
    if ctx.quick:
        lines += ["Quick run: each sweep's points share one process (the memory high-water mark is reset before "
                  "each point, but later points reuse what earlier ones left allocated).", ""]
    rates = []
    for sweep, points in results:
        unit = "GPUs" if sweep.axis == "gpus" else "blocks"
        lines += [f"### {sweep.name}\n"]
        rows = []
        for p in points:
            if "error" in p:
                rows.append([p["size"], f"error: {p['error']}", "", "", "", "", "", ""])
                continue
            rows.append([p["size"], p.get("layers", "—"), f"`{p['config']}`" if p.get("feasible") else
                         "no configuration fits (proved)", f"{p['wall_s']:.2f}",
                         fmt_s(p.get("trace_s"), 3), fmt_s(p.get("search_s"), 3), p.get("evaluated", "—"),
                         f"{p['peak_rss_mib']:.0f} (+{p['peak_delta_mib']:.0f})"])
        lines.append(md_table([unit, "graph layers", "plan", "plan() wall (s)", "trace (s)", "search (s)",
                               "configurations evaluated", "peak RSS MiB (+ added by plan)"], rows))
        t_slope, _ = fit(points, "wall_s")
        s_slope, _ = fit(points, "search_s")
        m_slope, _ = fit(points, "peak_delta_mib")
        n_ok = sum(1 for p in points if p.get("feasible"))
        rates.append([sweep.name, unit, n_ok, f"{t_slope:.2f}", f"{s_slope:.2f}", f"{m_slope:.2f}"])
        lines.append("")
    lines += ["### Growth rates (log-log slopes over the points with a plan)\n",
              md_table(["sweep", "size", "points", "wall time", "search time", "peak RSS added"], rates),
              "", "A slope s means cost ∝ size^s over the range measured (1: linear).", ""]
    link = _figure(ctx, results)
    lines += [f"![planner wall time and memory against GPUs and layers]({link})", "",
              "_Figure: `python -m bench --only planner_cost`; each point is one of these commands:_", "", "```"]
    lines += commands + ["```"]
    return "\n".join(lines)
