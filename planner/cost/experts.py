"""Expert parallelism: what splitting each MoE layer's experts over ``ep`` data-parallel ranks costs.

An expert-parallel group is ``ep`` consecutive data-parallel ranks
(:meth:`planner.layout.RankLayout.sub_group`: stride ``cp·tp`` in rank space, torchtitan's borrowing
of ep from dp). Each rank keeps ``E/ep`` of the ``E`` experts of every MoE layer; tokens reach the
rank holding their expert by an all-to-all (*dispatch*) and come back by another (*combine*).
Per MoE module and micro-batch, on one rank (``T`` tokens it routes, ``k`` choices each, capacity
factor ``cf``, width ``h``, ``elt`` bytes per value)::

    buffer      S = T · k · cf · h · elt          the capacity slots it sends (padding included)
    forward     2 · all_to_all(S, ep group)      dispatch + combine; each moves S·(ep−1)/ep off the rank
    backward    2 · all_to_all(S, ep group)      their gradients, the same bytes the other way
    full recomputation repeats the forward two (they are part of the recomputed forward)

``T = micro_batch · seq_len / cp``, and ``/ tp`` under sequence parallelism (each tp rank routes its
own sequence shard); without it the tp ranks of a group route the same tokens, and each dispatches
them (Megatron-Core's layout without expert tensor parallelism). ``all_to_all`` is
:func:`planner.cost.comm.all_to_all_s`: alpha-beta on the group's real links (NVLink inside a node,
each rank's own NIC across nodes), or the cluster's measured ``all_to_all`` curve when it has one.

State: the stacked expert weights (``Layer.experts[*].expert_params``) and their gradients and
optimizer states are divided by ``ep`` on every rank; the router, attention, norms and shared
experts are not. Expert gradients are all-reduced over the ``dp/ep`` ranks that hold the same
experts (stride ``ep·cp·tp``), the rest over all ``dp`` as before.

Compute: unchanged per rank. The experts run over fixed capacity buffers (:mod:`planner.models.moe`:
``E·C`` slots, padding included), so each rank's ``E/ep`` experts run ``ep ×`` the slots of one
rank's tokens: the same GEMM FLOPs whatever the routing. Load imbalance changes which pairs are
dropped, not the time; a dropless router (DeepSeek-V3, MegaBlocks) would wait on its busiest
rank, which this model does not price (it assumes balanced routing, as the capacity factor does).
The GEMMs' shapes change (``E/ep`` batches of ``ep·C`` rows): priced with the traced shapes.

ZeRO with ``ep > 1`` (torchtitan's FSDP2 on the dp-mod-ep mesh for the experts; Megatron's
expert-data-parallel group): the non-expert states shard over the usual shard group of ``n``
ranks (:func:`planner.cost.sharding.shard_size`), the expert states over the ``n/ep`` ranks of it that
hold the same experts (stride ``ep·cp·tp``), so every rank holds ``1/n`` of the model's expert states::

    per expert parameter on one rank (E_r = E/ep of them, after tp)   w, g, o as for the rest, with
                                                                      n/ep in place of n
    ZeRO-1/2   reduce-scatter(g·E_r/tp) + all-gather(w·E_r/tp) over the n/ep ranks,        once per step
               the rest's over the n ranks
    ZeRO-3     the gathers and reduce-scatter of planner.cost.sharding over the n/ep ranks   per micro-batch
               for the experts (HSDP: + their all-reduce over the same replicas)
    optimizer step and gradient accumulation: the experts' shard is n/ep ranks

``n/ep`` must be a whole number (``ep`` divides the shard group, :func:`check_ep`). ZeRO-3's
temporaries (the gathered largest layer) are priced as without ep (the gathered layer holds the
rank's ``E/ep`` experts either way).
"""

from __future__ import annotations

import functools

import numpy as np

from planner.cluster import ClusterSpec
from planner.cost.comm import (
    Group,
    all_gather_s,
    all_reduce_s,
    all_to_all_s,
    overlapped_comm_s,
    reduce_scatter_s,
    strided_group,
)
from planner.cost.constants import DTYPE_BYTES, CostConstants
from planner.cost.sharding import (
    REPLAYS_FORWARD,
    ShardGroups,
    gathers_per_step,
    keeps_unsharded_grads,
    layer_recompute,
    shard_size,
    state_bytes_per_param,
    zero3_micro_batch_s,
)
from planner.errors import SpecError
from planner.plan import ParallelConfig
from planner.trace.graph import CostGraph, Layer

__all__ = ["add_expert_rows", "all_to_all_bytes", "check_ep", "device_expert_params", "dp_grad_all_reduce_s", "ep_group",
           "expert_all_to_all_s", "expert_params", "expert_parallel_row", "expert_replica_group", "expert_shard_extra",
           "expert_shard_groups", "expert_shard_size", "expert_state_extra", "has_experts", "layer_all_to_all_s",
           "moe_expert_counts", "zero3_expert_micro_batch_s", "zero3_step_s", "zero_expert_params", "zero_step_s"]


def has_experts(graph: CostGraph) -> bool:
    """Whether any layer of ``graph`` holds a mixture of experts."""
    return any(layer.experts for layer in graph.layers)


def moe_expert_counts(graph: CostGraph) -> tuple[int, ...]:
    """The distinct expert counts of ``graph``'s MoE modules (empty: a dense model)."""
    return tuple(sorted({r.num_experts for layer in graph.layers for r in layer.experts}))


def expert_params(layer: Layer) -> int:
    """The layer's expert weights (the part expert parallelism splits)."""
    return sum(r.expert_params for r in layer.experts)


def ep_group(cluster: ClusterSpec, *, ep: int, tp: int, cp: int = 1) -> Group:
    """An expert-parallel group: ``ep`` consecutive dp indices, ``cp·tp`` ranks apart."""
    return strided_group(cluster, ep, tp * cp)


def expert_replica_group(cluster: ClusterSpec, *, dp: int, ep: int, tp: int, cp: int = 1) -> Group:
    """The ``dp/ep`` ranks holding the same experts (one per ep group): ``ep·cp·tp`` ranks apart."""
    return strided_group(cluster, dp // ep, ep * cp * tp)


def all_to_all_bytes(layer: Layer, *, tokens: float, dtype: str) -> list[float]:
    """Each MoE module's dispatch buffer on one rank, ``T · k · cf · h · elt`` bytes (module docstring)."""
    elt = DTYPE_BYTES.get(dtype, 2)
    return [tokens * r.top_k * r.capacity_factor * r.hidden * elt for r in layer.experts]


def layer_all_to_all_s(layer: Layer, *, tokens: float, dtype: str, group: Group,
                       c: CostConstants) -> tuple[float, float]:
    """Forward and backward all-to-all seconds of one layer and micro-batch: dispatch + combine each way."""
    one = sum(2 * all_to_all_s(nbytes, group, c) for nbytes in all_to_all_bytes(layer, tokens=tokens, dtype=dtype))
    return one, one


def routed_tokens(seq_len: int | None, *, micro_batch: int, tp: int, sequence_parallel: bool, cp: int) -> float:
    """Tokens one rank routes per micro-batch (module docstring)."""
    return micro_batch * (seq_len or 1) / cp / (tp if sequence_parallel else 1)


def expert_parallel_row(arr: dict[str, np.ndarray], i: int, layer: Layer, *, graph: CostGraph, cluster: ClusterSpec,
                        micro_batch: int, tp: int, sequence_parallel: bool, recompute: str, ep: int, cp: int,
                        dtype: str, c: CostConstants, group: Group | None = None,
                        seen: dict[object, tuple[float, float]] | None = None) -> None:
    """Layer ``i``'s row of a layer table under ``ep > 1``: experts split, the all-to-alls added.

    ``arr`` holds :func:`planner.cost.layer_table.layer_table`'s arrays; this adds ``ep_p`` (expert
    parameters per rank) and ``a2a`` (forward + backward all-to-all seconds) beside them. ``group`` (the ep
    group) and ``seen`` (all-to-all seconds by layer signature) let a caller pricing every layer build
    each once: planning time.
    """
    n = graph.num_layers
    for key in ("ep_p", "a2a"):
        arr.setdefault(key, np.zeros(n))
    if not layer.experts:
        return
    key = (layer.signature, layer.experts)  # the routing itself too: what the buffers are made of
    hit = seen.get(key) if seen is not None else None
    if hit is None:
        tokens = routed_tokens(graph.seq_len, micro_batch=micro_batch, tp=tp, sequence_parallel=sequence_parallel,
                               cp=cp)
        hit = layer_all_to_all_s(layer, tokens=tokens, dtype=dtype, c=c,
                                 group=group if group is not None else ep_group(cluster, ep=ep, tp=tp, cp=cp))
        if seen is not None:
            seen[key] = hit
    fwd, bwd = hit
    arr["tcf"][i] += fwd
    arr["tc"][i] += fwd + bwd
    if recompute in REPLAYS_FORWARD:  # the recomputed forward dispatches and combines again
        arr["r"][i] += fwd
    arr["a2a"][i] = fwd + bwd
    experts = expert_params(layer)
    arr["ep_p"][i] = experts / ep
    arr["p"][i] = layer.param_count - experts + experts / ep


def add_expert_rows(arr: dict[str, np.ndarray], graph: CostGraph, cluster: ClusterSpec, *, micro_batch: int, tp: int,
                    sequence_parallel: bool, recompute: str, knobs: object, dtype: str, c: CostConstants) -> None:
    """:func:`expert_parallel_row` of every MoE layer when ``knobs.ep > 1`` (nothing otherwise), each layer
    with the recomputation it gets (:func:`planner.cost.sharding.layer_recompute`)."""
    ep, cp, every = knobs.ep, knobs.cp, knobs.recompute_every  # type: ignore[attr-defined]
    if ep == 1:
        return
    group, seen = ep_group(cluster, ep=ep, tp=tp, cp=cp), {}  # type: ignore[var-annotated]
    for i, layer in enumerate(graph.layers):
        expert_parallel_row(arr, i, layer, graph=graph, cluster=cluster, micro_batch=micro_batch, tp=tp,
                            sequence_parallel=sequence_parallel, recompute=layer_recompute(recompute, i, every),
                            ep=ep, cp=cp, dtype=dtype, c=c, group=group, seen=seen)


def dp_grad_all_reduce_s(table: object, chunks: list[tuple[int, int]], grads: float, dp_group: Group, *,
                         dp: int, ep: int, tp: int, cp: int, cluster: ClusterSpec, c: CostConstants) -> float:
    """Seconds of a device's data-parallel gradient all-reduce (ZeRO-0) of ``grads`` bytes on ``dp_group``.

    Without expert parallelism (or experts) that is one all-reduce over ``dp``, as before. With it,
    the device's expert gradients (``table.expert_params``, already ``/ep``) go over their ``dp/ep``
    replicas and the rest over ``dp``, one after the other.
    """
    per_layer = getattr(table, "expert_params", None)
    if ep == 1 or per_layer is None:
        return all_reduce_s(grads, dp_group, c)
    experts = sum(float(per_layer[a:b].sum()) for a, b in chunks)
    expert_grads = c.state_bytes(table.dtype)[1] * experts / tp  # type: ignore[attr-defined]
    replicas = expert_replica_group(cluster, dp=dp, ep=ep, tp=tp, cp=cp)
    return all_reduce_s(grads - expert_grads, dp_group, c) + all_reduce_s(expert_grads, replicas, c)


def expert_all_to_all_s(table: object, chunks: list[tuple[int, int]], num_micro_batches: int) -> float:
    """All-to-all seconds of one step on the device holding ``chunks`` (0.0 without expert parallelism)."""
    per_layer = getattr(table, "all_to_all_s", None)
    if per_layer is None:
        return 0.0
    return num_micro_batches * sum(float(per_layer[a:b].sum()) for a, b in chunks)


def expert_shard_size(cfg: ParallelConfig) -> int:
    """Ranks one expert shard spans under ZeRO: the shard group's ranks holding the same experts."""
    return shard_size(cfg) // cfg.ep


def expert_shard_groups(cluster: ClusterSpec, cfg: ParallelConfig, groups: ShardGroups) -> ShardGroups:
    """The experts' ZeRO groups beside ``groups`` (the rest's): ``n/ep`` ranks ``ep·cp·tp`` apart, the same
    HSDP replicas."""
    n = expert_shard_size(cfg)
    return ShardGroups(strided_group(cluster, n, cfg.ep * cfg.cp * cfg.tp), groups.replicate, n, groups.replicas)


def zero_expert_params(table: object, chunks: list[tuple[int, int]], cfg: ParallelConfig) -> float:
    """Expert parameters per tp rank of the device holding ``chunks`` that ZeRO shards over the smaller
    group (0.0 without ZeRO, ep or experts)."""
    if cfg.zero_stage == 0 or cfg.ep == 1 or getattr(table, "expert_params", None) is None:
        return 0.0
    return device_expert_params(table, chunks) / cfg.tp


def device_expert_params(table: object, chunks: list[tuple[int, int]]) -> float:
    """``Σ table.expert_params[a:b]`` over ``chunks`` (each run's numpy sum, memoised on the table: the
    search prices the same runs for many configurations)."""
    memo = table._totals.setdefault("expert_runs", {})  # type: ignore[attr-defined]
    total = 0.0
    for a, b in chunks:
        run = memo.get((a, b))
        if run is None:
            run = memo[(a, b)] = float(table.expert_params[a:b].sum())  # type: ignore[attr-defined]
        total += run
    return total


def expert_state_extra(table: object, cfg: ParallelConfig, c: CostConstants) -> tuple[float, float, float, float] | None:
    """What one expert parameter adds on one rank over any other under ZeRO with ep: weight, gradient,
    optimizer and optimizer-temporary bytes (expert shard ``n/ep`` in place of ``n``); None when there is
    no such split (the memory formulas are then those of before, to the bit)."""
    if cfg.zero_stage == 0 or cfg.ep == 1 or getattr(table, "expert_params", None) is None:
        return None
    return _state_extra(c.state_bytes(table.dtype), c.optimizer_temp_bytes_per_param, cfg)  # type: ignore[attr-defined]


@functools.lru_cache(maxsize=4096)
def _state_extra(wgo: tuple[float, float, float], opt_temp: float,
                 cfg: ParallelConfig) -> tuple[float, float, float, float]:
    """:func:`expert_state_extra`'s arithmetic, once per (bytes, configuration): planning time."""
    w, g, o = wgo
    n, n_e = shard_size(cfg), expert_shard_size(cfg)
    rest = state_bytes_per_param(w, g, o, cfg)
    mine = state_bytes_per_param(w, g, o, cfg, n_e)
    temp = opt_temp / cfg.tp
    return mine[0] - rest[0], mine[1] - rest[1], mine[2] - rest[2], temp / n_e - temp / n


def expert_shard_extra(table: object, chunks: list[tuple[int, int]], cfg: ParallelConfig, shard: int) -> float:
    """What the experts add to ``params / shard`` (per-tp-rank parameters over a ZeRO shard of ``shard``
    ranks) when their shard is ``shard/ep``: the optimizer step's and gradient accumulation's work."""
    experts = zero_expert_params(table, chunks, cfg)
    if not experts or shard == 1:
        return 0.0
    return experts / (shard // cfg.ep) - experts / shard


def zero_step_s(table: object, chunks: list[tuple[int, int]], grads: float, weights: float, groups: ShardGroups,
                cfg: ParallelConfig, cluster: ClusterSpec, c: CostConstants) -> tuple[float, float]:
    """ZeRO-1/2's reduce-scatter and all-gather seconds of one device (``grads``/``weights`` bytes per tp
    rank): over the shard group, the experts' part over theirs (module docstring)."""
    experts = zero_expert_params(table, chunks, cfg)
    if not experts:
        return reduce_scatter_s(grads, groups.shard, c), all_gather_s(weights, groups.shard, c)
    w_b, g_b, _ = c.state_bytes(table.dtype)  # type: ignore[attr-defined]
    mine = expert_shard_groups(cluster, cfg, groups).shard
    return (reduce_scatter_s(grads - g_b * experts, groups.shard, c) + reduce_scatter_s(g_b * experts, mine, c),
            all_gather_s(weights - w_b * experts, groups.shard, c) + all_gather_s(w_b * experts, mine, c))


def zero3_expert_micro_batch_s(table: object, chunks: list[tuple[int, int]], weights: float, grads: float,
                               groups: ShardGroups, cfg: ParallelConfig, cluster: ClusterSpec,
                               c: CostConstants, *, gathers: int | None = None, reduce: bool = True) -> float:
    """ZeRO-3's communication of one micro-batch (:func:`planner.cost.sharding.zero3_micro_batch_s`, with
    its ``gathers`` and ``reduce``), the experts' gathers and reduce-scatter over their own group."""
    experts = zero_expert_params(table, chunks, cfg)
    parts = {"gathers": gathers, "reduce": reduce}
    if not experts:
        return zero3_micro_batch_s(weights, grads, groups, cfg, c, **parts)
    _, g_b, _ = c.state_bytes(table.dtype)  # type: ignore[attr-defined]
    w_b = c.gathered_weight_bytes(table.dtype)  # type: ignore[attr-defined]
    return (zero3_micro_batch_s(weights - w_b * experts, grads - g_b * experts, groups, cfg, c, **parts)
            + zero3_micro_batch_s(w_b * experts, g_b * experts, expert_shard_groups(cluster, cfg, groups), cfg, c,
                                  **parts))


def zero3_step_s(table: object, chunks: list[tuple[int, int]], gathered: float, grads: float, groups: ShardGroups,
                 cfg: ParallelConfig, cluster: ClusterSpec, c: CostConstants, compute_s: float) -> float:
    """One device's exposed ZeRO-3 communication per step (cost/sharding.py), ``compute_s`` being its compute
    per micro-batch: each micro-batch's, prefetch hiding what that compute covers; under a pipeline, the
    step's gathers so hidden and its one reduce-scatter after the last backward, exposed."""
    if not keeps_unsharded_grads(cfg):
        per_mb = zero3_expert_micro_batch_s(table, chunks, gathered, grads, groups, cfg, cluster, c)
        return cfg.num_micro_batches * overlapped_comm_s(per_mb, compute_s, c)
    gather = zero3_expert_micro_batch_s(table, chunks, gathered, grads, groups, cfg, cluster, c, gathers=1, reduce=False)
    reduce = zero3_expert_micro_batch_s(table, chunks, gathered, grads, groups, cfg, cluster, c, gathers=0)
    return gathers_per_step(cfg) * overlapped_comm_s(gather, compute_s, c) + reduce


def check_ep(ep: int, zero_stage: int, graph: CostGraph, shard_group: int | None = None) -> SpecError | None:
    """Why ``ep`` cannot be priced on ``graph`` (naming the field and the fix), or None. ``shard_group``:
    the ZeRO shard group's dp ranks (:attr:`planner.plan.ParallelConfig.shard_group`), which ZeRO needs ep to
    divide."""
    if ep == 1:
        return None
    counts = moe_expert_counts(graph)
    if not counts:
        return SpecError("ep", ep, f"{graph.name} has no mixture-of-experts layer to split; use ep 1")
    if any(n % ep for n in counts):
        fits = [e for e in range(1, max(counts) + 1) if all(n % e == 0 for n in counts)]
        return SpecError("ep", ep, f"each rank of an expert-parallel group holds an equal share of every MoE layer's "
                         f"experts ({'/'.join(map(str, counts))}): ep must divide that count; use one of {fits} "
                         "(that also divides dp)")
    if zero_stage and shard_group is not None and shard_group % ep:
        return SpecError("ep", ep, f"ZeRO stage {zero_stage} shards the expert states over the ranks of the shard "
                         f"group ({shard_group} dp ranks) holding the same experts: ep must divide it; use an ep "
                         "dividing dp_shard, a dp_shard that ep divides, or zero_stage 0")
    return None
