"""Model families run for real on small configs and compute what they claim (CPU, float32)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from planner.errors import SpecError
from planner.models import FAMILIES, list_presets, load_preset
from planner.models.blocks import Attention, Rotary
from planner.models.cnn import CNNConfig
from planner.models.deepspeech2 import DeepSpeech2Config
from planner.models.mlp import MLPConfig
from planner.models.moe import MoEFeedForward
from planner.models.t5 import relative_buckets
from planner.models.wav2vec2 import Wav2Vec2Config

SMALL = {
    "gpt": dict(num_layers=2, hidden=32, heads=4, vocab_size=100, seq_len=16, dropout=0.0),
    "bert": dict(num_layers=2, hidden=32, heads=4, vocab_size=100, max_positions=16, seq_len=16, dropout=0.0),
    "t5": dict(num_layers=2, hidden=32, ffn_hidden=64, heads=4, head_dim=8, vocab_size=100, seq_len=16,
               dec_seq_len=8, dropout=0.0),
    "vit": dict(num_layers=2, hidden=32, heads=4, ffn_hidden=64, patch_size=8, image_size=32, num_classes=10,
                dropout=0.0),
    "wav2vec2": dict(num_layers=2, hidden=32, heads=4, ffn_hidden=64, conv_channels=16, pos_kernel=8,
                     pos_groups=4, seq_len=10, dropout=0.0),
    "deepspeech2": dict(freq_bins=33, conv_channels=[4, 4, 8], rnn_layers=2, rnn_hidden=16, seq_len=40),
    "llama": dict(num_layers=2, hidden=32, heads=4, kv_heads=2, ffn_hidden=64, vocab_size=100, seq_len=16,
                  num_experts=4, top_k=2, capacity_factor=2.0),
    "resnet": dict(depths=[1, 2], widths=[8, 16], image_size=32, num_classes=10),
    "mlp": dict(input_dim=12, hidden=16, ffn_hidden=24, num_layers=2, num_classes=10),
    "cnn": dict(widths=[8, 16], depths=[1, 2], image_size=16, groups=4, num_classes=10),
}
OUTPUT = {"gpt": (2, 16, 100), "bert": (2, 16, 100), "t5": (2, 8, 100), "vit": (2, 10),
          "wav2vec2": (2, 10, 32), "deepspeech2": (2, 20, 29), "llama": (2, 16, 100), "resnet": (2, 10),
          "mlp": (2, 10), "cnn": (2, 10)}


def test_every_family_is_registered_and_tested():
    assert set(FAMILIES) == set(SMALL)
    assert {load_preset(n).family for n in list_presets()} <= set(FAMILIES)


@pytest.mark.parametrize("family", sorted(SMALL))
def test_family_trains_one_step_on_cpu(family):
    spec, cfg = FAMILIES[family], SMALL[family]
    torch.manual_seed(0)
    model = spec.build(dict(cfg))
    inputs = spec.sample_input(cfg, 2, None, "cpu")
    logits = model(*inputs)
    assert tuple(logits.shape) == OUTPUT[family]
    targets = spec.targets(cfg, 2, None, torch.Generator().manual_seed(0))
    if spec.loss == "lm-cross-entropy":
        assert targets.shape == logits.shape[:2]
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    else:
        assert spec.loss == "cross-entropy" and targets.shape == logits.shape[:1]
        loss = F.cross_entropy(logits, targets)
    loss.backward()
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(math.log(logits.shape[-1]), rel=0.5)  # near-uniform at init
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_unfused_attention_equals_sdpa_with_gqa_rotary_and_causal_mask():
    torch.manual_seed(0)
    unfused = Attention(32, 8, kv_heads=2, causal=True, rotary=True)
    fused = Attention(32, 8, kv_heads=2, causal=True, rotary=True, fused=True)
    fused.load_state_dict(unfused.state_dict())
    x = torch.randn(2, 12, 32)
    torch.testing.assert_close(unfused(x), fused(x))
    # Causal: the output at position t does not depend on later positions.
    y = x.clone()
    y[:, 6:] += 1.0
    torch.testing.assert_close(unfused(x)[:, :6], unfused(y)[:, :6])


def test_rotary_scores_depend_only_on_relative_position():
    rot = Rotary(8)
    q = torch.randn(1, 1, 1, 8).expand(1, 1, 10, 8)
    k = torch.randn(1, 1, 1, 8).expand(1, 1, 10, 8)
    rq, rk = rot(q, k)
    scores = (rq @ rk.transpose(-2, -1))[0, 0]
    for shift in range(1, 4):
        diag = torch.diagonal(scores, offset=shift)
        torch.testing.assert_close(diag, diag[:1].expand_as(diag))
    torch.testing.assert_close(rq[0, 0, 0], q[0, 0, 0])  # position 0 is not rotated


def _naive_moe(moe: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    logits, idx = moe.router(flat).topk(moe.top_k, dim=-1)
    w = F.softmax(logits, dim=-1)
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for j in range(moe.top_k):
            e = idx[t, j]
            h = F.silu(flat[t] @ moe.w_gate[e]) * (flat[t] @ moe.w_up[e])
            out[t] += w[t, j] * (h @ moe.w_down[e])
    return out.view_as(x)


def test_moe_equals_a_per_token_loop_when_nothing_overflows():
    torch.manual_seed(0)
    moe = MoEFeedForward(16, 32, num_experts=4, top_k=2, capacity_factor=2.0)  # capacity = all tokens
    x = torch.randn(2, 5, 16)
    assert moe.capacity(10) == 10
    torch.testing.assert_close(moe(x), _naive_moe(moe, x), rtol=1e-5, atol=1e-5)


def test_moe_capacity_is_top_k_share_of_tokens():
    moe = MoEFeedForward(8, 8, num_experts=8, top_k=2, capacity_factor=1.0)
    assert moe.capacity(4096) == 1024  # E x C = 2 T: exactly the top-2 work
    assert moe.capacity(5) == 2  # ceil(2 * 5 / 8)
    overflow = MoEFeedForward(16, 32, num_experts=4, top_k=2, capacity_factor=0.25)
    torch.manual_seed(0)
    x = torch.randn(1, 16, 16)
    y = overflow(x)  # most pairs dropped: still finite, still shaped
    assert y.shape == x.shape and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="top_k"):
        MoEFeedForward(8, 8, num_experts=2, top_k=3)


def test_t5_relative_buckets():
    cpu = torch.device("cpu")
    b = relative_buckets(1, 300, bidirectional=True, buckets=32, max_distance=128, device=cpu)[0]
    assert b[0].item() == 0 and b[1].item() == 17 and b[7].item() == 23  # exact below 8, +16 for "after"
    assert b[299].item() == 31  # beyond max_distance: the last bucket
    causal = relative_buckets(300, 1, bidirectional=False, buckets=32, max_distance=128, device=cpu)
    assert causal[5, 0].item() == 5 and causal[299, 0].item() == 31


def test_speech_front_end_lengths():
    w = Wav2Vec2Config(num_layers=1, hidden=8, heads=1, ffn_hidden=8)
    assert w.samples_for(781) == 250_000 and w.frames_for(250_000) == 781  # the paper's 15.6 s crop
    d = DeepSpeech2Config()
    assert d.conv_out(161, 1500) == (21, 750) and d.rnn_input == 96 * 21


def test_meta_build_skips_initialisation_and_restores_it():
    before = nn.init.normal_
    model = load_preset("gpt-tiny").build(device="meta")
    assert nn.init.normal_ is before
    assert all(p.is_meta for p in model.parameters())


def test_gpt_layout_is_the_public_one():
    model = load_preset("gpt-tiny").build(device="meta")
    assert [n for n, _ in model.named_children()] == ["embed", "blocks", "head"]
    assert len(model.blocks) == 4


def test_unknown_preset_names_close_matches():
    with pytest.raises(SpecError, match="llama2-7b"):
        load_preset("llama2-7")


@pytest.mark.parametrize("name", list_presets())
def test_preset_sample_and_targets_agree(name):
    p = load_preset(name)
    inputs = p.sample_input(2)
    assert all(t.shape[0] == 2 for t in inputs)
    targets = p.spec.targets(p.config, 2, None, torch.Generator().manual_seed(0))
    assert targets.shape[0] == 2
    if p.spec.loss == "lm-cross-entropy" and p.family != "t5":
        assert targets.shape[1] == (p.seq_len if p.family != "deepspeech2" else (p.seq_len + 1) // 2)


# --- the mlp and cnn families (small classifiers for the runtime's equivalence tests) ---------------------

@pytest.mark.parametrize("name", ["mlp-tiny", "mlp-1b", "cnn-tiny", "cnn-25m"])
def test_mlp_cnn_presets_trace_to_their_parameter_count(name):
    from tests_helpers import traced

    preset = load_preset(name)
    graph = traced(name)
    model = preset.build(device="meta")
    unique = sum(p.numel() for p in model.parameters())
    config = (MLPConfig if preset.family == "mlp" else CNNConfig)(**preset.config)
    assert graph.param_count == unique == config.param_count() == sum(layer.param_count for layer in graph.layers)
    assert graph.method == "fx"
    head = "embed" if preset.family == "mlp" else "stem"
    blocks = config.num_layers if preset.family == "mlp" else len(config.block_shapes())
    assert [layer.name for layer in graph.layers] == [head] + [f"blocks.{i}" for i in range(blocks)] + ["head"]


@pytest.mark.parametrize("name", ["llama-tiny", "bert-tiny", "vit-tiny"])
def test_tiny_transformer_presets_trace_to_their_parameter_count(name):
    """The runtime's tensor-parallel test presets: traced with fx, every parameter counted once (BERT's tied decoder)."""
    from tests_helpers import traced

    from planner.models.bert import BertConfig
    from planner.models.llama import LlamaConfig
    from planner.models.vit import ViTConfig

    preset = load_preset(name)
    graph = traced(name)
    model = preset.build(device="meta")
    unique = sum(p.numel() for p in model.parameters())
    config = {"llama": LlamaConfig, "bert": BertConfig, "vit": ViTConfig}[preset.family](**preset.config)
    assert graph.param_count == unique == config.param_count()
    assert graph.method == "fx"
    assert [layer.name for layer in graph.layers] == ["embed"] + [f"blocks.{i}" for i in range(4)] + ["head"]
    assert preset.config.get("dropout", 0.0) == 0.0  # tensor parallelism refuses dropout


@pytest.mark.parametrize("name", ["mlp-tiny", "mlp-1b"])
def test_mlp_flops_are_the_gemm_count(name):
    """A block is two GEMMs: forward 2·b·in·out each, training 3x that; the features need no gradient."""
    from planner.trace import trace_preset

    cfg = MLPConfig(**load_preset(name).config)
    graph = trace_preset(name, batch=4, dtype="fp32")  # the graph's figures are per sample (b = 1)
    h, f = cfg.hidden, cfg.ffn
    blocks = [layer for layer in graph.layers if layer.name.startswith("blocks.")]
    assert len(blocks) == cfg.num_layers
    for layer in blocks:
        assert layer.fwd_flops == 2 * (h * f + f * h)
        assert layer.fwd_flops + layer.bwd_flops == 2 * (h * f + f * h) * 3
    embed = graph.layers[0]
    assert embed.fwd_flops == embed.bwd_weight_flops == 2 * cfg.input_dim * h and embed.bwd_input_flops == 0
    assert graph.train_flops == cfg.flops_per_sample()


def test_cnn_forward_flops_are_the_convolution_count():
    """Each 3x3 convolution costs 2·9·c_in·c_out per output pixel; the head one GEMM."""
    from tests_helpers import traced

    cfg = CNNConfig(**load_preset("cnn-tiny").config)
    size = cfg.image_size // cfg.stem_stride
    expected = 2 * 9 * cfg.channels * cfg.widths[0] * size * size
    for c_in, c_out, stride in cfg.block_shapes():
        size //= stride
        expected += 2 * 9 * c_in * c_out * size * size
    expected += 2 * cfg.widths[-1] * cfg.num_classes
    assert traced("cnn-tiny").fwd_flops == expected


def test_cnn_has_no_batch_statistics():
    """GroupNorm: a sample's output does not depend on the rest of its batch (micro-batching is exact)."""
    torch.manual_seed(0)
    model = FAMILIES["cnn"].build(dict(SMALL["cnn"]))
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(model(x)[:2], model(x[:2]))
    assert not list(model.buffers())


@pytest.mark.parametrize(("family", "config", "field"), [
    ("mlp", dict(input_dim=0, hidden=8, num_layers=1, num_classes=2), "input_dim"),
    ("mlp", dict(input_dim=8, hidden=8, num_layers=1, num_classes=2, dropout=1.0), "dropout"),
    ("cnn", dict(widths=[8, 6], depths=[1, 1], groups=4), "widths"),
    ("cnn", dict(widths=[8], depths=[1, 1]), "depths"),
])
def test_mlp_cnn_configs_name_the_bad_field(family, config, field):
    with pytest.raises(ValueError, match=field):
        FAMILIES[family].build(config)
