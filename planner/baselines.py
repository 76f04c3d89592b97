"""What a user would otherwise pick: pure data parallelism, ZeRO-3/FSDP, Megatron-LM's recipe.

Each baseline is a *restricted search space* priced by the same cost model on the same graph,
and the best configuration inside it is reported, so a baseline is never a straw man: the plan's
margin over it is the margin over the best that recipe can do.

* ``pure-dp``: every device holds the whole model (tp = pp = 1, no ZeRO); micro-batch size and
  recomputation free (gradient accumulation when the batch does not fit).
* ``zero3-fsdp``: DeepSpeed ZeRO-3 / PyTorch FSDP: tp = pp = 1, parameters, gradients and
  optimizer state sharded over all devices.
* ``megatron-lm``: Narayanan et al. 2021 + Korthikanti et al. 2022: tensor parallel across the
  devices of one node, pipeline across nodes with 1F1B or interleaved 1F1B, equal layers per
  stage, sequence parallelism with selective (or full) recomputation, distributed optimizer
  (ZeRO-1) allowed.
"""

from __future__ import annotations

from planner.cluster import ClusterSpec
from planner.cost.constants import CostConstants
from planner.plan_types import BaselineRecord
from planner.pricing import Pricer
from planner.search import SearchSpace, search
from planner.trace.graph import CostGraph

# The recipes as their frameworks ship them: no context or expert parallelism, full-dp sharding
# resharded after forward, bf16 GEMMs, every layer recomputed under full recomputation, tp in a node.
_CLASSIC = {"cp": (1,), "ep": (1,), "dp_shard": (None,), "reshard_after_forward": (True,), "fp8": (False,),
            "recompute_every": (1,), "tp_max_nodes": 1}


def baseline_spaces(cluster: ClusterSpec, *, has_sequence: bool = True,
                    fp8: bool = False) -> dict[str, tuple[str, SearchSpace]]:
    """The recipes' search spaces; ``fp8``: their linears in FP8, as the plan compared with them (the same
    numerics on both sides of the comparison)."""
    dpn = cluster.min_devices_per_node
    tp = min(dpn, cluster.num_devices)
    classic = {**_CLASSIC, "fp8": (fp8,)}
    return {
        "pure-dp": ("pure data parallelism (DDP)",
                    SearchSpace(tp=(1,), pp=(1,), zero_stage=(0,), sequence_parallel=(False,), **classic)),
        "zero3-fsdp": ("DeepSpeed ZeRO-3 / FSDP, no model parallelism",
                       SearchSpace(tp=(1,), pp=(1,), zero_stage=(3,), sequence_parallel=(False,), **classic)),
        "megatron-lm": (f"Megatron-LM recipe: tp={tp} within a node, pipeline across nodes, uniform stages, "
                        "sequence parallel + selective recompute",
                        SearchSpace(tp=(tp,), schedules=("1f1b", "interleaved-1f1b"),
                                    sequence_parallel=(True,) if tp > 1 and has_sequence else (False,),
                                    recompute=("selective", "full"), zero_stage=(0, 1), partition="uniform",
                                    **classic)),
    }


def run_baselines(graph: CostGraph, cluster: ClusterSpec, global_batch: int, c: CostConstants, *,
                  pricer: Pricer | None = None, fp8: bool = False) -> list[BaselineRecord]:
    """The best configuration of each recipe under the same cost model; ``pricer`` (the plan's, of the same
    graph, cluster and constants) shares its tables, tp solves and partitions with the plan's search;
    ``fp8``: the plan's precision, which the recipes run too."""
    pricer = pricer or Pricer(graph, cluster, c)
    out = []
    for name, (description, space) in baseline_spaces(cluster, has_sequence=bool(graph.seq_len), fp8=fp8).items():
        result = search(graph, cluster, global_batch, space=space, top_k=1, pricer=pricer)
        if result.best is None:
            reason = "no configuration of this recipe fits in memory"
            if result.closest_misses:
                miss = result.closest_misses[0]
                reason += (f" (closest: {miss.config.label()} needs "
                           f"{miss.prediction.peak_memory_bytes / 2**30:.1f} GiB per device)")
            elif result.evaluated == 0:
                reason = _why_not_applicable(space, cluster, global_batch)
            out.append(BaselineRecord(name=name, description=description, config=None, step_time_s=None, mfu=None,
                                      peak_memory_bytes=None, fits=False, reason=reason))
            continue
        best = result.best
        out.append(BaselineRecord(name=name, description=description, config=best.config.label(),
                                  step_time_s=best.step_time_s, mfu=best.prediction.mfu,
                                  peak_memory_bytes=int(best.prediction.peak_memory_bytes), fits=True))
    return out


def _why_not_applicable(space: SearchSpace, cluster: ClusterSpec, global_batch: int) -> str:
    n = cluster.num_devices
    if space.tp == (1,) and space.pp == (1,) and global_batch % n:
        return (f"it needs one data-parallel replica per device, and the global batch {global_batch} is not "
                f"divisible by {n} devices")
    return "no degrees of this recipe divide the device count and the global batch"
