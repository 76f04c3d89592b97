"""Price every measured case with the cost model, and summarise predicted against measured.

Each distinct model is traced once (two blocks, then the block repeated: identical blocks cost the
same, :func:`planner.cost.calibrate.repeat_block`), each (model, cluster, tp, micro-batch, sequence
parallelism, recompute) layer table is built once (one :class:`planner.pricing.Pricer` per model,
cluster and constants), and each configuration is priced as :func:`planner.api.evaluate` prices it:
the memory-aware partition DP for its stage boundaries (the time-balanced split when nothing fits,
then reported as not fitting), then the cost model. No search, no processes.

Predicted and measured throughput are both tokens per second per GPU: global batch × sequence ÷
(step time × GPUs). Errors are on step time (predicted ÷ measured; below 1 is optimistic).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from planner import schedules
from planner.cluster import ClusterSpec
from planner.cost.constants import CostConstants, trainer_constants
from planner.errors import SpecError
from planner.pricing import Pricer, table_key
from planner.trace import CostGraph, trace_model
from planner.validation import metrics
from planner.validation.cases import ATTENTION_KERNELS, Case, ClusterRef, ModelSpec, Skip, sweep_cluster_dict

GiB = 2**30


@dataclass(frozen=True, kw_only=True)
class Priced:
    case: Case
    predicted_step_s: float
    fits: bool
    peak_memory_gib: float
    breakdown_s: dict[str, float]
    notes: tuple[str, ...] = ()

    @property
    def predicted_tokens_per_s_per_gpu(self) -> float:
        return self.case.tokens_per_step / (self.predicted_step_s * self.case.gpus)

    @property
    def step_ratio(self) -> float | None:
        """Predicted ÷ measured step time (below 1: the prediction is too optimistic)."""
        m = self.case.measured_step_s
        return None if m is None else self.predicted_step_s / m


def interpolate_log(points: list[tuple[float, float]], x: float) -> float:
    """Piecewise-linear in (log x, log y) through ``points`` (sorted by x), clamped at both ends."""
    xs = [math.log(p[0]) for p in points]
    ys = [math.log(p[1]) for p in points]
    return float(math.exp(np.interp(math.log(x), xs, ys)))


def _with_device_fields(spec: ClusterSpec, fields: dict[str, dict[str, Any]]) -> ClusterSpec:
    """``spec`` with device fields replaced on every node group whose device has a name in ``fields``."""
    return replace(spec, groups=tuple(replace(g, device=replace(g.device, **fields[g.device.name]))
                                      if g.device.name in fields else g for g in spec.groups))


class CasePricer:
    """Owns the caches (graphs, clusters, and a :class:`planner.pricing.Pricer` per model, cluster and
    constants: its layer tables, tp solves) shared by every case it prices.

    ``network`` says how a sweep's cluster (:func:`~planner.validation.cases.sweep_cluster_dict`; the shared
    sweep's is ``datasets/measured/nanotron-h100-efa.json``) reaches the cost model:

    * ``"file"`` (default): as the file says, its measured ``collectives`` included, for the cost
      model to interpolate (:mod:`planner.cost.measured`).
    * ``"busbw"``: without ``collectives``; a cluster of ``N`` nodes gets the inter-node bandwidth
      that makes the alpha-beta ring's bus bandwidth (``bandwidth × network_efficiency``) equal the
      all-reduce bus bandwidth measured at ``N`` nodes (log-log interpolation). Used automatically
      when :mod:`planner.cluster` has no ``collectives`` field, so that the file still loads.
    """

    def __init__(self, *, network: str = "file",
                 device_overrides: dict[str, dict[str, float]] | None = None,
                 sweep_overrides: dict[str, float] | None = None,
                 kernel_overrides: dict[str, dict[str, float]] | None = None,
                 graphs: dict[ModelSpec, CostGraph] | None = None,
                 overrides: dict[str, Any] | None = None) -> None:
        if network not in ("file", "busbw"):
            raise SpecError("network", network, "use 'file' or 'busbw'")
        # Fields the caller set: they win over a trainer's profile (a value equal to the default included:
        # 0 switches off a trainer's term).
        self.overrides = dict(overrides or {})
        self.c = replace(CostConstants(), **self.overrides)
        # Device fields to replace on every cluster whose device has this name (fitting a device's
        # sustained efficiencies: tools/fit_cluster.py).
        self.device_overrides = device_overrides or {}
        # Dotted fields of the sweep's cluster file to replace ("intra_node.latency_s": fitting its links).
        self.sweep_overrides = sweep_overrides or {}
        # A named attention kernel's sustained fraction per device, replacing ATTENTION_KERNELS' figure
        # (fitting it: tools/fit_cluster.py ``--param attention_kernel.NAME``).
        self.kernel_overrides = kernel_overrides or {}
        self._constants: dict[tuple, CostConstants] = {}
        self.network = network
        # Traced graphs depend on the model alone: a caller pricing the same cases under several overrides
        # (tools/fit_cluster.py's grid) passes one dict to every pricer and traces each model once.
        self._graphs: dict[ModelSpec, CostGraph] = {} if graphs is None else graphs
        self._clusters: dict[ClusterRef, tuple[ClusterSpec, tuple[str, ...]]] = {}
        self._pricers: dict[tuple, Pricer] = {}
        self.trace_s = 0.0

    def constants(self, trainer: str, settings: tuple[tuple[str, Any], ...] = ()) -> CostConstants:
        """The constants for a case run by ``trainer``: its profile, the settings its source states,
        then the caller's overrides."""
        hit = self._constants.get((trainer, settings))
        if hit is None:
            base = replace(trainer_constants(trainer, self.c), **dict(settings))
            hit = self._constants[(trainer, settings)] = replace(base, **self.overrides)
        return hit

    # -- models ------------------------------------------------------------------------------------
    def graph(self, spec: ModelSpec) -> CostGraph:
        g = self._graphs.get(spec)
        if g is None:
            start = time.perf_counter()
            g = build_graph(spec)
            self.trace_s += time.perf_counter() - start
            self._graphs[spec] = g
        return g

    # -- clusters ----------------------------------------------------------------------------------
    def cluster(self, ref: ClusterRef) -> tuple[ClusterSpec, tuple[str, ...]]:
        hit = self._clusters.get(ref)
        if hit is None:
            hit = self._clusters[ref] = self._build_cluster(ref)
        return hit

    def _build_cluster(self, ref: ClusterRef) -> tuple[ClusterSpec, tuple[str, ...]]:
        notes: list[str] = []
        if ref.preset == "sweep":
            d = sweep_cluster_dict(ref.source_file or None)
            for dotted, value in self.sweep_overrides.items():
                *path, last = dotted.split(".")
                node = d
                for key in path:
                    node = node[key]
                node[last] = value
            if self.network == "busbw":
                collectives = d.pop("collectives", None)
                if collectives and ref.nodes > 1:
                    pts = [(p["nodes"], p["bus_bandwidth_bytes_per_s"]) for p in collectives["all_reduce"]]
                    busbw = interpolate_log(sorted(pts), ref.nodes)
                    d["inter_node"] = dict(d["inter_node"], bandwidth_bytes_per_s=busbw / self.c.network_efficiency)
                    notes.append(f"inter-node bandwidth from the all-reduce bus bandwidth measured at {ref.nodes} "
                                 f"nodes ({busbw / 1e9:.0f} GB/s)")
            spec = ClusterSpec.from_dict(d, source=f"the cluster of {ref.source_file or 'the shared sweep'}")
        else:
            spec = ClusterSpec.preset(ref.preset)
        spec = spec.resized(nodes=ref.nodes, devices_per_node=ref.devices_per_node)
        if self.device_overrides:
            spec = _with_device_fields(spec, self.device_overrides)
        if ref.attention_kernel:  # the kernel the run's source names, not the device's FlashAttention-2 class
            kernel = {**ATTENTION_KERNELS[ref.attention_kernel], **self.kernel_overrides.get(ref.attention_kernel, {})}
            spec = _with_device_fields(spec, {name: {"fused_attention_efficiency": eff} for name, eff in kernel.items()})
        if ref.memory_gib:
            groups = tuple(replace(g, device=replace(g.device, memory_bytes=int(ref.memory_gib * 2**30)))
                           for g in spec.groups)
            spec = replace(spec, groups=groups)
        return spec, tuple(notes)

    # -- configurations ----------------------------------------------------------------------------
    def price(self, case: Case) -> Priced | Skip:
        cfg, k = case.config, case.model.kwargs
        if k["heads"] % cfg.tp:
            return Skip(case.source, case.case_id, "tp does not divide the attention heads")
        graph = self.graph(case.model)
        if cfg.pp * cfg.virtual_stages > graph.num_layers:
            return Skip(case.source, case.case_id, "more pipeline stages than layers")
        try:
            schedules.get_schedule(cfg.schedule).validate(cfg.pp, cfg.num_micro_batches, cfg.virtual_stages)
        except ValueError:
            return Skip(case.source, case.case_id, f"{cfg.schedule}: micro-batches not a valid count for pp, v")
        cluster, notes = self.cluster(case.cluster)
        extra = list(notes)
        if cfg.tp > cluster.devices_per_node:
            extra.append("tp across nodes (plans refuse it; priced with the cost model's group links)")
        c = self.constants(case.trainer, case.settings)
        key = (case.model, case.cluster, case.trainer, case.settings)
        pricer = self._pricers.get(key)
        if pricer is None:
            pricer = self._pricers[key] = Pricer(graph, cluster, c)
        table = pricer.table(table_key(cfg))
        part = pricer.split(cfg, table)
        feasible = part.feasible or part.status == "given"
        if not feasible:  # nothing fits: price the time-balanced split, as planner.api.evaluate does
            part = pricer.split(cfg, table, c=replace(c, allocator_usable_fraction=1e9))
        pred = pricer.evaluate(cfg, part.boundaries, table)
        return Priced(case=case, predicted_step_s=pred.step_time_s, fits=bool(pred.fits and feasible),
                      peak_memory_gib=pred.peak_memory_bytes / GiB, breakdown_s=dict(pred.time_breakdown_s),
                      notes=tuple(extra) + case.approximations)


def build_graph(spec: ModelSpec) -> CostGraph:
    """Trace ``spec`` on meta with two blocks (a mixture of experts with dense first blocks: those and one
    expert block), then repeat the last block to its depth."""
    from planner.cost.calibrate import repeat_block
    from planner.models import ModelPreset

    k = spec.kwargs
    layers = k["num_layers"]
    traced = min(layers, max(2, int(k.get("first_dense_layers") or 0) + 1))
    preset = ModelPreset(name=spec.name, family=spec.family, config=dict(k, num_layers=traced))
    module = preset.build(device="meta")
    graph = trace_model(module, preset.sample_input(1), name=spec.name, dtype=spec.dtype, seq_len=spec.seq_len,
                        copy_model=False)
    return repeat_block(graph, layers) if layers > traced else graph


# -- summaries ------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class GroupSummary:
    group: str
    configs_ok: int
    configs_failed: int
    healthy: int
    top1: float
    top1_pick: str
    best: str
    spearman: float
    error: float  # median |predicted/measured step time - 1| over the healthy configurations
    median_ratio: float  # median predicted/measured step time over the healthy configurations
    fit_ok: float  # share of the runs that ran predicted to fit
    fit_failed: float  # share of the failed runs predicted not to fit

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _finite(getattr(self, f.name)) for f in fields(self)}


def _finite(x: Any) -> Any:
    return None if isinstance(x, float) and math.isnan(x) else x


def summarise_group(group: str, priced: list[Priced]) -> GroupSummary:
    ran = [p for p in priced if p.case.status == "ok"]
    failed = [p for p in priced if p.case.status == "failed"]
    if ran:
        measured = [p.case.measured_tokens_per_s_per_gpu or 0.0 for p in ran]
        predicted = [p.predicted_tokens_per_s_per_gpu for p in ran]
        t1, pick = metrics.top1(predicted, measured, [p.fits for p in ran])
        best = ran[int(np.argmax(measured))].case.config.label()
        ok = metrics.healthy(measured)
        hp = [p for p, h in zip(ran, ok) if h]
        rho = metrics.spearman([p.predicted_tokens_per_s_per_gpu for p in hp],
                               [p.case.measured_tokens_per_s_per_gpu for p in hp])
        ratios = [p.step_ratio for p in hp]
        err, med = metrics.median_abs_error(ratios), metrics.nan_median(ratios)
        pick_label = ran[pick].case.config.label() if pick is not None else "none predicted to fit"
    else:
        t1, rho, err, med, best, pick_label, hp = math.nan, math.nan, math.nan, math.nan, "-", "-", []
    return GroupSummary(group=group, configs_ok=len(ran), configs_failed=len(failed), healthy=len(hp), top1=t1,
                        top1_pick=pick_label, best=best, spearman=rho, error=err, median_ratio=med,
                        fit_ok=metrics.share([p.fits for p in ran]),
                        fit_failed=metrics.share([not p.fits for p in failed]))


def _group_sort_key(group: str) -> tuple:
    model, _, gpus = group.rpartition(":")
    return (model, int(gpus) if gpus.isdigit() else 0)


@dataclass
class Validation:
    priced: list[Priced] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    price_s: float = 0.0
    trace_s: float = 0.0

    def of(self, source: str) -> list[Priced]:
        return [p for p in self.priced if p.case.source == source]

    def groups(self, source: str = "sweep") -> list[GroupSummary]:
        by: dict[str, list[Priced]] = {}
        for p in self.of(source):
            by.setdefault(p.case.group, []).append(p)
        return [summarise_group(g, by[g]) for g in sorted(by, key=_group_sort_key)]

    def residual_bands(self) -> dict[str, Any]:
        """Measured ÷ predicted step time per regime (:mod:`planner.uncertainty`) over the runs a
        prediction is judged on: the sweep's healthy configurations and every published run."""
        from planner.uncertainty import bands_from_ratios, regime

        ratios: dict[str, list[float]] = {}
        for source in ("sweep", "published"):
            runs = [p for p in self.of(source) if p.case.status == "ok" and p.step_ratio]
            if source == "sweep":
                best: dict[str, float] = {}
                for p in runs:
                    best[p.case.group] = max(best.get(p.case.group, 0.0), p.case.measured_tokens_per_s_per_gpu or 0.0)
                runs = [p for p in runs if (p.case.measured_tokens_per_s_per_gpu or 0.0)
                        >= metrics.HEALTHY_FRACTION * best[p.case.group]]
            for p in runs:
                key = regime(p.case.cluster.nodes, p.case.config.pp, p.case.config.tp)
                ratios.setdefault(key, []).append(1.0 / p.step_ratio)
        return bands_from_ratios(ratios)

    def overall(self, source: str = "sweep") -> dict[str, float]:
        """Medians over groups (top-1, Spearman, error), the worst group's top-1, and the fit shares
        pooled over every run of ``source``."""
        gs = self.groups(source)
        runs = self.of(source)
        ran = [p for p in runs if p.case.status == "ok"]
        failed = [p for p in runs if p.case.status == "failed"]
        ratios = [p.step_ratio for p in ran if p.step_ratio is not None]
        return {
            "groups": len(gs),
            "top1_median": metrics.nan_median([g.top1 for g in gs]),
            "top1_min": min((g.top1 for g in gs if not math.isnan(g.top1)), default=math.nan),
            "spearman_median": metrics.nan_median([g.spearman for g in gs]),
            "error_median": metrics.nan_median([g.error for g in gs]),
            "fit_ok": metrics.share([p.fits for p in ran]),
            "fit_failed": metrics.share([not p.fits for p in failed]),
            "within_15": metrics.share([abs(r - 1) <= 0.15 for r in ratios]),
            "runs_ok": len(ran),
            "runs_failed": len(failed),
        }


def validate_cases(cases: list[Case], *, network: str = "file", device_overrides: dict[str, dict[str, float]] | None = None,
                   sweep_overrides: dict[str, float] | None = None,
                   kernel_overrides: dict[str, dict[str, float]] | None = None,
                   graphs: dict[ModelSpec, CostGraph] | None = None,
                   overrides: dict[str, Any] | None = None) -> Validation:
    pricer = CasePricer(network=network, device_overrides=device_overrides, sweep_overrides=sweep_overrides,
                        kernel_overrides=kernel_overrides, graphs=graphs, overrides=overrides)
    out = Validation()
    start = time.perf_counter()
    for case in cases:
        try:
            result = pricer.price(case)
        except SpecError as exc:  # the cost model refuses the configuration: a skip with its reason
            result = Skip(case.source, case.case_id, f"planner refuses it: {exc.field}")
        if isinstance(result, Skip):
            out.skipped.append(result)
        else:
            out.priced.append(result)
    out.price_s = time.perf_counter() - start - pricer.trace_s
    out.trace_s = pricer.trace_s
    return out
