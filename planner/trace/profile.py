"""Profile mode: time each layer's forward and backward for real, to calibrate the analytic model.

This is the one place in ``planner/`` that runs real compute. ``profile_layers`` materialises the
model on ``device`` (random weights if it was on meta), runs one forward to capture each layer's
inputs, then times every layer *in isolation*: forward (with autograd recording, as in training)
and forward + backward with a ones gradient on its outputs (input gradients included, as in a
pipeline stage). ``bwd_s`` is the difference of the two medians. CUDA is synchronised around
every timed region. It never imports ``torch.distributed``.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from planner.trace.units import layer_units


@dataclass(frozen=True, kw_only=True)
class ProfiledTime:
    """Median wall time of one layer's forward and backward, in seconds (whole sample batch)."""

    fwd_s: float
    bwd_s: float

    @property
    def total_s(self) -> float:
        return self.fwd_s + self.bwd_s


def _materialise(model: nn.Module, device: torch.device) -> nn.Module:
    """The model on ``device``: a copy; a meta model gets fresh random weights (values do not matter)."""
    on_meta = any(t.device.type == "meta" for t in list(model.parameters()) + list(model.buffers()))
    real = copy.deepcopy(model)
    if not on_meta:
        return real.to(device)
    real = real.to_empty(device=device)
    with torch.no_grad():
        for m in real.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        for p in real.parameters():
            if not torch.isfinite(p).all():
                p.normal_(0.0, 0.02)
        for b in real.buffers():  # non-persistent buffers (masks, frequencies) came back empty
            if b.is_floating_point() and not torch.isfinite(b).all():
                b.zero_()
    return real


def _real_input(value: Any, device: torch.device) -> Any:
    def convert(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        if t.is_floating_point():
            return torch.randn(t.shape, dtype=t.dtype, device=device)
        return torch.zeros(t.shape, dtype=t.dtype, device=device)  # token ids / indices: 0 is always valid

    return tree_map(convert, value)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def profile_layers(model: nn.Module, sample_input: Any, device: str | torch.device = "cpu", warmup: int = 2,
                   repeats: int = 5) -> dict[str, ProfiledTime]:
    """Time every layer (see :func:`layer_units`) on ``device``: ``{layer name: ProfiledTime}``.

    ``sample_input`` is a tensor, a tuple of positional arguments or a dict of keyword arguments
    (meta tensors are replaced by random / zero tensors of the same shape). Times are for the
    whole sample batch. A layer called more than once is timed on its first call's inputs.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"profile_layers: repeats={repeats}, warmup={warmup}; "
                         "need repeats >= 1 and warmup >= 0")
    dev = torch.device(device)
    real = _materialise(model, dev)
    real.train()
    args, kwargs = ((), dict(sample_input)) if isinstance(sample_input, dict) else (
        (tuple(sample_input) if isinstance(sample_input, (tuple, list)) else (sample_input,)), {})
    args, kwargs = _real_input((args, kwargs), dev)
    units = layer_units(real)
    modules = dict(real.named_modules())
    captured: dict[str, tuple[tuple, dict]] = {}

    def capture(path: str):
        def hook(mod, a, kw):
            if path not in captured:
                captured[path] = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, (a, kw))
        return hook

    handles = [modules[p].register_forward_pre_hook(capture(p), with_kwargs=True) for p in units]
    try:
        with torch.no_grad():
            real(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()

    out: dict[str, ProfiledTime] = {}
    for path in units:
        if path not in captured:
            continue
        layer = modules[path]
        a, kw = captured[path]

        def fresh_inputs(a=a, kw=kw):
            return tree_map(lambda t: t.detach().requires_grad_(True)
                            if isinstance(t, torch.Tensor) and t.is_floating_point() else t, (a, kw))

        def forward(layer=layer, fresh_inputs=fresh_inputs):
            fa, fkw = fresh_inputs()
            return layer(*fa, **fkw)

        def forward_backward(forward=forward):
            outs = [t for t in tree_flatten(forward())[0] if isinstance(t, torch.Tensor) and t.requires_grad]
            if outs:
                torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])

        fwd = _median_time(forward, dev, warmup, repeats)
        both = _median_time(forward_backward, dev, warmup, repeats)
        layer.zero_grad(set_to_none=True)
        out[path or type(real).__name__] = ProfiledTime(fwd_s=fwd, bwd_s=max(both - fwd, 0.0))
    return out
