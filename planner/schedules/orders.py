"""The action order of every schedule: functions ``(p, m, v) -> Program``.

Each function writes down the per-device order of one method from the literature; the timing comes
later from :mod:`.engine`. Stage ``k`` is a model chunk in model order (``p * v`` of them). Placements:

* *loop* (GPipe/Looped-BFS, Megatron interleaved): stage ``k`` on device ``k % p``;
* *V* (ZB-V, DualPipe-V): stage ``k < p`` on device ``k``, stage ``k >= p`` on device ``2p - 1 - k``;
* *bidirectional* (Chimera): two replicas of a ``p``-stage model, see :mod:`.bidirectional`.

Asynchronous methods (PipeDream, PipeDream-2BW, Pipelined Backprop, PipeMare) never flush: their order
is the 1F1B-style steady state written out over ``n`` micro-batches spanning several optimizer steps.
"""

from __future__ import annotations

from planner.schedules.actions import Action, Program
from planner.schedules.listsched import list_schedule


def loop_placement(p: int, v: int) -> tuple[int, ...]:
    return tuple(k % p for k in range(p * v))


def gpipe(p: int, m: int, v: int) -> Program:
    """All forwards, then all backwards (GPipe); with ``v > 1`` chunk by chunk (Looped BFS).

    Looped BFS runs each chunk's backwards last micro-batch first, as torch's ``ScheduleLoopedBFS``
    does (the runtime runs that class); GPipe with one chunk runs them first to last, as
    ``ScheduleGPipe``. The order of the backwards changes no time: every device starts its backwards
    after all of its forwards, so the backward phase is the same pipeline with micro-batches renamed.
    """
    programs = []
    backward_order = range(m - 1, -1, -1) if v > 1 else range(m)
    for d in range(p):
        chunks = [d + r * p for r in range(v)]
        acts = [Action(k, "F", j) for k in chunks for j in range(m)]
        acts += [Action(k, "B", j) for k in reversed(chunks) for j in backward_order]
        programs.append(tuple(acts))
    return Program((loop_placement(p, v),), tuple(programs), m)


def one_f_one_b(p: int, m: int, *, warmup: list[int] | None = None) -> tuple[tuple[Action, ...], ...]:
    """1F1B on ``p`` devices (stage = device): ``warmup[d]`` forwards, then F/B pairs, then the rest.

    The default warm-up ``p - 1 - d`` is PipeDream-Flush / Megatron's: device ``d`` holds ``p - d``
    micro-batches at most. Pipelined Backprop passes a deeper warm-up (see :func:`pipelined_backprop`).
    """
    warm = warmup if warmup is not None else [p - 1 - d for d in range(p)]
    programs = []
    for d in range(p):
        w = min(warm[d], m)
        acts = [Action(d, "F", j) for j in range(w)]
        for i in range(m - w):
            acts.append(Action(d, "F", w + i))
            acts.append(Action(d, "B", i))
        acts += [Action(d, "B", j) for j in range(m - w, m)]
        programs.append(tuple(acts))
    return tuple(programs)


def pipedream_flush(p: int, m: int) -> Program:
    """1F1B (PipeDream-Flush, Megatron's non-interleaved schedule)."""
    return Program((tuple(range(p)),), one_f_one_b(p, m), m)


def interleaved(p: int, m: int, v: int) -> Program:
    """Megatron's interleaved 1F1B (Narayanan et al. 2021), needs ``m % p == 0``.

    Micro-batches go in groups of ``p``: a device runs chunk 0 for the group, then chunk 1, ...
    (backward: last chunk first). Device ``d`` warms up with ``2 (p - 1 - d) + (v - 1) p`` chunk
    forwards, then alternates one forward and one backward.
    """
    placement = loop_placement(p, v)
    total = m * v

    def order(index: int, backward: bool) -> tuple[int, int]:
        group, within = divmod(index, p * v)
        chunk = within // p
        if backward:
            chunk = v - 1 - chunk
        return chunk, group * p + within % p

    programs = []
    for d in range(p):
        warm = min(2 * (p - 1 - d) + (v - 1) * p, total)
        acts = []
        for i in range(warm):
            chunk, mb = order(i, False)
            acts.append(Action(d + chunk * p, "F", mb))
        for i in range(total - warm):
            chunk, mb = order(warm + i, False)
            acts.append(Action(d + chunk * p, "F", mb))
            chunk, mb = order(i, True)
            acts.append(Action(d + chunk * p, "B", mb))
        for i in range(total - warm, total):
            chunk, mb = order(i, True)
            acts.append(Action(d + chunk * p, "B", mb))
        programs.append(tuple(acts))
    return Program((placement,), tuple(programs), m)


def zb_h1(p: int, m: int) -> Program:
    """ZB-H1 (Qi et al. 2023): 1F1B with the backward split, device ``d`` postponing its ``d`` first W.

    Warm-up is 1F1B's (``p - d`` forwards before the first B); after B of micro-batch ``i`` the
    device runs W of micro-batch ``i - d``, so every device holds ``p`` micro-batches at most, the
    same peak as 1F1B's first device, and the postponed W fill the tail of the pipeline.
    """
    programs = []
    for d in range(p):
        w = min(p - d, m)
        acts = [Action(d, "F", j) for j in range(w)]
        next_f = w
        for i in range(m):
            acts.append(Action(d, "I", i))
            if i - d >= 0:
                acts.append(Action(d, "W", i - d))
            if next_f < m:
                acts.append(Action(d, "F", next_f))
                next_f += 1
        acts += [Action(d, "W", j) for j in range(max(m - d, 0), m)]
        programs.append(tuple(acts))
    return Program((tuple(range(p)),), tuple(programs), m)


def zb_h2(p: int, m: int) -> Program:
    """ZB-H2 (Qi et al. 2023): up to ``2p - 1`` micro-batches in flight on every device.

    Rule, played with unit times by :func:`.listsched.list_schedule`: run a ready ``I`` first;
    else a forward while fewer than ``2p - 1`` micro-batches are in flight (forward started, ``W``
    not done); else the oldest postponed ``W``. The extra warm-up forwards fill the bubble before
    the first ``I`` and the postponed ``W`` fill the tail: with ``F = I = W`` and ``m >= 2p - 1``
    every device is busy without a gap from its first to its last action (a parallelogram).
    """
    limit = 2 * p - 1
    work = [[Action(d, kind, j) for j in range(m) for kind in ("F", "I", "W")] for d in range(p)]

    counted: dict[int, tuple[int, int]] = {}  # device -> (history entries counted, F minus W among them)

    def choose(device: int, ready: list[Action], history: list[Action]) -> Action | None:
        seen, in_flight = counted.get(device, (0, 0))
        in_flight += sum((a.kind == "F") - (a.kind == "W") for a in history[seen:])
        counted[device] = (len(history), in_flight)
        for kind in ("I", "F", "W"):
            if kind == "F" and in_flight >= limit:
                continue
            candidates = [a for a in ready if a.kind == kind]
            if candidates:
                return min(candidates, key=lambda a: a.microbatch)
        return None

    return list_schedule((tuple(range(p)),), (), m, work, choose)


def pipedream_async(p: int, n: int) -> Program:
    """PipeDream / PipeDream-2BW steady state: 1F1B with no flush over ``n`` micro-batches."""
    return Program((tuple(range(p)),), one_f_one_b(p, n), n)


def pipelined_backprop(p: int, n: int) -> Program:
    """Fine-grained Pipelined Backpropagation (Kosson et al. 2020), also PipeMare's pipeline.

    Every tick each stage runs one forward and one backward; a micro-batch enters stage ``d`` at
    tick ``j + d`` and its gradient comes back ``2 (p - 1 - d)`` ticks later, so device ``d``
    holds ``2 (p - 1 - d) + 1`` micro-batches and sees weights ``2 (p - 1 - d)`` updates newer in its
    backward than in its forward. Written as 1F1B with a warm-up of ``2 (p - 1 - d)`` forwards.
    """
    return Program((tuple(range(p)),), one_f_one_b(p, n, warmup=[2 * (p - 1 - d) for d in range(p)]), n)
