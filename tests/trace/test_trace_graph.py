"""The cost graph's structure: layers, repeated-block groups, op-level node attributes, edges."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from planner.trace import layer_units, trace_model
from planner.trace.meter import OpMeter


class Bottleneck(nn.Module):
    """torchvision-style: a ``downsample`` Sequential inside a block must not split the block."""

    def __init__(self, c: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.downsample = None
        if stride > 1:
            self.downsample = nn.Sequential(nn.Conv2d(c, c, 1, stride=stride), nn.BatchNorm2d(c))

    def forward(self, x):
        short = self.downsample(x) if self.downsample is not None else x
        return torch.relu(self.bn1(self.conv1(x)) + short)


class TorchvisionLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(Bottleneck(8), Bottleneck(8))
        self.layer2 = nn.Sequential(Bottleneck(8, 2), Bottleneck(8), Bottleneck(8))
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = self.layer2(self.layer1(self.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


class Experts(nn.Module):
    """An MoE-style block holding a ModuleList of experts: one layer, not eight."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))

    def forward(self, x):
        return x + sum(e(x) for e in self.experts)


class Nested(nn.Module):
    """Hugging Face style nesting: model.transformer.h.N, model.lm_head."""

    def __init__(self) -> None:
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(10, 8)
        self.transformer.h = nn.ModuleList(Experts() for _ in range(2))
        self.lm_head = nn.Linear(8, 10)

    def forward(self, ids):
        x = self.transformer.wte(ids)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(x)


def test_layer_units_open_stacks_but_not_blocks():
    assert layer_units(TorchvisionLike()) == ["conv1", "relu", "layer1.0", "layer1.1", "layer2.0", "layer2.1",
                                              "layer2.2", "fc"]
    assert layer_units(Nested()) == ["transformer.wte", "transformer.h.0", "transformer.h.1", "lm_head"]
    assert layer_units(nn.Linear(2, 2)) == [""]


def test_resnet_stages_group_by_shape(traced):
    g = traced("resnet50")
    assert g.group_summary() == ("stem, layer1.0, 2 x layer1.* (Bottleneck), layer2.0, "
                                 "3 x layer2.* (Bottleneck), layer3.0, 5 x layer3.* (Bottleneck), layer4.0, "
                                 "2 x layer4.* (Bottleneck), head")
    assert g.is_chain() and g.seq_len is None
    # ResNet-50: 4.09 GMACs per 224x224 image (He et al. 2016, Table 1: 3.8e9 "FLOPs" counting
    # multiply-adds, without the v1.5 stride move); torchvision's v1.5 layout is 4.09.
    assert g.fwd_flops / 2 == pytest.approx(4.09e9, rel=0.005)


def test_torchvision_like_model_groups_each_stage():
    g = trace_model(TorchvisionLike(), torch.randn(2, 3, 16, 16), dtype="fp32")
    assert g.group_summary() == ("conv1, relu, 2 x layer1.* (Bottleneck), layer2.0, "
                                 "2 x layer2.* (Bottleneck), fc")
    grouped = g.block_groups()
    assert [(grp.count, grp.period) for grp in grouped] == [(1, 1), (1, 1), (2, 1), (1, 1), (2, 1), (1, 1)]
    gg = g.group_graph()
    assert gg.number_of_nodes() == 6 and gg.nodes[2]["count"] == 2
    assert sum(d["param_count"] for _, d in gg.nodes(data=True)) == g.param_count


def test_encoder_decoder_layer_graph_is_a_dag(traced):
    g = traced("t5-11b")
    assert g.group_summary() == ("embed, 24 x encoder.* (T5EncoderBlock), enc_final, dec_embed, "
                                 "24 x decoder.* (T5DecoderBlock), head")
    assert not g.is_chain()
    names = [layer.name for layer in g.layers]
    enc_final = names.index("enc_final")
    decoders = [i for i, n in enumerate(names) if n.startswith("decoder.")]
    enc_bytes = 512 * 1024 * 2  # encoder output per sample, fp16
    for d in decoders:
        assert g.layer_graph.edges[enc_final, d]["bytes"] == enc_bytes
    # Shared token embedding: owned by `embed`, tied in dec_embed and the head.
    assert [t.owner for t in g.layers[names.index("dec_embed")].tied_params] == [0]
    assert [t.owner for t in g.layers[-1].tied_params] == [0]
    # Each decoder block keeps the encoder output it reads: counted in every one of them.
    assert len({g.layers[d].activation_bytes for d in decoders}) == 1
    groups = g.group_graph()
    enc_group = next(n for n, d in groups.nodes(data=True) if d["name"] == "enc_final")
    dec_group = next(n for n, d in groups.nodes(data=True) if d["name"] == "decoder.*")
    assert groups.edges[enc_group, dec_group]["bytes"] == 24 * enc_bytes


def test_alternating_blocks_group_as_a_pattern():
    class Alternating(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(16, 16) if i % 2 == 0 else Experts2() for i in range(6))

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    class Experts2(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(16, 64), nn.Linear(64, 16)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    g = trace_model(Alternating(), torch.randn(2, 16), dtype="fp32")
    (group,) = g.block_groups()
    assert (group.count, group.period) == (3, 2)
    assert group.describe() == "3 x blocks.* (Linear, Experts2)"
    assert [len(idx) for _, idx in g.groups()] == [1] * 6  # runs of equal layers: none


def test_op_nodes_carry_shapes_flops_bytes_and_params():
    from planner.models import load_preset

    p = load_preset("gpt-tiny")
    g = trace_model(p.build(), p.sample_input(1), dtype="fp16")
    s, h = 64, 128
    qkv = next(n for n, d in g.ops.nodes(data=True) if d["module_path"] == "blocks.0.attn.qkv")
    d = g.ops.nodes[qkv]
    assert d["kind"] == "linear" and d["layer"] == 1
    assert d["input_shapes"] == [(1, s, h)] and d["output_shapes"] == [(1, s, 3 * h)]
    assert d["input_dtypes"] == ["float16"] and d["output_dtypes"] == ["float16"]
    assert d["fwd_flops"] == 2 * s * h * 3 * h and d["bwd_flops"] == 2 * d["fwd_flops"]
    assert d["param_bytes"] == (3 * h * h + 3 * h) * 2
    assert d["params"] == {"blocks.0.attn.qkv.weight": (3 * h, h), "blocks.0.attn.qkv.bias": (3 * h,)}
    assert d["bytes_written"] == s * 3 * h * 2
    assert d["bytes_read"] == (s * h + 3 * h * h + 3 * h) * 2
    (src,) = g.ops.predecessors(qkv)
    assert g.ops.edges[src, qkv]["bytes"] == s * h * 2
    # Node activations add up to the layer's; parameter bytes add up to the model's.
    for layer in g.layers:
        nodes = [n for n, nd in g.ops.nodes(data=True) if nd["layer"] == layer.index]
        assert sum(g.ops.nodes[n]["activation_bytes"] for n in nodes) == layer.activation_bytes
        assert g.layer_ops(layer.index).number_of_nodes() == layer.num_ops == len(nodes)
    assert sum(nd["param_bytes"] for _, nd in g.ops.nodes(data=True)) == 2 * g.param_count


def test_tied_parameters_count_once(traced):
    g = traced("gpt3-125m")
    assert sum(d["param_bytes"] for _, d in g.ops.nodes(data=True)) == 2 * g.param_count
    assert g.layers[-1].total_param_count == g.layers[-1].param_count + 51200 * 768


def test_seq_len_defaults():
    from planner.models import load_preset

    vit = load_preset("vit-h-14")
    small = dict(vit.config, num_layers=1)
    from planner.models import FAMILIES

    with torch.device("meta"):
        model = FAMILIES["vit"].build(small)
    g = trace_model(model, FAMILIES["vit"].sample_input(small, 1, None, "meta"))
    assert g.seq_len == 257  # patches + class token, read off the attention scores


def test_flop_formulas_torch_lacks():
    q = torch.empty(2, 4, 32, 16, device="meta", dtype=torch.bfloat16)
    with OpMeter() as meter:
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, q, q)
    (rec,) = meter.records[None]
    assert rec.flops == 4 * 2 * 4 * 32 * 32 * 16
    x = torch.empty(64, 32, device="meta", dtype=torch.bfloat16)
    w = torch.empty(4, 32, 48, device="meta", dtype=torch.bfloat16)
    offs = torch.empty(4, device="meta", dtype=torch.int32)
    with OpMeter() as meter:
        torch._grouped_mm(x, w, offs=offs)
    (rec,) = meter.records[None]
    assert rec.flops == 2 * 64 * 32 * 48
    assert (rec.m, rec.n, rec.k) == (64, 48, 32)
