"""The benchmark sections, in page order. Each is ``(ctx: bench.common.Context) -> str`` (Markdown).

* ``predicted``: plan vs pure DP / ZeRO-3 / Megatron-LM and vs stage partitions, per workload × cluster
  (:mod:`bench.predicted`).
* ``inter_op``: the layer-to-device solver vs its partition baselines, including the mixed cluster
  (:mod:`bench.solvers`).
* ``measured``: our plan vs baseline configurations, run with gloo on this machine (:mod:`bench.measured`).
* ``planner_cost``: wall time and peak memory of ``plan`` as GPUs and layers grow (:mod:`bench.planner_cost`).
* ``planning_speed``: the headline planning times (below).
* ``intra_op``: the intra-op sharding ILP's own benchmark (:mod:`bench.solvers`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from bench import measured, planner_cost, predicted, solvers
from bench.common import Context, fmt_ratio, md_table, say


def planning_speed(ctx: Context) -> str:
    """Wall time of `plan` for the headline cases (the issue targets: 175B/1024 < 10 s, 1T/3072 < 30 s)."""
    from planner import plan

    cases = [("gpt3-175b", "dgx-a100-80g", 128, 1536), ("megatron-1t", "dgx-a100-80g", 384, 3072)]
    if ctx.quick:
        cases = [("gpt3-1.3b", "dgx-a100-80g", 4, 512)]
    rows = []
    for model, cluster, nodes, gb in cases:
        say(f"{model} on {nodes} x {cluster}")
        start = time.perf_counter()
        p = plan(model, cluster, nodes=nodes, global_batch=gb)
        took = time.perf_counter() - start
        t = p.timings
        fits = [b for b in p.search.get("baselines", []) if b.get("step_time_s")]
        best = min(fits, key=lambda b: b["step_time_s"]) if fits else None
        rows.append([model, cluster, nodes * 8, gb, f"{took:.2f}", f"{t.get('trace_s', 0):.2f}",
                     f"{t.get('search_s', 0):.2f}", f"{t.get('baselines_s', 0):.2f}", f"`{p.parallel.label()}`",
                     f"{p.predicted.step_time_s:.2f}", f"{p.predicted.mfu:.1%}",
                     f"{fmt_ratio(p.predicted.step_time_s / best['step_time_s'])} vs {best['name']}" if best else "—"])
    return "\n".join([
        "## Planning speed\n",
        "`plan()` end to end (trace on meta, search, baselines) in this process, for the sizes of "
        "Narayanan et al. 2021; the issue's targets are < 10 s for GPT-3 175B on 1024 GPUs and < 30 s for "
        "the 1T model on 3072 GPUs on a laptop-class machine.\n",
        md_table(["model", "cluster", "GPUs", "global batch", "plan wall (s)", "trace (s)", "search (s)",
                  "baselines (s)", "chosen configuration", "predicted step (s)", "MFU", "plan / best baseline"],
                 rows)])


SECTIONS: dict[str, Callable[[Context], str]] = {
    "predicted": predicted.section,
    "inter_op": solvers.inter_op_section,
    "measured": measured.section,
    "planner_cost": planner_cost.section,
    "planning_speed": planning_speed,
    "intra_op": solvers.intra_op_section,
}
