"""nanotron: the ``parallelism``, ``tokens`` and ``optimizer.zero_stage`` blocks of its YAML config (``nanotron.yaml``).

Field names are those of ``src/nanotron/config/parallelism_config.py`` (``ParallelismArgs``) and
``config.py`` (``TokensArgs``, ``OptimizerArgs.zero_stage``) in huggingface/nanotron at commit
19f88fbe4546.

What maps how:

* dp, tp, pp: their fields. Sequence parallelism is ``tp_mode: REDUCE_SCATTER`` (with
  ``tp_linear_async_communication``), its absence ``ALL_REDUCE``.
* Schedules: ``pp_engine`` is ``1f1b`` or ``afab`` (all forward, all backward: GPipe). nanotron has
  one model chunk per stage: interleaved, zero-bubble and V-shaped schedules are lost, the nearest is 1F1B.
* Stage split: nanotron places its pipeline blocks itself, by a running-cost threshold over their
  weights (:func:`planner.inter_op.framework_splits.nanotron_split`); no field sets a split. The export
  keeps the plan's split only when it is that one; the nearest plan of any other is priced with
  nanotron's, or with the even split of the decoder layers where nanotron's rule would leave a rank
  without a layer (the error says which layer weighs how much).
* Recompute: ``recompute_layer`` recomputes whole layers (``full``); selective is lost, nearest full.
* ZeRO: ``optimizer.zero_stage`` 0 or 1; 2 and 3 are lost, nearest 1 (and with them HSDP and
  keeping the gathered weights, which only ZeRO-3 has).
* Lost, with the nearest priced: context parallelism (the cp ranks become data-parallel replicas),
  expert parallelism and FP8 (no fields in this version's ``ParallelismArgs``), and recomputing one
  layer in k (``recompute_layer`` recomputes every layer).
"""

from __future__ import annotations

from dataclasses import replace

from planner.errors import SpecError
from planner.export.common import (
    ExportResult,
    Loss,
    block_counts,
    block_split,
    boundaries_of,
    finish,
    knob_losses,
    plan_graph,
    uniform_block_counts,
    with_zero,
    yaml_text,
)
from planner.inter_op.framework_splits import nanotron_split
from planner.plan import Plan

VERSION = "nanotron src/nanotron/config @ 19f88fbe4546"
ENGINES = {"1f1b": "1f1b", "gpipe": "afab"}


def export(plan: Plan) -> ExportResult:
    cfg = plan.parallel
    lost: list[Loss] = []
    nearest = cfg
    if cfg.pp > 1 and (cfg.schedule not in ENGINES or cfg.virtual_stages > 1):
        lost.append(Loss("schedule", f"{cfg.schedule}, v={cfg.virtual_stages}", "1f1b, v=1",
                         "nanotron's engines are 1f1b and afab (GPipe), one chunk per stage"))
        nearest = replace(nearest, schedule="1f1b", virtual_stages=1)
    if cfg.recompute in ("selective", "op"):
        lost.append(Loss("recompute", cfg.recompute, "full (recompute_layer: true)",
                         "nanotron recomputes whole layers only"))
        nearest = replace(nearest, recompute="full")
    if cfg.zero_stage > 1:
        lost.append(Loss("zero", str(cfg.zero_stage), "1", "nanotron shards the optimizer state only (zero_stage 0 or 1)"))
        nearest = with_zero(nearest, 1)
    nearest, knob_lost = knob_losses(nearest, {
        "cp": "this version of nanotron has no context parallelism", "ep": "ParallelismArgs has no expert degree",
        "fp8": "this version of nanotron trains in the model's dtype", "recompute_every": "recompute_layer recomputes "
        "every layer"})
    lost += knob_lost
    bounds = boundaries_of(plan)
    written, graph = bounds, None
    if cfg.pp > 1:
        graph = plan_graph(plan)
        try:
            written = nanotron_split(graph, nearest.pp)
            why = "nanotron places its pipeline blocks itself by their weights; the nearest is priced with its split"
        except SpecError as exc:
            written = block_split(plan, uniform_block_counts(sum(block_counts(plan, bounds)), nearest.pp))
            why = exc.fix.split("; ")[0] + "; the nearest is priced with an even split"
        if written != bounds:
            lost.append(Loss("stage split", str([b - a for a, b in bounds]), str([b - a for a, b in written]), why))
    parallelism = {"dp": nearest.dp, "tp": cfg.tp, "pp": cfg.pp, "pp_engine": ENGINES.get(nearest.schedule, "1f1b"),
                   "tp_mode": "REDUCE_SCATTER" if cfg.sequence_parallel else "ALL_REDUCE",
                   "tp_linear_async_communication": bool(cfg.sequence_parallel),
                   "recompute_layer": nearest.recompute == "full"}
    tokens = {"sequence_length": plan.model.seq_len, "micro_batch_size": nearest.micro_batch_size,
              "batch_accumulation_per_replica": nearest.num_micro_batches}
    header = f"{plan.model.name} on {plan.cluster.name}: {cfg.label()}\nfield names: {VERSION}"
    text = yaml_text({"parallelism": parallelism, "tokens": tokens, "optimizer": {"zero_stage": nearest.zero_stage}},
                     header)
    lost_knobs = {x.knob for x in lost}
    kept = ["tp", "pp", "sequence parallel"] + ([] if "cp" in lost_knobs else ["dp", "micro-batch"])
    kept += ["global batch"] if nearest.global_batch == cfg.global_batch else []
    kept += [k for k in ("schedule", "stage split", "recompute", "zero") if k not in lost_knobs]
    return finish(ExportResult("nanotron", VERSION, {"nanotron.yaml": text}, kept, lost), plan, nearest, written,
                  graph)
