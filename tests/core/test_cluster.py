import json
import re

import pytest

from planner import ClusterSpec
from planner.errors import SpecError
from planner.plausible import PlausibilityWarning


def test_presets_load_with_expected_hardware():
    names = ClusterSpec.presets()
    for required in ("dgx-a100-80g", "dgx-a100-40g", "dgx-h100", "dgx1-v100", "cpu-local", "mixed-a100-v100",
                     "dgx-h200", "dgx-b200", "gb200-nvl72", "gb300-nvl72"):
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


def test_hopper_and_blackwell_presets_state_their_datasheet_figures():
    h100, h200 = ClusterSpec.preset("dgx-h100"), ClusterSpec.preset("dgx-h200")
    # H200: the H100's compute and links, 141 GB HBM3e (nvidia-smi: 143,771 MiB) at 4.8 TB/s
    assert h200.device.peak_flops == h100.device.peak_flops
    assert h200.device.memory_bytes == 143771 * 2**20 and h200.device.memory_bandwidth_bytes_per_s == 4.8e12
    assert (h200.intra_node, h200.inter_node) == (h100.intra_node, h100.inter_node)
    b200 = ClusterSpec.preset("dgx-b200")
    assert b200.device.peak("bf16") == 2.25e15 and b200.device.peak("fp8") == 4.5e15
    assert b200.device.memory_bytes == 183359 * 2**20 and b200.devices_per_node == 8
    assert b200.intra_node.bandwidth_bytes_per_s == 2 * h100.intra_node.bandwidth_bytes_per_s == 900e9
    assert b200.inter_node.bandwidth_bytes_per_s == 400e9  # 8 x 400 Gb/s per node
    gb200, gb300 = ClusterSpec.preset("gb200-nvl72"), ClusterSpec.preset("gb300-nvl72")
    assert gb200.devices_per_node == gb300.devices_per_node == 72  # a node is the rack's NVLink domain
    assert gb200.device.peak("bf16") == gb300.device.peak("bf16") == 2.5e15
    assert (gb200.device.memory_bytes, gb300.device.memory_bytes) == (186e9, 279e9)
    # inter_node is the whole node's: one NIC per GPU, 400 Gb/s (GB200) and 800 Gb/s (GB300)
    assert gb200.inter_node.bandwidth_bytes_per_s / 72 == 50e9 and gb300.inter_node.bandwidth_bytes_per_s / 72 == 100e9
    for spec in (h200, b200, gb200, gb300):  # nothing fitted: the H100's fractions of peak carried over
        dev = spec.device
        assert (dev.gemm_efficiency, dev.fused_attention_efficiency, dev.attention_efficiency("cudnn")) == (
            h100.device.gemm_efficiency, h100.device.fused_attention_efficiency, h100.device.attention_efficiency("cudnn"))
        assert "not fitted" in spec.description.lower()
    two = ClusterSpec.preset("gb200-nvl72", nodes=2)
    assert two.num_devices == 144 and two.node_of_rank(72) == 1
    assert two.resized(nodes=1, devices_per_node=64).num_devices == 64


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


# -- plausibility (issue 19): figures outside the ranges real hardware takes --------------------------

@pytest.mark.parametrize("name", ClusterSpec.presets())
def test_every_preset_is_plausible(name):
    assert [f for f in ClusterSpec.preset(name).check_plausible() if f.error] == []


@pytest.mark.parametrize(
    "mutate, field, fix",
    [
        (lambda d: d["device"]["peak_flops"].update(bf16=312), "device.peak_flops.bf16",
         "312 FLOP/s looks like TFLOP/s: write 312e12"),
        (lambda d: d["device"].update(memory_bytes=40), "device.memory_bytes",
         "40 bytes looks like GiB: write 40 * 2**30 = 42949672960"),
        (lambda d: d["device"].update(memory_bytes=81920), "device.memory_bytes",
         "looks like MiB: write 81920 * 2**20 = 85899345920"),
        (lambda d: d["inter_node"].update(latency_s=30), "inter_node.latency_s", "30 s looks like µs: write 30e-6"),
        (lambda d: d["intra_node"].update(bandwidth_bytes_per_s=300), "intra_node.bandwidth_bytes_per_s",
         "looks like GB/s: write 300e9 (if it is Gb/s: 37.5e9)"),
        (lambda d: d["device"].update(memory_bandwidth_bytes_per_s=2.039), "device.memory_bandwidth_bytes_per_s",
         "looks like TB/s: write 2.039e12"),
        (lambda d: d["device"]["peak_flops"].update(bf16=3e18), "device.peak_flops.bf16", "above the largest"),
        (lambda d: d.update(collectives={c: [{"nodes": 1, "message_bytes": 2**20, "bus_bandwidth_bytes_per_s": 180}]
                                         for c in ("all_reduce", "all_gather", "reduce_scatter")}),
         "collectives.all_reduce[0].bus_bandwidth_bytes_per_s", "looks like GB/s: write 180e9"),
        (lambda d: d.update(nodes=250_000), "nodes", "above the largest plausible value"),
    ],
)
def test_implausible_figure_names_the_unit_slip(mutate, field, fix):
    d = ClusterSpec.preset("dgx-a100-80g").to_dict()
    mutate(d)
    with pytest.raises(SpecError) as err:
        ClusterSpec.from_dict(d, source="c.json")
    assert err.value.field == field
    assert fix in str(err.value) and "--i-know" in str(err.value)
    with pytest.warns(PlausibilityWarning, match=re.escape(field)):  # exotic hardware: accepted, with a warning
        spec = ClusterSpec.from_dict(d, source="c.json", strict=False)
    assert any(f.error and f.field == field for f in spec.check_plausible(strict=False))


def test_suspicious_but_plausible_is_a_warning_only():
    d = ClusterSpec.preset("dgx1-v100").to_dict()
    d["inter_node"]["bandwidth_bytes_per_s"] = 1600e9  # 200 GB/s per device, above NVLink's 150
    with pytest.warns(PlausibilityWarning, match="inter_node is the whole node's bandwidth"):
        spec = ClusterSpec.from_dict(d)
    assert spec.inter_node.bandwidth_bytes_per_s == 1600e9


def test_echo_reads_back_in_human_units():
    lines = ClusterSpec.preset("dgx-a100-80g", nodes=128).echo()
    assert lines[0] == "128 nodes x 8 A100-SXM4-80GB: 312 TFLOP/s bf16 (19.5 TFLOP/s fp32), 80.0 GiB at 2.04 TB/s"
    assert lines[1].strip() == ("nvswitch 300 GB/s per device, 3 µs; infiniband 200 GB/s per node = 1600 Gb/s "
                                "(25 GB/s per device), 5 µs")
    assert len(ClusterSpec.preset("mixed-a100-v100").echo()) == 4
    assert ClusterSpec.preset("cpu-local").echo()[0].startswith("1 node x 2 cpu-process: 40 GFLOP/s fp32, 4.0 GiB")


def test_resize_checks_counts_unless_told():
    with pytest.raises(SpecError, match="lower --nodes"):
        ClusterSpec.preset("dgx-h100", nodes=200_000)
    assert ClusterSpec.preset("dgx-h100").resized(nodes=200_000, strict=False).nodes == 200_000
