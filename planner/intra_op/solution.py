"""What the intra-op solver decided, in the form the plan and the runtime read.

``ShardingSolution.to_dict()`` is the JSON contract (documented in ``docs/intra-op.md``):

.. code-block:: text

    {"schema": "intra_op_sharding/1",
     "mesh": {"axes": ["tp"], "shape": [8], "links": [...]},
     "solver": {"backend", "status", "objective_s", "bound_s", "gap", "solve_time_s", "build_time_s",
                "num_variables", "num_constraints"},
     "options": {"sequence_parallel", "memory_limit_bytes"},
     "predicted": {"compute_s", "comm_s", "memory_bytes"},
     "params": {"<param name>": ["Shard(0)", ...one per mesh axis]},
     "layers": [{"index", "name", "reuses", "compute_s", "comm_s", "comm_by_phase_s", "memory_bytes",
                 "ops": {"<op>": {"kind", "module_path", "strategy", "head", "inputs": [[...]],
                                  "output": [...], "params": {"<param>": [...]}}},
                 "collectives": [{"kind", "axis", "bytes", "phase", "at", "time_s"}]}]}

``to_dict(expand_copies=False)`` gives a copy of a repeated layer (``reuses`` set) no ``ops`` and
``collectives``: they are the reused layer's under the copy's names. ``planner.intra_op.placements``
adds ``style`` and the plan's solver names for ``plan.placements``.

Placements are torch's constructor text (``Shard(0)``, ``Replicate()``, ``Partial()``), one per
mesh axis in mesh order: ``distribute_tensor(t, mesh, [Shard(0)])`` applies one directly.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from planner.intra_op.collectives import Collective
from planner.intra_op.ilp import IlpResult
from planner.intra_op.mesh import MeshSpec
from planner.intra_op.placement import Layout, layout_to_strs

SCHEMA = "intra_op_sharding/1"


@dataclass(frozen=True, kw_only=True)
class OpSharding:
    """One op's chosen layouts. ``head`` is the decision op whose strategy it follows (itself if a head)."""

    op: str
    kind: str
    module_path: str
    strategy: str
    head: str
    input_layouts: tuple[Layout, ...]
    output_layout: Layout
    param_layouts: dict[str, Layout]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "module_path": self.module_path, "strategy": self.strategy, "head": self.head,
                "inputs": [layout_to_strs(lay) for lay in self.input_layouts],
                "output": layout_to_strs(self.output_layout),
                "params": {n: layout_to_strs(lay) for n, lay in self.param_layouts.items()}}


@dataclass(frozen=True, kw_only=True)
class LayerSharding:
    """One layer's shardings and collectives (per copy; ``reuses`` names the layer it was solved as)."""

    index: int | None
    name: str
    reuses: str | None
    ops: dict[str, OpSharding]
    collectives: tuple[Collective, ...]
    compute_s: float
    memory_bytes: float

    @property
    def comm_s(self) -> float:
        return sum(c.time_s for c in self.collectives)

    def phase_comm_s(self, phase: str) -> float:
        """Seconds of this layer's ``fwd``, ``bwd`` or ``grad_sync`` collectives."""
        return sum(c.time_s for c in self.collectives if c.phase == phase)

    def to_dict(self, *, expand: bool = True) -> dict[str, Any]:
        """``expand=False`` leaves out ``ops`` and ``collectives`` of a copy (``reuses`` is set): they are
        those of the layer it reuses, under this layer's names."""
        out = {"index": self.index, "name": self.name, "reuses": self.reuses, "compute_s": self.compute_s,
               "comm_s": self.comm_s, "memory_bytes": self.memory_bytes,
               # per phase, also for a copy: its links to the neighbouring layers may differ from the reused layer's
               "comm_by_phase_s": {p: self.phase_comm_s(p) for p in ("fwd", "bwd", "grad_sync")}}
        if expand or self.reuses is None:
            out["ops"] = {n: s.to_dict() for n, s in self.ops.items()}
            out["collectives"] = [c.to_dict() for c in self.collectives]
        return out


@dataclass(frozen=True, kw_only=True)
class ShardingSolution:
    """The chosen sharding of a layer or model, the solver's report, and the predicted costs."""

    mesh: MeshSpec
    backend: str
    status: str
    objective_s: float
    bound_s: float | None
    gap: float | None
    solve_time_s: float
    build_time_s: float
    num_variables: int
    num_constraints: int
    sequence_parallel: bool
    memory_limit_bytes: float | None
    layers: tuple[LayerSharding, ...]

    @classmethod
    def assemble(cls, *, mesh: MeshSpec, result: IlpResult, time_unit_s: float, build_time_s: float,
                 sequence_parallel: bool, memory_limit_bytes: float | None,
                 layers: Sequence[LayerSharding]) -> ShardingSolution:
        return cls(mesh=mesh, backend=result.backend, status=result.status,
                   objective_s=(result.objective or 0.0) * time_unit_s,
                   bound_s=None if result.bound is None else result.bound * time_unit_s, gap=result.gap,
                   solve_time_s=result.solve_time_s, build_time_s=build_time_s,
                   num_variables=result.num_variables, num_constraints=result.num_constraints,
                   sequence_parallel=sequence_parallel, memory_limit_bytes=memory_limit_bytes, layers=tuple(layers))

    # -- queries --------------------------------------------------------------------------------
    @property
    def compute_s(self) -> float:
        return sum(layer.compute_s for layer in self.layers)

    @property
    def comm_s(self) -> float:
        return sum(layer.comm_s for layer in self.layers)

    @property
    def memory_bytes(self) -> float:
        return sum(layer.memory_bytes for layer in self.layers)

    @property
    def collectives(self) -> tuple[Collective, ...]:
        return tuple(c for layer in self.layers for c in layer.collectives)

    @property
    def params(self) -> dict[str, Layout]:
        return {n: lay for layer in self.layers for s in layer.ops.values() for n, lay in s.param_layouts.items()}

    @property
    def activations(self) -> dict[str, Layout]:
        return {n: s.output_layout for layer in self.layers for n, s in layer.ops.items()}

    def op(self, name: str) -> OpSharding:
        for layer in self.layers:
            if name in layer.ops:
                return layer.ops[name]
        raise KeyError(f"op {name!r} is in no layer of this solution")

    def collective_counts(self, phase: str | None = None) -> Counter:
        """``Counter`` of ``(kind, axis)`` over collectives, optionally of one phase."""
        return Counter((c.kind, c.axis) for c in self.collectives if phase is None or c.phase == phase)

    def to_dict(self, *, expand_copies: bool = True) -> dict[str, Any]:
        """The JSON form; ``expand_copies=False`` lists a repeated layer's ops once, under the first copy."""
        return {
            "schema": SCHEMA,
            "mesh": self.mesh.to_dict(),
            "solver": {"backend": self.backend, "status": self.status, "objective_s": self.objective_s,
                       "bound_s": self.bound_s, "gap": self.gap, "solve_time_s": self.solve_time_s,
                       "build_time_s": self.build_time_s, "num_variables": self.num_variables,
                       "num_constraints": self.num_constraints},
            "options": {"sequence_parallel": self.sequence_parallel, "memory_limit_bytes": self.memory_limit_bytes},
            "predicted": {"compute_s": self.compute_s, "comm_s": self.comm_s, "memory_bytes": self.memory_bytes},
            "params": {n: layout_to_strs(lay) for n, lay in self.params.items()},
            "layers": [layer.to_dict(expand=expand_copies) for layer in self.layers],
        }

    def summary(self) -> str:
        """A few lines for logs: solver report, totals, and the strategy of each parametrised op."""
        lines = [f"{self.backend} {self.status}: objective {self.objective_s * 1e3:.3f} ms "
                 f"(compute {self.compute_s * 1e3:.3f} ms, comm {self.comm_s * 1e3:.3f} ms), memory "
                 f"{self.memory_bytes / 2**30:.2f} GiB, solve {self.solve_time_s:.3f} s on {self.mesh.describe()}"]
        for layer in self.layers[:3]:
            for s in layer.ops.values():
                if s.param_layouts:
                    lines.append(f"  {s.op:<28} {s.strategy}")
        counts = self.collective_counts()
        lines.append("  collectives: " + ", ".join(f"{k}@{a} x{n}" for (k, a), n in sorted(counts.items())))
        return "\n".join(lines)
