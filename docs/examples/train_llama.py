"""Train a Hugging Face ``LlamaForCausalLM`` with a plan: plan it once, then run the script under torchrun.

    python docs/examples/train_llama.py plan llama.plan.json --devices 2 --pp 2    # price pp=2 (no processes)
    python docs/examples/train_llama.py plan llama.plan.json --devices 2           # or let the planner search
    torchrun --nproc-per-node 2 docs/examples/train_llama.py train llama.plan.json --steps 10
    python docs/examples/train_llama.py single llama.plan.json --steps 10          # plain PyTorch, to compare

The model comes from a small config (no download). For a real checkpoint build it on the meta
device and pass ``checkpoint="path/to/hf-folder"`` (its ``*.safetensors`` files are read shard by
shard) and ``init_fn`` (see docs/train-your-own-model.md).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

SEQ, LR = 32, 1e-3


def build_model(device: str = "cpu"):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config)


SAMPLE = {"input_ids": torch.zeros(1, SEQ, dtype=torch.long)}  # what the planner traces


def my_loss(output, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of one micro-batch; ``output`` is the model's ``CausalLMOutputWithPast``."""
    logits = output.logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def my_loader(rank: int, world: int, global_batch: int, steps: int):
    """This data-parallel rank's rows of each global batch (random tokens here; your dataset in practice)."""
    rows = global_batch // world
    for step in range(steps):
        tokens = torch.randint(0, 256, (global_batch, SEQ + 1), generator=torch.Generator().manual_seed(step))
        x, y = tokens[:, :-1], tokens[:, 1:]
        yield {"input_ids": x[rank * rows:(rank + 1) * rows]}, y[rank * rows:(rank + 1) * rows]


def make_plan(path: str, devices: int, pp: int | None) -> None:
    from planner import ParallelConfig, evaluate, plan

    if pp is None:
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
    for step, (inputs, targets) in enumerate(my_loader(pm.data_rank, pm.data_world, plan.parallel.global_batch,
                                                       steps), 1):
        loss = pm.step(inputs, targets)
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
    for step, (inputs, targets) in enumerate(my_loader(0, 1, plan.parallel.global_batch, steps), 1):
        loss = my_loss(model(**inputs), targets)
        loss.backward()
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
