r"""The integer program that picks one sharding strategy per op group.

Sets: groups :math:`g \in G` (a decision op with the followers merged into it, or a graph
input), their strategies :math:`s \in S_g`; edges :math:`(g, h) \in E` along which a tensor
flows from a member of :math:`g` to the head of :math:`h`.

Data (integers, see :class:`Problem`): :math:`c_{gs}` the group's compute + in-group
communication time, :math:`m_{gs}` its memory per device, :math:`R^{gh}_{st}` the resharding
time (forward and backward) when :math:`g` runs :math:`s` and :math:`h` runs :math:`t`,
:math:`M` the memory per device.

Variables: :math:`x_{gs} \in \{0,1\}` (group :math:`g` runs :math:`s`) and
:math:`y^{gh}_{st} \in \{0,1\}` (both choices at once).

.. math::

    \min \; \sum_{g}\sum_{s} c_{gs} x_{gs} + \sum_{(g,h)\in E}\sum_{s,t} R^{gh}_{st} y^{gh}_{st}

    \text{one\_strategy}[g]:\quad \sum_s x_{gs} = 1

    \text{edge\_out}[g{\to}h, s]:\quad \sum_t y^{gh}_{st} = x_{gs}
    \qquad \text{edge\_in}[g{\to}h, t]:\quad \sum_s y^{gh}_{st} = x_{ht}

    \text{memory\_limit}:\quad \sum_g \sum_s m_{gs} x_{gs} \le M

    \text{pin}[k]:\quad \sum_{s \notin A_k} x_{g_k s} = 0

    \text{tied}[p, s]:\quad x_{gs} \le \sum_{t \in T_p(s)} x_{ht}

The two edge families are the transportation form of :math:`y = x_g x_h^\top` (Alpa,
autoparallel): with binary :math:`x` they force :math:`y` to the single 1 at :math:`(s, t)`, and
their LP relaxation is tight, so CBC may keep :math:`y` continuous. Strategies whose rows (or
columns) of :math:`R^{gh}` are equal (they hand over the tensor in the same layout) are merged
into one class before the :math:`y` are made: :math:`\sum_t y_{ct} = \sum_{s \in c} x_{gs}`;
this is the same polytope, with far fewer variables. ``pin`` restricts a group
to the strategies a user's pin allows; ``tied`` keeps a parameter shared by two groups (tied
embeddings) in one layout.

Each family is added by one named method and every constraint has a name; when the program is
infeasible, :func:`explain_infeasible` runs a deletion filter over the relaxable ones (memory,
pins, ties) and returns a minimal conflicting set by name.

Two backends solve the same integer data: OR-Tools CP-SAT and PuLP/CBC. They reach the same
optimal objective (ties between equal-cost solutions may be broken differently).
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from planner.cbc import run_cbc

BACKENDS = ("cpsat", "cbc")


@dataclass(frozen=True, kw_only=True)
class Pin:
    """Group ``group`` may only run the strategies in ``allowed``."""

    name: str
    group: int
    allowed: frozenset[int]


@dataclass(frozen=True, kw_only=True)
class Tie:
    """Groups ``g`` and ``h`` must agree: ``compatible[s]`` lists the ``t`` that go with ``s``."""

    name: str
    g: int
    h: int
    compatible: tuple[frozenset[int], ...]


@dataclass(kw_only=True)
class Problem:
    """The ILP's data, all integers: ``cost[g][s]``, ``memory[g][s]``, ``edges[(g, h)][s][t]``."""

    group_names: list[str]
    cost: list[list[int]]
    memory: list[list[int]]
    edges: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    memory_limit: int | None = None
    pins: list[Pin] = field(default_factory=list)
    ties: list[Tie] = field(default_factory=list)

    def __post_init__(self) -> None:
        assert len(self.cost) == len(self.memory) == len(self.group_names)
        for (g, h), mat in self.edges.items():
            assert g != h and mat.shape == (len(self.cost[g]), len(self.cost[h])), (g, h, mat.shape)

    @property
    def num_groups(self) -> int:
        return len(self.cost)

    def evaluate(self, choice: Sequence[int]) -> int:
        """Objective of a full assignment (used by tests and to double-check solvers)."""
        total = sum(self.cost[g][s] for g, s in enumerate(choice))
        return total + sum(int(mat[choice[g], choice[h]]) for (g, h), mat in self.edges.items())

    def feasible(self, choice: Sequence[int]) -> bool:
        if self.memory_limit is not None and sum(self.memory[g][s] for g, s in enumerate(choice)) > self.memory_limit:
            return False
        if any(choice[p.group] not in p.allowed for p in self.pins):
            return False
        return all(choice[t.h] in t.compatible[choice[t.g]] for t in self.ties)

    def relaxable(self) -> list[str]:
        """Names of the constraints a user can relax: memory, pins, ties."""
        names = ["memory_limit"] if self.memory_limit is not None else []
        return names + [p.name for p in self.pins] + [t.name for t in self.ties]

    def without(self, names: set[str]) -> Problem:
        return Problem(group_names=self.group_names, cost=self.cost, memory=self.memory, edges=self.edges,
                       memory_limit=None if "memory_limit" in names else self.memory_limit,
                       pins=[p for p in self.pins if p.name not in names],
                       ties=[t for t in self.ties if t.name not in names])


@dataclass(frozen=True, kw_only=True)
class IlpResult:
    """What a backend reports. ``choice`` is empty unless a solution was found."""

    backend: str
    status: str  # optimal | feasible | infeasible | unknown
    objective: float | None
    bound: float | None
    gap: float | None
    solve_time_s: float
    choice: tuple[int, ...]
    num_variables: int
    num_constraints: int
    note: str = ""  # set when the other backend had to take over (see solve_problem)


def solve_problem(problem: Problem, *, backend: str = "cpsat", time_limit_s: float = 30.0,
                  num_workers: int = 1, fallback: bool = True) -> IlpResult:
    """Solve with ``backend`` (``"cpsat"`` or ``"cbc"``); one worker keeps CP-SAT deterministic.

    Solver trouble (backend not installed or crashing, no solution within the time limit) falls
    back to the other backend when ``fallback``; the result's ``note`` says what happened. A
    proven infeasibility is final (both backends solve the same model).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: got {backend!r}; use one of {list(BACKENDS)}")
    first, trouble = _try_backend(problem, backend, time_limit_s, num_workers)
    if not fallback or first is not None and first.status != "unknown":
        if first is None:
            raise RuntimeError(f"intra-op ILP: backend {backend} failed: {trouble}")
        return first
    other = "cbc" if backend == "cpsat" else "cpsat"
    second, trouble2 = _try_backend(problem, other, time_limit_s, num_workers)
    why = trouble or f"no solution within {time_limit_s:g} s"
    if second is None:
        raise RuntimeError(f"intra-op ILP: both backends failed ({backend}: {why}; {other}: {trouble2})")
    return replace(second, note=f"{backend} failed ({why}); solved with {other}")


def _try_backend(problem: Problem, backend: str, time_limit_s: float,
                 num_workers: int) -> tuple[IlpResult | None, str]:
    try:
        return _solve_with(problem, backend, time_limit_s, num_workers), ""
    except Exception as exc:  # solver missing (ImportError), crashed or numerically confused
        return None, f"{type(exc).__name__}: {exc}"


def _solve_with(problem: Problem, backend: str, time_limit_s: float, num_workers: int) -> IlpResult:
    if backend == "cpsat":
        builder = _cpsat_model(problem)
    else:
        builder = _Cbc(problem)
        add_constraints(builder)
    builder.set_objective()
    return builder.solve(time_limit_s=time_limit_s, num_workers=num_workers)


_CPSAT_MODELS: OrderedDict[tuple, _CpSat] = OrderedDict()
_CPSAT_MODELS_KEPT = 32  # one per (graph, tp group, sequence parallel) the search prices, with room to spare


def add_constraints(builder: _CpSat | _Cbc, classes: Sequence | None = None) -> None:
    """Every constraint family of the module docstring, each by its named method, in one order (so
    two builds of one problem give the same model); ``classes``: precomputed :func:`compress` of
    the edges (CP-SAT only)."""
    builder.add_one_strategy()
    if classes is None:
        builder.add_edges()
    else:
        builder.add_edges(classes)
    builder.add_memory_limit()
    builder.add_pins()
    builder.add_ties()


def _cpsat_model(problem: Problem) -> _CpSat:
    """A CP-SAT model with every constraint of ``problem`` and no objective yet.

    The joint search solves the same graph on the same tp group for many micro-batches: only the
    costs change, and with them the objective. The variables and constraints depend on the groups'
    strategy counts, each edge's row and column classes (:func:`compress`), the memory data, pins
    and ties; when all of those equal an earlier problem's, its model is reused and only the
    objective is set again (``minimize`` clears the old one). The model is then the very same
    CP-SAT proto a fresh build gives (same variables, constraints and order), so the solve, its
    choice and its statistics are too; ``tests/intra_op/test_ilp_oracle.py`` checks that.
    """
    classes = [compress(mat) for mat in problem.edges.values()]
    key = (tuple(problem.group_names), tuple(map(len, problem.cost)),
           tuple((g, h, row_of.tobytes(), col_of.tobytes(), small.shape)
                 for (g, h), (row_of, col_of, small) in zip(problem.edges, classes)),
           None if problem.memory_limit is None else (problem.memory_limit, tuple(map(tuple, problem.memory))),
           tuple(problem.pins), tuple(problem.ties))
    builder = _CPSAT_MODELS.get(key)
    if builder is None:
        builder = _CpSat(problem)
        add_constraints(builder, classes)
        _CPSAT_MODELS[key] = builder
        while len(_CPSAT_MODELS) > _CPSAT_MODELS_KEPT:
            _CPSAT_MODELS.popitem(last=False)
    else:
        _CPSAT_MODELS.move_to_end(key)
        builder.p = problem
        for (y, _), edge, (_, _, small) in zip(list(builder.y.values()), problem.edges, classes):
            builder.y[edge] = (y, small)  # same classes, new costs
    return builder


def explain_infeasible(problem: Problem, *, backend: str = "cpsat", time_limit_s: float = 10.0) -> list[str]:
    """A minimal set of relaxable constraint names that together admit no solution (deletion filter)."""
    kept = problem.relaxable()
    for name in list(kept):
        trial = set(problem.relaxable()) - (set(kept) - {name})
        result = solve_problem(problem.without(trial), backend=backend, time_limit_s=time_limit_s)
        if result.status == "infeasible":
            kept.remove(name)
    return kept


def _first_appearance_classes(rows: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Class of each row (equal rows share one, numbered by first appearance) and each class's first row.

    A dict over the rows' bytes: the matrices are small (strategies × strategies), where this is
    several times faster than ``np.unique(axis=0)``, and the search solves many of them.
    """
    seen: dict[bytes, int] = {}
    first: list[int] = []
    of = np.empty(rows.shape[0], dtype=np.int64)
    for i in range(rows.shape[0]):
        key = rows[i].tobytes()
        cls = seen.get(key)
        if cls is None:
            cls = seen[key] = len(first)
            first.append(i)
        of[i] = cls
    return of, first


def compress(mat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(row class of each s, column class of each t, class matrix)`` with equal rows/columns merged,
    classes numbered in order of first appearance."""
    mat = np.ascontiguousarray(mat)
    row_of, first_rows = _first_appearance_classes(mat)
    small = mat[first_rows]
    col_of, first_cols = _first_appearance_classes(np.ascontiguousarray(small.T))
    return row_of, col_of, small[:, first_cols]


def _members(class_of: np.ndarray, classes: int, xs: list) -> list[list]:
    """The variables of each class, in strategy order: ``class_of[s]`` is strategy ``s``'s class."""
    out: list[list] = [[] for _ in range(classes)]
    for s, cls in enumerate(class_of.tolist()):
        out[cls].append(xs[s])
    return out


# -- backends -------------------------------------------------------------------------------------

class _CpSat:
    def __init__(self, problem: Problem) -> None:
        from ortools.sat.python import cp_model

        self.cp_model = cp_model
        self.p = problem
        self.model = cp_model.CpModel()
        # the snake_case API: each CamelCase name is a deprecation wrapper around it, one more
        # Python call per variable and constraint
        new_bool = self.model.new_bool_var
        self.x = [[new_bool(f"x[{g},{s}]") for s in range(len(c))] for g, c in enumerate(problem.cost)]
        self.y: dict[tuple[int, int], list[list]] = {}
        self.constraints = 0

    def _named(self, ct, name: str) -> None:
        ct.with_name(name)
        self.constraints += 1

    def add_one_strategy(self) -> None:
        for g, xs in enumerate(self.x):
            self._named(self.model.add_exactly_one(xs), f"one_strategy[{self.p.group_names[g]}]")

    def add_edges(self, classes: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None) -> None:
        """``classes``: :func:`compress` of each edge matrix, in ``edges`` order, if already made."""
        new_bool, add = self.model.new_bool_var, self.model.add
        if classes is None:
            classes = [compress(mat) for mat in self.p.edges.values()]
        for (g, h), (row_of, col_of, small) in zip(self.p.edges, classes):
            rows, cols = small.shape
            y = [[new_bool(f"y[{g},{h},{a},{b}]") for b in range(cols)] for a in range(rows)]
            self.y[(g, h)] = (y, small)
            label = f"{self.p.group_names[g]}->{self.p.group_names[h]}"
            for a, members in enumerate(_members(row_of, rows, self.x[g])):
                self._named(add(sum(y[a]) == sum(members)), f"edge_out[{label},{a}]")
            for b, members in enumerate(_members(col_of, cols, self.x[h])):
                self._named(add(sum(y[a][b] for a in range(rows)) == sum(members)), f"edge_in[{label},{b}]")

    def add_memory_limit(self) -> None:
        if self.p.memory_limit is None:
            return
        terms = [m * xv for ms, xs in zip(self.p.memory, self.x) for m, xv in zip(ms, xs) if m]
        self._named(self.model.add(sum(terms) <= self.p.memory_limit), "memory_limit")

    def add_pins(self) -> None:
        for pin in self.p.pins:
            banned = [xv for s, xv in enumerate(self.x[pin.group]) if s not in pin.allowed]
            self._named(self.model.add(sum(banned) == 0), pin.name)

    def add_ties(self) -> None:
        for tie in self.p.ties:
            for s, ok in enumerate(tie.compatible):
                self._named(self.model.add(self.x[tie.g][s] <= sum(self.x[tie.h][t] for t in ok)), f"{tie.name}[{s}]")

    def set_objective(self) -> None:
        terms = [c * xv for cs, xs in zip(self.p.cost, self.x) for c, xv in zip(cs, xs) if c]
        for y, small in self.y.values():
            rows, cols = np.nonzero(small)
            terms += [c * y[a][b] for a, b, c in zip(rows.tolist(), cols.tolist(), small[rows, cols].tolist())]
        self.model.minimize(sum(terms))

    def solve(self, *, time_limit_s: float, num_workers: int) -> IlpResult:
        solver = self.cp_model.CpSolver()
        solver.parameters.max_time_in_seconds = float(time_limit_s)
        solver.parameters.num_workers = int(num_workers)
        solver.parameters.random_seed = 0
        # The LP relaxation of this model is nearly tight, so CP-SAT is fastest when it solves the full LP
        # from the start; its presolve and probing (seconds on a 2-D mesh) buy nothing on a pure 0-1 model.
        solver.parameters.cp_model_presolve = False
        solver.parameters.cp_model_probing_level = 0
        solver.parameters.linearization_level = 2
        solver.parameters.add_lp_constraints_lazily = False
        start = time.perf_counter()
        status = solver.solve(self.model)
        elapsed = time.perf_counter() - start
        cp = self.cp_model
        name = {cp.OPTIMAL: "optimal", cp.FEASIBLE: "feasible", cp.INFEASIBLE: "infeasible"}.get(status, "unknown")
        nvars = sum(map(len, self.x)) + sum(small.size for _, small in self.y.values())
        if name in ("optimal", "feasible"):
            value = solver.boolean_value
            choice = tuple(next(s for s, xv in enumerate(xs) if value(xv)) for xs in self.x)
            obj, bound = solver.objective_value, solver.best_objective_bound
            gap = 0.0 if name == "optimal" else (obj - bound) / max(abs(obj), 1.0)
            return IlpResult(backend="cpsat", status=name, objective=obj, bound=bound if name == "feasible" else obj,
                             gap=gap, solve_time_s=elapsed, choice=choice, num_variables=nvars,
                             num_constraints=self.constraints)
        return IlpResult(backend="cpsat", status=name, objective=None, bound=None, gap=None, solve_time_s=elapsed,
                         choice=(), num_variables=nvars, num_constraints=self.constraints)


class _Cbc:
    def __init__(self, problem: Problem) -> None:
        import pulp

        self.pulp = pulp
        self.p = problem
        self.prob = pulp.LpProblem("intra_op", pulp.LpMinimize)
        self.x = [[self._var(f"x_{g}_{s}", "Binary") for s in range(len(c))] for g, c in enumerate(problem.cost)]
        self.y: dict[tuple[int, int], list[list]] = {}
        self.names: dict[str, str] = {}  # CBC-safe name → our name

    def _var(self, name: str, cat: str):
        if hasattr(self.prob, "add_variable"):  # PuLP >= 3.3; LpVariable(...) alone is deprecated there
            return self.prob.add_variable(name, 0, 1, cat=cat)
        return self.pulp.LpVariable(name, lowBound=0, upBound=1, cat=cat)

    def _named(self, constraint, name: str) -> None:
        safe = f"c{len(self.names)}_" + re.sub(r"[^A-Za-z0-9_]", "_", name)[:60]
        self.names[safe] = name
        self.prob += constraint, safe

    def add_one_strategy(self) -> None:
        for g, xs in enumerate(self.x):
            self._named(self.pulp.lpSum(xs) == 1, f"one_strategy[{self.p.group_names[g]}]")

    def add_edges(self) -> None:
        lp_sum = self.pulp.lpSum
        for (g, h), mat in self.p.edges.items():
            row_of, col_of, small = compress(mat)
            rows, cols = small.shape
            # continuous is exact here: with binary x the transportation constraints leave one y = 1
            y = [[self._var(f"y_{g}_{h}_{a}_{b}", "Continuous") for b in range(cols)] for a in range(rows)]
            self.y[(g, h)] = (y, small)
            label = f"{self.p.group_names[g]}->{self.p.group_names[h]}"
            for a in range(rows):
                members = [self.x[g][s] for s in range(len(row_of)) if row_of[s] == a]
                self._named(lp_sum(y[a]) == lp_sum(members), f"edge_out[{label},{a}]")
            for b in range(cols):
                members = [self.x[h][t] for t in range(len(col_of)) if col_of[t] == b]
                self._named(lp_sum(y[a][b] for a in range(rows)) == lp_sum(members), f"edge_in[{label},{b}]")

    def add_memory_limit(self) -> None:
        if self.p.memory_limit is None:
            return
        expr = self.pulp.lpSum(m * xv for ms, xs in zip(self.p.memory, self.x) for m, xv in zip(ms, xs) if m)
        self._named(expr <= self.p.memory_limit, "memory_limit")

    def add_pins(self) -> None:
        for pin in self.p.pins:
            banned = [xv for s, xv in enumerate(self.x[pin.group]) if s not in pin.allowed]
            if banned:
                self._named(self.pulp.lpSum(banned) == 0, pin.name)

    def add_ties(self) -> None:
        for tie in self.p.ties:
            for s, ok in enumerate(tie.compatible):
                self._named(self.x[tie.g][s] <= self.pulp.lpSum(self.x[tie.h][t] for t in ok), f"{tie.name}[{s}]")

    def set_objective(self) -> None:
        terms = [c * xv for cs, xs in zip(self.p.cost, self.x) for c, xv in zip(cs, xs) if c]
        for y, small in self.y.values():
            terms += [int(small[a, b]) * y[a][b] for a, b in zip(*np.nonzero(small))]
        self.prob += self.pulp.lpSum(terms) if terms else 0 * self.x[0][0]

    def solve(self, *, time_limit_s: float, num_workers: int) -> IlpResult:
        pulp = self.pulp
        nvars, ncons = self.prob.numVariables(), self.prob.numConstraints()
        elapsed, text = run_cbc(self.prob, time_limit_s=time_limit_s, threads=num_workers, prefix="intra_op_cbc_")
        status = pulp.LpStatus[self.prob.status]
        sol = self.prob.sol_status
        if status == "Infeasible":
            return IlpResult(backend="cbc", status="infeasible", objective=None, bound=None, gap=None,
                             solve_time_s=elapsed, choice=(), num_variables=nvars, num_constraints=ncons)
        if sol not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
            return IlpResult(backend="cbc", status="unknown", objective=None, bound=None, gap=None,
                             solve_time_s=elapsed, choice=(), num_variables=nvars, num_constraints=ncons)
        choice = tuple(max(range(len(xs)), key=lambda s: xs[s].value() or 0.0) for xs in self.x)
        obj = float(self.p.evaluate(choice))
        if sol == pulp.LpSolutionOptimal:
            bound, name = obj, "optimal"
        else:
            m = re.search(r"(?:Lower bound|best possible)[:\s]+(-?[\d.eE+]+)", text)
            bound, name = (float(m.group(1)) if m else None), "feasible"
        gap = None if bound is None else (obj - bound) / max(abs(obj), 1.0)
        return IlpResult(backend="cbc", status=name, objective=obj, bound=bound, gap=gap, solve_time_s=elapsed,
                         choice=choice, num_variables=nvars, num_constraints=ncons)
