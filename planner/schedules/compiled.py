"""A program flattened once into arrays, so its step time can be re-timed fast with new durations.

:func:`estimate` uses this where no closed form applies and the program is small: the graph (device
order + data dependencies) is fixed for a ``(schedule, p, m, v)``, so we keep it in topological order
and a new set of stage times costs one pass over plain Python lists, with no object allocation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from functools import lru_cache

from planner.schedules.actions import Action, Program
from planner.schedules.engine import execute
from planner.schedules.registry import build_program

_KIND = {"F": 0, "I": 1, "W": 2, "B": 3}


@dataclass(frozen=True)
class CompiledProgram:
    """Nodes in topological order: kind code, stage, device predecessor, data predecessor, cross flag."""

    kinds: tuple[int, ...]
    stages: tuple[int, ...]
    device_prev: tuple[int, ...]
    data_prev: tuple[int, ...]
    crosses: tuple[bool, ...]
    num_stages: int = 0

    @property
    def size(self) -> int:
        return len(self.kinds)

    @functools.cached_property
    def nodes(self) -> tuple[tuple[int, int, int, bool], ...]:
        """Per node: its duration's index in :func:`makespan`'s flat list (kind · stages + stage), its
        device and data predecessors (-1: none, which reads the list's trailing 0) and cross flag."""
        count = self.num_stages or (max(self.stages) + 1 if self.stages else 0)
        return tuple(zip([k * count + s for k, s in zip(self.kinds, self.stages)], self.device_prev, self.data_prev,
                         self.crosses))


def compile_program(program: Program) -> CompiledProgram:
    """Flatten ``program``; the order comes from one engine run (any durations give a valid order)."""
    ones = (1.0,) * program.num_stages
    run = execute(program, ones, ones, ones, 0.0)
    index: dict[tuple[int, int], int] = {pos: i for i, pos in enumerate(run.sequence)}
    node_of: dict[tuple[str, int, int], int] = {}
    for i, (device, k) in enumerate(run.sequence):
        a = program.actions[device][k]
        key = "G" if a.kind in ("I", "B") else a.kind  # G: input gradient ready
        node_of[(key, a.stage, a.microbatch)] = i
    last = program.num_stages - 1
    kinds, stages, device_prev, data_prev, crosses = [], [], [], [], []
    for device, k in run.sequence:
        a: Action = program.actions[device][k]
        kinds.append(_KIND[a.kind])
        stages.append(a.stage)
        device_prev.append(index[(device, k - 1)] if k > 0 else -1)
        src: tuple[str, int, int] | None
        if a.kind == "F":
            src = ("F", a.stage - 1, a.microbatch) if a.stage > 0 else None
        elif a.kind == "W":
            src = ("G", a.stage, a.microbatch)
        else:
            src = ("F", a.stage, a.microbatch) if a.stage == last else ("G", a.stage + 1, a.microbatch)
        data_prev.append(node_of[src] if src else -1)
        crosses.append(bool(src) and program.device_of(src[1], a.microbatch) != device)
    return CompiledProgram(tuple(kinds), tuple(stages), tuple(device_prev), tuple(data_prev), tuple(crosses),
                           program.num_stages)


@lru_cache(maxsize=512)
def compiled(name: str, p: int, m: int, v: int) -> CompiledProgram:
    """The compiled program of a synchronous schedule, cached per ``(name, p, m, v)``."""
    return compile_program(build_program(name, p, m, v))


def makespan(
    prog: CompiledProgram,
    fwd: tuple[float, ...],
    bwd_in: tuple[float, ...],
    bwd_w: tuple[float, ...],
    p2p: float,
) -> float:
    """Step time of the compiled program with these per-stage durations (exact, same as the engine)."""
    durations = [*fwd, *bwd_in, *bwd_w, *(b + w for b, w in zip(bwd_in, bwd_w))]
    ends = [0.0] * (prog.size + 1)  # the trailing 0 is what a missing predecessor (-1) reads
    for i, (duration, dp, sp, cross) in enumerate(prog.nodes):
        start = ends[dp]
        ready = ends[sp] + p2p if cross else ends[sp]
        ends[i] = (start if start >= ready else ready) + durations[duration]
    return max(ends)
