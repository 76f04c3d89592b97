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
transformers'          ``colwise``  1 (its ``weight`` is ``[in, out]``)
``Conv1D``             ``rowwise``  0
any                    unsplit      none
=====================  ===========  ==============================================

A tied bias follows its module's output features (split by ``colwise``). A module that is never
split but holds a tied bias (BERT's ``cls.predictions.bias``, its decoder's bias) ends up holding
the splitting module's shard.

Megatron's pair is ``vocab`` + ``colwise`` (both dim 0); ``colwise`` embedding + ``rowwise`` head
(both dim 1) is the other exact one. With the same split every module's local shard is the same
slice of the one weight, so sharing the first module's parameter keeps them one tensor, and its
gradient sums every use, as on one device. Ties across pipeline stages on different ranks are
separate copies summed by ``runtime.step.TiedGroup`` after each step, shard by shard; two stages on
one rank (a V-shaped schedule) share one parameter (:func:`share_across_stages`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from runtime.errors import RunCheckError
from runtime.tensor_parallel_pairs import is_conv1d

# (module type, style) -> the dim of module.weight that style splits.
_WEIGHT_DIM = {(nn.Embedding, "vocab"): 0, (nn.Embedding, "colwise"): 1,
               (nn.Linear, "colwise"): 0, (nn.Linear, "rowwise"): 1}


def split_dim(module: nn.Module, style: str | None) -> int | None:
    """The dim of ``module.weight`` that ``style`` splits (``None``: not split)."""
    if is_conv1d(module):  # transformers' Conv1D: W [in, out], the transpose of a Linear's
        return {"colwise": 1, "rowwise": 0}.get(style or "")
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


def param_split_dim(module: nn.Module, name: str, style: str | None) -> int | None:
    """The dim of ``module``'s parameter ``name`` that ``style`` splits (``None``: not split).

    A bias follows its module's output features: split (dim 0) by a column-parallel Linear or
    ``Conv1D``, whole under a row-parallel one.
    """
    if name == "weight":
        return split_dim(module, style)
    if name == "bias" and style == "colwise" and split_dim(module, style) is not None:
        return 0
    return None


def _splits(module: nn.Module) -> bool:
    """Whether the runtime splits modules like ``module`` (its parameters are split with it)."""
    return split_dim(module, "colwise") is not None


def check_tied_splits(root: nn.Module, styles: dict[str, str]) -> None:
    """Refuse a plan that splits one tied weight two ways (or splits it in one module and not in another).

    ``styles``: ``{module fqn in root: style}``; absent means replicated. A module the runtime never
    splits that holds a tied parameter other than a weight (BERT's MLM head keeps its decoder's
    bias as ``cls.predictions.bias``) only holds it: after the split it holds the splitting module's
    shard (its own forward must not compute with it, as BERT's does not).
    """
    for uses in tied_uses(root):
        dims = {(fqn, name): param_split_dim(root.get_submodule(fqn), name, styles.get(fqn))
                for fqn, name in uses if name == "weight" or _splits(root.get_submodule(fqn))}
        if len(set(dims.values())) > 1:
            said = ", ".join(f"{fqn if name == 'weight' else f'{fqn}.{name}'}: {styles.get(fqn, 'replicate')} "
                             f"(splits {'no dim' if d is None else f'dim {d}'})" for (fqn, name), d in dims.items())
            what = "weight" if all(name == "weight" for _, name in dims) else "tensor"
            raise RunCheckError(f"placements.style: {said} share one {what}, which can be split only one way. "
                                "Give them splits of the same dim (embedding 'vocab' with LM head 'colwise', or "
                                "embedding 'colwise' with LM head 'rowwise'), or mark them all 'replicate'; "
                                "re-creating the plan does this")
        for fqn, name in uses:
            module = root.get_submodule(fqn)
            if not _splits(module) and styles.get(fqn, "replicate") != "replicate":
                raise RunCheckError(f"placements.style.{fqn}: {styles[fqn]} on a {type(module).__name__}, which "
                                    f"holds {name!r} tied to another module's parameter; mark it 'replicate'")


def retie(root: nn.Module, uses: list[list[tuple[str, str]]]) -> int:
    """Make each group of ``uses`` (from :func:`tied_uses` before splitting) share one parameter again.

    Returns how many modules were re-tied. Call after ``parallelize_module``, which gave each split
    module a parameter of its own; :func:`check_tied_splits` made sure those are the same shard. The
    shared one is the first split module's (a holder that is never split, such as BERT's
    ``cls.predictions.bias``, then holds the shard), else the first module's.
    """
    from torch.distributed.tensor import DTensor

    count = 0
    for group in uses:
        params = [getattr(root.get_submodule(fqn), name) for fqn, name in group]
        param = next((p for p in params if isinstance(p, DTensor)), params[0])
        for (fqn, name), current in zip(group, params):
            if current is not param:
                root.get_submodule(fqn).register_parameter(name, param)
                count += 1
    return count


@contextlib.contextmanager
def share_across_stages(stages: list[nn.Module]) -> Iterator[None]:
    """Around the splitting of a rank's stages: a parameter that two of them share stays one ``Parameter``.

    A V-shaped schedule (zb-v, dualpipe-v) puts the first stage (the token embedding) and the last (the
    LM head tied to it) on the same rank. Both stages are cut from one model, so they hold the same
    ``Parameter``, and its gradient sums both uses as on one device: no all-reduce between them is
    needed. Tensor parallelism splits each stage on its own and would give each use a parameter of its
    own; on leaving, the second use gets the first one's again (:func:`retie`, with the same checked
    split). Copies on different ranks stay separate and are summed by ``runtime.step.TiedGroup``."""
    root = nn.ModuleList(stages)
    across = [uses for uses in tied_uses(root) if len({fqn.split(".", 1)[0] for fqn, _ in uses}) > 1]
    yield
    retie(root, across)
