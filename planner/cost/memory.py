"""Memory of one device: model state, activations in flight, temporary buffers, allocator margin.

For a device holding the layers of its pipeline chunks, with ``P`` parameters (its own plus tied
ones used there, counted once) split ``tp`` ways, and ``(w, g, o)`` bytes per parameter from
:meth:`CostConstants.state_bytes` (mixed-precision Adam: 2 + 2 + 12 = 16)::

    weights     w·P/tp   (÷dp with ZeRO-3 / FSDP full sharding)      ÷dp: over ZeRO's shard group,
    gradients   g·P/tp   (÷dp with ZeRO-2 and ZeRO-3)                HSDP's dp_shard (× cp), and the
    optimizer   o·P/tp   (÷dp with ZeRO-1, 2 and 3)                  gathered stage added when ZeRO-3
                                                                     keeps it (planner.cost.sharding);
                                                                     expert states under ep: ÷(that/ep)
                                                                     (planner.cost.experts)
    activations in_flight · Σ_layers stored(layer) + max_layers work(layer)
    temporary   2 · max_layers out(layer)                 the output being produced and its
                                                          gradient; pipeline send/receive buffers
                + copies · out(last) · 4/elt / (tp, or 1  the loss's fp32 workspace on the last
                  when sequence-sharded already)          stage (loss_workspace_copies)
                + (2·w + g) · max_layers P(layer)/tp      ZeRO-3 only: the gathered layer, the
                                                          prefetched next one, its full gradient
                + max(0, t_opt·P/tp − activations − the   the optimizer step's temporaries (÷dp
                  temporaries above)                      with ZeRO ≥ 1): it runs after the
                                                          activations are freed

Gradients are counted throughout: Megatron and DDP keep persistent gradient buffers, and with
several micro-batches gradients accumulate while later micro-batches run (for a single-micro-batch
eager run that frees gradients between steps this is conservative).

``stored`` and ``work`` come from :func:`planner.cost.model.layer_table` (what autograd saves per
micro-batch, after tensor/sequence parallelism and recomputation); ``in_flight`` is the number of
micro-batches whose activations the schedule keeps on that device
(:func:`planner.schedules.in_flight`). A device fits when the total is at most
``usable_fraction · memory − reserved`` (allocator fragmentation; CUDA context, NCCL and cuBLAS
workspaces). The three implementations below (one stage, vector over starts, matrix over
segments) are the same formula; ``tests/cost/test_memory_consistency.py`` checks it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from planner.cluster import ClusterSpec
from planner.cost.constants import DTYPE_BYTES, CostConstants
from planner.cost.experts import device_expert_params, expert_state_extra
from planner.cost.sharding import optimizer_shard, state_bytes_per_param, zero3_temp_bytes_per_param
from planner.plan import ParallelConfig

if TYPE_CHECKING:
    from planner.cost.layer_table import LayerTable
    from planner.trace.graph import CostGraph


def stage_params(table: LayerTable, start: int, stop: int) -> float:
    """Parameters a stage holds: its own plus tied ones owned outside it (counted once each)."""
    return table.segment(start, stop).params if start < stop else _stage_params(table, start, stop)


def _stage_params(table: LayerTable, start: int, stop: int) -> float:
    """:func:`stage_params`, computed (``LayerTable.segment`` memoises it)."""
    own = float(table.params[start:stop].sum())
    extra: dict[str, int] = {}
    for i in range(start, stop):
        for name, numel, owner in table.tied[i]:
            if not start <= owner < stop:
                extra[name] = numel
    return own + sum(extra.values())


def device_params(table: LayerTable, chunks: list[tuple[int, int]]) -> float:
    """Parameters a device holds with ``chunks`` (one per virtual stage): each chunk's :func:`stage_params`, less
    a tied parameter counted by two of them. A V-shaped schedule puts the embedding's chunk and the tied head's
    on one device, which holds the weight once (the runtime shares one parameter between the two stages)."""
    total = sum(table.segment(a, b).params for a, b in chunks)
    if len(chunks) < 2:
        return total
    tied = table._totals.get("tied_uses")  # name -> (numel, owner, users): read once per table
    if tied is None:
        users: dict[str, tuple[int, int, list[int]]] = {}
        for i, entries in enumerate(table.tied):
            for name, numel, owner in entries:
                users.setdefault(name, (numel, owner, []))[2].append(i)
        tied = table._totals["tied_uses"] = users
    for numel, owner, uses in tied.values():
        count = sum(1 for a, b in chunks if a <= owner < b or any(a <= u < b for u in uses))
        total -= numel * max(0, count - 1)
    return total


@dataclass(frozen=True)
class MemoryParts:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    temporary: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.temporary

    def as_dict(self) -> dict[str, int]:
        return {"weights": int(self.weights), "gradients": int(self.gradients), "optimizer": int(self.optimizer),
                "activations": int(self.activations), "temporary": int(self.temporary), "total": int(self.total)}


def _per_param_bytes(table: LayerTable, cfg: ParallelConfig, c: CostConstants) -> tuple[float, float, float]:
    """Weight, gradient and optimizer bytes per (unsplit) parameter on one device, after sharding."""
    return state_bytes_per_param(*c.state_bytes(table.dtype), cfg,  # ZeRO over the shard group (cost/sharding.py)
                                 gathered=c.gathered_weight_bytes(table.dtype))


def _optimizer_temp_per_param(cfg: ParallelConfig, c: CostConstants) -> float:
    """The optimizer step's temporaries per (unsplit) parameter: over the shard it updates."""
    return c.optimizer_temp_bytes_per_param / optimizer_shard(cfg) / cfg.tp


def _gather_bytes_per_param(table: LayerTable, cfg: ParallelConfig, c: CostConstants) -> float:
    """ZeRO-3 temporaries per parameter of the largest layer: two gathered copies (in FSDP's param dtype)
    and one gradient."""
    _, g, _ = c.state_bytes(table.dtype)
    return zero3_temp_bytes_per_param(c.gathered_weight_bytes(table.dtype), g, cfg)


def _logits_factor(table: LayerTable, cfg: ParallelConfig, c: CostConstants) -> float:
    """Bytes of the fp32 loss workspace per byte of the last layer's (per-device) output."""
    fp32 = 4.0 / DTYPE_BYTES.get(table.dtype, 2)
    return c.loss_workspace_copies * fp32 / (1 if cfg.sequence_parallel else cfg.tp)


@dataclass(frozen=True)
class _Coefficients:
    """What :func:`stage_memory` takes from the configuration and the constants alone: bytes per parameter
    of the model state, of ZeRO-3's gathered layer and of the optimizer step's temporaries, the loss
    workspace per output byte, and the experts' extra state under ep (None without)."""

    state: tuple[float, float, float]
    gather: float
    logits: float
    optimizer_temp: float
    expert_extra: tuple[float, float, float, float] | None


def _coefficients(table: LayerTable, cfg: ParallelConfig, c: CostConstants) -> _Coefficients:
    """:class:`_Coefficients` of ``(table, cfg, c)``, computed once per table: a search prices the same
    configuration's memory for hundreds of splits. The table keeps them (it lives as long as its
    pricer) with ``cfg`` and ``c`` themselves, so their ids cannot be reused while the entry lives."""
    cache = table._totals.setdefault("memory_coefficients", {})
    hit = cache.get((id(cfg), id(c)))
    if hit is not None and hit[0] is cfg and hit[1] is c:
        return hit[2]
    coef = _Coefficients(_per_param_bytes(table, cfg, c), _gather_bytes_per_param(table, cfg, c),
                         _logits_factor(table, cfg, c), _optimizer_temp_per_param(cfg, c),
                         expert_state_extra(table, cfg, c))
    cache[(id(cfg), id(c))] = (cfg, c, coef)
    return coef


def stage_memory(table: LayerTable, chunks: list[tuple[int, int]], *, in_flight: float, cfg: ParallelConfig,
                 c: CostConstants, is_last: bool) -> MemoryParts:
    """Memory of one device holding ``chunks`` (one per virtual stage) of layers."""
    coef = _coefficients(table, cfg, c)
    trained = table.trained
    if len(chunks) == 1:  # memoised sums and maxima, as the slices give them
        seg = table.segment(*chunks[0])
        params, stored, work, out, param_max = seg.params, seg.stored_act_bytes, seg.work_act_max, seg.output_max, \
            seg.param_max
        tparams = params if trained is table else trained.segment(*chunks[0]).params
    else:
        segs = [table.segment(a, b) for a, b in chunks]
        params = device_params(table, chunks)
        tparams = params if trained is table else device_params(trained, chunks)
        stored = sum(s.stored_act_bytes for s in segs)
        work = max(s.work_act_max for s in segs)
        out = max(s.output_max for s in segs)
        param_max = max(s.param_max for s in segs)
    pw, pg, po = coef.state
    temp = 2 * out  # the output being produced and its gradient; pipeline send and receive buffers
    temp += coef.gather * param_max
    if is_last:
        temp += coef.logits * float(table.output_bytes[chunks[-1][1] - 1])
    activations = in_flight * stored + work
    # The optimizer step runs after the activations are freed: its temporaries add only what
    # exceeds the backward-time peak.
    extra = coef.expert_extra  # ZeRO with ep: the experts over their own shard (cost/experts.py)
    # Gradients, optimizer state and the step's temporaries: of the parameters that train (frozen ones none).
    if extra is None:
        temp += max(0.0, coef.optimizer_temp * tparams - activations - temp)
        return MemoryParts(pw * params, pg * tparams, po * tparams, activations, temp)
    experts = device_expert_params(table, chunks)
    opt_temp = coef.optimizer_temp * tparams + extra[3] * experts
    temp += max(0.0, opt_temp - activations - temp)
    return MemoryParts(pw * params + extra[0] * experts, pg * tparams + extra[1] * experts,
                       po * tparams + extra[2] * experts, activations, temp)


def model_state_bytes(graph: CostGraph, c: CostConstants) -> float:
    """The whole model's weights, gradients and optimizer state, unsharded: frozen parameters hold weights only."""
    trained = graph.param_count - graph.frozen_param_count
    return graph.param_count * c.weight_bytes + trained * (c.grad_bytes + c.optimizer_bytes)


def usable_memory_bytes(cluster: ClusterSpec, c: CostConstants) -> float:
    """What the allocator can hand out: ``usable_fraction · memory − reserved``.

    The cluster's measured ``memory`` (of the node group whose device :attr:`ClusterSpec.device`
    picks) replaces the constants it gives; without it, ``c``'s.
    """
    device = cluster.device
    measured = next((g.memory for g in cluster.groups if g.device is device), None)
    if measured is None:
        return device.memory_bytes * c.allocator_usable_fraction - c.reserved_bytes
    fraction = c.allocator_usable_fraction if measured.usable_fraction is None else measured.usable_fraction
    reserved = c.reserved_bytes if measured.reserved_bytes is None else measured.reserved_bytes
    return device.memory_bytes * fraction - reserved


def _range_max(arr: np.ndarray) -> np.ndarray:
    """``out[i, j] = max(arr[i:j])`` for ``i < j`` (0 elsewhere), shape ``(n+1, n+1)``.

    One running maximum along each row of ``arr`` with the entries before the row's start masked
    out; maxima are exact, so this equals slicing row by row.
    """
    n = len(arr)
    out = np.zeros((n + 1, n + 1))
    if n:
        after_start = np.arange(n)[None, :] >= np.arange(n)[:, None]  # [i, l]: layer l is in a run from i
        running = np.maximum.accumulate(np.where(after_start, arr[None, :], -np.inf), axis=1)
        out[:n, 1:] = np.where(after_start, running, 0.0)
    return out


def stage_memory_matrix(table: LayerTable, cfg: ParallelConfig, c: CostConstants, *, p: int,
                        in_flight: list[float]):
    """``f(k)[i, j]``: memory of a stage holding layers [i, j) at position k (same formula as
    :func:`stage_memory` for one chunk), for the partition DP's matrix path.

    ``f(k, rows, cols)`` is the block ``f(k)[rows, cols]``, computed on the block only (the DP
    needs just the starts and ends a stage at position k can have); every entry is the same
    element-wise arithmetic, so the block equals the slice of the full matrix exactly.
    """
    mats = table.matrices()
    trained = table.trained.matrices()["params"] if table.trained is not table else mats["params"]
    state = _state_bytes(_per_param_bytes(table, cfg, c), mats["params"], trained)
    opt_temp = _optimizer_temp_per_param(cfg, c) * trained
    extra = expert_state_extra(table, cfg, c)  # ZeRO with ep: the experts over their own shard (cost/experts.py)
    if extra is not None:
        E = np.concatenate([[0.0], np.cumsum(table.expert_params)])  # type: ignore[arg-type]
        experts = E[None, :] - E[:, None]
        state = state + sum(extra[:3]) * experts
        opt_temp = opt_temp + extra[3] * experts
    transient = mats["work_out"]
    gather = _gather_bytes_per_param(table, cfg, c)
    if gather:
        transient = transient + gather * mats["param_max"]
    last_col = np.concatenate([[0.0], _logits_factor(table, cfg, c) * table.output_bytes])[None, :]

    stored = mats["stored"]
    everything = slice(None)

    def matrix(k: int, rows: slice = everything, cols: slice = everything) -> np.ndarray:
        peak = transient[rows, cols] + in_flight[k] * stored[rows, cols]
        if k == p - 1:
            peak = peak + last_col[:, cols]
        return state[rows, cols] + np.maximum(peak, opt_temp[rows, cols])

    return matrix


def stage_memory_vec(table: LayerTable, cfg: ParallelConfig, c: CostConstants, *, p: int,
                     in_flight: list[float]):
    """``f(j, k)``: memory of a stage holding layers [i, j) at position k, as a vector over all i.

    Same formula as :func:`stage_memory` for one chunk; used by the partition DP.
    """
    S = np.concatenate([[0.0], np.cumsum(table.stored_act_bytes)])
    per = _per_param_bytes(table, cfg, c)
    opt_temp = _optimizer_temp_per_param(cfg, c)
    gather = _gather_bytes_per_param(table, cfg, c)
    held = _stage_params_vec(table)
    trains = held if table.trained is table else _stage_params_vec(table.trained)
    logits = _logits_factor(table, cfg, c)
    extra = expert_state_extra(table, cfg, c)  # ZeRO with ep: the experts over their own shard (cost/experts.py)
    E = np.concatenate([[0.0], np.cumsum(table.expert_params)]) if extra is not None else None  # type: ignore[arg-type]

    def vec(j: int, k: int) -> np.ndarray:
        i = np.arange(j)
        params = held(j)
        tparams = params if trains is held else trains(j)
        state = _state_bytes(per, params, tparams)
        work = np.maximum.accumulate(table.work_act_bytes[:j][::-1])[::-1]
        out = np.maximum.accumulate(table.output_bytes[:j][::-1])[::-1]
        peak = in_flight[k] * (S[j] - S[i]) + work + 2 * out
        if gather:
            peak = peak + gather * np.maximum.accumulate(table.params[:j][::-1])[::-1]
        if k == p - 1:
            peak = peak + logits * table.output_bytes[j - 1]
        if extra is not None:
            experts = E[j] - E[i]  # type: ignore[index]
            return state + sum(extra[:3]) * experts + np.maximum(peak, opt_temp * tparams + extra[3] * experts)
        return state + np.maximum(peak, opt_temp * tparams)

    return vec


def _state_bytes(per: tuple[float, float, float], params, trained):
    """Weights of every parameter held, gradients and optimizer state of those that train (``trained`` is
    ``params`` itself when none is frozen: then the sum is formed as it always was)."""
    if trained is params:
        return sum(per) * params
    return per[0] * params + (per[1] + per[2]) * trained


def _stage_params_vec(table: LayerTable):
    """``g(j)``: :func:`stage_params` of layers [i, j) for every start ``i < j``, as a vector."""
    n = len(table.params)
    P = np.concatenate([[0.0], np.cumsum(table.params)])
    tied = [(u, name, numel, owner) for u in range(n) for name, numel, owner in table.tied[u]]

    def g(j: int) -> np.ndarray:
        i = np.arange(j)
        params = P[j] - P[i]
        seen: set[str] = set()
        for u, name, numel, owner in tied:
            if u < j and name not in seen:
                # counted once per stage: for start i with owner < i <= (last user of name below j)
                users = [uu for uu, nn, _, _ in tied if nn == name and uu < j]
                params = params + numel * ((i > owner) & (i <= max(users)))
                seen.add(name)
        return params

    return g
