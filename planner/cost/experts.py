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

ZeRO with ``ep > 1`` is not priced (the expert states would shard over ``dp/ep`` ranks, the rest
over ``dp``): :func:`planner.resolve.check_config` refuses it and the search does not try it.
"""

from __future__ import annotations

import numpy as np

from planner.cluster import ClusterSpec
from planner.cost.comm import Group, all_reduce_s, all_to_all_s, strided_group
from planner.cost.constants import DTYPE_BYTES, CostConstants
from planner.cost.sharding import layer_recompute
from planner.errors import SpecError
from planner.trace.graph import CostGraph, Layer

__all__ = ["add_expert_rows", "all_to_all_bytes", "check_ep", "dp_grad_all_reduce_s", "ep_group", "expert_all_to_all_s",
           "expert_params", "expert_parallel_row", "expert_replica_group", "has_experts", "layer_all_to_all_s",
           "moe_expert_counts"]


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
                        dtype: str, c: CostConstants) -> None:
    """Layer ``i``'s row of a layer table under ``ep > 1``: experts split, the all-to-alls added.

    ``arr`` holds :func:`planner.cost.layer_table.layer_table`'s arrays; this adds ``ep_p`` (expert
    parameters per rank) and ``a2a`` (forward + backward all-to-all seconds) beside them.
    """
    n = graph.num_layers
    for key in ("ep_p", "a2a"):
        arr.setdefault(key, np.zeros(n))
    if not layer.experts:
        return
    tokens = routed_tokens(graph.seq_len, micro_batch=micro_batch, tp=tp, sequence_parallel=sequence_parallel, cp=cp)
    fwd, bwd = layer_all_to_all_s(layer, tokens=tokens, dtype=dtype, group=ep_group(cluster, ep=ep, tp=tp, cp=cp), c=c)
    arr["tcf"][i] += fwd
    arr["tc"][i] += fwd + bwd
    if recompute == "full":  # the recomputed forward dispatches and combines again
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
    for i, layer in enumerate(graph.layers):
        expert_parallel_row(arr, i, layer, graph=graph, cluster=cluster, micro_batch=micro_batch, tp=tp,
                            sequence_parallel=sequence_parallel, recompute=layer_recompute(recompute, i, every),
                            ep=ep, cp=cp, dtype=dtype, c=c)


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


def check_ep(ep: int, zero_stage: int, graph: CostGraph) -> SpecError | None:
    """Why ``ep`` cannot be priced on ``graph`` (naming the field and the fix), or None."""
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
    if zero_stage:
        return SpecError("ep", ep, f"ZeRO stage {zero_stage} with expert parallelism is not priced (expert states "
                         "would shard over dp/ep ranks); use zero_stage 0 with ep, or ep 1")
    return None
