"""Which forward ops per-op selective activation checkpointing keeps: the ``"op"`` recompute mode.

torchtitan's ``selective_ac_option = "op"`` runs each transformer block under
``torch.utils.checkpoint`` with a policy that saves the outputs of a short list of expensive ops
and recomputes everything else in backward: every attention kernel's outputs (FlashAttention and
its kin), and every other matrix multiply of the block, counted in forward order from the block's
first (the 1st, 3rd, 5th, ... ``mm`` are saved; the 2nd, 4th, ... recomputed). Norms, activations,
residual adds, dropout and the unsaved matrix multiplies run twice; the block's input is kept.

The planner prices this mode with the same rule the runtime runs (:mod:`runtime.recompute`): the
trace measures the bytes of the kept outputs (``Layer.op_saved_bytes``) and the cost model charges
the forward time of the ops not kept as recomputation. ``addmm`` (a linear with a bias) counts as a
matrix multiply; torchtitan's models have no biases, so on them the two rules agree.
"""

from __future__ import annotations

from collections.abc import Sequence

from planner.trace.meter import ATTENTION_KERNELS

MATMULS = frozenset({"mm", "addmm"})
KEPT_KERNELS = ATTENTION_KERNELS


def keeps_output(name: str, matmul_number: int) -> bool:
    """Whether the per-op policy saves the output of op ``name`` (an ATen overload packet's name).
    ``matmul_number``: for a matrix multiply, its position among the layer's matrix multiplies (from 1)."""
    if name in MATMULS:
        return matmul_number % 2 == 1
    return name in KEPT_KERNELS


def kept_flags(names: Sequence[str]) -> list[bool]:
    """For one layer's forward ops in order, whether the per-op policy saves each one's output."""
    count, out = 0, []
    for name in names:
        count += name in MATMULS
        out.append(keeps_output(name, count))
    return out
