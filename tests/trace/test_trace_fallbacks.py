"""Models the finer captures cannot handle are reported, degraded, and never crash the tracer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from planner.trace import trace_model


class DataDependentGate(nn.Module):
    """``if x.sum() > 0``: fx cannot trace it, export cannot guard on it, meta cannot evaluate it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        if x.sum() > 0:
            return self.lin(x)
        return x


class ItemScale(nn.Module):
    """``.item()``: fails even eagerly on meta."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        return self.lin(x) * (int(x.abs().max().item()) + 1)


class Block(nn.Module):
    def __init__(self, inner: type[nn.Module]) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.inner = inner()

    def forward(self, x):
        return self.inner(torch.relu(self.fc(x))) + x


class Net(nn.Module):
    def __init__(self, inner: type[nn.Module] = nn.Identity, blocks: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.blocks = nn.ModuleList(Block(inner) for _ in range(blocks))
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.out(x)


class KwargsNet(Net):
    """A forward taking ``**kwargs`` (like Hugging Face models): fx cannot bind it."""

    def forward(self, x, **kwargs):
        return super().forward(x)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _linear_flops(rows: int, inp: int, out: int) -> float:
    return 2.0 * rows * inp * out


# Per sample (batch 2 -> 1 row per sample): inp, 3 x (fc + inner linear), out.
EXACT_FWD = _linear_flops(1, 8, 16) + 3 * 2 * _linear_flops(1, 16, 16) + _linear_flops(1, 16, 4)
IDENTITY_FWD = EXACT_FWD - 3 * _linear_flops(1, 16, 16)  # inner = nn.Identity


@pytest.mark.parametrize("inner", [DataDependentGate, ItemScale])
def test_untraceable_submodule_is_reported_and_estimated(inner):
    model = Net(inner)
    g = trace_model(model, torch.randn(2, 8), dtype="fp32")
    assert g.method == "fx+opaque"
    assert g.group_summary() == "inp, 3 x blocks.* (Block), out"  # op-level detail kept around the culprit
    failed = g.notes[0]
    assert "torch.fx symbolic tracing failed at blocks.0.inner" in failed
    assert "torch.export (non-strict) failed at blocks.0.inner" in failed
    opaque = next(n for n in g.notes if "opaque leaf" in n)
    assert opaque.startswith(f"blocks.0.inner ({inner.__name__}) cannot run on the meta device")
    assert "Tensor.item() cannot be called on meta tensors" in opaque
    assert "272 parameters" in opaque
    # The estimate (2 FLOPs per parameter per position) is exact for a lone linear layer.
    assert g.fwd_flops == EXACT_FWD + 3 * 2 * 16
    assert g.param_count == _params(model) == sum(layer.param_count for layer in g.layers)


def test_root_level_item_degrades_to_one_opaque_layer():
    class RootItem(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.b(self.a(x)) if x.mean().item() > 0 else self.a(x)

    model = RootItem()
    g = trace_model(model, torch.randn(2, 8), dtype="fp32")
    assert g.method == "opaque" and g.num_layers == 1
    assert g.notes[0].startswith("fell back to one opaque layer for the whole model after:")
    assert "the module-level eager trace failed at <root>" in g.notes[0]
    assert "the whole model is one opaque layer" in g.notes[1]
    assert g.layers[0].param_count == g.param_count == _params(model) == 144
    assert g.fwd_flops == 2 * 144  # one position per sample


def test_module_level_trace_estimates_only_the_innermost_failing_module():
    model = KwargsNet(ItemScale)
    g = trace_model(model, torch.randn(2, 8), dtype="fp32")
    assert g.method == "module+opaque"
    assert "forward takes *args/**kwargs" in g.notes[0]
    assert "torch.fx with opaque leaves failed at <root>" in g.notes[0]
    opaque = g.notes[1]
    assert opaque.startswith("blocks.0.inner (ItemScale) cannot run on the meta device")
    assert opaque.endswith("[and 2 more of the same class]")
    assert [layer.name for layer in g.layers] == ["inp", "blocks.0", "blocks.1", "blocks.2", "out"]
    assert g.ops.number_of_nodes() == 5  # one node per layer call
    assert g.fwd_flops == EXACT_FWD + 3 * 2 * 16
    assert [layer.param_count for layer in g.layers] == [144, 544, 544, 544, 68]


def test_export_is_used_when_fx_cannot_bind_and_gives_the_same_costs():
    fx = trace_model(Net(), torch.randn(2, 8), dtype="fp32")
    exported = trace_model(KwargsNet(), torch.randn(2, 8), dtype="fp32")
    assert fx.method == "fx" and exported.method == "export"
    assert "forward takes *args/**kwargs" in exported.notes[0]
    for a, b in zip(fx.layers, exported.layers, strict=True):
        assert (a.name, a.fwd_flops, a.bwd_flops, a.activation_bytes, a.param_count) == \
               (b.name, b.fwd_flops, b.bwd_flops, b.activation_bytes, b.param_count)
    assert fx.fwd_flops == IDENTITY_FWD


def test_module_level_trace_matches_fx_costs(traced):
    from planner.models import load_preset

    p = load_preset("gpt-tiny")
    fx = trace_model(p.build(), p.sample_input(2), dtype="fp16")
    module = trace_model(p.build(), p.sample_input(2), dtype="fp16", force_module_level=True)
    assert module.method == "module" and "module-level tracing was requested" in module.notes[0]
    assert module.ops.number_of_nodes() == module.num_layers == fx.num_layers == 6
    for a, b in zip(fx.layers, module.layers, strict=True):
        assert a.name == b.name
        assert a.fwd_flops == b.fwd_flops and a.bwd_flops == b.bwd_flops
        assert a.activation_bytes == b.activation_bytes and a.param_count == b.param_count


def test_bad_arguments_raise_clear_errors():
    from planner.errors import SpecError

    with pytest.raises(SpecError, match="dtype"):
        trace_model(Net(), torch.randn(2, 8), dtype="int8")
    with pytest.raises(SpecError, match="sample_input"):
        trace_model(Net(), torch.tensor(1.0))
    with pytest.raises(SpecError, match="model"):
        trace_model("not a module", torch.randn(2, 8))  # type: ignore[arg-type]


def test_caller_module_is_left_untouched():
    model = Net().eval()
    before = {n: (p.device.type, p.dtype, p.requires_grad) for n, p in model.named_parameters()}
    trace_model(model, torch.randn(2, 8))
    assert not model.training
    assert {n: (p.device.type, p.dtype, p.requires_grad) for n, p in model.named_parameters()} == before


class LoopMoE(nn.Module):
    """A hand-written top-k mixture of experts: it gathers each expert's tokens by value (``nonzero``), so it
    cannot run on the meta device and is estimated."""

    def __init__(self, hidden: int = 32, num_experts: int = 8, top_k: int = 2) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.ReLU(),
                                                   nn.Linear(4 * hidden, hidden)) for _ in range(num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = self.gate(flat).softmax(-1).topk(self.top_k, dim=-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            out[rows] += weights[rows, slot, None] * expert(flat[rows])
        return out.reshape(x.shape)


def test_a_hand_written_mixture_of_experts_counts_its_top_k_experts():
    """Each position goes through top_k of num_experts experts: the estimate counts those, not all of them."""
    from planner.trace import trace_model

    moe = LoopMoE()
    g = trace_model(moe, torch.zeros(1, 16, 32))
    assert any("opaque" in n and "2 of 8" in n for n in g.notes), g.notes
    expert = sum(p.numel() for p in moe.experts[0].parameters())
    active = moe.gate.weight.numel() + 2 * expert  # the router and two experts per position
    assert g.fwd_flops == pytest.approx(2 * active * 16, rel=1e-6)
