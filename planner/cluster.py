"""The cluster a plan targets: devices, how many per node, and the links between them.

A cluster is one or more *node groups*; each group is a set of identical nodes (same device,
same count per node, same intra-node link and network interface). Most clusters have one
group; a mixed A100 + V100 cluster has two. Ranks are numbered group by group, node by node,
so rank ``r`` lives on node ``r // devices_per_node`` of a homogeneous cluster.

Units are in the field names: bytes, bytes per second, seconds, FLOP/s. Bandwidths are
unidirectional. ``intra_node.bandwidth_bytes_per_s`` is what one device can send to the others
in its node (NVLink/NVSwitch); ``inter_node.bandwidth_bytes_per_s`` is the whole node's
network injection bandwidth (all NICs together), shared by the devices of that node.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from planner.errors import SpecError, each_error, raise_all, read_json_file
from planner.paths import datasets_dir, schema_path
from planner.plausible import Finding, PlausibilityWarning, echo, findings
from planner.units import plural

DTYPES = ("fp32", "tf32", "fp16", "bf16", "fp8")
MEASURED_FIELDS = ("collectives", "gemm", "memory")  # optional, per node group (docs/cluster.md)
LINK_KINDS = ("nvlink", "nvswitch", "pcie", "infiniband", "ethernet", "roce", "shm", "loopback")


def _is_positive(value: Any, *, integer: bool = False) -> bool:
    """A finite number > 0 (a whole one where ``integer``); a bool is not a number here."""
    ok_type = (int,) if integer else (int, float)
    return not isinstance(value, bool) and isinstance(value, ok_type) and math.isfinite(value) and value > 0


def _positive(value: Any, field_name: str, fix: str, source: str | None, *, integer: bool = False) -> Any:
    if not _is_positive(value, integer=integer):
        kind = "a positive integer" if integer else "a positive number"
        raise SpecError(field_name, value, f"expected {kind}; {fix}", source=source)
    return value


def _known_keys(d: dict, allowed: set[str], prefix: str, source: str | None) -> None:
    """Every key of ``d`` outside ``allowed`` is an error naming the closest allowed one (all at once)."""
    _Fields(d, allowed, prefix, source).done()


class _Fields:
    """The fields of one JSON object, read together so that every bad one is reported (:meth:`done`).

    A cluster file with a negative bandwidth, zero devices per node and a peak given as a string gets
    three errors in one run, not one per run (docs/cluster.md). Unknown keys come first; a required field
    missing beside an unknown key that is its likely misspelling is not reported again (the unknown
    key's error names it)."""

    def __init__(self, d: dict, allowed: set[str], prefix: str, source: str | None) -> None:
        self.d, self.prefix, self.source = d, prefix, source
        self.errors: list[SpecError] = []
        self.misspelt: set[str] = set()
        for key in d:
            if key not in allowed:
                close = sorted(allowed, key=lambda a: _edit_distance(a, key))[0]
                self.misspelt.add(close)
                self.errors.append(SpecError(f"{prefix}{key}", d[key], f"unknown field; did you mean '{close}'? "
                                             f"Allowed: {sorted(allowed)}", source=source))

    def get(self, key: str, read: Callable[[Any, str], Any], *, required: bool = True) -> Any:
        """``read(value, field)`` of ``key``, its errors recorded; None where it is absent or bad."""
        if key not in self.d:
            if required and key not in self.misspelt:
                self.errors.append(SpecError(f"{self.prefix}{key}", None, "this field is required", source=self.source))
            return None
        return self.attempt(read, self.d[key], f"{self.prefix}{key}")

    def attempt(self, check: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``check(*args, **kwargs)``, its SpecError(s) recorded instead of raised; None when it failed."""
        try:
            return check(*args, **kwargs)
        except SpecError as exc:
            self.errors.extend(each_error(exc))
            return None

    def done(self) -> None:
        """Raise what was found: nothing, one :class:`SpecError`, or a :class:`SpecErrors`."""
        raise_all(self.errors)


def _checked(ok: Callable[[Any], bool], fix: str, source: str | None) -> Callable[[Any, str], Any]:
    """A reader for :meth:`_Fields.get`: the value where ``ok(value)``, else a SpecError saying ``fix``."""
    def read(value: Any, at: str) -> Any:
        if not ok(value):
            raise SpecError(at, value, fix, source=source)
        return value
    return read


def _positive_field(fix: str, source: str | None, *, integer: bool = False) -> Callable[[Any, str], Any]:
    """A reader for :meth:`_Fields.get`: :func:`_positive` of the value."""
    return lambda value, at: _positive(value, at, fix, source, integer=integer)


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def _edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _require(d: dict, key: str, prefix: str, source: str | None) -> Any:
    if key not in d:
        raise SpecError(f"{prefix}{key}", None, "this field is required", source=source)
    return d[key]


@dataclass(frozen=True, kw_only=True)
class DeviceSpec:
    """One accelerator: dense peak throughput per dtype, memory size and bandwidth."""

    name: str
    peak_flops: dict[str, float]
    memory_bytes: int
    memory_bandwidth_bytes_per_s: float
    # Sustained kernel efficiencies of this device, where they differ from the cost model's defaults
    # (``CostConstants.gemm_efficiency_max`` and ``fused_attention_efficiency``, set on A100s): the
    # fraction of the dtype's peak a large GEMM, and a fused attention kernel, keep up during training.
    # None: the constants' value. docs/cluster.md says where the presets' values come from.
    gemm_efficiency: float | None = None
    fused_attention_efficiency: float | None = None
    # The GEMM dimension at which a GEMM keeps half of ``gemm_efficiency`` in that dimension
    # (``CostConstants.gemm_half_efficiency_dim``, 96, set on A100s). A dimension that short runs near
    # the roofline's ridge, so it grows with the device's peak over its memory bandwidth. None: 96.
    gemm_half_efficiency_dim: float | None = None
    # Sustained fraction of peak of named attention kernels that differ from the FlashAttention-2 class
    # ``fused_attention_efficiency`` describes, e.g. ``{"cudnn": 0.39}`` on the H100: the kernel a trainer
    # runs (``CostConstants.attention_kernel``) replaces that figure where the device lists it.
    attention_kernels: dict[str, float] | None = None

    def attention_efficiency(self, kernel: str) -> float | None:
        """This device's sustained fraction of peak for the attention ``kernel``; None where it states none."""
        return (self.attention_kernels or {}).get(kernel) if kernel else None

    def peak(self, dtype: str) -> float:
        """Peak FLOP/s for ``dtype``; falls back to fp32 when the device lists no faster path."""
        if dtype in self.peak_flops:
            return self.peak_flops[dtype]
        if dtype == "tf32" and "fp32" in self.peak_flops:
            return self.peak_flops["fp32"]
        raise SpecError(
            f"device.peak_flops.{dtype}", None,
            f"device '{self.name}' lists no peak for {dtype}; add it or choose one of {sorted(self.peak_flops)}",
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "peak_flops": dict(sorted(self.peak_flops.items())),
            "memory_bytes": self.memory_bytes,
            "memory_bandwidth_bytes_per_s": self.memory_bandwidth_bytes_per_s,
            **{k: v for k in _DEVICE_OPTIONAL if (v := getattr(self, k)) is not None},
        }

    @classmethod
    def from_dict(cls, d: Any, *, prefix: str = "device.", source: str | None = None) -> DeviceSpec:
        if not isinstance(d, dict):
            raise SpecError(prefix.rstrip("."), d, "expected an object with name, peak_flops, memory_bytes, "
                            "memory_bandwidth_bytes_per_s", source=source)
        f = _Fields(d, {"name", "peak_flops", "memory_bytes", "memory_bandwidth_bytes_per_s", *_DEVICE_OPTIONAL},
                    prefix, source)
        name = f.get("name", _checked(lambda v: isinstance(v, str) and bool(v), "expected a non-empty string", source))
        peaks = f.get("peak_flops", lambda v, at: _peak_flops(v, at, source))
        mem = f.get("memory_bytes", _positive_field("bytes, e.g. 85899345920 for 80 GiB", source))
        bw = f.get("memory_bandwidth_bytes_per_s", _positive_field("bytes per second, e.g. 2.039e12", source))
        fraction = _checked(lambda v: _is_number(v) and 0 < v <= 1, "a fraction of the dtype's peak in (0, 1], "
                            "e.g. 0.6; leave it out to use the cost model's default", source)
        readers = {**{key: fraction for key in _DEVICE_EFFICIENCIES},
                   "gemm_half_efficiency_dim": _positive_field("elements, e.g. 185 for an H100; leave it out to use "
                                                               "the cost model's default (96, set on A100s)", source),
                   "attention_kernels": lambda v, at: _attention_kernels(v, at, source)}
        eff = {key: f.get(key, read) for key, read in readers.items() if d.get(key) is not None}  # null: not given
        f.done()
        eff = {k: v if k == "attention_kernels" else float(v) for k, v in eff.items()}
        return cls(name=name, peak_flops=peaks, memory_bytes=int(mem), memory_bandwidth_bytes_per_s=float(bw), **eff)


_DEVICE_EFFICIENCIES = ("gemm_efficiency", "fused_attention_efficiency")
_DEVICE_OPTIONAL = (*_DEVICE_EFFICIENCIES, "gemm_half_efficiency_dim", "attention_kernels")  # optional fields


def _peak_flops(value: Any, field: str, source: str | None) -> dict[str, float]:
    """A device's ``peak_flops``: dtype -> FLOP/s, every bad entry reported."""
    if not isinstance(value, dict) or not value:
        raise SpecError(field, value, 'expected an object like {"bf16": 312e12, "fp32": 19.5e12}', source=source)
    errors = []
    for dtype, peak in value.items():
        if dtype not in DTYPES:
            errors.append(SpecError(f"{field}.{dtype}", peak, f"unknown dtype; use one of {list(DTYPES)}",
                                    source=source))
        elif not _is_positive(peak):
            errors.append(SpecError(f"{field}.{dtype}", peak, "expected a positive number; FLOP/s, e.g. 312e12",
                                    source=source))
    raise_all(errors)
    return {k: float(v) for k, v in value.items()}


def _attention_kernels(value: Any, field: str, source: str | None) -> dict[str, float]:
    """A device's ``attention_kernels``: kernel name -> fraction of peak in (0, 1]."""
    if not isinstance(value, dict):
        raise SpecError(field, value, 'expected an object of kernel name -> fraction of peak, e.g. {"cudnn": 0.39}',
                        source=source)
    raise_all([SpecError(f"{field}.{name}", v, "a fraction of the dtype's peak in (0, 1], e.g. 0.39; leave the "
                         "kernel out to price it as the device's fused_attention_efficiency", source=source)
               for name, v in value.items() if not name or not (_is_number(v) and 0 < v <= 1)])
    return {str(k): float(v) for k, v in sorted(value.items())}


@dataclass(frozen=True, kw_only=True)
class LinkSpec:
    """A link class: unidirectional bandwidth and per-message latency (the alpha-beta model)."""

    kind: str
    bandwidth_bytes_per_s: float
    latency_s: float

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "bandwidth_bytes_per_s": self.bandwidth_bytes_per_s, "latency_s": self.latency_s}

    @classmethod
    def from_dict(cls, d: Any, *, prefix: str, source: str | None = None) -> LinkSpec:
        if not isinstance(d, dict):
            raise SpecError(prefix.rstrip("."), d, "expected an object with kind, bandwidth_bytes_per_s, latency_s",
                            source=source)
        f = _Fields(d, {"kind", "bandwidth_bytes_per_s", "latency_s"}, prefix, source)
        kind = f.get("kind", _checked(lambda v: v in LINK_KINDS, f"use one of {list(LINK_KINDS)}", source))
        bw = f.get("bandwidth_bytes_per_s", _positive_field("bytes per second (unidirectional), e.g. 300e9 for "
                                                            "NVLink 3", source))
        lat = f.get("latency_s", _checked(lambda v: _is_number(v) and math.isfinite(v) and v >= 0,
                                          "expected seconds >= 0, e.g. 5e-6", source))
        f.done()
        return cls(kind=kind, bandwidth_bytes_per_s=float(bw), latency_s=float(lat))


COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")
REQUIRED_COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter")


def _point_fields(d: Any, keys: dict[str, tuple[bool, str]], prefix: str, source: str | None) -> dict[str, Any]:
    """The fields of one measured point: ``keys`` maps a name to (integer?, the fix)."""
    if not isinstance(d, dict):
        raise SpecError(prefix.rstrip("."), d, f"expected an object with {', '.join(keys)}", source=source)
    _known_keys(d, set(keys), prefix, source)
    return {k: _positive(_require(d, k, prefix, source), f"{prefix}{k}", fix, source, integer=integer)
            for k, (integer, fix) in keys.items()}


def _point_list(d: Any, field_name: str, example: str, source: str | None) -> list:
    if not isinstance(d, list) or not d:
        raise SpecError(field_name, d, f"expected a non-empty list of measured points like {example}", source=source)
    return d


@dataclass(frozen=True, kw_only=True)
class CollectivePoint:
    """One nccl-tests row: ``nodes`` whole nodes (every device of each), ``message_bytes`` the full
    buffer (nccl-tests' "size"), and the bus bandwidth it reported (``busbw``)."""

    nodes: int
    message_bytes: float
    bus_bandwidth_bytes_per_s: float

    def to_dict(self) -> dict[str, Any]:
        return {"nodes": self.nodes, "message_bytes": self.message_bytes,
                "bus_bandwidth_bytes_per_s": self.bus_bandwidth_bytes_per_s}


_COLLECTIVE_POINT = {"nodes": (True, "whole nodes in the collective, e.g. 2"),
                     "message_bytes": (False, "the full buffer in bytes (nccl-tests' size), e.g. 1048576"),
                     "bus_bandwidth_bytes_per_s": (False, "nccl-tests' busbw in bytes per second, e.g. 180e9 "
                                                          "(not GB/s)")}
_COLLECTIVE_EXAMPLE = '{"nodes": 1, "message_bytes": 1048576, "bus_bandwidth_bytes_per_s": 1.2e11}'


@dataclass(frozen=True, kw_only=True)
class MeasuredCollectives:
    """Measured bus bandwidth per collective (docs/cluster.md); ``all_to_all``/``send_recv`` may be empty."""

    all_reduce: tuple[CollectivePoint, ...]
    all_gather: tuple[CollectivePoint, ...]
    reduce_scatter: tuple[CollectivePoint, ...]
    all_to_all: tuple[CollectivePoint, ...] = ()
    send_recv: tuple[CollectivePoint, ...] = ()

    def __hash__(self) -> int:  # hashed with every comm.Group that carries it: compute once
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash(tuple(getattr(self, name) for name in COLLECTIVES))
            object.__setattr__(self, "_hash", cached)
        return cached

    def points(self, collective: str) -> tuple[CollectivePoint, ...]:
        return getattr(self, collective)

    def to_dict(self) -> dict[str, Any]:
        return {name: [p.to_dict() for p in getattr(self, name)] for name in COLLECTIVES if getattr(self, name)}

    @classmethod
    def from_dict(cls, d: Any, *, prefix: str = "collectives.", source: str | None = None) -> MeasuredCollectives:
        if not isinstance(d, dict):
            raise SpecError(prefix.rstrip("."), d, 'expected an object like {"all_reduce": [points], "all_gather": '
                            '[...], "reduce_scatter": [...]}', source=source)
        _known_keys(d, set(COLLECTIVES), prefix, source)
        parsed: dict[str, tuple[CollectivePoint, ...]] = {}
        for name in COLLECTIVES:
            if name not in d:
                if name in REQUIRED_COLLECTIVES:
                    raise SpecError(f"{prefix}{name}", None, "this collective is required when `collectives` is "
                                    f"given (nccl-tests: {name.replace('_', '')}_perf)", source=source)
                continue
            seen: set[tuple[int, float]] = set()
            points = []
            for i, p in enumerate(_point_list(d[name], f"{prefix}{name}", _COLLECTIVE_EXAMPLE, source)):
                fields = _point_fields(p, _COLLECTIVE_POINT, f"{prefix}{name}[{i}].", source)
                key = (fields["nodes"], float(fields["message_bytes"]))
                if key in seen:
                    raise SpecError(f"{prefix}{name}[{i}]", p, "a second point for the same nodes and message_bytes; "
                                    "keep one (the median of the runs)", source=source)
                seen.add(key)
                points.append(CollectivePoint(nodes=int(fields["nodes"]), message_bytes=fields["message_bytes"],
                                              bus_bandwidth_bytes_per_s=fields["bus_bandwidth_bytes_per_s"]))
            parsed[name] = tuple(points)
        return cls(**parsed)


@dataclass(frozen=True, kw_only=True)
class GemmPoint:
    """Achieved FLOP/s of one GEMM ``(m, k) x (k, n)`` in ``dtype`` (2·m·n·k FLOPs per call)."""

    m: int
    n: int
    k: int
    dtype: str
    flops_per_s: float

    def to_dict(self) -> dict[str, Any]:
        return {"m": self.m, "n": self.n, "k": self.k, "dtype": self.dtype, "flops_per_s": self.flops_per_s}

    @classmethod
    def from_dict(cls, d: Any, *, prefix: str, source: str | None = None) -> GemmPoint:
        dims = {x: (True, f"the GEMM's {x} dimension, a positive integer") for x in "mnk"}
        fields = _point_fields({k: v for k, v in d.items() if k != "dtype"} if isinstance(d, dict) else d,
                               {**dims, "flops_per_s": (False, "achieved FLOP/s, e.g. 6.1e14")}, prefix, source)
        dtype = _require(d, "dtype", prefix, source)
        if dtype not in DTYPES:
            raise SpecError(f"{prefix}dtype", dtype, f"use one of {list(DTYPES)}", source=source)
        return cls(m=fields["m"], n=fields["n"], k=fields["k"], dtype=dtype, flops_per_s=float(fields["flops_per_s"]))


def _gemm_from_list(d: Any, field_name: str, source: str | None) -> tuple[GemmPoint, ...]:
    example = '{"m": 4096, "n": 4096, "k": 4096, "dtype": "bf16", "flops_per_s": 6.1e14}'
    points, seen = [], set()
    for i, p in enumerate(_point_list(d, field_name, example, source)):
        point = GemmPoint.from_dict(p, prefix=f"{field_name}[{i}].", source=source)
        key = (point.m, point.n, point.k, point.dtype)
        if key in seen:
            raise SpecError(f"{field_name}[{i}]", p, "a second point for the same shape and dtype; keep one",
                            source=source)
        seen.add(key)
        points.append(point)
    return tuple(points)


@dataclass(frozen=True, kw_only=True)
class MeasuredMemory:
    """What the allocator can hand out, measured: ``usable_fraction · memory_bytes − reserved_bytes``.

    A field left out keeps the cost constants' value (``allocator_usable_fraction``, ``reserved_bytes``).
    """

    reserved_bytes: int | None = None
    usable_fraction: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.reserved_bytes is not None:
            out["reserved_bytes"] = self.reserved_bytes
        if self.usable_fraction is not None:
            out["usable_fraction"] = self.usable_fraction
        return out

    @classmethod
    def from_dict(cls, d: Any, *, prefix: str = "memory.", source: str | None = None) -> MeasuredMemory:
        if not isinstance(d, dict) or not d:
            raise SpecError(prefix.rstrip("."), d, 'expected an object like {"reserved_bytes": 3221225472, '
                            '"usable_fraction": 0.95} (either field may be left out, not both)', source=source)
        _known_keys(d, {"reserved_bytes", "usable_fraction"}, prefix, source)
        reserved = d.get("reserved_bytes")
        if reserved is not None and (isinstance(reserved, bool) or not isinstance(reserved, int) or reserved < 0):
            raise SpecError(f"{prefix}reserved_bytes", reserved, "expected bytes, an integer >= 0, e.g. 3221225472 "
                            "for 3 GiB", source=source)
        fraction = d.get("usable_fraction")
        if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                     or not math.isfinite(fraction) or not 0 < fraction <= 1):
            raise SpecError(f"{prefix}usable_fraction", fraction, "expected a fraction in (0, 1], e.g. 0.95",
                            source=source)
        return cls(reserved_bytes=reserved, usable_fraction=None if fraction is None else float(fraction))


@dataclass(frozen=True, kw_only=True)
class NodeGroup:
    """Identical nodes: device type, devices per node, intra-node link and node network bandwidth.

    ``collectives``, ``gemm`` and ``memory`` are optional measurements of these nodes
    (``python -m planner profile-cluster``); the cost model prefers them where they apply.
    """

    device: DeviceSpec
    nodes: int
    devices_per_node: int
    intra_node: LinkSpec
    inter_node: LinkSpec
    collectives: MeasuredCollectives | None = None
    gemm: tuple[GemmPoint, ...] | None = None
    memory: MeasuredMemory | None = None

    @property
    def num_devices(self) -> int:
        return self.nodes * self.devices_per_node

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device.to_dict(),
            "nodes": self.nodes,
            "devices_per_node": self.devices_per_node,
            "intra_node": self.intra_node.to_dict(),
            "inter_node": self.inter_node.to_dict(),
            **self.measured_dict(),
        }

    def measured_dict(self) -> dict[str, Any]:
        """The measured fields that are set (none: an empty dict, so unmeasured files stay as they were)."""
        out: dict[str, Any] = {}
        if self.collectives is not None:
            out["collectives"] = self.collectives.to_dict()
        if self.gemm is not None:
            out["gemm"] = [p.to_dict() for p in self.gemm]
        if self.memory is not None:
            out["memory"] = self.memory.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: Any, *, prefix: str = "", source: str | None = None,
                  also_allowed: Sequence[str] = ()) -> NodeGroup:
        """Read a node group; every bad field of it (its device's and links' included) is reported at once.

        ``also_allowed``: keys the caller reads itself (a homogeneous cluster file's ``name``), not unknown."""
        if not isinstance(d, dict):
            raise SpecError(prefix.rstrip(".") or "group", d, "expected an object", source=source)
        f = _Fields(d, {"device", "nodes", "devices_per_node", "intra_node", "inter_node", *MEASURED_FIELDS,
                        *also_allowed}, prefix, source)
        parts = {
            "device": f.get("device", lambda v, at: DeviceSpec.from_dict(v, prefix=f"{at}.", source=source)),
            "nodes": f.get("nodes", _positive_field("the number of nodes", source, integer=True)),
            "devices_per_node": f.get("devices_per_node", _positive_field("devices (GPUs or processes) per node",
                                                                          source, integer=True)),
            "intra_node": f.get("intra_node", lambda v, at: LinkSpec.from_dict(v, prefix=f"{at}.", source=source)),
            "inter_node": f.get("inter_node", lambda v, at: LinkSpec.from_dict(v, prefix=f"{at}.", source=source)),
            "collectives": f.get("collectives", lambda v, at: MeasuredCollectives.from_dict(v, prefix=f"{at}.",
                                                                                           source=source),
                                 required=False),
            "gemm": f.get("gemm", lambda v, at: _gemm_from_list(v, at, source), required=False),
            "memory": f.get("memory", lambda v, at: MeasuredMemory.from_dict(v, prefix=f"{at}.", source=source),
                            required=False),
        }
        f.done()
        group = cls(**parts)
        if group.memory is not None:
            fraction = group.memory.usable_fraction if group.memory.usable_fraction is not None else 1.0
            if group.memory.reserved_bytes is not None and group.memory.reserved_bytes >= fraction * group.device.memory_bytes:
                raise SpecError(f"{prefix}memory.reserved_bytes", group.memory.reserved_bytes,
                                f"leaves no usable memory of the device's {group.device.memory_bytes} bytes; it is "
                                "the memory held outside the allocator (CUDA context, NCCL, cuBLAS), a few GiB",
                                source=source)
        return group


def shared_collectives(groups: Sequence[NodeGroup]) -> MeasuredCollectives | None:
    """The measured collectives every one of ``groups`` carries alike, on nodes of one size; else None.

    The curves are bus bandwidth of whole nodes of ``devices_per_node`` devices, so they describe a set
    of node groups only when each group measured the same figures on as many devices per node. A
    homogeneous cluster's one group is the trivial case (its own curves, or None)."""
    first = groups[0]
    if first.collectives is None or any(g.collectives != first.collectives or g.devices_per_node
                                        != first.devices_per_node for g in groups[1:]):
        return None
    return first.collectives


def shared_gemm(groups: Sequence[NodeGroup]) -> tuple[GemmPoint, ...] | None:
    """The measured GEMM points every one of ``groups`` carries alike, else None (a homogeneous cluster's
    one group: its own). A layer timed for several device types uses them only when they agree."""
    first = groups[0].gemm
    return first if first is not None and all(g.gemm == first for g in groups[1:]) else None


def _node_groups(d: dict, source: str | None) -> tuple[NodeGroup, ...]:
    """A cluster file's node groups: its ``groups``, or the one of the homogeneous form. Every bad field
    of every group is reported together (a :class:`SpecErrors`)."""
    if "groups" not in d:
        return (NodeGroup.from_dict({k: v for k, v in d.items() if k not in ("name", "description")}, source=source,
                                    also_allowed=("name", "description")),)
    f = _Fields(d, {"name", "description", "groups"}, "", source)
    groups = f.get("groups", _checked(lambda v: isinstance(v, list) and bool(v),
                                      "expected a non-empty list of node groups", source))
    parsed = tuple(f.attempt(NodeGroup.from_dict, g, prefix=f"groups[{i}].", source=source)
                   for i, g in enumerate(groups or ()))
    f.done()
    return parsed


_SCHEMA_VALIDATOR: Any = None


def check_cluster_schema(d: dict, *, source: str | None = None) -> None:
    """Check a cluster dict against docs/cluster.schema.json; the error names the field.

    :meth:`ClusterSpec.from_dict` runs it after its own checks (which give the more specific
    fixes), so a file the loader accepts is one the published schema describes.
    """
    global _SCHEMA_VALIDATOR
    import jsonschema

    if _SCHEMA_VALIDATOR is None:
        schema = json.loads(schema_path("cluster").read_text())
        _SCHEMA_VALIDATOR = jsonschema.Draft202012Validator(schema)
    errors = sorted(_SCHEMA_VALIDATOR.iter_errors(d), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        raise SpecError(where, err.instance if not isinstance(err.instance, (dict, list)) else "...",
                        f"{err.message}; see docs/cluster.md for the format", source=source)


@dataclass(frozen=True, kw_only=True)
class ClusterSpec:
    """A training cluster: one or more groups of identical nodes.

    Build one with :meth:`preset`, :meth:`from_json`, :meth:`homogeneous` or from groups.
    """

    name: str
    groups: tuple[NodeGroup, ...]
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.groups:
            raise SpecError("groups", self.groups, "a cluster needs at least one node group")

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def homogeneous(cls, *, name: str, device: DeviceSpec, nodes: int, devices_per_node: int,
                    intra_node: LinkSpec, inter_node: LinkSpec, description: str = "") -> ClusterSpec:
        group = NodeGroup(device=device, nodes=nodes, devices_per_node=devices_per_node,
                          intra_node=intra_node, inter_node=inter_node)
        return cls(name=name, groups=(group,), description=description)

    @classmethod
    def presets(cls) -> list[str]:
        """Names of the cluster presets shipped in ``datasets/clusters``."""
        return sorted(p.stem for p in (datasets_dir() / "clusters").glob("*.json"))

    @classmethod
    def preset(cls, name: str, *, nodes: int | None = None, devices_per_node: int | None = None,
               strict: bool = True) -> ClusterSpec:
        """Load ``datasets/clusters/<name>.json``, optionally overriding node count and devices per node.

        ``strict`` (default): a figure outside :data:`planner.plausible.RANGES` is an error naming the
        likely unit slip; ``strict=False`` (the CLI's ``--i-know``) makes it a warning."""
        path = datasets_dir() / "clusters" / f"{name}.json"
        if not path.is_file():
            known = cls.presets()
            close = sorted(known, key=lambda k: (not k.startswith(name), _edit_distance(k, name)))[:3]  # prefix first
            raise SpecError("cluster", name, f"no such preset; did you mean one of {close}? All presets: {known}. "
                            "Or pass a path to a cluster JSON file.")
        spec = cls.from_json(path, strict=strict)
        return spec.resized(nodes=nodes, devices_per_node=devices_per_node, strict=strict)

    @classmethod
    def from_json(cls, path: str | Path, *, strict: bool = True) -> ClusterSpec:
        data = read_json_file(path, "cluster", what="the file", damaged_fix="fix the syntax")
        return cls.from_dict(data, source=str(path), strict=strict)

    @classmethod
    def from_dict(cls, d: Any, *, source: str | None = None, strict: bool = True) -> ClusterSpec:
        """Accepts the homogeneous form (device, nodes, devices_per_node, links) or ``groups``.

        Then checks that every figure is plausible (:meth:`check_plausible`; ``strict=False`` accepts
        exotic hardware with a warning). A cluster read back from a plan file was checked when the
        plan was made: its readers pass ``strict=False``."""
        if isinstance(d, ClusterSpec):  # Plan.cluster is a ClusterSpec since plan format 2.0 (it was a dict)
            return d
        if not isinstance(d, dict):
            raise SpecError("cluster", d, "expected a JSON object", source=source)
        name = d.get("name", Path(source).stem if source else "custom")
        errors = [] if isinstance(name, str) and name else [SpecError("name", name, "expected a non-empty string",
                                                                      source=source)]
        try:
            groups = _node_groups(d, source)
        except SpecError as exc:  # reported with a bad name: every bad field of the file at once
            errors.extend(each_error(exc))
        raise_all(errors)
        spec = cls(name=name, groups=groups, description=d.get("description", ""))
        check_cluster_schema(d, source=source)  # the published schema agrees with the checks above
        spec.check_plausible(strict=strict, source=source)
        return spec

    def check_plausible(self, *, strict: bool = True, source: str | None = None) -> list[Finding]:
        """Every implausible or suspicious figure (:func:`planner.plausible.findings`). With ``strict``,
        every implausible one is a :class:`SpecError` naming the likely unit slip (all at once, a
        :class:`SpecErrors` for several, as docs/cluster.md shows); the merely suspicious ones (and, without
        ``strict``, all) are :class:`~planner.plausible.PlausibilityWarning` warnings."""
        found = findings(self)
        if strict:
            raise_all([SpecError(f.field, f.value, f.message, source=source) for f in found if f.error])
        for f in found:
            where = f" in {source}" if source else ""
            text = f.message.replace("pass --i-know (strict=False) for exotic hardware", "accepted (--i-know)")
            warnings.warn(PlausibilityWarning(f"{f.field}{where} = {f.value:g}: {text}"), stacklevel=3)
        return found

    def echo(self) -> list[str]:
        """How the cluster was read, in human units: two lines per node group (planner.plausible.echo)."""
        return echo(self)

    def to_dict(self) -> dict[str, Any]:
        if self.is_homogeneous:
            out: dict[str, Any] = {"name": self.name}
            if self.description:
                out["description"] = self.description
            out.update(self.groups[0].to_dict())
            return out
        return {"name": self.name, "description": self.description, "groups": [g.to_dict() for g in self.groups]}

    def resized(self, *, nodes: int | None = None, devices_per_node: int | None = None,
                strict: bool = True) -> ClusterSpec:
        """The same cluster with another node count or devices per node (homogeneous clusters only);
        the new counts are checked as a file's would be (``strict``, :meth:`check_plausible`)."""
        if nodes is None and devices_per_node is None:
            return self
        if not self.is_homogeneous:
            raise_all(self._not_resizable(nodes, devices_per_node))
        if nodes is not None:
            _positive(nodes, "nodes", "pass --nodes N with N >= 1", None, integer=True)
        if devices_per_node is not None:
            _positive(devices_per_node, "devices_per_node", "pass --devices-per-node N with N >= 1", None,
                      integer=True)
        g = self.groups[0]
        if devices_per_node not in (None, g.devices_per_node) and g.collectives is not None:
            raise SpecError("devices_per_node", devices_per_node,
                            f"the cluster's measured collectives describe nodes of {g.devices_per_node} devices; "
                            "measure nodes of this size (profile-cluster --nproc N) or drop --devices-per-node")
        g = replace(g, nodes=nodes or g.nodes, devices_per_node=devices_per_node or g.devices_per_node)
        out = replace(self, groups=(g,))
        if strict:
            raise_all([SpecError(f.field, f.value, f"{f.message.replace('--i-know (strict=False)', '--i-know')}"
                                 f"; lower --{f.field.replace('_', '-')}")
                       for f in findings(out) if f.error and f.field in ("nodes", "devices_per_node")])
        return out

    def _not_resizable(self, nodes: int | None, devices_per_node: int | None) -> list[SpecError]:
        """Why a mixed cluster refuses each override given: its node groups carry their own counts."""
        counts = ", ".join(f"{g.nodes}x{g.devices_per_node} {g.device.name}" for g in self.groups)
        preset = f"clusters/{self.name}.json"
        where = f"{len(self.groups)} node groups ({counts}) in the cluster file" + (
            f" (for this preset, a copy of datasets/{preset}, passed as --cluster COPY.json)"
            if (datasets_dir() / preset).is_file() else "")
        errors = []
        if nodes is not None:
            errors.append(SpecError("nodes", nodes, f"a mixed cluster cannot be resized by --nodes; drop --nodes, "
                                    f"or edit `nodes` of its {where}"))
        if devices_per_node is not None:
            errors.append(SpecError("devices_per_node", devices_per_node, "a mixed cluster has no single count of "
                                    "devices per node to override; drop --devices-per-node, or edit "
                                    f"`devices_per_node` of its {where}"))
        return errors

    # -- queries ------------------------------------------------------------------------------
    @property
    def is_homogeneous(self) -> bool:
        return len(self.groups) == 1

    @property
    def nodes(self) -> int:
        return sum(g.nodes for g in self.groups)

    @property
    def num_devices(self) -> int:
        return sum(g.num_devices for g in self.groups)

    @property
    def devices_per_node(self) -> int:
        counts = {g.devices_per_node for g in self.groups}
        if len(counts) != 1:
            raise SpecError("devices_per_node", sorted(counts), "groups differ in devices per node; "
                            "ask a group for its own count")
        return counts.pop()

    @property
    def min_devices_per_node(self) -> int:
        """The fewest devices per node of any node group (:attr:`devices_per_node` of a homogeneous cluster)."""
        return min(g.devices_per_node for g in self.groups)

    @cached_property
    def shared_collectives(self) -> MeasuredCollectives | None:
        """Measured collectives that hold on every node of the cluster (:func:`shared_collectives` of all
        its groups): the one group's for a homogeneous cluster; None where groups differ."""
        return shared_collectives(self.groups)

    @cached_property
    def shared_gemm(self) -> tuple[GemmPoint, ...] | None:
        """Measured GEMM points that hold on every device of the cluster (:func:`shared_gemm` of all its
        groups): the one group's for a homogeneous cluster; None where groups differ."""
        return shared_gemm(self.groups)

    @property
    def device(self) -> DeviceSpec:
        """The device of a homogeneous cluster (the slowest one of a mixed cluster)."""
        return min((g.device for g in self.groups), key=lambda dev: (max(dev.peak_flops.values()), dev.memory_bytes))

    @property
    def intra_node(self) -> LinkSpec:
        return min((g.intra_node for g in self.groups), key=lambda link: link.bandwidth_bytes_per_s)

    @property
    def inter_node(self) -> LinkSpec:
        return min((g.inter_node for g in self.groups), key=lambda link: link.bandwidth_bytes_per_s)

    def group_of_rank(self, rank: int) -> NodeGroup:
        assert 0 <= rank < self.num_devices, rank
        for g in self.groups:
            if rank < g.num_devices:
                return g
            rank -= g.num_devices
        raise AssertionError("unreachable")

    def group_index_of_rank(self, rank: int) -> int:
        """Index in ``groups`` of the node group that holds ``rank`` (ranks go group by group)."""
        assert 0 <= rank < self.num_devices, rank
        for gi, g in enumerate(self.groups):
            if rank < g.num_devices:
                return gi
            rank -= g.num_devices
        raise AssertionError("unreachable")

    def group_view(self, index: int) -> ClusterSpec:
        """Node group ``index`` alone, as a homogeneous cluster: what one device type costs."""
        return ClusterSpec(name=f"{self.name}[{index}]", groups=(self.groups[index],))

    def position_groups(self, pp: int, ranks_per_position: int) -> tuple[tuple[int, ...], ...]:
        """The node groups each pipeline position's ranks touch, in position order.

        Ranks follow ``rank = (pp_index·dp + dp_index)·tp + tp_index`` (planner.api.build_plan), so
        position ``k`` holds ranks ``[k·dp·tp, (k+1)·dp·tp)``; more than one group means its dp
        replicas (or tp groups) straddle device types.
        """
        if pp * ranks_per_position != self.num_devices:
            raise SpecError("pp*dp*tp", pp * ranks_per_position,
                            f"must equal the cluster's {self.num_devices} devices ({self.summary()})")
        out = []
        for k in range(pp):
            first, last = k * ranks_per_position, (k + 1) * ranks_per_position - 1
            out.append(tuple(range(self.group_index_of_rank(first), self.group_index_of_rank(last) + 1)))
        return tuple(out)

    def slowest_group(self, indices: tuple[int, ...]) -> int:
        """Among node groups ``indices``, the one whose device :attr:`device` would pick (slowest peak,
        then least memory): what a lock-step tp group or dp replica spanning them runs at."""
        return min(indices, key=lambda gi: (max(self.groups[gi].device.peak_flops.values()),
                                            self.groups[gi].device.memory_bytes, gi))

    def node_of_rank(self, rank: int) -> int:
        assert 0 <= rank < self.num_devices, rank
        node = 0
        for g in self.groups:
            if rank < g.num_devices:
                return node + rank // g.devices_per_node
            rank -= g.num_devices
            node += g.nodes
        raise AssertionError("unreachable")

    def fingerprint(self) -> str:
        """Stable hash of everything that changes predictions (not the name or description)."""
        cached = self.__dict__.get("_fingerprint")  # frozen: computed once (measured curves make it long)
        if cached is None:
            payload = json.dumps([g.to_dict() for g in self.groups], sort_keys=True)
            cached = "sha256:" + hashlib.sha256(payload.encode()).hexdigest()[:16]
            object.__setattr__(self, "_fingerprint", cached)
        return cached

    def summary(self) -> str:
        parts = [f"{g.nodes}x{g.devices_per_node} {g.device.name}" for g in self.groups]
        return f"{self.name}: {' + '.join(parts)} ({plural(self.num_devices, 'device')})"
