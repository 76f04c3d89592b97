"""Measure the world this runs in and write a cluster JSON the planner reads (docs/cluster.md).

``python -m runtime profile-cluster -o my-cluster.json`` starts ``--nproc`` local processes (or joins
the ones ``torchrun`` started) and measures, the way nccl-tests reports it:

* **collectives**: all-reduce, all-gather, reduce-scatter, all-to-all and send/recv over message
  sizes from ``--min-bytes`` to ``--max-bytes`` (x4 steps), on the first 1, 2, 4, … whole nodes
  and on all of them. Each size: warm-up, then ``--iterations`` timed samples; a sample's time is
  the slowest rank's, the point is their median. Bus bandwidth from the full buffer ``S`` and the
  time ``t`` (nccl-tests' PERFORMANCE.md): all-reduce ``2(n−1)/n·S/t``; all-gather, reduce-scatter
  and all-to-all ``(n−1)/n·S/t``; send/recv (every rank sends to the next) ``S/t``.
* **gemm**: achieved FLOP/s of a handful of ``(m, n, k)`` shapes in the training dtype (fp32 on
  the CPU, bf16 on GPUs), on every rank at once (as training runs them); the mean over ranks.
* **memory** (CUDA only): the memory held outside PyTorch's allocator after NCCL and cuBLAS have
  run (``mem_get_info`` total − free − the allocator's reserve), the largest over ranks. The CPU
  has no device memory to measure, so the field is left out.

The device and link figures (the alpha-beta fallback outside the measured range) come from
``--base``, a preset or a cluster file; nodes and devices per node are the world's. Rank 0
checks the result with the planner's own loader before writing it.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from planner.cluster import ClusterSpec
from planner.cost.measured import format_bytes
from planner.errors import SpecError
from planner.output_paths import check_output_file
from runtime.errors import RunCheckError

KiB, MiB, GiB = 2**10, 2**20, 2**30
# The CPU shapes span what the small presets run (m = micro-batch x sequence); the GPU ones a
# transformer's projections and MLPs, from thin to large, and attention's head-dim GEMMs.
CPU_GEMMS = ((128, 128, 128), (512, 128, 128), (512, 512, 128), (512, 128, 512), (512, 512, 512),
             (1024, 1024, 1024), (2048, 64, 64), (2048, 256, 256))
GPU_GEMMS = ((1024, 1024, 1024), (2048, 2048, 2048), (4096, 4096, 4096), (8192, 8192, 8192),
             (8192, 1024, 8192), (8192, 8192, 1024), (16384, 4096, 4096), (2048, 16384, 4096),
             (16384, 128, 2048), (16384, 2048, 128))
# Names a GPU reports, and the preset whose links describe its usual node.
GPU_PRESETS = (("GB300", "gb300-nvl72"), ("GB200", "gb200-nvl72"), ("B200", "dgx-b200"),  # most specific first
               ("H200", "dgx-h200"), ("H100", "dgx-h100"), ("A100-SXM4-80GB", "dgx-a100-80g"),
               ("A100", "dgx-a100-40g"), ("V100", "dgx1-v100"))


@dataclass(frozen=True, kw_only=True)
class ProfileOptions:
    output: str
    base: str | None = None
    min_bytes: int = 4 * KiB
    max_bytes: int | None = None  # default: 64 MiB on the CPU, 1 GiB on GPUs
    iterations: int = 5
    warmup: int = 2
    timeout_s: float = 120.0
    force: bool = False
    verbose: bool = True

    def __post_init__(self) -> None:
        for name in ("min_bytes", "iterations"):
            if getattr(self, name) < 1:
                raise RunCheckError(f"--{name.replace('_', '-')}: got {getattr(self, name)}; expected >= 1")
        if self.max_bytes is not None and self.max_bytes < self.min_bytes:
            raise RunCheckError(f"--max-bytes: got {self.max_bytes}, below --min-bytes {self.min_bytes}")
        check_output_file("--output", self.output, force=self.force)  # before measuring anything
        if not Path(self.output).resolve().parent.is_dir():
            raise RunCheckError(f"-o: the folder of {self.output} does not exist; create it first")


def message_sizes(min_bytes: int, max_bytes: int) -> list[int]:
    """``min_bytes``, ×4, … up to ``max_bytes`` (included)."""
    sizes, s = [], min_bytes
    while s < max_bytes:
        sizes.append(s)
        s *= 4
    return sizes + [max_bytes]


def node_counts(nodes: int) -> list[int]:
    """1, 2, 4, … and ``nodes``: the curves' node axis."""
    out = sorted({2**i for i in range(int(math.log2(nodes)) + 1)} | {nodes})
    return out


def bus_bandwidth(collective: str, nbytes: float, n: int, seconds: float) -> float:
    """nccl-tests' busbw of ``collective`` moving the full buffer ``nbytes`` among ``n`` ranks in ``seconds``."""
    algbw = nbytes / seconds
    if collective == "all_reduce":
        return algbw * 2 * (n - 1) / n
    if collective == "send_recv":
        return algbw
    return algbw * (n - 1) / n


# torch 2.13 renamed the tensor forms (the old names warn); both take (output, input).
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _collective_op(collective: str, numel: int, n: int, rank: int, ranks: list[int], group, device: torch.device):
    """A closure running one ``collective`` on a buffer of ``numel`` fp32 (``numel`` divisible by ``n``)."""
    full = torch.ones(numel, dtype=torch.float32, device=device)
    part = torch.empty(numel // n, dtype=torch.float32, device=device)
    out = torch.empty(numel, dtype=torch.float32, device=device)
    if collective == "all_reduce":
        return lambda: dist.all_reduce(full, group=group)
    if collective == "all_gather":
        return lambda: _ALL_GATHER(out, part, group=group)
    if collective == "reduce_scatter":
        return lambda: _REDUCE_SCATTER(part, full, group=group)
    if collective == "all_to_all":
        return lambda: dist.all_to_all_single(out, full, group=group)
    me = ranks.index(rank)
    nxt, prv = ranks[(me + 1) % n], ranks[(me - 1) % n]

    def send_recv() -> None:
        ops = [dist.P2POp(dist.isend, full, nxt, group), dist.P2POp(dist.irecv, out, prv, group)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    return send_recv


def _median_time(op, group, device: torch.device, *, iterations: int, warmup: int, inner: int) -> float:
    """Median over ``iterations`` samples of the slowest rank's seconds per call (``inner`` calls a sample)."""
    for _ in range(warmup):
        op()
    flag = torch.zeros(1, device=device)
    samples = []
    for _ in range(iterations):
        dist.all_reduce(flag, group=group)  # start together
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            op()
        _sync(device)
        samples.append((time.perf_counter() - t0) / inner)
    slowest = torch.tensor(samples, dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
    return statistics.median(slowest.tolist())


def measure_collectives(opts: ProfileOptions, device: torch.device, local: int, nodes: int,
                        max_bytes: int) -> dict[str, list[dict[str, Any]]]:
    """Bus bandwidth points per collective, on the first 1, 2, 4, … whole nodes (every rank calls this)."""
    rank = dist.get_rank()
    out: dict[str, list[dict[str, Any]]] = {k: [] for k in ("all_reduce", "all_gather", "reduce_scatter",
                                                            "all_to_all", "send_recv")}
    for k in node_counts(nodes):
        ranks = list(range(k * local))
        n = len(ranks)
        group = None if n == dist.get_world_size() else dist.new_group(ranks)  # every rank creates every group
        if n < 2 or rank not in ranks:
            continue
        for collective in out:
            for size in message_sizes(opts.min_bytes, max_bytes):
                numel = max(n, (size // 4) // n * n)
                op = _collective_op(collective, numel, n, rank, ranks, group, device)
                seconds = _median_time(op, group, device, iterations=opts.iterations, warmup=opts.warmup,
                                       inner=4 if size < MiB else 1)
                nbytes = numel * 4
                out[collective].append({"nodes": k, "message_bytes": nbytes, "bus_bandwidth_bytes_per_s":
                                        _round(bus_bandwidth(collective, nbytes, n, seconds))})
    return out


def measure_gemm(device: torch.device, dtype: torch.dtype, shapes, *, iterations: int) -> list[float]:
    """Achieved FLOP/s of each ``(m, n, k)`` on this rank: median of ``iterations`` timed calls."""
    rates = []
    for m, n, k in shapes:
        a = torch.randn(m, k, dtype=dtype, device=device)
        b = torch.randn(k, n, dtype=dtype, device=device)
        torch.mm(a, b)
        _sync(device)
        times = []
        for _ in range(iterations):
            t0 = time.perf_counter()
            torch.mm(a, b)
            _sync(device)
            times.append(time.perf_counter() - t0)
        rates.append(2.0 * m * n * k / statistics.median(times))
    return rates


def measure_memory(device: torch.device) -> dict[str, int] | None:
    """Bytes held outside PyTorch's allocator (CUDA context, NCCL, cuBLAS); ``None`` on the CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    outside = torch.tensor([total - free - torch.cuda.memory_reserved(device)], dtype=torch.float64, device=device)
    dist.all_reduce(outside, op=dist.ReduceOp.MAX)
    return {"reserved_bytes": int(outside.item())}


def default_base(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu-local"
    name = torch.cuda.get_device_name(device)
    for marker, preset in GPU_PRESETS:
        if marker in name:
            return preset
    raise RunCheckError(f"--base: no preset describes a node of {name}; pass --base with a preset or a cluster "
                        "file whose device and links describe this machine")


def load_base(base: str) -> ClusterSpec:
    try:
        spec = ClusterSpec.from_json(base) if base.endswith(".json") or os.path.sep in base else ClusterSpec.preset(base)
    except SpecError as exc:
        raise RunCheckError(f"--base: {exc}") from exc
    if not spec.is_homogeneous:
        raise RunCheckError(f"--base: {base} is a mixed cluster; profile each kind of node with its own base")
    return spec


def build_cluster(base: ClusterSpec, *, name: str, nodes: int, devices_per_node: int, backend: str,
                  collectives: dict | None, gemm: list[dict] | None, memory: dict | None) -> dict[str, Any]:
    """The cluster JSON: ``base``'s device and links, this world's shape, the measured fields."""
    d = base.to_dict()
    for key in ("collectives", "gemm", "memory"):
        d.pop(key, None)
    d.update(name=name, nodes=nodes, devices_per_node=devices_per_node,
             description=f"Measured by profile-cluster on {nodes} node(s) x {devices_per_node} {backend} rank(s); "
                         f"device and links (the fallback outside the measured range) from {base.name}.")
    if collectives:
        d["collectives"] = {k: v for k, v in collectives.items() if v}
    if gemm:
        d["gemm"] = gemm
        # A peak below an achieved rate is impossible (cpu-local's is a rough guess): raise it to the
        # fastest GEMM measured, so MFU stays a fraction and unmeasured shapes are not priced slower.
        peaks = d["device"]["peak_flops"]
        for dtype in {g["dtype"] for g in gemm}:
            fastest = max(g["flops_per_s"] for g in gemm if g["dtype"] == dtype)
            if fastest > peaks.get(dtype, math.inf):
                peaks[dtype] = fastest
                d["description"] += f" Peak {dtype} raised to the fastest GEMM measured."
    if memory:
        d["memory"] = memory
    try:
        ClusterSpec.from_dict(d, source=name)
    except SpecError as exc:
        raise RunCheckError(f"the measured cluster does not load: {exc}") from exc
    return d


def profile(opts: ProfileOptions) -> dict[str, Any] | None:
    """One rank's part; rank 0 writes the file and returns the cluster dict."""
    from runtime.launch import init_distributed

    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    init_distributed(opts.timeout_s)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    world = dist.get_world_size()
    if world % local:
        raise RunCheckError(f"WORLD_SIZE {world} is not a multiple of LOCAL_WORLD_SIZE {local}: profile-cluster "
                            "needs the same number of processes on every node")
    nodes = world // local
    base = load_base(opts.base or default_base(device))
    max_bytes = opts.max_bytes or (GiB if cuda else 64 * MiB)
    collectives = measure_collectives(opts, device, local, nodes, max_bytes) if world > 1 else None
    dtype, dtype_name, shapes = (torch.bfloat16, "bf16", GPU_GEMMS) if cuda else (torch.float32, "fp32", CPU_GEMMS)
    rates = torch.tensor(measure_gemm(device, dtype, shapes, iterations=opts.iterations), dtype=torch.float64,
                         device=device)
    dist.all_reduce(rates)
    gemm = [{"m": m, "n": n, "k": k, "dtype": dtype_name, "flops_per_s": _round(r / world)}
            for (m, n, k), r in zip(shapes, rates.tolist())]
    memory = measure_memory(device)
    if dist.get_rank() != 0:
        return None
    d = build_cluster(base, name=Path(opts.output).stem, nodes=nodes, devices_per_node=local,
                      backend="nccl" if cuda else "gloo", collectives=collectives, gemm=gemm, memory=memory)
    Path(opts.output).write_text(dumps_cluster(d))
    if opts.verbose:
        print(summary(d, opts.output), flush=True)
    return d


def dumps_cluster(d: dict[str, Any]) -> str:
    """The cluster JSON with one measured point per line (the file stays readable)."""
    compact: dict[str, str] = {}

    def one_line(point: dict) -> str:
        key = f"@@{len(compact)}@@"
        compact[key] = json.dumps(point)
        return key

    out = dict(d)
    if "collectives" in out:
        out["collectives"] = {k: [one_line(p) for p in v] for k, v in out["collectives"].items()}
    if "gemm" in out:
        out["gemm"] = [one_line(p) for p in out["gemm"]]
    text = json.dumps(out, indent=2)
    for key, value in compact.items():
        text = text.replace(f'"{key}"', value)
    return text + "\n"


def _round(x: float) -> float:
    """Four significant digits: more than the run-to-run noise of any of these measurements."""
    return float(f"{x:.4g}")


def summary(d: dict[str, Any], path: str) -> str:
    """A few lines a person reads: the largest message's bus bandwidth per collective and node count."""
    lines = [f"wrote {path}: {d['nodes']} node(s) x {d['devices_per_node']} {d['device']['name']}; "
             "largest message's bus bandwidth per collective:"]
    for name, points in d.get("collectives", {}).items():
        best: dict[int, dict] = {}
        for p in points:
            if p["message_bytes"] >= best.get(p["nodes"], {"message_bytes": -1})["message_bytes"]:
                best[p["nodes"]] = p
        lines.append(f"  {name:15s}" + "; ".join(
            f"{k} node(s): {p['bus_bandwidth_bytes_per_s'] / 1e9:.3g} GB/s at {format_bytes(p['message_bytes'])}"
            for k, p in sorted(best.items())))
    if "collectives" not in d:
        lines.append("  collectives: not measured (one process; start two or more)")
    for g in d.get("gemm", []):
        lines.append(f"  gemm {g['m']}x{g['n']}x{g['k']} {g['dtype']}: {g['flops_per_s'] / 1e9:.3g} GFLOP/s")
    if "memory" in d:
        lines.append(f"  memory outside the allocator: {d['memory']['reserved_bytes'] / GiB:.2f} GiB")
    return "\n".join(lines)


def profile_worker(opts: ProfileOptions) -> dict[str, Any] | None:
    """What each process runs (under torchrun, or started by :func:`run`)."""
    try:
        return profile(opts)
    except RunCheckError as exc:
        print(f"error (rank {os.environ.get('RANK', '0')}): {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(opts: ProfileOptions, nproc: int | None) -> int:
    """Join torchrun's processes, or start ``nproc`` local ones (default: the GPUs, else 2)."""
    from runtime.launch import WorkersFailed, in_torchrun, launch_workers

    if in_torchrun():
        profile_worker(opts)
        return 0
    if nproc is None:
        nproc = torch.cuda.device_count() if torch.cuda.is_available() else 2
    if nproc < 1:
        raise RunCheckError(f"--nproc: got {nproc}; expected >= 1")
    try:
        launch_workers(nproc, profile_worker, opts)
    except WorkersFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0
