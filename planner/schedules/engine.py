"""Event-level execution of a :class:`~planner.schedules.actions.Program` with given stage times.

Each device runs its actions strictly in program order, one at a time. An action starts at the later
of (a) the end of the device's previous action and (b) the moment its inputs exist:

* ``F(k, j)`` needs ``F(k-1, j)`` (plus ``p2p_s`` when stage ``k-1`` lives on another device);
* ``I(k, j)`` / ``B(k, j)`` need ``F(k, j)`` and the input-gradient from ``I``/``B(k+1, j)``
  (plus ``p2p_s`` across devices); the last stage's backward needs only its own forward (the loss);
* ``W(k, j)`` needs ``I(k, j)``.

``p2p_s`` is a latency on the wire: it delays the consumer but occupies neither device (sends are
asynchronous, as with NCCL isend/irecv). Because the order per device is fixed, the result is the
longest path of a max-plus system: deterministic and monotone in every duration (a slower action never
makes the step faster), which is what makes the slowest-stage bound in :mod:`.closed_form` safe.

A program that can not run (an action waits for one that comes later on its own device, directly or
through other devices) raises ``ValueError`` with the stuck action of every device, like torch's dry run.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.schedules.actions import Program


@dataclass(frozen=True)
class Executed:
    """Start and end time of every action of a program, per device, in program order."""

    program: Program
    starts: tuple[tuple[float, ...], ...]
    ends: tuple[tuple[float, ...], ...]
    sequence: tuple[tuple[int, int], ...] = ()  # (device, index) in the order the engine resolved them

    @property
    def makespan_s(self) -> float:
        return max((e[-1] for e in self.ends if e), default=0.0)


def execute(
    program: Program,
    fwd_s: tuple[float, ...],
    bwd_input_s: tuple[float, ...],
    bwd_weight_s: tuple[float, ...],
    p2p_s: float,
) -> Executed:
    """Run ``program`` with per-stage durations (length = number of stages) and return all times.

    Sweeps the devices in turn, each running as many of its next actions as have their inputs
    (:meth:`_Run.advance`), until all have run; a sweep in which no device moves is a deadlock."""
    assert len(fwd_s) == len(bwd_input_s) == len(bwd_weight_s) == program.num_stages
    run = _Run(program, fwd_s, bwd_input_s, bwd_weight_s, p2p_s)
    remaining = sum(len(a) for a in program.actions)
    while remaining:
        progressed = False
        for device in range(len(program.actions)):
            ran = run.advance(device)
            remaining -= ran
            progressed = progressed or ran > 0
        if not progressed:
            raise ValueError(_deadlock_report(program, run.cursor))
    return Executed(
        program=program,
        starts=tuple(tuple(s) for s in run.starts),
        ends=tuple(tuple(e) for e in run.ends),
        sequence=tuple(run.sequence),
    )


class _Run:
    """The state of one execution: when each (stage, micro-batch)'s forward and input-gradient are
    done, each device's next action and free time, and the times recorded so far. Lists indexed
    ``stage * microbatches + microbatch``, so the inner loop only indexes lists."""

    def __init__(self, program: Program, fwd_s: tuple[float, ...], bwd_input_s: tuple[float, ...],
                 bwd_weight_s: tuple[float, ...], p2p_s: float) -> None:
        num_stages = program.num_stages
        n_mb = program.microbatches
        self.program, self.p2p_s, self.n_mb, self.last = program, p2p_s, n_mb, num_stages - 1
        # Device of (stage, micro-batch) as a flat list.
        replica = program.replica_of or (0,) * n_mb
        self.device_of = [program.placements[replica[j]][k] for k in range(num_stages) for j in range(n_mb)]
        fused = tuple(b + w for b, w in zip(bwd_input_s, bwd_weight_s))
        self.duration = {"F": fwd_s, "I": bwd_input_s, "W": bwd_weight_s, "B": fused}
        # Completion times; None until the action has run.
        self.fwd_end: list[float | None] = [None] * (num_stages * n_mb)
        self.grad_end: list[float | None] = [None] * (num_stages * n_mb)  # input-gradient ready (I or B done)
        self.split: list[bool] = [False] * (num_stages * n_mb)  # True when the backward ran as I (W follows)
        self.starts: list[list[float]] = [[] for _ in program.actions]
        self.ends: list[list[float]] = [[] for _ in program.actions]
        self.cursor = [0] * program.num_devices
        self.free_at = [0.0] * program.num_devices
        self.sequence: list[tuple[int, int]] = []

    def advance(self, device: int) -> int:
        """Run ``device``'s next actions, in program order, while their inputs exist; how many ran."""
        device_actions = self.program.actions[device]
        n_mb, last, p2p_s, device_of = self.n_mb, self.last, self.p2p_s, self.device_of
        fwd_end, grad_end, split, duration = self.fwd_end, self.grad_end, self.split, self.duration
        starts, ends, sequence = self.starts[device], self.ends[device], self.sequence
        i = first = self.cursor[device]
        free = self.free_at[device]
        while i < len(device_actions):
            k, kind, j = device_actions[i]
            at = k * n_mb + j
            if kind == "F":
                if k == 0:
                    ready = 0.0
                else:
                    prev = fwd_end[at - n_mb]
                    if prev is None:
                        break
                    ready = prev + p2p_s if device_of[at - n_mb] != device else prev
            elif kind == "W":
                ready = grad_end[at]
                if ready is None or not split[at]:
                    break
            else:  # I or B
                ready = fwd_end[at]
                if ready is None:
                    break
                if k != last:
                    nxt = grad_end[at + n_mb]
                    if nxt is None:
                        break
                    if device_of[at + n_mb] != device:
                        nxt += p2p_s
                    if nxt > ready:
                        ready = nxt
            start = ready if ready > free else free
            free = start + duration[kind][k]
            if kind == "F":
                fwd_end[at] = free
            elif kind != "W":
                grad_end[at] = free
                split[at] = kind == "I"
            starts.append(start)
            ends.append(free)
            sequence.append((device, i))
            i += 1
        self.cursor[device] = i
        self.free_at[device] = free
        return i - first


def _deadlock_report(program: Program, cursor: list[int]) -> str:
    stuck = []
    for device, device_actions in enumerate(program.actions):
        if cursor[device] < len(device_actions):
            stuck.append(f"d{device} step {cursor[device]} waits at {device_actions[cursor[device]]}")
        else:
            stuck.append(f"d{device} done")
    return (
        "schedule deadlocks: every unfinished device waits for an action that can not run yet; "
        + "; ".join(stuck)
    )
