"""The runtime's one tensor-parallel path, for every model: Linears, Embeddings, attention heads.

Every model (the project's presets of every family, GPT included; a user's ``nn.Module``; a Hugging
Face model) is split here from the plan's ``placements["style"]`` table (``{module fqn: colwise |
rowwise | vocab | replicate}``, written by the planner's intra-op solver, see
:mod:`planner.intra_op.placements`), with ``parallelize_module``. Only ``nn.Linear``, transformers'
``Conv1D`` (GPT-2's projections: ``y = x W + b`` with ``W [in, out]``; colwise splits ``W`` on dim 1,
rowwise on dim 0) and ``nn.Embedding`` modules are split; every split must give the single-process
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
cannot trace makes the pair a gather instead (a layer fx cannot trace is searched child by child:
the GPT block's MLP; :mod:`runtime.tensor_parallel_pairs` finds the pairs). A plan without placements gets every such pair split and everything else
replicated: Megatron's recipe, found rather than hard-coded.

Attention is the one pair fx cannot prove (reshapes to heads lie between the projections), so an
attention module declares its projections (``head_layout``,
:class:`planner.models.blocks.HeadLayout`: the shared ``Attention`` of BERT, ViT, Llama, T5 has
``q``, ``k``, ``v`` → ``o``; the GPT's has a fused ``qkv`` → ``proj``): when its column projections
are ``colwise`` and its row one ``rowwise`` they stay split (Megatron's attention, one all-reduce),
and the module's ``heads`` / ``kv_heads`` are set to ``heads / tp`` and ``kv_heads / tp`` so that
its own forward computes this rank's heads. The column blocks of ``q`` and of ``k``/``v`` line up
with whole grouped-query groups, so grouped-query attention splits too. A fused projection packing
``[q; k; v]`` gets its rows reordered to ``[q_0; k_0; v_0; q_1; …]`` first, so that a plain
``Shard(0)`` gives each rank its heads (checkpoints store the model's own order:
:mod:`runtime.tensor_parallel`). Plans without placements split every such attention.

T5's self-attention adds a per-head relative-position bias (``rel_bias``, an ``Embedding(buckets,
heads)``): beside a head-split attention each rank adds its own heads' bias, whichever way the plan
splits the table (:func:`head_bias_tables`). A tensor tied between
modules (BERT's decoder and word embedding, T5's embeddings and LM head, BERT's decoder bias held by
its parent as ``cls.predictions.bias``) is split once, the same way for every module that reads it
(:mod:`runtime.tensor_parallel_tied`).

What is split is only ever a Linear, a ``Conv1D``, an Embedding or a head-bias table, so
convolutions, recurrent layers and norms stay whole on every rank, as the planner's placements say
(the stacked experts of ``planner.models.moe.MoEFeedForward`` are split by the preset loop's
:func:`runtime.expert_parallel.apply_expert_tensor_parallel`, not here). The equivalence tests are tests/runtime/test_runtime_equivalence.py,
test_runtime_mlp_cnn.py, test_runtime_blocks_tp.py, test_runtime_families.py,
test_runtime_planner_plans.py and test_parallelize_hf_models.py. Sequence parallelism is the one
family-specific layout: :mod:`runtime.sequence_parallel_gpt` and :mod:`runtime.sequence_parallel_llama`.

Dropout runs with its masks drawn as :mod:`runtime.tensor_parallel_rng` says: the dropouts inside a
split pair's elementwise region and a head-split attention's per-head part (its ``attend`` method
where it has one, else its forward) draw from the rank's own stream.

Refused, with the module and the fix: a split style on anything but a Linear, a ``Conv1D`` or an
Embedding, a dim ``tp`` does not divide, an attention whose ``heads`` or ``kv_heads`` ``tp`` does not
divide, a tied tensor split two ways, and ``sequence`` on anything but a norm of a family whose
sequence parallelism the runtime lays out.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor
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
from runtime.rank_layout import TensorSplits
from runtime.sequence_parallel_gpt import apply_gpt_sequence_parallel, is_gpt_layer
from runtime.sequence_parallel_llama import apply_llama_sequence_parallel
from runtime.tensor_parallel_pairs import is_conv1d, linear_pairs, pair_dropouts
from runtime.tensor_parallel_rng import SplitRegionRNG, fork_dropout, fork_module, has_dropout
from runtime.tensor_parallel_tied import check_tied_splits, retie, tied_uses

SPLIT_STYLES = ("colwise", "rowwise", "vocab")  # vocab: Embeddings only
QKV_ATTR = "_tp_qkv_groups"  # on a StageModule: {parameter fqn: tp} of tensors stored in the tp row order

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
    check_module_tensor_parallel(plan, preset.build(device="meta"))


def check_module_tensor_parallel(plan: Plan, model: nn.Module) -> None:
    """The checks of :func:`check_generic_tensor_parallel` that need only the model (a preset's or a user's)."""
    layers = plan.model.layer_names
    generic_styles(plan, model, layers)  # reads and checks the style table
    # Ties among the planned layers only: a module outside them (T5's ``shared``) is never called.
    in_layers = StageModule(model, layers, stage_index=0)
    check_tied_splits(in_layers, _planned_styles(plan, in_layers, layers))
    for module, style in TensorSplits.from_plan(plan).split().items():
        if not any(module == p or module.startswith(f"{p}.") or not p for p in layers):
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
            elif is_conv1d(module):  # W [in, out]: nf output features, nx input features
                dim, size = ("nf", module.nf) if style == "colwise" else ("nx", module.nx)
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
    """``{column Linear path: row Linear path}`` of every attention module in ``layer`` that is split by heads.

    An attention module declares its projections in ``head_layout``
    (:class:`planner.models.blocks.HeadLayout`: the shared ``Attention``'s ``q``, ``k``, ``v`` → ``o``;
    the GPT's fused ``qkv`` → ``proj``). When every column Linear is planned ``colwise`` and the row
    Linear ``rowwise`` (paths relative to ``layer`` in ``styles``) it runs Megatron's split: each rank
    computes ``heads / tp`` query heads and ``kv_heads / tp`` key/value heads (whole groups of
    grouped-query attention, as the contiguous column blocks of ``q`` and ``k``/``v`` line up), and the
    row Linear sums the ranks' outputs. :func:`localize_attention_heads` then sets the module's head
    counts to the local ones. Any other mix leaves each Linear to be gathered on its own (exact, more
    communication).
    """
    pairs: dict[str, str] = {}
    for name, module in layer.named_modules():
        heads = _head_layout(module)
        if heads is None:
            continue
        base = f"{name}." if name else ""
        cols, row = [base + c for c in heads.columns], base + heads.row
        if not all(styles.get(c) == "colwise" for c in cols) or styles.get(row) != "rowwise":
            continue
        for field in ("heads", "kv_heads"):
            count = getattr(module, field, None)
            if isinstance(count, int) and count % tp:
                raise RunCheckError(f"placements.style.{prefix}{name}: the attention's {field}={count} is split "
                                    f"on tp={tp}, which does not divide it; re-plan with a tp that divides "
                                    f"{field}, or mark {prefix}{base}{'/'.join(heads.columns)}/{heads.row} "
                                    "replicate")
        pairs |= dict.fromkeys(cols, row)
    return pairs


def localize_attention_heads(layer: nn.Module, styles: dict[str, str], tp: int) -> int:
    """Set ``heads`` / ``kv_heads`` of each head-split attention in ``layer`` to its rank's share; returns how many.

    The attention's forward shapes its projections by these counts, so with column-parallel
    projections handing it local tensors it computes exactly this rank's heads.
    """
    count = 0
    for name, module in layer.named_modules():
        heads = _head_layout(module)
        base = f"{name}." if name else ""
        if heads is not None and heads.columns[0] in head_split_attention(module, _relative(styles, name), tp,
                                                                          base):
            for field in ("heads", "kv_heads"):
                if isinstance(getattr(module, field, None), int):
                    setattr(module, field, getattr(module, field) // tp)
            count += 1
    return count


def _head_layout(module: nn.Module):
    """The module's :class:`planner.models.blocks.HeadLayout`, if it is an attention tp can split by heads."""
    from planner.models.blocks import HeadLayout

    layout = getattr(type(module), "head_layout", None)
    return layout if isinstance(layout, HeadLayout) else None


def to_tp_rows(t: torch.Tensor, tp: int, packed: int = 3) -> torch.Tensor:
    """``[q; k; v]`` rows (dim 0) → ``[q_0; k_0; v_0; q_1; …]`` so that ``Shard(0)`` gives each rank its heads."""
    return t.reshape(packed, tp, t.shape[0] // (packed * tp), *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def canonical_from_tp(t: torch.Tensor, tp: int, packed: int = 3) -> torch.Tensor:
    """Inverse of :func:`to_tp_rows`."""
    return t.reshape(tp, packed, t.shape[0] // (packed * tp), *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def _pack_rows_by_rank(layer: nn.Module, path: str, planned: dict[str, str], tp: int) -> dict[str, int]:
    """Reorder the rows of each packed projection of a head-split attention in ``layer`` (in place, before sharding).

    Returns ``{parameter fqn: tp}`` of the reordered tensors (``QKV_ATTR``: checkpoints undo it).
    """
    prefix = f"{path}." if path else ""
    out: dict[str, int] = {}
    for name, module in layer.named_modules():
        heads = _head_layout(module)
        if heads is None or heads.packed == 1:
            continue
        base = f"{name}." if name else ""
        if not head_split_attention(module, _relative(planned, name), tp, base):
            continue
        if heads.packed != 3:
            raise RunCheckError(f"{prefix}{name}: a projection packing {heads.packed} blocks of heads; the runtime "
                                "reorders packed [q; k; v] projections (3) only. Mark its projections replicate")
        for column in heads.columns:
            linear = module.get_submodule(column)
            with torch.no_grad():
                for pname, param in linear.named_parameters(recurse=False):
                    param.copy_(to_tp_rows(param, tp))
                    out[f"{prefix}{base}{column}.{pname}"] = tp
    return out


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
    """``{column path: row path}`` of every attention module with a ``head_layout`` in ``layer`` (Megatron's default)."""
    out: dict[str, str] = {}
    for name, module in layer.named_modules():
        heads = _head_layout(module)
        if heads is not None:
            base = f"{name}." if name else ""
            out |= {base + c: base + heads.row for c in heads.columns}
    return out


def _planned_styles(plan: Plan, root: nn.Module, layer_paths: tuple[str, ...]) -> dict[str, str]:
    """The plan's split styles (``colwise`` / ``rowwise`` / ``vocab``), or the found pairs and attentions when it has none."""
    if not TensorSplits.from_plan(plan).given:
        styles: dict[str, str] = {}
        for path in layer_paths:
            prefix = f"{path}." if path else ""
            layer = root.get_submodule(path) if path else root
            for col, row in (linear_pairs(layer) | _attention_projections(layer)).items():
                styles |= {prefix + col: "colwise", prefix + row: "rowwise"}
            styles |= {prefix + table: "colwise" for table in _bias_tables(layer)}  # beside their split heads
        return styles
    out = {}
    for module, style in TensorSplits.from_plan(plan).split().items():
        if style == "sequence":
            target = _module_or_none(root, module)
            if isinstance(target, (nn.Linear, nn.Embedding)) or is_conv1d(target):
                raise RunCheckError(f"placements.style.{module}: 'sequence' splits a norm along the sequence, and this "
                                    f"is a {type(target).__name__}; mark it colwise, rowwise or replicate (or "
                                    "re-create the plan)")
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


def _module_or_none(root: nn.Module, fqn: str) -> nn.Module | None:
    try:
        return root.get_submodule(fqn)
    except AttributeError:
        return None


def _splits_sequence(family: str | None) -> bool:
    """Whether the runtime lays ``family`` out for sequence parallelism (``Family.sequence_parallel``)."""
    from planner.models import FAMILIES

    return family in FAMILIES and FAMILIES[family].sequence_parallel


def _splittable(layer: nn.Module, rel: str, fqn: str, style: str) -> nn.Module:
    """The module at ``rel``, if ``style`` is a split the runtime applies to it (Linear or transformers'
    ``Conv1D``: colwise / rowwise; Embedding: colwise = hidden dim, vocab = rows)."""
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
    if not isinstance(module, nn.Linear) and not is_conv1d(module):
        raise RunCheckError(f"placements.style.{fqn}: {style} on a {type(module).__name__}; the runtime splits only "
                            "nn.Linear, transformers' Conv1D and nn.Embedding modules. Mark it replicate (or re-plan "
                            "with --tp 1)")
    if style == "vocab":
        raise RunCheckError(f"placements.style.{fqn}: style 'vocab' is for Embeddings, and this is a Linear; "
                            "mark it colwise, rowwise or replicate (or re-create the plan)")
    return module


class _Conv1DColwise(ColwiseParallel):
    """``ColwiseParallel`` for a ``Conv1D``: ``W [in, out]`` split on dim 1 and the bias on dim 0 (output features)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, partial(_split_conv1d, {"weight": 1, "bias": 0}),
                                 partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
                                 partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))


class _Conv1DRowwise(RowwiseParallel):
    """``RowwiseParallel`` for a ``Conv1D``: ``W [in, out]`` split on dim 0 (input features), the bias whole."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        self.desired_input_layouts = (Shard(-1),)
        return distribute_module(module, device_mesh, partial(_split_conv1d, {"weight": 0, "bias": None}),
                                 partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
                                 partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))


def _split_conv1d(dims: dict[str, int | None], name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
    for pname, param in list(module.named_parameters(recurse=False)):
        dim = dims.get(pname)
        placement = Replicate() if dim is None else Shard(dim)
        # src_data_rank=None: every rank built the same weights, each keeps its slice (no broadcast)
        module.register_parameter(pname, nn.Parameter(distribute_tensor(param, device_mesh, [placement],
                                                                        src_data_rank=None),
                                                      requires_grad=param.requires_grad))


def _for_module(module: nn.Module, style: ParallelStyle) -> ParallelStyle:
    """``style`` as torch applies it to ``module``: a Linear's styles become their ``Conv1D`` twins on a ``Conv1D``."""
    if not is_conv1d(module) or not isinstance(style, (ColwiseParallel, RowwiseParallel)):
        return style
    twin = _Conv1DColwise if isinstance(style, ColwiseParallel) else _Conv1DRowwise
    return twin(input_layouts=style.input_layouts[0], output_layouts=style.output_layouts[0],
                use_local_output=style.use_local_output)


def apply_generic_tensor_parallel(stage: StageModule, tp_mesh: DeviceMesh, plan: Plan) -> None:
    """Split the Linears of ``stage`` that the plan splits over ``tp_mesh`` (in place), layer by layer.

    Packed projections of head-split attentions get their rows in tp order first, and head-split
    attentions get their local head counts afterwards.
    """
    tp = tp_mesh.size()
    styles = generic_styles(plan, stage, stage.layer_paths)
    planned = _planned_styles(plan, stage, stage.layer_paths)
    tied = tied_uses(stage)
    rng = SplitRegionRNG(tp_mesh.get_local_rank())
    packed: dict[str, int] = {}
    for path in stage.layer_paths:
        mine = _relative(styles, path)
        layer = stage.get_submodule(path)
        # Read before localize_attention_heads divides the head counts.
        whole_tables = [t for t, s in head_bias_tables(layer, _relative(planned, path), tp).items()
                        if s == "replicate"]
        _fork_split_dropouts(layer, mine, _relative(planned, path), tp, rng)
        if plan.parallel.sequence_parallel and plan.model.seq_len:
            mine = apply_gpt_sequence_parallel(layer, path, mine, tp_mesh, rng) if is_gpt_layer(layer) else \
                apply_llama_sequence_parallel(layer, path, mine, tp_mesh)
        packed |= _pack_rows_by_rank(layer, path, _relative(planned, path), tp)
        mine = {rel: _for_module(layer.get_submodule(rel) if rel else layer, style) for rel, style in mine.items()}
        if "" in mine:  # the layer is itself a split Linear
            parallelize_module(layer, tp_mesh, mine.pop(""), src_data_rank=None)
        if mine:
            parallelize_module(layer, tp_mesh, mine, src_data_rank=None)  # every rank built the same weights
        localize_attention_heads(layer, _relative(planned, path), tp)
        for table in whole_tables:  # a whole bias table: keep this rank's heads of its output
            parallelize_module(layer.get_submodule(table), tp_mesh, PrepareModuleOutput(
                output_layouts=Replicate(), desired_output_layouts=Shard(-1), use_local_output=True))
    retie(stage, tied)
    setattr(stage, QKV_ATTR, packed)


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
    for name in {col.rsplit(".", 1)[0] if "." in col else "" for col in head_split_attention(layer, planned, tp)}:
        attention = layer.get_submodule(name)
        if has_dropout(attention):
            # Its per-head part (``attend``) where the forward also drops out the output, which every rank holds.
            _fork_attend(attention, rng) if hasattr(attention, "attend") else fork_module(attention, rng)


def _fork_attend(attention: nn.Module, rng: SplitRegionRNG) -> None:
    """Run ``attention.attend`` (its per-head part) on ``rng``'s stream while training (in place)."""
    plain = attention.attend

    def attend(q: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not attention.training:
            return plain(q, *args, **kwargs)
        with rng.fork(q.device):
            return plain(q, *args, **kwargs)

    attention.attend = attend


def _relative(styles: dict, path: str) -> dict:
    """The entries of ``styles`` at or under layer ``path``, keyed relative to it (``""``: the layer itself)."""
    if not path:
        return dict(styles)
    return {m[len(path) + 1:] if m != path else "": s for m, s in styles.items()
            if m == path or m.startswith(path + ".")}
