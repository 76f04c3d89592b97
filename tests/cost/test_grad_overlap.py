"""The overlapped data-parallel gradient reduction: what the last backward hides, layer by layer.

:func:`planner.cost.grad_overlap.exposed_reduce_s` is a fluid queue; the oracle here is the discrete
thing it stands for: buckets of a fixed size, each launched when its last gradient exists, sent one
after another at the collective's rate.
"""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.cluster import ClusterSpec
from planner.cost.calibrate import gpt_graph
from planner.cost.constants import CostConstants
from planner.cost.grad_overlap import backward_release, exposed_reduce_s
from planner.cost.model import evaluate, layer_table
from planner.plan import ParallelConfig

C = CostConstants()


def _bucket_oracle(comm_s: float, seconds: np.ndarray, params: np.ndarray, pieces: int) -> float:
    """Exposed seconds when each layer's gradients leave in ``pieces`` equal buckets, each ready at the
    end of its share of the layer's backward, queued on one channel (no compute slowdown)."""
    rate = params.sum() / comm_s
    t = free = 0.0
    for d, g in zip(seconds, params):
        for k in range(1, pieces + 1):
            ready = t + d * k / pieces
            free = max(free, ready) + g / pieces / rate
        t += d
    return max(0.0, free - t)


# 0 or at least 1e-3: a subnormal share (5e-324) underflows the oracle's per-bucket arithmetic, not the queue
_AMOUNT = st.one_of(st.just(0.0), st.floats(1e-3, 1.0))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_AMOUNT, _AMOUNT), min_size=1, max_size=12), st.floats(0.05, 5.0))
def test_the_fluid_queue_matches_buckets_of_vanishing_size(layers, comm_s):
    seconds = np.array([d for d, _ in layers])
    params = np.array([g for _, g in layers])
    if seconds.sum() <= 0 or params.sum() <= 0:
        return
    fluid = exposed_reduce_s(comm_s, seconds, params, 0.0, C)
    coarse = _bucket_oracle(comm_s, seconds, params, 1)
    fine = _bucket_oracle(comm_s, seconds, params, 400)
    # buckets only delay the sends: the fluid queue is a lower bound that fine buckets approach
    assert fluid <= coarse + 1e-9 and fluid <= fine + 1e-9
    assert fine - fluid <= comm_s / 400 * len(layers) + 1e-9


def test_gradients_ready_at_the_start_leave_only_what_the_backward_does_not_cover():
    seconds, params = np.array([0.0, 2.0]), np.array([1.0, 0.0])  # everything ready before the backward runs
    assert exposed_reduce_s(3.0, seconds, params, 0.0, C) == pytest.approx(1.0)
    assert exposed_reduce_s(1.5, seconds, params, 0.0, C) == pytest.approx(0.0)


def test_the_first_layers_gradients_and_the_last_bucket_are_never_hidden():
    # a long backward, far more than the collective needs; a fifth of the gradients (an input embedding)
    # appear when it ends
    seconds, params = np.array([1.0] * 8 + [0.0]), np.array([1.0] * 8 + [2.0])
    assert exposed_reduce_s(1.0, seconds, params, 0.0, C) == pytest.approx(0.2)
    assert exposed_reduce_s(1.0, seconds[:-1], params[:-1], 0.0, C) == pytest.approx(0.0)
    assert exposed_reduce_s(1.0, seconds[:-1], params[:-1], 0.05, C) == pytest.approx(0.05)


def test_cores_shared_with_the_collectives_hide_nothing_and_hidden_time_slows_the_compute():
    seconds, params = np.array([1.0] * 4), np.array([1.0] * 4)
    assert exposed_reduce_s(2.0, seconds, params, 0.0, dataclasses.replace(C, comm_compute_overlap=0.0)) == 2.0
    hidden = 2.0 - exposed_reduce_s(2.0, seconds, params, 0.0, C)
    slow = dataclasses.replace(C, overlap_compute_slowdown=0.25)
    assert exposed_reduce_s(2.0, seconds, params, 0.0, slow) == pytest.approx(2.0 - hidden + 0.25 * hidden)


def test_backward_runs_the_last_chunk_first_and_tied_weights_leave_with_the_first_layer():
    graph = gpt_graph(8, 512, 4, seq_len=256, vocab=8192)
    table = layer_table(graph, ClusterSpec.preset("dgx-a100-80g"), micro_batch=1, tp=1, sequence_parallel=False,
                        recompute="none", c=C)
    n = graph.num_layers
    seconds, params = backward_release(table, [(0, 2), (2, n)], [1.0, 3.0])
    assert seconds[: n - 2].sum() == pytest.approx(3.0) and seconds[n - 2:].sum() == pytest.approx(1.0)
    assert params.sum() == pytest.approx(float(table.params.sum()))
    assert params[-1] == table.params[0]  # the tied embedding: owned by layer 0, released last
    # the head's chunk alone holds the tied weight owned outside it, released with the head
    _, head_only = backward_release(table, [(n - 1, n)], [1.0])
    tied = sum(numel for _, numel, _ in table.tied[n - 1])
    assert tied > 0 and head_only.sum() == pytest.approx(table.params[n - 1] + tied)


def _predict(vocab: int, dp: int = 64):
    graph = gpt_graph(8, 1024, 8, seq_len=1024, vocab=vocab)
    cluster = ClusterSpec.preset("dgx-a100-80g", nodes=dp // 8)
    cfg = ParallelConfig(dp=dp, tp=1, pp=1, micro_batch_size=4, num_micro_batches=1, overlap_grad_reduce=True)
    table = layer_table(graph, cluster, micro_batch=4, tp=1, sequence_parallel=False, recompute="none", c=C)
    return evaluate(graph, cluster, cfg, [(0, graph.num_layers)], C, table=table).time_breakdown_s


def test_a_larger_vocabulary_leaves_more_of_the_reduction_exposed():
    small, large = _predict(8192), _predict(131072)
    assert small["dp_comm_exposed_after_overlap"] > 0  # the last bucket at least
    assert large["dp_comm_exposed_after_overlap"] > 2 * small["dp_comm_exposed_after_overlap"]
