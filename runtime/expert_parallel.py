"""Expert parallelism: the experts of every MoE layer split over ``ep`` data-parallel ranks.

An expert-parallel group is ``ep`` consecutive data-parallel ranks
(:meth:`planner.layout.RankLayout.sub_group`, torchtitan's borrowing of ep from dp). Rank ``j`` of a
group keeps experts ``[j·E/ep, (j+1)·E/ep)`` of every :class:`planner.models.moe.MoEFeedForward` (the
other experts' weights are freed) and runs them on the tokens of the whole group:

1. each rank routes its own tokens exactly as one process would (:meth:`MoEFeedForward.route`: the
   same router, top-k, capacity over its own micro-batch and drop order), into its ``[E, C, h]`` slots;
2. *dispatch*: an all-to-all sends the slots of experts ``[j·E/ep, …)`` to rank ``j``
   (funcol's ``all_to_all_single_autograd``, which autograd runs backwards too);
3. each rank runs its ``E/ep`` experts on ``ep·C`` slots (three batched GEMMs, as one process does);
4. *combine*: the inverse all-to-all brings each token's expert outputs home, and the gate weights
   sum them as before. The result is the single process's up to GEMM rounding.

Gradients: an expert's weight gradient already sums the tokens of its whole ep group (the all-to-all
carried them), so it is summed over the ``dp/ep`` ranks holding the same experts (one per ep group)
and divided by ``dp``, the data-parallel mean; every other parameter is averaged over ``dp`` as
before (:func:`runtime.data_parallel.allreduce_gradients` skips the experts). DDP would average the
experts over all of ``dp``, so ``ep > 1`` runs the flat all-reduce mode instead.

ZeRO-1/2 (:class:`runtime.data_parallel.OptimizerShards`): an expert weight's optimizer slices span
the ``dp/ep`` ranks holding it (:func:`zero_expert_slices`), every other weight's the dp ranks; its
gradient is all-reduced (ZeRO-1) or reduce-scattered (ZeRO-2) over those ranks and divided by ``dp``,
and the updated slices are all-gathered over them (Megatron's expert-data-parallel group).

Tensor parallelism (any ``ep``; Megatron's expert tensor parallelism): every rank of a tp group keeps
a ``1/tp`` slice of each kept expert's ffn dim, ``w_gate``/``w_up`` column-parallel (``[E, h, f/tp]``)
and ``w_down`` row-parallel (``[E, f/tp, h]``), as DTensors ``Shard`` on the tp mesh
(:func:`apply_expert_tensor_parallel`). The tp ranks see the same slots (the MoE block's input is
whole on every tp rank, with or without sequence parallelism), so each computes its slice of every
expert's hidden units and one all-reduce over tp sums the partial outputs; in backward, one all-reduce
over tp sums the slots' input gradients (Megatron's ``g`` and ``f``). This is what the planner prices:
the expert GEMMs and weights divided by tp like every other linear.

Refused with a :class:`~runtime.errors.RunCheckError` naming ``ep`` and the fix: ZeRO-3 (FSDP2 would
shard the experts over the dp mesh and average their gradients over it), context parallelism, sequence parallelism, checkpoints, models without
:class:`~planner.models.moe.MoEFeedForward` layers (a user's own expert modules), and
``runtime.parallelize`` (the user's own loop).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.tensor import DTensor, Shard
from torch.nn import functional as F

from planner.models.moe import MoEFeedForward
from planner.space import unrunnable_combination
from runtime.errors import RunCheckError

EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


def check_expert_parallel(plan: Any, model: nn.Module | None, *, user_model: bool = False,
                          checkpoint_dir: str | None = None) -> None:
    """Refuse what this module cannot run with ``ep > 1`` (module docstring), naming ``ep`` and the fix."""
    par = plan.parallel
    if par.ep == 1:
        return
    if user_model:
        why = ("runtime.parallelize (the user's own model and loop) does not split experts; train the preset with "
               "`python -m runtime`, or re-plan with --ep 1")
    else:  # the rule the planner's search follows (planner/space.py)
        why = unrunnable_combination(par)
    if why is None and checkpoint_dir:
        why = "checkpoints of expert-parallel runs are not supported; drop --checkpoint-dir or re-plan with --ep 1"
    elif why is None and model is not None:
        known = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
        unknown = [type(m).__name__ for m in model.modules() if not isinstance(m, MoEFeedForward)
                   and isinstance(getattr(m, "num_experts", None), int) and isinstance(getattr(m, "top_k", None), int)]
        if unknown:
            why = (f"the runtime splits the experts of planner.models.moe.MoEFeedForward only, not {unknown[0]}; "
                   "re-plan with --ep 1")
        elif not known:
            why = "the model has no mixture-of-experts layer to split; re-plan with --ep 1"
        elif any(m.num_experts % par.ep for m in known):
            why = f"ep must divide every MoE layer's expert count ({sorted({m.num_experts for m in known})})"
    if why:
        raise RunCheckError(f"ep: the plan has ep={par.ep}; {why}")


def expert_groups(layout: Any, ep: int, timeout: Any = None) -> tuple[Any, Any, int, int]:
    """``(ep group, expert replica group, rank in its ep group, index of its ep group)`` of this rank.

    Collective: every rank creates every group (``new_group``), in the same order."""
    rank = dist.get_rank()
    mine_ep = mine_rep = None
    kwargs = {"timeout": timeout} if timeout is not None else {}
    seen_ep: set[tuple[int, ...]] = set()
    seen_rep: set[tuple[int, ...]] = set()
    for r in range(layout.world_size):
        group = layout.sub_group(r, ep)
        c = layout.coords(r)
        replicas = tuple(layout.rank_of(c.pp, d, c.tp, c.cp) for d in range(c.dp % ep, layout.dp, ep))
        for ranks, seen in ((group, seen_ep), (replicas, seen_rep)):
            if ranks in seen:
                continue
            seen.add(ranks)
            g = dist.new_group(list(ranks), **kwargs)
            if rank in ranks:
                if seen is seen_ep:
                    mine_ep = g
                else:
                    mine_rep = g
    c = layout.coords(rank)
    return mine_ep, mine_rep, c.dp % ep, c.dp // ep


def apply_expert_parallel(stage: nn.Module, *, ep: int, ep_rank: int, ep_group: Any, replica_group: Any,
                          replica_index: int, dp: int) -> int:
    """Keep this rank's experts of every MoE layer in ``stage`` and route through the ep group; returns
    how many MoE layers it split. Each kept weight is tagged for :func:`reduce_expert_gradients`."""
    count = 0
    for module in stage.modules():
        if not isinstance(module, MoEFeedForward):
            continue
        share = module.num_experts // ep
        for name in EXPERT_WEIGHTS:
            full = getattr(module, name)
            local = nn.Parameter(full.detach()[ep_rank * share:(ep_rank + 1) * share].clone(),
                                 requires_grad=full.requires_grad)
            local._expert_parallel = (replica_group, dp, replica_index)  # type: ignore[attr-defined]
            setattr(module, name, local)  # the other experts' weights are freed with ``full``
        module.forward = _ExpertParallelForward(module, ep, ep_group)  # type: ignore[method-assign]
        count += 1
    return count


class _ExpertParallelForward:
    """:meth:`MoEFeedForward.forward` with the experts of the ep group (module docstring, steps 1-4)."""

    def __init__(self, module: MoEFeedForward, ep: int, group: Any) -> None:
        self.module, self.ep, self.group = module, ep, group

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m, ep = self.module, self.ep
        b, s, h = x.shape
        tokens, e, k = b * s, m.num_experts, m.top_k
        flat = x.reshape(tokens, h)
        slot, weights, cap = m.route(flat)
        source = torch.arange(tokens, device=x.device).repeat(k)
        buffer = flat.new_zeros((e * cap + 1, h)).index_add(0, slot, flat[source])
        share = e // ep
        # [E, C, h] in expert order is [ep (destination), E/ep, C, h]: chunk j goes to rank j
        received = _all_to_all(buffer[:-1].contiguous(), self.group)
        local_in = received.view(ep, share, cap, h).transpose(0, 1).reshape(share, ep * cap, h)
        local_out = m.experts_forward(local_in)
        back = local_out.view(share, ep, cap, h).transpose(0, 1).reshape(e * cap, h).contiguous()
        expert_out = _all_to_all(back, self.group)
        expert_out = torch.cat([expert_out, expert_out.new_zeros(1, h)])  # the overflow slot gives zero
        y = (expert_out[slot] * weights).view(k, tokens, h).sum(0).view(b, s, h)
        return y if m.shared is None else y + m.shared(x)


def _all_to_all(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Equal chunks of dim 0 to every rank of ``group``, by funcol's autograd all-to-all (its backward is
    the inverse all-to-all); waited on here, since the next op reads it."""
    out = all_to_all_single_autograd(x, None, None, group)
    return out.wait() if hasattr(out, "wait") else out


def is_expert(param: torch.Tensor) -> bool:
    return hasattr(param, "_expert_parallel")


def reduce_expert_gradients(modules: list[nn.Module]) -> None:
    """Each expert weight's gradient summed over the ranks holding the same experts, then divided by dp."""
    seen: set[int] = set()
    for module in modules:
        for p in module.parameters():
            if id(p) in seen or not is_expert(p) or p.grad is None or hasattr(p, "_expert_zero"):
                continue  # ZeRO-1/2 reduce theirs over the same ranks (zero_expert_slices)
            seen.add(id(p))
            group, dp, _ = p._expert_parallel  # type: ignore[attr-defined]
            grad = p.grad._local_tensor if isinstance(p.grad, DTensor) else p.grad  # a tp slice: its own part
            if dist.get_world_size(group) > 1:
                dist.all_reduce(grad, group=group)
            grad.div_(dp)


def counted_in_norm(param: torch.Tensor) -> bool | None:
    """For the global gradient norm: None for a non-expert weight (the usual rule), else whether this
    rank counts its expert shard (the first ep group's ranks hold every expert exactly once)."""
    if not is_expert(param):
        return None
    if getattr(param, "_expert_zero", 0) == 2:  # ZeRO-2: this rank's slice of its ep shard, held by no other rank
        return True
    return param._expert_parallel[2] == 0  # type: ignore[attr-defined]


def zero_expert_slices(param: torch.Tensor, zero_stage: int) -> tuple[Any, int, int, int] | None:
    """For :class:`runtime.data_parallel.OptimizerShards`: ``(group, ranks, this rank's index, gradient
    divisor)`` of an expert weight's ZeRO slices (the ``dp/ep`` ranks holding the same experts; the mean
    over ``dp``), None for any other weight. Marks the weight so that :func:`reduce_expert_gradients`
    leaves its reduction to the slices."""
    if not is_expert(param):
        return None
    group, dp, index = param._expert_parallel  # type: ignore[attr-defined]
    param._expert_zero = zero_stage  # type: ignore[attr-defined]
    return group, dist.get_world_size(group), index, dp


def apply_plan_experts(stages: list[nn.Module], plan: Any, dp_mode: Any) -> Any:
    """Split the experts of this rank's ``stages`` as ``plan`` says; returns the data-parallel mode to use
    (DDP would average the experts over all of dp: the flat all-reduce mode instead)."""
    from runtime.data_parallel import DataParallelMode

    par = plan.parallel
    ep_group, replica_group, ep_rank, replica_index = expert_groups(par.layout, par.ep)
    for stage in stages:
        apply_expert_parallel(stage, ep=par.ep, ep_rank=ep_rank, ep_group=ep_group, replica_group=replica_group,
                              replica_index=replica_index, dp=par.dp)
    return DataParallelMode("allreduce") if dp_mode.kind == "ddp" else dp_mode


TP_DIMS = {"w_gate": 2, "w_up": 2, "w_down": 1}  # the ffn dim of each stacked weight: column, column, row


def apply_expert_tensor_parallel(stages: list[nn.Module], tp_mesh: Any) -> int:
    """Split the ffn dim of every kept expert weight of ``stages`` over ``tp_mesh`` (module docstring);
    returns how many MoE layers it split. Run after :func:`apply_expert_parallel` (it keeps its tags)."""
    tp, index = tp_mesh.size(), tp_mesh.get_local_rank()
    count = 0
    for stage in stages:
        for module in stage.modules():
            if not isinstance(module, MoEFeedForward):
                continue
            for name, dim in TP_DIMS.items():
                full = getattr(module, name)
                if full.shape[dim] % tp:
                    raise RunCheckError(f"tp: the plan has tp={tp}; it must divide the experts' ffn width "
                                        f"({full.shape[dim]}) to split them; re-plan with a tp dividing it")
                width = full.shape[dim] // tp
                local = full.detach().narrow(dim, index * width, width).clone()
                sharded = DTensor.from_local(local, tp_mesh, [Shard(dim)], run_check=False, shape=full.shape,
                                             stride=_contiguous_stride(full.shape))
                param = nn.Parameter(sharded, requires_grad=full.requires_grad)
                if is_expert(full):
                    param._expert_parallel = full._expert_parallel  # type: ignore[attr-defined]
                setattr(module, name, param)
            module.experts_forward = _TensorParallelExperts(module, tp_mesh.get_group())  # type: ignore[method-assign]
            count += 1
    return count


def _contiguous_stride(shape: torch.Size) -> tuple[int, ...]:
    stride, out = 1, []
    for size in reversed(shape):
        out.append(stride)
        stride *= size
    return tuple(reversed(out))


class _TensorParallelExperts:
    """:meth:`MoEFeedForward.experts_forward` on this rank's slice of every expert's hidden units."""

    def __init__(self, module: MoEFeedForward, group: Any) -> None:
        self.module, self.group = module, group

    def __call__(self, expert_in: torch.Tensor) -> torch.Tensor:
        m = self.module
        x = _CopyToTp.apply(expert_in, self.group)
        gate, up, down = (w.to_local() for w in (m.w_gate, m.w_up, m.w_down))
        act = F.silu(torch.bmm(x, gate)) * torch.bmm(x, up)
        return _SumOverTp.apply(torch.bmm(act, down), self.group)


class _CopyToTp(torch.autograd.Function):
    """Identity forward; backward sums the input gradient over tp (each rank's hidden units add theirs)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _SumOverTp(torch.autograd.Function):
    """Forward sums the partial outputs over tp; backward passes the (whole, replicated) gradient on."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def expert_slice_at(param: torch.Tensor, dp_index: int) -> tuple[int, int] | None:
    """``(ranks, index)`` of the ZeRO-1/2 slice an expert weight has at data-parallel index ``dp_index``
    (:func:`zero_expert_slices`: its ``dp/ep`` holders, one per ep group), None for any other weight;
    for ``runtime.dry_run``, which evaluates every rank's bytes from the one it builds."""
    if not hasattr(param, "_expert_zero"):
        return None
    group, dp, _ = param._expert_parallel  # type: ignore[attr-defined]
    ranks = dist.get_world_size(group)
    return ranks, dp_index // (dp // ranks)
