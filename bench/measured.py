"""Section ``measured``: our plan against baseline configurations, *run* on this machine.

Small models on ``cpu-local`` (each device is a local process, gloo over loopback). For each
case the bench writes the plan (``planner.plan``) and one plan per baseline configuration
(``planner.evaluate``), then runs each with ``python -m runtime run`` and reads the per-step times from its metrics JSON
(``steps[].step_time_s``: the slowest rank's wall time of each step; see ``runtime/report.py``).
All runs of a case happen one after another in this invocation, so their ratio is the comparison;
absolute times on a shared 2-core machine are not.

The plan is searched in the space the runtime executes (``runnable_space``: the runtime's
schedules); when the unconstrained plan differs, the page says so.
Uniform stage splits are built here (``_uniform_plan``) from ``planner.api.build_plan`` with equal
layer counts, and checked against ``planner.evaluate(..., partition="uniform")``, which should give
the same split (a mismatch is listed under the tables).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import dataclass, field
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
    # 4 steps per run: the first is warm-up, so each run adds 3 step times.
    return (
        Case("gpt-tiny", 2, 16, 4, (
            Config("pure DP (DDP)", 1, 1, 2, 8),
            Config("ZeRO-3 / FSDP", 1, 1, 2, 8, zero=3),
            Config("tp=2 (Megatron TP)", 2, 1, 1, 16),
            Config("pp=2 uniform, 1F1B", 1, 2, 1, 4, partition="uniform"),
            Config("pp=2 planner's split, 1F1B", 1, 2, 1, 4),
        )),
        Case("gpt-10m", 2, 8, 4, (
            Config("pure DP (DDP)", 1, 1, 2, 4),
            Config("pp=2 uniform, 1F1B", 1, 2, 1, 2, partition="uniform"),
        )),
        Case("gpt-tiny", 4, 16, 4, (
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
    """The search space the runtime can execute: only the schedules ``runtime.pipeline_parallel`` runs
    (sequence parallelism runs since runtime/tensor_parallel.py implements it)."""
    from planner.search import SYNC_DEFAULT, SearchSpace
    from runtime.pipeline_parallel import SUPPORTED_SCHEDULES

    return SearchSpace(schedules=tuple(s for s in SYNC_DEFAULT if s in SUPPORTED_SCHEDULES))


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


@dataclass
class Entry:
    name: str
    conf: Config | None  # None: the plan
    plan_path: Path
    plan: object = None
    note: str = ""  # why it was not run
    step_times: list[float] = field(default_factory=list)  # after each run's first step, pooled
    round_medians: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.plan.parallel.label() if self.plan is not None else ""

    @property
    def stages(self) -> str:
        return "/".join(str(s.layer_stop - s.layer_start) for s in self.plan.stages) if self.plan is not None else ""

    @property
    def measured_s(self) -> float:
        return statistics.median(self.step_times) if self.step_times else math.nan


def _slug(entry_name: str, conf: Config | None) -> str:
    if conf is None:
        return "plan"
    return (entry_name.split(" ")[0].replace("=", "").replace("/", "")
            + f"-tp{conf.tp}pp{conf.pp}dp{conf.dp}mb{conf.micro_batch}z{conf.zero}-{conf.partition}")


def _prepare(case: Case, folder: Path, commands: list[str]) -> list[Entry]:
    """Write every plan of the case; mark baselines identical to the plan as not to be run."""
    entries = [Entry("plan", None, folder / "plan.plan.json")]
    entries += [Entry(c.name, c, folder / f"{_slug(c.name, c)}.plan.json") for c in case.baselines]
    for e in entries:
        rel = rel_path(str(e.plan_path))
        if e.conf is None:
            commands.append(f"planner.plan({case.model!r}, {CLUSTER!r}, devices_per_node={case.nproc}, "
                            f"global_batch={case.global_batch}, space=bench.measured.runnable_space())"
                            f".to_json({rel!r})")
        else:
            commands.append(e.conf.cli(case.model, case.nproc, case.global_batch, rel)
                            + ("  # written by bench.measured._uniform_plan" if e.conf.partition == "uniform" else ""))
        try:
            e.plan = _write_plan(case, e.conf, e.plan_path)
        except Exception as exc:  # noqa: BLE001 - reported on the page
            e.note = f"plan failed: {type(exc).__name__}: {str(exc)[:160]}"
            continue
        if e.conf is not None and (e.label, e.stages) == (entries[0].label, entries[0].stages):
            e.note = "same configuration as the plan: not run again"
    return entries


def _run_case(case: Case, entries: list[Entry], rounds: int, commands: list[str], problems: list[str]) -> None:
    """Run every runnable entry ``rounds`` times, forwards then backwards, so slow drift of the machine's
    load hits every configuration alike."""
    runnable = [e for e in entries if not e.note]
    for r in range(rounds):
        for e in runnable if r % 2 == 0 else runnable[::-1]:
            if e.note:  # failed in an earlier round
                continue
            say(f"{case.model} x{case.nproc}: {e.name} (round {r + 1}/{rounds})")
            metrics_path = e.plan_path.with_name(e.plan_path.name.replace(".plan.json", f".r{r + 1}.metrics.json"))
            if metrics_path.exists():
                metrics_path.unlink()
            res = run_cmd([sys.executable, "-m", "runtime", "run", str(e.plan_path), "--nproc", str(case.nproc),
                           "--steps", str(case.steps), "--out", str(metrics_path), "--quiet"], timeout_s=600)
            commands.append(res.cmd)
            if not res.ok or not metrics_path.exists():
                e.note = f"run failed: {res.error_line()}"
                problems.append(f"`{res.cmd}` failed: {res.error_line()}")
                continue
            steps = [s["step_time_s"] for s in json.loads(metrics_path.read_text()).get("steps", [])][1:]
            e.step_times += steps
            if steps:
                e.round_medians.append(statistics.median(steps))


def section(ctx: Context) -> str:
    rounds = 1 if ctx.quick else 2
    lines = ["## Measured on this machine (CPU, gloo)\n", __doc__.split("\n\n", 1)[1].strip(), "",
             f"Each configuration runs {rounds} time(s) (all configurations of a case in order, then in reverse "
             "order); the measured step time is the median of the steps after each run's first (warm-up) step, "
             "pooled over the runs.", ""]
    commands: list[str] = []
    problems: list[str] = PROBLEMS
    PROBLEMS.clear()
    for case in _cases(ctx.quick):
        folder = ctx.work_dir / "cpu" / f"{case.model}-n{case.nproc}"
        folder.mkdir(parents=True, exist_ok=True)
        entries = _prepare(case, folder, commands)
        _run_case(case, entries, rounds, commands, problems)
        ours = entries[0]
        lines += [f"### {case.model}, {case.nproc} processes, global batch {case.global_batch}, "
                  f"{case.steps} steps per run\n"]
        try:
            free = _unconstrained_label(case)
        except Exception as exc:  # noqa: BLE001 - reported on the page
            free = f"error: {type(exc).__name__}: {exc}"
        if ours.label and free != ours.label:
            lines += [f"Without the runtime's limits the planner picks `{free}`; the plan run here is the best "
                      f"configuration the runtime executes, `{ours.label}`.\n"]
        ours_pred = ours.plan.predicted.step_time_s if ours.plan is not None else math.nan
        table = []
        for e in entries:
            pred = e.plan.predicted.step_time_s if e.plan is not None else math.nan
            if not e.step_times:
                table.append([e.name, f"`{e.label}`" if e.label else "", e.stages, fmt_s(pred), e.note, "", "", ""])
                continue
            is_plan = e is ours
            table.append([e.name, f"`{e.label}`", e.stages, fmt_s(pred), fmt_s(e.measured_s),
                          " / ".join(f"{x:.3g}" for x in e.round_medians),
                          "" if is_plan else fmt_ratio(ours.measured_s / e.measured_s),
                          "" if is_plan else fmt_ratio(ours_pred / pred)])
            if not is_plan and ours.measured_s > e.measured_s:
                problems.append(f"{case.model} x{case.nproc}: {e.name} measured faster than the plan "
                                f"({e.measured_s:.3g} s vs {ours.measured_s:.3g} s; predicted {pred:.3g} s vs "
                                f"{ours_pred:.3g} s).")
        lines.append(md_table(["configuration", "parallel", "layers per stage", "predicted step (s)",
                               "measured step (s, median)", "median per run (s)", "plan / this (measured)",
                               "plan / this (predicted)"], table))
        lines.append("")
    lines += ["Ratios below 1.00 mean the plan was faster.", "",
              "Commands, in the order they ran (the plan files are written in the bench process by the API calls "
              "equivalent to the `planner` lines):", "", "```"] + commands + ["```"]
    if problems:
        lines += ["", "Where the plan lost, or something failed, in this run:", ""] + [f"* {p}" for p in problems]
    return "\n".join(lines)
