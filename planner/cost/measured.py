"""Measured curves of the user's cluster, interpolated: collective bus bandwidth and GEMM FLOP/s.

**Collectives** (nccl-tests conventions; ``S`` the full buffer, ``n`` the ranks of the group)::

    all-reduce                          t = 2(n−1)/n · S / busbw
    all-gather, reduce-scatter,         t =  (n−1)/n · S / busbw
    all-to-all
    send/recv                           t =            S / busbw

``busbw(N, S)`` is interpolated piecewise-linearly in ``(log N, log S)`` between the measured
points: along ``log S`` on the curves of the two measured node counts that bracket ``N``, then
along ``log N`` between them. It is exact at a measured point and monotone between neighbours.
Past the largest measured message a curve stays on its last value (bus bandwidth plateaus
once a message fills NCCL's pipeline, and a multi-GB gradient all-reduce is many buckets back to
back). A query outside the measured node counts, or below the smallest message of either
bracketing curve, has no measured answer (``None``): the caller falls back to the alpha-beta
links and says so (:func:`planner.cost.comm.measured_notes`). Below the smallest message the curve
still bounds it: bus bandwidth only rises with the message size up to its plateau, so the smallest
measured size's is a ceiling (:meth:`CollectiveTable.ceiling_below_range`), and the alpha-beta time is
never taken faster than that.

The curves describe whole nodes: every device of each node takes part. How a smaller group maps
onto them is :func:`planner.cost.comm.measured_time_s`'s business (docs/cluster.md).

**GEMMs**: a measured point gives the efficiency ``flops_per_s / peak`` at its shape. A query
shape takes the formula's efficiency (:func:`planner.cost.compute.gemm_efficiency`) times the
measured-over-formula ratio of the measured points of its dtype within a factor
``GEMM_REACH`` in every dimension, weighted by inverse squared log distance (exactly the
measured value at a measured shape). Farther from every point it is not covered: the formula alone.

Tables are built once per measurement (the cluster is frozen) and cached by value.
"""

from __future__ import annotations

import bisect
import functools
import math
from dataclasses import dataclass

from planner.cluster import GemmPoint, MeasuredCollectives
from planner.cost.constants import CostConstants

# A GEMM is covered by a measured point within this factor in each of m, n and k.
GEMM_REACH = 2.0


@dataclass(frozen=True)
class _Curve:
    """One node count's measured curve: ascending ``log S`` and their ``log busbw``."""

    log_sizes: tuple[float, ...]
    log_busbw: tuple[float, ...]
    sizes: tuple[float, ...]  # the measured message sizes (bytes), ascending: for notes

    def at(self, log_size: float) -> float | None:
        xs = self.log_sizes
        if log_size > xs[-1]:
            # Past the largest measured message the bus bandwidth stays on its plateau: nccl-tests
            # curves flatten once a message fills the pipeline (a few hundred MB), and a gradient
            # all-reduce of several GB is many such messages (buckets) back to back.
            return self.log_busbw[-1]
        if log_size < xs[0]:
            return None
        i = bisect.bisect_left(xs, log_size)
        if xs[i] == log_size:
            return self.log_busbw[i]
        x0, x1, y0, y1 = xs[i - 1], xs[i], self.log_busbw[i - 1], self.log_busbw[i]
        return y0 + (y1 - y0) * (log_size - x0) / (x1 - x0)


@dataclass(frozen=True)
class CollectiveTable:
    """Per node count, the curve of one collective; ``nodes`` ascending."""

    nodes: tuple[int, ...]
    curves: tuple[_Curve, ...]

    def bus_bandwidth(self, nodes: float, message_bytes: float) -> float | None:
        """Interpolated bus bandwidth (bytes/s), or ``None`` outside the measured range."""
        if not self.nodes or message_bytes <= 0 or not self.nodes[0] <= nodes <= self.nodes[-1]:
            return None
        log_s = math.log(message_bytes)
        i = bisect.bisect_left(self.nodes, nodes)
        if self.nodes[i] == nodes:
            y = self.curves[i].at(log_s)
            return None if y is None else math.exp(y)
        y0, y1 = self.curves[i - 1].at(log_s), self.curves[i].at(log_s)
        if y0 is None or y1 is None:
            return None
        n0, n1 = math.log(self.nodes[i - 1]), math.log(self.nodes[i])
        return math.exp(y0 + (y1 - y0) * (math.log(nodes) - n0) / (n1 - n0))

    def ceiling_below_range(self, nodes: float, message_bytes: float) -> float | None:
        """For a message smaller than every size measured at ``nodes`` (where :meth:`bus_bandwidth` has no
        answer), the bus bandwidth of the smallest size the bracketing curves both measured: a ceiling,
        since bus bandwidth only rises with the message up to its plateau. ``None`` at node counts
        outside the measured ones, or for a message inside the curves' range."""
        if not self.nodes or message_bytes <= 0 or not self.nodes[0] <= nodes <= self.nodes[-1]:
            return None
        i = bisect.bisect_left(self.nodes, nodes)
        curves = [self.curves[i]] if self.nodes[i] == nodes else [self.curves[i - 1], self.curves[i]]
        smallest = max(c.sizes[0] for c in curves)
        return self.bus_bandwidth(nodes, smallest) if message_bytes < smallest else None

    def describe(self) -> str:
        """The measured range, for a fallback note: ``nodes 1-4, 4 KiB-1 GiB``."""
        if not self.nodes:
            return "not measured"
        lo = min(c.sizes[0] for c in self.curves)
        hi = max(c.sizes[-1] for c in self.curves)
        span = f"{self.nodes[0]}" if self.nodes[0] == self.nodes[-1] else f"{self.nodes[0]}-{self.nodes[-1]}"
        return f"nodes {span}, {format_bytes(lo)}-{format_bytes(hi)}"


def format_bytes(x: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if x >= size:
            return f"{x / size:.3g} {unit}"
    return f"{x:.0f} B"


@functools.lru_cache(maxsize=64)
def collective_tables(measured: MeasuredCollectives) -> dict[str, CollectiveTable]:
    """One :class:`CollectiveTable` per collective (empty ones for collectives not measured)."""
    out = {}
    for name in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv"):
        by_nodes: dict[int, list[tuple[float, float]]] = {}
        for p in measured.points(name):
            by_nodes.setdefault(p.nodes, []).append((float(p.message_bytes), float(p.bus_bandwidth_bytes_per_s)))
        nodes = tuple(sorted(by_nodes))
        curves = []
        for k in nodes:
            pts = sorted(by_nodes[k])
            curves.append(_Curve(tuple(math.log(s) for s, _ in pts), tuple(math.log(b) for _, b in pts),
                                 tuple(s for s, _ in pts)))
        out[name] = CollectiveTable(nodes=nodes, curves=tuple(curves))
    return out


def bus_bandwidth(measured: MeasuredCollectives, collective: str, nodes: float, message_bytes: float) -> float | None:
    """Measured bus bandwidth of ``collective`` on ``nodes`` whole nodes at ``message_bytes``, or ``None``."""
    return collective_tables(measured)[collective].bus_bandwidth(nodes, message_bytes)


@dataclass(frozen=True)
class GemmTable:
    """Measured GEMM points of one dtype, in log space, with their measured/formula ratio."""

    log_shapes: tuple[tuple[float, float, float], ...]
    log_ratio: tuple[float, ...]

    def correction(self, m: float, n: float, k: float) -> float | None:
        """The measured/formula efficiency ratio at ``(m, n, k)``, or ``None`` when no point is near."""
        q = (math.log(m), math.log(n), math.log(k))
        reach = math.log(GEMM_REACH) + 1e-9  # inclusive: exactly twice a measured dim is covered
        weight_sum = acc = 0.0
        for shape, log_r in zip(self.log_shapes, self.log_ratio):
            d = [abs(a - b) for a, b in zip(q, shape)]
            if max(d) > reach:
                continue
            dist2 = sum(x * x for x in d)
            if dist2 == 0.0:
                return math.exp(log_r)
            weight_sum += 1.0 / dist2
            acc += log_r / dist2
        return math.exp(acc / weight_sum) if weight_sum > 0 else None


@functools.lru_cache(maxsize=64)
def gemm_tables(points: tuple[GemmPoint, ...], peaks: tuple[tuple[str, float], ...],
                c: CostConstants) -> dict[str, GemmTable]:
    """Per dtype, the measured points with ``log(measured efficiency / formula efficiency)``.

    ``peaks`` is the device's ``peak_flops`` items; the formula is
    :func:`planner.cost.compute.gemm_efficiency` with ``c``.
    """
    from planner.cost.compute import gemm_efficiency  # compute.py imports this module

    peak = dict(peaks)
    shapes: dict[str, list] = {}
    for p in points:
        device_peak = peak.get(p.dtype, peak.get("fp32") if p.dtype == "tf32" else None)
        if not device_peak:
            continue  # the device lists no peak for this dtype: nothing to scale
        eff = p.flops_per_s / device_peak
        shapes.setdefault(p.dtype, []).append(((math.log(p.m), math.log(p.n), math.log(p.k)),
                                               math.log(eff / gemm_efficiency(p.m, p.n, p.k, c))))
    return {dt: GemmTable(tuple(s for s, _ in v), tuple(r for _, r in v)) for dt, v in shapes.items()}
