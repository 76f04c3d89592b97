"""Model → cost graph, on the meta device, degrading to coarser captures rather than failing.

The model is copied to the meta device in the training dtype (nothing is allocated, the
user's module is left untouched), put in training mode, and run once on a sample batch. The
forward is captured by the first of these that works, finest first:

1. ``fx``: ``torch.fx`` symbolic tracing, executed node by node under the meters (one graph
   node per torch.nn leaf call or tensor op);
2. ``export``: ``torch.export`` (non-strict), for models fx cannot trace (most Hugging Face
   models): one node per ATen op;
3. ``fx+opaque``: fx again, with the module classes fx failed inside made leaves; a leaf that
   cannot run on meta (``.item()``, data-dependent ``if``) is replaced by an opaque estimate;
4. ``module``: an eager run with hooks on the layers, one node per layer call, same costs;
   modules that cannot run on meta are opaque estimates (``module+opaque``);
5. ``opaque``: the whole model as one layer estimated from its parameter count.

Every fallback, with the module path and the reason, is written to ``CostGraph.notes``; what is
estimated rather than measured says so. ``reuse=True`` (the default) replays repeated blocks and
extrapolates recurrent layers exactly instead of re-running them (see
:mod:`planner.trace.interpret` and :mod:`planner.trace.rnn`); ``reuse=False`` runs everything,
which the tests use to check the shortcuts change nothing.

Layers are the pipeline building blocks (:func:`layer_units`).
"""

from __future__ import annotations

import copy
import gc
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from planner.errors import SpecError, TraceError
from planner.trace.assemble import TraceContext, assemble, layer_of_path
from planner.trace.attention import FusedAttention
from planner.trace.capture import CaptureFailure, capture_modules, export_graph, export_path, fx_graph
from planner.trace.graph import CostGraph
from planner.trace.interpret import GraphRunner, OpNode, fx_path, value_meta
from planner.trace.meter import ATTENTION_KERNELS, OpMeter, SavedTensorMeter
from planner.trace.opaque import OpaqueFailure, meta_limitation, opaque_call, reason_of
from planner.trace.rnn import rnn_shortcut
from planner.trace.units import CONTAINERS, layer_units

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_MAX_OPAQUE_ROUNDS = 6

__all__ = ["TORCH_DTYPES", "layer_units", "trace_model", "trace_preset"]


def _to_meta(value: Any) -> Any:
    def convert(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return torch.empty(x.shape, dtype=x.dtype, device="meta")
        return x

    return tree_map(convert, value)


def _meta_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A training-mode copy on meta in ``dtype``; the caller's module is not modified. Each parameter keeps
    its ``requires_grad``: a frozen one is traced without a weight gradient, as autograd runs it."""
    on_meta = all(t.device.type == "meta" for t in list(model.parameters()) + list(model.buffers()))
    clone = copy.deepcopy(model) if on_meta else _deepcopy_to_meta(model)
    clone = clone.to(device="meta", dtype=dtype)
    clone.train()
    return clone


def _checked_meta(model: nn.Module, dtype: torch.dtype, label: str, copy: bool) -> nn.Module:
    """``model`` on meta in training mode (a copy, or itself), refused when it has nothing to train: a plan
    for a model whose every parameter is frozen could mean nothing."""
    meta = _meta_copy(model, dtype) if copy else model.to(device="meta", dtype=dtype).train()
    params = list(meta.parameters())
    if params and not any(p.requires_grad for p in params):
        raise SpecError("model", label, f"every one of its {sum(p.numel() for p in params):,} parameters has "
                        "requires_grad=False, so training would change nothing: unfreeze what you train "
                        "(p.requires_grad_(True)) before planning")
    return meta


def _deepcopy_to_meta(model: nn.Module) -> nn.Module:
    # Copy structure without copying weight data: memo maps each real tensor to a meta twin.
    memo: dict[int, Any] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        twin = torch.empty(t.shape, dtype=t.dtype, device="meta")
        is_param = isinstance(t, nn.Parameter)
        memo[id(t)] = nn.Parameter(twin, requires_grad=t.requires_grad) if is_param else twin
    return copy.deepcopy(model, memo)


def _split_input(sample_input: Any) -> tuple[tuple, dict]:
    if isinstance(sample_input, dict):
        return (), dict(sample_input)
    if isinstance(sample_input, (tuple, list)):
        return tuple(sample_input), {}
    return (sample_input,), {}


def _meters(module: nn.Module) -> tuple[OpMeter, SavedTensorMeter]:
    params = {id(p) for p in module.parameters()}
    excluded = params | {id(b) for b in module.buffers()}
    opm = OpMeter(params=params)
    return opm, SavedTensorMeter(excluded, opm.masks)


def _describe(f: CaptureFailure) -> str:
    what = {"fx": "torch.fx symbolic tracing", "export": "torch.export (non-strict)",
            "fx+opaque": "torch.fx with opaque leaves", "module": "the module-level eager trace"}[f.method]
    return f"{what} failed at {f.where}: {f.why}"


class _Tracing:
    """One trace: the meta model, its inputs and layers, and the capture attempts in order."""

    def __init__(self, meta: nn.Module, args: tuple, kwargs: dict, reuse: bool) -> None:
        self.meta, self.args, self.kwargs, self.reuse = meta, args, kwargs, reuse
        self.units = layer_units(meta)
        self.cache: dict[str, int] = {}
        self.notes: list[str] = []
        self.softmax_shapes: frozenset[tuple[int, ...]] = frozenset()
        self.fx_culprit: nn.Module | None = None
        self.leaf_types: tuple[type, ...] = ()

    def unit_of(self, path: str) -> int:
        return layer_of_path(path, self.units, self.cache) if path else -1

    def _run_graph(self, method: str, gm: torch.fx.GraphModule, inputs: list[Any], path_of,
                   opaque_leaves: bool = False, block_leaves: dict | None = None) -> list[OpNode]:
        def trace_module(module: nn.Module, args: tuple, kwargs: dict):
            sub, values, _ = fx_graph(module, args, kwargs, self.leaf_types)
            return sub, values

        opm, stm = _meters(gm)
        runner = GraphRunner(gm, opm=opm, stm=stm, path_of=path_of, unit_of=self.unit_of, reuse=self.reuse,
                             opaque_leaves=opaque_leaves, notes=self.notes, block_leaves=block_leaves,
                             trace_module=trace_module)
        try:
            with rnn_shortcut(gm, opm, stm, enabled=self.reuse):
                ops = runner.capture(inputs)
        except Exception as exc:
            node = next((n for n in gm.graph.nodes if n.name == opm.key), None)
            where = (path_of(node) if node is not None else "") or "<root>"
            raise CaptureFailure(method, where, f"running the graph on meta: {reason_of(exc)}") from exc
        self.softmax_shapes = frozenset(opm.softmax_shapes)
        if runner.replayed_segments:
            self.notes.append(f"{runner.replayed_segments} repeated layer(s) replayed from an identical "
                              "earlier one (exact: same ops, module attributes and input metadata)")
        if runner.eager_leaves:
            more = " …" if len(runner.eager_leaves) > 3 else ""
            self.notes.append(f"{', '.join(runner.eager_leaves[:3])}{more}: built like an earlier layer "
                              "but fed different input shapes, and not traceable on its own: measured as one "
                              "graph node each (costs exact, no op-level detail inside)")
        return ops

    def fx(self) -> list[OpNode]:
        units = frozenset(self.units) if self.reuse else frozenset()
        try:
            gm, values, leaves = fx_graph(self.meta, self.args, self.kwargs, units=units)
        except CaptureFailure as f:
            self.fx_culprit = getattr(f, "culprit", None)
            raise
        return self._run_graph("fx", gm, values, fx_path, block_leaves=leaves)

    def export(self) -> list[OpNode]:
        gm, flat = export_graph(self.meta, self.args, self.kwargs)
        # Report parameters as the model's own (export's module holds its own Parameter objects).
        own = dict(self.meta.named_parameters(remove_duplicate=False))
        to_own = {id(p): own.get(n.split(".", 1)[1] if n.startswith("inner.") else n)
                  for n, p in gm.named_parameters(remove_duplicate=False)}
        ops = self._run_graph("export", gm, flat, export_path)
        for op in ops:
            op.params = [p if to_own.get(id(p)) is None else to_own[id(p)] for p in op.params]
        return ops

    def fx_opaque(self) -> list[OpNode]:
        """fx with the classes it failed inside as leaves (a leaf that cannot run becomes an estimate)."""
        culprit = self.fx_culprit
        if culprit is None or culprit is self.meta or isinstance(culprit, CONTAINERS):
            raise CaptureFailure("fx+opaque", "<root>", "symbolic tracing failed in the model's own forward, "
                                 "so no submodule can be made a leaf")
        leaves: tuple[type, ...] = (type(culprit),)
        for _ in range(_MAX_OPAQUE_ROUNDS):
            try:
                units = frozenset(self.units) if self.reuse else frozenset()
                gm, values, block_leaves = fx_graph(self.meta, self.args, self.kwargs, leaves, units=units)
                break
            except CaptureFailure as f:
                nxt = getattr(f, "culprit", None)
                if nxt is None or nxt is self.meta or isinstance(nxt, CONTAINERS) or isinstance(nxt, leaves):
                    raise CaptureFailure("fx+opaque", f.where, f.why) from f
                leaves += (type(nxt),)
        else:
            raise CaptureFailure("fx+opaque", "<root>",
                                 f"still failing after {_MAX_OPAQUE_ROUNDS} leaf classes")
        self.leaf_types = leaves
        names = ", ".join(t.__name__ for t in leaves)
        self.notes.append(f"symbolic tracing treats {names} as leaf module(s): their costs are measured by "
                          "running them eagerly")
        return self._run_graph("fx+opaque", gm, values, fx_path, opaque_leaves=True,
                               block_leaves=block_leaves)

    def modules(self) -> tuple[list[OpNode], bool]:
        """Module-level capture, making the innermost failing module class opaque, round by round."""
        opaque: dict[str, tuple[nn.Module, BaseException]] = {}
        for _ in range(_MAX_OPAQUE_ROUNDS):
            opm, stm = _meters(self.meta)
            try:
                with rnn_shortcut(self.meta, opm, stm, enabled=self.reuse):
                    ops, notes = capture_modules(self.meta, self.args, self.kwargs, self.units, opm, stm,
                                                 opaque)
            except CaptureFailure as f:
                error = getattr(f, "error", None)
                if error is not None and not meta_limitation(error):  # the model's own failure: no estimate
                    raise SpecError("sample_input", f"{f.where}: {reason_of(error)}",
                                    "the model's forward fails on this input (checked on the meta device, "
                                    "which checks shapes and dtypes as a GPU does): pass a sample_input the "
                                    "forward accepts, or fix the model") from error
                culprit = getattr(f, "culprit", None)
                if culprit is None or culprit is self.meta or f.where in opaque:
                    raise
                same = [(p, m) for p, m in self.meta.named_modules() if type(m) is type(culprit)]
                for path, mod in same:
                    opaque[path] = (mod, f.error)  # type: ignore[attr-defined]
                continue
            self.softmax_shapes = frozenset(opm.softmax_shapes)
            self.notes.extend(_summarise(notes))
            return ops, bool(opaque)
        raise CaptureFailure("module", "<root>",
                             f"still failing after {_MAX_OPAQUE_ROUNDS} opaque module classes")

    def whole_model(self, reason: str) -> list[OpNode]:
        opm, stm = _meters(self.meta)
        opm.key = stm.key = "<model>"
        with opm, stm:
            out, note = opaque_call(self.meta, "", self.args, self.kwargs, RuntimeError(reason), opm, stm)
        self.notes.append(note.replace("treated as an opaque leaf", "the whole model is one opaque layer"))
        shapes, nbytes, dtypes = value_meta(out)
        return [OpNode(name="<model>", kind=type(self.meta).__name__.lower(), target="", module_path="",
                       inputs=[], output_shapes=shapes, output_bytes=nbytes, dtypes=dtypes,
                       params=list(self.meta.parameters()), records=opm.records.get("<model>", []),
                       saved=stm.saved.get("<model>", []), events=stm.events.get("<model>", []))]


def token_length(tensors: list[torch.Tensor]) -> int | None:
    """The sequence length a sample input shows: dim 1 of its first integer tensor of two or more dims."""
    tokens = next((t for t in tensors if not t.is_floating_point() and t.dim() >= 2), None)
    return int(tokens.shape[1]) if tokens is not None else None


def _summarise(notes: list[str]) -> list[str]:
    """One note per opaque module class, with a count of the other instances."""
    by_type: dict[str, list[str]] = {}
    for note in notes:
        by_type.setdefault(note.split(" (", 1)[1].split(")", 1)[0] if " (" in note else note, []).append(note)
    out = []
    for items in by_type.values():
        extra = f" [and {len(items) - 1} more of the same class]" if len(items) > 1 else ""
        out.append(items[0] + extra)
    return out


def trace_model(model: nn.Module, sample_input: tuple | dict | torch.Tensor, *, name: str | None = None,
                dtype: str = "bf16", seq_len: int | None = None, force_module_level: bool = False,
                reuse: bool = True, copy_model: bool = True) -> CostGraph:
    """Trace ``model`` on ``sample_input`` (shapes matter, values do not) into a :class:`CostGraph`.

    ``sample_input``: a tensor, a tuple of positional arguments, or a dict of keyword arguments.
    All per-layer numbers are divided by the sample batch (the first tensor's dim 0), so they
    are per sample. ``seq_len`` is recorded on the graph; by default it is dim 1 of the first
    integer (token-id) input, else the length of the attention scores seen in the trace (ViT's
    patches, wav2vec's frames), else ``None`` (a CNN).
    ``reuse``: replay repeated blocks / extrapolate recurrent layers (exact; ``False`` runs all).
    ``copy_model=False`` traces ``model`` itself instead of a meta copy (faster for a model built
    only to be traced): it is moved to meta and ``dtype`` in place and left in training mode.
    """
    if not isinstance(model, nn.Module):
        raise SpecError("model", type(model).__name__, "expected a torch.nn.Module or a preset name")
    if dtype not in TORCH_DTYPES:
        raise SpecError("dtype", dtype, f"use one of {sorted(TORCH_DTYPES)}")
    start = time.perf_counter()
    args, kwargs = _split_input(_to_meta(sample_input))
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    if not tensors or tensors[0].dim() == 0:
        raise SpecError("sample_input", sample_input, "pass at least one tensor with a batch dimension first")
    batch = int(tensors[0].shape[0])
    if batch < 1:
        raise SpecError("sample_input", tuple(tensors[0].shape), "the first tensor's dim 0 is the batch: give it "
                        "at least one sample (batch 1 is enough)")
    if seq_len is None:
        seq_len = token_length(tensors)
    torch_dtype = TORCH_DTYPES[dtype]
    args, kwargs = tree_map(
        lambda t: t.to(torch_dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
        (args, kwargs))
    label = name or type(model).__name__
    meta = _checked_meta(model, torch_dtype, label, copy_model)
    gc_enabled = gc.isenabled()
    gc.disable()  # millions of short-lived meta tensors and graph nodes: collection would cost ~25%
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # Python-level randomness in a forward (LayerDrop) is repeatable
            tracing = _Tracing(meta, args, kwargs, reuse)
            ops, method = _capture_fused(tracing, force_module_level)
        if seq_len is None:
            seq_len = _attention_length(tracing.softmax_shapes, batch)
        ctx = TraceContext(model=meta, units=tracing.units if method != "opaque" else [""], batch=batch,
                           seq_len=seq_len, dtype=dtype, name=label, method=method,
                           softmax_shapes=tracing.softmax_shapes)
        graph = assemble(ops, ctx, tracing.notes)
    except OpaqueFailure as exc:
        raise TraceError(f"model {label} cannot be traced at any granularity and gives nothing to estimate "
                         f"from ({exc}); pass a sample_input with at least one tensor") from exc
    finally:
        if gc_enabled:
            gc.enable()
    graph.attention = attention_kind(graph)
    graph.trace_time_s = time.perf_counter() - start
    return graph


def attention_kind(graph: CostGraph) -> str:
    """``"fused"`` when the model's attention runs a fused kernel (SDPA: flash or memory-efficient),
    ``"eager"`` when it materialises the scores (``softmax(q @ kᵀ)``), ``"none"`` without attention."""
    if any(op.kind in ATTENTION_KERNELS for layer in graph.layers for op in layer.op_costs):
        return "fused"
    if any(layer.attention_fwd_flops > 0 for layer in graph.layers):
        return "eager"
    return "none"


def _attention_length(shapes: frozenset[tuple[int, ...]], batch: int) -> int | None:
    """The key length of the attention scores seen (the most common), for float-input models."""
    lengths = [s[-1] for s in shapes if len(s) >= 3 and math.prod(s[:-2]) != batch]
    return max(set(lengths), key=lengths.count) if lengths else None


def _capture_fused(tracing: _Tracing, force_module_level: bool) -> tuple[list[OpNode], str]:
    """:func:`_capture` with SDPA sent to the fused kernel a GPU runs, not the meta math fallback."""
    with FusedAttention() as fused:
        captured = _capture(tracing, force_module_level, before_attempt=fused.start_attempt)
    if fused.causal_masks:
        tracing.notes.append("attention modules that declare is_causal=True hand SDPA a mask: priced as causal "
                             "FlashAttention, which they run on batches without padding (planner/trace/attention.py)")
    return captured


def _capture(tracing: _Tracing, force_module_level: bool,
             before_attempt: Callable[[], None] = lambda: None) -> tuple[list[OpNode], str]:
    """The model's ops by the finest method that works (fx, export, fx with opaque modules, module-level,
    one opaque layer); ``before_attempt`` runs before each try (counters that must describe the kept one)."""
    failures: list[str] = []
    if force_module_level:
        failures.append("module-level tracing was requested")
    else:
        attempts = (("fx", tracing.fx), ("export", tracing.export), ("fx+opaque", tracing.fx_opaque))
        for method, attempt in attempts:
            before_attempt()
            try:
                ops = attempt()
            except CaptureFailure as f:
                failures.append(_describe(f))
                continue
            if failures:
                tracing.notes.insert(0, f"traced with {method} after: " + "; ".join(failures))
            return ops, method
    before_attempt()
    try:
        ops, estimated = tracing.modules()
    except CaptureFailure as f:
        failures.append(_describe(f))
        before_attempt()
        ops = tracing.whole_model("no finer capture worked, see the previous note")
        tracing.notes.insert(0, "fell back to one opaque layer for the whole model after: "
                             + "; ".join(failures))
        return ops, "opaque"
    tracing.notes.insert(0, "fell back to a module-level trace (one graph node per layer call, same costs, "
                         "no op-level detail inside layers) after: " + "; ".join(failures))
    return ops, "module+opaque" if estimated else "module"


def trace_preset(preset: str | Any, *, batch: int = 1, dtype: str = "bf16", seq_len: int | None = None,
                 reuse: bool = True) -> CostGraph:
    """Trace a preset (a name or a :class:`~planner.models.ModelPreset`) at its own sequence length."""
    from planner.models import ModelPreset, load_preset

    p = preset if isinstance(preset, ModelPreset) else load_preset(str(preset))
    model = p.build(device="meta")
    s = seq_len or p.seq_len
    return trace_model(model, p.sample_input(batch, seq_len), name=p.name, dtype=dtype, seq_len=s,
                       reuse=reuse, copy_model=False)
