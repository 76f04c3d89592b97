r"""The stage problem as an integer program, solved by OR-Tools CP-SAT or PuLP/CBC.

Same model and objective as :mod:`planner.inter_op.problem` (stages contiguous in the layer
order, a sub-mesh each, devices placed in pipeline order, transfers relayed over every cut edge).
Pipeline positions are *slots counted from the last stage* (slot 1 is the last stage), so the
in-flight count of a slot is known when it depends only on ``p - k`` (1F1B, GPipe) and one
program covers every stage count; otherwise (ZB-H1/H2) one program per ``p`` is solved.

Sets: slots :math:`s = 1..P`; cuts :math:`0 \le i < j \le L`; sub-meshes :math:`c` (node group
:math:`g(c)`, :math:`e_c` tensor-parallel groups, slice or whole nodes); node groups :math:`g`
with :math:`U_g` tp-groups, :math:`n_g` per node; links :math:`\ell \in` {same node, cross node,
cross group}. Data: :math:`t_{ijc}` stage time, :math:`\gamma_{ijc}` gradient tail,
:math:`\mu^s_{ijc}` memory at slot :math:`s` (limit :math:`M_c`), :math:`\xi^\ell_{jc}` the time
of one side of cut :math:`j` on sub-mesh :math:`c` over link :math:`\ell` (a transfer takes the
larger side: the one with fewer replicas moves more bytes per device).

Variables: :math:`z_{sijc} \in \{0,1\}` (slot :math:`s` holds layers :math:`[i, j)` on
:math:`c`; only built when :math:`\mu^s_{ijc} \le M_c` and :math:`t_{ijc} < \infty`),
:math:`w_s \in \{0,1\}` (slot used), node offsets :math:`o_{gs} \in \{0..n_g-1\}`,
:math:`k_{gs} \in \mathbb{Z}_{\ge 0}`, :math:`h_{gs} \in \{0,1\}`, the transfer below slot
:math:`s` :math:`X_s \ge 0`, link flags :math:`\sigma_s, \nu_s \in [0, 1]` (same group, same
node), bounds :math:`T, G \ge 0`. With :math:`y_{sc} = \sum_{ij} z_{sijc}` and
:math:`\Gamma_{sg} = \sum_{c \in g} y_{sc}`:

.. math::

    \min\; (m-1)\,T + G + \sum_s \Big(\sum_{ijc} t_{ijc} z_{sijc} + X_s\Big)

    \text{one\_stage}[s]:\ \textstyle\sum_{ijc} z_{sijc} = w_s \;(w_s = 1 \text{ for } s \le p_{min}) \qquad
    \text{slots\_in\_order}[s]:\ w_{s+1} \le w_s

    \text{chain}[s, j]:\ \textstyle\sum_{kc} z_{sjkc} = \sum_{ic} z_{s+1,ijc} \;(0<j<L) \qquad
    \text{first\_stage}[s]:\ \textstyle\sum_{kc} z_{s0kc} = w_s - w_{s+1}

    \text{devices}[g]:\ \textstyle\sum_{s,ij,c \in g} e_c z_{sijc} = U_g \qquad
    \text{offset}[g, s]:\ \textstyle\sum_{s' \le s} \sum_{c \in g} e_c y_{s'c} = n_g k_{gs} + o_{gs}

    \text{slice\_fits}[g, s]:\ o_{g,s-1} + \textstyle\sum_{c \in g\, \text{slice}} e_c y_{sc} \le n_g \qquad
    \text{whole\_aligned}[g, s]:\ o_{g,s-1} + (n_g - 1) \textstyle\sum_{c \in g\, \text{whole}} y_{sc} \le n_g - 1

    \text{transfer\_send}[s, \ell]:\ \textstyle\sum_{ijc} \xi^\ell_{jc} z_{s+1,ijc} - R_\ell \le X_s \qquad
    \text{transfer\_recv}[s, \ell]:\ \textstyle\sum_{ijc,\, i>0} \xi^\ell_{ic} z_{sijc} - R_\ell \le X_s

    R_{same} = 0,\quad R_{cross\,node} = \bar\xi\,\nu_s,\quad R_{cross\,group} = \bar\xi\,\sigma_s \quad
    (\bar\xi \text{: the row's largest coefficient})

    \text{same\_group}[s, g]:\ \sigma_s + \Gamma_{s+1,g} - \Gamma_{sg} \le 1 \qquad
    \text{same\_node\_in\_group}[s]:\ \nu_s \le \sigma_s

    \text{same\_node\_offset}[s, g]:\ \nu_s + \Gamma_{sg} - h_{gs} \le 1 \qquad
    \text{node\_shared}[g, s]:\ h_{gs} \le o_{gs}

    \text{bottleneck\_stage}[s]:\ \textstyle\sum_{ijc} t_{ijc} z_{sijc} \le T \qquad
    \text{bottleneck\_transfer}[s]:\ X_s \le T \qquad
    \text{tail}[s]:\ \textstyle\sum_{ijc} \gamma_{ijc} z_{sijc} \le G

    \text{capacity}:\ \textstyle\sum_{sijc} t_{ijc}\, e_c\, z_{sijc} \le T \sum_g U_g

``offset`` counts the tp-groups of each node group used by slots ``1..s`` (placed from the top
ranks down, the mirror of placing stages in pipeline order from rank 0): a slice fits when the
partly filled node has room, whole nodes need an empty offset, and the cut below slot ``s`` is
inside one node exactly when the offset after it is not zero. The transfer rows are exact
because link times are ordered (same node ≤ cross node ≤ cross group, checked when the program
is built): the flags only switch off the rows of slower links than the one the two stages share.
``capacity`` is a valid cut (every stage's device-time ``t_k e_k`` is at most ``T e_k``) that
tightens the LP bound. For the explanation of an infeasible instance (:func:`explain_infeasible`)
memory is written as named rows ``memory[s]`` instead of a filter on ``z``.

CP-SAT needs integers: times are scaled to units of ``max time / 10⁷`` and rounded (at 10⁹ its
presolve once claimed a wrong optimum). The plan it returns is priced again exactly; its lower
bound subtracts the largest rounding error, so CP-SAT agrees with the brute force to about 10⁻⁶.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field

import numpy as np

from planner.cbc import run_cbc
from planner.inter_op.problem import CROSS_GROUP, CROSS_NODE, SAME_NODE, StageProblem

BACKENDS = ("cpsat", "cbc")
_SCALE = 1e7  # CP-SAT time resolution: the largest time maps to this many units (1e9 misled its presolve)


@dataclass
class _Row:
    name: str
    family: str
    coef: dict[int, float]
    sense: str  # "<=" | "==" | ">="
    rhs: float
    kind: str  # "time" (seconds), "int" (exact integers), "bytes"


@dataclass
class LinearModel:
    """A backend-neutral mixed-integer model: variables, named rows, a time-valued objective."""

    names: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)  # "B" binary, "I" integer, "C" continuous in [lb, ub]
    lb: list[float] = field(default_factory=list)
    ub: list[float] = field(default_factory=list)
    time_var: list[bool] = field(default_factory=list)  # valued in seconds (T, G)
    rows: list[_Row] = field(default_factory=list)
    objective: dict[int, float] = field(default_factory=dict)

    def var(self, name: str, kind: str, lb: float = 0.0, ub: float = 1.0, *, seconds: bool = False) -> int:
        self.names.append(name)
        self.kinds.append(kind)
        self.lb.append(lb)
        self.ub.append(ub)
        self.time_var.append(seconds)
        return len(self.names) - 1

    def row(self, name: str, family: str, coef: dict[int, float], sense: str, rhs: float, kind: str) -> None:
        self.rows.append(_Row(name, family, {k: v for k, v in coef.items() if v != 0}, sense, rhs, kind))


class StageILP:
    """Builds the program for ``problem`` (optionally for one fixed stage count ``p``)."""

    def __init__(self, problem: StageProblem, *, p: int | None = None, memory_rows: bool = False) -> None:
        self.pr = problem
        self.fixed_p = p
        self.memory_rows = memory_rows
        counts = problem.stage_counts if p is None else (p,)
        self.P = max(counts)
        self.p_min = min(counts)
        assert counts == tuple(range(self.p_min, self.P + 1)), counts
        if p is None:
            remaining = problem.flight_by_remaining
            assert remaining is not None, "in-flight depends on p: build one program per p"
            self.flight = {s: remaining[s] for s in range(1, self.P + 1)}
        else:
            self.flight = {s: problem.in_flight(p, p - s) for s in range(1, p + 1)}
        self.lm = LinearModel()
        self.z: dict[tuple[int, int, int, int], int] = {}
        self.used: dict[int, int] = {}
        self.T = self.lm.var("T", "C", self._bottleneck_floor(), math.inf, seconds=True)
        self.G = self.lm.var("G", "C", 0.0, math.inf, seconds=True)
        self.o: dict[tuple[int, int], int] = {}
        self.h: dict[tuple[int, int], int] = {}
        self._build()

    def _bottleneck_floor(self) -> float:
        """A valid lower bound on T (it tightens the LP): every layer sits in some stage, and all
        stages' device-time ``t_k e_k`` fits in ``T`` times all units."""
        pr = self.pr
        per_layer = np.array(pr.layer_time)
        units = np.array([sm.units for sm in pr.submeshes], dtype=float)[:, None]
        work = float((per_layer * units).min(axis=0).sum()) / sum(pr.group_units)
        return max(float(per_layer.min(axis=0).max()), work) * (1 - 1e-9)

    # -- variables ----------------------------------------------------------------------------
    def _build(self) -> None:
        self.add_stage_variables()
        self.add_one_stage()
        self.add_chain()
        self.add_devices()
        self.add_placement()
        self.add_transfers()
        self.add_bottleneck_and_tail()
        if self.memory_rows:
            self.add_memory()
        self.set_objective()

    def _label(self, s: int, i: int, j: int, c: int) -> str:
        return f"z[s{s},{i}:{j},c{c}]"

    def add_stage_variables(self) -> None:
        pr, L = self.pr, self.pr.num_layers
        for s in range(1, self.P + 1):
            self.used[s] = self.lm.var(f"used[s{s}]", "B", 1.0 if s <= self.p_min else 0.0, 1.0)
            for c in range(len(pr.submeshes)):
                ok = np.isfinite(pr.time[c])
                if not self.memory_rows:
                    ok = ok & pr.memory_ok(c, self.flight[s], s == 1)
                for i, j in zip(*np.nonzero(ok)):
                    i, j = int(i), int(j)
                    if (j == L) != (s == 1) or L - j < s - 1:
                        continue
                    if self.fixed_p is not None and ((i == 0) != (s == self.P) or i < self.P - s):
                        continue
                    self.z[(s, i, j, c)] = self.lm.var(self._label(s, i, j, c), "B")

    def _sum(self, pred) -> dict[int, float]:
        return {v: 1.0 for k, v in self.z.items() if pred(*k)}

    # -- constraint families ------------------------------------------------------------------
    def add_one_stage(self) -> None:
        for s in range(1, self.P + 1):
            coef = self._sum(lambda s2, i, j, c, s=s: s2 == s)
            coef[self.used[s]] = -1.0
            self.lm.row(f"one_stage[s{s}]", "one_stage", coef, "==", 0.0, "int")
            if s < self.P:
                self.lm.row(f"slots_in_order[s{s}]", "slots_in_order", {self.used[s + 1]: 1.0, self.used[s]: -1.0},
                            "<=", 0.0, "int")

    def add_chain(self) -> None:
        L = self.pr.num_layers
        starts: dict[tuple[int, int], dict[int, float]] = {}
        ends: dict[tuple[int, int], dict[int, float]] = {}
        for (s, i, j, _c), v in self.z.items():
            starts.setdefault((s, i), {})[v] = 1.0
            ends.setdefault((s, j), {})[v] = 1.0
        for s in range(1, self.P + 1):
            for j in range(1, L):
                coef = dict(starts.get((s, j), {}))
                for v in ends.get((s + 1, j), {}):
                    coef[v] = -1.0
                if coef:
                    self.lm.row(f"chain[s{s},cut{j}]", "chain", coef, "==", 0.0, "int")
            coef = dict(starts.get((s, 0), {}))
            coef[self.used[s]] = -1.0
            if s < self.P:
                coef[self.used[s + 1]] = 1.0
            self.lm.row(f"first_stage[s{s}]", "first_stage", coef, "==", 0.0, "int")

    def add_devices(self) -> None:
        pr = self.pr
        for g, total in enumerate(pr.group_units):
            coef = {v: float(pr.submeshes[c].units) for (_s, _i, _j, c), v in self.z.items()
                    if pr.submeshes[c].group == g}
            self.lm.row(f"devices[{pr.cluster.groups[g].device.name}#{g}]", "devices", coef, "==", float(total), "int")

    def _y(self, s: int, pred) -> dict[int, float]:
        pr = self.pr
        return {v: float(pr.submeshes[c].units) for (s2, _i, _j, c), v in self.z.items()
                if s2 == s and pred(pr.submeshes[c])}

    def add_placement(self) -> None:
        pr = self.pr
        for g, upn in enumerate(pr.group_units_per_node):
            if upn == 1:
                continue  # every sub-mesh is whole nodes and every offset is zero
            for s in range(1, self.P + 1):
                if s < self.P:
                    self.o[(g, s)] = self.lm.var(f"o[g{g},s{s}]", "I", 0.0, float(upn - 1))
                    k = self.lm.var(f"k[g{g},s{s}]", "I", 0.0, float(pr.group_units[g] // upn))
                    coef: dict[int, float] = {}
                    for s2 in range(1, s + 1):
                        coef.update(self._y(s2, lambda sm, g=g: sm.group == g))
                    coef[k] = -float(upn)
                    coef[self.o[(g, s)]] = -1.0
                    self.lm.row(f"offset[g{g},s{s}]", "offset", coef, "==", 0.0, "int")
                    self.h[(g, s)] = self.lm.var(f"h[g{g},s{s}]", "B")
                    self.lm.row(f"node_shared[g{g},s{s}]", "node_shared", {self.h[(g, s)]: 1.0, self.o[(g, s)]: -1.0},
                                "<=", 0.0, "int")
                if s >= 2:
                    below = self.o[(g, s - 1)]
                    coef = self._y(s, lambda sm, g=g: sm.group == g and sm.is_slice)
                    coef[below] = 1.0
                    self.lm.row(f"slice_fits[g{g},s{s}]", "slice_fits", coef, "<=", float(upn), "int")
                    coef = {v: float(upn - 1) for v in self._y(s, lambda sm, g=g: sm.group == g and not sm.is_slice)}
                    coef[below] = 1.0
                    self.lm.row(f"whole_aligned[g{g},s{s}]", "whole_aligned", coef, "<=", float(upn - 1), "int")

    def _gamma(self, s: int, g: int) -> dict[int, float]:
        """Slot ``s`` runs on node group ``g`` (a 0/1 expression)."""
        return {v: 1.0 for (s2, _i, _j, c), v in self.z.items() if s2 == s and self.pr.submeshes[c].group == g}

    def add_transfers(self) -> None:
        """``X_s`` >= each side's time over the link the two stages share (see the module docstring)."""
        pr = self.pr
        side = pr.xfer_side
        if not (np.all(side[CROSS_GROUP] >= side[CROSS_NODE]) and np.all(side[CROSS_NODE] >= side[SAME_NODE])):
            raise ValueError("the ILP assumes same-node <= cross-node <= cross-group transfer times; this cluster's "
                             "links break that order: use method='dp'")
        groups = range(len(pr.group_units))
        self.transfer: dict[int, dict[int, float]] = {}
        for s in range(1, self.P):
            X = self.lm.var(f"X[s{s}]", "C", 0.0, math.inf, seconds=True)
            self.transfer[s] = {X: 1.0}
            sigma = self.lm.var(f"same_group[s{s}]", "C", 0.0, 1.0) if len(groups) > 1 else None
            has_slices = any((g, s) in self.h for g in groups)
            nu = self.lm.var(f"same_node[s{s}]", "C", 0.0, 1.0) if has_slices else None
            send = [{v: float(side[link, c, j]) for (s2, _i, j, c), v in self.z.items() if s2 == s + 1}
                    for link in (SAME_NODE, CROSS_NODE, CROSS_GROUP)]
            recv = [{v: float(side[link, c, i]) for (s2, i, _j, c), v in self.z.items() if s2 == s and i > 0}
                    for link in (SAME_NODE, CROSS_NODE, CROSS_GROUP)]
            for label, sides in (("send", send), ("recv", recv)):
                for link, coef in zip(("same_node", "cross_node", "cross_group"), sides):
                    relax = {"same_node": None, "cross_node": nu, "cross_group": sigma}[link]
                    if link == "cross_group" and sigma is None:
                        continue
                    row = dict(coef)
                    row[X] = -1.0
                    if relax is not None:
                        row[relax] = -max(coef.values(), default=0.0)
                    self.lm.row(f"transfer_{label}[s{s},{link}]", "transfer", row, "<=", 0.0, "time")
            if sigma is not None:
                for g in groups:  # same group only if slot s+1 in g implies slot s in g
                    row = {sigma: 1.0}
                    for v in self._gamma(s + 1, g):
                        row[v] = row.get(v, 0.0) + 1.0
                    for v in self._gamma(s, g):
                        row[v] = row.get(v, 0.0) - 1.0
                    self.lm.row(f"same_group[s{s},g{g}]", "link", row, "<=", 1.0, "int")
            if nu is not None:
                if sigma is not None:
                    self.lm.row(f"same_node_in_group[s{s}]", "link", {nu: 1.0, sigma: -1.0}, "<=", 0.0, "int")
                for g in groups:  # on group g the cut is inside a node only if the offset there is not zero
                    row = {nu: 1.0}
                    if (g, s) in self.h:
                        row[self.h[(g, s)]] = -1.0
                    for v in self._gamma(s, g):
                        row[v] = 1.0
                    self.lm.row(f"same_node_offset[s{s},g{g}]", "link", row, "<=", 1.0, "int")

    def _stage_terms(self, s: int, table) -> dict[int, float]:
        return {v: float(table[c][i, j]) for (s2, i, j, c), v in self.z.items() if s2 == s}

    def add_bottleneck_and_tail(self) -> None:
        for s in range(1, self.P + 1):
            coef = self._stage_terms(s, self.pr.time)
            coef[self.T] = -1.0
            self.lm.row(f"bottleneck_stage[s{s}]", "bottleneck", coef, "<=", 0.0, "time")
            if self.transfer.get(s):
                coef = dict(self.transfer[s])
                coef[self.T] = -1.0
                self.lm.row(f"bottleneck_transfer[s{s}]", "bottleneck", coef, "<=", 0.0, "time")
            coef = self._stage_terms(s, self.pr.tail)
            coef[self.G] = -1.0
            self.lm.row(f"tail[s{s}]", "tail", coef, "<=", 0.0, "time")
        # Valid cut, tightens the LP: every stage's device-time t_k·e_k is at most T·e_k, and the
        # e_k add up to all units, so Σ_k t_k e_k <= T · Σ_g U_g.
        pr = self.pr
        coef = {v: float(pr.time[c][i, j]) * pr.submeshes[c].units for (_s, i, j, c), v in self.z.items()}
        coef[self.T] = -float(sum(pr.group_units))
        self.lm.row("capacity", "bottleneck", coef, "<=", 0.0, "time")

    def add_memory(self) -> None:
        pr = self.pr
        for s in range(1, self.P + 1):
            coef = {}
            for (s2, i, j, c), v in self.z.items():
                if s2 == s:
                    coef[v] = float(pr.memory(c, self.flight[s], s == 1)[i, j] - pr.limit[c])
            self.lm.row(f"memory[s{s}]", "memory", coef, "<=", 0.0, "bytes")

    def set_objective(self) -> None:
        obj: dict[int, float] = {self.T: float(self.pr.m - 1), self.G: 1.0}
        for s in range(1, self.P + 1):
            for v, t in self._stage_terms(s, self.pr.time).items():
                obj[v] = obj.get(v, 0.0) + t
            for v, x in self.transfer.get(s, {}).items():
                obj[v] = obj.get(v, 0.0) + x
        self.lm.objective = obj

    # -- reading a solution -------------------------------------------------------------------
    def stages_from(self, values: dict[int, float]) -> tuple[tuple[int, int, int], ...]:
        chosen = sorted(((s, i, j, c) for (s, i, j, c), v in self.z.items() if values.get(v, 0.0) > 0.5),
                        key=lambda k: -k[0])
        return tuple((i, j, c) for _s, i, j, c in chosen)


@dataclass(frozen=True)
class IlpOutcome:
    status: str  # optimal | feasible | infeasible | time_limit (nothing found) | unknown
    stages: tuple[tuple[int, int, int], ...]
    bound_s: float | None
    solve_time_s: float
    num_variables: int
    num_constraints: int


def _time_scale(problem: StageProblem) -> float:
    finite = [t[np.isfinite(t)] for t in problem.time + problem.tail] + [problem.xfer[np.isfinite(problem.xfer)]]
    top = max((float(a.max()) for a in finite if a.size), default=1.0)
    return _SCALE / max(top, 1e-30)


def solve_cpsat(ilp: StageILP, *, time_limit_s: float | None, num_workers: int = 1,
                skip: frozenset[str] = frozenset(), stop_at_first: bool = False) -> IlpOutcome:
    """CP-SAT on the scaled integer model; ``skip`` drops rows by name (infeasibility analysis)."""
    from ortools.sat.python import cp_model

    lm = ilp.lm
    scale = _time_scale(ilp.pr)
    model = cp_model.CpModel()
    top = int(math.ceil(scale)) * 4 + 4
    xs = []
    for name, lb, ub, secs in zip(lm.names, lm.lb, lm.ub, lm.time_var):
        if secs:
            xs.append(model.NewIntVar(max(0, math.floor(lb * scale) - 1), top, name))
        else:
            xs.append(model.NewIntVar(int(lb), int(ub), name))
    ncons = 0
    for r in lm.rows:
        if r.name in skip:
            continue
        if r.kind == "time":
            coef = {k: (v if lm.time_var[k] else round(v * scale)) for k, v in r.coef.items()}
            rhs = round(r.rhs * scale)
        elif r.kind == "bytes":
            coef = {k: math.ceil(v / 1024) if v > 0 else math.floor(v / 1024) for k, v in r.coef.items()}
            rhs = math.floor(r.rhs / 1024)
        else:
            coef, rhs = {k: int(v) for k, v in r.coef.items()}, int(r.rhs)
        expr = sum(int(v) * xs[k] for k, v in coef.items())
        ct = model.Add(expr <= rhs) if r.sense == "<=" else model.Add(expr == rhs) if r.sense == "==" else \
            model.Add(expr >= rhs)
        ct.WithName(r.name)
        ncons += 1
    model.Minimize(sum(round(v * scale) * xs[k] if not lm.time_var[k] else round(v) * xs[k]
                       for k, v in lm.objective.items()))
    solver = cp_model.CpSolver()
    if time_limit_s is not None:
        solver.parameters.max_time_in_seconds = float(time_limit_s)
    solver.parameters.num_workers = int(num_workers)
    solver.parameters.random_seed = 0
    solver.parameters.cp_model_presolve = False  # tested faster on these models; the LP does the work
    solver.parameters.stop_after_first_solution = stop_at_first
    start = time.perf_counter()
    status = solver.Solve(model)
    elapsed = time.perf_counter() - start
    name = {cp_model.OPTIMAL: "optimal", cp_model.FEASIBLE: "feasible", cp_model.INFEASIBLE: "infeasible"}.get(
        status, "unknown")
    if name == "unknown" and time_limit_s is not None and elapsed >= time_limit_s * 0.98:
        name = "time_limit"
    stages: tuple[tuple[int, int, int], ...] = ()
    bound = None
    if name in ("optimal", "feasible"):
        stages = ilp.stages_from({v: float(solver.Value(xs[v])) for v in ilp.z.values()})
        # largest rounding error of one plan: every objective term rounds by at most half a unit
        slack = 0.5 * ((ilp.pr.m - 1) + 1 + 2 * ilp.P) / scale
        bound = max(0.0, solver.BestObjectiveBound() / scale - slack)
    elif name == "time_limit":
        bound = max(0.0, solver.BestObjectiveBound() / scale) if math.isfinite(solver.BestObjectiveBound()) else None
    return IlpOutcome(name, stages, bound, elapsed, len(xs), ncons)


def solve_cbc(ilp: StageILP, *, time_limit_s: float | None, num_workers: int = 1) -> IlpOutcome:
    """PuLP with its bundled CBC; continuous rows as written (seconds, exact integers)."""
    import pulp

    lm = ilp.lm
    prob = pulp.LpProblem("inter_op", pulp.LpMinimize)
    xs = []
    for k, (kind, lb, ub) in enumerate(zip(lm.kinds, lm.lb, lm.ub)):
        cat = pulp.LpContinuous if kind == "C" else pulp.LpInteger  # LpBinary would drop fixed bounds
        xs.append(prob.add_variable(f"v{k}", lowBound=lb, upBound=None if math.isinf(ub) else ub, cat=cat))
    for r in lm.rows:
        expr = pulp.lpSum(v * xs[k] for k, v in r.coef.items())
        rhs = r.rhs
        if r.kind == "bytes":  # in GiB so CBC's tolerances stay meaningful
            expr = pulp.lpSum(v / 2**30 * xs[k] for k, v in r.coef.items())
            rhs = r.rhs / 2**30
        con = expr <= rhs if r.sense == "<=" else expr == rhs if r.sense == "==" else expr >= rhs
        prob += con, re.sub(r"[^A-Za-z0-9_]", "_", r.name)
    prob += pulp.lpSum(v * xs[k] for k, v in lm.objective.items())
    elapsed, text = run_cbc(prob, time_limit_s=time_limit_s, threads=num_workers, prefix="inter_op_cbc_")
    status = pulp.LpStatus[prob.status]
    sol = prob.sol_status
    nvars, ncons = len(xs), len(lm.rows)
    if status == "Infeasible":
        return IlpOutcome("infeasible", (), None, elapsed, nvars, ncons)
    if sol not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return IlpOutcome("time_limit" if time_limit_s is not None else "unknown", (), None, elapsed, nvars, ncons)
    values = {k: float(x.value() or 0.0) for k, x in enumerate(xs)}
    stages = ilp.stages_from(values)
    if sol == pulp.LpSolutionOptimal:
        return IlpOutcome("optimal", stages, None, elapsed, nvars, ncons)
    m = re.search(r"(?:Lower bound|best possible)[:\s]+(-?[\d.eE+]+)", text)
    return IlpOutcome("feasible", stages, float(m.group(1)) if m else None, elapsed, nvars, ncons)


RELAXABLE = ("memory", "devices")


def explain_infeasible(problem: StageProblem, *, time_limit_s: float = 20.0) -> list[str]:
    """Names of a minimal set of constraints that cannot all hold (a deletion filter with CP-SAT).

    Only the user-relaxable families (per-slot ``memory[s]`` and ``devices[g]``, the exact cover)
    are candidates; everything else is the structure of a pipeline. Empty when the instance is
    feasible; ``["structure: …"]`` when relaxing them all does not help (too few layers or
    devices for the allowed stage counts).
    """
    p = None if problem.flight_by_remaining is not None else max(problem.stage_counts)
    ilp = StageILP(problem, p=p, memory_rows=True)
    relaxable = [r.name for r in ilp.lm.rows if r.family in RELAXABLE]
    deadline = time.perf_counter() + time_limit_s

    def feasible(skip: set[str]) -> bool:
        left = max(0.1, deadline - time.perf_counter())
        out = solve_cpsat(ilp, time_limit_s=left, skip=frozenset(skip), stop_at_first=True)
        return out.status in ("optimal", "feasible")

    if feasible(set()):
        return []
    if not feasible(set(relaxable)):
        return [f"structure: no {list(problem.stage_counts)}-stage pipeline of {problem.num_layers} layers fits the "
                "sub-mesh shapes even without memory limits"]
    conflict = list(relaxable)
    for name in list(conflict):
        trial = [c for c in conflict if c != name]
        if not feasible(set(relaxable) - set(trial)):
            conflict = trial
    return conflict
