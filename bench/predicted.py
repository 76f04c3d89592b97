"""Section ``predicted``: our plan against the recipes people use, for the workloads of the literature.

For every workload × cluster the plan's predicted step time is compared with

* the three recipes the plan itself records (``plan.search["baselines"]``): pure data parallelism,
  ZeRO-3/FSDP and the Megatron-LM recipe, each the best configuration inside its recipe;
* three stage partitions people use without a solver, on **the plan's own configuration** (same
  degrees, micro-batching, schedule and memory savers; only the stage boundaries change):
  equal layer counts (DeepSpeed ``partition_method="uniform"``, Megatron's default), DeepSpeed
  ``partition_method="parameters"`` and torchgpipe's ``balance_by_time``, each computed by the real
  package's function (:mod:`bench.partition_baselines`; torchgpipe 0.0.7 and DeepSpeed install with
  torch 2.13).

Everything is priced by the same cost model, so the ratio is the planner's margin over the best
that recipe can do under that model, not a measurement. On the mixed A100 + V100 cluster each
pipeline position is split and priced on its own device type (and both node-group orders are
tried); a configuration whose data-parallel replicas span both types runs at the V100's pace. The
stage solver on its own is benchmarked in the ``inter_op`` section. Most plans for these batch sizes have a
single pipeline stage, where the partitions coincide; the second table therefore compares the
partitions on the best *pipelined* configuration (pp ≥ 2) of each workload as well.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.common import Context, fmt_ratio, fmt_s, md_table, say

GiB = 2**30
WIN = 1.10  # a baseline this much slower than the plan is highlighted


@dataclass(frozen=True)
class Workload:
    model: str
    cluster: str
    nodes: int | None
    global_batch: int
    why: str

    @property
    def key(self) -> str:
        return f"{self.model} / {self.cluster}" + (f" x{self.nodes}" if self.nodes else "")


# Sizes from the papers that trained these models where there is one; "ours" where not.
WORKLOADS: tuple[Workload, ...] = (
    Workload("gpt3-175b", "dgx-a100-80g", 128, 1536, "GPT-3 3.2M-token batch (Brown et al. 2020); 1536 sequences as "
             "in Narayanan et al. 2021"),
    Workload("gpt3-175b", "dgx-h100", 64, 1536, "same job on half as many H100 nodes"),
    Workload("mt-nlg-530b", "dgx-a100-80g", 280, 1920, "280 DGX A100 nodes, batch 1920 (Smith et al. 2022)"),
    Workload("llama2-70b", "dgx-a100-80g", 64, 1024, "4M-token batch of 4096-token sequences (Touvron et al. 2023)"),
    Workload("gpt3-13b", "dgx-a100-80g", 16, 1024, "GPT-3 13B 2M-token batch (Brown et al. 2020)"),
    Workload("megatron-22b", "dgx-a100-80g", 1, 4, "one node, batch 4 (Korthikanti et al. 2022)"),
    Workload("mixtral-8x7b", "dgx-a100-80g", 8, 1024, "ours: 4M-token batch on 64 GPUs"),
    Workload("llama2-7b", "dgx-a100-80g", 4, 1024, "4M-token batch (Touvron et al. 2023) on 32 GPUs"),
    Workload("llama2-7b", "mixed-a100-v100", None, 256, "ours: 1M tokens on 8 A100 + 8 V100"),
    Workload("t5-11b", "dgx-a100-80g", 4, 128, "batch 128 (Raffel et al. 2020)"),
    Workload("t5-11b", "dgx-a100-40g", 8, 128, "same batch, 40 GB devices"),
    Workload("gpt3-1.3b", "dgx-a100-80g", 1, 512, "GPT-3 1.3B 1M-token batch (Brown et al. 2020)"),
    Workload("gpt3-1.3b", "mixed-a100-v100", None, 512, "same job on 8 A100 + 8 V100"),
    Workload("gpt3-1.3b", "dgx1-v100", 2, 512, "same job on 16 V100"),
    Workload("vit-h-14", "dgx-a100-80g", 4, 4096, "batch 4096 (Dosovitskiy et al. 2021)"),
    Workload("bert-large", "dgx-a100-40g", 1, 256, "batch 256 (Devlin et al. 2019)"),
    Workload("bert-large", "mixed-a100-v100", None, 256, "same batch on 8 A100 + 8 V100"),
    Workload("wav2vec2-large", "dgx1-v100", 16, 256, "128 V100 as Baevski et al. 2020; batch 256 clips (ours)"),
    Workload("deepspeech2", "dgx1-v100", 1, 512, "minibatch 512 on 8 GPUs (Amodei et al. 2016)"),
    Workload("resnet50", "dgx-a100-80g", 1, 256, "32 images per GPU (Goyal et al. 2017)"),
    Workload("resnet50", "dgx1-v100", 1, 256, "same on V100"),
    Workload("imbalanced-gpt", "dgx-a100-80g", 1, 64, "ours: 256k vocabulary, uneven layers"),
    Workload("imbalanced-gpt", "mixed-a100-v100", None, 64, "ours: uneven layers on uneven devices"),
)
QUICK: tuple[Workload, ...] = (
    Workload("gpt3-125m", "dgx-a100-80g", 1, 64, "smoke run"),
    Workload("imbalanced-gpt", "dgx-a100-80g", 1, 32, "smoke run"),
)
# Models the issue names that have no preset yet are listed on the page as not available.
WANTED = ("gpt3-175b", "mt-nlg-530b", "megatron-1t", "megatron-22b", "bert-large", "t5-11b", "vit-h-14",
          "wav2vec2-large", "deepspeech2", "llama2-7b", "llama2-70b", "mixtral-8x7b", "resnet50", "imbalanced-gpt")
RECIPES = ("pure-dp", "zero3-fsdp", "megatron-lm")
PARTITIONS = {  # column -> method of bench.partition_baselines
    "uniform": "uniform",
    "DS parameters": "parameters",
    "torchgpipe time": "time",
}


@dataclass
class Row:
    w: Workload
    error: str = ""
    plan_s: float = math.nan
    config: str = ""
    ours_s: float = math.nan
    mfu: float = math.nan
    recipes: dict[str, dict[str, Any]] = field(default_factory=dict)
    partitions: dict[str, tuple[float | None, str]] = field(default_factory=dict)  # name -> (step, note)
    breakdown: dict[str, float] = field(default_factory=dict)
    pipelined: dict[str, Any] = field(default_factory=dict)
    why_win: str = ""

    def baseline_times(self) -> dict[str, float]:
        out = {n: r["step_time_s"] for n, r in self.recipes.items() if r.get("step_time_s")}
        out.update({n: s for n, (s, _) in self.partitions.items() if s is not None})
        return out

    def best_baseline(self) -> tuple[str, float] | None:
        times = self.baseline_times()
        if not times:
            return None
        name = min(times, key=times.get)
        return name, times[name]


def partition_baselines(graph, cluster, cfg, c, *, ours_boundaries) -> dict[str, tuple[Any, str]]:
    """Price ``cfg`` with each baseline's stage boundaries: name -> (StepPrediction | None, note)."""
    from bench.partition_baselines import block_partition, deepspeed_partition_balanced
    from planner.inter_op.chain import uniform_partition
    from planner.pricing import Pricer, table_key

    chunks = cfg.pp * cfg.virtual_stages
    n = graph.num_layers
    pricer = Pricer(graph, cluster, c)
    table = pricer.table(table_key(cfg))  # tp communication priced by the intra-op ILP
    out: dict[str, tuple[Any, str]] = {}
    for column, method in PARTITIONS.items():
        if method == "uniform":
            bounds = list(uniform_partition(n, chunks))
        elif method == "parameters":  # DeepSpeed counts a tied weight again in every stage that builds it
            counts = [getattr(layer, "total_param_count", layer.param_count) for layer in graph.layers]
            cuts = deepspeed_partition_balanced(counts, chunks)
            bounds = list(zip(cuts, cuts[1:]))
        else:  # torchgpipe profiles forward + backward per layer in integer microseconds
            micros = [int(t * 1_000_000) for t in table.total_s]
            sizes = block_partition(micros, chunks)
            bounds, start = [], 0
            for s in sizes:
                bounds.append((start, start + s))
                start += s
        if any(a >= b for a, b in bounds):
            out[column] = (None, "leaves a stage empty")
            continue
        if tuple(bounds) == tuple(ours_boundaries):
            note = "same split as the plan"
        else:
            note = "layers " + "/".join(str(b - a) for a, b in bounds)
        pred = pricer.evaluate(cfg, bounds, table)
        if not pred.fits:
            out[column] = (None, f"over memory ({pred.peak_memory_bytes / GiB:.1f} GiB)")
            continue
        out[column] = (pred, note)
    return out


def _recipe_candidate(graph, cluster, global_batch: int, name: str, c):
    from planner.baselines import baseline_spaces
    from planner.search import search

    _, space = baseline_spaces(cluster, has_sequence=bool(graph.seq_len))[name]
    return search(graph, cluster, global_batch, space=space, constants=c, top_k=1).best


def _why(ours: dict[str, float], ours_cfg: str, ours_mem: float, theirs: dict[str, float], name: str,
         their_cfg: str, their_mem: float) -> str:
    """The breakdown terms where the baseline spends the most extra time, in seconds per step."""
    diffs = sorted(((theirs.get(k, 0.0) - ours.get(k, 0.0), k) for k in set(ours) | set(theirs)), reverse=True)
    parts = [f"{k} {theirs.get(k, 0.0):.3g} s vs {ours.get(k, 0.0):.3g} s" for d, k in diffs[:3] if d > 1e-9]
    saved = [f"{k} {ours.get(k, 0.0):.3g} s vs {theirs.get(k, 0.0):.3g} s" for d, k in diffs if d < -1e-9]
    text = f"{name} `{their_cfg}` against the plan `{ours_cfg}`: " + ("; ".join(parts) or "no single term")
    if saved:
        text += f" (the plan pays more in {saved[-1]})"
    return text + f"; peak memory per device {their_mem / GiB:.1f} GiB vs {ours_mem / GiB:.1f} GiB."


def run_workload(w: Workload) -> Row:
    from planner.api import default_dtype, plan_resolved, resolve_cluster, resolve_model
    from planner.cost.constants import CostConstants

    row = Row(w)
    c = CostConstants()
    start = time.perf_counter()
    spec = resolve_cluster(w.cluster, nodes=w.nodes)
    resolved = resolve_model(w.model, dtype=default_dtype(spec))
    p = plan_resolved(resolved, spec, global_batch=w.global_batch, constants=c)
    row.plan_s = time.perf_counter() - start
    cfg = p.parallel
    row.config, row.ours_s, row.mfu = cfg.label(), p.predicted.step_time_s, p.predicted.mfu
    row.breakdown = dict(p.predicted.time_breakdown_s)
    row.recipes = {b["name"]: b for b in p.search.get("baselines", [])}
    ours_bounds = tuple((s.layer_start, s.layer_stop) for s in p.stages)
    graph = resolved.graph
    preds: dict[str, tuple[Any, str]] = {}
    if cfg.pp * cfg.virtual_stages > 1:
        preds = partition_baselines(graph, spec, cfg, c, ours_boundaries=ours_bounds)
        row.partitions = {k: (v.step_time_s if v is not None else None, note) for k, (v, note) in preds.items()}
    else:
        row.partitions = {k: (None, "one stage: same as the plan") for k in PARTITIONS}
    best = row.best_baseline()
    if best and best[1] > WIN * row.ours_s:
        name, _ = best
        if name in row.recipes:
            cand = _recipe_candidate(graph, spec, w.global_batch, name, c)
            theirs = dict(cand.prediction.time_breakdown_s) if cand else {}
            their_cfg = cand.config.label() if cand else row.recipes[name]["config"]
            their_mem = cand.prediction.peak_memory_bytes if cand else math.nan
        else:
            theirs, their_cfg = dict(preds[name][0].time_breakdown_s), f"{cfg.label()}, {name} split"
            their_mem = preds[name][0].peak_memory_bytes
        row.why_win = _why(row.breakdown, row.config, p.predicted.peak_memory_bytes, theirs, name, their_cfg,
                           their_mem)
    row.pipelined = _pipelined(graph, spec, w, p, c, ours_bounds)
    return row


def _pipelined(graph, spec, w: Workload, p, c, ours_bounds) -> dict[str, Any]:
    """The best configuration with pp ≥ 2 (the plan's own when it pipelines) and its partitions."""
    from planner.search import SearchSpace, search

    cfg = p.parallel
    if cfg.pp > 1:
        out = {"config": cfg, "ours": p.predicted.step_time_s, "bounds": ours_bounds, "own": True}
    else:
        pps = tuple(d for d in range(2, min(spec.num_devices, graph.num_layers) + 1) if spec.num_devices % d == 0)
        if not pps:
            return {"error": "no pipeline degree divides the devices"}
        res = search(graph, spec, w.global_batch, space=SearchSpace(pp=pps), constants=c, top_k=1)
        if res.best is None:
            return {"error": "no pipelined configuration fits"}
        cfg = res.best.config
        out = {"config": cfg, "ours": res.best.step_time_s, "bounds": tuple(res.best.boundaries), "own": False}
    preds = partition_baselines(graph, spec, cfg, c, ours_boundaries=out["bounds"])
    out["partitions"] = {k: (v.step_time_s if v is not None else None, note) for k, (v, note) in preds.items()}
    out["layers"] = "/".join(str(b - a) for a, b in out["bounds"])
    return out


def _speedup_cell(step: float | None, ours: float, note: str = "") -> str:
    if step is None:
        return note or "—"
    return f"{fmt_s(step)} ({step / ours:.2f}x)"


def _figure(ctx: Context, rows: list[Row]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r.error]
    if not ok:
        return ""
    path, link = ctx.figure_path("predicted_speedup")
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(ok) + 1.5))
    from matplotlib.ticker import FormatStrFormatter

    names = list(RECIPES) + list(PARTITIONS)
    style = {n: (m, f"C{k}") for k, (n, m) in enumerate(zip(names, "osD^vx"))}
    for i, r in enumerate(ok):
        times = r.baseline_times()
        for n in names:
            if n in times and not (n in PARTITIONS and r.partitions[n][1] == "same split as the plan"):
                ax.scatter(times[n] / r.ours_s, i, marker=style[n][0], color=style[n][1], s=28)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.axvline(WIN, color="grey", lw=0.8, ls="--")
    ax.set_yticks(range(len(ok)), [r.w.key for r in ok], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    for axis_fmt in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
        axis_fmt(FormatStrFormatter("%.1f"))
    ax.tick_params(axis="x", which="both", labelsize=7)
    ax.set_xlabel(f"baseline step time / plan step time (predicted; > 1: the plan is faster; dashed: {WIN:.2f})")
    handles = [plt.Line2D([], [], marker=style[n][0], ls="", color=style[n][1]) for n in names]
    ax.legend(handles, names, fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return link


def section(ctx: Context) -> str:
    from planner.models import list_presets

    rows = _run_rows(QUICK if ctx.quick else WORKLOADS)
    have = set(list_presets())
    missing = [m for m in WANTED if m not in have]
    lines = ["## Predicted step time: plan vs baselines\n", __doc__.split("\n\n", 1)[1].strip(), "",
             "Ratio = plan / best baseline (≤ 1.00: the plan is at least as fast as every baseline). "
             f"**Bold**: the best baseline is more than {WIN - 1:.0%} slower than the plan (explained below). "
             "Baseline cells: predicted step time in seconds and (baseline / plan).", ""]
    table, wins, problems = _plan_table(rows)
    lines.append(table)
    link = _figure(ctx, rows)
    if link:
        lines += ["", f"![baseline / plan step time per workload]({link})", "",
                  "_Figure: `python -m bench --only predicted` (this section; the PNG is written with the page)._"]
    lines += ["", f"### Where the plan wins by more than {WIN - 1:.0%}, and why", "",
              "From the cost model's step-time breakdown (busiest device) of the plan and of the best baseline "
              "configuration (largest extra terms first):", ""]
    lines += wins or ["(none in this run)"]
    lines += ["", "### Stage partitions on the best pipelined configuration (pp ≥ 2)", "",
              "Same configuration for every column; only the layer-to-stage split differs. The plan's split is the "
              "exact memory-aware min-max DP of the search. For workloads whose plan does not pipeline, the "
              "configuration is the best the search finds with pp ≥ 2 (so this is not the plan).", ""]
    lines.append(_partition_table(rows, problems))
    if missing:
        lines += ["", "Models named in the issue without a preset yet (not benchmarked): " + ", ".join(missing) + "."]
    if problems:
        lines += ["", "### Problems found in this run", ""] + [f"* {p}" for p in problems]
    return "\n".join(lines)


def _run_rows(work: Sequence[Workload]) -> list[Row]:
    """Each workload planned and priced; one that fails keeps its error and does not hide the others."""
    rows: list[Row] = []
    for w in work:
        say(f"{w.key} batch {w.global_batch}")
        try:
            rows.append(run_workload(w))
        except Exception as exc:  # one broken workload must not hide the others
            rows.append(Row(w, error=f"{type(exc).__name__}: {str(exc)[:200]}"))
            say(f"  error: {rows[-1].error}")
    return rows


def _plan_table(rows: list[Row]) -> tuple[str, list[str], list[str]]:
    """The plan-vs-baselines table, the explained wins, and the problems found (a baseline faster)."""
    headers = ["workload", "GPUs", "batch", "plan config", "plan step (s)", "MFU", *RECIPES, *PARTITIONS,
               "plan / best baseline", "plan wall (s)"]
    table, wins, problems = [], [], []
    for r in rows:
        if r.error:
            table.append([r.w.key, "", r.w.global_batch, f"error: {r.error}", *[""] * (len(headers) - 4)])
            problems.append(f"{r.w.key}: {r.error}")
            continue
        best = r.best_baseline()
        ratio = r.ours_s / best[1] if best else math.nan
        if best and ratio > 1.0005:
            problems.append(f"{r.w.key}: {best[0]} is faster than the plan ({fmt_s(best[1])} s vs "
                            f"{fmt_s(r.ours_s)} s, ratio {ratio:.3f}).")
        cells = []
        for n in RECIPES:
            b = r.recipes.get(n, {})
            cells.append(_speedup_cell(b.get("step_time_s"), r.ours_s, "does not fit" if b else "—"))
        for n in PARTITIONS:
            step, note = r.partitions[n]
            cells.append(_speedup_cell(step, r.ours_s, note) if note != "same split as the plan"
                         else f"{fmt_s(step)} (same split)")
        ratio_cell = fmt_ratio(ratio) + (f" vs {best[0]}" if best else " (no baseline fits)")
        if r.why_win:
            ratio_cell = f"**{ratio_cell}**"
            wins.append(f"* **{r.w.key}** (plan {1 / ratio:.2f}x faster than the best baseline): {r.why_win}")
        table.append([r.w.key, _gpus(r.w), r.w.global_batch, f"`{r.config}`", fmt_s(r.ours_s), f"{r.mfu:.1%}",
                      *cells, ratio_cell, f"{r.plan_s:.1f}"])
    return md_table(headers, table), wins, problems


def _partition_table(rows: list[Row], problems: list[str]) -> str:
    """The stage-partition table of each workload's best pipelined configuration; a baseline split that
    beats the DP's is added to ``problems``."""
    ptable = []
    for r in rows:
        if r.error:
            continue
        pl = r.pipelined
        if "error" in pl:
            ptable.append([r.w.key, pl["error"], "", "", "", "", "", ""])
            continue
        cells = []
        steps = []
        for n in PARTITIONS:
            step, note = pl["partitions"][n]
            if step is not None:
                steps.append(step)
            cells.append(_speedup_cell(step, pl["ours"], note) if note != "same split as the plan"
                         else f"{fmt_s(step)} (same split)")
        ratio = pl["ours"] / min(steps) if steps else math.nan
        if steps and ratio > 1.0005:
            problems.append(f"{r.w.key} pipelined: a baseline split beats the DP split ({ratio:.3f}).")
        ptable.append([r.w.key, f"`{pl['config'].label()}`" + (" (the plan)" if pl["own"] else ""),
                       pl["layers"], fmt_s(pl["ours"]), *cells, fmt_ratio(ratio)])
    return md_table(["workload", "configuration", "DP split (layers per chunk)", "DP split step (s)",
                     *PARTITIONS, "DP / best baseline split"], ptable)


def _gpus(w: Workload) -> int | str:
    try:
        from planner.api import resolve_cluster

        return resolve_cluster(w.cluster, nodes=w.nodes).num_devices
    except Exception:  # noqa: BLE001 - the row already reports the error
        return "?"
