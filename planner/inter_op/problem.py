r"""The stage problem: every number the stage solvers read, priced once by the cost model.

What is decided. The layers ``0 … L-1`` of a cost graph, in its (topological) layer order, are cut
into ``p`` contiguous stages; each stage gets a *sub-mesh* of one node group (one device type):
either a power-of-two slice of one node or whole nodes. A sub-mesh of ``d`` devices runs the
stage with tensor parallelism ``tp`` (fixed, given) and ``r = d / tp`` data-parallel replicas,
which split each micro-batch of ``b`` samples (``b/r`` each, so ``r`` divides ``b``).

Placement. Devices are handed out in pipeline order: inside each node group, stage ``k`` takes
the next free devices (lowest ranks first). A slice must lie inside one node, a whole-node stage
must start on a node boundary, and every device of the cluster is used. This fixes, for each pair
of neighbouring stages, the link between them: the same node (NVLink/NVSwitch of that group),
two nodes of one group (its InfiniBand share per device) or two groups (the slower NIC).

Costs, per micro-batch unless said otherwise (all from :mod:`planner.cost`):

* ``t_k``: forward + backward (+ recomputation + tensor-parallel all-reduces) of stage ``k``'s
  layers on one replica of its device type, at micro-batch ``b/r_k``
  (:func:`~planner.cost.model.layer_table` of that node group).
* ``x_k``: the transfer between stage ``k`` and ``k+1``, forward activations and backward
  gradients: every tensor on a layer-graph edge that crosses the cut, relayed stage to stage (a
  tensor skipping a stage passes through it, as in Megatron/PiPPy), sent by the side with fewer
  replicas, ``b / min(r_k, r_{k+1})`` samples per device (``/tp`` under sequence parallelism).
* ``g_k``, once per step: all-reduce of stage ``k``'s gradients over its ``r_k`` replicas
  (reduce-scatter + all-gather under ZeRO-1), plus its optimizer step.
* memory per device of stage ``k`` at pipeline position ``k`` of ``p``: weights, gradients,
  optimizer state and ``in_flight(schedule, p, k) ×`` its stored activations, plus buffers
  (:func:`~planner.cost.model.stage_memory_matrix`), at most the device's usable memory.

Objective (Alpa's, with the transfers as pipeline stages of their own, as PipeDream counts them,
and the gradient tail of :func:`planner.cost.model.evaluate`):

.. math::

    T_{step} = (m-1)\,\max\big(\max_k t_k, \max_k x_k\big) + \sum_k t_k + \sum_k x_k + \max_k g_k

:meth:`StageProblem.evaluate` prices any assignment from these tables; the brute force, the DP
and the ILP all minimise exactly this number.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from planner import schedules
from planner.cluster import ClusterSpec, NodeGroup
from planner.cost.comm import all_gather_s, all_reduce_s, p2p_s, reduce_scatter_s, strided_group
from planner.cost.constants import CostConstants
from planner.cost.model import LayerTable, stage_memory_matrix, usable_memory_bytes
from planner.errors import SpecError
from planner.intra_op.pricing import ilp_layer_table
from planner.plan import RECOMPUTE, ParallelConfig
from planner.trace.graph import CostGraph

LINKS = ("same_node", "cross_node", "cross_group")
SAME_NODE, CROSS_NODE, CROSS_GROUP = range(3)
SUPPORTED_SCHEDULES = ("1f1b", "gpipe", "zb-h1", "zb-h2")


@dataclass(frozen=True, kw_only=True)
class SubMesh:
    """A shape a stage may take: ``devices`` of node group ``group``, ``replicas`` x ``tp``."""

    index: int
    group: int
    device_name: str
    devices: int
    replicas: int
    units: int  # devices / tp: what the placement counts
    nodes: int  # whole nodes, or 0 for a slice of one node

    @property
    def is_slice(self) -> bool:
        return self.nodes == 0

    def shape(self, devices_per_node: int) -> tuple[int, int]:
        """Alpa's sub-mesh shape: (nodes, devices per node)."""
        return (1, self.devices) if self.is_slice else (self.nodes, devices_per_node)

    def label(self) -> str:
        where = f"{self.devices}/node" if self.is_slice else f"{self.nodes} node{'s' if self.nodes > 1 else ''}"
        return f"{self.device_name} {where} (dp={self.replicas})"


@dataclass(frozen=True)
class PlanCost:
    """The objective of one assignment and its parts; ``feasible`` False says why in ``reason``."""

    feasible: bool
    objective_s: float
    bottleneck_s: float = math.inf
    latency_sum_s: float = math.inf
    tail_max_s: float = math.inf
    stage_time_s: tuple[float, ...] = ()
    transfer_s: tuple[float, ...] = ()
    links: tuple[int, ...] = ()
    tail_s: tuple[float, ...] = ()
    memory_bytes: tuple[float, ...] = ()
    in_flight: tuple[float, ...] = ()
    ranks: tuple[tuple[int, ...], ...] = ()
    reason: str = ""


Assignment = Sequence[tuple[int, int, int]]  # (layer_start, layer_stop, submesh index) per stage


@dataclass
class StageProblem:
    """All tables of one instance; build it with :func:`build_problem`."""

    graph_name: str
    layer_names: tuple[str, ...]
    cluster: ClusterSpec
    schedule: str
    num_micro_batches: int
    micro_batch: int
    tp: int
    submeshes: tuple[SubMesh, ...]
    group_units: tuple[int, ...]  # units (tp-groups) per node group
    group_units_per_node: tuple[int, ...]
    group_first_rank: tuple[int, ...]
    stage_counts: tuple[int, ...]  # allowed numbers of stages
    time: list[np.ndarray]  # [c][i, j]: t of layers [i, j) on sub-mesh c (inf where i >= j)
    layer_time: list[np.ndarray]  # [c][l]: t of layer l alone on sub-mesh c
    grad_sync: list[np.ndarray]  # [c][i, j]
    optimizer: list[np.ndarray]  # [c][i, j]
    xfer: np.ndarray  # [link, ca, cb, j]: transfer at cut j between sub-meshes ca -> cb
    xfer_side: np.ndarray  # [link, c, j]: one side's time; xfer = max of the two sides
    limit: tuple[float, ...]  # usable bytes per device, per sub-mesh
    _tables: list[LayerTable]
    _cfgs: list[ParallelConfig]
    _constants: CostConstants
    # Node group of each pipeline position when the rank layout fixes it (the joint search: position k
    # holds ranks [k·dp·tp, (k+1)·dp·tp)); None lets every stage pick its group.
    stage_groups: tuple[int, ...] | None = None
    _flight: dict[tuple[int, int], float] = field(default_factory=dict)
    _mem: dict[tuple[int, float, bool], np.ndarray] = field(default_factory=dict)
    _ok: dict[tuple[int, float, bool], np.ndarray] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    @property
    def m(self) -> int:
        return self.num_micro_batches

    @cached_property
    def tail(self) -> list[np.ndarray]:
        return [g + o for g, o in zip(self.grad_sync, self.optimizer)]

    def in_flight(self, p: int, k: int) -> float:
        key = (p, k)
        if key not in self._flight:
            self._flight[key] = float(schedules.in_flight(self.schedule, p=p, m=self.m, v=1, device=k))
        return self._flight[key]

    @cached_property
    def flight_by_remaining(self) -> dict[int, float] | None:
        """``{s: in_flight}`` when the count depends only on ``s = p - k`` (stages from the end), else None.

        True for 1F1B (``min(p-k, m)``) and GPipe (``m``): then one DP covers every ``p`` at once.
        """
        out: dict[int, float] = {}
        for p in self.stage_counts:
            for k in range(p):
                value = self.in_flight(p, k)
                if out.setdefault(p - k, value) != value:
                    return None
        return out

    def memory(self, c: int, flight: float, last: bool) -> np.ndarray:
        """Bytes per device of layers [i, j) on sub-mesh ``c`` holding ``flight`` micro-batches."""
        key = (c, flight, last)
        if key not in self._mem:
            mat = stage_memory_matrix(self._tables[c], self._cfgs[c], self._constants, p=2, in_flight=[flight, flight])
            self._mem[key] = mat(1 if last else 0)
        return self._mem[key]

    def memory_ok(self, c: int, flight: float, last: bool) -> np.ndarray:
        key = (c, flight, last)
        if key not in self._ok:
            self._ok[key] = self.memory(c, flight, last) <= self.limit[c]
        return self._ok[key]

    # -- placement ----------------------------------------------------------------------------
    def place(self, configs: Sequence[int]) -> tuple[list[tuple[int, ...]], list[int]] | str:
        """Ranks of each stage and the link after it, placing stages in pipeline order; or why not."""
        used = [0] * len(self.group_units)
        ranks: list[tuple[int, ...]] = []
        for c in configs:
            sm = self.submeshes[c]
            g, upn = sm.group, self.group_units_per_node[sm.group]
            if self.stage_groups is not None and g != self.stage_groups[len(ranks)]:
                return (f"stage {len(ranks)}: the rank layout puts this position on node group "
                        f"{self.stage_groups[len(ranks)]}, not {g}")
            offset = used[g] % upn
            if sm.is_slice and offset + sm.units > upn:
                return f"stage {len(ranks)}: a {sm.devices}-device slice does not fit in the rest of a node"
            if not sm.is_slice and offset:
                return f"stage {len(ranks)}: whole nodes must start on a node boundary"
            if used[g] + sm.units > self.group_units[g]:
                return f"stage {len(ranks)}: node group {g} has no {sm.devices} devices left"
            start = self.group_first_rank[g] + used[g] * self.tp
            ranks.append(tuple(range(start, start + sm.devices)))
            used[g] += sm.units
        if tuple(used) != self.group_units:
            return f"not every device is used ({used} of {list(self.group_units)} tp-groups per node group)"
        links = []
        for a, b in zip(ranks, ranks[1:]):
            ga, gb = (self.cluster.group_of_rank(a[0]), self.cluster.group_of_rank(b[0]))
            if ga is not gb:
                links.append(CROSS_GROUP)
            elif self.cluster.node_of_rank(a[-1]) == self.cluster.node_of_rank(b[0]):
                links.append(SAME_NODE)
            else:
                links.append(CROSS_NODE)
        return ranks, links

    # -- the objective ------------------------------------------------------------------------
    def evaluate(self, stages: Assignment) -> PlanCost:
        """Price an assignment exactly as every solver does (see the module docstring)."""
        p = len(stages)
        if p not in self.stage_counts:
            return PlanCost(False, math.inf, reason=f"{p} stages not allowed (allowed: {list(self.stage_counts)})")
        if stages[0][0] != 0 or stages[-1][1] != self.num_layers or any(
                a[1] != b[0] for a, b in zip(stages, stages[1:])) or any(i >= j for i, j, _ in stages):
            return PlanCost(False, math.inf, reason="stages must cover the layers in order, each non-empty")
        placed = self.place([c for _, _, c in stages])
        if isinstance(placed, str):
            return PlanCost(False, math.inf, reason=placed)
        ranks, links = placed
        times, transfers, tails, mems, flights = [], [], [], [], []
        for k, (i, j, c) in enumerate(stages):
            flight = self.in_flight(p, k)
            mem = float(self.memory(c, flight, k == p - 1)[i, j])
            if mem > self.limit[c]:
                return PlanCost(False, math.inf, reason=f"stage {k} needs {mem / 2**30:.2f} GiB per device, "
                                f"over the {self.limit[c] / 2**30:.2f} GiB limit")
            times.append(float(self.time[c][i, j]))
            tails.append(float(self.tail[c][i, j]))
            mems.append(mem)
            flights.append(flight)
        for k in range(p - 1):
            j = stages[k][1]
            transfers.append(float(self.xfer[links[k], stages[k][2], stages[k + 1][2], j]))
        bottleneck = max(times + transfers)
        total = sum(times) + sum(transfers)
        tail = max(tails)
        objective = (self.m - 1) * bottleneck + total + tail
        return PlanCost(True, objective, bottleneck, total, tail, tuple(times), tuple(transfers), tuple(links),
                        tuple(tails), tuple(mems), tuple(flights), tuple(ranks))


def _group_cluster(cluster: ClusterSpec, g: int) -> ClusterSpec:
    return ClusterSpec(name=f"{cluster.name}[{g}]", groups=(cluster.groups[g],))


def _submeshes(cluster: ClusterSpec, tp: int, micro_batch: int, stage_devices: int | None) -> list[SubMesh]:
    out: list[SubMesh] = []
    for gi, grp in enumerate(cluster.groups):
        dpn = grp.devices_per_node
        sizes = []
        d = tp
        while d < dpn:
            sizes.append((d, 0))
            d *= 2
        sizes += [(n * dpn, n) for n in range(1, grp.nodes + 1)]
        for devices, nodes in sizes:
            if devices % tp or (nodes == 0 and devices & (devices - 1)):
                continue
            if stage_devices is not None and devices != stage_devices:
                continue
            r = devices // tp
            if micro_batch % r:
                continue
            out.append(SubMesh(index=len(out), group=gi, device_name=grp.device.name, devices=devices, replicas=r,
                               units=r, nodes=nodes))
    return out


def _cut_bytes(graph: CostGraph) -> np.ndarray:
    """Per-sample bytes crossing each cut ``j`` (between layers j-1 and j), relayed across stages."""
    n = graph.num_layers
    diff = np.zeros(n + 2)
    for u, v, data in graph.layer_graph.edges(data=True):
        if not u < v:
            raise SpecError("graph.layer_graph", (u, v), "layers must be in a topological order (every edge from a "
                            "lower to a higher index); re-trace the model or reorder its layers")
        diff[u + 1] += data.get("bytes", 0.0)
        diff[v + 1] -= data.get("bytes", 0.0)
    return np.cumsum(diff)[: n + 1]


def _tail_tables(table: LayerTable, grp: NodeGroup, sm: SubMesh, tp: int, zero_stage: int, dtype: str,
                 c: CostConstants) -> tuple[np.ndarray, np.ndarray]:
    """Per step: gradient sync over the stage's replicas (as ``cost.model.evaluate``) and the optimizer step."""
    weight_bytes, grad_bytes, _ = c.state_bytes(dtype)
    params = table.matrices()["params"] / tp
    group = strided_group(ClusterSpec(name="g", groups=(grp,)), sm.replicas, tp)
    values, inverse = np.unique(params.ravel(), return_inverse=True)
    sync = np.zeros(len(values))
    for k, per_device in enumerate(values):
        if per_device <= 0 or sm.replicas == 1:
            continue
        grads = grad_bytes * per_device
        if zero_stage == 0:
            sync[k] = all_reduce_s(grads, group, c)
        else:
            sync[k] = reduce_scatter_s(grads, group, c) + all_gather_s(weight_bytes * per_device, group, c)
    shard = sm.replicas if zero_stage >= 1 else 1
    optim = c.optimizer_step_bytes_per_param * params / shard / (
        grp.device.memory_bandwidth_bytes_per_s * c.memory_bandwidth_efficiency)
    return sync[inverse].reshape(params.shape), optim


def build_problem(graph: CostGraph, cluster: ClusterSpec, *, schedule: str, num_micro_batches: int,
                  micro_batch: int, tp: int = 1, num_stages: int | None = None, sequence_parallel: bool = False,
                  recompute: str = "none", zero_stage: int = 0, stage_devices: int | None = None,
                  constants: CostConstants | None = None,
                  stage_groups: tuple[int, ...] | None = None,
                  group_table: Callable[[int, int], LayerTable] | None = None) -> StageProblem:
    """Price every (layer range, sub-mesh) once; errors name the argument and the fix.

    ``group_table(g, b)`` is node group ``g``'s layer table at ``b`` samples per replica (the joint
    search passes its :class:`planner.pricing.Pricer`'s); by default each is built here with the
    intra-op ILP's tp seconds (:func:`planner.intra_op.pricing.ilp_layer_table`).

    ``stage_devices`` fixes every stage's sub-mesh size (e.g. ``tp × dp`` as Megatron-LM does);
    ``None`` lets each stage choose its own. ``stage_groups`` fixes the node group of each pipeline
    position (one entry per stage; needs ``num_stages``); the DP and the brute force honour it.
    """
    c = constants or CostConstants()
    info = schedules.get_schedule(schedule)
    if info.name not in SUPPORTED_SCHEDULES:
        raise SpecError("schedule", schedule, f"the stage solver handles synchronous one-chunk schedules "
                        f"{list(SUPPORTED_SCHEDULES)}; price others with planner.cost.model.evaluate")
    for name, value in (("num_micro_batches", num_micro_batches), ("micro_batch", micro_batch), ("tp", tp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SpecError(name, value, "expected a positive integer")
    if recompute not in RECOMPUTE:
        raise SpecError("recompute", recompute, f"use one of {list(RECOMPUTE)}")
    if zero_stage not in (0, 1):
        raise SpecError("zero_stage", zero_stage, "pipeline stages support ZeRO 0 or 1 (as the search does)")
    if sequence_parallel and tp == 1:
        raise SpecError("sequence_parallel", True, "sequence parallelism needs tp > 1")
    for g in cluster.groups:
        if g.devices_per_node % tp:
            raise SpecError("tp", tp, f"tp must divide devices_per_node ({g.devices_per_node} on "
                            f"{g.device.name}); tensor parallelism stays inside a node")
    n = graph.num_layers
    if n < 1:
        raise SpecError("graph", graph.name, "the cost graph has no layers")
    subs = _submeshes(cluster, tp, micro_batch, stage_devices)
    if not subs:
        if stage_devices is not None:
            raise SpecError("stage_devices", stage_devices, "no sub-mesh has this many devices with this tp and "
                            "micro-batch; use a power-of-two slice of a node or whole nodes, tp x (a divisor of "
                            "the micro-batch)")
        raise SpecError("micro_batch", micro_batch, "no sub-mesh shape divides it into replicas; use a micro-batch "
                        "divisible by the replica counts (powers of two)")
    units = tuple(g.num_devices // tp for g in cluster.groups)
    max_p = min(n, sum(units))
    counts = []
    for p in range(1, max_p + 1):
        try:
            info.validate(p, num_micro_batches, 1)
        except ValueError:
            continue
        counts.append(p)
    if num_stages is not None:
        if num_stages not in counts:
            raise SpecError("num_stages", num_stages, f"allowed here: {counts[0]}..{counts[-1]} (at most one stage "
                            f"per layer and per tp-group, and what {schedule} accepts for m={num_micro_batches})"
                            if counts else "no stage count is allowed")
        counts = [num_stages]
    if stage_groups is not None:
        if num_stages is None or len(stage_groups) != num_stages:
            raise SpecError("stage_groups", stage_groups, "give one node group per stage and num_stages = its length")
        if any(not 0 <= g < len(cluster.groups) for g in stage_groups):
            raise SpecError("stage_groups", stage_groups, f"node groups are 0..{len(cluster.groups) - 1}")
        stage_groups = tuple(int(g) for g in stage_groups)
    firsts, acc = [], 0
    for g in cluster.groups:
        firsts.append(acc)
        acc += g.num_devices
    time, layer_time, sync, optim, tables, cfgs, limits = [], [], [], [], [], [], []
    group_tables: dict[tuple[int, int], LayerTable] = {}
    for sm in subs:
        grp = cluster.groups[sm.group]
        per_replica = micro_batch // sm.replicas
        key = (sm.group, per_replica)
        if key not in group_tables:
            group_tables[key] = group_table(sm.group, per_replica) if group_table is not None else ilp_layer_table(
                graph, cluster.group_view(sm.group), micro_batch=per_replica, tp=tp,
                sequence_parallel=sequence_parallel, recompute=recompute, c=c)
        table = group_tables[key]
        prefix = np.concatenate([[0.0], np.cumsum(table.total_s)])
        seg = prefix[None, :] - prefix[:, None]
        seg[np.tril_indices(n + 1)] = np.inf
        time.append(seg)
        layer_time.append(np.asarray(table.total_s, dtype=float))
        s, o = _tail_tables(table, grp, sm, tp, zero_stage, getattr(table, "dtype", graph.dtype), c)
        sync.append(s)
        optim.append(o)
        tables.append(table)
        cfgs.append(ParallelConfig(dp=sm.replicas, tp=tp, pp=1, micro_batch_size=per_replica, recompute=recompute,
                                   sequence_parallel=sequence_parallel, zero_stage=zero_stage))
        limits.append(usable_memory_bytes(_group_cluster(cluster, sm.group), c))
    cut = _cut_bytes(graph) * micro_batch / (tp if sequence_parallel else 1)
    # Megatron's scatter/gather (cost.model's p2p): each tp rank sends 1/tp, the receiver
    # all-gathers over NVLink; sequence-parallel activations are already split.
    scatter = tp > 1 and not sequence_parallel and getattr(c, "pp_scatter_gather", False)
    # One side of a cut: sub-mesh c sends (or receives) its replicas' share over a link class.
    side = np.zeros((3, len(subs), n + 1))
    for sm in subs:
        tp_group = strided_group(_group_cluster(cluster, sm.group), tp, 1)
        for link in (SAME_NODE, CROSS_NODE, CROSS_GROUP):
            net = cluster if link == CROSS_GROUP else _group_cluster(cluster, sm.group)
            for j, x in enumerate(cut / sm.replicas):
                if scatter:
                    t = p2p_s(float(x) / tp, same_node=link == SAME_NODE, cluster=net, c=c) + all_gather_s(
                        float(x), tp_group, c)
                else:
                    t = p2p_s(float(x), same_node=link == SAME_NODE, cluster=net, c=c)
                side[link, sm.index, j] = 2 * t  # activations forward, their gradients backward
    # The side with fewer replicas moves more bytes per device and sets the time: max of the two sides.
    xfer = np.full((3, len(subs), len(subs), n + 1), np.inf)
    for a in subs:
        for b in subs:
            links = [CROSS_GROUP] if a.group != b.group else [CROSS_NODE] + ([SAME_NODE] if a.is_slice and b.is_slice
                                                                           else [])
            for link in links:
                xfer[link, a.index, b.index] = np.maximum(side[link, a.index], side[link, b.index])
    return StageProblem(graph_name=graph.name, layer_names=tuple(layer.name for layer in graph.layers),
                        cluster=cluster, schedule=info.name, num_micro_batches=num_micro_batches,
                        micro_batch=micro_batch, tp=tp, submeshes=tuple(subs), group_units=units,
                        group_units_per_node=tuple(g.devices_per_node // tp for g in cluster.groups),
                        group_first_rank=tuple(firsts), stage_counts=tuple(counts), time=time, layer_time=layer_time,
                        grad_sync=sync,
                        optimizer=optim, xfer=xfer, xfer_side=side, limit=tuple(limits), _tables=tables, _cfgs=cfgs, _constants=c,
                        stage_groups=stage_groups)
