"""The ILP against brute-force enumeration on random small problems, both backends.

Random problems: up to 8 groups with up to 3 strategies, random integer costs, random edges
(resharding matrices), random memory limits (some infeasible), random pins and ties.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planner.intra_op.ilp import Pin, Problem, Tie, compress, explain_infeasible, solve_problem


def brute_force(problem: Problem) -> tuple[int | None, tuple[int, ...] | None]:
    best, arg = None, None
    for choice in itertools.product(*[range(len(c)) for c in problem.cost]):
        if problem.feasible(choice):
            value = problem.evaluate(choice)
            if best is None or value < best:
                best, arg = value, choice
    return best, arg


@st.composite
def problems(draw) -> Problem:
    n = draw(st.integers(1, 8))
    sizes = [draw(st.integers(1, 3)) for _ in range(n)]
    cost = [[draw(st.integers(0, 100)) for _ in range(k)] for k in sizes]
    memory = [[draw(st.integers(0, 50)) for _ in range(k)] for k in sizes]
    edges = {}
    for g in range(n):
        for h in range(g + 1, n):
            if draw(st.booleans()):
                edges[(g, h)] = np.array([[draw(st.integers(0, 60)) for _ in range(sizes[h])] for _ in range(sizes[g])],
                                         dtype=np.int64)
    lo, hi = sum(min(m) for m in memory), sum(max(m) for m in memory)
    limit = draw(st.one_of(st.none(), st.integers(max(lo - 5, 0), hi)))
    pins = []
    for g in range(n):
        if sizes[g] > 1 and draw(st.integers(0, 4)) == 0:
            allowed = frozenset(s for s in range(sizes[g]) if draw(st.booleans())) or frozenset({0})
            pins.append(Pin(name=f"pin[{g}]", group=g, allowed=allowed))
    ties = []
    if n >= 2 and draw(st.booleans()):
        g, h = 0, n - 1
        compatible = tuple(frozenset(t for t in range(sizes[h]) if draw(st.booleans())) for _ in range(sizes[g]))
        ties.append(Tie(name="tied[w]", g=g, h=h, compatible=compatible))
    return Problem(group_names=[f"g{i}" for i in range(n)], cost=cost, memory=memory, edges=edges,
                   memory_limit=limit, pins=pins, ties=ties)


@pytest.mark.parametrize("backend", ["cpsat", "cbc"])
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems())
def test_ilp_equals_brute_force(backend, problem):
    best, _ = brute_force(problem)
    result = solve_problem(problem, backend=backend, time_limit_s=20)
    if best is None:
        assert result.status == "infeasible"
        assert result.choice == ()
        return
    assert result.status == "optimal"
    assert result.objective == best
    assert result.bound == best and result.gap == 0.0
    assert problem.feasible(result.choice)
    assert problem.evaluate(result.choice) == best


def test_compress_merges_equal_rows_and_columns():
    mat = np.array([[3, 1, 3], [0, 0, 0], [3, 1, 3], [5, 5, 5]])
    rows, cols, small = compress(mat)
    assert rows.tolist() == [0, 1, 0, 2] and cols.tolist() == [0, 1, 0]
    assert (small[rows][:, cols] == mat).all()


def _conflicting() -> Problem:
    # group 0 must take its heavy strategy (pin), which breaks the memory limit only with group 1's pin
    return Problem(group_names=["a", "b", "c"], cost=[[0, 5], [0, 5], [1, 1]], memory=[[10, 1], [10, 1], [1, 1]],
                   memory_limit=12, pins=[Pin(name="pin[a]", group=0, allowed=frozenset({0})),
                                          Pin(name="pin[b]", group=1, allowed=frozenset({0})),
                                          Pin(name="pin[c]", group=2, allowed=frozenset({1}))])


@pytest.mark.parametrize("backend", ["cpsat", "cbc"])
def test_infeasible_names_a_minimal_conflict(backend):
    problem = _conflicting()
    assert solve_problem(problem, backend=backend).status == "infeasible"
    assert explain_infeasible(problem, backend=backend) == ["memory_limit", "pin[a]", "pin[b]"]


def test_tie_conflicting_with_a_pin_is_named():
    problem = Problem(group_names=["owner", "user"], cost=[[0, 0], [0, 0]], memory=[[0, 0], [0, 0]],
                      pins=[Pin(name="pin[user]", group=1, allowed=frozenset({1})),
                            Pin(name="pin[owner]", group=0, allowed=frozenset({0}))],
                      ties=[Tie(name="tied[w]", g=0, h=1, compatible=(frozenset({0}), frozenset({1})))])
    assert explain_infeasible(problem) == ["pin[user]", "pin[owner]", "tied[w]"]
