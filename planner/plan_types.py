"""The typed blocks of a plan file: tensor splits, per-device predictions, the search report.

:mod:`planner.plan` holds the plan itself; the blocks here are what used to be plain dicts in it
(schema 1.x): ``placements`` (:class:`TensorSplits`, with its layers, ops and collectives),
``predicted.devices`` (:class:`DevicePrediction`, one per pipeline *device*: the 1.x name was
``predicted.stages``, while a plan's ``stages`` are model *chunks*), ``search``
(:class:`SearchReport`) and the parallel configuration the predictions were priced at
(:class:`PlanFingerprint`). Each block is a frozen dataclass with ``to_dict``/``from_dict``; the JSON
they write is byte-for-byte what the 1.x dicts wrote, so a restructuring never moves a plan's bytes.

Code written against the 1.x dicts still reads them: ``block["key"]``, ``block.get("key", default)``
and ``"key" in block`` read the attribute of that name (:class:`DictReadable`). New code uses the
attributes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal

from planner.cluster import LinkSpec
from planner.errors import SpecError

if TYPE_CHECKING:
    from planner.plan import ParallelConfig

Style = Literal["colwise", "rowwise", "vocab", "sequence", "replicate"]
STYLES: tuple[Style, ...] = ("colwise", "rowwise", "vocab", "sequence", "replicate")
PLACEMENTS_SCHEMA = "intra_op_sharding/1"
Phase = Literal["fwd", "bwd", "grad_sync"]
Binding = Literal["compute", "memory", "communication"]


class DictReadable:
    """The read path of code written when this block was a dict (plan schema 1.x).

    ``b["key"]`` is ``b.key`` (``KeyError`` for a name that is not a field), ``b.get("key", d)`` is
    ``b.key`` unless that is ``None`` (an absent key of the old dict), and ``"key" in b`` says the
    field exists and is set.
    """

    def __getitem__(self, key: str) -> Any:
        if key not in _field_names(type(self)):
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        value = getattr(self, key, None) if key in _field_names(type(self)) else None
        return default if value is None else value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def keys(self) -> list[str]:
        """The fields that are set (``{**block}`` reads them as the 1.x dict's keys)."""
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]


_FIELD_NAMES: dict[type, frozenset[str]] = {}


def _field_names(cls: type) -> frozenset[str]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = frozenset(f.name for f in fields(cls))
    return names


def _opt(x: Any, conv: Any) -> Any:
    return None if x is None else conv(x)


def _strs(x: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in x)


def _no_none(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    """``d`` without ``keys`` whose value is ``None``: the keys a 1.x dict left out when unset."""
    return {k: v for k, v in d.items() if not (k in keys and v is None)}


# -- tensor splits (plan.placements) ---------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Collective(DictReadable):
    """One collective the intra-op solver priced on a layer: what, on which mesh axis, in which phase."""

    kind: str  # all_reduce, all_gather, reduce_scatter, all_to_all, ...
    axis: str
    bytes: float
    phase: Phase
    at: str  # the edge it sits on ("producer -> consumer") or the parameter it syncs
    time_s: float  # predicted seconds (not wall clock: it stays in the file)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "axis": self.axis, "bytes": self.bytes, "phase": self.phase, "at": self.at,
                "time_s": self.time_s}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Collective:
        return cls(kind=d["kind"], axis=d["axis"], bytes=d["bytes"], phase=d["phase"], at=d["at"], time_s=d["time_s"])


@dataclass(frozen=True, kw_only=True)
class OpSplit(DictReadable):
    """One op's chosen layouts: torch placement text (``Shard(0)``, ``Replicate()``) per mesh axis.

    ``head`` is the decision op whose strategy it follows (itself when it is one).
    """

    kind: str
    module_path: str
    strategy: str
    head: str
    inputs: tuple[tuple[str, ...], ...]
    output: tuple[str, ...]
    params: dict[str, tuple[str, ...]]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "module_path": self.module_path, "strategy": self.strategy, "head": self.head,
                "inputs": [list(i) for i in self.inputs], "output": list(self.output),
                "params": {k: list(v) for k, v in self.params.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OpSplit:
        return cls(kind=d["kind"], module_path=d["module_path"], strategy=d["strategy"], head=d["head"],
                   inputs=tuple(_strs(i) for i in d["inputs"]), output=_strs(d["output"]),
                   params={k: _strs(v) for k, v in d["params"].items()})


@dataclass(frozen=True, kw_only=True)
class LayerSplit(DictReadable):
    """One layer of the tp solve: its predicted seconds and bytes, and (unless it reuses another
    layer's solution, ``reuses`` set) its ops and collectives."""

    index: int
    name: str
    reuses: str | None  # the layer whose ops and collectives this one repeats
    compute_s: float
    comm_s: float
    comm_by_phase_s: dict[str, float]
    memory_bytes: float
    ops: dict[str, OpSplit] | None = None
    collectives: tuple[Collective, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {"index": self.index, "name": self.name, "reuses": self.reuses, "compute_s": self.compute_s,
             "comm_s": self.comm_s, "comm_by_phase_s": dict(self.comm_by_phase_s), "memory_bytes": self.memory_bytes,
             "ops": None if self.ops is None else {k: v.to_dict() for k, v in self.ops.items()},
             "collectives": None if self.collectives is None else [c.to_dict() for c in self.collectives]}
        return _no_none(d, "ops", "collectives")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerSplit:
        return cls(index=d["index"], name=d["name"], reuses=d.get("reuses"), compute_s=d["compute_s"],
                   comm_s=d["comm_s"], comm_by_phase_s=dict(d["comm_by_phase_s"]), memory_bytes=d["memory_bytes"],
                   ops=_opt(d.get("ops"), lambda ops: {k: OpSplit.from_dict(v) for k, v in ops.items()}),
                   collectives=_opt(d.get("collectives"), lambda cs: tuple(Collective.from_dict(c) for c in cs)))


# The link one mesh axis runs over, as the intra-op solver priced it: the cluster's own link class
# (the name before the typed contract shared one, kept for code that imports it).
MeshLink = LinkSpec


@dataclass(frozen=True, kw_only=True)
class SplitMesh(DictReadable):
    """The device mesh the tensor splits are for (the plan's ``tp`` axis), its links and axis roles."""

    axes: tuple[str, ...]
    shape: tuple[int, ...]
    links: tuple[LinkSpec, ...]
    roles: dict[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return _no_none({"axes": list(self.axes), "shape": list(self.shape),
                         "links": [x.to_dict() for x in self.links], "roles": self.roles}, "roles")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SplitMesh:
        links = tuple(LinkSpec.from_dict(x, prefix=f"placements.mesh.links[{i}].") for i, x in enumerate(d["links"]))
        return cls(axes=_strs(d["axes"]), shape=tuple(d["shape"]), links=links, roles=d.get("roles"))


@dataclass(frozen=True, kw_only=True)
class SplitOptions(DictReadable):
    """What the tp solve was asked for: the micro-batch, sequence parallelism, a memory cap."""

    sequence_parallel: bool
    memory_limit_bytes: float | None
    micro_batch: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return _no_none({"sequence_parallel": self.sequence_parallel, "memory_limit_bytes": self.memory_limit_bytes,
                         "micro_batch": self.micro_batch}, "micro_batch")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SplitOptions:
        return cls(sequence_parallel=d["sequence_parallel"], memory_limit_bytes=d.get("memory_limit_bytes"),
                   micro_batch=d.get("micro_batch"))


@dataclass(frozen=True, kw_only=True)
class SplitCosts(DictReadable):
    """The tp solve's predicted seconds and bytes per micro-batch, summed over the model's layers."""

    compute_s: float
    comm_s: float
    memory_bytes: float

    def to_dict(self) -> dict[str, Any]:
        return {"compute_s": self.compute_s, "comm_s": self.comm_s, "memory_bytes": self.memory_bytes}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SplitCosts:
        return cls(compute_s=d["compute_s"], comm_s=d["comm_s"], memory_bytes=d["memory_bytes"])


@dataclass(frozen=True, kw_only=True)
class IntraOpSolve(DictReadable):
    """The intra-op ILP's report: status, objective and bound (seconds), gap, size.

    ``objective``/``bound`` repeat ``objective_s``/``bound_s`` under the plan's solver names. The
    wall-clock fields stay in memory and are never written (same inputs, same plan bytes).
    """

    backend: str
    status: str
    objective: float | None
    bound: float | None
    objective_s: float | None
    bound_s: float | None
    gap: float | None
    num_variables: int
    num_constraints: int
    time_s: float | None = field(default=None, compare=False)
    solve_time_s: float | None = field(default=None, compare=False)
    build_time_s: float | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "status": self.status, "objective": self.objective, "bound": self.bound,
                "objective_s": self.objective_s, "bound_s": self.bound_s, "gap": self.gap,
                "num_variables": self.num_variables, "num_constraints": self.num_constraints}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IntraOpSolve:
        return cls(backend=d["backend"], status=d["status"], objective=d.get("objective"), bound=d.get("bound"),
                   objective_s=d.get("objective_s"), bound_s=d.get("bound_s"), gap=d.get("gap"),
                   num_variables=d["num_variables"], num_constraints=d["num_constraints"], time_s=d.get("time_s"),
                   solve_time_s=d.get("solve_time_s"), build_time_s=d.get("build_time_s"))


@dataclass(frozen=True, kw_only=True)
class TensorSplits(DictReadable):
    """The plan's tensor-parallel placements (``plan.placements``, format ``intra_op_sharding/1``).

    ``style`` is what the runtime applies: ``{module fqn: colwise | rowwise | vocab | sequence |
    replicate}``; the rest is the intra-op solve it came from (mesh, solver report, per-layer ops
    and collectives, parameter placements) for people and tools. A plan without placements holds
    ``None`` (the runtime then finds Megatron's pairs itself); :meth:`from_plan` gives an empty one.
    """

    style: dict[str, Style] = field(default_factory=dict)
    schema: str = PLACEMENTS_SCHEMA
    mesh: SplitMesh | None = None
    solver: IntraOpSolve | None = None
    options: SplitOptions | None = None
    predicted: SplitCosts | None = None
    params: dict[str, tuple[str, ...]] = field(default_factory=dict)
    layers: tuple[LayerSplit, ...] = ()

    def __post_init__(self) -> None:
        if self.schema != PLACEMENTS_SCHEMA:
            raise SpecError("placements.schema", self.schema, f"the runtime reads {PLACEMENTS_SCHEMA}; re-create "
                            "the plan with `python -m planner plan`")
        for module, style in self.style.items():
            if style not in STYLES:
                raise SpecError(f"placements.style.{module}", style, f"unknown style; use one of {', '.join(STYLES)}")

    @classmethod
    def from_plan(cls, plan: Any) -> TensorSplits:
        """``plan.placements``, or an empty one (``given`` false) for a plan without placements."""
        return plan.placements if plan.placements is not None else cls()

    @property
    def given(self) -> bool:
        """Whether the plan chose the splits (false: the runtime finds Megatron's pairs itself)."""
        return bool(self.style) or self.mesh is not None or bool(self.layers)

    def __bool__(self) -> bool:  # as the 1.x dict was: an empty one is false
        return self.given

    @property
    def styles(self) -> dict[str, str]:
        return dict(self.style)

    def style_of(self, module: str) -> str:
        """The style of ``module`` (``"replicate"`` when the plan does not list it)."""
        return self.style.get(module, "replicate")

    def split(self) -> dict[str, str]:
        """Every module the plan splits (all styles but ``replicate``)."""
        return {m: s for m, s in self.style.items() if s != "replicate"}

    def to_dict(self) -> dict[str, Any]:
        if not self.given:
            return {}
        d = {"schema": self.schema, "style": dict(self.style),
             "mesh": _opt(self.mesh, SplitMesh.to_dict), "solver": _opt(self.solver, IntraOpSolve.to_dict),
             "options": _opt(self.options, SplitOptions.to_dict), "predicted": _opt(self.predicted, SplitCosts.to_dict),
             "params": {k: list(v) for k, v in self.params.items()}, "layers": [x.to_dict() for x in self.layers]}
        return _no_none(d, "mesh", "solver", "options", "predicted")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSplits:
        if "style" not in d or not isinstance(d["style"], dict):
            raise SpecError("placements.style", d.get("style"), "the runtime reads {module: style}; re-create the "
                            "plan with `python -m planner plan`")
        return cls(style=dict(d["style"]), schema=d.get("schema", PLACEMENTS_SCHEMA),
                   mesh=_opt(d.get("mesh"), SplitMesh.from_dict), solver=_opt(d.get("solver"), IntraOpSolve.from_dict),
                   options=_opt(d.get("options"), SplitOptions.from_dict),
                   predicted=_opt(d.get("predicted"), SplitCosts.from_dict),
                   params={k: _strs(v) for k, v in (d.get("params") or {}).items()},
                   layers=tuple(LayerSplit.from_dict(x) for x in d.get("layers") or ()))


# -- per-device predictions (plan.predicted.devices) ---------------------------------------------

@dataclass(frozen=True, kw_only=True)
class DevicePrediction(DictReadable):
    """What the cost model predicts for one pipeline *device* (position ``device_index``; all its
    ``dp x tp`` ranks hold the same): its step seconds, memory, in-flight micro-batches, what binds it,
    and the per-chunk phase times the schedule was priced with (its chunks in model order)."""

    device_index: int
    time_per_step_s: float
    memory_bytes: dict[str, int]  # weights, gradients, optimizer, activations, temporary, total
    in_flight_micro_batches: float
    binding: str  # compute | memory | communication: what limits this device
    chunk_phase_times_s: tuple[tuple[float, ...], ...] = ()  # per chunk: (forward, backward-input, backward-weight)

    def to_dict(self) -> dict[str, Any]:
        return {"device_index": self.device_index, "time_per_step_s": self.time_per_step_s,
                "memory_bytes": dict(self.memory_bytes), "in_flight_micro_batches": self.in_flight_micro_batches,
                "binding": self.binding, "chunk_phase_times_s": [list(t) for t in self.chunk_phase_times_s]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DevicePrediction:
        return cls(device_index=d["device_index"], time_per_step_s=d["time_per_step_s"],
                   memory_bytes=dict(d["memory_bytes"]), in_flight_micro_batches=d["in_flight_micro_batches"],
                   binding=d["binding"], chunk_phase_times_s=tuple(tuple(t) for t in d.get("chunk_phase_times_s", ())))


# -- the search report (plan.search) ---------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Alternative(DictReadable):
    """A runner-up configuration of the search, priced by the same cost model."""

    config: str  # ParallelConfig.label()
    parallel: ParallelConfig
    step_time_s: float
    mfu: float
    peak_memory_bytes: int

    def to_dict(self) -> dict[str, Any]:
        from planner.plan import parallel_to_dict

        return {"config": self.config, "parallel": parallel_to_dict(self.parallel), "step_time_s": self.step_time_s,
                "mfu": self.mfu, "peak_memory_bytes": self.peak_memory_bytes}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Alternative:
        from planner.plan import ParallelConfig

        return cls(config=d["config"], parallel=ParallelConfig(**d["parallel"]), step_time_s=d["step_time_s"],
                   mfu=d["mfu"], peak_memory_bytes=d["peak_memory_bytes"])


@dataclass(frozen=True, kw_only=True)
class BaselineRecord(DictReadable):
    """The best configuration of one common recipe (pure DP, ZeRO-3, Megatron) on the same job.

    A recipe that cannot run has ``step_time_s`` ``None`` and says why in ``reason``; one that runs
    has ``speedup_of_plan`` (its step time over the plan's).
    """

    name: str
    description: str
    config: str | None
    step_time_s: float | None
    mfu: float | None
    peak_memory_bytes: int | None
    fits: bool
    speedup_of_plan: float | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "description": self.description, "config": self.config,
             "step_time_s": self.step_time_s, "mfu": self.mfu, "peak_memory_bytes": self.peak_memory_bytes,
             "fits": self.fits, "speedup_of_plan": self.speedup_of_plan, "reason": self.reason}
        return _no_none(d, "speedup_of_plan", "reason")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BaselineRecord:
        return cls(**{f: d.get(f) for f in _field_names(cls)})


@dataclass(frozen=True, kw_only=True)
class SearchReport(DictReadable):
    """How the plan's configuration was found, beyond the solver report.

    The search's counters, runners-up and the runner-up ratio are set when a search ran
    (``evaluated`` not ``None``); ``baselines`` when they were priced; ``intra_op`` when a tp solve
    chose the tensor splits. ``time_s`` is wall clock: kept in memory, never written.
    """

    evaluated: int | None = None
    pruned: int | None = None
    infeasible: int | None = None
    timed_out: bool | None = None
    alternatives: tuple[Alternative, ...] = ()
    runner_up_ratio: float | None = None
    baselines: tuple[BaselineRecord, ...] | None = None
    intra_op: IntraOpSolve | None = None
    time_s: float | None = field(default=None, compare=False)

    @property
    def searched(self) -> bool:
        return self.evaluated is not None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.searched:
            d.update(evaluated=self.evaluated, pruned=self.pruned, infeasible=self.infeasible,
                     timed_out=self.timed_out, alternatives=[a.to_dict() for a in self.alternatives],
                     runner_up_ratio=self.runner_up_ratio)
        if self.baselines is not None:
            d["baselines"] = [b.to_dict() for b in self.baselines]
        if self.intra_op is not None:
            d["intra_op"] = self.intra_op.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchReport:
        return cls(evaluated=d.get("evaluated"), pruned=d.get("pruned"), infeasible=d.get("infeasible"),
                   timed_out=d.get("timed_out"),
                   alternatives=tuple(Alternative.from_dict(a) for a in d.get("alternatives") or ()),
                   runner_up_ratio=d.get("runner_up_ratio"),
                   baselines=_opt(d.get("baselines"), lambda bs: tuple(BaselineRecord.from_dict(b) for b in bs)),
                   intra_op=_opt(d.get("intra_op"), IntraOpSolve.from_dict), time_s=d.get("time_s"))
