"""Findings of a bad-input sweep of ``python -m planner``, each pinned so it stays fixed.

1. a cluster file reports every bad field at once (as docs/cluster.md shows), not only the first;
2. an integer ``schema_version`` in a plan file is named as such, not as an unreadable version 2 of 2.x;
3. ``--devices-per-node`` on a mixed cluster names ``devices_per_node`` and says to drop the flag;
4. a key written twice in a user's JSON file is refused, naming the key and the file;
5. a Hugging Face ``config.json`` without the model's width, depth or heads is refused, not defaulted.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from planner.cli import main
from planner.cluster import ClusterSpec
from planner.errors import SpecError, SpecErrors, loads_unique
from planner.plan import SCHEMA_VERSION, Plan

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _cluster(tmp_path: Path, mutate, preset: str = "dgx-a100-80g") -> Path:
    d = ClusterSpec.preset(preset).to_dict()
    mutate(d)
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(d))
    return path


def _errors(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]


# -- 1. a cluster file: every bad field at once ------------------------------------------------------

def _three_structural(d: dict) -> None:
    d["inter_node"]["bandwidth_bytes_per_s"] = -1
    d["devices_per_node"] = 0
    d["device"]["peak_flops"]["bf16"] = "312e12"


def test_cluster_file_reports_every_bad_field(tmp_path, capsys):
    path = _cluster(tmp_path, _three_structural)
    with pytest.raises(SpecErrors) as info:
        ClusterSpec.from_json(path)
    assert set(info.value.fields) == {"inter_node.bandwidth_bytes_per_s", "devices_per_node",
                                      "device.peak_flops.bf16"}
    assert main(["plan", "--model", "gpt-tiny", "--cluster", str(path), "--global-batch", "8"]) == 2
    lines = _errors(capsys)
    assert len(lines) == 3 and all(str(path) in line for line in lines)


def test_cluster_doc_example_is_what_the_cli_prints(tmp_path, capsys):
    """docs/cluster.md's three unit slips come out together, word for word."""
    doc = (DOCS / "cluster.md").read_text()
    block = doc.split("For example (`python -m planner plan --model gpt-tiny --cluster FILE --global-batch 8`, "
                      "exit 2):")[1].split("```")[1]
    expected = [line for line in block.splitlines() if line.startswith("error: ")]
    assert len(expected) == 3

    def slips(d: dict) -> None:
        d["device"]["peak_flops"]["bf16"] = 312
        d["device"]["memory_bytes"] = 40
        d["inter_node"]["latency_s"] = 30

    path = _cluster(tmp_path, slips)
    assert main(["plan", "--model", "gpt-tiny", "--cluster", str(path), "--global-batch", "8"]) == 2
    assert [line.replace(str(path), "FILE") for line in _errors(capsys)] == expected


def test_every_bad_attention_kernel_entry_is_reported(tmp_path):
    path = _cluster(tmp_path, lambda d: d["device"].update(attention_kernels={"cudnn": 2, "fa3": -1, "ok": 0.5}),
                    preset="dgx-h100")
    with pytest.raises(SpecErrors) as info:
        ClusterSpec.from_json(path)
    assert [e.field for e in info.value.errors] == ["device.attention_kernels.cudnn", "device.attention_kernels.fa3"]


def test_mixed_cluster_file_reports_bad_fields_of_every_group(tmp_path):
    def both(d: dict) -> None:
        d["groups"][0]["nodes"] = 0
        d["groups"][1]["intra_node"]["kind"] = "smoke-signals"
        d["name"] = ""

    with pytest.raises(SpecErrors) as info:
        ClusterSpec.from_json(_cluster(tmp_path, both, "mixed-a100-v100"))
    assert set(info.value.fields) == {"name", "groups[0].nodes", "groups[1].intra_node.kind"}


def test_misspelt_field_is_reported_once_beside_other_bad_fields(tmp_path):
    """The misspelling's error names the field; it is not also reported as missing."""
    def typo(d: dict) -> None:
        d["devices_per_nodes"] = d.pop("devices_per_node")
        d["intra_node"].pop("latency_s")

    with pytest.raises(SpecErrors) as info:
        ClusterSpec.from_json(_cluster(tmp_path, typo))
    assert info.value.fields == ("devices_per_nodes", "intra_node.latency_s")
    assert "did you mean 'devices_per_node'" in str(info.value)


def test_a_single_bad_field_is_still_one_spec_error(tmp_path):
    with pytest.raises(SpecError) as info:
        ClusterSpec.from_json(_cluster(tmp_path, lambda d: d.update(nodes=0)))
    assert not isinstance(info.value, SpecErrors) and info.value.field == "nodes"


# -- 2. an integer schema_version ------------------------------------------------------------------

@pytest.fixture(scope="module")
def plan_dict(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    assert main(["plan", "--model", "gpt-tiny", "--cluster", "cpu-local", "--devices-per-node", "2",
                 "--global-batch", "8", "--tp", "1", "--pp", "2", "--dp", "1", "--json", "--no-progress",
                 "-o", str(path)]) == 0
    return json.loads(path.read_text())


@pytest.mark.parametrize("version, found", [(3, "the number 3"), (2, "the number 2"), (2.1, "the number 2.1")])
def test_number_schema_version_says_it_must_be_a_string(tmp_path, capsys, plan_dict, version, found):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({**plan_dict, "schema_version": version}))
    with pytest.raises(SpecError) as info:
        Plan.from_json(path)
    assert info.value.field == "schema_version"
    assert f'must be a string like "{SCHEMA_VERSION}"' in str(info.value) and f"not {found};" in str(info.value)
    assert "is not readable" not in str(info.value)
    capsys.readouterr()
    assert main(["explain", str(path)]) == 2
    assert _errors(capsys) == [f"error: {info.value}"]


# -- 3. --devices-per-node on a mixed cluster ------------------------------------------------------

def test_devices_per_node_on_a_mixed_cluster_names_that_field(capsys):
    with pytest.raises(SpecError) as info:
        ClusterSpec.preset("mixed-a100-v100", devices_per_node=4)
    assert info.value.field == "devices_per_node" and "drop --devices-per-node" in str(info.value)
    assert "`devices_per_node` of its 2 node groups" in str(info.value)
    assert main(["plan", "--model", "gpt-tiny", "--cluster", "mixed-a100-v100", "--devices-per-node", "4",
                 "--global-batch", "8"]) == 2
    (line,) = _errors(capsys)
    assert line.startswith("error: devices_per_node: got 4;")
    assert "nodes:" not in line.split(";")[0]


def test_nodes_and_devices_per_node_on_a_mixed_cluster_are_two_errors():
    with pytest.raises(SpecErrors) as info:
        ClusterSpec.preset("mixed-a100-v100", nodes=2, devices_per_node=4)
    assert info.value.fields == ("nodes", "devices_per_node")
    assert "drop --nodes" in str(info.value)


# -- 4. a key written twice -----------------------------------------------------------------------

def test_loads_unique_names_every_key_written_twice_with_its_path():
    with pytest.raises(SpecErrors) as info:
        loads_unique('{"a": 1, "g": [{"d": {"x": 1, "x": 2}}], "b": {"l": 1, "l": 2, "l": 3}}', source="f.json")
    assert set(info.value.fields) == {"g[0].d.x", "b.l"}
    assert "written 3 times" in str(info.value) and "in f.json" in str(info.value)
    assert loads_unique('{"a": {"x": 1}, "b": {"x": 2}}') == {"a": {"x": 1}, "b": {"x": 2}}


_DUP_CLUSTER = """{"name": "dup", "device": {"name": "A100", "peak_flops": {"bf16": 312e12},
  "memory_bytes": 85899345920, "memory_bandwidth_bytes_per_s": 2.039e12}, "nodes": 1,
  "devices_per_node": 8, "devices_per_node": 4,
  "intra_node": {"kind": "nvswitch", "bandwidth_bytes_per_s": 300e9, "latency_s": 3e-6},
  "inter_node": {"kind": "infiniband", "bandwidth_bytes_per_s": 100e9, "latency_s": 5e-6}}"""


def test_duplicate_key_in_a_cluster_file(tmp_path, capsys):
    path = tmp_path / "cluster.json"
    path.write_text(_DUP_CLUSTER)
    with pytest.raises(SpecError) as info:
        ClusterSpec.from_json(path)
    assert info.value.field == "devices_per_node" and info.value.value == [8, 4]
    assert main(["plan", "--model", "gpt-tiny", "--cluster", str(path), "--global-batch", "8"]) == 2
    (line,) = _errors(capsys)
    assert line.startswith(f"error: devices_per_node in {path}: got [8, 4]; the key is written twice")


def test_duplicate_key_in_a_plan_file(tmp_path, plan_dict):
    rest = {k: v for k, v in plan_dict.items() if k != "parallel"}
    path = tmp_path / "plan.json"  # the plan with "tp": 2 added before its "tp": 1
    path.write_text('{"parallel": {"tp": 2, ' + json.dumps(plan_dict["parallel"])[1:] + ", " + json.dumps(rest)[1:])
    with pytest.raises(SpecError) as info:
        Plan.from_json(path)
    assert info.value.field == "parallel.tp" and str(path) in str(info.value)


def test_duplicate_key_in_a_constants_file(tmp_path, capsys):
    path = tmp_path / "constants.json"
    path.write_text('{"gemm_efficiency_max": 0.5, "gemm_efficiency_max": 0.9}')
    assert main(["plan", "--model", "gpt-tiny", "--cluster", "cpu-local", "--global-batch", "8",
                 "--constants", str(path)]) == 2
    (line,) = _errors(capsys)
    assert line.startswith(f"error: gemm_efficiency_max in {path}: got [0.5, 0.9]; the key is written twice")


def test_duplicate_key_in_a_model_preset(tmp_path, monkeypatch):
    from planner.models import load_preset

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mine.json").write_text('{"family": "gpt", "family": "bert", "config": {}}')
    monkeypatch.setenv("PLANNER_DATASETS", str(tmp_path))
    with pytest.raises(SpecError) as info:
        load_preset("mine")
    assert info.value.field == "family" and info.value.value == ["gpt", "bert"]


# -- 4 and 5. Hugging Face config.json -------------------------------------------------------------

LLAMA = {"model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64}


def _hf(tmp_path: Path, text: str) -> Path:
    pytest.importorskip("transformers")
    path = tmp_path / "config.json"
    path.write_text(text)
    return path


def test_duplicate_key_in_a_hf_config(tmp_path):
    from planner.models import hf_config

    text = json.dumps(LLAMA).replace('"num_hidden_layers": 2', '"num_hidden_layers": 2, "num_hidden_layers": 4')
    with pytest.raises(SpecError) as info:
        hf_config.load_config(_hf(tmp_path, text))
    assert info.value.field == "num_hidden_layers" and "written twice" in str(info.value)


@pytest.mark.parametrize("drop", ["hidden_size", "num_hidden_layers", "num_attention_heads"])
def test_hf_config_missing_a_key_dimension_is_refused(tmp_path, capsys, drop):
    from planner.models import hf_config

    path = _hf(tmp_path, json.dumps({k: v for k, v in LLAMA.items() if k != drop}))
    with pytest.raises(SpecError) as info:
        hf_config.load_config(path)
    assert info.value.field == drop and "missing" in str(info.value) and "LlamaConfig's default" in str(info.value)
    capsys.readouterr()
    assert main(["plan", "--model", str(path), "--cluster", "cpu-local", "--global-batch", "8"]) == 2
    assert re.search(rf"error: {drop} in .*config.json: got None; missing", capsys.readouterr().err)


def test_hf_config_names_the_family_field_and_accepts_the_standard_alias(tmp_path):
    from planner.models import hf_config

    gpt2 = {"model_type": "gpt2", "vocab_size": 128, "n_positions": 64}
    with pytest.raises(SpecErrors) as info:
        hf_config.load_config(_hf(tmp_path, json.dumps(gpt2)))
    assert info.value.fields == ("n_embd", "n_layer", "n_head")
    assert "(also read as hidden_size)" in str(info.value)
    config = hf_config.load_config(_hf(tmp_path, json.dumps({**gpt2, "hidden_size": 64, "num_hidden_layers": 2,
                                                              "n_head": 4})))
    assert (config.n_embd, config.n_layer, config.n_head) == (64, 2, 4)


def test_a_reader_that_stops_early_gets_no_traceback():
    """`python -m planner ... | head`: the closed pipe ends the command quietly."""
    from planner.errors import run_command

    def body() -> int:
        raise BrokenPipeError(32, "Broken pipe")

    assert run_command(body, debug=False) == 0
