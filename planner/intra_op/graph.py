"""The op graph the intra-op solver reads (``builder.GraphBuilder`` writes one by hand).

Every op is one of three things:

* an **input**: a tensor that enters the graph (the previous layer's output, the tokens);
* a **decision op** (GEMMs, norms, dropout, binary elementwise, MoE einsums): written as an
  einsum over *labels*, GShard / Mesh-TensorFlow style, e.g. a linear layer is
  ``bsk,nk,n->bsn`` (input, weight, bias → output). A strategy splits one label per mesh axis;
  the labels say which dim of every operand that is. ``no_split`` labels are reduced inside the
  op (a norm's hidden dim, a router's token dim) and cannot be split without extra collectives;
  ``seq_labels`` are sequence dims, split only when sequence parallelism is on;
* a **follower** (views, transposes, unary pointwise ops such as gelu or softmax): it has no
  choice of its own and is merged into its producer's strategy; ``dim_map`` says where a split
  input dim lands in the output (``None``: the split cannot pass and is undone first), and
  ``linear`` says whether a ``Partial`` input passes through (a view does, gelu does not).

Sizes are for the whole step on one mesh (batch included); costs are forward + backward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

DTYPE_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int64": 8, "bool": 1}
ROLES = ("batch", "seq", "heads")


@dataclass(frozen=True, kw_only=True)
class Param:
    """A parameter an op reads. ``owned=False`` marks a tied use: same layout, memory counted once."""

    name: str
    shape: tuple[int, ...]
    owned: bool = True

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True, kw_only=True)
class Op:
    """One op: see the module docstring for the three kinds."""

    name: str
    kind: str
    out_shape: tuple[int, ...]
    inputs: tuple[str, ...] = ()
    params: tuple[Param, ...] = ()
    dtype_bytes: int = 2
    # decision ops
    in_labels: tuple[tuple[str, ...], ...] = ()
    param_labels: tuple[tuple[str, ...], ...] = ()
    out_labels: tuple[str, ...] = ()
    no_split: frozenset[str] = frozenset()
    seq_labels: frozenset[str] = frozenset()
    label_names: tuple[tuple[str, str], ...] = ()
    differentiable: tuple[bool, ...] = ()
    elementwise: bool = False  # a norm, dropout or elementwise op: may join the residual stream
    # followers
    follows: bool = False
    dim_map: tuple[int | None, ...] = ()
    linear: bool = False
    # inputs: output dims that may be split (sequence dims only with sequence parallelism)
    split_dims: tuple[int, ...] = ()
    seq_dims: tuple[int, ...] = ()
    # costs, forward + backward, whole step
    fwd_flops: float = 0.0
    bwd_flops: float = 0.0
    bytes_moved: float = 0.0
    saved_bytes: float = 0.0
    saved_from: str = "inputs"
    module_path: str = ""
    roles: tuple[str | None, ...] = ()

    @property
    def is_input(self) -> bool:
        return self.kind == "input"

    @property
    def out_bytes(self) -> float:
        return float(math.prod(self.out_shape) * self.dtype_bytes)

    def name_of_label(self, label: str) -> str:
        return dict(self.label_names).get(label, label)


@dataclass(kw_only=True)
class OpGraph:
    """Ops in topological order (dict insertion order), keyed by name."""

    name: str
    ops: dict[str, Op]
    dtype: str = "bf16"
    outputs: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for op in self.ops.values():
            for src in op.inputs:
                if src not in seen:
                    raise ValueError(f"op {op.name}: input {src!r} is not an earlier op of graph {self.name}; "
                                     "add ops in topological order")
            if op.follows:
                if len(op.inputs) != 1 or len(op.dim_map) != len(self.ops[op.inputs[0]].out_shape):
                    raise ValueError(f"op {op.name}: a follower needs one input and a dim_map entry per input dim")
            elif not op.is_input:
                self._check_labels(op)
            seen.add(op.name)
        if not self.outputs:
            consumed = {src for op in self.ops.values() for src in op.inputs}
            self.outputs = tuple(n for n in self.ops if n not in consumed)
        for out in self.outputs:
            if out not in self.ops:
                raise ValueError(f"graph {self.name}: output {out!r} is not an op")

    def _check_labels(self, op: Op) -> None:
        if len(op.in_labels) != len(op.inputs) or len(op.param_labels) != len(op.params):
            raise ValueError(f"op {op.name}: give labels for each of its {len(op.inputs)} inputs and "
                             f"{len(op.params)} params")
        sizes: dict[str, int] = {}
        operands = [(labels, self.ops[src].out_shape, src) for labels, src in zip(op.in_labels, op.inputs)]
        operands += [(labels, p.shape, p.name) for labels, p in zip(op.param_labels, op.params)]
        operands.append((op.out_labels, op.out_shape, "output"))
        for labels, shape, what in operands:
            if len(labels) != len(shape) or len(set(labels)) != len(labels):
                raise ValueError(f"op {op.name}: labels {labels} do not fit {what} of shape {shape}")
            for label, size in zip(labels, shape):
                if sizes.setdefault(label, size) != size:
                    raise ValueError(f"op {op.name}: label {label!r} is {sizes[label]} in one operand and {size} "
                                     f"in {what}; use distinct labels for broadcast dims")

    def label_sizes(self, op: Op) -> dict[str, int]:
        sizes: dict[str, int] = {}
        for labels, src in zip(op.in_labels, op.inputs):
            sizes.update(zip(labels, self.ops[src].out_shape))
        for labels, p in zip(op.param_labels, op.params):
            sizes.update(zip(labels, p.shape))
        sizes.update(zip(op.out_labels, op.out_shape))
        return sizes

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def consumers(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {n: [] for n in self.ops}
        for op in self.ops.values():
            for src in op.inputs:
                out[src].append(op.name)
        return out

    def params(self) -> dict[str, Param]:
        return {p.name: p for op in self.ops.values() for p in op.params}


def view_dim_map(src: Sequence[int], dst: Sequence[int], roles: Sequence[str | None]
                 ) -> tuple[tuple[int | None, ...], tuple[str | None, ...]]:
    """Where a split of each ``src`` dim lands after reshaping to ``dst`` (``None``: nowhere).

    Dims are grouped into runs with equal products; a split of a group's major (first non-1)
    dim cuts the group into contiguous blocks, and so does a split of the group's major output
    dim, so the split moves there. A split of a minor dim would not be contiguous.
    Output roles: the major output dim keeps a batch / seq role; a hidden dim cut in several
    gets the ``heads`` role on its major part.
    """
    if math.prod(src) != math.prod(dst):
        raise ValueError(f"reshape: {tuple(src)} and {tuple(dst)} have different sizes")
    dim_map: list[int | None] = [None] * len(src)
    out_roles: list[str | None] = [None] * len(dst)
    i = j = 0
    while i < len(src) or j < len(dst):
        gi, gj = [i] if i < len(src) else [], [j] if j < len(dst) else []
        ps = src[i] if i < len(src) else 1
        pd = dst[j] if j < len(dst) else 1
        i, j = i + 1, j + 1
        while ps != pd:
            if ps < pd:
                gi.append(i)
                ps *= src[i]
                i += 1
            else:
                gj.append(j)
                pd *= dst[j]
                j += 1
        major_in = next((d for d in gi if src[d] > 1), None)
        major_out = next((d for d in gj if dst[d] > 1), None)
        if major_in is not None and major_out is not None:
            dim_map[major_in] = major_out
            role = roles[major_in]
            if role is None and len([d for d in gj if dst[d] > 1]) > 1 and len([d for d in gi if src[d] > 1]) == 1:
                role = "heads"
            out_roles[major_out] = role
        elif major_in is None and major_out is None and len(gi) == len(gj) == 1:
            # a size-1 dim kept in place: the batch of a model traced at batch 1 keeps its role, so
            # the view still fits when the batch is scaled up
            dim_map[gi[0]] = gj[0]
            out_roles[gj[0]] = roles[gi[0]]
    return tuple(dim_map), tuple(out_roles)
