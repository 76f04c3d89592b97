"""The joint search prices tensor parallelism with the intra-op ILP (planner/intra_op/pricing.py).

Checked on numbers: the ILP's optimum is never dearer than the Megatron count on a GPT block (the
recipe is a feasible point and both price collectives with planner.cost.comm), a layer where it is
strictly cheaper, the fallback when the ILP cannot be used, and that a plan's predicted tp
communication is the cost of the placements it carries (one solve, not two).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from planner.cluster import ClusterSpec
from planner.cost.comm import strided_group
from planner.cost.constants import CostConstants
from planner.cost.model import layer_table, megatron_tp_s
from planner.intra_op.pricing import tp_pricing
from planner.pricing import Pricer
from planner.trace import trace_model

C = CostConstants()


def _megatron_s(graph, node, layer: int, *, tp: int, micro_batch: int, sp: bool) -> float:
    fwd, bwd = megatron_tp_s(graph.layers[layer], dtype=graph.dtype, micro_batch=micro_batch,
                             group=strided_group(node, tp, 1), sequence_parallel=sp, c=C)
    return fwd + bwd


@pytest.mark.parametrize("tp", [2, 4, 8])
@pytest.mark.parametrize("sp", [False, True], ids=["no-sp", "sp"])
def test_ilp_never_dearer_than_megatron_on_a_gpt_block(gpt3_2layer, node, tp, sp):
    """GPT-3 175B sizes: on the blocks (and the head) the ILP finds Megatron's split, priced to the
    same seconds, so the optimum is never worse and here exactly equal."""
    pricing = tp_pricing(gpt3_2layer, node, tp=tp, micro_batch=1, sequence_parallel=sp, c=C)
    assert pricing.source == "ilp", pricing.reason
    assert [layer.name for layer in gpt3_2layer.layers] == ["embed", "blocks.0", "blocks.1", "head"]
    for i in (1, 2, 3):
        ilp = pricing.per_micro_batch_s[i]
        megatron = _megatron_s(gpt3_2layer, node, i, tp=tp, micro_batch=1, sp=sp)
        assert megatron > 0
        assert ilp <= megatron * (1 + 1e-9), (i, ilp, megatron)
        assert ilp == pytest.approx(megatron, rel=1e-9)
    # a block: two forward and two backward all-reduces of b·s·h (or their RS + AG halves under sp)
    block = pricing.solve.solution().layers[1]
    kinds = sorted(c.kind for c in block.collectives if c.phase in ("fwd", "bwd"))
    assert kinds == (["all_gather"] * 4 + ["reduce_scatter"] * 4 if sp else ["all_reduce"] * 4)
    assert all(c.nbytes == 2048 * 12288 * 2 for c in block.collectives if c.phase != "grad_sync")
    # Megatron replicates the position table; the "model" axis must split it (the memory model counts
    # P / tp), so the embedding is the one layer the ILP prices above the count
    assert pricing.per_micro_batch_s[0] > _megatron_s(gpt3_2layer, node, 0, tp=tp, micro_batch=1, sp=sp)


class _Contract(nn.Module):
    """A layer that opens with a contracting linear (4096 -> 1024), like an adapter's down projection."""

    def __init__(self, k: int, n: int) -> None:
        super().__init__()
        self.fc = nn.Linear(k, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(self.fc(x))


class _TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Contract(4096, 1024), _Contract(1024, 256)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.fixture(scope="module")
def contracting():
    return trace_model(_TwoLayers(), torch.randn(1, 512, 4096, device="meta"), name="contracting")


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_ilp_strictly_cheaper_when_a_layer_opens_with_a_contracting_linear(contracting, node, tp):
    """The count makes the first linear of a layer column-parallel: a backward all-reduce of its
    4096-wide input gradient (and it does not even charge gathering the split output). The ILP
    makes it row-parallel: a forward all-reduce of the 1024-wide output, plus gathering the input
    gradient, about 20 % less at every tp."""
    pricing = tp_pricing(contracting, node, tp=tp, micro_batch=4, sequence_parallel=False, c=C)
    assert pricing.source == "ilp", pricing.reason
    ilp = pricing.per_micro_batch_s[0]
    megatron = _megatron_s(contracting, node, 0, tp=tp, micro_batch=4, sp=False)
    assert ilp < 0.9 * megatron, (ilp, megatron)
    assert sum(pricing.per_micro_batch_s) < sum(_megatron_s(contracting, node, i, tp=tp, micro_batch=4, sp=False)
                                                for i in range(2))
    first = pricing.solve.solution().layers[0]
    assert next(s.strategy for s in first.ops.values() if s.param_layouts) == "tp=row"


def test_layer_table_takes_the_ilp_and_falls_back_loudly(gpt_tiny, node):
    pricer = Pricer(gpt_tiny, node, C)
    ilp = pricer.table((2, 2, False, "none"))
    pricing = pricer.tp_solve(2, 2, False)
    assert ilp.tp_source == "ilp" and "intra-op ILP" in ilp.tp_note
    assert list(ilp.tp_comm_s) == list(pricing.per_micro_batch_s)
    assert list(ilp.tp_comm_fwd_s) == list(pricing.fwd_s)
    free = layer_table(gpt_tiny, node, micro_batch=2, tp=2, sequence_parallel=False, recompute="full", c=C,
                       tp_pricing="none")
    full = pricer.table((2, 2, False, "full"))
    assert pricer.bound_table((2, 2, False, "full")).total_s.tolist() == free.total_s.tolist()
    assert free.tp_source == "none" and not free.tp_comm_s.any()
    assert (free.total_s <= full.total_s).all() and (free.total_s < full.total_s).any()  # a lower bound
    assert (free.stored_act_bytes == full.stored_act_bytes).all()  # memory is the same
    # full recomputation repeats the forward collectives
    assert full.recompute_s == pytest.approx(free.recompute_s + pricing.fwd_s, rel=1e-12)

    from planner.models import load_preset

    preset = load_preset("gpt-tiny")
    coarse = trace_model(preset.build(), preset.sample_input(2), name="gpt-tiny", force_module_level=True)
    fallback = Pricer(coarse, node, C).table((2, 2, False, "none"))
    megatron = layer_table(coarse, node, micro_batch=2, tp=2, sequence_parallel=False, recompute="none", c=C,
                           tp_pricing="megatron")
    assert fallback.tp_source == "megatron" and "no op-level nodes" in fallback.tp_note
    assert list(fallback.tp_comm_s) == list(megatron.tp_comm_s) and fallback.tp_comm_s.sum() > 0
    for wrong in ("alpa", "ilp"):  # the ILP's seconds come in as data (tp_seconds), never by name
        with pytest.raises(ValueError, match="tp_pricing"):
            layer_table(coarse, node, micro_batch=2, tp=2, sequence_parallel=False, recompute="none", c=C,
                        tp_pricing=wrong)


def test_the_pricer_keeps_one_solve_per_micro_batch_and_sp(gpt_tiny, node):
    pricer = Pricer(gpt_tiny, node, C)
    a = pricer.tp_solve(2, 3, True)
    assert pricer.tp_solve(2, 3, True) is a
    assert pricer.with_cluster(ClusterSpec.preset("dgx-a100-80g")).tp_solve(2, 3, True) is a  # shared by orders
    assert pricer.group_tables((2, 3, True, "none")) == [pricer.table((2, 3, True, "none"))]  # one group
    assert pricer.table((2, 3, True, "none")).tp_comm_s.tolist() == list(a.per_micro_batch_s)  # that very solve
    assert tp_pricing(gpt_tiny, node, tp=2, micro_batch=3, sequence_parallel=True, c=C) is not a  # no global cache
    b = pricer.tp_solve(2, 6, True)
    assert b is not a and sum(b.per_micro_batch_s) > sum(a.per_micro_batch_s)
    slow = Pricer(gpt_tiny, node, CostConstants(link_efficiency=0.4)).tp_solve(2, 3, True)
    assert sum(slow.per_micro_batch_s) > sum(a.per_micro_batch_s)  # the constants are the Pricer's
    with pytest.raises(ValueError, match="micro_batch"):
        tp_pricing(gpt_tiny, node, tp=2, micro_batch=0, sequence_parallel=False, c=C)


def _forget_everything() -> None:
    """A cold process: no cached op graph or CP-SAT model (tp_pricing itself caches nothing)."""
    from planner.intra_op import ilp, model

    ilp._CPSAT_MODELS.clear()
    for _, prep in model._PREP.values():
        prep.op_graphs.clear()


def _fingerprint(p) -> tuple:
    r = p.solve.result
    return (p.fwd_s, p.bwd_s, p.grad_sync_s, r.status, r.choice, r.objective, r.bound, r.num_variables,
            r.num_constraints, p.solve.time_unit_s)


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_pricing_with_reused_models_equals_cold_solves(gpt3_2layer, node, tp):
    """The search's sweep over micro-batches reuses op graphs (across tp) and CP-SAT models (across
    micro-batches): every figure must be what a cold solve of that one configuration gives."""
    from planner.intra_op import ilp

    _forget_everything()
    sweep = [(b, sp) for sp in (True, False) for b in (1, 2, 3, 4, 6, 8, 16)]
    warm = {key: _fingerprint(tp_pricing(gpt3_2layer, node, tp=tp, micro_batch=key[0], sequence_parallel=key[1],
                                         c=C)) for key in sweep}
    assert len(ilp._CPSAT_MODELS) < len(sweep)  # models were reused: the comparison below means something
    for b, sp in sweep:
        _forget_everything()
        cold = _fingerprint(tp_pricing(gpt3_2layer, node, tp=tp, micro_batch=b, sequence_parallel=sp, c=C))
        assert cold == warm[(b, sp)], (b, sp)
    # and the micro-batch matters: forward seconds grow with b (16x the bytes, latency aside)
    assert sum(warm[(16, True)][0]) > 8 * sum(warm[(1, True)][0]) > 0
