"""Sections ``inter_op`` and ``intra_op``: the two solvers on their own.

``inter_op`` calls :func:`planner.inter_op.solve_stages` (the exact stage DP: layers, sub-meshes
and replication per stage, for one schedule, micro-batching and tp) and
:func:`planner.inter_op.baselines` (equal layer counts, DeepSpeed ``parameters``, torchgpipe
``balance_by_time``, each with every stage on an equal share of the cluster) on the same priced
problem, so the ratios and the solve times come from one process. The module has no benchmark
entry point of its own; the solve times here are ``StageSolution.solve_time_s``.

``intra_op`` runs ``python -m planner.intra_op.bench`` (the intra-op sharding ILP's benchmark)
and includes its output.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any

from bench.common import Context, fmt_ratio, fmt_s, md_table, run_cmd, say


@dataclass(frozen=True)
class Instance:
    model: str
    cluster: str
    nodes: int | None
    schedule: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    def label(self) -> str:
        k = self.kwargs
        extra = ", ".join(f"{n}={k[n]}" for n in ("recompute", "sequence_parallel", "num_stages") if n in k)
        return (f"{self.schedule}, m={k['num_micro_batches']}, b={k['micro_batch']}, tp={k.get('tp', 1)}"
                + (f", {extra}" if extra else ""))


INSTANCES: tuple[Instance, ...] = (
    Instance("imbalanced-gpt", "dgx-a100-80g", 1, "1f1b",
             dict(tp=1, micro_batch=8, num_micro_batches=8, num_stages=4), "stage count fixed"),
    Instance("imbalanced-gpt", "dgx-a100-80g", 1, "1f1b", dict(tp=1, micro_batch=8, num_micro_batches=8)),
    Instance("imbalanced-gpt", "mixed-a100-v100", None, "1f1b", dict(tp=1, micro_batch=8, num_micro_batches=16)),
    Instance("gpt3-1.3b", "mixed-a100-v100", None, "1f1b", dict(tp=1, micro_batch=8, num_micro_batches=16)),
    Instance("llama2-7b", "mixed-a100-v100", None, "1f1b", dict(tp=2, micro_batch=4, num_micro_batches=32)),
    Instance("bert-large", "mixed-a100-v100", None, "1f1b", dict(tp=1, micro_batch=16, num_micro_batches=16)),
    Instance("t5-11b", "dgx-a100-80g", 2, "1f1b", dict(tp=8, micro_batch=2, num_micro_batches=32)),
    Instance("vit-h-14", "dgx-a100-80g", 1, "1f1b",
             dict(tp=1, micro_batch=32, num_micro_batches=16, num_stages=4), "stage count fixed"),
    Instance("gpt3-175b", "dgx-a100-80g", 16, "1f1b",
             dict(tp=8, micro_batch=1, num_micro_batches=64, recompute="selective", sequence_parallel=True)),
    Instance("gpt3-175b", "dgx-a100-80g", 16, "zb-h1",
             dict(tp=8, micro_batch=1, num_micro_batches=64, recompute="selective", sequence_parallel=True)),
)
QUICK: tuple[Instance, ...] = (
    Instance("imbalanced-gpt", "dgx-a100-80g", 1, "1f1b", dict(tp=1, micro_batch=8, num_micro_batches=8,
                                                                num_stages=4)),
)
ILP_CHECK = INSTANCES[2]  # small enough that the integer programs may finish; a cross-check of the DP
ILP_LIMIT_S = 20.0


def _stages_text(sol) -> str:
    """Layers per stage and where: '24 A100 x8 | 2 V100 x8' (devices per stage)."""
    parts = []
    for s in sol.stages:
        dev = s.device_name.split("-")[0]
        parts.append(f"{s.num_layers} {dev} x{s.replicas * s.tp}")
    return " \\| ".join(parts)


def inter_op_section(ctx: Context) -> str:
    from planner.api import default_dtype, resolve_cluster, resolve_model
    from planner.inter_op import baselines, build_problem, solve_stages

    rows, problems = [], []
    graphs: dict[tuple[str, str], Any] = {}
    for inst in QUICK if ctx.quick else INSTANCES:
        say(f"{inst.model} on {inst.cluster} ({inst.label()})")
        try:
            spec = resolve_cluster(inst.cluster, nodes=inst.nodes)
            key = (inst.model, default_dtype(spec))
            if key not in graphs:
                graphs[key] = resolve_model(inst.model, dtype=key[1]).graph
            graph = graphs[key]
            kw = dict(inst.kwargs, schedule=inst.schedule)
            problem = build_problem(graph, spec, **kw)
            sol = solve_stages(graph, spec, problem=problem, **kw)
            base = baselines(graph, spec, problem=problem, **kw)
        except Exception as exc:  # noqa: BLE001 - reported on the page
            rows.append([f"{inst.model} / {inst.cluster}", inst.label(), f"error: {type(exc).__name__}: {exc}"]
                        + [""] * 7)
            problems.append(f"{inst.model} / {inst.cluster} ({inst.label()}): {type(exc).__name__}: {exc}")
            continue
        cells, best = [], math.inf
        for name in ("uniform", "parameters", "time"):
            b = base.get(name)
            if b is None or not b.feasible:
                cells.append("does not fit")
                continue
            best = min(best, b.objective_s)
            cells.append(f"{fmt_s(b.objective_s)} ({b.objective_s / sol.objective_s:.2f}x)")
        ratio = sol.objective_s / best if sol.feasible and math.isfinite(best) else math.nan
        if ratio > 1.0005:
            problems.append(f"{inst.model} / {inst.cluster}: a baseline beats the exact DP ({ratio:.3f}).")
        rows.append([f"{inst.model} / {inst.cluster}" + (f" x{inst.nodes}" if inst.nodes else ""), inst.label(),
                     f"{sol.status}, gap {sol.gap:.1%}" if sol.gap is not None else sol.status,
                     fmt_s(sol.objective_s) if sol.feasible else "—", _stages_text(sol) if sol.feasible else "",
                     *cells, fmt_ratio(ratio), f"{sol.solve_time_s:.3f}"])
    lines = ["## Layer-to-device solver (inter-op) vs partition baselines\n",
             "`planner.inter_op.solve_stages` (exact DP over stage boundaries, sub-mesh per stage and its "
             "replication) against `planner.inter_op.baselines` on the same priced problem: equal layer counts "
             "(DeepSpeed `uniform`, Megatron), DeepSpeed `parameters`, and torchgpipe `balance_by_time` "
             "(reimplemented in `planner.inter_op.baselines`: torchgpipe 0.0.7 does not install with torch "
             "2.13). Baselines put every stage on an equal share of the cluster and keep their best stage count; "
             "on the mixed A100 + V100 cluster that is the case the solver is for. Objective: the predicted "
             "step time of `planner/inter_op/problem.py` (not the joint search's; the tables of the `predicted` "
             "section use the joint search's cost model). Baseline cells: step time (baseline / solver).\n",
             md_table(["instance", "schedule, micro-batches", "solver status", "solver step (s)",
                       "solver stages (layers, device, devices)", "uniform", "DS parameters", "torchgpipe time",
                       "solver / best baseline", "solve time (s)"], rows)]
    if not ctx.quick:
        lines += ["", _ilp_check(graphs), ""]
    if problems:
        lines += ["", "Problems found in this run:", ""] + [f"* {p}" for p in problems]
    return "\n".join(lines)


def _ilp_check(graphs: dict) -> str:
    """The two integer-program backends on one small instance, with a time limit, next to the DP."""
    from planner.api import default_dtype, resolve_cluster
    from planner.inter_op import METHODS, build_problem, solve_stages

    inst = ILP_CHECK
    spec = resolve_cluster(inst.cluster, nodes=inst.nodes)
    graph = graphs.get((inst.model, default_dtype(spec)))
    if graph is None:
        return ""
    kw = dict(inst.kwargs, schedule=inst.schedule)
    problem = build_problem(graph, spec, **kw)
    rows = []
    for method in METHODS:
        say(f"ILP cross-check: {method}")
        try:
            sol = solve_stages(graph, spec, problem=problem, method=method,
                               time_limit_s=None if method == "dp" else ILP_LIMIT_S, **kw)
            rows.append([method, sol.status, fmt_s(sol.objective_s) if sol.feasible else "—",
                         fmt_s(sol.bound_s), f"{sol.gap:.1%}" if sol.gap is not None else "—",
                         f"{sol.solve_time_s:.2f}"])
        except Exception as exc:  # noqa: BLE001 - reported on the page
            rows.append([method, f"error: {type(exc).__name__}: {str(exc)[:160]}", "", "", "", ""])
    return "\n".join([
        f"Cross-check of the three methods of `solve_stages` on {inst.model} / {inst.cluster} ({inst.label()}); "
        f"integer programs limited to {ILP_LIMIT_S:.0f} s:\n",
        md_table(["method", "status", "step (s)", "bound (s)", "gap", "solve time (s)"], rows)])


def intra_op_section(ctx: Context) -> str:
    cmd = [sys.executable, "-m", "planner.intra_op.bench", "--repeat", "1" if ctx.quick else "3"]
    if ctx.quick:
        cmd.append("--quick")
    say(" ".join(cmd[1:]))
    res = run_cmd(cmd, timeout_s=900)
    head = ["## Intra-op sharding ILP\n",
            "Solve times of the intra-op ILP (per-operator tensor splits on the tp axis), from its own benchmark "
            f"(`planner/intra_op/bench.py`), run as `{res.cmd}` in this invocation; its output follows verbatim.\n"]
    if not res.ok:
        return "\n".join(head + [f"The command failed: `{res.error_line()}`."])
    return "\n".join(head + [res.stdout.strip()])
