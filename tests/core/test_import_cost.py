"""`import planner` loads only what planning needs: solvers and plotting libraries load when used.

Every CLI command pays for what `import planner` imports before it does anything, so the heavy
optional libraries (the ILP backends ortools and pulp, matplotlib for reports, transformers for
Hugging Face models, rich for tables, jsonschema for schema checks) are imported inside the
functions that use them. These tests look at ``sys.modules`` in a fresh interpreter; they measure
no time, so they do not depend on the machine's load.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAZY = ("ortools", "pulp", "matplotlib", "transformers", "rich", "jsonschema")


def loaded_packages(code: str) -> set[str]:
    """Top-level packages in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.fixture(scope="module")
def after_import_planner() -> set[str]:
    return loaded_packages("import planner")


@pytest.mark.parametrize("package", LAZY)
def test_import_planner_does_not_load(after_import_planner: set[str], package: str):
    assert package not in after_import_planner, (
        f"`import planner` imports {package}; import it inside the function that uses it")


def test_the_probe_sees_what_planner_does_import(after_import_planner: set[str]):
    # The public API traces models with torch and builds cost graphs with networkx: if the probe
    # did not see these, an empty answer would pass the test above.
    assert {"planner", "torch", "networkx"} <= after_import_planner


def test_the_probe_sees_a_lazy_package_once_it_is_imported():
    # The same probe reports an ILP backend as soon as anything imports it.
    assert "pulp" in loaded_packages("import planner\nimport pulp")
