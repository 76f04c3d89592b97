"""Tracer's op-level cost graph → the intra-op :class:`OpGraph` of one layer.

The tracer records, per fx node, its kind, shapes, parameters and measured per-sample costs, but
not its call arguments, so some facts are recovered from shapes:

* which tensors are activations: those reachable from a placeholder through tensor-valued
  nodes; buffers (the causal mask), ``arange`` of a size, and shape queries are constants, which
  any rank can produce in any layout, so they are dropped;
* batch and sequence dims: dim 0 of an activation entering the layer is the batch when it
  equals the traced batch, dim 1 the sequence when it equals ``CostGraph.seq_len``; roles then
  follow the ops (a linear keeps its leading dims, a view moves them);
* a transpose's two dims: the pair whose swap turns the input shape into the output shape; if
  equal sizes make that ambiguous, splits of those dims are not passed through (noted);
* ``softmax`` is assumed to normalise the last dim; ``split`` followed by ``getitem`` is a chunk;
  a ``getitem`` that shrinks dims is a slice (RoPE's halves), one that only adds size-1 dims a
  view; reductions, ``cat`` and ``expand`` find their dim from the shapes;
* parameters read by functional ops (``x * self.weight``, ``bmm(x, self.w_up)``) are operands of
  that op: an elementwise op with a weight, or a matmul with a stacked weight (experts).

Costs are the traced ones (per sample) times ``batch_size``; parameter reads are not scaled.
Unknown op kinds become *opaque* ops that may only split the batch.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import replace
from typing import TYPE_CHECKING

from planner.intra_op.builder import GraphBuilder
from planner.intra_op.graph import DTYPE_BYTES, OpGraph, Param, view_dim_map

if TYPE_CHECKING:  # the tracer imports torch; reading its graph does not need it
    from planner.trace.graph import CostGraph

_POINTWISE = {"gelu", "relu", "silu", "tanh", "sigmoid", "exp", "log", "sqrt", "rsqrt", "pow", "neg", "abs",
              "erf", "sin", "cos", "newgeluactivation", "geluactivation", "quickgeluactivation", "mish",
              "hardtanh", "leaky_relu", "elu", "softplus", "masked_fill", "add", "sub", "where", "clamp"}
_SCALING = {"mul", "truediv", "div", "contiguous", "clone", "to", "float", "half", "bfloat16", "type_as",
            "identity", "detach"}
_VIEWS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
_TRANSPOSES = {"transpose", "permute", "t", "swapaxes"}
_SPLITS = {"split", "chunk", "unbind", "tensor_split"}
_BINARY = {"add", "sub", "mul", "truediv", "div", "masked_fill", "where", "iadd", "maximum", "minimum"}
_SOFTMAX = {"softmax", "log_softmax"}
_MATMUL = {"matmul", "bmm", "mm"}
_REDUCE = {"sum", "mean", "amax", "amin", "var", "std", "logsumexp", "norm"}
_CAT = {"cat", "concat", "concatenate"}
_EXPAND = {"expand", "expand_as", "repeat"}
_TORCH_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int64": "int64", "bool": "bool"}


def traced_batch(cost_graph: CostGraph) -> int:
    """The batch the model was traced with: dim 0 of the first placeholder."""
    for _, data in cost_graph.ops.nodes(data=True):
        if data["kind"] == "placeholder" and data["output_shapes"] and data["output_shapes"][0]:
            return int(data["output_shapes"][0][0])
    return 1


def activation_nodes(cost_graph: CostGraph) -> set[str]:
    """Tensor-valued nodes that depend on a model input (everything else is a constant)."""
    g = cost_graph.ops
    active: set[str] = set()
    for node, data in g.nodes(data=True):
        if not data["output_shapes"]:
            continue
        if data["kind"] == "placeholder" or any(p in active for p in g.predecessors(node)):
            active.add(node)
    return active


def layer_nodes(cost_graph: CostGraph) -> dict[int, list[str]]:
    """Nodes of each layer in execution order."""
    out: dict[int, list[str]] = defaultdict(list)
    for node, data in cost_graph.ops.nodes(data=True):
        out[data["layer"]].append(node)
    return out


def external_inputs(cost_graph: CostGraph, nodes: list[str], active: set[str]) -> list[str]:
    """Activations from other layers that ``nodes`` read, ordered by first use then operand."""
    inside = set(nodes)
    seen: list[str] = []
    for node in nodes:
        for p in cost_graph.ops.predecessors(node):
            if p in active and p not in inside and p not in seen:
                seen.append(p)
    return seen


def op_graph_from_cost_graph(cost_graph: CostGraph, layer: int, *, batch_size: int | None = None) -> OpGraph:
    """The :class:`OpGraph` of layer ``layer`` for a step of ``batch_size`` samples (default: traced)."""
    if not 0 <= layer < cost_graph.num_layers:
        raise ValueError(f"layer: got {layer}; the model has layers 0..{cost_graph.num_layers - 1}")
    return layer_op_graph(cost_graph, layer, batch_size=batch_size, active=activation_nodes(cost_graph),
                          nodes=layer_nodes(cost_graph)[layer])


def layer_op_graph(cost_graph: CostGraph, layer: int, *, batch_size: int | None, active: set[str],
                   nodes: list[str]) -> OpGraph:
    """:func:`op_graph_from_cost_graph` with the whole-graph scans done once by the caller."""
    b0 = traced_batch(cost_graph)
    batch = batch_size or b0
    if batch < 1:
        raise ValueError(f"batch_size: got {batch_size}; expected a positive integer")
    conv = _Converter(cost_graph, active, b0=b0, batch=batch,
                      name=cost_graph.layers[layer].name if cost_graph.layers else f"layer{layer}")
    for src in external_inputs(cost_graph, nodes, active):
        conv.add_input(src)
    for node in nodes:
        conv.add(node)
    g = cost_graph.ops
    inside = set(nodes)
    outputs = [n for n in nodes if n in conv.b.ops and not conv.b.ops[n].is_input
               and (g.out_degree(n) == 0 or any(s not in inside for s in g.successors(n)))]
    return conv.b.build(outputs=outputs)


class _Converter:
    """Adds traced nodes to a :class:`GraphBuilder`, keeping traced shapes beside scaled ones."""

    def __init__(self, cost_graph: CostGraph, active: set[str], *, b0: int, batch: int, name: str) -> None:
        self.cg = cost_graph
        self.g = cost_graph.ops
        self.active = active
        self.b0 = b0
        self.batch = batch
        self.b = GraphBuilder(name, dtype=cost_graph.dtype)
        self.traced: dict[str, tuple[int, ...]] = {}  # traced output shape of each added op
        self.chunk_of: dict[str, str] = {}  # split node → its input

    # -- helpers --------------------------------------------------------------------------------
    def _scaled(self, shape, roles) -> tuple[int, ...]:
        return tuple(d * self.batch // self.b0 if r == "batch" else d for d, r in zip(shape, roles))

    def _dtype(self, data) -> str | None:
        return _TORCH_DTYPES.get(data["dtypes"][0]) if data.get("dtypes") else None

    def _param_nodes(self, node: str) -> list[Param]:
        """Parameters read through ``get_attr`` nodes (``x * self.weight``, ``bmm(x, self.w_up)``)."""
        out = []
        for p in self.g.predecessors(node):
            data = self.g.nodes[p]
            if data["kind"] == "get_attr" and data["params"]:
                (name, shape), = data["params"].items()
                out.append(Param(name=name, shape=tuple(shape), owned=data["param_bytes"] > 0))
        return out

    def _costs(self, node: str) -> dict[str, float]:
        data = self.g.nodes[node]
        shapes = list(data["params"].values()) + [p.shape for p in self._param_nodes(node)]
        weights = sum(math.prod(s) for s in shapes) * DTYPE_BYTES[self.cg.dtype]
        activations = max((data["bytes_read"] + data["bytes_written"]) * self.b0 - weights, 0.0)
        return {"fwd_flops": data["fwd_flops"] * self.batch, "bwd_flops": data["bwd_flops"] * self.batch,
                "bytes_moved": 3.0 * (activations * self.batch / self.b0 + weights),
                "saved_bytes": data["activation_bytes"] * self.batch}

    def _finish(self, node: str, traced_shape: tuple[int, ...]) -> None:
        """Measured costs and module path replace the builder's estimates."""
        op = self.b.ops[node]
        self.b.ops[node] = replace(op, module_path=self.g.nodes[node]["module_path"], **self._costs(node))
        self.traced[node] = traced_shape

    def add_input(self, src: str) -> None:
        data = self.g.nodes[src]
        shape = tuple(data["output_shapes"][0])
        roles: list[str | None] = [None] * len(shape)
        if shape and shape[0] == self.b0:
            roles[0] = "batch"
        if len(shape) >= 2 and self.cg.seq_len and shape[1] == self.cg.seq_len:
            roles[1] = "seq"
        dtype = self._dtype(data)
        self.b.input(src, self._scaled(shape, roles), roles=roles, dtype=dtype,
                     differentiable=dtype not in ("int64", "bool"))
        self.traced[src] = shape

    def _constant_ids(self, node: str, shape: tuple[int, ...]) -> str:
        name = f"{node}.ids"
        roles = tuple("seq" if self.cg.seq_len and d == self.cg.seq_len else None for d in shape)
        self.b.input(name, shape, roles=roles, dtype="int64", differentiable=False)
        self.traced[name] = shape
        return name

    # -- one node -------------------------------------------------------------------------------
    def add(self, node: str) -> None:
        data = self.g.nodes[node]
        if node not in self.active and not (data["params"] and data["kind"] == "embedding"):
            return  # a constant or a shape query
        kind = data["kind"]
        if kind == "placeholder":
            self.add_input(node)
            return
        ins = [p for p in self.g.predecessors(node) if p in self.b.ops]
        out = tuple(data["output_shapes"][0]) if data["output_shapes"] else ()
        b = self.b
        params = data["params"]
        owned = data["param_bytes"] > 0
        # parameters of a functional op: on the consumer (``x * self.weight``) or on a get_attr input
        attrs = self._param_nodes(node)
        conv1d = _conv1d_params(kind, params, ins, attrs)
        if params and kind not in ("linear", "embedding") and "norm" not in kind and conv1d is None:
            attrs += [Param(name=n, shape=tuple(sh), owned=owned) for n, sh in params.items()]
        if conv1d is not None:  # transformers' Conv1D: x @ W + b, W [in, out]
            weight, bias = conv1d
            b.linear(node, ins[0], params[weight][1], bias=True, weight_name=weight, bias_name=bias, owned=owned,
                     transposed=True)
        elif attrs and ins:
            self._with_params(node, kind, ins, attrs, out)
        elif kind == "embedding" and params:
            (pname, pshape), = params.items()
            ids = ins[0] if ins else self._constant_ids(node, tuple(data["input_shapes"][0]) if data[
                "input_shapes"] else out[:-1])
            b.embedding(node, ids, pshape[0], pshape[1], weight_name=pname, owned=owned)
        elif kind == "linear" and ins:
            weight = next(n for n, s in params.items() if len(s) == 2)
            bias = next((n for n, s in params.items() if len(s) == 1), None)
            b.linear(node, ins[0], params[weight][0], bias=bias is not None, weight_name=weight, bias_name=bias,
                     owned=owned)
        elif "norm" in kind and kind not in ("batchnorm1d", "batchnorm2d", "groupnorm") and len(ins) == 1:
            names = list(params)
            b.norm(node, ins[0], kind=kind, bias=len(names) > 1, weight_name=names[0] if names else None,
                   bias_name=names[1] if len(names) > 1 else None)
        elif kind.startswith("dropout") and len(ins) == 1:
            b.dropout(node, ins[0])
        elif kind in _MATMUL and len(ins) == 2 and self._matmul_ok(ins):
            b.matmul(node, ins[0], ins[1])
        elif kind == "scaled_dot_product_attention" and len(ins) == 3:
            self._attention(node, ins)
        elif len(ins) == 1 and not params:
            self._unary(node, kind, ins[0], out)
            return
        elif kind in _CAT and len(ins) >= 2 and self._cat_dim(ins, out) is not None:
            b.concat(node, ins, self._cat_dim(ins, out))
        elif kind in _BINARY and len(ins) >= 2 and not params:
            b.elementwise(node, ins, kind=kind, saved=kind == "mul")
        else:
            roles = ("batch",) + (None,) * (len(out) - 1) if out and out[0] == self.b0 else (None,) * len(out)
            b.opaque(node, ins, self._scaled(out, roles), kind=kind, out_roles=roles)
            self.b.notes.append(f"{node} ({kind}): unknown to the intra-op solver; it may only split the batch")
        self._finish(node, out)

    def _with_params(self, node: str, kind: str, ins: list[str], params: list[Param], out: tuple[int, ...]) -> None:
        b = self.b
        if kind in _MATMUL and len(ins) == 1 and len(params) == 1 and len(params[0].shape) >= 2:
            b.matmul_param(node, ins[0], params[0])
        elif kind in _BINARY and ins:
            b.elementwise(node, ins, kind=kind, params=params, saved=kind == "mul")
        else:
            roles = ("batch",) + (None,) * (len(out) - 1) if out and out[0] == self.b0 else (None,) * len(out)
            b.opaque(node, ins, self._scaled(out, roles), kind=kind, out_roles=roles)
            b.ops[node] = replace(b.ops[node], params=tuple(params),
                                  param_labels=tuple(tuple(f"p{j}_{i}" for i in range(len(p.shape)))
                                                     for j, p in enumerate(params)),
                                  no_split=b.ops[node].no_split | {f"p{j}_{i}" for j, p in enumerate(params)
                                                                   for i in range(len(p.shape))})
            b.notes.append(f"{node} ({kind}): unknown to the intra-op solver; it may only split the batch")
        self._finish(node, out)

    def _cat_dim(self, ins: list[str], out: tuple[int, ...]) -> int | None:
        shapes = [self.traced[x] for x in ins]
        if any(len(sh) != len(out) for sh in shapes):
            return None
        dims = [i for i in range(len(out)) if any(sh[i] != out[i] for sh in shapes)]
        if len(dims) == 1 and sum(sh[dims[0]] for sh in shapes) == out[dims[0]]:
            return dims[0]
        return None

    def _reduced_roles(self, tin, out, roles) -> tuple:
        if len(out) == len(tin):
            return tuple(r if a == c else None for r, a, c in zip(roles, tin, out))
        drop = _removed_dim(tin, out)
        return tuple(r for i, r in enumerate(roles) if i != drop) if drop is not None else (None,) * len(out)

    def _matmul_ok(self, ins: list[str]) -> bool:
        sa, sb = self.b.shape(ins[0]), self.b.shape(ins[1])
        return len(sa) == len(sb) >= 2 and sa[:-2] == sb[:-2] and sa[-1] == sb[-2]

    def _attention(self, node: str, ins: list[str]) -> None:
        q, k, v = ins
        lead = ["b", "h"][: len(self.b.shape(q)) - 2]
        labels = [(*lead, "s", "d"), (*lead, "t", "d"), (*lead, "t", "e")]
        self.b.einsum_labels(node, ins, labels, [], [], (*lead, "s", "e"), kind="attention",
                             no_split=frozenset("tde"), names={"s": "query_seq"})

    def _unary(self, node: str, kind: str, x: str, out: tuple[int, ...]) -> None:
        """A one-input node: a split, chunk, reduction, broadcast or slice (:meth:`_reshaping`), else an
        elementwise op, softmax, view, transpose or an op the solver does not know (:meth:`_same_data`)."""
        tin = self.traced[x]
        roles = self.b.roles(x)
        if self._reshaping(node, kind, x, out, tin, roles):
            return
        if kind == "getitem" and out != tin and math.prod(out) == math.prod(tin):
            kind = "view"  # x[:, None]: indexing that only adds or drops size-1 dims
        self._same_data(node, kind, x, out, tin, roles)
        self._finish(node, out)

    def _reshaping(self, node: str, kind: str, x: str, out: tuple[int, ...], tin: tuple[int, ...],
                   roles: tuple[str | None, ...]) -> bool:
        """Add ``node`` when it splits, chunks, reduces, broadcasts or slices ``x`` (each its own rule for
        which splits pass); ``False`` when it is none of these, so :meth:`_unary` goes on."""
        b = self.b
        if kind in _SPLITS:
            b.follow(node, x, b.shape(x), tuple(range(len(tin))), kind=kind, linear=True)
            self.chunk_of[node] = x
            self._finish(node, tin)
            return True
        if kind == "getitem" and x in self.chunk_of and len(out) == len(tin):
            diff = [i for i, (a, c) in enumerate(zip(tin, out)) if a != c]
            if len(diff) == 1 and tin[diff[0]] % out[diff[0]] == 0:
                b.chunk(node, x, diff[0], tin[diff[0]] // out[diff[0]])
                self._finish(node, out)
                return True
        if kind in _REDUCE and len(out) <= len(tin) and math.prod(out) < math.prod(tin):
            try:
                b.reduce(node, x, self._scaled(out, self._reduced_roles(tin, out, roles)), kind=kind)
                self._finish(node, out)
                return True
            except ValueError:
                pass  # which dims were reduced is ambiguous: opaque below
        if kind in _EXPAND and len(out) == len(tin):
            dim_map = tuple(i if a == c else None for i, (a, c) in enumerate(zip(tin, out)))
            scaled = tuple(sb if d is not None else c for sb, d, c in zip(b.shape(x), dim_map, out))
            b.follow(node, x, scaled, dim_map, kind=kind, linear=True)
            self._finish(node, out)
            return True
        if kind == "getitem" and len(out) == len(tin) and out != tin and all(c <= a for a, c in zip(tin, out)):
            # a slice (RoPE's halves): the sliced dims cannot stay split, the others can
            dim_map = tuple(i if a == c else None for i, (a, c) in enumerate(zip(tin, out)))
            scaled = tuple(sb if d is not None else c for sb, d, c in zip(b.shape(x), dim_map, out))
            b.follow(node, x, scaled, dim_map, kind="slice", linear=True)
            self._finish(node, out)
            return True
        return False

    def _same_data(self, node: str, kind: str, x: str, out: tuple[int, ...], tin: tuple[int, ...],
                   roles: tuple[str | None, ...]) -> None:
        """Add ``node`` when it keeps ``x``'s elements: elementwise, softmax, view or transpose; else an
        opaque op that may only split the batch (with a note). The caller finishes the node."""
        b = self.b
        if out == tin and (kind in _SCALING or kind == "getitem" or kind in _CAT):
            # (a cat with one activation and an output of its shape appends an empty constant: a key/value
            # cache of length 0, as a Hugging Face forward with ``use_cache`` traces; an identity)
            b.pointwise(node, x, kind=kind, linear=True, saved=False)
        elif out == tin and (kind in _POINTWISE or kind.endswith("activation")):
            b.pointwise(node, x, kind=kind, linear=False)
        elif out == tin and kind in _SOFTMAX:
            b.softmax(node, x)
        elif kind in _VIEWS and math.prod(out) == math.prod(tin):
            dim_map, out_roles = view_dim_map(tin, out, roles)
            scaled = self._scaled(out, out_roles)
            if math.prod(scaled) != math.prod(b.shape(x)):
                b.notes.append(f"{node}: could not place the batch in view {tin} -> {out}; splits do not pass")
                dim_map, scaled = (None,) * len(tin), tuple(out[:-1]) + (math.prod(b.shape(x)) // math.prod(
                    out[:-1]),)
            b.follow(node, x, scaled, dim_map, kind=kind, linear=True, roles=out_roles)
        elif kind in _TRANSPOSES and sorted(out) == sorted(tin):
            perm, ambiguous = _infer_perm(tin, out)
            if ambiguous:
                b.notes.append(f"{node}: transpose {tin} -> {out} is ambiguous; splits of dims {ambiguous} "
                               "do not pass through it")
            b.permute(node, x, perm, kind=kind)
            if ambiguous:
                op = b.ops[node]
                b.ops[node] = replace(op, dim_map=tuple(None if i in ambiguous else d
                                                        for i, d in enumerate(op.dim_map)))
        else:
            roles_out = ("batch",) + (None,) * (len(out) - 1) if out and out[0] == self.b0 else (None,) * len(out)
            b.opaque(node, [x], self._scaled(out, roles_out), kind=kind, out_roles=roles_out)
            b.notes.append(f"{node} ({kind}): unknown to the intra-op solver; it may only split the batch")


def _conv1d_params(kind: str, params: dict, ins: list[str], attrs: list[Param]) -> tuple[str, str] | None:
    """``(weight, bias)`` names when the node is ``addmm(bias, x, W)`` of a module's own ``W [in, out]`` and
    ``b [out]`` (transformers' ``Conv1D``, as ``torch.export`` records it), else ``None``."""
    if kind != "addmm" or len(ins) != 1 or attrs or len(params) != 2:
        return None
    weight = next((n for n, s in params.items() if len(s) == 2), None)
    bias = next((n for n, s in params.items() if len(s) == 1), None)
    if weight is None or bias is None or tuple(params[bias])[0] != tuple(params[weight])[1]:
        return None
    return weight, bias


def _removed_dim(src: tuple[int, ...], dst: tuple[int, ...]) -> int | None:
    return next((i for i in range(len(src)) if src[:i] + src[i + 1:] == dst), None)


def _infer_perm(src: tuple[int, ...], dst: tuple[int, ...]) -> tuple[list[int], set[int]]:
    """``perm`` with ``dst[i] == src[perm[i]]``; input dims whose place is a guess are returned too."""
    diff = [i for i, (a, c) in enumerate(zip(src, dst)) if a != c]
    if len(diff) == 2 and src[diff[0]] == dst[diff[1]] and src[diff[1]] == dst[diff[0]]:
        perm = list(range(len(src)))
        perm[diff[0]], perm[diff[1]] = diff[1], diff[0]
        return perm, set()  # the one swap that explains the shapes (equal sizes elsewhere stay put)
    used: set[int] = set()
    perm, ambiguous = [], set()
    for size in dst:
        candidates = [j for j, s in enumerate(src) if s == size and j not in used]
        if len([j for j, s in enumerate(src) if s == size]) > 1:
            ambiguous.update(j for j, s in enumerate(src) if s == size)
        perm.append(candidates[0])
        used.add(candidates[0])
    return perm, ambiguous
