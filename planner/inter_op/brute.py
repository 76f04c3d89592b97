"""The oracle: every stage count, every cut, every sub-mesh sequence, priced by ``evaluate``.

Exponential; for the tests' small instances (about 10 layers, 4 devices) only. It shares no code
with the DP or the ILP beyond :meth:`StageProblem.evaluate`, the definition of the objective.
"""

from __future__ import annotations

import itertools
import math
import time

from planner.inter_op.problem import PlanCost, StageProblem


def brute_force_stages(problem: StageProblem, *, max_assignments: int = 2_000_000
                       ) -> tuple[PlanCost, tuple[tuple[int, int, int], ...], float]:
    """(best cost, its stages, seconds); the cost is infeasible when nothing fits."""
    start = time.perf_counter()
    n = problem.num_layers
    best = PlanCost(False, math.inf, reason="no assignment fits")
    best_stages: tuple[tuple[int, int, int], ...] = ()
    count = 0
    for p in problem.stage_counts:
        sequences = [seq for seq in itertools.product(range(len(problem.submeshes)), repeat=p)
                     if not isinstance(problem.place(seq), str)]
        for cuts in itertools.combinations(range(1, n), p - 1):
            edges = (0, *cuts, n)
            for seq in sequences:
                count += 1
                if count > max_assignments:
                    raise ValueError(f"more than {max_assignments} assignments: the brute force is for tiny cases")
                stages = tuple((edges[k], edges[k + 1], seq[k]) for k in range(p))
                cost = problem.evaluate(stages)
                if cost.feasible and cost.objective_s < best.objective_s:
                    best, best_stages = cost, stages
    return best, best_stages, time.perf_counter() - start
