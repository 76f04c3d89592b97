"""Measure what a forward pass costs, op by op, on the meta device.

``OpMeter`` is a ``TorchDispatchMode``: it sees every ATen op the forward runs, counts its FLOPs
with torch's own formulas (``torch.utils.flop_counter``), its memory traffic (inputs + outputs,
views are free), and the GEMM shape of matrix multiplies. ``SavedTensorMeter`` hooks autograd's
saved tensors, which is exactly the activation memory held for backward, de-duplicated by
storage and excluding parameters and buffers (which are not activations).

Both attribute what they see to whatever ``key`` is current, so a caller measures any unit it
likes (an fx node, a module call).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

_aten = torch.ops.aten
_MM = {_aten.mm, _aten.addmm, _aten.bmm, _aten.baddbmm}
_CONV = {_aten.convolution, _aten._convolution, _aten.cudnn_convolution}
# Random masks: on the CPU, dropout draws its mask in the activation dtype; the fused CUDA kernel
# we plan for keeps a 1-byte bool. Saved tensors born here are counted at 1 byte per element.
_MASK_MAKERS = {_aten.bernoulli, _aten.bernoulli_, _aten.native_dropout}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


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


@dataclass
class OpMeter(TorchDispatchMode):
    """Collects an ``AtenRecord`` per ATen op under the current key."""

    params: set[int] = field(default_factory=set)  # ids of parameters: operands that get weight gradients
    masks: dict[int, torch.Tensor] = field(default_factory=dict)  # dropout masks by id (kept alive)
    records: dict[object, list[AtenRecord]] = field(default_factory=dict)
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
        flops = 0.0
        if packet in flop_registry:
            try:
                flops = float(flop_registry[packet](*args, **kwargs, out_val=out))
            except Exception:  # a formula that cannot handle these args: count it as memory-bound
                flops = 0.0
        if getattr(func, "is_view", False):
            moved = 0.0
        else:
            ins, _ = tree_flatten((args, kwargs))
            outs, _ = tree_flatten(out)
            moved = float(sum(_nbytes(t) for t in ins + outs if isinstance(t, torch.Tensor)))
        m = n = k = 0
        if flops and packet in _MM:
            a, b = (args[1], args[2]) if packet in (_aten.addmm, _aten.baddbmm) else (args[0], args[1])
            k = a.shape[-1]
            n = b.shape[-1]
            m = a.numel() // max(k, 1)
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
                    base = t._base if t._base is not None else t
                    if id(t) in self.params or id(base) in self.params:
                        n_param += 1
                    else:
                        n_act += 1
            # A product of two operands has two gradients, each costing one forward's FLOPs.
            w_mult = min(n_param, 1)
            b_mult = min(n_act, 2 - w_mult)
        self.records.setdefault(self.key, []).append(
            AtenRecord(str(packet.__name__), flops, moved, m, n, k, b_mult, w_mult))
        return out


class SavedTensorMeter:
    """Counts tensors autograd saves for backward, once each, attributed to the current key."""

    def __init__(self, excluded: set[int], masks: dict[int, torch.Tensor] | None = None) -> None:
        self.excluded = excluded  # ids of parameter and buffer tensors (and their bases)
        self.masks = masks if masks is not None else {}
        self.seen: set[int] = set()
        self.keep: list[torch.Tensor] = []  # keeps ids stable for the trace's lifetime
        self.saved: dict[object, list[tuple[tuple[int, ...], int]]] = {}
        self.key: object = None
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x)

    def _pack(self, t: torch.Tensor):
        if isinstance(t, torch.Tensor):
            base = t._base if t._base is not None else t
            ident = id(base)
            if ident not in self.excluded and id(t) not in self.excluded and ident not in self.seen:
                self.seen.add(ident)
                self.keep.append(base)
                nbytes = base.numel() if ident in self.masks else _nbytes(base)
                self.saved.setdefault(self.key, []).append((tuple(base.shape), nbytes))
        return t

    def __enter__(self) -> SavedTensorMeter:
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)
