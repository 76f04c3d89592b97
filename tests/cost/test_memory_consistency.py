"""The partition DP's fast memory paths (vector, matrix) equal the reference stage_memory."""

import itertools

import pytest

from planner.cluster import ClusterSpec
from planner.cost.constants import CostConstants
from planner.cost.model import layer_table, stage_memory, stage_memory_matrix, stage_memory_vec
from planner.plan import ParallelConfig


@pytest.mark.parametrize("zero, rec, sp, opt_temp, dtype", [
    (0, "none", False, 0.0, None), (1, "selective", True, 0.0, None), (1, "full", False, 0.0, None),
    (3, "full", False, 0.0, None), (3, "selective", True, 0.0, None),
    (0, "none", False, 4.0, "fp32"),  # the optimizer's temporaries exceed the backward peak for some stages
    (2, "none", True, 400.0, None),
])
def test_fast_memory_paths_match_reference(zero, rec, sp, opt_temp, dtype):
    from tests_helpers import traced

    graph = traced("gpt3-125m")  # tied embedding: exercises the shared-parameter term
    cluster = ClusterSpec.preset("dgx-a100-80g")
    c = CostConstants(optimizer_temp_bytes_per_param=opt_temp)
    cfg = ParallelConfig(dp=2, tp=2, pp=2, micro_batch_size=2, num_micro_batches=4, recompute=rec,
                         sequence_parallel=sp, zero_stage=zero)
    table = layer_table(graph, cluster, micro_batch=2, tp=2, sequence_parallel=sp, recompute=rec, c=c, dtype=dtype)
    flights = [2.0, 1.0]
    vec = stage_memory_vec(table, cfg, c, p=2, in_flight=flights)
    mat = stage_memory_matrix(table, cfg, c, p=2, in_flight=flights)
    n = graph.num_layers
    for k in range(2):
        for i, j in itertools.combinations(range(n + 1), 2):
            ref = stage_memory(table, [(i, j)], in_flight=flights[k], cfg=cfg, c=c, is_last=(k == 1)).total
            assert vec(j, k)[i] == pytest.approx(ref, rel=1e-9)
            assert mat(k)[i, j] == pytest.approx(ref, rel=1e-9)
