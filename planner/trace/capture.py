"""The ways a model's forward is captured, finest first; each returns measured :class:`OpNode` s.

* :func:`fx_graph`: ``torch.fx`` symbolic tracing (torch.nn modules are leaves; ``leaf_types``
  adds more). Fails on data-dependent Python and on forwards fx cannot bind (``**kwargs``); the
  failure names the innermost module being traced.
* :func:`export_graph`: ``torch.export.export(..., strict=False)`` on the meta model, which
  handles most of what fx cannot (Hugging Face models), decomposed to ATen ops. Outputs are
  reduced to their tensors first, so cache objects in the output do not matter.
* :func:`capture_modules`: run eagerly with hooks on the layers: one node per layer call, same
  costs. A module that cannot run on meta at all is replaced by an opaque estimate (see
  :mod:`planner.trace.opaque`), innermost failing module first.

Graph captures are executed by :class:`GraphRunner`.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.utils._pytree import tree_flatten

from planner.trace.interpret import OpNode, value_meta
from planner.trace.meter import OpMeter, SavedTensorMeter
from planner.trace.opaque import OpaqueFailure, opaque_call, reason_of
from planner.trace.units import _has_stack, module_key

EXPORT_ROOT = "inner"  # attribute name of the wrapped model inside the export wrapper


class CaptureFailure(Exception):
    """A capture method gave up: ``where`` (module path) and ``why`` (first line of the error)."""

    def __init__(self, method: str, where: str, why: str) -> None:
        super().__init__(f"{method}: {where}: {why}")
        self.method, self.where, self.why = method, where, why


@dataclass(frozen=True)
class BlockLeaf:
    """A layer traced as one ``call_module`` node because an identical earlier layer was traced inline.

    ``reference``: that earlier layer's path; ``arg_nodes``: the reference call's flattened
    arguments (graph nodes, or None for constants); ``out_node``: the node it returned.
    """

    reference: str
    arg_nodes: tuple[torch.fx.Node | None, ...]
    out_node: torch.fx.Node


def _arg_structure(args: tuple, kwargs: dict) -> tuple:
    flat, spec = tree_flatten((args, kwargs))
    parts = []
    for a in flat:
        if isinstance(a, torch.fx.Proxy):
            parts.append(("proxy",))
        elif isinstance(a, (int, float, bool, str, type(None))):
            parts.append(("const", type(a).__name__, a))
        else:
            parts.append(("object", id(a)))
    return (str(spec), tuple(parts))


class _Tracer(torch.fx.Tracer):
    """Symbolic tracer: proxies buffers, remembers where tracing failed, traces each distinct layer once.

    A layer (one of ``units``) whose :func:`module_key` and argument structure equal those of a
    layer already traced inline becomes a ``call_module`` leaf: fx would record the same nodes
    for it, so :class:`GraphRunner` replays the reference's nodes instead (and checks, at run
    time, that the input metadata agree too).
    """

    proxy_buffer_attributes = True

    def __init__(self, leaf_types: tuple[type, ...] = (), units: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.leaf_types = leaf_types
        self.units = units
        self.stack: list[tuple[str, nn.Module]] = []
        self.failed_at: tuple[str, nn.Module] | None = None
        self.references: dict[tuple, tuple[str, tuple, torch.fx.Node]] = {}
        self.block_leaves: dict[str, BlockLeaf] = {}
        self._keys: dict[int, tuple] = {}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, self.leaf_types):
            return True
        # torch.fx keeps every torch.nn module whole, nn.TransformerEncoder included: one that holds a stack
        # of layers is opened, so its layers are the layers it holds
        return not _has_stack(m) and super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        self.stack.append((path, m))
        try:
            if path in self.units and not self.is_leaf_module(m, path):
                return self._call_unit(m, path, forward, args, kwargs)
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:
                self.failed_at = self.stack[-1]
            raise
        finally:
            self.stack.pop()

    def _call_unit(self, m, path, forward, args, kwargs):
        key = self._keys.get(id(m)) or self._keys.setdefault(id(m), module_key(m))
        signature = (key, _arg_structure(args, kwargs))
        ref = self.references.get(signature)
        if ref is not None:
            self.block_leaves[path] = BlockLeaf(reference=ref[0], arg_nodes=ref[1], out_node=ref[2])
            return self.create_proxy("call_module", path, args, kwargs)
        result = super().call_module(m, forward, args, kwargs)
        if isinstance(result, torch.fx.Proxy):  # only single-output layers are replayed as leaves
            flat, _ = tree_flatten((args, kwargs))
            arg_nodes = tuple(a.node if isinstance(a, torch.fx.Proxy) else None for a in flat)
            self.references[signature] = (path, arg_nodes, result.node)
        return result


def fx_graph(model: nn.Module, args: tuple, kwargs: dict, leaf_types: tuple[type, ...] = (),
             units: frozenset[str] = frozenset()
             ) -> tuple[torch.fx.GraphModule, list[Any], dict[str, BlockLeaf]]:
    """Symbolic trace; returns the graph module, its placeholder values, and the layers made leaves.

    ``units``: layer paths that may be traced once and replayed (empty: trace everything inline).
    """
    sig = inspect.signature(model.forward)
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values()):
        raise CaptureFailure("fx", "<root>",
                             "forward takes *args/**kwargs, which symbolic tracing cannot bind")
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as exc:
        raise CaptureFailure("fx", "<root>", f"sample input does not match forward{sig}: {exc}") from exc
    concrete = {p.name: p.default for p in sig.parameters.values() if p.name not in bound.arguments}
    tracer = _Tracer(leaf_types, units)
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as exc:
        where, culprit = tracer.failed_at or ("", None)
        failure = CaptureFailure("fx", where or "<root>", reason_of(exc))
        failure.culprit = culprit  # type: ignore[attr-defined]
        raise failure from exc
    gm = torch.fx.GraphModule(model, graph)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = [bound.arguments[p.name] if p.name in bound.arguments else p.default
              for p in sig.parameters.values()]
    if len(placeholders) != len(values):
        raise CaptureFailure("fx", "<root>",
                             f"{len(placeholders)} placeholders for {len(values)} forward arguments")
    return gm, values, tracer.block_leaves


class _TensorOutputs(nn.Module):
    """Export wrapper: the model's outputs reduced to their tensors (caches and dataclasses dropped)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def innermost_module(exc: BaseException, model: nn.Module) -> str:
    """Path of the innermost submodule of ``model`` whose code is on the exception's traceback."""
    paths = {id(m): p for p, m in model.named_modules()}
    found = ""
    tb = exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if owner is not None and id(owner) in paths and paths[id(owner)]:
            found = paths[id(owner)]
        tb = tb.tb_next
    return found


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence torch.export's warnings and graph dumps on failure (the failure itself is reported)."""
    loggers = [logging.getLogger(n) for n in ("torch", "torch.export", "torch._export", "torch._dynamo",
                                              "torch.fx.experimental.symbolic_shapes")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR + 10)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_graph(model: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.fx.GraphModule, list[Any]]:
    """``torch.export`` (non-strict) on meta; returns the unlifted graph module and its flat inputs."""
    try:
        with _quiet():
            program = torch.export.export(_TensorOutputs(model), tuple(args), dict(kwargs), strict=False)
            gm = program.module()
    except Exception as exc:
        raise CaptureFailure("export", innermost_module(exc, model) or "<root>", reason_of(exc)) from exc
    flat = list(tree_flatten((tuple(args), dict(kwargs)))[0])
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(flat):
        raise CaptureFailure("export", "<root>",
                             f"{len(placeholders)} graph inputs for {len(flat)} sample inputs")
    for p in gm.parameters():
        p.requires_grad_(True)
    return gm, flat


def export_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = str(list(stack.values())[-1][0])
    if path == EXPORT_ROOT:
        return ""
    return path[len(EXPORT_ROOT) + 1:] if path.startswith(EXPORT_ROOT + ".") else path


class _CallStack:
    """Forward pre/post hooks on every module: which calls are open when an exception flies."""

    def __init__(self, model: nn.Module) -> None:
        self.stack: list[tuple[str, nn.Module]] = []
        self.handles = []
        for path, mod in model.named_modules():
            self.handles.append(mod.register_forward_pre_hook(self._push(path)))
            self.handles.append(mod.register_forward_hook(self._pop))  # not on exceptions: the stack stays

    def _push(self, path: str):
        def hook(mod, args):
            self.stack.append((path, mod))
        return hook

    def _pop(self, mod, args, out):
        # Calls that raised and were caught inside the model left entries above this one.
        while self.stack:
            if self.stack.pop()[1] is mod:
                break

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def capture_modules(model: nn.Module, args: tuple, kwargs: dict, units: list[str], opm: OpMeter,
                    stm: SavedTensorMeter, opaque: dict[str, tuple[nn.Module, BaseException]]
                    ) -> tuple[list[OpNode], list[str]]:
    """Eager run with hooks on ``units``; modules in ``opaque`` (path -> (module, error)) are estimated.

    Returns the op nodes and the opaque-estimate notes. Raises :class:`CaptureFailure` naming the
    innermost failing module when the run fails.
    """
    rec = _UnitRecorder(opm, stm)
    modules = dict(model.named_modules())
    handles = []
    for path in units:
        mod = modules[path]
        handles.append(mod.register_forward_pre_hook(rec.pre(path), with_kwargs=True))
        handles.append(mod.register_forward_hook(rec.post(path), with_kwargs=True))
    for path, (mod, exc) in opaque.items():
        mod.forward = rec.stub(path, mod, exc)
    calls = _CallStack(model)
    try:
        opm.key = stm.key = "<before>"
        with opm, stm:
            model(*args, **kwargs)
    except OpaqueFailure as exc:
        raise CaptureFailure("module", str(exc).split(":")[0],
                             "an opaque module has no tensor input") from exc
    except Exception as exc:
        where, culprit = calls.stack[-1] if calls.stack else ("", None)
        failure = CaptureFailure("module", where or "<root>", reason_of(exc))
        failure.culprit = culprit  # type: ignore[attr-defined]
        failure.error = exc  # type: ignore[attr-defined]
        raise failure from exc
    finally:
        calls.remove()
        for h in handles:
            h.remove()
        for mod, _ in opaque.values():
            vars(mod).pop("forward", None)
    _charge_glue(rec.ops, opm, stm, {id(p): p for p in model.parameters()})
    return rec.ops, rec.notes


class _UnitRecorder:
    """The hooks of :func:`capture_modules`: one op node per call of a unit module (``path#2`` for its
    second call), its inputs the nodes that produced its tensor arguments, and the meters' key set to
    the open call, so the ops and saved tensors in between are charged to it. ``keep`` holds every
    output, so that no tensor id is reused while the run lasts."""

    def __init__(self, opm: OpMeter, stm: SavedTensorMeter) -> None:
        self.opm, self.stm = opm, stm
        self.ops: list[OpNode] = []
        self.producer: dict[int, str] = {}
        self.keep: list[torch.Tensor] = []
        self.counter: dict[str, int] = defaultdict(int)
        self.notes: list[str] = []

    def pre(self, path: str):
        def hook(mod, a, kw):
            self.counter[path] += 1
            name = f"{path}#{self.counter[path]}" if self.counter[path] > 1 else (path or "<model>")
            self.opm.key = self.stm.key = name
            flat, _ = tree_flatten((a, kw))
            srcs = sorted({self.producer[id(t)] for t in flat
                           if isinstance(t, torch.Tensor) and id(t) in self.producer})
            self.ops.append(OpNode(name=name, kind=type(mod).__name__.lower(), target=path, module_path=path,
                                   inputs=srcs, output_shapes=[], output_bytes=0.0, dtypes=[],
                                   params=list(mod.parameters())))
        return hook

    def post(self, path: str):
        def hook(mod, a, kw, out):
            op = next(o for o in reversed(self.ops) if o.target == path)
            op.output_shapes, op.output_bytes, op.dtypes = value_meta(out)
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.producer[id(t)] = op.name
                    self.keep.append(t)
            self.opm.key = self.stm.key = f"<after {op.name}>"
        return hook

    def stub(self, path: str, mod: nn.Module, exc: BaseException):
        """A forward for opaque module ``mod`` that estimates its call (and notes how, once)."""
        def forward(*a, **kw):
            out, note = opaque_call(mod, path, a, kw, exc, self.opm, self.stm, discard_partial=False)
            if note not in self.notes:
                self.notes.append(note)
            return out
        return forward


def _charge_glue(ops: list[OpNode], opm: OpMeter, stm: SavedTensorMeter,
                 params_by_id: dict[int, nn.Parameter]) -> None:
    """Ops between layer calls (a parent's forward) are charged to the layer call before them."""
    by_name = {op.name: op for op in ops}

    def target(key: object) -> OpNode | None:
        if isinstance(key, str) and key.startswith("<after "):
            key = key[len("<after "):-1]
        return by_name.get(key) if isinstance(key, str) else None

    for key, recs in opm.records.items():
        op = target(key) or (ops[0] if ops else None)
        if op is not None:
            op.records.extend(recs)
    for key, saved in stm.saved.items():
        op = target(key) or (ops[0] if ops else None)
        if op is not None:
            op.saved.extend(saved)
    for key, events in stm.events.items():
        op = target(key) or (ops[0] if ops else None)
        if op is not None:
            op.events.extend(events)
    for key, uses in opm.param_uses.items():
        op = target(key) or (ops[0] if ops else None)
        if op is None:
            continue
        have = {id(p) for p in op.params}
        op.params.extend(params_by_id[i] for i in sorted(uses) if i not in have and i in params_by_id)
