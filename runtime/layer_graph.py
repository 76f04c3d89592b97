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
schedule's ``step``, which torch hands to every stage; see ``runtime.train._forward_backward``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

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


def stage_plans(graph: fx.Graph, stages: list[tuple[str, ...]]) -> list[StagePlan]:
    """Cut ``graph`` into the plan's ``stages`` (each a tuple of layer names, in model order)."""
    stage_of_layer = {name: k for k, names in enumerate(stages) for name in names}
    nodes = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    placeholders = tuple(n.name for n in graph.nodes if n.op == "placeholder")
    output = next(n for n in graph.nodes if n.op == "output")
    last = len(stages) - 1
    stage_of: dict[fx.Node, int] = {}
    pending: list[fx.Node] = []  # glue waiting for the next layer
    for node in nodes:
        if node.op == "call_module" and node.target in stage_of_layer:
            k = stage_of_layer[node.target]
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

    sends = [tuple(n.name for n in nodes if stage_of[n] <= k and read_after(n, k)) for k in range(last)]
    sends.append(tuple(_names(output.args[0])))
    return [StagePlan(input_names=placeholders, receives=sends[k - 1] if k else (),
                      nodes=tuple(n for n in nodes if stage_of[n] == k), sends=sends[k])
            for k in range(len(stages))]


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
