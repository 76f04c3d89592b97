"""The planner against Megatron-LM's published configurations, under the same cost model.

``python -m tools.published [--markdown] [--rows N]``: for each row of Narayanan et al. 2021,
Table 1 (the rows the cost model is calibrated against, :mod:`planner.cost.calibrate`), plan the
same model on the same number of DGX A100 GPUs with the same global batch, and compare the plan's
predicted iteration time with the published configuration's, priced by the same cost model and
graph. The search space contains the published configuration's degrees and schedules, so the plan
can only tie or win; the table says where it differs.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from planner.api import ResolvedModel, plan_resolved
from planner.cluster import ClusterSpec
from planner.cost.calibrate import NARAYANAN_TABLE1, PublishedRun, gpt_graph, predict_run
from planner.plan import ParallelConfig
from tools.compare import differences
from tools.compare import markdown as table

KNOBS = ("tp", "pp", "dp", "micro_batch_size", "virtual_stages", "schedule", "recompute", "sequence_parallel",
         "zero_stage")


@dataclass(frozen=True)
class Comparison:
    run: PublishedRun
    published: ParallelConfig
    published_s: float
    planned: ParallelConfig
    planned_s: float
    boundaries_differ: bool

    @property
    def ratio(self) -> float:
        return self.planned_s / self.published_s

    def differences(self) -> list[str]:
        out = differences(self.published, self.planned, KNOBS)
        if self.boundaries_differ and self.planned.pp > 1:
            out.append("stage boundaries balanced by the DP instead of equal blocks per stage")
        return out


def compare(run: PublishedRun) -> Comparison:
    row = predict_run(run)
    graph = gpt_graph(run.heads, run.hidden, run.layers)
    cluster = ClusterSpec.preset("dgx-a100-80g", nodes=run.gpus // 8)
    ours = plan_resolved(ResolvedModel(module=None, preset=None, graph=graph), cluster, global_batch=run.batch,
                         baselines=False)
    return Comparison(run=run, published=row.config, published_s=row.predicted_s, planned=ours.parallel,
                      planned_s=ours.predicted.step_time_s, boundaries_differ=True)


def markdown(rows: list[Comparison]) -> str:
    return table(["model", "GPUs", "batch", "published configuration", "its predicted s", "planner's configuration",
                  "predicted s", "ratio", "where it differs"],
                 [[r.run.name, r.run.gpus, r.run.batch, r.published.label(), f"{r.published_s:.2f}", r.planned.label(),
                   f"{r.planned_s:.2f}", f"{r.ratio:.3f}", "; ".join(r.differences()) or "same"] for r in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.published", description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--rows", type=int, default=len(NARAYANAN_TABLE1), help="only the first N rows")
    args = parser.parse_args(argv)
    rows = []
    for run in NARAYANAN_TABLE1[: args.rows]:
        rows.append(compare(run))
        if not args.markdown:
            r = rows[-1]
            print(f"{r.run.name:10s} published {r.published_s:8.2f} s  planner {r.planned_s:8.2f} s  "
                  f"ratio {r.ratio:.3f}  {'; '.join(r.differences()) or 'same'}", flush=True)
    if args.markdown:
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
