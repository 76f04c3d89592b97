"""Is a cluster file's figure plausible, and how was it read?

A cluster file in the wrong unit loads without complaint: ``"bf16": 312`` is a device of 312 FLOP/s,
``"memory_bytes": 40`` a device of 40 bytes, ``"latency_s": 30`` a link of 30 seconds. The planner
then answers with confidence (a step of 8.9e11 s, "about -64 nodes"). :data:`RANGES` says which
values real hardware takes; a value outside its range is an error that names the likely unit slip
(:func:`findings`), unless the caller accepts exotic hardware (``strict=False``; the CLI's
``--i-know``), when it is a warning. A value inside its range that contradicts another (a network
faster per device than NVLink, a GEMM above the device's peak) is a warning only.

:func:`echo` says how the file was read, in the units people write (TFLOP/s, GiB, GB/s, µs), so a
slip inside the ranges (``100e9`` meant as 100 Gb/s) shows on the screen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from planner.cluster import ClusterSpec, NodeGroup

GiB = 2**30


@dataclass(frozen=True)
class Range:
    """Plausible values ``[low, high]`` of one kind of figure, and the units people slip into."""

    low: float
    high: float
    unit: str
    typical: float  # the centre the unit guess aims at (log scale)
    shown: str  # the range as people read it
    # (unit name, factor, exponent): value x factor is the figure in this field's unit, written as
    # a mantissa and that power of ten (None: as value * 2**k, for binary sizes)
    slips: tuple[tuple[str, float, int | None], ...] = ()


# Plausible ranges, one table. Where they come from: dense peaks of shipping devices run from one CPU
# process (cpu-local: 40 GFLOP/s; a slow core ~1e9) to B200's 4.5 PFLOP/s fp8 (2e16 leaves room for
# the next generation); device memory from 1 GiB (the cpu-local process has 4 GiB) to 1 TiB (B200:
# 192 GB); memory bandwidth from a CPU's DRAM share (1e9) to HBM3e (8e12); links from gigabit
# Ethernet (1.25e8 B/s) to 10 TB/s (NVLink 5 is 0.9e12 per GPU, 8 x 800 Gb/s NICs 8e11 per node);
# latency from 0.1 µs (NVLink, shared memory) to 10 ms (a slow TCP path; 0 means an ideal link);
# measured bus bandwidth down to 10 kB/s (small gloo messages on a CPU); GEMMs down to 1 MFLOP/s
# (tiny shapes on a CPU); a cluster of up to 100,000 nodes of up to 1,024 devices (processes).
_TERA, _GIGA, _PETA = ("TFLOP/s", 1e12, 12), ("GFLOP/s", 1e9, 9), ("PFLOP/s", 1e15, 15)
_GB, _Gb = ("GB/s", 1e9, 9), ("Gb/s", 1.25e8, 9)
RANGES: dict[str, Range] = {
    "peak_flops": Range(1e9, 2e16, "FLOP/s", 1e14, "1 GFLOP/s..20 PFLOP/s", (_TERA, _GIGA, _PETA)),
    "gemm_flops": Range(1e6, 2e16, "FLOP/s", 1e14, "1 MFLOP/s..20 PFLOP/s", (_TERA, _GIGA)),
    "memory_bytes": Range(GiB, 2**40, "bytes", 32 * GiB, "1 GiB..1 TiB",
                          (("GiB", 2**30, None), ("MiB", 2**20, None), ("KiB", 2**10, None))),
    "memory_bandwidth": Range(1e9, 1e14, "B/s", 1e12, "1 GB/s..100 TB/s", (("TB/s", 1e12, 12), _GB)),
    "link_bandwidth": Range(1e8, 1e13, "B/s", 1e11, "0.1 GB/s..10 TB/s", (_GB, _Gb)),
    "latency": Range(1e-7, 1e-2, "s", 5e-6, "0.1 µs..10 ms, or 0",
                     (("µs", 1e-6, -6), ("ms", 1e-3, -3), ("ns", 1e-9, -9))),
    "bus_bandwidth": Range(1e4, 1e13, "B/s", 1e11, "10 kB/s..10 TB/s", (_GB, _Gb)),
    "message_bytes": Range(1, 2**40, "bytes", 2**20, "1 byte..1 TiB"),
    # a GEMM dimension: A100 96, H100 185 (the roofline ridge scaled); past 64K every GEMM would be "thin"
    "gemm_dim": Range(1, 65536, "elements", 96, "1..65536"),
    "nodes": Range(1, 100_000, "nodes", 16, "1..100000"),
    "devices_per_node": Range(1, 1024, "devices", 8, "1..1024"),
}
NIC_PER_DEVICE_MAX = 100e9  # 800 Gb/s (one ConnectX-8 per GPU): a per-device network share above it is suspicious


@dataclass(frozen=True)
class Finding:
    """One implausible (``error``) or suspicious (warning) figure: the field, its value, what to do."""

    field: str
    value: float
    message: str
    error: bool


def _g(x: float) -> str:
    return f"{x:g}"


def _written(value: float, factor: float, exponent: int | None) -> str:
    if exponent is None:
        return f"{_g(value)} * 2**{int(math.log2(factor))} = {int(value * factor)}"
    return f"{_g(value * factor / 10**exponent)}e{exponent}"


def slip_hint(kind: str, value: float) -> str:
    """Why ``value`` is out of ``RANGES[kind]`` and, where one unit slip explains it, how to write it."""
    r = RANGES[kind]
    bounds = f"plausible: {r.shown}; pass --i-know (strict=False) for exotic hardware"
    fits = [(abs(math.log10(value * f / r.typical)), name, f, e) for name, f, e in r.slips
            if value > 0 and r.low <= value * f <= r.high]
    if kind in ("link_bandwidth", "bus_bandwidth"):
        fits = fits[:1]  # bytes first (GB/s); the Gb/s reading is offered beside it
    if fits:
        _, name, f, e = min(fits)
        also = ""
        if name == "GB/s" and kind in ("link_bandwidth", "bus_bandwidth"):
            also = f" (if it is Gb/s: {_written(value, 1.25e8, 9)})"
        return f"{_g(value)} {r.unit} looks like {name}: write {_written(value, f, e)}{also} ({bounds})"
    side = "below the smallest" if value < r.low else "above the largest"
    return f"{_g(value)} {r.unit} is {side} plausible value ({bounds})"


def _check(out: list[Finding], kind: str, field: str, value: float, *, zero_ok: bool = False) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return  # the loader's type checks answer these
    if zero_ok and value == 0:
        return
    r = RANGES[kind]
    if value < r.low or value > r.high:
        out.append(Finding(field, value, slip_hint(kind, value), error=True))


def group_findings(g: NodeGroup, prefix: str = "") -> list[Finding]:
    """Every implausible or suspicious figure of one node group, errors first."""
    out: list[Finding] = []
    dev = g.device
    for dtype, peak in sorted(dev.peak_flops.items()):
        _check(out, "peak_flops", f"{prefix}device.peak_flops.{dtype}", peak)
    _check(out, "memory_bytes", f"{prefix}device.memory_bytes", dev.memory_bytes)
    _check(out, "memory_bandwidth", f"{prefix}device.memory_bandwidth_bytes_per_s", dev.memory_bandwidth_bytes_per_s)
    if dev.gemm_half_efficiency_dim is not None:
        _check(out, "gemm_dim", f"{prefix}device.gemm_half_efficiency_dim", dev.gemm_half_efficiency_dim)
    _check(out, "nodes", f"{prefix}nodes", g.nodes)
    _check(out, "devices_per_node", f"{prefix}devices_per_node", g.devices_per_node)
    for side in ("intra_node", "inter_node"):
        link = getattr(g, side)
        _check(out, "link_bandwidth", f"{prefix}{side}.bandwidth_bytes_per_s", link.bandwidth_bytes_per_s)
        _check(out, "latency", f"{prefix}{side}.latency_s", link.latency_s, zero_ok=True)
    if g.collectives is not None:
        from planner.cluster import COLLECTIVES

        for name in COLLECTIVES:
            for i, p in enumerate(g.collectives.points(name)):
                where = f"{prefix}collectives.{name}[{i}]."
                _check(out, "bus_bandwidth", f"{where}bus_bandwidth_bytes_per_s", p.bus_bandwidth_bytes_per_s)
                _check(out, "message_bytes", f"{where}message_bytes", p.message_bytes)
    for i, p in enumerate(g.gemm or ()):
        _check(out, "gemm_flops", f"{prefix}gemm[{i}].flops_per_s", p.flops_per_s)
        peak = dev.peak_flops.get(p.dtype)
        if peak and p.flops_per_s > 1.05 * peak:
            out.append(Finding(f"{prefix}gemm[{i}].flops_per_s", p.flops_per_s,
                               f"achieved {_g(p.flops_per_s)} FLOP/s is above the device's {p.dtype} peak "
                               f"{_g(peak)}; check both are FLOP/s", error=False))
    per_device = g.inter_node.bandwidth_bytes_per_s / g.devices_per_node
    if g.devices_per_node > 1 and per_device > g.intra_node.bandwidth_bytes_per_s:
        out.append(Finding(f"{prefix}inter_node.bandwidth_bytes_per_s", g.inter_node.bandwidth_bytes_per_s,
                           f"each device's network share ({_g(per_device / 1e9)} GB/s) is above its intra-node "
                           f"link ({_g(g.intra_node.bandwidth_bytes_per_s / 1e9)} GB/s); inter_node is the whole "
                           "node's bandwidth in bytes/s (100 Gb/s = 12.5e9)", error=False))
    elif per_device > NIC_PER_DEVICE_MAX:
        out.append(Finding(f"{prefix}inter_node.bandwidth_bytes_per_s", g.inter_node.bandwidth_bytes_per_s,
                           f"{_g(per_device / 1e9)} GB/s of network per device is more than an 800 Gb/s NIC; "
                           "if the figure is in Gb/s, divide by 8 (100 Gb/s = 12.5e9 B/s)", error=False))
    return sorted(out, key=lambda f: not f.error)


def findings(spec: ClusterSpec) -> list[Finding]:
    """:func:`group_findings` of every node group (``groups[i].`` prefixes on a mixed cluster), errors first."""
    out: list[Finding] = []
    for i, g in enumerate(spec.groups):
        out += group_findings(g, "" if spec.is_homogeneous else f"groups[{i}].")
    return sorted(out, key=lambda f: not f.error)


def _flops(x: float) -> str:
    for scale, unit in ((1e15, "PFLOP/s"), (1e12, "TFLOP/s"), (1e9, "GFLOP/s")):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g} FLOP/s"


def _rate(x: float) -> str:
    for scale, unit in ((1e12, "TB/s"), (1e9, "GB/s"), (1e6, "MB/s")):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g} B/s"


def _seconds(x: float) -> str:
    return f"{x * 1e6:.3g} µs" if x < 1e-3 else f"{x * 1e3:.3g} ms" if x < 1 else f"{x:.3g} s"


def _size(x: float) -> str:
    return f"{x / GiB:.1f} GiB" if x >= 0.1 * GiB else f"{x / 2**20:.1f} MiB" if x >= 2**19 else f"{x:.0f} bytes"


def echo(spec: ClusterSpec) -> list[str]:
    """The cluster as read, in human units: two lines per node group (device; links). The warnings
    of :func:`findings` are the loader's (:meth:`ClusterSpec.check_plausible`), not repeated here."""
    lines = []
    for g in spec.groups:
        dev = g.device
        peaks = sorted(dev.peak_flops.items(), key=lambda kv: -kv[1])
        train = next((d for d in ("bf16", "fp16", "fp32") if d in dev.peak_flops), peaks[0][0])
        rest = [f"{_flops(v)} {k}" for k, v in peaks if k == "fp32" != train]
        inter = g.inter_node.bandwidth_bytes_per_s
        measured = ", ".join(g.measured_dict())
        lines.append(f"{g.nodes} node{'s' if g.nodes != 1 else ''} x {g.devices_per_node} {dev.name}: "
                     f"{_flops(dev.peak_flops[train])} {train}" + (f" ({', '.join(rest)})" if rest else "")
                     + f", {_size(dev.memory_bytes)} at {_rate(dev.memory_bandwidth_bytes_per_s)}"
                     + (f"; measured {measured}" if measured else ""))
        lines.append(f"  {g.intra_node.kind} {_rate(g.intra_node.bandwidth_bytes_per_s)} per device, "
                     f"{_seconds(g.intra_node.latency_s)}; {g.inter_node.kind} {_rate(inter)} per node "
                     f"= {inter * 8 / 1e9:.4g} Gb/s ({_rate(inter / g.devices_per_node)} per device), "
                     f"{_seconds(g.inter_node.latency_s)}")
    return lines


class PlausibilityWarning(UserWarning):
    """A cluster figure accepted although implausible (``strict=False``) or suspicious."""
