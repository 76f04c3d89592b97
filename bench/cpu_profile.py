"""Profile this machine as the runtime uses it: ``N`` local processes, gloo, the CPU's cores shared.

``python -m bench.cpu_profile --nproc N -o PROFILE.json`` starts ``N`` processes with as many
intra-op threads as the runtime gives each (``cpu_count // N``, at least one) and measures, with all
of them running at once:

* **collectives** (gloo over loopback): all-reduce, all-gather, reduce-scatter of 4 KiB .. 32 MiB per
  rank, and send/recv between rank pairs (0→1, 2→3, ... at the same time, as pipeline stages do);
  the mean wall seconds of each, over enough repetitions to span the scheduler's time slices;
* **overlap**: a GEMM loop alone, an all-reduce of 8 MiB alone (the loop sized to take as long), and
  both at once (the all-reduce started asynchronously before the GEMMs, waited for after them), each
  the least disturbed of seven interleaved repetitions. ``overlap = (t_gemm + t_comm − t_both) /
  min(t_gemm, t_comm)``: 1 when communication hides behind compute, 0 when the two take turns;
* **framework**: one training step of a small MLP stack alone (and its forward-backward and its
  optimizer step apart), under DDP, under FSDP2 and split in tensor-parallel pairs (what each framework
  costs per layer beyond its collectives), the least disturbed of five interleaved repetitions;
* **shares**: every process runs the same work at once, the least disturbed of five; ``share =
  t_alone / t_busy`` per process is the fraction of one process's lone speed it keeps while all ``N``
  are busy (about ``cores / N`` once ``N`` exceeds the cores). Three kinds of work, which contend
  differently below that: a fixed mix (GEMMs, element-wise ops, a small forward/backward:
  ``compute_share``, what host dispatch is stretched by), GEMMs alone (``gemm_share``: the peak FLOP/s;
  processes on their own cores hardly contend) and a memory stream alone (``memory_share``: the
  bandwidth, which the cores share).

The single-process micro-benchmarks (:func:`bench.cpu_calibration.profile_cpu`) run first, in
the parent, alone. :func:`planner.cost.cpu_calibration.cpu_profile_constants` and
:func:`~planner.cost.cpu_calibration.cpu_profile_cluster` turn the JSON into what the planner prices
with. This lives in ``bench/`` because it starts processes and uses ``torch.distributed``, which
``planner/`` never does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

SIZES = (4 << 10, 64 << 10, 1 << 20, 8 << 20, 32 << 20)  # bytes per rank
QUICK_SIZES = (64 << 10, 1 << 20)  # --quick: the smoke test
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "send_recv")


def _threads(nproc: int) -> int:
    """What runtime/launch.py gives each CPU worker."""
    return max(1, (os.cpu_count() or 1) // nproc)


def _mean_wall_s(fn, barrier, *, min_total_s: float = 0.08, max_reps: int = 200) -> float:
    """Mean wall seconds of ``fn`` over a block of repetitions at least ``min_total_s`` long (the mean,
    not the minimum: with more processes than cores, time-slicing is part of what each op costs)."""
    fn()
    barrier()
    start = time.perf_counter()
    fn()
    one = time.perf_counter() - start
    reps = int(min(max_reps, max(3, min_total_s / max(one, 1e-6))))
    reps = _agree(reps)
    barrier()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    barrier()
    return (time.perf_counter() - start) / reps


def _agree(value: int) -> int:
    """The largest of every rank's ``value`` (collectives need every rank to run the same count)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _collective(name: str, nbytes: int, rank: int, world: int):
    import torch
    import torch.distributed as dist

    numel = max(world, nbytes // 4 // world * world)
    if name == "all_reduce":
        x = torch.randn(numel)
        return lambda: dist.all_reduce(x)
    if name == "all_gather":  # nbytes: the gathered buffer
        out, part = torch.empty(numel), torch.randn(numel // world)
        return lambda: dist.all_gather_into_tensor(out, part)
    if name == "reduce_scatter":  # nbytes: the full buffer
        full, part = torch.randn(numel), torch.empty(numel // world)
        return lambda: dist.reduce_scatter_tensor(part, full)
    x = torch.randn(numel)
    peer = rank + 1 if rank % 2 == 0 else rank - 1
    if peer >= world:
        return lambda: None

    def send_recv() -> None:  # one message each way, as a pipeline's forward and backward sends are
        if rank % 2 == 0:
            dist.send(x, peer)
            dist.recv(x, peer)
        else:
            dist.recv(x, peer)
            dist.send(x, peer)

    return send_recv


def _work_mix():
    """A fixed mix of the work a training step does, on one process."""
    import torch

    torch.manual_seed(0)
    a, b = torch.randn(256, 512), torch.randn(512, 512)
    x = torch.randn(128, 4096)
    lin = torch.nn.Linear(256, 256)
    inp = torch.randn(64, 256)

    def mix() -> None:
        for _ in range(4):
            torch.mm(a, b)
        for _ in range(4):
            torch.nn.functional.gelu(x).add_(x)
        for _ in range(8):
            lin(torch.tanh(lin(inp))).sum().backward()

    return mix


def _share_loops() -> dict:
    """What each process runs at once to measure its share of the machine, by kind of work: the mix above
    (the host-bound share dispatch is stretched by), GEMMs alone (the arithmetic units: time-slicing
    divides them, two processes on two cores hardly contend) and a memory stream alone (the bandwidth
    the cores share, which processes on their own cores still contend for)."""
    import torch

    torch.manual_seed(0)
    a, b = torch.randn(384, 384), torch.randn(384, 384)
    src = torch.randn(4 << 20)
    dst = torch.empty_like(src)

    def gemm() -> None:
        for _ in range(12):
            torch.mm(a, b)

    def stream() -> None:
        for _ in range(4):
            dst.copy_(src)

    return {"mix": _work_mix(), "gemm": gemm, "stream": stream}


FRAMEWORK_BLOCKS = 4  # the framework micro-model: blocks of Linear(h, 4h), GELU, Linear(4h, h)
FRAMEWORK_HIDDEN = 64
FRAMEWORK_ROWS = 16
PIPELINE_MICRO_BATCHES = 4


def _framework_steps(rank: int, world: int, barrier) -> dict:
    """Seconds of one training step (forward, backward, AdamW) of a tiny MLP stack under plain DDP,
    FSDP2 (``fully_shard`` per block, resharded after forward: ZeRO-3) and, on an even world, tensor
    parallelism in pairs (``ColwiseParallel`` / ``RowwiseParallel``, torch's DTensor), plus the same
    model alone (no wrapper). The model is small so that what the step costs beyond compute is the
    framework's own per-layer work and its collectives."""
    import torch
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    from torch.nn.parallel import DistributedDataParallel

    h = FRAMEWORK_HIDDEN

    def build() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(*[nn.Sequential(nn.Linear(h, 4 * h), nn.GELU(), nn.Linear(4 * h, h))
                               for _ in range(FRAMEWORK_BLOCKS)])

    x = torch.randn(FRAMEWORK_ROWS, h)

    out = {}
    modes = {"alone": build(), "ddp": DistributedDataParallel(build())}
    fsdp = build()
    mesh = init_device_mesh("cpu", (world,))
    for block in fsdp:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(fsdp, mesh=mesh, reshard_after_forward=True)
    modes["fsdp"] = fsdp
    if world % 2 == 0:
        tp_mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))["tp"]
        tp = build()
        for block in tp:
            parallelize_module(block, tp_mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
        modes["tp"] = tp
    steps = {name: _stepper(model, x) for name, model in modes.items()}
    steps.update(_halves(build, x))
    if world % 2 == 0:
        steps.update(_pipeline_steps(build, x))
    reps: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(5):  # interleaved; the least disturbed of each
        for name, step in steps.items():
            reps[name].append(_mean_wall_s(step, barrier, min_total_s=0.1))
    out = {name: min(v) for name, v in reps.items()}
    out["blocks"] = FRAMEWORK_BLOCKS
    out["hidden"] = h
    out["rows"] = FRAMEWORK_ROWS
    out["pp_micro_batches"] = PIPELINE_MICRO_BATCHES
    return out


def _stepper(model, x):
    """One training step of ``model`` on ``x``: forward, backward, AdamW."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        model(x).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _halves(build, x) -> dict:
    """The lone step in its two parts, which scale differently: forward and backward run once per
    micro-batch, the optimizer's per-tensor loop once per step."""
    import torch

    model, stepped = build(), build()  # the optimizer's model keeps its gradients
    opt = torch.optim.AdamW(stepped.parameters(), lr=1e-4)

    def forward_backward() -> None:
        model(x).sum().backward()
        for p in model.parameters():
            p.grad = None

    def optimizer() -> None:
        opt.step()

    stepped(x).sum().backward()  # gradients for the optimizer's steps to read
    return {"alone_fwd_bwd": forward_backward, "alone_optimizer": optimizer}


def _pipeline_steps(build, x) -> dict:
    """Two-stage 1F1B (torch.distributed.pipelining, stages in rank pairs) of the framework model over
    ``PIPELINE_MICRO_BATCHES`` micro-batches of ``x``, and this rank's half of the model alone running
    the same micro-batches one after another (``pp_half_alone``)."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    world = torch.distributed.get_world_size()
    pp_mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "pp"))["pp"]
    index = pp_mesh.get_local_rank()
    half = FRAMEWORK_BLOCKS // 2
    part = build()[index * half:(index + 1) * half]
    m = PIPELINE_MICRO_BATCHES
    batch = x.repeat(m, 1)
    micro = x.clone()
    boundary = torch.empty(micro.shape, device="meta", requires_grad=True)
    stage = PipelineStage(part, index, 2, torch.device("cpu"), group=pp_mesh.get_group(),
                          input_args=micro if index == 0 else boundary, output_args=boundary)
    schedule = Schedule1F1B(stage, n_microbatches=m, loss_fn=lambda out, target: out.sum())
    opt = torch.optim.AdamW(part.parameters(), lr=1e-4)
    target = torch.zeros_like(batch)

    def pp_step() -> None:
        if index == 0:
            schedule.step(batch)
        else:
            schedule.step(target=target)
        opt.step()
        opt.zero_grad(set_to_none=True)

    alone = build()[index * half:(index + 1) * half]
    opt_alone = torch.optim.AdamW(alone.parameters(), lr=1e-4)

    def half_alone() -> None:
        for _ in range(m):
            alone(micro).sum().backward()
        opt_alone.step()
        opt_alone.zero_grad(set_to_none=True)

    return {"pp": pp_step, "pp_half_alone": half_alone}


def _worker(rank: int, world: int, store: str, queue, sizes: tuple[int, ...]) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(_threads(world))
    # A file store: a TCP port probed beforehand could be taken by another process before rank 0 binds it.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    barrier = dist.barrier
    out: dict = {"collectives": {}, "threads": torch.get_num_threads()}
    for name in COLLECTIVES:
        if name == "send_recv" and world < 2:
            continue
        points = []
        for nbytes in sizes:
            fn = _collective(name, nbytes, rank, world)
            t = _mean_wall_s(fn, barrier)
            if name == "send_recv":
                t /= 2  # two messages per call
            points.append({"message_bytes": nbytes, "seconds": t})
        out["collectives"][name] = points
    # Shares: the same work on every process at once, the least disturbed of five, as the measured bench
    # reads its runs (a burst of load would slow all)
    for kind, loop in _share_loops().items():
        out[f"{kind}_busy_s"] = min(_mean_wall_s(loop, barrier, min_total_s=0.2) for _ in range(5))
    # Overlap of an asynchronous all-reduce with GEMMs of about the same length (so neither hides in
    # the other's noise), the three measurements interleaved five times.
    g1, g2 = torch.randn(256, 512), torch.randn(512, 512)
    buf = torch.randn((8 << 20) // 4)

    def comm() -> None:
        dist.all_reduce(buf)

    t_comm = _mean_wall_s(comm, barrier, min_total_s=0.1)
    t_mm = _mean_wall_s(lambda: torch.mm(g1, g2), barrier, min_total_s=0.05)
    count = _agree(max(1, round(t_comm / max(t_mm, 1e-6))))

    def gemms() -> None:
        for _ in range(count):
            torch.mm(g1, g2)

    def both() -> None:
        work = dist.all_reduce(buf, async_op=True)
        gemms()
        work.wait()

    reps = []
    for _ in range(7):
        reps.append((_mean_wall_s(gemms, barrier, min_total_s=0.05), _mean_wall_s(comm, barrier, min_total_s=0.05),
                     _mean_wall_s(both, barrier, min_total_s=0.05)))
    # The least disturbed repetition of each (as profile_cpu takes the least CPU time): under other
    # users' load a process with a second busy thread (gloo's) gets a second share of the cores, which
    # would pass for overlap.
    out["overlap_gemm_s"] = min(r[0] for r in reps)
    out["overlap_comm_s"] = min(r[1] for r in reps)
    out["overlap_both_s"] = min(r[2] for r in reps)
    if world > 1:
        out["framework"] = _framework_steps(rank, world, barrier)
    queue.put((rank, out))
    dist.barrier()
    dist.destroy_process_group()


def profile(nproc: int, *, quick: bool = False) -> dict:
    """Measure everything above on ``nproc`` processes; the dict :func:`planner.cost.cpu_calibration.
    cpu_profile_constants` reads."""
    import torch.multiprocessing as mp

    from bench.cpu_calibration import profile_cpu

    alone = profile_cpu()  # in this process, alone, on one thread (CPU time)
    alone_s = _alone_share_loops(nproc)
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory(prefix="cpu-profile-") as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, args=(r, nproc, store, queue, QUICK_SIZES if quick else SIZES))
                 for r in range(nproc)]
        for p in procs:
            p.start()
        results = dict(queue.get() for _ in procs)
        for p in procs:
            p.join(timeout=60)
    # A collective ends when its slowest rank does: take the slowest rank's time per point.
    collectives = {}
    for name in results[0]["collectives"]:
        points = []
        for i, pt in enumerate(results[0]["collectives"][name]):
            worst = max(results[r]["collectives"][name][i]["seconds"] for r in results)
            points.append({"message_bytes": pt["message_bytes"], "seconds": worst})
        collectives[name] = points
    busy = {kind: statistics.median(results[r][f"{kind}_busy_s"] for r in results) for kind in alone_s}
    g = max(results[r]["overlap_gemm_s"] for r in results)
    c = max(results[r]["overlap_comm_s"] for r in results)
    both = max(results[r]["overlap_both_s"] for r in results)
    fraction = (g + c - both) / min(g, c)
    framework = {}
    if "framework" in results[0]:
        framework = {k: (max(results[r]["framework"][k] for r in results) if isinstance(v, float) else v)
                     for k, v in results[0]["framework"].items()}
    return {
        "framework": framework,
        "nproc": nproc,
        "cpu_count": os.cpu_count(),
        "threads_per_process": results[0]["threads"],
        "alone": dataclasses.asdict(alone),
        "mix_alone_s": alone_s["mix"],
        "mix_busy_s": busy["mix"],
        "compute_share": min(1.0, alone_s["mix"] / busy["mix"]),
        "gemm_share": min(1.0, alone_s["gemm"] / busy["gemm"]),
        "memory_share": min(1.0, alone_s["stream"] / busy["stream"]),
        "collectives": collectives,
        "overlap": {"gemm_s": g, "comm_s": c, "both_s": both,
                    "fraction": max(0.0, min(1.0, fraction))},
    }


def _alone_share_loops(nproc: int) -> dict[str, float]:
    """CPU seconds of each :func:`_share_loops` loop in this process, alone, with a worker's threads."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(_threads(nproc))
    try:
        alone_s = {}
        for kind, loop in _share_loops().items():
            loop()
            alone_s[kind] = min(_time(loop) for _ in range(5))
        return alone_s
    finally:
        torch.set_num_threads(threads)


def _time(fn) -> float:
    """CPU seconds of ``fn`` (the lone speed, as profile_cpu measures it: other users do not count)."""
    start = time.process_time()
    fn()
    return time.process_time() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_profile", description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2, help="local processes (the runtime's --nproc)")
    parser.add_argument("-o", "--output", required=True, help="where to write the profile JSON")
    parser.add_argument("--quick", action="store_true", help="two message sizes only (the bench's smoke run)")
    parser.add_argument("--cluster-out", help="also write the cluster file the planner prices with (plan --cluster)")
    parser.add_argument("--constants-out", help="also write its cost constants (plan --constants)")
    args = parser.parse_args(argv)
    if args.nproc < 1:
        print("error: --nproc must be at least 1", file=sys.stderr)
        return 2
    data = profile(args.nproc, quick=args.quick)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(data, indent=1) + "\n")
    if args.cluster_out or args.constants_out:
        from planner.cost.cpu_calibration import cpu_profile_cluster, cpu_profile_constants

        if args.cluster_out:
            Path(args.cluster_out).write_text(json.dumps(cpu_profile_cluster(data).to_dict(), indent=1) + "\n")
        if args.constants_out:
            Path(args.constants_out).write_text(json.dumps(cpu_profile_constants(data).to_dict(), indent=1) + "\n")
    print(json.dumps({k: v for k, v in data.items() if k != "collectives"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
