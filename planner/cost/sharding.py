"""Where ZeRO's shards live and what they cost: HSDP, reshard after forward, and recompute every k-th layer.

The data-parallel ranks of one pipeline position are ``dp x cp`` (context-parallel ranks hold the same
weights and sum their gradients too): torchtitan's ``dp_shard_cp`` mesh, Megatron's data-parallel group
with context parallelism. ZeRO shards its state over a *shard group* of them::

    shard group   S·cp ranks, S = ParallelConfig.shard_group (dp_shard under HSDP, else dp),
                  stride tp: S consecutive dp indices, every cp index
    replicas      R = dp / S copies of each shard (HSDP), stride tp·cp·S

Communication (per device holding ``P`` parameters split ``tp`` ways, ``w``/``g`` bytes each):

    ZeRO-0        all-reduce(g·P/tp) over the shard group (= all dp·cp ranks)         once per step
    ZeRO-1/2      reduce-scatter(g·P/tp) + all-gather(w·P/tp) over it                  once per step
    ZeRO-3        n_ag · all-gather(w·P/tp) + reduce-scatter(g·P/tp) over the shard    per micro-batch
                  group (n_ag = 2, or 1 with reshard_after_forward False: FSDP2 keeps
                  the gathered weights from forward to backward)
                  + all-reduce(g·P/(tp·S·cp)) over the R replicas (HSDP, FSDP2's        per micro-batch
                  reduce-scatter then all-reduce while gradient sync stays on)
    ZeRO-3 under  N_ag · all-gather(w·P/tp), overlapped with the micro-batches' compute  per step
    a pipeline    + reduce-scatter(g·P/tp) (+ HSDP's all-reduce) after the last backward, exposed
                  (N_ag = 1 without reshard after forward, m + 1 with it)

ZeRO-3 under a pipeline is FSDP2 as torch.distributed.pipelining drives it (torchtitan, this runtime):
the stage turns off resharding after backward and gradient sync for every backward
(``set_reshard_after_backward(False)``, ``set_requires_gradient_sync(False)`` in
``torch/distributed/pipelining/stage.py``) and reduce-scatters once, after the step's last backward. The
gathered weights therefore stay from one micro-batch to the next (one gather per step; with reshard after
forward, one more per backward that follows a forward: ``m + 1``), and the gradients accumulate unsharded
(:func:`keeps_unsharded_grads`).

Memory per parameter (after ``/tp``): weights ``w/(S·cp)`` under ZeRO-3 (``+ w``: the gathered copy of
the whole device's weights, reshard_after_forward False or under a pipeline), gradients ``g/(S·cp)`` under
ZeRO ≥ 2 (``g`` under a pipeline, accumulated unsharded),
optimizer state ``o/(S·cp)`` under ZeRO ≥ 1. ZeRO-3's temporaries per parameter of the largest layer:
``2w + g`` (the gathered layer, the prefetched next one, its whole gradient), or ``g`` alone when the
gathered weights are already counted. With the defaults (``dp_shard`` None, ``cp = 1``, reshard after
forward) every figure is the ``dp``-way formula of before, to the bit.

Recompute every k-th layer (``recompute_every = k`` with full recomputation): layer ``i`` (0-based,
over the model's whole layer list, as the runtime's stages index it) is checkpointed when
``(i + 1) % k == 0``, torchtitan's ``selective_ac_option = k`` counter (every k-th block, starting with
the k-th); the others store what autograd saves. :func:`recomputes_layer` is the one rule the cost
model and the runtime share.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.cluster import ClusterSpec
from planner.cost.comm import (
    Group,
    all_gather_s,
    all_reduce_s,
    reduce_scatter_s,
    strided_group,
)
from planner.cost.constants import CostConstants
from planner.plan import ParallelConfig

__all__ = ["ShardGroups", "gathers_per_micro_batch", "gathers_per_step", "keeps_gathered_weights",
           "keeps_unsharded_grads", "layer_recompute", "optimizer_shard", "recomputes_layer", "shard_groups",
           "shard_size", "state_bytes_per_param", "zero3_micro_batch_s", "zero3_temp_bytes_per_param"]


def recomputes_layer(index: int, every: int) -> bool:
    """Whether full recomputation checkpoints layer ``index`` (0-based) when one layer in ``every`` is."""
    return (index + 1) % every == 0


def shard_size(cfg: ParallelConfig) -> int:
    """Ranks one ZeRO shard spans: ``shard_group · cp`` (all ``dp · cp`` data-parallel ranks but under HSDP)."""
    return cfg.shard_group * cfg.cp


def gathers_per_micro_batch(cfg: ParallelConfig) -> int:
    """ZeRO-3 all-gathers of the weights per micro-batch without a pipeline: forward and backward, or
    forward only when FSDP2 keeps them gathered until the backward (``reshard_after_forward`` False)."""
    return 2 if cfg.reshard_after_forward else 1


def keeps_unsharded_grads(cfg: ParallelConfig) -> bool:
    """Whether ZeRO-3 runs under a pipeline, where torch's pipelining keeps the gathered weights and
    the unsharded gradients from one micro-batch to the next and reduce-scatters once per step (module
    docstring)."""
    return cfg.zero_stage >= 3 and cfg.pp > 1 and shard_size(cfg) > 1


def keeps_gathered_weights(cfg: ParallelConfig) -> bool:
    """Whether a device holds the gathered copy of all its ZeRO-3 weights at its peak: without reshard
    after forward, or under a pipeline (:func:`keeps_unsharded_grads`)."""
    return cfg.zero_stage >= 3 and shard_size(cfg) > 1 and (not cfg.reshard_after_forward or cfg.pp > 1)


def gathers_per_step(cfg: ParallelConfig) -> int:
    """ZeRO-3 all-gathers of every weight per step under a pipeline: one, or ``m + 1`` with reshard after
    forward, where every op that follows a forward finds the weights resharded (in 1F1B order: the
    first forward, each further warm-up forward, the first steady forward and every steady backward;
    a forward after a backward and the cool-down's backwards find them still gathered)."""
    return 1 + (cfg.num_micro_batches if cfg.reshard_after_forward else 0)


@dataclass(frozen=True)
class ShardGroups:
    """The groups one position's data-parallel traffic runs over.

    ``shard``: the ZeRO shard group (gathers, reduce-scatters; the all-reduce of ZeRO-0), ``size`` ranks;
    ``replicate``: HSDP's group of the ``replicas`` copies of one shard (None without HSDP)."""

    shard: Group
    replicate: Group | None
    size: int
    replicas: int


def shard_groups(cluster: ClusterSpec, cfg: ParallelConfig, position: int = 0) -> ShardGroups:
    """The shard and replica groups of pipeline position ``position`` (module docstring), priced on the
    position's own ranks (:func:`strided_group` from its first rank): their nodes, and the links of the
    node groups they touch. On a homogeneous cluster every position's groups look alike."""
    size, replicas = shard_size(cfg), cfg.dp // cfg.shard_group
    first = position * cfg.dp * cfg.cp * cfg.tp  # the position's first rank: RankLayout.rank_of(position, 0, 0)
    shard = strided_group(cluster, size, cfg.tp, first)  # S consecutive dp indices x every cp index
    replicate = strided_group(cluster, replicas, cfg.tp * size, first) if replicas > 1 else None
    return ShardGroups(shard, replicate, size, replicas)


def zero3_micro_batch_s(weight_bytes: float, grad_bytes: float, groups: ShardGroups, cfg: ParallelConfig,
                        c: CostConstants, *, gathers: int | None = None, reduce: bool = True) -> float:
    """ZeRO-3 communication of one micro-batch on one device holding ``weight_bytes`` of (unsharded, per tp
    rank) weights and ``grad_bytes`` of their gradients: the gathers and the reduce-scatter over the shard
    group, then (HSDP) the all-reduce of the gradient shard over the replicas. ``gathers`` (default
    :func:`gathers_per_micro_batch`) and ``reduce`` price the parts apart (under a pipeline: per step)."""
    gathers = gathers_per_micro_batch(cfg) if gathers is None else gathers
    s = gathers * all_gather_s(weight_bytes, groups.shard, c)
    if reduce:
        s += reduce_scatter_s(grad_bytes, groups.shard, c)
        if groups.replicate is not None:
            s += all_reduce_s(grad_bytes / groups.size, groups.replicate, c)
    return s


def state_bytes_per_param(w: float, g: float, o: float, cfg: ParallelConfig,
                          n: int | None = None, gathered: float | None = None) -> tuple[float, float, float]:
    """Weight, gradient and optimizer bytes per (unsplit) parameter on one device, after ZeRO and tp, for
    states sharded over ``n`` ranks (default :func:`shard_size`; expert states: cost/experts.py);
    ``gathered``: bytes per parameter of ZeRO-3's gathered weights (FSDP's param dtype; default ``w``)."""
    n = shard_size(cfg) if n is None else n
    weights = w / (n if cfg.zero_stage >= 3 else 1) / cfg.tp
    if keeps_gathered_weights(cfg) and n > 1:
        weights += (w if gathered is None else gathered) / cfg.tp  # gathered from forward to backward
    grad_shards = n if cfg.zero_stage >= 2 and not keeps_unsharded_grads(cfg) else 1
    return weights, g / grad_shards / cfg.tp, o / (n if cfg.zero_stage >= 1 else 1) / cfg.tp


def optimizer_shard(cfg: ParallelConfig) -> int:
    """Ranks the optimizer state (and its step's work) is split over."""
    return shard_size(cfg) if cfg.zero_stage >= 1 else 1


def zero3_temp_bytes_per_param(w: float, g: float, cfg: ParallelConfig) -> float:
    """ZeRO-3 temporaries per parameter of the largest layer (after tp): two gathered copies and one
    gradient, or only the gradient when the gathered weights stay (already in the weights)."""
    if cfg.zero_stage < 3 or shard_size(cfg) <= 1:
        return 0.0
    return (g if keeps_gathered_weights(cfg) else 2 * w + g) / cfg.tp


# The recompute modes that run a layer's forward again in backward (its collectives and all-to-alls too):
# whole layers, or per op the ops not kept (planner.trace.saved_ops).
REPLAYS_FORWARD = ("full", "op")


def layer_recompute(recompute: str, index: int, every: int) -> str:
    """The recomputation layer ``index`` gets: ``recompute``, except that under ``full`` with one layer in
    ``every`` checkpointed (:func:`recomputes_layer`) the others store everything (``"none"``)."""
    return "none" if recompute == "full" and not recomputes_layer(index, every) else recompute
