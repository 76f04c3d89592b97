"""torchtitan: a job-config TOML (``torchtitan.toml``) with ``[parallelism]``, ``[activation_checkpoint]``, ``[training]``.

Field names are those of ``torchtitan/config/job_config.py`` in pytorch/torchtitan at commit
000204a4a8bf (2025: ``Parallelism``, ``ActivationCheckpoint``, ``Training`` dataclasses).

What maps how:

* dp: ZeRO-3 is FSDP2, ``data_parallel_shard_degree`` = dp; ZeRO-0 is DDP,
  ``data_parallel_replicate_degree`` = dp; ZeRO-2 is FSDP2 that keeps the gathered weights from the
  forward to the backward (``fsdp_reshard_after_forward = "never"``). ZeRO-1 (only the optimizer
  state sharded) has no knob: the nearest is ZeRO-2.
* tp: ``tensor_parallel_degree``. torchtitan's tensor parallelism always splits norms and dropout
  along the sequence (sequence parallelism); a plan with tp > 1 and no sequence parallelism loses that.
* pp: ``pipeline_parallel_degree``, ``pipeline_parallel_schedule`` (torch.distributed.pipelining
  names: GPipe, 1F1B, Interleaved1F1B, InterleavedZeroBubble, ZBVZeroBubble, DualPipeV),
  ``pipeline_parallel_microbatch_size``. An even split of the decoder layers is
  ``pipeline_parallel_layers_per_stage``; any split whose cuts fall between decoder layers is
  ``pipeline_parallel_split_points`` (``layers.N`` begins a stage). A stage of the embedding or the
  head alone has no split point (torchtitan keeps them with the first / last decoder layer).
* batches: ``[training] global_batch_size``; ``local_batch_size`` is one replica's micro-batches
  of a step with a pipeline (``pipeline_parallel_microbatch_size`` splits it), and one micro-batch
  without (torchtitan accumulates gradients over global / (local x dp) of them).
* recompute: ``[activation_checkpoint] mode``; ``op`` is per-op selective checkpointing
  (``mode = "selective"``, ``selective_ac_option = "op"``), the same policy. ``selective`` (Megatron's
  attention-core recompute) has no torchtitan knob: the nearest is ``op``, which keeps less. Full
  recomputation of one layer in k (``recompute_every``) is torchtitan's layer-level selective
  checkpointing, ``mode = "selective"`` with ``selective_ac_option = "k"`` (the same rule: layer i when
  (i + 1) % k == 0).
* Context parallelism: ``context_parallel_degree``; expert parallelism: ``expert_parallel_degree``;
  HSDP: ``data_parallel_shard_degree`` = the shard group, ``data_parallel_replicate_degree`` = dp / it;
  ZeRO-3 that keeps the gathered weights to the backward: ``fsdp_reshard_after_forward = "never"``;
  FP8: ``[model] converters = ["float8"]`` with ``[float8] recipe_name = "tensorwise"`` and
  ``filter_fqns = ["output"]`` (torchao's
  float8 training with tensorwise scaling, as the plan prices it; the output head stays in bf16).
"""

from __future__ import annotations

from dataclasses import replace

from planner.export.common import (
    ExportResult,
    Loss,
    block_counts,
    block_split,
    boundaries_of,
    even_block_counts,
    finish,
    layer_kinds,
    toml_text,
    uniform_block_counts,
)
from planner.plan import Plan

VERSION = "torchtitan torchtitan/config/job_config.py @ 000204a4a8bf"
SCHEDULES = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved-1f1b": "Interleaved1F1B",
             "zb-h1": "InterleavedZeroBubble", "zb-v": "ZBVZeroBubble", "dualpipe-v": "DualPipeV"}
MULTI_STAGE = {"interleaved-1f1b", "zb-h1", "zb-v", "dualpipe-v"}  # torch runs these with >= 2 stages per rank


def export(plan: Plan) -> ExportResult:
    cfg = plan.parallel
    lost: list[Loss] = []
    nearest = cfg
    if cfg.pp > 1:
        if cfg.schedule not in SCHEDULES:
            to = "interleaved-1f1b" if cfg.virtual_stages > 1 else "1f1b"
            lost.append(Loss("schedule", cfg.schedule, SCHEDULES[to], "torch.distributed.pipelining has no such schedule"))
            nearest = replace(nearest, schedule=to)
        elif cfg.schedule in MULTI_STAGE and cfg.virtual_stages == 1:
            lost.append(Loss("schedule", f"{cfg.schedule}, v=1", "1F1B",
                             f"torch runs {SCHEDULES[cfg.schedule]} with two or more stages per rank only"))
            nearest = replace(nearest, schedule="1f1b")
    if cfg.zero_stage == 1:
        lost.append(Loss("zero", "1", "2 (fsdp_reshard_after_forward = \"never\")",
                         "FSDP2 shards gradients with the optimizer state; no knob shards the optimizer state alone"))
        nearest = replace(nearest, zero_stage=2)
    if cfg.tp > 1 and not cfg.sequence_parallel:
        lost.append(Loss("sequence_parallel", "false", "true", "torchtitan's tensor parallelism is always sequence-parallel"))
        nearest = replace(nearest, sequence_parallel=True)
    bounds = boundaries_of(plan)
    par, split_lost, bounds_written = _parallelism(plan, nearest, bounds)
    lost += split_lost
    if cfg.recompute == "selective":
        lost.append(Loss("recompute", "selective", "op (selective_ac_option = \"op\")",
                         "torchtitan has no attention-core recompute; its per-op policy keeps less and redoes more"))
        nearest = replace(nearest, recompute="op")
    ac = {"mode": nearest.recompute}
    if nearest.recompute == "op":
        ac.update(mode="selective", selective_ac_option="op")
    elif cfg.recompute == "full" and cfg.recompute_every > 1:
        ac.update(mode="selective", selective_ac_option=str(cfg.recompute_every))
    # With a pipeline, the local batch is split into pipeline micro-batches; without one, torchtitan
    # accumulates gradients over global / (local x dp) local batches.
    local = cfg.micro_batch_size * (cfg.num_micro_batches if cfg.pp > 1 else 1)
    training = {"local_batch_size": local, "global_batch_size": cfg.global_batch}
    if plan.model.seq_len:
        training["seq_len"] = plan.model.seq_len
    if plan.model.dtype in ("bf16", "fp32"):
        training["mixed_precision_param"] = {"bf16": "bfloat16", "fp32": "float32"}[plan.model.dtype]
    header = f"{plan.model.name} on {plan.cluster.name}: {cfg.label()}\nfield names: {VERSION}"
    tables = {"parallelism": par, "activation_checkpoint": ac, "training": training}
    if cfg.fp8:
        # the output head stays in bf16, as the plan prices it (torchtitan's own default filters nothing)
        tables.update(model={"converters": ["float8"]}, float8={"recipe_name": "tensorwise", "filter_fqns": ["output"]})
    text = toml_text(tables, header)
    kept = ["tp", "pp", "dp", "micro-batch", "global batch"] + (["recompute"] if nearest.recompute == cfg.recompute
                                                                  else [])
    kept += [k for k, on in (("cp", cfg.cp > 1), ("ep", cfg.ep > 1), ("fp8", cfg.fp8),
                             ("dp_shard", bool(cfg.dp_shard and cfg.dp_shard < cfg.dp)),
                             ("reshard_after_forward", not cfg.reshard_after_forward),
                             ("recompute_every", cfg.recompute_every > 1)) if on]
    kept += [k for k, name in (("schedule", "schedule"), ("zero", "zero"), ("stage split", "stage split"),
                               ("sequence parallel", "sequence_parallel")) if not any(x.knob == name for x in lost)]
    return finish(ExportResult("torchtitan", VERSION, {"torchtitan.toml": text}, kept, lost), plan, nearest,
                  bounds_written)


def _parallelism(plan: Plan, cfg, bounds):
    """The ``[parallelism]`` table, the losses of the stage split, and the split it writes."""
    par: dict = {}
    if cfg.zero_stage == 0:
        par.update(data_parallel_replicate_degree=cfg.dp, data_parallel_shard_degree=1)
    else:
        shard = cfg.shard_group
        par.update(data_parallel_replicate_degree=cfg.dp // shard, data_parallel_shard_degree=shard)
        if cfg.zero_stage == 2 or not cfg.reshard_after_forward:
            par["fsdp_reshard_after_forward"] = "never"
    if cfg.cp > 1:
        par["context_parallel_degree"] = cfg.cp
    if cfg.ep > 1:
        par["expert_parallel_degree"] = cfg.ep
    par["tensor_parallel_degree"] = cfg.tp
    par["pipeline_parallel_degree"] = cfg.pp
    lost: list[Loss] = []
    if cfg.pp == 1:
        return par, lost, bounds
    par["pipeline_parallel_schedule"] = SCHEDULES[cfg.schedule]
    par["pipeline_parallel_microbatch_size"] = cfg.micro_batch_size
    counts = block_counts(plan, bounds)
    total = sum(counts)
    kinds = layer_kinds(plan.model.layer_names)
    if counts == even_block_counts(total, len(counts)) and _ends_with_blocks(kinds, bounds):
        par["pipeline_parallel_layers_per_stage"] = counts[0]
        return par, lost, bounds
    if all(counts) and _ends_with_blocks(kinds, bounds):
        starts = [sum(counts[:i]) for i in range(1, len(counts))]
        par["pipeline_parallel_split_points"] = [f"layers.{s}" for s in starts]
        return par, lost, bounds
    even = uniform_block_counts(total, len(counts))
    written = block_split(plan, even)
    lost.append(Loss("stage split", str([b - a for a, b in bounds]), str([b - a for a, b in written]),
                     "a stage without a decoder layer (the embedding or the head alone) has no split point"))
    starts = [sum(even[:i]) for i in range(1, len(even))]
    par["pipeline_parallel_split_points"] = [f"layers.{s}" for s in starts]
    return par, lost, written


def _ends_with_blocks(kinds: list[str], bounds) -> bool:
    """The layers before the first block sit on the first stage, those after the last on the last."""
    first_block = kinds.index("block")
    return bounds[0][1] > first_block and all(kinds[i] != "post" for a, b in bounds[:-1] for i in range(a, b))
