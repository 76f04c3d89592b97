"""Section ``measured``: the planner's plan against hand-picked configurations, *run* on this machine.

Small models on local processes (each device is one process on the CPU, gloo over loopback), priced
with a profile of this machine taken first (``python -m bench.cpu_profile``: gloo's collectives,
the overlap of communication with compute, each process's share of the CPU with all of them busy;
:func:`planner.cost.cpu_calibration.cpu_profile_cluster` and
:func:`~planner.cost.cpu_calibration.cpu_profile_constants` turn it into the cluster file and the
cost constants the planner prices with). For each case the bench writes the plan
(``planner.plan`` in the space the runtime executes, ``runnable_space``) and one plan per
hand-picked configuration (``planner.evaluate``: DDP, ZeRO-3, tp=2 and pp=2 with 1F1B, times dp
on 4 processes), then runs each with ``python -m runtime run`` and reads the per-step times from
its metrics JSON (``steps[].step_time_s``: the slowest rank's wall time of each step; see
``runtime/report.py``). All runs of a case happen in this invocation, interleaved (in order, then in
reverse order, ...), so their ratio is the comparison; absolute times on a shared 2-core machine
are not.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import Context, fmt_ratio, fmt_s, md_table, rel_path, run_cmd, say

WARMUP_STEPS = 3  # the first steps of a run allocate, connect and warm caches: left out
TARGET = 1.05  # plan / best hand-picked configuration, measured (issue 21)


@dataclass(frozen=True)
class Config:
    name: str
    tp: int
    pp: int
    dp: int
    micro_batch: int
    zero: int = 0

    def cli(self, model: str, cluster: str, global_batch: int, path: str) -> str:
        """The equivalent `python -m planner evaluate` command (printed on the page)."""
        extra = f" --zero {self.zero}" if self.zero else ""
        extra += " --schedule 1f1b" if self.pp > 1 else ""
        return (f"python -m planner evaluate --model {model} --cluster {cluster} --tp {self.tp} --pp {self.pp} "
                f"--dp {self.dp} --micro-batch {self.micro_batch} --global-batch {global_batch}{extra} -o {path}")


@dataclass(frozen=True)
class Case:
    model: str
    nproc: int
    global_batch: int
    steps: int
    baselines: tuple[Config, ...]


def hand_picked(nproc: int, global_batch: int) -> tuple[Config, ...]:
    """DDP, ZeRO-3, tp=2 and pp=2 (1F1B, 4 micro-batches per replica), each times dp to fill ``nproc``."""
    d = nproc // 2
    return (Config("DDP", 1, 1, nproc, global_batch // nproc),
            Config("ZeRO-3 / FSDP", 1, 1, nproc, global_batch // nproc, zero=3),
            Config("tp=2" + (f" x dp={d}" if d > 1 else ""), 2, 1, d, global_batch // d),
            Config("pp=2" + (f" x dp={d}" if d > 1 else "") + ", 1F1B", 1, 2, d, max(1, global_batch // d // 4)))


def _cases(quick: bool) -> tuple[Case, ...]:
    if quick:
        return (Case("gpt-tiny", 2, 8, 4, (Config("DDP", 1, 1, 2, 4),)),)
    out = []
    for nproc in (2, 4):
        for model, gb in (("gpt-tiny", 16), ("gpt-10m", 8), ("mlp-tiny", 32)):
            out.append(Case(model, nproc, gb, 8, hand_picked(nproc, gb)))
    return tuple(out)


def runnable_space():
    """The search space the runtime can execute: only the schedules ``runtime.pipeline_parallel`` runs
    (sequence parallelism runs since runtime/tensor_parallel.py implements it)."""
    from planner.search import SYNC_DEFAULT, SearchSpace
    from runtime.pipeline_parallel import SUPPORTED_SCHEDULES

    return SearchSpace(schedules=tuple(s for s in SYNC_DEFAULT if s in SUPPORTED_SCHEDULES))


@dataclass
class Machine:
    """The profile of ``nproc`` processes and what the planner prices with."""

    nproc: int
    profile: dict
    cluster: object  # planner.cluster.ClusterSpec
    cluster_path: Path
    constants: object  # planner.cost.constants.CostConstants


def profile_machine(ctx: Context, nproc: int, commands: list[str], problems: list[str]) -> Machine | None:
    """Run ``bench.cpu_profile`` for ``nproc`` processes; write the cluster file the plans use."""
    from planner.cost.cpu_calibration import cpu_profile_cluster, cpu_profile_constants

    folder = ctx.work_dir / "cpu"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"profile-n{nproc}.json"
    say(f"profiling {nproc} processes (bench.cpu_profile)")
    cmd = [sys.executable, "-W", "ignore", "-m", "bench.cpu_profile", "--nproc", str(nproc), "-o", str(path)]
    if ctx.quick:
        cmd.append("--quick")
    res = run_cmd(cmd, timeout_s=300)
    commands.append(res.cmd)
    if not res.ok or not path.exists():
        problems.append(f"`{res.cmd}` failed: {res.error_line()}")
        return None
    profile = json.loads(path.read_text())
    cluster = cpu_profile_cluster(profile)
    cluster_path = folder / f"{cluster.name}.json"
    cluster_path.write_text(json.dumps(cluster.to_dict(), indent=1) + "\n")
    return Machine(nproc, profile, cluster, cluster_path, cpu_profile_constants(profile))


def _write_plan(case: Case, conf: Config | None, machine: Machine, path: Path):
    from planner import ParallelConfig, evaluate, plan

    if conf is None:
        p = plan(case.model, machine.cluster, global_batch=case.global_batch, space=runnable_space(),
                 constants=machine.constants)
    else:
        m = case.global_batch // (conf.dp * conf.micro_batch)
        cfg = ParallelConfig(dp=conf.dp, tp=conf.tp, pp=conf.pp, micro_batch_size=conf.micro_batch,
                             num_micro_batches=m, zero_stage=conf.zero)
        p = evaluate(case.model, machine.cluster, cfg, constants=machine.constants)
    p.to_json(str(path), force=True)
    return p


@dataclass
class Entry:
    name: str
    conf: Config | None  # None: the plan
    plan_path: Path
    plan: object = None
    note: str = ""  # why it was not run
    same_as_plan: bool = False  # the plan's own configuration: its runs are the plan's
    step_times: list[float] = field(default_factory=list)  # after each run's warm-up steps, pooled
    round_medians: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.plan.parallel.label() if self.plan is not None else ""

    @property
    def stages(self) -> str:
        return "/".join(str(s.layer_stop - s.layer_start) for s in self.plan.stages) if self.plan is not None else ""

    @property
    def predicted_s(self) -> float:
        return self.plan.predicted.step_time_s if self.plan is not None else math.nan

    @property
    def measured_s(self) -> float:
        """The least disturbed run's median step: other users' load comes in bursts that can slow a
        whole run, and hits whichever configuration is running then."""
        return min(self.round_medians) if self.round_medians else math.nan


def _slug(conf: Config) -> str:
    return f"tp{conf.tp}pp{conf.pp}dp{conf.dp}mb{conf.micro_batch}z{conf.zero}"


def _prepare(case: Case, machine: Machine, folder: Path, commands: list[str]) -> list[Entry]:
    """Write every plan of the case; a baseline identical to the plan shares the plan's runs."""
    entries = [Entry("plan", None, folder / "plan.plan.json")]
    entries += [Entry(c.name, c, folder / f"{_slug(c)}.plan.json") for c in case.baselines]
    cluster = rel_path(str(machine.cluster_path))
    for e in entries:
        rel = rel_path(str(e.plan_path))
        if e.conf is None:
            commands.append(f"planner.plan({case.model!r}, {cluster!r}, global_batch={case.global_batch}, "
                            f"space=bench.measured.runnable_space(), constants=cpu_profile_constants(profile))"
                            f".to_json({rel!r})")
        else:
            commands.append(e.conf.cli(case.model, cluster, case.global_batch, rel)
                            + "  # with constants=cpu_profile_constants(profile)")
        try:
            e.plan = _write_plan(case, e.conf, machine, e.plan_path)
        except Exception as exc:  # noqa: BLE001 - reported on the page
            e.note = f"plan failed: {type(exc).__name__}: {str(exc)[:160]}"
            continue
        if e.conf is not None and (e.label, e.stages) == (entries[0].label, entries[0].stages):
            e.same_as_plan = True
    return entries


def _run_case(case: Case, entries: list[Entry], rounds: int, commands: list[str], problems: list[str]) -> None:
    """Run every runnable entry ``rounds`` times, forwards then backwards, so slow drift of the machine's
    load hits every configuration alike."""
    runnable = [e for e in entries if not e.note and not e.same_as_plan]
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
            all_steps = [s["step_time_s"] for s in json.loads(metrics_path.read_text()).get("steps", [])]
            steps = all_steps[min(WARMUP_STEPS, len(all_steps) - 1):]
            e.step_times += steps
            if steps:
                e.round_medians.append(statistics.median(steps))
    ours = entries[0]
    for e in entries:
        if e.same_as_plan:
            e.step_times, e.round_medians = ours.step_times, ours.round_medians


@dataclass
class CaseResult:
    case: Case
    entries: list[Entry]

    @property
    def plan(self) -> Entry:
        return self.entries[0]

    def best_hand_picked(self) -> Entry | None:
        ran = [e for e in self.entries[1:] if e.step_times]
        return min(ran, key=lambda e: e.measured_s) if ran else None

    def ratio(self) -> float:
        best = self.best_hand_picked()
        if best is None or not self.plan.step_times:
            return math.nan
        return self.plan.measured_s / best.measured_s


def summary_table(results: list[CaseResult]) -> str:
    rows = []
    for res in results:
        best = res.best_hand_picked()
        ratio = res.ratio()
        verdict = "—" if not math.isfinite(ratio) else ("yes" if ratio <= TARGET else "**no**")
        rows.append([f"{res.case.model} x{res.case.nproc}", f"`{res.plan.label}`", best.name if best else "—",
                     fmt_s(res.plan.measured_s), fmt_s(best.measured_s if best else math.nan), fmt_ratio(ratio),
                     verdict])
    return md_table(["case", "plan", "best hand-picked (measured)", "plan step (s)", "best hand-picked step (s)",
                     "plan / best hand-picked (measured)", f"within {TARGET - 1:.0%}"], rows)


def _profile_lines(machines: dict[int, Machine]) -> list[str]:
    rows = []
    for n, m in sorted(machines.items()):
        p, c = m.profile, m.constants
        ar = {pt["message_bytes"]: pt["seconds"] for pt in p["collectives"]["all_reduce"]}
        small, large = min(ar), max(ar)
        link = m.cluster.intra_node
        rows.append([n, p.get("threads_per_process", ""), f"{p['compute_share']:.2f}",
                     f"{m.cluster.device.peak('fp32') / 1e9:.1f}",
                     f"{ar[small] * 1e3:.2f} ms at {small // 1024} KiB, {ar[large] * 1e3:.1f} ms at {large >> 20} MiB",
                     f"{link.latency_s * 1e6:.0f} µs, {link.bandwidth_bytes_per_s / 1e9:.2f} GB/s",
                     f"{p['overlap']['fraction']:.2f}", f"{c.op_dispatch_s * 1e6:.1f}"])
    return [md_table(["processes", "threads each", "compute share (busy / alone)", "fp32 GFLOP/s per process",
                      "gloo all-reduce (measured)", "fitted link (latency, bandwidth)", "comm/compute overlap",
                      "µs per op (dispatch)"], rows), ""]


def section(ctx: Context) -> str:
    rounds = 1 if ctx.quick else 3
    lines = ["## Measured on this machine (CPU, gloo)\n", __doc__.split("\n\n", 1)[1].strip(), "",
             f"Each configuration runs {rounds} time(s) (all configurations of a case in order, then in reverse "
             f"order, alternating). Each run's step time is the median of its steps after the first {WARMUP_STEPS} (warm-up) "
             "steps; a configuration's measured step time is its least disturbed run's (the smallest of those "
             "medians: other users' load on this shared machine comes in bursts that slow a whole run). A "
             "hand-picked configuration that is the plan's own is not run again: it shares the plan's runs.", ""]
    commands: list[str] = []
    problems: list[str] = []
    machines: dict[int, Machine] = {}
    results: list[CaseResult] = []
    body: list[str] = []
    for case in _cases(ctx.quick):
        if case.nproc not in machines:
            machine = profile_machine(ctx, case.nproc, commands, problems)
            if machine is None:
                continue
            machines[case.nproc] = machine
        folder = ctx.work_dir / "cpu" / f"{case.model}-n{case.nproc}"
        folder.mkdir(parents=True, exist_ok=True)
        entries = _prepare(case, machines[case.nproc], folder, commands)
        _run_case(case, entries, rounds, commands, problems)
        results.append(CaseResult(case, entries))
        body += _case_table(case, entries, problems)
    lines += ["### The profile the planner priced with\n"] + _profile_lines(machines)
    lines += ["### Plan against the best hand-picked configuration\n", summary_table(results), ""]
    lines += body
    lines += ["Ratios below 1.00 mean the plan was faster.", "",
              "Commands, in the order they ran (the plan files are written in the bench process by the API calls "
              "equivalent to the `planner` lines, with the constants of the profile: "
              "`planner.cost.cpu_calibration.cpu_profile_constants`):", "", "```"] + commands + ["```"]
    if problems:
        lines += ["", "Where the plan lost, or something failed, in this run:", ""] + [f"* {p}" for p in problems]
    return "\n".join(lines)


def _case_table(case: Case, entries: list[Entry], problems: list[str]) -> list[str]:
    ours = entries[0]
    lines = [f"#### {case.model}, {case.nproc} processes, global batch {case.global_batch}, "
             f"{case.steps} steps per run\n"]
    table = []
    for e in entries:
        if not e.step_times:
            table.append([e.name, f"`{e.label}`" if e.label else "", e.stages, fmt_s(e.predicted_s), e.note, "", "",
                          "", ""])
            continue
        is_plan = e is ours
        same = " (the plan's runs)" if e.same_as_plan else ""
        table.append([e.name, f"`{e.label}`", e.stages, fmt_s(e.predicted_s), fmt_s(e.measured_s) + same,
                      " / ".join(f"{x:.3g}" for x in e.round_medians), fmt_ratio(e.predicted_s / e.measured_s),
                      "" if is_plan else fmt_ratio(ours.measured_s / e.measured_s),
                      "" if is_plan else fmt_ratio(ours.predicted_s / e.predicted_s)])
        if not is_plan and ours.measured_s > TARGET * e.measured_s:
            problems.append(f"{case.model} x{case.nproc}: {e.name} measured faster than the plan by more than "
                            f"{TARGET - 1:.0%} ({e.measured_s:.3g} s vs {ours.measured_s:.3g} s; predicted "
                            f"{e.predicted_s:.3g} s vs {ours.predicted_s:.3g} s).")
    lines.append(md_table(["configuration", "parallel", "layers per stage", "predicted step (s)",
                           "measured step (s)", "median per run (s)", "predicted / measured",
                           "plan / this (measured)", "plan / this (predicted)"], table))
    lines.append("")
    return lines
