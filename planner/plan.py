"""The plan: the JSON contract between the planner and the runtime.

A plan says who runs what (pipeline stages: which layers, which ranks), how the work is split
(data, tensor and pipeline degrees, micro-batching, schedule, recomputation, ZeRO stage), what
the planner predicts (step time, MFU, memory per device) and why it chose this. The runtime
executes it and never re-decides. ``schema_version`` changes when a field's meaning changes;
``docs/plan.schema.json`` is the JSON Schema every file is checked against on load.

Two words, one meaning each: a *stage* is a model chunk (``Plan.stages``: contiguous layers); a
*device* is a pipeline position (``Prediction.devices``, ``Stage.device_index``): with ``v``
virtual stages each device runs ``v`` chunks. Ranks are laid out by :class:`planner.layout.RankLayout`:
``rank = ((pp_index * dp + dp_index) * cp + cp_index) * tp + tp_index``, a row-major ``DeviceMesh``
of shape ``(pp, dp, cp, tp)`` with axis names ``("pp", "dp", "cp", "tp")`` (schema 2.1; a 2.0 plan's
``(pp, dp, tp)`` mesh is read as ``cp = 1``).

Every block is typed: :class:`ParallelConfig`, :class:`Stage`, :class:`ModelInfo`,
:class:`Prediction` (with :class:`~planner.plan_types.DevicePrediction` per device),
:class:`SolverReport`, :class:`~planner.cluster.ClusterSpec`, :class:`~planner.plan_types.TensorSplits`
and :class:`~planner.plan_types.SearchReport`.

A plan carries the fingerprint of its own inputs and predictions (:class:`PlanFingerprint`, schema
2.0): reading a file whose inputs or predictions were edited by hand raises :class:`PlanEditedError`
naming what changed, unless the reader re-prices on purpose (``evaluate --plan``, ``verify=False``).
Schema 1.x files (no fingerprint, ``predicted.stages`` for ``predicted.devices``) are read, converted,
with a warning that they are unverified.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from planner.cluster import ClusterSpec
from planner.errors import PlanMismatchError, SpecError, read_json_file
from planner.layout import MESH_AXES, RankLayout
from planner.paths import schema_path
from planner.plan_types import (
    PLACEMENTS_SCHEMA,
    STYLES,
    Alternative,
    BaselineRecord,
    DevicePrediction,
    DictReadable,
    IntraOpSolve,
    SearchReport,
    TensorSplits,
)

__all__ = ["PLACEMENTS_SCHEMA", "STYLES", "Alternative", "BaselineRecord", "DevicePrediction", "DictReadable",
           "IntraOpSolve", "MESH_AXES", "ModelInfo", "ParallelConfig", "Plan", "PlanEditedError", "PlanFingerprint",
           "Prediction", "RankLayout", "SearchReport", "SolverReport", "Stage", "TensorSplits"]

SCHEMA_VERSION = "2.1"
READABLE_MAJORS = ("1", "2")  # 1.x: converted on read, unverified (no fingerprint)
# In order of the activation memory they free (planner.hints takes the last allowed as the most).
Recompute = Literal["none", "selective", "op", "full"]
RECOMPUTE: tuple[Recompute, ...] = get_args(Recompute)
# The schedules of planner.schedules.SCHEDULE_NAMES (a test checks they agree; the plan does not
# import the simulator).
ScheduleName = Literal["gpipe", "1f1b", "interleaved-1f1b", "pipedream", "pipedream-2bw", "chimera", "zb-h1",
                       "zb-h2", "zb-v", "dualpipe-v", "pipelined-backprop", "pipemare"]
SCHEDULES: tuple[ScheduleName, ...] = get_args(ScheduleName)
log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """How one training step is split. Degrees multiply to the world size (:class:`RankLayout`).

    ``schedule`` is a pipeline schedule of :data:`SCHEDULES`; ``recompute`` one of :data:`RECOMPUTE`;
    ``virtual_stages`` model chunks per pipeline device; ``zero_stage`` 0 (off) to 3.
    """

    dp: int = 1
    tp: int = 1
    pp: int = 1
    micro_batch_size: int = 1
    num_micro_batches: int = 1
    virtual_stages: int = 1
    schedule: ScheduleName = "1f1b"
    recompute: Recompute = "none"
    sequence_parallel: bool = False
    zero_stage: int = 0
    overlap_grad_reduce: bool = False
    # Schema 2.1: context parallelism (ranks splitting one sequence), expert parallelism (data-parallel
    # ranks splitting the experts), HSDP (ZeRO-3 shards over groups of dp_shard replicas; None: all dp),
    # FSDP's reshard after forward, FP8 GEMMs, and full recomputation of one layer in every k.
    cp: int = 1
    ep: int = 1
    dp_shard: int | None = None
    reshard_after_forward: bool = True
    fp8: bool = False
    recompute_every: int = 1

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp", "micro_batch_size", "num_micro_batches", "virtual_stages", "cp", "ep",
                     "recompute_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpecError(name, value, "expected an integer >= 1")
        if self.schedule not in SCHEDULES:
            raise SpecError("schedule", self.schedule, f"unknown schedule; valid names: {', '.join(SCHEDULES)}")
        if self.recompute not in RECOMPUTE:
            raise SpecError("recompute", self.recompute, f"use one of {list(RECOMPUTE)}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise SpecError("zero_stage", self.zero_stage, "use 0 (off), 1, 2 or 3")
        if self.sequence_parallel and self.tp == 1:
            raise SpecError("sequence_parallel", True, "sequence parallelism needs tp > 1; drop it or raise tp")
        if self.pp == 1 and self.virtual_stages != 1:
            raise SpecError("virtual_stages", self.virtual_stages, "virtual stages need pp > 1")
        self._check_groupings()

    def _check_groupings(self) -> None:
        """The schema 2.1 knobs: each names the field and the fix."""
        if self.dp % self.ep:
            raise SpecError("ep", self.ep, f"expert parallelism groups data-parallel ranks: ep must divide dp = "
                            f"{self.dp}; use one of {[d for d in range(1, self.dp + 1) if self.dp % d == 0]}")
        if self.dp_shard is not None:
            if isinstance(self.dp_shard, bool) or not isinstance(self.dp_shard, int) or self.dp_shard < 1 \
                    or self.dp % self.dp_shard:
                raise SpecError("dp_shard", self.dp_shard, f"the HSDP shard group size must divide dp = {self.dp} "
                                "(null: shard over all data-parallel ranks)")
            if self.dp_shard < self.dp and self.zero_stage != 3:
                raise SpecError("dp_shard", self.dp_shard, "HSDP shards parameters (ZeRO-3 / FSDP): set zero_stage "
                                "3, or drop dp_shard")
        if not self.reshard_after_forward and self.zero_stage != 3:
            raise SpecError("reshard_after_forward", False, "only ZeRO-3 / FSDP reshards parameters; set "
                            "zero_stage 3 or drop it")
        if self.recompute_every > 1 and self.recompute != "full":
            raise SpecError("recompute_every", self.recompute_every, "checkpointing one layer in every k is full "
                            "recomputation: set recompute to 'full', or recompute_every to 1")
        for name in ("reshard_after_forward", "fp8"):
            if not isinstance(getattr(self, name), bool):
                raise SpecError(name, getattr(self, name), "expected true or false")

    @property
    def shard_group(self) -> int:
        """Data-parallel ranks one ZeRO shard spans: ``dp_shard`` under HSDP, else all ``dp``."""
        return self.dp_shard or self.dp

    @property
    def world_size(self) -> int:
        return self.dp * self.cp * self.tp * self.pp

    @property
    def layout(self) -> RankLayout:
        """Where each rank sits: the one rank formula (:class:`planner.layout.RankLayout`)."""
        return RankLayout(pp=self.pp, dp=self.dp, tp=self.tp, cp=self.cp)

    @property
    def global_batch(self) -> int:
        return self.dp * self.micro_batch_size * self.num_micro_batches

    def label(self) -> str:
        extras = []
        if self.virtual_stages > 1:
            extras.append(f"v={self.virtual_stages}")
        if self.recompute != "none":
            extras.append(f"recompute={self.recompute}" + (f"/{self.recompute_every}" if self.recompute_every > 1
                                                             else ""))
        if self.sequence_parallel:
            extras.append("sp")
        if self.zero_stage:
            extras.append(f"zero{self.zero_stage}")
        if self.dp_shard is not None and self.dp_shard < self.dp:
            extras.append(f"hsdp={self.dp // self.dp_shard}x{self.dp_shard}")
        if not self.reshard_after_forward:
            extras.append("no-reshard")
        if self.ep > 1:
            extras.append(f"ep={self.ep}")
        if self.fp8:
            extras.append("fp8")
        tail = (", " + ", ".join(extras)) if extras else ""
        cp = f" cp={self.cp}" if self.cp > 1 else ""
        return (f"dp={self.dp} tp={self.tp}{cp} pp={self.pp} mb={self.micro_batch_size}x{self.num_micro_batches} "
                f"{self.schedule}{tail}")


@dataclass(frozen=True, kw_only=True)
class Stage:
    """One stage: a model chunk, layers ``[layer_start, layer_stop)``, run by pipeline device
    ``device_index`` on ``ranks`` (all dp x tp ranks of that device). ``index`` is the chunk's place in
    model order; with ``v`` virtual stages, device ``d`` runs ``v`` of them (``virtual_chunk`` 0..v-1)."""

    index: int
    layer_start: int
    layer_stop: int
    layer_names: tuple[str, ...]
    ranks: tuple[int, ...]
    virtual_chunk: int = 0
    device_index: int = -1  # which pipeline device runs it (differs from index when v > 1)

    def __post_init__(self) -> None:
        if self.layer_stop <= self.layer_start:
            raise SpecError(f"stages[{self.index}].layers", [self.layer_start, self.layer_stop],
                            "a stage needs at least one layer")


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """The model the plan is for: its name, preset, the fingerprint of its traced cost graph, size and
    the global batch the plan trains it with."""

    name: str
    preset: str | None
    family: str | None
    fingerprint: str
    param_count: int
    num_layers: int
    layer_names: tuple[str, ...]
    seq_len: int | None
    dtype: str
    global_batch: int
    flops_per_sample: float
    # A module's sample input: structure, shapes and dtypes (planner.sample_spec), so the runtime can trace
    # it again without being handed one; None for presets (the runtime makes their token ids).
    sample_input: dict[str, Any] | None = None


def _model_dict(model: ModelInfo) -> dict[str, Any]:
    """``model`` as the file holds it; a preset's plan has no ``sample_input`` key (a file as before)."""
    d = asdict(model)
    if d["sample_input"] is None:
        del d["sample_input"]
    return d


@dataclass(frozen=True, kw_only=True)
class Prediction:
    """What the cost model predicts for one step of this plan.

    ``memory_per_device_bytes`` has one entry per rank; ``devices`` one per pipeline device (schema
    1.x called it ``stages``; :attr:`stages` still reads it); the breakdowns are the busiest device's.
    """

    step_time_s: float
    mfu: float
    peak_memory_bytes: int
    memory_per_device_bytes: tuple[int, ...]
    fits: bool
    throughput_samples_per_s: float
    time_breakdown_s: dict[str, float]
    memory_breakdown_bytes: dict[str, int]
    devices: tuple[DevicePrediction, ...] = ()
    # How sure the prediction is (planner.uncertainty): the regime, the measured/predicted band of the
    # validation runs in it, the step-time band in seconds, and the effects that dominate the doubt.
    uncertainty: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if any(isinstance(d, dict) for d in self.devices):  # built from 1.x-style dicts
            object.__setattr__(self, "devices", tuple(d if isinstance(d, DevicePrediction)
                                                      else DevicePrediction.from_dict(d) for d in self.devices))

    @property
    def stages(self) -> tuple[DevicePrediction, ...]:
        """The schema 1.x name of :attr:`devices` (one entry per pipeline device, not per stage)."""
        return self.devices

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["devices"] = [x.to_dict() for x in self.devices]
        return _jsonable(d)

    @classmethod
    def from_dict(cls, p: dict[str, Any]) -> Prediction:
        return cls(**{**p, "memory_per_device_bytes": tuple(p["memory_per_device_bytes"]),
                      "devices": tuple(DevicePrediction.from_dict(x) for x in p.get("devices", ())),
                      "uncertainty": p.get("uncertainty", {})})


@dataclass(frozen=True, kw_only=True)
class SolverReport:
    """How the configuration was found: method, status, objective and bound (seconds), gap."""

    method: str
    status: str
    objective: float
    bound: float
    gap: float
    time_s: float = field(default=0.0, compare=False)  # wall clock: kept in memory, not in the file


class PlanEditedError(PlanMismatchError):
    """A plan file whose inputs or predictions differ from what its fingerprint says was priced."""

    def __init__(self, source: str, edits: list[str]) -> None:
        self.source, self.edits = source, edits
        super().__init__(f"{source} was edited after planning: {'; '.join(edits)}. Its predictions are no longer "
                         f"those of its inputs: re-price it with `python -m planner evaluate --plan {source} "
                         "-o NEW.json`, or re-plan")


INPUT_PARTS = ("model", "cluster", "parallel", "stages", "placements", "cost_constants", "graph")


def _digest(obj: Any) -> str:
    """``sha256:`` of the canonical JSON of ``obj`` (sorted keys, no spaces)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def parallel_to_dict(cfg: ParallelConfig) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in fields(cfg)}


@dataclass(frozen=True, kw_only=True)
class PlanFingerprint(DictReadable):
    """What the plan's predictions were priced from, so that an edit by hand is caught on read.

    ``parts`` holds the digest (sha256 of canonical JSON) of each input block of :data:`INPUT_PARTS`
    (the model with its global batch, the cluster, the parallel configuration, the stages, the tensor
    splits, the cost constants and the cost graph); ``inputs`` is the digest of ``parts`` and
    ``predictions`` that of the ``predicted`` block. ``parallel`` repeats the configuration priced, so
    an edit names its field and both values (``parallel.dp 2 -> 4``).
    """

    inputs: str
    predictions: str
    parts: dict[str, str]
    parallel: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": self.inputs, "predictions": self.predictions, "parts": dict(self.parts),
                "parallel": dict(self.parallel)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PlanFingerprint:
        return cls(inputs=d["inputs"], predictions=d["predictions"], parts=dict(d["parts"]),
                   parallel=dict(d["parallel"]))

    @classmethod
    def of(cls, d: dict[str, Any]) -> PlanFingerprint:
        """The fingerprint of a plan dict (the JSON form, as written or read)."""
        parts = {k: _digest(d.get(k)) for k in INPUT_PARTS}
        return cls(inputs=_digest(parts), predictions=_digest(d["predicted"]), parts=parts,
                   parallel=dict(d["parallel"]))

    def edits(self, d: dict[str, Any]) -> list[str]:
        """What of plan dict ``d`` differs from what this fingerprint says was priced; empty: nothing."""
        now = PlanFingerprint.of(d)
        out = [] if self.inputs == _digest(self.parts) else ["fingerprint.parts (the fingerprint itself)"]
        for part in INPUT_PARTS:
            if self.parts.get(part) == now.parts[part]:
                continue
            if part == "parallel":
                fields_ = sorted(set(self.parallel) | set(now.parallel))
                named = [f"parallel.{k} {json.dumps(self.parallel.get(k))} -> {json.dumps(now.parallel.get(k))}"
                         for k in fields_ if self.parallel.get(k) != now.parallel.get(k)]
                out.extend(named or ["parallel changed"])
            else:
                out.append(f"{part} changed")
        if self.predictions != now.predictions:
            out.append("predicted changed")
        return out


@dataclass(frozen=True, kw_only=True)
class Plan:
    """A complete, executable plan. ``Plan.from_json(p.to_json(path))`` equals ``p``.

    ``fingerprint`` is the one read from the file (``None``: built in memory, or a schema 1.x file);
    :meth:`to_dict` always writes a fresh one. ``schema_version`` is the version read (a written
    file always has :data:`SCHEMA_VERSION`).
    """

    model: ModelInfo
    cluster: ClusterSpec
    cluster_fingerprint: str
    parallel: ParallelConfig
    stages: tuple[Stage, ...]
    predicted: Prediction
    solver: SolverReport
    mesh_axes: tuple[str, ...] = MESH_AXES
    placements: TensorSplits = field(default_factory=TensorSplits)
    search: SearchReport = field(default_factory=SearchReport)
    explanation: tuple[str, ...] = ()
    cost_constants: dict[str, Any] = field(default_factory=dict)
    graph: dict[str, Any] = field(default_factory=dict)  # layer-level cost graph (planner.graph_io)
    schema_version: str = field(default=SCHEMA_VERSION, compare=False)
    planner_version: str = ""
    # Wall-clock times of this run (trace, search, solvers). Not written to the file, so the same
    # inputs give byte-identical plan files.
    timings: dict[str, float] = field(default_factory=dict, compare=False)
    fingerprint: PlanFingerprint | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        # Built from the 1.x dict blocks (code and tests written before the typed contract): convert.
        if isinstance(self.cluster, dict):
            object.__setattr__(self, "cluster", _cluster_from_dict(self.cluster, None))
        if isinstance(self.placements, dict) or self.placements is None:
            object.__setattr__(self, "placements", TensorSplits.from_dict(self.placements)
                               if self.placements else TensorSplits())
        if isinstance(self.search, dict):
            object.__setattr__(self, "search", SearchReport.from_dict(self.search))

    @property
    def mesh_shape(self) -> tuple[int, int, int, int]:
        return self.parallel.layout.shape

    @property
    def layout(self) -> RankLayout:
        """Where each rank sits (:class:`planner.layout.RankLayout`)."""
        return self.parallel.layout

    # -- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        s = self.solver
        d = {
            "schema_version": SCHEMA_VERSION, "planner_version": self.planner_version,
            "model": _model_dict(self.model), "cluster": self.cluster.to_dict(),
            "cluster_fingerprint": self.cluster_fingerprint, "parallel": parallel_to_dict(self.parallel),
            "mesh": {"axes": list(self.mesh_axes), "shape": list(self.mesh_shape)},
            "stages": [{**{k: v for k, v in asdict(st).items() if k not in ("layer_start", "layer_stop")},
                        "layers": [st.layer_start, st.layer_stop]} for st in self.stages],
            "predicted": self.predicted.to_dict(),
            "solver": {"method": s.method, "status": s.status, "objective": s.objective, "bound": s.bound,
                       "gap": s.gap},
            "placements": self.placements.to_dict(), "search": self.search.to_dict(),
            "explanation": list(self.explanation), "cost_constants": dict(self.cost_constants),
            "graph": self.graph,
        }
        d = _jsonable(d)
        d["fingerprint"] = PlanFingerprint.of(d).to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str | None = None, verify: bool = True) -> Plan:
        """Read a plan dict: 1.x converted (with a warning: unverified), 2.x checked against its fingerprint.

        ``verify`` (default): a plan edited after planning raises :class:`PlanEditedError`; ``False``
        reads it anyway (``evaluate --plan`` re-prices it on purpose).
        """
        version = _readable_version(d, source)
        if version.split(".")[0] == "1":
            d = _upgrade_v1(d)
            log.warning("warning: %s was written by planner schema %s, which records no fingerprint: it is read "
                        "unverified (an edit by hand would go unnoticed). Re-price it with `python -m planner "
                        "evaluate --plan %s -o NEW.json` to get a verified plan", source or "the plan", version,
                        source or "PLAN.json")
        validate_plan_dict(d, source=source)
        fingerprint = PlanFingerprint.from_dict(d["fingerprint"]) if "fingerprint" in d else None
        if fingerprint is not None and verify:
            edits = fingerprint.edits(d)
            if edits:
                raise PlanEditedError(source or "the plan", edits)
        stages = tuple(
            Stage(index=s["index"], layer_start=s["layers"][0], layer_stop=s["layers"][1],
                  layer_names=tuple(s["layer_names"]), ranks=tuple(s["ranks"]),
                  virtual_chunk=s.get("virtual_chunk", 0), device_index=s.get("device_index", -1))
            for s in d["stages"]
        )
        m = d["model"]
        model = ModelInfo(**{**m, "layer_names": tuple(m["layer_names"])})
        return cls(
            model=model, cluster=_cluster_from_dict(d["cluster"], source),
            cluster_fingerprint=d["cluster_fingerprint"], parallel=ParallelConfig(**d["parallel"]), stages=stages,
            predicted=Prediction.from_dict(d["predicted"]), solver=SolverReport(**d["solver"]),
            mesh_axes=_mesh_axes(d["mesh"]["axes"]),
            placements=TensorSplits.from_dict(d["placements"]) if d.get("placements") else TensorSplits(),
            search=SearchReport.from_dict(d.get("search", {})),
            explanation=tuple(d.get("explanation", ())), cost_constants=d.get("cost_constants", {}),
            graph=d.get("graph", {}), schema_version=version, planner_version=d.get("planner_version", ""),
            fingerprint=fingerprint,
        )

    def to_json_text(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json(self, path: str | Path, *, force: bool = False) -> Path:
        """Write atomically (temp file + rename); refuse to overwrite unless ``force``."""
        return write_atomic(Path(path), self.to_json_text(), force=force)

    @classmethod
    def from_json(cls, path: str | Path, *, verify: bool = True) -> Plan:
        """Read a plan file (see :meth:`from_dict`: ``verify`` refuses one edited after planning)."""
        data = read_json_file(path, "plan", what="the plan file",
                              damaged_fix="the file is damaged: re-create it with `python -m planner plan`")
        return cls.from_dict(data, source=str(path), verify=verify)


def restamp(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` (a plan dict) with a fresh fingerprint: for tools and tests that build a plan file's JSON on
    purpose (a stale plan from an older model, a schedule the runtime refuses). A person editing a
    plan re-prices it instead (``python -m planner evaluate --plan``)."""
    d = {k: v for k, v in d.items() if k != "fingerprint"}
    return {**d, "fingerprint": PlanFingerprint.of(d).to_dict()}


def _readable_version(d: Any, source: str | None) -> str:
    if not isinstance(d, dict):
        raise SpecError("plan", type(d).__name__, "a plan file holds one JSON object", source=source)
    version = d.get("schema_version")
    if version is None:
        raise SpecError("schema_version", None, "missing: this is not a plan file written by `python -m planner`",
                        source=source)
    _check_version_is_text(version, source)
    if version.split(".")[0] not in READABLE_MAJORS:
        raise PlanMismatchError(f"{source or 'plan'}: schema_version {version} is not readable by this planner "
                                f"(reads {', '.join(m + '.x' for m in READABLE_MAJORS)}); re-create the plan with "
                                "`python -m planner plan`")
    return version


def _check_version_is_text(version: Any, source: str | None) -> None:
    """A plan's ``schema_version`` is a string (``"2.1"``); a number (``3``) would otherwise be reported
    as an unreadable version ("schema_version 2 is not readable ... reads 2.x"), which contradicts itself."""
    if not isinstance(version, str):
        raise SpecError("schema_version", version, f"must be a string like \"{SCHEMA_VERSION}\" (the version this "
                        f"planner writes), not {_json_kind(version)}; write it in quotes, or re-create the plan with "
                        "`python -m planner plan`", source=source)


def _json_kind(value: Any) -> str:
    """What a JSON value is, in JSON's words: ``the number 3``, ``true``, ``an array``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    return {dict: "an object", list: "an array"}.get(type(value), f"the {type(value).__name__} {value!r}")


def _mesh_axes(axes: list[str]) -> tuple[str, ...]:
    """The plan's mesh axes; a schema 2.0 plan's ``(pp, dp, tp)`` is the 2.1 mesh with ``cp = 1``."""
    return MESH_AXES if list(axes) == ["pp", "dp", "tp"] else tuple(axes)


def _upgrade_v1(d: dict[str, Any]) -> dict[str, Any]:
    """A schema 1.x plan dict in the 2.x form: ``predicted.stages`` (per device) is ``predicted.devices``."""
    predicted = dict(d["predicted"]) if isinstance(d.get("predicted"), dict) else d.get("predicted")
    if isinstance(predicted, dict) and "stages" in predicted:
        predicted["devices"] = predicted.pop("stages")
    return {**d, "predicted": predicted}


def _cluster_from_dict(d: dict[str, Any], source: str | None) -> ClusterSpec:
    """The plan's cluster: its figures were checked for plausibility when it was planned (an exotic
    one accepted with ``--i-know``), so reading it back neither refuses nor warns again."""
    from planner.plausible import PlausibilityWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PlausibilityWarning)
        return ClusterSpec.from_dict(d, source=source, strict=False)


def write_atomic(path: Path, text: str, *, force: bool = False) -> Path:
    """Write ``text`` to ``path`` via a temp file in the same folder and a rename."""
    if path.is_dir():
        raise SpecError("output", str(path), "it is a folder; give a file path (e.g. a name ending in .json)")
    if path.exists() and not force:
        raise SpecError("output", str(path), "the file exists; pass --force (force=True) to overwrite it, "
                        "or choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _new_file_mode())  # mkstemp creates 0600; the plan gets the mode open() would give it
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _new_file_mode() -> int:
    """0o666 less the user's umask (which can only be read by setting it, so it is set back at once)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return 0o666 & ~mask


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and x != x:  # NaN is not JSON
        return None
    return x


_SCHEMA: dict | None = None
_VALIDATOR: Any = None


def plan_schema() -> dict:
    global _SCHEMA
    if _SCHEMA is None:
        _SCHEMA = json.loads(schema_path("plan").read_text())
    return _SCHEMA


def _validator() -> Any:
    """The plan schema's validator; its ``cluster`` refers to the cluster file's schema (docs/cluster.schema.json)."""
    global _VALIDATOR
    if _VALIDATOR is None:
        import jsonschema
        from referencing import Registry, Resource

        cluster = json.loads(schema_path("cluster").read_text())
        registry = Registry().with_resource(cluster["$id"], Resource.from_contents(cluster))
        _VALIDATOR = jsonschema.Draft202012Validator(plan_schema(), registry=registry)
    return _VALIDATOR


def validate_plan_dict(d: Any, *, source: str | None = None) -> None:
    """Check a plan dict against docs/plan.schema.json; the error names the field and the fix."""
    if not isinstance(d, dict):
        raise SpecError("plan", type(d).__name__, "a plan file holds one JSON object", source=source)
    if "schema_version" not in d:
        raise SpecError("schema_version", None, "missing: this is not a plan file written by `python -m planner`",
                        source=source)
    _check_version_is_text(d["schema_version"], source)
    from jsonschema.exceptions import best_match

    err = best_match(sorted(_validator().iter_errors(d), key=lambda e: list(e.absolute_path)))
    if err is not None:
        where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        message = err.message if len(err.message) <= 240 else err.message[:237] + "..."
        raise SpecError(where, {dict: "{...}", list: "[...]"}.get(type(err.instance), err.instance),
                        f"{message}; fix this field or re-create the plan with `python -m planner plan`",
                        source=source)
