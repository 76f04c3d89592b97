"""The cost graph: what the solvers see of a model.

Two views of one trace:

* ``ops``: a networkx DiGraph with one node per traced operation. Node attributes: ``kind``,
  ``target``, ``module_path``, ``layer`` (index), ``input_shapes``, ``output_shapes``,
  ``input_dtypes``, ``output_dtypes`` (``dtypes`` is the same list), ``fwd_flops``,
  ``bwd_flops``, ``bytes_read``, ``bytes_written``, ``params`` (name -> shape),
  ``param_bytes`` (parameters first used here; a shared parameter counts once),
  ``activation_bytes`` (saved for backward, once per layer), ``replayed_from`` (the node whose
  measured costs a replayed block's node carries; empty when measured itself). Edges carry
  ``bytes`` (the tensor passed). With a module-level trace a node is a whole layer call.
* ``layers``: the same costs summed per *layer* (a pipeline-stage building block: a top-level
  submodule, with ModuleList/Sequential containers opened), in topological order, plus a
  layer-level DiGraph whose edges carry the bytes crossing between layers.

All per-layer figures are **per sample** (batch 1 at the traced sequence length); every one of
them is linear in the batch, so the cost model scales them by the micro-batch size.

Repeated structure: layers with equal ``signature`` have the same ops, shapes, parameter shapes
and costs. ``groups()`` gives runs of equal layers (``96 x blocks.*``); ``block_groups()`` also
finds repeating *patterns* of several layers (alternating attention / MoE blocks, or the two
sub-layers of a block traced as separate layers) and returns typed :class:`LayerGroup` s;
``group_graph()`` is the layer graph collapsed to those groups.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field

import networkx as nx


@dataclass(frozen=True, kw_only=True)
class OpCost:
    """One operation's per-sample compute profile, enough for a roofline and a GEMM-shape efficiency.

    ``m, n, k`` are set for matrix multiplies (``flops = 2·m·n·k``, batch dims folded into ``m``);
    ``m`` scales with the micro-batch, ``n``/``k`` are split by tensor parallelism.
    """

    kind: str
    flops: float
    bytes: float
    m: int = 0
    n: int = 0
    k: int = 0
    causal: bool = False  # a fused attention kernel under a causal mask: it computes half the scores


@dataclass(frozen=True, kw_only=True)
class TiedParam:
    """A parameter used by this layer but owned (first used) by an earlier layer."""

    name: str
    numel: int
    owner: int
    frozen: bool = False  # requires_grad=False: held, never given a gradient or optimizer state


@dataclass(frozen=True, kw_only=True)
class ExpertRouting:
    """One mixture-of-experts module inside a layer, as the trace found it: what expert parallelism
    splits (``expert_params``: the stacked expert weights, ``num_experts`` of them) and what it sends
    (every token's ``top_k`` choices, ``hidden`` values each, padded to ``capacity_factor``)."""

    num_experts: int
    top_k: int
    capacity_factor: float
    hidden: int
    expert_params: int


@dataclass(frozen=True, kw_only=True)
class Layer:
    """Per-sample costs of one layer. Repeated blocks have equal ``signature``."""

    index: int
    name: str
    module_type: str
    signature: str
    fwd_flops: float
    bwd_input_flops: float
    bwd_weight_flops: float
    param_count: int
    tied_params: tuple[TiedParam, ...] = ()
    # Of ``param_count``: parameters with requires_grad=False (a frozen backbone, LoRA's base weights).
    # They are held like the others but have no gradient, no optimizer state and no data-parallel reduction.
    frozen_count: int = 0
    # Parameter tensors it owns that train: what an optimizer's per-tensor loop steps over (0 in a graph
    # stored before it was counted).
    trained_tensors: int = 0
    activation_bytes: float
    replicated_activation_bytes: float
    attention_activation_bytes: float
    attention_fwd_flops: float
    input_bytes: float
    output_bytes: float
    op_costs: tuple[OpCost, ...] = ()
    num_ops: int = 0
    # Bytes per sample the per-op checkpointing policy keeps (planner.trace.saved_ops); None in a graph
    # stored before it was traced (the cost model then estimates it from the GEMM shapes).
    op_saved_bytes: float | None = None
    # Of ``activation_bytes`` (and of ``replicated_activation_bytes``): what the eager trace saves and a
    # trainer that fuses element-wise chains does not keep (planner.trace.assemble.pointwise_saved).
    # None in a graph stored before it was traced.
    pointwise_saved_bytes: float | None = None
    pointwise_replicated_bytes: float = 0.0
    # Of ``activation_bytes``: what linears save as their inputs, alone and shared with other ops
    # (planner.trace.assemble.linear_saved; Transformer Engine keeps FP8 copies of them).
    linear_input_bytes: float = 0.0
    linear_shared_input_bytes: float = 0.0
    experts: tuple[ExpertRouting, ...] = ()  # its mixture-of-experts modules (empty: a dense layer)

    @property
    def bwd_flops(self) -> float:
        return self.bwd_input_flops + self.bwd_weight_flops

    @property
    def total_param_count(self) -> int:
        """Own parameters plus tied ones: what a stage holding only this layer stores."""
        return self.param_count + sum(t.numel for t in self.tied_params)


@dataclass(frozen=True, kw_only=True)
class LayerGroup:
    """``count`` consecutive repetitions of a pattern of ``period`` layers (period 1: "L x block")."""

    signatures: tuple[str, ...]
    indices: tuple[int, ...]
    names: tuple[str, ...]
    module_types: tuple[str, ...]

    @property
    def period(self) -> int:
        return len(self.signatures)

    @property
    def count(self) -> int:
        return len(self.indices) // self.period

    @property
    def repeated(self) -> bool:
        return self.count > 1

    @property
    def name(self) -> str:
        """``blocks.*`` for a run of ``blocks.0 … blocks.N``; the layer name for a single layer."""
        if not self.repeated:
            return self.names[0] if self.period == 1 else "(" + ", ".join(self.names) + ")"
        first = self.names[0]
        stem = first.rsplit(".", 1)[0] if "." in first else first
        if all(n.startswith(stem + ".") for n in self.names):
            return f"{stem}.*"
        return f"{first}..{self.names[-1]}"

    def describe(self) -> str:
        if not self.repeated:
            return self.name
        kinds = ", ".join(dict.fromkeys(self.module_types))
        return f"{self.count} x {self.name} ({kinds})"


@dataclass(kw_only=True)
class CostGraph:
    """A traced model: op-level graph, layer list and layer-level graph, with provenance notes."""

    name: str
    ops: nx.DiGraph
    layers: list[Layer]
    layer_graph: nx.DiGraph
    dtype: str
    seq_len: int | None
    param_count: int
    method: str
    notes: list[str] = field(default_factory=list)
    trace_time_s: float = 0.0
    # How the model computes attention, as traced: "fused" (SDPA's flash / memory-efficient kernel:
    # no s x s scores in memory), "eager" (scores materialised), "none", or "" (not recorded).
    attention: str = ""

    @property
    def frozen_param_count(self) -> int:
        """Parameters with requires_grad=False (:attr:`Layer.frozen_count`, each counted by its owner)."""
        return sum(layer.frozen_count for layer in self.layers)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def fwd_flops(self) -> float:
        return sum(layer.fwd_flops for layer in self.layers)

    @property
    def train_flops(self) -> float:
        """Forward + backward FLOPs per sample (no recomputation)."""
        return sum(layer.fwd_flops + layer.bwd_flops for layer in self.layers)

    @property
    def activation_bytes(self) -> float:
        return sum(layer.activation_bytes for layer in self.layers)

    def is_chain(self) -> bool:
        """True when every layer feeds only the next one (skip edges make it a general DAG)."""
        for u, v in self.layer_graph.edges:
            if v != u + 1:
                return False
        return True

    def groups(self) -> list[tuple[str, list[int]]]:
        """Runs of consecutive layers with equal signature: ``[(signature, [indices...]), ...]``."""
        out: list[tuple[str, list[int]]] = []
        for layer in self.layers:
            if out and out[-1][0] == layer.signature:
                out[-1][1].append(layer.index)
            else:
                out.append((layer.signature, [layer.index]))
        return out

    def block_groups(self, max_period: int = 4) -> list[LayerGroup]:
        """Cover the layers, in order, by repeating patterns of up to ``max_period`` layers.

        Greedy from the first layer: take the pattern length that covers the most layers with at
        least two repetitions (the shortest on a tie), else a single layer. A plain stack gives
        period 1 (``96 x blocks.*``); alternating dense / MoE blocks give period 2.
        """
        sigs = [layer.signature for layer in self.layers]
        out: list[LayerGroup] = []
        i = 0
        while i < len(sigs):
            best_p, best_count = 1, 1
            for p in range(1, max_period + 1):
                pattern = sigs[i:i + p]
                if len(pattern) < p:
                    break
                count = 1
                while sigs[i + count * p:i + (count + 1) * p] == pattern:
                    count += 1
                if count > 1 and count * p > best_count * best_p:
                    best_p, best_count = p, count
            span = range(i, i + best_p * best_count)
            out.append(LayerGroup(signatures=tuple(sigs[i:i + best_p]), indices=tuple(span),
                                  names=tuple(self.layers[j].name for j in span),
                                  module_types=tuple(self.layers[j].module_type
                                                     for j in range(i, i + best_p))))
            i += best_p * best_count
        return out

    def group_graph(self) -> nx.DiGraph:
        """The layer graph with each :meth:`block_groups` group as one node.

        Node attributes: ``name``, ``count``, ``period``, ``layers`` (indices), ``fwd_flops`` and
        ``param_count`` (of the whole group); edge ``bytes``: what crosses between two groups.
        """
        g = nx.DiGraph()
        group_of: dict[int, int] = {}
        for gi, grp in enumerate(self.block_groups()):
            members = [self.layers[j] for j in grp.indices]
            g.add_node(gi, name=grp.name, count=grp.count, period=grp.period, layers=list(grp.indices),
                       fwd_flops=sum(m.fwd_flops for m in members),
                       param_count=sum(m.param_count for m in members))
            group_of.update({j: gi for j in grp.indices})
        for u, v, data in self.layer_graph.edges(data=True):
            gu, gv = group_of[u], group_of[v]
            if gu != gv:
                prev = g.edges[gu, gv]["bytes"] if g.has_edge(gu, gv) else 0.0
                g.add_edge(gu, gv, bytes=prev + data.get("bytes", 0.0))
        return g

    def layer_ops(self, index: int) -> nx.DiGraph:
        """The op-level subgraph of one layer (a view of ``ops``)."""
        return self.ops.subgraph([n for n, d in self.ops.nodes(data=True) if d.get("layer") == index])

    def group_summary(self) -> str:
        """Human form like ``embed, 96 x blocks.* (GPTBlock), head``."""
        return ", ".join(grp.describe() for grp in self.block_groups())

    def fingerprint(self) -> str:
        """Stable hash of the structure and sizes the plan depends on (not of weight values)."""
        payload = json.dumps(
            {
                "layers": [[lay.name, lay.signature, lay.param_count] for lay in self.layers],
                "seq_len": self.seq_len,
                "dtype": self.dtype,
            },
            sort_keys=True,
        )
        return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()[:16]

    def layer_summary_rows(self) -> list[dict]:
        rows = []
        for layer in self.layers:
            rows.append({"index": layer.index, "name": layer.name, "type": layer.module_type,
                         "params": layer.total_param_count, "fwd_gflops_per_sample": layer.fwd_flops / 1e9,
                         "activation_mib_per_sample": layer.activation_bytes / 2**20})
        return rows


def layer_graph_from_ops(ops: nx.DiGraph, num_layers: int) -> nx.DiGraph:
    """Collapse the op graph to layers; an edge's ``bytes`` counts each crossing tensor once."""
    g = nx.DiGraph()
    g.add_nodes_from(range(num_layers))
    crossing: dict[tuple[int, int], dict[str, float]] = defaultdict(dict)
    for u, v, data in ops.edges(data=True):
        lu, lv = ops.nodes[u]["layer"], ops.nodes[v]["layer"]
        if lu != lv and lu >= 0 and lv >= 0:
            crossing[(lu, lv)][u] = data.get("bytes", 0.0)
    for (lu, lv), producers in crossing.items():
        g.add_edge(lu, lv, bytes=float(sum(producers.values())))
    return g
