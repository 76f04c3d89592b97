"""Section ``peers``: the stage splits of the real torchgpipe and DeepSpeed packages next to ours, run here.

For gpt-tiny, gpt-10m and mlp-tiny on 2 and 4 pipeline stages, every peer is the installed package
called as its users call it, on the CPU, without a distributed job:

* torchgpipe 0.0.7 ``balance_by_time(partitions, nn.Sequential(layers), sample, device="cpu")``: it
  profiles each layer's forward + backward on this CPU and block-partitions the times;
  ``balance_by_size`` profiles CUDA memory and refuses a CPU device (its error is shown).
* DeepSpeed 0.19.8 ``PipelineModule._partition_layers`` for ``partition_method`` ``uniform``,
  ``parameters`` and ``type:<block class>``: the method the ``PipelineModule`` constructor calls, run
  on a module that holds what it reads (the layer list, ``num_stages``, a one-pipeline topology)
  because the constructor itself needs a process group of ``num_stages`` ranks.
* ours: the stage split of ``planner.evaluate`` (the exact partition DP) for the same configuration
  on the ``cpu-local`` cluster with the ``torch`` trainer constants.

Every distinct 2-stage split is then run by this project's runtime (``python -m runtime run``, 2
processes, gloo, 1F1B, 4 micro-batches), in rounds (in order, then reversed), so the ratios compare
runs made minutes apart on the same machine. The 4-stage splits are shown and priced (4 processes on
2 shared cores would measure the scheduler).
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import Context, fmt_ratio, fmt_s, md_table, run_cmd, say

MODELS = (("gpt-tiny", 16), ("gpt-10m", 8), ("mlp-tiny", 32))  # global batch, as the measured section
QUICK_MODELS = (("gpt-tiny", 16),)
STAGES = (2, 4)
MICRO_BATCHES = 4
WARMUP_STEPS = 3


@dataclass
class Split:
    peer: str
    sizes: tuple[int, ...] | None  # layers per stage; None when the peer failed
    note: str = ""
    predicted_s: float = math.nan
    medians: list[float] = field(default_factory=list)

    @property
    def measured_s(self) -> float:
        return statistics.median(self.medians) if self.medians else math.nan


def peer_versions() -> dict[str, str]:
    """Installed version of each peer, or the reason it is missing."""
    out = {}
    for name in ("torchgpipe", "deepspeed"):
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception as exc:  # noqa: BLE001 (reported on the page)
            out[name] = f"not installed: {exc}"
    return out


def _layers(model_name: str) -> tuple[list[str], Any, Any]:
    """(traced layer names, the model built on the CPU, its preset)."""
    from planner.models import load_preset
    from planner.resolve import resolve_model

    preset = load_preset(model_name)
    names = [layer.name for layer in resolve_model(model_name, dtype="fp32").graph.layers]
    return names, preset.build(device="cpu", seed=0), preset


def torchgpipe_splits(model, names: list[str], preset, micro_batch: int, stages: int) -> list[Split]:
    import torch
    from torch import nn
    from torchgpipe.balance import balance_by_size, balance_by_time

    seq = nn.Sequential(*[model.get_submodule(n) for n in names])
    sample = preset.sample_input(micro_batch, device="cpu")[0]
    out = []
    for peer, call in (("torchgpipe balance_by_time", lambda: balance_by_time(stages, seq, sample, device="cpu")),
                       ("torchgpipe balance_by_size",
                        lambda: balance_by_size(stages, seq, sample, chunks=MICRO_BATCHES, device="cpu"))):
        try:
            with torch.random.fork_rng():
                out.append(Split(peer, tuple(int(x) for x in call())))
        except Exception as exc:  # noqa: BLE001 (the page shows the package's own error)
            out.append(Split(peer, None, f"`{type(exc).__name__}: {exc}`"))
    return out


def deepspeed_splits(model, names: list[str], stages: int) -> list[Split]:
    from deepspeed.runtime.pipe.module import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology
    from torch import nn

    layers = [model.get_submodule(n) for n in names]
    block = collections.Counter(type(m).__name__ for m in layers).most_common(1)[0][0]
    out = []
    for method in ("uniform", "parameters", f"type:^{block}$"):
        holder = PipelineModule.__new__(PipelineModule)
        nn.Module.__init__(holder)
        holder._layer_specs, holder.num_stages, holder.global_rank, holder.loss_fn = layers, stages, 0, None
        holder._topo = PipeDataParallelTopology(num_pp=stages, num_dp=1)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # it prints the partition on rank 0
                holder._partition_layers(method=method)
            parts = [int(x) for x in holder.parts]
            out.append(Split(f"DeepSpeed {method}", tuple(b - a for a, b in zip(parts, parts[1:]))))
        except Exception as exc:  # noqa: BLE001
            out.append(Split(f"DeepSpeed {method}", None, f"`{type(exc).__name__}: {exc}`"))
    return out


def _config(stages: int, global_batch: int):
    from planner.plan import ParallelConfig

    return ParallelConfig(dp=1, tp=1, pp=stages, micro_batch_size=global_batch // MICRO_BATCHES,
                          num_micro_batches=MICRO_BATCHES, schedule="1f1b")


def ours_and_pricer(model_name: str, stages: int, global_batch: int):
    """Our split (``planner.evaluate``), and a function pricing and writing a plan for any split."""
    from planner.api import evaluate, resolve_cluster, resolve_model
    from planner.cost.constants import trainer_constants
    from planner.plan_build import build_plan
    from planner.pricing import Pricer
    from planner.search import Candidate, tp_solve_of

    cfg, c = _config(stages, global_batch), trainer_constants("torch")
    plan = evaluate(model_name, "cpu-local", cfg, devices_per_node=stages, constants=c)
    ours = tuple(s.layer_stop - s.layer_start for s in sorted(plan.stages, key=lambda s: s.index))
    spec = resolve_cluster("cpu-local", devices_per_node=stages)
    resolved = resolve_model(model_name, dtype=plan.model.dtype)
    pricer = Pricer(resolved.graph, spec, c)

    def plan_for(sizes: tuple[int, ...]):
        cuts = [0]
        for s in sizes:
            cuts.append(cuts[-1] + s)
        bounds = list(zip(cuts, cuts[1:]))
        cand = Candidate(cfg, bounds, pricer.evaluate(cfg, bounds), "given")
        return build_plan(resolved, spec, cand, c, global_batch=cfg.global_batch, result=None,
                          tp_solve=tp_solve_of(pricer, cfg))

    return Split("ours (planner.evaluate, exact DP)", ours), plan_for


def _measure(splits: list[Split], plan_for, folder: Path, steps: int, rounds: int, commands: list[str]) -> None:
    """Run each distinct split with the runtime; every split with the same sizes shares the runs."""
    distinct = list(dict.fromkeys(s.sizes for s in splits if s.sizes))
    paths = {}
    for sizes in distinct:
        path = folder / f"split-{'-'.join(map(str, sizes))}.plan.json"
        plan_for(sizes).to_json(path, force=True)
        paths[sizes] = path
    medians: dict[tuple[int, ...], list[float]] = {s: [] for s in distinct}
    for r in range(rounds):
        for sizes in (distinct if r % 2 == 0 else distinct[::-1]):
            metrics = paths[sizes].with_name(paths[sizes].name.replace(".plan.json", f".r{r + 1}.metrics.json"))
            say(f"run split {list(sizes)} (round {r + 1}/{rounds})")
            res = run_cmd([sys.executable, "-m", "runtime", "run", str(paths[sizes]), "--nproc", str(len(sizes)),
                           "--steps", str(steps), "--out", str(metrics), "--force", "--quiet"], timeout_s=600)
            commands.append(res.cmd)
            if not res.ok or not metrics.exists():
                for s in splits:
                    if s.sizes == sizes:
                        s.note = f"run failed: {res.error_line()}"
                continue
            times = [x["step_time_s"] for x in json.loads(metrics.read_text()).get("steps", [])][WARMUP_STEPS:]
            if times:
                medians[sizes].append(statistics.median(times))
    for s in splits:
        if s.sizes:
            s.medians = medians[s.sizes]


def _case(ctx: Context, model_name: str, global_batch: int, stages: int, commands: list[str]) -> list[Split]:
    names, model, preset = _layers(model_name)
    ours, plan_for = ours_and_pricer(model_name, stages, global_batch)
    say(f"{model_name}, {stages} stages: peers")
    splits = [ours, *torchgpipe_splits(model, names, preset, global_batch // MICRO_BATCHES, stages),
              *deepspeed_splits(model, names, stages)]
    for s in splits:
        if s.sizes and (len(s.sizes) != stages or min(s.sizes) < 1):
            s.note, s.sizes = f"returned {list(s.sizes)}: not {stages} non-empty stages", None
        if s.sizes:
            s.predicted_s = plan_for(s.sizes).predicted.step_time_s
    if stages == 2:
        folder = ctx.work_dir / "peers" / model_name
        folder.mkdir(parents=True, exist_ok=True)
        _measure(splits, plan_for, folder, steps=6 if ctx.quick else 10, rounds=1 if ctx.quick else 2,
                 commands=commands)
    return splits


def _rows(model_name: str, stages: int, splits: list[Split]) -> list[list[str]]:
    ours = splits[0]
    rows = []
    for s in splits:
        ratio = s.measured_s / ours.measured_s if s.medians and ours.medians else math.nan
        rows.append([model_name, stages, s.peer, str(list(s.sizes)) if s.sizes else "—", fmt_s(s.predicted_s),
                     fmt_s(s.measured_s) if stages == 2 else "not run",
                     ", ".join(f"{m:.4g}" for m in s.medians) if s.medians else "—",
                     fmt_ratio(ratio) if stages == 2 else "—", s.note])
    return rows


def section(ctx: Context) -> str:
    versions = peer_versions()
    missing = [f"{k}: {v}" for k, v in versions.items() if v.startswith("not installed")]
    if missing:
        return "## Real peers: torchgpipe and DeepSpeed splits\n\n" + "\n".join(f"* {m}" for m in missing) + "\n"
    commands: list[str] = []
    rows = []
    for model_name, gb in (QUICK_MODELS if ctx.quick else MODELS):
        for stages in (STAGES[:1] if ctx.quick else STAGES):
            rows += _rows(model_name, stages, _case(ctx, model_name, gb, stages, commands))
    return "\n".join([
        "## Real peers: torchgpipe and DeepSpeed splits\n",
        f"Installed: torchgpipe {versions['torchgpipe']}, DeepSpeed {versions['deepspeed']} (with torch 2.13; "
        "`make install`, pinned in `requirements/constraints.txt`). Each peer is the package's own function "
        "(module docstring of `bench/peers.py`); *layers per stage* counts the traced layers (embedding and "
        "head included). *predicted*: this project's cost model for that split (`cpu-local`, `torch` trainer "
        f"constants). *measured*: the median step of `python -m runtime run` (2 processes, gloo, 1F1B, "
        f"{MICRO_BATCHES} micro-batches; steps after the first {WARMUP_STEPS}), the median of the rounds; "
        "*measured / ours* compares runs of this invocation. A split several peers return is run once.\n",
        md_table(["model", "stages", "peer", "layers per stage", "predicted step (s)", "measured step (s)",
                  "round medians (s)", "measured / ours", "note"], rows),
        "\n```\n" + "\n".join(dict.fromkeys(commands)) + "\n```\n",
    ])


if __name__ == "__main__":
    from bench.common import REPO

    ctx = Context(quick="--quick" in sys.argv, fig_dir=REPO / "out" / "bench", fig_link="",
                  work_dir=REPO / "out" / "bench")
    print(section(ctx))
