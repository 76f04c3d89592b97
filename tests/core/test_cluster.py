import json

import pytest

from planner import ClusterSpec
from planner.errors import SpecError


def test_presets_load_with_expected_hardware():
    names = ClusterSpec.presets()
    for required in ("dgx-a100-80g", "dgx-a100-40g", "dgx-h100", "dgx1-v100", "cpu-local", "mixed-a100-v100"):
        assert required in names
    a100 = ClusterSpec.preset("dgx-a100-80g", nodes=8)
    assert a100.num_devices == 64 and a100.devices_per_node == 8 and a100.nodes == 8
    assert a100.device.peak("bf16") == 312e12
    assert a100.device.memory_bytes == 80 * 2**30
    # 8 x 200 Gb/s HDR InfiniBand per node = 200 GB/s per node.
    assert a100.inter_node.bandwidth_bytes_per_s == 200e9
    assert ClusterSpec.preset("dgx-a100-40g").device.memory_bytes == 40 * 2**30
    mixed = ClusterSpec.preset("mixed-a100-v100")
    assert not mixed.is_homogeneous and mixed.num_devices == 16
    assert mixed.node_of_rank(8) == 1 and mixed.group_of_rank(9).device.name.startswith("V100")


def test_json_round_trip_and_fingerprint(tmp_path):
    spec = ClusterSpec.preset("dgx-h100", nodes=2)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(spec.to_dict()))
    again = ClusterSpec.from_json(path)
    assert again == spec
    assert again.fingerprint() == spec.fingerprint()
    assert ClusterSpec.preset("dgx-h100", nodes=4).fingerprint() != spec.fingerprint()


@pytest.mark.parametrize(
    "mutate, field, words",
    [
        (lambda d: d["device"].update(memory_bytes=-1), "device.memory_bytes", "positive"),
        (lambda d: d.update(nodes=0), "nodes", "positive integer"),
        (lambda d: d.update(devices_per_node=2.5), "devices_per_node", "positive integer"),
        (lambda d: d["intra_node"].update(kind="warp-drive"), "intra_node.kind", "use one of"),
        (lambda d: d["device"]["peak_flops"].update(bf32=1e12), "device.peak_flops.bf32", "unknown dtype"),
        (lambda d: d.update(devices_per_nodes=8), "devices_per_nodes", "did you mean 'devices_per_node'"),
        (lambda d: d["inter_node"].pop("latency_s"), "inter_node.latency_s", "required"),
    ],
)
def test_bad_cluster_fields_name_field_and_fix(tmp_path, mutate, field, words):
    d = ClusterSpec.preset("dgx-a100-80g").to_dict()
    mutate(d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(SpecError) as err:
        ClusterSpec.from_json(path)
    assert err.value.field == field
    assert words in str(err.value)
    assert str(path) in str(err.value)


def test_unknown_preset_suggests_close_names():
    with pytest.raises(SpecError, match="dgx-a100-80g"):
        ClusterSpec.preset("dgx-a100-80")


def test_broken_json_names_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"name": "x",\n "nodes": }')
    with pytest.raises(SpecError, match="line 2"):
        ClusterSpec.from_json(path)
