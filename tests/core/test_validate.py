"""`python -m planner validate`: the metrics on hand-made cases, the translation of real measured rows,
and the command end to end on one small group."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from planner.cli import main
from planner.plan import ParallelConfig
from planner.validation import metrics
from planner.validation.cases import Case, ClusterRef, ModelSpec, load_cases, published_cases, sweep_cases
from planner.validation.price import Priced, interpolate_log, summarise_group, validate_cases

# -- metrics -------------------------------------------------------------------------------------


def test_ranks_average_ties():
    assert metrics.ranks([10.0, 20.0, 20.0, 5.0]) == [2.0, 3.5, 3.5, 1.0]


def test_spearman_with_ties_known_value():
    # ranks x = 1, 2.5, 2.5, 4; y = 1, 3, 2, 4 -> 4.5 / sqrt(4.5 * 5)
    assert metrics.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))


def test_spearman_extremes_and_undefined():
    assert metrics.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert metrics.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(metrics.spearman([1, 2], [2, 1]))
    assert math.isnan(metrics.spearman([1, 2, 3], [5, 5, 5]))


def test_top1_takes_the_fastest_predicted_that_fits():
    # the fastest prediction (30) is predicted not to fit: the pick is 20, measured 80 of the best 100
    assert metrics.top1([10, 30, 20], [100, 50, 80], [True, False, True]) == (pytest.approx(0.8), 2)
    assert metrics.top1([10, 30], [100, 50], [False, False]) == (0.0, None)


def test_healthy_is_a_quarter_of_the_best():
    assert metrics.healthy([100.0, 24.9, 25.0]) == [True, False, True]


def _case(i: int, status: str, measured: float | None) -> Case:
    model = ModelSpec(name="m", family="llama", config=(("heads", 4), ("seq_len", 100)))
    return Case(source="sweep", case_id=f"c{i}", group="m:8", model=model, cluster=ClusterRef(preset="sweep", nodes=1),
                config=ParallelConfig(dp=8, micro_batch_size=1, num_micro_batches=i + 1), status=status,
                measured_tokens_per_s_per_gpu=measured)


def _priced(case: Case, predicted_tokens_per_s_per_gpu: float, fits: bool) -> Priced:
    step = case.tokens_per_step / (predicted_tokens_per_s_per_gpu * case.gpus)
    return Priced(case=case, predicted_step_s=step, fits=fits, peak_memory_gib=1.0, breakdown_s={})


def test_group_summary_on_a_hand_made_group():
    ran = [_priced(_case(0, "ok", 100.0), 200.0, True), _priced(_case(1, "ok", 50.0), 100.0, True),
           _priced(_case(2, "ok", 80.0), 300.0, False), _priced(_case(3, "ok", 10.0), 5.0, True)]
    failed = [_priced(_case(4, "failed", None), 1.0, False), _priced(_case(5, "failed", None), 1.0, True)]
    g = summarise_group("m:8", ran + failed)
    assert (g.configs_ok, g.configs_failed, g.healthy) == (4, 2, 3)  # 10 < 25% of 100
    assert g.top1 == pytest.approx(1.0)  # 300 does not fit; 200 (measured 100) is the pick
    # healthy: predicted 200, 100, 300 against measured 100, 50, 80 -> ranks (2,1,3) vs (3,1,2)
    assert g.spearman == pytest.approx(0.5)
    # step-time ratios = measured/predicted throughput: 0.5, 0.5, 0.2667 -> errors 0.5, 0.5, 0.733
    assert g.error == pytest.approx(0.5)
    assert g.median_ratio == pytest.approx(0.5)
    assert g.fit_ok == pytest.approx(3 / 4)
    assert g.fit_failed == pytest.approx(1 / 2)


def test_interpolate_log():
    assert interpolate_log([(1, 100.0), (4, 25.0)], 2) == pytest.approx(50.0)
    assert interpolate_log([(1, 100.0), (4, 25.0)], 64) == pytest.approx(25.0)  # clamped


# -- translation of real rows ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweep():
    return sweep_cases()


@pytest.fixture(scope="module")
def published():
    return published_cases()


def _by_id(cases, case_id: str) -> Case:
    found = [c for c in cases.cases if c.case_id == case_id]
    assert len(found) == 1, case_id
    return found[0]


def test_sweep_row_translation(sweep):
    c = _by_id(sweep, "playbook:1B/8n/#13")  # 64 GPUs, dp 8 tp 4 pp 2, mbz 8, grad_acc 4, ZeRO-1
    assert c.config == ParallelConfig(dp=8, tp=4, pp=2, micro_batch_size=8, num_micro_batches=4, schedule="1f1b",
                                      recompute="none", sequence_parallel=True, zero_stage=1,
                                      overlap_grad_reduce=True)
    # nanotron's profile: eager launches, fused element-wise kernels (flash-attn's RMSNorm and rotary),
    # its pipeline engine's floor under tp collectives across nodes
    assert c.trainer == "nanotron" and c.settings == ()
    assert c.group == "playbook-1B:64" and c.status == "ok"
    assert c.measured_tokens_per_s_per_gpu == pytest.approx(23202.03)
    assert (c.cluster.preset, c.cluster.nodes, c.cluster.devices_per_node) == ("sweep", 8, 8)
    k = c.model.kwargs
    assert (k["num_layers"], k["hidden"], k["ffn_hidden"], k["vocab_size"], k["seq_len"]) == (16, 2048, 8192, 131072,
                                                                                                4096)
    assert k["tie_embeddings"] and k["fused_attention"] and k["kv_heads"] is None
    assert c.measured_step_s == pytest.approx(256 * 4096 / (23202.03 * 64))


def test_sweep_exclusions(sweep):
    reasons = {s.reason for s in sweep.skipped}
    assert "status unconfirmed (hover text only, drawn as crashed)" in reasons
    assert "global batch differs from dp x mbz x grad_acc" in reasons
    assert not any(c.case_id.startswith("playbook") and c.config.global_batch != 256 for c in sweep.cases)
    # an old_bench config that ran once and hit OOM once counts as ran
    c = [c for c in sweep.cases if c.group == "old_bench-llama-1B:64" and c.config.tp == 8 and c.config.pp == 8
         and c.config.micro_batch_size == 16]
    assert len(c) == 1 and c[0].status == "ok"


def test_published_row_translation(published):
    c = _by_id(published, "megascale-175b-megascale-g256-gb768")
    assert c.config == ParallelConfig(dp=4, tp=8, pp=8, micro_batch_size=1, num_micro_batches=192, virtual_stages=6,
                                      schedule="interleaved-1f1b", recompute="none", sequence_parallel=True,
                                      zero_stage=2)  # Megatron-based: no --overlap-grad-reduce stated
    assert c.trainer == "megatron" and c.settings == (("attention_kernel", ""),)  # MegaScale: FlashAttention-2
    assert "micro-batch not published: 1 assumed" in c.approximations
    assert c.model.family == "gpt" and c.cluster.preset == "dgx-a100-80g" and c.cluster.nodes == 32
    m = _by_id(published, "llmfoundry-h100_80gb-amp_bf16-mpt70b-s2048-g512-mb8-r1")
    assert m.config == ParallelConfig(dp=512, micro_batch_size=8, num_micro_batches=1, recompute="full", zero_stage=3,
                                      overlap_grad_reduce=True)  # torch FSDP
    assert m.trainer == "eager" and dict(m.settings) == {  # fused cross-entropy; FSDP's fp32 shards, bf16 gathers
        "loss_traffic_passes": 1.0, "loss_workspace_copies": 0.0, "weight_bytes": 4, "grad_bytes": 4,
        "bf16_grad_bytes": 4, "optimizer_bytes": 8, "fsdp_param_bytes": 2.0}
    assert m.measured_tokens_per_s_per_gpu == 1007.0 and m.cluster.preset == "dgx-h100"


def test_an_interleaved_schedule_without_its_chunk_count_gets_one_block_per_chunk(published):
    """Llama 3's runs state an interleaved schedule and no V; the paper's layout (embedding and head in
    chunks of their own, 126 blocks on 16 ranks) makes 8 chunks per rank. A stated V is kept."""
    from planner.validation.cases import _virtual_stages
    llama3 = _by_id(published, "llama3-405b-pretrain-g8192-cp1")
    assert (llama3.config.schedule, llama3.config.virtual_stages, llama3.config.pp) == ("interleaved-1f1b", 8, 16)
    assert any("without its chunk count: 8 chunks" in a for a in llama3.approximations)
    notes: list[str] = []
    assert _virtual_stages({"vpp": 6, "pipeline_schedule": "interleaved"}, 96, 8, notes) == 6
    assert _virtual_stages({"pipeline_schedule": "1F1B"}, 96, 8, notes) == 1
    assert _virtual_stages({"pipeline_schedule": "interleaved"}, 96, 1, notes) == 1 and not notes


def test_fraction_of_checkpointed_blocks_comes_from_the_runs_own_hfu_over_mfu(published):
    from planner.validation.cases import _checkpointed_every
    assert _checkpointed_every({"hfu": 0.74, "mfu": 0.55}) == 1  # (3 + f) / 3 = 1.345: every block
    assert _checkpointed_every({"hfu": 0.69, "mfu": 0.61}) == 3  # f = 0.39
    assert _checkpointed_every({"hfu": 0.57, "mfu": 0.57}) is None  # no recomputation
    assert _checkpointed_every({"mfu": 0.5}) is None
    fms = _by_id(published, "fms-fsdp-compile-llama2-13b-a100-g128")
    assert (fms.config.recompute, fms.config.recompute_every) == ("full", 3)
    assert any("one block in 3, from the published HFU/MFU" in a for a in fms.approximations)


def test_published_skip_reasons(published):
    why = {s.case_id: s.reason for s in published.skipped}
    assert why["nemo2407-gpt3-175b-g128-fp8"] == "model dimensions not given"
    # Context parallelism, FP8, HSDP and FSDP without reshard after forward are priced since plan schema 2.1.
    cp = _by_id(published, "torchtitan-2412-t2-llama31-8b-g8-fsdp4-cp2-s65536").config
    assert (cp.cp, cp.dp, cp.fp8, cp.zero_stage, cp.global_batch) == (2, 4, True, 3, 4)
    assert _by_id(published, "mbridge-25.11-dgx-h100-llama3-8b-g8-fsdp8").config.fp8
    hsdp = [c.config for c in published.cases if c.config.dp_shard]
    assert hsdp and all(c.dp_shard == 8 and c.zero_stage == 3 for c in hsdp)
    llama3 = _by_id(published, "llama3-405b-pretrain-g16384-cp16").config
    assert (llama3.cp, llama3.dp, llama3.reshard_after_forward) == (16, 8, False)


# -- models ---------------------------------------------------------------------------------------


def test_llama_tied_embeddings_share_one_matrix():
    from planner.models.llama import Llama, LlamaConfig

    for tie in (False, True):
        cfg = LlamaConfig(num_layers=2, hidden=64, heads=4, ffn_hidden=128, vocab_size=1000, seq_len=16,
                          tie_embeddings=tie)
        with torch.device("meta"):
            model = Llama(cfg)
        assert sum(p.numel() for p in model.parameters()) == cfg.param_count()
        assert cfg.param_count() == (1 if tie else 2) * 1000 * 64 + 2 * (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64


# -- the command ----------------------------------------------------------------------------------


def test_validate_one_group_end_to_end(capsys):
    code = main(["validate", "--source", "sweep", "--group", "old_bench-llama-1B:8", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    (g,) = out["sweep"]["groups"]
    assert (g["group"], g["configs_ok"], g["configs_failed"], g["healthy"]) == ("old_bench-llama-1B:8", 9, 6, 9)
    assert 0.0 <= g["top1"] <= 1.0 and -1.0 <= g["spearman"] <= 1.0
    assert len(out["sweep"]["runs"]) == 15
    best = max(r["measured_tokens_per_s_per_gpu"] or 0 for r in out["sweep"]["runs"])
    assert best == 33200  # dp 4 tp 2 mbz 8, the group's fastest measured


def test_validate_text_names_targets_and_unknown_group_is_a_clear_error(capsys):
    assert main(["validate", "--source", "sweep", "--group", "old_bench-llama-1B:16"]) == 0
    out = capsys.readouterr().out
    assert "old_bench-llama-1B:16" in out and "top-1, median over groups" in out
    assert main(["validate", "--source", "sweep", "--group", "nope:8"]) == 2
    assert "--group" in capsys.readouterr().err


def test_busbw_network_matches_the_measured_all_reduce_at_each_node_count():
    from planner.validation.price import CasePricer

    pricer = CasePricer(network="busbw")
    spec, notes = pricer.cluster(ClusterRef(preset="sweep", nodes=64))
    assert spec.num_devices == 512
    assert spec.inter_node.bandwidth_bytes_per_s * pricer.c.network_efficiency == pytest.approx(32.94e9)
    spec, _ = pricer.cluster(ClusterRef(preset="sweep", nodes=2))
    assert spec.inter_node.bandwidth_bytes_per_s * pricer.c.network_efficiency == pytest.approx(361.75e9)
    assert "64 nodes" in notes[0]


def test_constants_file_with_an_unknown_field_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "c.json"
    bad.write_text('{"no_such_constant": 1}')
    assert main(["validate", "--source", "sweep", "--constants", str(bad)]) == 2
    assert "no_such_constant" in capsys.readouterr().err


def test_validation_overrides_reach_the_priced_cluster():
    """tools/fit_cluster prices cases with a device figure or a sweep link replaced: the replaced
    value must change what is priced, and only for the device named."""

    cases = [c for c in load_cases("sweep").cases if c.group == "playbook-1B:8" and c.status == "ok"][:3]
    base = validate_cases(cases).priced
    slow = validate_cases(cases, device_overrides={"H100-SXM5-80GB": {"gemm_efficiency": 0.35}}).priced
    other = validate_cases(cases, device_overrides={"no-such-device": {"gemm_efficiency": 0.35}}).priced
    assert all(s.predicted_step_s > 1.3 * b.predicted_step_s for s, b in zip(slow, base))  # GEMMs at half speed
    assert [o.predicted_step_s for o in other] == [b.predicted_step_s for b in base]
    tp = [c for c in load_cases("sweep").cases if c.group == "playbook-1B:8" and c.config.tp > 1][:2]
    lat = validate_cases(tp, sweep_overrides={"intra_node.latency_s": 1e-3}).priced
    assert all(a.predicted_step_s > b.predicted_step_s for a, b in zip(lat, validate_cases(tp).priced))


def test_a_run_priced_with_the_attention_kernel_its_source_names(published):
    """llm-foundry's tables ran its Triton FlashAttention: their H100 runs are priced at that kernel's
    sustained fraction of the peak, the other H100 runs at the preset's FlashAttention-2-class figure;
    a fit of the device's figure moves only the latter, a fit of the kernel's only the former."""
    from planner.validation.cases import ATTENTION_KERNELS
    from planner.validation.price import CasePricer

    lf = _by_id(published, "llmfoundry-h100_80gb-amp_bf16-mpt760m-s32768-g8-mb1-r62")
    assert lf.cluster.attention_kernel == "triton-2022"
    assert any("Triton FlashAttention" in a for a in lf.approximations)
    fms = _by_id(published, "fms-fsdp-eager-llama2-7b-h100-g96")
    assert fms.cluster.attention_kernel == "" and fms.cluster.preset == lf.cluster.preset == "dgx-h100"
    pricer = CasePricer()
    triton = pricer.cluster(lf.cluster)[0].device.fused_attention_efficiency
    flash2 = pricer.cluster(fms.cluster)[0].device.fused_attention_efficiency
    assert triton == ATTENTION_KERNELS["triton-2022"]["H100-SXM5-80GB"] < flash2
    # the long-sequence run is attention-bound: the slower kernel makes it markedly slower
    assert pricer.price(lf).predicted_step_s > 1.2 * CasePricer(
        kernel_overrides={"triton-2022": {"H100-SXM5-80GB": flash2}}).price(lf).predicted_step_s
    device_fit = CasePricer(device_overrides={"H100-SXM5-80GB": {"fused_attention_efficiency": 0.5}})
    assert device_fit.cluster(fms.cluster)[0].device.fused_attention_efficiency == 0.5
    assert device_fit.cluster(lf.cluster)[0].device.fused_attention_efficiency == triton
    kernel_fit = CasePricer(kernel_overrides={"triton-2022": {"H100-SXM5-80GB": 0.1}})
    assert kernel_fit.cluster(lf.cluster)[0].device.fused_attention_efficiency == 0.1
    assert kernel_fit.cluster(fms.cluster)[0].device.fused_attention_efficiency == flash2


def test_fit_tool_fits_two_figures_jointly_on_every_pair(capsys):
    """tools/fit_cluster with --param twice tries every pair of the two grids and reports the best pair."""
    from tools.fit_cluster import main as fit

    assert fit(["--param", "device.gemm_efficiency", "--param", "device.fused_attention_efficiency",
                "--grid", "0.5:0.6:0.1", "--grid", "0.2:0.3:0.1", "--fit-published", "fms-fsdp-eager-llama2-7b-h100"]) == 0
    out = capsys.readouterr().out
    pairs = [line for line in out.splitlines() if line.startswith("| 0.")]
    assert len(pairs) == 4 and sum("(best)" in p for p in pairs) == 1
    assert "check, published H100-SXM5-80GB runs (not fitted), fitted 0." in out
    with pytest.raises(SystemExit):
        fit(["--param", "device.gemm_efficiency", "--grid", "0.5:0.6:0.1", "--grid", "0.2:0.3:0.1"])


def test_fit_tool_reaches_cost_constants():
    """``--param constants.X`` prices with that CostConstants field over the run's trainer profile."""
    from tools.fit_cluster import _price

    case = next(c for c in load_cases("sweep").cases
                if c.group == "playbook-3B:32" and c.status == "ok" and c.config.pp == 2 and c.config.tp == 4
                and c.config.micro_batch_size == 1)
    slow, fast = (_price([case], {"constants.pipelined_tp_collective_s": v}, "H100-SXM5-80GB")[0].predicted_step_s
                  for v in (1e-2, 1e-9))
    assert slow > 2 * fast


def test_pipeline_slots_tool_shows_the_floor_across_nodes(capsys):
    """tools/pipeline_slots: the evidence table of docs/cost-model.md (a stage's small micro-batches take
    longer per layer once the pipeline crosses nodes, and longer at larger tp)."""
    from tools.pipeline_slots import _rows
    from tools.pipeline_slots import main as slots

    rows = _rows()
    across = {tp: statistics.median(rows[("playbook-3B", tp, False)]["small"]) for tp in (2, 4, 8)}
    one_node = statistics.median(rows[("playbook-3B", 4, True)]["small"])
    assert across[2] < across[4] < across[8] and one_node < across[4] / 2
    assert slots([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| model | tp | pipeline |") and "| playbook-1B | 8 | across nodes |" in out


def test_an_override_equal_to_the_default_still_wins_over_the_trainer(tmp_path):
    """``validate --constants`` with a field at its default (0 switches nanotron's pipeline floor off) is
    applied over the trainer's profile, not dropped for equalling the default."""
    from planner.cost.constants import constant_fields_from_file

    case = next(c for c in load_cases("sweep").cases
                if c.group == "playbook-3B:32" and c.status == "ok" and c.config.pp == 2 and c.config.tp == 4
                and c.config.micro_batch_size == 1)
    path = tmp_path / "off.json"
    path.write_text(json.dumps({"pipelined_tp_collective_s": 0, "pipelined_tp_hop_s": 0}))
    off = constant_fields_from_file(str(path))
    assert off == {"pipelined_tp_collective_s": 0.0, "pipelined_tp_hop_s": 0.0}
    floored, plain = (validate_cases([case], overrides=o).priced[0].predicted_step_s for o in (None, off))
    assert floored > 2 * plain


def test_transformer_engine_runs_on_hopper_are_priced_with_its_cudnn_attention(published):
    """Megatron-Core, NeMo and Megatron-Bridge run Transformer Engine, which takes cuDNN's fused attention
    on Hopper: their H100 runs are priced as the megatron trainer with the dgx-h100 preset's cudnn figure
    (the FlashAttention-2 class times the FA3 paper's cuDNN/FA2 ratio), faster than the preset's; the
    Megatron-style stacks outside TE keep the FlashAttention-2 class."""
    from planner.validation.price import CasePricer

    weak = _by_id(published, "megatron-h100-weak-70B-g768")
    assert weak.trainer == "megatron" and weak.cluster.preset == "dgx-h100"
    assert any("cuDNN fused attention" in a for a in weak.approximations)
    pricer = CasePricer()
    assert pricer.constants(weak.trainer, weak.settings).attention_kernel == "cudnn"
    for other in ("llama3-405b-pretrain-g8192-cp1", "megascale-175b-megascale-g256-gb768"):
        case = _by_id(published, other)
        assert pricer.constants(case.trainer, case.settings).attention_kernel == ""
    device = pricer.cluster(weak.cluster)[0].device
    assert device.attention_efficiency("cudnn") == pytest.approx(1.6 * device.fused_attention_efficiency, abs=0.01)
    flash2 = CasePricer(overrides={"attention_kernel": ""}).price(weak).predicted_step_s
    assert pricer.price(weak).predicted_step_s < flash2


def test_nemo_recipes_overlap_their_collectives_unless_the_run_says_otherwise(published):
    """NeMo's and Megatron-Bridge's recipes overlap the gradient reduction, the parameter gather and the
    tensor-parallel collectives: a Nemotron run that does not restate it is priced with all three, and says
    so; Megatron-LM runs keep Megatron-LM's defaults (off) unless their notes name the flags."""
    nemotron = _by_id(published, "nemotron4-15b-g768")
    assert nemotron.config.overlap_grad_reduce
    settings = dict(nemotron.settings)
    assert settings["tp_comm_overlap"] == 1.0 and settings["overlap_param_gather"] is True
    assert any("communication overlap not stated" in a for a in nemotron.approximations)
    megascale = _by_id(published, "megascale-175b-megascale-g256-gb768")
    assert "tp_comm_overlap" not in dict(megascale.settings)
    # a NeMo run that states its flags is priced with what it states
    from planner.validation.cases import _overlaps_grad_reduce, published_settings

    stated = {"id": "nemotron4-15b-g768-own", "config": {"comm_overlap": "--overlap-grad-reduce"}}
    assert _overlaps_grad_reduce(stated) and published_settings(stated) == ()


def test_nanotron_without_async_tp_keeps_its_gathered_inputs(sweep):
    """old_bench ran nanotron's sequence parallelism without async communication: its column linears
    keep the gathered input whole. With that setting the priced peak memory of its tp > 1 runs
    follows the measured peak allocated memory; without it the prediction falls short as tp grows."""
    from dataclasses import replace

    from planner.validation.cases import _load, sweep_settings
    from planner.validation.price import CasePricer

    text = json.dumps(_load(None, "h100_sweep.json")["training_settings"]).lower()
    assert sweep_settings('{"tp_mode": "reduce_scatter", "tp_linear_async_communication false"}', "nanotron") == (
        ("sp_saves_gathered_inputs", True),)
    assert sweep_settings("reduce_scatter, tp_linear_async_communication=true", "nanotron") == ()
    assert sweep_settings("reduce_scatter, tp_linear_async_communication false, tp_recompute_allgather=true",
                          "nanotron") == ()
    assert sweep_settings(text, "megatron") == ()
    runs = {r["src"]: r for r in _load(None, "h100_sweep.json")["runs"]}
    cases = [c for c in sweep.cases if c.group.startswith("old_bench") and c.status == "ok" and c.config.tp > 1
             and runs[c.case_id]["peak_allocated_mib"]]
    assert len(cases) >= 10 and all(c.settings == (("sp_saves_gathered_inputs", True),) for c in cases)
    pricer = CasePricer()

    def ratios(cs):
        return [runs[c.case_id]["peak_allocated_mib"] / 1024 / pricer.price(c).peak_memory_gib for c in cs]

    with_setting = statistics.median(ratios(cases))
    without = statistics.median(ratios([replace(c, settings=()) for c in cases]))
    assert 0.9 <= with_setting <= 1.1, with_setting
    assert without > 1.15, without
