"""The layer table's memoised figures equal what slicing the arrays gives, bit for bit.

The search prices thousands of configurations from a few tables; ``LayerTable.segment``,
``total_summary_s``, ``total_prefix_s`` and the windowed memory matrix let it reuse work, and
plans must not change by one byte because of it, so these checks use ``==``, not ``approx``.
"""

import itertools

import numpy as np
import pytest

from planner.cluster import ClusterSpec
from planner.cost.constants import CostConstants
from planner.cost.memory import _stage_params
from planner.cost.model import evaluate, layer_table, stage_memory_matrix, stage_params
from planner.cost.pipeline_links import tied_holder_devices, tied_sync_s
from planner.plan import ParallelConfig

C = CostConstants()
CLUSTER = ClusterSpec.preset("dgx-a100-80g", nodes=2)


@pytest.fixture(scope="module")
def graph():
    from tests_helpers import traced

    return traced("gpt3-125m")  # tied embedding: first and last layer share the word embedding


def _table(graph, rec="selective", sp=True):
    return layer_table(graph, CLUSTER, micro_batch=2, tp=2, sequence_parallel=sp, recompute=rec, c=C,
                       tp_pricing="megatron")


def test_segment_is_the_slices_own_sums_and_maxima(graph):
    table = _table(graph)
    n = graph.num_layers
    assert any(table.tied[i] for i in range(n)), "the fixture must have tied parameters"
    for a, b in itertools.combinations(range(n + 1), 2):
        s = table.segment(a, b)
        assert s.fwd_s == float(table.fwd_s[a:b].sum())
        assert s.bwd_input_s == float(table.bwd_input_s[a:b].sum())
        assert s.bwd_weight_s == float(table.bwd_weight_s[a:b].sum())
        assert s.recompute_s == float(table.recompute_s[a:b].sum())
        assert s.tp_comm_s == float(table.tp_comm_s[a:b].sum())
        assert s.tp_comm_fwd_s == float(table.tp_comm_forward_s[a:b].sum())
        assert s.stored_act_bytes == float(table.stored_act_bytes[a:b].sum())
        assert s.work_act_max == float(table.work_act_bytes[a:b].max())
        assert s.output_max == float(table.output_bytes[a:b].max())
        assert s.param_max == float(table.params[a:b].max())
        assert s.params == _stage_params(table, a, b) == stage_params(table, a, b)
        assert table.segment(a, b) is s  # memoised
    # a stage without the owner of the tied embedding holds a copy of it
    assert stage_params(table, 1, n) > float(table.params[1:n].sum())


def test_totals_are_memoised_read_only_and_exact(graph):
    table = _table(graph, rec="full", sp=False)
    total = table.fwd_s + table.bwd_input_s + table.bwd_weight_s + table.recompute_s + table.tp_comm_s
    assert np.array_equal(table.total_s, total) and table.total_s is table.total_s
    with pytest.raises(ValueError):
        table.total_s[0] = 0.0  # shared by every caller: must not be writable
    assert table.total_summary_s() == (float(total.sum()), float(total.max()))
    assert np.array_equal(table.total_prefix_s(), np.concatenate([[0.0], np.cumsum(total)]))


@pytest.mark.parametrize("zero", [0, 1, 3])
def test_memory_matrix_block_is_the_slice_of_the_full_matrix(graph, zero):
    table = _table(graph)
    cfg = ParallelConfig(dp=2, tp=2, pp=3, micro_batch_size=2, num_micro_batches=4, recompute="selective",
                         sequence_parallel=True, zero_stage=zero)
    mat = stage_memory_matrix(table, cfg, C, p=3, in_flight=[3.0, 2.0, 1.0])
    n = graph.num_layers
    for k in range(3):
        full = mat(k)
        for rows, cols in [(slice(k, n - 2 + k), slice(k + 1, n - 1 + k)), (slice(0, 3), slice(n - 4, n + 1))]:
            assert np.array_equal(mat(k, rows, cols), full[rows, cols])


@pytest.mark.parametrize("schedule, v", [("1f1b", 1), ("interleaved-1f1b", 2), ("zb-v", 2)])
def test_tied_sync_with_hoisted_holders_and_warm_cache_price_the_same(graph, schedule, v):
    n = graph.num_layers
    p = 2
    cfg = ParallelConfig(dp=2, tp=2, pp=p, micro_batch_size=2, num_micro_batches=4, schedule=schedule,
                         virtual_stages=v, recompute="selective", sequence_parallel=True)
    cuts = np.linspace(0, n, p * v + 1).round().astype(int)
    bounds = [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])]
    table = _table(graph)
    holders = tied_holder_devices(table, bounds, cfg)
    assert holders and all(len(devs) >= 1 for _, devs in holders)
    syncs = [tied_sync_s(table, bounds, d, cfg, CLUSTER, C, 2.0, holders) for d in range(p)]
    assert syncs == [tied_sync_s(table, bounds, d, cfg, CLUSTER, C, 2.0) for d in range(p)]
    # the embedding (first chunk) and the head (last chunk) share a device only in ZB-V's V shape
    shared = schedule != "zb-v"
    assert any(len(devs) > 1 for _, devs in holders) == shared
    assert (max(syncs) > 0) == shared
    cold = evaluate(graph, CLUSTER, cfg, bounds, C, table=_table(graph))  # fresh table: nothing cached
    warm = evaluate(graph, CLUSTER, cfg, bounds, C, table=table)  # segments cached above
    again = evaluate(graph, CLUSTER, cfg, bounds, C, table=table)
    for pred in (warm, again):
        assert pred.step_time_s == cold.step_time_s
        assert pred.time_breakdown_s == cold.time_breakdown_s
        assert [m.total for m in pred.memory_per_stage] == [m.total for m in cold.memory_per_stage]


def test_range_max_equals_the_row_by_row_running_maximum():
    from planner.cost.memory import _range_max

    rng = np.random.default_rng(3)
    for n in (0, 1, 2, 7, 40):
        arr = rng.uniform(0.0, 9.0, size=n) * (rng.random(n) > 0.3)  # zeros and repeats too
        expected = np.zeros((n + 1, n + 1))
        for i in range(n):
            expected[i, i + 1:] = np.maximum.accumulate(arr[i:])
        assert np.array_equal(_range_max(arr), expected)


def test_params_matrix_counts_a_tied_copy_where_a_user_is_inside_and_the_owner_is_not(graph):
    table = _table(graph)
    n = graph.num_layers
    prefix = np.concatenate([[0.0], np.cumsum(table.params)])
    expected = prefix[None, :] - prefix[:, None]
    spans = {name: (numel, owner) for entries in table.tied for name, numel, owner in entries}
    for name, (numel, owner) in sorted(spans.items()):
        users = [u for u, entries in enumerate(table.tied) if any(x[0] == name for x in entries)]
        for i, j in itertools.product(range(n + 1), repeat=2):
            if i > owner and any(i <= u < j for u in users):
                expected[i, j] += numel
    assert np.array_equal(table.matrices()["params"], expected)
