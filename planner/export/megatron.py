"""Megatron-LM: the command-line arguments of ``pretrain_gpt.py`` (``megatron_args.txt``, one per line).

Argument names are those of ``megatron/training/arguments.py`` in NVIDIA/Megatron-LM at commit
000c4ac24f61 (2025; ``--pipeline-model-parallel-layout`` and ``--use-megatron-fsdp`` exist there).

What maps how:

* tp, pp, sequence parallelism, micro-batch and global batch: their own arguments (dp is implied:
  world size / (tp·pp)).
* Stage split: an even split of the decoder layers (embedding on the first stage, loss on the
  last) is Megatron's default; with ``v`` > 1 it is ``--num-layers-per-virtual-pipeline-stage``. A
  split that differs only on the first and last stages is ``--decoder-first-pipeline-num-layers`` /
  ``--decoder-last-pipeline-num-layers``; any other split is ``--pipeline-model-parallel-layout``
  (``E`` embedding, ``t`` decoder layer, ``L`` loss, stages split by ``|``): nothing is lost.
* Schedules: Megatron runs 1F1B (``v`` = 1) and interleaved 1F1B (``v`` > 1). GPipe, the zero-bubble
  and V-shaped schedules, PipeDream and the others are lost: the nearest is 1F1B, or interleaved 1F1B
  with the same ``v`` and split.
* ZeRO: 1 is ``--use-distributed-optimizer``; 2 and 3 are Megatron FSDP
  (``--use-megatron-fsdp --data-parallel-sharding-strategy optim_grads`` / ``optim_grads_params``).
* Recompute: ``selective`` and ``full`` are ``--recompute-granularity``; full recomputes every layer
  (``--recompute-method uniform --recompute-num-layers 1``). One layer in k (``recompute_every``) is
  ``--recompute-method block --recompute-num-layers n``: the first n = b/k decoder layers of each model
  chunk of b layers, as many as the plan recomputes, where every chunk has the same b and k divides it;
  otherwise lost, nearest every layer. ``op`` (per-op checkpointing) has no Megatron knob: lost, nearest
  ``full``.
* Context parallelism: ``--context-parallel-size``; expert parallelism: ``--expert-model-parallel-size``
  (the MoE layers themselves are the model's arguments); FP8: ``--fp8-format hybrid --fp8-recipe
  tensorwise`` (Transformer Engine's current per-tensor scaling: the tensorwise scaling the plan prices).
* HSDP (a shard group smaller than dp) and ZeRO-3 that keeps the gathered weights from forward to backward
  have no arguments here: lost, nearest ZeRO-3 over all of dp, resharded after forward.
"""

from __future__ import annotations

from dataclasses import replace

from planner.export.common import (
    ExportResult,
    Loss,
    block_counts,
    boundaries_of,
    even_block_counts,
    finish,
    knob_losses,
    layer_kinds,
)
from planner.plan import Plan

VERSION = "Megatron-LM megatron/training/arguments.py @ 000c4ac24f61"
SCHEDULES = {"1f1b": 1, "interleaved-1f1b": 2}  # schedule -> the least v it runs with
DTYPE_ARG = {"bf16": "--bf16", "fp16": "--fp16", "fp32": None}


def export(plan: Plan) -> ExportResult:
    cfg = plan.parallel
    lost: list[Loss] = []
    nearest = cfg
    if cfg.pp > 1 and cfg.schedule not in SCHEDULES:
        to = "interleaved-1f1b" if cfg.virtual_stages > 1 else "1f1b"
        lost.append(Loss("schedule", cfg.schedule, to, "Megatron-LM runs 1F1B and interleaved 1F1B only"))
        nearest = replace(nearest, schedule=to)
    nearest, knob_lost = knob_losses(nearest, {
        "dp_shard": "Megatron FSDP shards over the whole data-parallel group",
        "reshard_after_forward": "Megatron FSDP gathers the weights again for the backward"})
    lost += knob_lost
    if cfg.recompute == "op":
        lost.append(Loss("recompute", "op", "full", "Megatron-LM has no per-op checkpointing policy; full "
                         "recomputation keeps less memory"))
        nearest = replace(nearest, recompute="full")
    bounds = boundaries_of(plan)
    recompute_args, every_lost = _recompute_args(plan, nearest, bounds)
    if every_lost:
        lost.append(every_lost)
        nearest = replace(nearest, recompute_every=1)
    args: list[str] = [f"--tensor-model-parallel-size {cfg.tp}", f"--pipeline-model-parallel-size {cfg.pp}"]
    if cfg.cp > 1:
        args.append(f"--context-parallel-size {cfg.cp}")
    if cfg.ep > 1:
        args.append(f"--expert-model-parallel-size {cfg.ep}")
    args += _split_args(plan, bounds, cfg.pp, cfg.virtual_stages)
    if cfg.sequence_parallel:
        args.append("--sequence-parallel")
    args += [f"--micro-batch-size {cfg.micro_batch_size}", f"--global-batch-size {cfg.global_batch}"]
    if plan.model.seq_len:
        args.append(f"--seq-length {plan.model.seq_len}")
    args.append(f"--num-layers {sum(block_counts(plan, bounds))}")
    args += recompute_args
    if cfg.zero_stage == 1:
        args.append("--use-distributed-optimizer")
    elif cfg.zero_stage in (2, 3):
        args += ["--use-megatron-fsdp",
                 f"--data-parallel-sharding-strategy {'optim_grads' if cfg.zero_stage == 2 else 'optim_grads_params'}"]
    if cfg.overlap_grad_reduce:
        args.append("--overlap-grad-reduce")
    if DTYPE_ARG.get(plan.model.dtype):
        args.append(DTYPE_ARG[plan.model.dtype])
    if cfg.fp8:
        args += ["--fp8-format hybrid", "--fp8-recipe tensorwise"]
    header = (f"# {plan.model.name} on {plan.cluster.name}: {cfg.label()} (dp {cfg.dp} = world size / "
              f"(tp x {'cp x ' if cfg.cp > 1 else ''}pp))\n# names: {VERSION}\n")
    kept = ["tp", "pp", "dp (implied)", "micro-batch", "global batch", "stage split", "zero", "sequence parallel"]
    kept += (["recompute"] if nearest.recompute == cfg.recompute else []) + [k for k, on in (("cp", cfg.cp > 1), ("ep", cfg.ep > 1), ("fp8", cfg.fp8)) if on]
    lost_knobs = {x.knob for x in lost}
    kept += [k for k, on in (("schedule", True), ("recompute_every", cfg.recompute_every > 1))
             if on and k not in lost_knobs]
    result = ExportResult("megatron", VERSION, {"megatron_args.txt": header + "\n".join(args) + "\n"}, kept, lost)
    return finish(result, plan, nearest, bounds)


def _recompute_args(plan: Plan, cfg, bounds: tuple[tuple[int, int], ...]) -> tuple[list[str], Loss | None]:
    """Megatron's recompute arguments for ``cfg`` (module docstring), and the loss of ``recompute_every`` when
    the block method cannot recompute the plan's count of layers."""
    if cfg.recompute == "none":
        return [], None
    args = [f"--recompute-granularity {cfg.recompute}"]
    if cfg.recompute != "full":
        return args, None
    k = cfg.recompute_every
    if k == 1:
        return args + ["--recompute-method uniform", "--recompute-num-layers 1"], None
    per_chunk = set(block_counts(plan, bounds))
    if len(per_chunk) == 1 and next(iter(per_chunk)) % k == 0:
        return args + ["--recompute-method block", f"--recompute-num-layers {next(iter(per_chunk)) // k}"], None
    return args + ["--recompute-method uniform", "--recompute-num-layers 1"], Loss(
        "recompute_every", str(k), "1 (every layer)",
        f"Megatron's block method recomputes the same number of layers in every model chunk; the chunks hold "
        f"{sorted(per_chunk)} decoder layers, which {k} does not divide evenly")


def _split_args(plan: Plan, bounds: tuple[tuple[int, int], ...], pp: int, v: int) -> list[str]:
    """The fewest arguments that give Megatron this stage split (module docstring)."""
    if pp == 1:
        return []
    counts = block_counts(plan, bounds)
    total = sum(counts)
    kinds = layer_kinds(plan.model.layer_names)
    ends_ok = (all(k == "pre" for k in kinds[:bounds[0][0]]) and
               all(kinds[i] != "pre" for a, b in bounds[1:] for i in range(a, b)) and
               all(kinds[i] != "post" for a, b in bounds[:-1] for i in range(a, b)))
    even = even_block_counts(total, len(counts))
    if ends_ok and counts == even:
        return [f"--num-layers-per-virtual-pipeline-stage {even[0]}"] if v > 1 else []
    if ends_ok and v == 1 and len(counts) > 2:
        middle = counts[1:-1]
        if len(set(middle)) == 1:
            return [f"--decoder-first-pipeline-num-layers {counts[0]}",
                    f"--decoder-last-pipeline-num-layers {counts[-1]}"]
    return [f"--pipeline-model-parallel-layout {layout_string(kinds, bounds)}"]


def layout_string(kinds: list[str], bounds: tuple[tuple[int, int], ...]) -> str:
    """Megatron's layout: ``E`` for the layers before the first block (the embedding), ``t`` per
    decoder layer, ``L`` for the layers after the last (norm, head, loss); ``t*k`` for runs."""
    stages = []
    for a, b in bounds:
        ks = kinds[a:b]
        text = "E" if "pre" in ks else ""
        n = ks.count("block")
        text += ("t" if n == 1 else f"t*{n}") if n else ""
        text += "L" if "post" in ks else ""
        stages.append(text)
    return "|".join(stages)
