"""The issue's speed bar: one GPT-3 175B layer on an 8-device node in under a second.

Loose on purpose (the solves take tens of milliseconds); `python -m planner.intra_op.bench`
prints the actual figures quoted in docs/intra-op.md.
"""

from __future__ import annotations

import time

import pytest

from planner.intra_op import solve_layer
from planner.intra_op.examples import gpt_block_graph


@pytest.mark.parametrize("axes", [{"tp": 8}, {"dp": 2, "tp": 4}], ids=["tp8", "dp2xtp4"])
@pytest.mark.parametrize("backend", ["cpsat", "cbc"])
def test_gpt3_layer_on_one_node_under_a_second(mesh_of, device, axes, backend):
    graph = gpt_block_graph(batch=8, seq=2048, hidden=12288, heads=96)
    mesh = mesh_of(**axes)
    solve_layer(graph, mesh, device, memory_limit_bytes=20e9, backend=backend)  # warm the solver up
    start = time.perf_counter()
    sol = solve_layer(graph, mesh, device, memory_limit_bytes=20e9, backend=backend, sequence_parallel=True)
    assert time.perf_counter() - start < 1.0
    assert sol.status == "optimal"
