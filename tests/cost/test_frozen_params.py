"""Frozen parameters (requires_grad=False): traced as autograd runs them, priced as held weights only.

A frozen backbone has no weight gradients and, before the first trainable parameter, no backward at all;
its parameters take weight memory but no gradient, no optimizer state and no data-parallel reduction.
"""

import dataclasses
import itertools

import pytest
import torch
from torch import nn

from planner import ParallelConfig, evaluate, plan
from planner.cluster import ClusterSpec
from planner.cost.constants import CostConstants
from planner.cost.model import layer_table, stage_memory, stage_memory_matrix, stage_memory_vec
from planner.errors import SpecError
from planner.graph_io import graph_from_dict, graph_to_dict
from planner.trace import trace_model

D = 64


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D, 4 * D)
        self.fc2 = nn.Linear(4 * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class Stack(nn.Module):
    def __init__(self, n: int = 6) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(n))
        self.head = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def stack(frozen: tuple[int, ...] = ()) -> Stack:
    m = Stack()
    for i in frozen:
        m.blocks[i].requires_grad_(False)
    return m


SAMPLE = torch.zeros(2, D)
BLOCK_PARAMS = 2 * D * 4 * D + 4 * D + D


def test_trace_follows_autograd():
    """Frozen blocks before any trainable one have no backward and save nothing; a frozen block after a
    trainable one still passes the gradient through (input gradient), but has no weight gradient; the
    first trainable block computes no gradient for its input."""
    full = trace_model(stack(), SAMPLE)
    g = trace_model(stack(frozen=(0, 1, 3)), SAMPLE)
    counts = [lay.frozen_count for lay in g.layers]
    assert counts == [BLOCK_PARAMS, BLOCK_PARAMS, 0, BLOCK_PARAMS, 0, 0, 0]
    assert g.frozen_param_count == 3 * BLOCK_PARAMS and g.param_count == full.param_count
    for i in (0, 1):  # nothing before them trains: no backward, nothing saved
        assert g.layers[i].bwd_flops == 0 and g.layers[i].activation_bytes == 0
    assert g.layers[3].bwd_weight_flops == 0
    assert g.layers[3].bwd_input_flops == pytest.approx(full.layers[3].bwd_input_flops)
    # the first trainable block: weight gradients, but its first linear's input needs none
    assert g.layers[2].bwd_weight_flops == pytest.approx(full.layers[2].bwd_weight_flops)
    assert 0 < g.layers[2].bwd_input_flops < full.layers[2].bwd_input_flops
    assert g.layers[3].signature != g.layers[2].signature  # a frozen copy is not the same block
    assert [lay.fwd_flops for lay in g.layers] == pytest.approx([lay.fwd_flops for lay in full.layers])


def test_the_callers_module_keeps_its_flags():
    m = stack(frozen=(0,))
    trace_model(m, SAMPLE)
    assert [p.requires_grad for p in m.blocks[0].parameters()] == [False] * 4
    assert all(p.requires_grad for p in m.blocks[1].parameters())


def test_a_model_with_nothing_to_train_is_refused():
    m = stack()
    m.requires_grad_(False)
    with pytest.raises(SpecError) as err:
        plan(m, "dgx-a100-80g", global_batch=8, sample_input=SAMPLE)
    assert "model" in str(err.value) and "requires_grad" in str(err.value)


def test_state_memory_counts_weights_of_all_and_the_rest_of_the_trained():
    cfg = ParallelConfig(dp=8, micro_batch_size=2, num_micro_batches=1)
    full = evaluate(stack(), "dgx-a100-80g", cfg, sample_input=SAMPLE).predicted
    half = evaluate(stack(frozen=(0, 1, 2)), "dgx-a100-80g", cfg, sample_input=SAMPLE).predicted
    total = 6 * BLOCK_PARAMS + D * D + D
    trained = total - 3 * BLOCK_PARAMS
    for part in ("gradients", "optimizer"):
        assert half.memory_breakdown_bytes[part] == pytest.approx(full.memory_breakdown_bytes[part] * trained / total,
                                                                  abs=1)
    assert half.memory_breakdown_bytes["weights"] == full.memory_breakdown_bytes["weights"]
    assert half.time_breakdown_s["compute"] < full.time_breakdown_s["compute"]
    assert half.time_breakdown_s["optimizer"] == pytest.approx(full.time_breakdown_s["optimizer"] * trained / total)


def test_data_parallel_reduces_only_trained_gradients():
    cfg = ParallelConfig(dp=8, micro_batch_size=2, num_micro_batches=1)
    full = evaluate(stack(), "dgx-a100-80g", cfg, sample_input=SAMPLE).predicted
    almost = evaluate(stack(frozen=(0, 1, 2, 3, 4, 5)), "dgx-a100-80g", cfg, sample_input=SAMPLE).predicted
    assert almost.time_breakdown_s["dp_comm_exposed"] < full.time_breakdown_s["dp_comm_exposed"]


def _frozen_variant(graph):
    """``graph`` with half of every block's parameters and the tied embedding frozen."""
    layers = []
    for lay in graph.layers:
        tied = tuple(dataclasses.replace(t, frozen=True) for t in lay.tied_params)
        frozen = lay.param_count if lay.tied_params or lay.index == 0 else lay.param_count // 2
        layers.append(dataclasses.replace(lay, frozen_count=frozen, tied_params=tied))
    return dataclasses.replace(graph, layers=layers)


@pytest.mark.parametrize("zero", [0, 1, 3])
def test_fast_memory_paths_match_reference_with_frozen_parameters(zero):
    from tests_helpers import traced

    graph = _frozen_variant(traced("gpt3-125m"))  # tied embedding: exercises the shared-parameter term
    cluster = ClusterSpec.preset("dgx-a100-80g")
    c = CostConstants(optimizer_temp_bytes_per_param=4.0)
    cfg = ParallelConfig(dp=2, tp=2, pp=2, micro_batch_size=2, num_micro_batches=4, zero_stage=zero)
    table = layer_table(graph, cluster, micro_batch=2, tp=2, sequence_parallel=False, recompute="none", c=c)
    assert table.trained is not table
    flights = [2.0, 1.0]
    vec = stage_memory_vec(table, cfg, c, p=2, in_flight=flights)
    mat = stage_memory_matrix(table, cfg, c, p=2, in_flight=flights)
    whole = stage_memory(table, [(0, graph.num_layers)], in_flight=1.0, cfg=cfg, c=c, is_last=False)
    held = stage_memory(layer_table(traced("gpt3-125m"), cluster, micro_batch=2, tp=2, sequence_parallel=False,
                                    recompute="none", c=c), [(0, graph.num_layers)], in_flight=1.0, cfg=cfg, c=c,
                        is_last=False)
    assert whole.weights == held.weights and whole.gradients < held.gradients / 1.9
    for k in range(2):
        for i, j in itertools.combinations(range(graph.num_layers + 1), 2):
            ref = stage_memory(table, [(i, j)], in_flight=flights[k], cfg=cfg, c=c, is_last=(k == 1)).total
            assert vec(j, k)[i] == pytest.approx(ref, rel=1e-9)
            assert mat(k)[i, j] == pytest.approx(ref, rel=1e-9)


def test_plan_file_keeps_frozen_counts_and_old_records_read_as_trained():
    g = trace_model(stack(frozen=(0,)), SAMPLE)
    back = graph_from_dict(graph_to_dict(g))
    assert [lay.frozen_count for lay in back.layers] == [lay.frozen_count for lay in g.layers]
    plain = graph_to_dict(trace_model(stack(), SAMPLE))
    assert all("frozen_count" not in entry for entry in plain["layers"])  # a record as before
    assert graph_from_dict(plain).frozen_param_count == 0
