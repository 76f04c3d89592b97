"""Context parallelism: ``cp`` ranks share every sequence, each holding ``1/cp`` of its tokens.

What one rank of a context-parallel group does, as the cost model prices it:

* **Per-token work and memory: 1/cp.** GEMMs, element-wise traffic, stored and working activations,
  a layer's output and the loss all scale with the tokens a rank holds, so a layer table with
  ``cp > 1`` is the table of ``micro_batch / cp`` sequences' worth of tokens
  (:func:`tokens_per_rank`); GEMM efficiency by shape sees the smaller ``m``
  (:func:`planner.cost.compute.layer_times` takes that fractional micro-batch).
* **Attention: 1/cp of the full causal work, balanced.** We price the load-balanced layout of
  Llama 3 (Dubey et al. 2024, §3.3.2) and of torch's ``context_parallel``: the sequence is cut in
  ``2·cp`` chunks and rank ``i`` holds chunks ``i`` and ``2·cp−1−i``, so every rank computes the
  same share of the causal score triangle. The runtime (:mod:`runtime.context_parallel`) runs that
  layout, which needs ``seq_len % (2·cp) == 0`` (:func:`check_cp`).
* **K and V all-gathered (Llama 3's choice), per attention layer and micro-batch** on the cp group
  (ranks ``tp`` apart: :func:`planner.cost.comm.strided_group` ``(cluster, cp, tp)``, NVLink inside
  a node, the NICs across)::

      S        = micro_batch · tokens · (k_width + v_width) · elt / tp     (the gathered K and V)
      forward  = all_gather(S)       = (cp−1)/cp · S / B + (cp−1)·α
      backward = reduce_scatter(S)   = (cp−1)/cp · S / B + (cp−1)·α      (dK, dV back to their owners)

  ``k_width + v_width`` is read from the trace (:func:`kv_bytes_per_sample`): the projection width
  before the attention core less the query width (the output projection's input), so grouped-query
  attention gathers only its ``kv_heads``. Llama 3 gathers before the score computation and does not
  overlap it (the K/V tensors are small next to the attention at long sequences), so both are priced
  exposed. Full recomputation repeats the forward all-gather; the gathered K and V are saved for the
  backward (stored activations, working memory under full recomputation).
* **Gradients over dp·cp.** The ranks of a cp group hold the same parameters: the data-parallel
  reduction and ZeRO/FSDP sharding run over ``dp·cp`` ranks (torchtitan shards FSDP over
  ``dp_shard·cp``): :func:`planner.cost.sharding.shard_size` and the groups of
  :func:`planner.cost.sharding.shard_groups`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from planner.cluster import ClusterSpec
from planner.cost.comm import all_gather_s, reduce_scatter_s, strided_group
from planner.cost.compute import ATTENTION_KINDS, LINEAR_KINDS
from planner.cost.constants import DTYPE_BYTES, CostConstants
from planner.cost.sharding import REPLAYS_FORWARD, layer_recompute
from planner.errors import SpecError
from planner.trace.graph import CostGraph, Layer

__all__ = ["check_cp", "cp_comm_s", "kv_bytes_per_sample", "kv_gathered_bytes", "tokens_per_rank", "cp_rows", "add_cp_rows",
           "cp_step_note"]


def tokens_per_rank(micro_batch: int, cp: int) -> float:
    """A micro-batch's tokens on one rank of a cp group, in sequences: ``micro_batch / cp`` (exactly
    ``micro_batch`` at ``cp = 1``, so default plans price to the same bits)."""
    return micro_batch if cp <= 1 else micro_batch / cp


def kv_bytes_per_sample(layer: Layer, dtype: str) -> float:
    """Bytes of K and V (all heads, the whole sequence) per sample over every attention core of ``layer``.

    A core is a run of attention ops (fused kernel, or the two batched GEMMs of written-out attention);
    the linears between the previous core (or the layer's start) and it are its projections (Q, K, V
    or a fused QKV), and the first linear after it is the output projection, whose input width is the
    query width. So ``k + v = projections − query`` (GQA: ``2·kv_heads·head_dim``); the tokens are the
    output projection's ``m``. A core without that pattern is priced as multi-head (``k + v = 2·q``).
    """
    elt = DTYPE_BYTES.get(dtype, 2)
    total, width, core_width, in_core = 0.0, 0, 0, False
    for op in layer.op_costs:
        if op.kind in ATTENTION_KINDS:
            if not in_core:
                in_core, core_width, width = True, width, 0
        elif op.kind in LINEAR_KINDS and op.m:
            if in_core:  # the output projection: its input is the query heads
                kv = core_width - op.k if core_width > op.k else 2 * op.k
                total += float(op.m) * kv * elt
                in_core, width = False, 0
            else:
                width += op.n
    return total


def cp_comm_s(layer: Layer, cluster: ClusterSpec, *, micro_batch: int, tp: int, cp: int, dtype: str,
              c: CostConstants) -> tuple[float, float]:
    """Forward (all-gather of K and V) and backward (reduce-scatter of dK and dV) seconds of one
    micro-batch of ``layer`` on its cp group (module docstring); ``(0, 0)`` without attention or cp."""
    if cp <= 1:
        return 0.0, 0.0
    gathered = micro_batch * kv_bytes_per_sample(layer, dtype) / tp
    if gathered <= 0:
        return 0.0, 0.0
    group = strided_group(cluster, cp, tp)
    return all_gather_s(gathered, group, c), reduce_scatter_s(gathered, group, c)


def kv_gathered_bytes(layer: Layer, *, micro_batch: int, tp: int, cp: int, dtype: str) -> float:
    """The gathered K and V one rank holds for its attention's backward: ``(cp−1)/cp`` of the whole
    sequence's (its own shard is stored already in the layer's activations)."""
    if cp <= 1:
        return 0.0
    return micro_batch * kv_bytes_per_sample(layer, dtype) / tp * (cp - 1) / cp


def cp_rows(graph: CostGraph, cluster: ClusterSpec, *, micro_batch: int, tp: int, cp: int, dtype: str,
            c: CostConstants) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per layer of ``graph``: :func:`cp_comm_s` (forward, backward seconds) and :func:`kv_gathered_bytes`,
    for :func:`planner.cost.layer_table.layer_table` (computed once per layer signature)."""
    n = graph.num_layers
    fwd, bwd, kv = np.zeros(n), np.zeros(n), np.zeros(n)
    seen: dict[str, tuple[float, float, float]] = {}
    for i, layer in enumerate(graph.layers):
        row = seen.get(layer.signature)
        if row is None:
            row = seen[layer.signature] = (
                *cp_comm_s(layer, cluster, micro_batch=micro_batch, tp=tp, cp=cp, dtype=dtype, c=c),
                kv_gathered_bytes(layer, micro_batch=micro_batch, tp=tp, cp=cp, dtype=dtype))
        fwd[i], bwd[i], kv[i] = row
    return fwd, bwd, kv


def add_cp_rows(arr: dict[str, np.ndarray], graph: CostGraph, cluster: ClusterSpec, *, micro_batch: int, tp: int,
                cp: int, dtype: str, c: CostConstants, recompute: str, every: int = 1) -> np.ndarray | None:
    """Add :func:`cp_rows` to a layer table's arrays (``tcf``/``tc``: forward / all collective seconds,
    exposed; ``r``: full recomputation repeats the all-gather; ``st`` stored, or ``wk`` working under
    full recomputation: the gathered K and V; ``every``: one layer in ``every`` recomputed,
    :func:`planner.cost.sharding.layer_recompute`). Returns the cp seconds per layer (forward + backward);
    None, and nothing added, at ``cp = 1``."""
    if cp <= 1:
        return None
    fwd, bwd, kv = cp_rows(graph, cluster, micro_batch=micro_batch, tp=tp, cp=cp, dtype=dtype, c=c)
    arr["tcf"] += fwd
    arr["tc"] += fwd + bwd
    # Under per-op checkpointing the gathered K and V feed recomputed GEMMs' consumers: gathered again too.
    full = np.array([layer_recompute(recompute, i, every) in REPLAYS_FORWARD for i in range(graph.num_layers)],
                    dtype=bool)
    arr["r"] += np.where(full, fwd, 0.0)
    arr["wk"] += np.where(full, kv, 0.0)
    arr["st"] += np.where(full, 0.0, kv)
    return fwd + bwd


def check_cp(cp: int, seq_len: int | None) -> SpecError | None:
    """Why ``cp`` cannot split a sequence of ``seq_len`` tokens (None: it can). The balanced layout cuts
    every sequence into ``2·cp`` equal chunks."""
    if cp <= 1:
        return None
    if not seq_len:
        return SpecError("cp", cp, "context parallelism splits a sequence; this model has none: set cp to 1")
    if seq_len % (2 * cp):
        fits = [d for d in (2, 4, 8, 16, 32) if seq_len % (2 * d) == 0]
        return SpecError("cp", cp, f"the balanced context-parallel layout cuts each sequence into 2*cp chunks: "
                         f"2*cp must divide seq_len = {seq_len}; use cp in {[1, *fits]} or change --seq-len")
    return None


def cp_step_note(graph: CostGraph, cluster: ClusterSpec, cfg: object, layers: Sequence[int], c: CostConstants,
                 dtype: str) -> str:
    """One sentence for the plan's explanation: what cp costs on a device running ``layers`` for a step
    (``num_micro_batches`` micro-batches): the K/V bytes it gathers and the exposed seconds."""
    cp, tp, mb, m = cfg.cp, cfg.tp, cfg.micro_batch_size, cfg.num_micro_batches  # type: ignore[attr-defined]
    gathered = sum(kv_bytes_per_sample(graph.layers[i], dtype) for i in layers) * mb / tp
    seconds = sum(sum(cp_comm_s(graph.layers[i], cluster, micro_batch=mb, tp=tp, cp=cp, dtype=dtype, c=c))
                  for i in layers)
    every = getattr(cfg, "recompute_every", 1)
    seconds += sum(cp_comm_s(graph.layers[i], cluster, micro_batch=mb, tp=tp, cp=cp, dtype=dtype, c=c)[0]
                   for i in layers if layer_recompute(cfg.recompute, i, every) in REPLAYS_FORWARD)  # type: ignore[attr-defined]
    return (f"Context parallelism cp={cp}: each rank holds 1/{cp} of every sequence (balanced 2*cp chunks); "
            f"attention all-gathers K and V ({gathered * m / 2**30:.3g} GiB per step on the busiest device, "
            f"reduce-scattered back in backward) on groups of {cp} ranks {tp} apart: {seconds * m:.3f} s per step, "
            f"exposed, in tp_comm; gradients are reduced over dp*cp = {cfg.dp * cp} ranks.")  # type: ignore[attr-defined]
