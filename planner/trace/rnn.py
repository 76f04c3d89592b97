"""Recurrent layers, measured in two short runs and extrapolated exactly to the full length.

On the meta device ``nn.GRU``/``nn.LSTM``/``nn.RNN`` decompose into a dozen ops *per time step*
and direction, so a 7-layer bidirectional GRU over 750 frames would dispatch ~100k ops. Every
step does the same work, so any cost ``c(T)`` (FLOPs and bytes per distinct GEMM shape and op,
bytes saved for backward) is affine in the length: ``c(T) = c(1) + (T-1)·(c(2) - c(1))``. The
tracer runs lengths 1 and 2 (views of the real input, from the same saved-tensor state), and
records that extrapolation under the layer's key, merged per op kind and GEMM shape (so a
per-step ``[batch × 3h] · [3h × h]`` GEMM keeps its real, small ``m``). The output is a tensor
with the full-length shape. ``tests/trace`` checks this against a full-length run.

Packed sequences and explicit initial states run in full (no shortcut).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import nn

from planner.trace.meter import AtenRecord, OpMeter, PackEvent, SavedTensorMeter, storage_base

_MIN_STEPS = 4  # below this a full run is as cheap as two short ones


@contextlib.contextmanager
def rnn_shortcut(model: nn.Module, opm: OpMeter, stm: SavedTensorMeter,
                 enabled: bool = True) -> Iterator[None]:
    """While active, every ``nn.RNNBase`` in ``model`` runs as two short runs plus extrapolation."""
    patched = []
    if enabled:
        for m in model.modules():
            if isinstance(m, nn.RNNBase) and "forward" not in vars(m):
                m.forward = functools.partial(_extrapolated, m, type(m).forward, opm, stm)
                patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def _merge(records: list[AtenRecord]) -> dict[tuple, tuple[float, float]]:
    out: dict[tuple, tuple[float, float]] = {}
    for r in records:
        key = (r.name, r.m, r.n, r.k, r.bwd_input_mult, r.bwd_weight_mult)
        f, b = out.get(key, (0.0, 0.0))
        out[key] = (f + r.flops, b + r.bytes)
    return out


def _extrapolated(module: nn.RNNBase, forward, opm: OpMeter, stm: SavedTensorMeter, input, hx=None):
    if not isinstance(input, torch.Tensor) or hx is not None or input.dim() not in (2, 3):
        return forward(module, input, hx)
    tdim = 1 if (module.batch_first and input.dim() == 3) else 0
    steps = input.shape[tdim]
    if steps < _MIN_STEPS:
        return forward(module, input, hx)
    key = opm.key
    seen0 = set(stm.seen)
    x_base = id(storage_base(input))
    runs = []
    for length in (1, 2):
        stm.seen = set(seen0)  # both short runs start from the state the full run would see
        sub = (key, "rnn", length)
        opm.key = stm.key = sub
        out = forward(module, input.narrow(tdim, 0, length))
        events = stm.events.pop(sub, [])
        stm.saved.pop(sub, None)
        runs.append((_merge(opm.records.pop(sub, [])), events, out, set(stm.seen)))
        opm.param_uses.setdefault(key, set()).update(opm.param_uses.pop(sub, set()))
    opm.key = stm.key = key
    stm.seen = seen0 | runs[0][3] | runs[1][3]
    (r1, e1, _, _), (r2, e2, out2, _) = runs
    for k in sorted(set(r1) | set(r2), key=str):
        f1, b1 = r1.get(k, (0.0, 0.0))
        f2, b2 = r2.get(k, (0.0, 0.0))
        name, m, n, kk, bm, wm = k
        opm.records.setdefault(key, []).append(AtenRecord(
            name, max(f1 + (steps - 1) * (f2 - f1), 0.0), max(b1 + (steps - 1) * (b2 - b1), 0.0),
            m, n, kk, bm, wm))
    # The input is saved once whatever the length (steps are views of it): keep it as a real event.
    x_events = [ev for ev in e1 if ev.base_id == x_base]
    for ev in x_events[:1]:
        stm.events.setdefault(key, []).append(ev)
        if ev.new:
            stm.saved.setdefault(key, []).append((ev.shape, ev.nbytes))
    s1 = sum(ev.nbytes for ev in e1 if ev.new and ev.base_id != x_base)
    s2 = sum(ev.nbytes for ev in e2 if ev.new and ev.base_id != x_base)
    step_bytes = int(max(s1 + (steps - 1) * (s2 - s1), 0))
    token = torch.empty(0, device="meta")  # a unique identity for the merged saved-bytes entry
    stm.keep.append(token)
    stm.events.setdefault(key, []).append(PackEvent(id(token), (), step_bytes, True))
    stm.saved.setdefault(key, []).append(((), step_bytes))
    return _full_length(out2, tdim, steps, opm, stm, key)


def _full_length(out2, tdim: int, steps: int, opm: OpMeter, stm: SavedTensorMeter, key) -> tuple:
    """``(output, h_n)`` of the length-2 run, with the output stretched to ``steps`` (h_n is unchanged)."""
    output, h_n = out2
    shape = list(output.shape)
    shape[tdim] = steps
    opm.key = stm.key = "<rnn scratch>"
    try:
        full = torch.empty(shape, dtype=output.dtype, device=output.device)
        if output.requires_grad:
            full = full.requires_grad_().clone()
    finally:
        for table in (opm.records, opm.param_uses, stm.saved, stm.events):
            table.pop("<rnn scratch>", None)
        opm.key = stm.key = key
    stm.keep.append(full)
    return full, h_n
