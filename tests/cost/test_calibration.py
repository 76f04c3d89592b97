"""Predictions against Megatron-LM's published runs (docs/calibration.md): every row within 15%."""

import numpy as np
import pytest
import torch

from planner.cluster import ClusterSpec
from planner.cost import calibrate
from planner.cost.constants import CostConstants
from planner.cost.model import layer_table
from planner.models.gpt import GPT, GPTConfig
from planner.trace import trace_model

GiB = 2**30


@pytest.mark.parametrize("run", calibrate.NARAYANAN_TABLE1, ids=lambda r: r.name)
def test_narayanan_table1_row_within_15_percent(run):
    row = calibrate.predict_run(run)
    assert abs(row.error) <= 0.15, (run.name, row.predicted_s, row.published_s, row.config.label())
    predicted_tflops = run.flops_per_iteration() / (row.predicted_s * run.gpus) / 1e12
    assert predicted_tflops == pytest.approx(run.tflops_per_gpu, rel=0.15)
    # the published configuration ran on 80 GB GPUs: it must fit, and with room to spare below 74 GiB usable
    assert row.prediction.fits
    assert row.prediction.peak_memory_bytes < 80 * GiB


@pytest.mark.parametrize("run", calibrate.KORTHIKANTI_530B, ids=lambda r: r.name)
def test_korthikanti_530b_mfu_within_15_percent(run):
    row = calibrate.predict_mfu(run)
    assert abs(row.error) <= 0.15, (run.name, row.prediction.mfu)
    assert row.prediction.fits


def test_selective_recompute_with_sp_beats_full_recompute_by_about_the_published_margin():
    full, selective = (calibrate.predict_mfu(r) for r in reversed(calibrate.KORTHIKANTI_530B))
    speedup = full.prediction.step_time_s / selective.prediction.step_time_s
    assert speedup == pytest.approx(0.542 / 0.421, rel=0.15)  # published: 29% faster


def test_published_flop_formula_and_iteration_time():
    one_t = calibrate.NARAYANAN_TABLE1[-1]
    # 96·B·s·l·h²·(1 + s/6h + V/16lh) for the 1T row
    f = 96 * 3072 * 2048 * 128 * 25600**2 * (1 + 2048 / (6 * 25600) + 51200 / (16 * 128 * 25600))
    assert one_t.flops_per_iteration() == pytest.approx(f)
    assert one_t.published_iteration_s() == pytest.approx(f / (163e12 * 3072))


def test_repeated_block_graph_equals_the_full_trace():
    run = calibrate.NARAYANAN_TABLE1[0]  # 24 blocks of h = 2304
    fast = calibrate.gpt_graph(run.heads, run.hidden, run.layers)
    with torch.device("meta"):
        model = GPT(GPTConfig(num_layers=run.layers, hidden=run.hidden, heads=run.heads, dropout=0.1))
    full = trace_model(model, (torch.zeros(1, 2048, dtype=torch.long, device="meta"),), dtype="bf16", seq_len=2048,
                       copy_model=False)
    assert fast.param_count == full.param_count
    assert fast.train_flops == pytest.approx(full.train_flops, rel=1e-12)
    cluster = ClusterSpec.preset("dgx-a100-80g")
    for rec in ("none", "full"):
        # the fast graph has op-level nodes for a few blocks only, so the intra-op ILP cannot price
        # its tp group: compare both on the Megatron count (tests/intra_op/test_tp_pricing.py compares that to the ILP)
        a = layer_table(fast, cluster, micro_batch=2, tp=2, sequence_parallel=False, recompute=rec, c=CostConstants(),
                        tp_pricing="megatron")
        b = layer_table(full, cluster, micro_batch=2, tp=2, sequence_parallel=False, recompute=rec, c=CostConstants(),
                        tp_pricing="megatron")
        for name in ("fwd_s", "bwd_input_s", "bwd_weight_s", "recompute_s", "tp_comm_s", "stored_act_bytes",
                     "work_act_bytes", "params", "output_bytes"):
            assert np.allclose(getattr(a, name), getattr(b, name), rtol=1e-12), name
        assert a.tied == b.tied


def test_megatron_layout_puts_embedding_first_and_head_last():
    assert calibrate.megatron_boundaries(10, 4) == [(0, 3), (3, 5), (5, 7), (7, 10)]
    with pytest.raises(ValueError, match="chunks"):
        calibrate.megatron_boundaries(9, 4)


def test_cpu_constants_come_from_the_profile():
    from planner.cost.cpu_calibration import CpuProfile, cpu_cluster, cpu_constants

    prof = CpuProfile(peak_flops=5e10, gemm_half_efficiency_dim=12.0, memory_bandwidth=6e9, op_dispatch_s=4e-6,
                      optimizer_s_per_param=3e-9, loss_traffic_passes=9.0, threads=1)
    c = cpu_constants(prof)
    assert (c.gemm_efficiency_max, c.gemm_half_efficiency_dim, c.async_dispatch) == (1.0, 12.0, False)
    assert c.optimizer_step_bytes_per_param == pytest.approx(3e-9 * 6e9)
    assert (c.loss_traffic_passes, c.elementwise_traffic_factor, c.optimizer_temp_bytes_per_param) == (9.0, 1.0, 4.0)
    dev = cpu_cluster(prof).device
    assert dev.peak("fp32") == 5e10 and dev.memory_bandwidth_bytes_per_s == 6e9


def test_the_calibration_page_shows_what_the_cost_model_gives():
    """docs/calibration.md's Table 1, Korthikanti and breakdown tables are what `python -m tools.calibrate
    --markdown --breakdown` prints now: a cost-model change that moves them must rerun the page."""
    from pathlib import Path

    from tools.calibrate import breakdown_table, markdown_table, mfu_table

    page = (Path(__file__).resolve().parents[2] / "docs" / "calibration.md").read_text()
    rows = calibrate.narayanan_rows()
    for name, table in (("Table 1", markdown_table(rows)), ("Korthikanti", mfu_table(calibrate.korthikanti_rows())),
                        ("breakdown", breakdown_table(rows))):
        assert table in page, f"docs/calibration.md's {name} table is stale: rerun python -m tools.calibrate " \
                              "--markdown --breakdown --sensitivity and paste it"
