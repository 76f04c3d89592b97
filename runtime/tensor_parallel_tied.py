"""Tied weights under tensor parallelism: one split, shared by every module that reads the weight.

A weight shared by several modules (GPT-3's token embedding and LM head, BERT's word embedding and
MLM decoder, T5's encoder / decoder embeddings and LM head) is one tensor, so it can only be split
one way. The planner's intra-op solver ties the layouts of such uses (``planner.intra_op.ilp``:
``tied`` constraints); this module checks that the plan's styles agree on the dimension of the
shared ``[rows, cols]`` weight they split, and puts the tie back after ``parallelize_module``, which
gives every module a new parameter of its own:

=====================  ===========  ==============================================
module                 style        dim of ``weight`` it splits
=====================  ===========  ==============================================
``nn.Embedding``       ``vocab``    0 (rows: the vocabulary)
``nn.Embedding``       ``colwise``  1 (the hidden dim)
``nn.Linear``          ``colwise``  0 (output features: logits by vocabulary)
``nn.Linear``          ``rowwise``  1 (input features: the hidden dim)
any                    unsplit      none
=====================  ===========  ==============================================

Megatron's pair is ``vocab`` + ``colwise`` (both dim 0); ``colwise`` embedding + ``rowwise`` head
(both dim 1) is the other exact one. With the same split every module's local shard is the same
slice of the one weight, so sharing the first module's parameter keeps them one tensor, and its
gradient sums every use, as on one device. Ties across pipeline stages are separate copies summed
by ``runtime.train`` after each step, shard by shard.
"""

from __future__ import annotations

from torch import nn

from runtime.errors import RunCheckError

# (module type, style) -> the dim of module.weight that style splits.
_WEIGHT_DIM = {(nn.Embedding, "vocab"): 0, (nn.Embedding, "colwise"): 1,
               (nn.Linear, "colwise"): 0, (nn.Linear, "rowwise"): 1}


def split_dim(module: nn.Module, style: str | None) -> int | None:
    """The dim of ``module.weight`` that ``style`` splits (``None``: not split)."""
    for (kind, name), dim in _WEIGHT_DIM.items():
        if isinstance(module, kind) and style == name:
            return dim
    return None


def tied_uses(root: nn.Module) -> list[list[tuple[str, str]]]:
    """``[[(module fqn, parameter name), ...], ...]``: each group shares one parameter, modules in ``root`` order."""
    groups: dict[int, list[tuple[str, str]]] = {}
    for fqn, module in root.named_modules(remove_duplicate=False):
        for name, param in module.named_parameters(recurse=False):
            groups.setdefault(id(param), [])
            if (fqn, name) not in groups[id(param)]:
                groups[id(param)].append((fqn, name))
    return [uses for uses in groups.values() if len(uses) > 1]


def check_tied_splits(root: nn.Module, styles: dict[str, str]) -> None:
    """Refuse a plan that splits one tied weight two ways (or splits it in one module and not in another).

    ``styles``: ``{module fqn in root: style}``; absent means replicated.
    """
    for uses in tied_uses(root):
        dims = {fqn: split_dim(root.get_submodule(fqn), styles.get(fqn)) for fqn, name in uses if name == "weight"}
        if len(set(dims.values())) > 1:
            said = ", ".join(f"{fqn}: {styles.get(fqn, 'replicate')} (splits "
                             f"{'no dim' if d is None else f'dim {d}'})" for fqn, d in dims.items())
            raise RunCheckError(f"placements.style: {said} share one weight, which can be split only one way. "
                                "Give them splits of the same dim (embedding 'vocab' with LM head 'colwise', or "
                                "embedding 'colwise' with LM head 'rowwise'), or mark them all 'replicate'; "
                                "re-creating the plan does this")
        for fqn, name in uses:
            if name != "weight" and styles.get(fqn, "replicate") != "replicate":
                raise RunCheckError(f"placements.style.{fqn}: {styles[fqn]}, but its {name!r} is tied to another "
                                    "module's parameter, which the runtime splits only for weights; mark it "
                                    "'replicate'")


def retie(root: nn.Module, uses: list[list[tuple[str, str]]]) -> int:
    """Make each group of ``uses`` (from :func:`tied_uses` before splitting) share its first module's parameter.

    Returns how many modules were re-tied. Call after ``parallelize_module``, which gave each split
    module a parameter of its own; :func:`check_tied_splits` made sure those are the same shard.
    """
    count = 0
    for group in uses:
        first_fqn, first_name = group[0]
        param = getattr(root.get_submodule(first_fqn), first_name)
        for fqn, name in group[1:]:
            module = root.get_submodule(fqn)
            if getattr(module, name) is not param:
                module.register_parameter(name, param)
                count += 1
    return count
