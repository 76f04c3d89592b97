"""Checkpoints with ``torch.distributed.checkpoint`` (DCP): plan-independent, verified on load.

Layout: ``<dir>/step-000002/`` holds DCP's files plus ``manifest.json`` (step, seed, model
fingerprint, the saving plan's configuration, and the size and SHA-256 of every file). Every rank
writes its shards into ``step-000002.tmp``; after all are done rank 0 writes the manifest and renames
the folder, so a folder without ``.tmp`` and with a manifest is complete.

State is keyed by the *full model's* parameter names (``blocks.3.attn.qkv.weight``), never by stage:
model state via ``get_model_state_dict`` and optimizer state via ``get_optimizer_state_dict`` with
``flatten_optimizer_state_dict=True``, for each stage a rank runs. DCP stores every tensor with its
global shape and the offsets of each shard, so a checkpoint saved under one plan loads under any
other plan of the same model (resharding across dp, tp, pp and ZeRO stages). The one layout
change tensor parallelism makes (``qkv`` rows reordered per tp rank, see
:mod:`runtime.tensor_parallel`) is undone before saving and redone after loading.

Before loading, every file is checked against the manifest; a missing, truncated or altered file
is a :class:`CheckpointError` naming the file, never a silently wrong model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, distribute_tensor

from runtime.data_parallel import OptimizerShards
from runtime.errors import CheckpointError
from runtime.model import StageModule
from runtime.tensor_parallel import QKV_ATTR, canonical_from_tp, to_tp_rows

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{6,})$")
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def latest_checkpoint(root: str | Path) -> Path:
    """The newest complete-looking ``step-*`` folder under ``root`` (verified separately)."""
    root = Path(root)
    found = sorted((int(m.group(1)), p) for p in root.glob("step-*") if (m := _STEP_DIR.match(p.name)))
    if not found:
        raise CheckpointError(f"checkpoint: --resume was given but {root} holds no step-NNNNNN folder; run without "
                              "--resume to start from scratch, or point --checkpoint-dir at the run's folder")
    return found[-1][1]


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check every file against the manifest; returns the manifest or raises :class:`CheckpointError`."""
    path = Path(path)
    fix = f"delete {path} to resume from the previous checkpoint, or run without --resume"
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path}: no {MANIFEST}; the save did not finish (the run was stopped "
                              f"while writing it); {fix}")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is damaged ({exc}); {fix}") from exc
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: format {manifest.get('format')!r}, this runtime reads "
                              f"{FORMAT_VERSION}; {fix}")
    for name, expected in sorted(files.items()):
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path}: file {name} is missing; {fix}")
        size = f.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"checkpoint {path}: file {name} has {size} bytes, the manifest says "
                                  f"{expected['bytes']} (truncated or overwritten); {fix}")
        if _sha256(f) != expected["sha256"]:
            raise CheckpointError(f"checkpoint {path}: file {name} is corrupted (its SHA-256 differs from the "
                                  f"manifest's); {fix}")
    return manifest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _canonical_keys(stage: StageModule) -> dict[str, int]:
    return dict(getattr(stage, QKV_ATTR, {}))


def _optimizer_state(stage: StageModule, position: int, optim: torch.optim.Optimizer | None,
                     zero: OptimizerShards | None) -> dict[str, Any]:
    """The stage's optimizer state in torch's flattened layout: ZeRO-1/2 slices gathered to whole tensors."""
    if optim is None:
        return {}
    if zero is not None:
        return zero.optimizer_state(optim, position)
    return get_optimizer_state_dict(stage, optim, options=_OPTIONS)


def _state_for_save(stages: list[StageModule], optimizers: list[torch.optim.Optimizer],
                    zero: OptimizerShards | None = None) -> dict[str, Any]:
    model_sd: dict[str, Any] = {}
    optim_sd: dict[str, Any] = {}
    for position, (stage, optim) in enumerate(zip(stages, optimizers or [None] * len(stages))):
        msd = get_model_state_dict(stage)  # no optimizers: the model alone
        osd = _optimizer_state(stage, position, optim, zero)
        for fqn, tp in _canonical_keys(stage).items():
            msd[fqn] = canonical_from_tp(_full(msd[fqn]), tp)
            for key in [k for k in osd if k.startswith(f"state.{fqn}.")]:
                if isinstance(osd[key], torch.Tensor) and osd[key].dim() > 0:
                    osd[key] = canonical_from_tp(_full(osd[key]), tp)
        model_sd.update(msd)
        optim_sd.update(osd)
    return {"model": model_sd, "optim": optim_sd} if optimizers else {"model": model_sd}


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def save_checkpoint(root: str | Path, step: int, stages: list[StageModule], optimizers: list[torch.optim.Optimizer],
                    *, info: dict[str, Any], zero: OptimizerShards | None = None) -> Path:
    """Collective: every rank calls it after optimizer step ``step``. Returns the final folder."""
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dcp.save(_state_for_save(stages, optimizers, zero), checkpoint_id=str(tmp))
    dist.barrier()
    if rank == 0:
        write_manifest(tmp, step=step, info=info)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    dist.barrier()
    return final


def write_manifest(folder: Path, *, step: int, info: dict[str, Any]) -> dict[str, Any]:
    """Record the size and SHA-256 of every file in ``folder`` (written last: its presence means complete)."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(folder.iterdir())
             if p.is_file() and p.name != MANIFEST}
    manifest = {"format": FORMAT_VERSION, "step": step, **info, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def load_checkpoint(path: str | Path, stages: list[StageModule], optimizers: list[torch.optim.Optimizer],
                    zero: OptimizerShards | None = None, *, aliases: tuple[tuple[str, ...], ...] = ()) -> None:
    """Collective: fill this rank's stages and optimizers from a verified checkpoint, resharding as needed.

    ``aliases``: the names of each tied weight. A plan that keeps one copy saves its state under one name
    (``embed.weight``); a plan with the copies on two ranks reads the other (``head.weight``) from it."""
    model_sd: dict[str, Any] = {}
    optim_sd: dict[str, Any] = {}
    per_stage = []
    meta = dcp.FileSystemReader(str(path)).read_metadata() if zero is not None and optimizers else None
    saved = _saved_optimizer_keys(meta) if meta else {}
    hyper = _saved_hyper(path, meta) if meta else {}  # collective, as dcp.load is
    for position, (stage, optim) in enumerate(zip(stages, optimizers or [None] * len(stages))):
        msd = get_model_state_dict(stage)  # no optimizers: the model alone
        if optim is None:
            osd = {}
        elif zero is not None:  # whole tensors in, this rank's slices out (load_optimizer_state)
            osd = zero.optimizer_state_template(position, saved)
        else:
            osd = get_optimizer_state_dict(stage, optim, options=_OPTIONS)
        templates = {}
        for fqn in _canonical_keys(stage):
            templates[fqn] = msd[fqn]
            msd[fqn] = torch.empty(msd[fqn].shape, dtype=msd[fqn].dtype)
            for key in [k for k in osd if k.startswith(f"state.{fqn}.")]:
                if isinstance(osd[key], torch.Tensor) and osd[key].dim() > 0:
                    templates[key] = osd[key]
                    osd[key] = torch.empty(osd[key].shape, dtype=osd[key].dtype)
        per_stage.append((msd, osd, templates))
        model_sd.update(msd)
        optim_sd.update(osd)
    state = {"model": model_sd, "optim": optim_sd} if optimizers else {"model": model_sd}
    renamed = _read_from_twins(state, path, aliases) if aliases else []
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as exc:  # DCP raises a CheckpointException wrapping each rank's error
        raise CheckpointError(f"checkpoint {path}: cannot be loaded into this plan ({_first_line(exc)}); it was "
                              "written for a different model, or is damaged") from exc
    for part, key, twin in renamed:  # values DCP replaced rather than filled in place
        for msd, osd, _ in per_stage:
            target = msd if part == "model" else osd
            if key in target:
                target[key] = state[part][twin]
    for position, (stage, optim, (msd, osd, templates)) in enumerate(
            zip(stages, optimizers or [None] * len(stages), per_stage)):
        tp_of = _canonical_keys(stage)
        for key, template in templates.items():
            fqn = key if key in tp_of else next(f for f in tp_of if key.startswith(f"state.{f}."))
            source = msd if key in msd else osd
            value = to_tp_rows(source[key], tp_of[fqn])
            if isinstance(template, DTensor):
                value = distribute_tensor(value, template.device_mesh, template.placements, src_data_rank=None)
            source[key] = value
        set_model_state_dict(stage, msd)
        if optim is not None and zero is not None:
            for key, value in hyper.items():
                osd.setdefault(key, value)
            zero.load_optimizer_state(optim, position, osd)
        elif optim is not None:
            set_optimizer_state_dict(stage, optim, osd, options=_OPTIONS)


def _read_from_twins(state: dict[str, dict[str, Any]], path: str | Path,
                     aliases: tuple[tuple[str, ...], ...]) -> list[tuple[str, str, str]]:
    """Keys of ``state`` the checkpoint lacks, moved to the key of a tied twin it holds (``head.weight``'s
    state read from ``embed.weight``'s); returns ``(part, key, twin key)`` of each move."""
    saved = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    moves = []
    for part, sd in state.items():
        for key in [k for k in sd if f"{part}.{k}" not in saved]:
            for names in aliases:
                twin = next((key.replace(n, m, 1) for n in names for m in names
                             if m != n and _names_param(key, n) and f"{part}.{key.replace(n, m, 1)}" in saved), None)
                if twin is not None and twin not in sd:
                    sd[twin] = sd.pop(key)
                    moves.append((part, key, twin))
                    break
    return moves


def _names_param(key: str, name: str) -> bool:
    """Whether a state-dict key is the parameter ``name`` or one of its optimizer entries."""
    return key == name or key.startswith(f"state.{name}.") or key.startswith(f"param_groups.{name}.")


def _saved_optimizer_keys(meta: Any) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Every saved optimizer tensor ``state.<fqn>.<key>``: its whole shape and dtype (DCP's metadata)."""
    out = {}
    for key, entry in meta.state_dict_metadata.items():
        if key.startswith("optim.state.") and hasattr(entry, "size"):
            out[key[len("optim."):]] = (entry.size, entry.properties.dtype)
    return out


def _saved_hyper(path: str | Path, meta: Any) -> dict[str, Any]:
    """The saved ``param_groups.<fqn>.<hyper>`` values (DCP stores non-tensors as bytes)."""
    keys = [k for k, entry in meta.state_dict_metadata.items()
            if k.startswith("optim.param_groups.") and not hasattr(entry, "size")]
    if not keys:
        return {}
    state: dict[str, Any] = {"optim": {k[len("optim."):]: None for k in keys}}
    dcp.load(state, checkpoint_id=str(path))
    return state["optim"]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__

