"""DeepSpeed: ``ds_config.json`` plus ``pipeline_module.json`` (the ``PipelineModule`` arguments).

Keys are those DeepSpeed 0.19.8 reads (``deepspeed.runtime.config.DeepSpeedConfig``: batch keys,
``zero_optimization``, ``bf16`` / ``fp16``, ``pipeline``; ``tensor_parallel.autotp_size``).

What maps how:

* Batches: ``train_batch_size`` = global batch, ``train_micro_batch_size_per_gpu``,
  ``gradient_accumulation_steps`` = micro-batches per replica (DeepSpeed checks the three agree with
  the data-parallel size).
* ZeRO: ``zero_optimization.stage``; ``overlap_comm`` for an overlapped gradient reduce. DeepSpeed's
  pipeline engine accepts ZeRO 0 and 1 only: a pipelined plan with ZeRO 2 or 3 (the planner tries FSDP
  under a pipeline where nothing else fits) loses it, nearest 1.
* tp: AutoTP (``tensor_parallel.autotp_size``); AutoTP has no sequence parallelism (lost).
* Pipeline: ``PipelineModule(num_stages=pp, partition_method=...)``. DeepSpeed runs one schedule
  (its ``TrainSchedule``, 1F1B) with one chunk per stage: interleaving, GPipe and the zero-bubble
  schedules are lost. Its partition methods cannot be handed a split: ``uniform`` (equal layer
  counts, extra layers on the first stages), ``parameters`` and ``type:<regex>`` (balance the layers'
  parameter counts or the matching layers). The export writes ``uniform`` when the plan's split is
  DeepSpeed's uniform split of the traced layers; any other split is lost, and the nearest plan is
  priced with the uniform split.
* Recompute: ``full`` is ``activation_checkpoint_interval = 1`` (every layer checkpointed);
  DeepSpeed's pipeline has no selective recomputation, whose nearest is ``full``. Its interval checkpoints
  groups of layers, not one layer in k: ``recompute_every`` is lost under a pipeline (nearest every
  layer); without one the model code decides what it recomputes.
* Lost, with the nearest priced: context parallelism (DeepSpeed's sequence parallelism is Ulysses, an
  all-to-all over heads, not ring attention: the cp ranks become data-parallel replicas), expert
  parallelism (``deepspeed.moe.layer.MoE(ep_size=...)`` sets it in the model code), FP8 (no
  ``ds_config`` key), HSDP and ZeRO-3 that keeps the gathered weights (ZeRO-3 partitions over all
  data-parallel ranks and releases each layer's weights after use).
"""

from __future__ import annotations

import json
from dataclasses import replace

from planner.export.common import ExportResult, Loss, boundaries_of, finish, knob_losses, with_zero
from planner.plan import ParallelConfig, Plan

VERSION = "DeepSpeed 0.19.8"


def uniform_partition(num_items: int, num_parts: int) -> list[int]:
    """Part starts of DeepSpeed's ``uniform`` method: equal counts, the remainder on the first parts."""
    q, r = divmod(num_items, num_parts)
    parts = [0]
    for i in range(num_parts):
        parts.append(parts[-1] + q + (1 if i < r else 0))
    return parts


def _nearest(cfg: ParallelConfig) -> tuple[ParallelConfig, list[Loss]]:
    """The configuration DeepSpeed can run nearest ``cfg``, and what moving there loses."""
    lost: list[Loss] = []
    nearest = cfg
    if cfg.pp > 1 and (cfg.schedule != "1f1b" or cfg.virtual_stages > 1):
        lost.append(Loss("schedule", f"{cfg.schedule}, v={cfg.virtual_stages}", "1f1b, v=1",
                         "DeepSpeed's pipeline engine runs its 1F1B TrainSchedule with one chunk per stage"))
        nearest = replace(nearest, schedule="1f1b", virtual_stages=1)
    if cfg.tp > 1 and cfg.sequence_parallel:
        lost.append(Loss("sequence_parallel", "true", "false", "AutoTP has no sequence parallelism"))
        nearest = replace(nearest, sequence_parallel=False)
    if cfg.pp > 1 and cfg.recompute in ("selective", "op"):
        lost.append(Loss("recompute", cfg.recompute, "full (activation_checkpoint_interval 1)",
                         "PipelineModule checkpoints whole layers"))
        nearest = replace(nearest, recompute="full")
    if cfg.pp > 1 and cfg.zero_stage > 1:
        lost.append(Loss("zero", str(cfg.zero_stage), "1", "DeepSpeed's pipeline engine runs ZeRO 0 and 1 only"))
        nearest = with_zero(nearest, 1)
    why = {"cp": "DeepSpeed's sequence parallelism is Ulysses (an all-to-all over heads), not ring attention",
           "ep": "DeepSpeed sets expert parallelism in the model code (deepspeed.moe.layer.MoE(ep_size=...))",
           "fp8": "ds_config has no FP8 training key",
           "dp_shard": "ZeRO-3 partitions over every data-parallel rank",
           "reshard_after_forward": "ZeRO-3 releases each layer's gathered weights after use"}
    if cfg.pp > 1:
        why["recompute_every"] = "activation_checkpoint_interval checkpoints groups of layers, not one layer in k"
    nearest, knob_lost = knob_losses(nearest, why)
    return nearest, lost + knob_lost


def _ds_config(plan: Plan, nearest: ParallelConfig, checkpoint_interval: int) -> dict:
    """``ds_config.json`` for ``nearest`` (the plan's model gives the dtype)."""
    cfg = plan.parallel
    ds: dict = {"train_batch_size": nearest.global_batch, "train_micro_batch_size_per_gpu": nearest.micro_batch_size,
                "gradient_accumulation_steps": nearest.num_micro_batches,
                "zero_optimization": {"stage": nearest.zero_stage, "overlap_comm": bool(cfg.overlap_grad_reduce)}}
    if plan.model.dtype == "bf16":
        ds["bf16"] = {"enabled": True}
    elif plan.model.dtype == "fp16":
        ds["fp16"] = {"enabled": True}
    if cfg.tp > 1:
        ds["tensor_parallel"] = {"autotp_size": cfg.tp}
    if cfg.pp > 1:
        ds["pipeline"] = {"stages": cfg.pp, "partition": "uniform", "activation_checkpoint_interval": checkpoint_interval}
    if cfg.recompute != "none" and cfg.pp == 1:
        ds["activation_checkpointing"] = {"partition_activations": False, "contiguous_memory_optimization": False}
    return ds


def export(plan: Plan) -> ExportResult:
    cfg = plan.parallel
    nearest, lost = _nearest(cfg)
    bounds = boundaries_of(plan)
    n = plan.model.num_layers
    written = bounds
    pipe: dict = {}
    if cfg.pp > 1:
        starts = uniform_partition(n, cfg.pp)
        uniform = tuple(zip(starts, starts[1:]))
        if bounds != uniform:
            lost.append(Loss("stage split", str([b - a for a, b in bounds]), str([b - a for a, b in uniform]),
                             "PipelineModule partitions by a method (uniform / parameters / type:), not by a given split"))
        written = uniform
        pipe = {"num_stages": cfg.pp, "partition_method": "uniform",
                "activation_checkpoint_interval": 1 if nearest.recompute == "full" else 0,
                "layers": list(plan.model.layer_names), "expected_parts": starts}
    ds = _ds_config(plan, nearest, pipe.get("activation_checkpoint_interval", 0))
    files = {"ds_config.json": json.dumps(ds, indent=2) + "\n"}
    if pipe:
        files["pipeline_module.json"] = json.dumps(pipe, indent=2) + "\n"
    lost_knobs = {x.knob for x in lost}
    kept = ["tp (AutoTP)", "pp"] + ([] if "cp" in lost_knobs else ["dp (implied)", "micro-batch"])
    kept += ["global batch"] if nearest.global_batch == cfg.global_batch else []
    kept += [k for k in ("zero", "schedule", "stage split", "recompute", "sequence_parallel") if k not in lost_knobs]
    result = ExportResult("deepspeed", VERSION, files, kept, lost)
    if cfg.recompute != "none" and cfg.pp == 1:
        result.notes.append("without a pipeline, DeepSpeed recomputes what the model wraps in "
                            "deepspeed.checkpointing.checkpoint: the model code decides selective or full")
    return finish(result, plan, nearest, written)
