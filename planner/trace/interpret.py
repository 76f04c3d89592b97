"""Run a traced graph node by node under the meters; replay repeated blocks instead of re-running them.

``GraphRunner`` executes an fx ``GraphModule`` (from ``torch.fx`` or ``torch.export``) on meta
tensors with :class:`OpMeter` and :class:`SavedTensorMeter` keyed by node name, and returns one
:class:`OpNode` per graph node.

Block replay (``reuse=True``) is what makes a 96-block model cost about as much as a 2-block one.
The graph's nodes are cut into *segments*: maximal runs of nodes that belong to the same layer.
A segment is replayed from an earlier, really executed one (its *reference*) when

1. both have the same *template*: node for node the same op, the same target (for a module
   call: the same :func:`module_key`, i.e. class, parameter shapes and plain attributes), the
   same constants, and the same wiring, with inputs from outside the segment numbered in order
   of first use; and
2. the values flowing in from outside have the same metadata (shape, stride, dtype,
   requires_grad, storage base and aliasing, parameter or not).

On meta tensors an op's outputs, FLOPs, bytes and saved tensors are functions of exactly that
metadata, so the replayed segment's costs are the reference's, not an estimate. The one piece
of global state is the saved-tensor de-duplication (a tensor saved twice counts once): each save
the reference made is classified as of a tensor born inside the segment (counted as it was), or
of an outside input or attribute (counted only if that tensor was not saved before, checked on
the replayed segment's own input), so the totals equal those of a full run. Outputs used
outside the segment are fabricated with the reference's metadata (views keep their base).

With fx the tracer goes further and traces each distinct layer only once: later identical
layers are single ``call_module`` nodes (:class:`~planner.trace.capture.BlockLeaf`) whose
reference nodes are replayed here under new names (``blocks_1_attn_qkv`` → ``blocks_5_attn_qkv``)
and this layer's own parameters. If the input metadata differ, the leaf's module is traced on
its own and run in place by a nested runner (names prefixed with the leaf's). ``tests/trace``
checks replayed and full traces give identical layers.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from planner.trace.meter import AtenRecord, OpMeter, PackEvent, SavedTensorMeter, storage_base
from planner.trace.opaque import opaque_call
from planner.trace.units import module_key

_CONSTS = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format, torch.layout,
           type(Ellipsis))
_SCRATCH = "<scratch>"
_HARMLESS_INPLACE = frozenset({"detach_"})  # changes nothing a later op's cost depends on


@dataclass
class OpNode:
    """One measured unit (an fx node, or a layer call in a module-level trace)."""

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
    events: list[PackEvent] = field(default_factory=list)  # every tensor saved for backward, by identity
    replayed_from: str = ""
    # The storage bases of its outputs, as PackEvent.base_id names them (empty: not known, e.g. off meta)
    out_bases: tuple = ()


def value_meta(value: Any) -> tuple[list[tuple[int, ...]], float, list[str]]:
    """Shapes, total bytes and dtypes of the tensors in ``value`` (any pytree)."""
    flat, _ = tree_flatten(value)
    tensors = [t for t in flat if isinstance(t, torch.Tensor)]
    shapes = [tuple(t.shape) for t in tensors]
    nbytes = float(sum(t.numel() * t.element_size() for t in tensors))
    dtypes = [str(t.dtype).replace("torch.", "") for t in tensors]
    return shapes, nbytes, dtypes


def op_kind(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return type(modules[node.target]).__name__.lower()
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        return name.split(".")[0] if isinstance(node.target, torch._ops.OpOverload) else name
    return str(node.target) if node.op == "call_method" else node.op


def fx_path(node: torch.fx.Node) -> str:
    """Module path of an fx node: the called module, else the innermost module on its stack."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _tensors(value: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]


@dataclass
class _Reference:
    ops: list[OpNode]
    values: list[Any]
    events: list[list[tuple[tuple, PackEvent]]]
    ext_key: tuple
    base_seen: dict[int, bool]  # id(reference output base) -> saved by the end of the segment
    mask_bases: set[int]


class GraphRunner(torch.fx.Interpreter):
    """Executes ``gm`` under the meters; see the module docstring for block replay."""

    def __init__(self, gm: torch.fx.GraphModule, *, opm: OpMeter, stm: SavedTensorMeter,
                 path_of: Callable[[torch.fx.Node], str], unit_of: Callable[[str], int], reuse: bool = True,
                 opaque_leaves: bool = False, notes: list[str] | None = None,
                 block_leaves: dict[str, Any] | None = None,
                 trace_module: Callable[[nn.Module, tuple, dict],
                                        tuple[torch.fx.GraphModule, list[Any]]] | None = None,
                 name_prefix: str = "", input_names: list[str | None] | None = None) -> None:
        super().__init__(gm)
        self.trace_module = trace_module  # fx-traces one module (a leaf whose replay did not apply)
        self.name_prefix = name_prefix  # a nested runner's node names are prefixed with the leaf's
        self.input_names = input_names  # a nested runner's placeholders: the outer nodes they stand for
        self.opm, self.stm = opm, stm
        self.path_of, self.unit_of = path_of, unit_of
        self.reuse = reuse
        self.opaque_leaves = opaque_leaves
        self.notes = notes if notes is not None else []
        self.modules = dict(gm.named_modules())
        self.ops: list[OpNode] = []
        self.refs: dict[tuple, _Reference] = {}
        self.module_keys: dict[int, tuple] = {}
        self.keep: list[torch.Tensor] = []
        self.replayed_segments = 0
        self.block_leaves = block_leaves or {}  # layer path -> BlockLeaf (see capture._Tracer)
        self.unit_refs: dict[int, tuple[_Reference, list[torch.fx.Node], list[torch.fx.Node]]] = {}
        self.alias: dict[str, str] = {}  # a replayed leaf call -> the op node that produced its output
        self.eager_leaves: list[str] = []
        self.param_names: dict[int, list[str]] = {}  # id -> every name of a parameter (filled on first use)

    # -- execution -------------------------------------------------------------------------------
    def capture(self, flat_inputs: list[Any]) -> list[OpNode]:
        with self.opm, self.stm:
            self._execute(flat_inputs)
        return self.ops

    def _execute(self, flat_inputs: list[Any]) -> Any:
        self.args_iter = iter(flat_inputs)
        self.env = {}
        nodes = list(self.module.graph.nodes)
        units = [self.unit_of(self.path_of(n)) if n.op not in ("placeholder", "output") else -1
                 for n in nodes]
        runs: dict[int, int] = {}
        for i, u in enumerate(units):
            if u >= 0 and (i == 0 or units[i - 1] != u):
                runs[u] = runs.get(u, 0) + 1
        i = 0
        while i < len(nodes):
            u = units[i]
            if u < 0:
                self._run(nodes[i])
                i += 1
                continue
            j = i
            while j < len(nodes) and units[j] == u:
                j += 1
            self._run_segment(nodes[i:j], u, replayable=self.reuse and runs[u] == 1)
            i = j
        return self.env[nodes[-1]] if nodes else None

    def _name(self, node: torch.fx.Node) -> str:
        if self.input_names is not None and node.op == "placeholder":
            placeholders = [n for n in self.module.graph.nodes if n.op == "placeholder"]
            outer = self.input_names[placeholders.index(node)]
            if outer is not None:
                return outer
        return self.name_prefix + node.name

    def _run(self, node: torch.fx.Node) -> None:
        name = self._name(node)
        self.opm.key = self.stm.key = name
        result = self.run_node(node)
        self.env[node] = result
        if node.op == "output" or (self.input_names is not None and node.op == "placeholder"):
            return  # a nested runner's inputs are the outer graph's nodes
        shapes, nbytes, dtypes = value_meta(result)
        self.ops.append(OpNode(
            name=name, kind=op_kind(node, self.modules), target=str(node.target),
            module_path=self.path_of(node),
            inputs=self._inputs(node), output_shapes=shapes, output_bytes=nbytes, dtypes=dtypes,
            params=self._params_of(node), records=self.opm.records.get(name, []),
            saved=self.stm.saved.get(name, []), events=self.stm.events.get(name, []),
            out_bases=self._out_bases(result)))

    def _out_bases(self, value: Any) -> tuple[int, ...]:
        """The ids of ``value``'s storage bases, kept alive so that no later tensor takes an id (meta
        tensors only: nothing real is held; off meta, none)."""
        tensors = _tensors(value)
        if any(t.device.type != "meta" for t in tensors):
            return ()
        bases = [storage_base(t) for t in tensors]
        self.keep.extend(bases)
        return tuple(id(b) for b in bases)

    def _inputs(self, node: torch.fx.Node) -> list[str]:
        names = [self._name(a) for a in node.all_input_nodes]
        return [self.alias.get(n, n) for n in names]

    def call_module(self, target, args, kwargs):
        if not self.opaque_leaves:
            return super().call_module(target, args, kwargs)
        try:
            return super().call_module(target, args, kwargs)
        except Exception as exc:  # a leaf that cannot run on meta: estimate it (noted), keep tracing
            out, note = opaque_call(self.fetch_attr(target), target, args, kwargs, exc, self.opm, self.stm)
            self.notes.append(note)
            return out

    def _params_of(self, node: torch.fx.Node) -> list[nn.Parameter]:
        if node.op == "call_module":
            return list(self.modules[node.target].parameters())
        params = []
        for a in node.all_input_nodes:
            if a.op == "get_attr":
                value = self.fetch_attr(a.target)
                if isinstance(value, nn.Parameter):
                    params.append(value)
        return params

    # -- segments and replay ---------------------------------------------------------------------
    def _run_segment(self, nodes: list[torch.fx.Node], unit: int, *, replayable: bool) -> None:
        if len(nodes) == 1 and nodes[0].op == "call_module" and nodes[0].target in self.block_leaves:
            self._run_block_leaf(nodes[0])
            return
        template, externals = self._template(nodes) if replayable else (None, [])
        if template is not None and template in self.refs:
            ref = self.refs[template]
            ext_values = [self.env[e] for e in externals]
            if self._ext_key(ext_values) == ref.ext_key:
                fabricated: dict[int, torch.Tensor] = {}
                inside = set(nodes)
                for i, n in enumerate(nodes):
                    if any(u not in inside for u in n.users):
                        self.env[n] = self._fabricate(ref.values[i], fabricated)
                specs = [(self._name(n), str(n.target), self.path_of(n), self._inputs(n), self._params_of(n),
                          n.target if n.op == "get_attr" else None) for n in nodes]
                self._replay(specs, ext_values, ref, fabricated)
                return
        for n in nodes:
            self._run(n)
        if template is not None:
            if template not in self.refs:
                self.refs[template] = self._reference(nodes, externals)
            self.unit_refs[unit] = (self.refs[template], nodes, externals)

    def _run_block_leaf(self, node: torch.fx.Node) -> None:
        """A layer fx left as one call: replay its reference's nodes, renamed, or run it eagerly."""
        leaf = self.block_leaves[node.target]
        ref_entry = self.unit_refs.get(self.unit_of(leaf.reference))
        args, kwargs = self.fetch_args_kwargs_from_env(node)
        flat_values = tree_flatten((args, kwargs))[0]
        flat_nodes = tree_flatten((node.args, node.kwargs))[0]
        if ref_entry is not None and len(flat_values) == len(leaf.arg_nodes):
            ref, ref_nodes, ref_ext = ref_entry
            position = {n: i for i, n in enumerate(leaf.arg_nodes) if n is not None}
            if all(e in position for e in ref_ext) and leaf.out_node in ref_nodes:
                ext_values = [flat_values[position[e]] for e in ref_ext]
                if self._ext_key(ext_values) == ref.ext_key:
                    self._replay_leaf(node, leaf, ref, ref_nodes, ref_ext, ext_values,
                                      [flat_nodes[position[e]] for e in ref_ext])
                    return
        if self.trace_module is not None and self._run_nested(node, args, kwargs):
            return
        self.eager_leaves.append(str(node.target))
        self._run(node)

    def _run_nested(self, node: torch.fx.Node, args: tuple, kwargs: dict) -> bool:
        """Trace the leaf's module on its own and run that graph here, names and paths prefixed."""
        module = self.fetch_attr(node.target)
        try:
            sub, values = self.trace_module(module, args, kwargs)
            bound = inspect.signature(module.forward).bind(*node.args, **node.kwargs)
        except Exception:
            return False
        sources = [bound.arguments.get(p) for p in inspect.signature(module.forward).parameters]
        names = [self.alias.get(self._name(a), self._name(a)) if isinstance(a, torch.fx.Node) else None
                 for a in sources]
        prefix = str(node.target)
        child = GraphRunner(sub, opm=self.opm, stm=self.stm, unit_of=lambda p: -1, reuse=False,
                            path_of=lambda n: f"{prefix}.{fx_path(n)}" if fx_path(n) else prefix,
                            opaque_leaves=self.opaque_leaves, notes=self.notes,
                            name_prefix=f"{self._name(node)}__", input_names=names)
        out = child._execute(values)
        self.env[node] = out
        self.ops.extend(child.ops)
        produced = [n for n in sub.graph.nodes if n.op == "output"][0].args[0]
        if isinstance(produced, torch.fx.Node):
            self.alias[self._name(node)] = child._name(produced)
        return True

    def _replay_leaf(self, node, leaf, ref: _Reference, ref_nodes: list[torch.fx.Node],
                     ref_ext: list[torch.fx.Node], ext_values: list[Any], ext_nodes: list[Any]) -> None:
        old, new = leaf.reference, str(node.target)
        old_prefix, new_prefix = old.replace(".", "_") + "_", new.replace(".", "_") + "_"

        def repath(path: str) -> str:
            return new + path[len(old):] if path == old or path.startswith(old + ".") else path

        def rename(name: str) -> str:
            if name.startswith(old_prefix):
                return new_prefix + name[len(old_prefix):]
            return f"{node.name}__{name}"

        local = {n: rename(n.name) for n in ref_nodes}
        outside = {e: (a.name if isinstance(a, torch.fx.Node) else None) for e, a in zip(ref_ext, ext_nodes)}
        specs = []
        for n, r in zip(ref_nodes, ref.ops):
            inputs = []
            for a in n.all_input_nodes:
                src = local.get(a) or outside.get(a) or a.name
                inputs.append(src if a in local else self.alias.get(src, src))
            target = repath(str(n.target)) if n.op in ("call_module", "get_attr") else str(n.target)
            params = [self._twin(p, old, new) for p in r.params]
            specs.append((local[n], target, repath(r.module_path), inputs, params,
                          target if n.op == "get_attr" else None))
        fabricated: dict[int, torch.Tensor] = {}
        self.env[node] = self._fabricate(ref.values[ref_nodes.index(leaf.out_node)], fabricated)
        self.alias[node.name] = local[leaf.out_node]
        self._replay(specs, ext_values, ref, fabricated)

    def _twin(self, p: nn.Parameter, old: str, new: str) -> nn.Parameter:
        """The parameter at the same place in layer ``new`` as ``p`` in layer ``old``."""
        if not self.param_names:
            for name, q in self.module.named_parameters(remove_duplicate=False):
                self.param_names.setdefault(id(q), []).append(name)
        for name in self.param_names.get(id(p), []):
            if name.startswith(old + "."):
                return self.module.get_parameter(new + name[len(old):])
        return p  # owned outside the layer (shared): the same parameter

    def _template(self, nodes: list[torch.fx.Node]) -> tuple[tuple | None, list[torch.fx.Node]]:
        local = {n: i for i, n in enumerate(nodes)}
        ext: dict[torch.fx.Node, int] = {}

        def norm(a: Any) -> Any:
            if isinstance(a, torch.fx.Node):
                return ("L", local[a]) if a in local else ("E", ext.setdefault(a, len(ext)))
            if isinstance(a, (tuple, list)):
                return (type(a).__name__,) + tuple(norm(x) for x in a)
            if isinstance(a, dict):
                return ("dict",) + tuple((k, norm(v)) for k, v in a.items())
            if isinstance(a, slice):
                return ("slice", norm(a.start), norm(a.stop), norm(a.step))
            if isinstance(a, _CONSTS):
                return (type(a).__name__, a)
            return ("<object>", id(a))

        desc = []
        for n in nodes:
            if n.op == "call_module":
                mod = self.modules[n.target]
                if id(mod) not in self.module_keys:
                    self.module_keys[id(mod)] = module_key(mod)
                target: Any = self.module_keys[id(mod)]
            elif n.op == "get_attr":
                value = self.fetch_attr(n.target)
                is_tensor = isinstance(value, torch.Tensor)
                target = (tuple(value.shape), value.dtype, value.requires_grad) if is_tensor \
                    else ("<object>", id(value))
            elif n.op in ("call_function", "call_method"):
                target = n.target
                name = str(getattr(n.target, "__name__", n.target)).split(".")[0]
                first = n.args[0] if n.args else None
                mutates = ((name.endswith("_") and not name.endswith("__")) or name == "setitem") \
                    and name not in _HARMLESS_INPLACE
                if mutates and isinstance(first, torch.fx.Node) and first not in local:
                    return None, []  # in-place on an outside value: state the template cannot see
            else:
                return None, []
            desc.append((n.op, target, norm(n.args), norm(n.kwargs)))
        return tuple(desc), list(ext)

    def _ext_key(self, values: list[Any]) -> tuple:
        bases: dict[int, int] = {}
        counter = [0]

        def meta(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                b = storage_base(v)
                counter[0] += 1
                alias = bases.setdefault(id(b), counter[0])
                return ("T", tuple(v.shape), v.stride(), v.storage_offset(), v.dtype, v.requires_grad,
                        v.device.type, tuple(b.shape), b.stride(), alias, id(b) in self.stm.excluded,
                        id(b) in self.stm.masks)
            if isinstance(v, (tuple, list)):
                return (type(v).__name__,) + tuple(meta(x) for x in v)
            if isinstance(v, _CONSTS):
                return ("V", type(v).__name__, v)
            return ("<object>", id(v))

        return tuple(meta(v) for v in values)

    def _reference(self, nodes: list[torch.fx.Node], externals: list[torch.fx.Node]) -> _Reference:
        ops = self.ops[-len(nodes):]
        values = [self.env[n] for n in nodes]
        ext_values = [self.env[e] for e in externals]
        ext_base: dict[int, int] = {}
        for pos, t in enumerate(_tensors(ext_values)):
            ext_base.setdefault(id(storage_base(t)), pos)
        out_base: dict[int, int] = {}
        for i, v in enumerate(values):
            for t in _tensors(v):
                out_base.setdefault(id(storage_base(t)), i)
        events = []
        for n in nodes:
            classified = []
            for ev in self.stm.events.get(self._name(n), []):
                if ev.base_id in ext_base:
                    cls: tuple = ("E", ext_base[ev.base_id])
                elif ev.base_id in out_base and nodes[out_base[ev.base_id]].op == "get_attr":
                    cls = ("A", out_base[ev.base_id])
                else:
                    cls = ("L",)  # born inside the segment (a node output or an op's hidden temporary)
                classified.append((cls, ev))
            events.append(classified)
        return _Reference(ops=ops, values=values, events=events, ext_key=self._ext_key(ext_values),
                          base_seen={b: b in self.stm.seen for b in out_base},
                          mask_bases={b for b in out_base if b in self.stm.masks})

    def _replay(self, specs: list[tuple], ext_values: list[Any], ref: _Reference,
                fabricated: dict[int, torch.Tensor]) -> None:
        """Op nodes of a replayed segment; ``specs``: (name, target, path, inputs, params, attr) per node."""
        ext_tensors = _tensors(ext_values)
        segment = specs[0][0]  # born-inside tensors get identities unique to this segment
        for i, (name, target, path, inputs, params, _attr) in enumerate(specs):
            saved, events = [], []
            for cls, ev in ref.events[i]:
                if cls[0] == "L":
                    if ev.new:
                        saved.append((ev.shape, ev.nbytes))
                    events.append(PackEvent((segment, ev.base_id), ev.shape, ev.nbytes, ev.new))
                    continue
                t = ext_tensors[cls[1]] if cls[0] == "E" else _tensors(self.fetch_attr(specs[cls[1]][5]))[0]
                base = storage_base(t)
                new = id(base) not in self.stm.seen
                events.append(PackEvent(id(base), tuple(base.shape), self.stm.nbytes_of(base), new))
                if new:
                    self.stm.seen.add(id(base))
                    self.stm.keep.append(base)
                    saved.append((tuple(base.shape), self.stm.nbytes_of(base)))
            r = ref.ops[i]
            self.ops.append(OpNode(
                name=name, kind=r.kind, target=target, module_path=path, inputs=inputs,
                output_shapes=r.output_shapes, output_bytes=r.output_bytes, dtypes=r.dtypes, params=params,
                records=list(r.records), saved=saved, events=events, replayed_from=r.replayed_from or r.name,
                out_bases=tuple(_replayed_base(segment, storage_base(t), fabricated) for t in _tensors(ref.values[i]))))
        for ref_base, fab in fabricated.items():
            if ref.base_seen.get(ref_base):
                self.stm.seen.add(id(fab))
                self.stm.keep.append(fab)
            if ref_base in ref.mask_bases:
                self.stm.masks[id(fab)] = fab
        self.replayed_segments += 1

    def _fabricate(self, value: Any, cache: dict[int, torch.Tensor]) -> Any:
        """A value with ``value``'s metadata; tensors sharing a base still share one."""
        key = self.opm.key
        self.opm.key = self.stm.key = _SCRATCH

        def fab(t: Any) -> Any:
            if not isinstance(t, torch.Tensor):
                return t
            b = storage_base(t)
            fb = cache.get(id(b))
            if fb is None:
                fb = torch.empty_strided(b.shape, b.stride(), dtype=b.dtype, device=b.device)
                if b.requires_grad:
                    fb = fb.requires_grad_().clone()  # a non-leaf, like the activation it stands for
                cache[id(b)] = fb
                self.keep.append(fb)
            return fb if t is b else fb.as_strided(t.shape, t.stride(), t.storage_offset())

        try:
            return tree_map(fab, value)
        finally:
            for table in (self.opm.records, self.opm.param_uses, self.stm.saved, self.stm.events):
                table.pop(_SCRATCH, None)
            self.opm.key = self.stm.key = key


def _replayed_base(segment: str, base: torch.Tensor, fabricated: dict[int, torch.Tensor]) -> object:
    """The identity of a replayed op's output: the fabricated tensor that leaves the segment, where it is
    one (later layers save and read that tensor, so pointwise_saved must see the two as one), else one
    unique to this segment."""
    fab = fabricated.get(id(base))
    return id(fab) if fab is not None else (segment, id(base))
