"""Solve-time benchmark behind the figures in ``docs/intra-op.md``.

    python -m bench.intra_op            # GPT-3 175B layer and model on one DGX A100 node
    python -m bench.intra_op --quick    # skip tracing the 96-layer model

Times are wall clock, best of ``--repeat`` warm runs, ``solve_layer`` / ``solve_model`` end to end
(strategy tables, ILP build, solve, solution).

The speed bars live here, not in the tests (a loaded CI machine stretches any wall time): one GPT-3
175B layer on an 8-device node in under ``LAYER_BAR_S`` (:func:`bar_rows`) and ``plan_placements`` of
the whole GPT-3 175B at tp = 8 in under ``PLACEMENTS_BAR_S`` (:func:`model_rows`). Each such row says
whether the figure meets its bar; the tests check what the figures rest on (optimal solves, an ILP whose
size does not grow with the width or the depth, the Megatron style).
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from functools import partial

from bench.common import meets
from planner.cluster import ClusterSpec
from planner.intra_op.examples import gpt_block_graph
from planner.intra_op.mesh import MeshSpec
from planner.intra_op.placements import plan_placements
from planner.intra_op.solve import solve_layer

GPT3 = {"seq": 2048, "hidden": 12288, "heads": 96}
LAYER_BAR_S = 1.0  # one GPT-3 175B layer (batch 8, SP on, 20 GB) on 8 devices, either backend
PLACEMENTS_BAR_S = 1.0  # plan_placements of the 96-block GPT-3 175B at tp = 8, warm
BAR_CASES = [({"tp": 8}, "cpsat"), ({"dp": 2, "tp": 4}, "cpsat"), ({"tp": 8}, "cbc"), ({"dp": 2, "tp": 4}, "cbc")]


def _best(fn, repeat: int):
    fn()  # warm up: imports, solver start-up
    best, best_out = math.inf, None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        elapsed = time.perf_counter() - start
        if elapsed < best:
            best, best_out = elapsed, out
    return best, best_out


def bar_rows(node: ClusterSpec, repeat: int) -> list[str]:
    """The 1-second bar: one GPT-3 175B layer at batch 8 with sequence parallelism, 20 GB per device, on
    both 8-device meshes with both backends (what ``tests/intra_op/test_speed.py`` used to time)."""
    rows = [f"One GPT-3 175B layer, batch 8, SP on, memory limit 20 GB, on one 8-device node: the bar is "
            f"{LAYER_BAR_S:g} s end to end (best of {repeat} warm run{'s' if repeat != 1 else ''}).", "",
            "| mesh | backend | status | ILP variables | solve (s) | end to end (s) | bar (s) | meets the bar |",
            "|---|---|---|---|---|---|---|---|"]
    graph = gpt_block_graph(batch=8, **GPT3)
    for axes, backend in BAR_CASES:
        mesh = MeshSpec.from_cluster(node, axes)
        seconds, sol = _best(partial(solve_layer, graph, mesh, node.device, memory_limit_bytes=20e9,
                                     backend=backend, sequence_parallel=True), repeat)
        rows.append(f"| {mesh.describe()} | {backend} | {sol.status} | {sol.num_variables} | "
                    f"{sol.solve_time_s:.3f} | {seconds:.3f} | {LAYER_BAR_S:g} | {meets(seconds, LAYER_BAR_S)} |")
    return rows


def layer_rows(node: ClusterSpec, repeat: int) -> list[str]:
    rows = ["| mesh | batch | SP | backend | ILP variables | solve (s) | end to end (s) | qkv / proj / fc1 / fc2 |",
            "|---|---|---|---|---|---|---|---|"]
    cases = [({"tp": 2}, 1), ({"tp": 4}, 1), ({"tp": 8}, 1), ({"dp": 2, "tp": 4}, 8)]
    for axes, batch in cases:
        mesh = MeshSpec.from_cluster(node, axes)
        graph = gpt_block_graph(batch=batch, **GPT3)
        for sp in (False, True):
            for backend in ("cpsat", "cbc"):
                seconds, sol = _best(partial(solve_layer, graph, mesh, node.device, memory_limit_bytes=20e9,
                                             backend=backend, sequence_parallel=sp), repeat)
                chosen = " / ".join(sol.op(n).strategy for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))
                rows.append(f"| {mesh.describe()} | {batch} | {'on' if sp else 'off'} | {backend} | "
                            f"{sol.num_variables} | {sol.solve_time_s:.3f} | {seconds:.3f} | {chosen} |")
    return rows


def model_rows(node: ClusterSpec, repeat: int) -> list[str]:
    from planner.intra_op.from_trace import op_graph_from_cost_graph
    from planner.intra_op.model import solve_model
    from planner.models import load_preset
    from planner.trace import trace_model

    preset = load_preset("gpt3-175b")
    start = time.perf_counter()
    cost_graph = trace_model(preset.build(device="meta"), preset.sample_input(1), name="gpt3-175b")
    traced = time.perf_counter() - start
    mesh = MeshSpec.from_cluster(node, {"tp": 8})
    one, one_sol = _best(lambda: solve_layer(op_graph_from_cost_graph(cost_graph, 1), mesh, node.device,
                                             memory_limit_bytes=math.inf), repeat)
    whole, sol = _best(lambda: solve_model(cost_graph, mesh, node.device, memory_limit_bytes=math.inf), repeat)
    rows = [f"Traced GPT-3 175B ({cost_graph.group_summary()}) in {traced:.1f} s. "
            f"`plan_placements` (warm) is held to a {PLACEMENTS_BAR_S:g} s bar.", "",
            "| what | ILP variables | end to end (s) | bar (s) | meets the bar |", "|---|---|---|---|---|",
            f"| one block (`solve_layer`) | {one_sol.num_variables} | {one:.3f} | — | — |",
            f"| whole model, 98 layers (`solve_model`) | {sol.num_variables} | {whole:.3f} | — | — |"]
    for sp in (False, True):
        def cold(sp=sp):  # plan_placements solves afresh (the Pricer, not the solver, keeps solves)
            return plan_placements(cost_graph, node, tp=8, micro_batch=1, sequence_parallel=sp)
        seconds, d = _best(cold, repeat)
        rows.append(f"| `plan_placements`, model-only tp=8, SP {'on' if sp else 'off'} | "
                    f"{d['solver']['num_variables']} | {seconds:.3f} | {PLACEMENTS_BAR_S:g} | "
                    f"{meets(seconds, PLACEMENTS_BAR_S)} |")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="skip tracing the whole GPT-3 175B")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    node = ClusterSpec.preset("dgx-a100-80g")
    print(f"Machine: {platform.processor() or platform.machine()}, Python {platform.python_version()}; "
          f"cluster preset {node.name}; GPT-3 175B layer, bf16, memory limit 20 GB.\n")
    print("\n".join(layer_rows(node, args.repeat)))
    print()
    print("\n".join(bar_rows(node, args.repeat)))
    if not args.quick:
        print()
        print("\n".join(model_rows(node, args.repeat)))


if __name__ == "__main__":
    main()
