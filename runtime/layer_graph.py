"""The model's forward at layer granularity: which values flow from layer to layer, and across stages.

Most presets are chains (``embed → blocks.* → head``, each layer one tensor in, one out), and a
stage of a chain just calls its layers in turn. Some are not:

* T5 takes two inputs (encoder and decoder tokens), and every decoder block reads the encoder
  output besides its own stream: its layer graph is a DAG;
* wav2vec 2.0 has glue between the model input and its first layer (``audio.unsqueeze(1)``), which
  a chain of layers would skip.

So the runtime traces the full model's forward with ``torch.fx``, every planned layer a leaf, and
cuts the resulting graph at the plan's stages (:class:`StagePlan`): a node that is a layer runs in
that layer's stage; glue runs in the stage of the next layer after it in execution order (the last
stage for glue after the last layer). What crosses the boundary after stage ``k`` is every value made
at or before stage ``k`` and read after it, in execution order: the residual stream for a chain, the
encoder output and the decoder stream for T5. The model's own inputs are not sent down the pipeline:
every rank has the batch, so each stage gets them directly (as keyword arguments of the
schedule's ``step``, which torch hands to every stage; see ``runtime.step.forward_backward``).
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx import _pytree as fx_pytree

from runtime.errors import RunCheckError


class _LayerTracer(fx.Tracer):
    """Symbolic tracer that keeps each planned layer as one ``call_module`` node."""

    def __init__(self, layers: frozenset[str]) -> None:
        super().__init__()
        self.layers = layers

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.layers or super().is_leaf_module(m, qualname)


@dataclass(frozen=True)
class StagePlan:
    """What one stage computes: its nodes, the values it receives, and the values it returns."""

    input_names: tuple[str, ...]  # the model's inputs (placeholders), in forward-signature order
    receives: tuple[str, ...]  # node names sent by the previous stage (the first stage: none)
    nodes: tuple[fx.Node, ...]  # the nodes this stage runs, in execution order
    sends: tuple[str, ...]  # node names it returns (the last stage: the model output)


def trace_layers(model: nn.Module, layer_names: tuple[str, ...]) -> fx.Graph:
    """The model's forward with every layer of ``layer_names`` as a single node."""
    try:
        return _LayerTracer(frozenset(layer_names)).trace(model)
    except Exception as exc:  # fx raises many kinds: control flow on tensors, unsupported ops …
        raise RunCheckError(
            f"model: {type(model).__name__}.forward could not be traced with torch.fx at layer granularity "
            f"({type(exc).__name__}: {exc}); the runtime cuts stages on that trace. Write the model's top-level "
            "forward without data-dependent control flow between its layers") from exc


def export_layers(model: nn.Module, layer_names: tuple[str, ...], sample_kwargs: dict[str, Any],
                  device: torch.device) -> tuple[fx.Graph, Any]:
    """``(graph, output spec)``: the model's forward from ``torch.export``, every layer one ``call_module`` node.

    For forwards ``torch.fx`` cannot trace (Hugging Face models take ``**kwargs`` and build masks with
    Python control flow). ``torch.export`` records the forward at ``sample_kwargs``' shapes, keeping each
    layer's own call signature (``preserve_module_call_signature``); ``torch.export.unflatten`` gives
    it back as nested graphs, which this inlines into one graph over the full model's paths: planned
    layers stay calls of the model's own modules (which hold the real, possibly sharded, weights),
    everything else becomes glue of ATen ops. The shapes are static: the graph runs micro-batches of
    the sample's size. Devices the export baked into glue (``arange(..., device=cpu)``) become
    ``device``. The output spec rebuilds the forward's return value (a Hugging Face ``ModelOutput``)
    from the graph's flat outputs.
    """
    try:
        with warnings.catch_warnings():  # unflatten's notes on its own pytree-spec attributes
            warnings.simplefilter("ignore")
            program = torch.export.export(model, (), sample_kwargs, strict=False,
                                          preserve_module_call_signature=tuple(layer_names))
            unflat = torch.export.unflatten(program)
    except Exception as exc:  # export raises many kinds: data-dependent control flow, unsupported ops …
        raise RunCheckError(
            f"model: {type(model).__name__}.forward could be traced neither by torch.fx nor by torch.export at "
            f"layer granularity ({type(exc).__name__}: {_first_line(exc)}); the runtime cuts pipeline stages on "
            "that trace. Write the forward without data-dependent control flow between layers, or plan it with "
            "pp=1") from exc
    graph = fx.Graph()
    # Non-tensor inputs (``use_cache=False``) were specialised by the export: they stay constants, not inputs.
    top_inputs = [graph.placeholder(n.target) if isinstance(sample_kwargs.get(n.target), torch.Tensor)
                  else sample_kwargs.get(n.target) for n in unflat.graph.nodes if n.op == "placeholder"]
    out = _inline(graph, unflat, "", top_inputs, {}, frozenset(layer_names), model, device)
    graph.output(out)
    return graph, program.call_spec.out_spec


def _inline(graph: fx.Graph, module: nn.Module, prefix: str, args: list[Any], kwargs: dict[str, Any],
            layers: frozenset[str], model: nn.Module, device: torch.device) -> Any:
    """Copy ``module.graph`` (an unflattened export graph) into ``graph``; returns what its output node returns."""
    env: dict[fx.Node, Any] = {}
    positional = iter(args)
    for node in module.graph.nodes:
        def load(a: Any) -> Any:
            return fx.node.map_arg(a, lambda n: env[n])

        if node.op == "placeholder":
            env[node] = kwargs[node.target] if node.target in kwargs else next(positional)
        elif node.op == "get_attr":
            env[node] = _attr(graph, module, node.target, prefix, model, device)
        elif node.op == "call_module":
            path = prefix + node.target
            if path in layers:
                env[node] = graph.call_module(path, load(node.args), load(node.kwargs))
            else:
                env[node] = _inline(graph, module.get_submodule(node.target), path + ".", list(load(node.args)),
                                    load(node.kwargs), layers, model, device)
        elif node.op in ("call_function", "call_method"):
            kw = dict(load(node.kwargs))
            if isinstance(kw.get("device"), (torch.device, str)):
                kw["device"] = device
            env[node] = graph.create_node(node.op, node.target, load(node.args), kw)
        elif node.op == "output":
            return load(node.args[0])
    raise AssertionError("an fx graph ends with an output node")


def _attr(graph: fx.Graph, module: nn.Module, target: str, prefix: str, model: nn.Module,
          device: torch.device) -> Any:
    """A parameter or buffer of the model stays a ``get_attr`` (at its full path); anything else is a constant."""
    full = prefix + target
    owner, _, name = full.rpartition(".")
    try:
        holder = model.get_submodule(owner) if owner else model
    except AttributeError:
        holder = None
    if holder is not None and (name in holder._parameters or name in holder._buffers):
        return graph.get_attr(full)
    value = operator.attrgetter(target)(module)  # a pytree spec or a lifted constant tensor
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def is_chain(graph: fx.Graph, layer_names: tuple[str, ...]) -> bool:
    """One input, the layers called in plan order each on the previous one's output, and nothing else."""
    nodes = [n for n in graph.nodes if n.op != "output"]
    if not nodes or nodes[0].op != "placeholder" or len(nodes) != len(layer_names) + 1:
        return False
    prev = nodes[0]
    for node, name in zip(nodes[1:], layer_names):
        if node.op != "call_module" or node.target != name or node.args != (prev,) or node.kwargs:
            return False
        prev = node
    output = next(n for n in graph.nodes if n.op == "output")
    return output.args == (prev,)


def stage_plans(graph: fx.Graph, stages: list[tuple[str, ...]], stateless: frozenset[str] = frozenset()
                ) -> list[StagePlan]:
    """Cut ``graph`` into the plan's ``stages`` (each a tuple of layer names, in model order).

    Two kinds of glue do not follow the next layer: glue computed from the model's inputs and constants
    alone (position ids, an attention mask) runs in every stage that reads it rather than being sent, and
    the unpacking of a layer's output (``getitem``, pytree flattening) stays with that layer, so what
    crosses a boundary is tensors, not the tuples a layer returns. A ``stateless`` layer (no parameters or
    buffers: T5's dropout, called after the embedding and again after the final norm) called again
    after a later stage's layer runs that second call in the later stage."""
    stage_of_layer = {name: k for k, names in enumerate(stages) for name in names}
    nodes = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    placeholders = tuple(n.name for n in graph.nodes if n.op == "placeholder")
    output = next(n for n in graph.nodes if n.op == "output")
    last = len(stages) - 1
    free = _input_only(graph)
    stage_of: dict[fx.Node, int] = {}
    pending: list[fx.Node] = []  # glue waiting for the next layer
    for node in nodes:
        if node in free:
            continue
        producers = {stage_of.get(a) for a in node.all_input_nodes if a not in free and a.op != "placeholder"}
        if node.op == "call_function" and node.target in _UNPACKING and len(producers) == 1 and None not in producers:
            stage_of[node] = producers.pop()
        elif node.op == "call_module" and node.target in stage_of_layer:
            k = stage_of_layer[node.target]
            if node.target in stateless and stage_of:
                k = max(k, *stage_of.values())
            if any(stage_of[n] > k for n in stage_of):
                raise RunCheckError(
                    f"stages: layer {node.target!r} runs after a layer of a later stage in the model's forward; "
                    "stages must cover the layers in execution order. Re-create the plan for this model")
            for glue in pending:
                stage_of[glue] = k
            pending = []
            stage_of[node] = k
        elif node.op == "call_module":
            raise RunCheckError(f"stages: module {node.target!r} is called by the model's forward but lies in no "
                                "planned layer; re-create the plan for this model")
        else:
            pending.append(node)
    for glue in pending:
        stage_of[glue] = last

    def read_after(n: fx.Node, k: int) -> bool:
        return any(u is output or stage_of[u] > k for u in n.users)

    sends = [tuple(n.name for n in nodes if n not in free and stage_of[n] <= k and read_after(n, k))
             for k in range(last)]
    sends.append(tuple(_names(output.args[0])))
    return [StagePlan(input_names=placeholders, receives=sends[k - 1] if k else (),
                      nodes=_with_input_glue([n for n in nodes if stage_of.get(n) == k], free, nodes),
                      sends=sends[k])
            for k in range(len(stages))]


# Glue that only unpacks a layer's output: it runs in that layer's stage (see stage_plans).
_UNPACKING = frozenset({operator.getitem, fx_pytree.tree_flatten_spec})


def _input_only(graph: fx.Graph) -> set[fx.Node]:
    """Glue nodes computed from the model's inputs and constants alone (no layer output reaches them)."""
    free: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op in ("call_function", "call_method", "get_attr") and \
                all(a in free or a.op == "placeholder" for a in node.all_input_nodes):
            free.add(node)
    return free


def _with_input_glue(own: list[fx.Node], free: set[fx.Node], order: list[fx.Node]) -> tuple[fx.Node, ...]:
    """``own`` plus the input-only glue they read (recomputed here instead of received), in graph order."""
    needed: set[fx.Node] = set()
    todo = [a for n in own for a in n.all_input_nodes if a in free]
    while todo:
        node = todo.pop()
        if node not in needed:
            needed.add(node)
            todo.extend(a for a in node.all_input_nodes if a in free)
    chosen = set(own) | needed
    return tuple(n for n in order if n in chosen)


def _names(arg: Any) -> list[str]:
    if isinstance(arg, fx.Node):
        return [arg.name]
    if isinstance(arg, (tuple, list)):
        return [name for a in arg for name in _names(a)]
    raise RunCheckError(f"model: the forward returns {type(arg).__name__}; the runtime trains models that return "
                        "a tensor (the logits)")


def run_stage(plan: StagePlan, root: nn.Module, received: tuple[torch.Tensor, ...],
              inputs: dict[str, torch.Tensor], call_layer) -> tuple[torch.Tensor, ...] | torch.Tensor:
    """Execute ``plan`` on ``root`` (which holds the layers at their full paths).

    ``call_layer(module, *args)`` runs one layer (so recompute can wrap it); glue runs as traced."""
    env: dict[str, Any] = dict(zip(plan.receives, received))
    env.update(inputs)

    def load(a: Any) -> Any:
        return fx.node.map_arg(a, lambda n: env[n.name])

    for node in plan.nodes:
        args, kwargs = load(node.args), load(node.kwargs)
        if node.op == "call_module":
            env[node.name] = call_layer(root.get_submodule(node.target), *args, **kwargs)
        elif node.op == "call_function":
            env[node.name] = node.target(*args, **kwargs)
        elif node.op == "call_method":
            self_obj, *rest = args
            env[node.name] = getattr(self_obj, node.target)(*rest, **kwargs)
        elif node.op == "get_attr":
            env[node.name] = operator.attrgetter(node.target)(root)
        else:  # pragma: no cover - fx has no other node kinds between placeholders and the output
            raise AssertionError(node.op)
    out = tuple(env[name] for name in plan.sends)
    return out[0] if len(out) == 1 else out
