"""The op graph the intra-op solver reads, and a small builder to write one by hand.

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
from collections.abc import Mapping, Sequence
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


# -- builder --------------------------------------------------------------------------------------

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _leading_labels(roles: Sequence[str | None], reserved: str) -> tuple[list[str], dict[str, str]]:
    """Labels for dims by role: batch → b, seq → s (then t), heads → h; others get spare letters."""
    labels: list[str] = []
    names: dict[str, str] = {}
    used = set(reserved)
    preferred = {"batch": "bgz", "seq": "stqu", "heads": "hjy"}
    for i, role in enumerate(roles):
        pool = preferred.get(role or "", "") + "".join(c for c in "acdefilmoprvwx" if c not in reserved)
        label = next(c for c in pool if c not in used)
        used.add(label)
        labels.append(label)
        names[label] = role or f"dim{i}"
    return labels, names


class GraphBuilder:
    """Write an :class:`OpGraph` op by op; every method returns the new op's name.

    Shapes include the batch; ``roles`` mark batch / sequence / head dims of an input so that the
    sequence-parallel switch and strategy names know them. FLOPs, bytes and saved activations are
    estimated from shapes unless given.
    """

    def __init__(self, name: str, *, dtype: str = "bf16") -> None:
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype: got {dtype!r}; use one of {sorted(DTYPE_BYTES)}")
        self.name = name
        self.dtype = dtype
        self.nbytes = DTYPE_BYTES[dtype]
        self.ops: dict[str, Op] = {}
        self.notes: list[str] = []

    # -- helpers ----------------------------------------------------------------------------
    def shape(self, x: str) -> tuple[int, ...]:
        return self.ops[x].out_shape

    def roles(self, x: str) -> tuple[str | None, ...]:
        op = self.ops[x]
        return op.roles or (None,) * len(op.out_shape)

    def _add(self, op: Op) -> str:
        if op.name in self.ops:
            raise ValueError(f"op name {op.name!r} is used twice in graph {self.name}")
        self.ops[op.name] = op
        return op.name

    def _numel(self, x: str) -> int:
        return math.prod(self.shape(x))

    def build(self, outputs: Sequence[str] = ()) -> OpGraph:
        return OpGraph(name=self.name, ops=dict(self.ops), dtype=self.dtype, outputs=tuple(outputs),
                       notes=list(self.notes))

    # -- inputs -----------------------------------------------------------------------------
    def input(self, name: str, shape: Sequence[int], *, roles: Sequence[str | None] | None = None,
              dtype: str | None = None, differentiable: bool = True) -> str:
        """A tensor entering the graph; dims with a role may be split (sequence ones only with SP)."""
        shape = tuple(int(d) for d in shape)
        roles = tuple(roles) if roles is not None else ("batch",) + (None,) * (len(shape) - 1)
        if len(roles) != len(shape) or any(r not in ROLES + (None,) for r in roles):
            raise ValueError(f"input {name}: roles {roles} must give one of {ROLES} or None per dim of {shape}")
        nbytes = DTYPE_BYTES[dtype] if dtype else self.nbytes
        return self._add(Op(name=name, kind="input", out_shape=shape, dtype_bytes=nbytes, roles=roles,
                            split_dims=tuple(range(len(shape))),
                            seq_dims=tuple(i for i, r in enumerate(roles) if r == "seq"),
                            differentiable=(differentiable,)))

    # -- decision ops -----------------------------------------------------------------------
    def einsum(self, name: str, equation: str, inputs: Sequence[str], params: Mapping[str, Sequence[int]] = {},
               *, no_split: str = "", **kw) -> str:
        """A GShard-style einsum over single-letter labels: ``"gsm,me->gse"`` (inputs, then params)."""
        lhs, out = equation.replace(" ", "").split("->")
        terms = lhs.split(",")
        if len(terms) != len(inputs) + len(params):
            raise ValueError(f"einsum {name}: {equation!r} has {len(terms)} operands; got {len(inputs)} inputs "
                             f"and {len(params)} params")
        plist = [Param(name=n, shape=tuple(s)) for n, s in params.items()]
        return self.einsum_labels(name, inputs, [tuple(t) for t in terms[:len(inputs)]], plist,
                                  [tuple(t) for t in terms[len(inputs):]], tuple(out), no_split=frozenset(no_split),
                                  **kw)

    def einsum_labels(self, name: str, inputs: Sequence[str], in_labels: Sequence[tuple[str, ...]],
                      params: Sequence[Param], param_labels: Sequence[tuple[str, ...]], out_labels: tuple[str, ...],
                      *, kind: str = "einsum", no_split: frozenset[str] = frozenset(),
                      names: Mapping[str, str] | None = None, differentiable: Sequence[bool] | None = None,
                      fwd_flops: float | None = None, module_path: str = "", saved_bytes: float | None = None,
                      out_dtype: str | None = None) -> str:
        """An einsum with labels given as tuples of strings (multi-letter labels allowed)."""
        sizes: dict[str, int] = {}
        roles: dict[str, str] = {}
        for labels, x in zip(in_labels, inputs):
            for label, size, role in zip(labels, self.shape(x), self.roles(x)):
                sizes[label] = size
                if role:
                    roles.setdefault(label, role)
        for labels, p in zip(param_labels, params):
            sizes.update(zip(labels, p.shape))
        missing = [c for c in out_labels if c not in sizes]
        if missing:
            raise ValueError(f"einsum {name}: output labels {missing} appear in no operand")
        out_shape = tuple(sizes[c] for c in out_labels)
        diff = tuple(differentiable) if differentiable is not None else tuple(
            self.ops[x].differentiable[0] if self.ops[x].is_input and self.ops[x].differentiable else True
            for x in inputs)
        flops = fwd_flops if fwd_flops is not None else 2.0 * math.prod(sizes.values())
        grads = min(2, sum(diff) + (1 if params else 0))
        operand_bytes = sum(self._numel(x) * self.ops[x].dtype_bytes for x in inputs)
        nbytes = DTYPE_BYTES[out_dtype] if out_dtype else self.nbytes
        moved = operand_bytes + sum(p.numel for p in params) * self.nbytes + math.prod(out_shape) * nbytes
        label_names = dict(names or {})
        for label, role in roles.items():
            label_names.setdefault(label, role)
        return self._add(Op(
            name=name, kind=kind, out_shape=out_shape, inputs=tuple(inputs), params=tuple(params), dtype_bytes=nbytes,
            in_labels=tuple(tuple(t) for t in in_labels), param_labels=tuple(tuple(t) for t in param_labels),
            out_labels=tuple(out_labels), no_split=frozenset(no_split),
            seq_labels=frozenset(c for c, r in roles.items() if r == "seq"),
            label_names=tuple(sorted(label_names.items())), differentiable=diff,
            fwd_flops=flops, bwd_flops=flops * grads, bytes_moved=3.0 * moved,
            saved_bytes=operand_bytes if saved_bytes is None else saved_bytes, module_path=module_path,
            roles=tuple(roles.get(c) for c in out_labels)))

    def linear(self, name: str, x: str, out_features: int, *, bias: bool = True, weight_name: str | None = None,
               bias_name: str | None = None, owned: bool = True, module_path: str | None = None, **kw) -> str:
        """``y = x Wᵀ + b`` with ``W: [out, in]`` as in torch: split n = column-, k = row-parallel."""
        lead, names = _leading_labels(self.roles(x)[:-1], reserved="kn")
        params = [Param(name=weight_name or f"{name}.weight", shape=(out_features, self.shape(x)[-1]), owned=owned)]
        labels = [("n", "k")]
        if bias:
            params.append(Param(name=bias_name or f"{name}.bias", shape=(out_features,), owned=owned))
            labels.append(("n",))
        names.update({"k": "row", "n": "column"})
        return self.einsum_labels(name, [x], [(*lead, "k")], params, labels, (*lead, "n"), kind="linear",
                                  names=names, module_path=name if module_path is None else module_path, **kw)

    def matmul(self, name: str, a: str, b: str, **kw) -> str:
        """``a @ b`` with matching leading (batch) dims: ``...mk,...kn->...mn``."""
        sa, sb = self.shape(a), self.shape(b)
        if len(sa) != len(sb) or sa[:-2] != sb[:-2] or sa[-1] != sb[-2]:
            raise ValueError(f"matmul {name}: shapes {sa} and {sb} do not multiply; broadcast explicitly")
        ra, rb = self.roles(a), self.roles(b)
        lead, names = _leading_labels(ra[:-2], reserved="mkn")
        m_role, n_role = ra[-2], rb[-1]
        names.update({"m": m_role or "rows", "k": "contract", "n": n_role or "cols"})
        if m_role == n_role == "seq":
            names.update({"m": "query_seq", "n": "key_seq"})
        name_op = self.einsum_labels(name, [a, b], [(*lead, "m", "k"), (*lead, "k", "n")], [], [],
                                     (*lead, "m", "n"), kind="matmul", names=names, **kw)
        op = self.ops[name_op]
        seq = set(op.seq_labels) | {c for c, r in (("m", m_role), ("n", n_role)) if r == "seq"}
        self.ops[name_op] = _replace(op, seq_labels=frozenset(seq), roles=(*ra[:-2], m_role, n_role))
        return name_op

    def embedding(self, name: str, ids: str, num: int, dim: int, *, weight_name: str | None = None,
                  owned: bool = True, module_path: str | None = None, **kw) -> str:
        """A table lookup written as a one-hot einsum: splitting the vocabulary gives Partial sums."""
        lead, names = _leading_labels(self.roles(ids), reserved="ve")
        names.update({"v": "vocab", "e": "hidden"})
        param = Param(name=weight_name or f"{name}.weight", shape=(num, dim), owned=owned)
        moved = 3.0 * self._numel(ids) * dim * self.nbytes
        op_name = self.einsum_labels(name, [ids], [tuple(lead)], [param], [("v", "e")], (*lead, "e"),
                                     kind="embedding", names=names, differentiable=(False,), fwd_flops=0.0,
                                     saved_bytes=0.0, module_path=name if module_path is None else module_path, **kw)
        self.ops[op_name] = _replace(self.ops[op_name], bytes_moved=moved)
        return op_name

    def norm(self, name: str, x: str, *, kind: str = "layernorm", bias: bool = True, weight_name: str | None = None,
             bias_name: str | None = None, module_path: str | None = None, **kw) -> str:
        """LayerNorm / RMSNorm over the last dim: that dim is reduced, the others may be split."""
        lead, names = _leading_labels(self.roles(x)[:-1], reserved="e")
        h = self.shape(x)[-1]
        params = [Param(name=weight_name or f"{name}.weight", shape=(h,))]
        if bias:
            params.append(Param(name=bias_name or f"{name}.bias", shape=(h,)))
        numel = self._numel(x)
        stats = 2 * 4 * numel // h  # fp32 mean and rstd per row
        op_name = self.einsum_labels(name, [x], [(*lead, "e")], params, [("e",)] * len(params), (*lead, "e"),
                                     kind=kind, no_split=frozenset("e"), names=names,
                                     fwd_flops=kw.pop("fwd_flops", 8.0 * numel),
                                     saved_bytes=kw.pop("saved_bytes", numel * self.nbytes + stats),
                                     module_path=name if module_path is None else module_path, **kw)
        self.ops[op_name] = _replace(self.ops[op_name], elementwise=True)
        return op_name

    def elementwise(self, name: str, inputs: Sequence[str], *, kind: str = "add", saved: bool = False,
                    **kw) -> str:
        """Elementwise op on tensors broadcast from the right (residual add, gating multiply)."""
        out_ndim = max(len(self.shape(x)) for x in inputs)
        out_shape = [1] * out_ndim
        out_roles: list[str | None] = [None] * out_ndim
        for x in inputs:
            s, r = self.shape(x), self.roles(x)
            for i in range(1, len(s) + 1):
                out_shape[-i] = max(out_shape[-i], s[-i])
                out_roles[-i] = out_roles[-i] or r[-i]
        lead, names = _leading_labels(out_roles, reserved="")
        terms = []
        for j, x in enumerate(inputs):
            s = self.shape(x)
            labels = []
            for i in range(len(s)):
                pos = out_ndim - len(s) + i
                # a broadcast (size-1) dim gets a private label: it cannot be split
                labels.append(lead[pos] if s[i] == out_shape[pos] else f"{_LETTERS[j].upper()}{i}")
            terms.append(labels)
        numel = math.prod(out_shape)
        saved_bytes = sum(self._numel(x) for x in inputs) * self.nbytes if saved else 0.0
        op = Op(name=name, kind=kind, out_shape=tuple(out_shape), inputs=tuple(inputs), dtype_bytes=self.nbytes,
                in_labels=tuple(tuple(t) for t in terms), out_labels=tuple(lead),
                seq_labels=frozenset(c for c, r in zip(lead, out_roles) if r == "seq"),
                label_names=tuple(sorted(names.items())), differentiable=(True,) * len(inputs), elementwise=True,
                fwd_flops=kw.pop("fwd_flops", float(numel)), bwd_flops=float(numel),
                bytes_moved=kw.pop("bytes_moved", 3.0 * (len(inputs) + 1) * numel * self.nbytes),
                saved_bytes=saved_bytes, roles=tuple(out_roles), module_path=kw.pop("module_path", ""))
        if kw:
            raise TypeError(f"elementwise: unexpected arguments {sorted(kw)}")
        return self._add(op)

    def add(self, name: str, a: str, b: str, **kw) -> str:
        return self.elementwise(name, [a, b], kind="add", **kw)

    def dropout(self, name: str, x: str, **kw) -> str:
        """Dropout is a decision op (not a follower) so that sequence parallelism can split it."""
        numel = self._numel(x)
        op_name = self.elementwise(name, [x], kind="dropout", fwd_flops=float(numel),
                                   bytes_moved=3.0 * numel * (2 * self.nbytes + 1), **kw)
        self.ops[op_name] = _replace(self.ops[op_name], saved_bytes=float(numel), saved_from="output")
        return op_name

    def opaque(self, name: str, inputs: Sequence[str], out_shape: Sequence[int], *, kind: str = "opaque",
               out_roles: Sequence[str | None] | None = None, **kw) -> str:
        """An op the solver knows nothing about: only a shared batch dim 0 may be split."""
        out_shape = tuple(out_shape)
        terms, out = [], []
        batch_ok = all(self.roles(x)[:1] == ("batch",) and self.shape(x)[0] == out_shape[0] for x in inputs)
        for j, x in enumerate(inputs):
            terms.append(tuple(("b" if (i == 0 and batch_ok) else f"{_LETTERS[j]}{i}") for i in range(len(
                self.shape(x)))))
        out = tuple("b" if (i == 0 and batch_ok) else f"o{i}" for i in range(len(out_shape)))
        no_split = frozenset(label for t in terms for label in t if label != "b") | frozenset(
            label for label in out if label != "b")
        numel = math.prod(out_shape)
        roles = tuple(out_roles) if out_roles else (("batch",) if batch_ok else (None,)) + (None,) * (
            len(out_shape) - 1)
        return self._add(Op(name=name, kind=kind, out_shape=out_shape, inputs=tuple(inputs), dtype_bytes=self.nbytes,
                            in_labels=tuple(terms), out_labels=out, no_split=no_split,
                            label_names=(("b", "batch"),), differentiable=(True,) * len(inputs),
                            fwd_flops=kw.pop("fwd_flops", float(numel)), bwd_flops=kw.pop("bwd_flops", float(numel)),
                            bytes_moved=kw.pop("bytes_moved", 3.0 * 2 * numel * self.nbytes),
                            saved_bytes=kw.pop("saved_bytes", 0.0), roles=roles,
                            module_path=kw.pop("module_path", "")))

    # -- followers --------------------------------------------------------------------------
    def follow(self, name: str, x: str, out_shape: Sequence[int], dim_map: Sequence[int | None], *,
               kind: str, linear: bool, roles: Sequence[str | None] | None = None, fwd_flops: float = 0.0,
               bytes_moved: float = 0.0, saved_bytes: float = 0.0, saved_from: str = "inputs",
               module_path: str = "") -> str:
        out_shape = tuple(out_shape)
        if roles is None:
            moved_roles: list[str | None] = [None] * len(out_shape)
            for d, r in zip(dim_map, self.roles(x)):
                if d is not None:
                    moved_roles[d] = r
            roles = moved_roles
        return self._add(Op(name=name, kind=kind, out_shape=out_shape, inputs=(x,), dtype_bytes=self.ops[x].dtype_bytes,
                            follows=True, dim_map=tuple(dim_map), linear=linear, roles=tuple(roles),
                            fwd_flops=fwd_flops, bwd_flops=fwd_flops, bytes_moved=bytes_moved,
                            saved_bytes=saved_bytes, saved_from=saved_from, module_path=module_path))

    def pointwise(self, name: str, x: str, *, kind: str = "gelu", linear: bool = False, saved: bool = True,
                  **kw) -> str:
        """Unary pointwise op (gelu, scale by a constant, mask fill): follows its producer."""
        numel = self._numel(x)
        nd = len(self.shape(x))
        return self.follow(name, x, self.shape(x), tuple(range(nd)), kind=kind, linear=linear,
                           fwd_flops=kw.pop("fwd_flops", 8.0 * numel),
                           bytes_moved=kw.pop("bytes_moved", 3.0 * 2 * numel * self.nbytes),
                           saved_bytes=numel * self.nbytes if saved else 0.0, **kw)

    def softmax(self, name: str, x: str, *, dim: int = -1, **kw) -> str:
        nd = len(self.shape(x))
        dim %= nd
        numel = self._numel(x)
        return self.follow(name, x, self.shape(x), tuple(None if i == dim else i for i in range(nd)),
                           kind="softmax", linear=False, fwd_flops=5.0 * numel,
                           bytes_moved=3.0 * 2 * numel * self.nbytes, saved_bytes=numel * self.nbytes,
                           saved_from="output", **kw)

    def transpose(self, name: str, x: str, d0: int, d1: int, **kw) -> str:
        nd = len(self.shape(x))
        perm = list(range(nd))
        perm[d0 % nd], perm[d1 % nd] = perm[d1 % nd], perm[d0 % nd]
        return self.permute(name, x, perm, **kw)

    def permute(self, name: str, x: str, perm: Sequence[int], **kw) -> str:
        """Output dim ``i`` is input dim ``perm[i]`` (as ``torch.permute``)."""
        shape = self.shape(x)
        dim_map: list[int | None] = [None] * len(shape)
        for out_dim, in_dim in enumerate(perm):
            dim_map[in_dim] = out_dim
        return self.follow(name, x, tuple(shape[p] for p in perm), dim_map, kind=kw.pop("kind", "transpose"),
                           linear=True, **kw)

    def reshape(self, name: str, x: str, shape: Sequence[int], **kw) -> str:
        """A view / reshape: a split dim passes when it is the major dim of its group (see view_dim_map)."""
        shape = tuple(int(d) for d in shape)
        dim_map, roles = view_dim_map(self.shape(x), shape, self.roles(x))
        return self.follow(name, x, shape, dim_map, kind=kw.pop("kind", "view"), linear=True, roles=roles, **kw)

    def chunk(self, name: str, x: str, dim: int, chunks: int, **kw) -> str:
        """One piece of ``split``/``chunk`` along ``dim``.

        A split of that dim passes through, which assumes the runtime lays the fused tensor out
        so that every rank's slice holds its part of each chunk (Megatron's per-head qkv order).
        """
        shape = list(self.shape(x))
        nd = len(shape)
        dim %= nd
        if shape[dim] % chunks:
            raise ValueError(f"chunk {name}: dim {dim} of size {shape[dim]} does not split into {chunks}")
        shape[dim] //= chunks
        return self.follow(name, x, tuple(shape), tuple(range(nd)), kind=kw.pop("kind", "chunk"), linear=True, **kw)


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
    return tuple(dim_map), tuple(out_roles)


def _replace(op: Op, **changes) -> Op:
    from dataclasses import replace

    return replace(op, **changes)
