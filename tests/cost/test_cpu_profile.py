"""The CPU profile (bench.cpu_profile's JSON) as the planner prices it, and the cost-model terms it sets.

Every term is checked by the number it adds: a constant at its default adds nothing, so plans on
GPU clusters do not move; at a value it adds exactly what its docstring says.
"""

import math
from dataclasses import replace

import pytest

from planner import ParallelConfig, evaluate, plan
from planner.cluster import ClusterSpec
from planner.cost.comm import all_gather_s, all_reduce_s, p2p_s, reduce_scatter_s, strided_group
from planner.cost.constants import CostConstants
from planner.cost.cpu_calibration import (
    bus_factor,
    cpu_profile_cluster,
    cpu_profile_constants,
    fit_alpha_beta,
    framework_overheads,
)
from planner.cost.layer_table import tp_split_modules
from planner.errors import SpecError

ALPHA, BW = 2e-4, 1.5e9  # the link the synthetic profile's collectives follow exactly


def _seconds(name: str, nbytes: float, n: int) -> float:
    if name == "send_recv":
        return nbytes / BW + ALPHA
    hops = 2 * (n - 1) if name == "all_reduce" else n - 1
    return bus_factor(name, n) * nbytes / BW + hops * ALPHA


def synthetic_profile(nproc: int = 2, cores: int = 2, share: float = 0.5, framework: dict | None = None) -> dict:
    """What ``python -m bench.cpu_profile`` writes, with round numbers (the keys are the contract)."""
    sizes = (4096, 65536, 1 << 20, 8 << 20)
    return {
        "nproc": nproc, "cpu_count": cores, "threads_per_process": 1,
        "alone": {"peak_flops": 1e11, "gemm_half_efficiency_dim": 8.0, "memory_bandwidth": 1e10,
                  "op_dispatch_s": 2e-6, "optimizer_s_per_param": 2e-9, "loss_traffic_passes": 9.0, "threads": 1},
        "mix_alone_s": 0.01, "mix_busy_s": 0.01 / share, "compute_share": share,
        "collectives": {name: [{"message_bytes": s, "seconds": _seconds(name, s, nproc)} for s in sizes]
                        for name in ("all_reduce", "all_gather", "reduce_scatter", "send_recv")},
        "overlap": {"gemm_s": 0.02, "comm_s": 0.02, "both_s": 0.04, "fraction": 0.0},
        "framework": framework or {},
    }


def test_alpha_beta_fit_recovers_the_link_of_exact_points():
    for n in (2, 4):
        alpha, bw = fit_alpha_beta(synthetic_profile(nproc=n))
        assert alpha == pytest.approx(ALPHA, rel=0.1)
        assert bw == pytest.approx(BW, rel=0.1)


def test_profile_loads_as_a_cluster_at_the_measured_share_of_the_cpu():
    cluster = cpu_profile_cluster(synthetic_profile(nproc=4, share=0.5))
    assert cluster.num_devices == 4 and cluster.name == "cpu-local-n4"
    assert cluster.device.peak("fp32") == pytest.approx(0.5e11)
    assert cluster.device.memory_bandwidth_bytes_per_s == pytest.approx(0.5e10)
    assert cluster.intra_node.latency_s == pytest.approx(ALPHA, rel=0.1)
    again = ClusterSpec.from_dict(cluster.to_dict(), source="round-trip")  # the file the bench writes
    assert again.fingerprint() == cluster.fingerprint()


def test_profile_constants_price_a_plan():
    profile = synthetic_profile(nproc=2, share=0.9)
    c = cpu_profile_constants(profile)
    assert not c.async_dispatch and not c.vocab_parallel_loss
    assert c.comm_compute_overlap == 0.0  # FSDP2 gathers block the process on a CPU
    assert c.op_dispatch_s == pytest.approx(2e-6 / 0.9)  # no framework step: the chain's figure, stretched
    assert c.idle_reclaim_fraction == 0.0  # 2 processes, 2 cores: nobody time-shares
    p = plan("gpt-tiny", cpu_profile_cluster(profile), global_batch=8, constants=c)
    assert p.parallel.world_size == 2
    assert 0 < p.predicted.step_time_s < 10
    assert p.cost_constants["comm_compute_overlap"] == 0.0


def test_oversubscribed_cores_give_back_part_of_a_bubble():
    assert cpu_profile_constants(synthetic_profile(nproc=4, cores=2)).idle_reclaim_fraction == pytest.approx(0.5)
    assert cpu_profile_constants(synthetic_profile(nproc=2, cores=4)).idle_reclaim_fraction == 0.0


def test_a_broken_profile_names_the_field():
    bad = synthetic_profile()
    del bad["collectives"]
    with pytest.raises(SpecError, match="profile.collectives"):
        cpu_profile_constants(bad)
    with pytest.raises(SpecError, match="compute_share"):
        cpu_profile_cluster(synthetic_profile(share=1.5))


def test_framework_overheads_subtract_what_the_cost_model_prices_itself():
    fw = {"alone": 0.004, "ddp": 0.006, "fsdp": 0.030, "tp": 0.020, "pp": 0.012, "pp_half_alone": 0.004,
          "blocks": 4, "hidden": 64, "rows": 16, "pp_micro_batches": 4}
    profile = synthetic_profile(nproc=2, framework=fw)
    cluster = cpu_profile_cluster(profile)
    c = replace(CostConstants(), link_efficiency=1.0, network_efficiency=1.0)
    fsdp_s, tp_s, pp_s = framework_overheads(profile, cluster, c)
    world, pair = strided_group(cluster, 2, 1), strided_group(cluster, 2, 1)
    block = 4.0 * (2 * 64 * 256 + 256 + 64)
    fsdp_comm = 2 * all_gather_s(4 * block, world, c) + reduce_scatter_s(4 * block, world, c)
    assert fsdp_s == pytest.approx((0.030 - 0.006 - (fsdp_comm - all_reduce_s(4 * block, world, c))) / 4)
    assert tp_s == pytest.approx((0.020 - 0.004 - 4 * 2 * all_reduce_s(4.0 * 16 * 64, pair, c)) / 8)
    send = p2p_s(4.0 * 16 * 64, same_node=True, cluster=cluster, c=c)
    assert pp_s == pytest.approx((0.012 - 5 / 4 * 0.004) / 5 - 2 * send)
    assert min(fsdp_s, tp_s, pp_s) > 0
    # a framework no slower than its baseline costs nothing (never below 0)
    fw_fast = dict(fw, fsdp=0.0, tp=0.0, pp=0.0)
    assert framework_overheads(synthetic_profile(nproc=2, framework=fw_fast), cluster, c) == (0.0, 0.0, 0.0)


# --- the cost-model terms, on gpt-tiny over two local processes ---------------------------------------------

BASE = replace(CostConstants(), async_dispatch=False, elementwise_traffic_factor=1.0)


def _price(cfg: ParallelConfig, c: CostConstants):
    return evaluate("gpt-tiny", "cpu-local", cfg, devices_per_node=2, constants=c).predicted


def test_defaults_add_nothing():
    d = CostConstants()
    assert (d.comm_compute_overlap, d.vocab_parallel_loss, d.fsdp_layer_overhead_s, d.tp_layer_overhead_s,
            d.idle_reclaim_fraction) == (1.0, True, 0.0, 0.0, 0.0)


def test_zero3_gathers_are_hidden_only_as_far_as_communication_overlaps_compute():
    cfg = ParallelConfig(dp=2, tp=1, pp=1, micro_batch_size=4, num_micro_batches=2, zero_stage=3)
    hidden = _price(cfg, BASE).time_breakdown_s["zero3_gather_exposed"]
    exposed = _price(cfg, replace(BASE, comm_compute_overlap=0.0)).time_breakdown_s["zero3_gather_exposed"]
    cluster = ClusterSpec.preset("cpu-local", devices_per_node=2)
    group = strided_group(cluster, 2, 1)
    assert hidden == 0.0  # the CPU-free default: compute (seconds) covers the gathers (milliseconds)
    assert exposed > 0.0
    # with no overlap each micro-batch pays its two gathers and one reduce-scatter in full
    p = plan_params("gpt-tiny")
    per_mb = 2 * all_gather_s(4.0 * p, group, BASE) + reduce_scatter_s(4.0 * p, group, BASE)
    assert exposed == pytest.approx(2 * per_mb)


def plan_params(model: str) -> float:
    """Parameters of ``model`` as the planner counts them (one device holds all of them)."""
    one = evaluate(model, "cpu-local", ParallelConfig(dp=2, tp=1, pp=1, micro_batch_size=4, num_micro_batches=1),
                   devices_per_node=2)
    return float(one.model.param_count)


def test_fsdp_overhead_is_per_wrapped_layer_and_micro_batch_for_every_zero_stage():
    extra = 1e-3
    layers = 6  # gpt-tiny: embedding, 4 blocks, head, each with parameters
    for zero, key in ((3, "zero3_gather_exposed"), (2, "dp_comm_exposed"), (1, "dp_comm_exposed")):
        cfg = ParallelConfig(dp=2, tp=1, pp=1, micro_batch_size=2, num_micro_batches=4, zero_stage=zero)
        base = _price(cfg, replace(BASE, comm_compute_overlap=0.0)).time_breakdown_s[key]
        more = _price(cfg, replace(BASE, comm_compute_overlap=0.0, fsdp_layer_overhead_s=extra)).time_breakdown_s[key]
        assert more - base == pytest.approx(4 * layers * extra)
    ddp = ParallelConfig(dp=2, tp=1, pp=1, micro_batch_size=8, num_micro_batches=1)
    assert _price(ddp, replace(BASE, fsdp_layer_overhead_s=extra)).step_time_s == _price(ddp, BASE).step_time_s


def test_tp_overhead_is_per_split_module_and_micro_batch():
    from planner.resolve import resolve_model

    graph = resolve_model("gpt-tiny", dtype="fp32").graph
    assert [tp_split_modules(layer) for layer in graph.layers] == [1, 4, 4, 4, 4, 1]  # embed, blocks (qkv,
    # proj, fc1, fc2), head: lm_head (layer norms are not split)
    cfg = ParallelConfig(dp=1, tp=2, pp=1, micro_batch_size=8, num_micro_batches=2)
    base = _price(cfg, BASE).time_breakdown_s["tp_comm"]
    more = _price(cfg, replace(BASE, tp_layer_overhead_s=1e-3)).time_breakdown_s["tp_comm"]
    assert more - base == pytest.approx(2 * 18 * 1e-3)


def test_a_gathered_head_pays_the_logits_gather_and_the_whole_loss():
    cfg = ParallelConfig(dp=1, tp=2, pp=1, micro_batch_size=8, num_micro_batches=1)
    split = _price(cfg, BASE).time_breakdown_s
    gathered = _price(cfg, replace(BASE, vocab_parallel_loss=False)).time_breakdown_s
    cluster = ClusterSpec.preset("cpu-local", devices_per_node=2)
    logits = 8 * 64 * 8192 * 4.0  # micro-batch x sequence x vocabulary, fp32
    assert gathered["tp_comm"] - split["tp_comm"] == pytest.approx(all_gather_s(logits, strided_group(cluster, 2, 1),
                                                                                BASE))
    loss_half = BASE.loss_traffic_passes * logits / 2 / (cluster.device.memory_bandwidth_bytes_per_s
                                                          * BASE.memory_bandwidth_efficiency)
    assert gathered["compute"] - split["compute"] == pytest.approx(loss_half)


def test_time_shared_cores_give_back_the_reclaimed_share_of_the_bubble():
    cfg = ParallelConfig(dp=1, tp=1, pp=2, micro_batch_size=2, num_micro_batches=4)
    base = _price(cfg, BASE)
    half = _price(cfg, replace(BASE, idle_reclaim_fraction=0.5))
    assert base.time_breakdown_s["pp_bubble"] > 0
    assert half.time_breakdown_s["pp_bubble"] == pytest.approx(0.5 * base.time_breakdown_s["pp_bubble"])
    assert base.step_time_s - half.step_time_s == pytest.approx(0.5 * base.time_breakdown_s["pp_bubble"])
    dp_only = ParallelConfig(dp=2, tp=1, pp=1, micro_batch_size=8, num_micro_batches=1)
    assert _price(dp_only, replace(BASE, idle_reclaim_fraction=0.5)).step_time_s == _price(dp_only, BASE).step_time_s
    assert math.isfinite(half.step_time_s)


def test_the_optimizers_loop_is_fitted_per_tensor_not_per_op():
    """The micro-model's step timed in two parts: forward-backward fits the per-op host time, the optimizer's
    step its per-tensor loop, so a pipeline's extra micro-batches are not charged the optimizer's loop again."""
    from planner.cost.cpu_calibration import _framework_setup
    from planner.cost.model import evaluate as evaluate_cost
    from planner.cost.model import layer_table

    fw = {"alone": 0.0030, "alone_fwd_bwd": 0.0014, "alone_optimizer": 0.0016, "ddp": 0.004, "fsdp": 0.02,
          "tp": 0.01, "pp": 0.01, "pp_half_alone": 0.002, "blocks": 4, "hidden": 64, "rows": 16,
          "pp_micro_batches": 4}
    profile = synthetic_profile(nproc=2, share=1.0, framework=fw)
    c = cpu_profile_constants(profile)
    graph, one, cfg = _framework_setup(profile, fw)
    assert 0 < c.optimizer_tensor_overhead_s < 0.0016 / 16  # 16 tensors, less what their traffic is priced at
    table = layer_table(graph, one, micro_batch=16, tp=1, sequence_parallel=False, recompute="none", c=c)
    pred = evaluate_cost(graph, one, cfg, [(0, graph.num_layers)], c, table=table)
    assert pred.time_breakdown_s["optimizer"] == pytest.approx(0.0016, rel=1e-6)
    assert pred.step_time_s - pred.time_breakdown_s["optimizer"] == pytest.approx(0.0014, rel=1e-6)
    whole = cpu_profile_constants(synthetic_profile(nproc=2, share=1.0, framework={
        k: v for k, v in fw.items() if k not in ("alone_fwd_bwd", "alone_optimizer")}))
    assert whole.optimizer_tensor_overhead_s == 0 and whole.op_dispatch_s > 2 * c.op_dispatch_s  # the old fit
