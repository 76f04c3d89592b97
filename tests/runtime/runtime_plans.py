"""Plans for runtime tests, written without the search: the dataclasses filled in by hand.

Stage boundaries split the layers as evenly as possible; the stage -> pipeline position placement is
the one the schedule's ``ScheduleInfo.build`` uses (loop, or V for zb-v / dualpipe-v), and ranks
follow ``rank = (pp_index * dp + dp_index) * tp + tp_index``.
"""

from __future__ import annotations

import functools
from pathlib import Path

from planner.models import ModelPreset, load_preset
from planner.plan import ModelInfo, ParallelConfig, Plan, Prediction, SolverReport, Stage
from planner.schedules import get_schedule
from planner.trace import trace_model

CLUSTER_DEVICE = {"name": "cpu-process", "peak_flops": {"fp32": 4.0e10}, "memory_bytes": 4 * 2**30,
                  "memory_bandwidth_bytes_per_s": 1.0e10}


@functools.cache
def _graph(preset_key: str, tie: bool | None, dropout: float | None = None):
    preset = tiny_preset(preset_key, tie, dropout)
    return trace_model(preset.build(device="meta"), preset.sample_input(1, preset.seq_len), name=preset.name,
                       dtype="fp32", seq_len=preset.seq_len)


def tiny_preset(name: str = "gpt-tiny", tie: bool | None = None, dropout: float | None = None) -> ModelPreset:
    """A preset by name, with ``tie_embeddings`` and ``dropout`` overridden where given."""
    preset = load_preset(name)
    config = dict(preset.config)
    if tie is not None:
        config["tie_embeddings"] = tie
    if dropout is not None:
        config["dropout"] = dropout
    if config == preset.config:
        return preset
    return ModelPreset(name=preset.name, family=preset.family, config=config,
                       description=preset.description, source=preset.source, tags=preset.tags)


def make_plan(*, preset: str = "gpt-tiny", tie: bool | None = None, dp: int = 1, tp: int = 1, pp: int = 1,
              micro_batch_size: int = 2, num_micro_batches: int = 2, schedule: str = "1f1b",
              virtual_stages: int = 1, recompute: str = "none", zero_stage: int = 0,
              nodes: int = 1, step_time_s: float = 0.05, styles: dict[str, str] | None = None,
              sequence_parallel: bool = False, dropout: float | None = None, cp: int = 1,
              **knobs: object) -> Plan:
    """``knobs``: other ParallelConfig fields (dp_shard, reshard_after_forward, recompute_every, fp8)."""
    graph = _graph(preset, tie, dropout)
    cfg = ParallelConfig(dp=dp, tp=tp, pp=pp, micro_batch_size=micro_batch_size,
                         num_micro_batches=num_micro_batches, virtual_stages=virtual_stages, schedule=schedule,
                         recompute=recompute, zero_stage=zero_stage, sequence_parallel=sequence_parallel, cp=cp,
                         **knobs)  # type: ignore[arg-type]
    names = [layer.name for layer in graph.layers]
    n_stages = pp * virtual_stages
    bounds = [round(i * len(names) / n_stages) for i in range(n_stages + 1)]
    placement = get_schedule(schedule).build(pp, num_micro_batches, virtual_stages).placements[0] \
        if pp > 1 else (0,)
    stages = tuple(
        Stage(index=k, layer_start=bounds[k], layer_stop=bounds[k + 1],
              layer_names=tuple(names[bounds[k]:bounds[k + 1]]),
              ranks=cfg.layout.position_ranks(placement[k]),
              virtual_chunk=k // pp, device_index=placement[k])
        for k in range(n_stages))
    world = cfg.world_size
    state_bytes = 16 * graph.param_count // world
    model = ModelInfo(name=graph.name, preset=preset, family=tiny_preset(preset).family,
                      fingerprint=graph.fingerprint(), param_count=graph.param_count,
                      num_layers=graph.num_layers, layer_names=tuple(names),
                      seq_len=graph.seq_len, dtype="fp32", global_batch=cfg.global_batch,
                      flops_per_sample=graph.train_flops)
    predicted = Prediction(step_time_s=step_time_s, mfu=0.1, peak_memory_bytes=state_bytes,
                           memory_per_device_bytes=(state_bytes,) * world, fits=True,
                           throughput_samples_per_s=cfg.global_batch / step_time_s, time_breakdown_s={},
                           memory_breakdown_bytes={})
    cluster = {"name": "cpu-local", "device": CLUSTER_DEVICE, "nodes": nodes, "devices_per_node": world // nodes,
               "intra_node": {"kind": "loopback", "bandwidth_bytes_per_s": 1e9, "latency_s": 5e-5},
               "inter_node": {"kind": "ethernet", "bandwidth_bytes_per_s": 1e9, "latency_s": 1e-4}}
    placements = {"schema": "intra_op_sharding/1", "style": styles} if styles else {}
    return Plan(model=model, cluster=cluster, cluster_fingerprint="sha256:" + "0" * 16, parallel=cfg,
                stages=stages, predicted=predicted, placements=placements,
                solver=SolverReport(method="test helper", status="given", objective=step_time_s,
                                    bound=step_time_s, gap=0.0, time_s=0.0))


def write_plan(plan: Plan, path: str | Path) -> str:
    plan.to_json(path, force=True)
    return str(path)


def sequence_norms(num_layers: int = 4) -> dict[str, str]:
    """The ``sequence`` style on every LayerNorm of gpt-tiny, as the intra-op solver writes sequence-split norms."""
    return {"head.ln_f": "sequence"} | {f"blocks.{i}.{ln}": "sequence" for i in range(num_layers) for ln in ("ln1", "ln2")}


def solver_styles(num_layers: int = 4, *, embedding: str = "colwise", head: str = "colwise") -> dict[str, str]:
    """What the planner's intra-op solver writes for gpt-tiny at tp=2 (``plan.placements["style"]``)."""
    styles = {"embed.wte": embedding, "embed.wpe": "colwise" if embedding == "colwise" else "replicate",
              "head.lm_head": head}
    for i in range(num_layers):
        styles |= {f"blocks.{i}.attn.qkv": "colwise", f"blocks.{i}.attn.proj": "rowwise",
                   f"blocks.{i}.mlp.fc1": "colwise", f"blocks.{i}.mlp.fc2": "rowwise"}
    return styles


# name -> (make_plan arguments). Every plan trains gpt-tiny on a global batch of 8 in 4 micro-batches.
WORLD2 = {
    "pp=2 1f1b": dict(pp=2, num_micro_batches=4),
    "pp=2 gpipe": dict(pp=2, num_micro_batches=4, schedule="gpipe"),
    "pp=2 v=2 gpipe (looped BFS)": dict(pp=2, num_micro_batches=4, schedule="gpipe", virtual_stages=2),
    "pp=2 v=2 interleaved-1f1b": dict(pp=2, num_micro_batches=4, schedule="interleaved-1f1b", virtual_stages=2),
    "pp=2 zb-h1": dict(pp=2, num_micro_batches=4, schedule="zb-h1"),
    "pp=2 zb-h2": dict(pp=2, num_micro_batches=4, schedule="zb-h2"),
    "pp=2 v=2 zb-v": dict(pp=2, num_micro_batches=4, schedule="zb-v", virtual_stages=2),
    "pp=2 v=2 dualpipe-v": dict(pp=2, num_micro_batches=4, schedule="dualpipe-v", virtual_stages=2),
    "pp=2 recompute=full": dict(pp=2, num_micro_batches=4, recompute="full"),
    "pp=2 tied embeddings": dict(pp=2, num_micro_batches=4, tie=True),
    "tp=2": dict(tp=2, num_micro_batches=4),
    "tp=2 recompute=selective": dict(tp=2, num_micro_batches=4, recompute="selective"),
    "tp=2 solver placements (split embeddings, vocab-split head)": dict(tp=2, num_micro_batches=4,
                                                                        styles=solver_styles()),
    "tp=2 vocab-parallel embedding": dict(tp=2, num_micro_batches=4,
                                          styles=solver_styles(embedding="vocab", head="replicate")),
    "tp=2 sp": dict(tp=2, num_micro_batches=4, sequence_parallel=True),
    "tp=2 sp recompute=selective": dict(tp=2, num_micro_batches=4, sequence_parallel=True, recompute="selective"),
    "tp=2 sp solver placements + sequence norms": dict(tp=2, num_micro_batches=4, sequence_parallel=True,
                                                       styles=solver_styles() | sequence_norms()),
    "tp=2 sp vocab embedding, replicated head and blocks.3": dict(
        tp=2, num_micro_batches=4, sequence_parallel=True,
        styles={k: v for k, v in solver_styles(embedding="vocab", head="replicate").items()
                if not k.startswith("blocks.3.")}),
    "dp=2 (DDP)": dict(dp=2, num_micro_batches=2),
    "dp=2 zero=1 (optimizer slices)": dict(dp=2, num_micro_batches=2, zero_stage=1),
    "dp=2 zero=3 (FSDP2)": dict(dp=2, num_micro_batches=2, zero_stage=3),
    "dp=2 user dataloader": dict(dp=2, num_micro_batches=2, user_data=True),
    "dp=2 zero=3 no reshard after forward": dict(dp=2, num_micro_batches=2, zero_stage=3, reshard_after_forward=False),
    "pp=2 recompute=full every 2nd layer": dict(pp=2, num_micro_batches=4, recompute="full", recompute_every=2),
    "pp=2 recompute=op": dict(pp=2, num_micro_batches=4, recompute="op"),
    "tp=2 sp recompute=op": dict(tp=2, num_micro_batches=4, sequence_parallel=True, recompute="op"),
    "tp=2 across 2 nodes of 1 device": dict(tp=2, num_micro_batches=4, nodes=2),
}
WORLD4 = {
    "pp=2 dp=2 1f1b": dict(pp=2, dp=2, num_micro_batches=2),
    "pp=2 dp=2 v=2 interleaved-1f1b": dict(pp=2, dp=2, num_micro_batches=2, schedule="interleaved-1f1b",
                                           virtual_stages=2),
    "pp=2 dp=2 zero=3": dict(pp=2, dp=2, num_micro_batches=2, zero_stage=3),
    "pp=2 dp=2 tied embeddings": dict(pp=2, dp=2, num_micro_batches=2, tie=True),
    "pp=2 tp=2": dict(pp=2, tp=2, num_micro_batches=4),
    "pp=2 tp=2 solver placements": dict(pp=2, tp=2, num_micro_batches=4, styles=solver_styles()),
    "pp=2 tp=2 sp": dict(pp=2, tp=2, num_micro_batches=4, sequence_parallel=True),
    "dp=2 tp=2": dict(dp=2, tp=2, num_micro_batches=2),
    "dp=2 tp=2 zero=2 (optimizer and gradient slices + TP)": dict(dp=2, tp=2, num_micro_batches=2, zero_stage=2),
    "dp=4 zero=3 HSDP 2 replicas x 2 shards": dict(dp=4, num_micro_batches=1, zero_stage=3, dp_shard=2),
    "tp=4 across 2 nodes of 2 devices": dict(tp=4, num_micro_batches=4, nodes=2),
}
