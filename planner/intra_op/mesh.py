"""The device mesh the intra-op solver shards over: named axes (Mesh-TensorFlow style), their
sizes, and the link each axis's collectives run on.

Axes are listed outermost first, so the last axis is the one whose ranks are adjacent (rank
``r`` has coordinate ``r % shape[-1]`` on it), as in ``torch.distributed.init_device_mesh``.
:meth:`MeshSpec.from_cluster` gives an axis the intra-node link when all its ranks share a node
and otherwise the node's network, shared by the node's devices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from planner.cluster import ClusterSpec, LinkSpec


@dataclass(frozen=True, kw_only=True)
class MeshSpec:
    """Named mesh axes, their sizes and links; ``axes=("dp", "tp"), shape=(2, 4)`` is 8 devices."""

    axes: tuple[str, ...]
    shape: tuple[int, ...]
    links: tuple[LinkSpec, ...]

    def __post_init__(self) -> None:
        if not self.axes or len(self.axes) > 2:
            raise ValueError(f"MeshSpec.axes: got {self.axes!r}; give one or two axis names, e.g. ('tp',) "
                             "or ('dp', 'tp')")
        if len(set(self.axes)) != len(self.axes) or not all(isinstance(a, str) and a for a in self.axes):
            raise ValueError(f"MeshSpec.axes: got {self.axes!r}; names must be distinct non-empty strings")
        if len(self.shape) != len(self.axes) or any(not isinstance(n, int) or n < 1 for n in self.shape):
            raise ValueError(f"MeshSpec.shape: got {self.shape!r}; give one positive size per axis {self.axes}")
        if len(self.links) != len(self.axes):
            raise ValueError(f"MeshSpec.links: got {len(self.links)} links for axes {self.axes}; give one per axis")

    @classmethod
    def from_cluster(cls, cluster: ClusterSpec, axes: Mapping[str, int] | Sequence[tuple[str, int]]) -> MeshSpec:
        """A mesh on the first devices of ``cluster``; ``axes`` maps names to sizes, outermost first."""
        items = list(axes.items()) if isinstance(axes, Mapping) else [tuple(a) for a in axes]
        names = tuple(str(n) for n, _ in items)
        sizes = tuple(int(s) for _, s in items)
        total = math.prod(sizes)
        if total > cluster.num_devices:
            raise ValueError(f"mesh {dict(items)}: needs {total} devices; cluster {cluster.name} has "
                             f"{cluster.num_devices}; shrink an axis or add nodes")
        per_node = cluster.devices_per_node
        links = []
        for i, size in enumerate(sizes):
            stride = math.prod(sizes[i + 1:])
            if stride * size <= per_node:
                links.append(cluster.intra_node)
            else:
                inter = cluster.inter_node
                links.append(LinkSpec(kind=inter.kind, bandwidth_bytes_per_s=inter.bandwidth_bytes_per_s / per_node,
                                      latency_s=inter.latency_s))
        return cls(axes=names, shape=sizes, links=tuple(links))

    @classmethod
    def one_axis(cls, name: str, size: int, link: LinkSpec) -> MeshSpec:
        return cls(axes=(name,), shape=(size,), links=(link,))

    @property
    def ndim(self) -> int:
        return len(self.axes)

    @property
    def num_devices(self) -> int:
        return math.prod(self.shape)

    def index(self, axis: str) -> int:
        if axis not in self.axes:
            raise ValueError(f"mesh axis: got {axis!r}; this mesh has axes {list(self.axes)}")
        return self.axes.index(axis)

    def to_dict(self) -> dict[str, Any]:
        return {"axes": list(self.axes), "shape": list(self.shape), "links": [link.to_dict() for link in self.links]}

    def describe(self) -> str:
        return " x ".join(f"{a}={n}" for a, n in zip(self.axes, self.shape))
