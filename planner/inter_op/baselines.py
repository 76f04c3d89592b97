"""The partitions people use without a solver, priced on the same cost graph as the solver's plans.

Each baseline gives every stage the same sub-mesh size (the whole cluster split evenly, node
groups in rank order) and cuts the layers by its own rule; the solver's objective prices the
result, and a baseline keeps its best stage count.

* ``uniform``: equal layer counts, the remainder on the first stages (DeepSpeed
  ``PipelineModule(partition_method="uniform")``, Megatron's default).
* ``parameters``: DeepSpeed ``partition_method="parameters"``: ``ds_utils.partition_balanced``
  over each layer's parameter count (a tied layer counts its shared weights again, as DeepSpeed
  builds them in each stage). Current DeepSpeed solves the linear partition problem by dynamic
  programming, minimising the spread ``max - min`` of the part weights; reimplemented here.
* ``time``: torchgpipe's ``balance_by_time``: per-layer times (torchgpipe measures them with
  ``profile_times``, summed integer microseconds; here the cost model's forward + backward time of
  each layer on stage 0's device, in integer microseconds), split by ``blockpartition.solve``,
  the block-partition heuristic of Bárány and Grinberg ("Block partitions of sequences", 2015).
  Reimplemented here: torchgpipe (last release 0.0.7, 2020) does not install with our torch 2.13.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from planner.inter_op.chain import uniform_partition
from planner.inter_op.problem import PlanCost, StageProblem
from planner.trace.graph import CostGraph

BASELINES = ("uniform", "parameters", "time")


def deepspeed_partition_balanced(weights: Sequence[float], num_parts: int) -> list[int]:
    """Part boundaries ``[0, …, n]`` minimising ``max - min`` part weight (DeepSpeed's DP, ties to later cuts)."""
    n, m = len(weights), num_parts
    if n <= m:
        return [min(k, n) for k in range(m + 1)]
    prefix = np.concatenate([[0.0], np.cumsum(np.asarray(weights, dtype=float))])
    dp_max = np.full((n + 1, m + 1), np.inf)
    dp_min = np.full((n + 1, m + 1), np.inf)
    dp_cost = np.full((n + 1, m + 1), np.inf)
    position = np.zeros((n + 1, m + 1), dtype=int)
    dp_max[0, 0] = 0.0
    dp_cost[0, 0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, min(i, m) + 1):
            seg = prefix[i] - prefix[:i]
            hi = np.maximum(dp_max[:i, j - 1], seg)
            lo = np.minimum(dp_min[:i, j - 1], seg)
            with np.errstate(invalid="ignore"):
                cost = hi - lo
            cost = np.where(np.isnan(cost), np.inf, cost)
            # DeepSpeed scans k upwards and keeps the last k with cost <= the best so far.
            k = int(np.flatnonzero(cost == cost.min())[-1]) if np.isfinite(cost.min()) else i - 1
            if dp_cost[i, j] >= cost[k]:
                dp_cost[i, j], dp_max[i, j], dp_min[i, j], position[i, j] = cost[k], hi[k], lo[k], k
    parts = [n]
    for j in range(m, 0, -1):
        parts.append(int(position[parts[-1], j]))
    return parts[::-1]


def block_partition(sequence: Sequence[int], partitions: int) -> list[int]:
    """Bárány–Grinberg block partition as torchgpipe runs it; returns the block sizes.

    Start from equal-length blocks; repeatedly take a heaviest block ``p`` and a lightest block
    ``q`` closest to it, and move one element into ``q`` from its neighbour on ``p``'s side, until
    the heaviest exceeds the lightest by at most one (weights scaled to [0, 1] by min and max).
    """
    n = len(sequence)
    if partitions < 1 or n < partitions:
        raise ValueError(f"partitions: got {partitions}; need 1 <= partitions <= {n} (the sequence length)")
    lo, span = min(sequence), max(sequence) - min(sequence)
    w = [0.0 if span == 0 else (x - lo) / span for x in sequence]
    ends = [n // partitions * (k + 1) for k in range(partitions - 1)] + [n]

    def size(k: int) -> float:
        return sum(w[(ends[k - 1] if k else 0):ends[k]])

    while True:
        heaviest, p = max((size(k), k) for k in range(partitions))
        while True:
            lightest, q = min((size(k), k) for k in range(partitions))
            if heaviest <= lightest + 1:
                starts = [0] + ends[:-1]
                return [b - a for a, b in zip(starts, ends)]
            if p < q:  # the block before q gives up its last element
                h = q - 1
                ends[h] -= 1
            else:  # the block after q gives up its first element
                h = q + 1
                ends[q] += 1
            if p == h:
                break


def _cuts_from_sizes(sizes: Sequence[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for s in sizes:
        out.append((start, start + s))
        start += s
    return out


def equal_submesh_sequence(problem: StageProblem, p: int) -> list[int] | None:
    """Sub-mesh of each of ``p`` equal stages in rank order (node groups one after another), or None."""
    total = sum(problem.group_units)
    if total % p:
        return None
    units = total // p
    seq: list[int] = []
    for g, g_units in enumerate(problem.group_units):
        if g_units % units:
            return None
        match = [sm.index for sm in problem.submeshes if sm.group == g and sm.units == units]
        if not match:
            return None
        seq += [match[0]] * (g_units // units)
    return seq if not isinstance(problem.place(seq), str) else None


def baseline_cuts(method: str, graph: CostGraph, problem: StageProblem, p: int, first_submesh: int
                  ) -> list[tuple[int, int]]:
    """Layer ranges of ``p`` stages by a baseline rule."""
    if method == "uniform":
        n = problem.num_layers
        return list(uniform_partition(n, p))
    if method == "parameters":
        counts = [layer.total_param_count for layer in graph.layers]
        bounds = deepspeed_partition_balanced(counts, p)
        return [(a, b) for a, b in zip(bounds, bounds[1:])]
    if method == "time":
        micros = [int(t * 1_000_000) for t in problem.layer_time[first_submesh]]
        return _cuts_from_sizes(block_partition(micros, p))
    raise ValueError(f"method: got {method!r}; use one of {BASELINES}")


def baseline_plans(method: str, graph: CostGraph, problem: StageProblem
                   ) -> list[tuple[PlanCost, tuple[tuple[int, int, int], ...]]]:
    """Every allowed stage count's plan by ``method`` (feasible or not), priced by the solver's objective."""
    out = []
    for p in problem.stage_counts:
        seq = equal_submesh_sequence(problem, p)
        if seq is None:
            continue
        cuts = baseline_cuts(method, graph, problem, p, seq[0])
        if any(a >= b for a, b in cuts):
            continue  # DeepSpeed can return empty parts when layers are few; those are not plans
        stages = tuple((a, b, c) for (a, b), c in zip(cuts, seq))
        out.append((problem.evaluate(stages), stages))
    return out


def best_baseline(method: str, graph: CostGraph, problem: StageProblem
                  ) -> tuple[PlanCost, tuple[tuple[int, int, int], ...]]:
    best: tuple[PlanCost, tuple[tuple[int, int, int], ...]] = (PlanCost(False, math.inf, reason="no plan fits"), ())
    for cost, stages in baseline_plans(method, graph, problem):
        if cost.feasible and cost.objective_s < best[0].objective_s:
            best = (cost, stages)
    return best
