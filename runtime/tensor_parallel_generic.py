"""Tensor parallelism for models other than the GPT (MLP, Llama, BERT, ViT): Linears, Embeddings, attention heads.

:mod:`runtime.tensor_parallel` splits a GPT the Megatron way with model-specific code (fused
``qkv``, attention heads). This file splits a model it knows nothing about, from the plan's
``placements["style"]`` table (``{module fqn: colwise | rowwise | vocab | replicate}``, written by the
planner's intra-op solver, see :mod:`planner.intra_op.placements`), with ``parallelize_module``. Only
``nn.Linear`` and ``nn.Embedding`` modules are split; every split must give the single-process
numbers, so the torch style of each Linear depends on what runs between it and the next one:

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
``colwise`` Embedding                            ``ColwiseParallel(output_layouts=Replicate())``:
                                                 hidden dim split, then gathered
``vocab`` Embedding                              ``RowwiseParallel(input_layouts=Replicate())``:
                                                 vocab-parallel lookup, one all-reduce
``replicate``                                    nothing
==============================================  ===============================================

So a split is never inexact, only more or less communication-hungry: a column-parallel output
leaves the Linear still split only when the layer's own code (read with ``torch.fx``) shows that
nothing but elementwise ops lie between it and its row-parallel partner. Several column-parallel
Linears may feed one partner through a two-operand elementwise op (SwiGLU's
``w2(silu(w1(x)) * w3(x))``): then all of them must be planned ``colwise``. An op that mixes the
last dim (a norm, a softmax, a reshape) between the two, a Linear called twice, or a forward fx
cannot trace makes the pair a gather instead. A plan without placements gets every such pair
split and everything else replicated: Megatron's recipe, found rather than hard-coded.

Attention is the one pair fx cannot prove (reshapes to heads lie between the projections), so the
shared :class:`planner.models.blocks.Attention` (BERT, ViT, Llama) is recognised by type: when its
``q``, ``k``, ``v`` are ``colwise`` and ``o`` is ``rowwise`` they stay split (Megatron's attention,
one all-reduce), and the module's ``heads`` / ``kv_heads`` are set to ``heads / tp`` and
``kv_heads / tp`` so that its own forward computes this rank's heads. The column blocks of ``q``
and of ``k``/``v`` line up with whole grouped-query groups, so grouped-query attention splits too.
Plans without placements split every such attention.

T5's self-attention adds a per-head relative-position bias (``rel_bias``, an ``Embedding(buckets,
heads)``): beside a head-split attention each rank adds its own heads' bias, whichever way the plan
splits the table (:func:`head_bias_tables`). A weight tied between
modules (BERT's decoder and word embedding, T5's embeddings and LM head) is split once, the same way
for every module that reads it (:mod:`runtime.tensor_parallel_tied`).

Any model family goes through here (all but the GPT): what is split is only ever a Linear, an
Embedding or a head-bias table, so convolutions, recurrent layers, norms and Mixtral's experts stay
whole on every rank, as the planner's placements say (its solver splits Linears and Embeddings).
The equivalence tests are tests/runtime/test_runtime_mlp_cnn.py, test_runtime_blocks_tp.py,
test_runtime_families.py and test_runtime_planner_plans.py. Sequence parallelism runs for the Llama
family (:mod:`runtime.sequence_parallel_llama`; the GPT's is in :mod:`runtime.tensor_parallel`).

Dropout runs with its masks drawn as :mod:`runtime.tensor_parallel_rng` says: the dropouts inside a
split pair's elementwise region and a head-split attention's draw from the rank's own stream.

Refused, with the module and the fix: a split style on anything but a Linear or an Embedding, a dim
``tp`` does not divide, an attention whose ``heads`` or ``kv_heads`` ``tp`` does not divide, a tied
weight split two ways, and ``sequence`` (sequence parallelism).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleOutput,
    RowwiseParallel,
    parallelize_module,
)

from planner.models import ModelPreset
from planner.plan import Plan
from runtime.errors import RunCheckError
from runtime.model import StageModule
from runtime.sequence_parallel_llama import apply_llama_sequence_parallel
from runtime.tensor_parallel import PLACEMENTS_SCHEMA
from runtime.tensor_parallel_rng import SplitRegionRNG, fork_dropout, fork_module, has_dropout
from runtime.tensor_parallel_tied import check_tied_splits, retie, tied_uses

SPLIT_STYLES = ("colwise", "rowwise", "vocab")  # vocab: Embeddings only

# Ops that act on each element alone: a tensor split on its last dim stays a valid split through them.
_ELEMENTWISE_FUNCTIONS = frozenset({F.gelu, F.relu, F.silu, F.mish, F.leaky_relu, F.elu, F.hardswish, torch.relu,
                                    torch.tanh, torch.sigmoid, F.sigmoid, F.tanh, operator.neg})
_ELEMENTWISE_METHODS = frozenset({"relu", "tanh", "sigmoid", "neg"})
_BINARY_FUNCTIONS = frozenset({operator.mul, operator.add, operator.sub, torch.mul, torch.add, torch.sub})
_BINARY_METHODS = frozenset({"mul", "add", "sub"})
_ELEMENTWISE_MODULES = (nn.GELU, nn.ReLU, nn.SiLU, nn.Mish, nn.LeakyReLU, nn.ELU, nn.Hardswish, nn.Tanh, nn.Sigmoid,
                        nn.Identity)


def check_generic_tensor_parallel(plan: Plan, preset: ModelPreset) -> None:
    """Refuse, before any process starts, what :func:`apply_generic_tensor_parallel` cannot split exactly."""
    tp = plan.parallel.tp
    if tp == 1:
        return
    if plan.parallel.sequence_parallel and preset.seq_len is not None:
        if not preset.spec.sequence_parallel:  # gpt: runtime.tensor_parallel; llama: sequence_parallel_llama
            raise RunCheckError(f"parallel.sequence_parallel: true for a {preset.family!r} model with a sequence of "
                                f"{preset.seq_len}; the runtime splits sequences for the 'gpt' and 'llama' families "
                                "only. Re-plan without --sequence-parallel")
        seq_len = plan.model.seq_len or preset.seq_len
        if seq_len % tp:
            raise RunCheckError(f"parallel.sequence_parallel: tp={tp} does not divide the sequence length "
                                f"model.seq_len={seq_len}, which sequence parallelism splits; re-plan with a tp "
                                "that divides it or without --sequence-parallel")
    # A model without a sequence (seq_len None) has nothing for sequence parallelism to split; the planner
    # no longer sets the flag for one, and a hand-edited plan that does runs exactly as without it.
    model = preset.build(device="meta")
    layers = plan.model.layer_names
    generic_styles(plan, model, layers)  # reads and checks the style table
    check_tied_splits(model, _planned_styles(plan, model, layers))
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
        pairs = linear_pairs(layer) | head_split_attention(layer, mine, tp, prefix)
        head_bias = head_bias_tables(layer, mine, tp)
        partners: dict[str, list[str]] = {}
        for col, row in pairs.items():
            partners.setdefault(row, []).append(col)
        for rel, style in mine.items():
            fqn = prefix + rel if rel else path
            module = _splittable(layer, rel, fqn, style)
            if isinstance(module, nn.Embedding):
                dim, size = ("num_embeddings", module.num_embeddings) if style == "vocab" else \
                    ("embedding_dim", module.embedding_dim)
            else:
                dim, size = ("out_features", module.out_features) if style == "colwise" else \
                    ("in_features", module.in_features)
            if size % tp:
                raise RunCheckError(f"placements.style.{fqn}: {style} splits {dim}={size}, which tp={tp} does not "
                                    "divide; re-plan with a tp that divides it, or mark the module replicate")
            if rel in head_bias:  # a per-head bias table: this rank's heads only (see head_bias_tables)
                out[fqn] = ColwiseParallel() if style == "colwise" else \
                    RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1))
                continue
            if isinstance(module, nn.Embedding):  # the lookup's output is made whole at once
                out[fqn] = ColwiseParallel(output_layouts=Replicate()) if style == "colwise" else \
                    RowwiseParallel(input_layouts=Replicate())  # vocab-parallel lookup, one all-reduce
                continue
            # A pair stays split only if the row-parallel Linear and *every* column-parallel one feeding it are
            # planned so (SwiGLU: a split gate times a whole up projection would be wrong).
            row = rel if style == "rowwise" else pairs.get(rel, "")
            paired = mine.get(row, "replicate") == "rowwise" and bool(partners.get(row)) and \
                all(mine.get(c, "replicate") == "colwise" for c in partners[row])
            if style == "colwise":
                out[fqn] = ColwiseParallel() if paired else ColwiseParallel(output_layouts=Replicate())
            else:
                out[fqn] = RowwiseParallel() if paired else RowwiseParallel(input_layouts=Replicate())
    return out


def head_split_attention(layer: nn.Module, styles: dict[str, str], tp: int, prefix: str = "") -> dict[str, str]:
    """``{q/k/v path: o path}`` of every :class:`~planner.models.blocks.Attention` in ``layer`` split by heads.

    An attention whose ``q``, ``k`` and ``v`` are planned ``colwise`` and ``o`` ``rowwise`` (paths
    relative to ``layer`` in ``styles``) runs Megatron's split: each rank computes ``heads / tp``
    query heads and ``kv_heads / tp`` key/value heads (whole groups of grouped-query attention, as
    the contiguous column blocks of ``q`` and ``k``/``v`` line up), and ``o`` sums the ranks' outputs.
    :func:`localize_attention_heads` then sets the module's head counts to the local ones. Any other
    mix leaves each Linear to be gathered on its own (exact, more communication).
    """
    from planner.models.blocks import Attention

    pairs: dict[str, str] = {}
    for name, module in layer.named_modules():
        if not isinstance(module, Attention):
            continue
        base = f"{name}." if name else ""
        q, k, v, o = (base + c for c in ("q", "k", "v", "o"))
        if not all(styles.get(c) == "colwise" for c in (q, k, v)) or styles.get(o) != "rowwise":
            continue
        for field, heads in (("heads", module.heads), ("kv_heads", module.kv_heads)):
            if heads % tp:
                raise RunCheckError(f"placements.style.{prefix}{name}: the attention's {field}={heads} is split "
                                    f"on tp={tp}, which does not divide it; re-plan with a tp that divides "
                                    f"{field}, or mark {prefix}{q}/k/v/o replicate")
        pairs |= {q: o, k: o, v: o}
    return pairs


def localize_attention_heads(layer: nn.Module, styles: dict[str, str], tp: int) -> int:
    """Set ``heads`` / ``kv_heads`` of each head-split attention in ``layer`` to its rank's share; returns how many.

    ``Attention.forward`` reshapes its projections by these counts, so with a column-parallel ``q``,
    ``k``, ``v`` handing it local tensors it computes exactly this rank's heads.
    """
    from planner.models.blocks import Attention

    count = 0
    for name, module in layer.named_modules():
        base = f"{name}." if name else ""
        if isinstance(module, Attention) and "q" in head_split_attention(module, _relative(styles, name), tp, base):
            module.heads //= tp
            module.kv_heads //= tp
            count += 1
    return count


def head_bias_tables(layer: nn.Module, styles: dict[str, str], tp: int) -> dict[str, str]:
    """``{table path: its style}`` of the per-head position-bias tables beside a head-split attention in ``layer``.

    T5's self-attention adds ``rel_bias(buckets)`` (an ``Embedding(buckets, heads)``) to every head's
    scores. When its attention is head-split (:func:`head_split_attention`), each rank must add the
    bias of its own heads, whatever the table's own split:

    * ``colwise`` (the heads column split): ``ColwiseParallel()``, the output stays split by heads;
    * ``vocab`` (the bucket rows split): ``RowwiseParallel(output_layouts=Shard(-1))``, the partial
      lookups are reduce-scattered onto the heads;
    * whole (``replicate``): ``PrepareModuleOutput`` keeps this rank's heads of the output, whose
      backward gathers the heads' gradients, so every rank's copy of the table gets the full one.
    """
    from planner.models.t5 import T5SelfAttention

    out: dict[str, str] = {}
    for name, module in layer.named_modules():
        if not isinstance(module, T5SelfAttention):
            continue
        base = f"{name}." if name else ""
        if head_split_attention(module.attn, _relative(styles, base + "attn"), tp, base + "attn."):
            out[base + "rel_bias"] = styles.get(base + "rel_bias", "replicate")
    return out


def _bias_tables(layer: nn.Module) -> list[str]:
    """Paths of the per-head bias tables in ``layer`` (T5's ``rel_bias``), which follow their attention's heads."""
    from planner.models.t5 import T5SelfAttention

    return [f"{name}.rel_bias" if name else "rel_bias" for name, m in layer.named_modules()
            if isinstance(m, T5SelfAttention)]


def _attention_projections(layer: nn.Module) -> dict[str, str]:
    """``{q/k/v path: o path}`` of every :class:`~planner.models.blocks.Attention` in ``layer`` (Megatron's default)."""
    from planner.models.blocks import Attention

    out: dict[str, str] = {}
    for name, module in layer.named_modules():
        if isinstance(module, Attention):
            base = f"{name}." if name else ""
            out |= {base + c: base + "o" for c in ("q", "k", "v")}
    return out


def _planned_styles(plan: Plan, root: nn.Module, layer_paths: tuple[str, ...]) -> dict[str, str]:
    """The plan's split styles (``colwise`` / ``rowwise`` / ``vocab``), or the found pairs and attentions when it has none."""
    if not plan.placements:
        styles: dict[str, str] = {}
        for path in layer_paths:
            prefix = f"{path}." if path else ""
            layer = root.get_submodule(path) if path else root
            for col, row in (linear_pairs(layer) | _attention_projections(layer)).items():
                styles |= {prefix + col: "colwise", prefix + row: "rowwise"}
            styles |= {prefix + table: "colwise" for table in _bias_tables(layer)}  # beside their split heads
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
            if plan.parallel.sequence_parallel and _splits_sequence(plan.model.family):
                continue  # every norm of the residual stream runs on the sequence shard anyway
            raise RunCheckError(f"placements.style.{module}: 'sequence' (sequence parallelism) is implemented for "
                                "the 'gpt' and 'llama' families, with parallel.sequence_parallel true; re-plan this "
                                "model without --sequence-parallel")
        if style not in SPLIT_STYLES:
            raise RunCheckError(f"placements.style.{module}: style {style!r} is not one the runtime applies to a "
                                f"{plan.model.family!r} model (it splits Linears colwise or rowwise, Embeddings colwise or vocab); mark it "
                                "replicate or re-plan with --tp 1")
        if any(module == p or module.startswith(p + ".") or not p for p in layer_paths):
            out[module] = style
    return out


def _splits_sequence(family: str | None) -> bool:
    """Whether the runtime lays ``family`` out for sequence parallelism (``Family.sequence_parallel``)."""
    from planner.models import FAMILIES

    return family in FAMILIES and FAMILIES[family].sequence_parallel


def _splittable(layer: nn.Module, rel: str, fqn: str, style: str) -> nn.Linear | nn.Embedding:
    """The module at ``rel``, if ``style`` is a split the runtime applies to it (Linear: colwise / rowwise;
    Embedding: colwise = hidden dim, vocab = rows)."""
    try:
        module = layer.get_submodule(rel)
    except AttributeError as exc:
        raise RunCheckError(f"placements.style.{fqn}: no such module in the model; the plan was made for another "
                            "model, re-create it") from exc
    if isinstance(module, nn.Embedding):
        if style == "rowwise":
            raise RunCheckError(f"placements.style.{fqn}: rowwise on an Embedding; the runtime splits an "
                                "Embedding by its hidden dim (colwise) or its vocabulary (vocab). Re-create the plan")
        return module
    if not isinstance(module, nn.Linear):
        raise RunCheckError(f"placements.style.{fqn}: {style} on a {type(module).__name__}; the runtime splits only "
                            "nn.Linear and nn.Embedding modules of this family. Mark it replicate (or re-plan with "
                            "--tp 1)")
    if style == "vocab":
        raise RunCheckError(f"placements.style.{fqn}: style 'vocab' is for Embeddings, and this is a Linear; "
                            "mark it colwise, rowwise or replicate (or re-create the plan)")
    return module


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
        graph = fx.symbolic_trace(layer).graph
    except Exception:  # noqa: BLE001 - any trace failure just means "no pair proven": gather instead
        return {}, {}
    calls: dict[str, int] = {}
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    def is_linear(node: fx.Node) -> bool:
        return node.op == "call_module" and isinstance(layer.get_submodule(node.target), nn.Linear) \
            and calls[node.target] == 1

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
        return isinstance(module, (*_ELEMENTWISE_MODULES, nn.Dropout))  # dropout: see pair_dropouts
    return False


def is_gpt_stage(stage: StageModule) -> bool:
    """Whether ``stage`` holds GPT-family layers (split by :mod:`runtime.tensor_parallel`, not here)."""
    from planner.models.gpt import GPTBlock, GPTEmbedding, GPTHead

    return any(isinstance(stage.get_submodule(p), (GPTEmbedding, GPTBlock, GPTHead)) for p in stage.layer_paths)


def apply_generic_tensor_parallel(stage: StageModule, tp_mesh: DeviceMesh, plan: Plan) -> None:
    """Split the Linears of ``stage`` that the plan splits over ``tp_mesh`` (in place), layer by layer.

    Head-split attentions (:func:`head_split_attention`) get their local head counts afterwards.
    """
    styles = generic_styles(plan, stage, stage.layer_paths)
    planned = _planned_styles(plan, stage, stage.layer_paths)
    tied = tied_uses(stage)
    rng = SplitRegionRNG(tp_mesh.get_local_rank())
    for path in stage.layer_paths:
        mine = _relative(styles, path)
        layer = stage.get_submodule(path)
        # Read before localize_attention_heads divides the head counts.
        whole_tables = [t for t, s in head_bias_tables(layer, _relative(planned, path), tp_mesh.size()).items()
                        if s == "replicate"]
        _fork_split_dropouts(layer, mine, _relative(planned, path), tp_mesh.size(), rng)
        if plan.parallel.sequence_parallel and plan.model.seq_len:
            mine = apply_llama_sequence_parallel(layer, path, mine, tp_mesh)
        if "" in mine:  # the layer is itself a split Linear
            parallelize_module(layer, tp_mesh, mine.pop(""), src_data_rank=None)
        if mine:
            parallelize_module(layer, tp_mesh, mine, src_data_rank=None)
        localize_attention_heads(layer, _relative(planned, path), tp_mesh.size())
        for table in whole_tables:  # a whole bias table: keep this rank's heads of its output
            parallelize_module(layer.get_submodule(table), tp_mesh, PrepareModuleOutput(
                output_layouts=Replicate(), desired_output_layouts=Shard(-1), use_local_output=True))
    retie(stage, tied)


def _fork_split_dropouts(layer: nn.Module, styles: dict[str, ParallelStyle], planned: dict[str, str], tp: int,
                         rng: SplitRegionRNG) -> None:
    """Give the dropouts that act on this rank's own values (split pairs, head-split attention) its own stream."""
    if not has_dropout(layer):
        return
    for row, dropouts in pair_dropouts(layer).items():
        style = styles.get(row)
        if isinstance(style, RowwiseParallel) and not style.input_layouts[0].is_replicate():  # the pair stays split
            for name in dropouts:
                fork_dropout(layer.get_submodule(name), rng)
    for q in head_split_attention(layer, planned, tp):
        attention = layer.get_submodule(q.rsplit(".", 1)[0]) if "." in q else layer
        if has_dropout(attention):
            fork_module(attention, rng)


def _relative(styles: dict, path: str) -> dict:
    """The entries of ``styles`` at or under layer ``path``, keyed relative to it (``""``: the layer itself)."""
    if not path:
        return dict(styles)
    return {m[len(path) + 1:] if m != path else "": s for m, s in styles.items()
            if m == path or m.startswith(path + ".")}
