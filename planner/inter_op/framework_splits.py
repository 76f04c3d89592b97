"""The stage splits training frameworks make by their own rule, so a run can be priced as it runs there.

The planner's own split is the exact memory-aware partition (:mod:`planner.inter_op.chain`); a user
who runs the configuration in Megatron-LM or nanotron gets that framework's split instead, and a
prediction is only as good as the split it prices (``python -m planner evaluate --partition``).

* **Megatron-LM** (``megatron``): the transformer layers in equal runs per model chunk
  (``num_layers / (pp · v)``), the embedding with the first chunk and the output layer with the last
  (Megatron-LM's ``get_num_layers_to_build`` without its uneven-first/last-stage options). Here the
  "transformer layers" are the traced layers inside repeated block groups
  (:meth:`planner.trace.graph.CostGraph.block_groups`); a layer outside them goes with the chunk of
  the block before it (the first chunk when none is). Where the blocks do not divide evenly, the
  earlier chunks take one more.
* **nanotron** (``nanotron``): a block goes to the current rank, and the rank moves on once the
  running cost passes ``(rank + 1) / pp`` of the total, so each rank keeps the block that crosses its
  share. The cost of a decoder block is its weights' size (nanotron's ``4·h² + 3·h·ffn``, which counts
  a grouped-query attention's k and v as full heads), the LM head's is ``vocab · h`` (its weights,
  tied or not), the embedding's 0 (nanotron's ``get_block_compute_costs`` and ``build_model``). Ranks
  the rule leaves without a block cannot be priced: an error says so.
"""

from __future__ import annotations

from planner.errors import SpecError
from planner.trace.graph import CostGraph

__all__ = ["FRAMEWORK_SPLITS", "megatron_split", "nanotron_split"]

Boundaries = tuple[tuple[int, int], ...]


def _blocks(graph: CostGraph) -> list[int]:
    """Indices of the traced layers in repeated block groups (each repeated at least twice)."""
    return [i for g in graph.block_groups() if g.repeated for i in g.indices]


def megatron_split(graph: CostGraph, count: int) -> Boundaries:
    """``count`` chunks with equal runs of blocks (earlier chunks one more where they do not divide)."""
    blocks = _blocks(graph)
    if len(blocks) < count:
        raise SpecError("partition", "megatron", f"{graph.name} has {len(blocks)} repeated blocks to split into "
                        f"{count} model chunks (pp x virtual stages); use 'balanced' or 'uniform', or fewer chunks")
    base, extra = divmod(len(blocks), count)
    starts, k = [0], 0
    for chunk in range(1, count):
        k += base + (1 if chunk - 1 < extra else 0)
        starts.append(blocks[k])  # a chunk starts at its first block; what lies before goes with the previous
    return tuple(zip(starts, [*starts[1:], graph.num_layers]))


def _nanotron_cost(graph: CostGraph, blocks: list[int]) -> list[float]:
    """Each traced layer's cost in nanotron's rule: its weights (tied ones included), 0 before the first block."""
    first = blocks[0] if blocks else graph.num_layers
    return [0.0 if i < first else float(layer.param_count + sum(t.numel for t in layer.tied_params))
            for i, layer in enumerate(graph.layers)]


def nanotron_split(graph: CostGraph, count: int) -> Boundaries:
    """``count`` ranks by nanotron's running-cost threshold (module docstring)."""
    cost = _nanotron_cost(graph, _blocks(graph))
    total = sum(cost)
    owner, rank, running = [], 0, 0.0
    for c in cost:
        running += c
        owner.append(rank)
        if rank < count - 1 and running > total * (rank + 1) / count:
            rank += 1
    used = sorted(set(owner))
    if len(used) < count:
        heavy = max(range(len(cost)), key=cost.__getitem__)
        raise SpecError("partition", "nanotron", f"nanotron's rule leaves {count - len(used)} of {count} pipeline "
                        f"ranks of {graph.name} without a layer ({graph.layers[heavy].name} weighs "
                        f"{cost[heavy] / max(total, 1.0):.0%} of the model); price it with fewer stages or another "
                        "partition")
    starts = [owner.index(r) for r in range(count)]
    return tuple(zip(starts, [*starts[1:], graph.num_layers]))


FRAMEWORK_SPLITS = {"megatron": megatron_split, "nanotron": nanotron_split}
