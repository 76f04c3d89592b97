"""Model → cost graph, on the meta device.

The model is copied to the meta device in the training dtype (nothing is allocated, the
user's module is left untouched), put in training mode, and run once on a sample batch:

1. ``torch.fx`` symbolic tracing gives the op graph; an ``fx.Interpreter`` runs it node by
   node under :class:`OpMeter` and :class:`SavedTensorMeter`, so each node gets its exact
   FLOPs, bytes and saved activations.
2. If symbolic tracing fails (data-dependent control flow, unsupported Python), the model is
   run eagerly with hooks on its *layers* instead: costs are the same, but the op graph has one
   node per layer call. The failure, with the module path, is recorded in ``CostGraph.notes``.

Layers are the pipeline building blocks: the model's submodules with ModuleList/Sequential
containers opened (recursively, while a container is inside), so a GPT is
``embed, blocks.0 … blocks.95, head`` and a ResNet is ``conv1 … layer1.0 … fc``.
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
import torch.fx
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from planner.errors import SpecError, TraceError
from planner.trace.graph import CostGraph, Layer, OpCost, TiedParam, layer_graph_from_ops
from planner.trace.meter import AtenRecord, OpMeter, SavedTensorMeter

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)


class _Tracer(torch.fx.Tracer):
    """Symbolic tracer that also proxies buffers (so slicing a mask by a traced size works)."""

    proxy_buffer_attributes = True

    def __init__(self) -> None:
        super().__init__()
        self.current_path = ""

    def call_module(self, m, forward, args, kwargs):
        previous = self.current_path
        self.current_path = self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self.current_path = previous


@dataclass
class _OpNode:
    """One measured unit (fx node or layer call) before layers are assembled."""

    name: str
    kind: str
    target: str
    module_path: str
    inputs: list[str]
    output_shapes: list[tuple[int, ...]]
    output_bytes: float
    dtypes: list[str]
    params: list[nn.Parameter] = field(default_factory=list)
    records: list[AtenRecord] = field(default_factory=list)
    saved: list[tuple[tuple[int, ...], int]] = field(default_factory=list)


def layer_units(model: nn.Module) -> list[str]:
    """Module paths of the layers: containers are opened while a container lies inside."""

    def has_container(mod: nn.Module) -> bool:
        return any(isinstance(m, _CONTAINERS) and len(m) > 1 for m in mod.modules())

    units: list[str] = []

    def visit(mod: nn.Module, path: str) -> None:
        for name, child in mod.named_children():
            child_path = f"{path}.{name}" if path else name
            if isinstance(child, _CONTAINERS) or has_container(child):
                before = len(units)
                visit(child, child_path)
                if len(units) == before:  # an empty container: nothing to run
                    continue
            else:
                units.append(child_path)

    if has_container(model):
        visit(model, "")
    return units or [""]


def _tensor_meta(value: Any) -> tuple[list[tuple[int, ...]], float, list[str]]:
    flat, _ = tree_flatten(value)
    tensors = [t for t in flat if isinstance(t, torch.Tensor)]
    shapes = [tuple(t.shape) for t in tensors]
    nbytes = float(sum(t.numel() * t.element_size() for t in tensors))
    dtypes = [str(t.dtype).replace("torch.", "") for t in tensors]
    return shapes, nbytes, dtypes


def _to_meta(value: Any) -> Any:
    def convert(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return torch.empty(x.shape, dtype=x.dtype, device="meta")
        return x

    return tree_map(convert, value)


def _meta_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A training-mode copy on meta in ``dtype``; the caller's module is not modified."""
    on_meta = all(p.device.type == "meta" for p in model.parameters())
    clone = copy.deepcopy(model) if on_meta else _deepcopy_to_meta(model)
    clone = clone.to(device="meta", dtype=dtype)
    clone.train()
    for p in clone.parameters():
        p.requires_grad_(True)
    return clone


def _deepcopy_to_meta(model: nn.Module) -> nn.Module:
    # Copy structure without copying weight data: memo maps each real tensor to a meta twin.
    memo: dict[int, Any] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        twin = torch.empty(t.shape, dtype=t.dtype, device="meta")
        memo[id(t)] = nn.Parameter(twin, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else twin
    return copy.deepcopy(model, memo)


def _op_kind(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return type(modules[node.target]).__name__.lower()
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target) if node.op == "call_method" else node.op


def _trace_fx(model: nn.Module, inputs: tuple, opm: OpMeter, stm: SavedTensorMeter) -> list[_OpNode]:
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        where = tracer.current_path or "<root>"
        raise _FxFailure(where, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    gm = torch.fx.GraphModule(model, graph)
    modules = dict(gm.named_modules())
    ops: list[_OpNode] = []
    named_params = {id(p): p for p in model.parameters()}

    class Meter(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            opm.key = stm.key = n.name
            result = super().run_node(n)
            if n.op in ("output",):
                return result
            path = n.target if n.op == "call_module" else ""
            if not path:
                stack = n.meta.get("nn_module_stack") or {}
                path = list(stack.values())[-1][0] if stack else ""
            params: list[nn.Parameter] = []
            if n.op == "call_module":
                params = list(modules[n.target].parameters())
            elif n.op == "get_attr":
                attr = self.fetch_attr(n.target)
                if isinstance(attr, torch.Tensor) and id(attr) in named_params:
                    params = [named_params[id(attr)]]
            shapes, nbytes, dtypes = _tensor_meta(result)
            ops.append(_OpNode(name=n.name, kind=_op_kind(n, modules), target=str(n.target), module_path=path,
                               inputs=[a.name for a in n.all_input_nodes], output_shapes=shapes,
                               output_bytes=nbytes, dtypes=dtypes, params=params))
            return result

    with opm, stm:
        Meter(gm).run(*inputs)
    for op in ops:
        op.records = opm.records.get(op.name, [])
        op.saved = stm.saved.get(op.name, [])
    return ops


class _FxFailure(Exception):
    def __init__(self, where: str, why: str) -> None:
        super().__init__(f"{where}: {why}")
        self.where = where
        self.why = why


def _trace_modules(model: nn.Module, inputs: tuple, units: list[str], opm: OpMeter,
                   stm: SavedTensorMeter) -> list[_OpNode]:
    """Fallback: run eagerly, one op node per layer call, edges by tensor identity."""
    ops: list[_OpNode] = []
    producer: dict[int, str] = {}
    keep: list[torch.Tensor] = []
    modules = dict(model.named_modules())
    handles = []
    counter = defaultdict(int)

    def pre(path: str):
        def hook(mod, args, kwargs):
            counter[path] += 1
            name = f"{path}#{counter[path]}" if counter[path] > 1 else path
            opm.key = stm.key = name
            flat, _ = tree_flatten((args, kwargs))
            srcs = sorted({producer[id(t)] for t in flat if isinstance(t, torch.Tensor) and id(t) in producer})
            ops.append(_OpNode(name=name, kind=type(mod).__name__.lower(), target=path, module_path=path,
                               inputs=srcs, output_shapes=[], output_bytes=0.0, dtypes=[],
                               params=list(mod.parameters())))
        return hook

    def post(path: str):
        def hook(mod, args, kwargs, out):
            op = ops[-1] if ops and ops[-1].target == path else next(o for o in reversed(ops) if o.target == path)
            op.output_shapes, op.output_bytes, op.dtypes = _tensor_meta(out)
            flat, _ = tree_flatten(out)
            for t in flat:
                if isinstance(t, torch.Tensor):
                    producer[id(t)] = op.name
                    keep.append(t)
            opm.key = stm.key = f"<after {op.name}>"
        return hook

    for path in units:
        mod = modules[path]
        handles.append(mod.register_forward_pre_hook(pre(path), with_kwargs=True))
        handles.append(mod.register_forward_hook(post(path), with_kwargs=True))
    try:
        opm.key = stm.key = "<before>"
        with opm, stm:
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    by_name = {op.name: op for op in ops}
    for key, recs in opm.records.items():
        # Glue between layer calls (ops in a parent's forward) is charged to the layer before it.
        target = key[len("<after "):-1] if isinstance(key, str) and key.startswith("<after ") else key
        if target in by_name:
            by_name[target].records.extend(recs)
        elif ops:
            ops[0].records.extend(recs)
    for key, saved in stm.saved.items():
        target = key[len("<after "):-1] if isinstance(key, str) and key.startswith("<after ") else key
        (by_name.get(target) or ops[0]).saved.extend(saved)
    return ops


def trace_model(model: nn.Module, sample_input: tuple | torch.Tensor, *, name: str | None = None,
                dtype: str = "bf16", seq_len: int | None = None, force_module_level: bool = False) -> CostGraph:
    """Trace ``model`` on ``sample_input`` (shapes matter, values do not) into a :class:`CostGraph`.

    All per-layer numbers are divided by the sample batch (the first input's dim 0), so they are
    per sample. ``seq_len`` identifies attention-score tensors (``[..., s, s]``); by default it is
    the first input's dim 1 when that input has two or more dims.
    """
    if not isinstance(model, nn.Module):
        raise SpecError("model", type(model).__name__, "expected a torch.nn.Module or a preset name")
    if dtype not in TORCH_DTYPES:
        raise SpecError("dtype", dtype, f"use one of {sorted(TORCH_DTYPES)}")
    start = time.perf_counter()
    inputs = sample_input if isinstance(sample_input, tuple) else (sample_input,)
    inputs = _to_meta(inputs)
    first = next((t for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)), None)
    if first is None or first.dim() == 0:
        raise SpecError("sample_input", sample_input, "pass at least one tensor with a batch dimension first")
    batch = int(first.shape[0])
    if seq_len is None and first.dim() >= 2:
        seq_len = int(first.shape[1])
    meta = _meta_copy(model, TORCH_DTYPES[dtype])
    inputs = tree_map(lambda t: t.to(TORCH_DTYPES[dtype]) if isinstance(t, torch.Tensor) and t.is_floating_point()
                      else t, inputs)
    excluded = {id(t) for t in list(meta.parameters()) + list(meta.buffers())}
    units = layer_units(meta)
    notes: list[str] = []
    method = "fx"
    opm = OpMeter(params={id(p) for p in meta.parameters()})
    stm = SavedTensorMeter(excluded, opm.masks)
    ops: list[_OpNode]
    try:
        if force_module_level:
            raise _FxFailure("<root>", "module-level tracing was requested")
        ops = _trace_fx(meta, inputs, opm, stm)
    except _FxFailure as failure:
        notes.append(f"torch.fx could not trace {failure.where} ({failure.why}); fell back to a module-level "
                     f"trace: one graph node per layer, same costs, no op-level detail inside layers")
        method = "module"
        opm = OpMeter(params={id(p) for p in meta.parameters()})
        stm = SavedTensorMeter(excluded, opm.masks)
        try:
            ops = _trace_modules(meta, inputs, units, opm, stm)
        except Exception as exc:
            raise TraceError(
                f"model {name or type(model).__name__} cannot be run on the meta device even layer by layer "
                f"({type(exc).__name__}: {exc}). Data-dependent control flow (.item(), if on tensor values) "
                "needs a sample_input that avoids it, or mark that module as a leaf.") from exc
    graph = _assemble(ops, units, meta, batch=batch, seq_len=seq_len, dtype=dtype,
                      name=name or type(model).__name__, method=method, notes=notes)
    graph.trace_time_s = time.perf_counter() - start
    return graph


def _layer_of(path: str, units: list[str], cache: dict[str, int]) -> int:
    if path in cache:
        return cache[path]
    best, best_len = -1, -1
    for i, unit in enumerate(units):
        if (unit == "" or path == unit or path.startswith(unit + ".")) and len(unit) > best_len:
            best, best_len = i, len(unit)
    cache[path] = best
    return best


def _assemble(ops: list[_OpNode], units: list[str], model: nn.Module, *, batch: int, seq_len: int | None,
              dtype: str, name: str, method: str, notes: list[str]) -> CostGraph:
    cache: dict[str, int] = {}
    raw_layer = {op.name: _layer_of(op.module_path, units, cache) if op.module_path else -1 for op in ops}
    by_name = {op.name: op for op in ops}
    consumers: dict[str, list[str]] = defaultdict(list)
    for op in ops:
        for src in op.inputs:
            consumers[src].append(op.name)
    # Ops outside any layer (root-level glue, inputs) join a neighbour: producer first, else consumer.
    for op in ops:
        if raw_layer[op.name] < 0:
            prev = [raw_layer[s] for s in op.inputs if raw_layer.get(s, -1) >= 0]
            raw_layer[op.name] = max(prev) if prev else -1
    for op in reversed(ops):
        if raw_layer[op.name] < 0:
            nxt = [raw_layer[c] for c in consumers[op.name] if raw_layer[c] >= 0]
            raw_layer[op.name] = min(nxt) if nxt else 0
    # Layers in order of first execution.
    order: list[int] = []
    for op in ops:
        if raw_layer[op.name] not in order:
            order.append(raw_layer[op.name])
    new_index = {old: new for new, old in enumerate(order)}
    unused = [units[i] for i in range(len(units)) if i not in new_index and units[i]]
    if unused:
        notes.append(f"{len(unused)} submodule(s) never ran in forward and hold no costs: {unused[:5]}")
    layer_of = {op: new_index[raw_layer[op]] for op in raw_layer}

    g = nx.DiGraph()
    for op in ops:
        recs = op.records
        fwd = sum(r.flops for r in recs) / batch
        bwd = sum(r.flops * (r.bwd_input_mult + r.bwd_weight_mult) for r in recs) / batch
        moved = sum(r.bytes for r in recs)
        g.add_node(op.name, kind=op.kind, target=op.target, module_path=op.module_path, layer=layer_of[op.name],
                   output_shapes=op.output_shapes, dtypes=op.dtypes, fwd_flops=fwd, bwd_flops=bwd,
                   bytes_read=(moved - op.output_bytes) / batch if moved else 0.0,
                   bytes_written=op.output_bytes / batch, param_bytes=0.0,
                   activation_bytes=sum(b for _, b in op.saved) / batch)
    for op in ops:
        g.nodes[op.name]["input_shapes"] = [s for src in op.inputs for s in by_name[src].output_shapes]
        for src in op.inputs:
            g.add_edge(src, op.name, bytes=by_name[src].output_bytes / batch)

    # Parameters: owned by the first layer that uses them; later users record a tied reference.
    param_names = {id(p): n for n, p in model.named_parameters()}
    owner: dict[int, int] = {}
    own_count: dict[int, int] = defaultdict(int)
    tied: dict[int, dict[str, TiedParam]] = defaultdict(dict)
    for op in ops:
        li = layer_of[op.name]
        g.nodes[op.name]["params"] = {param_names.get(id(p), "?"): tuple(p.shape) for p in op.params}
        for p in op.params:
            if id(p) not in owner:
                owner[id(p)] = li
                own_count[li] += p.numel()
                g.nodes[op.name]["param_bytes"] += p.numel() * p.element_size()
            elif owner[id(p)] != li:
                pname = param_names.get(id(p), "?")
                tied[li][pname] = TiedParam(name=pname, numel=p.numel(), owner=owner[id(p)])
    total_params = sum(p.numel() for p in model.parameters())
    counted = sum(own_count.values())
    if counted != total_params:
        notes.append(f"{total_params - counted} parameters are never used in forward (counted in no layer)")

    n_layers = len(order)
    layer_ops: dict[int, list[_OpNode]] = defaultdict(list)
    for op in ops:
        layer_ops[layer_of[op.name]].append(op)
    layers: list[Layer] = []
    named_modules = dict(model.named_modules())
    for li in range(n_layers):
        members = layer_ops[li]
        member_names = {op.name for op in members}
        outgoing = {src for op in ops if layer_of[op.name] != li for src in op.inputs if src in member_names}
        if li == n_layers - 1 and members:
            outgoing.add(members[-1].name)
        incoming = {src for op in members for src in op.inputs if src not in member_names}
        out_numel = max((_numel(s) for o in outgoing for s in by_name[o].output_shapes), default=0)
        recs = [r for op in members for r in op.records]
        saved = [s for op in members for s in op.saved]
        attention_saved = [b for shape, b in saved if seq_len and seq_len > 1 and len(shape) >= 2
                           and shape[-1] == seq_len and shape[-2] == seq_len]
        replicated = [b for shape, b in saved if out_numel and _numel(shape) == out_numel]
        gemm_costs = tuple(OpCost(kind=r.name, flops=r.flops / batch, bytes=r.bytes / batch,
                                  m=max(r.m // batch, 1) if r.m else 0, n=r.n, k=r.k)
                           for r in recs if r.flops > 0)
        mem_bytes = sum(r.bytes for r in recs if r.flops == 0) / batch
        op_costs = gemm_costs + ((OpCost(kind="memory-bound", flops=0.0, bytes=mem_bytes),) if mem_bytes else ())
        attention_flops = sum(r.flops for r in recs if r.flops > 0 and seq_len and r.name in ("bmm", "baddbmm")
                              and (r.n == seq_len or r.k == seq_len)) / batch
        unit_path = units[order[li]] if 0 <= order[li] < len(units) else ""
        mod_type = type(named_modules[unit_path]).__name__ if unit_path in named_modules else "Module"
        sig_src = repr(([(op.kind, op.output_shapes) for op in members],
                        sorted((p.shape, p.dtype) for op in members for p in op.params),
                        [s for s, _ in saved]))
        layers.append(Layer(
            index=li, name=unit_path or name, module_type=mod_type,
            signature=hashlib.sha1(sig_src.encode()).hexdigest()[:12],
            fwd_flops=sum(r.flops for r in recs) / batch,
            bwd_input_flops=sum(r.flops * r.bwd_input_mult for r in recs) / batch,
            bwd_weight_flops=sum(r.flops * r.bwd_weight_mult for r in recs) / batch,
            param_count=own_count[li], tied_params=tuple(sorted(tied[li].values(), key=lambda t: t.name)),
            activation_bytes=sum(b for _, b in saved) / batch,
            replicated_activation_bytes=sum(replicated) / batch,
            attention_activation_bytes=sum(attention_saved) / batch,
            attention_fwd_flops=attention_flops,
            input_bytes=sum(by_name[s].output_bytes for s in incoming) / batch,
            output_bytes=sum(by_name[o].output_bytes for o in outgoing) / batch,
            op_costs=op_costs, num_ops=len(members),
        ))
    return CostGraph(name=name, ops=g, layers=layers, layer_graph=layer_graph_from_ops(g, n_layers), dtype=dtype,
                     seq_len=seq_len, param_count=total_params, method=method, notes=notes)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
