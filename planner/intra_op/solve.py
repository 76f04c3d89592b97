"""Intra-op sharding: pick a strategy per op group for one layer or a whole model.

``solve_layer`` takes one :class:`OpGraph`; ``solve_model`` takes the tracer's
:class:`CostGraph`, builds the op graph of one representative per run of equal-signature layers
and solves them all in one ILP in which each representative counts as many times as it repeats.
Layer ``i + 1`` of a run reads layer ``i``'s output, so the link from a representative's output to
its own input is charged ``repeats - 1`` times: every copy uses the same sharding and the
96-layer model costs about what one layer does.

The data flow: op graph → groups and strategies (``strategies``) → integer :class:`Problem`
(``ilp``) → chosen strategy per group → :class:`ShardingSolution` (``solution``).
"""

from __future__ import annotations

import difflib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

import numpy as np

from planner.cluster import DeviceSpec
from planner.cost.constants import CostConstants
from planner.errors import InfeasibleError, PlannerError
from planner.intra_op.builder import GraphBuilder
from planner.intra_op.graph import Op, OpGraph
from planner.intra_op.ilp import Pin, Problem, Tie, explain_infeasible, solve_problem
from planner.intra_op.mesh import MeshSpec
from planner.intra_op.placement import Layout, Placement, as_placement, layout_short
from planner.intra_op.solution import LayerSharding, OpSharding, ShardingSolution
from planner.intra_op.strategies import CostModel, Group, GroupStrategy, build_groups, edge_steps

PinValue = Sequence[Placement | str] | str


@dataclass(kw_only=True)
class Unit:
    """One op graph in the ILP, counted ``weight`` times."""

    graph: OpGraph
    weight: int
    groups: list[Group]
    group_of: dict[str, int]
    offset: int = 0

    def strategy(self, choice: Sequence[int], op: str) -> GroupStrategy:
        local = self.group_of[op]
        return self.groups[local].strategies[choice[self.offset + local]]


@dataclass(frozen=True, kw_only=True)
class Flow:
    """A tensor from ``src_op`` of unit ``src`` into ``dst_op`` of unit ``dst``.

    ``index`` is the consumer's operand position; ``None`` means ``dst_op`` is an input op of
    ``dst`` (a link between layers, or a block's output back into its own input).
    """

    src: int
    src_op: str
    dst: int
    dst_op: str
    index: int | None
    weight: int
    nbytes: float
    differentiable: bool


def flow_layouts(flow: Flow, s: GroupStrategy, t: GroupStrategy) -> tuple[Layout, Layout, Layout]:
    out = s.out_layouts[flow.src_op]
    if flow.index is None:
        arrive = t.out_layouts[flow.dst_op]
        return out, arrive, arrive
    return out, t.head.in_layouts[flow.index], t.head.in_grad_layouts[flow.index]


def sink_flow(units: list[Unit], unit: int, out: Op, cm: CostModel) -> Flow:
    """A flow from an output that leaves the solved graph into a sink that takes any non-Partial
    layout: whoever reads it next (the loss, the next pipeline stage) needs the reduced value."""
    b = GraphBuilder(f"sink:{out.name}")
    b.input(out.name, out.out_shape, roles=(None,) * len(out.out_shape))
    graph = b.build()
    groups, group_of = build_groups(graph, cm)
    units.append(Unit(graph=graph, weight=1, groups=groups, group_of=group_of))
    return Flow(src=unit, src_op=out.name, dst=len(units) - 1, dst_op=out.name, index=None, weight=1,
                nbytes=out.out_bytes, differentiable=True)


def internal_flows(unit_index: int, unit: Unit) -> list[Flow]:
    flows = []
    g = unit.graph
    for op in g.ops.values():
        if op.follows or op.is_input:
            continue
        for j, src in enumerate(op.inputs):
            flows.append(Flow(src=unit_index, src_op=src, dst=unit_index, dst_op=op.name, index=j, weight=unit.weight,
                              nbytes=g.ops[src].out_bytes, differentiable=op.differentiable[j]))
    return flows


class Assembly:
    """Units and flows → integer :class:`Problem`; and back from a choice to a solution."""

    def __init__(self, units: list[Unit], flows: list[Flow], cm: CostModel) -> None:
        self.units = units
        self.flows = flows
        self.cm = cm
        offset = 0
        for u in units:
            u.offset = offset
            offset += len(u.groups)
        self.names = [f"{u.graph.name}/{grp.name}" for u in units for grp in u.groups]

    def gid(self, unit: int, op: str) -> int:
        u = self.units[unit]
        return u.offset + u.group_of[op]

    def strategies_of(self, unit: int, op: str) -> tuple[GroupStrategy, ...]:
        u = self.units[unit]
        return u.groups[u.group_of[op]].strategies

    def flow_matrix(self, flow: Flow) -> np.ndarray:
        """Seconds (times the flow's weight) for every pair of producer and consumer strategies."""
        src, dst = self.strategies_of(flow.src, flow.src_op), self.strategies_of(flow.dst, flow.dst_op)
        # the cost depends only on the producer's layout and what the consumer reads: price each pair once
        rows: dict[Layout, int] = {}
        row_of = [rows.setdefault(st.out_layouts[flow.src_op], len(rows)) for st in src]
        cols: dict[tuple[Layout, Layout], int] = {}
        col_of = [cols.setdefault(flow_layouts(flow, src[0], st)[1:], len(cols)) for st in dst]
        small = np.array([[edge_steps(self.cm, flow.nbytes, out, arrive, grad, flow.differentiable)[0]
                           for arrive, grad in cols] for out in rows])
        return small[np.ix_(row_of, col_of)] * flow.weight

    def problem(self, memory_limit: float | None) -> tuple[Problem, float, float]:
        cost = [[u.weight * st.time_s for st in grp.strategies] for u in self.units for grp in u.groups]
        memory = [[u.weight * st.memory_bytes for st in grp.strategies] for u in self.units for grp in u.groups]
        edges: dict[tuple[int, int], np.ndarray] = {}
        for flow in self.flows:
            g, h = self.gid(flow.src, flow.src_op), self.gid(flow.dst, flow.dst_op)
            mat = self.flow_matrix(flow)
            if g == h:  # a group feeding itself (a layer of views): only the diagonal can happen
                cost[g] = [c + mat[s, s] for s, c in enumerate(cost[g])]
            elif not np.any(mat):
                continue
            else:
                edges[(g, h)] = edges[(g, h)] + mat if (g, h) in edges else mat
        biggest = max([max(c) for c in cost if c] + [float(m.max()) for m in edges.values()] + [0.0])
        time_unit = 10.0 ** math.floor(math.log10(biggest / 1e6)) if biggest > 0 else 1e-9
        biggest_mem = max([max(m) for m in memory if m] + [memory_limit or 0.0, 1.0])
        mem_unit = 2.0 ** max(0, math.floor(math.log2(biggest_mem / 2**20)))
        problem = Problem(
            group_names=self.names,
            cost=[[int(round(c / time_unit)) for c in cs] for cs in cost],
            memory=[[int(math.ceil(m / mem_unit)) for m in ms] for ms in memory],
            edges={k: np.rint(m / time_unit).astype(np.int64) for k, m in edges.items()},
            memory_limit=None if memory_limit is None else int(math.floor(memory_limit / mem_unit)))
        return problem, time_unit, mem_unit

    # -- back from a choice -----------------------------------------------------------------------
    def flow_collectives(self, flow: Flow, choice: Sequence[int]):
        s = self.units[flow.src].strategy(choice, flow.src_op)
        t = self.units[flow.dst].strategy(choice, flow.dst_op)
        out, arrive, grad = flow_layouts(flow, s, t)
        _, fwd, bwd = edge_steps(self.cm, flow.nbytes, out, arrive, grad, flow.differentiable)
        at = f"{flow.src_op} -> {flow.dst_op}"
        return self.cm.collectives(fwd, "fwd", at) + self.cm.collectives(bwd, "bwd", at)

    def unit_sharding(self, unit: int, choice: Sequence[int]) -> tuple[dict[str, OpSharding], list, float, float]:
        """Per-op shardings, in-unit collectives, compute seconds and memory bytes of one copy."""
        u = self.units[unit]
        ops: dict[str, OpSharding] = {}
        colls = []
        compute = memory = 0.0
        for grp in u.groups:
            st = grp.strategies[choice[u.offset + u.group_of[grp.name]]]
            colls += st.collectives
            compute += st.compute_s
            memory += st.memory_bytes
            for name in grp.ops:
                op = u.graph.ops[name]
                if name == grp.name:
                    reads = st.head.in_layouts
                    params = {p.name: lay for p, lay in zip(op.params, st.head.param_layouts)}
                else:
                    reads, params = (st.in_layouts[name],), {}
                ops[name] = OpSharding(op=name, kind=op.kind, module_path=op.module_path, strategy=st.name,
                                       head=grp.name, input_layouts=tuple(reads), output_layout=st.out_layouts[name],
                                       param_layouts=params)
        for flow in self.flows:
            if flow.dst == unit and flow.index is not None:
                colls += self.flow_collectives(flow, choice)
        return ops, colls, compute, memory


# -- pins and ties -----------------------------------------------------------------------------------

def _pin_layout(value: PinValue, mesh: MeshSpec, key: str) -> Layout | str:
    if isinstance(value, str):
        try:
            placement = as_placement(value)
        except ValueError:
            return value  # a strategy name such as "tp=column"
        value = [placement]
    layout = tuple(as_placement(v) for v in value)
    if len(layout) != mesh.ndim:
        raise ValueError(f"pins[{key!r}]: got {len(layout)} placements; mesh {mesh.describe()} needs one per axis, "
                         f"e.g. {['Replicate()'] * mesh.ndim}")
    return layout


def _resolve_pins(pins: Mapping[str, PinValue], assembly: Assembly, aliases: Mapping[str, tuple[int, str, str]],
                  mesh: MeshSpec) -> list[Pin]:
    """Pins → allowed strategy sets. ``aliases``: real name → (unit, name in the unit, "param" | "op")."""
    out: list[Pin] = []
    for key, value in pins.items():
        want = _pin_layout(value, mesh, key)
        hits = [key] if key in aliases else [n for n in aliases if fnmatchcase(n, key)]
        if not hits:
            close = difflib.get_close_matches(key, list(aliases), n=3)
            raise ValueError(f"pins[{key!r}]: matches no parameter, op or module; close names: {close}")
        targets = sorted({aliases[h] for h in hits})
        for unit, name, what in targets:
            u = assembly.units[unit]
            if what == "param":
                op = next(o for o in u.graph.ops.values() if any(p.name == name for p in o.params))
                idx = next(i for i, p in enumerate(op.params) if p.name == name)

                def layout_of(st: GroupStrategy, idx=idx) -> Layout:
                    return st.head.param_layouts[idx]
                op_name = op.name
            else:
                op_name = name

                def layout_of(st: GroupStrategy, name=name) -> Layout:
                    return st.out_layouts[name]
            group = u.groups[u.group_of[op_name]]
            allowed = frozenset(s for s, st in enumerate(group.strategies)
                                if (st.name == want if isinstance(want, str) else layout_of(st) == want))
            label = key if len(targets) == 1 else f"{key}@{name}"
            if not allowed:
                options = sorted({st.name if isinstance(want, str) else layout_short(layout_of(st))
                                  for st in group.strategies})
                shown = want if isinstance(want, str) else layout_short(want)
                raise ValueError(f"pins[{key!r}]: {what} {name} cannot be {shown} on mesh {mesh.describe()}; "
                                 f"its possible {'strategies' if isinstance(want, str) else 'layouts'} are {options}")
            out.append(Pin(name=f"pin[{label}]", group=u.offset + u.group_of[op_name], allowed=allowed))
    return out


def _ties(assembly: Assembly) -> list[Tie]:
    """One layout per parameter: a tied parameter's users follow its owner."""
    users: dict[str, list[tuple[int, str, int, bool]]] = {}
    for ui, u in enumerate(assembly.units):
        for op in u.graph.ops.values():
            for idx, p in enumerate(op.params):
                users.setdefault(p.name, []).append((ui, op.name, idx, p.owned))
    ties = []
    for pname, uses in users.items():
        if len(uses) < 2:
            continue
        owner = next((use for use in uses if use[3]), uses[0])
        for use in uses:
            g, h = assembly.gid(owner[0], owner[1]), assembly.gid(use[0], use[1])
            if use is owner or g == h:
                continue
            src = assembly.strategies_of(owner[0], owner[1])
            dst = assembly.strategies_of(use[0], use[1])
            compatible = tuple(frozenset(t for t, tt in enumerate(dst)
                                         if tt.head.param_layouts[use[2]] == ss.head.param_layouts[owner[2]])
                               for ss in src)
            ties.append(Tie(name=f"tied[{pname}]", g=g, h=h, compatible=compatible))
    return ties


# -- the shared solve -----------------------------------------------------------------------------------

@dataclass(kw_only=True)
class Request:
    mesh: MeshSpec
    device: DeviceSpec
    memory_limit_bytes: float | None
    backend: str
    sequence_parallel: bool
    pins: Mapping[str, PinValue]
    time_limit_s: float
    optimizer_bytes_per_param: float
    dtype: str
    what: str
    constants: CostConstants | None = None  # None: CostConstants() (link efficiencies for collectives)


def cost_model(req: Request) -> CostModel:
    return CostModel(mesh=req.mesh, device=req.device, dtype=req.dtype, sequence_parallel=req.sequence_parallel,
                     optimizer_bytes_per_param=req.optimizer_bytes_per_param,
                     constants=req.constants or CostConstants())


def resolved_memory_limit(req: Request) -> float | None:
    limit = req.device.memory_bytes if req.memory_limit_bytes is None else req.memory_limit_bytes
    if limit is not None and limit <= 0:
        raise ValueError(f"memory_limit_bytes: got {limit}; give the bytes per device, or math.inf for no limit")
    return None if limit is None or math.isinf(limit) else float(limit)


def solve_assembly(assembly: Assembly, aliases: Mapping[str, tuple[int, str, str]], req: Request, start: float):
    limit = resolved_memory_limit(req)
    problem, time_unit, mem_unit = assembly.problem(limit)
    problem.pins = _resolve_pins(req.pins or {}, assembly, aliases, req.mesh)
    problem.ties = _ties(assembly)
    build_s = time.perf_counter() - start
    result = solve_problem(problem, backend=req.backend, time_limit_s=req.time_limit_s)
    if result.status == "infeasible":
        conflict = explain_infeasible(problem, backend=req.backend, time_limit_s=req.time_limit_s)
        pinned = sum(min(problem.memory[g][s] for s in _allowed(problem, g)) for g in range(problem.num_groups))
        free = sum(min(m) for m in problem.memory)
        gib = mem_unit / 2**30
        fixes = []
        if "memory_limit" in conflict:
            fixes.append(f"raise memory_limit_bytes to at least {pinned * mem_unit:.4g} "
                         f"({pinned * gib:.2f} GiB; {free * gib:.2f} GiB without pins)")
        fixes += [f"drop or change {name}" for name in conflict if name != "memory_limit"]
        limit_text = f"{limit / 2**30:.2f} GiB" if limit is not None else "none"
        raise InfeasibleError(
            f"intra-op sharding of {req.what} on mesh {req.mesh.describe()} is infeasible: constraints "
            f"{', '.join(conflict)} conflict (memory limit {limit_text} per device). Fix: {'; or '.join(fixes)}.",
            details={"conflict": conflict, "min_memory_bytes": pinned * mem_unit,
                     "min_memory_bytes_without_pins": free * mem_unit})
    if not result.choice:
        raise PlannerError(f"intra-op sharding of {req.what}: {req.backend} found no solution in "
                           f"{req.time_limit_s} s (status {result.status}); raise time_limit_s")
    return result, time_unit, build_s


def _allowed(problem: Problem, g: int) -> list[int]:
    allowed = set(range(len(problem.memory[g])))
    for pin in problem.pins:
        if pin.group == g:
            allowed &= pin.allowed
    return sorted(allowed)


# -- public entry points ---------------------------------------------------------------------------

def solve_layer(op_graph: OpGraph, mesh: MeshSpec, device: DeviceSpec, *, memory_limit_bytes: float | None = None,
                backend: str = "cpsat", sequence_parallel: bool = False, pins: Mapping[str, PinValue] | None = None,
                time_limit_s: float = 30.0, optimizer_bytes_per_param: float = 12.0,
                feeds_itself: bool = True, constants: CostConstants | None = None) -> ShardingSolution:
    """Pick a sharding strategy for every op of ``op_graph`` on ``mesh``.

    ``memory_limit_bytes`` (default: the device's memory; ``math.inf`` for none) bounds the
    parameter, gradient, optimizer and saved-activation bytes per device. ``pins`` maps a
    parameter name, op name or module path (``fnmatch`` patterns allowed) to placements, one per
    mesh axis, or to a strategy name such as ``"tp=column"``. With ``feeds_itself`` (a repeated
    block), a graph with one input and one output of the same shape also pays for turning its
    output layout into its input layout, as the next copy of the block will read it.
    ``constants`` sets the link efficiencies collectives are priced with (:mod:`planner.cost.comm`).
    """
    start = time.perf_counter()
    req = Request(mesh=mesh, device=device, memory_limit_bytes=memory_limit_bytes, backend=backend,
                   sequence_parallel=sequence_parallel, pins=pins or {}, time_limit_s=time_limit_s,
                   optimizer_bytes_per_param=optimizer_bytes_per_param, dtype=op_graph.dtype,
                   what=f"graph {op_graph.name}", constants=constants)
    cm = cost_model(req)
    groups, group_of = build_groups(op_graph, cm)
    unit = Unit(graph=op_graph, weight=1, groups=groups, group_of=group_of)
    flows = internal_flows(0, unit)
    units = [unit]
    inputs = [op for op in op_graph.ops.values() if op.is_input and op.differentiable[0]]
    outs = [op_graph.ops[n] for n in op_graph.outputs]
    if feeds_itself and len(inputs) == 1 and len(outs) == 1 and outs[0].out_shape == inputs[0].out_shape:
        flows.append(Flow(src=0, src_op=outs[0].name, dst=0, dst_op=inputs[0].name, index=None, weight=1,
                           nbytes=outs[0].out_bytes, differentiable=True))
    else:
        for out in outs:
            flows.append(sink_flow(units, 0, out, cm))
    assembly = Assembly(units, flows, cm)
    aliases = graph_aliases(op_graph, 0)
    result, time_unit, build_s = solve_assembly(assembly, aliases, req, start)
    ops, colls, compute, memory = assembly.unit_sharding(0, result.choice)
    colls += [c for f in flows if f.index is None for c in assembly.flow_collectives(f, result.choice)]
    layer = LayerSharding(index=None, name=op_graph.name, reuses=None, ops=ops, collectives=tuple(colls),
                          compute_s=compute, memory_bytes=memory)
    return ShardingSolution.assemble(mesh=mesh, result=result, time_unit_s=time_unit, build_time_s=build_s,
                                     sequence_parallel=sequence_parallel, memory_limit_bytes=resolved_memory_limit(req),
                                     layers=[layer])


def graph_aliases(graph: OpGraph, unit: int) -> dict[str, tuple[int, str, str]]:
    aliases: dict[str, tuple[int, str, str]] = {}
    for op in graph.ops.values():
        if op.is_input:
            continue
        if op.module_path:
            aliases[op.module_path] = (unit, op.name, "op")  # the last op of a module is its output
        aliases[op.name] = (unit, op.name, "op")
        for p in op.params:
            if p.owned or p.name not in aliases:
                aliases[p.name] = (unit, p.name, "param")
    return aliases
