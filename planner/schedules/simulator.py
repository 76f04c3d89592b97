"""Simulate a named schedule with given stage times and report what the planner needs.

What "one step" means:

* synchronous schedules: one optimizer step of ``m`` micro-batches, from the first forward to the
  last backward on any device, with a flush (and a global sync, e.g. for gradient clipping) before
  the next step. ``overlapped_step_time_s`` is the period when steps run back to back and each device
  starts its next step as soon as its own work allows (no global sync; the zero-bubble papers'
  "optimizer post-validation"): ZB-H2 and ZB-V reach zero bubble only in that sense.
* asynchronous schedules never flush: we simulate a long run (``m + 18p`` micro-batches or more) and
  report ``m`` times the steady-state seconds per micro-batch, found as the
  exact period of the repeating pattern (:func:`_steady_period`). Both step times are then the same;
  ``window_s`` marks one steady step on the timeline.

``bubble_fraction`` is the idle share of device-time ``p * step_time_s`` in the measured window.
Memory is reported in micro-batches of one full stage (``1/p`` of the model): a chunk holding ``1/v``
of a stage counts ``1/v``. Staleness is in optimizer updates (one per micro-batch for PipeDream and
Pipelined Backprop, one per step otherwise) and is measured on the simulated timeline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from planner.errors import SpecError
from planner.schedules.actions import Program
from planner.schedules.engine import Executed, execute
from planner.schedules.registry import ScheduleInfo, build_program, get_schedule

Timeline = tuple[tuple[tuple[float, float, str], ...], ...]


@dataclass(frozen=True, kw_only=True)
class SimResult:
    """Timing, memory and staleness of one schedule; :func:`estimate` fills all but the timeline.

    ``peak_in_flight[d]``: most micro-batches whose activations device ``d`` holds at once, in units of
    one full-stage micro-batch (a ``1/v`` chunk counts ``1/v``; Chimera's two stages count 1 each).
    ``weight_versions[d]``: parameter copies of one stage held on device ``d`` (stashed versions,
    2BW's double buffer, or Chimera's second replica). ``staleness[d]``: most updates missing from the
    weights a forward on device ``d`` sees, compared with sequential SGD. ``exact`` is False when
    :func:`estimate` returned a bound instead of the simulated value. ``overlapped_*`` (steps back to
    back without a global sync) is None in :func:`estimate` results for synchronous schedules.
    """

    schedule: str
    p: int
    m: int
    v: int
    synchronous: bool
    step_time_s: float
    bubble_fraction: float
    overlapped_step_time_s: float | None
    overlapped_bubble_fraction: float | None
    peak_in_flight: tuple[float, ...]
    weight_versions: tuple[int, ...]
    staleness: tuple[int, ...]
    max_staleness: int
    exact: bool = True
    timeline: Timeline = ()
    window_s: tuple[float, float] = (0.0, 0.0)
    program: Program | None = None

    def to_text(self, *, decimals: int = 3) -> str:
        """A time x device grid like torch's dry run: the action starting at each time on each device.

        ``.`` marks a device still busy with an earlier action, an empty cell an idle device.
        """
        if not self.timeline:
            return f"{self.schedule}: no timeline (estimate() result)"
        events: dict[float, dict[int, str]] = {}
        for device, rows in enumerate(self.timeline):
            for start, _, text in rows:
                events.setdefault(round(start, decimals), {})[device] = text
        width = max(6, *(len(t) for rows in self.timeline for _, _, t in rows))
        header = f"{'t_s':>10} | " + " | ".join(f"{'d' + str(d):<{width}}" for d in range(len(self.timeline)))
        lines = [
            f"{self.schedule} p={self.p} m={self.m} v={self.v} step={self.step_time_s:.{decimals}f}s "
            f"bubble={100 * self.bubble_fraction:.1f}%",
            header,
        ]
        for time in sorted(events):
            cells = []
            for device, rows in enumerate(self.timeline):
                text = events[time].get(device)
                if text is None:
                    busy = any(s < time - 1e-12 and e > time + 1e-12 for s, e, _ in rows)
                    text = "." if busy else ""
                cells.append(f"{text:<{width}}")
            lines.append(f"{time:>10.{decimals}f} | " + " | ".join(cells))
        return "\n".join(lines)


def stage_times(
    value: float | Sequence[float], count: int, field_name: str, *, positive: bool
) -> tuple[float, ...]:
    """Normalise a scalar or a per-stage sequence of seconds to a tuple of length ``count``."""
    values = (value,) * count if isinstance(value, int | float) else tuple(value)
    if len(values) != count:
        raise SpecError(
            field_name,
            value,
            f"give one number (every stage) or a sequence of p*v = {count} stage times in model order",
        )
    for x in values:
        bad = isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x) or x < 0
        if bad or (positive and x == 0):
            kind = "positive" if positive else "non-negative"
            raise SpecError(field_name, value, f"every stage time must be a finite {kind} number of seconds")
    return tuple(float(x) for x in values)


def simulate(
    name: str,
    *,
    p: int,
    m: int,
    v: int = 1,
    fwd_s: float | Sequence[float],
    bwd_input_s: float | Sequence[float],
    bwd_weight_s: float | Sequence[float],
    p2p_s: float = 0.0,
) -> SimResult:
    """Build schedule ``name`` for ``(p, m, v)``, run it on the event engine and measure it.

    Stage times are a number (every stage) or ``p * v`` numbers in model order. Schedules that do not
    split the backward run ``bwd_input_s + bwd_weight_s`` as one fused pass.
    """
    info = get_schedule(name)
    info.validate(p, m, v)
    count = p * v
    fwd = stage_times(fwd_s, count, "fwd_s", positive=True)
    bwd_in = stage_times(bwd_input_s, count, "bwd_input_s", positive=False)
    bwd_w = stage_times(bwd_weight_s, count, "bwd_weight_s", positive=False)
    (p2p,) = stage_times(p2p_s, 1, "p2p_s", positive=False)
    if info.synchronous:
        return _simulate_sync(info, p, m, v, fwd, bwd_in, bwd_w, p2p)
    return _simulate_async(info, p, m, v, fwd, bwd_in, bwd_w, p2p)


def _simulate_sync(info: ScheduleInfo, p: int, m: int, v: int, fwd, bwd_in, bwd_w, p2p: float) -> SimResult:
    program = build_program(info.name, p, m, v)
    run = execute(program, fwd, bwd_in, bwd_w, p2p)
    step = run.makespan_s
    busy = _busy_in(run, 0.0, step)
    # Back-to-back steps with no global sync: the period once the pipeline has settled.
    steps = 4
    repeated = execute(_repeat(program, steps), fwd, bwd_in, bwd_w, p2p)
    finish = _step_finish(repeated, m, steps)
    overlapped = (finish[3] - finish[1]) / 2  # over two steps: the period may alternate
    weights = 2 if info.name == "chimera" else 1
    return SimResult(
        schedule=info.name,
        p=p,
        m=m,
        v=v,
        synchronous=True,
        step_time_s=step,
        bubble_fraction=_bubble(busy, p, step),
        overlapped_step_time_s=overlapped,
        overlapped_bubble_fraction=_bubble(busy, p, overlapped),
        peak_in_flight=peak_in_flight(program, p),
        weight_versions=(weights,) * p,
        staleness=(0,) * p,
        max_staleness=0,
        timeline=_timeline(run),
        window_s=(0.0, step),
        program=program,
    )


def _steady_period(finish: list[float], p: int) -> float:
    """Seconds per micro-batch once the no-flush pipeline repeats itself.

    The steady state repeats every few micro-batches, not always every one (1F1B with p2p latency
    repeats every ``p``, Pipelined Backprop every 3): we look for the shortest cycle length ``k``
    with ``finish[j + k] - finish[j]`` constant over a window of ``6p`` micro-batches that ends ``4p``
    before the drain, and return that difference over ``k``. If none is found (a transient longer
    than the run), the average slope over the window is returned.
    """
    n = len(finish)
    for k in range(1, 4 * p + 2):
        hi = n - 4 * p - k
        lo = max(0, hi - 6 * p)
        gaps = [finish[j + k] - finish[j] for j in range(lo, hi)]
        if gaps and max(gaps) - min(gaps) <= 1e-9 * max(1.0, abs(finish[-1])):
            return gaps[-1] / k
    hi = n - 4 * p
    lo = max(0, hi - 6 * p)
    return (finish[hi] - finish[lo]) / (hi - lo)


def _simulate_async(info: ScheduleInfo, p: int, m: int, v: int, fwd, bwd_in, bwd_w, p2p: float) -> SimResult:
    warm = m * math.ceil(2 * p / m)  # the step marked on the timeline starts after >= 2p micro-batches
    n = warm + m + 16 * p
    program = build_program(info.name, p, n, v)
    run = execute(program, fwd, bwd_in, bwd_w, p2p)
    per_mb = [0.0] * n
    for device_actions, ends in zip(program.actions, run.ends):
        for a, end in zip(device_actions, ends):
            per_mb[a.microbatch] = max(per_mb[a.microbatch], end)
    period = _steady_period(per_mb, p)
    step = m * period
    work_per_mb = sum(fwd) + sum(bwd_in) + sum(bwd_w)
    bubble = max(0.0, 1.0 - work_per_mb / (p * period)) if period > 0 else 0.0
    staleness = _async_staleness(info, run, m)
    if info.name == "pipedream":
        versions = _stashed_versions(program)
    else:
        versions = (2 if info.name == "pipedream-2bw" else 1,) * p
    t0 = per_mb[warm - 1]
    return SimResult(
        schedule=info.name,
        p=p,
        m=m,
        v=v,
        synchronous=False,
        step_time_s=step,
        bubble_fraction=bubble,
        overlapped_step_time_s=step,
        overlapped_bubble_fraction=bubble,
        peak_in_flight=peak_in_flight(program, p),
        weight_versions=versions,
        staleness=staleness,
        max_staleness=max(staleness),
        timeline=_timeline(run),
        window_s=(t0, t0 + step),
        program=program,
    )


def peak_in_flight(program: Program, p: int) -> tuple[float, ...]:
    """Most activations held per device, in full-stage micro-batches, from the action order alone.

    A micro-batch is held on a chunk from its forward until its last backward there (``W`` when the
    backward is split). The count only depends on each device's order, not on the durations.
    """
    unit = p / program.num_stages
    last_backward: dict[tuple[int, int], str] = {}
    for device_actions in program.actions:
        for a in device_actions:
            if a.kind != "F":
                key = (a.stage, a.microbatch)
                last_backward[key] = "W" if a.kind == "W" or last_backward.get(key) == "W" else a.kind
    peaks = []
    for device_actions in program.actions:
        held = peak = 0
        for a in device_actions:
            if a.kind == "F":
                held += 1
                peak = max(peak, held)
            elif a.kind == last_backward[(a.stage, a.microbatch)]:
                held -= 1
        peaks.append(peak * unit)
    return tuple(peaks)


def _stashed_versions(program: Program) -> tuple[int, ...]:
    """PipeDream: versions kept = distinct versions used by in-flight micro-batches, plus the latest."""
    result = []
    for device_actions in program.actions:
        current = 0
        version_of: dict[int, int] = {}
        users: dict[int, int] = {}  # version -> in-flight micro-batches that read it
        most = 1
        for a in device_actions:
            if a.kind == "F":
                version_of[a.microbatch] = current
                users[current] = users.get(current, 0) + 1
            else:
                old = version_of.pop(a.microbatch)
                users[old] -= 1
                if not users[old]:
                    del users[old]
                current += 1
            most = max(most, len(users) + (current not in users))
        result.append(most)
    return tuple(result)


def _async_staleness(info: ScheduleInfo, run: Executed, m: int) -> tuple[int, ...]:
    """Most updates a forward on each device misses versus sequential SGD, measured on the timeline."""
    program = run.program
    if info.name == "pipedream-2bw":
        # One version per step, switched at step boundaries: step t reads W(t-1). It must exist: the
        # update from step t-2 must have landed before step t's first forward (else a third buffer).
        for device, device_actions in enumerate(program.actions):
            update_at = _update_times(device_actions, run.ends[device], m, per_microbatch=False)
            for a, start in zip(device_actions, run.starts[device]):
                step = a.microbatch // m
                if a.kind == "F" and step >= 2:
                    assert update_at[step - 2] <= start + 1e-9, "2BW needs a third weight version"
        return (1,) * program.num_devices
    result = []
    for device, device_actions in enumerate(program.actions):
        update_at = _update_times(
            device_actions, run.ends[device], m, per_microbatch=info.updates_per_microbatch
        )
        applied = sorted(update_at.values())
        worst = 0
        for a, start in zip(device_actions, run.starts[device]):
            if a.kind != "F":
                continue
            wanted = a.microbatch if info.updates_per_microbatch else a.microbatch // m
            seen = _count_le(applied, start)
            worst = max(worst, wanted - seen)
        result.append(worst)
    return tuple(result)


def _update_times(actions, ends, m: int, *, per_microbatch: bool) -> dict[int, float]:
    """When each update lands on a device: after each backward, or after a step's last backward."""
    update_at: dict[int, float] = {}
    for a, end in zip(actions, ends):
        if a.kind == "F":
            continue
        key = a.microbatch if per_microbatch else a.microbatch // m
        update_at[key] = max(update_at.get(key, 0.0), end)
    if not per_microbatch:
        # A step's update exists only once all of its micro-batches are done on this device.
        counts: dict[int, int] = {}
        for a in actions:
            if a.kind != "F":
                counts[a.microbatch // m] = counts.get(a.microbatch // m, 0) + 1
        update_at = {k: t for k, t in update_at.items() if counts[k] == m}
    return update_at


def _count_le(sorted_times: list[float], t: float) -> int:
    lo, hi = 0, len(sorted_times)
    while lo < hi:
        mid = (lo + hi) // 2
        if sorted_times[mid] <= t + 1e-9:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _repeat(program: Program, steps: int) -> Program:
    m = program.microbatches
    actions = tuple(
        tuple(a._replace(microbatch=a.microbatch + s * m) for s in range(steps) for a in device_actions)
        for device_actions in program.actions
    )
    return Program(program.placements, actions, m * steps, program.replica_of * steps)


def _step_finish(run: Executed, m: int, steps: int) -> list[float]:
    finish = [0.0] * steps
    for device_actions, ends in zip(run.program.actions, run.ends):
        for a, end in zip(device_actions, ends):
            s = a.microbatch // m
            if s < steps:
                finish[s] = max(finish[s], end)
    return finish


def _busy_in(run: Executed, t0: float, t1: float) -> float:
    return sum(
        max(0.0, min(e, t1) - max(s, t0)) for st, en in zip(run.starts, run.ends) for s, e in zip(st, en)
    )


def _bubble(busy: float, p: int, span: float) -> float:
    return max(0.0, 1.0 - busy / (p * span)) if span > 0 else 0.0


def _timeline(run: Executed) -> Timeline:
    return tuple(
        tuple((s, e, str(a)) for s, e, a in zip(starts, ends, acts))
        for starts, ends, acts in zip(run.starts, run.ends, run.program.actions)
    )
