"""The bench harness is not an installed package: make the repository root importable (``import bench``)
also when pytest is started as ``.venv/bin/pytest`` rather than ``python -m pytest``."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
