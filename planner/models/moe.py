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
expert-parallel split is a split of dim 0 (:mod:`runtime.expert_parallel`). ``shared_experts``
(DeepSeek-V2/V3) adds a dense SwiGLU of ``shared_experts · ffn`` that every token passes through.
The load-balancing auxiliary loss is not modelled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from planner.models.blocks import FeedForward


class MoEFeedForward(nn.Module):
    """SwiGLU experts with top-k routing; ``forward(x[b, s, h]) -> [b, s, h]``."""

    def __init__(self, hidden: int, ffn: int, *, num_experts: int, top_k: int = 2,
                 capacity_factor: float = 1.0, shared_experts: int = 0) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"MoEFeedForward.top_k: got {top_k}; "
                             f"expected 1 <= top_k <= num_experts={num_experts}")
        if capacity_factor <= 0:
            raise ValueError(f"MoEFeedForward.capacity_factor: got {capacity_factor}; expected > 0")
        self.num_experts = num_experts
        self.top_k = top_k
        self.hidden = hidden
        # Integer percent keeps the capacity arithmetic on ints, which fx can trace symbolically.
        self.capacity_percent = round(capacity_factor * 100)
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.w_gate = nn.Parameter(torch.empty(num_experts, hidden, ffn))
        self.w_up = nn.Parameter(torch.empty(num_experts, hidden, ffn))
        self.w_down = nn.Parameter(torch.empty(num_experts, ffn, hidden))
        for w in (self.w_gate, self.w_up, self.w_down):
            nn.init.normal_(w, std=0.02)
        self.shared = FeedForward(hidden, shared_experts * ffn, activation="swiglu", bias=False) \
            if shared_experts else None

    def capacity(self, tokens: int) -> int:
        """Slots per expert for ``tokens`` tokens: ceil(k · T · capacity_factor / E)."""
        den = 100 * self.num_experts
        return (self.top_k * tokens * self.capacity_percent + den - 1) // den

    def route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(slot [k·T], weight [k·T, 1], capacity)`` of the ``T`` tokens ``flat [T, h]``: each
        token-expert pair's slot in the ``[E·C + 1]`` buffer (``E·C``: dropped) and its gate weight."""
        tokens = flat.shape[0]
        e, k = self.num_experts, self.top_k
        cap = self.capacity(tokens)
        top = self.router(flat).topk(k, dim=-1)
        top_logits, top_idx = top[0], top[1]
        top_w = F.softmax(top_logits.float(), dim=-1).to(flat.dtype)
        # Choice-major order: every token's first choice is placed before any second choice.
        expert = top_idx.t().reshape(-1)  # [k·T]
        onehot = (expert.unsqueeze(1) == torch.arange(e, device=flat.device)).long()
        position = (onehot.cumsum(0) * onehot).sum(1) - 1  # slot within its expert
        slot = torch.where(position < cap, expert * cap + position, torch.full_like(position, e * cap))
        return slot, top_w.t().reshape(-1, 1), cap

    def experts_forward(self, expert_in: torch.Tensor) -> torch.Tensor:
        """The experts on their slots: ``[E, C, h] -> [E, C, h]`` (three batched GEMMs)."""
        act = F.silu(torch.bmm(expert_in, self.w_gate)) * torch.bmm(expert_in, self.w_up)
        return torch.bmm(act, self.w_down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape[0], x.shape[1], x.shape[2]
        tokens = b * s
        e, k = self.num_experts, self.top_k
        flat = x.reshape(tokens, h)
        slot, weights, cap = self.route(flat)
        source = torch.arange(tokens, device=x.device).repeat(k)
        buffer = flat.new_zeros((e * cap + 1, h)).index_add(0, slot, flat[source])
        expert_out = self.experts_forward(buffer[:-1].view(e, cap, h)).reshape(e * cap, h)
        expert_out = torch.cat([expert_out, expert_out.new_zeros(1, h)])  # the overflow slot gives zero
        y = (expert_out[slot] * weights).view(k, tokens, h).sum(0).view(b, s, h)
        return y if self.shared is None else y + self.shared(x)
