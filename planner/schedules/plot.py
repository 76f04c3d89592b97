"""Draw a simulated timeline: one row per device, one bar per action, idle time left grey.

matplotlib is imported inside :func:`plot_timeline` (Agg backend) so ``planner.schedules`` stays fast
to import and works without a display.
"""

from __future__ import annotations

from pathlib import Path

from planner.schedules.actions import Action
from planner.schedules.simulator import SimResult

# Kind -> (colour, legend label). Second chunk / second replica uses a lighter shade of the same hue.
_COLOURS = {
    "F": ("#1f77b4", "#8fbbd9", "F  forward"),
    "I": ("#ff7f0e", "#ffbf86", "I  input gradient"),
    "W": ("#2ca02c", "#95cf95", "W  weight gradient"),
    "B": ("#d62728", "#ea9393", "B  full backward"),
}
_IDLE = "#d9d9d9"


def plot_timeline(result: SimResult, path: str | Path) -> None:
    """Write ``result``'s timeline as a PNG (or any format matplotlib infers from ``path``).

    Devices are rows (device 0 on top), F/I/W/full-backward bars have distinct colours, the
    micro-batch number is written in the bar when it fits, and idle time shows as the grey row
    background. The title gives the schedule, bubble %, step time and p, m, v. For asynchronous
    schedules the plot stops one steady step after warm-up and dashed lines mark that step.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not result.timeline:
        raise ValueError("plot_timeline: result has no timeline; use simulate(), not estimate()")
    p = result.p
    if result.synchronous:
        t_end = result.step_time_s
    else:  # stop a little after the marked steady step
        t_end = result.window_s[1] + 0.04 * (result.window_s[1] - result.window_s[0])
    t_end = t_end or max((e for rows in result.timeline for _, e, _ in rows), default=1.0)
    shown = sum(1 for rows in result.timeline for start, _, _ in rows if start < t_end)
    fig_w = min(22.0, 7.0 + 0.06 * shown**0.9)
    fig, ax = plt.subplots(figsize=(fig_w, 0.55 * p + 1.6))
    used = _draw_bars(ax, result, t_end)
    if not result.synchronous:
        for x in result.window_s:
            ax.axvline(x, color="black", linestyle="--", linewidth=0.8)
    _label_axes(ax, result, t_end, used)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _draw_bars(ax, result: SimResult, t_end: float) -> set[str]:
    """One grey row per device (device 0 on top) and a bar per action that starts before ``t_end``,
    with its micro-batch written in when it fits; returns the action kinds drawn."""
    p = result.p
    second = _second_chunk_rule(result)
    used: set[str] = set()
    for device, rows in enumerate(result.timeline):
        y = p - 1 - device
        ax.broken_barh([(0, t_end)], (y - 0.4, 0.8), facecolors=_IDLE, edgecolor="none")
        for start, end, text in rows:
            if start >= t_end:
                continue
            action = Action.parse(text)
            dark, light, _ = _COLOURS[action.kind]
            colour = light if second(action) else dark
            width = min(end, t_end) - start
            ax.broken_barh(
                [(start, width)], (y - 0.4, 0.8), facecolors=colour, edgecolor="white", linewidth=0.5
            )
            used.add(action.kind)
            if width > t_end / 90:
                ax.text(start + width / 2, y, str(action.microbatch), ha="center", va="center", fontsize=6.5)
    return used


def _label_axes(ax, result: SimResult, t_end: float, used: set[str]) -> None:
    """Device ticks, the time axis, a legend of the kinds ``used`` (and idle), and the title."""
    from matplotlib.patches import Patch

    p = result.p
    ax.set_yticks(range(p))
    ax.set_yticklabels([f"d{p - 1 - y}" for y in range(p)])
    ax.set_xlim(0, t_end)
    ax.set_ylim(-0.6, p - 0.4)
    ax.set_xlabel("time (s)")
    handles = [Patch(facecolor=_COLOURS[k][0], label=_COLOURS[k][2]) for k in _COLOURS if k in used]
    handles.append(Patch(facecolor=_IDLE, label="idle (bubble)"))
    if _has_second(result):
        handles.append(Patch(facecolor="#bbbbbb", label="light shade: 2nd chunk / up pipeline"))
    ax.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.28),
        ncol=len(handles),
        fontsize=7.5,
        frameon=False,
    )
    kind = "sync" if result.synchronous else "async, steady step between dashed lines"
    ax.set_title(
        f"{result.schedule}: bubble {100 * result.bubble_fraction:.1f}%, step {result.step_time_s:.3g} s "
        f"(p={result.p}, m={result.m}, v={result.v}; {kind})",
        fontsize=10,
    )


def _has_second(result: SimResult) -> bool:
    program = result.program
    return program is not None and (program.num_stages > result.p or len(program.placements) > 1)


def _second_chunk_rule(result: SimResult):
    """Which actions to draw in the lighter shade: chunks after the first, or Chimera's up pipeline."""
    program = result.program
    if program is None:
        return lambda action: False
    if len(program.placements) > 1:
        return lambda action: bool(program.replica_of) and program.replica_of[action.microbatch] == 1
    return lambda action: action.stage >= result.p
