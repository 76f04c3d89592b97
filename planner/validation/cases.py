"""Measured runs turned into cases the cost model can price: model, cluster, configuration, measurement.

Two files in ``datasets/measured/`` (see its README for sources and caveats):

* ``h100_sweep.json``: nanotron's dp/tp/pp/micro-batch/ZeRO sweeps of Llama-shaped 1B and 3B models
  on 8-512 H100s. Every row becomes a :class:`Case` of source ``sweep`` or a :class:`Skip` with
  its reason (:data:`SWEEP_RULES` lists the exclusions).
* ``published_runs.json``: published runs of many frameworks. Rows whose model, GPU, precision or
  sharding the planner cannot express are skipped with the reason; what is expressed only
  approximately (an assumed micro-batch, HSDP priced as FSDP, ...) is named in
  :attr:`Case.approximations`.

Nothing here prices anything: :mod:`planner.validation.price` does. Pure and deterministic.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from planner.cluster import ClusterSpec, DeviceSpec
from planner.cost.constants import TRAINERS
from planner.errors import SpecError, read_json_file
from planner.paths import datasets_dir
from planner.plan import ParallelConfig

SWEEP_FILE = "h100_sweep.json"
PUBLISHED_FILE = "published_runs.json"
SWEEP_CLUSTER_FILE = "nanotron-h100-efa.json"

FAILED = ("crashed_or_oom", "oom")  # a memory failure (the playbook figure does not tell crash from OOM)
NOT_MEMORY = ("timeout", "fail")  # old_bench runs that ended for reasons the planner does not model

SWEEP_RULES = (
    "status 'unconfirmed' (numbers in the figure's hover text, drawn as crashed, not among the 1728 "
    "successes): excluded",
    "status 'timeout' or 'fail' (old_bench): excluded; neither is a memory failure",
    "gbs_consistent false (the figure's GBS differs from dp x mbz x grad_acc): excluded",
    "the same configuration measured more than once: one case; it ran if any row ran, its throughput is "
    "the best ok row's (the playbook's PP code was optimised during the sweep)",
)


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A model family and its config: the key under which its graph is traced once."""

    name: str
    family: str  # "llama" or "gpt"
    config: tuple[tuple[str, Any], ...]  # sorted items, hashable
    dtype: str = "bf16"

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.config)

    @property
    def seq_len(self) -> int:
        return int(self.kwargs["seq_len"])


@dataclass(frozen=True, kw_only=True)
class ClusterRef:
    """Which cluster a case runs on: a preset (or the sweep's measured file) resized."""

    preset: str  # a name in datasets/clusters, or "sweep": the sweep file's cluster (sweep_cluster_dict)
    nodes: int
    devices_per_node: int = 8
    memory_gib: float | None = None  # overrides the preset's device memory (H100 96 GB)
    attention_kernel: str = ""  # a key of ATTENTION_KERNELS; "" for the preset's FlashAttention-2 class
    source_file: str = ""  # preset "sweep": the sweep file whose cluster this is ("": the shared sweep)


@dataclass(frozen=True, kw_only=True)
class Case:
    """One measured configuration, ready to price."""

    source: str  # "sweep" or "published"
    case_id: str
    group: str  # "model:GPUs"
    model: ModelSpec
    cluster: ClusterRef
    config: ParallelConfig
    status: str  # "ok" (it ran) or "failed" (crashed or out of memory)
    measured_tokens_per_s_per_gpu: float | None
    measured_from: str = "tokens/s/gpu"
    approximations: tuple[str, ...] = ()
    # The trainer that ran it, as its source states (planner.cost.constants.TRAINERS): whether its
    # element-wise work was fused (Megatron-LM and its descendants, torch.compile) or eager.
    trainer: str = "megatron"
    # Cost-model constants the source states for this run beyond its trainer's profile (a fused
    # cross-entropy, say), as sorted (field, value) pairs.
    settings: tuple[tuple[str, Any], ...] = ()

    @property
    def gpus(self) -> int:
        return self.config.world_size

    @property
    def tokens_per_step(self) -> int:
        return self.config.global_batch * self.model.seq_len

    @property
    def measured_step_s(self) -> float | None:
        t = self.measured_tokens_per_s_per_gpu
        return None if not t else self.tokens_per_step / (t * self.gpus)


@dataclass(frozen=True)
class Skip:
    source: str
    case_id: str
    reason: str


@dataclass
class Cases:
    cases: list[Case] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)

    def skip_counts(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = defaultdict(int)
        for s in self.skipped:
            out[(s.source, s.reason)] += 1
        return dict(sorted(out.items(), key=lambda kv: (kv[0][0], -kv[1], kv[0][1])))


def measured_dir() -> Path:
    return datasets_dir() / "measured"


def _load(path: Path | None, name: str) -> dict:
    """A measured data file: ``path`` (a user's, in the format of ``datasets/measured/<name>``) or the shared
    one. It must be a JSON object with a ``runs`` list (and a sweep, a ``models`` object)."""
    field = "--sweep" if name == SWEEP_FILE else "--published"
    if path is None:
        path, field, fix = measured_dir() / name, "measured data", f"restore it from ../shared/data/measured/{name}"
    else:
        fix = "fix the syntax"
    data = read_json_file(path, field, what=f"the measured data file {path}", damaged_fix=fix)
    need = {"runs": list, **({"models": dict} if name == SWEEP_FILE else {})}
    for key, kind in need.items():
        if not isinstance(data, dict) or not isinstance(data.get(key), kind):
            raise SpecError(field, str(path), f'expected a JSON object with a "{key}" '
                            f'{"list" if kind is list else "object"}, as datasets/measured/{name} has')
    return data


# -- the sweep --------------------------------------------------------------------------------------

def sweep_model(name: str, m: dict[str, Any]) -> ModelSpec:
    """A sweep model (Llama-shaped: SwiGLU, RMSNorm, RoPE, flash attention); grouped-query attention and
    untied embeddings where the file says so."""
    heads = m["heads"]
    kv = m.get("kv_heads") or heads
    cfg = {"num_layers": m["layers"], "hidden": m["hidden"], "heads": heads, "ffn_hidden": m["ffn"],
           "kv_heads": kv if kv != heads else None, "vocab_size": m["vocab"],
           "seq_len": m["seq_len"], "tie_embeddings": bool(m.get("tied_embeddings")), "fused_attention": True}
    return ModelSpec(name=name, family="llama", config=tuple(sorted(cfg.items())))


# A row's pipeline engine (nanotron's ``pp_engine``) as a schedule the cost model prices.
_PP_ENGINES = {"1f1b": "1f1b", "afab": "gpipe", "gpipe": "gpipe"}


def sweep_config(row: dict[str, Any], recompute: str = "none") -> ParallelConfig:
    """A sweep row's configuration: its pipeline engine (1F1B unless the row says otherwise), sequence
    parallelism where tp runs in REDUCE_SCATTER mode (or the row says ``sequence_parallel``), the
    recomputation its sweep's training settings state, DDP-style gradient buckets."""
    tp = row["tp"]
    engine = str(row.get("pp_engine") or "1f1b").lower()
    if engine not in _PP_ENGINES:
        raise Unusable(f"pipeline engine {engine!r} not priced (known: {sorted(_PP_ENGINES)})")
    sp = row.get("sequence_parallel")
    if sp is None:
        sp = row.get("tp_mode") == "REDUCE_SCATTER"
    return ParallelConfig(dp=row["dp"], tp=tp, pp=row["pp"], micro_batch_size=row["mbz"],
                          num_micro_batches=row["grad_acc"], schedule=_PP_ENGINES[engine], recompute=recompute,
                          sequence_parallel=bool(tp > 1 and sp), zero_stage=int(row.get("zero_stage") or 0),
                          overlap_grad_reduce=True)


def _config_key(row: dict[str, Any]) -> tuple:
    return (row["model"], row["gpus"], row["dp"], row["tp"], row["pp"], row["mbz"], row["grad_acc"],
            row.get("zero_stage"), row.get("pp_engine"), row.get("tp_mode"))


def _settings_text(data: dict[str, Any], sweep: str | None) -> str:
    """The words a sweep file says about how its runs (or the runs of sweep ``sweep``) trained."""
    settings = data.get("training_settings") or {}
    return json.dumps(settings.get(sweep, settings) if sweep else settings).lower()


def sweep_trainer(data: dict[str, Any]) -> str:
    """The trainer profile (:data:`planner.cost.constants.TRAINERS`) of the framework a sweep file names
    in its source and training settings: nanotron (eager PyTorch around fused kernels), Megatron-LM and
    NeMo (fused), torchtitan, torch FSDP or llm-foundry (eager); unnamed: Megatron-LM's, the planner's
    default."""
    text = json.dumps([data.get("source"), data.get("training_settings")]).lower()
    for pattern, trainer in ((r"nanotron", "nanotron"), (r"megatron|\bnemo\b", "megatron"),
                             (r"torchtitan|fsdp|llm-foundry|llmfoundry", "eager")):
        if re.search(pattern, text):
            return trainer
    return "megatron"


def sweep_recompute(text: str) -> str:
    """The recomputation a sweep's training settings state (``recompute``: "none ...", "full", "selective
    ...", per-op "op"); not stated: none."""
    m = re.search(r'"recompute":\s*"([^"]*)"', text)
    said = (m.group(1) if m else "none").strip()
    if not said or re.match(r"(none|no\b|off|false)", said):
        return "none"
    for word, mode in (("selective (op)", "op"), ("per-op", "op"), ("selective", "selective"), ("full", "full")):
        if word in said:
            return mode
    raise Unusable(f"recompute {said[:40]!r} not understood (none, selective, per-op or full)")


def sweep_settings(text: str, trainer: str) -> tuple[tuple[str, Any], ...]:
    """Constants a sweep's training settings fix (``text``: :func:`_settings_text`) for its ``trainer``.

    nanotron's sequence-parallel column linears without async communication
    (``tp_linear_async_communication`` false) all-gather their input as a separate autograd op and run
    ``F.linear`` on the gathered tensor, which autograd then saves: each layer keeps its two gathered
    inputs (qkv and gate-up) whole, not 1/tp of them (``sp_saves_gathered_inputs``). The async path,
    and the later ``tp_recompute_allgather`` option, save the shard and gather it again in backward.
    Source: ``column_linear`` in nanotron's ``parallel/tensor_parallel/functional.py``.
    """
    if trainer != "nanotron" or "reduce_scatter" not in text:
        return ()
    m = re.search(r"tp_linear_async_communication\W*(true|false)", text)
    if m and m.group(1) == "false" and not re.search(r"tp_recompute_allgather\W*true", text):
        return (("sp_saves_gathered_inputs", True),)
    return ()


_ROW_FIELDS = ("model", "gpus", "dp", "tp", "pp", "mbz", "grad_acc", "status")


def _sweep_row_skip(row: Any, models: dict[str, ModelSpec | str]) -> str | None:
    """Why a sweep row is not priced (:data:`SWEEP_RULES`, or a field missing), or None."""
    if not isinstance(row, dict):
        return "malformed: a run is an object"
    missing = [k for k in _ROW_FIELDS if row.get(k) is None]
    if missing:
        return f"malformed: no {', '.join(missing)}"
    if not all(_int(row[k]) and row[k] > 0 for k in _ROW_FIELDS[1:7]):
        return "malformed: gpus, dp, tp, pp, mbz and grad_acc are positive integers"
    if isinstance(models.get(row["model"]), str):
        return str(models[row["model"]])
    if row["status"] == "unconfirmed":
        return "status unconfirmed (hover text only, drawn as crashed)"
    if row["status"] in NOT_MEMORY:
        return f"status {row['status']} (not a memory failure)"
    if row.get("gbs_consistent") is False:
        return "global batch differs from dp x mbz x grad_acc"
    if row["model"] not in models:
        return f"model {row['model']} not described in the file"
    return None


def _sweep_model_or_reason(name: str, m: Any) -> ModelSpec | str:
    try:
        return sweep_model(name, m)
    except (KeyError, TypeError) as exc:
        return f"malformed: model {name} has no {exc}" if isinstance(exc, KeyError) else f"malformed: model {name}"


def sweep_cases(path: Path | None = None) -> Cases:
    data = _load(path, SWEEP_FILE)
    models = {name: _sweep_model_or_reason(name, m) for name, m in data["models"].items()}
    per_node = sweep_cluster_dict(path)["devices_per_node"]  # and a GPU without a preset fails here
    trainer = sweep_trainer(data)
    source_file = str(path) if path else ""
    out = Cases()
    merged: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for i, row in enumerate(data["runs"]):
        reason = _sweep_row_skip(row, models)
        if reason:
            out.skipped.append(Skip("sweep", (row.get("src") if isinstance(row, dict) else None) or f"runs[{i}]",
                                    reason))
        else:
            merged[_config_key(row)].append(row)
    for rows in merged.values():
        ok = [r for r in rows if r["status"] == "ok" and r.get("tokens_per_sec_per_gpu")]
        row = max(ok, key=lambda r: r["tokens_per_sec_per_gpu"]) if ok else rows[0]
        for extra in rows:
            if extra is not row:
                out.skipped.append(Skip("sweep", extra.get("src") or "?", "same configuration as another row (merged)"))
        if row["status"] not in ("ok",) + FAILED:
            out.skipped.append(Skip("sweep", row.get("src") or "?", f"status {row['status']}"))
            continue
        nodes = _int(row.get("nodes")) or max(1, row["gpus"] // per_node)
        try:
            if row["gpus"] % nodes or row["dp"] * row["tp"] * row["pp"] != row["gpus"]:
                raise Unusable("malformed: gpus is not dp x tp x pp on whole nodes")
            text = _settings_text(data, row.get("sweep"))
            cfg = sweep_config(row, sweep_recompute(text))
        except (Unusable, SpecError) as exc:
            out.skipped.append(Skip("sweep", row.get("src") or "?", str(exc)))
            continue
        out.cases.append(Case(
            source="sweep", case_id=row.get("src") or "?", group=f"{row['model']}:{row['gpus']}",
            model=models[row["model"]],
            cluster=ClusterRef(preset="sweep", nodes=nodes, devices_per_node=row["gpus"] // nodes,
                               source_file=source_file),
            config=cfg, status="ok" if ok else "failed",
            measured_tokens_per_s_per_gpu=float(row["tokens_per_sec_per_gpu"]) if ok else None,
            trainer=trainer, settings=sweep_settings(text, trainer)))
    out.cases.sort(key=lambda c: (c.group, c.case_id))
    return out


# -- the sweep's cluster ----------------------------------------------------------------------------

# The inter-node link a sweep's ``cluster.inter_node`` names (AWS's EFA and RoCE are Ethernet fabrics).
_LINK_KINDS = ((r"\bEFA\b|RoCE|Ethernet", "ethernet"), (r"InfiniBand|\bIB\b|\bNDR\b|\bHDR\b", "infiniband"))
# ``measured_collective_busbw_GBps_<size>``: bus bandwidth per node count at one message size (nccl-tests'
# sizes are binary: 256MB is 2**28 bytes).
_BUSBW_KEY = re.compile(r"measured_collective_busbw_GBps_(\d+)(KB|MB|GB)$")
_BINARY = {"KB": 2**10, "MB": 2**20, "GB": 2**30}
_COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")


def gpu_preset(gpu: str) -> str | None:
    """The cluster preset of the GPU a run's ``cluster.gpu`` names (:data:`_GPU_PRESETS`), or None."""
    for pattern, name in _GPU_PRESETS:
        if re.search(pattern, gpu):
            return name
    return None


def _sweep_collectives(cluster: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for key, table in cluster.items():
        m = _BUSBW_KEY.match(key)
        if not m or not isinstance(table, dict):
            continue
        size = int(m.group(1)) * _BINARY[m.group(2)]
        for name in _COLLECTIVES:
            values = table.get(name) or []
            points = [{"nodes": _int(n), "message_bytes": size, "bus_bandwidth_bytes_per_s": round(float(b) * 1e9)}
                      for n, b in zip(table.get("nodes") or [], values) if _num(b) and _int(n)]
            if points:
                out.setdefault(name, []).extend(points)
    return out


_SWEEP_CLUSTERS: dict[str, dict[str, Any]] = {}


def sweep_cluster_dict(path: Path | str | None = None) -> dict[str, Any]:
    """The cluster a sweep file (default: the shared sweep) ran on, as a cluster JSON dict (a fresh copy).

    The device and links are those of the preset its ``cluster.gpu`` names; the devices per node its
    ``gpus_per_node``; the inter-node link kind what its ``cluster.inter_node`` names; its measured bus
    bandwidths (``measured_collective_busbw_GBps_<size>``: per node count, every GPU of each node in the
    collective) the ``collectives`` field the cost model interpolates. For the shared sweep this is
    ``datasets/measured/nanotron-h100-efa.json``, the record docs/validation.md cites (a test keeps them
    equal)."""
    file = Path(path) if path else measured_dir() / SWEEP_FILE
    key = f"{file}@{file.stat().st_mtime_ns if file.is_file() else 0}"  # an edited file is read again
    if key not in _SWEEP_CLUSTERS:
        data = _load(Path(path) if path else None, SWEEP_FILE)
        cl = data.get("cluster") or {}
        preset = gpu_preset(str(cl.get("gpu") or ""))
        if preset is None:
            raise SpecError("cluster.gpu", cl.get("gpu"), f"in {path or SWEEP_FILE}: name a GPU with a cluster "
                            f"preset ({', '.join(sorted({n for _, n in _GPU_PRESETS if n}))})")
        d = ClusterSpec.preset(preset).to_dict()
        d["name"] = Path(path).stem + "-cluster" if path else SWEEP_CLUSTER_FILE.removesuffix(".json")
        d["description"] = f"the cluster of {path or SWEEP_FILE}: the {preset} preset's device and links"
        d["devices_per_node"] = _int(cl.get("gpus_per_node")) or d["devices_per_node"]
        for pattern, kind in _LINK_KINDS:
            if re.search(pattern, str(cl.get("inter_node") or ""), re.I):
                d["inter_node"] = dict(d["inter_node"], kind=kind)
                break
        collectives = _sweep_collectives(cl)
        if collectives:
            d["collectives"] = collectives
        _SWEEP_CLUSTERS[key] = d
    return json.loads(json.dumps(_SWEEP_CLUSTERS[key]))


# -- published runs ---------------------------------------------------------------------------------

class Unusable(Exception):
    """A published run the planner cannot express; the message is the skip reason."""


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or x is None:
        return None
    if isinstance(x, (int, float)) and math.isfinite(x):
        return float(x)
    return None


def _int(x: Any) -> int | None:
    v = _num(x)
    return int(v) if v is not None and v == int(v) else None


_GPU_PRESETS = (  # (pattern in the run's cluster.gpu, preset); first match wins (GB200 before B200)
    (r"GB300", "gb300-nvl72"),
    (r"GB200", "gb200-nvl72"),
    (r"B200", "dgx-b200"),
    (r"H200", "dgx-h200"),
    (r"H100", "dgx-h100"),
    (r"A100.*40|40GB", "dgx-a100-40g"),
    (r"A100|A800|Ampere", "dgx-a100-80g"),
    (r"V100", "dgx1-v100"),
)
_PRESET_MEMORY_GIB = {"dgx-h100": 80, "dgx-a100-40g": 40, "dgx-a100-80g": 80, "dgx1-v100": 32,  # GB as published
                      "dgx-h200": 141, "dgx-b200": 180, "gb200-nvl72": 186, "gb300-nvl72": 279}


# The attention kernel a run's source names where it is not the FlashAttention-2-class kernel the
# cluster presets describe, and the fraction of each device's peak it sustains in training (causal,
# forward and backward, per FLOP it computes). llm-foundry's benchmark tables ran its Triton
# FlashAttention: scripts/train/benchmarking/submit_benchmarks.py defaults ``--attn_impl`` to
# ``triton`` and the tables' sweep.sh leaves it there. That 2022 kernel predates Hopper's
# instructions: on the A100 it runs as the A100 presets state (0.30, fitted on these runs); on the
# H100 it sustains 0.16 where FlashAttention-2-class kernels sustain 0.24 (fitted on llm-foundry's
# 77 H100 runs: python -m tools.fit_cluster --param attention_kernel.triton-2022 --device
# H100-SXM5-80GB --fit-published llmfoundry-h100 --presets dgx-h100), and with it the runs'
# pred/meas stops falling with the sequence length (docs/validation.md).
ATTENTION_KERNELS: dict[str, dict[str, float]] = {
    "triton-2022": {"A100-SXM4-40GB": 0.30, "A100-SXM4-80GB": 0.30, "H100-SXM5-80GB": 0.16},
}
# Transformer Engine's cuDNN attention is not here: it is the ``megatron`` trainer's kernel
# (``CostConstants.attention_kernel``) and the dgx-h100 preset states its figure (``attention_kernels``), so
# the stacks that run TE (Megatron-Core r0.8 on, NeMo, Megatron-Bridge) get it as a planner user does. The
# Megatron-style stacks that do not run TE state no kernel of theirs and keep the FlashAttention-2 class:
# Meta's own Llama 3 stack and ByteDance's MegaScale (its paper names FlashAttention-2).
_NON_TE_MEGATRON = ("llama3", "megascale")
_TE_STACKS = ("megatron-h100", "nemotron", "nemo", "mbridge")
# NeMo's and Megatron-Bridge's recipes overlap every collective they can with compute: NeMo-Framework-Launcher's
# conf/training/nemotron/nemotron_15b.yaml sets optim.overlap_grad_sync and overlap_param_sync (distributed
# Adam) and ub_tp_comm_overlap; Megatron-Bridge's scripts/performance configs set tp_comm_overlap with
# userbuffers on H100. Their published tables do not restate it; a run that states its overlap flags is
# priced with what it states.
_NEMO_STACKS = ("nemotron", "nemo", "mbridge")


def _recipe_overlap(run: dict[str, Any]) -> bool:
    """Whether the run is priced with its stack's recipe overlap (:data:`_NEMO_STACKS`): it states none."""
    return run["id"].startswith(_NEMO_STACKS) and not run["config"].get("comm_overlap")


@functools.cache
def _preset_device(preset: str) -> DeviceSpec:
    """A cluster preset's device (which attention kernels it states)."""
    return ClusterSpec.preset(preset).device


def published_cluster(run: dict[str, Any], notes: list[str]) -> ClusterRef:
    cl = run["cluster"]
    gpu = str(cl.get("gpu") or "")
    preset = gpu_preset(gpu)
    if preset is None:
        raise Unusable("GPU type not stated or unknown")
    if "Ampere" in gpu and "A100" not in gpu:
        notes.append("'NVIDIA Ampere' taken as A100 80GB")
    gpus = _int(cl.get("total_gpus"))
    if gpus is None:
        raise Unusable("GPU count is a range or missing")
    if preset.endswith("-nvl72"):
        # A node of the NVL72 presets is the rack's NVLink domain of 72 GPUs; a run states how its GPUs
        # sit in racks seldom (its gpus_per_node, where given, is a compute tray's 4): the largest
        # divisor of its GPU count up to 72 stands for it (64 GPUs: one domain of 64; 128: two of 64).
        per_node = max(d for d in range(1, min(gpus, 72) + 1) if gpus % d == 0)
        notes.append(f"{preset}: {gpus} GPUs taken as {gpus // per_node} NVLink domain(s) of {per_node} (the "
                     "largest divisor of the GPU count up to 72; the run does not say how they sit in racks)")
    else:
        per_node = _int(cl.get("gpus_per_node")) or 8
    if gpus < per_node:
        per_node = gpus
    if gpus % per_node:
        raise Unusable("GPU count is not a whole number of nodes")
    mem = _num(cl.get("gpu_memory_gb"))
    memory_gib = None
    if mem and abs(mem - _PRESET_MEMORY_GIB[preset]) > 0.05 * mem:
        memory_gib = mem
        notes.append(f"{preset} with {mem:g} GB devices")
    if "inter_node" in cl and cl["inter_node"] and preset != "dgx1-v100":
        notes.append(f"network as the {preset} preset (run states: {str(cl['inter_node'])[:40]})")
    kernel = ""
    if run["id"].startswith("llmfoundry"):
        kernel = "triton-2022"
        notes.append("attention: llm-foundry's Triton FlashAttention (submit_benchmarks.py's default attn_impl)")
    elif run["id"].startswith(_TE_STACKS) and _preset_device(preset).attention_efficiency("cudnn") is not None:
        notes.append("attention: Transformer Engine's cuDNN fused attention (the megatron trainer's kernel; its "
                     f"choice on the {_preset_device(preset).name})")
    return ClusterRef(preset=preset, nodes=gpus // per_node, devices_per_node=per_node, memory_gib=memory_gib,
                      attention_kernel=kernel)


_OLD_ATTENTION = ("deepspeed-azure-2022", "pytorch-fsdp-blog-2022", "opt-175b", "fsdp-paper")


def _first_int(d: dict[str, Any], *keys: str) -> int | None:
    return next((v for v in (_int(d.get(k)) for k in keys) if v is not None), None)


def _moe_fields(m: dict[str, Any], name: str) -> dict[str, Any]:
    """A mixture-of-experts run's expert fields as the llama family takes them (planner.models.moe; as
    ``datasets/models/mixtral-8x7b.json``), under the names publishers and Hugging Face configs use;
    empty for a dense model. A model named MoE without its expert count or top-k is not priced."""
    experts = _first_int(m, "num_experts", "experts", "n_routed_experts", "num_local_experts", "moe_num_experts")
    if experts is None:
        if re.search(r"MoE|Mixtral|expert|DeepSeek-V[23]", name, re.I):
            raise Unusable("mixture of experts: expert count not given")
        return {}
    top_k = _first_int(m, "top_k", "experts_per_token", "num_experts_per_tok", "moe_top_k", "moe_router_topk")
    if top_k is None or not 1 <= top_k <= experts:
        raise Unusable("mixture of experts: top-k (experts per token) not given")
    out: dict[str, Any] = {"num_experts": experts, "top_k": top_k, "capacity_factor": 1.0}
    for key, names in (("moe_ffn_hidden", ("moe_ffn", "moe_ffn_hidden", "moe_intermediate_size", "expert_ffn")),
                       ("shared_experts", ("shared_experts", "n_shared_experts")),
                       ("first_dense_layers", ("first_dense_layers", "first_k_dense_replace"))):
        value = _first_int(m, *names)
        if value:
            out[key] = value
    return out


def published_model(run: dict[str, Any], notes: list[str]) -> ModelSpec:
    m = run["model"]
    layers, hidden, heads = _int(m.get("layers")), _int(m.get("hidden")), _int(m.get("heads"))
    seq = _int(m.get("seq_len"))
    if None in (layers, hidden, heads, seq):
        raise Unusable("model dimensions not given")
    name = str(m.get("name") or "")
    experts = _moe_fields(m, name)
    if re.search(r"T5", name):
        raise Unusable("encoder-decoder model")
    vocab = _int(m.get("vocab"))
    if vocab is None:
        vocab = 51200
        notes.append("vocabulary not given: 51200 assumed")
    ffn, kv = _int(m.get("ffn")), _int(m.get("kv_heads"))
    fused = not run["id"].startswith(_OLD_ATTENTION)
    if re.search(r"llama", name, re.I) or experts:
        if ffn is None:
            raise Unusable("model dimensions not given")
        cfg: dict[str, Any] = {"num_layers": layers, "hidden": hidden, "heads": heads, "ffn_hidden": ffn,
                               "kv_heads": kv if kv and kv != heads else None, "vocab_size": vocab,
                               "seq_len": seq, "fused_attention": fused, **experts}
        family = "llama"
        if experts and not re.search(r"llama|mixtral|deepseek|qwen|mistral", name, re.I):
            notes.append("mixture of experts priced as a Llama-shaped model with SwiGLU experts")
    else:
        cfg = {"num_layers": layers, "hidden": hidden, "heads": heads, "vocab_size": vocab, "seq_len": seq,
               "dropout": 0.0, "tie_embeddings": True, "fused_attention": fused}
        if ffn and ffn != 4 * hidden:
            cfg["ffn_hidden"] = ffn
        family = "gpt"
        if kv and kv != heads:
            notes.append(f"grouped-query attention ({kv} kv heads) priced as multi-head (gpt family)")
    dtype = "fp16" if re.search(r"fp16", str(run["config"].get("precision") or "")) else "bf16"
    if run["cluster"].get("gpu") and "V100" in run["cluster"]["gpu"]:
        dtype = "fp16"
    return ModelSpec(name=f"{family}-{layers}x{hidden}-s{seq}", family=family, config=tuple(sorted(cfg.items())),
                     dtype=dtype)


def _zero_stage(c: dict[str, Any], notes: list[str]) -> int:
    text = str(c.get("sharding") or "")
    if re.search(r"offload|Gemini", text, re.I) or c.get("cpu_offload_params") or c.get("offload"):
        raise Unusable("CPU offload not modelled")
    if re.search(r"ZeRO\+\+", text):
        raise Unusable("ZeRO++ (quantized, hierarchical) not modelled")
    if re.search(r"HSDP", text, re.I) or _keeps_gathered(c):
        return 3
    stage = _int(c.get("zero_stage"))
    if stage is not None:
        return stage
    if re.search(r"SHARD_GRAD_OP|ZeRO-2", text):
        return 2
    if re.search(r"FSDP|FULL_SHARD|ZeRO-3", text):
        return 3
    if re.search(r"distributed optimizer", text):
        return 1
    return 0


def _recompute(c: dict[str, Any], measured: dict[str, Any], notes: list[str], layers: int = 0) -> tuple[str, int]:
    """The run's recomputation and, for full recomputation of one block in every k, k."""
    text = str(c.get("activation_checkpointing") or "none").lower()
    if text.startswith("selective"):
        if "fraction" in text:  # whole blocks checkpointed, a fraction of them (fms-fsdp)
            every = _checkpointed_every(measured)
            if every:
                notes.append(f"activation checkpointing on one block in {every}, from the published HFU/MFU")
                return "full", every
        if re.search(r"\bop\b|per-op", text):  # torchtitan's selective_ac_option = "op"
            return "op", 1
        if "fraction" in text or "layer" in text:
            notes.append(f"activation checkpointing '{text[:30]}' priced as selective")
        return "selective", 1
    if text.startswith(("full", "on", "implied", "true", "yes", "enabled", "all", "block", "layer")):
        every = _layers_checkpointed_every(text, layers)
        if every > 1:
            notes.append(f"activation checkpointing on one block in {every} (the run's count of checkpointed layers)")
        return "full", every
    return "none", 1


def _layers_checkpointed_every(text: str, layers: int) -> int:
    """k for a run that checkpoints N of its ``layers`` blocks, as its text says ("recompute_num_layers=5",
    "20 of 80 layers", "5 layers"); 1 (every block) when it names no count."""
    m = re.search(r"(\d+)\s*(?:of|/)\s*\d+\s*(?:layers|blocks)", text) or \
        re.search(r"(?:num_layers|recompute_layers|layers)\D{0,3}(\d+)", text) or \
        re.search(r"(\d+)\s*(?:layers|blocks)", text)
    n = int(m.group(1)) if m else 0
    return max(1, round(layers / n)) if 0 < n < layers else 1


def _checkpointed_every(measured: dict[str, Any]) -> int | None:
    """k where a run checkpoints one whole block in every k, read from its own hardware and model FLOP
    utilisations: recomputing a fraction f of the blocks' forwards makes HFU / MFU = (3 + f) / 3. None
    without both figures, or when they show no recomputation."""
    hfu, mfu = _num(measured.get("hfu")), _num(measured.get("mfu"))
    if not hfu or not mfu:
        return None
    fraction = min(1.0, 3.0 * (hfu / mfu - 1.0))
    return max(1, round(1.0 / fraction)) if fraction >= 0.05 else None


def published_config(run: dict[str, Any], gpus: int, notes: list[str]) -> ParallelConfig:
    c = run["config"]
    cp = _int(c.get("cp")) or 1
    fp8 = bool(re.search(r"fp8|float8", str(c.get("precision") or ""), re.I))
    tp, pp = _int(c.get("tp")) or 1, _int(c.get("pp")) or 1
    dp = _int(c.get("dp")) or _int(c.get("dp_shard"))
    if dp is None:
        if gpus % (tp * pp * cp):
            raise Unusable("dp x cp x tp x pp does not match the GPU count")
        dp = gpus // (tp * pp * cp)
    if dp * cp * tp * pp != gpus:
        raise Unusable("dp x cp x tp x pp does not match the GPU count")
    mb = _int(c.get("micro_batch"))
    if mb is None:
        mb = 1
        notes.append("micro-batch not published: 1 assumed")
    gbs = _int(c.get("global_batch_seqs"))
    per_replica = _int(c.get("batch_size_per_dp")) or _int(c.get("local_batch"))
    if gbs is None and per_replica:
        gbs = dp * per_replica
    if gbs is None and _int(c.get("grad_accum")):
        gbs = dp * mb * _int(c.get("grad_accum"))
    if gbs is None:
        raise Unusable("global batch not given")
    if gbs % (dp * mb):
        raise Unusable("global batch is not a multiple of dp x micro-batch")
    vpp = _virtual_stages(c, _int(run["model"].get("layers")) or 0, pp, notes)
    zero = _zero_stage(c, notes)
    ep = _int(c.get("ep")) or _int(c.get("expert_parallel")) or 1
    if dp % ep:
        raise Unusable(f"ep {ep} does not divide dp {dp}")
    if c.get("activation_cpu_offload") is True:
        raise Unusable("activation CPU offload not modelled")
    recompute, every = _recompute(c, run.get("measured") or {}, notes, _int(run["model"].get("layers")) or 0)
    sp = c.get("sequence_parallel")
    if sp is None:
        sp = tp > 1
        if tp > 1:
            notes.append("sequence parallelism not stated: on (tp > 1)")
    if _recipe_overlap(run):
        notes.append("communication overlap not stated: the recipes' (gradients, parameters, tp)")
    return ParallelConfig(dp=dp, tp=tp, pp=pp, micro_batch_size=mb, num_micro_batches=gbs // (dp * mb),
                          virtual_stages=vpp if pp > 1 else 1,
                          schedule="interleaved-1f1b" if pp > 1 and vpp > 1 else "1f1b",
                          recompute=recompute, recompute_every=every, sequence_parallel=bool(sp and tp > 1),
                          zero_stage=zero,
                          overlap_grad_reduce=_overlaps_grad_reduce(run), cp=cp, fp8=fp8, ep=ep,
                          dp_shard=_shard_group(c, dp, zero, notes),
                          reshard_after_forward=not (zero == 3 and _keeps_gathered(c)))


def _virtual_stages(c: dict[str, Any], layers: int, pp: int, notes: list[str]) -> int:
    """Model chunks per pipeline rank: the run's ``vpp``; for a schedule stated as interleaved without one,
    chunks of a single block, with the embedding and the output head as chunks of their own (Llama 3's
    paper, Sec 3.3.2: the first chunk holds only the embedding, the last only the head and the loss, and
    the bubble is (PP - 1)/(V·M); its 126 blocks on 16 ranks then make V = 8)."""
    stated = _int(c.get("vpp"))
    if stated or pp <= 1 or "interleav" not in str(c.get("pipeline_schedule") or "").lower():
        return stated or 1
    vpp = max(1, (layers + 2) // pp)
    notes.append(f"interleaved schedule without its chunk count: {vpp} chunks per rank (one block each)")
    return vpp


def _keeps_gathered(c: dict[str, Any]) -> bool:
    """FSDP that keeps the gathered parameters from forward to backward (no reshard after forward)."""
    return bool(re.search(r"NOT resharded|reshard_after_forward.*false", str(c.get("sharding") or ""),
                          re.I))


def _shard_group(c: dict[str, Any], dp: int, zero: int, notes: list[str]) -> int | None:
    """HSDP's shard group size, where the run states one smaller than dp (else None: all dp)."""
    size = _int(c.get("sharding_group_size"))
    if zero != 3 or size is None or size >= dp:
        return None
    if dp % size:
        notes.append(f"HSDP shard group {size} does not divide dp {dp}: priced as ZeRO-3 over all dp")
        return None
    return size


def _overlaps_grad_reduce(run: dict[str, Any]) -> bool:
    """Whether the run reduces gradients in buckets during backward: torch DDP and FSDP always do, and so
    do NeMo's and Megatron-Bridge's recipes (:data:`_NEMO_STACKS`); Megatron-LM only with
    ``--overlap-grad-reduce`` (off by default), which its run notes state."""
    return published_trainer(run) != "megatron" or _recipe_overlap(run) \
        or "--overlap-grad-reduce" in str(run["config"].get("comm_overlap"))


def _flops_per_token(model: ModelSpec, recompute: str, hardware: bool) -> float:
    """Training FLOPs per token as the publishers count them: 6 x (block and LM-head parameters) plus
    12 x layers x hidden x seq for attention (Megatron's Eq. 3, PaLM's count); x 4/3 when the
    figure counts the recomputed forward."""
    k = model.kwargs
    h, L, s, v = k["hidden"], k["num_layers"], k["seq_len"], k["vocab_size"]
    kv = (k.get("kv_heads") or k["heads"]) * (h // k["heads"])
    if model.family == "llama":
        block = 2 * h * h + 2 * h * kv + 3 * h * k["ffn_hidden"]
    else:
        block = 4 * h * h + 2 * h * (k.get("ffn_hidden") or 4 * h)
    flops = 6 * (L * block + v * h) + 12 * L * h * s
    return flops * (4 / 3 if hardware and recompute == "full" else 1.0)


def published_throughput(run: dict[str, Any], model: ModelSpec, cfg: ParallelConfig, gpus: int,
                         notes: list[str]) -> tuple[float, str]:
    """Measured tokens/s per GPU and where it came from."""
    me = run["measured"]
    if _num(me.get("tokens_per_s_per_gpu")):
        return float(me["tokens_per_s_per_gpu"]), "tokens/s/gpu"
    if _num(me.get("tokens_per_s")):
        return float(me["tokens_per_s"]) / gpus, "tokens/s"
    if _num(me.get("step_time_s")):
        return cfg.global_batch * model.seq_len / (float(me["step_time_s"]) * gpus), "step time"
    tflops = _num(me.get("model_tflops_per_gpu")) or _num(me.get("tflops_per_gpu"))
    if tflops:
        text = " ".join(str(x) for x in (me.get("tflops_kind"), me.get("flops_convention"),
                                         run["config"].get("activation_checkpointing")))
        hardware = bool(re.search(r"hardware|96|recompute factor", text, re.I)) and \
            not _num(me.get("model_tflops_per_gpu"))
        return tflops * 1e12 / _flops_per_token(model, cfg.recompute, hardware), \
            "TFLOP/s (6N + 12Lhs per token" + (", x4/3 recompute)" if hardware else ")")
    raise Unusable("no throughput in tokens/s, step time or TFLOP/s")


# Trainers whose element-wise work runs eagerly (one kernel per op), by the run id's source prefix;
# Megatron-LM and the stacks built on it (NeMo, Megatron-Bridge, MegaScale, Megatron-DeepSpeed, metaseq)
# fuse it, and so does torch.compile.
_EAGER_TRAINERS = ("llmfoundry", "fms", "torchtitan", "fsdp", "pytorch", "colossalai")


def published_trainer(run: dict[str, Any]) -> str:
    """``"compiled"``, ``"eager"`` or ``"megatron"``: how the run's trainer executes element-wise work."""
    if run["config"].get("compile") is True:
        return "compiled"
    return "eager" if run["id"].startswith(_EAGER_TRAINERS) else "megatron"


# llm-foundry's models default to ``loss_fn: fused_crossentropy``: flash-attn's cross-entropy kernel reads
# the bf16 logits once and writes their gradient in place (no fp32 log-probabilities kept, about one
# fp32-sized pass over the logits instead of six).
_FUSED_CROSS_ENTROPY = (("loss_traffic_passes", 1.0), ("loss_workspace_copies", 0.0))


# torch FSDP with mixed precision (llm-foundry's ``amp_bf16``, FMS, torchtitan's FSDP2): fp32 parameter and
# gradient shards and Adam's fp32 moments (4 + 4 + 8 bytes per parameter, no separate master copy), the
# weights all-gathered and held gathered in bf16 (``param_dtype``).
# The state is the ``torch`` trainer profile's (planner.cost.constants.TRAINERS), stated once there.
_FP32_STATE = ("bf16_grad_bytes", "grad_bytes", "optimizer_bytes", "weight_bytes")
FSDP_MIXED_PRECISION = tuple(sorted({**{k: TRAINERS["torch"][k] for k in _FP32_STATE},
                                     "fsdp_param_bytes": 2.0}.items()))
_FSDP_TRAINERS = ("llmfoundry", "fms", "torchtitan")


def published_settings(run: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """Constants the run's own source fixes: llm-foundry's fused cross-entropy
    (:data:`_FUSED_CROSS_ENTROPY`), torch FSDP's mixed-precision state (:data:`FSDP_MIXED_PRECISION`), the
    Megatron-LM overlap flags its run notes state, the overlaps NeMo's recipes set (:data:`_NEMO_STACKS`), and
    the FlashAttention-2 class for the Megatron-style stacks without Transformer Engine (:data:`_NON_TE_MEGATRON`)."""
    out = list(_FUSED_CROSS_ENTROPY) if run["id"].startswith("llmfoundry") else []
    if run["id"].startswith(_NON_TE_MEGATRON):
        out.append(("attention_kernel", ""))
    if run["id"].startswith(_FSDP_TRAINERS):
        out += FSDP_MIXED_PRECISION
    overlap = str(run["config"].get("comm_overlap"))
    nemo = _recipe_overlap(run)
    if "--tp-comm-overlap" in overlap or nemo:
        out.append(("tp_comm_overlap", 1.0))
    if "--overlap-param-gather" in overlap or nemo:
        out.append(("overlap_param_gather", True))
    return tuple(sorted(out))


_RUN_BLOCKS = ("model", "cluster", "config", "measured")


def published_cases(path: Path | None = None) -> Cases:
    data = _load(path, PUBLISHED_FILE)
    out = Cases()
    for i, run in enumerate(data["runs"]):
        notes: list[str] = []
        rid = str(run.get("id") or f"runs[{i}]") if isinstance(run, dict) else f"runs[{i}]"
        try:
            if not isinstance(run, dict) or not all(isinstance(run.get(k), dict) for k in _RUN_BLOCKS):
                raise Unusable(f"malformed: a run is an object with {', '.join(_RUN_BLOCKS)} objects")
            cluster = published_cluster(run, notes)
            model = published_model(run, notes)
            gpus = cluster.nodes * cluster.devices_per_node
            cfg = published_config(run, gpus, notes)
            tput, how = published_throughput(run, model, cfg, gpus, notes)
        except Unusable as exc:
            out.skipped.append(Skip("published", rid, str(exc)))
            continue
        except (KeyError, TypeError, ValueError, SpecError) as exc:  # a user's file: a field missing or mistyped
            out.skipped.append(Skip("published", rid, f"malformed: {type(exc).__name__} {str(exc)[:80]}"))
            continue
        out.cases.append(Case(source="published", case_id=rid, group=f"{run['model'].get('name')}:{gpus}",
                              model=model, cluster=cluster, config=cfg, status="ok",
                              measured_tokens_per_s_per_gpu=tput, measured_from=how,
                              approximations=tuple(notes), trainer=published_trainer(run),
                              settings=published_settings(run)))
    return out


def load_cases(source: str = "all", *, sweep_path: Path | None = None,
               published_path: Path | None = None) -> Cases:
    if source not in ("sweep", "published", "all"):
        raise SpecError("--source", source, "use sweep, published or all")
    out = Cases()
    if source in ("sweep", "all"):
        s = sweep_cases(sweep_path)
        out.cases += s.cases
        out.skipped += s.skipped
    if source in ("published", "all"):
        p = published_cases(published_path)
        out.cases += p.cases
        out.skipped += p.skipped
    return out
