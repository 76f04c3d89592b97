"""The public entry points: ``plan(model, cluster, ...)`` and ``evaluate(model, cluster, config)``.

Both trace the model (on meta), price configurations with the cost model and return a
:class:`Plan` the runtime can execute. ``plan`` searches; ``evaluate`` prices the configuration
it is given (its stage boundaries come from the exact partition DP unless ``partition`` names
another split: equal layers, or Megatron-LM's or nanotron's own, :mod:`planner.inter_op.framework_splits`).
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import math
import numbers
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

from torch import nn

from planner.baselines import run_baselines
from planner.cluster import ClusterSpec
from planner.cost.constants import CostConstants
from planner.errors import SpecError
from planner.explain import group_order_note, infeasible_error
from planner.inter_op.framework_splits import FRAMEWORK_SPLITS, PARTITIONS
from planner.plan import ParallelConfig, Plan
from planner.plan_build import build_plan
from planner.pricing import Pricer, table_key
from planner.resolve import (  # noqa: F401  (planner.api's public names)
    ResolvedModel,
    check_config,
    default_dtype,
    default_sample_input,
    resolve_cluster,
    resolve_model,
    runnable_space,
)
from planner.search import Candidate, SearchResult, SearchSpace, polished, search, tp_solve_of

MAX_GLOBAL_BATCH = 10_000_000  # samples per step: above any batch in use; keeps the search's pricing bounded


def _check_search_args(top_k: Any, time_limit_s: Any, constants: Any) -> None:
    """plan()'s own arguments (the CLI checks its flags the same way)."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise SpecError("top_k", top_k, "expected a positive integer: how many configurations to keep (default 5)")
    if time_limit_s is not None and (isinstance(time_limit_s, bool) or not isinstance(time_limit_s, (int, float))
                                     or not math.isfinite(time_limit_s) or time_limit_s <= 0):
        raise SpecError("time_limit_s", time_limit_s, "expected a positive number of seconds, or None (no limit)")
    if constants is not None and not isinstance(constants, CostConstants):
        raise SpecError("constants", type(constants).__name__,
                        "expected a CostConstants; from a dict: dataclasses.replace(CostConstants(), **fields), "
                        "or planner.cost.constants.constants_from_file(path)")


def _check_batch(global_batch: Any) -> int:
    if isinstance(global_batch, numbers.Integral) and not isinstance(global_batch, (bool, int)):
        global_batch = int(global_batch)  # numpy's integers
    if isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch < 1:
        raise SpecError("global_batch", global_batch, "expected a positive integer number of samples per step")
    if global_batch > MAX_GLOBAL_BATCH:
        raise SpecError("global_batch", global_batch,
                        f"more than {MAX_GLOBAL_BATCH:,} samples per step is no training batch in use (Llama 3 405B "
                        "trained on 16M tokens = 4,096 sequences per step); if you gave tokens, divide by the "
                        "sequence length")
    return global_batch


def _resolve_model(model: Any, *, seq_len: int | None, sample_input: Any, dtype: str) -> ResolvedModel:
    """:func:`resolve_model`, and a Hugging Face config (a ``PretrainedConfig``, or a path to a
    ``config.json``) built on meta first (:mod:`planner.models.hf_config`)."""
    from planner.models import hf_config

    if isinstance(model, ResolvedModel):  # already traced (a plan file's stored graph: evaluate --plan)
        return model
    if not (hf_config.is_config(model) or hf_config.is_config_path(model)):
        return resolve_model(model, seq_len=seq_len, sample_input=sample_input, dtype=dtype)
    config = model if hf_config.is_config(model) else hf_config.load_config(model)
    built = hf_config.build(config, seq_len=seq_len)
    resolved = resolve_model(built.module, seq_len=built.seq_len, sample_input=sample_input or built.sample_input,
                             dtype=dtype)
    resolved.graph.name = built.name
    resolved.graph.notes.insert(0, built.note)
    return resolved


def plan(model: nn.Module | str | Any, cluster: ClusterSpec | str, *, global_batch: int, seq_len: int | None = None,
         sample_input: Any = None, nodes: int | None = None, devices_per_node: int | None = None,
         space: SearchSpace | None = None, constants: CostConstants | None = None, dtype: str | None = None,
         time_limit_s: float | None = None, top_k: int = 5, baselines: bool = True,
         progress: Callable[[int, int], None] | None = None) -> Plan:
    """Search for the fastest configuration of ``model`` on ``cluster`` that fits in memory.

    ``model`` is a preset name, an ``nn.Module`` (with ``sample_input``), or a Hugging Face config: a
    ``transformers.PretrainedConfig`` or the path of a ``config.json`` (built on meta; the sequence
    length is the config's positions, capped by ``seq_len``).
    With ``baselines`` (default), the plan also records the best configuration each common
    recipe (pure DP, ZeRO-3/FSDP, Megatron-LM) reaches under the same cost model. ``progress(done,
    total)`` is called as the search goes (the CLI draws a bar with it; the library draws nothing).
    """
    global_batch = _check_batch(global_batch)
    _check_search_args(top_k, time_limit_s, constants)  # before tracing: a bad argument fails at once
    spec = resolve_cluster(cluster, nodes=nodes, devices_per_node=devices_per_node)
    resolved = _resolve_model(model, seq_len=seq_len, sample_input=sample_input, dtype=dtype or default_dtype(spec))
    return plan_resolved(resolved, spec, global_batch=global_batch, space=space, constants=constants,
                         time_limit_s=time_limit_s, top_k=top_k, baselines=baselines, progress=progress)


def plan_resolved(resolved: ResolvedModel, spec: ClusterSpec, *, global_batch: int,
                  space: SearchSpace | None = None, constants: CostConstants | None = None,
                  time_limit_s: float | None = None, top_k: int = 5, baselines: bool = True,
                  progress: Callable[[int, int], None] | None = None) -> Plan:
    """:func:`plan` for an already traced model (used by what-if analysis on a stored graph)."""
    global_batch = _check_batch(global_batch)
    _check_search_args(top_k, time_limit_s, constants)
    c = constants or CostConstants()
    space = runnable_space(resolved, space or SearchSpace())
    given = spec
    with _frozen_heap():
        pricer, result, orders = _search_group_orders(Pricer(resolved.graph, spec, c), global_batch, space=space,
                                                      time_limit_s=time_limit_s, top_k=top_k, progress=progress)
        spec = pricer.cluster
        if result.best is None:
            _check_rule(resolved.graph, space)
            raise infeasible_error(resolved.graph, spec, global_batch, result, c, space=space)
        start = time.perf_counter()
        base = run_baselines(resolved.graph, spec, global_batch, c, pricer=pricer,
                             fp8=result.best.config.fp8) if baselines else []
        baseline_s = time.perf_counter() - start
        if space.partition != "balanced" and result.best.config.pp > 1:  # one stage: no split to name
            result.best.prediction.notes.append(_split_note(space.partition))
        out = build_plan(resolved, spec, result.best, c, global_batch=global_batch, result=result, baselines=base,
                         schedule_options=result.schedule_options, tp_solve=result.tp_solve)
    if len(orders) > 1:
        out = replace(out, explanation=out.explanation + (group_order_note(given, spec, orders),))
    out.timings.update({"trace_s": resolved.graph.trace_time_s, "search_s": sum(r.time_s for _, r in orders),
                        "baselines_s": baseline_s})
    return out


MAX_GROUP_ORDERS = 6  # 3 distinct node groups; beyond that the cluster file's order is kept


def group_orders(spec: ClusterSpec) -> list[ClusterSpec]:
    """The cluster with its node groups in every distinct order, the file's order first.

    Ranks go group by group, so the group order decides which device type runs which pipeline
    positions: on a mixed cluster, heavy first or last layers (an embedding, an LM head) may want the
    faster devices. Orders are tried only up to :data:`MAX_GROUP_ORDERS`; with more groups, the
    file's order alone.
    """
    if spec.is_homogeneous:
        return [spec]
    seen: set[tuple] = set()
    out: list[ClusterSpec] = []
    for perm in itertools.permutations(range(len(spec.groups))):
        key = tuple(json.dumps(spec.groups[i].to_dict(), sort_keys=True) for i in perm)
        if key in seen:
            continue
        seen.add(key)
        out.append(replace(spec, groups=tuple(spec.groups[i] for i in perm)))
        if len(out) > MAX_GROUP_ORDERS:
            return [spec]
    return out


def _search_group_orders(pricer: Pricer, global_batch: int, *, space: SearchSpace | None,
                         time_limit_s: float | None, top_k: int, progress: Callable[[int, int], None] | None
                         ) -> tuple[Pricer, SearchResult, list[tuple[ClusterSpec, SearchResult]]]:
    """The search on every node-group order (:func:`group_orders`); the fastest order wins, the
    file's order on ties. Returns the chosen order's Pricer (its cluster is the order) and result,
    and every order's result (for the explanation). The orders' Pricers share the tp solves."""
    start = time.perf_counter()
    runs: list[tuple[Pricer, SearchResult]] = []
    for order in group_orders(pricer.cluster):
        left = None if time_limit_s is None else max(time_limit_s - (time.perf_counter() - start), 0.0)
        at = pricer if order is pricer.cluster else pricer.with_cluster(order)
        result = search(at.graph, order, global_batch, space=space, time_limit_s=left, top_k=top_k,
                        progress=progress, pricer=at, explain=True)
        runs.append((at, result))
    feasible = [r for r in runs if r[1].best is not None]
    chosen = min(feasible, key=lambda r: r[1].best.step_time_s) if feasible else runs[0]
    return chosen[0], chosen[1], [(p.cluster, r) for p, r in runs]


@contextlib.contextmanager
def _frozen_heap() -> Iterator[None]:
    """Leave every object alive now (torch's modules, the traced graph) out of cyclic garbage collection.

    The search allocates millions of short-lived objects, so the collector runs hundreds of times,
    and its full passes re-scanned the millions of long-lived objects imported or traced before:
    0.6 s of a 6.5 s `plan` for GPT-3 175B (0.15 s with them frozen). Freezing them
    (:func:`gc.freeze`) changes nothing computed; reference counting still frees everything. They
    are unfrozen after, unless the caller had frozen objects itself (before a fork, say), which is
    then left as it was.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


_SPLIT_WORDS = {"exact": "the stage solver's optimum of (m-1)·slowest + sum, without local search on the step",
                "uniform": "equal traced layers per chunk",
                "megatron": "equal runs of blocks per chunk, the embedding first and the head last",
                "nanotron": "each rank keeps the block that passes its share of the weights"}


def _check_rule(graph: Any, space: SearchSpace) -> None:
    """Nothing was found under a framework's split: where that rule cannot split the model into any
    pipeline the search allowed, its own error says why (not "no configuration fits")."""
    if space.partition not in FRAMEWORK_SPLITS:
        return
    error = None
    for pp in space.pp or range(2, graph.num_layers + 1):
        if pp < 2:
            return  # an unpipelined configuration needs no split: the reason lies elsewhere
        try:
            FRAMEWORK_SPLITS[space.partition](graph, pp)
            return
        except SpecError as exc:
            error = exc
    if error is not None:
        raise error


def _split_note(partition: str) -> str:
    """The plan's line on a stage split it did not choose itself."""
    whose = {"uniform": "equal layers", "exact": "the exact solver's split"}.get(partition, f"{partition}'s own split")
    return f"stages: {whose} ({_SPLIT_WORDS[partition]}), not the planner's own split"


def evaluate(model: nn.Module | str | Any, cluster: ClusterSpec | str, config: ParallelConfig, *,
             seq_len: int | None = None, sample_input: Any = None, nodes: int | None = None,
             devices_per_node: int | None = None, constants: CostConstants | None = None, dtype: str | None = None,
             partition: str = "balanced", stages: Sequence[tuple[int, int]] | None = None) -> Plan:
    """Price one configuration (no search). The plan says whether it fits.

    ``stages``: each chunk's layers ``(start, stop)``, in chunk order, priced as given instead of a
    split the planner makes (a plan file's own stages, edited by hand: ``evaluate --plan``)."""
    spec = resolve_cluster(cluster, nodes=nodes, devices_per_node=devices_per_node)
    resolved = _resolve_model(model, seq_len=seq_len, sample_input=sample_input, dtype=dtype or default_dtype(spec))
    c = constants or CostConstants()
    check_config(config, resolved.graph, spec)
    # what the runtime cannot run for this model (sequence or context parallelism, selective recompute
    # without `attn` submodules) is refused, naming the knob, as the search leaves it out
    runnable_space(resolved, SearchSpace(sequence_parallel=(config.sequence_parallel,), cp=(config.cp,),
                                         recompute=(config.recompute,)))
    if partition not in PARTITIONS:
        raise SpecError("partition", partition, "use 'balanced' (the exact DP's split, improved on the simulated "
                        "step), 'exact' (the DP's alone), 'uniform' (equal layers per stage), 'megatron' or "
                        "'nanotron' (that framework's own split)")
    if partition in FRAMEWORK_SPLITS:  # its own error where the rule cannot split the model so
        FRAMEWORK_SPLITS[partition](resolved.graph, config.pp * config.virtual_stages)
    pricer = Pricer(resolved.graph, spec, c)
    if stages is not None:
        bounds = _checked_stages(stages, resolved.graph.num_layers, config.pp * config.virtual_stages)
        cand = Candidate(config, bounds, pricer.evaluate(config, bounds), "given")
        if config.pp > 1:
            cand.prediction.notes.append("stages: as given (the plan file's own), not a split the planner made")
    else:
        cand = price_config(pricer, config, rule=partition)
        if partition != "balanced" and config.pp > 1:  # one stage: no split to name
            cand.prediction.notes.append(_split_note(partition))
    return build_plan(resolved, spec, cand, c, global_batch=config.global_batch, result=None,
                      tp_solve=tp_solve_of(pricer, config))


def _checked_stages(stages: Any, num_layers: int, chunks: int) -> tuple[tuple[int, int], ...]:
    """``stages`` as boundaries, if they cut the ``num_layers`` layers into ``chunks`` contiguous non-empty
    chunks in order; else a SpecError naming what is wrong."""
    try:
        bounds = tuple((int(a), int(b)) for a, b in stages)
    except (TypeError, ValueError):
        raise SpecError("stages", stages, "expected (first layer, layer after the last) per chunk") from None
    if len(bounds) != chunks:
        raise SpecError("stages", len(bounds), f"the configuration runs pp x virtual stages = {chunks} chunks: give "
                        "one (start, stop) per chunk")
    edges = [0] + [b for _, b in bounds]
    if any(a != edges[k] for k, (a, _) in enumerate(bounds)) or any(b <= a for a, b in bounds) \
            or edges[-1] != num_layers:
        raise SpecError("stages", [list(b) for b in bounds], f"chunks must cut layers 0..{num_layers} in order, each "
                        "starting where the previous stops and holding at least one layer")
    return bounds


def price_config(pricer: Pricer, config: ParallelConfig, *, balanced: bool = True,
                 rule: str = "balanced") -> Candidate:
    """One given configuration as :func:`evaluate` prices it: the exact partition DP's split,
    improved on the simulated step as the search improves its best (:func:`planner.search.polished`;
    the time-balanced split, status "infeasible", when no split fits in memory), or ``rule``'s
    (:meth:`Pricer.rule_split`), then the cost model."""
    table = pricer.table(table_key(config))
    part = pricer.split(config, table, balanced=balanced, rule=rule)
    status = part.status
    if not part.feasible and part.status != "given":  # nothing fits: price the time-balanced split instead
        part = pricer.split(config, table, c=replace(pricer.c, allocator_usable_fraction=1e9))
        status = "infeasible"
    cand = Candidate(config, part.boundaries, pricer.evaluate(config, part.boundaries, table), status)
    return polished(pricer, cand) if rule == "balanced" else cand


