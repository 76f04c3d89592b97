"""Load exported files with each framework's own parser (where it installs here) and read the knobs back.

``python tests/export/framework_check.py DIR --to FRAMEWORK --dp N`` prints what the parser accepted.

* DeepSpeed: ``deepspeed.runtime.config.DeepSpeedConfig`` (batch arithmetic, ZeRO, precision) on a
  one-process gloo group with an ``mpu`` that reports the data-parallel size, as Megatron-DeepSpeed
  hands it; ``deepspeed.runtime.utils.partition_uniform`` for the ``PipelineModule`` split.
* Megatron-LM: ``megatron/training/arguments.py`` is not in the ``megatron-core`` wheel, so the
  arguments are parsed by an argparse built from its documented names (types and choices as there),
  then handed to megatron-core's own ``TransformerConfig`` (its ``__post_init__`` checks tp / pp / vpp /
  sequence parallelism / recompute) and ``PipelineParallelLayerLayout`` (the layout string).
* torchtitan (not installable from PyPI with our torch pin): ``tomllib`` round trip, and the schedule
  name resolved by ``torch.distributed.pipelining.schedules.get_schedule_class`` (what torchtitan calls).
* nanotron (not on PyPI): ``yaml.safe_load`` round trip.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any


def megatron_parser() -> argparse.ArgumentParser:
    """The arguments the export writes, as ``megatron/training/arguments.py`` (000c4ac24f61) declares them."""
    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    p.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None)
    p.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None)
    p.add_argument("--pipeline-model-parallel-layout", type=str, default=None)
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--micro-batch-size", type=int, default=None)
    p.add_argument("--global-batch-size", type=int, default=None)
    p.add_argument("--seq-length", type=int, default=None)
    p.add_argument("--num-layers", type=int, default=None)
    p.add_argument("--recompute-granularity", type=str, default=None, choices=["full", "selective"])
    p.add_argument("--recompute-method", type=str, default=None, choices=["uniform", "block"])
    p.add_argument("--recompute-num-layers", type=int, default=None)
    p.add_argument("--use-distributed-optimizer", action="store_true")
    p.add_argument("--use-megatron-fsdp", action="store_true")
    p.add_argument("--data-parallel-sharding-strategy", type=str, default="no_shard",
                   choices=["no_shard", "optim", "optim_grads", "optim_grads_params"])
    p.add_argument("--overlap-grad-reduce", action="store_true")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--context-parallel-size", type=int, default=1)
    p.add_argument("--expert-model-parallel-size", type=int, default=1)
    p.add_argument("--fp8-format", default=None, choices=["e4m3", "hybrid"])
    p.add_argument("--fp8-recipe", default="delayed", choices=["tensorwise", "delayed", "mxfp8", "blockwise"])
    return p


def check_megatron(folder: Path, dp: int) -> dict[str, Any]:
    import torch
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

    lines = [ln for ln in (folder / "megatron_args.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    a = megatron_parser().parse_args(shlex.split(" ".join(lines)))
    v = None
    if a.pipeline_model_parallel_layout:
        layout = PipelineParallelLayerLayout(a.pipeline_model_parallel_layout, a.pipeline_model_parallel_size)
        layout.validate_layer_layout(a.num_layers, None)
        v = layout.virtual_pipeline_model_parallel_size
    elif a.num_layers_per_virtual_pipeline_stage:
        v = a.num_layers // (a.pipeline_model_parallel_size * a.num_layers_per_virtual_pipeline_stage)
    # hidden size and heads are not the export's business: placeholders that tp divides
    cfg = TransformerConfig(
        num_layers=a.num_layers, hidden_size=64 * a.tensor_model_parallel_size,
        num_attention_heads=8 * a.tensor_model_parallel_size, tensor_model_parallel_size=a.tensor_model_parallel_size,
        pipeline_model_parallel_size=a.pipeline_model_parallel_size, virtual_pipeline_model_parallel_size=v,
        context_parallel_size=a.context_parallel_size, sequence_parallel=a.sequence_parallel, bf16=a.bf16, fp16=a.fp16,
        pipeline_dtype=torch.bfloat16 if a.pipeline_model_parallel_size > 1 else None,
        recompute_granularity=a.recompute_granularity, recompute_method=a.recompute_method,
        recompute_num_layers=a.recompute_num_layers,
        num_layers_in_first_pipeline_stage=a.decoder_first_pipeline_num_layers,
        num_layers_in_last_pipeline_stage=a.decoder_last_pipeline_num_layers,
        pipeline_model_parallel_layout=a.pipeline_model_parallel_layout)
    zero = {"optim_grads": 2, "optim_grads_params": 3}.get(a.data_parallel_sharding_strategy,
                                                           1 if a.use_distributed_optimizer else 0)
    return {"parser": "argparse of Megatron's documented names + megatron.core TransformerConfig"
                      + (" + PipelineParallelLayerLayout" if a.pipeline_model_parallel_layout else ""),
            "tp": cfg.tensor_model_parallel_size, "pp": cfg.pipeline_model_parallel_size,
            "v": cfg.virtual_pipeline_model_parallel_size or 1, "sp": cfg.sequence_parallel,
            "micro_batch": a.micro_batch_size, "global_batch": a.global_batch_size,
            "num_micro_batches": a.global_batch_size // (a.micro_batch_size * dp),
            "zero": zero, "recompute": cfg.recompute_granularity or "none", "layout": a.pipeline_model_parallel_layout,
            "cp": cfg.context_parallel_size, "ep": a.expert_model_parallel_size,
            "fp8": a.fp8_format is not None and a.fp8_recipe == "tensorwise",
            "recompute_per_chunk": a.recompute_num_layers if a.recompute_method == "block" else None}


@contextlib.contextmanager
def _one_process_group():
    """A one-rank gloo group for DeepSpeedConfig, torn down after: the group, deepspeed's handle on it and
    the environment it needs would otherwise leak into the tests that follow in this process (the
    runtime would join a world of one)."""
    import deepspeed
    import deepspeed.comm.comm as ds_comm
    import torch.distributed as dist

    if deepspeed.comm.is_initialized():
        yield
        return
    keys = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    try:
        with tempfile.TemporaryDirectory() as folder:
            # A file store, not a TCP port: a free port picked here can be taken by a parallel test's world
            # before the group binds it (EADDRINUSE); DeepSpeed adopts a group that already exists.
            dist.init_process_group("gloo", store=dist.FileStore(os.path.join(folder, "store"), 1), rank=0,
                                    world_size=1)
            deepspeed.init_distributed(dist_backend="gloo", verbose=False)
            yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        ds_comm.cdb = None
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _Mpu:
    """What DeepSpeedConfig asks of Megatron's mpu: the data-parallel size."""

    def __init__(self, dp: int) -> None:
        self.dp = dp

    def get_data_parallel_world_size(self) -> int:
        return self.dp


def check_deepspeed(folder: Path, dp: int) -> dict[str, Any]:
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.utils import partition_uniform

    with _one_process_group():
        c = DeepSpeedConfig(str(folder / "ds_config.json"), mpu=_Mpu(dp))
    out = {"parser": "deepspeed.runtime.config.DeepSpeedConfig", "dp": c.world_size,
           "micro_batch": c.train_micro_batch_size_per_gpu, "global_batch": c.train_batch_size,
           "num_micro_batches": c.gradient_accumulation_steps, "zero": c.zero_optimization_stage,
           "bf16": bool(c.bfloat16_config.enabled), "pp": 1}
    pipe = folder / "pipeline_module.json"
    if pipe.exists():
        p = json.loads(pipe.read_text())
        parts = partition_uniform(len(p["layers"]), p["num_stages"])
        out.update(pp=p["num_stages"], parts=[int(x) for x in parts],
                   parts_match=[int(x) for x in parts] == p["expected_parts"],
                   pipeline=c.pipeline["stages"], recompute_interval=p["activation_checkpoint_interval"])
        out["parser"] += " + deepspeed.runtime.utils.partition_uniform"
    return out


def check_torchtitan(folder: Path, dp: int) -> dict[str, Any]:
    import tomllib  # Python 3.11+
    from torch.distributed.pipelining.schedules import get_schedule_class

    d = tomllib.loads((folder / "torchtitan.toml").read_text())
    par, tr = d["parallelism"], d["training"]
    sched = par.get("pipeline_parallel_schedule")
    mb = par.get("pipeline_parallel_microbatch_size", tr["local_batch_size"])
    return {"parser": "tomllib + torch.distributed.pipelining get_schedule_class",
            "schedule_class": get_schedule_class(sched).__name__ if sched else None,
            "tp": par["tensor_parallel_degree"], "pp": par["pipeline_parallel_degree"],
            "dp": par["data_parallel_shard_degree"] * par["data_parallel_replicate_degree"],
            "zero": 0 if par["data_parallel_shard_degree"] == 1
            else (2 if par.get("fsdp_reshard_after_forward") == "never" else 3),
            "micro_batch": mb, "global_batch": tr["global_batch_size"],
            "num_micro_batches": tr["local_batch_size"] // mb * tr["global_batch_size"]
            // (tr["local_batch_size"] * par["data_parallel_shard_degree"] * par["data_parallel_replicate_degree"]),
            "recompute": ("op" if d["activation_checkpoint"].get("selective_ac_option") == "op"
                          else d["activation_checkpoint"]["mode"]), "ac_option": d["activation_checkpoint"].get("selective_ac_option"),
            "cp": par.get("context_parallel_degree", 1), "ep": par.get("expert_parallel_degree", 1),
            "shard": par["data_parallel_shard_degree"], "reshard": par.get("fsdp_reshard_after_forward", "default"),
            "fp8": "float8" in d.get("model", {}).get("converters", [])
            and d.get("float8", {}).get("recipe_name") == "tensorwise"
            and "output" in d.get("float8", {}).get("filter_fqns", [])}  # the head in bf16, as the plan prices it


def check_nanotron(folder: Path, dp: int) -> dict[str, Any]:
    import yaml

    d = yaml.safe_load((folder / "nanotron.yaml").read_text())
    par, tok = d["parallelism"], d["tokens"]
    return {"parser": "yaml.safe_load", "tp": par["tp"], "pp": par["pp"], "dp": par["dp"],
            "micro_batch": tok["micro_batch_size"], "num_micro_batches": tok["batch_accumulation_per_replica"],
            "global_batch": par["dp"] * tok["micro_batch_size"] * tok["batch_accumulation_per_replica"],
            "zero": d["optimizer"]["zero_stage"], "engine": par["pp_engine"],
            "recompute": "full" if par["recompute_layer"] else "none", "sp": par["tp_mode"] == "REDUCE_SCATTER"}


CHECKS = {"megatron": check_megatron, "deepspeed": check_deepspeed, "torchtitan": check_torchtitan,
          "nanotron": check_nanotron}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--to", required=True, choices=list(CHECKS))
    ap.add_argument("--dp", type=int, required=True, help="the plan's data-parallel size")
    a = ap.parse_args(argv)
    print(json.dumps(CHECKS[a.to](Path(a.folder), a.dp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
