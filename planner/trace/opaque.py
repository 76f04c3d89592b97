"""The last resort for code that cannot run on the meta device: an estimated, clearly noted leaf.

Data-dependent Python (``if x.sum() > 0``, ``.item()``, ``.tolist()``) needs tensor values, which
meta tensors do not have, so such a module fails under every tracer, eager included. Rather than
stop, the tracer treats the innermost failing module as an *opaque leaf*:

* forward FLOPs = 2 × (its parameters) × (positions in its input), i.e. as if each parameter took
  part in one multiply-add per position (exact for a linear layer, a rough guide otherwise); in a
  mixture of experts only the ``top_k`` of ``num_experts`` experts a position is routed to count;
  backward = twice that (input and weight gradients);
* bytes = its parameters + its input and output; activation saved = its input;
* output = a tensor with the input's shape and dtype (an assumption; if the code after it needs
  something else the tracer degrades one level further, to the enclosing module).

Every use is written to ``CostGraph.notes`` with the module path and the reason, so a plan built
on an estimate says so.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from planner.trace.meter import AtenRecord, OpMeter, PackEvent, SavedTensorMeter, storage_base

_SCRATCH = "<opaque scratch>"


class OpaqueFailure(Exception):
    """The module's input gives nothing to estimate from (no tensor argument)."""


def reason_of(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


# Words in the errors of code that needs tensor values or a device (torch on meta: "Tensor.item() cannot
# be called on meta tensors", "Cannot copy out of meta tensor", "no fake impl or Meta kernel", a CUDA
# extension's "expected a CUDA tensor"); NotImplementedError is always one.
_DEVICE_WORDS = ("meta", "data-dependent", "cuda", "device", "storage", "numpy", "fake")


def meta_limitation(exc: BaseException) -> bool:
    """Whether ``exc`` is the meta device's limit (code that needs values or a device: estimated as an
    opaque leaf) rather than the model failing on its input (a shape or dtype mismatch, which meta
    kernels check as a GPU would, or an exception the model's own code raises)."""
    if isinstance(exc, NotImplementedError):
        return True
    text = f"{type(exc).__name__} {exc}".lower()
    return any(word in text for word in _DEVICE_WORDS)


def estimate_flops(n_params: int, positions: int) -> float:
    return 2.0 * n_params * positions


def opaque_call(module: nn.Module, path: str, args: tuple, kwargs: dict, exc: BaseException, opm: OpMeter,
                stm: SavedTensorMeter, *, discard_partial: bool = True) -> tuple[Any, str]:
    """Replace a module call by its estimate under the meters' current key; returns (output, note).

    ``discard_partial``: the key belongs to this call alone and holds what a failed attempt to run
    it measured, which is dropped (an fx leaf node); otherwise the key is shared (a layer) and kept.
    """
    key = opm.key
    if discard_partial:
        for table in (opm.records, opm.param_uses, stm.saved, stm.events):
            table.pop(key, None)
    flat, _ = tree_flatten((args, kwargs))
    x = next((t for t in flat if isinstance(t, torch.Tensor)), None)
    if x is None:
        raise OpaqueFailure(f"{path}: no tensor input to estimate from") from exc
    params = list(module.parameters())
    n_params = sum(p.numel() for p in params)
    # Token ids: one position per id; activations [..., features]: one per row.
    if x.is_floating_point() and x.dim() and x.shape[-1]:
        positions = x.numel() // x.shape[-1]
    else:
        positions = max(x.numel(), 1)
    active, moe = _active_params(module, n_params)
    flops = estimate_flops(active, positions)
    x_bytes = x.numel() * x.element_size()
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    opm.key = stm.key = _SCRATCH
    try:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        if x.is_floating_point():
            out = out.requires_grad_().clone()
    finally:
        for table in (opm.records, opm.param_uses, stm.saved, stm.events):
            table.pop(_SCRATCH, None)
        opm.key = stm.key = key
    opm.records.setdefault(key, []).append(AtenRecord(
        "opaque", flops, float(param_bytes + 2 * x_bytes), bwd_input_mult=1 if x.requires_grad else 0,
        bwd_weight_mult=1 if any(p.requires_grad for p in params) else 0))
    if params:
        opm.param_uses.setdefault(key, set()).update(id(p) for p in params)
    base = storage_base(x)
    if x.is_floating_point() and id(base) not in stm.excluded:
        new = id(base) not in stm.seen
        event = PackEvent(id(base), tuple(base.shape), stm.nbytes_of(base), new)
        stm.events.setdefault(key, []).append(event)
        if new:
            stm.seen.add(id(base))
            stm.keep.append(base)
            stm.saved.setdefault(key, []).append((tuple(base.shape), stm.nbytes_of(base)))
    stm.keep.append(out)
    note = (f"{path or '<root>'} ({type(module).__name__}) cannot run on the meta device ({reason_of(exc)}); "
            f"treated as an opaque leaf: costs estimated from its {n_params:,} parameters{moe} (2 FLOPs per "
            f"parameter per position), output assumed to have the input's shape {tuple(x.shape)}")
    return out, note


def _active_params(module: nn.Module, n_params: int) -> tuple[float, str]:
    """The parameters each position multiplies with: all of them, but in a mixture of experts (recognised
    as :func:`planner.trace.assemble.expert_routing` does) only its ``top_k`` of ``num_experts`` experts'
    (times the capacity factor: experts compute over their padded slots). A hand-written router indexes
    tokens by value, so it never runs on meta; counting every expert for every token overstated it by
    ``num_experts / top_k``."""
    from planner.trace.assemble import expert_routing  # assemble imports the tracer's modules

    routes = expert_routing(module)
    if not routes:
        return float(n_params), ""
    idle = sum(r.expert_params * (1.0 - min(1.0, r.top_k * r.capacity_factor / r.num_experts)) for r in routes)
    shown = ", ".join(f"{r.top_k} of {r.num_experts}" for r in routes)
    return n_params - idle, f", of which each position uses its router's pick of experts ({shown})"
