"""Per-layer figures of one parallel choice: the :class:`LayerTable` every solver prices stages with.

A :class:`LayerTable` holds per-layer arrays (seconds per micro-batch, stored activation bytes,
parameters) for one ``(micro-batch, tp, sequence-parallel, recompute)`` choice, so the stage
solvers can price any contiguous run of layers with prefix sums (:meth:`LayerTable.segment`).

Tensor-parallel communication comes in as *data*: the seconds a solver found for each layer
(``tp_seconds``, the intra-op ILP's optimum, handed down by :class:`planner.pricing.Pricer`), or,
when none are given, Megatron's all-reduce count (:func:`tp_collectives`) priced by
:mod:`planner.cost.comm`. This module never calls a solver.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import NamedTuple

import numpy as np

from planner.cluster import ClusterSpec
from planner.cost.comm import Group, all_gather_s, all_reduce_s, reduce_scatter_s, strided_group
from planner.cost.compute import ATTENTION_KINDS, LINEAR_KINDS, LayerTimes, layer_times, shard_fraction
from planner.cost.constants import DTYPE_BYTES, CostConstants
from planner.cost.context_parallel import add_cp_rows, tokens_per_rank
from planner.cost.experts import add_expert_rows
from planner.cost.memory import _range_max, _stage_params
from planner.cost.sharding import layer_recompute
from planner.trace.graph import CostGraph, Layer
from planner.trace.saved_ops import MATMULS, kept_flags


def tp_collectives(layer: Layer, dtype: str) -> tuple[list[float], list[float]]:
    """Bytes per sample of each forward and each backward all-reduce under Megatron tensor parallelism.

    Linears are column-parallel until a row-parallel one closes the group: one that contracts
    (``k > n``), or a square one after attention (the output projection). A row-parallel linear
    all-reduces its output in forward (``m·n``); a column-parallel group all-reduces its input's
    gradient in backward (``m·k``). A GPT block gives two of each; a vocabulary-parallel head only
    the backward one; a layer with parameters but no GEMM (a vocabulary-parallel embedding) one
    forward all-reduce of its output. With sequence parallelism each all-reduce becomes a
    reduce-scatter plus an all-gather of the same bytes and the same ring time.
    """
    elt = DTYPE_BYTES.get(dtype, 2)
    fwd: list[float] = []
    bwd: list[float] = []
    group_open = after_attention = False
    linears = 0
    for op in layer.op_costs:
        if op.kind in ATTENTION_KINDS:
            after_attention = True
            continue
        if op.kind not in LINEAR_KINDS or not op.m:
            continue
        linears += 1
        row = group_open and (op.k > op.n or (op.k == op.n and after_attention))
        if row:
            fwd.append(float(op.m * op.n * elt))
            group_open = False
        elif not group_open:
            bwd.append(float(op.m * op.k * elt))
            group_open = True
        after_attention = False
    if not linears and layer.param_count > 0 and layer.output_bytes > 0:
        fwd.append(float(layer.output_bytes))
    return fwd, bwd


def megatron_tp_s(layer: Layer, *, dtype: str, micro_batch: int, group: Group, sequence_parallel: bool,
                  c: CostConstants) -> tuple[float, float]:
    """Forward and backward seconds of :func:`tp_collectives` for one micro-batch on ``group``.

    Without sequence parallelism each is an all-reduce (ring or tree, whichever is faster); with it
    Megatron-SP runs a reduce-scatter and an all-gather of the same bytes (ring only), which is
    also how the intra-op ILP prices that recipe, so the two pricings agree on it.
    """
    def one(nbytes: float) -> float:
        if sequence_parallel:
            return reduce_scatter_s(nbytes, group, c) + all_gather_s(nbytes, group, c)
        return all_reduce_s(nbytes, group, c)

    fwd_c, bwd_c = tp_collectives(layer, dtype)
    return (sum(one(x * micro_batch) for x in fwd_c), sum(one(x * micro_batch) for x in bwd_c))


def tp_allreduces(layer: Layer) -> int:
    """All-reduces per forward + backward pass under tensor parallelism (see :func:`tp_collectives`)."""
    fwd, bwd = tp_collectives(layer, "bf16")
    return len(fwd) + len(bwd)


def tp_calls_per_layer(graph: CostGraph, sequence_parallel: bool) -> np.ndarray:
    """Tensor-parallel collectives each layer launches per micro-batch, forward + backward: its
    :func:`tp_allreduces`, each two (a reduce-scatter and an all-gather) under sequence parallelism.
    Counted once per distinct layer (repeated blocks share a signature)."""
    per = 2 if sequence_parallel else 1
    counts: dict[str, int] = {}
    for layer in graph.layers:
        if layer.signature not in counts:
            counts[layer.signature] = tp_allreduces(layer)
    return np.array([per * counts[layer.signature] for layer in graph.layers], dtype=float)


def tp_split_modules(layer: Layer) -> int:
    """Linears a tensor-parallel layer splits (one for a layer with parameters but no GEMM: a split
    embedding), the unit ``CostConstants.tp_layer_overhead_s`` is charged per."""
    linears = sum(1 for op in layer.op_costs if op.kind in LINEAR_KINDS and op.m)
    return linears if linears else int(layer.param_count > 0)


def loss_traffic_s(layer: Layer, *, micro_batch: int, tp: int, dtype: str, cluster: ClusterSpec,
                   c: CostConstants) -> float:
    """Seconds of the training loss (forward + backward) on the last layer's output: memory-bound,
    ``loss_traffic_passes`` passes over it in fp32, split across tp ranks (vocabulary-parallel)."""
    fp32_bytes = layer.output_bytes * micro_batch * 4.0 / DTYPE_BYTES.get(dtype, 2) / tp
    bw = cluster.device.memory_bandwidth_bytes_per_s * c.memory_bandwidth_efficiency
    return c.loss_traffic_passes * fp32_bytes / bw


class Segment(NamedTuple):
    """Sums and maxima over one contiguous run of layers ``[a, b)`` of a :class:`LayerTable`.

    Each field is exactly what ``float(arr[a:b].sum())`` (or ``.max()``) gives, so code that reads
    it instead of slicing prices every configuration to the same bit.
    """

    fwd_s: float
    bwd_input_s: float
    bwd_weight_s: float
    recompute_s: float
    tp_comm_s: float
    tp_comm_fwd_s: float
    stored_act_bytes: float
    work_act_max: float
    output_max: float
    param_max: float
    params: float  # stage_params: own plus tied ones owned outside the run, counted once
    tp_calls: float = 0.0  # tensor-parallel collectives launched (forward + backward), see LayerTable.tp_calls


@dataclass
class LayerTable:
    """Per-layer, per-micro-batch figures for one (micro-batch, tp, sp, recompute) choice.

    The arrays are never modified after construction (every builder fills them once), which is
    what lets :meth:`segment` memoise per-segment sums: the search prices the same segments for
    many configurations that share a table.
    """

    fwd_s: np.ndarray
    bwd_input_s: np.ndarray
    bwd_weight_s: np.ndarray
    recompute_s: np.ndarray
    tp_comm_s: np.ndarray  # forward + backward
    stored_act_bytes: np.ndarray  # held per in-flight micro-batch
    work_act_bytes: np.ndarray  # extra working set while one layer is recomputed
    params: np.ndarray  # own parameters (not divided by tp)
    output_bytes: np.ndarray  # per micro-batch, per device
    tied: list[list[tuple[str, int, int]]]
    _matrices: dict[str, np.ndarray] | None = None
    tp_comm_fwd_s: np.ndarray | None = None  # the forward part of tp_comm_s (None: half of it)
    dtype: str = "bf16"
    # How tp_comm_s was priced: "ilp" (the intra-op ILP's optimum), "megatron" (the all-reduce
    # count of tp_collectives), "none" (left out: a lower bound for the search) or "" (tp = 1).
    tp_source: str = ""
    tp_note: str = ""  # one line for the plan: what priced it, or why the ILP could not
    # Context parallelism's K/V all-gather + dK/dV reduce-scatter per layer (fwd + bwd), a part of
    # tp_comm_s (the layer's exposed collectives); None when cp = 1 (planner.cost.context_parallel).
    cp_comm_s: np.ndarray | None = None
    # Expert parallelism (planner.cost.experts; None when ep = 1): each layer's expert parameters on one
    # rank (already /ep, a part of params) and its dispatch/combine all-to-all seconds (a part of tp_comm_s).
    expert_params: np.ndarray | None = None
    all_to_all_s: np.ndarray | None = None
    # Tensor-parallel collectives each layer launches per micro-batch, forward + backward (an all-reduce,
    # or a reduce-scatter and an all-gather under sequence parallelism, per tp_collectives entry); None
    # when tp = 1. What CostConstants.pipelined_tp_collective_s is charged per (planner.cost.model).
    tp_calls: np.ndarray | None = None
    # Frozen parameters (requires_grad=False; Layer.frozen_count): each layer's share of ``params`` that
    # trains (None: all of it) and the tied parameters that are frozen. See :meth:`trained`.
    trainable_share: np.ndarray | None = None
    frozen_tied: frozenset[str] = frozenset()
    trained_tensors: np.ndarray | None = None  # each layer's own parameter tensors that train (Layer.trained_tensors)
    # Memoised derived figures (see segment, total_s, total_summary_s); not part of the table's value.
    _segments: dict[tuple[int, int], Segment] = field(default_factory=dict, init=False, repr=False, compare=False)
    _totals: dict[str, object] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def trained(self) -> LayerTable:
        """This table counting only the parameters that train: what gradients, optimizer state, the optimizer
        step and the data-parallel reduction scale with (held weights and ZeRO-3's gathers count them all).
        The table itself when every parameter trains, so a model without frozen ones prices exactly as before."""
        if self.trainable_share is None and not self.frozen_tied:
            return self
        view = self._totals.get("trained")
        if view is None:
            share = self.trainable_share if self.trainable_share is not None else 1.0
            tied = [[(name, 0 if name in self.frozen_tied else numel, owner) for name, numel, owner in entries]
                    for entries in self.tied]
            fields_ = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
            view = LayerTable(**(fields_ | {"params": self.params * share, "tied": tied, "_matrices": None,
                                            "trainable_share": None, "frozen_tied": frozenset()}))
            self._totals["trained"] = view
        return view  # type: ignore[return-value]

    @property
    def total_s(self) -> np.ndarray:
        """Seconds per layer and micro-batch, all parts; computed once (read-only: it is shared)."""
        total = self._totals.get("total")
        if total is None:
            total = self.fwd_s + self.bwd_input_s + self.bwd_weight_s + self.recompute_s + self.tp_comm_s
            total.setflags(write=False)
            self._totals["total"] = total
        return total  # type: ignore[return-value]

    def total_summary_s(self) -> tuple[float, float]:
        """``(Σ total_s, max total_s)``: the search's work bound reads them for every configuration."""
        summary = self._totals.get("summary")
        if summary is None:
            total = self.total_s
            summary = (float(total.sum()), float(total.max()))
            self._totals["summary"] = summary
        return summary  # type: ignore[return-value]

    def backward_work_s(self) -> np.ndarray:
        """Each layer's backward seconds per micro-batch (compute, recomputation, backward tp collectives),
        computed once (read-only: it is shared)."""
        work = self._totals.get("backward_work")
        if work is None:
            work = self.bwd_input_s + self.bwd_weight_s + self.recompute_s + self.tp_comm_s - self.tp_comm_forward_s
            work.setflags(write=False)
            self._totals["backward_work"] = work
        return work  # type: ignore[return-value]

    def total_prefix_s(self) -> np.ndarray:
        """``[0, cumsum(total_s)]`` (read-only), for pricing any run of layers by a difference."""
        prefix = self._totals.get("prefix")
        if prefix is None:
            prefix = np.concatenate([[0.0], np.cumsum(self.total_s)])
            prefix.setflags(write=False)
            self._totals["prefix"] = prefix
        return prefix  # type: ignore[return-value]

    @property
    def tp_comm_forward_s(self) -> np.ndarray:
        return self.tp_comm_s / 2 if self.tp_comm_fwd_s is None else self.tp_comm_fwd_s

    def segment(self, a: int, b: int) -> Segment:
        """Sums and maxima of layers ``[a, b)`` (``a < b``), computed once per table and segment.

        The values are the slices' own numpy reductions (not prefix-sum differences, which round
        differently), so cached and uncached pricing agree exactly.
        """
        hit = self._segments.get((a, b))
        if hit is None:
            hit = Segment(
                fwd_s=float(self.fwd_s[a:b].sum()), bwd_input_s=float(self.bwd_input_s[a:b].sum()),
                bwd_weight_s=float(self.bwd_weight_s[a:b].sum()), recompute_s=float(self.recompute_s[a:b].sum()),
                tp_comm_s=float(self.tp_comm_s[a:b].sum()), tp_comm_fwd_s=float(self.tp_comm_forward_s[a:b].sum()),
                stored_act_bytes=float(self.stored_act_bytes[a:b].sum()),
                work_act_max=float(self.work_act_bytes[a:b].max()), output_max=float(self.output_bytes[a:b].max()),
                param_max=float(self.params[a:b].max()), params=_stage_params(self, a, b),
                tp_calls=float(self.tp_calls[a:b].sum()) if self.tp_calls is not None else 0.0)
            self._segments[(a, b)] = hit
        return hit

    def matrices(self) -> dict[str, np.ndarray]:
        """Per-segment sums and maxima, ``[i, j]`` for layers [i, j), computed once per table."""
        if self._matrices is None:
            n = len(self.params)
            P = np.concatenate([[0.0], np.cumsum(self.params)])
            S = np.concatenate([[0.0], np.cumsum(self.stored_act_bytes)])
            params = P[None, :] - P[:, None]
            spans: dict[str, tuple[int, int]] = {}
            for entries in self.tied:
                for name, numel, owner in entries:
                    spans[name] = (numel, owner)
            i = np.arange(n + 1)[:, None]
            j = np.arange(n + 1)[None, :]
            for name, (numel, owner) in sorted(spans.items()):
                # held by [i, j) when some user u is inside (i <= u < j) and its owner is not (i > owner)
                users = np.array([u for u, t in enumerate(self.tied) if any(x[0] == name for x in t)])
                # the first user at or after each start ii (n + 1: none), users being ascending
                after = np.searchsorted(users, np.arange(n + 1))
                first_user = np.where(after < len(users), users[np.minimum(after, len(users) - 1)], n + 1)[:, None]
                params = params + numel * ((i > owner) & (first_user < j))
            self._matrices = {"params": params, "stored": S[None, :] - S[:, None],
                              "work_out": _range_max(self.work_act_bytes) + 2 * _range_max(self.output_bytes),
                              "param_max": _range_max(self.params)}
        return self._matrices


TP_PRICING = ("megatron", "none")


@dataclass(frozen=True)
class TableKnobs:
    """What shapes one layer's per-micro-batch figures besides (micro-batch, tp, sp, recompute): the
    schema 2.1 knobs of :class:`planner.plan.ParallelConfig` that change a layer's work or memory on
    one device (context-parallel sequence shards, expert-parallel expert shards, FP8 GEMMs, full
    recomputation of one layer in every ``recompute_every``). The defaults change nothing."""

    cp: int = 1
    ep: int = 1
    fp8: bool = False
    recompute_every: int = 1

    @classmethod
    def of(cls, cfg: object) -> TableKnobs:
        """The knobs of a :class:`planner.plan.ParallelConfig`."""
        return cls(cp=cfg.cp, ep=cfg.ep, fp8=cfg.fp8, recompute_every=cfg.recompute_every)  # type: ignore[attr-defined]


NO_KNOBS = TableKnobs()


# A tp solve's share left whole on every rank below which the layer is priced as split (a transformer's
# norms and elementwise ops: Megatron's split, which the calibration was fitted on).
_WHOLE_SHARE_FLOOR = 1e-3


@dataclass(frozen=True)
class TpSeconds:
    """Tensor-parallel seconds of each layer for one micro-batch, found by a solver (the intra-op ILP).

    Data handed to :func:`layer_table`, which charges them instead of the Megatron count.
    ``source`` and ``note`` are copied into the table (``tp_source``, ``tp_note``).
    """

    fwd_s: Sequence[float]
    bwd_s: Sequence[float]
    source: str = "ilp"
    note: str = ""
    # per layer, the solver's shares left whole on every tp rank: (FLOPs, parameters, saved activations);
    # empty: every op split as Megatron splits a transformer (:func:`layer_table` charges the rest at tp = 1)
    replicated: Sequence[tuple[float, float, float]] = ()


def _exposed_tp_s(layer: Layer, t: LayerTimes, tc: tuple[float, float], *, tp: int,
                  c: CostConstants) -> tuple[float, float]:
    """A layer's tensor-parallel seconds (forward, backward) after overlap with its GEMMs, plus the tp
    framework's host work."""
    tc_fwd, tc_bwd = tc
    if c.tp_comm_overlap > 0:  # chunked collectives pipelined with the GEMMs they feed
        tc_fwd -= min(c.tp_comm_overlap * tc_fwd, t.fwd_s)
        tc_bwd -= min(c.tp_comm_overlap * tc_bwd, t.bwd_s)
    if tp > 1 and c.tp_layer_overhead_s > 0:  # the tp framework's own host work (fwd 1/3, bwd 2/3)
        host = c.tp_layer_overhead_s * tp_split_modules(layer)
        tc_fwd, tc_bwd = tc_fwd + host / 3, tc_bwd + 2 * host / 3
    return tc_fwd, tc_bwd


def layer_table(graph: CostGraph, cluster: ClusterSpec, *, micro_batch: int, tp: int, sequence_parallel: bool,
                recompute: str, c: CostConstants, dtype: str | None = None, tp_pricing: str = "megatron",
                tp_seconds: TpSeconds | None = None, tp_note: str = "",
                knobs: TableKnobs = NO_KNOBS) -> LayerTable:
    """Seconds and bytes per layer and micro-batch on one device of a ``tp``-way group.

    Recomputation (Chen et al. 2016; Korthikanti et al. 2022): ``none`` stores what autograd saves; ``selective``
    drops the attention scores (``attention_activation_bytes``) and repeats the attention core in backward; ``op``
    keeps the input and what :mod:`planner.trace.saved_ops` keeps, repeating the rest; ``full`` stores only each
    layer's input, repeats its forward (tp collectives too) and holds its activations while it is recomputed.

    Tensor-parallel communication (``tp > 1``):

    * ``tp_seconds`` given: each layer's collectives as a solver priced them (the intra-op ILP on the
      real tp group, :meth:`planner.pricing.Pricer.table`; the plan's placements are that solve).
    * else ``tp_pricing="megatron"`` (default): :func:`tp_collectives`' all-reduces (reduce-scatter +
      all-gather under sequence parallelism), priced by :mod:`planner.cost.comm`; ``tp_note`` says why.
    * ``tp_pricing="none"``: no tp communication, a lower bound of both (the search's cheap bounds).

    Compute, parameters and activations are the calibrated figures for Megatron's split
    (:func:`planner.cost.compute.layer_times`), but for what the tp solve leaves whole (:func:`_whole_shares`).
    """
    if tp_pricing not in TP_PRICING:
        raise ValueError(f"tp_pricing: got {tp_pricing!r}; use one of {list(TP_PRICING)} (the intra-op ILP's "
                         "seconds come in as tp_seconds: planner.pricing.Pricer.table builds such tables)")
    dtype = dtype or graph.dtype
    source, note, tp_seconds = _tp_source(tp, tp_pricing, tp_seconds, tp_note, cp=knobs.cp)
    n = graph.num_layers
    arr = {k: np.zeros(n) for k in ("f", "b", "w", "r", "tc", "tcf", "st", "wk", "p", "o")}
    by_signature: dict[str, LayerTimes] = {}
    tp_group = strided_group(cluster, tp, 1)
    seqs = tokens_per_rank(micro_batch, knobs.cp)  # this rank's tokens, in sequences (1/cp of each)
    recs = [layer_recompute(recompute, i, knobs.recompute_every) for i in range(n)]  # one in k: cost/sharding.py
    for i, layer in enumerate(graph.layers):
        fp8 = knobs.fp8 and i < n - 1  # torchtitan's float8 leaves the output head in bf16 (cost/fp8.py)
        whole = _whole_shares(tp_seconds, i) if tp > 1 else None
        timing = dict(micro_batch=seqs, device=cluster.device, dtype=dtype, c=c, gemm=cluster.shared_gemm, fp8=fp8)
        t = _row_times(layer, tp, sequence_parallel, whole, by_signature if fp8 == knobs.fp8 else None, timing)
        arr["f"][i], arr["b"][i], arr["w"][i] = t.fwd_s, t.bwd_input_s, t.bwd_weight_s
        tc = _tp_collective_s(layer, i, tp_seconds, priced=tp > 1 and tp_pricing != "none", dtype=dtype,
                              micro_batch=seqs, group=tp_group, sequence_parallel=sequence_parallel, c=c)
        tc_fwd, tc_bwd = _exposed_tp_s(layer, t, tc, tp=tp, c=c)
        arr["tcf"][i], arr["tc"][i] = tc_fwd, tc_fwd + tc_bwd
        row = {"micro_batch": seqs, "sequence_parallel": sequence_parallel, "recompute": recs[i],
               "elt": DTYPE_BYTES.get(graph.dtype, 2), "c": c, "fp8": fp8}
        _fill_memory_row(arr, i, layer, t, tc_fwd, tp=tp, **row)  # type: ignore[arg-type]
        if whole is not None:
            _whole_memory(arr, i, layer, t, tc_fwd, tp, whole, row)
    add_expert_rows(arr, graph, cluster, micro_batch=micro_batch, tp=tp, sequence_parallel=sequence_parallel,
                    recompute=recompute, knobs=knobs, dtype=dtype, c=c)  # ep > 1: experts split (cost/experts.py)
    cp_comm = add_cp_rows(arr, graph, cluster, micro_batch=micro_batch, tp=tp, cp=knobs.cp, dtype=dtype, c=c,
                          recompute=recompute, every=knobs.recompute_every)  # K/V gathers (cost/context_parallel.py)
    _add_loss(arr, graph.layers[-1], micro_batch=seqs, tp=tp, dtype=dtype, cluster=cluster, c=c,  # type: ignore[arg-type]
              recompute=recs[-1], gather_over=tp_group if tp_pricing != "none" else None)
    return LayerTable(fwd_s=arr["f"], bwd_input_s=arr["b"], bwd_weight_s=arr["w"], recompute_s=arr["r"],
                      tp_comm_s=arr["tc"], stored_act_bytes=arr["st"], work_act_bytes=arr["wk"], params=arr["p"],
                      output_bytes=arr["o"], tp_comm_fwd_s=arr["tcf"], dtype=dtype, tp_source=source,
                      tp_note=note, cp_comm_s=cp_comm, expert_params=arr.get("ep_p"), all_to_all_s=arr.get("a2a"),
                      tp_calls=tp_calls_per_layer(graph, sequence_parallel) if tp > 1 else None,
                      **_param_parts(graph))


def _param_parts(graph: CostGraph) -> dict[str, object]:
    """The table's ``tied`` parameters and what of its parameters is frozen: each layer's share of its own
    that trains (None: every one does), the frozen tied ones, and each layer's parameter tensors that train."""
    frozen = np.array([lay.frozen_count / lay.param_count if lay.param_count else 0.0 for lay in graph.layers])
    return {"tied": [[(t.name, t.numel, t.owner) for t in lay.tied_params] for lay in graph.layers],
            "trainable_share": 1.0 - frozen if frozen.any() else None,
            "frozen_tied": frozenset(t.name for lay in graph.layers for t in lay.tied_params if t.frozen),
            "trained_tensors": np.array([lay.trained_tensors for lay in graph.layers], dtype=float)}


def _whole_shares(tp_seconds: TpSeconds | None, i: int) -> tuple[float, float, float] | None:
    """Layer ``i``'s (FLOPs, parameters, saved activations) shares its tp solve leaves whole, or None when
    it splits everything that weighs (under 0.1% of each left whole: a transformer's norms)."""
    if tp_seconds is None or i >= len(tp_seconds.replicated):
        return None
    shares = tp_seconds.replicated[i]
    return shares if max(shares) > _WHOLE_SHARE_FLOOR else None


def _row_times(layer: Layer, tp: int, sequence_parallel: bool, whole: tuple[float, float, float] | None,
               cache: dict[str, LayerTimes] | None, timing: dict) -> LayerTimes:
    """A layer's times on one of ``tp`` ranks (``cache``: by signature, as repeated blocks have equal
    costs), with the FLOPs share its tp solve leaves whole (``whole[0]``) run at tp = 1."""
    key = layer.signature if whole is None else f"{layer.signature} whole {whole[0]!r}"
    t = cache.get(key) if cache is not None else None
    if t is None:
        t = layer_times(layer, tp=tp, sequence_parallel=sequence_parallel, **timing)
        if whole is not None:
            t = _blend_times(t, layer_times(layer, tp=1, sequence_parallel=False, **timing), whole[0])
        if cache is not None:
            cache[key] = t
    return t


def _blend_times(split: LayerTimes, whole: LayerTimes, share: float) -> LayerTimes:
    """The times of a layer whose ``share`` of FLOPs runs whole on every tp rank, the rest split."""
    mix = lambda a, b: (1.0 - share) * a + share * b  # noqa: E731
    return LayerTimes(fwd_s=mix(split.fwd_s, whole.fwd_s), bwd_input_s=mix(split.bwd_input_s, whole.bwd_input_s),
                      bwd_weight_s=mix(split.bwd_weight_s, whole.bwd_weight_s),
                      attention_fwd_s=mix(split.attention_fwd_s, whole.attention_fwd_s),
                      op_kept_fwd_s=mix(split.op_kept_fwd_s, whole.op_kept_fwd_s))


def _whole_memory(arr: dict[str, np.ndarray], i: int, layer: Layer, t: LayerTimes, tc_fwd: float, tp: int,
                  whole: tuple[float, float, float], row: dict) -> None:
    """Layer ``i``'s parameters and activations with the shares its tp solve leaves whole kept in full.

    ``params`` holds the layer's parameters before the division by tp that every reader makes, so a
    share ``q`` left whole counts ``q·tp`` there: ``(1 - q)/tp + q`` of them per rank. Activations: the
    trace already keeps Megatron's replicated part whole (``replicated_activation_bytes``: norm and
    residual inputs); the solve's whole share counts where it is larger (a replicated convolution's)."""
    _, params, saved = whole
    if saved * layer.activation_bytes > layer.replicated_activation_bytes:
        wider = replace(layer, replicated_activation_bytes=saved * layer.activation_bytes)
        _fill_memory_row(arr, i, wider, t, tc_fwd, tp=tp, **row)
    arr["p"][i] *= (1.0 - params) + params * tp


def _tp_collective_s(layer: Layer, i: int, tp_seconds: TpSeconds | None, *, priced: bool, dtype: str,
                     micro_batch: float, group: Group, sequence_parallel: bool, c: CostConstants) -> tuple[float, float]:
    """Layer ``i``'s tensor-parallel seconds (forward, backward) before overlap: the solver's where given,
    else Megatron's count where ``priced``, else none."""
    if tp_seconds is not None:
        return tp_seconds.fwd_s[i], tp_seconds.bwd_s[i]
    if priced:
        return megatron_tp_s(layer, dtype=dtype, micro_batch=micro_batch, group=group,  # type: ignore[arg-type]
                             sequence_parallel=sequence_parallel, c=c)
    return 0.0, 0.0


def _add_loss(arr: dict[str, np.ndarray], last: Layer, *, micro_batch: int, tp: int, dtype: str,
              cluster: ClusterSpec, c: CostConstants, recompute: str, gather_over: Group | None) -> None:
    """The training loss on the last layer's output (vocabulary-parallel under tp, or gathered over
    ``gather_over`` first: None leaves that tp collective out, as ``tp_pricing="none"`` does)."""
    n = len(arr["f"])
    loss_s = loss_traffic_s(last, micro_batch=micro_batch, tp=tp if c.vocab_parallel_loss else 1, dtype=dtype,
                            cluster=cluster, c=c)
    if tp > 1 and not c.vocab_parallel_loss and gather_over is not None:  # the head's output gathered over tp
        gather_s = all_gather_s(last.output_bytes * micro_batch, gather_over, c)
        arr["tcf"][n - 1] += gather_s
        arr["tc"][n - 1] += gather_s
    arr["f"][n - 1] += loss_s / 3
    arr["b"][n - 1] += 2 * loss_s / 3
    if recompute == "full":
        arr["r"][n - 1] += loss_s / 3


def _tp_source(tp: int, tp_pricing: str, tp_seconds: TpSeconds | None,
               tp_note: str, cp: int = 1) -> tuple[str, str, TpSeconds | None]:
    """``(tp_source, tp_note, the solver's seconds to charge or None)`` of a table (see :func:`layer_table`).
    With ``cp > 1`` the Megatron count on this rank's 1/cp of the tokens (the ILP solved whole sequences)."""
    if cp > 1 and tp > 1 and tp_pricing != "none":
        tp_seconds, tp_note = None, f"cp={cp}: Megatron's count on 1/{cp} of the tokens"
    if tp == 1:
        return "", "", None
    if tp_pricing == "none":
        return "none", "", None
    if tp_seconds is not None:
        return tp_seconds.source, tp_seconds.note, tp_seconds
    return tp_pricing, tp_note, None


def _fill_memory_row(arr: dict[str, np.ndarray], i: int, layer: Layer, t: object, tc_fwd: float, *,
                     micro_batch: int, tp: int, sequence_parallel: bool, recompute: str, elt: float = 2,
                     c: CostConstants, fp8: bool = False) -> None:
    """Layer ``i``'s stored and working activations, recomputation seconds, parameters and output
    (``elt``: bytes per element of the traced activations). What the trainer keeps comes from ``c``:
    sequence parallelism saves the gathered inputs of its regions (``sp_saves_gathered_inputs``); no
    element-wise intermediates (``fused_pointwise_saves``); with ``fp8`` linears, FP8 copies of their
    inputs (``fp8_saves_linear_inputs``: the replicated share is left as traced, which overstates it a
    little without sequence parallelism)."""
    gathered = c.sp_saves_gathered_inputs
    act, replicated = layer.activation_bytes, layer.replicated_activation_bytes  # what the trainer keeps
    if c.fused_pointwise_saves and layer.pointwise_saved_bytes:
        act -= layer.pointwise_saved_bytes
        replicated = max(replicated - layer.pointwise_replicated_bytes, 0.0)
    if fp8 and c.fp8_saves_linear_inputs and layer.linear_input_bytes:
        act -= (layer.linear_input_bytes - layer.linear_shared_input_bytes) / 2
    shard = shard_fraction(act, replicated, tp, sequence_parallel)
    full = act * shard * micro_batch
    if gathered and sequence_parallel and tp > 1 and recompute in ("none", "selective"):
        full += sp_gathered_input_bytes(layer, elt) * (1 - 1 / tp) * micro_batch
    if recompute == "none":
        arr["st"][i] = full
    elif recompute == "op":
        # Per-op checkpointing (planner.trace.saved_ops) keeps the layer's input and the outputs of the
        # ops it saves; backward re-runs the rest: their forward seconds, and the tp collectives between
        # a recomputed GEMM and the next saved output (about half: the reduce-scatters that close a
        # sequence-parallel block are saved, and recomputation stops before a block's last all-reduce).
        kept = min(full, (op_saved_bytes(layer, elt, tp, sequence_parallel)
                          + layer.input_bytes / (tp if sequence_parallel else 1)) * micro_batch)
        arr["st"][i] = kept
        arr["wk"][i] = full - kept
        arr["r"][i] = max(t.fwd_s - t.op_kept_fwd_s, 0.0) + tc_fwd / 2  # type: ignore[attr-defined]
    elif recompute == "selective":
        attention = layer.attention_activation_bytes * shard * micro_batch
        arr["st"][i] = full - attention
        arr["wk"][i] = attention
        arr["r"][i] = t.attention_fwd_s  # type: ignore[attr-defined]
    else:
        arr["st"][i] = layer.input_bytes * micro_batch / (tp if sequence_parallel else 1)
        arr["wk"][i] = full
        arr["r"][i] = t.fwd_s + tc_fwd  # type: ignore[attr-defined]
    arr["p"][i] = layer.param_count
    arr["o"][i] = layer.output_bytes * micro_batch / (tp if sequence_parallel else 1)


def op_saved_bytes(layer: Layer, elt: float, tp: int = 1, sequence_parallel: bool = False) -> float:
    """Bytes per sample one of ``tp`` ranks keeps of ``layer`` under the per-op checkpointing policy.

    The traced figure (``Layer.op_saved_bytes``) splits into the kept matrix multiplies' outputs (``m·n``
    elements of ``elt`` bytes each) and the attention kernels' (the rest: split by heads over tp). Under
    tp a kept column-parallel product holds its ``1/tp`` of the output, a kept row-parallel one
    (:func:`row_parallel_flags`) its whole partial sum; with sequence parallelism the reduce-scatter
    after every row-parallel product is kept too (``1/tp``), as torchtitan's policy saves it. A graph
    stored before the figure was traced has no attention part."""
    gemms = [op for op in layer.op_costs if op.kind in MATMULS]
    rows = row_parallel_flags(layer, elt)
    keep = kept_flags([op.kind for op in gemms])
    products = sum(op.m * op.n * elt for op, k in zip(gemms, keep) if k)
    traced = layer.op_saved_bytes if layer.op_saved_bytes is not None else products
    on_rank = max(traced - products, 0.0) / tp
    for op, kept, row in zip(gemms, keep, rows):
        out = op.m * op.n * elt
        if kept:
            on_rank += out if tp > 1 and row else out / tp
        if tp > 1 and row and sequence_parallel:
            on_rank += out / tp
    return on_rank


def sp_gathered_input_bytes(layer: Layer, elt: float) -> float:
    """Per sample, the whole-sequence inputs of ``layer``'s tensor-parallel regions: one per run of
    column-parallel products reading the layer's width (q, k and v share one; the MLP's up and gate
    another), which DTensor-style sequence parallelism saves gathered (its traced figure counts them
    split, as Megatron's linears save them)."""
    gemms = [op for op in layer.op_costs if op.kind in MATMULS]
    width = _width(layer, gemms, elt)
    total, in_run = 0.0, False
    for op, row in zip(gemms, row_parallel_flags(layer, elt)):
        opens = not row and op.k == width
        total += op.m * op.k * elt if opens and not in_run else 0.0
        in_run = opens
    return total


def row_parallel_flags(layer: Layer, elt: float) -> list[bool]:
    """For each matrix multiply of ``layer`` in order, whether Megatron's split makes it row-parallel:
    the first product after attention (its output projection), or one that writes the layer's width from
    a different one (an MLP's down projection). The others (q/k/v, up and gate) are column-parallel."""
    width = _width(layer, [op for op in layer.op_costs if op.kind in MATMULS], elt)
    flags, after_attention = [], False
    for op in layer.op_costs:
        if op.kind in ATTENTION_KINDS:
            after_attention = True
        elif op.kind in MATMULS:
            flags.append(after_attention or (op.n == width and op.k != width))
            after_attention = False
    return flags


def _width(layer: Layer, gemms: list, elt: float) -> float:
    """The layer's hidden width: its output's elements per token (the first product's rows per sample)."""
    return layer.output_bytes / (elt * gemms[0].m) if gemms and gemms[0].m else 0.0


def group_layer_tables(graph: CostGraph, cluster: ClusterSpec, *, micro_batch: int, tp: int,
                       sequence_parallel: bool, recompute: str, c: CostConstants, dtype: str | None = None,
                       tp_pricing: str = "megatron", tp_seconds: Sequence[TpSeconds | None] | None = None,
                       knobs: TableKnobs = NO_KNOBS) -> list[LayerTable]:
    """:func:`layer_table` of every node group of ``cluster`` on its own device and links, in group order
    (``tp_seconds``: one entry per group, or None). Not cached: :class:`planner.pricing.Pricer` keeps them."""
    return [layer_table(graph, cluster.group_view(gi), micro_batch=micro_batch, tp=tp,
                        sequence_parallel=sequence_parallel, recompute=recompute, c=c, dtype=dtype,
                        tp_pricing=tp_pricing, tp_seconds=None if tp_seconds is None else tp_seconds[gi],
                        knobs=knobs)
            for gi in range(len(cluster.groups))]
