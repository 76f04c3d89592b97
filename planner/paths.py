"""Where the planner finds its presets: ``datasets/`` next to the package, or ``$PLANNER_DATASETS``."""

from __future__ import annotations

import os
from pathlib import Path


def datasets_dir() -> Path:
    """The folder holding ``clusters/`` and ``models/`` presets."""
    env = os.environ.get("PLANNER_DATASETS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "datasets"


def repo_dir() -> Path:
    return Path(__file__).resolve().parent.parent
