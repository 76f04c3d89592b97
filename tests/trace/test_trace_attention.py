"""SDPA is traced as the fused kernel a GPU runs; hand-written attention as what it is."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from planner.cluster import ClusterSpec
from planner.cost.compute import layer_times
from planner.cost.constants import CostConstants
from planner.models import ModelPreset
from planner.trace import trace_model
from planner.trace.meter import ATTENTION_KERNELS

SEQ = 256


def _gpt(fused: bool, hidden: int = 128, seq: int = SEQ):
    cfg = {"num_layers": 2, "hidden": hidden, "heads": 4, "vocab_size": 512, "seq_len": seq, "dropout": 0.0,
           "fused_attention": fused}
    preset = ModelPreset(name=f"gpt-attn-{fused}", family="gpt", config=cfg)
    return trace_model(preset.build(device="meta"), preset.sample_input(1, None), name=preset.name, dtype="bf16")


def _block(graph):
    return next(layer for layer in graph.layers if layer.name.startswith("blocks."))


def test_sdpa_traces_as_flash_with_no_score_tensors():
    eager, fused = _gpt(False), _gpt(True)
    assert eager.attention == "eager" and fused.attention == "fused"
    b_eager, b_fused = _block(eager), _block(fused)
    kernels = [op for op in b_fused.op_costs if op.kind in ATTENTION_KERNELS]
    assert len(kernels) == 1 and kernels[0].causal
    assert not any(op.kind in ATTENTION_KERNELS for op in b_eager.op_costs)
    # The same model FLOPs (MFU is credited the same way) ...
    assert b_fused.fwd_flops == pytest.approx(b_eager.fwd_flops, rel=1e-9)
    # ... but no s x s scores saved for backward: the eager block saves the softmax output (heads * s^2
    # bf16), the fused one a log-sum-exp per row instead (heads * s fp32).
    scores, lse = 4 * SEQ * SEQ * 2, 4 * SEQ * 4
    assert b_eager.activation_bytes - b_fused.activation_bytes == pytest.approx(scores - lse, rel=0.01)
    assert b_fused.attention_activation_bytes == 0
    assert b_eager.attention_activation_bytes >= scores


def test_fused_causal_attention_is_priced_cheaper_than_eager():
    cluster = ClusterSpec.preset("dgx-h100")
    c = CostConstants(attention_kernel="")  # the device's FlashAttention-2-class figure, not a named kernel's
    # Large enough that the device, not the host's op dispatch, sets the time.
    blocks = {fused: _block(_gpt(fused, hidden=1024, seq=2048)) for fused in (False, True)}
    t = {fused: layer_times(blocks[fused], micro_batch=4, tp=1, sequence_parallel=False,
                            device=cluster.device, dtype="bf16", c=c) for fused in (False, True)}
    assert t[True].fwd_s < t[False].fwd_s
    assert t[True].bwd_input_s < t[False].bwd_input_s
    # Halving the kernel's efficiency (the H100 preset states its own: the device's value wins over the
    # constant) slows the fused block; the eager one does not see it.
    dev = cluster.device
    slow = dataclasses.replace(dev, fused_attention_efficiency=dev.fused_attention_efficiency / 2)
    t_slow = {fused: layer_times(blocks[fused], micro_batch=4, tp=1, sequence_parallel=False, device=slow,
                                 dtype="bf16", c=c) for fused in (False, True)}
    assert t_slow[True].fwd_s > t[True].fwd_s
    assert t_slow[False] == t[False]


class MaskedSDPA(nn.Module):
    """SDPA with a boolean padding mask and grouped-query heads: the memory-efficient kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(64, 64)
        self.kv = nn.Linear(64, 32)

    def forward(self, x, mask):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, 4, 16).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 2, 16).transpose(1, 2).chunk(2, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2).flatten(2)


def test_masked_grouped_query_sdpa_uses_the_memory_efficient_kernel():
    x = torch.zeros(1, 32, 64)
    mask = torch.ones(1, 1, 32, 32, dtype=torch.bool)
    graph = trace_model(MaskedSDPA(), (x, mask), dtype="bf16")
    kinds = {op.kind for layer in graph.layers for op in layer.op_costs}
    assert "_scaled_dot_product_efficient_attention" in kinds
    assert graph.attention == "fused"
    # Forward FLOPs of attention: 2 GEMMs of 2 * s * s * d per head, 4 heads.
    attn = sum(op.flops for layer in graph.layers for op in layer.op_costs if op.kind in ATTENTION_KERNELS)
    assert attn == pytest.approx(4 * 2 * 2 * 32 * 32 * 16)


def test_a_model_without_attention_says_so():
    graph = trace_model(nn.Sequential(nn.Linear(8, 8), nn.ReLU()), (torch.zeros(2, 8),), dtype="fp32")
    assert graph.attention == "none"


class DeclaredCausal(nn.Module):
    """transformers' convention: an attention module that says ``is_causal`` yet hands SDPA a mask
    (the one it builds when tracing hides whether the batch is padded)."""

    def __init__(self, is_causal: bool) -> None:
        super().__init__()
        self.is_causal = is_causal
        self.qkv = nn.Linear(64, 192)

    def forward(self, x, mask):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 4, 16).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)


class CausalBlock(nn.Module):
    def __init__(self, is_causal: bool, seq: int = 32) -> None:
        super().__init__()
        self.attn = DeclaredCausal(is_causal)
        self.register_buffer("mask", torch.ones(seq, seq, dtype=torch.bool).tril())

    def forward(self, x):
        return self.attn(x, self.mask)


def _kernels(graph):
    return [op for layer in graph.layers for op in layer.op_costs if op.kind in ATTENTION_KERNELS]


@pytest.mark.parametrize("force_export", [False, True])
def test_a_mask_from_a_module_declaring_is_causal_is_priced_as_causal_flash(force_export, monkeypatch):
    if force_export:  # the Hugging Face path: fx fails, torch.export traces with fake tensors
        from planner.trace import tracer

        def no_fx(self):
            raise tracer.CaptureFailure("fx", "<root>", "forced for the test")
        monkeypatch.setattr(tracer._Tracing, "fx", no_fx)
    x = torch.zeros(2, 32, 64)
    causal = trace_model(CausalBlock(True), (x,), dtype="bf16")
    kernels = _kernels(causal)
    assert causal.method == ("export" if force_export else "fx")
    assert [op.kind for op in kernels] == ["_scaled_dot_product_flash_attention"] and kernels[0].causal
    assert any("is_causal=True" in note for note in causal.notes)
    # Causal FlashAttention does half the score FLOPs of the masked kernel over every score.
    plain = trace_model(CausalBlock(False), (x,), dtype="bf16")
    assert [op.kind for op in _kernels(plain)] == ["_scaled_dot_product_efficient_attention"]
    assert not any("is_causal=True" in note for note in plain.notes)
    assert sum(op.flops for op in _kernels(plain)) == pytest.approx(4 * 2 * 2 * 32 * 32 * 16)


def test_a_causal_module_attending_to_a_different_length_keeps_its_mask():
    class CrossAttention(nn.Module):
        is_causal = True

        def forward(self, q, kv, mask):
            return F.scaled_dot_product_attention(q, kv, kv, attn_mask=mask)

    q, kv = torch.zeros(1, 4, 8, 16, requires_grad=True), torch.zeros(1, 4, 24, 16)
    graph = trace_model(CrossAttention(), (q, kv, torch.ones(1, 1, 8, 24, dtype=torch.bool)), dtype="bf16")
    assert [op.kind for op in _kernels(graph)] == ["_scaled_dot_product_efficient_attention"]


def test_the_causal_note_describes_the_capture_that_is_kept(monkeypatch):
    """fx rewrites the mask and then fails; export, which is kept, runs the module with a mask it keeps:
    the graph's note must not say a mask was priced causal."""
    from planner.trace import tracer

    fx, export = tracer._Tracing.fx, tracer._Tracing.export

    def fx_then_fail(self):
        fx(self)  # counts one causal rewrite
        raise tracer.CaptureFailure("fx", "<root>", "forced for the test")

    def export_without_declaration(self):
        self.meta.attn.is_causal = False
        return export(self)

    monkeypatch.setattr(tracer._Tracing, "fx", fx_then_fail)
    monkeypatch.setattr(tracer._Tracing, "export", export_without_declaration)
    graph = trace_model(CausalBlock(True), (torch.zeros(2, 32, 64),), dtype="bf16")
    assert graph.method == "export"
    assert [op.kind for op in _kernels(graph)] == ["_scaled_dot_product_efficient_attention"]
    assert not any("is_causal=True" in note for note in graph.notes)


def test_torch_multihead_attention_runs_the_fused_kernel_unless_it_returns_weights():
    """nn.TransformerEncoderLayer asks nn.MultiheadAttention for no weights, and torch then calls SDPA from
    inside F.multi_head_attention_forward, which a GPU runs fused: priced so, no s x s scores stored. Asked
    for its weights (the module's default), it computes them by hand on a GPU too: eager."""
    from planner.trace import trace_model

    layer = nn.TransformerEncoderLayer(64, 4, dropout=0.0, batch_first=True)
    g = trace_model(nn.Sequential(layer), torch.zeros(1, 128, 64))
    assert g.attention == "fused" and g.layers[0].attention_activation_bytes == 0
    assert "_scaled_dot_product_flash_attention" in [o.kind for o in g.layers[0].op_costs]

    class Weights(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(64, 4, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, x, x)[0]

    assert trace_model(Weights(), torch.zeros(1, 128, 64)).attention == "eager"
    assert nn.functional.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention  # restored
