"""`python -m planner validate --sweep FILE --published FILE`: measured data that is not the shared data
(another cluster, another framework, a user's own runs) is read from the file itself, and a malformed
file or row is a reason, never a traceback."""

from __future__ import annotations

import json

import pytest

from planner.cli import main
from planner.cluster import ClusterSpec
from planner.paths import datasets_dir
from planner.validation.cases import published_cases, sweep_cases, sweep_cluster_dict

SHARED = datasets_dir() / "measured"


def _a100_sweep(tmp_path, **extra):
    """Twelve rows of the shared sweep's 1B model moved to an A100 InfiniBand cluster run by Megatron-LM
    with full recomputation, and whatever ``extra`` adds."""
    d = json.loads((SHARED / "h100_sweep.json").read_text())
    rows = [r for r in d["runs"] if r["model"] == "playbook-1B" and r["gpus"] == 8 and r["status"] == "ok"][:12]
    for r in rows:
        r.update(sweep="a100", sequence_parallel=False)
        r.pop("tp_mode", None)
    d.update(source={"summary": "a Megatron-LM sweep"}, training_settings={"a100": {"recompute": "full"}},
             cluster={"gpu": "NVIDIA A100-SXM4-80GB", "gpus_per_node": 8, "inter_node": "InfiniBand HDR"},
             runs=rows + extra.pop("rows", []), **extra)
    path = tmp_path / "a100_sweep.json"
    path.write_text(json.dumps(d))
    return path


def test_the_shared_sweeps_cluster_is_derived_from_its_own_cluster_block():
    derived = sweep_cluster_dict()
    stored = json.loads((SHARED / "nanotron-h100-efa.json").read_text())
    for key in ("device", "devices_per_node", "intra_node", "inter_node", "collectives"):
        assert derived[key] == stored[key], key
    assert derived["inter_node"]["kind"] == "ethernet"  # EFA
    assert derived["collectives"]["all_gather"][-1] == {"nodes": 64, "message_bytes": 2**28,
                                                        "bus_bandwidth_bytes_per_s": 11_040_000_000}


def test_a_user_sweep_is_priced_on_its_own_cluster_and_trainer(tmp_path):
    path = _a100_sweep(tmp_path)
    d = sweep_cluster_dict(path)
    a100 = ClusterSpec.preset("dgx-a100-80g")
    assert d["device"]["name"] == a100.device.name and d["inter_node"]["kind"] == "infiniband"
    assert "collectives" not in d  # none measured: the preset's alpha-beta links
    cases = sweep_cases(path).cases
    assert len(cases) == 12
    assert {c.trainer for c in cases} == {"megatron"}
    assert {c.config.recompute for c in cases} == {"full"}
    assert not any(c.config.sequence_parallel for c in cases)
    assert {c.cluster.source_file for c in cases} == {str(path)}


def test_validate_reads_a_user_sweep_file_end_to_end(tmp_path, capsys):
    path = _a100_sweep(tmp_path)
    assert main(["validate", "--source", "sweep", "--sweep", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    (group,) = out["sweep"]["groups"]
    assert group["group"] == "playbook-1B:8" and group["configs_ok"] == 12
    assert "recompute=full" in group["top1_pick"]  # the file's training settings reached the configurations
    assert main(["validate", "--source", "sweep", "--sweep", str(path)]) == 0
    assert f"Sweep ({path})" in capsys.readouterr().out


@pytest.mark.parametrize("row, reason", [
    ({"model": "playbook-1B", "gpus": 8}, "malformed: no dp, tp, pp, mbz, grad_acc, status"),
    ({"model": "playbook-1B", "gpus": 8, "dp": 8, "tp": 1, "pp": 1, "mbz": 0, "grad_acc": 1, "status": "ok"},
     "malformed: gpus, dp, tp, pp, mbz and grad_acc are positive integers"),
    ({"model": "playbook-1B", "gpus": 8, "dp": 4, "tp": 1, "pp": 1, "mbz": 1, "grad_acc": 64, "status": "ok",
      "nodes": 1}, "malformed: gpus is not dp x tp x pp on whole nodes"),
    ({"model": "playbook-1B", "gpus": 8, "dp": 8, "tp": 1, "pp": 1, "mbz": 1, "grad_acc": 32, "status": "ok",
      "pp_engine": "zigzag", "tokens_per_sec_per_gpu": 1.0}, "pipeline engine 'zigzag' not priced"),
    ("a string", "malformed: a run is an object"),
])
def test_a_malformed_sweep_row_is_skipped_with_its_reason(tmp_path, row, reason):
    cases = sweep_cases(_a100_sweep(tmp_path, rows=[row]))
    assert len(cases.cases) == 12
    assert any(s.reason.startswith(reason) for s in cases.skipped), [s.reason for s in cases.skipped]


def test_a_sweep_model_missing_a_dimension_skips_its_rows(tmp_path):
    path = _a100_sweep(tmp_path)
    d = json.loads(path.read_text())
    del d["models"]["playbook-1B"]["ffn"]
    path.write_text(json.dumps(d))
    cases = sweep_cases(path)
    assert cases.cases == [] and {s.reason for s in cases.skipped} == {"malformed: model playbook-1B has no 'ffn'"}


def test_a_sweep_on_a_gpu_without_a_preset_is_a_clear_error(tmp_path, capsys):
    path = _a100_sweep(tmp_path)
    d = json.loads(path.read_text())
    d["cluster"]["gpu"] = "Imaginary X1"
    path.write_text(json.dumps(d))
    assert main(["validate", "--source", "sweep", "--sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert "cluster.gpu" in err and "Imaginary X1" in err and "dgx-h100" in err


def test_malformed_published_runs_are_skipped_not_raised(tmp_path):
    path = tmp_path / "runs.json"
    shared = json.loads((SHARED / "published_runs.json").read_text())["runs"]
    good = next(r for r in shared if r["id"].startswith("torchtitan-2408-llama38b"))
    broken = json.loads(json.dumps(good))
    broken["id"] = "broken"
    broken["model"]["layers"] = [32]
    path.write_text(json.dumps({"runs": [good, 7, {"id": "half", "model": {}}, broken]}))
    out = published_cases(path)
    assert [c.case_id for c in out.cases] == [good["id"]]
    reasons = {s.case_id: s.reason for s in out.skipped}
    assert reasons["runs[1]"].startswith("malformed") and reasons["half"].startswith("malformed")
    assert "broken" in reasons


@pytest.mark.parametrize("content, needle", [
    ('{"runs": 3}', 'expected a JSON object with a "runs" list'),
    ('{"runs": [], }', "not valid JSON"),
    ('{"runs": [], "runs": []}', "written twice"),
])
def test_a_bad_published_file_is_a_clear_error(tmp_path, capsys, content, needle):
    path = tmp_path / "runs.json"
    path.write_text(content)
    assert main(["validate", "--source", "published", "--published", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and needle in err


def test_bands_come_only_from_the_shared_data(tmp_path, capsys):
    assert main(["validate", "--write-bands", "--sweep", str(_a100_sweep(tmp_path))]) == 2
    assert "--sweep" in capsys.readouterr().err


@pytest.mark.parametrize("said, recompute, every", [
    (True, "full", 1),  # a JSON true, not the text "none"
    ("yes", "full", 1),
    ("full, recompute_num_layers=8", "full", 4),  # 8 of the 32 blocks
    ("block: 16 of 32 layers", "full", 2),
    (False, "none", 1),
    (None, "none", 1),
])
def test_activation_checkpointing_as_other_publishers_write_it(tmp_path, said, recompute, every):
    shared = json.loads((SHARED / "published_runs.json").read_text())["runs"]
    run = next(r for r in shared if r["id"].startswith("torchtitan-2408-llama38b"))  # 32 blocks
    run["config"]["activation_checkpointing"] = said
    path = tmp_path / "runs.json"
    path.write_text(json.dumps({"runs": [run]}))
    (case,) = published_cases(path).cases
    assert (case.config.recompute, case.config.recompute_every) == (recompute, every)


def test_activation_offload_is_named_not_priced_as_resident(tmp_path):
    shared = json.loads((SHARED / "published_runs.json").read_text())["runs"]
    run = next(r for r in shared if r["id"].startswith("torchtitan-2408-llama38b"))
    run["config"]["activation_cpu_offload"] = True
    path = tmp_path / "runs.json"
    path.write_text(json.dumps({"runs": [run]}))
    out = published_cases(path)
    assert out.cases == [] and out.skipped[0].reason == "activation CPU offload not modelled"


def _moe_run(**model):
    shared = json.loads((SHARED / "published_runs.json").read_text())["runs"]
    run = next(r for r in shared if r["id"].startswith("torchtitan-2408-llama38b"))
    run["id"] = "mixtral-test"
    run["model"].update(name="Mixtral 8x7B", layers=32, hidden=4096, heads=32, kv_heads=8, ffn=14336, vocab=32000,
                        seq_len=4096, **model)
    run["config"]["ep"] = 8
    return run


def test_a_mixture_of_experts_run_is_priced_with_its_experts(tmp_path):
    path = tmp_path / "runs.json"
    path.write_text(json.dumps({"runs": [_moe_run(num_experts=8, num_experts_per_tok=2),
                                         dict(_moe_run(), id="no-count")]}))
    out = published_cases(path)
    (case,) = out.cases
    assert case.model.family == "llama" and case.config.ep == 8
    assert {k: case.model.kwargs[k] for k in ("num_experts", "top_k")} == {"num_experts": 8, "top_k": 2}
    assert [s.reason for s in out.skipped] == ["mixture of experts: expert count not given"]
    from planner.validation.price import validate_cases

    (priced,) = validate_cases(out.cases).priced
    # 46.7B parameters of which 12.9B are active: slower per token than the dense 8B run it was made from
    assert 0 < priced.predicted_tokens_per_s_per_gpu < case.measured_tokens_per_s_per_gpu


def test_dense_first_blocks_of_a_mixture_of_experts_are_traced_with_an_expert_block():
    from planner.validation.cases import ModelSpec
    from planner.validation.price import build_graph

    cfg = {"num_layers": 6, "hidden": 256, "heads": 4, "kv_heads": None, "ffn_hidden": 512, "vocab_size": 1000,
           "seq_len": 64, "fused_attention": True, "num_experts": 4, "top_k": 2, "first_dense_layers": 3,
           "capacity_factor": 1.0}
    graph = build_graph(ModelSpec(name="moe-test", family="llama", config=tuple(sorted(cfg.items()))))
    blocks = graph.layers[1:-1]
    assert len(blocks) == 6
    assert [bool(b.experts) for b in blocks] == [False, False, False, True, True, True]


def test_a_data_file_the_source_leaves_out_is_a_clear_error(capsys):
    assert main(["validate", "--source", "sweep", "--published", "runs.json"]) == 2
    assert "--source sweep leaves the published data out" in capsys.readouterr().err


def test_a_file_with_nothing_to_price_says_why(tmp_path, capsys):
    path = _a100_sweep(tmp_path)
    d = json.loads(path.read_text())
    d["runs"] = [{"model": "playbook-1B", "gpus": 8}]
    path.write_text(json.dumps(d))
    assert main(["validate", "--source", "sweep", "--sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert "no runs in" in err and "1 x malformed: no dp, tp, pp, mbz, grad_acc, status" in err
