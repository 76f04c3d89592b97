"""Which Linears form Megatron's pairs, read from a layer's own code with ``torch.fx``.

A column-parallel Linear's output may stay split (no gather) only when everything between it and
its row-parallel partner acts on each element alone: ``fc2(gelu(fc1(x)))``, or SwiGLU's
``w2(silu(w1(x)) * w3(x))``, where ``w1`` and ``w3`` both pair with ``w2``. This module finds those
pairs (:func:`linear_pairs`) and the dropouts inside their elementwise regions
(:func:`pair_dropouts`), which must draw a rank's own mask when the pair stays split. A Linear here
is an ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2's projections); transformers' activation
modules count as elementwise. :mod:`runtime.tensor_parallel_generic` decides the styles from them.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

# Ops that act on each element alone: a tensor split on its last dim stays a valid split through them.
_ELEMENTWISE_FUNCTIONS = frozenset({F.gelu, F.relu, F.silu, F.mish, F.leaky_relu, F.elu, F.hardswish, torch.relu,
                                    torch.tanh, torch.sigmoid, F.sigmoid, F.tanh, operator.neg})
_ELEMENTWISE_METHODS = frozenset({"relu", "tanh", "sigmoid", "neg"})
_BINARY_FUNCTIONS = frozenset({operator.mul, operator.add, operator.sub, torch.mul, torch.add, torch.sub})
_BINARY_METHODS = frozenset({"mul", "add", "sub"})
# transformers' activation modules (``transformers.activations``), all elementwise; matched by name, so that
# the runtime does not import transformers for a model without them.
_HF_ACTIVATIONS = frozenset({"GELUActivation", "NewGELUActivation", "FastGELUActivation", "QuickGELUActivation",
                             "PytorchGELUTanh", "GELUTanh", "AccurateGELUActivation", "SiLUActivation",
                             "MishActivation", "ReLUSquaredActivation", "LaplaceActivation", "LinearActivation",
                             "ClippedGELUActivation"})
_ELEMENTWISE_MODULES = (nn.GELU, nn.ReLU, nn.SiLU, nn.Mish, nn.LeakyReLU, nn.ELU, nn.Hardswish, nn.Tanh, nn.Sigmoid,
                        nn.Identity)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2's projections): ``y = x @ W + b`` with ``W [in, out]``, a transposed Linear."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")


def _is_hf_activation(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ in _HF_ACTIVATIONS and cls.__module__.startswith("transformers.")


class _LayerTracer(fx.Tracer):
    """fx's tracer, with transformers' ``Conv1D`` and activation modules kept as calls (not traced into)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_conv1d(m) or _is_hf_activation(m) or super().is_leaf_module(m, module_qualified_name)


def linear_pairs(layer: nn.Module) -> dict[str, str]:
    """``{colwise candidate: its rowwise partner}``: Linears → elementwise ops only → Linear, in ``layer``'s forward.

    Paths are relative to ``layer``. Found with ``torch.fx``: the partner is a Linear called on one
    value that is an elementwise function of the outputs of one or more Linears (``fc2(gelu(fc1(x)))``,
    or SwiGLU's ``w2(silu(w1(x)) * w3(x))``, where ``w1`` and ``w3`` both pair with ``w2``); every
    intermediate value may be read only inside that elementwise region, and every Linear involved
    must be called once. A forward fx cannot trace has no pairs.
    """
    return _pairs_and_regions(layer)[0]


def pair_dropouts(layer: nn.Module) -> dict[str, list[str]]:
    """``{rowwise partner: the dropout modules inside its pair's elementwise region}`` (paths relative to ``layer``).

    When the pair stays split, those dropouts act on this rank's slice only (see
    :mod:`runtime.tensor_parallel_rng`).
    """
    return _pairs_and_regions(layer)[1]


def _pairs_and_regions(layer: nn.Module) -> tuple[dict[str, str], dict[str, list[str]]]:
    try:
        graph = _LayerTracer().trace(layer)
    except Exception:  # noqa: BLE001 - no pair proven here: look in each child (the GPT block's MLP)
        pairs: dict[str, str] = {}
        dropouts: dict[str, list[str]] = {}
        for name, child in layer.named_children():
            if isinstance(child, (nn.Linear, nn.Dropout, nn.Embedding)) or not any(True for _ in child.children()):
                continue
            child_pairs, child_dropouts = _pairs_and_regions(child)
            pairs |= {f"{name}.{c}": f"{name}.{r}" for c, r in child_pairs.items()}
            dropouts |= {f"{name}.{r}": [f"{name}.{d}" for d in ds] for r, ds in child_dropouts.items()}
        return pairs, dropouts
    calls: dict[str, int] = {}
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    def is_linear(node: fx.Node) -> bool:
        if node.op != "call_module":
            return False
        module = layer.get_submodule(node.target)
        return (isinstance(module, nn.Linear) or is_conv1d(module)) and calls[node.target] == 1

    # sources[n]: the Linear call nodes of which n is an elementwise function (absent: n is not one).
    sources: dict[fx.Node, frozenset[fx.Node]] = {}
    pairs: dict[str, str] = {}
    dropouts: dict[str, list[str]] = {}
    for node in graph.nodes:
        inputs = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]
        if is_linear(node) and len(node.args) == 1 and not node.kwargs and node.args[0] in sources:
            region = _region(node.args[0], sources)
            if all(set(n.users) <= region | {node} for n in region):
                # In graph order: a frozenset of nodes iterates by address, which differs between ranks.
                pairs |= {src.target: node.target for src in sorted(sources[node.args[0]], key=order.__getitem__)}
                dropouts[node.target] = [n.target for n in sorted(region, key=order.__getitem__)
                                         if n.op == "call_module" and isinstance(layer.get_submodule(n.target),
                                                                                 nn.Dropout)]
        if is_linear(node):
            sources[node] = frozenset({node})
        elif inputs and all(a in sources for a in inputs) and _is_elementwise(node, layer, len(inputs)):
            sources[node] = frozenset().union(*(sources[a] for a in inputs))
    return pairs, dropouts


def _region(value: fx.Node, sources: dict[fx.Node, frozenset[fx.Node]]) -> set[fx.Node]:
    """The nodes ``value`` is computed from inside its elementwise region, itself and its source Linears included."""
    region, todo = set(), [value]
    while todo:
        node = todo.pop()
        if node in region:
            continue
        region.add(node)
        if node not in sources[node]:  # a Linear ends the region: its own input is whole
            todo.extend(a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node))
    return region


def _is_elementwise(node: fx.Node, layer: nn.Module, node_inputs: int) -> bool:
    """Whether ``node`` acts on each element alone; ``node_inputs``: how many of its arguments are tensors in the region.

    Two-operand ops (``*``, ``+``, ``-``) qualify only when both operands lie in the region (equally
    split); with one, the other is a Python number (a tensor would come from outside and be whole).
    """
    if node_inputs > 1 or (node.target in _BINARY_FUNCTIONS or node.target in _BINARY_METHODS):
        if node.op == "call_function" and node.target in _BINARY_FUNCTIONS:
            return all(isinstance(a, (fx.Node, int, float)) for a in node.args) and not node.kwargs
        if node.op == "call_method" and node.target in _BINARY_METHODS:
            return all(isinstance(a, (fx.Node, int, float)) for a in node.args) and not node.kwargs
        return False
    if any(isinstance(a, fx.Node) for a in (*node.args[1:], *node.kwargs.values())):
        return False
    if node.op == "call_function":
        return node.target in _ELEMENTWISE_FUNCTIONS
    if node.op == "call_method":
        return node.target in _ELEMENTWISE_METHODS
    if node.op == "call_module":
        module = layer.get_submodule(node.target)
        # dropout: see pair_dropouts
        return isinstance(module, (*_ELEMENTWISE_MODULES, nn.Dropout)) or _is_hf_activation(module)
    return False
