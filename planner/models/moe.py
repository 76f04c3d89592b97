"""A top-k mixture-of-experts feed-forward whose traced FLOPs are those of top-k routing.

Routing (Mixtral / GShard style): a linear router scores each token against ``E`` experts, the
top ``k`` are kept and their scores softmax-normalised. Dispatch is *dense with capacity*:
every expert gets a fixed buffer of ``C = ceil(k · T · capacity_factor / E)`` token slots
(``T`` tokens in the micro-batch); token-expert pairs are placed in order (all first choices
before second choices, as in GShard), and pairs beyond an expert's capacity are dropped (they
contribute zero). The experts then run as three batched GEMMs over ``[E, C, ·]``, so

    expert FLOPs = 3 · 2 · E · C · hidden · ffn ≈ 3 · 2 · (k · T · capacity_factor) · hidden · ffn,

i.e. exactly top-k compute at ``capacity_factor = 1`` with balanced routing, which is what a
planner should assume. Gather and scatter are index operations (memory traffic, no FLOPs).
All shapes are static and nothing calls ``.item()``, so this traces with ``torch.fx`` and runs
on the meta device; on real data it computes the same function as a per-expert loop whenever no
pair overflows (tested).

The expert weights are stacked parameters ``[E, hidden, ffn]`` / ``[E, ffn, hidden]``, so an
expert-parallel split is a split of dim 0. The load-balancing auxiliary loss is not modelled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MoEFeedForward(nn.Module):
    """SwiGLU experts with top-k routing; ``forward(x[b, s, h]) -> [b, s, h]``."""

    def __init__(self, hidden: int, ffn: int, *, num_experts: int, top_k: int = 2,
                 capacity_factor: float = 1.0) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"MoEFeedForward.top_k: got {top_k}; "
                             f"expected 1 <= top_k <= num_experts={num_experts}")
        if capacity_factor <= 0:
            raise ValueError(f"MoEFeedForward.capacity_factor: got {capacity_factor}; expected > 0")
        self.num_experts = num_experts
        self.top_k = top_k
        # Integer percent keeps the capacity arithmetic on ints, which fx can trace symbolically.
        self.capacity_percent = round(capacity_factor * 100)
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.w_gate = nn.Parameter(torch.empty(num_experts, hidden, ffn))
        self.w_up = nn.Parameter(torch.empty(num_experts, hidden, ffn))
        self.w_down = nn.Parameter(torch.empty(num_experts, ffn, hidden))
        for w in (self.w_gate, self.w_up, self.w_down):
            nn.init.normal_(w, std=0.02)

    def capacity(self, tokens: int) -> int:
        """Slots per expert for ``tokens`` tokens: ceil(k · T · capacity_factor / E)."""
        den = 100 * self.num_experts
        return (self.top_k * tokens * self.capacity_percent + den - 1) // den

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape[0], x.shape[1], x.shape[2]
        tokens = b * s
        e, k = self.num_experts, self.top_k
        cap = self.capacity(tokens)
        flat = x.reshape(tokens, h)
        top = self.router(flat).topk(k, dim=-1)
        top_logits, top_idx = top[0], top[1]
        top_w = F.softmax(top_logits.float(), dim=-1).to(x.dtype)
        # Choice-major order: every token's first choice is placed before any second choice.
        expert = top_idx.t().reshape(-1)  # [k·T]
        onehot = (expert.unsqueeze(1) == torch.arange(e, device=x.device)).long()
        position = (onehot.cumsum(0) * onehot).sum(1) - 1  # slot within its expert
        slot = torch.where(position < cap, expert * cap + position, torch.full_like(position, e * cap))
        source = torch.arange(tokens, device=x.device).repeat(k)
        buffer = flat.new_zeros((e * cap + 1, h)).index_add(0, slot, flat[source])
        expert_in = buffer[:-1].view(e, cap, h)
        act = F.silu(torch.bmm(expert_in, self.w_gate)) * torch.bmm(expert_in, self.w_up)
        expert_out = torch.bmm(act, self.w_down).reshape(e * cap, h)
        expert_out = torch.cat([expert_out, expert_out.new_zeros(1, h)])  # the overflow slot gives zero
        weights = top_w.t().reshape(-1, 1)
        y = (expert_out[slot] * weights).view(k, tokens, h).sum(0)
        return y.view(b, s, h)
