"""The plan: the JSON contract between the planner and the runtime.

A plan says who runs what (pipeline stages: which layers, which ranks), how the work is split
(data, tensor and pipeline degrees, micro-batching, schedule, recomputation, ZeRO stage), what
the planner predicts (step time, MFU, memory per device) and why it chose this. The runtime
executes it and never re-decides. ``schema_version`` changes when a field's meaning changes;
``docs/plan.schema.json`` is the JSON Schema every file is checked against on load.

Ranks are laid out Megatron-style: tensor-parallel ranks are adjacent (inside a node), then
data-parallel, then pipeline: ``rank = (pp_index * dp + dp_index) * tp + tp_index``, which is a
row-major ``DeviceMesh`` of shape ``(pp, dp, tp)`` with axis names ``("pp", "dp", "tp")``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from planner.errors import PlanMismatchError, SpecError, read_json_file
from planner.paths import repo_dir

SCHEMA_VERSION = "1.0"
RECOMPUTE = ("none", "selective", "full")
MESH_AXES = ("pp", "dp", "tp")


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """How one training step is split. Degrees multiply to the world size."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    micro_batch_size: int = 1
    num_micro_batches: int = 1
    virtual_stages: int = 1
    schedule: str = "1f1b"
    recompute: str = "none"
    sequence_parallel: bool = False
    zero_stage: int = 0
    overlap_grad_reduce: bool = False

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp", "micro_batch_size", "num_micro_batches", "virtual_stages"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpecError(name, value, "expected an integer >= 1")
        if self.recompute not in RECOMPUTE:
            raise SpecError("recompute", self.recompute, f"use one of {list(RECOMPUTE)}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise SpecError("zero_stage", self.zero_stage, "use 0 (off), 1, 2 or 3")
        if self.sequence_parallel and self.tp == 1:
            raise SpecError("sequence_parallel", True, "sequence parallelism needs tp > 1; drop it or raise tp")
        if self.pp == 1 and self.virtual_stages != 1:
            raise SpecError("virtual_stages", self.virtual_stages, "virtual stages need pp > 1")

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def global_batch(self) -> int:
        return self.dp * self.micro_batch_size * self.num_micro_batches

    def label(self) -> str:
        extras = []
        if self.virtual_stages > 1:
            extras.append(f"v={self.virtual_stages}")
        if self.recompute != "none":
            extras.append(f"recompute={self.recompute}")
        if self.sequence_parallel:
            extras.append("sp")
        if self.zero_stage:
            extras.append(f"zero{self.zero_stage}")
        tail = (", " + ", ".join(extras)) if extras else ""
        return (f"dp={self.dp} tp={self.tp} pp={self.pp} mb={self.micro_batch_size}x{self.num_micro_batches} "
                f"{self.schedule}{tail}")


@dataclass(frozen=True, kw_only=True)
class Stage:
    """One pipeline stage: layers ``[layer_start, layer_stop)`` on ``ranks`` (all dp x tp ranks of it)."""

    index: int
    layer_start: int
    layer_stop: int
    layer_names: tuple[str, ...]
    ranks: tuple[int, ...]
    virtual_chunk: int = 0
    device_index: int = -1  # which pipeline position runs it (differs from index when v > 1)

    def __post_init__(self) -> None:
        if self.layer_stop <= self.layer_start:
            raise SpecError(f"stages[{self.index}].layers", [self.layer_start, self.layer_stop],
                            "a stage needs at least one layer")


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
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


@dataclass(frozen=True, kw_only=True)
class Prediction:
    """What the cost model predicts for one step of this plan."""

    step_time_s: float
    mfu: float
    peak_memory_bytes: int
    memory_per_device_bytes: tuple[int, ...]
    fits: bool
    throughput_samples_per_s: float
    time_breakdown_s: dict[str, float]
    memory_breakdown_bytes: dict[str, int]
    stages: tuple[dict[str, Any], ...] = ()
    # How sure the prediction is (planner.uncertainty): the regime, the measured/predicted band of the
    # validation runs in it, the step-time band in seconds, and the effects that dominate the doubt.
    uncertainty: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class SolverReport:
    method: str
    status: str
    objective: float
    bound: float
    gap: float
    time_s: float = field(default=0.0, compare=False)  # wall clock: kept in memory, not in the file


@dataclass(frozen=True, kw_only=True)
class Plan:
    """A complete, executable plan. ``Plan.from_json(p.to_json(path))`` equals ``p``."""

    model: ModelInfo
    cluster: dict[str, Any]
    cluster_fingerprint: str
    parallel: ParallelConfig
    stages: tuple[Stage, ...]
    predicted: Prediction
    solver: SolverReport
    mesh_axes: tuple[str, ...] = MESH_AXES
    placements: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)
    explanation: tuple[str, ...] = ()
    cost_constants: dict[str, Any] = field(default_factory=dict)
    graph: dict[str, Any] = field(default_factory=dict)  # layer-level cost graph (planner.graph_io)
    schema_version: str = SCHEMA_VERSION
    planner_version: str = ""
    # Wall-clock times of this run (trace, search, solvers). Not written to the file, so the same
    # inputs give byte-identical plan files.
    timings: dict[str, float] = field(default_factory=dict, compare=False)

    @property
    def mesh_shape(self) -> tuple[int, int, int]:
        return (self.parallel.pp, self.parallel.dp, self.parallel.tp)

    # -- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mesh"] = {"axes": list(self.mesh_axes), "shape": list(self.mesh_shape)}
        del d["mesh_axes"]
        del d["timings"]
        d = _without_wall_clock(d)
        d["stages"] = [
            {**{k: v for k, v in asdict(s).items() if k not in ("layer_start", "layer_stop")},
             "layers": [s.layer_start, s.layer_stop]}
            for s in self.stages
        ]
        return _jsonable(d)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str | None = None) -> Plan:
        validate_plan_dict(d, source=source)
        version = d["schema_version"]
        if version.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
            raise PlanMismatchError(f"{source or 'plan'}: schema_version {version} is not readable by this planner "
                                    f"(reads {SCHEMA_VERSION}); re-create the plan with `python -m planner plan`")
        stages = tuple(
            Stage(index=s["index"], layer_start=s["layers"][0], layer_stop=s["layers"][1],
                  layer_names=tuple(s["layer_names"]), ranks=tuple(s["ranks"]),
                  virtual_chunk=s.get("virtual_chunk", 0), device_index=s.get("device_index", -1))
            for s in d["stages"]
        )
        m = d["model"]
        model = ModelInfo(**{**m, "layer_names": tuple(m["layer_names"])})
        p = d["predicted"]
        predicted = Prediction(**{**p, "memory_per_device_bytes": tuple(p["memory_per_device_bytes"]),
                                  "stages": tuple(p.get("stages", ())), "uncertainty": p.get("uncertainty", {})})
        return cls(
            model=model, cluster=d["cluster"], cluster_fingerprint=d["cluster_fingerprint"],
            parallel=ParallelConfig(**d["parallel"]), stages=stages, predicted=predicted,
            solver=SolverReport(**d["solver"]), mesh_axes=tuple(d["mesh"]["axes"]),
            placements=d.get("placements", {}), search=d.get("search", {}),
            explanation=tuple(d.get("explanation", ())), cost_constants=d.get("cost_constants", {}),
            graph=d.get("graph", {}),
            schema_version=version, planner_version=d.get("planner_version", ""),
        )

    def to_json_text(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json(self, path: str | Path, *, force: bool = False) -> Path:
        """Write atomically (temp file + rename); refuse to overwrite unless ``force``."""
        return write_atomic(Path(path), self.to_json_text(), force=force)

    @classmethod
    def from_json(cls, path: str | Path) -> Plan:
        data = read_json_file(path, "plan", what="the plan file",
                              damaged_fix="the file is damaged: re-create it with `python -m planner plan`")
        return cls.from_dict(data, source=str(path))


def write_atomic(path: Path, text: str, *, force: bool = False) -> Path:
    """Write ``text`` to ``path`` via a temp file in the same folder and a rename."""
    if path.exists() and not force:
        raise SpecError("output", str(path), "the file exists; pass --force (force=True) to overwrite it, "
                        "or choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
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


_WALL_CLOCK_KEYS = ("time_s", "solve_time_s", "build_time_s", "trace_time_s", "phase_times_s")


def _without_wall_clock(d: dict[str, Any]) -> dict[str, Any]:
    """Drop the solvers' wall-clock measurements (they differ run to run); predictions stay.

    Only the solver reports carry wall clock: ``solver``, ``search`` and ``placements.solver``.
    A predicted time elsewhere (a collective's ``time_s`` in placements) is kept.
    """
    for block in (d.get("solver"), d.get("search"), (d.get("search") or {}).get("intra_op"),
                  (d.get("placements") or {}).get("solver")):
        if isinstance(block, dict):
            for key in _WALL_CLOCK_KEYS:
                block.pop(key, None)
    return d


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and x != x:  # NaN is not JSON
        return None
    return x


_SCHEMA: dict | None = None


def plan_schema() -> dict:
    global _SCHEMA
    if _SCHEMA is None:
        _SCHEMA = json.loads((repo_dir() / "docs" / "plan.schema.json").read_text())
    return _SCHEMA


def validate_plan_dict(d: Any, *, source: str | None = None) -> None:
    """Check a plan dict against docs/plan.schema.json; the error names the field and the fix."""
    import jsonschema

    if not isinstance(d, dict):
        raise SpecError("plan", type(d).__name__, "a plan file holds one JSON object", source=source)
    if "schema_version" not in d:
        raise SpecError("schema_version", None, "missing: this is not a plan file written by `python -m planner`",
                        source=source)
    validator = jsonschema.Draft202012Validator(plan_schema())
    errors = sorted(validator.iter_errors(d), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        raise SpecError(where, err.instance if not isinstance(err.instance, dict) else "{...}",
                        f"{err.message}; fix this field or re-create the plan with `python -m planner plan`",
                        source=source)
