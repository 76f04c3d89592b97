"""DP, CP-SAT and CBC find the brute-force optimum on random small instances.

Instances (planner.inter_op.fixtures.random_instance): 2-10 layers with random costs and random
skip edges (non-chain graphs), 1-4 devices in one node group or two (A100 + V100, a mixed
cluster), random device memory (some instances fit nothing), tp 1 or 2, micro-batch 1-4,
1F1B / GPipe / ZB-H1 / ZB-H2 (the last two have p-dependent in-flight counts).
"""

from __future__ import annotations

import functools
import math

import pytest

from planner.inter_op import build_problem, solve_stages
from planner.inter_op.brute import brute_force_stages
from planner.inter_op.fixtures import random_instance

SEEDS = range(120)  # DP and CP-SAT on every one
CBC_SEEDS = range(100)  # CBC runs a process per program: a little fewer
TOL = {"dp": 1e-9, "cbc": 1e-9, "cpsat": 1e-6}  # CP-SAT solves an integer rescaling (see ilp.py)
GAP = {"dp": 0.0, "cbc": 0.0, "cpsat": 1e-5}  # CP-SAT's bound subtracts the worst rounding error


@functools.cache
def _case(seed: int):
    graph, cluster, kwargs = random_instance(seed)
    problem = build_problem(graph, cluster, **kwargs)
    cost, stages, _ = brute_force_stages(problem)
    return graph, cluster, kwargs, problem, cost, stages


@pytest.mark.parametrize("seed", SEEDS)
def test_exact_methods_match_brute_force(seed):
    graph, cluster, kwargs, problem, oracle, _ = _case(seed)
    methods = ["dp", "cpsat"] + (["cbc"] if seed in CBC_SEEDS else [])
    for method in methods:
        sol = solve_stages(graph, cluster, method=method, problem=problem, explain=False, **kwargs)
        if not oracle.feasible:
            assert sol.status == "infeasible" and not sol.feasible and sol.objective_s == math.inf, method
            continue
        tol = TOL[method]
        assert sol.status == "optimal", method
        assert sol.objective_s == pytest.approx(oracle.objective_s, rel=tol), method
        # The plan is what it claims: re-priced from scratch, within memory, every device used.
        again = problem.evaluate(sol.assignment)
        assert again.feasible and again.objective_s == pytest.approx(sol.objective_s, rel=1e-12)
        assert all(s.memory_bytes <= s.memory_limit_bytes for s in sol.stages)
        assert sorted(r for s in sol.stages for r in s.ranks) == list(range(cluster.num_devices))
        # The bound is a true lower bound and the gap says how far the plan is from it.
        assert sol.bound_s <= oracle.objective_s * (1 + 1e-12)
        assert 0.0 <= sol.gap <= GAP[method]
        assert sol.gap == pytest.approx((sol.objective_s - sol.bound_s) / sol.objective_s, abs=1e-15)


def test_instances_cover_the_hard_cases():
    """The random set must exercise what the solvers handle, or the oracle test proves little."""
    counts = {"infeasible": 0, "mixed": 0, "dag": 0, "p_dependent": 0, "pipelined": 0, "replicated": 0,
              "uneven_replicas": 0, "same_node_link": 0, "tp2": 0}
    for seed in SEEDS:
        graph, cluster, kwargs, problem, oracle, stages = _case(seed)
        counts["mixed"] += len(cluster.groups) > 1
        counts["dag"] += not graph.is_chain()
        counts["p_dependent"] += problem.flight_by_remaining is None
        counts["tp2"] += kwargs["tp"] == 2
        if not oracle.feasible:
            counts["infeasible"] += 1
            continue
        reps = [problem.submeshes[c].replicas for _, _, c in stages]
        counts["pipelined"] += len(stages) > 1
        counts["replicated"] += max(reps) > 1
        counts["uneven_replicas"] += len(set(reps)) > 1
        counts["same_node_link"] += 0 in oracle.links
    assert counts["infeasible"] >= 12
    assert counts["mixed"] >= 30
    assert counts["dag"] >= 30
    assert counts["p_dependent"] >= 30
    assert counts["pipelined"] >= 30
    assert counts["replicated"] >= 20
    assert counts["uneven_replicas"] >= 5
    assert counts["same_node_link"] >= 5
    assert counts["tp2"] >= 10
