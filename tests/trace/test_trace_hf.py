"""Hugging Face models from their default configs (shortened stacks), on meta, through the fallbacks.

Their forwards take ``**kwargs`` (fx cannot bind them) and return caches (``use_cache=True`` by
default), so they exercise ``torch.export`` and the module-level trace. Where our own family
implements the same architecture, both give the same parameters and FLOPs.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

from planner.models import FAMILIES
from planner.trace import CostGraph, trace_model

pytestmark = pytest.mark.hf
transformers = pytest.importorskip("transformers")

from planner.models.hf import HF_MODELS, build_hf  # noqa: E402


@functools.cache
def _trace_hf(name: str, layers: int = 2) -> tuple[CostGraph, int]:
    model, sample = build_hf(name, num_layers=layers)
    unique = sum(p.numel() for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = trace_model(model, sample, name=name, dtype="bf16", seq_len=HF_MODELS[name].seq_len)
    return g, unique


@pytest.mark.parametrize("name", sorted(HF_MODELS))
def test_hf_model_traces_with_exact_parameter_count(name):
    g, unique = _trace_hf(name)
    assert g.param_count == unique == sum(layer.param_count for layer in g.layers)
    assert g.method in ("export", "module")
    assert g.notes[0].startswith(("traced with export after: torch.fx symbolic tracing failed at <root>",
                                  "fell back to a module-level trace"))
    assert g.fwd_flops > 0 and g.activation_bytes > 0


def test_hf_wav2vec2_layerdrop_is_reported():
    """Its training-mode LayerDrop is data-dependent: export fails (naming the module), module-level works."""
    g, _ = _trace_hf("hf-wav2vec2", layers=12)
    assert g.method == "module"
    assert "torch.export (non-strict) failed at wav2vec2.encoder" in g.notes[0]
    assert any("never ran in forward" in n for n in g.notes)  # the dropped layer, seeded: repeatable


def _ours(family: str, **cfg) -> CostGraph:
    spec = FAMILIES[family]
    with torch.device("meta"):
        model = spec.build(cfg)
    return trace_model(model, spec.sample_input(cfg, 1, None, "meta"), dtype="bf16")


def test_hf_gpt2_equals_our_gpt():
    hf, _ = _trace_hf("hf-gpt2")
    ours = _ours("gpt", num_layers=2, hidden=768, heads=12, vocab_size=50257, seq_len=1024,
                 tie_embeddings=True)
    assert hf.param_count == ours.param_count
    assert hf.fwd_flops == pytest.approx(ours.fwd_flops, rel=1e-9)
    assert hf.train_flops == pytest.approx(ours.train_flops, rel=1e-9)


def test_hf_llama_equals_our_llama():
    hf, _ = _trace_hf("hf-llama")
    ours = _ours("llama", num_layers=2, hidden=4096, heads=32, ffn_hidden=11008, vocab_size=32000,
                 seq_len=4096)
    assert hf.param_count == ours.param_count
    assert hf.fwd_flops == pytest.approx(ours.fwd_flops, rel=1e-9)


def test_hf_mixtral_equals_our_top2_moe():
    """HF routes with grouped GEMMs, ours with capacity-1.0 batched GEMMs: the same top-2 FLOPs."""
    hf, _ = _trace_hf("hf-mixtral")
    ours = _ours("llama", num_layers=2, hidden=4096, heads=32, kv_heads=8, ffn_hidden=14336, vocab_size=32000,
                 seq_len=4096, num_experts=8, top_k=2)
    assert hf.param_count == ours.param_count
    assert hf.fwd_flops == pytest.approx(ours.fwd_flops, rel=1e-9)


def test_hf_bert_equals_our_bert():
    hf, _ = _trace_hf("hf-bert")
    ours = _ours("bert", num_layers=2, hidden=768, heads=12, vocab_size=30522, seq_len=512)
    assert hf.param_count == ours.param_count
    assert hf.fwd_flops == pytest.approx(ours.fwd_flops, rel=1e-9)


def test_t5_relative_buckets_match_hf():
    from transformers.models.t5.modeling_t5 import T5Attention

    from planner.models.t5 import relative_buckets

    for bidirectional in (True, False):
        ours = relative_buckets(200, 200, bidirectional=bidirectional, buckets=32, max_distance=128,
                                device=torch.device("cpu"))
        rel = torch.arange(200)[None, :] - torch.arange(200)[:, None]
        theirs = T5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=32,
                                                       max_distance=128)
        assert torch.equal(ours, theirs)


def test_export_graph_replay_equals_full_run():
    model, sample = build_hf("hf-llama", num_layers=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = trace_model(model, sample, dtype="bf16")
        full = trace_model(model, sample, dtype="bf16", reuse=False)
    assert any("replayed" in n for n in fast.notes)
    assert fast.group_summary() == ("model.embed_tokens, model.rotary_emb, "
                                    "3 x model.layers.* (LlamaDecoderLayer), model.norm, lm_head")
    for a, b in zip(fast.layers, full.layers, strict=True):
        assert (a.signature, a.fwd_flops, a.bwd_flops, a.activation_bytes, a.param_count, a.op_costs) == \
               (b.signature, b.fwd_flops, b.bwd_flops, b.activation_bytes, b.param_count, b.op_costs)
