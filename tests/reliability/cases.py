"""Bad inputs and the answers they get. Each case runs the CLI in-process (or a Python call).

A case is ``(id, area, what, argv_or_callable, expected_exit, fragments)``: the test asserts the
exit code, that every fragment appears in stderr (in stdout for a case with ``stream="stdout"``: what a
good input prints), and that no traceback is printed.
docs/reliability.md is generated from these cases (see test_bad_inputs.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

TINY = ["--model", "gpt-tiny", "--cluster", "cpu-local", "--devices-per-node", "2"]
EVAL = ["evaluate", *TINY, "--global-batch", "8"]


@dataclass(frozen=True)
class Case:
    id: str
    area: str
    what: str
    make: Callable[[Path], list[str]]  # builds argv (may write files into the temp dir)
    exit_code: int
    fragments: tuple[str, ...]
    cli: str = "planner"  # which command line: "planner" (python -m planner) or "runtime" (python -m runtime)
    stream: str = "stderr"  # where the fragments must appear: "stderr", or "stdout" for what a good input prints
    umask: int | None = None  # run the command under this umask (file modes)
    observe: Callable[[Path], str] | None = None  # after the run: a line about its effects (checked, shown)


def _cluster_file(tmp: Path, mutate) -> str:
    from planner.cluster import ClusterSpec

    d = ClusterSpec.preset("dgx-a100-80g").to_dict()
    mutate(d)
    path = tmp / "cluster.json"
    path.write_text(json.dumps(d))
    return str(path)


def _cluster_case(mutate, *frags, what, cid):
    return Case(cid, "cluster", what,
                lambda t: ["plan", "--model", "gpt-tiny", "--cluster", _cluster_file(t, mutate), "--global-batch", "8"],
                2, frags)


def _plan_file(tmp: Path, mutate, *, restamp: bool = False) -> str:
    """The tiny pp=2 plan, ``mutate``d: edited by hand (its fingerprint no longer matches), or, with
    ``restamp``, as a planner would have written it (a stale plan, a schedule the runtime refuses)."""
    from planner.cli import main
    from planner.plan import restamp as stamp

    path = tmp / "plan.json"
    if not path.exists():
        main(["evaluate", *TINY, "--global-batch", "8", "--tp", "1", "--pp", "2", "--dp", "1", "--micro-batch", "2",
              "-o", str(path), "--json"])
    d = json.loads(path.read_text())
    mutate(d)
    if restamp:
        d = stamp(d)
    bad = tmp / "bad-plan.json"
    bad.write_text(json.dumps(d) if not isinstance(d, str) else d)
    return str(bad)


def _checkpoint(tmp: Path, *, manifest: str | dict | None, data: bytes = b"weights") -> str:
    """A checkpoint folder as the runtime writes it, damaged as asked (no training needed)."""
    root = tmp / "ckpt"
    step = root / "step-000002"
    step.mkdir(parents=True, exist_ok=True)
    (step / "__0_0.distcp").write_bytes(data)
    if manifest is not None:
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        (step / "manifest.json").write_text(text)
    return str(root)


def _good_manifest(plan_path: str, *, sha: str | None = None, size: int | None = None) -> dict:
    import hashlib

    from runtime.checkpoint import FORMAT_VERSION

    plan = json.loads(Path(plan_path).read_text())
    return {"format": FORMAT_VERSION, "step": 2, "model": "gpt-tiny", "model_fingerprint": plan["model"]["fingerprint"],
            "files": {"__0_0.distcp": {"bytes": size if size is not None else 7,
                                       "sha256": sha or hashlib.sha256(b"weights").hexdigest()}}}


def _run_ckpt(tmp: Path, manifest_fn) -> list[str]:
    plan = _plan_file(tmp, lambda d: None)
    root = _checkpoint(tmp, manifest=manifest_fn(plan))
    return ["run", plan, "--nproc", "2", "--steps", "1", "--checkpoint-dir", root, "--resume"]


def _raw_file(tmp: Path, name: str, text: str) -> str:
    path = tmp / name
    path.write_text(text)
    return str(path)


CASES: list[Case] = [
    # -- cluster files ------------------------------------------------------------------------
    _cluster_case(lambda d: d["device"].update(memory_bytes=-5), "device.memory_bytes", "positive number",
                  what="negative device memory", cid="cluster-negative-memory"),
    _cluster_case(lambda d: d.update(nodes=0), "nodes", "positive integer", what="zero nodes", cid="cluster-zero-nodes"),
    _cluster_case(lambda d: d.update(devices_per_node="eight"), "devices_per_node", "positive integer",
                  what="devices per node as a string", cid="cluster-string-count"),
    _cluster_case(lambda d: d.update(devices_per_nodes=8), "did you mean 'devices_per_node'",
                  what="misspelt field name", cid="cluster-typo-field"),
    _cluster_case(lambda d: d["intra_node"].update(kind="smoke-signals"), "intra_node.kind", "use one of",
                  what="unknown link kind", cid="cluster-bad-link-kind"),
    _cluster_case(lambda d: d["device"]["peak_flops"].update(bf32=1e15), "device.peak_flops.bf32", "unknown dtype",
                  what="unknown dtype in peak FLOP/s", cid="cluster-bad-dtype"),
    _cluster_case(lambda d: d["inter_node"].pop("latency_s"), "inter_node.latency_s", "required",
                  what="missing link latency", cid="cluster-missing-latency"),
    _cluster_case(lambda d: d["inter_node"].update(bandwidth_bytes_per_s=float("nan")), "bandwidth_bytes_per_s",
                  "positive number", what="NaN bandwidth", cid="cluster-nan-bandwidth"),
    Case("cluster-not-json", "cluster", "cluster file with a syntax error",
         lambda t: ["plan", "--model", "gpt-tiny", "--cluster", _raw_file(t, "c.json", '{"name": "x", "nodes": }'),
                    "--global-batch", "8"], 2, ("not valid JSON", "line 1")),
    Case("cluster-missing-file", "cluster", "cluster file that does not exist",
         lambda t: ["plan", "--model", "gpt-tiny", "--cluster", str(t / "nope.json"), "--global-batch", "8"], 2,
         ("cannot read the file",)),
    Case("cluster-unknown-preset", "cluster", "misspelt cluster preset",
         lambda t: ["plan", "--model", "gpt-tiny", "--cluster", "dgx-a100", "--global-batch", "8"], 2,
         ("no such preset", "dgx-a100-80g")),
    # -- model --------------------------------------------------------------------------------
    Case("model-python-file", "model", "--model given a Python file of one's own model",
         lambda t: ["plan", "--model", "my_model.py", "--cluster", "cpu-local", "--global-batch", "8"], 2,
         ("model: got 'my_model.py'", "planner.plan(module")),
    Case("model-unknown-preset", "model", "misspelt model preset",
         lambda t: ["plan", "--model", "gpt3-175", "--cluster", "cpu-local", "--global-batch", "8"], 2,
         ("no such model preset", "gpt3-175b")),
    Case("model-seq-too-long", "model", "sequence longer than the model's positions",
         lambda t: ["plan", *TINY, "--global-batch", "8", "--seq-len", "4096"], 2, ("seq_len", "--seq-len <= 64")),
    # -- options ------------------------------------------------------------------------------
    Case("opt-zero-batch", "options", "global batch 0", lambda t: ["plan", *TINY, "--global-batch", "0"], 2,
         ("--global-batch", "expected an integer >= 1")),
    Case("opt-missing-batch", "options", "plan without --global-batch", lambda t: ["plan", *TINY], 2,
         ("--global-batch", "required")),
    Case("opt-degrees-mismatch", "options", "tp·pp·dp does not match the device count",
         lambda t: [*EVAL, "--tp", "2", "--pp", "2", "--dp", "2", "--micro-batch", "1"], 2,
         ("multiply to the cluster's 2 devices",)),
    Case("opt-batch-indivisible", "options", "global batch not divisible by dp × micro-batch",
         lambda t: ["evaluate", *TINY, "--global-batch", "9", "--tp", "1", "--pp", "1", "--dp", "2",
                    "--micro-batch", "2"], 2, ("multiple of dp x micro-batch = 4",)),
    Case("opt-tp-beyond-node", "options", "tensor parallelism wider than a node, not whole nodes",
         lambda t: ["evaluate", "--model", "gpt-tiny", "--cluster", "cpu-local", "--nodes", "3",
                    "--global-batch", "8", "--tp", "3", "--pp", "1", "--dp", "2", "--micro-batch", "4"], 2,
         ("whole nodes", "--tp 2 or 4")),
    Case("opt-too-many-stages", "options", "more pipeline stages than layers",
         lambda t: ["evaluate", "--model", "gpt-tiny", "--cluster", "cpu-local", "--devices-per-node", "8",
                    "--global-batch", "8", "--tp", "1", "--pp", "8", "--dp", "1", "--micro-batch", "1"], 2,
         ("6 layers", "lower --pp")),
    Case("opt-unknown-schedule", "options", "unknown schedule name",
         lambda t: ["plan", *TINY, "--global-batch", "8", "--schedule", "1f1bb"], 2, ("did you mean",)),
    Case("opt-unknown-partition", "options", "misspelt stage-split rule",
         lambda t: ["plan", *TINY, "--global-batch", "8", "--partition", "megatrom"], 2,
         ("--partition", "megatron")),
    Case("opt-framework-split-impossible", "options", "a framework's split that leaves a pipeline rank empty",
         lambda t: ["plan", *TINY, "--global-batch", "8", "--pp", "2", "--partition", "nanotron"], 2,
         ("leaves 1 of 2 pipeline ranks", "fewer stages or another partition")),
    Case("opt-sp-without-tp", "options", "sequence parallelism with tp = 1",
         lambda t: [*EVAL, "--tp", "1", "--pp", "1", "--dp", "2", "--micro-batch", "1", "--sequence-parallel"], 2,
         ("sequence parallelism needs tp > 1",)),
    Case("opt-sp-without-sequence", "options", "sequence parallelism on a model without a sequence (MLP)",
         lambda t: ["plan", "--model", "mlp-tiny", "--cluster", "cpu-local", "--devices-per-node", "2", "--tp", "2",
                    "--sequence-parallel", "--global-batch", "8"], 2,
         ("sequence_parallel", "no sequence dimension", "drop --sequence-parallel")),
    Case("opt-sp-family-not-run", "options", "sequence parallelism for a family the runtime does not split so (BERT)",
         lambda t: ["plan", "--model", "bert-tiny", "--cluster", "cpu-local", "--devices-per-node", "2", "--tp", "2",
                    "--sequence-parallel", "--global-batch", "8"], 2,
         ("sequence_parallel", "'bert'", "drop --sequence-parallel")),
    Case("opt-tp-beyond-node-mixed", "options", "tp wider than a node on a mixed cluster",
         lambda t: ["evaluate", "--model", "gpt-tiny", "--cluster", "mixed-a100-v100", "--global-batch", "16",
                    "--tp", "16", "--pp", "1", "--dp", "1", "--micro-batch", "1"], 2,
         ("tp", "use --tp <= 8")),
    Case("opt-negative-nodes", "options", "negative --nodes",
         lambda t: ["plan", "--model", "gpt-tiny", "--cluster", "cpu-local", "--nodes", "-1", "--global-batch", "8"],
         2, ("nodes", ">= 1")),
    Case("opt-output-exists", "options", "output file exists (no --force)",
         lambda t: ["plan", *TINY, "--global-batch", "8", "-o", _raw_file(t, "exists.json", "keep me")], 2,
         ("the file exists", "--force")),
    # -- infeasible ---------------------------------------------------------------------------
    Case("infeasible-175b-one-node", "infeasible", "GPT-3 175B on one DGX A100 node",
         lambda t: ["plan", "--model", "gpt3-175b", "--cluster", "dgx-a100-80g", "--global-batch", "8"], 2,
         ("no configuration", "GiB over", "the largest part is optimizer", "--nodes 6",
          "found by search: 5 nodes do not fit")),
    Case("infeasible-given-config", "infeasible", "a hand-written configuration that does not fit (exit 3)",
         lambda t: ["evaluate", "--model", "gpt3-13b", "--cluster", "dgx-a100-80g", "--global-batch", "8",
                    "--tp", "1", "--pp", "1", "--dp", "8", "--micro-batch", "1"], 3, ()),
    # -- plan files ---------------------------------------------------------------------------
    Case("plan-missing-file", "plan file", "plan file that does not exist",
         lambda t: ["explain", str(t / "missing.json")], 2, ("cannot read the plan file",)),
    Case("plan-not-json", "plan file", "truncated plan file",
         lambda t: ["explain", _raw_file(t, "trunc.json", '{"schema_version": "1.0", "model": {')], 2,
         ("not valid JSON", "damaged")),
    Case("plan-bad-degree", "plan file", "plan with tp = 0",
         lambda t: ["explain", _plan_file(t, lambda d: d["parallel"].update(tp=0))], 2, ("parallel.tp",)),
    Case("plan-unknown-schedule", "plan file", "plan with an unknown schedule",
         lambda t: ["explain", _plan_file(t, lambda d: d["parallel"].update(schedule="zigzag"))], 2,
         ("parallel.schedule",)),
    Case("plan-future-version", "plan file", "plan from a future schema version",
         lambda t: ["explain", _plan_file(t, lambda d: d.update(schema_version="9.0"))], 2,
         ("schema_version 9.0",)),
    Case("plan-no-version", "plan file", "JSON that is not a plan",
         lambda t: ["explain", _raw_file(t, "other.json", '{"hello": "world"}')], 2,
         ("schema_version", "not a plan file")),
    Case("plan-bad-fingerprint", "plan file", "plan whose fingerprint is malformed",
         lambda t: ["explain", _plan_file(t, lambda d: d["model"].update(fingerprint="abc"))], 2,
         ("model.fingerprint",)),
    Case("plan-edited", "plan file", "plan whose dp was edited by hand after planning",
         lambda t: ["explain", _plan_file(t, lambda d: d["parallel"].update(dp=2))], 2,
         ("was edited after planning: parallel.dp 1 -> 2", "evaluate --plan")),
    Case("plan-predictions-edited", "plan file", "plan whose predicted step time was edited by hand",
         lambda t: ["compare", _plan_file(t, lambda d: d["predicted"].update(step_time_s=0.001))], 2,
         ("was edited after planning: predicted changed", "evaluate --plan")),
    # -- running a plan (checked before any process starts) -------------------------------------
    Case("run-world-size", "runtime", "plan for 2 devices launched on 4 processes",
         lambda t: ["run", _plan_file(t, lambda d: None), "--nproc", "4", "--steps", "1"], 2, ("world",), "runtime"),
    Case("run-model-changed", "runtime", "plan whose model fingerprint no longer matches the model",
         lambda t: ["run", _plan_file(t, lambda d: d["model"].update(fingerprint="sha256:0000000000000000"),
                                      restamp=True), "--nproc", "2", "--steps", "1"], 2,
         ("model.fingerprint", "--allow-mismatch"), "runtime"),
    Case("run-async-schedule", "runtime", "plan with an asynchronous schedule the runtime does not run",
         lambda t: ["run", _plan_file(t, lambda d: d["parallel"].update(schedule="pipedream"), restamp=True),
                    "--nproc", "2", "--steps", "1"], 2, ("pipedream", "1f1b"), "runtime"),
    Case("run-plan-edited", "runtime", "plan whose dp was edited by hand after planning",
         lambda t: ["run", _plan_file(t, lambda d: d["parallel"].update(dp=2)), "--nproc", "4", "--steps", "1"], 2,
         ("was edited after planning: parallel.dp 1 -> 2", "evaluate --plan"), "runtime"),
    # -- checkpoints ----------------------------------------------------------------------------
    Case("ckpt-none", "checkpoint", "--resume with a folder holding no checkpoint",
         lambda t: ["run", _plan_file(t, lambda d: None), "--nproc", "2", "--steps", "1", "--checkpoint-dir",
                    str(t / "empty"), "--resume"], 2, ("no step-NNNNNN folder",), "runtime"),
    Case("ckpt-unfinished", "checkpoint", "checkpoint whose save never finished (no manifest)",
         lambda t: _run_ckpt(t, lambda plan: None), 2, ("no manifest.json", "did not finish"), "runtime"),
    Case("ckpt-damaged-manifest", "checkpoint", "checkpoint with a garbled manifest",
         lambda t: _run_ckpt(t, lambda plan: "{not json"), 2, ("manifest.json is damaged",), "runtime"),
    Case("ckpt-corrupted", "checkpoint", "checkpoint file with a flipped byte",
         lambda t: _run_ckpt(t, lambda plan: _good_manifest(plan, sha="0" * 64)), 2, ("is corrupted", "SHA-256"),
         "runtime"),
    Case("ckpt-truncated", "checkpoint", "truncated checkpoint file",
         lambda t: _run_ckpt(t, lambda plan: _good_manifest(plan, size=1000)), 2, ("truncated",), "runtime"),
    # issue 19: command-line arguments, labels, units
    Case("args-missing-all-at-once", "options", "evaluate without --tp, --dp and --micro-batch",
         lambda t: [*EVAL, "--pp", "2"], 2,
         ("--tp: got None; this option is required", "--dp: got None", "--micro-batch: got None")),
    Case("args-negative-micro-batch", "options", "negative --micro-batch (blamed on itself, not --global-batch)",
         lambda t: [*EVAL, "--tp", "1", "--pp", "2", "--dp", "1", "--micro-batch", "-1"], 2,
         ("--micro-batch: got -1; expected an integer >= 1",)),
    Case("args-unreadable-and-unknown", "options", "a word for --tp, a misspelt option and dtype, together",
         lambda t: [*EVAL, "--tp", "two", "--pp", "1", "--dp", "2", "--micro-batchs", "4", "--dtype", "bf32"], 2,
         ("--tp: got 'two'; expected an integer", "--dtype: got 'bf32'; did you mean fp32?",
          "--micro-batchs: got '4'; unknown option", "did you mean --micro-batch?", "--micro-batch: got None")),
    Case("args-config-vs-model-and-cluster", "options", "4 devices on a 2-device cluster and 8 stages of 6 layers",
         lambda t: [*EVAL, "--tp", "1", "--pp", "8", "--dp", "1", "--micro-batch", "1"], 2,
         ("multiply to the cluster's 2 devices", "the model has 6 layers")),
    Case("args-runtime-all-at-once", "runtime", "run with --nproc 0, --steps -1 and --resume without a folder",
         lambda t: ["run", _plan_file(t, lambda d: None), "--nproc", "0", "--steps", "-1", "--resume"], 2,
         ("--nproc: got 0", "--steps: got -1", "--resume: got True; needs --checkpoint-dir"), "runtime"),
    Case("run-one-process", "runtime", "plan for 2 devices launched on 1 process (plurals)",
         lambda t: ["run", _plan_file(t, lambda d: None), "--nproc", "1", "--steps", "1"], 2,
         ("2 processes but 1 process was launched", "re-plan for 1 device"), "runtime"),
    Case("out-legend", "output", "a plan's output: the labels it prints, explained in one legend line",
         lambda t: [*EVAL, "--tp", "1", "--pp", "1", "--dp", "2", "--micro-batch", "2", "--zero", "1"], 0,
         ("legend: dp/tp/pp = data-, tensor-, pipeline-parallel degrees", "mb=2x2 = 2 micro-batches of 2 samples",
          "zero1 = optimizer state sharded over dp", "binding (what limits a device): compute = "), stream="stdout"),
    Case("out-plan-file-mode", "output", "plan file written under umask 022 (was 0600)",
         lambda t: ["plan", *TINY, "--global-batch", "8", "--tp", "1", "--json", "-o", str(t / "p.json")], 0,
         ("plan file mode 0644",), stream="stdout", umask=0o022,
         observe=lambda t: f"plan file mode {(t / 'p.json').stat().st_mode & 0o777:04o}"),
    Case("out-plan-file-mode-077", "output", "plan file written under umask 077",
         lambda t: ["plan", *TINY, "--global-batch", "8", "--tp", "1", "--json", "-o", str(t / "p.json")], 0,
         ("plan file mode 0600",), stream="stdout", umask=0o077,
         observe=lambda t: f"plan file mode {(t / 'p.json').stat().st_mode & 0o777:04o}"),
    Case("out-param-units", "output", "`models`: a 4,562-parameter model (was 0.0M)", lambda t: ["models"], 0,
         ("cnn-tiny", "4.6K"), stream="stdout"),
    Case("out-help-commands", "output", "`--help` lists every subcommand", lambda t: ["--help"], 0,
         ("compare", "report", "profile-cluster"), stream="stdout"),
    # issue 19: cluster plausibility and infeasibility hints
    _cluster_case(lambda d: d["device"]["peak_flops"].update(bf16=312), "device.peak_flops.bf16",
                  "312 FLOP/s looks like TFLOP/s: write 312e12", "--i-know",
                  what="peak FLOP/s typed in TFLOP/s (bf16: 312)", cid="cluster-flops-in-tflops"),
    _cluster_case(lambda d: d["device"].update(memory_bytes=40), "device.memory_bytes",
                  "40 bytes looks like GiB: write 40 * 2**30 = 42949672960",
                  what="device memory typed in GiB (memory_bytes: 40)", cid="cluster-memory-in-gib"),
    _cluster_case(lambda d: d["inter_node"].update(latency_s=30), "inter_node.latency_s",
                  "30 s looks like µs: write 30e-6", what="latency of 30 s", cid="cluster-latency-seconds"),
    _cluster_case(lambda d: d["inter_node"].update(bandwidth_bytes_per_s=100), "inter_node.bandwidth_bytes_per_s",
                  "write 100e9 (if it is Gb/s: 12.5e9)", what="link bandwidth typed in GB/s or Gb/s (100)",
                  cid="cluster-bandwidth-in-gbs"),
    _cluster_case(lambda d: d.update(collectives={c: [{"nodes": 1, "message_bytes": 2**20,
                                                       "bus_bandwidth_bytes_per_s": 180}]
                                                  for c in ("all_reduce", "all_gather", "reduce_scatter")}),
                  "collectives.all_reduce[0].bus_bandwidth_bytes_per_s", "180 B/s looks like GB/s: write 180e9",
                  what="measured bus bandwidth typed in GB/s (nccl-tests' busbw column)", cid="cluster-busbw-in-gbs"),
    Case("cluster-echo", "cluster", "inter_node 100e9 meant as one 100 Gb/s NIC: plausible, read back in Gb/s",
         lambda t: ["plan", "--model", "gpt-tiny", "--cluster",
                    _cluster_file(t, lambda d: d["inter_node"].update(bandwidth_bytes_per_s=100e9)),
                    "--global-batch", "8"], 0,
         ("cluster as read: 1 node x 8 A100-SXM4-80GB: 312 TFLOP/s bf16",
          "infiniband 100 GB/s per node = 800 Gb/s (12.5 GB/s per device)"), stream="stdout"),
    Case("cluster-i-know", "cluster", "memory_bytes: 40 accepted with --i-know: a warning, then no device fits",
         lambda t: ["plan", "--model", "gpt-tiny", "--cluster",
                    _cluster_file(t, lambda d: d["device"].update(memory_bytes=40)), "--global-batch", "8",
                    "--i-know"], 2,
         ("warning: device.memory_bytes", "accepted (--i-know)", "No number of these devices fits",
          "device.memory_bytes = 40")),
    Case("opt-nodes-implausible", "options", "--nodes 200000 (more than any cluster)",
         lambda t: ["plan", "--model", "gpt-tiny", "--cluster", "cpu-local", "--nodes", "200000",
                    "--global-batch", "8"], 2, ("nodes", "above the largest plausible value", "lower --nodes")),
    Case("infeasible-1t-v100", "infeasible", "Megatron-1T on 67 DGX-1 V100 nodes (the hint used to move: 67, 68, ...)",
         lambda t: ["plan", "--model", "megatron-1t", "--cluster", "dgx1-v100", "--nodes", "67",
                    "--global-batch", "512"], 2,
         ("28.3 MiB over the 28.4 GiB usable", "devices with at least 32.1 GiB", "--nodes 98",
          "found by search: 97 nodes do not fit")),
    Case("infeasible-one-layer", "infeasible", "GPT-3 175B on devices of 3 GiB: no count of them holds one layer",
         lambda t: ["plan", "--model", "gpt3-175b", "--cluster",
                    _cluster_file(t, lambda d: d["device"].update(memory_bytes=3 * 2**30)), "--global-batch", "64"],
         2, ("No number of these devices fits: one layer needs", "use devices with >=")),
    # a schedule the runtime runs refuses the micro-batch count: the search proposes no such plan
    Case("infeasible-1f1b-few-micro-batches", "infeasible",
         "pp=4 with only 1f1b allowed and a global batch of 2 (torch's Schedule1F1B needs m >= p)",
         lambda t: ["plan", "--model", "gpt-tiny", "--cluster", "cpu-local", "--devices-per-node", "4", "--pp", "4",
                    "--global-batch", "2", "--schedules", "1f1b"], 2,
         ("'1f1b' needs at least 4 micro-batches", "raise --global-batch to 4 or more")),
    Case("infeasible-pp-over-devices", "infeasible", "--pp 100 on 2 devices: the knob is named, not a generic refusal",
         lambda t: ["plan", "--model", "gpt-tiny", "--cluster", "cpu-local", "--devices-per-node", "2", "--pp", "100",
                    "--global-batch", "8"], 2, ("--pp 100 is more than the 2 devices",)),
    Case("infeasible-tp-not-divisor", "infeasible", "--tp 3 on 4 devices",
         lambda t: ["plan", "--model", "gpt-tiny", "--cluster", "cpu-local", "--devices-per-node", "4", "--tp", "3",
                    "--global-batch", "8"], 2, ("--tp 3 does not divide the 4 devices", "choose a divisor of 4")),
    Case("infeasible-pp-over-layers", "infeasible", "--pp 8 on 8 devices for a 6-layer model",
         lambda t: ["plan", "--model", "gpt-tiny", "--cluster", "cpu-local", "--devices-per-node", "8", "--pp", "8",
                    "--global-batch", "8"], 2, ("--pp 8 is more stages than the model's 6 layers",)),
    Case("infeasible-degrees-product", "infeasible", "dp 2, cp 1, tp 2, pp 2 fixed on 4 devices",
         lambda t: ["plan", "--model", "gpt-tiny", "--cluster", "cpu-local", "--devices-per-node", "4", "--dp", "2",
                    "--cp", "1", "--tp", "2", "--pp", "2", "--global-batch", "8"], 2,
         ("dp x cp x tp x pp = 8, not the 4 devices",)),
    Case("opt-plan-nothing", "options", "plan with no arguments: every required option named at once",
         lambda t: ["plan"], 2,
         ("--model: got None; this option is required", "--cluster: got None; this option is required",
          "--global-batch: got None; this option is required")),
    Case("opt-virtual-stages-1f1b", "options", "evaluate --virtual-stages 3 with the default 1f1b schedule",
         lambda t: [*EVAL, "--tp", "1", "--dp", "1", "--pp", "2", "--micro-batch", "2", "--virtual-stages", "3"], 2,
         ("virtual_stages (--virtual-stages): got 3", "pick 'interleaved-1f1b'")),
    Case("opt-global-batch-implausible", "options", "--global-batch 999999999 (tokens given as samples?)",
         lambda t: ["plan", "--model", "gpt-tiny", "--cluster", "cpu-local", "--global-batch", "999999999"], 2,
         ("global_batch", "more than 10,000,000 samples per step", "divide by the sequence length")),
    _cluster_case(lambda d: d["device"].update(attention_kernels={"cudnn": 39}), "device.attention_kernels.cudnn",
                  "fraction of the dtype's peak", what="attention kernel rate as a percentage (cudnn: 39)",
                  cid="cluster-attention-kernel-percent"),
    Case("infeasible-dp-shard-not-divisor", "infeasible", "--dp-shard 3 on 4 devices: named, not dropped",
         lambda t: ["plan", "--model", "gpt-tiny", "--cluster", "cpu-local", "--devices-per-node", "4", "--zero", "3",
                    "--dp-shard", "3", "--global-batch", "8"], 2, ("--dp-shard 3 does not divide the 4 devices",)),
    Case("constants-fraction-zero", "options", "--constants with gemm_efficiency_max 0 (the cost model divides by it)",
         lambda t: ["plan", "--model", "gpt-tiny", "--cluster", "cpu-local", "--global-batch", "8", "--constants",
                    _raw_file(t, "constants.json", '{"gemm_efficiency_max": 0}')], 2,
         ("--constants: gemm_efficiency_max: got 0", "a fraction in (0, 1]")),
    Case("what-if-nan", "options", "explain --what-if memory=nanx",
         lambda t: ["explain", _plan_file(t, lambda d: None), "--what-if", "memory=nanx"], 2,
         ("--what-if: got 'memory=nanx'", "a positive number or a factor like 2x")),
    Case("evaluate-plan-stage-gap", "plan file", "evaluate --plan on stages edited by hand to leave a layer out",
         lambda t: ["evaluate", "--plan", _plan_file(t, lambda d: d["stages"][0].update(layers=[
             d["stages"][0]["layers"][0], d["stages"][0]["layers"][1] - 1]))], 2,
         ("stages",)),
    Case("evaluate-plan-with-cluster", "options", "evaluate --plan with --cluster, which the plan file fixes",
         lambda t: ["evaluate", "--plan", _plan_file(t, lambda d: None, restamp=True), "--cluster", "dgx-h100"], 2,
         ("--cluster: got 'dgx-h100'", "re-prices the plan file's own model, cluster")),
    # bad-input sweep: every bad field of a cluster file, number versions, mixed clusters, keys written twice
    _cluster_case(lambda d: (d["inter_node"].update(bandwidth_bytes_per_s=-1), d.update(devices_per_node=0),
                             d["device"]["peak_flops"].update(bf16="312e12")),
                  "error: device.peak_flops.bf16", "error: devices_per_node", "error: inter_node.bandwidth_bytes_per_s",
                  what="three bad fields in one cluster file: all reported at once", cid="cluster-several-bad-fields"),
    Case("plan-number-version", "plan file", "plan whose schema_version is the number 3, not a string",
         lambda t: ["explain", _plan_file(t, lambda d: d.update(schema_version=3))], 2,
         ('schema_version', 'must be a string like "2.1"', "not the number 3")),
    Case("opt-devices-per-node-mixed", "options", "--devices-per-node on a mixed cluster (its groups have their own)",
         lambda t: ["plan", "--model", "gpt-tiny", "--cluster", "mixed-a100-v100", "--devices-per-node", "4",
                    "--global-batch", "8"], 2, ("devices_per_node: got 4", "drop --devices-per-node")),
    Case("cluster-duplicate-key", "cluster", "a key written twice in a cluster file (was: the last one, silently)",
         lambda t: ["plan", "--model", "gpt-tiny", "--cluster",
                    _raw_file(t, "c.json", Path(_cluster_file(t, lambda d: None)).read_text()
                              .replace('"devices_per_node": 8', '"devices_per_node": 8, "devices_per_node": 4')),
                    "--global-batch", "8"], 2, ("devices_per_node", "got [8, 4]", "written twice")),
    # measured data of the user's own (validate --sweep / --published)
    Case("validate-sweep-missing", "validate", "validate --sweep naming a file that does not exist",
         lambda t: ["validate", "--source", "sweep", "--sweep", str(t / "nope.json")], 2,
         ("--sweep", "cannot read the measured data file", "check the path")),
    Case("validate-published-no-runs", "validate", "validate --published with a file that has no runs list",
         lambda t: ["validate", "--source", "published", "--published", _raw_file(t, "runs.json", '{"run": []}')], 2,
         ("--published", 'expected a JSON object with a "runs" list')),
    Case("validate-sweep-unknown-gpu", "validate", "validate --sweep on a GPU without a cluster preset",
         lambda t: ["validate", "--source", "sweep", "--sweep",
                    _raw_file(t, "sweep.json", '{"runs": [], "models": {}, "cluster": {"gpu": "X1"}}')], 2,
         ("cluster.gpu: got 'X1'", "name a GPU with a cluster preset")),
]
