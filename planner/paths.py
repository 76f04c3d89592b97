"""Where the planner finds the files it ships: presets, measured data and JSON schemas.

They are package data of :mod:`planner._data` (links into ``datasets/`` and ``docs/`` in the
repository, copies in an installed wheel), found with :func:`importlib.resources.files`, so a
non-editable ``pip install`` plans without the checkout. ``$PLANNER_DATASETS`` points the presets
and measured data at another folder holding ``clusters/``, ``models/`` and ``measured/``.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

SCHEMAS = ("plan", "cluster")


def _package_path(*parts: str) -> Path:
    """A file or folder of :mod:`planner._data` as a filesystem path.

    pip unpacks wheels, so the package is always on disk and ``files()`` returns a ``Path``; the
    callers glob, stat and (``validate --write-bands``) write, which a zip member could not.
    """
    root = resources.files("planner._data").joinpath(*parts)
    if not isinstance(root, Path):
        raise RuntimeError(f"planner's package data is not on the filesystem ({root!r}): install the planner "
                           "unzipped, as pip does")
    return root


def datasets_dir() -> Path:
    """The folder holding the ``clusters/``, ``models/`` and ``measured/`` presets."""
    env = os.environ.get("PLANNER_DATASETS")
    if env:
        return Path(env)
    return _package_path("datasets")


def schema_path(name: str) -> Path:
    """``docs/<name>.schema.json`` as shipped in the package (``name``: plan or cluster)."""
    if name not in SCHEMAS:
        raise ValueError(f"unknown schema {name!r}; the package ships {SCHEMAS}")
    return _package_path(f"{name}.schema.json")
