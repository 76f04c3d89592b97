"""The stage splits training frameworks make by their own rule, so a run can be priced as it runs there.

The planner's own split is the exact memory-aware partition (:mod:`planner.inter_op.chain`); a user
who runs the configuration in Megatron-LM or nanotron gets that framework's split instead, and a
prediction is only as good as the split it prices (``python -m planner evaluate --partition``).

* **Megatron-LM** (``megatron``): the transformer layers in equal runs per model chunk
  (``num_layers / (pp · v)``), the embedding with the first chunk and the output layer with the last
  (Megatron-LM's ``get_num_layers_to_build`` without its uneven-first/last-stage options). The
  "transformer layers" are the traced layers :func:`layer_kinds` calls blocks (the exporters count
  them the same way); where they do not divide evenly, the earlier chunks take one more.
* **nanotron** (``nanotron``): a block goes to the current rank, and the rank moves on once the
  running cost passes ``(rank + 1) / pp`` of the total, so each rank keeps the block that crosses its
  share. The cost of a decoder block is its weights' size (nanotron's ``4·h² + 3·h·ffn``, which counts
  a grouped-query attention's k and v as full heads), the LM head's is ``vocab · h`` (its weights,
  tied or not), the embedding's 0 (nanotron's ``get_block_compute_costs`` and ``build_model``). Ranks
  the rule leaves without a block cannot be priced: an error says so.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from planner.errors import SpecError
from planner.trace.graph import CostGraph

__all__ = ["FRAMEWORK_SPLITS", "PARTITIONS", "SOLVED", "block_boundaries", "even_block_counts", "layer_kinds", "megatron_split",
           "nanotron_split", "uniform_block_counts"]

Boundaries = tuple[tuple[int, int], ...]
_BLOCK = re.compile(r"(?:^|\.)(\d+)$")


def layer_kinds(names: Sequence[str]) -> list[str]:
    """``pre`` / ``block`` / ``post`` for each traced layer: a block is a layer whose name ends in an
    integer index (``blocks.7``, ``layers.7``, ``h.7``) or lies between two such; the others are
    ``pre`` before the first block and ``post`` after the last. Frameworks count these blocks as their
    decoder layers (``--num-layers``, ``n_layers``); a model without indexed layers (an MLP, a CNN)
    counts every layer as one."""
    blocks = [i for i, n in enumerate(names) if _BLOCK.search(n)]
    if not blocks:
        return ["block"] * len(names)
    first, last = blocks[0], blocks[-1]
    return ["pre" if i < first else "post" if i > last else "block" for i in range(len(names))]


def block_boundaries(names: Sequence[str], counts: Sequence[int]) -> Boundaries:
    """Stage boundaries over the traced layers ``names`` with ``counts`` blocks per stage, the layers
    before the first block on the first stage and those after the last on the last (what every
    framework does with the embedding and the head when it splits by decoder layers)."""
    kinds = layer_kinds(names)
    block_at = [i for i, k in enumerate(kinds) if k == "block"]
    assert sum(counts) == len(block_at), (counts, len(block_at))
    n = len(kinds)
    cuts, seen = [0], 0
    for c in counts[:-1]:
        seen += c
        cuts.append(block_at[seen] if seen < len(block_at) else n)
    cuts.append(n)
    return tuple(zip(cuts, cuts[1:]))


def even_block_counts(num_blocks: int, stages: int) -> list[int] | None:
    """Equal blocks per stage, or ``None`` when ``stages`` does not divide the blocks."""
    return [num_blocks // stages] * stages if num_blocks % stages == 0 else None


def uniform_block_counts(num_blocks: int, stages: int) -> list[int]:
    """As equal as possible, the extra blocks on the first stages."""
    q, r = divmod(num_blocks, stages)
    return [q + (1 if i < r else 0) for i in range(stages)]


def megatron_split(graph: CostGraph, count: int) -> Boundaries:
    """``count`` chunks with equal runs of blocks (earlier chunks one more where they do not divide)."""
    names = [layer.name for layer in graph.layers]
    blocks = layer_kinds(names).count("block")
    if blocks < count:
        raise SpecError("partition", "megatron", f"{graph.name} has {blocks} blocks to split into {count} model "
                        "chunks (pp x virtual stages); use 'balanced' or 'uniform', or fewer chunks")
    return block_boundaries(names, uniform_block_counts(blocks, count))


def _nanotron_cost(graph: CostGraph) -> list[float]:
    """Each traced layer's cost in nanotron's rule: its weights (tied ones included), 0 before the first block."""
    kinds = layer_kinds([layer.name for layer in graph.layers])
    return [0.0 if kind == "pre" else float(layer.param_count + sum(t.numel for t in layer.tied_params))
            for kind, layer in zip(kinds, graph.layers)]


def nanotron_split(graph: CostGraph, count: int) -> Boundaries:
    """``count`` ranks by nanotron's running-cost threshold (module docstring)."""
    cost = _nanotron_cost(graph)
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
# Every stage-split rule a plan or an evaluation may use: the planner's exact memory-aware partition,
# equal traced layers per chunk, or a framework's own.
# "balanced": the exact DP's split improved on the simulated step (planner.inter_op.local_search);
# "exact": the DP's split alone; the rest are fixed rules.
PARTITIONS = ("balanced", "exact", "uniform", *FRAMEWORK_SPLITS)
SOLVED = ("balanced", "exact")  # the partitions the stage solver computes
