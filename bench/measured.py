"""Section ``measured``: our plan against baseline configurations, *run* on this machine.

Small models on ``cpu-local`` (each device is a local process, gloo over loopback). For each
case the bench writes the plan (``planner.plan``) and one plan per baseline configuration
(``planner.evaluate``), then runs each with ``python -m runtime run`` and reads the measured step
time from its metrics JSON (median over the steps after the first, the slowest rank; see
``runtime/report.py``). All runs of a case happen one after another in this invocation, so their
ratio is the comparison; absolute times on a shared 2-core machine are not.

The plan is searched in the space the runtime executes (``runnable_space``: no sequence
parallelism, the runtime's schedules); when the unconstrained plan differs, the page says so.
Uniform stage splits are built here (``_uniform_plan``) from ``planner.api.build_plan`` with equal
layer counts, and checked against ``planner.evaluate(..., partition="uniform")``, which should give
the same split (a mismatch is listed under the tables).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.common import Context, fmt_ratio, fmt_s, md_table, rel_path, run_cmd, say

CLUSTER = "cpu-local"
PROBLEMS: list[str] = []  # filled while plans are written, printed under the tables


@dataclass(frozen=True)
class Config:
    name: str
    tp: int
    pp: int
    dp: int
    micro_batch: int
    zero: int = 0
    partition: str = "balanced"  # or "uniform"

    def cli(self, model: str, nproc: int, global_batch: int, path: str) -> str:
        """The equivalent `python -m planner evaluate` command (printed on the page)."""
        extra = f" --zero {self.zero}" if self.zero else ""
        extra += " --schedule 1f1b" if self.pp > 1 else ""
        extra += f" --partition {self.partition}" if self.partition != "balanced" else ""
        return (f"python -m planner evaluate --model {model} --cluster {CLUSTER} --devices-per-node {nproc} "
                f"--tp {self.tp} --pp {self.pp} --dp {self.dp} --micro-batch {self.micro_batch} "
                f"--global-batch {global_batch}{extra} -o {path}")


@dataclass(frozen=True)
class Case:
    model: str
    nproc: int
    global_batch: int
    steps: int
    baselines: tuple[Config, ...]


def _cases(quick: bool) -> tuple[Case, ...]:
    if quick:
        return (Case("gpt-tiny", 2, 8, 3, (Config("pure DP (DDP)", 1, 1, 2, 4),)),)
    return (
        Case("gpt-tiny", 2, 16, 5, (
            Config("pure DP (DDP)", 1, 1, 2, 8),
            Config("ZeRO-3 / FSDP", 1, 1, 2, 8, zero=3),
            Config("tp=2 (Megatron TP)", 2, 1, 1, 16),
            Config("pp=2 uniform, 1F1B", 1, 2, 1, 4, partition="uniform"),
        )),
        Case("gpt-10m", 2, 8, 5, (
            Config("pure DP (DDP)", 1, 1, 2, 4),
            Config("pp=2 uniform, 1F1B", 1, 2, 1, 2, partition="uniform"),
        )),
        Case("gpt-tiny", 4, 16, 5, (
            Config("pure DP (DDP)", 1, 1, 4, 4),
            Config("pp=2 x dp=2 uniform, 1F1B", 1, 2, 2, 2, partition="uniform"),
        )),
    )


def _uniform_plan(model: str, nproc: int, cfg):
    """A plan with equal layer counts per stage (planner.evaluate's "uniform" is not honoured yet)."""
    from planner.api import build_plan, check_config, default_dtype, resolve_cluster, resolve_model
    from planner.cost.constants import CostConstants
    from planner.cost.model import evaluate as evaluate_cost
    from planner.cost.model import layer_table
    from planner.inter_op.chain import uniform_partition
    from planner.search import Candidate

    spec = resolve_cluster(CLUSTER, devices_per_node=nproc)
    resolved = resolve_model(model, dtype=default_dtype(spec))
    check_config(cfg, resolved.graph, spec)
    c = CostConstants()
    table = layer_table(resolved.graph, spec, micro_batch=cfg.micro_batch_size, tp=cfg.tp,
                        sequence_parallel=cfg.sequence_parallel, recompute=cfg.recompute, c=c)
    bounds = uniform_partition(resolved.graph.num_layers, cfg.pp * cfg.virtual_stages)
    pred = evaluate_cost(resolved.graph, spec, cfg, list(bounds), c, table=table)
    out = build_plan(resolved, spec, Candidate(cfg, bounds, pred, "given"), c, global_batch=cfg.global_batch,
                     result=None)
    from planner import evaluate

    theirs = evaluate(model, CLUSTER, cfg, devices_per_node=nproc, partition="uniform")
    got = [(s.layer_start, s.layer_stop) for s in theirs.stages]
    if got != list(bounds):
        PROBLEMS.append(f"`planner.evaluate(..., partition=\"uniform\")` for {model} `{cfg.label()}` returned "
                        f"stages {got} (solver status {theirs.solver.status!r}) instead of the equal split "
                        f"{list(bounds)}; this page uses the equal split.")
    return out


def runnable_space():
    """The search space the runtime can execute today: no sequence parallelism (runtime/tensor_parallel.py
    refuses it) and only the schedules ``runtime.pipeline_parallel`` runs."""
    from planner.search import SYNC_DEFAULT, SearchSpace
    from runtime.pipeline_parallel import SUPPORTED_SCHEDULES

    return SearchSpace(sequence_parallel=(False,), schedules=tuple(s for s in SYNC_DEFAULT if s in SUPPORTED_SCHEDULES))


def _unconstrained_label(case: Case) -> str:
    from planner import plan

    return plan(case.model, CLUSTER, devices_per_node=case.nproc, global_batch=case.global_batch,
                baselines=False).parallel.label()


def _write_plan(case: Case, conf: Config | None, path: Path):
    from planner import ParallelConfig, evaluate, plan

    if conf is None:
        p = plan(case.model, CLUSTER, devices_per_node=case.nproc, global_batch=case.global_batch,
                 space=runnable_space())
    else:
        m = case.global_batch // (conf.dp * conf.micro_batch)
        cfg = ParallelConfig(dp=conf.dp, tp=conf.tp, pp=conf.pp, micro_batch_size=conf.micro_batch,
                             num_micro_batches=m, zero_stage=conf.zero)
        if conf.partition == "uniform":
            p = _uniform_plan(case.model, case.nproc, cfg)
        else:
            p = evaluate(case.model, CLUSTER, cfg, devices_per_node=case.nproc)
    p.to_json(str(path), force=True)
    return p


def _steps_after_first(metrics: dict) -> list[float]:
    return [s["step_time_s"] for s in metrics.get("steps", [])][1:]


def section(ctx: Context) -> str:
    from planner import evaluate  # noqa: F401  (import once here: the plans below are written in-process)

    lines = ["## Measured on this machine (CPU, gloo)\n", __doc__.split("\n\n", 1)[1].strip(), ""]
    commands: list[str] = []
    problems: list[str] = PROBLEMS
    PROBLEMS.clear()
    for case in _cases(ctx.quick):
        folder = ctx.work_dir / "cpu" / f"{case.model}-n{case.nproc}"
        folder.mkdir(parents=True, exist_ok=True)
        entries: list[tuple[str, Config | None]] = [("plan", None)] + [(c.name, c) for c in case.baselines]
        results = []
        ours_label = None
        for name, conf in entries:
            slug = "plan" if conf is None else name.split(" ")[0].replace("=", "").replace("/", "")
            slug += "" if conf is None else f"-{conf.tp}{conf.pp}{conf.dp}{conf.micro_batch}z{conf.zero}"
            plan_path, metrics_path = folder / f"{slug}.plan.json", folder / f"{slug}.metrics.json"
            say(f"{case.model} x{case.nproc}: {name}")
            rel_plan = rel_path(str(plan_path))
            if conf is None:
                commands.append(f"planner.plan({case.model!r}, {CLUSTER!r}, devices_per_node={case.nproc}, "
                                f"global_batch={case.global_batch}, space=bench.measured.runnable_space())"
                                f".to_json({str(rel_plan)!r})")
            else:
                commands.append(conf.cli(case.model, case.nproc, case.global_batch, str(rel_plan))
                                + ("  # written by bench.measured._uniform_plan" if conf.partition == "uniform"
                                   else ""))
            try:
                p = _write_plan(case, conf, plan_path)
            except Exception as exc:  # noqa: BLE001 - reported on the page
                results.append((name, None, None, f"plan failed: {type(exc).__name__}: {str(exc)[:160]}"))
                continue
            label = p.parallel.label()
            stages = "/".join(str(s.layer_stop - s.layer_start) for s in p.stages)
            if conf is None:
                ours_label, ours_stages = label, stages
            elif label == ours_label and stages == ours_stages:
                results.append((name, label, p, "same configuration as the plan: not run again"))
                continue
            if metrics_path.exists():
                metrics_path.unlink()
            res = run_cmd([sys.executable, "-m", "runtime", "run", str(plan_path), "--nproc", str(case.nproc),
                           "--steps", str(case.steps), "--out", str(metrics_path), "--quiet"], timeout_s=600)
            commands.append(res.cmd)
            if not res.ok or not metrics_path.exists():
                results.append((name, label, p, f"run failed: {res.error_line()}"))
                problems.append(f"`{res.cmd}` failed: {res.error_line()}")
                continue
            metrics = json.loads(metrics_path.read_text())
            results.append((name, label, p, metrics))
        lines += [f"### {case.model}, {case.nproc} processes, global batch {case.global_batch}, "
                  f"{case.steps} steps per run\n"]
        try:
            free = _unconstrained_label(case)
        except Exception as exc:  # noqa: BLE001 - reported on the page
            free = f"error: {type(exc).__name__}: {exc}"
        if ours_label and free != ours_label:
            lines += [f"Without the runtime's limits the planner picks `{free}`; the plan run here is the best "
                      f"configuration the runtime executes, `{ours_label}`.\n"]
        ours_ms = next((r[3]["measured"]["step_time_s"] for r in results if r[0] == "plan" and isinstance(r[3], dict)),
                       None)
        ours_pred = next((r[2].predicted.step_time_s for r in results if r[0] == "plan" and r[2] is not None), None)
        table = []
        for name, label, p, m in results:
            stages = "/".join(str(s.layer_stop - s.layer_start) for s in p.stages) if p is not None else ""
            pred = p.predicted.step_time_s if p is not None else math.nan
            if not isinstance(m, dict):
                table.append([name, f"`{label}`" if label else "", stages, fmt_s(pred), m, "", "", ""])
                continue
            ms = m["measured"]["step_time_s"]
            later = _steps_after_first(m)
            spread = f"{min(later):.3g}–{max(later):.3g}" if later else "—"
            table.append([name, f"`{label}`", stages, fmt_s(pred), fmt_s(ms), spread,
                          fmt_ratio(ours_ms / ms) if ours_ms and name != "plan" else "",
                          fmt_ratio(ours_pred / pred) if ours_pred and name != "plan" else ""])
            if name != "plan" and ours_ms and ours_ms > ms:
                problems.append(f"{case.model} x{case.nproc}: {name} measured faster than the plan "
                                f"({ms:.3g} s vs {ours_ms:.3g} s; predicted {pred:.3g} s vs {ours_pred:.3g} s).")
        lines.append(md_table(["configuration", "parallel", "layers per stage", "predicted step (s)",
                               "measured step (s, median)", "measured range (s)", "plan / this (measured)",
                               "plan / this (predicted)"], table))
        lines.append("")
    lines += ["Ratios below 1.00 mean the plan was faster. Measured range: fastest and slowest step after the "
              "first.", "", "Commands, in the order they ran (the plan files are written in the bench process by "
              "the API calls equivalent to the `planner` lines):", "", "```"] + commands + ["```"]
    if problems:
        lines += ["", "Where the plan lost or a run failed in this run:", ""] + [f"* {p}" for p in problems]
    return "\n".join(lines)
