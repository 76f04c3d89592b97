"""The oracle of the stage solver: every way to cut ``n`` layers into ``p`` non-empty contiguous stages.

Exponential; for the tests' small chains only. It shares nothing with the solver but
:class:`~planner.inter_op.chain.StageCosts` (the data) and :meth:`StageCosts.objective_s` (the
definition of the objective).
"""

from __future__ import annotations

import itertools
import math

from planner.inter_op.chain import Partition, StageCosts


def brute_force(costs: StageCosts, p: int) -> tuple[Partition, float]:
    """(the best partition, its objective); status "infeasible" and ``inf`` when nothing fits."""
    n = costs.num_layers
    best, best_value = Partition((), math.inf, "infeasible"), math.inf
    for cuts in itertools.combinations(range(1, n), p - 1):
        edges = (0, *cuts, n)
        segs = tuple((edges[k], edges[k + 1]) for k in range(p))
        if costs.memory is not None and any(costs.memory(i, j, k) > costs.stage_limit(k)
                                            for k, (i, j) in enumerate(segs)):
            continue
        value = costs.objective_s(segs)
        if value < best_value - 1e-12 * abs(best_value if math.isfinite(best_value) else 0.0):
            worst = max(costs.stage_time(k, i, j) for k, (i, j) in enumerate(segs))
            best, best_value = Partition(segs, worst, "optimal"), value
    return best, best_value


def min_max_brute_force(costs: StageCosts, p: int) -> float:
    """The least slowest-stage time over every feasible partition (``inf`` when nothing fits)."""
    n, best = costs.num_layers, math.inf
    for cuts in itertools.combinations(range(1, n), p - 1):
        edges = (0, *cuts, n)
        segs = [(edges[k], edges[k + 1]) for k in range(p)]
        if costs.memory is not None and any(costs.memory(i, j, k) > costs.stage_limit(k)
                                            for k, (i, j) in enumerate(segs)):
            continue
        best = min(best, max(costs.stage_time(k, i, j) for k, (i, j) in enumerate(segs)))
    return best
