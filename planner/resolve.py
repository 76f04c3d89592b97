"""What the caller asked for, resolved and checked: the model traced, the cluster read, the knobs valid.

:func:`resolve_model` builds a preset (or takes a module) and traces it on meta; :func:`resolve_cluster`
reads a preset or a JSON file; :func:`runnable_space` and :func:`check_config` refuse what the
runtime cannot run or the cluster cannot hold, with a :class:`~planner.errors.SpecError` naming the
field and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from planner.cluster import ClusterSpec
from planner.cost.context_parallel import check_cp
from planner.cost.experts import check_ep
from planner.cost.fp8 import check_fp8
from planner.errors import PlannerError, SpecError, raise_all
from planner.models import FAMILIES, ModelPreset, load_preset
from planner.models.moe import MoEFeedForward
from planner.plan import ParallelConfig
from planner.sample_spec import describe_sample
from planner.space import SearchSpace, check_sequence_parallel
from planner.trace import CostGraph, trace_model
from planner.trace.tracer import token_length
from planner.units import plural


@dataclass
class ResolvedModel:
    module: nn.Module | None  # None when the graph comes from a plan file
    preset: ModelPreset | None
    graph: CostGraph
    sample_spec: dict[str, Any] | None = None  # a module's sample input, described (planner.sample_spec)


def resolve_cluster(cluster: ClusterSpec | str, *, nodes: int | None = None,
                    devices_per_node: int | None = None, strict: bool = True) -> ClusterSpec:
    """A preset name, a JSON file or a ClusterSpec, resized; ``strict=False`` (the CLI's ``--i-know``)
    accepts figures outside the plausible ranges (:mod:`planner.plausible`) with a warning."""
    if isinstance(cluster, ClusterSpec):
        return cluster.resized(nodes=nodes, devices_per_node=devices_per_node, strict=strict)
    if isinstance(cluster, str):
        if cluster.endswith(".json"):
            return ClusterSpec.from_json(cluster, strict=strict).resized(nodes=nodes, devices_per_node=devices_per_node,
                                                                         strict=strict)
        return ClusterSpec.preset(cluster, nodes=nodes, devices_per_node=devices_per_node, strict=strict)
    raise SpecError("cluster", type(cluster).__name__, "pass a ClusterSpec, a preset name or a path to a JSON file")


def resolve_model(model: nn.Module | str, *, seq_len: int | None = None, sample_input: Any = None,
                  dtype: str) -> ResolvedModel:
    """Build (for a preset name) and trace the model at batch 1."""
    preset = None
    if isinstance(model, str):
        preset = load_preset(model)
        if seq_len is not None and preset.seq_len is not None and seq_len > preset.seq_len:
            preset = _stretched(preset, seq_len)
        module = preset.build(device="meta")
        inputs = sample_input if sample_input is not None else preset.sample_input(1, seq_len)
        name = preset.name
    elif isinstance(model, nn.Module):
        module = model
        if sample_input is None:
            raise SpecError("sample_input", None, "for an nn.Module, pass sample_input= (a tensor or tuple of "
                            "tensors, batch 1 is enough; meta tensors are fine) so its shapes can be traced")
        inputs = sample_input
        name = type(model).__name__
        if seq_len is not None:
            _check_module_seq_len(seq_len, sample_input)
    else:
        raise SpecError("model", type(model).__name__, "pass an nn.Module or a preset name "
                        "(`python -m planner models` lists them)")
    # A preset's module was built here only to be traced: trace it in place instead of deep-copying
    # it (0.35 s, 40% of tracing GPT-3 175B); a caller's module is copied so it is left as given.
    graph = trace_model(module, inputs, name=name, dtype=dtype, seq_len=seq_len, copy_model=preset is None)
    if preset is None:
        graph.notes.extend(_state_notes(module, graph))
    if preset is not None and preset.config.get("seq_len") != load_preset(preset.name).config.get("seq_len"):
        graph.notes.append(f"{preset.name} stretched to {seq_len} positions (rotary) with fused attention "
                           "(FlashAttention: no s x s scores stored), as long-context training runs it")
    return ResolvedModel(module=module, preset=preset, graph=graph,
                         sample_spec=describe_sample(inputs) if preset is None else None)


def _state_notes(module: nn.Module, graph: CostGraph) -> list[str]:
    """What a module of one's own holds that the plan should say: frozen parameters (priced as held, with no
    gradient, optimizer state or weight-gradient work: the trace counted them) and buffers (not counted in
    memory)."""
    notes = []
    if graph.frozen_param_count:
        notes.append(f"{graph.frozen_param_count:,} of {graph.param_count:,} parameters are frozen "
                     "(requires_grad=False): priced as held weights with no gradient, optimizer state, "
                     "weight-gradient work or data-parallel reduction")
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())
    if buffers > 2**20:
        notes.append(f"{buffers / 2**20:,.1f} MiB of buffers (register_buffer) are not counted in the memory per "
                     "device; add them to what a device must hold")
    return notes


def _check_module_seq_len(seq_len: int, sample_input: Any) -> None:
    """A module is traced at its sample input's shape, so a ``seq_len`` it does not show would be recorded
    on the plan without pricing it."""
    from torch.utils._pytree import tree_flatten

    shown = token_length([t for t in tree_flatten(sample_input)[0] if isinstance(t, torch.Tensor)])
    if shown != seq_len:
        now = f", now {shown}" if shown is not None else ""
        raise SpecError("seq_len", seq_len, "a module is traced at its sample_input's shape: pass a sample_input "
                        f"with that many positions (dim 1 of the token ids{now}), or leave seq_len out")


def _stretched(preset: ModelPreset, seq_len: int) -> ModelPreset:
    """``preset`` at ``seq_len`` beyond its own positions: only where positions are computed (rotary), and
    with fused attention (FlashAttention: long-context training never stores the s x s scores)."""
    if not preset.spec.any_seq_len:
        raise SpecError("seq_len", seq_len, f"preset {preset.name} has {preset.seq_len} positions (a learned "
                        f"table); use --seq-len <= {preset.seq_len}")
    return replace(preset, config={**preset.config, "seq_len": seq_len, "fused_attention": True})


def default_dtype(cluster: ClusterSpec) -> str:
    """Train in bf16 where every device lists a bf16 peak, else fp16, else fp32 (CPU processes)."""
    for dtype in ("bf16", "fp16"):
        if all(dtype in g.device.peak_flops for g in cluster.groups):
            return dtype
    return "fp32"


def runnable_space(resolved: ResolvedModel, space: SearchSpace) -> SearchSpace:
    """``space`` without sequence parallelism for a preset family whose blocks the runtime does not split along
    the sequence (``Family.sequence_parallel``), and without context parallelism for a preset the runtime
    cannot shard sequences of (:func:`no_context_parallel`); asking for either alone is an error naming the fix.

    A user's module (or a Hugging Face model) runs through ``runtime.parallelize``, which splits no
    sequence: neither sequence nor context parallelism. A stored graph without its module keeps the
    space: it is planned, not run.
    """
    preset = resolved.preset
    if preset is None:
        if resolved.module is None:
            return space
        space = _without_sequence_split(space, "the runtime splits sequences only for the project's gpt and llama "
                                               "presets, not for a model of your own; drop it")
        return _without_selective(space, resolved)
    space = replace(_runnable_cp(resolved, space), runtime_combinations=True)
    if preset.spec.sequence_parallel or not resolved.graph.seq_len or True not in space.sequence_parallel:
        return space
    if False not in space.sequence_parallel:
        raise SpecError("sequence_parallel", True, _no_sequence_parallel(preset))
    return replace(space, sequence_parallel=(False,))


def _without_selective(space: SearchSpace, resolved: ResolvedModel) -> SearchSpace:
    """``space`` without selective recompute for a module none of whose layers has an ``attn`` submodule,
    which the runtime checkpoints for it (``runtime/recompute.py``); asking for it alone is an error."""
    module = resolved.module
    if "selective" not in space.recompute or module is None:
        return space
    names = dict(module.named_modules())
    if any(hasattr(names.get(layer.name), "attn") for layer in resolved.graph.layers):
        return space
    if space.recompute == ("selective",):
        raise SpecError("recompute", "selective", "the runtime recomputes selectively the `attn` submodule of each "
                        "layer, and no layer of this model has one: use 'full', 'op' or 'none'")
    return replace(space, recompute=tuple(r for r in space.recompute if r != "selective"))


def _without_sequence_split(space: SearchSpace, why: str) -> SearchSpace:
    """``space`` without sequence and context parallelism; asking for either alone is an error naming ``why``."""
    if False not in space.sequence_parallel:
        raise SpecError("sequence_parallel", True, why)
    if space.cp is not None and 1 not in space.cp:
        raise SpecError("cp", space.cp[0] if len(space.cp) == 1 else space.cp, why)
    return replace(space, sequence_parallel=(False,), cp=(1,))


CONTEXT_PARALLEL_FAMILIES = ("gpt", "llama")  # whose attention runtime/context_parallel.py shards (it reads this)


def no_context_parallel(resolved: ResolvedModel) -> str | None:
    """Why the runtime cannot run this preset with ``cp > 1`` (the fix included), or None when it can: a family
    whose attention it does not own, attention or residual dropout (the sharded attention has none), or a
    mixture of experts (its capacity counts the tokens of one rank's shard)."""
    preset = resolved.preset
    if preset is None:
        return None
    if preset.family not in CONTEXT_PARALLEL_FAMILIES:
        return (f"the runtime shards sequences only for the {list(CONTEXT_PARALLEL_FAMILIES)} families, not for "
                f"{preset.family!r} (model {preset.name}); drop --cp or use --cp 1")
    modules = list(resolved.module.modules()) if resolved.module is not None else []
    if any(getattr(m, "dropout", 0.0) for m in modules):
        return f"model {preset.name} has dropout, which the context-parallel attention does not run; drop --cp"
    if any(isinstance(m, MoEFeedForward) for m in modules):
        return (f"model {preset.name} routes tokens to experts with a capacity counted on the tokens each rank "
                "holds, which cp changes; drop --cp")
    return None


def _runnable_cp(resolved: ResolvedModel, space: SearchSpace) -> SearchSpace:
    """``space`` with cp = 1 only where the runtime cannot run this preset with cp > 1."""
    if space.cp == (1,):
        return space
    why = no_context_parallel(resolved)
    if why is None:
        return space
    if space.cp is not None and 1 not in space.cp:
        raise SpecError("cp", space.cp[0] if len(space.cp) == 1 else space.cp, why)
    return replace(space, cp=(1,))


def _no_sequence_parallel(preset: ModelPreset) -> str:
    families = sorted(name for name, fam in FAMILIES.items() if fam.sequence_parallel)
    return (f"the runtime splits the sequence only for the {families} families, not for {preset.family!r} "
            f"(model {preset.name}); drop --sequence-parallel")


def check_config(cfg: ParallelConfig, graph: CostGraph, cluster: ClusterSpec) -> None:
    """A hand-written configuration must match the cluster and the model; every mismatch is reported at
    once (:class:`~planner.errors.SpecErrors`), the schedule's own constraints after them."""
    from planner import schedules

    errors: list[SpecError] = []
    if cfg.world_size != cluster.num_devices:
        name, got = ("dp*tp*pp", f"{cfg.dp}*{cfg.tp}*{cfg.pp}") if cfg.cp == 1 else \
            ("dp*cp*tp*pp", f"{cfg.dp}*{cfg.cp}*{cfg.tp}*{cfg.pp}")
        errors.append(SpecError(name, f"{got}={cfg.world_size}",
                                f"the degrees must multiply to the cluster's {plural(cluster.num_devices, 'device')} "
                                f"({cluster.summary()}); adjust --dp/{'--cp/' if cfg.cp > 1 else ''}--tp/--pp or "
                                "--nodes"))
    dpn = cluster.min_devices_per_node
    # A tp group wider than a node is priced (its collectives cross the network every layer, which
    # the explanation says) on one device type; on a mixed cluster it could straddle two.
    if cfg.tp > dpn and not cluster.is_homogeneous:
        errors.append(SpecError("tp", cfg.tp, f"tensor parallelism beyond one node ({plural(dpn, 'device')}) is "
                                f"not priced on a mixed cluster; use --tp <= {dpn}"))
    elif cfg.tp > dpn and cfg.tp % dpn:
        errors.append(SpecError("tp", cfg.tp, f"a tensor-parallel group wider than a node must span whole nodes of "
                                f"{plural(dpn, 'device')}; use --tp {dpn * (cfg.tp // dpn)} or "
                                f"{dpn * (cfg.tp // dpn + 1)}"))
    if cfg.sequence_parallel:
        try:
            check_sequence_parallel(graph, (True,))
        except SpecError as exc:
            errors.append(exc)
    if cfg.fp8:  # FP8 GEMMs need FP8 tensor cores on every device (cost/fp8.py)
        try:
            check_fp8(cluster)
        except SpecError as exc:
            errors.append(exc)
    cp_error = check_cp(cfg.cp, graph.seq_len)  # the balanced layout's 2·cp chunks per sequence
    if cp_error is not None:
        errors.append(cp_error)
    if cfg.pp * cfg.virtual_stages > graph.num_layers:
        errors.append(SpecError("pp", cfg.pp, f"the model has {plural(graph.num_layers, 'layer')}, fewer than pp x "
                                f"virtual stages = {cfg.pp * cfg.virtual_stages}; lower --pp or --virtual-stages"))
    if (ep_error := check_ep(cfg.ep, cfg.zero_stage, graph, cfg.shard_group)) is not None:  # cost/experts.py
        errors.append(ep_error)
    raise_all(errors)
    try:
        schedules.get_schedule(cfg.schedule).validate(cfg.pp, cfg.num_micro_batches, cfg.virtual_stages)
    except SpecError as exc:  # the schedule's p, m, v as the configuration (and the command line) names them
        raise SpecError(_SCHEDULE_FIELDS.get(exc.field, exc.field), exc.value, exc.fix) from exc
    except ValueError as exc:  # the message already names the field, the value and the fix
        raise PlannerError(str(exc)) from exc


_SCHEDULE_FIELDS = {"p": "pp (--pp)", "v": "virtual_stages (--virtual-stages)",
                    "m": "num_micro_batches (--global-batch / (--dp x --micro-batch))"}


def default_sample_input(preset: ModelPreset, seq_len: int | None = None) -> tuple[torch.Tensor, ...]:
    return preset.sample_input(1, seq_len)
