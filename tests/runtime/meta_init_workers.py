"""Workers of test_parallelize_meta_init.py: models built on the meta device, parallelized on each rank."""

from __future__ import annotations

import json

import torch
import torch.distributed as dist
from torch import nn

from planner.plan import Plan
from runtime import parallelize

SAMPLE = torch.zeros(1, 8, dtype=torch.long)


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 16)
        self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))
        self.head = nn.Linear(16, 64, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def _loss(out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out.flatten(0, 1), targets.flatten())


def tied_copies(plan_text: str) -> dict:
    """Each rank's copy of the tied weight, and each rank's first-block weight, after parallelize on meta."""
    plan = Plan.from_dict(json.loads(plan_text))
    torch.manual_seed(dist.get_rank() if dist.is_initialized() else 0)  # ranks initialise differently
    with torch.device("meta"):
        model = TiedLM()
    pm = parallelize(model, plan, loss_fn=_loss, sample_input=SAMPLE)
    torch.manual_seed(100 + dist.get_rank())
    sd = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in pm.state_dict().items()}
    tied = sd.get("embed.weight", sd.get("head.weight"))
    return {"tied": tied, "block0": sd.get("blocks.0.weight")}


class FlatMLP(nn.Module):
    """No stack of layers: the planner plans it as one layer named after its class."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 4)
        self.scale = nn.Parameter(torch.ones(4))  # a parameter of the root itself

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x))) * self.scale


def flat_batches(steps: int, rows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(rows, 12, generator=g), torch.randint(0, 4, (rows,), generator=g)) for _ in range(steps)]


def flat_losses(plan_text: str, steps: int) -> list[float]:
    """The global loss of each step of FlatMLP under the plan (this rank's rows of each global batch)."""
    plan = Plan.from_dict(json.loads(plan_text))
    torch.manual_seed(0)
    pm = parallelize(FlatMLP(), plan, loss_fn=nn.functional.cross_entropy, sample_input=torch.zeros(1, 12))
    optim = torch.optim.AdamW(pm.parameters(), lr=0.05)
    rows = plan.parallel.micro_batch_size * plan.parallel.num_micro_batches
    out = []
    for x, y in flat_batches(steps, rows * plan.parallel.dp):
        mine = slice(pm.data_rank * rows, (pm.data_rank + 1) * rows)
        out.append(pm.step(x[mine], y[mine]))
        optim.step()
        optim.zero_grad(set_to_none=True)
    return out


def _tied_batches(steps: int, rows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        t = torch.randint(0, 64, (rows, 9), generator=g)
        out.append((t[:, :-1], t[:, 1:]))
    return out


def tied_resume(first_text: str, second_text: str, folder: str) -> list[float]:
    """TiedLM: 2 steps under the first plan, saved (model and AdamW state); then loaded under the second plan
    and one more step. Returns the 3 global losses (the same data, this rank's rows of each batch)."""
    losses = []
    batches = None
    for text, steps in ((first_text, (0, 1)), (second_text, (2,))):
        plan = Plan.from_dict(json.loads(text))
        torch.manual_seed(0)
        pm = parallelize(TiedLM(), plan, loss_fn=_loss, sample_input=SAMPLE)
        optim = torch.optim.AdamW(pm.parameters(), lr=0.01)
        if steps == (2,):
            pm.load(folder, optimizer=optim)
        rows = plan.parallel.micro_batch_size * plan.parallel.num_micro_batches
        batches = _tied_batches(3, rows * plan.parallel.dp)
        for i in steps:
            x, y = batches[i]
            mine = slice(pm.data_rank * rows, (pm.data_rank + 1) * rows)
            losses.append(pm.step(x[mine], y[mine]))
            optim.step()
            optim.zero_grad(set_to_none=True)
        if steps == (0, 1):
            pm.save(folder, step=2, optimizer=optim)
    return losses
