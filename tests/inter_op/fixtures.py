"""Small cost graphs with known shapes, for the stage solver's tests and benchmark (bench/inter_op.py).

Each builder returns a real :class:`~planner.trace.graph.CostGraph` (per-sample costs, a
layer graph with edge ``bytes``), so the solvers price it with the same cost model as a traced
model. Compute is one matrix-multiply op per layer with no shape penalty (``m = 0``): layer
time is ``flops / (peak × gemm_efficiency_max)``, which keeps the fixtures easy to reason about.

* :func:`uniform_blocks`: identical blocks, a chain (every split method should agree).
* :func:`imbalanced_lm`: an embedding and an LM head far heavier than a block.
* :func:`vit_large_stem`: a convolutional stem worth several blocks, then blocks and a head.
* :func:`big_branch`: two parallel branches (one much heavier) joining again: a DAG.
* :func:`encoder_decoder`: every decoder layer reads the encoder output: a DAG with long edges.
* :func:`random_graph`: random layer costs and random skip edges, for the oracle tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import networkx as nx
import numpy as np

from planner.trace.graph import CostGraph, Layer, OpCost, TiedParam

MIB = 2**20
GFLOP = 1e9


@dataclass(frozen=True, kw_only=True)
class LayerSpec:
    """Per-sample costs of one synthetic layer; ``tied`` names a parameter shared with an earlier layer."""

    name: str
    gflops: float  # forward, per sample
    params: int
    act_mib: float  # saved for backward, per sample
    out_mib: float  # output tensor, per sample
    module_type: str = "Block"
    tied: tuple[tuple[str, int, int], ...] = ()  # (name, numel, owner layer)


def _layer(index: int, spec: LayerSpec) -> Layer:
    flops = spec.gflops * GFLOP
    out_bytes = spec.out_mib * MIB
    ops = (OpCost(kind="addmm", flops=flops, bytes=out_bytes),) if flops > 0 else ()
    signature = f"{spec.module_type}:{spec.gflops}:{spec.params}:{spec.act_mib}:{spec.out_mib}:{spec.tied}"
    return Layer(index=index, name=spec.name, module_type=spec.module_type, signature=signature,
                 fwd_flops=flops, bwd_input_flops=flops, bwd_weight_flops=flops if spec.params else 0.0,
                 param_count=spec.params,
                 tied_params=tuple(TiedParam(name=n, numel=k, owner=o) for n, k, o in spec.tied),
                 activation_bytes=spec.act_mib * MIB, replicated_activation_bytes=0.0,
                 attention_activation_bytes=0.0, attention_fwd_flops=0.0, input_bytes=out_bytes,
                 output_bytes=out_bytes, op_costs=ops, num_ops=len(ops))


def synthetic_graph(name: str, specs: Sequence[LayerSpec], edges: Sequence[tuple[int, int]] | None = None,
                    *, seq_len: int = 2048, dtype: str = "fp16", scale: float = 1.0) -> CostGraph:
    """A cost graph from layer specs; ``edges`` default to a chain. Edge bytes: the producer's output.

    ``scale`` multiplies every layer's FLOPs, parameters and tensor sizes (a wider model).
    """
    if scale != 1.0:
        specs = [replace(s, gflops=s.gflops * scale, params=int(s.params * scale), act_mib=s.act_mib * scale,
                         out_mib=s.out_mib * scale, tied=tuple((n, int(k * scale), o) for n, k, o in s.tied))
                 for s in specs]
        name = f"{name}-x{scale:g}"
    layers = [_layer(i, s) for i, s in enumerate(specs)]
    g = nx.DiGraph()
    g.add_nodes_from(range(len(layers)))
    for u, v in edges if edges is not None else [(i, i + 1) for i in range(len(layers) - 1)]:
        if not 0 <= u < v < len(layers):
            raise ValueError(f"edge ({u}, {v}) is not forward in layer order; list producers before consumers")
        g.add_edge(u, v, bytes=layers[u].output_bytes)
    return CostGraph(name=name, ops=nx.DiGraph(), layers=layers, layer_graph=g, dtype=dtype, seq_len=seq_len,
                     param_count=sum(s.params for s in specs), method="synthetic")


def _block(i: int, prefix: str = "blocks", gflops: float = 50.0, params: int = 12_600_000) -> LayerSpec:
    return LayerSpec(name=f"{prefix}.{i}", gflops=gflops, params=params, act_mib=200.0, out_mib=4.0)


def uniform_blocks(n: int = 16, scale: float = 1.0) -> CostGraph:
    return synthetic_graph(f"uniform-{n}", [_block(i) for i in range(n)], scale=scale)


def imbalanced_lm(n: int = 16, scale: float = 1.0) -> CostGraph:
    """Embedding ~20 blocks of parameters and no compute; head ~8 blocks of compute, untied."""
    specs = [LayerSpec(name="embed", gflops=0.0, params=260_000_000, act_mib=4.0, out_mib=4.0, module_type="Embed")]
    specs += [_block(i) for i in range(n)]
    specs.append(LayerSpec(name="head", gflops=400.0, params=260_000_000, act_mib=1000.0, out_mib=500.0,
                           module_type="LMHead"))
    return synthetic_graph(f"imbalanced-lm-{n}", specs, scale=scale)


def vit_large_stem(n: int = 16, scale: float = 1.0) -> CostGraph:
    """A convolutional stem costing ~6 blocks with large activations, then blocks and a small head."""
    specs = [LayerSpec(name="stem", gflops=300.0, params=2_000_000, act_mib=1500.0, out_mib=4.0, module_type="ConvStem")]
    specs += [_block(i) for i in range(n)]
    specs.append(LayerSpec(name="head", gflops=0.5, params=1_300_000, act_mib=1.0, out_mib=0.01, module_type="Head"))
    return synthetic_graph(f"vit-large-stem-{n}", specs, scale=scale)


def big_branch(n_heavy: int = 10, n_light: int = 2, n_tail: int = 4, scale: float = 1.0) -> CostGraph:
    """stem → (heavy branch ‖ light branch) → merge → tail; layers listed in a topological order.

    The light branch reads the stem output, so that tensor crosses every stage boundary inside
    the heavy branch (it is relayed to the light branch's stage).
    """
    specs = [LayerSpec(name="stem", gflops=20.0, params=5_000_000, act_mib=100.0, out_mib=8.0, module_type="Stem")]
    heavy = list(range(1, 1 + n_heavy))
    specs += [_block(i, "heavy", gflops=80.0, params=20_000_000) for i in range(n_heavy)]
    light = list(range(1 + n_heavy, 1 + n_heavy + n_light))
    specs += [_block(i, "light", gflops=10.0, params=2_000_000) for i in range(n_light)]
    merge = len(specs)
    specs.append(LayerSpec(name="merge", gflops=5.0, params=1_000_000, act_mib=50.0, out_mib=4.0, module_type="Merge"))
    specs += [_block(i, "tail") for i in range(n_tail)]
    edges = [(0, heavy[0]), (0, light[0])]
    edges += list(zip(heavy, heavy[1:])) + list(zip(light, light[1:]))
    edges += [(heavy[-1], merge), (light[-1], merge)]
    edges += [(k, k + 1) for k in range(merge, len(specs) - 1)]
    return synthetic_graph(f"big-branch-{n_heavy}-{n_light}", specs, edges, scale=scale)


def encoder_decoder(n_enc: int = 8, n_dec: int = 8, scale: float = 1.0) -> CostGraph:
    """embed → encoder blocks → decoder blocks (each also reading the encoder output) → head."""
    specs = [LayerSpec(name="embed", gflops=0.0, params=33_000_000, act_mib=4.0, out_mib=4.0, module_type="Embed")]
    specs += [_block(i, "encoder") for i in range(n_enc)]
    specs += [_block(i, "decoder", gflops=70.0, params=16_800_000) for i in range(n_dec)]
    specs.append(LayerSpec(name="head", gflops=60.0, params=0, act_mib=300.0, out_mib=60.0, module_type="LMHead",
                           tied=(("embed.weight", 33_000_000, 0),)))
    n = len(specs)
    edges = [(k, k + 1) for k in range(n - 1)]
    enc_out = n_enc
    edges += [(enc_out, d) for d in range(n_enc + 2, n_enc + 1 + n_dec)]
    return synthetic_graph(f"encoder-decoder-{n_enc}-{n_dec}", specs, edges, scale=scale)


def random_graph(rng: np.random.Generator, n: int, *, skip_prob: float = 0.3, tied_prob: float = 0.2) -> CostGraph:
    """Random per-layer costs (some layers heavy, some parameter-only) and random forward skip edges."""
    specs = []
    for i in range(n):
        heavy = rng.random() < 0.2
        gflops = float(rng.uniform(5.0, 60.0) * (8.0 if heavy else 1.0)) if rng.random() > 0.1 else 0.0
        params = int(rng.uniform(1e6, 4e8) if rng.random() < 0.3 else rng.uniform(1e6, 5e7))
        specs.append(LayerSpec(name=f"layer{i}", gflops=round(gflops, 3), params=params,
                               act_mib=round(float(rng.uniform(10.0, 600.0)), 1),
                               out_mib=round(float(rng.uniform(0.5, 64.0)), 2)))
    if n >= 3 and rng.random() < tied_prob:  # a head tied to the first layer's weights
        last = specs[-1]
        specs[-1] = LayerSpec(name=last.name, gflops=last.gflops, params=last.params, act_mib=last.act_mib,
                              out_mib=last.out_mib, tied=(("layer0.weight", specs[0].params, 0),))
    edges = [(i, i + 1) for i in range(n - 1)]
    for u in range(n):
        for v in range(u + 2, n):
            if rng.random() < skip_prob / n:
                edges.append((u, v))
    return synthetic_graph(f"random-{n}", specs, edges)
