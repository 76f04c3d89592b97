"""``python -m tools.trace_report``: trace every listed model and print a Markdown table.

Columns: capture method, parameters, op-graph nodes, layers, layer groups after collapsing
repeats (and the largest group as ``L x name``), forward FLOPs per sample, and the time of
``trace_model`` alone (model construction excluded) as CPU time, which does not depend on what
else the machine runs (tracing on meta is single-threaded), and as wall time. The table in
``docs/tracing.md`` is this command's output. ``--hf`` adds the Hugging Face models (needs ``transformers``), built
from their default configs on meta.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

from planner.models import load_preset
from planner.trace.graph import CostGraph
from planner.trace.tracer import trace_model

PRESETS = ("gpt3-175b", "bert-large", "t5-11b", "vit-h-14", "wav2vec2-large", "deepspeech2", "llama2-7b",
           "llama2-70b", "mixtral-8x7b", "resnet50", "imbalanced-gpt")
HF = ("hf-gpt2", "hf-bert", "hf-t5", "hf-vit", "hf-wav2vec2", "hf-llama", "hf-mixtral")


def trace_one(name: str, *, dtype: str = "bf16") -> tuple[CostGraph, float]:
    """Trace a preset or a Hugging Face model (``hf-*``) by name, batch 1; returns (graph, CPU seconds)."""
    if name.startswith("hf-"):
        from planner.models.hf import HF_MODELS, build_hf

        model, sample = build_hf(name)
        seq_len = HF_MODELS[name].seq_len
    else:
        preset = load_preset(name)
        model, sample, seq_len = preset.build(device="meta"), preset.sample_input(1), preset.seq_len
    start = time.process_time()
    graph = trace_model(model, sample, name=name, dtype=dtype, seq_len=seq_len, copy_model=False)
    return graph, time.process_time() - start


def row(graph: CostGraph, cpu_s: float) -> list[str]:
    groups = graph.block_groups()
    largest = max(groups, key=lambda g: len(g.indices))
    return [graph.name, graph.method, f"{graph.param_count / 1e6:,.1f}M", f"{graph.ops.number_of_nodes():,}",
            str(graph.num_layers), f"{len(groups)} ({largest.describe()})", f"{graph.fwd_flops / 1e9:,.1f}",
            f"{cpu_s:.2f}", f"{graph.trace_time_s:.2f}"]


HEADER = ["model", "method", "params", "op nodes", "layers", "groups (largest)", "fwd GFLOP/sample",
          "trace CPU s", "trace wall s"]


def markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.trace_report",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help=f"presets or hf-* names (default: {', '.join(PRESETS)})")
    parser.add_argument("--hf", action="store_true", help="also trace the Hugging Face models")
    parser.add_argument("--dtype", default="bf16")
    args = parser.parse_args(argv)
    names = list(args.models) or list(PRESETS)
    if args.hf:
        names += [n for n in HF if n not in names]
    warnings.filterwarnings("ignore")
    trace_one("gpt-tiny")  # first-call imports and dispatch caches are not any model's trace time
    rows = []
    for name in names:
        start = time.perf_counter()
        graph, cpu_s = trace_one(name, dtype=args.dtype)
        rows.append(row(graph, cpu_s))
        print(f"traced {name} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
