"""``solve_model``: intra-op sharding of a traced model, each run of repeated layers solved once.

Consecutive layers with equal signature (``CostGraph.groups()``) have the same ops in the same
order, so layer ``i`` of a run is its first layer with names swapped position by position. One
op graph is built per run and enters the ILP with weight = run length; the tensors between
layers become flows between those op graphs (a run's output into its own input ``len - 1``
times). The ILP is the size of the distinct layers, not of the model.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from planner.cluster import DeviceSpec
from planner.cost.constants import CostConstants
from planner.intra_op.from_trace import (
    activation_nodes,
    external_inputs,
    layer_nodes,
    layer_op_graph,
)
from planner.intra_op.graph import OpGraph
from planner.intra_op.ilp import IlpResult
from planner.intra_op.mesh import MeshSpec
from planner.intra_op.placement import Replicate
from planner.intra_op.solution import LayerSharding, OpSharding, ShardingSolution
from planner.intra_op.solve import (
    Assembly,
    Flow,
    PinValue,
    Request,
    Unit,
    cost_model,
    internal_flows,
    resolved_memory_limit,
    sink_flow,
    solve_assembly,
)
from planner.intra_op.strategies import CostModel, build_groups

if TYPE_CHECKING:  # the tracer imports torch; reading its graph does not need it
    from planner.trace.graph import CostGraph


def _runs(cost_graph: CostGraph, chosen: list[int], nodes: dict[int, list[str]]) -> list[list[int]]:
    """Runs of consecutive chosen layers with equal signature and equal op count."""
    runs: list[list[int]] = []
    signature = {layer.index: layer.signature for layer in cost_graph.layers}
    for li in chosen:
        last = runs[-1][-1] if runs else None
        if (last is not None and last == li - 1 and signature[last] == signature[li]
                and len(nodes[last]) == len(nodes[li])):
            runs[-1].append(li)
        else:
            runs.append([li])
    return runs


def _renames(cost_graph: CostGraph, rep: int, layer: int, nodes: dict[int, list[str]],
             inputs: dict[int, list[str]]) -> dict[str, str]:
    """Name in the representative → name in ``layer``: ops, inputs, constant ids and parameters."""
    g = cost_graph.ops
    out: dict[str, str] = {}
    for a, b in zip(nodes[rep], nodes[layer]):
        out[a] = b
        out[f"{a}.ids"] = f"{b}.ids"
        for pa, pb in zip(g.nodes[a]["params"], g.nodes[b]["params"]):
            out[pa] = pb
    out.update(zip(inputs[rep], inputs[layer]))
    return out


def _rename_sharding(s: OpSharding, names: Mapping[str, str], module_paths: Mapping[str, str]) -> OpSharding:
    op = names.get(s.op, s.op)
    module_path = module_paths.get(op, s.module_path) if s.module_path else s.module_path
    return OpSharding(op=op, kind=s.kind, module_path=module_path, strategy=s.strategy,
                      head=names.get(s.head, s.head), input_layouts=s.input_layouts, output_layout=s.output_layout,
                      param_layouts={names.get(n, n): lay for n, lay in s.param_layouts.items()})


def _rename_at(at: str, names: Mapping[str, str]) -> str:
    return " -> ".join(names.get(part, part) for part in at.split(" -> "))


_OP_GRAPHS_KEPT = 256  # op graphs per _Prep: ~3 distinct layers x the micro-batches a search tries


@dataclass(kw_only=True)
class _Prep:
    """What a model solve needs from the graph that does not depend on the batch or the mesh, and
    the layers' op graphs per batch size (they do not depend on the mesh)."""

    chosen: list[int]
    nodes: dict[int, list[str]]
    active: set[str]
    inputs: dict[int, list[str]]
    runs: list[list[int]]
    renames: dict[int, dict[str, str]]
    to_rep: dict[int, dict[str, str]]
    leaves: dict[tuple[int, str], bool] = field(default_factory=dict)
    op_graphs: dict[tuple[int, int | None], OpGraph] = field(default_factory=dict)

    def op_graph(self, cost_graph: CostGraph, layer: int, batch_size: int | None) -> OpGraph:
        """Layer ``layer``'s op graph at ``batch_size`` (cached). It depends on neither the mesh nor
        the sequence parallelism, so the search's solves at one micro-batch and several tp degrees
        share it; nothing downstream mutates an op graph."""
        key = (layer, batch_size)
        graph = self.op_graphs.get(key)
        if graph is None:
            if len(self.op_graphs) >= _OP_GRAPHS_KEPT:  # a long search over many micro-batches: keep recent ones
                self.op_graphs.pop(next(iter(self.op_graphs)))
            graph = self.op_graphs[key] = layer_op_graph(cost_graph, layer, batch_size=batch_size, active=self.active,
                                                         nodes=self.nodes[layer])
        return graph


def _leaves(prep: _Prep, g, li: int, real: str) -> bool:
    """Whether op ``real`` of layer ``li`` is read outside the solved layers (or by nobody): it must
    leave reduced. Cached: it depends on the graph only."""
    key = (li, real)
    if key not in prep.leaves:
        readers = {g.nodes[s]["layer"] for s in g.successors(real)} - {li}
        prep.leaves[key] = not readers or not readers <= set(prep.chosen)
    return prep.leaves[key]


_PREP: dict[tuple[int, tuple[int, ...]], tuple[weakref.ref, _Prep]] = {}


def _prep(cost_graph: CostGraph, chosen: list[int]) -> _Prep:
    """Whole-graph scans and the copy → representative renames, once per graph and layer set
    (the joint search solves the same graph for many micro-batches and tp degrees)."""
    key = (id(cost_graph), tuple(chosen))
    hit = _PREP.get(key)
    if hit is not None and hit[0]() is cost_graph:
        return hit[1]
    nodes = layer_nodes(cost_graph)
    active = activation_nodes(cost_graph)
    inputs = {li: external_inputs(cost_graph, nodes[li], active) for li in chosen}
    runs = _runs(cost_graph, chosen, nodes)
    rep_of = {li: run[0] for run in runs for li in run}
    renames = {li: _renames(cost_graph, rep_of[li], li, nodes, inputs) for li in chosen}
    prep = _Prep(chosen=chosen, nodes=nodes, active=active, inputs=inputs, runs=runs, renames=renames,
                 to_rep={li: {b: a for a, b in renames[li].items()} for li in chosen})
    if len(_PREP) > 64:  # a long-lived process planning many models: keep the recent ones
        _PREP.pop(next(iter(_PREP)))
    _PREP[key] = (weakref.ref(cost_graph), prep)
    return prep


def layers_without_ops(cost_graph: CostGraph) -> list[int]:
    """Layers the trace has no op-level nodes for (a graph built from one traced block, say):
    the ILP has nothing to shard there, so it cannot price them."""
    prep = _prep(cost_graph, list(range(cost_graph.num_layers)))
    return [li for li in prep.chosen if not prep.nodes.get(li)]


@dataclass(kw_only=True)
class ModelSolve:
    """One solved model ILP before it is expanded into per-layer shardings.

    Pricing needs only each layer's collective seconds (:meth:`layer_comm_s`); the plan needs the
    full :class:`ShardingSolution` (:meth:`solution`), built from the same choice on demand, so
    the figures the search prices with and the placements the plan carries are one solve.
    """

    cost_graph: CostGraph
    mesh: MeshSpec
    sequence_parallel: bool
    memory_limit_bytes: float | None
    prep: _Prep
    units: list[Unit]
    unit_of: dict[int, int]
    assembly: Assembly
    layer_links: dict[int, list[tuple[Flow, str]]]
    result: IlpResult
    time_unit_s: float
    build_time_s: float
    _per_unit: dict[int, tuple] = field(default_factory=dict)
    _solution: ShardingSolution | None = None

    def _unit(self, ui: int) -> tuple:
        if ui not in self._per_unit:
            self._per_unit[ui] = self.assembly.unit_sharding(ui, self.result.choice)
        return self._per_unit[ui]

    def layer_comm_s(self) -> dict[int, dict[str, float]]:
        """Seconds of each solved layer's collectives by phase (``fwd``, ``bwd``, ``grad_sync``),
        the same figures :meth:`solution` reports per layer."""
        out: dict[int, dict[str, float]] = {}
        link_cache: dict[tuple, list] = {}
        # the copies of a block sum the same collectives in the same order: add them up once
        # (the same float additions, so the same bits as summing every layer)
        summed: dict[tuple, dict[str, float]] = {}
        for li in self.prep.chosen:
            ui = self.unit_of[li]
            keys = tuple((flow.src, flow.src_op, flow.dst, flow.dst_op, flow.nbytes) for flow, _ in self.layer_links[li])
            phases = summed.get((ui, keys))
            if phases is None:
                phases = {"fwd": 0.0, "bwd": 0.0, "grad_sync": 0.0}
                for c in self._unit(ui)[1]:
                    phases[c.phase] += c.time_s
                for (flow, _), key in zip(self.layer_links[li], keys):
                    if key not in link_cache:
                        link_cache[key] = self.assembly.flow_collectives(flow, self.result.choice)
                    for c in link_cache[key]:
                        phases[c.phase] += c.time_s
                summed[(ui, keys)] = phases
            out[li] = dict(phases)
        return out

    def layer_replicated(self) -> dict[int, tuple[float, float, float]]:
        """Each solved layer's shares left whole on every tp rank by the chosen strategies: of its FLOPs
        (forward + backward), of its own parameters' elements and of its saved activations. An op is
        whole when no input, output or parameter of it is sharded (a ``replicate`` strategy, or a
        follower of one); the cost model charges those shares at tp = 1 (:func:`planner.cost.layer_table.layer_table`)."""
        per_unit: dict[int, tuple[float, float, float]] = {}
        for ui in {self.unit_of[li] for li in self.prep.chosen}:
            ops, _, _, _ = self._unit(ui)
            graph = self.units[ui].graph
            whole, total = [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]
            for name, sharding in ops.items():
                op = graph.ops[name]
                amounts = (op.fwd_flops + op.bwd_flops, float(sum(p.numel for p in op.params if p.owned)),
                           op.saved_bytes)
                layouts = (*sharding.input_layouts, sharding.output_layout, *sharding.param_layouts.values())
                split = any(not isinstance(place, Replicate) for layout in layouts for place in layout)
                for k, amount in enumerate(amounts):
                    total[k] += amount
                    whole[k] += 0.0 if split else amount
            per_unit[ui] = tuple(w / t if t > 0 else 0.0 for w, t in zip(whole, total))  # type: ignore[assignment]
        return {li: per_unit[self.unit_of[li]] for li in self.prep.chosen}

    def solution(self) -> ShardingSolution:
        """The per-layer :class:`ShardingSolution` of this solve (built once)."""
        if self._solution is None:
            self._solution = self._expand()
        return self._solution

    def _expand(self) -> ShardingSolution:
        cg, prep = self.cost_graph, self.prep
        g = cg.ops
        module_paths = {n: d["module_path"] for n, d in g.nodes(data=True)}  # a copy's ops live in its own modules
        rep_of = {li: run[0] for run in prep.runs for li in run}
        out_layers = []
        for li in prep.chosen:
            ops, colls, compute, memory = self._unit(self.unit_of[li])
            names = prep.renames[li]
            colls = [replace(c, at=_rename_at(c.at, names)) for c in colls]
            colls += [replace(c, at=at) for f, at in self.layer_links[li]
                      for c in self.assembly.flow_collectives(f, self.result.choice)]
            rep = rep_of[li]
            out_layers.append(LayerSharding(
                index=li, name=cg.layers[li].name,
                reuses=None if rep == li else cg.layers[rep].name,
                ops={names.get(k, k): _rename_sharding(s, names, module_paths) for k, s in ops.items()},
                collectives=tuple(colls), compute_s=compute, memory_bytes=memory))
        return ShardingSolution.assemble(mesh=self.mesh, result=self.result, time_unit_s=self.time_unit_s,
                                         build_time_s=self.build_time_s, sequence_parallel=self.sequence_parallel,
                                         memory_limit_bytes=self.memory_limit_bytes, layers=out_layers)


def solve_model(cost_graph: CostGraph, mesh: MeshSpec, device: DeviceSpec, *, batch_size: int | None = None,
                layers: Sequence[int] | None = None, memory_limit_bytes: float | None = None, backend: str = "cpsat",
                sequence_parallel: bool = False, pins: Mapping[str, PinValue] | None = None,
                time_limit_s: float = 30.0, optimizer_bytes_per_param: float = 12.0,
                constants: CostConstants | None = None) -> ShardingSolution:
    """Shard every layer of ``cost_graph`` (or only ``layers``, e.g. one pipeline stage) on ``mesh``.

    ``batch_size`` is the samples one step runs on this mesh (default: the traced batch).
    ``memory_limit_bytes`` bounds the total over the solved layers, per device. A pin on one copy
    of a repeated layer (``"blocks.3.mlp.fc1.weight"``) pins every copy, as they share a solve.
    Outputs that leave the solved layers are reduced (never left ``Partial``). ``constants`` sets
    the link efficiencies collectives are priced with (:mod:`planner.cost.comm`).
    """
    return solve_model_ilp(cost_graph, mesh, device, batch_size=batch_size, layers=layers,
                           memory_limit_bytes=memory_limit_bytes, backend=backend,
                           sequence_parallel=sequence_parallel, pins=pins, time_limit_s=time_limit_s,
                           optimizer_bytes_per_param=optimizer_bytes_per_param, constants=constants).solution()


def solve_model_ilp(cost_graph: CostGraph, mesh: MeshSpec, device: DeviceSpec, *, batch_size: int | None = None,
                    layers: Sequence[int] | None = None, memory_limit_bytes: float | None = None,
                    backend: str = "cpsat", sequence_parallel: bool = False,
                    pins: Mapping[str, PinValue] | None = None, time_limit_s: float = 30.0,
                    optimizer_bytes_per_param: float = 12.0, constants: CostConstants | None = None) -> ModelSolve:
    """:func:`solve_model`, stopped before the per-layer expansion (see :class:`ModelSolve`)."""
    start = time.perf_counter()
    n = cost_graph.num_layers
    chosen = sorted(set(range(n) if layers is None else layers))
    if not chosen or chosen[0] < 0 or chosen[-1] >= n:
        raise ValueError(f"layers: got {layers!r}; give indices in 0..{n - 1}")
    req = Request(mesh=mesh, device=device, memory_limit_bytes=memory_limit_bytes, backend=backend,
                   sequence_parallel=sequence_parallel, pins=pins or {}, time_limit_s=time_limit_s,
                   optimizer_bytes_per_param=optimizer_bytes_per_param, dtype=cost_graph.dtype,
                   what=f"model {cost_graph.name}", constants=constants)
    cm = cost_model(req)
    prep = _prep(cost_graph, chosen)
    units, unit_of = _units(cost_graph, prep, batch_size, cm)
    flows, layer_links = _flows(cost_graph, prep, units, unit_of, cm)
    assembly = Assembly(units, flows, cm)
    aliases = _pin_aliases(cost_graph, prep, units, unit_of) if pins else {}  # without pins nothing reads them
    result, time_unit, build_s = solve_assembly(assembly, aliases, req, start)
    return ModelSolve(cost_graph=cost_graph, mesh=mesh, sequence_parallel=sequence_parallel,
                      memory_limit_bytes=resolved_memory_limit(req), prep=prep, units=units, unit_of=unit_of,
                      assembly=assembly, layer_links=layer_links, result=result, time_unit_s=time_unit,
                      build_time_s=build_s)


def _units(cost_graph: CostGraph, prep: _Prep, batch_size: int | None,
           cm: CostModel) -> tuple[list[Unit], dict[int, int]]:
    """One ILP unit per run of repeated layers (its first layer's op graph, weighted by the run's
    length), and each chosen layer's unit."""
    units: list[Unit] = []
    unit_of: dict[int, int] = {}
    for run in prep.runs:
        graph = prep.op_graph(cost_graph, run[0], batch_size)
        groups, group_of = build_groups(graph, cm)
        units.append(Unit(graph=graph, weight=len(run), groups=groups, group_of=group_of))
        for li in run:
            unit_of[li] = len(units) - 1
    return units, unit_of


def _flows(cost_graph: CostGraph, prep: _Prep, units: list[Unit], unit_of: dict[int, int],
           cm: CostModel) -> tuple[list[Flow], dict[int, list[tuple[Flow, str]]]]:
    """Every flow of the ILP: inside each unit, between units (equal links of several layers merged
    into one weighted flow) and out of the solved layers; and per layer, its links with real names
    (what the expansion prices again per layer)."""
    inputs, renames, to_rep = prep.inputs, prep.renames, prep.to_rep
    rep_of = {li: run[0] for run in prep.runs for li in run}
    flows: list[Flow] = [f for ui in range(len(units)) for f in internal_flows(ui, units[ui])]
    layer_links: dict[int, list[tuple[Flow, str]]] = {li: [] for li in prep.chosen}  # with real names
    weights: dict[tuple, int] = {}
    protos: dict[tuple, Flow] = {}
    g = cost_graph.ops
    for li in prep.chosen:
        rep_inputs = inputs[rep_of[li]]
        for pos, producer in enumerate(inputs[li]):
            src_layer = g.nodes[producer]["layer"]
            if src_layer not in unit_of:
                continue  # produced outside the solved layers: arrives in whatever layout is best
            dst_graph = units[unit_of[li]].graph
            flow = Flow(src=unit_of[src_layer], src_op=to_rep[src_layer][producer], dst=unit_of[li],
                        dst_op=rep_inputs[pos], index=None, weight=1, nbytes=dst_graph.ops[rep_inputs[pos]].out_bytes,
                        differentiable=dst_graph.ops[rep_inputs[pos]].differentiable[0])
            layer_links[li].append((flow, f"{producer} -> {cost_graph.layers[li].name}"))
            key = (flow.src, flow.src_op, flow.dst, flow.dst_op)
            weights[key] = weights.get(key, 0) + 1
            protos.setdefault(key, flow)
    for (src, src_op, dst, dst_op), w in weights.items():
        proto = protos[(src, src_op, dst, dst_op)]
        flows.append(Flow(src=src, src_op=src_op, dst=dst, dst_op=dst_op, index=None, weight=w, nbytes=proto.nbytes,
                           differentiable=proto.differentiable))
    # outputs read outside the solved layers (the next stage, the loss) must leave reduced
    for li in prep.chosen:
        unit = units[unit_of[li]]
        for out in unit.graph.outputs:
            real = renames[li].get(out, out)
            if _leaves(prep, g, li, real):
                flow = sink_flow(units, unit_of[li], unit.graph.ops[out], cm)
                flows.append(flow)
                layer_links[li].append((flow, f"{real} -> (leaves the solved layers)"))
    return flows, layer_links


def _pin_aliases(cost_graph: CostGraph, prep: _Prep, units: list[Unit],
                 unit_of: dict[int, int]) -> dict[str, tuple[int, str, str]]:
    """The names a pin may use (a copy's op or module path, a parameter's real name) -> ``(unit, name
    in the unit, "op" or "param")``: a pin on one copy of a repeated layer pins every copy."""
    g = cost_graph.ops
    renames, to_rep = prep.renames, prep.to_rep
    aliases: dict[str, tuple[int, str, str]] = {}
    for li in prep.chosen:
        ui, graph = unit_of[li], units[unit_of[li]].graph
        for real, rep_name in to_rep[li].items():
            op = graph.ops.get(rep_name)
            if op is not None and not op.is_input:
                aliases[real] = (ui, rep_name, "op")
                mp = g.nodes[real]["module_path"] if real in g else ""
                if mp:
                    aliases[mp] = (ui, rep_name, "op")
        for op in graph.ops.values():
            for p in op.params:
                if p.owned or renames[li].get(p.name, p.name) not in aliases:
                    aliases[renames[li].get(p.name, p.name)] = (ui, p.name, "param")
    return aliases
