"""Measure what a forward pass costs, op by op, on the meta device.

``OpMeter`` is a ``TorchDispatchMode``: it sees every ATen op the forward runs, counts its FLOPs
with torch's own formulas (``torch.utils.flop_counter``, plus the few ops it lacks: CPU flash
attention and grouped GEMMs), its memory traffic (inputs + outputs, views are free), the GEMM
shape of matrix multiplies, which parameters it touches, and the shapes of softmax outputs (the
attention scores). ``SavedTensorMeter`` hooks autograd's saved tensors, which is exactly the
activation memory held for backward, de-duplicated by storage and excluding parameters and
buffers (which are not activations).

Both attribute what they see to whatever ``key`` is current, so a caller measures any unit it
likes (an fx node, a module call).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry, sdpa_flop_count

_aten = torch.ops.aten
_MM = {_aten.mm, _aten.addmm, _aten.bmm, _aten.baddbmm}
_CONV = {_aten.convolution, _aten._convolution, _aten.cudnn_convolution}
_SOFTMAX = {_aten._softmax, _aten._safe_softmax, _aten.softmax}
# Random masks: on the CPU, dropout draws its mask in the activation dtype; the fused CUDA kernel
# we plan for keeps a 1-byte bool. Saved tensors born here are counted at 1 byte per element.
_MASK_MAKERS = {_aten.bernoulli, _aten.bernoulli_, _aten.native_dropout}


def _grouped_mm_flops(a: torch.Tensor, b: torch.Tensor, *args, out_val=None, **kwargs) -> int:
    """``_grouped_mm``: 2·rows·k·n summed over groups (2-D × 2-D groups the contraction dim)."""
    if a.dim() == 2 and b.dim() == 2:
        return 2 * a.shape[0] * a.shape[1] * b.shape[1]
    return 2 * out_val.numel() * a.shape[-1]


def _cpu_flash_flops(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args, out_val=None, **kwargs) -> int:
    return sdpa_flop_count(q.shape, k.shape, v.shape)


# Ops torch.utils.flop_counter has no formula for (FLOPs would silently be 0 otherwise).
EXTRA_FLOPS = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flops,
}
if hasattr(_aten, "_grouped_mm"):
    EXTRA_FLOPS[_aten._grouped_mm] = _grouped_mm_flops
# Attention kernels: their whole cost is attention (for flash / selective-recompute estimates).
ATTENTION_KERNELS = frozenset(
    {"_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
     "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
     "_flash_attention_forward", "_efficient_attention_forward"})


# Where each attention kernel takes ``is_causal`` positionally (ATen's schemas).
_CAUSAL_ARG = {"_scaled_dot_product_efficient_attention": 6, "_scaled_dot_product_cudnn_attention": 6,
               "_flash_attention_forward": 8, "_efficient_attention_forward": 9}


def _is_causal(name: str, args: tuple, kwargs: dict) -> bool:
    if "is_causal" in kwargs:
        return bool(kwargs["is_causal"])
    i = _CAUSAL_ARG.get(name, 4)
    # ``_efficient_attention_forward`` takes a mask type (1: causal from the top left), the rest a bool.
    return len(args) > i and isinstance(args[i], (bool, int)) and args[i] == 1


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def storage_base(t: torch.Tensor) -> torch.Tensor:
    return t._base if t._base is not None else t


@dataclass
class AtenRecord:
    name: str
    flops: float
    bytes: float
    m: int = 0
    n: int = 0
    k: int = 0
    bwd_input_mult: int = 0  # backward-input FLOPs = flops x this (one per activation operand needing grad)
    bwd_weight_mult: int = 0  # backward-weight FLOPs = flops x this (1 when a parameter operand needs grad)
    out_numel: int = 0  # GEMMs only: output elements (attention-score detection)
    a_numel: int = 0  # GEMMs only: first operand's elements
    causal: bool = False  # attention kernels only: a causal mask, so the kernel skips half the scores
    out_bytes: int = 0  # GEMMs and attention kernels only: bytes of the outputs (what per-op checkpointing saves)


@dataclass
class OpMeter(TorchDispatchMode):
    """Collects an ``AtenRecord`` per ATen op under the current key."""

    params: set[int] = field(default_factory=set)  # ids of parameters: operands that get weight gradients
    masks: dict[int, torch.Tensor] = field(default_factory=dict)  # dropout masks by id (kept alive)
    records: dict[object, list[AtenRecord]] = field(default_factory=dict)
    param_uses: dict[object, set[int]] = field(default_factory=dict)  # key -> ids of parameters read
    softmax_shapes: set[tuple[int, ...]] = field(default_factory=set)
    key: object = None

    def __post_init__(self) -> None:
        super().__init__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet in _MASK_MAKERS:
            mask = out[1] if packet is _aten.native_dropout else out
            self.masks[id(mask)] = mask
        elif packet in _SOFTMAX and isinstance(out, torch.Tensor) and out.dim() >= 3:
            self.softmax_shapes.add(tuple(out.shape))
        formula = flop_registry.get(packet) or EXTRA_FLOPS.get(packet)
        flops = 0.0
        if formula is not None:
            try:
                flops = float(formula(*args, **kwargs, out_val=out))
            except Exception:  # a formula that cannot handle these args: count it as memory-bound
                flops = 0.0
        ins, _ = tree_flatten((args, kwargs))
        tensors_in = [t for t in ins if isinstance(t, torch.Tensor)]
        if self.params:
            used = {id(storage_base(t)) for t in tensors_in} & self.params
            if used:
                self.param_uses.setdefault(self.key, set()).update(used)
        out_bytes = sum(_nbytes(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        moved = 0.0 if getattr(func, "is_view", False) else float(sum(_nbytes(t) for t in tensors_in) + out_bytes)
        m = n = k = out_numel = a_numel = 0
        if flops and (packet in _MM or packet is getattr(_aten, "_grouped_mm", None)):
            a, b = (args[1], args[2]) if packet in (_aten.addmm, _aten.baddbmm) else (args[0], args[1])
            k = a.shape[-1]
            n = b.shape[-1]
            m = a.numel() // max(k, 1)
            out_numel, a_numel = out.numel(), a.numel()
        elif flops and packet in _CONV:
            weight = args[1]
            n = weight.shape[0]
            k = math.prod(weight.shape[1:])
            m = out.numel() // max(n, 1)
        b_mult = w_mult = 0
        if flops:
            n_param = n_act = 0
            for t in args:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    if id(t) in self.params or id(storage_base(t)) in self.params:
                        n_param += 1
                    else:
                        n_act += 1
            # A product of two operands has two gradients, each costing one forward's FLOPs.
            w_mult = min(n_param, 1)
            b_mult = min(n_act, 2 - w_mult)
        name = str(packet.__name__)
        causal = name in ATTENTION_KERNELS and _is_causal(name, args, kwargs)
        kept_bytes = out_bytes if name in ATTENTION_KERNELS or packet in _MM else 0  # what per-op checkpointing reads
        self.records.setdefault(self.key, []).append(
            AtenRecord(name, flops, moved, m, n, k, b_mult, w_mult, out_numel, a_numel, causal, kept_bytes))
        return out


@dataclass(frozen=True)
class PackEvent:
    """One tensor autograd saved: its storage base, shape, bytes, and whether it was new (counted)."""

    base_id: object  # id() of the storage base (replayed blocks use a per-block stand-in)
    shape: tuple[int, ...]
    nbytes: int
    new: bool


class SavedTensorMeter:
    """Counts tensors autograd saves for backward, once each, attributed to the current key."""

    def __init__(self, excluded: set[int], masks: dict[int, torch.Tensor] | None = None) -> None:
        self.excluded = excluded  # ids of parameter and buffer tensors (and their bases)
        self.masks = masks if masks is not None else {}
        self.seen: set[int] = set()
        self.keep: list[torch.Tensor] = []  # keeps ids stable for the trace's lifetime
        self.saved: dict[object, list[tuple[tuple[int, ...], int]]] = {}
        self.events: dict[object, list[PackEvent]] = {}  # every save, counted or not (block replay reads it)
        self.key: object = None
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x)

    def nbytes_of(self, base: torch.Tensor) -> int:
        return base.numel() if id(base) in self.masks else _nbytes(base)

    def _pack(self, t: torch.Tensor):
        if isinstance(t, torch.Tensor):
            base = storage_base(t)
            ident = id(base)
            if ident not in self.excluded and id(t) not in self.excluded:
                new = ident not in self.seen
                nbytes = self.nbytes_of(base)
                self.events.setdefault(self.key, []).append(PackEvent(ident, tuple(base.shape), nbytes, new))
                if new:
                    self.seen.add(ident)
                    self.keep.append(base)
                    self.saved.setdefault(self.key, []).append((tuple(base.shape), nbytes))
        return t

    def __enter__(self) -> SavedTensorMeter:
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)
