r"""Improve a stage split on the simulated step, where the exact solver's objective stops short.

The stage solver (:mod:`planner.inter_op.chain`) minimises ``(m-1)·max_s t_s + Σ_s t_s``: the
synchronous pipeline's step when every stage waits only on the slowest. A schedule as the
simulator runs it (:mod:`planner.schedules`) also waits where two stages are both close to the
slowest: 1F1B lets stage ``s`` run at most ``p - s`` forwards ahead, so a near-bottleneck after the
bottleneck stalls the stages before it, in warm-up and in the steady state. The min-max split
tends to make several stages equal to the slowest (GPT-3 1.3B, pp 4, 8 micro-batches:
7 | 6 | 7 | 6 layers, two stages at the maximum), while a split with one clear bottleneck at the
front (8 | 6 | 6 | 6) has a busiest stage 0.7% slower and a step 1.6% shorter. No objective a chain
DP can carry sees this (it depends on the stages' order and the schedule's dependencies), so the
split the solver returns is the start of a local search on the simulated step itself.

**Moves.** Shift a run of consecutive cuts ``k..j`` by one layer, either way: a single cut moves
one layer between neighbours; a run moves one layer from stage ``k`` to stage ``j + 1`` (or back)
through the stages between, which keep their sizes but shift. Short runs are tried first;
the first move that lowers the step by more than ``rel_tol`` is taken and the scan starts again
(first improvement), until no move improves or ``max_evals`` steps have been priced. Every move
keeps each stage non-empty. Deterministic: moves are tried in a fixed order, ties keep the split
already held.

The search only ever lowers the step it is given, so pruning that holds for every split (the
search's lower bounds, :mod:`planner.search`) stays valid. It is not exact: a split two moves
away behind a worse one is not found. ``tests/inter_op/test_local_search.py`` checks it against
enumerating every split of small chains.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

Boundaries = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Polished:
    """The split local search ended at, its step, the step it started from, and the steps it priced
    (0: the caller did not search, :meth:`planner.pricing.Pricer.polish`)."""

    boundaries: Boundaries
    step_s: float
    start_s: float
    evaluations: int

    @property
    def gain(self) -> float:
        """Share of the starting step saved (0 when nothing improved)."""
        if not math.isfinite(self.start_s) or self.start_s <= 0:
            return 0.0
        return 1.0 - self.step_s / self.start_s


def _cuts(boundaries: Boundaries) -> list[int]:
    return [end for _, end in boundaries[:-1]]


def _from_cuts(cuts: list[int], end: int) -> Boundaries:
    edges = [0, *cuts, end]
    return tuple((edges[i], edges[i + 1]) for i in range(len(edges) - 1))


def _moves(count: int) -> Iterator[tuple[int, int, int]]:
    """(first cut, last cut, direction) of every run of consecutive cuts, shortest runs first."""
    for length in range(1, count + 1):
        for first in range(count - length + 1):
            for direction in (1, -1):
                yield first, first + length - 1, direction


def improve_split(boundaries: Boundaries, step: Callable[[Boundaries], float], *, max_evals: int = 200,
                  rel_tol: float = 1e-6) -> Polished:
    """The split first-improvement descent reaches from ``boundaries`` (module docstring).

    ``step(split)`` is the simulated step time of a split, ``inf`` where it does not fit; a start
    that does not fit is returned unchanged.
    """
    start = step(boundaries)
    evals = 1
    if len(boundaries) < 2 or not math.isfinite(start):
        return Polished(boundaries, start, start, evals)
    end = boundaries[-1][1]
    best, best_s = boundaries, start
    improved = True
    while improved and evals < max_evals:
        improved = False
        cuts = _cuts(best)
        for first, last, direction in _moves(len(cuts)):
            moved = list(cuts)
            for k in range(first, last + 1):
                moved[k] += direction
            edges = [0, *moved, end]
            if any(edges[i + 1] <= edges[i] for i in range(first, last + 2)):
                continue  # a stage would be empty
            candidate = _from_cuts(moved, end)
            value = step(candidate)
            evals += 1
            if value < best_s * (1 - rel_tol):
                best, best_s, improved = candidate, value, True
                break
            if evals >= max_evals:
                break
    return Polished(best, best_s, start, evals)
