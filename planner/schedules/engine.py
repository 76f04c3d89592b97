"""Event-level execution of a :class:`~planner.schedules.actions.Program` with given stage times.

Each device runs its actions strictly in program order, one at a time. An action starts at the later
of (a) the end of the device's previous action and (b) the moment its inputs exist:

* ``F(k, j)`` needs ``F(k-1, j)`` (plus ``p2p_s`` when stage ``k-1`` lives on another device);
* ``B(k, j)`` / ``BW(k, j)`` need ``F(k, j)`` and the input-gradient from ``B``/``BW(k+1, j)``
  (plus ``p2p_s`` across devices); the last stage's backward needs only its own forward (the loss);
* ``W(k, j)`` needs ``B(k, j)``.

``p2p_s`` is a latency on the wire: it delays the consumer but occupies neither device (sends are
asynchronous, as with NCCL isend/irecv). Because the order per device is fixed, the result is the
longest path of a max-plus system: deterministic and monotone in every duration (a slower action never
makes the step faster), which is what makes the slowest-stage bound in :mod:`.closed_form` safe.

A program that can not run (an action waits for one that comes later on its own device, directly or
through other devices) raises ``ValueError`` with the stuck action of every device, like torch's dry run.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.schedules.actions import Action, Program


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
    """Run ``program`` with per-stage durations (length = number of stages) and return all times."""
    num_stages = program.num_stages
    n_mb = program.microbatches
    assert len(fwd_s) == len(bwd_input_s) == len(bwd_weight_s) == num_stages
    device_of = program.device_of
    # Completion times indexed [stage * n_mb + microbatch]; None until the action has run.
    fwd_end: list[float | None] = [None] * (num_stages * n_mb)
    grad_end: list[float | None] = [None] * (num_stages * n_mb)  # input-gradient ready (B or BW done)
    kind_b: list[bool] = [False] * (num_stages * n_mb)  # True when the backward ran as split B
    starts: list[list[float]] = [[] for _ in program.actions]
    ends: list[list[float]] = [[] for _ in program.actions]
    cursor = [0] * program.num_devices
    free_at = [0.0] * program.num_devices
    remaining = sum(len(a) for a in program.actions)
    sequence: list[tuple[int, int]] = []

    def ready_time(action: Action) -> float | None:
        k, j = action.stage, action.microbatch
        own = device_of(k, j)
        if action.kind == "F":
            if k == 0:
                return 0.0
            prev = fwd_end[(k - 1) * n_mb + j]
            if prev is None:
                return None
            return prev + (p2p_s if device_of(k - 1, j) != own else 0.0)
        if action.kind == "W":
            done = grad_end[k * n_mb + j]
            if done is None or not kind_b[k * n_mb + j]:
                return None
            return done
        # B or BW
        own_fwd = fwd_end[k * n_mb + j]
        if own_fwd is None:
            return None
        if k == num_stages - 1:
            return own_fwd
        nxt = grad_end[(k + 1) * n_mb + j]
        if nxt is None:
            return None
        return max(own_fwd, nxt + (p2p_s if device_of(k + 1, j) != own else 0.0))

    durations = {"F": fwd_s, "B": bwd_input_s, "W": bwd_weight_s}
    while remaining:
        progressed = False
        for device, device_actions in enumerate(program.actions):
            while cursor[device] < len(device_actions):
                action = device_actions[cursor[device]]
                ready = ready_time(action)
                if ready is None:
                    break
                start = max(ready, free_at[device])
                k = action.stage
                if action.kind == "BW":
                    duration = bwd_input_s[k] + bwd_weight_s[k]
                else:
                    duration = durations[action.kind][k]
                end = start + duration
                index = k * n_mb + action.microbatch
                if action.kind == "F":
                    fwd_end[index] = end
                elif action.kind in ("B", "BW"):
                    grad_end[index] = end
                    kind_b[index] = action.kind == "B"
                starts[device].append(start)
                ends[device].append(end)
                free_at[device] = end
                sequence.append((device, cursor[device]))
                cursor[device] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise ValueError(_deadlock_report(program, cursor))
    return Executed(
        program=program,
        starts=tuple(tuple(s) for s in starts),
        ends=tuple(tuple(e) for e in ends),
        sequence=tuple(sequence),
    )


def _deadlock_report(program: Program, cursor: list[int]) -> str:
    stuck = []
    for device, device_actions in enumerate(program.actions):
        if cursor[device] < len(device_actions):
            stuck.append(f"d{device} step {cursor[device]} waits at {device_actions[cursor[device]]}")
        else:
            stuck.append(f"d{device} done")
    return "schedule deadlocks: every unfinished device waits for an action that can not run yet; " + "; ".join(
        stuck
    )
