"""Predictions next to published measurements (the tables: ``python -m tools.calibrate [--markdown]``).

Megatron-LM (Narayanan et al., SC'21, "Efficient Large-Scale Language Model Training on GPU
Clusters Using Megatron-LM", arXiv:2104.04473, Table 1): GPT models of 1.7B to 1T parameters on
DGX A100 80 GB nodes (8 GPUs, NVSwitch, 8 × 200 Gb/s HDR InfiniBand), sequence 2048, vocabulary
51,200, mixed precision, full activation recomputation. The table
gives tensor/pipeline degrees, GPUs, global batch and the achieved teraFLOP/s per GPU, counted
with the paper's Eq. 3, ``F = 96·B·s·l·h²·(1 + s/6h + V/16lh)`` FLOPs per iteration (which
includes the recomputed forward). We predict the iteration time with this cost model and report
``F / (time · GPUs)`` next to the published figure.

What the table does not give, we choose and say so: the micro-batch size and the number of model
chunks per device (the authors tuned both). For each row we evaluate micro-batches {1, 2, 4, 8}
and the 1F1B schedule plus the interleaved schedule with 2 chunks per device where the layer count
allows, place layers as Megatron does (equal transformer blocks per chunk, the embedding with the
first, the head with the last), and keep the fastest configuration that fits in 80 GB.

Pure and deterministic; measuring this machine's CPU is :mod:`bench.cpu_calibration`'s job.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from planner.cluster import ClusterSpec
from planner.cost.constants import CostConstants
from planner.cost.model import StepPrediction, evaluate, layer_table, usable_memory_bytes
from planner.plan import ParallelConfig
from planner.trace.graph import CostGraph

GiB = 2**30

NARAYANAN_SOURCE = ("Narayanan et al., 'Efficient Large-Scale Language Model Training on GPU Clusters Using "
                    "Megatron-LM', SC'21 (arXiv:2104.04473), Table 1")


@dataclass(frozen=True, kw_only=True)
class PublishedRun:
    """One published training configuration and its measured throughput."""

    name: str
    params_b: float
    heads: int
    hidden: int
    layers: int
    tp: int
    pp: int
    gpus: int
    batch: int
    tflops_per_gpu: float
    seq_len: int = 2048
    vocab: int = 51200
    recompute: str = "full"
    source: str = NARAYANAN_SOURCE

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)

    def flops_per_iteration(self) -> float:
        """Narayanan et al. Eq. 3: 96·B·s·l·h²·(1 + s/6h + V/16lh) (forward, recomputed forward, backward)."""
        b, s, n, h, v = self.batch, self.seq_len, self.layers, self.hidden, self.vocab
        return 96 * b * s * n * h * h * (1 + s / (6 * h) + v / (16 * n * h))

    def published_iteration_s(self) -> float:
        return self.flops_per_iteration() / (self.tflops_per_gpu * 1e12 * self.gpus)


# Table 1 of Narayanan et al. 2021 (also transcribed in SotaroKaneda/MLCarbon data/megatron_table.csv).
NARAYANAN_TABLE1: tuple[PublishedRun, ...] = (
    PublishedRun(name="gpt-1.7b", params_b=1.7, heads=24, hidden=2304, layers=24, tp=1, pp=1, gpus=32,
                 batch=512, tflops_per_gpu=137),
    PublishedRun(name="gpt-3.6b", params_b=3.6, heads=32, hidden=3072, layers=30, tp=2, pp=1, gpus=64,
                 batch=512, tflops_per_gpu=138),
    PublishedRun(name="gpt-7.5b", params_b=7.5, heads=32, hidden=4096, layers=36, tp=4, pp=1, gpus=128,
                 batch=512, tflops_per_gpu=142),
    PublishedRun(name="gpt-18b", params_b=18.4, heads=48, hidden=6144, layers=40, tp=8, pp=1, gpus=256,
                 batch=1024, tflops_per_gpu=135),
    PublishedRun(name="gpt-39b", params_b=39.1, heads=64, hidden=8192, layers=48, tp=8, pp=2, gpus=512,
                 batch=1536, tflops_per_gpu=138),
    PublishedRun(name="gpt-76b", params_b=76.1, heads=80, hidden=10240, layers=60, tp=8, pp=4, gpus=1024,
                 batch=1792, tflops_per_gpu=140),
    PublishedRun(name="gpt-145b", params_b=145.6, heads=96, hidden=12288, layers=80, tp=8, pp=8, gpus=1536,
                 batch=2304, tflops_per_gpu=148),
    PublishedRun(name="gpt-310b", params_b=310.1, heads=128, hidden=16384, layers=96, tp=8, pp=16, gpus=1920,
                 batch=2160, tflops_per_gpu=155),
    PublishedRun(name="gpt-530b", params_b=529.6, heads=128, hidden=20480, layers=105, tp=8, pp=35, gpus=2520,
                 batch=2520, tflops_per_gpu=163),
    PublishedRun(name="gpt-1t", params_b=1008.0, heads=160, hidden=25600, layers=128, tp=8, pp=64, gpus=3072,
                 batch=3072, tflops_per_gpu=163),
)


@functools.cache
def gpt_graph(heads: int, hidden: int, layers: int, seq_len: int = 2048, vocab: int = 51200,
              dtype: str = "bf16") -> CostGraph:
    """A Megatron-style GPT (tied embedding, dropout 0.1) traced on the meta device in ``dtype``.

    Traced with two transformer blocks, then the block repeated to ``layers``: identical blocks
    have identical costs (the tracer's own block replay relies on the same fact; a test checks the
    result equals the full trace), and tracing 128 blocks would only repeat the second one.
    """
    from planner.models.gpt import GPT, GPTConfig
    from planner.trace import trace_model

    cfg = GPTConfig(num_layers=min(layers, 2), hidden=hidden, heads=heads, vocab_size=vocab, seq_len=seq_len,
                    dropout=0.1, tie_embeddings=True)
    with torch.device("meta"):
        model = GPT(cfg)
    tokens = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    graph = trace_model(model, (tokens,), name=f"gpt-{layers}x{hidden}", dtype=dtype, seq_len=seq_len,
                        copy_model=False)
    return repeat_block(graph, layers) if layers > 2 else graph


def repeat_block(graph: CostGraph, blocks: int) -> CostGraph:
    """``graph`` (embedding, blocks..., head) with its last block repeated to ``blocks`` blocks."""
    import networkx as nx

    first, body, last = graph.layers[0], graph.layers[1:-1], graph.layers[-1]
    block = body[-1]
    layers = [first] + [replace(b, index=1 + i) for i, b in enumerate(body)]
    layers += [replace(block, index=1 + i, name=f"blocks.{i}") for i in range(len(body), blocks)]
    layers.append(replace(last, index=blocks + 1))
    chain = nx.DiGraph()
    chain.add_nodes_from(range(len(layers)))
    for i in range(len(layers) - 1):
        chain.add_edge(i, i + 1, bytes=layers[i].output_bytes)
    params = graph.param_count + (blocks - len(body)) * block.param_count
    return CostGraph(name=graph.name, ops=graph.ops, layers=layers, layer_graph=chain, dtype=graph.dtype,
                     seq_len=graph.seq_len, param_count=params, method=graph.method,
                     notes=graph.notes + [f"block {block.name} repeated to {blocks} blocks"])


def megatron_boundaries(num_layers: int, chunks: int) -> list[tuple[int, int]]:
    """Megatron's layout: equal transformer blocks per chunk, embedding (layer 0) with the first
    chunk, head (the last layer) with the last chunk."""
    blocks = num_layers - 2
    if blocks % chunks:
        raise ValueError(f"chunks: {blocks} blocks do not split into {chunks} equal chunks")
    per = blocks // chunks
    out = []
    for j in range(chunks):
        a, b = 1 + j * per, 1 + (j + 1) * per
        out.append((0 if j == 0 else a, num_layers if j == chunks - 1 else b))
    return out


@dataclass(frozen=True, kw_only=True)
class RowResult:
    run: PublishedRun
    config: ParallelConfig
    prediction: StepPrediction
    published_s: float
    least_memory_bytes: float  # the candidate configuration with the least peak memory (micro-batch 1)
    fits_40gb: bool  # whether that one fits on A100-40GB

    @property
    def predicted_s(self) -> float:
        return self.prediction.step_time_s

    @property
    def predicted_tflops(self) -> float:
        return self.run.flops_per_iteration() / (self.predicted_s * self.run.gpus) / 1e12

    @property
    def error(self) -> float:
        """Relative error of the predicted iteration time (= of the TFLOP/s, inverted)."""
        return self.predicted_s / self.published_s - 1.0


def _candidates(run: PublishedRun, num_layers: int) -> list[ParallelConfig]:
    from planner import schedules

    per_replica = run.batch // run.dp
    out = []
    for mb in (1, 2, 4, 8):
        if per_replica % mb:
            continue
        m = per_replica // mb
        options = [("1f1b", 1)]
        if run.pp > 1 and (num_layers - 2) % (2 * run.pp) == 0:
            options.append(("interleaved-1f1b", 2))
        for sched, v in options:
            try:
                schedules.get_schedule(sched).validate(run.pp, m, v)
            except ValueError:
                continue
            out.append(ParallelConfig(dp=run.dp, tp=run.tp, pp=run.pp, micro_batch_size=mb, num_micro_batches=m,
                                      virtual_stages=v, schedule=sched, recompute=run.recompute))
    return out


def predict_run(run: PublishedRun, c: CostConstants | None = None) -> RowResult:
    """The fastest candidate configuration of ``run`` that fits in 80 GB, priced by the cost model."""
    c = c or CostConstants()
    # Megatron-LM trained these in fp16 mixed precision (2021: its bf16 path, with fp32 gradients,
    # came later), so gradients are 2 bytes; the peak is bf16's on an A100 either way.
    graph = gpt_graph(run.heads, run.hidden, run.layers, run.seq_len, run.vocab, dtype="fp16")
    nodes = max(1, run.gpus // 8)
    cluster = ClusterSpec.preset("dgx-a100-80g", nodes=nodes)
    small = ClusterSpec.preset("dgx-a100-40g", nodes=nodes)
    best: tuple[ParallelConfig, StepPrediction] | None = None
    least = float("inf")
    tables: dict[int, object] = {}
    for cfg in _candidates(run, graph.num_layers):
        if cfg.micro_batch_size not in tables:
            tables[cfg.micro_batch_size] = layer_table(graph, cluster, micro_batch=cfg.micro_batch_size, tp=cfg.tp,
                                                       sequence_parallel=False, recompute=cfg.recompute, c=c)
        bounds = megatron_boundaries(graph.num_layers, cfg.pp * cfg.virtual_stages)
        pred = evaluate(graph, cluster, cfg, bounds, c, table=tables[cfg.micro_batch_size])
        least = min(least, pred.peak_memory_bytes)
        if pred.fits and (best is None or pred.step_time_s < best[1].step_time_s):
            best = (cfg, pred)
    if best is None:
        raise RuntimeError(f"{run.name}: no candidate configuration fits in 80 GB under the cost model")
    cfg, pred = best
    return RowResult(run=run, config=cfg, prediction=pred, published_s=run.published_iteration_s(),
                     least_memory_bytes=least, fits_40gb=least <= usable_memory_bytes(small, c))


def narayanan_rows(c: CostConstants | None = None) -> list[RowResult]:
    return [predict_run(run, c) for run in NARAYANAN_TABLE1]


@dataclass(frozen=True, kw_only=True)
class PublishedMfu:
    """A published model-FLOPs utilisation of one configuration (Korthikanti et al. 2022)."""

    name: str
    heads: int
    hidden: int
    layers: int
    tp: int
    pp: int
    dp: int
    batch: int
    micro_batch: int
    recompute: str
    sequence_parallel: bool
    mfu: float
    source: str
    assumptions: str


KORTHIKANTI_SOURCE = ("Korthikanti et al., 'Reducing Activation Recomputation in Large Transformer Models', "
                      "MLSys 2023 (arXiv:2205.05198), abstract")
_KORTHIKANTI_ASSUMED = ("tp=8, pp=35 as in Narayanan et al. Table 1's 530B row, dp=8 (2240 = 8 x 280 GPUs); global "
                        "batch 2240 (one sequence per GPU, as in that row) and micro-batch 1 are our assumptions")

KORTHIKANTI_530B: tuple[PublishedMfu, ...] = (
    PublishedMfu(name="530B, selective recompute + sequence parallel", heads=128, hidden=20480, layers=105, tp=8,
                 pp=35, dp=8, batch=2240, micro_batch=1, recompute="selective", sequence_parallel=True, mfu=0.542,
                 source=KORTHIKANTI_SOURCE, assumptions=_KORTHIKANTI_ASSUMED),
    PublishedMfu(name="530B, full recompute", heads=128, hidden=20480, layers=105, tp=8, pp=35, dp=8, batch=2240,
                 micro_batch=1, recompute="full", sequence_parallel=False, mfu=0.421, source=KORTHIKANTI_SOURCE,
                 assumptions=_KORTHIKANTI_ASSUMED),
)


@dataclass(frozen=True, kw_only=True)
class MfuResult:
    run: PublishedMfu
    prediction: StepPrediction

    @property
    def error(self) -> float:
        """Relative error of the predicted iteration time (MFU is inversely proportional to it)."""
        return self.run.mfu / self.prediction.mfu - 1.0


def predict_mfu(run: PublishedMfu, c: CostConstants | None = None) -> MfuResult:
    c = c or CostConstants()
    graph = gpt_graph(run.heads, run.hidden, run.layers)
    cluster = ClusterSpec.preset("dgx-a100-80g", nodes=run.tp * run.pp * run.dp // 8)
    cfg = ParallelConfig(dp=run.dp, tp=run.tp, pp=run.pp, micro_batch_size=run.micro_batch,
                         num_micro_batches=run.batch // (run.dp * run.micro_batch), recompute=run.recompute,
                         sequence_parallel=run.sequence_parallel)
    pred = evaluate(graph, cluster, cfg, megatron_boundaries(graph.num_layers, run.pp), c)
    return MfuResult(run=run, prediction=pred)


def korthikanti_rows(c: CostConstants | None = None) -> list[MfuResult]:
    return [predict_mfu(run, c) for run in KORTHIKANTI_530B]


# Korthikanti et al. 2022, Table 4: one 22B transformer layer (h 6144, 64 heads, s 2048) with tp = 8,
# forward + backward milliseconds. Quoted from a public reading-notes transcription of the paper
# (the paper's PDF was not retrievable here); only the ratios to the baseline are compared, since the
# micro-batch of that measurement is not stated in the transcription.
KORTHIKANTI_TABLE4_MS = {
    ("none", False): 19.6,  # baseline: tensor parallel, no recomputation
    ("none", True): 19.0,  # + sequence parallelism
    ("full", False): 27.2,  # full recomputation
    ("selective", False): 20.9,  # selective recomputation
    ("selective", True): 20.3,  # selective + sequence parallelism
}


def layer_overheads(micro_batch: int, c: CostConstants | None = None) -> dict[tuple[str, bool], float]:
    """Predicted time of one 22B layer (tp = 8) per recompute / sequence-parallel option, relative to
    the baseline (no recomputation, no sequence parallelism): forward, backward, recomputation and
    tensor-parallel collectives of one micro-batch."""
    c = c or CostConstants()
    graph = gpt_graph(64, 6144, 4)
    cluster = ClusterSpec.preset("dgx-a100-80g")
    out = {}
    for rec, sp in KORTHIKANTI_TABLE4_MS:
        t = layer_table(graph, cluster, micro_batch=micro_batch, tp=8, sequence_parallel=sp, recompute=rec, c=c)
        out[(rec, sp)] = float(t.total_s[2])  # a middle block
    base = out[("none", False)]
    return {k: v / base - 1.0 for k, v in out.items()}
