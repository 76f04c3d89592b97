"""How one tensor is laid out on a device mesh: one DTensor-style placement per mesh axis.

Vocabulary (as in torchtitan): an *axis* is a mesh axis, a *dim* is a tensor dimension.

* ``Shard(dim)``: the tensor is cut into equal pieces along ``dim`` across the ranks of the axis.
* ``Replicate()``: every rank of the axis holds the whole tensor.
* ``Partial()``: every rank holds a tensor of full shape; the true value is their **sum**
  (Tofu's "partition-n-reduce", the output of a row-parallel linear before its all-reduce).

A :data:`Layout` is a tuple with one placement per mesh axis, in mesh order, exactly what
``torch.distributed.tensor.distribute_tensor(t, mesh, placements)`` takes; ``to_torch_str``
gives the constructor text (``"Shard(0)"``) that the runtime maps onto torch's classes. This
module does not import torch.

GShard writes the same information per tensor dim (``dims_mapping``: for each dim the mesh
axes it is split over); :func:`to_dims_mapping` and :func:`from_dims_mapping` convert.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, eq=False)
class Shard:
    """Split along tensor dim ``dim`` (non-negative) across the ranks of one mesh axis."""

    dim: int

    # Layouts are dict keys in the hot loops of the cost tables: plain hash and eq are twice as fast.
    def __hash__(self) -> int:
        return self.dim

    def __eq__(self, other: object) -> bool:
        return type(other) is Shard and other.dim == self.dim

    def to_torch_str(self) -> str:
        return f"Shard({self.dim})"

    def short(self) -> str:
        return f"S({self.dim})"


@dataclass(frozen=True, eq=False)
class Replicate:
    """Every rank of the axis holds the whole tensor."""

    def __hash__(self) -> int:
        return -1

    def __eq__(self, other: object) -> bool:
        return type(other) is Replicate

    def to_torch_str(self) -> str:
        return "Replicate()"

    def short(self) -> str:
        return "R"


@dataclass(frozen=True, eq=False)
class Partial:
    """Every rank holds a full-shape addend; the value is the sum over the axis."""

    def __hash__(self) -> int:
        return -2

    def __eq__(self, other: object) -> bool:
        return type(other) is Partial

    def to_torch_str(self) -> str:
        return "Partial()"

    def short(self) -> str:
        return "P"


Placement = Shard | Replicate | Partial
Layout = tuple[Placement, ...]

REPLICATE = Replicate()
PARTIAL = Partial()

_PATTERN = re.compile(r"^\s*(?:(Shard|S)\(\s*(?:dim\s*=\s*)?(-?\d+)\s*\)|(Replicate|R)(?:\(\s*\))?|"
                      r"(Partial|P)(?:\(\s*(?:sum|reduce_op\s*=\s*['\"]sum['\"])?\s*\))?)\s*$")


def placement_from_str(text: str) -> Placement:
    """Parse ``"Shard(0)"``, ``"S(0)"``, ``"Replicate()"``, ``"R"``, ``"Partial()"`` or ``"P"``."""
    if not isinstance(text, str):
        raise ValueError(f"placement: got {text!r}; expected a string like 'Shard(0)', 'Replicate()' or 'Partial()'")
    m = _PATTERN.match(text)
    if not m:
        raise ValueError(f"placement: got {text!r}; expected 'Shard(<dim>)', 'Replicate()' or 'Partial()' "
                         "(only sum partials are supported)")
    if m.group(1):
        dim = int(m.group(2))
        if dim < 0:
            raise ValueError(f"placement: got {text!r}; write the dim as a non-negative index")
        return Shard(dim)
    return REPLICATE if m.group(3) else PARTIAL


def as_placement(value: Placement | str) -> Placement:
    return value if isinstance(value, (Shard, Replicate, Partial)) else placement_from_str(value)


_STRS: dict[Layout, tuple[str, ...]] = {}  # a model's solution writes a few distinct layouts thousands of times


def layout_to_strs(layout: Layout) -> list[str]:
    strs = _STRS.get(layout)
    if strs is None:
        strs = _STRS[layout] = tuple(p.to_torch_str() for p in layout)
    return list(strs)


def layout_short(layout: Layout) -> str:
    """Compact text like ``S(0),R`` for logs and strategy tables."""
    return ",".join(p.short() for p in layout)


def shard_factor(layout: Layout, mesh_shape: Sequence[int]) -> int:
    """How many pieces the tensor is cut into (Partial and Replicate cut nothing)."""
    factor = 1
    for p, n in zip(layout, mesh_shape):
        if isinstance(p, Shard):
            factor *= n
    return factor


def grad_layout_of_output(layout: Layout) -> Layout:
    """The layout an output's gradient must arrive in: the adjoint of a sum is a broadcast."""
    return tuple(REPLICATE if isinstance(p, Partial) else p for p in layout)


def local_shape(shape: Sequence[int], layout: Layout, mesh_shape: Sequence[int]) -> tuple[int, ...]:
    out = list(shape)
    for p, n in zip(layout, mesh_shape):
        if isinstance(p, Shard):
            out[p.dim] //= n
    return tuple(out)


def to_dims_mapping(layout: Layout, ndim: int, axes: Sequence[str]) -> list[list[str]]:
    """GShard form: for each tensor dim, the mesh axes it is split over (outer axis first)."""
    mapping: list[list[str]] = [[] for _ in range(ndim)]
    for p, axis in zip(layout, axes):
        if isinstance(p, Shard):
            mapping[p.dim].append(axis)
    return mapping


def from_dims_mapping(dims_mapping: Sequence[str | Sequence[str] | None], axes: Sequence[str]) -> Layout:
    """DTensor placements from a GShard-style annotation, e.g. ``[None, "tp"]`` → ``(Shard(1),)``."""
    placements: list[Placement] = [REPLICATE] * len(axes)
    for dim, entry in enumerate(dims_mapping):
        names = [] if entry is None else [entry] if isinstance(entry, str) else list(entry)
        for name in names:
            if name not in axes:
                raise ValueError(f"dims_mapping[{dim}]: got axis {name!r}; the mesh axes are {list(axes)}")
            i = list(axes).index(name)
            if isinstance(placements[i], Shard):
                raise ValueError(f"dims_mapping: axis {name!r} is used twice; a mesh axis splits at most one dim")
            placements[i] = Shard(dim)
    return tuple(placements)
