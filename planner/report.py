"""A report a person would rather look at than read: Markdown with PNG charts.

``python -m planner report plan.json -o report/`` writes ``report/index.md`` with the plan's
summary, the pipeline timeline (simulated from the plan's own per-stage times), a per-device
memory bar chart against the usable limit, and the comparison with the baselines.

It reads a plan as ``explain`` and ``compare`` do: a plan edited after planning is refused
(:class:`planner.plan.PlanEditedError`, pointing at ``evaluate --plan``), a schema 1.x plan is read
with a warning that it is unverified.
"""

from __future__ import annotations

from pathlib import Path

from planner.plan import Plan
from planner.units import plural

GiB = 2**30
TIMELINE_FORMATS = (".png", ".pdf", ".svg")  # what `timeline -o` writes (matplotlib's savefig); .png if none


def stage_phase_lists(plan: Plan) -> tuple[list[float], list[float], list[float]]:
    """Per-chunk forward/backward-input/backward-weight seconds in model order (for the simulator)."""
    cfg = plan.parallel
    chunks: dict[int, tuple[float, float, float]] = {}
    for dev in plan.predicted.devices:
        mine = [s.index for s in plan.stages if s.device_index == dev.device_index]  # its chunks, model order
        for j, times in zip(mine, dev.chunk_phase_times_s):
            chunks[j] = tuple(times)
    n = cfg.pp * cfg.virtual_stages
    if len(chunks) != n:  # an older plan: split each device's time 1:1:1
        per = [dev.time_per_step_s / cfg.num_micro_batches / cfg.virtual_stages / 3
               for dev in plan.predicted.devices]
        chunks = {s.index: (per[s.device_index],) * 3 for s in plan.stages}
    ordered = [chunks[j] for j in range(n)]
    return [t[0] for t in ordered], [t[1] for t in ordered], [t[2] for t in ordered]


def simulate(plan: Plan):
    """The plan's schedule simulated with its own per-chunk times: a ``SimResult`` with the per-device
    action timeline (drawn by :func:`timeline` as a PNG and by :mod:`planner.report_html` as SVG)."""
    from planner import schedules

    cfg = plan.parallel
    fwd, bwd, wgt = stage_phase_lists(plan)
    return schedules.simulate(cfg.schedule, p=cfg.pp, m=cfg.num_micro_batches, v=cfg.virtual_stages,
                              fwd_s=fwd, bwd_input_s=bwd, bwd_weight_s=wgt)


def timeline(plan: Plan, path: Path):
    from planner import schedules

    result = simulate(plan)
    schedules.plot_timeline(result, path)
    return result


def usable_limit_bytes(plan: Plan) -> float | None:
    """The usable memory per device the plan was priced against; None on a mixed cluster (one per type)."""
    from planner.cost.constants import CostConstants
    from planner.cost.memory import usable_memory_bytes

    if len(plan.cluster.groups) != 1:
        return None
    known = CostConstants.__dataclass_fields__  # the plan's own constants (older files: fewer)
    c = CostConstants(**{k: v for k, v in plan.cost_constants.items() if k in known})
    return usable_memory_bytes(plan.cluster, c)


def memory_chart(plan: Plan, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = ("weights", "gradients", "optimizer", "activations", "temporary")
    colours = ("#4c72b0", "#55a868", "#c44e52", "#8172b2", "#ccb974")
    devices = plan.predicted.devices
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(devices) + 3), 4))
    bottom = [0.0] * len(devices)
    xs = list(range(len(devices)))
    for part, colour in zip(parts, colours):
        vals = [dev.memory_bytes.get(part, 0) / GiB for dev in devices]
        ax.bar(xs, vals, bottom=bottom, label=part, color=colour)
        bottom = [b + v for b, v in zip(bottom, vals)]
    limit = (usable_limit_bytes(plan) or 0) / GiB  # one device type: its usable limit; mixed types: none drawn
    if limit > 0:
        ax.axhline(limit, color="black", linestyle="--", linewidth=1, label=f"usable {limit:.1f} GiB")
    ax.set_xlabel("pipeline position (every device of a position holds the same)")
    ax.set_ylabel("GiB per device")
    ax.set_xticks(xs)
    ax.set_title(f"{plan.model.name}: memory per device ({plan.parallel.label()})", fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def baseline_chart(plan: Plan, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("this plan", plan.predicted.step_time_s)]
    rows += [(b.name, b.step_time_s) for b in plan.search.baselines or () if b.step_time_s]
    if len(rows) < 2:
        return False
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(rows) + 1.2))
    ax.barh([r[0] for r in rows][::-1], [r[1] for r in rows][::-1], color=["#999999"] * (len(rows) - 1) + ["#4c72b0"])
    for i, (_, t) in enumerate(rows[::-1]):
        ax.text(t, i, f" {t:.3g} s", va="center", fontsize=8)
    ax.set_xlabel("predicted step time (s), same cost model")
    ax.set_title("plan vs the best configuration of each recipe", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(plan: Plan, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg, pred = plan.parallel, plan.predicted
    sim = timeline(plan, out_dir / "timeline.png")
    memory_chart(plan, out_dir / "memory.png")
    has_baselines = baseline_chart(plan, out_dir / "baselines.png")
    lines = [
        f"# Plan report: {plan.model.name} on {plan.cluster.name} ({plural(cfg.world_size, 'device')})\n",
        f"**{cfg.label()}**, global batch {cfg.global_batch}.\n",
        "| predicted | value |", "| --- | --- |",
        f"| step time | {pred.step_time_s:.4g} s |", f"| MFU | {pred.mfu:.1%} |",
        f"| throughput | {pred.throughput_samples_per_s:.4g} samples/s |",
        f"| peak memory per device | {pred.peak_memory_bytes / GiB:.2f} GiB ({'fits' if pred.fits else 'DOES NOT FIT'}) |",
        f"| pipeline bubble (simulated) | {sim.bubble_fraction:.1%} |",
        f"| solver | {plan.solver.method}: {plan.solver.status}, gap {plan.solver.gap:.2%} |\n",
        "## Pipeline timeline\n", "![timeline](timeline.png)\n",
        "## Memory per device\n", "![memory](memory.png)\n",
        "## Step time breakdown (busiest device)\n", "| part | seconds | share |", "| --- | --- | --- |",
    ]
    for k, v in pred.time_breakdown_s.items():
        if v > 0:
            lines.append(f"| {k} | {v:.4g} | {v / pred.step_time_s:.1%} |")
    if has_baselines:
        lines += ["\n## Against the baselines\n", "![baselines](baselines.png)\n",
                  "| recipe | best configuration | step (s) | plan is faster by |", "| --- | --- | --- | --- |"]
        for b in plan.search.baselines or ():
            if b.step_time_s:
                lines.append(f"| {b.name} | {b.config} | {b.step_time_s:.4g} | {b.speedup_of_plan:.2f}x |")
            else:
                lines.append(f"| {b.name} | — | — | cannot run: {b.reason or ''} |")
    lines += ["\n## Why\n"] + [f"- {e}" for e in plan.explanation]
    alts = plan.search.alternatives
    if alts:
        lines += ["\n## Alternatives\n", "| configuration | step (s) | MFU |", "| --- | --- | --- |"]
        lines += [f"| {a.config} | {a.step_time_s:.4g} | {a.mfu:.1%} |" for a in alts]
    index = out_dir / "index.md"
    index.write_text("\n".join(lines) + "\n")
    return index
