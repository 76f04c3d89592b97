"""Train your own ``nn.Module`` with a plan: plan it once, then run the same script under torchrun.

    python docs/examples/train_module.py plan module.plan.json --devices 2          # search (no processes)
    python docs/examples/train_module.py plan module.plan.json --devices 2 --pp 2   # or price one layout
    torchrun --nproc-per-node 2 docs/examples/train_module.py train module.plan.json --steps 10
    python docs/examples/train_module.py single module.plan.json --steps 10         # plain PyTorch, to compare

The model is a small language model whose head reads the token embedding again (a skip across
pipeline stages). See docs/train-your-own-model.md.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, SEQ, HIDDEN = 256, 32, 64
LR, MAX_NORM = 1e-3, 1.0


class TinyLM(nn.Module):
    def __init__(self, layers: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(HIDDEN, 4 * HIDDEN), nn.GELU(), nn.Linear(4 * HIDDEN, HIDDEN)) for _ in range(layers))
        self.norm = nn.LayerNorm(HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.embed(tokens)
        h = e
        for block in self.blocks:
            h = h + block(h)
        return self.head(self.norm(h) + e)  # the skip: the head reads the embedding


def build_model(device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    with torch.device(device):  # "meta": no memory until parallelize materialises this rank's shards
        return TinyLM()


SAMPLE = torch.zeros(1, SEQ, dtype=torch.long)  # what the planner traces, and parallelize checks against


def my_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def my_loader(rank: int, world: int, global_batch: int, steps: int):
    """This data-parallel rank's rows of each global batch (random tokens here; your dataset in practice)."""
    rows = global_batch // world
    for step in range(steps):
        tokens = torch.randint(0, VOCAB, (global_batch, SEQ + 1), generator=torch.Generator().manual_seed(step))
        x, y = tokens[:, :-1], tokens[:, 1:]
        yield x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows]


def make_plan(path: str, devices: int, pp: int | None) -> None:
    from planner import ParallelConfig, evaluate, plan

    if pp is None:  # let the planner search every layout of `devices` CPU processes on one node
        p = plan(build_model("meta"), "cpu-local", global_batch=8, sample_input=SAMPLE, devices_per_node=devices,
                 dtype="fp32", baselines=False)
    else:
        config = ParallelConfig(pp=pp, dp=devices // pp, micro_batch_size=2, num_micro_batches=8 // (2 * (devices // pp)))
        p = evaluate(build_model("meta"), "cpu-local", config, sample_input=SAMPLE, devices_per_node=devices,
                     dtype="fp32")
    p.to_json(path, force=True)
    print(f"wrote {path}: {p.parallel.label()}")


def train(path: str, steps: int) -> None:
    import torch.distributed as dist

    from planner import Plan
    from runtime import parallelize

    plan = Plan.from_json(path)
    pm = parallelize(build_model(), plan, loss_fn=my_loss, sample_input=SAMPLE)
    opt = torch.optim.AdamW(pm.parameters(), lr=LR)
    for step, (x, y) in enumerate(my_loader(pm.data_rank, pm.data_world, plan.parallel.global_batch, steps), 1):
        loss = pm.step(x, y)  # forward + backward over the plan's micro-batches and schedule
        pm.clip_grad_norm_(MAX_NORM)
        opt.step()
        opt.zero_grad()
        if dist.get_rank() == 0:
            print(f"step {step} loss {loss:.6f}", flush=True)
    dist.destroy_process_group()


def single(path: str, steps: int) -> None:
    """The same training in one process with plain PyTorch: what every plan must reproduce."""
    from planner import Plan

    plan = Plan.from_json(path)
    model = build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    for step, (x, y) in enumerate(my_loader(0, 1, plan.parallel.global_batch, steps), 1):
        loss = my_loss(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        opt.step()
        opt.zero_grad()
        print(f"step {step} loss {loss.item():.6f}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("plan", "train", "single"))
    parser.add_argument("plan_path")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--pp", type=int, default=None)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    if args.command == "plan":
        make_plan(args.plan_path, args.devices, args.pp)
    elif args.command == "train":
        train(args.plan_path, args.steps)
    else:
        single(args.plan_path, args.steps)
