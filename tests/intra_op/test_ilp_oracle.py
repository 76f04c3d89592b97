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

from planner.intra_op import ilp
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


# -- the CP-SAT model kept across problems that differ only in costs (the search's micro-batches) -----

def _fresh_proto(problem: Problem) -> str:
    """The CP-SAT proto a from-scratch build of ``problem`` gives, objective included."""
    builder = ilp._CpSat(problem)
    ilp.add_constraints(builder)
    builder.set_objective()
    return str(builder.model.proto)


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(), data=st.data())
def test_reused_cpsat_model_is_the_fresh_model_and_optimal(problem, data):
    """New costs and edge seconds scaled by k > 0 keep every edge's row and column classes, so the
    model of ``problem`` is reused: its proto must be byte for byte the fresh build's, and the
    solve must still be the brute-force optimum."""
    first = ilp._cpsat_model(problem)
    k = data.draw(st.integers(2, 7))
    cost = [[data.draw(st.integers(0, 100)) for _ in c] for c in problem.cost]
    again = Problem(group_names=problem.group_names, cost=cost, memory=problem.memory,
                    edges={e: m * k for e, m in problem.edges.items()}, memory_limit=problem.memory_limit,
                    pins=problem.pins, ties=problem.ties)
    reused = ilp._cpsat_model(again)
    assert reused is first
    reused.set_objective()
    assert str(reused.model.proto) == _fresh_proto(again)
    best, _ = brute_force(again)
    result = solve_problem(again, backend="cpsat", time_limit_s=20)
    if best is None:
        assert result.status == "infeasible"
    else:
        assert result.status == "optimal" and result.objective == best
        assert again.evaluate(result.choice) == best


def test_cpsat_model_is_rebuilt_when_an_edge_changes_classes():
    """Rows that were equal and now differ make more ``y`` variables: another model, not the old one."""
    mat = np.array([[4, 1], [4, 1], [0, 2]], dtype=np.int64)
    problem = Problem(group_names=["a", "b"], cost=[[5, 1, 3], [2, 2]], memory=[[0] * 3, [0] * 2],
                      edges={(0, 1): mat})
    first = ilp._cpsat_model(problem)
    changed = Problem(group_names=["a", "b"], cost=problem.cost, memory=problem.memory,
                      edges={(0, 1): mat + np.array([[0, 0], [1, 0], [0, 0]])})
    second = ilp._cpsat_model(changed)
    assert second is not first
    assert first.y[(0, 1)][1].shape == (2, 2) and second.y[(0, 1)][1].shape == (3, 2)
    second.set_objective()
    assert str(second.model.proto) == _fresh_proto(changed)
    best, _ = brute_force(changed)
    assert solve_problem(changed, backend="cpsat").objective == best == 4  # a runs 1 (1), b runs 1 (2), edge 1
