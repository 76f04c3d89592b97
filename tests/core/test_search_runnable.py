"""The search proposes only plans the runtime runs: torch's Schedule1F1B (and DualPipe-V) refuse fewer
micro-batches than stages, so no plan, and no alternative it lists, asks for that."""

from planner import plan
from planner.schedules import runtime_refusal
from planner.space import SearchSpace


def test_1f1b_with_fewer_micro_batches_than_stages_is_never_proposed():
    space = SearchSpace(pp=(4,), schedules=("1f1b", "gpipe"))
    p = plan("gpt-tiny", "cpu-local", devices_per_node=4, global_batch=2, space=space, baselines=False)
    cfg = p.parallel
    assert runtime_refusal(cfg.schedule, cfg.pp, cfg.num_micro_batches, cfg.virtual_stages) is None
    assert cfg.schedule == "gpipe"  # 2 micro-batches at most: 1f1b cannot run them on 4 stages
    for alt in p.search.alternatives:
        a = alt.parallel
        assert runtime_refusal(a.schedule, a.pp, a.num_micro_batches, a.virtual_stages) is None, alt.config


def test_runtime_refusal_names_the_rule():
    assert runtime_refusal("1f1b", 4, 2, 1) is not None and "4" in runtime_refusal("1f1b", 4, 2, 1)
    assert runtime_refusal("1f1b", 4, 4, 1) is None
    assert runtime_refusal("gpipe", 4, 1, 1) is None
    assert runtime_refusal("chimera", 4, 4, 1) is not None
