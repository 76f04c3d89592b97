"""bench.measured's verdict (plan / best hand-picked, both measured) from step times, without running anything."""

from pathlib import Path

from bench.measured import TARGET, Case, CaseResult, Config, Entry, hand_picked, summary_table


class _Plan:  # the two fields of planner.plan.Plan the table reads
    def __init__(self, label: str) -> None:
        self.parallel = type("P", (), {"label": lambda self: label})()
        self.stages = []
        self.predicted = type("Q", (), {"step_time_s": 1.0})()


def _entry(name: str, run_medians: list[float], conf: Config | None = None) -> Entry:
    e = Entry(name, conf, Path(f"{name}.plan.json"), plan=_Plan(name))
    e.step_times, e.round_medians = list(run_medians), list(run_medians)
    return e


def test_hand_picked_configurations_fill_the_processes():
    two, four = hand_picked(2, 16), hand_picked(4, 16)
    assert [(c.tp, c.pp, c.dp, c.micro_batch, c.zero) for c in two] == [
        (1, 1, 2, 8, 0), (1, 1, 2, 8, 3), (2, 1, 1, 16, 0), (1, 2, 1, 4, 0)]
    assert [(c.tp, c.pp, c.dp, c.micro_batch, c.zero) for c in four] == [
        (1, 1, 4, 4, 0), (1, 1, 4, 4, 3), (2, 1, 2, 8, 0), (1, 2, 2, 2, 0)]
    assert all(c.tp * c.pp * c.dp == n for n, cs in ((2, two), (4, four)) for c in cs)


def test_ratio_is_the_plan_over_the_fastest_hand_picked_least_disturbed_run():
    case = Case("gpt-tiny", 2, 16, 8, hand_picked(2, 16))
    # run medians: the plan's best run 1.1, DDP's 1.04 (its 1.6 run was a burst of other users' load)
    entries = [_entry("plan", [1.2, 1.1]), _entry("DDP", [1.6, 1.04], case.baselines[0]),
               _entry("ZeRO-3", [2.0, 2.0], case.baselines[1]), _entry("tp=2", [], case.baselines[2])]
    result = CaseResult(case, entries)
    assert result.best_hand_picked().name == "DDP"
    assert result.ratio() == 1.1 / 1.04
    assert result.ratio() > TARGET  # 1.058: a miss
    assert "| 1.06 | **no** |" in summary_table([result])
    entries[0].round_medians = [1.05, 1.2]
    assert "| 1.01 | yes |" in summary_table([CaseResult(case, entries)])
