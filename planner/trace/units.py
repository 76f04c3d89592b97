"""Which submodules are the *layers* (pipeline building blocks), and when two modules are alike.

Layers are found by opening containers down to the outermost *stacks* (``ModuleList``,
``Sequential`` or ``ModuleDict`` with two or more children):

* a container is always opened, and its children are layers (nested containers are opened too);
* a non-container module is opened when a stack lies somewhere inside it and it is not itself a
  child of a stack (``GPT2LMHeadModel → transformer → h.0 …``);
* a child of a stack is never opened further, whatever it holds: a ResNet bottleneck with a
  ``downsample`` Sequential, a T5 block with its ``layer`` list, or an MoE block with an expert
  list stays one layer, because its forward has glue (residuals, routing) between those parts.

So a GPT is ``embed, blocks.0 … blocks.95, head``, a torchvision ResNet is
``conv1, bn1, relu, maxpool, layer1.0 … layer4.2, avgpool, fc``, and a model with no stack is
one layer (``""``).
"""

from __future__ import annotations

import dataclasses

from torch import nn

CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)
_SIMPLE = (int, float, bool, str, type(None))


def _is_stack(m: nn.Module) -> bool:
    return isinstance(m, CONTAINERS) and len(m) > 1


def _has_stack(mod: nn.Module) -> bool:
    return any(_is_stack(m) for m in mod.modules())


def layer_units(model: nn.Module) -> list[str]:
    """Module paths of the layers, in registration order (``[""]`` when the model has no stack)."""
    units: list[str] = []

    def visit(mod: nn.Module, path: str, in_stack: bool) -> None:
        for name, child in mod.named_children():
            child_path = f"{path}.{name}" if path else name
            if isinstance(child, CONTAINERS):
                visit(child, child_path, in_stack=True)
            elif not in_stack and _has_stack(child):
                visit(child, child_path, in_stack=False)
            else:
                units.append(child_path)

    if _has_stack(model):
        visit(model, "", in_stack=isinstance(model, CONTAINERS))
    return units or [""]


def _attr_key(value: object) -> object:
    if isinstance(value, _SIMPLE):
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, _SIMPLE) for v in value):
        return tuple(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type) and value.__dataclass_params__.frozen:
        return value  # a frozen config: compared by value
    return ("<object>", id(value))  # unknown state: never equal to another module's


def module_key(m: nn.Module) -> tuple:
    """Everything a module's behaviour on meta tensors can depend on, as a hashable value.

    Class, parameter and buffer shapes/dtypes, and plain attributes (``p``, ``stride``, ``eps`` …),
    recursively. Modules whose attributes hold arbitrary objects get a key with that object's
    identity, so they only ever equal themselves: replaying a module's cost onto another is
    done only when nothing the forward could read differs.
    """
    params = tuple((n, tuple(p.shape), p.dtype, p.requires_grad)
                   for n, p in m.named_parameters(recurse=False))
    buffers = tuple((n, tuple(b.shape), b.dtype) for n, b in m.named_buffers(recurse=False) if b is not None)
    attrs = tuple(sorted((k, _attr_key(v)) for k, v in vars(m).items()
                         if not k.startswith("_") and k != "training"))
    children = tuple((n, module_key(c)) for n, c in m.named_children())
    return (type(m), params, buffers, attrs, children)
