"""Measured op nodes → :class:`CostGraph`: assign ops to layers, own parameters, sum per layer.

* An op belongs to the layer whose module path is the longest prefix of its own. Ops outside any
  layer (root-level glue, inputs) join a neighbour: the latest layer feeding them (but not a
  stack's block when the one layer they feed is outside the stack), else the one layer they
  feed, else (values several layers read, like an attention mask built from nothing) the layer
  running at that point. Either way repeated blocks stay alike.
* A parameter is owned by the first layer that uses it; later users list it in ``tied_params``.
  Parameters never used in forward are owned by the layer of their module (else the first
  layer) and reported in the notes, so the owned counts always sum to the model's parameters.
* Activation memory is what autograd saves for backward, counted once per layer that saves it
  (a tensor several layers save, like rotary tables or the encoder output a decoder reads, is
  held by every pipeline stage holding one of them), once within a layer.
* Attention scores are recognised by shape, not by name: tensors shaped like a softmax output
  with three or more dims and a heads dimension (``[b, heads, s, t]`` or ``[b·heads, s, t]``).
* Costs are divided by the traced batch: every per-layer figure is per sample.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
from torch import nn

from planner.trace.graph import CostGraph, ExpertRouting, Layer, OpCost, TiedParam, layer_graph_from_ops
from planner.trace.interpret import OpNode
from planner.trace.meter import ATTENTION_KERNELS, AtenRecord
from planner.trace.saved_ops import kept_flags


@dataclass(frozen=True)
class TraceContext:
    """What the assembler needs besides the ops."""

    model: nn.Module
    units: list[str]
    batch: int
    seq_len: int | None
    dtype: str
    name: str
    method: str
    softmax_shapes: frozenset[tuple[int, ...]] = frozenset()


def layer_of_path(path: str, units: list[str], cache: dict[str, int]) -> int:
    """Index of the unit that is the longest prefix of ``path`` (-1: none)."""
    if path in cache:
        return cache[path]
    best, best_len = -1, -1
    for i, unit in enumerate(units):
        if (unit == "" or path == unit or path.startswith(unit + ".")) and len(unit) > best_len:
            best, best_len = i, len(unit)
    cache[path] = best
    return best


def _in_stack(unit: str) -> bool:
    """A layer that is an item of a ModuleList/Sequential (``blocks.3``)."""
    return unit.rsplit(".", 1)[-1].isdigit()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _score_numels(shapes: frozenset[tuple[int, ...]], batch: int) -> set[int]:
    """Element counts of attention-score tensors: softmax outputs with a heads dim beyond the batch."""
    return {_numel(s) for s in shapes if len(s) >= 3 and _numel(s[:-2]) != batch}


def assemble(ops: list[OpNode], ctx: TraceContext, notes: list[str]) -> CostGraph:
    """The cost graph of ``ops``: each op in a layer, the layers in order of their first own op, the
    parameters owned and the costs summed per layer (the rules are in the module docstring)."""
    units, batch, model = ctx.units, ctx.batch, ctx.model
    raw_layer, direct = _raw_layers(ops, units)
    order = _layer_order(ops, raw_layer, direct)
    new_index = {old: new for new, old in enumerate(order)}
    _note_unused_modules(model, units, new_index, notes)
    layer_of = {name: new_index[raw] for name, raw in raw_layer.items()}
    by_name = {op.name: op for op in ops}
    saved_by = _saved_by_op(ops, layer_of)
    g = _op_graph(ops, by_name, layer_of, saved_by, batch)
    counts, tied = _own_params(ops, layer_of, g, model, units, new_index, notes)
    layers = _layers(ops, ctx, order, layer_of, by_name, saved_by, counts, tied)
    total_params = sum(p.numel() for p in model.parameters())
    return CostGraph(name=ctx.name, ops=g, layers=layers, layer_graph=layer_graph_from_ops(g, len(order)),
                     dtype=ctx.dtype, seq_len=ctx.seq_len, param_count=total_params, method=ctx.method,
                     notes=notes)


def _raw_layers(ops: list[OpNode], units: list[str]) -> tuple[dict[str, int], dict[str, int]]:
    """Each op's unit index (``raw``, glue joined to a neighbour) and its own one (``direct``, -1 for glue).

    Glue: the latest layer feeding it (producer) and the one layer it feeds (consumer), through
    chains of glue. It joins the producer, unless that is a block of a stack and the consumer is
    not (pooling before a classifier stays out of the last block, so blocks stay alike)."""
    cache: dict[str, int] = {}
    raw_layer = {op.name: layer_of_path(op.module_path, units, cache) if op.module_path else -1 for op in ops}
    direct = dict(raw_layer)  # before glue joins a neighbour: defines the order of layers
    consumers: dict[str, list[str]] = defaultdict(list)
    for op in ops:
        for src in op.inputs:
            consumers[src].append(op.name)
    producer: dict[str, int] = {}
    for op in ops:
        prev = [producer[s] for s in op.inputs if producer.get(s, -1) >= 0]
        producer[op.name] = direct[op.name] if direct[op.name] >= 0 else (max(prev) if prev else -1)
    consumer: dict[str, int] = {}
    for op in reversed(ops):
        nxt = {consumer[c] for c in consumers[op.name] if consumer.get(c, -1) >= 0}
        # Shared inputs (masks, positions) read by several layers stay with the layer that makes them.
        consumer[op.name] = direct[op.name] if direct[op.name] >= 0 else (nxt.pop() if len(nxt) == 1 else -1)
    for op in ops:
        if direct[op.name] < 0:
            p, c = producer[op.name], consumer[op.name]
            if p >= 0 and c >= 0:
                raw_layer[op.name] = c if _in_stack(units[p]) and not _in_stack(units[c]) else p
            else:
                raw_layer[op.name] = max(p, c)
    last = next((raw_layer[op.name] for op in ops if raw_layer[op.name] >= 0), 0)
    for op in ops:  # isolated ops (assertions, unused values): the layer running at that point
        if raw_layer[op.name] < 0:
            raw_layer[op.name] = last
        last = raw_layer[op.name]
    return raw_layer, direct


def _layer_order(ops: list[OpNode], raw_layer: dict[str, int], direct: dict[str, int]) -> list[int]:
    """Unit indices in order of their first own op (glue that joined a layer does not move it)."""
    order: list[int] = []
    for op in ops:
        if direct[op.name] >= 0 and direct[op.name] not in order:
            order.append(direct[op.name])
    for op in ops:
        if raw_layer[op.name] not in order:
            order.append(raw_layer[op.name])
    return order or [0]


def _note_unused_modules(model: nn.Module, units: list[str], new_index: dict[int, int], notes: list[str]) -> None:
    """Note the units that never ran in forward (and are no alias of one that ran): they hold no costs."""
    modules = dict(model.named_modules(remove_duplicate=False))
    ran = {id(modules.get(units[i])) for i in new_index if 0 <= i < len(units)}
    unused = [units[i] for i in range(len(units))
              if i not in new_index and units[i] and id(modules.get(units[i])) not in ran]  # aliases ran
    if unused:
        notes.append(f"{len(unused)} submodule(s) never ran in forward and hold no costs: {unused[:5]}")


def _saved_by_op(ops: list[OpNode], layer_of: dict[str, int]) -> dict[str, list[tuple[tuple[int, ...], int]]]:
    """``(shape, bytes)`` of the saved tensors each op is charged with.

    Saved tensors count once per layer that saves them (each pipeline stage holding such a layer
    keeps the tensor alive), once within a layer; an op is charged with the first save in its layer."""
    seen_in: dict[int, set[object]] = defaultdict(set)
    saved_by: dict[str, list[tuple[tuple[int, ...], int]]] = {}
    for op in ops:
        seen = seen_in[layer_of[op.name]]
        mine = []
        for ev in op.events:
            if ev.base_id not in seen:
                seen.add(ev.base_id)
                mine.append((ev.shape, ev.nbytes))
        saved_by[op.name] = mine
    return saved_by


def _op_graph(ops: list[OpNode], by_name: dict[str, OpNode], layer_of: dict[str, int],
              saved_by: dict[str, list[tuple[tuple[int, ...], int]]], batch: int) -> nx.DiGraph:
    """The op graph: one node per op with its layer and per-sample costs, one edge per input."""
    g = nx.DiGraph()
    for op in ops:
        recs = op.records
        moved = sum(r.bytes for r in recs)
        g.add_node(op.name, kind=op.kind, target=op.target, module_path=op.module_path,
                   layer=layer_of[op.name],
                   output_shapes=op.output_shapes, output_dtypes=op.dtypes, dtypes=op.dtypes,
                   fwd_flops=sum(r.flops for r in recs) / batch,
                   bwd_flops=sum(r.flops * (r.bwd_input_mult + r.bwd_weight_mult) for r in recs) / batch,
                   bytes_read=max(moved - op.output_bytes, 0.0) / batch if moved else 0.0,
                   bytes_written=op.output_bytes / batch if moved else 0.0, param_bytes=0.0,
                   activation_bytes=sum(b for _, b in saved_by[op.name]) / batch,
                   replayed_from=op.replayed_from)
    for op in ops:
        node = g.nodes[op.name]
        node["input_shapes"] = [s for src in op.inputs for s in by_name[src].output_shapes]
        node["input_dtypes"] = [d for src in op.inputs for d in by_name[src].dtypes]
        for src in op.inputs:
            g.add_edge(src, op.name, bytes=by_name[src].output_bytes / batch)
    return g


def _layers(ops: list[OpNode], ctx: TraceContext, order: list[int], layer_of: dict[str, int],
            by_name: dict[str, OpNode], saved_by: dict[str, list[tuple[tuple[int, ...], int]]],
            counts: tuple[dict[int, int], ...], tied: dict[int, dict[str, TiedParam]]) -> list[Layer]:
    """One :class:`Layer` per entry of ``order``: its ops' costs per sample, its memory, what enters
    and leaves it, and a signature equal for layers that are copies of each other."""
    units, batch = ctx.units, ctx.batch
    score_numels = _score_numels(ctx.softmax_shapes, batch)
    n_layers = len(order)
    layer_ops: dict[int, list[OpNode]] = defaultdict(list)
    for op in ops:
        layer_ops[layer_of[op.name]].append(op)
    named_modules = dict(ctx.model.named_modules())
    crossing: dict[int, set[str]] = defaultdict(set)  # layer -> its ops read by other layers
    for op in ops:
        for src in op.inputs:
            if layer_of[src] != layer_of[op.name]:
                crossing[layer_of[src]].add(src)
    layers: list[Layer] = []
    for li in range(n_layers):
        members = layer_ops[li]
        member_names = {op.name for op in members}
        outgoing = set(crossing[li])
        if li == n_layers - 1 and members:
            outgoing.add(members[-1].name)
        incoming = {src for op in members for src in op.inputs if src not in member_names}
        out_numel = max((_numel(s) for o in outgoing for s in by_name[o].output_shapes), default=0)
        recs = [r for op in members for r in op.records]
        saved = [s for op in members for s in saved_by[op.name]]
        attention_saved = [b for shape, b in saved if len(shape) >= 3 and _numel(shape) in score_numels]
        replicated = [b for shape, b in saved if out_numel and shape and _numel(shape) == out_numel]
        unit_path = units[order[li]] if 0 <= order[li] < len(units) else ""
        mod_type = type(named_modules[unit_path]).__name__ if unit_path in named_modules else "Module"
        fwd = sum(r.flops for r in recs) / batch
        act = sum(b for _, b in saved) / batch
        layers.append(Layer(
            index=li, name=unit_path or ctx.name, module_type=mod_type,
            signature=_signature(members, saved, fwd, act),
            fwd_flops=fwd,
            bwd_input_flops=sum(r.flops * r.bwd_input_mult for r in recs) / batch,
            bwd_weight_flops=sum(r.flops * r.bwd_weight_mult for r in recs) / batch,
            param_count=counts[0][li], frozen_count=counts[1][li], trained_tensors=counts[2][li],
            tied_params=tuple(sorted(tied[li].values(), key=lambda t: t.name)),
            activation_bytes=act,
            replicated_activation_bytes=sum(replicated) / batch,
            attention_activation_bytes=sum(attention_saved) / batch,
            attention_fwd_flops=_attention_flops(recs, score_numels, batch),
            input_bytes=sum(by_name[s].output_bytes for s in incoming) / batch,
            output_bytes=sum(by_name[o].output_bytes for o in outgoing) / batch,
            op_costs=_op_costs(recs, batch), num_ops=len(members),
            op_saved_bytes=sum(r.out_bytes for r, kept in zip(recs, kept_flags([r.name for r in recs])) if kept)
            / batch,
            **_pointwise_fields(members, by_name, out_numel, batch),
            experts=expert_routing(named_modules.get(unit_path)) if unit_path in named_modules else (),
        ))
    return layers


# Element-wise ops by the traced op's kind (fx's function and method names, aten's): a trainer that fuses
# element-wise chains (Megatron-LM's and Transformer Engine's kernels, torch.compile's partitioner) keeps a
# chain's inputs and recomputes what is inside it in the fused kernel's backward.
POINTWISE = frozenset({
    "add", "sub", "mul", "div", "truediv", "neg", "pow", "rsqrt", "sqrt", "exp", "log", "tanh", "sigmoid",
    "silu", "gelu", "relu", "square", "reciprocal", "to", "float", "half", "bfloat16", "type_as", "_to_copy",
})


def _savers(members: list[OpNode]) -> tuple[dict[object, list[OpNode]], dict[object, tuple[tuple[int, ...], int]]]:
    """Each tensor the layer's ops save (by identity): the ops that save it, and its shape and bytes."""
    savers: dict[object, list[OpNode]] = defaultdict(list)
    sizes: dict[object, tuple[tuple[int, ...], int]] = {}
    for op in members:
        for ev in op.events:
            savers[ev.base_id].append(op)
            sizes.setdefault(ev.base_id, (ev.shape, ev.nbytes))
    return savers, sizes


def pointwise_saved(members: list[OpNode], by_name: dict[str, OpNode], out_numel: int) -> tuple[float, float]:
    """Bytes (all, and those the size of the layer's output) of the tensors this layer's ops save that a
    trainer fusing element-wise chains does not keep: the output of an element-wise op, saved only by
    element-wise ops, whose own inputs are kept anyway (saved in the layer, or weights). An RMSNorm's
    ``x · rsqrt(mean(x²))`` before its weight, a SwiGLU's ``silu(gate)``: Megatron's fused RMSNorm and
    bias-SwiGLU keep the norm's input and the gate, and recompute these in backward. A tensor a matrix
    multiply or attention saves (a norm's output, the SwiGLU product) is kept either way. Needs each op's
    output identities (:attr:`OpNode.out_bases`); without them nothing is counted."""
    savers, sizes = _savers(members)
    producer = {b: op for op in members for b in op.out_bases}
    available = set(savers) | {b for op in members if op.kind == "get_attr" for b in op.out_bases}
    total = same_size = 0.0
    for base, ops in savers.items():
        p = producer.get(base)
        if p is None or p.kind not in POINTWISE or any(o.kind not in POINTWISE for o in ops):
            continue
        inputs = [b for name in p.inputs for b in by_name[name].out_bases] if all(
            by_name[name].out_bases for name in p.inputs) else []
        if not inputs or any(b not in available for b in inputs):
            continue
        shape, nbytes = sizes[base]
        total += nbytes
        same_size += nbytes if out_numel and _numel(shape) == out_numel else 0
    return total, same_size


# Matrix multiplies by the traced op's kind; with a weight among their inputs they are the linears an FP8
# recipe runs in FP8.
GEMMS = frozenset({"linear", "mm", "addmm", "matmul", "bmm", "baddbmm"})


def linear_saved(members: list[OpNode]) -> tuple[float, float]:
    """Bytes of the tensors this layer saves that linears (matrix multiplies by a weight) save as their
    inputs: those only linears save, and those other ops save too (an attention output the output
    projection reads). Transformer Engine's FP8 linears keep an FP8 copy of their input: the first kind
    then costs half its bf16 bytes, the second half again on top (planner.cost.layer_table)."""
    weights = {op.name for op in members if op.kind == "get_attr" or op.params}
    savers, sizes = _savers(members)

    def linear(op: OpNode) -> bool:
        return op.kind in GEMMS and (bool(op.params) or any(i in weights for i in op.inputs))

    only = shared = 0.0
    for base, ops in savers.items():
        if any(linear(o) for o in ops):
            if all(linear(o) for o in ops):
                only += sizes[base][1]
            else:
                shared += sizes[base][1]
    return only, shared


def _pointwise_fields(members: list[OpNode], by_name: dict[str, OpNode], out_numel: int,
                      batch: int) -> dict[str, Any]:
    if not any(op.out_bases for op in members):
        return {}
    total, same_size = pointwise_saved(members, by_name, out_numel)
    only, shared = linear_saved(members)
    return {"pointwise_saved_bytes": total / batch, "pointwise_replicated_bytes": same_size / batch,
            "linear_input_bytes": only / batch, "linear_shared_input_bytes": shared / batch}


def expert_routing(module: nn.Module) -> tuple[ExpertRouting, ...]:
    """The mixture-of-experts modules in ``module`` (itself included), in module order.

    Recognised by what they hold, not by class: an integer ``top_k`` and ``num_experts`` (on the module,
    or on its child ``experts``, or that child's length: planner.models.moe, Hugging Face's Mixtral
    blocks). Expert weights are the parameters stacked over the experts (leading dim ``num_experts``,
    3-d or more) or held under the child ``experts``; ``capacity_factor`` (or ``capacity_percent``)
    defaults to 1.0, a dropless router's average; the token width is ``hidden`` or the router's
    (``router`` or ``gate``) input width.
    """
    out = []
    for mod in module.modules():
        experts = getattr(mod, "experts", None)
        experts = experts if isinstance(experts, nn.Module) else None
        e, k = getattr(mod, "num_experts", None), getattr(mod, "top_k", None)
        if not isinstance(e, int) and experts is not None:
            e = getattr(experts, "num_experts", None)
            e = len(experts) if not isinstance(e, int) and isinstance(experts, nn.ModuleList) else e
        if not (isinstance(e, int) and isinstance(k, int) and e > 1 and 1 <= k <= e):
            continue
        stacked = sum(p.numel() for p in mod.parameters(recurse=False) if p.dim() >= 3 and p.shape[0] == e)
        listed = sum(p.numel() for p in experts.parameters()) if experts is not None else 0
        if not stacked + listed:
            continue
        percent = getattr(mod, "capacity_percent", None)
        factor = percent / 100 if isinstance(percent, int) else float(getattr(mod, "capacity_factor", 1.0) or 1.0)
        router = next((getattr(mod, n) for n in ("router", "gate") if isinstance(getattr(mod, n, None), nn.Module)),
                      None)
        weight = getattr(router, "weight", None)
        hidden = getattr(mod, "hidden", None) or (weight.shape[-1] if isinstance(weight, torch.Tensor) else 0)
        out.append(ExpertRouting(num_experts=e, top_k=k, capacity_factor=factor, hidden=int(hidden),
                                 expert_params=stacked + listed))
    return tuple(out)


def _op_costs(recs: list[AtenRecord], batch: int) -> tuple[OpCost, ...]:
    """Per sample: each kernel that computes (with its GEMM shape), then all memory-bound traffic as one."""
    gemm_costs = tuple(OpCost(kind=r.name, flops=r.flops / batch, bytes=r.bytes / batch,
                              m=max(r.m // batch, 1) if r.m else 0, n=r.n, k=r.k, causal=r.causal)
                       for r in recs if r.flops > 0)
    mem_bytes = sum(r.bytes for r in recs if r.flops == 0) / batch
    memory_bound = (OpCost(kind="memory-bound", flops=0.0, bytes=mem_bytes),) if mem_bytes else ()
    return gemm_costs + memory_bound


def _attention_flops(recs: list[AtenRecord], score_numels: set[int], batch: int) -> float:
    """Per-sample flops of attention kernels, and of batched matmuls that make or read attention scores."""
    return sum(r.flops for r in recs if r.flops > 0 and (
        r.name in ATTENTION_KERNELS
        or (r.name in ("bmm", "baddbmm")
            and (r.out_numel in score_numels or r.a_numel in score_numels)))) / batch


def _signature(members: list[OpNode], saved: list[tuple[tuple[int, ...], int]], fwd: float, act: float) -> str:
    """A short hash equal for layers with the same ops, output shapes, parameters, saves and costs."""
    real_ops = [(op.kind, op.output_shapes) for op in members
                if op.kind not in ("placeholder", "get_attr")]
    sig_src = repr((real_ops,
                    sorted((tuple(p.shape), str(p.dtype)) + (() if p.requires_grad else ("frozen",))
                           for op in members for p in op.params),
                    [s for s, _ in saved], round(fwd), round(act)))
    return hashlib.sha1(sig_src.encode()).hexdigest()[:12]


def _own_params(ops: list[OpNode], layer_of: dict[str, int], g: nx.DiGraph, model: nn.Module,
                units: list[str], new_index: dict[int, int],
                notes: list[str]) -> tuple[tuple[dict[int, int], ...], dict[int, dict[str, TiedParam]]]:
    """First use owns a parameter; never-used ones go to their module's layer (noted). Returns each
    layer's (own parameter count, the frozen part of it, its own parameter tensors that train), and the
    tied parameters it uses."""
    param_names: dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        param_names.setdefault(id(p), n)
    owner: dict[int, int] = {}
    own_count: dict[int, int] = defaultdict(int)
    frozen_count: dict[int, int] = defaultdict(int)
    trained_tensors: dict[int, int] = defaultdict(int)
    tied: dict[int, dict[str, TiedParam]] = defaultdict(dict)
    for op in ops:
        li = layer_of[op.name]
        g.nodes[op.name]["params"] = {param_names.get(id(p), "?"): tuple(p.shape) for p in op.params}
        for p in op.params:
            if id(p) not in owner:
                owner[id(p)] = li
                own_count[li] += p.numel()
                frozen_count[li] += 0 if p.requires_grad else p.numel()
                trained_tensors[li] += int(p.requires_grad)
                g.nodes[op.name]["param_bytes"] += p.numel() * p.element_size()
            elif owner[id(p)] != li:
                pname = param_names.get(id(p), "?")
                tied[li][pname] = TiedParam(name=pname, numel=p.numel(), owner=owner[id(p)],
                                            frozen=not p.requires_grad)
    unused = [(n, p) for n, p in model.named_parameters() if id(p) not in owner]
    if unused:
        cache: dict[str, int] = {}
        ran = sorted(new_index)
        for n, p in unused:
            raw = layer_of_path(n.rsplit(".", 1)[0] if "." in n else "", units, cache)
            if raw not in new_index:  # its layer never ran: the nearest earlier layer that did
                raw = max((r for r in ran if r < raw), default=ran[0])
            owner[id(p)] = new_index[raw]
            own_count[owner[id(p)]] += p.numel()
            frozen_count[owner[id(p)]] += 0 if p.requires_grad else p.numel()
            trained_tensors[owner[id(p)]] += int(p.requires_grad)
        total = sum(p.numel() for _, p in unused)
        notes.append(f"{total:,} parameters ({len(unused)} tensors, e.g. {unused[0][0]}) are never used "
                     "in forward; each is counted in its module's layer, or the nearest earlier one that ran "
                     "(it still takes memory)")
    return (own_count, frozen_count, trained_tensors), tied
