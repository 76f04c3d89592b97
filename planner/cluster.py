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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from planner.errors import SpecError, read_json_file
from planner.paths import datasets_dir

DTYPES = ("fp32", "tf32", "fp16", "bf16", "fp8")
LINK_KINDS = ("nvlink", "nvswitch", "pcie", "infiniband", "ethernet", "roce", "shm", "loopback")


def _positive(value: Any, field_name: str, fix: str, source: str | None, *, integer: bool = False) -> Any:
    ok_type = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_type) or not math.isfinite(value) or value <= 0:
        kind = "a positive integer" if integer else "a positive number"
        raise SpecError(field_name, value, f"expected {kind}; {fix}", source=source)
    return value


def _known_keys(d: dict, allowed: set[str], prefix: str, source: str | None) -> None:
    for key in d:
        if key not in allowed:
            close = sorted(allowed, key=lambda a: _edit_distance(a, key))[0]
            raise SpecError(
                f"{prefix}{key}", d[key], f"unknown field; did you mean '{close}'? Allowed: {sorted(allowed)}",
                source=source,
            )


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
        }

    @classmethod
    def from_dict(cls, d: Any, *, prefix: str = "device.", source: str | None = None) -> DeviceSpec:
        if not isinstance(d, dict):
            raise SpecError(prefix.rstrip("."), d, "expected an object with name, peak_flops, memory_bytes, "
                            "memory_bandwidth_bytes_per_s", source=source)
        _known_keys(d, {"name", "peak_flops", "memory_bytes", "memory_bandwidth_bytes_per_s"}, prefix, source)
        name = _require(d, "name", prefix, source)
        if not isinstance(name, str) or not name:
            raise SpecError(f"{prefix}name", name, "expected a non-empty string", source=source)
        peaks = _require(d, "peak_flops", prefix, source)
        if not isinstance(peaks, dict) or not peaks:
            raise SpecError(f"{prefix}peak_flops", peaks,
                            'expected an object like {"bf16": 312e12, "fp32": 19.5e12}', source=source)
        for dtype, value in peaks.items():
            if dtype not in DTYPES:
                raise SpecError(f"{prefix}peak_flops.{dtype}", value, f"unknown dtype; use one of {list(DTYPES)}",
                                source=source)
            _positive(value, f"{prefix}peak_flops.{dtype}", "FLOP/s, e.g. 312e12", source)
        mem = _require(d, "memory_bytes", prefix, source)
        _positive(mem, f"{prefix}memory_bytes", "bytes, e.g. 85899345920 for 80 GiB", source)
        bw = _require(d, "memory_bandwidth_bytes_per_s", prefix, source)
        _positive(bw, f"{prefix}memory_bandwidth_bytes_per_s", "bytes per second, e.g. 2.039e12", source)
        return cls(name=name, peak_flops={k: float(v) for k, v in peaks.items()}, memory_bytes=int(mem),
                   memory_bandwidth_bytes_per_s=float(bw))


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
        _known_keys(d, {"kind", "bandwidth_bytes_per_s", "latency_s"}, prefix, source)
        kind = _require(d, "kind", prefix, source)
        if kind not in LINK_KINDS:
            raise SpecError(f"{prefix}kind", kind, f"use one of {list(LINK_KINDS)}", source=source)
        bw = _positive(_require(d, "bandwidth_bytes_per_s", prefix, source), f"{prefix}bandwidth_bytes_per_s",
                       "bytes per second (unidirectional), e.g. 300e9 for NVLink 3", source)
        lat = _require(d, "latency_s", prefix, source)
        if isinstance(lat, bool) or not isinstance(lat, (int, float)) or not math.isfinite(lat) or lat < 0:
            raise SpecError(f"{prefix}latency_s", lat, "expected seconds >= 0, e.g. 5e-6", source=source)
        return cls(kind=kind, bandwidth_bytes_per_s=float(bw), latency_s=float(lat))


@dataclass(frozen=True, kw_only=True)
class NodeGroup:
    """Identical nodes: device type, devices per node, intra-node link and node network bandwidth."""

    device: DeviceSpec
    nodes: int
    devices_per_node: int
    intra_node: LinkSpec
    inter_node: LinkSpec

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
        }

    @classmethod
    def from_dict(cls, d: Any, *, prefix: str = "", source: str | None = None) -> NodeGroup:
        if not isinstance(d, dict):
            raise SpecError(prefix.rstrip(".") or "group", d, "expected an object", source=source)
        _known_keys(d, {"device", "nodes", "devices_per_node", "intra_node", "inter_node"}, prefix, source)
        return cls(
            device=DeviceSpec.from_dict(_require(d, "device", prefix, source), prefix=f"{prefix}device.",
                                        source=source),
            nodes=_positive(_require(d, "nodes", prefix, source), f"{prefix}nodes", "the number of nodes", source,
                            integer=True),
            devices_per_node=_positive(_require(d, "devices_per_node", prefix, source), f"{prefix}devices_per_node",
                                       "devices (GPUs or processes) per node", source, integer=True),
            intra_node=LinkSpec.from_dict(_require(d, "intra_node", prefix, source), prefix=f"{prefix}intra_node.",
                                          source=source),
            inter_node=LinkSpec.from_dict(_require(d, "inter_node", prefix, source), prefix=f"{prefix}inter_node.",
                                          source=source),
        )


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
    def preset(cls, name: str, *, nodes: int | None = None, devices_per_node: int | None = None) -> ClusterSpec:
        """Load ``datasets/clusters/<name>.json``, optionally overriding node count and devices per node."""
        path = datasets_dir() / "clusters" / f"{name}.json"
        if not path.is_file():
            known = cls.presets()
            close = sorted(known, key=lambda k: _edit_distance(k, name))[:3]
            raise SpecError("cluster", name, f"no such preset; did you mean one of {close}? All presets: {known}. "
                            "Or pass a path to a cluster JSON file.")
        spec = cls.from_json(path)
        return spec.resized(nodes=nodes, devices_per_node=devices_per_node)

    @classmethod
    def from_json(cls, path: str | Path) -> ClusterSpec:
        data = read_json_file(path, "cluster", what="the file", damaged_fix="fix the syntax")
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, d: Any, *, source: str | None = None) -> ClusterSpec:
        """Accepts the homogeneous form (device, nodes, devices_per_node, links) or ``groups``."""
        if not isinstance(d, dict):
            raise SpecError("cluster", d, "expected a JSON object", source=source)
        name = d.get("name", Path(source).stem if source else "custom")
        if not isinstance(name, str) or not name:
            raise SpecError("name", name, "expected a non-empty string", source=source)
        description = d.get("description", "")
        if "groups" in d:
            _known_keys(d, {"name", "description", "groups"}, "", source)
            groups = d["groups"]
            if not isinstance(groups, list) or not groups:
                raise SpecError("groups", groups, "expected a non-empty list of node groups", source=source)
            parsed = tuple(NodeGroup.from_dict(g, prefix=f"groups[{i}].", source=source) for i, g in enumerate(groups))
            return cls(name=name, groups=parsed, description=description)
        _known_keys(d, {"name", "description", "device", "nodes", "devices_per_node", "intra_node", "inter_node"},
                    "", source)
        group = NodeGroup.from_dict({k: v for k, v in d.items() if k not in ("name", "description")}, source=source)
        return cls(name=name, groups=(group,), description=description)

    def to_dict(self) -> dict[str, Any]:
        if self.is_homogeneous:
            out: dict[str, Any] = {"name": self.name}
            if self.description:
                out["description"] = self.description
            out.update(self.groups[0].to_dict())
            return out
        return {"name": self.name, "description": self.description, "groups": [g.to_dict() for g in self.groups]}

    def resized(self, *, nodes: int | None = None, devices_per_node: int | None = None) -> ClusterSpec:
        """The same cluster with another node count or devices per node (homogeneous clusters only)."""
        if nodes is None and devices_per_node is None:
            return self
        if not self.is_homogeneous:
            raise SpecError("nodes", nodes, "a mixed cluster cannot be resized by --nodes/--devices-per-node; "
                            "edit the node counts of its groups in the cluster file")
        if nodes is not None:
            _positive(nodes, "nodes", "pass --nodes N with N >= 1", None, integer=True)
        if devices_per_node is not None:
            _positive(devices_per_node, "devices_per_node", "pass --devices-per-node N with N >= 1", None,
                      integer=True)
        g = self.groups[0]
        g = replace(g, nodes=nodes or g.nodes, devices_per_node=devices_per_node or g.devices_per_node)
        return replace(self, groups=(g,))

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
        payload = json.dumps([g.to_dict() for g in self.groups], sort_keys=True)
        return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()[:16]

    def summary(self) -> str:
        parts = [f"{g.nodes}x{g.devices_per_node} {g.device.name}" for g in self.groups]
        return f"{self.name}: {' + '.join(parts)} ({self.num_devices} devices)"
