"""Sections ``inter_op`` and ``intra_op``: the two solvers on their own.

``inter_op`` runs :mod:`bench.inter_op` in this process: the stage solver's split
(:meth:`planner.pricing.Pricer.split`) against the partition baselines (equal layer counts,
DeepSpeed ``parameters``, torchgpipe ``balance_by_time``; :mod:`bench.partition_baselines`) for
fixed configurations, every split priced by ``Pricer.evaluate``, and on the mixed A100 + V100
cluster against the split a single-device-type planner makes.

``intra_op`` runs ``python -m bench.intra_op`` (the intra-op sharding ILP's benchmark)
and includes its output, with the 1-second bars for one GPT-3 175B layer and for ``plan_placements``
of the whole model (the figures the tests no longer time).
"""

from __future__ import annotations

import sys

from bench.common import Context, run_cmd, say


def inter_op_section(ctx: Context) -> str:
    from bench import inter_op

    say("stage solver vs partition baselines")
    lines = ["## Layer-to-device solver (inter-op) vs partition baselines\n",
             "The stage solver's split (`planner.pricing.Pricer.split`) against the partition baselines of "
             "`bench/partition_baselines.py` (DeepSpeed `uniform` and `parameters`, torchgpipe `balance_by_time`'s block partition, "
             "each the real package's function), each split priced by "
             "`Pricer.evaluate` (the joint search's cost model). Cells: step time (baseline / solver - 1). The "
             "same tables, and GPT-3 175B's split times: `python -m bench.inter_op`.\n",
             inter_op.section_margins(quick=ctx.quick)]
    if not ctx.quick:
        say("stage solver on the mixed cluster")
        lines += ["", inter_op.section_hetero()]
    return "\n".join(lines)


def intra_op_section(ctx: Context) -> str:
    cmd = [sys.executable, "-m", "bench.intra_op", "--repeat", "1" if ctx.quick else "3"]
    if ctx.quick:
        cmd.append("--quick")
    say(" ".join(cmd[1:]))
    res = run_cmd(cmd, timeout_s=900)
    head = ["## Intra-op sharding ILP\n",
            "Solve times of the intra-op ILP (per-operator tensor splits on the tp axis), from its own benchmark "
            f"(`bench/intra_op.py`), run as `{res.cmd}` in this invocation; its output follows verbatim. The rows "
            "with a bar are the speed targets: one GPT-3 175B layer on an 8-device node, and `plan_placements` "
            "of the 96-block model at tp=8, each in under a second (the tests check the solves' structure, not "
            "their wall time).\n"]
    if not res.ok:
        return "\n".join(head + [f"The command failed: `{res.error_line()}`."])
    return "\n".join(head + [res.stdout.strip()])
