"""What configurations exist: the knobs a search may turn, and the values each may take here.

:class:`SearchSpace` says which values each knob may take; :func:`candidate_degrees` yields the
``(tp, pp, dp)`` that fit the cluster, the model and the global batch; :func:`schedules_for` and
:func:`virtuals_for` the pipeline schedules and chunk counts a ``pp``-way pipeline may run. The
search (:mod:`planner.search`) walks them best-first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from planner import schedules
from planner.cluster import ClusterSpec
from planner.cost.context_parallel import check_cp
from planner.cost.experts import check_ep, moe_expert_counts
from planner.cost.fp8 import check_fp8, has_fp8
from planner.errors import SpecError
from planner.inter_op.framework_splits import PARTITIONS
from planner.plan import RECOMPUTE, ParallelConfig
from planner.trace.graph import CostGraph

# Synchronous schedules the runtime executes; the asynchronous ones (and Chimera) change the training
# semantics or need a runtime we do not have, so the search uses them only when asked (--schedules).
SYNC_DEFAULT = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-h2", "zb-v", "dualpipe-v")


@dataclass(frozen=True, kw_only=True)
class SearchSpace:
    """Which values each knob may take; ``None`` means "let the search choose"."""

    tp: tuple[int, ...] | None = None
    pp: tuple[int, ...] | None = None
    dp: tuple[int, ...] | None = None
    micro_batch_size: tuple[int, ...] | None = None
    schedules: tuple[str, ...] | None = None
    virtual_stages: tuple[int, ...] | None = None
    recompute: tuple[str, ...] = RECOMPUTE
    sequence_parallel: tuple[bool, ...] = (False, True)
    zero_stage: tuple[int, ...] = (0, 1, 2, 3)
    overlap_grad_reduce: bool = False
    max_micro_batch_size: int = 16
    partition: str = "balanced"  # planner.inter_op.framework_splits.PARTITIONS: "balanced" is the exact DP
    # Schema 2.1 knobs (None: the option functions below decide what is worth trying here).
    cp: tuple[int, ...] | None = None
    ep: tuple[int, ...] | None = None
    dp_shard: tuple[int | None, ...] | None = None  # HSDP shard group sizes; None in the tuple: all dp
    reshard_after_forward: tuple[bool, ...] | None = None  # None: True, and False for ZeRO-3 (reshard_options)
    fp8: tuple[bool, ...] | None = None
    recompute_every: tuple[int, ...] | None = None
    # Tensor parallelism wider than a node, up to this many whole nodes (1: inside a node only). Its
    # collectives cross the network in every layer, which the cost model prices; usually a bad choice.
    tp_max_nodes: int = 2
    # Only the combinations this project's runtime runs (set for presets by planner.resolve.runnable_space):
    # the search skips what unrunnable_combination refuses.
    runtime_combinations: bool = False

    def __post_init__(self) -> None:
        if self.partition not in PARTITIONS:
            raise SpecError("partition", self.partition, f"use one of {', '.join(PARTITIONS)} (balanced: the exact "
                            "memory-aware split improved on the simulated step; exact: that split alone; uniform: "
                            "equal layers; megatron, nanotron: that framework's own)")
        for name in ("tp", "pp", "dp", "micro_batch_size", "virtual_stages", "cp", "ep", "recompute_every"):
            _check_choices(name, getattr(self, name), lambda x: _positive_int(x), "positive integers")
        _check_choices("dp_shard", self.dp_shard, lambda x: x is None or _positive_int(x), "positive integers or None")
        _check_choices("zero_stage", self.zero_stage, lambda x: x in (0, 1, 2, 3), "ZeRO stages 0-3")
        _check_choices("recompute", self.recompute, lambda x: x in RECOMPUTE, f"names from {list(RECOMPUTE)}")
        _check_choices("schedules", self.schedules, lambda x: x in schedules.SCHEDULE_NAMES,
                       f"names from {list(schedules.SCHEDULE_NAMES)}")
        for name in ("sequence_parallel", "reshard_after_forward", "fp8"):
            _check_choices(name, getattr(self, name), lambda x: isinstance(x, bool), "True/False")
        for name in ("max_micro_batch_size", "tp_max_nodes"):
            if not _positive_int(getattr(self, name)):
                raise SpecError(name, getattr(self, name), "expected a positive integer")


def _positive_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


_REQUIRED = ("recompute", "zero_stage", "sequence_parallel")  # SearchSpace fields that cannot be None


def _check_choices(name: str, values: object, ok: Callable[[object], bool], what: str) -> None:
    """A SearchSpace field is None (the search chooses) or a non-empty tuple of allowed values."""
    optional = name not in _REQUIRED
    if values is None and optional:
        return
    if not isinstance(values, (tuple, list)) or not values:
        raise SpecError(name, values, f"expected a non-empty tuple of {what}, e.g. {name}=(...,)"
                        + (", or None" if optional else ""))
    bad = [v for v in values if not ok(v)]
    if bad:
        raise SpecError(name, bad[0] if len(bad) == 1 else bad, f"expected {what}")


def unrunnable_combination(cfg: ParallelConfig) -> str | None:
    """Why this project's runtime cannot run ``cfg``'s combination of knobs, the fix included, or None.

    The search skips such configurations when ``SearchSpace.runtime_combinations`` is set (plans of
    presets, which the runtime runs); the runtime refuses them with the same words
    (``runtime/expert_parallel.py``). Each knob's own limits are checked where it is priced."""
    if cfg.ep > 1 and cfg.zero_stage >= 3:
        return (f"zero_stage {cfg.zero_stage} (FSDP2) with expert parallelism is not supported (ZeRO-1/2 are); "
                "re-plan with --zero 1 or --zero 2, or --ep 1")
    if cfg.ep > 1 and (cfg.cp > 1 or cfg.sequence_parallel):
        return "expert parallelism with context or sequence parallelism is not supported; re-plan with --ep 1"
    return None


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _pow2_upto(n: int) -> list[int]:
    out, x = [], 1
    while x <= n:
        out.append(x)
        x *= 2
    return out


def candidate_degrees(graph: CostGraph, cluster: ClusterSpec, global_batch: int,
                      space: SearchSpace, *, devices: int | None = None) -> Iterable[tuple[int, int, int]]:
    """(tp, pp, dp) with tp·pp·dp = devices (default: the cluster's), tp a power of 2 within a node or
    over up to :func:`tp_nodes` whole nodes, pp ≤ layers, dp | global batch."""
    n = devices or cluster.num_devices
    dpn = cluster.min_devices_per_node
    tps = space.tp or tuple(t for t in _pow2_upto(dpn * tp_nodes(cluster, space)) if n % t == 0)
    for tp in tps:
        if n % tp:
            continue
        pps = space.pp or tuple(divisors(n // tp))
        for pp in pps:
            if (n // tp) % pp or pp > graph.num_layers:
                continue
            dp = n // (tp * pp)
            if space.dp and dp not in space.dp:
                continue
            if global_batch % dp:
                continue
            yield tp, pp, dp


def tp_nodes(cluster: ClusterSpec, space: SearchSpace) -> int:
    """How many whole nodes a searched tp group may span: ``space.tp_max_nodes`` on one device type
    (whose nodes are whole powers of 2), 1 on a mixed cluster (a tp group there could straddle two
    device types, which is not priced)."""
    dpn = cluster.min_devices_per_node
    if not cluster.is_homogeneous or dpn & (dpn - 1):
        return 1
    return max(1, space.tp_max_nodes)


def candidate_meshes(graph: CostGraph, cluster: ClusterSpec, global_batch: int,
                     space: SearchSpace) -> Iterable[tuple[int, int, int, int]]:
    """(tp, cp, pp, dp) with tp·cp·pp·dp = devices: :func:`candidate_degrees` on the devices left to
    each context-parallel degree of :func:`cp_options`."""
    n = cluster.num_devices
    for cp in cp_options(graph, cluster, space):
        if n % cp:
            continue
        for tp, pp, dp in candidate_degrees(graph, cluster, global_batch, space, devices=n // cp):
            yield tp, cp, pp, dp


CP_MIN_SEQ_LEN = 16384  # below this, tp and pp cover activation memory more cheaply than cp's K/V gathers
CP_MAX = 32


def cp_options(graph: CostGraph, cluster: ClusterSpec, space: SearchSpace) -> tuple[int, ...]:
    """Context-parallel degrees worth trying: ``space.cp``, else 1, and for sequences of at least
    ``CP_MIN_SEQ_LEN`` tokens the powers of 2 up to ``CP_MAX`` that divide the device count and cut
    every sequence into 2·cp equal chunks (:func:`planner.cost.context_parallel.check_cp`)."""
    seq = graph.seq_len or 0
    if space.cp:
        errors = [e for e in (check_cp(cp, seq) for cp in space.cp) if e is not None]
        if len(errors) == len(space.cp):
            raise errors[0]
        return tuple(cp for cp in space.cp if check_cp(cp, seq) is None)
    if seq < CP_MIN_SEQ_LEN:
        return (1,)
    return tuple(cp for cp in _pow2_upto(CP_MAX) if cluster.num_devices % cp == 0 and check_cp(cp, seq) is None)


EP_MAX_OPTIONS = 4  # expert-parallel degrees above 1 tried per (dp, ...) family: planning time


def ep_options(graph: CostGraph, dp: int, space: SearchSpace) -> tuple[int, ...]:
    """Expert-parallel degrees for ``dp`` data-parallel ranks: ``space.ep`` (those dividing dp), else 1,
    and for a model with experts the powers of 2 dividing both dp and every MoE layer's expert count
    (:mod:`planner.cost.experts`): all of them when there are at most ``EP_MAX_OPTIONS``, else that many
    from the largest down, each a factor of 4 below the last (the expert state shrinks as 1/ep, so a
    degree between two tried ones rarely wins, and planning time grows with every degree tried)."""
    if space.ep:
        errors = [e for e in (check_ep(ep, 0, graph) for ep in space.ep) if e is not None]
        if len(errors) == len(space.ep):  # none of them can split this model's experts: say why
            raise errors[0]
        return tuple(e for e in space.ep if dp % e == 0 and check_ep(e, 0, graph) is None)
    counts = moe_expert_counts(graph)
    if not counts:
        return (1,)
    degrees = [e for e in _pow2_upto(dp) if e > 1 and dp % e == 0 and all(n % e == 0 for n in counts)]
    if len(degrees) > EP_MAX_OPTIONS:
        degrees = sorted(degrees[::-1][::2][:EP_MAX_OPTIONS])
    return (1, *degrees)


def fp8_options(cluster: ClusterSpec, space: SearchSpace) -> tuple[bool, ...]:
    """FP8 GEMMs or not: ``space.fp8``, else both where every device has an FP8 peak (H100 and later),
    off elsewhere. Asking for FP8 alone on a device without it is an error naming ``fp8``."""
    supported = all(has_fp8(g.device) for g in cluster.groups)
    if space.fp8:
        if supported:
            return space.fp8
        if False not in space.fp8:
            check_fp8(cluster)  # raises: names the device and the fix
        return (False,)
    return (False, True) if supported else (False,)


RECOMPUTE_EVERY = (1, 2, 4)  # full recomputation of every layer, every second, every fourth


def recompute_every_options(recompute: str, space: SearchSpace) -> tuple[int, ...]:
    """How many layers share one checkpointed layer under full recomputation: ``space.recompute_every``,
    else :data:`RECOMPUTE_EVERY` (1 elsewhere)."""
    if recompute != "full":
        return (1,)
    return space.recompute_every or RECOMPUTE_EVERY


HSDP_GROWTH = (1, 4, 16)  # shard groups of one node's dp ranks, four nodes', sixteen nodes'


def shard_options(dp: int, zero_stage: int, cluster: ClusterSpec, space: SearchSpace, *,
                  dp_stride: int = 1) -> tuple[int | None, ...]:
    """HSDP shard group sizes for ZeRO-3 over ``dp`` replicas whose ranks are ``dp_stride`` apart (tp·cp):
    ``space.dp_shard`` (those dividing dp), else ``None`` (one shard group of all dp ranks) and the dp ranks
    of one node times :data:`HSDP_GROWTH`, below dp and dividing it."""
    if zero_stage != 3:
        return (None,)
    if space.dp_shard:
        return tuple(s for s in space.dp_shard if s is None or dp % s == 0)  # none: this dp cannot shard so
    per_node = max(1, cluster.min_devices_per_node // dp_stride)
    return (None, *(s for s in (per_node * k for k in HSDP_GROWTH) if s < dp and dp % s == 0))


def reshard_options(zero_stage: int, space: SearchSpace) -> tuple[bool, ...]:
    """FSDP's reshard after forward: ``space.reshard_after_forward``, else True and (ZeRO-3 only) False,
    which keeps the device's gathered weights from forward to backward (the memory screen drops it
    where they do not fit)."""
    if zero_stage != 3:
        return (True,)
    return space.reshard_after_forward or (True, False)


def schedules_for(pp: int, space: SearchSpace) -> tuple[str, ...]:
    if pp == 1:
        return ("1f1b",)
    return space.schedules or SYNC_DEFAULT


def virtuals_for(schedule: str, pp: int, m: int, layers: int, space: SearchSpace) -> list[int]:
    info = schedules.get_schedule(schedule)
    if space.virtual_stages:
        options = list(space.virtual_stages)
    elif info.chunks_per_device is not None:
        options = [info.chunks_per_device]
    else:
        options = [2, 4] if schedule == "interleaved-1f1b" else [1]
    out = []
    for v in options:
        if pp * v > layers:
            continue
        try:
            info.validate(pp, m, v)
        except ValueError:
            continue
        if schedules.search_skips(schedule, pp, m, v):
            continue  # a count the runtime's schedule refuses: the search proposes only plans it runs
        out.append(v)
    return out


def check_sequence_parallel(graph: CostGraph, allowed: Iterable[bool]) -> None:
    """Sequence parallelism splits activations along the sequence; a model without one (an MLP, a
    CNN: ``seq_len`` is None) cannot use it, so asking for it alone is an error, not an empty search."""
    if not graph.seq_len and False not in tuple(allowed):
        raise SpecError("sequence_parallel", True, f"model {graph.name!r} has no sequence dimension (seq_len is "
                        "None), so there is nothing to split along it; drop --sequence-parallel")
