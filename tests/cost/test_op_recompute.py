"""Per-op selective checkpointing (``recompute="op"``, torchtitan's ``selective_ac_option = "op"``).

The planner's rule (planner.trace.saved_ops) is checked three ways: by hand on a Llama block, against
the memory the runtime's policy really holds on this CPU (torch's profiler, fp32), and against a
published fact (torchtitan's Llama 2 70B fits on A100-80GB at batch 1, and does not at batch 2).
"""

import functools
from dataclasses import replace

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from planner.cluster import ClusterSpec
from planner.cost.constants import CostConstants
from planner.cost.layer_table import layer_table, op_saved_bytes, row_parallel_flags
from planner.models import ModelPreset
from planner.plan import ParallelConfig
from planner.trace import trace_preset
from planner.trace.saved_ops import kept_flags
from runtime.recompute import _op_contexts

C = CostConstants()
LLAMA = dict(num_layers=2, hidden=256, heads=4, kv_heads=2, ffn_hidden=512, vocab_size=256, seq_len=256,
             fused_attention=True)
GPT = dict(num_layers=2, hidden=256, heads=4, vocab_size=256, seq_len=128, fused_attention=False, dropout=0.0)


def test_every_other_matmul_and_every_attention_kernel_is_kept():
    names = ["mm", "mm", "mm", "_scaled_dot_product_flash_attention", "mm", "mm", "mm", "mm", "add", "addmm"]
    assert kept_flags(names) == [True, False, True, True, False, True, False, True, False, False]
    assert kept_flags(["bmm", "_softmax", "bmm"]) == [False, False, False]  # eager attention is recomputed


def test_llama_block_keeps_q_v_attention_out_w1_and_w2_outputs():
    """By hand: wq, wk, wv, (attention), wo, w1, w3, w2; the 1st, 3rd, 5th and 7th matmuls are kept: q (h),
    v (kv), w1 (ffn), w2 (h), plus the attention output (h) and its log-sum-exp (fp32, one per head and token)."""
    graph = trace_preset(ModelPreset(name="probe", family="llama", config=LLAMA), dtype="bf16")
    block = graph.layers[1]
    s, h, f, heads = LLAMA["seq_len"], LLAMA["hidden"], LLAMA["ffn_hidden"], LLAMA["heads"]
    kv = h // heads * LLAMA["kv_heads"]
    # (+ the kernel's few scalar outputs: seeds, offsets)
    assert block.op_saved_bytes == pytest.approx(s * (h + kv + f + h + h) * 2 + s * heads * 4, abs=64)
    table = layer_table(graph, ClusterSpec.preset("dgx-a100-80g", nodes=1), micro_batch=2, tp=1,
                        sequence_parallel=False, recompute="op", c=C)
    assert table.stored_act_bytes[1] == pytest.approx(2 * (block.op_saved_bytes + block.input_bytes))
    # (the defaults, Megatron-LM's, fuse element-wise chains: the norms' and SwiGLU's intermediates are not kept)
    assert table.work_act_bytes[1] == pytest.approx(2 * (block.activation_bytes - block.pointwise_saved_bytes)
                                                    - table.stored_act_bytes[1])


@pytest.mark.parametrize("sp", [False, True])
def test_under_tp_a_row_parallel_product_keeps_its_whole_partial_sum(sp):
    """tp=2: q, v, the attention output and w1's output are split; w2 (row-parallel) keeps its whole partial
    sum; with sequence parallelism the reduce-scatters after wo and w2 keep their halves too."""
    graph = trace_preset(ModelPreset(name="probe", family="llama", config=LLAMA), dtype="bf16")
    block = graph.layers[1]
    assert row_parallel_flags(block, 2) == [False, False, False, True, False, False, True]  # wo and w2
    s, h, f, heads = LLAMA["seq_len"], LLAMA["hidden"], LLAMA["ffn_hidden"], LLAMA["heads"]
    kv = h // heads * LLAMA["kv_heads"]
    attention = block.op_saved_bytes - s * (h + kv + f + h) * 2  # the kernel's output and log-sum-exp
    expect = attention / 2 + s * 2 * (h / 2 + kv / 2 + f / 2 + h) + (s * 2 * (h / 2 + h / 2) if sp else 0)
    assert op_saved_bytes(block, 2, tp=2, sequence_parallel=sp) == pytest.approx(expect)
    table = layer_table(graph, ClusterSpec.preset("dgx-a100-80g", nodes=1), micro_batch=1, tp=2,
                        sequence_parallel=sp, recompute="op", c=C)
    assert table.stored_act_bytes[1] == pytest.approx(expect + block.input_bytes / (2 if sp else 1))


def test_gpt_blocks_split_like_megatron():
    graph = trace_preset(ModelPreset(name="probe", family="gpt", config=GPT), dtype="bf16")
    assert row_parallel_flags(graph.layers[1], 2) == [False, True, False, True]  # qkv, proj, fc1, fc2


def test_op_sits_between_selective_and_full_in_memory_and_time():
    graph = trace_preset("llama2-7b")
    cluster = ClusterSpec.preset("dgx-a100-80g", nodes=1)
    tables = {r: layer_table(graph, cluster, micro_batch=1, tp=1, sequence_parallel=False, recompute=r, c=C)
              for r in ("none", "selective", "op", "full")}
    stored = {r: t.stored_act_bytes[1] for r, t in tables.items()}
    extra = {r: t.recompute_s[1] for r, t in tables.items()}
    assert stored["none"] >= stored["selective"] > stored["op"] > stored["full"]  # flash: selective saves ~nothing
    eager = layer_table(graph, cluster, micro_batch=1, tp=1, sequence_parallel=False, recompute="none",
                        c=replace(C, fused_pointwise_saves=False))  # torchtitan's eager block without the policy
    assert stored["op"] / eager.stored_act_bytes[1] < 0.4
    assert 0 < extra["op"] < extra["full"]
    # what op repeats: the forward minus the kept GEMMs and attention, about 40% of a Llama block's forward
    assert 0.25 < extra["op"] / tables["op"].fwd_s[1] < 0.55


def test_a_graph_stored_without_the_traced_figure_is_estimated_from_gemm_shapes():
    graph = trace_preset(ModelPreset(name="probe", family="llama", config=LLAMA), dtype="bf16")
    block = graph.layers[1]
    old = replace(block, op_saved_bytes=None)
    s, h, f, heads = LLAMA["seq_len"], LLAMA["hidden"], LLAMA["ffn_hidden"], LLAMA["heads"]
    kv = h // heads * LLAMA["kv_heads"]
    assert op_saved_bytes(old, 2) == s * (h + kv + f + h) * 2  # the kept GEMMs; the attention output unknown
    assert op_saved_bytes(block, 2) == block.op_saved_bytes


def _held_bytes(block: torch.nn.Module, x: torch.Tensor, mode: str) -> int:
    """Bytes the CPU allocator still holds after one forward of ``block`` (its output excluded): what autograd
    (or the checkpoint's cache) keeps for backward."""
    fn = {"none": block.forward,
          "op": functools.partial(checkpoint, block.forward, use_reentrant=False, context_fn=_op_contexts),
          "full": functools.partial(checkpoint, block.forward, use_reentrant=False)}[mode]
    with torch.profiler.profile(profile_memory=True) as prof:
        y = fn(x)
    held = sum(e.self_cpu_memory_usage for e in prof.events()) - y.numel() * y.element_size()
    y.sum().backward()
    return held


@pytest.mark.parametrize("family, config", [("llama", LLAMA), ("gpt", GPT)])
def test_the_runtime_policy_holds_what_the_planner_prices(family, config):
    """Measured on this CPU: the runtime's per-op policy keeps the bytes the trace says it keeps (the block's
    input is the caller's, so it is not in the measured figure)."""
    preset = ModelPreset(name="probe", family=family, config=config)
    block = preset.build(device="cpu", dtype=torch.float32, seed=0).blocks[0]
    x = torch.randn(2, config["seq_len"], config["hidden"], requires_grad=True)
    predicted = trace_preset(preset, dtype="fp32").layers[1].op_saved_bytes * 2
    measured = _held_bytes(block, x, "op")
    assert measured == pytest.approx(predicted, rel=0.01)
    assert _held_bytes(block, x, "full") < 0.01 * predicted
    assert _held_bytes(block, x, "none") > 2 * measured


def test_torchtitan_llama2_70b_fits_an_a100_with_op_checkpointing_at_batch_1_not_2():
    """torchtitan (arXiv 2410.06511, Llama 2 table): 70B on 64 A100-80GB, FSDP, per-op selective AC, local batch
    1 ran; its footnote says batch 2 with selective AC runs out of memory (full AC was used there)."""
    from planner.api import evaluate

    def peak(mb: int, recompute: str) -> float:
        cfg = ParallelConfig(dp=64, micro_batch_size=mb, zero_stage=3, recompute=recompute)
        return evaluate("llama2-70b", "dgx-a100-80g", cfg, nodes=8).predicted.fits

    assert peak(1, "op") and not peak(2, "op")
    assert not peak(1, "none") and peak(2, "full")
