"""Imported at start-up by every Python process whose PYTHONPATH starts here (``fault_injection.fault_env``)."""

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parents[1])  # tests/runtime, where fault_injection lives
sys.path.insert(0, _HERE)
try:
    import fault_injection
finally:
    sys.path.remove(_HERE)

fault_injection.install()
