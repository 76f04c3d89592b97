"""What every exporter shares: the result type, the plan's layers by kind, pricing the nearest plan, writers.

An exporter turns a :class:`~planner.plan.Plan` into the files one training framework reads. A
framework may lack a knob the plan sets (an uneven stage split, a schedule, a ZeRO stage): the
exporter then writes the nearest configuration the framework *can* run, lists each loss, and
:func:`price` prices that nearest configuration with the same cost model as the plan, so the user
sees what the framework's limit costs in predicted step time.

Layers by kind: frameworks count *decoder layers* (``--num-layers`` in Megatron-LM, ``n_layers`` in
torchtitan), while a plan's stages cut the traced layer list, which also holds the embedding before
the first block and the final norm / LM head after the last.
:func:`planner.inter_op.framework_splits.layer_kinds` names each traced layer ``pre``, ``block`` or
``post``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

from planner.inter_op.framework_splits import (  # noqa: F401  (the exporters' names for them)
    block_boundaries,
    even_block_counts,
    layer_kinds,
    uniform_block_counts,
)
from planner.plan import ParallelConfig, Plan


@dataclass(frozen=True)
class Loss:
    """One knob of the plan the framework cannot express: the plan's value, what is written instead, why."""

    knob: str
    plan_value: str
    written: str
    why: str


@dataclass
class ExportResult:
    """The files of one export (name -> text), what is kept and lost, and both predicted step times.

    ``nearest`` / ``nearest_boundaries`` are the configuration and stage split the files describe
    when something is lost (``None`` when the framework expresses the plan exactly);
    ``nearest_step_s`` / ``nearest_fits`` are the cost model's prediction for them.
    """

    framework: str
    version: str  # the framework version whose field names the files use
    files: dict[str, str]
    kept: list[str]
    lost: list[Loss] = field(default_factory=list)
    plan_step_s: float = math.nan
    nearest: ParallelConfig | None = None
    nearest_boundaries: tuple[tuple[int, int], ...] | None = None
    nearest_step_s: float | None = None
    nearest_fits: bool | None = None
    notes: list[str] = field(default_factory=list)

    def summary_lines(self) -> list[str]:
        """What the CLI prints and LOST.md holds: kept, lost, and both step times."""
        out = [f"{self.framework} ({self.version}): kept {', '.join(self.kept) if self.kept else 'nothing'}"]
        if not self.lost:
            out.append(f"nothing lost; predicted step {self.plan_step_s:.4g} s (the plan's)")
        for loss in self.lost:
            out.append(f"LOST {loss.knob}: plan {loss.plan_value} -> written {loss.written} ({loss.why})")
        if self.lost and self.nearest is not None:
            fit = "fits" if self.nearest_fits else "DOES NOT FIT"
            out.append(f"plan: predicted step {self.plan_step_s:.4g} s")
            out.append(f"nearest expressible: {self.nearest.label()}, stages "
                       f"{stage_sizes(self.nearest_boundaries or ())}: predicted step {self.nearest_step_s:.4g} s "
                       f"({fit}; {self.nearest_step_s / self.plan_step_s:.3f}x the plan)")
        out += [f"note: {n}" for n in self.notes]
        return out

    def lost_markdown(self) -> str:
        lines = [f"# What {self.framework} cannot express of this plan\n"]
        if not self.lost:
            lines.append("Nothing: the files express the plan exactly.\n")
        else:
            lines.append("| knob | plan | written | why |\n|---|---|---|---|")
            lines += [f"| {x.knob} | {x.plan_value} | {x.written} | {x.why} |" for x in self.lost]
            if self.nearest is not None:
                fit = "fits" if self.nearest_fits else "does not fit"
                lines.append(f"\nPredicted step time (same cost model, `python -m planner export`): plan "
                             f"{self.plan_step_s:.4g} s; the nearest configuration {self.framework} expresses "
                             f"(`{self.nearest.label()}`, layers per stage {stage_sizes(self.nearest_boundaries or ())}) "
                             f"{self.nearest_step_s:.4g} s, {fit} ({self.nearest_step_s / self.plan_step_s:.3f}x).")
        if self.notes:
            lines.append("\n" + "\n".join(f"* {n}" for n in self.notes))
        return "\n".join(lines) + "\n"


def stage_sizes(boundaries: Any) -> list[int]:
    return [b - a for a, b in boundaries]


def boundaries_of(plan: Plan) -> tuple[tuple[int, int], ...]:
    """The plan's stage boundaries in model order (chunk index order)."""
    return tuple((s.layer_start, s.layer_stop) for s in sorted(plan.stages, key=lambda s: s.index))


def block_counts(plan: Plan, boundaries: Any) -> list[int]:
    """Decoder blocks in each stage of ``boundaries``."""
    kinds = layer_kinds(plan.model.layer_names)
    return [sum(1 for k in kinds[a:b] if k == "block") for a, b in boundaries]


def block_split(plan: Plan, counts: list[int]) -> tuple[tuple[int, int], ...]:
    """Stage boundaries over the plan's traced layers with ``counts`` blocks per stage
    (:func:`planner.inter_op.framework_splits.block_boundaries`)."""
    return block_boundaries(plan.model.layer_names, counts)


def plan_graph(plan: Plan) -> Any:
    """The plan's cost graph: its preset traced again (as the plan was), or for a plan of a Python module
    (no preset) its stored cost graph, which rounds a few layer figures (``planner.graph_io``)."""
    from planner.errors import SpecError
    from planner.graph_io import graph_from_dict
    from planner.resolve import resolve_model

    if plan.model.preset:
        return resolve_model(plan.model.preset, seq_len=plan.model.seq_len, dtype=plan.model.dtype).graph
    if plan.graph:
        return graph_from_dict(plan.graph)
    raise SpecError("plan", plan.model.name, "this plan file has neither a model preset nor a stored cost "
                    "graph; price the nearest configuration with planner.evaluate(module, ...)")


def price(plan: Plan, cfg: ParallelConfig, boundaries: Any, graph: Any = None) -> tuple[float, bool]:
    """(step time, fits) of ``cfg`` with stages ``boundaries``, priced as ``planner.evaluate`` prices a
    configuration: on :func:`plan_graph` (or ``graph``), the plan's cluster and constants."""
    from planner.cost.constants import CostConstants
    from planner.pricing import Pricer

    known = set(CostConstants.__dataclass_fields__)
    c = CostConstants(**{k: v for k, v in plan.cost_constants.items() if k in known})
    pricer = Pricer(graph if graph is not None else plan_graph(plan), plan.cluster, c)
    pred = pricer.evaluate(cfg, tuple(boundaries))
    return pred.step_time_s, bool(pred.fits)


def finish(result: ExportResult, plan: Plan, nearest: ParallelConfig, boundaries: Any,
           graph: Any = None) -> ExportResult:
    """Fill the plan's and (when something is lost) the nearest configuration's predicted step times
    (``graph``: the plan's cost graph when the exporter already has it)."""
    result.plan_step_s = plan.predicted.step_time_s
    if result.lost:
        result.nearest, result.nearest_boundaries = nearest, tuple(tuple(b) for b in boundaries)
        result.nearest_step_s, result.nearest_fits = price(plan, nearest, boundaries, graph)
    return result


def with_schedule(cfg: ParallelConfig, schedule: str, virtual_stages: int) -> ParallelConfig:
    return replace(cfg, schedule=schedule, virtual_stages=virtual_stages)


def with_zero(cfg: ParallelConfig, zero_stage: int) -> ParallelConfig:
    """``cfg`` at another ZeRO stage; below 3 without the HSDP group and with resharding, which only ZeRO-3 has."""
    if zero_stage == 3:
        return replace(cfg, zero_stage=3)
    return replace(cfg, zero_stage=zero_stage, dp_shard=None, reshard_after_forward=True)


def fold_cp(cfg: ParallelConfig) -> ParallelConfig:
    """``cfg`` with its context-parallel ranks used for data parallelism instead (same world size): dp·cp
    replicas, each with 1/cp of the micro-batches (or, when those do not divide, of the micro-batch), so the
    global batch stays; where neither divides, the global batch grows cp-fold."""
    cp, m, mb = cfg.cp, cfg.num_micro_batches, cfg.micro_batch_size
    if m % cp == 0:
        m //= cp
    elif mb % cp == 0:
        mb //= cp
    return replace(cfg, cp=1, dp=cfg.dp * cp, num_micro_batches=m, micro_batch_size=mb,
                   dp_shard=cfg.dp_shard * cp if cfg.dp_shard else None)


def knob_losses(cfg: ParallelConfig, why: dict[str, str]) -> tuple[ParallelConfig, list[Loss]]:
    """The nearest configuration without the knobs a framework cannot express, and one :class:`Loss` each.

    ``why``: knob -> why the framework lacks it, for any of ``cp``, ``ep``, ``fp8``, ``dp_shard``,
    ``reshard_after_forward``, ``recompute_every`` (plan schema 2.1); the others are kept as they are."""
    near, lost = cfg, []
    if "cp" in why and cfg.cp > 1:
        near = fold_cp(near)
        batch = "" if near.global_batch == cfg.global_batch else f", global batch {near.global_batch}"
        lost.append(Loss("cp", str(cfg.cp), f"1 (dp {near.dp}{batch})", why["cp"]))
    if "ep" in why and cfg.ep > 1:
        near = replace(near, ep=1)
        lost.append(Loss("ep", str(cfg.ep), "1", why["ep"]))
    if "fp8" in why and cfg.fp8:
        near = replace(near, fp8=False)
        lost.append(Loss("fp8", "true", "false (the model's dtype)", why["fp8"]))
    if "dp_shard" in why and cfg.dp_shard and cfg.dp_shard < cfg.dp:
        near = replace(near, dp_shard=None)
        lost.append(Loss("dp_shard", str(cfg.dp_shard), f"{near.dp} (shard over every data-parallel rank)",
                         why["dp_shard"]))
    if "reshard_after_forward" in why and not cfg.reshard_after_forward:
        near = replace(near, reshard_after_forward=True)
        lost.append(Loss("reshard_after_forward", "false", "true", why["reshard_after_forward"]))
    if "recompute_every" in why and cfg.recompute_every > 1:
        near = replace(near, recompute_every=1)
        lost.append(Loss("recompute_every", str(cfg.recompute_every), "1 (every layer)", why["recompute_every"]))
    return near, lost


# -- writers: the few TOML / YAML shapes the exports need (the planner does not depend on a YAML library) --
def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string and YAML double-quoted scalar


def toml_text(tables: dict[str, dict[str, Any]], header: str) -> str:
    """Tables of scalars and lists of scalars, in the given order."""
    out = [f"# {line}" for line in header.splitlines()]
    for name, body in tables.items():
        out.append(f"\n[{name}]")
        for k, v in body.items():
            out.append(f"{k} = [{', '.join(_scalar(x) for x in v)}]" if isinstance(v, list) else f"{k} = {_scalar(v)}")
    return "\n".join(out) + "\n"


def yaml_text(doc: dict[str, Any], header: str, indent: int = 0) -> str:
    """Nested mappings of scalars, two-space indented."""
    out = [f"# {line}" for line in header.splitlines()] if header else []
    for k, v in doc.items():
        if isinstance(v, dict):
            out.append(" " * indent + f"{k}:")
            out.append(yaml_text(v, "", indent + 2).rstrip("\n"))
        else:
            out.append(" " * indent + f"{k}: {'null' if v is None else _scalar(v)}")
    return "\n".join(out) + "\n"
