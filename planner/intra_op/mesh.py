"""The device mesh the intra-op solver shards over: named axes (Mesh-TensorFlow style), their
sizes, and the link each axis's collectives run on.

Axes are listed outermost first, so the last axis is the one whose ranks are adjacent (rank
``r`` has coordinate ``r % shape[-1]`` on it), as in ``torch.distributed.init_device_mesh``.
:meth:`MeshSpec.from_cluster` gives an axis the intra-node link when all its ranks share a node
and otherwise the node's network, shared by the node's devices.

Each axis also carries the communicating :class:`~planner.cost.comm.Group` its collectives run
on. :meth:`MeshSpec.from_cluster` takes it from the cluster's real topology
(:func:`planner.cost.comm.strided_group`: an axis of stride ``s`` has ``devices_per_node // s``
ranks per node and rings over that many NICs), the same group the inter-op cost model prices the
plan's ``tp`` all-reduces on; a mesh written by hand with links only gets a one-hop group per
link. Collective times then come from :mod:`planner.cost.comm` (one source of truth).

An axis may carry a *role* that limits what the solver may split on it (no role: anything):

* ``"model"``: tensor (model) parallelism, as the plan's ``tp`` axis means it. No strategy
  splits the batch there (sequence dims only with sequence parallelism, as in Megatron-SP), and
  an op that can split one of its parameters on the axis must: the inter-op memory model counts
  ``P / tp`` parameters per device (``planner/cost/memory.py``), so replicating a weight over
  ``tp`` would break the plan's memory figure.
* ``"data"``: data parallelism, as the plan's ``dp`` axis means it: only batch dims are split.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from planner.cluster import ClusterSpec, LinkSpec
from planner.cost.comm import Group, strided_group

AXIS_ROLES = ("model", "data")
AxisRoles = Mapping[str, str] | Sequence[tuple[str, str]]


@dataclass(frozen=True, kw_only=True)
class MeshSpec:
    """Named mesh axes, their sizes and links; ``axes=("dp", "tp"), shape=(2, 4)`` is 8 devices.

    ``roles`` maps an axis to ``"model"`` or ``"data"`` (see the module docstring); it is stored
    as ``(axis, role)`` pairs in axis order, axes without a role left out.
    """

    axes: tuple[str, ...]
    shape: tuple[int, ...]
    links: tuple[LinkSpec, ...]
    roles: AxisRoles = ()
    groups: tuple[Group, ...] = ()  # per axis; empty: one-hop groups from ``links`` (see :meth:`group`)

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
        items = list(self.roles.items()) if isinstance(self.roles, Mapping) else [tuple(r) for r in self.roles]
        given = dict(items)
        for axis, role in items:
            if axis not in self.axes or role not in AXIS_ROLES:
                raise ValueError(f"MeshSpec.roles: got {axis!r}: {role!r}; map an axis of {list(self.axes)} to one "
                                 f"of {list(AXIS_ROLES)}, e.g. {{'tp': 'model'}}")
        if self.groups and (len(self.groups) != len(self.axes)
                            or any(g.size != n for g, n in zip(self.groups, self.shape))):
            raise ValueError(f"MeshSpec.groups: got sizes {[g.size for g in self.groups]} for shape {self.shape}; "
                             "give one Group per axis with the axis's size, or none")
        # frozen: normalise once so that equal meshes compare and hash equal
        object.__setattr__(self, "roles", tuple((a, given[a]) for a in self.axes if a in given))

    @classmethod
    def from_cluster(cls, cluster: ClusterSpec, axes: Mapping[str, int] | Sequence[tuple[str, int]], *,
                     roles: AxisRoles = ()) -> MeshSpec:
        """A mesh on the first devices of ``cluster``; ``axes`` maps names to sizes, outermost first,
        ``roles`` axes to ``"model"`` / ``"data"``."""
        items = list(axes.items()) if isinstance(axes, Mapping) else [tuple(a) for a in axes]
        names = tuple(str(n) for n, _ in items)
        sizes = tuple(int(s) for _, s in items)
        total = math.prod(sizes)
        if total > cluster.num_devices:
            raise ValueError(f"mesh {dict(items)}: needs {total} devices; cluster {cluster.name} has "
                             f"{cluster.num_devices}; shrink an axis or add nodes")
        per_node = cluster.devices_per_node
        links, groups = [], []
        for i, size in enumerate(sizes):
            stride = math.prod(sizes[i + 1:])
            groups.append(strided_group(cluster, size, stride))
            if stride * size <= per_node:
                links.append(cluster.intra_node)
            else:
                inter = cluster.inter_node
                links.append(LinkSpec(kind=inter.kind, bandwidth_bytes_per_s=inter.bandwidth_bytes_per_s / per_node,
                                      latency_s=inter.latency_s))
        return cls(axes=names, shape=sizes, links=tuple(links), roles=roles, groups=tuple(groups))

    @classmethod
    def one_axis(cls, name: str, size: int, link: LinkSpec, *, role: str | None = None) -> MeshSpec:
        return cls(axes=(name,), shape=(size,), links=(link,), roles={name: role} if role else ())

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

    def group(self, i: int) -> Group:
        """The :class:`Group` the collectives of axis ``i`` run on.

        Without explicit ``groups`` the axis is one hop of its link: every rank on the same link
        class (``nodes=1``), so the ring runs at ``link.bandwidth · link_efficiency``.
        """
        if self.groups:
            return self.groups[i]
        link = self.links[i]
        return Group(size=self.shape[i], nodes=1, per_node=self.shape[i], intra_bw=link.bandwidth_bytes_per_s,
                     intra_latency_s=link.latency_s, nic_bw=link.bandwidth_bytes_per_s,
                     inter_latency_s=link.latency_s)

    def role(self, axis: str) -> str | None:
        """``"model"``, ``"data"`` or ``None`` (anything may be split on ``axis``)."""
        return dict(self.roles).get(axis)

    @property
    def axis_roles(self) -> tuple[str | None, ...]:
        """One role (or ``None``) per axis, in axis order."""
        return tuple(self.role(a) for a in self.axes)

    def to_dict(self) -> dict[str, Any]:
        out = {"axes": list(self.axes), "shape": list(self.shape), "links": [link.to_dict() for link in self.links]}
        if self.roles:
            out["roles"] = dict(self.roles)
        return out

    def describe(self) -> str:
        text = " x ".join(f"{a}={n}" for a, n in zip(self.axes, self.shape))
        return text + (f" ({', '.join(f'{a}: {r}' for a, r in self.roles)})" if self.roles else "")
