"""Memory per device: ZeRO sharding, recomputation, sequence parallelism, in-flight micro-batches."""

import pytest

from planner.cluster import ClusterSpec
from planner.cost.calibrate import gpt_graph, megatron_boundaries
from planner.cost.constants import CostConstants
from planner.cost.model import evaluate, layer_table, stage_memory, stage_params
from planner.plan import ParallelConfig

CLUSTER = ClusterSpec.preset("dgx-a100-80g", nodes=2)
C = CostConstants()
S, H, A = 2048, 12288, 96  # a GPT-3 175B block (Korthikanti et al. 2022 use it as their example)
SBH = S * H  # per sample, so b = 1


@pytest.fixture(scope="module")
def block():
    return gpt_graph(A, H, 2)  # embed, 2 blocks, head


@pytest.mark.parametrize("zero, div_w, div_g, div_o", [(0, 1, 1, 1), (1, 1, 1, 4), (2, 1, 4, 4), (3, 4, 4, 4)])
def test_zero_stages_divide_the_model_state_by_dp(block, zero, div_w, div_g, div_o):
    table = layer_table(block, CLUSTER, micro_batch=1, tp=2, sequence_parallel=False, recompute="none", c=C)
    cfg = ParallelConfig(dp=4, tp=2, pp=1, zero_stage=zero)
    n = block.num_layers
    parts = stage_memory(table, [(0, n)], in_flight=1, cfg=cfg, c=C, is_last=True)
    params = stage_params(table, 0, n)
    assert params == block.param_count  # tied embedding counted once
    assert parts.weights == pytest.approx(2 * params / 2 / div_w)
    assert parts.gradients == pytest.approx(4 * params / 2 / div_g)  # bf16 models keep fp32 gradients
    assert parts.optimizer == pytest.approx(12 * params / 2 / div_o)
    # 18 bytes per parameter without sharding (bf16 mixed-precision Adam, Megatron's table)
    if zero == 0:
        assert parts.weights + parts.gradients + parts.optimizer == pytest.approx(18 * params / 2)


def test_fp32_training_holds_4_4_8_bytes_per_parameter():
    assert C.state_bytes("fp32") == (4.0, 4.0, 8.0)
    assert C.state_bytes("bf16") == (2.0, 4.0, 12.0)  # fp32 gradients: bf16 cannot accumulate them
    assert C.state_bytes("fp16") == (2.0, 2.0, 12.0)


def test_activations_match_korthikanti_per_layer_formulas(block):
    blk = 1  # the first transformer block
    full = SBH * (34 + 5 * A * S / H)  # eq. 1: sbh(34 + 5as/h) bytes, no parallelism
    # (the trace also counts the layer norms' fp32 mean and rstd, 32 KiB, which the paper ignores)
    t1 = layer_table(block, CLUSTER, micro_batch=1, tp=1, sequence_parallel=False, recompute="none", c=C)
    assert t1.stored_act_bytes[blk] == pytest.approx(full, rel=1e-4)
    # tensor + sequence parallel: everything split (eq. 4), selective recompute drops 5as/h (eq. 6)
    sp = layer_table(block, CLUSTER, micro_batch=1, tp=8, sequence_parallel=True, recompute="none", c=C)
    assert sp.stored_act_bytes[blk] == pytest.approx(full / 8, rel=1e-4)
    sel = layer_table(block, CLUSTER, micro_batch=1, tp=8, sequence_parallel=True, recompute="selective", c=C)
    assert sel.stored_act_bytes[blk] == pytest.approx(34 * SBH / 8, rel=1e-4)
    # full recomputation keeps each layer's input: 2sbh (Table 2), split by sp
    fr = layer_table(block, CLUSTER, micro_batch=1, tp=8, sequence_parallel=True, recompute="full", c=C)
    assert fr.stored_act_bytes[blk] == pytest.approx(2 * SBH / 8, rel=1e-4)
    # tensor parallel alone (eq. 2: sbh(10 + 24/t + 5as/ht)); the trace also counts the output
    # projection's input (2sbh, split in reality) as replicated, so we are 1.75sbh above it.
    tp = layer_table(block, CLUSTER, micro_batch=1, tp=8, sequence_parallel=False, recompute="none", c=C)
    paper = SBH * (10 + 24 / 8 + 5 * A * S / (H * 8))
    assert tp.stored_act_bytes[blk] == pytest.approx(paper + 1.75 * SBH, rel=1e-4)
    assert tp.stored_act_bytes[blk] / paper - 1 < 0.08
    # activations scale with the micro-batch
    t4 = layer_table(block, CLUSTER, micro_batch=4, tp=1, sequence_parallel=False, recompute="none", c=C)
    assert t4.stored_act_bytes[blk] == pytest.approx(4 * full, rel=1e-4)


def test_recomputation_trades_memory_for_time(block):
    tables = {r: layer_table(block, CLUSTER, micro_batch=1, tp=8, sequence_parallel=True, recompute=r, c=C)
              for r in ("none", "selective", "full")}
    blk = 1
    stored = [tables[r].stored_act_bytes[blk] for r in ("none", "selective", "full")]
    extra = [tables[r].recompute_s[blk] for r in ("none", "selective", "full")]
    assert stored[0] > stored[1] > stored[2]
    assert extra[0] == 0 < extra[1] < extra[2]
    # full recomputation repeats the whole forward with its tensor-parallel collectives
    assert extra[2] == pytest.approx(tables["full"].fwd_s[blk] + tables["full"].tp_comm_forward_s[blk])
    # selective saves 70% of GPT-3's activations (5as/h = 80 of 114) for a few % of its time
    assert 1 - stored[1] / stored[0] == pytest.approx(80 / 114, rel=1e-4)
    layer_s = tables["none"].total_s[blk]
    assert extra[1] / layer_s < 0.1
    assert extra[2] / layer_s > 0.25
    # the recomputed layer's full activations are a working set while it runs
    assert tables["full"].work_act_bytes[blk] == pytest.approx(stored[0])


def test_first_pipeline_stage_holds_p_micro_batches_under_1f1b():
    graph = gpt_graph(32, 4096, 8)  # embed, 8 blocks, head
    cluster = ClusterSpec.preset("dgx-a100-80g", nodes=1)
    cfg = ParallelConfig(dp=1, tp=2, pp=4, micro_batch_size=1, num_micro_batches=16, recompute="none")
    table = layer_table(graph, cluster, micro_batch=1, tp=2, sequence_parallel=False, recompute="none", c=C)
    bounds = megatron_boundaries(graph.num_layers, 4)
    pred = evaluate(graph, cluster, cfg, bounds, C, table=table)
    per_stage = [sum(float(table.stored_act_bytes[a:b].sum()) for a, b in [bounds[d]]) for d in range(4)]
    for d in range(4):
        assert pred.memory_per_stage[d].activations == pytest.approx((4 - d) * per_stage[d], rel=1e-9)
    gpipe = evaluate(graph, cluster, ParallelConfig(dp=1, tp=2, pp=4, micro_batch_size=1, num_micro_batches=16,
                                                    schedule="gpipe"), bounds, C, table=table)
    assert gpipe.memory_per_stage[0].activations == pytest.approx(16 * per_stage[0], rel=1e-9)


def test_loss_workspace_and_optimizer_temporaries(block):
    n = block.num_layers
    table = layer_table(block, CLUSTER, micro_batch=1, tp=1, sequence_parallel=False, recompute="none", c=C)
    cfg = ParallelConfig()
    last = stage_memory(table, [(0, n)], in_flight=1, cfg=cfg, c=C, is_last=True)
    not_last = stage_memory(table, [(0, n)], in_flight=1, cfg=cfg, c=C, is_last=False)
    logits = table.output_bytes[-1]  # bf16 [s, vocab]
    assert last.temporary - not_last.temporary == pytest.approx(2 * 2 * logits)  # two fp32 copies
    # the optimizer step's temporaries count only beyond the backward-time peak
    big = CostConstants(optimizer_temp_bytes_per_param=64.0)
    with_opt = stage_memory(table, [(0, n)], in_flight=1, cfg=cfg, c=big, is_last=True)
    assert with_opt.total == pytest.approx(with_opt.weights + with_opt.gradients + with_opt.optimizer
                                           + max(last.activations + last.temporary, 64.0 * block.param_count))
