"""``GraphBuilder``: write an intra-op :class:`OpGraph` op by op, by hand or from a trace.

Each method adds one op with its einsum labels (decision ops) or its ``dim_map`` (followers),
and estimates FLOPs, bytes moved and saved activations from the shapes; ``from_trace``
overwrites those estimates with the tracer's measurements.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace

from planner.intra_op.graph import DTYPE_BYTES, ROLES, Op, OpGraph, Param, view_dim_map

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
    def einsum(self, name: str, equation: str, inputs: Sequence[str],
               params: Mapping[str, Sequence[int]] | None = None, *, no_split: str = "", **kw) -> str:
        """A GShard-style einsum over single-letter labels: ``"gsm,me->gse"`` (inputs, then params)."""
        params = params or {}
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
               bias_name: str | None = None, owned: bool = True, module_path: str | None = None,
               transposed: bool = False, **kw) -> str:
        """``y = x Wᵀ + b`` with ``W: [out, in]`` as in torch: split n = column-, k = row-parallel.

        ``transposed``: ``y = x W + b`` with ``W: [in, out]`` (transformers' ``Conv1D``, GPT-2's
        projections), op kind ``conv1d``: the same splits, on the other dims of ``W``.
        """
        lead, names = _leading_labels(self.roles(x)[:-1], reserved="kn")
        shape = (self.shape(x)[-1], out_features) if transposed else (out_features, self.shape(x)[-1])
        params = [Param(name=weight_name or f"{name}.weight", shape=shape, owned=owned)]
        labels = [("k", "n") if transposed else ("n", "k")]
        if bias:
            params.append(Param(name=bias_name or f"{name}.bias", shape=(out_features,), owned=owned))
            labels.append(("n",))
        names.update({"k": "row", "n": "column"})
        return self.einsum_labels(name, [x], [(*lead, "k")], params, labels, (*lead, "n"),
                                  kind="conv1d" if transposed else "linear",
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
        self.ops[name_op] = replace(op, seq_labels=frozenset(seq), roles=(*ra[:-2], m_role, n_role))
        return name_op

    def matmul_param(self, name: str, x: str, param: Param, **kw) -> str:
        """``x @ W`` with a parameter ``W: [..., k, n]``; leading dims shared with ``x`` (stacked experts)."""
        sx, sw = self.shape(x), param.shape
        extra = len(sw) - 2
        if sx[-1] != sw[-2] or (extra and tuple(sx[:extra]) != tuple(sw[:extra])):
            raise ValueError(f"matmul {name}: activation {sx} and parameter {param.name} {sw} do not multiply")
        lead, names = _leading_labels(self.roles(x)[:-1], reserved="kn")
        for label, role in zip(lead[:extra], self.roles(x)[:extra]):
            if role not in ("batch", "seq"):
                names[label] = "expert"  # a leading dim of a stacked weight: one slice per expert
        names.update({"k": "row", "n": "column"})
        return self.einsum_labels(name, [x], [(*lead, "k")], [param], [(*lead[:extra], "k", "n")], (*lead, "n"),
                                  kind=kw.pop("kind", "matmul"), names=names, **kw)

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
        self.ops[op_name] = replace(self.ops[op_name], bytes_moved=moved)
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
        self.ops[op_name] = replace(self.ops[op_name], elementwise=True)
        return op_name

    def elementwise(self, name: str, inputs: Sequence[str], *, kind: str = "add", saved: bool = False,
                    params: Sequence[Param] = (), **kw) -> str:
        """Elementwise op on tensors (and parameters, e.g. a norm's scale) broadcast from the right."""
        shapes = [self.shape(x) for x in inputs] + [p.shape for p in params]
        out_ndim = max(len(s) for s in shapes)
        out_shape = [1] * out_ndim
        out_roles: list[str | None] = [None] * out_ndim
        for j, s in enumerate(shapes):
            r = self.roles(inputs[j]) if j < len(inputs) else (None,) * len(s)
            for i in range(1, len(s) + 1):
                out_shape[-i] = max(out_shape[-i], s[-i])
                out_roles[-i] = out_roles[-i] or r[-i]
        lead, names = _leading_labels(out_roles, reserved="")
        terms = []
        for j, s in enumerate(shapes):
            labels = []
            for i in range(len(s)):
                pos = out_ndim - len(s) + i
                # a broadcast (size-1) dim gets a private label: it cannot be split
                labels.append(lead[pos] if s[i] == out_shape[pos] else f"{_LETTERS[j].upper()}{i}")
            terms.append(tuple(labels))
        numel = math.prod(out_shape)
        saved_bytes = sum(self._numel(x) for x in inputs) * self.nbytes if saved else 0.0
        op = Op(name=name, kind=kind, out_shape=tuple(out_shape), inputs=tuple(inputs), params=tuple(params),
                dtype_bytes=self.nbytes, in_labels=tuple(terms[:len(inputs)]), param_labels=tuple(terms[len(inputs):]),
                out_labels=tuple(lead), seq_labels=frozenset(c for c, r in zip(lead, out_roles) if r == "seq"),
                label_names=tuple(sorted(names.items())), differentiable=(True,) * len(inputs), elementwise=True,
                fwd_flops=kw.pop("fwd_flops", float(numel)), bwd_flops=float(numel),
                bytes_moved=kw.pop("bytes_moved", 3.0 * (len(shapes) + 1) * numel * self.nbytes),
                saved_bytes=saved_bytes, roles=tuple(out_roles), module_path=kw.pop("module_path", ""))
        if kw:
            raise TypeError(f"elementwise: unexpected arguments {sorted(kw)}")
        return self._add(op)

    def reduce(self, name: str, x: str, out_shape: Sequence[int], *, kind: str = "sum", **kw) -> str:
        """A sum / mean over some dims (kept as size 1, or dropped): those dims cannot be split.

        Marked elementwise: an RMSNorm written out (pow, mean, rsqrt, mul) joins the residual stream.
        """
        shape, roles = self.shape(x), self.roles(x)
        out_shape = tuple(out_shape)
        if len(out_shape) == len(shape):
            kept = [i for i in range(len(shape)) if out_shape[i] == shape[i]]
        else:
            drop = next((i for i in range(len(shape)) if shape[:i] + shape[i + 1:] == out_shape), None)
            if drop is None:
                raise ValueError(f"reduce {name}: cannot tell which dims of {shape} give {out_shape}")
            kept = [i for i in range(len(shape)) if i != drop]
        lead, names = _leading_labels([roles[i] for i in kept], reserved="")
        in_labels = [f"r{i}" for i in range(len(shape))]
        for label, i in zip(lead, kept):
            in_labels[i] = label
        out_labels = list(lead)
        if len(out_shape) == len(shape):
            out_labels = [in_labels[i] if i in kept else f"o{i}" for i in range(len(shape))]
        numel = self._numel(x)
        op = Op(name=name, kind=kind, out_shape=out_shape, inputs=(x,), dtype_bytes=self.nbytes,
                in_labels=(tuple(in_labels),), out_labels=tuple(out_labels),
                no_split=frozenset(c for c in in_labels + out_labels if c not in lead),
                seq_labels=frozenset(c for c, i in zip(lead, kept) if roles[i] == "seq"),
                label_names=tuple(sorted(names.items())), differentiable=(True,), elementwise=True,
                fwd_flops=kw.pop("fwd_flops", float(numel)), bwd_flops=float(numel),
                bytes_moved=kw.pop("bytes_moved", 3.0 * numel * self.nbytes),
                roles=tuple(roles[i] for i in kept) if len(out_shape) != len(shape) else tuple(
                    roles[i] if i in kept else None for i in range(len(shape))),
                module_path=kw.pop("module_path", ""))
        if kw:
            raise TypeError(f"reduce: unexpected arguments {sorted(kw)}")
        return self._add(op)

    def concat(self, name: str, inputs: Sequence[str], dim: int, **kw) -> str:
        """``torch.cat`` along ``dim``: that dim cannot be split, the others pass through."""
        shapes = [self.shape(x) for x in inputs]
        nd = len(shapes[0])
        dim %= nd
        lead, names = _leading_labels(self.roles(inputs[0]), reserved="")
        terms = [tuple(f"c{j}" if i == dim else lead[i] for i in range(nd)) for j in range(len(inputs))]
        out_labels = tuple("cat" if i == dim else lead[i] for i in range(nd))
        out_shape = tuple(sum(s[dim] for s in shapes) if i == dim else shapes[0][i] for i in range(nd))
        numel = math.prod(out_shape)
        op = Op(name=name, kind=kw.pop("kind", "cat"), out_shape=out_shape, inputs=tuple(inputs),
                dtype_bytes=self.nbytes, in_labels=tuple(terms), out_labels=out_labels,
                no_split=frozenset({"cat"} | {f"c{j}" for j in range(len(inputs))}),
                seq_labels=frozenset(c for c, r in zip(lead, self.roles(inputs[0])) if r == "seq"),
                label_names=tuple(sorted(names.items())), differentiable=(True,) * len(inputs),
                fwd_flops=0.0, bwd_flops=0.0, bytes_moved=kw.pop("bytes_moved", 3.0 * 2 * numel * self.nbytes),
                roles=self.roles(inputs[0]), module_path=kw.pop("module_path", ""))
        if kw:
            raise TypeError(f"concat: unexpected arguments {sorted(kw)}")
        return self._add(op)

    def add(self, name: str, a: str, b: str, **kw) -> str:
        return self.elementwise(name, [a, b], kind="add", **kw)

    def dropout(self, name: str, x: str, **kw) -> str:
        """Dropout is a decision op (not a follower) so that sequence parallelism can split it."""
        numel = self._numel(x)
        op_name = self.elementwise(name, [x], kind="dropout", fwd_flops=float(numel),
                                   bytes_moved=3.0 * numel * (2 * self.nbytes + 1), **kw)
        self.ops[op_name] = replace(self.ops[op_name], saved_bytes=float(numel), saved_from="output")
        return op_name

    def opaque(self, name: str, inputs: Sequence[str], out_shape: Sequence[int], *, kind: str = "opaque",
               out_roles: Sequence[str | None] | None = None, **kw) -> str:
        """An op the solver knows nothing about: only a shared batch dim 0 may be split."""
        out_shape = tuple(out_shape)
        terms, out = [], []
        # a 0-d input or output (a scalar, a log-sum-exp reduced away) has no batch dim to share
        batch_ok = bool(out_shape) and all(self.roles(x)[:1] == ("batch",) and self.shape(x)[:1] == out_shape[:1]
                                           for x in inputs)
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
