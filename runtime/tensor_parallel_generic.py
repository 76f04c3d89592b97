"""Tensor parallelism for models other than the GPT: any ``nn.Linear``, split as the plan says.

:mod:`runtime.tensor_parallel` splits a GPT the Megatron way with model-specific code (fused
``qkv``, attention heads). This file splits a model it knows nothing about, from the plan's
``placements["style"]`` table (``{module fqn: colwise | rowwise | replicate}``, written by the
planner's intra-op solver, see :mod:`planner.intra_op.placements`), with ``parallelize_module``. Only
``nn.Linear`` modules are split; every split must give the single-process numbers, so the torch
style of each Linear depends on what runs between it and the next one:

==============================================  ===============================================
plan style, and what the layer's forward does   ``parallelize_module`` entry
==============================================  ===============================================
``colwise`` whose output reaches its *partner*   ``ColwiseParallel()``: the output stays split
(the next Linear, planned ``rowwise``) through   on its last dim, the partner reads it as is
elementwise ops only (GELU, ReLU, ...)           (Megatron's pair: one all-reduce in all)
``rowwise`` that is such a partner               ``RowwiseParallel()`` (sums the partial outputs)
``colwise``, any other                           ``ColwiseParallel(output_layouts=Replicate())``:
                                                 the split output is gathered at once
``rowwise``, any other                           ``RowwiseParallel(input_layouts=Replicate())``:
                                                 each rank takes its slice of the full input
``replicate``                                    nothing
==============================================  ===============================================

So a split is never inexact, only more or less communication-hungry: a column-parallel output
leaves the Linear still split only when the layer's own code (read with ``torch.fx``) shows that
nothing but elementwise ops lie between it and its row-parallel partner. An op that mixes the
last dim (a norm, a softmax, a reshape) between the two, a Linear called twice, or a forward fx
cannot trace makes the pair a gather instead. A plan without placements gets every such pair
split and everything else replicated: Megatron's recipe, found rather than hard-coded.

Refused, with the module and the fix: a split style on anything but a Linear, a dim ``tp`` does
not divide, ``sequence`` (sequence parallelism), dropout (it would need a tensor-parallel RNG), and
families whose exactness no test covers (``TP_FAMILIES``; the CNN's convolutions are not split).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)

from planner.models import ModelPreset
from planner.plan import Plan
from runtime.errors import RunCheckError
from runtime.model import StageModule
from runtime.tensor_parallel import PLACEMENTS_SCHEMA

# Families whose generic tensor parallelism the equivalence tests check (tests/runtime/test_runtime_mlp_cnn.py).
TP_FAMILIES = frozenset({"mlp"})
SPLIT_STYLES = ("colwise", "rowwise")

# Ops that act on each element alone: a tensor split on its last dim stays a valid split through them.
_ELEMENTWISE_FUNCTIONS = frozenset({F.gelu, F.relu, F.silu, F.mish, F.leaky_relu, F.elu, F.hardswish, torch.relu,
                                    torch.tanh, torch.sigmoid, F.sigmoid, F.tanh, operator.neg})
_ELEMENTWISE_METHODS = frozenset({"relu", "tanh", "sigmoid", "neg"})
_ELEMENTWISE_MODULES = (nn.GELU, nn.ReLU, nn.SiLU, nn.Mish, nn.LeakyReLU, nn.ELU, nn.Hardswish, nn.Tanh, nn.Sigmoid,
                        nn.Identity)


def check_generic_tensor_parallel(plan: Plan, preset: ModelPreset) -> None:
    """Refuse, before any process starts, what :func:`apply_generic_tensor_parallel` cannot split exactly."""
    tp = plan.parallel.tp
    if tp == 1:
        return
    if preset.family not in TP_FAMILIES:
        what = ("its convolutions are not split on tp (channel splitting is not implemented)"
                if preset.family == "cnn" else "no equivalence test covers it")
        raise RunCheckError(f"parallel.tp: tp={tp} for model family {preset.family!r}: the runtime's tensor "
                            f"parallelism covers the 'gpt' family and the generic Linear splits of {sorted(TP_FAMILIES)}"
                            f"; {what}. Re-plan with --tp 1")
    if plan.parallel.sequence_parallel and preset.seq_len is not None:
        raise RunCheckError(f"parallel.sequence_parallel: true for a {preset.family!r} model with a sequence of "
                            f"{preset.seq_len}; the runtime splits sequences for the 'gpt' family only. Re-plan "
                            "without --sequence-parallel")
    # A model without a sequence (seq_len None) has nothing for sequence parallelism to split: the flag,
    # which the planner's search may set for any model, changes nothing here.
    model = preset.build(device="meta")
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            raise RunCheckError(f"parallel.tp: module {name!r} is a dropout with p={module.p}; a split activation "
                                "needs a tensor-parallel RNG tracker to drop what one process drops, which the "
                                "runtime does not have. Use a preset with dropout 0, or tp=1")
    layers = plan.model.layer_names
    generic_styles(plan, model, layers)  # reads and checks the style table
    for module, style in (plan.placements.get("style") or {}).items():
        if style != "replicate" and not any(module == p or module.startswith(f"{p}.") or not p for p in layers):
            raise RunCheckError(f"placements.style.{module}: {style}, but the module lies in none of the plan's "
                                f"layers {list(layers)}; re-create the plan for this model")


def generic_styles(plan: Plan, root: nn.Module, layer_paths: tuple[str, ...]) -> dict[str, ParallelStyle]:
    """``{module fqn: torch ParallelStyle}`` for the split Linears under ``layer_paths`` of ``root``.

    ``root`` is the full model or a :class:`StageModule` (both hold layers at their full paths).
    """
    tp = plan.parallel.tp
    planned = _planned_styles(plan, root, layer_paths)
    out: dict[str, ParallelStyle] = {}
    for path in layer_paths:
        prefix = f"{path}." if path else ""
        mine = _relative(planned, path)
        if not mine:
            continue
        layer = root.get_submodule(path) if path else root
        pairs = linear_pairs(layer)
        partners = {row: col for col, row in pairs.items()}
        for rel, style in mine.items():
            fqn = prefix + rel if rel else path
            module = _linear(layer, rel, fqn, style)
            dim, size = ("out_features", module.out_features) if style == "colwise" else \
                ("in_features", module.in_features)
            if size % tp:
                raise RunCheckError(f"placements.style.{fqn}: {style} splits {dim}={size}, which tp={tp} does not "
                                    "divide; re-plan with a tp that divides it, or mark the module replicate")
            if style == "colwise":
                paired = mine.get(pairs.get(rel, ""), "replicate") == "rowwise"
                out[fqn] = ColwiseParallel() if paired else ColwiseParallel(output_layouts=Replicate())
            else:
                paired = mine.get(partners.get(rel, ""), "replicate") == "colwise"
                out[fqn] = RowwiseParallel() if paired else RowwiseParallel(input_layouts=Replicate())
    return out


def _planned_styles(plan: Plan, root: nn.Module, layer_paths: tuple[str, ...]) -> dict[str, str]:
    """The plan's split styles (``colwise`` / ``rowwise`` only), or the found pairs when it has none."""
    if not plan.placements:
        styles: dict[str, str] = {}
        for path in layer_paths:
            prefix = f"{path}." if path else ""
            for col, row in linear_pairs(root.get_submodule(path) if path else root).items():
                styles |= {prefix + col: "colwise", prefix + row: "rowwise"}
        return styles
    table = plan.placements.get("style")
    schema = plan.placements.get("schema", PLACEMENTS_SCHEMA)
    if schema != PLACEMENTS_SCHEMA or not isinstance(table, dict):
        raise RunCheckError(f"placements: schema {schema!r} without a 'style' table is not readable by the runtime, "
                            f"which reads {PLACEMENTS_SCHEMA} ({{'style': {{module: style}}}}); re-create the plan")
    out = {}
    for module, style in table.items():
        if style == "replicate":
            continue
        if style == "sequence":
            raise RunCheckError(f"placements.style.{module}: 'sequence' (sequence parallelism) is implemented for "
                                "the 'gpt' family only; re-plan this model without --sequence-parallel")
        if style not in SPLIT_STYLES:
            raise RunCheckError(f"placements.style.{module}: style {style!r} is not one the runtime applies to a "
                                f"{plan.model.family!r} model (it splits Linears colwise or rowwise); mark it "
                                "replicate or re-plan with --tp 1")
        if any(module == p or module.startswith(p + ".") or not p for p in layer_paths):
            out[module] = style
    return out


def _linear(layer: nn.Module, rel: str, fqn: str, style: str) -> nn.Linear:
    try:
        module = layer.get_submodule(rel)
    except AttributeError as exc:
        raise RunCheckError(f"placements.style.{fqn}: no such module in the model; the plan was made for another "
                            "model, re-create it") from exc
    if not isinstance(module, nn.Linear):
        raise RunCheckError(f"placements.style.{fqn}: {style} on a {type(module).__name__}; the runtime splits only "
                            "nn.Linear modules of this family. Mark it replicate (or re-plan with --tp 1)")
    return module


def linear_pairs(layer: nn.Module) -> dict[str, str]:
    """``{colwise candidate: its rowwise partner}``: Linear → elementwise ops only → Linear, in ``layer``'s forward.

    Paths are relative to ``layer``. Found with ``torch.fx``: the first Linear's output must have a
    single user at every step, each an elementwise op on it, up to a call of the second Linear on it
    alone, and both Linears must be called once. A forward fx cannot trace has no pairs.
    """
    try:
        graph = fx.symbolic_trace(layer).graph
    except Exception:  # noqa: BLE001 - any trace failure just means "no pair proven": gather instead
        return {}
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    def is_linear(node: fx.Node) -> bool:
        return node.op == "call_module" and isinstance(layer.get_submodule(node.target), nn.Linear) \
            and calls[node.target] == 1

    pairs: dict[str, str] = {}
    for node in graph.nodes:
        if not is_linear(node):
            continue
        cur = node
        while len(cur.users) == 1:
            (user,) = cur.users
            if not user.args or user.args[0] is not cur or any(isinstance(a, fx.Node) for a in
                                                                (*user.args[1:], *user.kwargs.values())):
                break
            if is_linear(user):
                pairs[node.target] = user.target
                break
            if not _is_elementwise(user, layer):
                break
            cur = user
    return pairs


def _is_elementwise(node: fx.Node, layer: nn.Module) -> bool:
    if node.op == "call_function":
        return node.target in _ELEMENTWISE_FUNCTIONS
    if node.op == "call_method":
        return node.target in _ELEMENTWISE_METHODS
    if node.op == "call_module":
        module = layer.get_submodule(node.target)
        return isinstance(module, _ELEMENTWISE_MODULES) or (isinstance(module, nn.Dropout) and module.p == 0)
    return False


def is_gpt_stage(stage: StageModule) -> bool:
    """Whether ``stage`` holds GPT-family layers (split by :mod:`runtime.tensor_parallel`, not here)."""
    from planner.models.gpt import GPTBlock, GPTEmbedding, GPTHead

    return any(isinstance(stage.get_submodule(p), (GPTEmbedding, GPTBlock, GPTHead)) for p in stage.layer_paths)


def apply_generic_tensor_parallel(stage: StageModule, tp_mesh: DeviceMesh, plan: Plan) -> None:
    """Split the Linears of ``stage`` that the plan splits over ``tp_mesh`` (in place), layer by layer."""
    styles = generic_styles(plan, stage, stage.layer_paths)
    for path in stage.layer_paths:
        mine = _relative(styles, path)
        layer = stage.get_submodule(path)
        if "" in mine:  # the layer is itself a split Linear
            parallelize_module(layer, tp_mesh, mine.pop(""))
        if mine:
            parallelize_module(layer, tp_mesh, mine)


def _relative(styles: dict, path: str) -> dict:
    """The entries of ``styles`` at or under layer ``path``, keyed relative to it (``""``: the layer itself)."""
    if not path:
        return dict(styles)
    return {m[len(path) + 1:] if m != path else "": s for m, s in styles.items()
            if m == path or m.startswith(path + ".")}
