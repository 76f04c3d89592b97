"""Sharding strategies per op, each with its compute time, communication and memory.

A strategy of a decision op picks, for every mesh axis, one einsum label to split (or none).
That single choice fixes every operand's placement on the axis (Mesh-TensorFlow's rule):

* a tensor that has the label is ``Shard(<its dim of that label>)``;
* an input or parameter without it is ``Replicate()``: its gradient is a ``Partial`` sum
  (for a parameter: a gradient all-reduce on that axis, the data-parallel sync);
* the output without it (the label was contracted) is ``Partial()``: Tofu's
  partition-n-reduce, the row-parallel linear; whoever reads it pays the reduction.

So on a linear ``bsk,nk,n->bsn``: splitting ``b`` is data parallelism, ``s`` sequence
parallelism, ``n`` Megatron's column-parallel, ``k`` row-parallel. On an MoE einsum, splitting
the expert label is expert parallelism. Work is divided by the product of the axes that split a
label; replicated axes repeat it.

Followers (views, gelu, softmax...) are merged into their producer: a *group* has exactly its
head's strategies, and each follower's layout is the head's pushed through its ``dim_map``. A
placement that cannot pass (a Partial into gelu, a split of softmax's dim) is undone inside the
group first, and that collective is charged to the group.

Mesh axes with a role (``MeshSpec.roles``) narrow the choice per axis: on a ``"model"`` axis no
batch label is split and an op that can split one of its parameters there must (the tensor
parallelism the plan's ``tp`` axis stands for); on a ``"data"`` axis only batch labels are.

Costs are plain functions: compute is a roofline, ``max(flops / peak, bytes / memory bw)`` on
the local share; memory is parameters (weights, gradients, optimizer state) plus activations
saved for backward, both for the local shard.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from planner.cluster import DeviceSpec
from planner.cost.constants import CostConstants
from planner.intra_op.collectives import Collective, collective_s, redistribute_plan
from planner.intra_op.graph import DTYPE_BYTES, Op, OpGraph
from planner.intra_op.mesh import MeshSpec
from planner.intra_op.placement import (
    PARTIAL,
    REPLICATE,
    Layout,
    Partial,
    Shard,
    grad_layout_of_output,
    shard_factor,
)


@dataclass(kw_only=True)
class CostModel:
    """Everything a strategy's cost depends on besides the op itself."""

    mesh: MeshSpec
    device: DeviceSpec
    dtype: str = "bf16"
    sequence_parallel: bool = False
    optimizer_bytes_per_param: float = 12.0  # Adam in mixed precision: fp32 master weights + 2 moments
    constants: CostConstants = field(default_factory=CostConstants)  # link efficiencies for collectives
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def param_bytes_per_elem(self) -> float:
        """Weights and gradients in the training dtype, plus optimizer state."""
        return 2 * DTYPE_BYTES[self.dtype] + self.optimizer_bytes_per_param

    def compute_s(self, flops: float, nbytes: float) -> float:
        return max(flops / self.device.peak(self.dtype), nbytes / self.device.memory_bandwidth_bytes_per_s)

    def transfer(self, nbytes: float, src: Layout, dst: Layout) -> tuple[float, tuple[tuple[int, str, float], ...]]:
        """Seconds and ``(axis, kind, bytes)`` steps to turn ``src`` into ``dst`` (cached)."""
        key = (nbytes, src, dst)
        hit = self._cache.get(key)
        if hit is None:
            steps = tuple(redistribute_plan(nbytes, src, dst, self.mesh.shape))
            time_s = sum(self.collective_s(i, kind, b) for i, kind, b in steps)
            hit = self._cache[key] = (time_s, steps)
        return hit

    def collective_s(self, axis: int, kind: str, nbytes: float) -> float:
        """One collective on mesh axis ``axis``, priced by :mod:`planner.cost.comm` on its group."""
        return collective_s(kind, nbytes, self.mesh.group(axis), self.constants)

    def collectives(self, steps, phase: str, at: str) -> list[Collective]:
        return [Collective(kind=kind, axis=self.mesh.axes[i], nbytes=b, phase=phase, at=at,
                           time_s=self.collective_s(i, kind, b))
                for i, kind, b in steps]


@dataclass(frozen=True, kw_only=True)
class OpStrategy:
    """One way to run one decision op (or to receive one graph input)."""

    name: str
    split: tuple[str | None, ...]  # per mesh axis: the label split on it, None = not split
    in_layouts: tuple[Layout, ...]
    in_grad_layouts: tuple[Layout, ...]
    param_layouts: tuple[Layout, ...]
    out_layout: Layout
    compute_s: float
    memory_bytes: float
    collectives: tuple[Collective, ...] = ()

    @property
    def comm_s(self) -> float:
        return sum(c.time_s for c in self.collectives)


@dataclass(frozen=True, kw_only=True)
class GroupStrategy:
    """A head strategy with its followers' layouts, and the totals for the whole group."""

    name: str
    head: OpStrategy
    out_layouts: Mapping[str, Layout]
    in_layouts: Mapping[str, Layout]  # the layout each follower actually reads (after any forced undo)
    compute_s: float
    memory_bytes: float
    collectives: tuple[Collective, ...]

    @property
    def comm_s(self) -> float:
        return sum(c.time_s for c in self.collectives)

    @property
    def time_s(self) -> float:
        return self.compute_s + self.comm_s


@dataclass(frozen=True, kw_only=True)
class Group:
    """A decision op (or input) and the followers merged into it: one ILP choice."""

    name: str
    ops: tuple[str, ...]
    strategies: tuple[GroupStrategy, ...]


def _layout_of(labels: Sequence[str], split: Sequence[str | None]) -> Layout:
    return tuple(Shard(labels.index(c)) if c is not None and c in labels else REPLICATE for c in split)


def _strategy_name(op: Op, split: Sequence[str | None], axes: Sequence[str]) -> str:
    parts = [f"{axis}={op.name_of_label(c)}" for axis, c in zip(axes, split) if c is not None]
    return ",".join(parts) if parts else "replicate"


def _divides(split: Sequence[str | None], sizes: Mapping[str, int], mesh_shape: Sequence[int]) -> bool:
    ways: dict[str, int] = {}
    for c, n in zip(split, mesh_shape):
        if c is not None:
            ways[c] = ways.get(c, 1) * n
    return all(sizes[c] % n == 0 for c, n in ways.items())


def residual_stream(graph: OpGraph) -> set[str]:
    """The layer's differentiable inputs and outputs and the norms, dropouts and elementwise ops
    joined to them through one another: what Megatron-LM's tensor parallelism leaves replicated
    and its sequence parallelism splits along the sequence."""
    def member(name: str) -> bool:  # followers (views, pointwise) only connect: their head decides
        op = graph.ops[name]
        return op.elementwise or op.follows or (op.is_input and op.differentiable[0])

    neighbours: dict[str, set[str]] = {n: set() for n in graph.ops}
    for op in graph.ops.values():
        for src in op.inputs:
            if member(op.name) and member(src):
                neighbours[op.name].add(src)
                neighbours[src].add(op.name)
    consumed = {src for op in graph.ops.values() for src in op.inputs}
    todo = [n for n in graph.ops if member(n) and (n in consumed if graph.ops[n].is_input else n in graph.outputs)]
    seen = set(todo)
    while todo:
        for nxt in neighbours[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def batch_labels(op: Op) -> frozenset[str]:
    """An op's batch labels: named ``batch``, or an output dim with the batch role (GShard's groups)."""
    named = {c for c in (*op.out_labels, *(c for t in op.in_labels for c in t)) if op.name_of_label(c) == "batch"}
    return frozenset(named | {c for c, r in zip(op.out_labels, op.roles) if r == "batch"})


def _per_axis(options: Sequence, is_batch, roles: Sequence[str | None]) -> list[list]:
    """The choices of each mesh axis (``None`` = no split first): all, or narrowed by the axis's role."""
    out = []
    for role in roles:
        kept = [o for o in options if role is None or (role == "data") == bool(is_batch(o))]
        out.append([None, *kept])
    return out


def _splitting_params(strategies: list[OpStrategy], roles: Sequence[str | None]) -> list[OpStrategy]:
    """On each model axis, keep the strategies that split a parameter there, if any can."""
    for i, role in enumerate(roles):
        if role == "model":
            splitting = [s for s in strategies if any(isinstance(lay[i], Shard) for lay in s.param_layouts)]
            strategies = splitting or strategies
    return strategies


def decision_strategies(op: Op, graph: OpGraph, cm: CostModel, *, residual: bool = False) -> list[OpStrategy]:
    """All valid per-axis label splits of an einsum-style op, with their costs.

    On the residual stream only the batch, and with sequence parallelism the sequence, may be split.
    Axis roles narrow that per axis (see the module docstring).
    """
    mesh = cm.mesh
    sizes = graph.label_sizes(op)
    ordered = list(dict.fromkeys([c for t in op.in_labels for c in t] + list(op.out_labels)
                                 + [c for t in op.param_labels for c in t]))
    labels = [c for c in ordered if c not in op.no_split and sizes[c] > 1
              and (cm.sequence_parallel or c not in op.seq_labels)
              and (not residual or c in op.seq_labels or op.name_of_label(c) == "batch")]
    batch = batch_labels(op)
    in_bytes = [graph.ops[src].out_bytes for src in op.inputs]
    out: list[OpStrategy] = []
    for split in itertools.product(*_per_axis(labels, batch.__contains__, mesh.axis_roles)):
        if not _divides(split, sizes, mesh.shape):
            continue
        in_layouts = tuple(_layout_of(t, split) for t in op.in_labels)
        in_grads = tuple(
            tuple(PARTIAL if (c is not None and c not in t and diff) else p for c, p in zip(split, lay))
            for t, lay, diff in zip(op.in_labels, in_layouts, op.differentiable))
        param_layouts = tuple(_layout_of(t, split) for t in op.param_labels)
        out_layout = tuple(Shard(op.out_labels.index(c)) if c in op.out_labels else (REPLICATE if c is None
                           else PARTIAL) for c in split)
        factor = math.prod(n for c, n in zip(split, mesh.shape) if c is not None)
        compute = cm.compute_s((op.fwd_flops + op.bwd_flops) / factor, op.bytes_moved / factor)
        memory = 0.0
        syncs: list[Collective] = []
        for p, lay, t in zip(op.params, param_layouts, op.param_labels):
            local = p.numel / shard_factor(lay, mesh.shape)
            if p.owned:
                memory += local * cm.param_bytes_per_elem
                for i, c in enumerate(split):
                    # a bias of a row-parallel op is added once, after the reduction: no sync
                    post_reduce = c not in op.out_labels and set(t) <= set(op.out_labels)
                    if c is not None and c not in t and not post_reduce:
                        steps = ((i, "all_reduce", local * DTYPE_BYTES[cm.dtype]),)
                        syncs += cm.collectives(steps, "grad_sync", op.name)
        if op.saved_from == "output":
            memory += op.saved_bytes / shard_factor(out_layout, mesh.shape)
        elif in_bytes and sum(in_bytes) > 0:
            frac = sum(b / shard_factor(lay, mesh.shape) for b, lay in zip(in_bytes, in_layouts)) / sum(in_bytes)
            memory += op.saved_bytes * frac
        out.append(OpStrategy(name=_strategy_name(op, split, mesh.axes), split=tuple(split), in_layouts=in_layouts,
                              in_grad_layouts=in_grads, param_layouts=param_layouts, out_layout=out_layout,
                              compute_s=compute, memory_bytes=memory, collectives=tuple(syncs)))
    return _splitting_params(out, mesh.axis_roles) if op.params else out


def input_strategies(op: Op, cm: CostModel, *, residual: bool = False) -> list[OpStrategy]:
    """Every layout a graph input may arrive in (no Partial: the producer reduces first)."""
    mesh = cm.mesh
    roles = op.roles or (None,) * len(op.out_shape)
    dims = [d for d in op.split_dims if op.out_shape[d] > 1 and (cm.sequence_parallel or d not in op.seq_dims)
            and (not residual or roles[d] in ("batch", "seq"))]
    out: list[OpStrategy] = []
    for choice in itertools.product(*_per_axis(dims, lambda d: roles[d] == "batch", mesh.axis_roles)):
        ways: dict[int, int] = {}
        for d, n in zip(choice, mesh.shape):
            if d is not None:
                ways[d] = ways.get(d, 1) * n
        if any(op.out_shape[d] % n for d, n in ways.items()):
            continue
        layout = tuple(Shard(d) if d is not None else REPLICATE for d in choice)
        names = [f"{axis}=dim{d}" for axis, d in zip(mesh.axes, choice) if d is not None]
        out.append(OpStrategy(name=",".join(names) or "replicate", split=tuple(None for _ in choice),
                              in_layouts=(), in_grad_layouts=(), param_layouts=(), out_layout=layout,
                              compute_s=0.0, memory_bytes=0.0))
    return out


def follow(op: Op, layout: Layout, mesh_shape: Sequence[int]) -> tuple[Layout, Layout]:
    """``(layout the follower must read, layout it produces)`` given its input's layout."""
    target = list(layout)
    for i, p in enumerate(layout):
        if isinstance(p, Partial) and not op.linear:
            target[i] = REPLICATE
        elif isinstance(p, Shard) and op.dim_map[p.dim] is None:
            target[i] = REPLICATE
    ways: dict[int, int] = {}
    for i, p in enumerate(target):
        if isinstance(p, Shard):
            d = op.dim_map[p.dim]
            ways[d] = ways.get(d, 1) * mesh_shape[i]
            if op.out_shape[d] % ways[d]:
                target[i] = REPLICATE  # the piece would not be whole: undo this axis's split
                ways[d] //= mesh_shape[i]
    produced = tuple(Shard(op.dim_map[p.dim]) if isinstance(p, Shard) else p for p in target)
    return tuple(target), produced


def build_groups(graph: OpGraph, cm: CostModel) -> tuple[list[Group], dict[str, int]]:
    """Merge followers into their producers and enumerate each group's strategies."""
    head_of: dict[str, str] = {}
    members: dict[str, list[str]] = {}
    for op in graph.ops.values():
        head = head_of[op.inputs[0]] if op.follows else op.name
        head_of[op.name] = head
        members.setdefault(head, []).append(op.name)
    groups: list[Group] = []
    group_of: dict[str, int] = {}
    mesh_shape = cm.mesh.shape
    residual = residual_stream(graph)
    for head, names in members.items():
        op = graph.ops[head]
        if op.is_input:
            heads = input_strategies(op, cm, residual=head in residual)
        else:
            heads = decision_strategies(op, graph, cm, residual=head in residual)
        strategies = []
        for s in heads:
            outs: dict[str, Layout] = {head: s.out_layout}
            reads: dict[str, Layout] = {}
            compute, memory = s.compute_s, s.memory_bytes
            colls = list(s.collectives)
            for name in names[1:]:
                f = graph.ops[name]
                src = outs[f.inputs[0]]
                target, produced = follow(f, src, mesh_shape)
                if target != src:
                    nbytes = graph.ops[f.inputs[0]].out_bytes
                    _, fwd = cm.transfer(nbytes, src, target)
                    _, bwd = cm.transfer(nbytes, grad_layout_of_output(target), grad_layout_of_output(src))
                    colls += cm.collectives(fwd, "fwd", f"{f.inputs[0]} -> {name}")
                    colls += cm.collectives(bwd, "bwd", f"{f.inputs[0]} -> {name}")
                reads[name] = target
                outs[name] = produced
                factor = shard_factor(target, mesh_shape)
                compute += cm.compute_s((f.fwd_flops + f.bwd_flops) / factor, f.bytes_moved / factor)
                saved_factor = shard_factor(produced if f.saved_from == "output" else target, mesh_shape)
                memory += f.saved_bytes / saved_factor
            strategies.append(GroupStrategy(name=s.name, head=s, out_layouts=outs, in_layouts=reads,
                                            compute_s=compute, memory_bytes=memory, collectives=tuple(colls)))
        if not strategies:
            raise ValueError(f"op {head} of graph {graph.name} has no valid sharding on mesh {cm.mesh.describe()}; "
                             "its dims do not divide by the mesh axis sizes (should not happen: replicate is "
                             "always valid)")
        for name in names:
            group_of[name] = len(groups)
        groups.append(Group(name=head, ops=tuple(names), strategies=tuple(strategies)))
    return groups, group_of


def edge_steps(cm: CostModel, nbytes: float, out_layout: Layout, in_layout: Layout, in_grad: Layout,
               differentiable: bool) -> tuple[float, tuple, tuple]:
    """Seconds, forward steps and backward steps to move one tensor from producer to consumer.

    Forward: the producer's layout becomes what the consumer reads. Backward: the gradient the
    consumer produces (possibly Partial) becomes what the producer's output needs.
    """
    t_fwd, fwd = cm.transfer(nbytes, out_layout, in_layout)
    if not differentiable:
        return t_fwd, fwd, ()
    t_bwd, bwd = cm.transfer(nbytes, in_grad, grad_layout_of_output(out_layout))
    return t_fwd + t_bwd, fwd, bwd
