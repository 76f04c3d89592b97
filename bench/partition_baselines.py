"""The partitions people use without a solver: the baselines of the stage solver's benchmark.

Each baseline cuts the layers into the configuration's ``pp·v`` contiguous chunks by its own
rule; :meth:`planner.pricing.Pricer.evaluate` prices the result exactly as it prices the solver's.
The rules are the real packages' functions (installed by ``make install``, pinned in
``requirements/constraints.txt``), not reimplementations:

* ``uniform``: ``deepspeed.runtime.utils.partition_uniform`` (DeepSpeed
  ``PipelineModule(partition_method="uniform")``: equal layer counts, the remainder on the first
  stages; Megatron's default split).
* ``parameters``: ``deepspeed.runtime.utils.partition_balanced`` over each layer's parameter count
  (DeepSpeed ``partition_method="parameters"``; a tied layer counts its shared weights again, as
  DeepSpeed builds them in each stage).
* ``time``: torchgpipe's ``balance_by_time`` rule: ``torchgpipe.balance.blockpartition.solve`` (the
  block partition of Bárány and Grinberg) over per-layer times in integer microseconds. torchgpipe
  measures those times itself (``profile_times``); here they are the cost model's forward +
  backward time of each layer, since the benchmark's models are priced, not run.
  :mod:`bench.peers` calls ``balance_by_time`` itself, on models run on this CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

from planner.trace.graph import CostGraph

BASELINES = ("uniform", "parameters", "time")


def deepspeed_partition_uniform(num_items: int, num_parts: int) -> list[int]:
    """Part boundaries ``[0, …, n]``: DeepSpeed's ``partition_uniform``."""
    from deepspeed.runtime.utils import partition_uniform

    return [int(x) for x in partition_uniform(num_items=num_items, num_parts=num_parts)]


def deepspeed_partition_balanced(weights: Sequence[float], num_parts: int) -> list[int]:
    """Part boundaries ``[0, …, n]`` minimising ``max - min`` part weight: DeepSpeed's ``partition_balanced``."""
    from deepspeed.runtime.utils import partition_balanced

    return [int(x) for x in partition_balanced(weights=list(weights), num_parts=num_parts)]


def block_partition(sequence: Sequence[int], partitions: int) -> list[int]:
    """Block sizes of torchgpipe's ``blockpartition.solve`` (what ``balance_by_time`` returns)."""
    from torchgpipe.balance import blockpartition

    return [len(block) for block in blockpartition.solve(list(sequence), partitions)]


def baseline_cuts(method: str, graph: CostGraph, layer_time_s: Sequence[float], chunks: int
                  ) -> list[tuple[int, int]]:
    """Layer ranges of ``chunks`` stages by a baseline rule (``layer_time_s``: the cost model's time
    per layer, which ``time`` profiles)."""
    if method == "uniform":
        bounds = deepspeed_partition_uniform(graph.num_layers, chunks)
        return list(zip(bounds, bounds[1:]))
    if method == "parameters":
        counts = [getattr(layer, "total_param_count", layer.param_count) for layer in graph.layers]
        bounds = deepspeed_partition_balanced(counts, chunks)
        return list(zip(bounds, bounds[1:]))
    if method == "time":
        out, start = [], 0
        for size in block_partition([int(t * 1_000_000) for t in layer_time_s], chunks):
            out.append((start, start + size))
            start += size
        return out
    raise ValueError(f"method: got {method!r}; use one of {BASELINES}")
