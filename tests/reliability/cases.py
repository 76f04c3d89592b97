"""Bad inputs and the answers they get. Each case runs the CLI in-process (or a Python call).

A case is ``(id, area, what, argv_or_callable, expected_exit, fragments)``: the test asserts the
exit code, that every fragment appears in stderr, and that no traceback is printed.
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


def _plan_file(tmp: Path, mutate) -> str:
    from planner.cli import main

    path = tmp / "plan.json"
    if not path.exists():
        main(["evaluate", *TINY, "--global-batch", "8", "--tp", "1", "--pp", "2", "--dp", "1", "--micro-batch", "2",
              "-o", str(path), "--json"])
    d = json.loads(path.read_text())
    mutate(d)
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
    Case("model-unknown-preset", "model", "misspelt model preset",
         lambda t: ["plan", "--model", "gpt3-175", "--cluster", "cpu-local", "--global-batch", "8"], 2,
         ("no such model preset", "gpt3-175b")),
    Case("model-seq-too-long", "model", "sequence longer than the model's positions",
         lambda t: ["plan", *TINY, "--global-batch", "8", "--seq-len", "4096"], 2, ("seq_len", "--seq-len <= 64")),
    # -- options ------------------------------------------------------------------------------
    Case("opt-zero-batch", "options", "global batch 0", lambda t: ["plan", *TINY, "--global-batch", "0"], 2,
         ("global_batch", "positive integer")),
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
         ("no configuration", "GiB over", "the largest part is optimizer", "--nodes 5")),
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
    # -- running a plan (checked before any process starts) -------------------------------------
    Case("run-world-size", "runtime", "plan for 2 devices launched on 4 processes",
         lambda t: ["run", _plan_file(t, lambda d: None), "--nproc", "4", "--steps", "1"], 2, ("world",), "runtime"),
    Case("run-model-changed", "runtime", "plan whose model fingerprint no longer matches the model",
         lambda t: ["run", _plan_file(t, lambda d: d["model"].update(fingerprint="sha256:0000000000000000")),
                    "--nproc", "2", "--steps", "1"], 2, ("model.fingerprint", "--allow-mismatch"), "runtime"),
    Case("run-async-schedule", "runtime", "plan with an asynchronous schedule the runtime does not run",
         lambda t: ["run", _plan_file(t, lambda d: d["parallel"].update(schedule="pipedream")),
                    "--nproc", "2", "--steps", "1"], 2, ("pipedream", "1f1b"), "runtime"),
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
]
