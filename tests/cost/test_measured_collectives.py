"""Measured collectives, GEMMs and memory in the cost model: interpolation, group mapping, fallback."""

import math

import pytest

from planner.cluster import ClusterSpec
from planner.cost import comm
from planner.cost.calibrate import gpt_graph
from planner.cost.compute import gemm_efficiency, measured_gemm_efficiency
from planner.cost.constants import CostConstants
from planner.cost.measured import bus_bandwidth
from planner.cost.memory import usable_memory_bytes
from planner.cost.model import evaluate, layer_table
from planner.plan import ParallelConfig

C = CostConstants()
SIZES = (2**12, 2**20, 2**30)
NODES = (1, 2, 4)


def curve(busbw_by_nodes: dict[int, tuple[float, ...]]) -> list[dict]:
    return [{"nodes": n, "message_bytes": s, "bus_bandwidth_bytes_per_s": b}
            for n, values in busbw_by_nodes.items() for s, b in zip(SIZES, values)]


def measured(scale: float = 1.0, *, nodes: int = 4, extra: dict | None = None) -> ClusterSpec:
    """dgx-a100-80g on ``nodes`` nodes with a curve per node count rising with the message size."""
    points = curve({1: (1e9 * scale, 5e10 * scale, 2e11 * scale), 2: (5e8 * scale, 1e10 * scale, 4e10 * scale),
                    4: (2e8 * scale, 8e9 * scale, 3e10 * scale)})
    d = ClusterSpec.preset("dgx-a100-80g", nodes=nodes).to_dict()
    d["collectives"] = {"all_reduce": points, "all_gather": points, "reduce_scatter": points, **(extra or {})}
    return ClusterSpec.from_dict(d)


def test_interpolation_is_exact_at_measured_points():
    m = measured().groups[0].collectives
    for p in m.all_reduce:
        assert bus_bandwidth(m, "all_reduce", p.nodes, p.message_bytes) == pytest.approx(
            p.bus_bandwidth_bytes_per_s, rel=1e-12)


def test_interpolation_is_log_log_and_monotone_between_points():
    m = measured().groups[0].collectives
    # the geometric midpoint of two sizes gets the geometric mean of their bandwidths
    mid = math.sqrt(2**20 * 2**30)
    assert bus_bandwidth(m, "all_reduce", 1, mid) == pytest.approx(math.sqrt(5e10 * 2e11), rel=1e-12)
    sizes = [2**12 * 1.25**i for i in range(int(math.log(2**18) / math.log(1.25)) + 1)]
    for nodes in (1, 2, 3, 4):
        values = [bus_bandwidth(m, "all_reduce", nodes, s) for s in sizes]
        assert all(v is not None for v in values)
        assert all(b >= a for a, b in zip(values, values[1:]))  # the measured curves rise with the size
    # between node counts 2 and 4, log-linear in nodes: 3 nodes lies between the two curves
    for s in SIZES:
        two, three, four = (bus_bandwidth(m, "all_reduce", n, s) for n in (2, 3, 4))
        assert min(two, four) <= three <= max(two, four)
        w = math.log(3 / 2) / math.log(4 / 2)
        assert three == pytest.approx(math.exp((1 - w) * math.log(two) + w * math.log(four)), rel=1e-12)


def test_whole_node_group_uses_the_nccl_tests_formulas():
    cluster = measured(nodes=2)
    g = comm.strided_group(cluster, 16, 1)  # 2 whole nodes of 8
    assert (g.nodes, g.per_node) == (2, 8)
    s = 2**20
    assert comm.all_reduce_s(s, g, C) == pytest.approx(2 * 15 / 16 * s / 1e10, rel=1e-12)
    assert comm.reduce_scatter_s(s, g, C) == pytest.approx(15 / 16 * s / 1e10, rel=1e-12)
    assert comm.all_gather_s(s, g, C) == pytest.approx(15 / 16 * s / 1e10, rel=1e-12)


def test_strided_group_gets_its_share_of_the_node_injection_bandwidth():
    cluster = measured(nodes=2)
    g = comm.strided_group(cluster, 8, 2)  # dp=8 under tp=2: 4 ranks on each of 2 nodes, 4 of 8 NICs
    assert (g.nodes, g.per_node) == (2, 4)
    s = 2**20
    busbw = bus_bandwidth(cluster.groups[0].collectives, "all_reduce", 2, s * 2)  # same bytes per NIC
    assert comm.all_reduce_s(s, g, C) == pytest.approx(2 * 7 / 8 * s / (busbw / 2), rel=1e-12)
    # one GPU per node (dp under tp=8) drives one NIC: an eighth, read at 8x the message
    g1 = comm.strided_group(cluster, 2, 8)
    busbw1 = bus_bandwidth(cluster.groups[0].collectives, "all_reduce", 2, s * 8)
    assert comm.all_reduce_s(s, g1, C) == pytest.approx(2 * 1 / 2 * s / (busbw1 / 8), rel=1e-12)


def test_strided_group_reads_the_curve_where_whole_nodes_hold_as_many_ranks():
    # dp=8 under tp=4 on 4 nodes: 2 ranks per node. Its ring has 8 ranks, as 1 whole node would,
    # so it reads the 2-node curve (two at least: its hops cross the network), not the 4-node one,
    # where the measured bus bandwidth has fallen with the longer ring.
    cluster = measured(nodes=4)
    g = comm.strided_group(cluster, 8, 4)
    assert (g.nodes, g.per_node) == (4, 2)
    s = 2**20
    m = cluster.groups[0].collectives
    two, four = bus_bandwidth(m, "all_reduce", 2, s * 4), bus_bandwidth(m, "all_reduce", 4, s * 4)
    assert two > four
    assert comm.all_reduce_s(s, g, C) == pytest.approx(2 * 7 / 8 * s / (two / 4), rel=1e-12)
    # 4 ranks per node on 4 nodes: 16 ranks, 2 whole nodes' worth: still the 2-node curve
    g4 = comm.strided_group(cluster, 16, 2)
    assert (g4.nodes, g4.per_node) == (4, 4)
    assert comm.all_reduce_s(s, g4, C) == pytest.approx(
        2 * 15 / 16 * s / (bus_bandwidth(m, "all_reduce", 2, s * 2) / 2), rel=1e-12)
    # whole nodes are unchanged: the 4-node curve
    g8 = comm.strided_group(cluster, 32, 1)
    assert comm.all_reduce_s(s, g8, C) == pytest.approx(2 * 31 / 32 * s / bus_bandwidth(m, "all_reduce", 4, s),
                                                         rel=1e-12)


def test_group_inside_a_node_reads_the_one_node_curve():
    cluster = measured(nodes=2)
    g = comm.strided_group(cluster, 4, 1)  # tp=4: half a node
    assert comm.all_reduce_s(2**20, g, C) == pytest.approx(2 * 3 / 4 * 2**20 / 5e10, rel=1e-12)


def test_ten_times_slower_network_makes_dp_all_reduce_ten_times_slower():
    graph = gpt_graph(16, 1024, 8, seq_len=512, vocab=8192)
    cfg = ParallelConfig(dp=4, tp=8, pp=1, micro_batch_size=1, num_micro_batches=4)
    exposed = []
    for scale in (1.0, 0.1):
        cluster = measured(scale)
        table = layer_table(graph, cluster, micro_batch=1, tp=8, sequence_parallel=False, recompute="none", c=C,
                            tp_pricing="megatron")
        pred = evaluate(graph, cluster, cfg, [(0, graph.num_layers)], C, table=table)
        exposed.append(pred.time_breakdown_s["dp_comm_exposed"])
    assert exposed[0] > 0
    assert exposed[1] / exposed[0] == pytest.approx(10.0, rel=1e-9)


def test_outside_the_measured_range_falls_back_to_alpha_beta_and_says_so():
    cluster = measured(nodes=8)
    plain = ClusterSpec.preset("dgx-a100-80g", nodes=8)
    g, g_plain = comm.strided_group(cluster, 64, 1), comm.strided_group(plain, 64, 1)  # 8 nodes: beyond 4
    assert comm.all_reduce_s(2**20, g, C) == comm.all_reduce_s(2**20, g_plain, C)
    small = comm.strided_group(cluster, 8, 1)
    # below the smallest measured message: alpha-beta; above the largest: the curve's plateau
    assert comm.all_reduce_s(2**10, small, C) == comm.all_reduce_s(2**10, comm.strided_group(plain, 8, 1), C)
    assert comm.all_reduce_s(2**33, small, C) == pytest.approx(2 * 7 / 8 * 2**33 / 2e11, rel=1e-12)
    notes = comm.measured_notes([("dp all_reduce", "all_reduce", 2**20, g)])
    assert len(notes) == 1 and "outside the cluster's measured collectives" in notes[0]
    assert "nodes 1-4" in notes[0] and "alpha-beta" in notes[0]
    # the plan's explanation carries it: dp over 40 nodes, one rank per node, as long a ring as 5
    # whole nodes (dp=8 on 8 nodes would read the 2-node curve: a ring of 8 ranks)
    cluster = measured(nodes=40)
    graph = gpt_graph(16, 1024, 8, seq_len=512, vocab=8192)
    cfg = ParallelConfig(dp=40, tp=8, pp=1, micro_batch_size=1, num_micro_batches=1)
    table = layer_table(graph, cluster, micro_batch=1, tp=8, sequence_parallel=False, recompute="none", c=C,
                        tp_pricing="megatron")
    pred = evaluate(graph, cluster, cfg, [(0, graph.num_layers)], C, table=table)
    assert any(n.startswith("dp all_reduce") and "alpha-beta" in n for n in pred.notes)
    assert any(n.startswith("tp all_reduce priced from the cluster's measured") for n in pred.notes)


def test_all_to_all_and_send_recv_use_their_curves_when_given():
    points = curve({1: (1e9, 1e10, 1e11), 2: (1e8, 1e9, 1e10)})
    cluster = measured(nodes=2, extra={"all_to_all": points, "send_recv": points})
    g = comm.strided_group(cluster, 16, 1)
    assert comm.all_to_all_s(2**20, g, C) == pytest.approx(15 / 16 * 2**20 / 1e9, rel=1e-12)
    assert comm.p2p_s(2**20, same_node=True, cluster=cluster, c=C) == pytest.approx(2**20 / 1e10, rel=1e-12)
    assert comm.p2p_s(2**20, same_node=False, cluster=cluster, c=C) == pytest.approx(2**20 / 1e9, rel=1e-12)
    # without them: the alpha-beta formulas, as before
    bare = measured(nodes=2)
    plain = ClusterSpec.preset("dgx-a100-80g", nodes=2)
    assert comm.p2p_s(2**20, same_node=False, cluster=bare, c=C) == comm.p2p_s(2**20, same_node=False,
                                                                                  cluster=plain, c=C)
    assert comm.all_to_all_s(2**20, comm.strided_group(bare, 16, 1), C) == comm.all_to_all_s(
        2**20, comm.strided_group(plain, 16, 1), C)


def test_measured_gemm_is_exact_at_its_shape_and_the_formula_far_away():
    d = ClusterSpec.preset("dgx-a100-80g").to_dict()
    d["gemm"] = [{"m": 4096, "n": 4096, "k": 4096, "dtype": "bf16", "flops_per_s": 2.0e14},
                 {"m": 1024, "n": 1024, "k": 1024, "dtype": "bf16", "flops_per_s": 1.0e14}]
    cluster = ClusterSpec.from_dict(d)
    device, points = cluster.device, cluster.groups[0].gemm
    eff = measured_gemm_efficiency(4096, 4096, 4096, dtype="bf16", device=device, points=points, c=C)
    assert eff * device.peak("bf16") == pytest.approx(2.0e14, rel=1e-12)
    eff = measured_gemm_efficiency(1024, 1024, 1024, dtype="bf16", device=device, points=points, c=C)
    assert eff * device.peak("bf16") == pytest.approx(1.0e14, rel=1e-12)
    # between the two: between their measured/formula ratios
    r_hi = 2.0e14 / device.peak("bf16") / gemm_efficiency(4096, 4096, 4096, C)
    r_lo = 1.0e14 / device.peak("bf16") / gemm_efficiency(1024, 1024, 1024, C)
    mid = measured_gemm_efficiency(2048, 2048, 2048, dtype="bf16", device=device, points=points, c=C)
    assert min(r_hi, r_lo) <= mid / gemm_efficiency(2048, 2048, 2048, C) <= max(r_hi, r_lo)
    for shape, dtype in (((64, 64, 64), "bf16"), ((4096, 4096, 4096), "fp32")):  # far away; no fp32 points
        assert measured_gemm_efficiency(*shape, dtype=dtype, device=device, points=points, c=C) == \
            gemm_efficiency(*shape, C)


def test_measured_memory_sets_the_usable_memory():
    d = ClusterSpec.preset("dgx-a100-80g").to_dict()
    plain = ClusterSpec.from_dict(d)
    d["memory"] = {"reserved_bytes": 3 * 2**30}
    assert usable_memory_bytes(ClusterSpec.from_dict(d), C) == 0.95 * 80 * 2**30 - 3 * 2**30
    d["memory"] = {"reserved_bytes": 3 * 2**30, "usable_fraction": 0.9}
    assert usable_memory_bytes(ClusterSpec.from_dict(d), C) == 0.9 * 80 * 2**30 - 3 * 2**30
    assert usable_memory_bytes(plain, C) == 0.95 * 80 * 2**30 - 2 * 2**30


def test_below_the_smallest_measured_message_the_curve_is_a_ceiling():
    """Bus bandwidth only rises with the message size, so a message smaller than any measured is never
    priced faster than the smallest measured one's bus bandwidth: no jump at the curve's edge (the
    sweep's cluster measured 256 MB only, and alpha-beta put 200 MB at twice the bus bandwidth)."""
    big = 2**28
    points = [{"nodes": n, "message_bytes": big, "bus_bandwidth_bytes_per_s": b} for n, b in ((1, 2e11), (2, 2e10))]
    d = ClusterSpec.preset("dgx-a100-80g", nodes=2).to_dict()
    d["collectives"] = {"all_reduce": points, "all_gather": points, "reduce_scatter": points}
    cluster = ClusterSpec.from_dict(d)
    g = comm.strided_group(cluster, 16, 1)  # two whole nodes
    plain = comm.strided_group(ClusterSpec.preset("dgx-a100-80g", nodes=2), 16, 1)
    below = big * 3 // 4
    for fn, factor in ((comm.all_gather_s, 15 / 16), (comm.reduce_scatter_s, 15 / 16), (comm.all_reduce_s, 30 / 16)):
        at_edge = fn(big, g, C)
        assert at_edge == pytest.approx(factor * big / 2e10, rel=1e-12)
        assert fn(below, plain, C) < factor * below / 2e10  # alpha-beta alone would be faster than measured
        assert fn(below, g, C) == pytest.approx(factor * below / 2e10, rel=1e-12)  # held to the curve's bandwidth
        assert fn(below, g, C) <= at_edge
        tiny = 2**10  # far below: alpha-beta's latency is slower than the bound, and stays
        assert fn(tiny, g, C) == fn(tiny, plain, C)
    notes = comm.measured_notes([("tp all_gather", "all_gather", below, g)])
    assert len(notes) == 1 and "never faster than the smallest measured message" in notes[0]
