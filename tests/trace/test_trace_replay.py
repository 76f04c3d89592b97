"""Block replay and recurrent extrapolation are exact: ``reuse=True`` equals running everything."""

from __future__ import annotations

import pytest
import torch

from planner.models import FAMILIES
from planner.trace import CostGraph, trace_model

SMALL = {
    "gpt": dict(num_layers=3, hidden=64, heads=4, vocab_size=500, seq_len=32, dropout=0.1,
                tie_embeddings=True),
    "t5": dict(num_layers=3, hidden=64, ffn_hidden=128, heads=4, head_dim=16, vocab_size=500, seq_len=32,
               dec_seq_len=16),
    "llama": dict(num_layers=3, hidden=64, heads=4, kv_heads=2, ffn_hidden=128, vocab_size=500, seq_len=32,
                  num_experts=4, top_k=2),
    "deepspeech2": dict(freq_bins=33, conv_channels=[4, 4, 8], rnn_layers=3, rnn_hidden=16, seq_len=40),
    "resnet": dict(depths=[2, 3], widths=[8, 16], image_size=32, num_classes=10),
    "wav2vec2": dict(num_layers=3, hidden=64, heads=4, ffn_hidden=128, conv_channels=32, pos_kernel=8,
                     pos_groups=4, seq_len=20),
}


def _trace(family: str, reuse: bool) -> CostGraph:
    cfg = SMALL[family]
    spec = FAMILIES[family]
    with torch.device("meta"):
        model = spec.build(dict(cfg))
    return trace_model(model, spec.sample_input(cfg, 2, None, "meta"), dtype="fp16", reuse=reuse)


def _layer_costs(g: CostGraph) -> list[tuple]:
    return [(layer.name, layer.signature, layer.fwd_flops, layer.bwd_input_flops, layer.bwd_weight_flops,
             layer.activation_bytes, layer.attention_activation_bytes, layer.replicated_activation_bytes,
             layer.attention_fwd_flops, layer.param_count, layer.tied_params, layer.input_bytes,
             layer.output_bytes)
            for layer in g.layers]


@pytest.mark.parametrize("family", ["gpt", "t5", "llama", "resnet", "wav2vec2"])
def test_replayed_blocks_equal_full_run(family):
    fast, full = _trace(family, reuse=True), _trace(family, reuse=False)
    assert any("replayed" in n for n in fast.notes)
    assert _layer_costs(fast) == _layer_costs(full)
    assert [layer.op_costs for layer in fast.layers] == [layer.op_costs for layer in full.layers]
    assert fast.ops.number_of_nodes() == full.ops.number_of_nodes()
    assert sorted(fast.layer_graph.edges(data=True)) == sorted(full.layer_graph.edges(data=True))
    replayed = [n for n, d in fast.ops.nodes(data=True) if d["replayed_from"]]
    assert replayed  # and every replayed node says where its costs came from
    for n in replayed:
        ref = fast.ops.nodes[fast.ops.nodes[n]["replayed_from"]]
        assert fast.ops.nodes[n]["kind"] == ref["kind"]
        assert fast.ops.nodes[n]["fwd_flops"] == ref["fwd_flops"]


def test_recurrent_extrapolation_equals_full_length_run():
    fast, full = _trace("deepspeech2", reuse=True), _trace("deepspeech2", reuse=False)
    for a, b in zip(fast.layers, full.layers, strict=True):
        assert a.fwd_flops == pytest.approx(b.fwd_flops, rel=1e-12)
        assert a.bwd_input_flops == pytest.approx(b.bwd_input_flops, rel=1e-12)
        assert a.bwd_weight_flops == pytest.approx(b.bwd_weight_flops, rel=1e-12)
        assert a.activation_bytes == pytest.approx(b.activation_bytes, rel=1e-12)
        assert sum(c.bytes for c in a.op_costs) == pytest.approx(sum(c.bytes for c in b.op_costs), rel=1e-12)
        assert a.param_count == b.param_count
    # The per-step GEMM keeps its real shape: m = batch rows per step, n = 3 gates x hidden.
    gru = fast.layers[3]
    assert gru.name == "rnns.0"
    assert any(c.m == 1 and c.n == 3 * 16 for c in gru.op_costs)


def test_rnn_flops_match_the_gru_formula():
    g = _trace("deepspeech2", reuse=True)
    cfg = SMALL["deepspeech2"]
    t = 20  # 40 frames, halved by the first conv
    h = cfg["rnn_hidden"]
    features = 8 * 5  # channels x frequency bins after the convs (33 -> 17 -> 9 -> 5)
    # Per step and direction: input and recurrent GEMMs for 3 gates, 2 FLOPs per multiply-add.
    per_step = 2 * 3 * h * (features + h)
    gemm = sum(c.flops for c in g.layers[3].op_costs if c.kind == "addmm")
    assert gemm == 2 * t * per_step  # two directions
