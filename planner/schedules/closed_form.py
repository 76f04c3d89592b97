"""Step time, memory and staleness without building a timeline: what the search calls ~100k times.

Step time (``T``) of the synchronous schedules, with every stage (model chunk) taking ``F`` forward,
``I`` input-gradient and ``W`` weight-gradient seconds, ``B = I + W``, ``c = p2p_s`` (0 when p = 1),
``M = m + p - 1``. Each formula is the longest path of the schedule's fixed order, read off the
simulator's critical paths and checked against :func:`~planner.schedules.simulate` by the tests:

* GPipe (``v`` chunks): ``T = G(F) + G(B)`` with ``G(X) = (p-1)(X+c) + mX + (v-1) max(mX, p(X+c))``.
* 1F1B: ``T = M (F + B) + c (2(p-1) + 2(x - ceil(x/p)))``, ``x = m - 1``: with ``c > 0`` every
  micro-batch but one in ``p`` adds ``2c`` in the steady state.
* Interleaved 1F1B: ``T = (mv + p - 1)(F + B) + 2(pv - 1) c`` when ``c <= min(F, I)``
  (the bubble is ``(p-1)/(mv)`` of the ideal ``mv(F+B)``: Megatron's ``(p-1)/(v m)``).
* ZB-H1 / ZB-H2 / ZB-V / DualPipe-V: a max of 3-13 linear forms each (see the functions below); with
  ``F = I = W`` ZB-H1's bubble is ``(p-1)F`` (a third of 1F1B's ``3(p-1)F``).
* Chimera (``m = kp``, ``c = 0``): a max of three forms, ``2m + p - 2`` with ``F = B = 1``.
* Asynchronous (steady state, no flush): ``T = m * lambda`` with ``lambda`` the largest cycle mean,
  ``max over windows i..j of (sum_{i..j} t + 2(j-i)c) / (j-i+1)`` for PipeDream(-2BW) (1F1B order) and
  ``/(2(j-i)+1)`` for Pipelined Backprop / PipeMare (twice as many micro-batches in flight), ``t = F+B``.

Where a formula is not known to hold (p2p outside the checked regime, very small ``m``), a program of
at most :data:`EXACT_MAX_ACTIONS` actions is timed exactly by :mod:`.compiled`; a larger one gets
``T(F + c, I + c, W, c=0)``, an upper bound (charging each hop to the action before it), with
``exact=False``. Non-uniform stage times: GPipe (v=1) and the asynchronous schedules have exact
formulas; otherwise small programs are timed exactly and large ones get the busiest device's work plus
the closed form's bubble at the mean chunk times (:func:`device_balanced_time`, ``exact=False``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

from planner.schedules import compiled
from planner.schedules.placement import chunk_devices
from planner.schedules.registry import get_schedule
from planner.schedules.simulator import SimResult, stage_times

EXACT_MAX_ACTIONS = 1024

Vec = tuple[float, float, float, float]  # coefficients of (F, I, W, c)


def _best(forms: Sequence[Vec], f: float, b: float, w: float, c: float) -> float:
    return max(x[0] * f + x[1] * b + x[2] * w + x[3] * c for x in forms)


def gpipe_time(p: int, m: int, v: int, f: float, b: float, w: float, c: float) -> float:
    def phase(x: float) -> float:
        return (p - 1) * (x + c) + m * x + (v - 1) * max(m * x, p * (x + c))

    return phase(f) + phase(b + w)


def one_f_one_b_time(p: int, m: int, f: float, b: float, w: float, c: float) -> float:
    x = m - 1
    hops = 2 * (p - 1) + 2 * (x - math.ceil(x / p))
    return (m + p - 1) * (f + b + w) + hops * c


def interleaved_time(p: int, m: int, v: int, f: float, b: float, w: float, c: float) -> float | None:
    if c > min(f, b):
        return None
    return (m * v + p - 1) * (f + b + w) + 2 * (p * v - 1) * c


def zb_h1_forms(p: int, m: int, c_free: bool) -> list[Vec] | None:
    big = m + p - 1
    if c_free:
        return [(big, big, max(1, m - p + 1), 0), (big, max(m, p), m, 0), (max(m, p), big, m, 0)]
    if m <= p:
        return None
    lo = 1 + math.ceil((m - 1) / p)
    hi = m - p + 1
    return [
        (big, big, hi, 4 * (p - 1)),
        (big, big, lo, 2 * (big - lo)),
        (big, m, m, 3 * (p - 1)),
        (big, m, lo + p - 1, 3 * (p - 1) + 2 * (m - lo - p + 1)),
        (m, big, m, 2 * (p - 1)),
    ]


def zb_h2_forms(p: int, m: int) -> list[Vec] | None:
    if m < p:
        return None
    big = m + p - 1
    hi = max(1, m - 2 * p + 2)
    lo = max(1, math.ceil((m - 2 * p + 2) / p))
    return [
        (big, big, hi, 2 * (p - 1)),
        (big, big, lo, 2 * (p - 1) + 2 * (hi - lo)),
        (big, m, m, p - 1),
        (max(p, m - p + 1), big, m, 2 * (p - 1)),
    ]


def zb_v_forms(p: int, m: int) -> list[Vec] | None:
    """Chunk times; valid for ``p >= 2`` and ``m >= 2p - 1`` (the steady pattern is reached)."""
    if p < 2 or m < 2 * p - 1:
        return None
    n = 2 * m
    return [
        (n + 2 * p - 2, n, n - 2 * p + 1, 4 * (p - 1)),
        (n + 2 * p - 2, n - p + 1, n - 1, 3 * (p - 1)),
        (n + 2 * p - 3, n + 1, n - 2 * p + 2, 4 * p - 6),
        (n + 2 * p - 3, n - p + 2, n, 3 * p - 5),
        (n + p - 1, n + p - 1, n - 2 * p + 1, 6 * (p - 1)),
        (n + p - 1, n, n - 1, 5 * (p - 1)),
        (n + p - 2, n + p, n - 2 * p + 2, 6 * p - 8),
        (n + p - 2, n + 1, n, 5 * p - 7),
        (n + 1, n, n + p - 2, 3 * p - 5),
        (n, n + 2 * p - 2, n - 2 * p + 2, 6 * p - 8),
        (n, n + 2 * p - 2, n - 2 * p + 1, 6 * (p - 1)),
        (n, n + p - 1, n, 5 * p - 7),
        (n, n + 1, n + p - 2, 3 * (p - 1)),
    ]


def dualpipe_v_forms(p: int, m: int) -> list[Vec]:
    """Chunk times; DualPipe-V needs ``m >= 2p`` anyway."""
    n = 2 * m
    return [
        (n + 2 * p - 2, n, n - 2 * p + 2, 4 * (p - 1)),
        (n + 2 * p - 2, n - p + 1, n - p + 1, 3 * (p - 1)),
        (n + p - 1, n + p - 1, n - p + 1, 4 * (p - 1)),
        (n + p - 1, n, n, 3 * (p - 1)),
        (n + p - 2, n + p - 1, n - 2 * p + 2, 6 * (p - 1)),
        (n - 1, n + 2 * p - 2, n - p + 1, 6 * (p - 1)),
        (n - 1, n + p - 1, n, 5 * (p - 1)),
    ]


def chimera_forms(p: int, m: int) -> list[Vec]:
    """Full backward (I and W share a coefficient); ``c = 0`` only; ``m = kp``."""
    k, h = m // p, p // 2
    a, b = (3 * h - 1) * k + h - 1, (h + 1) * k + h - 1
    if k == 1:
        return [(a, b, b, 0), (p, 2 * p - 2, 2 * p - 2, 0)]
    q = h // 2
    up = (2 * p - 2) * k
    return [(a, b, b, 0), (2 * k + p - 2 + q, up - q, up - q, 0), (2 * k + p - 3, up, up, 0)]


def _sync_uniform(name: str, p: int, m: int, v: int, f: float, b: float, w: float, c: float) -> float | None:
    """Closed-form step time for equal stage times, or None where no formula is known to hold."""
    if name == "gpipe":
        return gpipe_time(p, m, v, f, b, w, c)
    if name == "1f1b":
        return one_f_one_b_time(p, m, f, b, w, c)
    if name == "interleaved-1f1b":
        return interleaved_time(p, m, v, f, b, w, c)
    small_c = c <= min(f, b, w) / 2
    forms: list[Vec] | None = None
    if name == "zb-h1":
        forms = zb_h1_forms(p, m, c_free=(c == 0))
        small_c = True
    elif name == "zb-h2":
        forms = zb_h2_forms(p, m)
    elif name == "zb-v":
        forms = zb_v_forms(p, m)
    elif name == "dualpipe-v":
        forms = dualpipe_v_forms(p, m)
    elif name == "chimera":
        forms, small_c = chimera_forms(p, m), c == 0
    if forms is None or not small_c:
        return None
    return _best(forms, f, b, w, c)


def async_cycle_time(name: str, totals: Sequence[float], c: float) -> float:
    """Steady-state seconds per micro-batch: the largest mean over the pipeline's cycles.

    A cycle goes down from device ``i`` to ``j`` with the forward and back with the backward, then
    closes through device ``i``'s order. 1F1B order (PipeDream, 2BW) holds ``p - i`` micro-batches on
    device ``i``, so the cycle spans ``j - i + 1`` of them; Pipelined Backprop holds ``2(p-1-i) + 1``,
    so it spans ``2(j - i) + 1``.
    """
    deep = name in ("pipelined-backprop", "pipemare")
    best = 0.0
    for i in range(len(totals)):
        work = 0.0
        for j in range(i, len(totals)):
            work += totals[j]
            tokens = 2 * (j - i) + 1 if deep else j - i + 1
            best = max(best, (work + 2 * (j - i) * c) / tokens)
    return best


def estimate(
    name: str,
    *,
    p: int,
    m: int,
    v: int = 1,
    fwd_s: float | Sequence[float],
    bwd_input_s: float | Sequence[float],
    bwd_weight_s: float | Sequence[float],
    p2p_s: float = 0.0,
) -> SimResult:
    """Like :func:`~planner.schedules.simulate` but without a timeline, fast (see the module docstring).

    Equals ``simulate`` for equal stage times (tested over a grid of p, m, v, times and p2p);
    ``exact=False`` marks an upper bound. ``overlapped_step_time_s`` is only measured by ``simulate``
    (here it is None for synchronous schedules).
    """
    info, fwd, bwd_in, bwd_w, c = _checked(name, p, m, v, fwd_s, bwd_input_s, bwd_weight_s, p2p_s)
    work = m * (sum(fwd) + sum(bwd_in) + sum(bwd_w))
    step, exact = _step(info.name, info.synchronous, p, m, v, fwd, bwd_in, bwd_w, c)
    overlapped = None if info.synchronous else step
    bubble = max(0.0, 1.0 - work / (p * step)) if step > 0 else 0.0
    stale = tuple(_staleness(info.name, p, m, d) for d in range(p))
    return SimResult(
        schedule=info.name,
        p=p,
        m=m,
        v=v,
        synchronous=info.synchronous,
        step_time_s=step,
        bubble_fraction=bubble,
        overlapped_step_time_s=overlapped,
        overlapped_bubble_fraction=bubble if overlapped is not None else None,
        peak_in_flight=tuple(_in_flight(info.name, p, m, v, d) for d in range(p)),
        weight_versions=tuple(_weight_versions(info.name, p, d) for d in range(p)),
        staleness=stale,
        max_staleness=max(stale),
        exact=exact,
    )


def step_time(
    name: str,
    *,
    p: int,
    m: int,
    v: int = 1,
    fwd_s: float | Sequence[float],
    bwd_input_s: float | Sequence[float],
    bwd_weight_s: float | Sequence[float],
    p2p_s: float = 0.0,
) -> float:
    """``estimate(...).step_time_s`` alone (same checks, same number), without building the rest of
    the :class:`SimResult` (in-flight counts, staleness): the cost model asks it for the step
    without p2p of every configuration it prices."""
    info, fwd, bwd_in, bwd_w, c = _checked(name, p, m, v, fwd_s, bwd_input_s, bwd_weight_s, p2p_s)
    return _step(info.name, info.synchronous, p, m, v, fwd, bwd_in, bwd_w, c)[0]


def _checked(name, p, m, v, fwd_s, bwd_input_s, bwd_weight_s, p2p_s):
    """Validate ``estimate``'s arguments; returns the schedule, the per-stage tuples and the hop."""
    info = get_schedule(name)
    info.validate(p, m, v)
    count = p * v
    fwd = stage_times(fwd_s, count, "fwd_s", positive=True)
    bwd_in = stage_times(bwd_input_s, count, "bwd_input_s", positive=False)
    bwd_w = stage_times(bwd_weight_s, count, "bwd_weight_s", positive=False)
    (c,) = stage_times(p2p_s, 1, "p2p_s", positive=False)
    if p == 1:
        c = 0.0  # no hop between devices
    return info, fwd, bwd_in, bwd_w, c


def _step(name, synchronous, p, m, v, fwd, bwd_in, bwd_w, c) -> tuple[float, bool]:
    """(step time, exact?) of validated inputs, synchronous or asynchronous."""
    if synchronous:
        return _sync_step(name, p, m, v, fwd, bwd_in, bwd_w, c)
    totals = [fwd[k] + bwd_in[k] + bwd_w[k] for k in range(len(fwd))]
    return m * async_cycle_time(name, totals, c), True


def _sync_step(name, p, m, v, fwd, bwd_in, bwd_w, c) -> tuple[float, bool]:
    """(step time, exact?) for a synchronous schedule; see the module docstring for the tiers."""
    uniform = len(set(fwd)) == 1 and len(set(bwd_in)) == 1 and len(set(bwd_w)) == 1
    if uniform:
        value = _sync_uniform(name, p, m, v, fwd[0], bwd_in[0], bwd_w[0], c)
        if value is not None:
            return value, True
    elif name == "gpipe" and v == 1:
        full = [b + w for b, w in zip(bwd_in, bwd_w)]
        return sum(fwd) + sum(full) + 2 * (p - 1) * c + (m - 1) * (max(fwd) + max(full)), True
    exact_prog = compiled.compiled(name, p, m, v) if _actions(name, p, m, v) <= EXACT_MAX_ACTIONS else None
    if exact_prog is not None:
        return compiled.makespan(exact_prog, fwd, bwd_in, bwd_w, c), True
    value = device_balanced_time(name, p, m, v, fwd, bwd_in, bwd_w, c)
    if value is None:  # a shape no formula covers (e.g. ZB-V with m < 2p - 1): time it, however long
        return compiled.makespan(compiled.compiled(name, p, m, v), fwd, bwd_in, bwd_w, c), True
    return value, False


def device_balanced_time(name: str, p: int, m: int, v: int, fwd: Sequence[float], bwd_in: Sequence[float],
                         bwd_w: Sequence[float], c: float) -> float | None:
    """Step time of unequal chunks too many to time exactly: the busiest device's work plus the
    schedule's bubble at the mean chunk times.

    With equal chunks this is the closed form itself (work ``m·v·(F+I+W)`` plus its bubble). With
    unequal ones a device does its own chunks' work whatever the others do, and the fill and drain
    pass through chunks of every size, so the bubble is the one of the average chunk. Charging every
    chunk the slowest one's times instead (an upper bound) gave interleaved 1F1B with a heavy head
    chunk many times Megatron's ``(p-1)/(v·m)`` bubble. Against the exact timing of small programs
    (``tests/schedules``) it is within a few per cent in the median and about 15% at worst.
    """
    n = len(fwd)
    f, b, w = sum(fwd) / n, sum(bwd_in) / n, sum(bwd_w) / n
    uniform = _sync_uniform(name, p, m, v, f, b, w, c)
    if uniform is None:
        uniform = _sync_uniform(name, p, m, v, f + c, b + c, w, 0.0)
    if uniform is None:
        return None
    per_device = [0.0] * p
    for j, d in enumerate(chunk_devices(name, p, v)):
        per_device[d] += m * (fwd[j] + bwd_in[j] + bwd_w[j])
    return uniform - m * v * (f + b + w) + max(per_device)


def _actions(name: str, p: int, m: int, v: int) -> int:
    per = 3 if get_schedule(name).splits_backward else 2
    return per * p * v * m


def in_flight(name: str, *, p: int, m: int, v: int = 1, device: int) -> float:
    """Peak micro-batches whose activations ``device`` holds, in full-stage units (closed form).

    A chunk of ``1/v`` of a stage counts ``1/v``; asynchronous schedules are in steady state. Equals
    ``simulate(...).peak_in_flight[device]`` (tested), which only depends on the action order.
    """
    get_schedule(name).validate(p, m, v)
    _check_device(device, p)
    return _in_flight(name, p, m, v, device)


@functools.lru_cache(maxsize=4096)
def in_flight_per_device(name: str, *, p: int, m: int, v: int = 1) -> tuple[float, ...]:
    """:func:`in_flight` of every device ``0..p-1``, validated once and memoised: the cost model asks
    for it with every configuration it prices, and it depends only on (schedule, p, m, v)."""
    get_schedule(name).validate(p, m, v)
    return tuple(_in_flight(name, p, m, v, d) for d in range(p))


def weight_versions(name: str, *, p: int, m: int, v: int = 1, device: int) -> int:
    """Parameter copies of one stage that ``device`` holds (stashed versions, double buffer, replica)."""
    get_schedule(name).validate(p, m, v)
    _check_device(device, p)
    return _weight_versions(name, p, device)


def staleness(name: str, *, p: int, m: int, v: int = 1, device: int) -> int:
    """Most optimizer updates missing from the weights a forward on ``device`` reads, vs. plain SGD."""
    get_schedule(name).validate(p, m, v)
    _check_device(device, p)
    return _staleness(name, p, m, device)


def _in_flight(name: str, p: int, m: int, v: int, d: int) -> float:
    if name == "gpipe":
        return float(m)
    if name == "1f1b":
        return float(min(p - d, m))
    if name in ("pipedream", "pipedream-2bw"):
        return float(p - d)
    if name == "interleaved-1f1b":
        return min(2 * (p - 1 - d) + (v - 1) * p + 1, m * v) / v
    if name in ("pipelined-backprop", "pipemare"):
        return float(2 * (p - 1 - d) + 1)
    if name == "zb-h1":
        return float(min(p, m))
    if name == "zb-h2":
        return float(min(2 * p - 1, m))
    if name == "chimera":
        return float(p if m >= 2 * p else p // 2 + 1 + min(d, p - 1 - d))
    if name == "zb-v":
        return min(float(p), float(m), (m + d + 1) / 2)
    if name == "dualpipe-v":
        return p + 0.5
    raise AssertionError(name)


def _weight_versions(name: str, p: int, d: int) -> int:
    if name == "pipedream":
        return p - d
    if name in ("pipedream-2bw", "chimera"):
        return 2
    return 1


def _staleness(name: str, p: int, m: int, d: int) -> int:
    delay = 2 * (p - 1 - d)
    if name == "pipedream":
        return p - 1 - d
    if name == "pipedream-2bw":
        return 1
    if name == "pipelined-backprop":
        return delay
    if name == "pipemare":
        return math.ceil(delay / m)
    return 0


def _check_device(device: int, p: int) -> None:
    if isinstance(device, bool) or not isinstance(device, int) or not 0 <= device < p:
        raise ValueError(f"device: got {device!r}; expected an integer in [0, p={p})")
