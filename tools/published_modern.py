"""The planner against today's published configurations, under the same cost model.

``python -m tools.published_modern [--markdown] [--only NAME ...]``: for each case (Llama 3 405B at
8K and at 128K on 16,384 H100s, torchtitan's Llama 3.1 405B 3-D run on 512 H100s, Mixtral 8x7B on
64 H100s with Megatron-Core), price the published configuration (:func:`planner.api.evaluate`), plan
the same model on the same GPUs with the same global batch and sequence (:func:`planner.api.plan`,
every knob of schema 2.1 in the search, at the run's own precision: FP8 only where the run used it),
and put both next to what the run measured.

The measured figure is converted to a step time with the publishers' FLOP count (6 x the parameters
a token passes through, plus 12 x layers x hidden x sequence for attention: Megatron's Eq. 3, PaLM's
count), the convention of :mod:`planner.validation`; a case that publishes tokens/s uses them as is.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace

from planner.api import evaluate, plan
from planner.cluster import ClusterSpec
from planner.cost.constants import trainer_constants
from planner.errors import InfeasibleError
from planner.plan import RECOMPUTE, ParallelConfig, Plan
from planner.space import SearchSpace
from planner.validation.cases import FSDP_MIXED_PRECISION
from tools.compare import differences
from tools.compare import markdown as table

KNOBS = ("dp", "tp", "cp", "pp", "ep", "micro_batch_size", "virtual_stages", "schedule", "recompute",
         "recompute_every", "sequence_parallel", "zero_stage", "dp_shard", "reshard_after_forward", "fp8")


@dataclass(frozen=True)
class ModernCase:
    """One published run: the model, the GPUs, the batch, the configuration and what it measured."""

    name: str
    model: str  # a preset
    seq_len: int
    nodes: int  # of 8 H100s
    global_batch: int  # sequences
    config: ParallelConfig
    trainer: str  # planner.cost.constants.TRAINERS
    measured: float  # model TFLOP/s per GPU, or tokens/s per GPU (measured_unit)
    measured_unit: str  # "tflops" or "tokens"
    source: str
    memory_gib: float | None = None  # the run's device memory, when not the preset's 80 GB
    settings: tuple[tuple[str, object], ...] = ()  # cost constants the source states (overlap flags)
    unstated: tuple[str, ...] = ()  # knobs the source does not give: the planner picks them for the run

    def pinned_space(self) -> SearchSpace:
        """The search space of the published configuration: every stated knob fixed, the unstated free."""
        cfg, free = self.config, set(self.unstated)

        def pin(name: str, value: object) -> object:
            return None if name in free else (value,)

        return SearchSpace(
            tp=pin("tp", cfg.tp), pp=pin("pp", cfg.pp), dp=pin("dp", cfg.dp), cp=pin("cp", cfg.cp),
            ep=pin("ep", cfg.ep), micro_batch_size=pin("micro_batch_size", cfg.micro_batch_size),
            schedules=pin("schedule", cfg.schedule), virtual_stages=pin("virtual_stages", cfg.virtual_stages),
            recompute=pin("recompute", cfg.recompute) or RECOMPUTE,
            recompute_every=pin("recompute_every", cfg.recompute_every),
            sequence_parallel=(cfg.sequence_parallel,), zero_stage=(cfg.zero_stage,),
            dp_shard=(cfg.dp_shard,), reshard_after_forward=(cfg.reshard_after_forward,), fp8=(cfg.fp8,),
            overlap_grad_reduce=cfg.overlap_grad_reduce, partition="balanced")

    @property
    def gpus(self) -> int:
        return self.nodes * 8

    def cluster(self) -> ClusterSpec:
        spec = ClusterSpec.preset("dgx-h100").resized(nodes=self.nodes, devices_per_node=8)
        if self.memory_gib:
            spec = replace(spec, groups=tuple(replace(g, device=replace(g.device, memory_bytes=int(self.memory_gib
                                                                                                 * 2**30)))
                                              for g in spec.groups))
        return spec


def _megatron(**kw: object) -> ParallelConfig:
    return ParallelConfig(**kw)  # type: ignore[arg-type]


def _llama3(name: str, *, seq_len: int, global_batch: int, dp: int, cp: int, tflops: float,
            source: str) -> ModernCase:
    """A Llama 3 405B pre-training stage on 16,384 H100s (Table 4): TP8 PP16, FSDP without reshard after
    forward, interleaved 1F1B over 16 micro-batches; chunks per device and recomputation not stated."""
    return ModernCase(
        name=name, model="llama3-405b", seq_len=seq_len, nodes=2048, global_batch=global_batch,
        config=_megatron(dp=dp, tp=8, cp=cp, pp=16, micro_batch_size=1, num_micro_batches=16, virtual_stages=2,
                         schedule="interleaved-1f1b", sequence_parallel=True, zero_stage=3,
                         reshard_after_forward=False),
        trainer="megatron", measured=tflops, measured_unit="tflops",
        unstated=("virtual_stages", "recompute", "recompute_every"), source=source)


CASES: tuple[ModernCase, ...] = (
    _llama3("Llama 3 405B, 8K", seq_len=8192, global_batch=2048, dp=128, cp=1, tflops=400.0,
            source="Llama Team 2024, 'The Llama 3 Herd of Models', Table 4 (TP8 CP1 PP16 DP128, 16M tokens per "
                   "batch, 400 TFLOP/s per GPU, BF16 MFU 41%); FSDP without reshard after forward (Sec. 3.3.2); "
                   "interleaved schedule; chunks per device and activation recomputation not stated"),
    _llama3("Llama 3 405B, 128K", seq_len=131072, global_batch=128, dp=8, cp=16, tflops=380.0,
            source="Llama Team 2024, Table 4 (TP8 CP16 PP16 DP8, 16M tokens per batch, 380 TFLOP/s per GPU, BF16 "
                   "MFU 38%)"),
    ModernCase(
        name="torchtitan Llama 3.1 405B, 3-D", model="llama3-405b", seq_len=32768, nodes=64, global_batch=64,
        config=_megatron(dp=8, tp=8, pp=8, micro_batch_size=1, num_micro_batches=8, schedule="1f1b",
                         sequence_parallel=True, zero_stage=3, recompute="full", fp8=True),
        trainer="compiled", measured=76.0, measured_unit="tokens", memory_gib=96.0, settings=FSDP_MIXED_PRECISION,
        source="torchtitan benchmarks/llama3_h100_202412_torchtitan.md, Table 6 (FSDP 8 x TP 8 x PP 8 on 512 H100 "
               "96 GB, local batch 8, 1F1B, full AC, float8 linears, async TP, torch.compile: 76 tokens/s per GPU at "
               "sequence 32768)"),
    ModernCase(
        name="Mixtral 8x7B", model="mixtral-8x7b", seq_len=4096, nodes=8, global_batch=256,
        config=_megatron(dp=16, tp=1, ep=8, pp=4, micro_batch_size=1, num_micro_batches=16, virtual_stages=8,
                         schedule="interleaved-1f1b", zero_stage=1, overlap_grad_reduce=True),
        trainer="megatron", measured=438.0, measured_unit="tflops",
        settings=(("overlap_param_gather", True),),
        source="NVIDIA Megatron-LM megatron/core/transformer/moe/README.md: reference mapping of MCore v0.8 for "
               "Mixtral 8x7B (dropless, 64 H100, seq 4096, TP1 EP8 PP4 VP8, MBS 1, GBS 256, distributed optimizer, "
               "--overlap-grad-reduce --overlap-param-gather) and its 438 TFLOP/s per GPU"),
)


def flops_per_token(model: str, seq_len: int) -> float:
    """The publishers' count per token: 6 x parameters a token uses + 12 x layers x hidden x sequence."""
    from planner.models import load_preset
    from planner.models.llama import LlamaConfig

    cfg = LlamaConfig(**{**load_preset(model).config, "seq_len": seq_len})
    return 6 * cfg.active_param_count() + 12 * cfg.num_layers * cfg.hidden * seq_len


@dataclass(frozen=True)
class Row:
    case: ModernCase
    published: Plan
    planned: Plan
    plan_s: float

    @property
    def measured_step_s(self) -> float:
        """The published run's step time at the case's global batch."""
        c = self.case
        tokens = c.global_batch * c.seq_len
        if c.measured_unit == "tokens":
            return tokens / (c.measured * c.gpus)
        return tokens * flops_per_token(c.model, c.seq_len) / (c.measured * 1e12 * c.gpus)

    def differences(self) -> list[str]:
        return differences(self.published.parallel, self.planned.parallel, KNOBS)


def run_case(case: ModernCase) -> Row:
    cluster = case.cluster()
    c = replace(trainer_constants(case.trainer), **dict(case.settings))
    try:  # the published configuration, its unstated knobs at their best for it
        published = plan(case.model, cluster, global_batch=case.global_batch, seq_len=case.seq_len, constants=c,
                         space=case.pinned_space(), baselines=False)
    except InfeasibleError:  # nothing of it fits in the cost model's memory: priced as written
        published = evaluate(case.model, cluster, case.config, seq_len=case.seq_len, constants=c)
    start = time.perf_counter()
    # The published run's numerics: the planner may not trade BF16 for FP8 where the run did not.
    planned = plan(case.model, cluster, global_batch=case.global_batch, seq_len=case.seq_len, constants=c,
                   space=SearchSpace(fp8=(case.config.fp8,)), baselines=False)
    return Row(case=case, published=published, planned=planned, plan_s=time.perf_counter() - start)


def markdown(rows: list[Row]) -> str:
    def cells(r: Row) -> list[object]:
        pub, ours = r.published.predicted, r.planned.predicted
        fits = "" if pub.fits else " (does not fit)"
        return [r.case.name, r.case.gpus, f"`{r.published.parallel.label()}`", f"{pub.step_time_s:.2f}{fits}",
                f"{r.measured_step_s:.2f}", f"{r.measured_step_s / pub.step_time_s:.2f}",
                f"`{r.planned.parallel.label()}`", f"{ours.step_time_s:.2f}", f"{ours.step_time_s / pub.step_time_s:.3f}",
                f"{r.plan_s:.1f}", "; ".join(r.differences()) or "same"]

    return table(["case", "GPUs", "published configuration", "its predicted step (s)", "measured step (s)",
                  "measured / predicted", "planner's configuration", "its predicted step (s)",
                  "planner / published (predicted)", "planning (s)", "where it differs"], [cells(r) for r in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.published_modern", description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--only", nargs="*", help="case names (substrings)")
    args = parser.parse_args(argv)
    rows = []
    for case in CASES:
        if args.only and not any(s.lower() in case.name.lower() for s in args.only):
            continue
        rows.append(run_case(case))
        r = rows[-1]
        if not args.markdown:
            print(f"{case.name}: published {r.published.parallel.label()} -> {r.published.predicted.step_time_s:.2f} s, "
                  f"{r.published.predicted.peak_memory_bytes / 2**30:.2f} GiB on the busiest device "
                  f"(fits: {r.published.predicted.fits}), measured {r.measured_step_s:.2f} s; planner "
                  f"{r.planned.parallel.label()} -> {r.planned.predicted.step_time_s:.2f} s in {r.plan_s:.1f} s",
                  flush=True)
            for who, p in (("published", r.published), ("planner", r.planned)):
                parts = sorted(p.predicted.time_breakdown_s.items(), key=lambda kv: -kv[1])
                print(f"  {who}: " + ", ".join(f"{k} {v:.3g} s" for k, v in parts if v > 0), flush=True)
    if args.markdown:
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
