"""Entry points: ``solve_stages`` (exact stages for one configuration) and ``baselines``.

    from planner.inter_op import solve_stages, baselines
    sol = solve_stages(graph, cluster, schedule="1f1b", num_micro_batches=32, micro_batch=8, tp=8)
    sol.status, sol.objective_s, sol.bound_s, sol.gap, sol.stages[0].ranks
    base = baselines(graph, cluster, schedule="1f1b", num_micro_batches=32, micro_batch=8, tp=8)
    {name: b.objective_s for name, b in base.items()}

``method``: ``"dp"`` (default; fastest, any size), ``"cpsat"`` or ``"cbc"`` (the integer program
of :mod:`planner.inter_op.ilp`, for moderate sizes and as the DP's cross-check). All three
minimise the same objective over the same plans (:mod:`planner.inter_op.problem`) and agree
with the brute force on small instances (tests/inter_op). Pass ``problem=`` to reuse the priced
tables across calls with the same arguments.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

from planner.cluster import ClusterSpec
from planner.cost.constants import CostConstants
from planner.errors import SpecError
from planner.inter_op.baselines import BASELINES, best_baseline
from planner.inter_op.dp import solve_dp
from planner.inter_op.ilp import BACKENDS, StageILP, explain_infeasible, solve_cbc, solve_cpsat
from planner.inter_op.problem import StageProblem, build_problem
from planner.inter_op.solution import StageSolution, make_solution
from planner.trace.graph import CostGraph

METHODS = ("dp",) + BACKENDS
_EXPLAIN_MAX_LAYERS = 40


def _problem(graph: CostGraph, cluster: ClusterSpec, problem: StageProblem | None, **kw) -> StageProblem:
    return problem if problem is not None else build_problem(graph, cluster, **kw)


def solve_stages(graph: CostGraph, cluster: ClusterSpec, *, schedule: str = "1f1b", num_micro_batches: int,
                 micro_batch: int, tp: int = 1, num_stages: int | None = None, method: str = "dp",
                 time_limit_s: float | None = None, sequence_parallel: bool = False, recompute: str = "none",
                 zero_stage: int = 0, stage_devices: int | None = None, constants: CostConstants | None = None,
                 num_workers: int = 1, explain: bool = True, problem: StageProblem | None = None) -> StageSolution:
    """Stages, sub-meshes and replication minimising the predicted step time (exact; see module docs).

    An infeasible result names a minimal set of conflicting constraints in ``notes`` (``explain``).
    ``num_stages=None`` lets the solver choose the stage count; ``stage_devices`` fixes every
    stage's sub-mesh size (``None``: each stage picks a slice or whole nodes). ``time_limit_s`` returns the best
    plan found so far with its bound and gap (status ``feasible``), or ``time_limit`` if none.
    """
    if method not in METHODS:
        raise SpecError("method", method, f"use one of {list(METHODS)}")
    if time_limit_s is not None and not time_limit_s > 0:
        raise SpecError("time_limit_s", time_limit_s, "expected seconds > 0, or None for no limit")
    start = time.perf_counter()
    pr = _problem(graph, cluster, problem, schedule=schedule, num_micro_batches=num_micro_batches,
                  micro_batch=micro_batch, tp=tp, num_stages=num_stages, sequence_parallel=sequence_parallel,
                  recompute=recompute, zero_stage=zero_stage, stage_devices=stage_devices, constants=constants)
    remaining = None if time_limit_s is None else max(1e-3, time_limit_s - (time.perf_counter() - start))
    if method == "dp":
        res = solve_dp(pr, time_limit_s=remaining)
        sol = make_solution(pr, method="dp", status=res.status, stages=res.stages,
                            cost=res.cost if res.cost.feasible else None, bound_s=res.bound_s,
                            solve_time_s=time.perf_counter() - start,
                            notes=(f"{res.evaluations} DP evaluations of the bottleneck bounds",))
    else:
        sol = _solve_ilp(pr, method, remaining, num_workers, start)
    if sol.status == "infeasible" and explain:
        sol = replace(sol, notes=sol.notes + (_explain(pr),))
    return sol


def _explain(pr: StageProblem) -> str:
    if pr.stage_groups is not None:
        return "no explanation: the integer program behind it does not model fixed stage_groups"
    if pr.num_layers > _EXPLAIN_MAX_LAYERS:
        return (f"no explanation: more than {_EXPLAIN_MAX_LAYERS} layers (run planner.inter_op.ilp.explain_infeasible "
                "on a smaller model)")
    conflict = explain_infeasible(pr)
    if conflict and conflict[0].startswith("structure"):
        return conflict[0]
    return ("conflicting constraints: " + ", ".join(conflict) + " (memory[s] is the stage s-th from the end; relax "
            "with more devices, a smaller micro-batch, recomputation or ZeRO-1)")


def _solve_ilp(pr: StageProblem, method: str, time_limit_s: float | None, num_workers: int,
               start: float) -> StageSolution:
    """One program when the in-flight count depends on p - k only; else one per stage count."""
    if pr.stage_groups is not None:
        raise SpecError("method", method, "a problem with fixed stage_groups is solved by method='dp' only")
    runs = [None] if pr.flight_by_remaining is not None else list(pr.stage_counts)
    best_cost, best_stages, statuses, bounds, sizes = None, (), [], [], []
    for n_done, p in enumerate(runs):
        limit = None
        if time_limit_s is not None:
            left = time_limit_s - (time.perf_counter() - start)
            limit = max(1e-3, left / (len(runs) - n_done))
        ilp = StageILP(pr, p=p)
        out = solve_cpsat(ilp, time_limit_s=limit, num_workers=num_workers) if method == "cpsat" else \
            solve_cbc(ilp, time_limit_s=limit, num_workers=num_workers)
        statuses.append(out.status)
        sizes.append((out.num_variables, out.num_constraints))
        if out.stages:
            cost = pr.evaluate(out.stages)
            assert cost.feasible, (method, cost.reason, out.stages)
            if best_cost is None or cost.objective_s < best_cost.objective_s:
                best_cost, best_stages = cost, out.stages
            bounds.append(cost.objective_s if out.status == "optimal" and out.bound_s is None else
                          (out.bound_s if out.bound_s is not None else 0.0))
        elif out.status in ("time_limit", "unknown"):
            bounds.append(out.bound_s if out.bound_s is not None else 0.0)
    if best_cost is None:
        status = "infeasible" if all(s == "infeasible" for s in statuses) else "time_limit"
        return make_solution(pr, method=method, status=status, stages=(), cost=None,
                             bound_s=math.inf if status == "infeasible" else min(bounds, default=0.0),
                             solve_time_s=time.perf_counter() - start)
    exact = all(s in ("optimal", "infeasible") for s in statuses)
    bound = best_cost.objective_s if exact and method == "cbc" else min(bounds + [best_cost.objective_s])
    nv = sum(v for v, _ in sizes)
    nc = sum(c for _, c in sizes)
    return make_solution(pr, method=method, status="optimal" if exact else "feasible", stages=best_stages,
                         cost=best_cost, bound_s=bound, solve_time_s=time.perf_counter() - start,
                         notes=(f"{len(runs)} program(s), {nv} variables, {nc} named constraints",))


def baselines(graph: CostGraph, cluster: ClusterSpec, *, schedule: str = "1f1b", num_micro_batches: int,
              micro_batch: int, tp: int = 1, num_stages: int | None = None, sequence_parallel: bool = False,
              recompute: str = "none", zero_stage: int = 0, stage_devices: int | None = None,
              constants: CostConstants | None = None, methods: tuple[str, ...] = BASELINES,
              problem: StageProblem | None = None
              ) -> dict[str, StageSolution]:
    """``{uniform, parameters, time}`` -> the baseline's best plan over stage counts, priced like the solver's.

    Baselines make no optimality claim: ``status`` is ``feasible`` (or ``infeasible`` when no
    stage count fits), ``bound_s`` is NaN and ``gap`` None.
    """
    pr = _problem(graph, cluster, problem, schedule=schedule, num_micro_batches=num_micro_batches,
                  micro_batch=micro_batch, tp=tp, num_stages=num_stages, sequence_parallel=sequence_parallel,
                  recompute=recompute, zero_stage=zero_stage, stage_devices=stage_devices, constants=constants)
    out = {}
    for name in methods:
        start = time.perf_counter()
        cost, stages = best_baseline(name, graph, pr)
        sol = make_solution(pr, method=f"baseline:{name}", status="feasible" if stages else "infeasible",
                            stages=stages, cost=cost if stages else None, bound_s=math.nan,
                            solve_time_s=time.perf_counter() - start,
                            notes=() if stages else (f"no equal split into an allowed stage count fits ({cost.reason})",))
        if sol.feasible:
            sol = _without_bound(sol)
        out[name] = sol
    return out


def _without_bound(sol: StageSolution) -> StageSolution:
    return replace(sol, bound_s=math.nan, gap=None)
