"""The cluster file's measured fields (collectives, gemm, memory): parsing, errors, round trip, schema."""

import json
import re
from pathlib import Path

import jsonschema
import pytest

from planner.cluster import ClusterSpec, check_cluster_schema
from planner.errors import SpecError
from planner.paths import datasets_dir

REPO = Path(__file__).resolve().parents[2]

POINT = {"nodes": 1, "message_bytes": 1048576, "bus_bandwidth_bytes_per_s": 1.5e11}


def base() -> dict:
    return ClusterSpec.preset("dgx-a100-80g").to_dict()


def with_measured() -> dict:
    d = base()
    d["collectives"] = {"all_reduce": [dict(POINT), dict(POINT, message_bytes=2**30, bus_bandwidth_bytes_per_s=2.3e11)],
                        "all_gather": [dict(POINT)], "reduce_scatter": [dict(POINT)], "send_recv": [dict(POINT)]}
    d["gemm"] = [{"m": 4096, "n": 4096, "k": 4096, "dtype": "bf16", "flops_per_s": 2.6e14}]
    d["memory"] = {"reserved_bytes": 3 * 2**30}
    return d


def test_round_trip_keeps_the_measured_fields_and_the_fingerprint_sees_them():
    d = with_measured()
    spec = ClusterSpec.from_dict(d)
    assert spec.to_dict() == d
    again = ClusterSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and again.fingerprint() == spec.fingerprint()
    assert spec.fingerprint() != ClusterSpec.from_dict(base()).fingerprint()
    changed = with_measured()
    changed["collectives"]["all_reduce"][0]["bus_bandwidth_bytes_per_s"] = 1.4e11
    assert ClusterSpec.from_dict(changed).fingerprint() != spec.fingerprint()
    changed = with_measured()
    changed["memory"]["reserved_bytes"] += 1
    assert ClusterSpec.from_dict(changed).fingerprint() != spec.fingerprint()


def test_a_cluster_without_measurements_is_unchanged():
    spec = ClusterSpec.preset("dgx-a100-80g")
    assert not {"collectives", "gemm", "memory"} & set(spec.to_dict())
    # the fingerprint the plans written before the measured fields carry (git show HEAD~:… plan of this preset),
    # for the preset as it was then: since then it states its fitted fused-attention efficiency
    as_file = json.loads((datasets_dir() / "clusters" / "dgx-a100-80g.json").read_text())
    before = json.loads(json.dumps(as_file))
    del before["device"]["fused_attention_efficiency"]
    assert ClusterSpec.from_dict(before).fingerprint() == "sha256:cfc74db1d668307e"
    assert spec.fingerprint() == "sha256:6e624c462b3cff42"
    assert spec.to_dict() == as_file


def test_mixed_cluster_carries_measurements_per_group():
    d = json.loads((datasets_dir() / "clusters" / "mixed-a100-v100.json").read_text())
    d["groups"][0]["collectives"] = with_measured()["collectives"]
    spec = ClusterSpec.from_dict(d)
    assert spec.groups[0].collectives is not None and spec.groups[1].collectives is None
    assert spec.group_view(0).groups[0].collectives == spec.groups[0].collectives
    assert ClusterSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("edit, field, words", [
    (lambda d: d["collectives"]["all_reduce"][0].update(bus_bandwidth_bytes_per_s=-1.0),
     "collectives.all_reduce[0].bus_bandwidth_bytes_per_s", "positive number"),
    (lambda d: d["collectives"].update(allreduce=[POINT]), "collectives.allreduce", "did you mean 'all_reduce'"),
    (lambda d: d["collectives"].update(all_gather=[]), "collectives.all_gather", "non-empty list"),
    (lambda d: d["collectives"].pop("reduce_scatter"), "collectives.reduce_scatter", "required"),
    (lambda d: d["collectives"]["all_reduce"].append(dict(POINT)), "collectives.all_reduce[2]", "same nodes"),
    (lambda d: d["collectives"]["all_reduce"][0].update(nodes=1.5), "collectives.all_reduce[0].nodes",
     "positive integer"),
    (lambda d: d["collectives"]["send_recv"][0].update(busbw=1.0), "collectives.send_recv[0].busbw",
     "unknown field"),
    (lambda d: d.update(gemm=[]), "gemm", "non-empty list"),
    (lambda d: d["gemm"][0].update(dtype="bfloat16"), "gemm[0].dtype", "use one of"),
    (lambda d: d["gemm"][0].update(flops_per_s=0), "gemm[0].flops_per_s", "positive number"),
    (lambda d: d.update(memory={}), "memory", "either field"),
    (lambda d: d.update(memory={"usable_fraction": 1.5}), "memory.usable_fraction", "(0, 1]"),
    (lambda d: d.update(memory={"reserved_bytes": 90 * 2**30}), "memory.reserved_bytes", "no usable memory"),
])
def test_bad_measured_fields_name_the_field(edit, field, words):
    d = with_measured()
    edit(d)
    with pytest.raises(SpecError) as err:
        ClusterSpec.from_dict(d, source="my-cluster.json")
    assert err.value.field == field
    assert words in str(err.value)


def test_resizing_devices_per_node_of_measured_nodes_is_refused():
    spec = ClusterSpec.from_dict(with_measured())
    assert spec.resized(nodes=4).groups[0].collectives == spec.groups[0].collectives
    with pytest.raises(SpecError) as err:
        spec.resized(devices_per_node=4)
    assert err.value.field == "devices_per_node" and "measured collectives" in str(err.value)


def test_every_preset_and_the_docs_example_validate_against_the_published_schema():
    schema = json.loads((REPO / "docs" / "cluster.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    files = sorted((datasets_dir() / "clusters").glob("*.json"))
    assert len(files) >= 6
    for path in files:
        assert list(validator.iter_errors(json.loads(path.read_text()))) == [], path.name
    page = (REPO / "docs" / "cluster.md").read_text()
    examples = re.findall(r"```json\n(.*?)```", page, flags=re.S)
    assert examples, "docs/cluster.md has no JSON example"
    for text in examples:
        d = json.loads(text)
        assert list(validator.iter_errors(d)) == []
        ClusterSpec.from_dict(d)
    assert list(validator.iter_errors(with_measured())) == []


def test_the_schema_refuses_what_the_loader_refuses():
    d = with_measured()
    d["collectives"]["all_reduce"][0]["bus_bandwidth_bytes_per_s"] = -1
    with pytest.raises(SpecError) as err:
        check_cluster_schema(d)
    assert err.value.field == "collectives.all_reduce.0.bus_bandwidth_bytes_per_s"
    d = base()
    d["extra"] = 1
    with pytest.raises(SpecError):
        check_cluster_schema(d)
