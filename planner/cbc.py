"""Run PuLP's bundled CBC on a built problem, quietly, and keep its log for bounds and gaps.

Shared by the inter-op and intra-op ILPs so both call CBC the same way.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings


def run_cbc(prob, *, time_limit_s: float, threads: int, prefix: str = "cbc_") -> tuple[float, str]:
    """Solve ``prob`` (a ``pulp.LpProblem``) in place; returns (seconds, CBC's log text)."""
    import pulp

    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        log = os.path.join(tmp, "cbc.log")
        with warnings.catch_warnings():  # PuLP 3 warns that its bundled CBC goes away in PuLP 4
            warnings.simplefilter("ignore", DeprecationWarning)
            solver = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s, gapRel=0.0, threads=threads,
                                       logPath=log, keepFiles=False)
        start = time.perf_counter()
        prob.solve(solver)
        elapsed = time.perf_counter() - start
        text = open(log).read() if os.path.exists(log) else ""
    return elapsed, text
