"""The intra-op ILP's tensor-parallel seconds per layer against the Megatron all-reduce count.

``python tools/tp_pricing_table.py gpt3-175b [--cluster dgx-a100-80g] [--micro-batch 1]`` prints one
Markdown row per distinct layer, tp and sequence-parallel setting (docs/intra-op.md quotes it).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from planner.cluster import ClusterSpec
from planner.cost.comm import strided_group
from planner.cost.constants import CostConstants
from planner.cost.model import megatron_tp_s
from planner.pricing import Pricer
from planner.trace.graph import CostGraph


def compare_with_megatron(cost_graph: CostGraph, cluster: ClusterSpec, *, micro_batch: int = 1,
                          c: CostConstants | None = None, tps: tuple[int, ...] = (2, 4, 8)) -> list[dict[str, Any]]:
    """Rows of ILP vs Megatron-count seconds per micro-batch, one per distinct layer, tp and sp."""
    pricer = Pricer(cost_graph, cluster, c)
    seen: dict[str, int] = {}
    for i, layer in enumerate(cost_graph.layers):
        seen.setdefault(layer.signature, i)
    rows = []
    for tp in tps:
        group = strided_group(cluster, tp, 1)
        for sp in (False, True):
            pricing = pricer.tp_solve(tp, micro_batch, sp)
            for i in sorted(seen.values()):
                layer = cost_graph.layers[i]
                megatron = sum(megatron_tp_s(layer, dtype=cost_graph.dtype, micro_batch=micro_batch, group=group,
                                             sequence_parallel=sp, c=pricer.c))
                ilp = pricing.per_micro_batch_s[i] if pricing.source == "ilp" else math.nan
                rows.append({"tp": tp, "sp": sp, "layer": layer.name, "ilp_s": ilp, "megatron_s": megatron,
                             "source": pricing.source})
    return rows


def main(argv: list[str] | None = None) -> int:
    from planner.api import resolve_cluster, resolve_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a preset name (python -m planner models)")
    parser.add_argument("--cluster", default="dgx-a100-80g")
    parser.add_argument("--micro-batch", type=int, default=1)
    args = parser.parse_args(argv)
    cluster = resolve_cluster(args.cluster)
    graph = resolve_model(args.model, dtype="bf16").graph
    print("| tp | sequence parallel | layer | ILP ms | Megatron count ms | ILP / count |")
    print("|---|---|---|---|---|---|")
    for r in compare_with_megatron(graph, cluster, micro_batch=args.micro_batch):
        print(f"| {r['tp']} | {'on' if r['sp'] else 'off'} | {r['layer']} | {r['ilp_s'] * 1e3:.4g} | "
              f"{r['megatron_s'] * 1e3:.4g} | {r['ilp_s'] / r['megatron_s']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
