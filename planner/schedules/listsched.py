"""Derive a fixed action order by list scheduling with unit times.

Some methods are described by a rule ("run a backward as soon as one is ready, else a forward if the
memory budget allows, else a postponed weight-gradient") rather than by a closed list. We turn such
a rule into data once: play the rule on an idealised machine where every F, B and W lasts one unit
and p2p is free, and record the order each device ended up with. The order is then fixed and the
engine times it with the real durations, as a runtime would replay it.

The derived order is deadlock-free for any durations: it was executed once, so the graph of
"device order" plus "data dependency" edges is acyclic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from planner.schedules.actions import Action, Program

# choose(device, ready_actions, device_history) -> the action to run now, or None to stay idle.
Chooser = Callable[[int, list[Action], list[Action]], Action | None]

UNIT_TIME = {"F": 1, "I": 1, "W": 1, "B": 2}


def list_schedule(
    placements: tuple[tuple[int, ...], ...],
    replica_of: tuple[int, ...],
    microbatches: int,
    work: Sequence[Sequence[Action]],
    choose: Chooser,
    unit_time: dict[str, int] | None = None,
) -> Program:
    """Play ``choose`` on every device until all of ``work[d]`` has run; return the recorded order."""
    durations = unit_time or UNIT_TIME
    num_stages = len(placements[0])
    pending = [set(w) for w in work]
    order: list[list[Action]] = [[] for _ in work]
    free_at = [0] * len(work)
    fwd_end: dict[tuple[int, int], int] = {}
    grad_end: dict[tuple[int, int], int] = {}
    # Only an action whose dependency has been scheduled can be ready: each device scans those alone
    # (the same ready set as scanning all its pending actions, far fewer checks on long pipelines).
    waiting = _Waiting(work)
    time = 0
    while any(pending):
        ran = False
        for device, todo in enumerate(pending):
            if not todo or free_at[device] > time:
                continue
            ready = [a for a in waiting.of(device) if _ready_at(a, num_stages, fwd_end, grad_end, time)]
            action = choose(device, sorted(ready), order[device]) if ready else None
            if action is None:
                continue
            assert action in todo, f"chooser returned {action}, which is not pending on device {device}"
            todo.discard(action)
            waiting.ran(device, action, num_stages)
            order[device].append(action)
            end = time + durations[action.kind]
            key = (action.stage, action.microbatch)
            if action.kind == "F":
                fwd_end[key] = end
            elif action.kind in ("I", "B"):
                grad_end[key] = end
            free_at[device] = end
            ran = True
        if not ran:
            upcoming = [t for t in (*free_at, *fwd_end.values(), *grad_end.values()) if t > time]
            if not upcoming:
                raise AssertionError(
                    f"list schedule stalled at t={time}: the rule never picks a ready action"
                )
            time = min(upcoming)
    return Program(placements, tuple(tuple(o) for o in order), microbatches, replica_of)


class _Waiting:
    """Per device, the pending actions whose dependency has been scheduled: a forward of stage 0 at
    once, a forward after the previous stage's forward, a backward after the next stage's backward
    (the last stage's after its own forward), a weight gradient after its own backward."""

    def __init__(self, work: Sequence[Sequence[Action]]) -> None:
        self._where: dict[tuple[str, int, int], list[tuple[int, Action]]] = {}
        self._sets: list[set[Action]] = [set() for _ in work]
        for device, actions in enumerate(work):
            for a in actions:
                self._where.setdefault((a.kind, a.stage, a.microbatch), []).append((device, a))
                if a.kind == "F" and a.stage == 0:
                    self._sets[device].add(a)

    def of(self, device: int) -> set[Action]:
        return self._sets[device]

    def ran(self, device: int, action: Action, num_stages: int) -> None:
        """``action`` left ``device``'s pending work: wake what depended on it."""
        self._sets[device].discard(action)
        k, j = action.stage, action.microbatch
        if action.kind == "F":
            woken = [("F", k + 1, j)] if k + 1 < num_stages else [("I", k, j), ("B", k, j)]
        elif action.kind in ("I", "B"):
            woken = [("W", k, j)] + ([("I", k - 1, j), ("B", k - 1, j)] if k > 0 else [])
        else:
            woken = []
        for key in woken:
            for d, a in self._where.get(key, ()):
                self._sets[d].add(a)


def _ready_at(
    action: Action,
    num_stages: int,
    fwd_end: dict[tuple[int, int], int],
    grad_end: dict[tuple[int, int], int],
    time: int,
) -> bool:
    k, j = action.stage, action.microbatch
    if action.kind == "F":
        done = 0 if k == 0 else fwd_end.get((k - 1, j))
    elif action.kind == "W":
        done = grad_end.get((k, j))
    elif k == num_stages - 1:
        done = fwd_end.get((k, j))
    else:
        done = grad_end.get((k + 1, j)) if (k, j) in fwd_end else None
    return done is not None and done <= time
