"""How long a micro-batch's pass through one layer of a pipeline stage took on the measured sweep.

``python -m tools.pipeline_slots``: for every pipelined configuration of the H100 sweep
that ran (``datasets/measured/h100_sweep.json``, nanotron's 1F1B engine), the measured step divided by
its ``m + pp - 1`` pipeline slots and by the layers of a stage: seconds per layer and micro-batch,
forward and backward. Grouped by model, tensor-parallel degree and whether the pipeline stays on one
node, with the median over micro-batch sizes of at most ``tp`` (where the device has least work) and of
at least ``2 tp``. This is the evidence behind ``CostConstants.pipelined_tp_collective_s`` and
``pipelined_tp_hop_s`` (docs/cost-model.md): once the pipeline crosses nodes, a small micro-batch's
time per layer stops depending on the micro-batch size and the hidden size and grows with tp.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

from planner.validation.cases import load_cases
from planner.validation.metrics import healthy


def _rows() -> dict[tuple[str, int, bool], dict[str, list[float]]]:
    """(model, tp, pipeline on one node) -> {"small": [...], "large": [...]} seconds per layer-slot."""
    cases = [c for c in load_cases("sweep").cases if c.status == "ok"]
    best: dict[str, float] = defaultdict(float)
    for c in cases:
        best[c.group] = max(best[c.group], c.measured_tokens_per_s_per_gpu)
    out: dict[tuple[str, int, bool], dict[str, list[float]]] = defaultdict(lambda: {"small": [], "large": []})
    for c in cases:
        k = c.config
        if k.pp < 2 or not healthy([best[c.group], c.measured_tokens_per_s_per_gpu])[1]:
            continue
        layers = c.model.kwargs["num_layers"] / k.pp
        per_layer = c.measured_step_s / (k.num_micro_batches + k.pp - 1) / layers
        one_node = c.cluster.nodes == 1
        size = "small" if k.micro_batch_size <= k.tp else "large" if k.micro_batch_size >= 2 * k.tp else ""
        if size:
            out[(c.model.name, k.tp, one_node)][size].append(per_layer)
    return out


def _median_ms(xs: list[float]) -> str:
    return f"{1e3 * statistics.median(xs):.1f} ({len(xs)})" if xs else "-"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.pipeline_slots", description=__doc__.split("\n")[0])
    ap.parse_args(argv)  # no options: --help only; the table is Markdown
    head = ("model", "tp", "pipeline", "ms per layer, mbs <= tp (runs)", "ms per layer, mbs >= 2 tp (runs)")
    rows = [(model, str(tp), "one node" if one else "across nodes", _median_ms(v["small"]), _median_ms(v["large"]))
            for (model, tp, one), v in sorted(_rows().items())]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
