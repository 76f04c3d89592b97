"""What a stage solve returns: the stages (layers, devices, replication, times, memory) and the solver's report.

Every result carries ``status`` (``optimal`` / ``feasible`` / ``infeasible`` / ``time_limit``),
``objective_s`` (the predicted step time of the returned plan, priced exactly), ``bound_s`` (a
lower bound on the best possible step time) and ``gap`` (``(objective - bound) / objective``).
A ``feasible`` result was stopped by its time limit and is the best plan found so far;
``time_limit`` means the limit passed before any plan was found.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from planner.inter_op.problem import LINKS, PlanCost, StageProblem

STATUSES = ("optimal", "feasible", "infeasible", "time_limit")


@dataclass(frozen=True, kw_only=True)
class StageAssignment:
    """One pipeline stage: its layers, its sub-mesh and what the cost model predicts for it."""

    index: int
    layer_start: int
    layer_stop: int
    layer_names: tuple[str, ...]
    device_group: int  # index into cluster.groups
    device_name: str
    submesh: int  # index into the problem's sub-mesh shapes (StageProblem.submeshes)
    ranks: tuple[int, ...]  # global ranks; replica r runs on ranks[r*tp:(r+1)*tp]
    nodes: tuple[int, ...]  # global node indices
    submesh_shape: tuple[int, int]  # (nodes, devices per node), Alpa's notation
    replicas: int  # data-parallel degree inside the stage
    tp: int
    micro_batch_per_replica: int
    in_flight: float  # micro-batches whose activations a device holds at peak
    stage_time_s: float  # forward + backward of one micro-batch on one replica
    transfer_out_s: float  # to the next stage, activations + gradients, per micro-batch (0 for the last)
    link_out: str | None  # same_node | cross_node | cross_group | None for the last stage
    grad_sync_s: float  # all-reduce over the replicas, once per step
    optimizer_s: float
    memory_bytes: float  # per device, at the schedule's peak
    memory_limit_bytes: float

    @property
    def num_layers(self) -> int:
        return self.layer_stop - self.layer_start


@dataclass(frozen=True, kw_only=True)
class StageSolution:
    """A plan of stages plus the solver's report (see the module docstring for the fields)."""

    method: str
    status: str
    objective_s: float
    bound_s: float
    gap: float | None
    solve_time_s: float
    stages: tuple[StageAssignment, ...]
    bottleneck_s: float  # max over stage times and transfers: the (m-1) term
    latency_sum_s: float  # Σ stage times + Σ transfers: fill and drain
    tail_s: float  # max gradient sync + optimizer over stages
    schedule: str
    num_micro_batches: int
    micro_batch: int
    tp: int
    graph: str
    cluster: str
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def feasible(self) -> bool:
        return bool(self.stages)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def boundaries(self) -> tuple[tuple[int, int], ...]:
        return tuple((s.layer_start, s.layer_stop) for s in self.stages)

    @property
    def assignment(self) -> tuple[tuple[int, int, int], ...]:
        """``(layer_start, layer_stop, submesh)`` per stage: what ``StageProblem.evaluate`` prices."""
        return tuple((s.layer_start, s.layer_stop, s.submesh) for s in self.stages)

    @property
    def layers_per_stage(self) -> tuple[int, ...]:
        return tuple(s.num_layers for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("objective_s", "bound_s", "bottleneck_s", "latency_sum_s", "tail_s"):
            if not math.isfinite(d[key]):
                d[key] = None
        return d

    def summary(self) -> str:
        if not self.feasible:
            return f"{self.method}: {self.status}" + (f" ({'; '.join(self.notes)})" if self.notes else "")
        parts = [f"{s.layer_names[0]}..{s.layer_names[-1]} on {s.device_name} {s.submesh_shape} dp={s.replicas}"
                 for s in self.stages]
        gap = "" if self.gap is None else f", gap {100 * self.gap:.3g}%"
        return (f"{self.method}: {self.status}, step {self.objective_s:.4g} s (bound {self.bound_s:.4g} s{gap}); "
                + " | ".join(parts))


def make_solution(problem: StageProblem, *, method: str, status: str, stages: tuple[tuple[int, int, int], ...],
                  cost: PlanCost | None, bound_s: float | None, solve_time_s: float,
                  notes: tuple[str, ...] = ()) -> StageSolution:
    """Build the report from an assignment; the objective is always ``problem.evaluate``'s."""
    common = dict(method=method, solve_time_s=solve_time_s, schedule=problem.schedule,
                  num_micro_batches=problem.m, micro_batch=problem.micro_batch, tp=problem.tp,
                  graph=problem.graph_name, cluster=problem.cluster.name)
    if not stages or cost is None or not cost.feasible:
        return StageSolution(status=status, objective_s=math.inf, bound_s=bound_s if bound_s is not None else math.inf,
                             gap=None, stages=(), bottleneck_s=math.inf, latency_sum_s=math.inf, tail_s=math.inf,
                             notes=notes, **common)
    out = []
    p = len(stages)
    for k, (i, j, c) in enumerate(stages):
        sm = problem.submeshes[c]
        grp = problem.cluster.groups[sm.group]
        ranks = cost.ranks[k]
        nodes = tuple(sorted({problem.cluster.node_of_rank(r) for r in ranks}))
        out.append(StageAssignment(
            index=k, layer_start=i, layer_stop=j, layer_names=problem.layer_names[i:j], device_group=sm.group,
            device_name=sm.device_name, submesh=c, ranks=ranks, nodes=nodes, submesh_shape=sm.shape(grp.devices_per_node),
            replicas=sm.replicas, tp=problem.tp, micro_batch_per_replica=problem.micro_batch // sm.replicas,
            in_flight=cost.in_flight[k], stage_time_s=cost.stage_time_s[k],
            transfer_out_s=cost.transfer_s[k] if k < p - 1 else 0.0,
            link_out=LINKS[cost.links[k]] if k < p - 1 else None,
            grad_sync_s=float(problem.grad_sync[c][i, j]), optimizer_s=float(problem.optimizer[c][i, j]),
            memory_bytes=cost.memory_bytes[k], memory_limit_bytes=problem.limit[c]))
    bound = cost.objective_s if bound_s is None else min(bound_s, cost.objective_s)
    gap = (cost.objective_s - bound) / cost.objective_s if cost.objective_s > 0 else 0.0
    return StageSolution(status=status, objective_s=cost.objective_s, bound_s=bound, gap=gap, stages=tuple(out),
                         bottleneck_s=cost.bottleneck_s, latency_sum_s=cost.latency_sum_s, tail_s=cost.tail_max_s,
                         notes=notes, **common)
