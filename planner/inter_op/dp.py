r"""Exact stage DP: PipeDream's recurrence over layers and devices, Alpa's enumeration of the bottleneck.

For fixed bounds ``T`` (on every stage time and transfer) and ``G`` (on every gradient tail) the
step time ``(m-1)·max + Σ + max g`` is at most ``(m-1)·T + G + Σ``, so it remains to minimise the
latency sum ``Σ = Σ_k t_k + Σ_k x_k`` under the bounds. That is a shortest path, solved backwards
from the last stage (as Alpa does, so the stage's distance ``s`` from the end is known, and with it
the schedule's in-flight count when it depends only on ``p - k``, as for 1F1B and GPipe):

.. math::

    F_s(i, u, c) = \min_{j > i,\; c'} \; t_c(i, j) + x_{c \to c'}(j, \text{link}(u, c, c')) + F_{s-1}(j, u - e_c, c')

``F_s(i, u, c)``: least latency sum of layers ``[i, L)`` in ``s`` stages that use ``u`` (one count
per node group) tensor-parallel groups, the first of them on sub-mesh ``c`` taking ``e_c``; terms
over a bound, over memory or with an impossible placement are ``∞``. Because devices are placed
in pipeline order, ``u`` also says whether the stage after the cut shares a node (``u_g`` not on a
node boundary), which prices the link. Schedules whose in-flight count depends on ``p`` itself
(ZB-H1/H2) are solved once per ``p``.

The bounds are searched exactly over the candidate values (every stage time and transfer for
``T``, every tail for ``G``): ``Σ*(T, G)`` is non-increasing in both, so a box of candidates
``[T_a, T_b] × [G_c, G_d]`` costs at least ``(m-1)·T_a + G_c + Σ*(T_b, G_d)``. Boxes are opened
best-first; a DP answer with actual bounds ``(T', G')`` settles its whole upper-right part, and
a box whose bound is no better than the best plan is dropped. With ``G`` fixed this is Alpa's
enumeration of ``t_max`` with early stopping; the bound of the open boxes is the reported lower
bound when a time limit stops the search.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from planner.inter_op.problem import CROSS_GROUP, CROSS_NODE, SAME_NODE, PlanCost, StageProblem

_REL = 1e-12
_PROBE = 1.3  # first bound tried in a box: its floor times this


@dataclass(frozen=True)
class DpResult:
    status: str  # optimal | feasible (time limit hit) | infeasible | time_limit (nothing found)
    cost: PlanCost
    stages: tuple[tuple[int, int, int], ...]
    bound_s: float
    evaluations: int
    solve_time_s: float


class _Layout:
    """Flattened device-usage states ``u`` (one axis per node group) and the moves of each sub-mesh."""

    def __init__(self, problem: StageProblem) -> None:
        self.shape = tuple(u + 1 for u in problem.group_units)
        self.size = int(np.prod(self.shape))
        grid = np.indices(self.shape).reshape(len(self.shape), -1)  # grid[g][flat] = u_g
        strides = [int(np.prod(self.shape[g + 1:])) for g in range(len(self.shape))]
        self.full = int(np.ravel_multi_index(tuple(u for u in problem.group_units), self.shape))
        self.partial = [grid[g] % problem.group_units_per_node[g] != 0 for g in range(len(self.shape))]
        self.valid: list[np.ndarray] = []  # [c][u]: sub-mesh c may be placed below a suffix using u
        self.shift: list[int] = []  # flat index step of placing sub-mesh c
        self.start: list[int] = []  # state after placing only this sub-mesh (the last stage)
        for sm in problem.submeshes:
            g, upn, total = sm.group, problem.group_units_per_node[sm.group], problem.group_units[sm.group]
            ug = grid[g]
            ok = ug + sm.units <= total
            ok &= (ug % upn + sm.units <= upn) if sm.is_slice else (ug % upn == 0)
            self.valid.append(ok)
            self.shift.append(sm.units * strides[g])
            self.start.append(sm.units * strides[g])


class _Sigma:
    """``Σ*(T, G)`` and an assignment achieving it, by the backward DP.

    ``budget`` prunes: a state whose latency so far plus a lower bound for the layers still to
    place (each on its fastest sub-mesh) reaches it is dropped, since the caller only needs
    answers below it; the answer is exact whenever it is below the budget.
    """

    def __init__(self, problem: StageProblem) -> None:
        self.pr = problem
        self.lay = _Layout(problem)
        self.by_remaining = problem.flight_by_remaining
        self.n = problem.num_layers
        per_layer = np.array(problem.layer_time)
        self.layer_min = per_layer.min(axis=0)
        self.prefix_lb = np.concatenate([[0.0], np.cumsum(self.layer_min)]) * (1 - 1e-9)
        units = np.array([sm.units for sm in problem.submeshes], dtype=float)[:, None]
        # Each stage k: t_k ≥ its layers' time, and t_k · e_k ≥ Σ_l min_c τ_c(l) e_c over its layers;
        # Σ_k e_k = all units, so T ≥ Σ_l min_c τ_c(l) e_c / units.
        work = float((per_layer * units).min(axis=0).sum()) / sum(problem.group_units)
        self.bottleneck_lb = max(float(self.layer_min.max()), work) * (1 - 1e-9)
        self.groups = [sm.group for sm in problem.submeshes]

    def __call__(self, T: float, G: float, budget: float = math.inf):
        pr = self.pr
        base = [(t <= T) & (g <= G) for t, g in zip(pr.time, pr.tail)]
        windows = []  # stage lengths (in layers) that some stage may have under the bounds, per sub-mesh
        for b in base:
            i, j = np.nonzero(b)
            windows.append(np.unique(j - i))
        xfer = np.where(pr.xfer <= T, pr.xfer, np.inf)
        if self.by_remaining is not None:
            flights = [self.by_remaining[s] for s in range(1, max(pr.stage_counts) + 1)]
            return self._run(base, windows, xfer, flights, set(pr.stage_counts), budget)
        best, best_stages = math.inf, None
        for p in pr.stage_counts:
            flights = [pr.in_flight(p, p - s) for s in range(1, p + 1)]
            value, stages = self._run(base, windows, xfer, flights, {p}, budget)
            if value < best:
                best, best_stages = value, stages
        return best, best_stages

    def _matrix(self, base: list[np.ndarray], c: int, flight: float, last: bool, s: int) -> np.ndarray:
        """Stage times of sub-mesh ``c`` as the ``s``-th stage from the end, ``∞`` where not allowed."""
        groups = self.pr.stage_groups
        if groups is not None and groups[len(groups) - s] != self.groups[c]:
            return np.full_like(self.pr.time[c], np.inf)  # the rank layout gives this position another group
        ok = base[c] & self.pr.memory_ok(c, flight, last)
        return np.where(ok, self.pr.time[c], np.inf)

    def _prune(self, F: np.ndarray, budget: float) -> None:
        if math.isfinite(budget):
            F[F + self.prefix_lb[:, None, None] >= budget] = np.inf

    def _run(self, base, windows, xfer, flights, answer_at: set[int], budget: float):
        pr, lay, n = self.pr, self.lay, self.n
        C = len(pr.submeshes)
        F = np.full((n + 1, lay.size, C), np.inf)
        for c in range(C):
            F[:n, lay.start[c], c] = self._matrix(base, c, flights[0], True, 1)[:n, n]
        self._prune(F, budget)
        history = [F]
        best, best_at = math.inf, None
        if 1 in answer_at:
            best, best_at = self._answer(F, 1, best, best_at)
        for s in range(2, len(flights) + 1):
            prev = F
            finite = np.isfinite(prev)
            rows = np.flatnonzero(finite.any(axis=(1, 2)))
            if rows.size == 0:
                break
            cols = np.flatnonzero(finite.any(axis=(0, 2)))
            jlo, jhi = int(rows[0]), int(rows[-1])
            sub = prev[jlo:jhi + 1]
            F = np.full_like(prev, np.inf)
            for c in range(C):
                if not windows[c].size:
                    continue
                src = cols[lay.valid[c][cols]]
                ilo, ihi = max(0, jlo - windows[c][-1]), jhi - 1
                if src.size == 0 or ihi < ilo:
                    continue
                H = self._h(sub[:, src, :], c, xfer[:, c, :, jlo:jhi + 1], src)
                A = self._matrix(base, c, flights[s - 1], False, s)
                # acc[i, u] = min over window w of A[i, i+w] + H[i+w, u], all (i, w) at once
                rows_i = np.arange(ilo, ihi + 1)[:, None]
                J = rows_i + windows[c][None, :]
                inside = (J >= jlo) & (J <= jhi)
                a = np.where(inside, A[rows_i, np.minimum(J, n)], np.inf)
                gathered = H[np.clip(J - jlo, 0, jhi - jlo)]
                gathered += a[:, :, None]
                acc = gathered.min(axis=1)
                F[ilo:ihi + 1, src + lay.shift[c], c] = acc
            self._prune(F, budget)
            history.append(F)
            if s in answer_at:
                best, best_at = self._answer(F, s, best, best_at)
        if best_at is None:
            return math.inf, None
        return best, self._walk(history, best_at, base, xfer, flights)

    def _answer(self, F, s, best, best_at):
        row = F[0, self.lay.full]
        c = int(np.argmin(row))
        if row[c] < best:
            return float(row[c]), (s, c)
        return best, best_at

    def _h(self, nxt: np.ndarray, c: int, x: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """``H[j, u] = min_c' F(j, u, c') + x_{c→c'}(j, link)``: the rest of the pipeline after a cut at j.

        ``nxt``: F restricted to rows j and columns ``cols``; ``x``: transfers [link, c', j] from ``c``.
        """
        H = np.full(nxt.shape[:2], np.inf)
        g = self.groups[c]
        partial = self.lay.partial[g][cols]
        for c2 in range(nxt.shape[2]):
            f = nxt[:, :, c2]
            if self.groups[c2] != g:
                np.minimum(H, f + x[CROSS_GROUP, c2][:, None], out=H)
                continue
            val = f + x[CROSS_NODE, c2][:, None]
            if partial.any():
                val[:, partial] = f[:, partial] + x[SAME_NODE, c2][:, None]
            np.minimum(H, val, out=H)
        return H

    def _walk(self, history, at, base, xfer, flights):
        """Recover the stages of ``F_s(0, full, c)`` by re-deriving each step's minimising term."""
        lay = self.lay
        s, c = at
        i, u = 0, lay.full
        stages = []
        while True:
            target = history[s - 1][i, u, c]
            A = self._matrix(base, c, flights[s - 1], s == 1, s)
            if s == 1:
                assert A[i, self.n] == target
                stages.append((i, self.n, c))
                return tuple(stages)
            u_before = u - int(lay.shift[c])
            for j in range(i + 1, self.n + 1):
                if not np.isfinite(A[i, j]):
                    continue
                hit = [c2 for c2, v in self._h_point(history[s - 2], j, u_before, c, xfer) if A[i, j] + v == target]
                if hit:
                    stages.append((i, j, c))
                    i, u, c, s = j, u_before, hit[0], s - 1
                    break
            else:
                raise AssertionError("DP walk lost its path")

    def _h_point(self, prev: np.ndarray, j: int, u: int, c: int, xfer: np.ndarray) -> list[tuple[int, float]]:
        """Each ``(c', F(j, u, c') + x)`` term of ``H[j, u]`` for sub-mesh ``c`` (same arithmetic as ``_h``)."""
        g = self.groups[c]
        out = []
        for c2, g2 in enumerate(self.groups):
            link = CROSS_GROUP if g2 != g else (SAME_NODE if self.lay.partial[g][u] else CROSS_NODE)
            out.append((c2, prev[j, u, c2] + xfer[link, c, c2, j]))
        return out


def _candidates(values: list[np.ndarray]) -> np.ndarray:
    flat = np.concatenate([v[np.isfinite(v)].ravel() for v in values])
    return np.unique(flat)


def solve_dp(problem: StageProblem, *, time_limit_s: float | None = None,
             incumbents: Sequence[Sequence[tuple[int, int, int]]] = ()) -> DpResult:
    """Exact minimum of the step time (module docstring); best plan and bound at a time limit.

    ``incumbents`` (any assignments, e.g. the baselines) only speed the search up: the best
    feasible one is the first plan to beat.
    """
    start = time.perf_counter()
    sigma = _Sigma(problem)
    finite = [np.isfinite(t) for t in problem.time]
    Tc = _candidates(problem.time + [problem.xfer])
    Gc = _candidates([np.where(f, g, np.inf) for f, g in zip(finite, problem.tail)])
    m1 = problem.m - 1
    best = PlanCost(False, math.inf, reason="no assignment fits")
    best_stages: tuple[tuple[int, int, int], ...] = ()
    for plan in incumbents:
        cost = problem.evaluate(plan)
        if cost.feasible and cost.objective_s < best.objective_s:
            best, best_stages = cost, tuple(plan)
    sigma_lb = float(sigma.prefix_lb[-1])
    a_lo = int(np.searchsorted(Tc, sigma.bottleneck_lb))
    heap: list[tuple[float, int, int, int, int, int, float]] = []
    counter = 0

    def push(a0: int, a1: int, b0: int, b1: int, sig: float) -> None:
        nonlocal counter
        if a0 <= a1 and b0 <= b1:
            counter += 1
            heapq.heappush(heap, (float(m1 * Tc[a0] + Gc[b0] + sig), counter, a0, a1, b0, b1, sig))

    push(a_lo, len(Tc) - 1, 0, len(Gc) - 1, sigma_lb)
    evaluations = 0
    timed_out = checked_top = False
    while heap:
        lb, _, a0, a1, b0, b1, sig = heap[0]
        target = best.objective_s * (1 - _REL)
        if lb >= target:
            break
        if time_limit_s is not None and evaluations and time.perf_counter() - start > time_limit_s:
            timed_out = True
            break
        heapq.heappop(heap)
        if math.isfinite(target):  # cells whose bound alone reaches the best plan are never opened
            if m1 > 0:
                a1 = min(a1, int(np.searchsorted(Tc, (target - Gc[b0] - sig) / m1)) - 1)
            b1 = min(b1, int(np.searchsorted(Gc, target - m1 * Tc[a0] - sig)) - 1)
            if a1 < a0 or b1 < b0:
                continue
        # Probe a bound a little above the box's floor first (plans near the floor have the small
        # bottleneck the objective rewards); the part above the probe keeps the inherited bound.
        ae = a1
        if Tc[a1] > Tc[a0] * _PROBE:
            ae = max(a0, min(a1, int(np.searchsorted(Tc, Tc[a0] * _PROBE, side="right")) - 1))
            push(ae + 1, a1, b0, b1, sig)
        budget = target - m1 * Tc[a0] - Gc[b0]
        evaluations += 1
        value, stages = sigma(float(Tc[ae]), float(Gc[b1]), budget)
        if stages is None and not best.feasible and not checked_top:
            # The first probe found nothing: ask once whether anything fits at all (no bounds). If
            # not, the instance is infeasible; if so, that plan prunes the rest of the search.
            checked_top = True
            evaluations += 1
            top_value, top_stages = sigma(float(Tc[-1]), float(Gc[-1]), math.inf)
            if top_stages is None:
                heap.clear()
                break
            best, best_stages = problem.evaluate(top_stages), top_stages
        if stages is None or value >= budget:
            continue  # infeasible, or nothing in [a0, ae] x [b0, b1] can beat the best plan
        cost = problem.evaluate(stages)
        assert cost.feasible, cost.reason
        if cost.objective_s < best.objective_s:
            best, best_stages = cost, stages
        # Σ* equals `value` on [T', T_ae] x [G', G_b1] (the plan's own bounds): settled. Split the rest.
        ia = max(a0, int(np.searchsorted(Tc, cost.bottleneck_s)))
        ib = max(b0, int(np.searchsorted(Gc, cost.tail_max_s)))
        push(a0, ia - 1, b0, b1, value)
        push(ia, ae, b0, ib - 1, value)
    elapsed = time.perf_counter() - start
    if not best.feasible:
        status = "time_limit" if timed_out else "infeasible"
        return DpResult(status, best, (), math.inf, evaluations, elapsed)
    bound = min([best.objective_s] + [h[0] for h in heap]) if timed_out else best.objective_s
    status = "feasible" if bound < best.objective_s * (1 - _REL) else "optimal"
    return DpResult(status, best, best_stages, float(bound), evaluations, elapsed)
