"""Trace ``scaled_dot_product_attention`` as the fused kernel a GPU runs, not as its math fallback.

On the meta device ``F.scaled_dot_product_attention`` has no fused kernel to pick, so torch runs
its reference decomposition: two batched GEMMs around a softmax that materialise the ``s × s``
scores, save them for backward and, for a boolean mask, add an fp32 bias. Priced as traced, a
model that calls SDPA looked *more* expensive than one that writes attention by hand, while every
GPU trainer runs FlashAttention (Dao et al. 2022; Dao 2023) or the memory-efficient kernel
(Rabe & Staats 2021): scores stay in on-chip memory, and backward saves only ``q, k, v``, the
output and one log-sum-exp per row.

:class:`FusedAttention` is a ``TorchFunctionMode`` active while a model is traced. It sends each
SDPA call on meta tensors to the ATen kernel a GPU would choose (flash without a mask, the
memory-efficient kernel with one), whose meta implementations give the right output, saved
tensors and FLOPs. A model that writes attention by hand (``softmax(q @ kᵀ) @ v``) is untouched,
so each model is priced with the attention it really runs; the graph records which
(:attr:`planner.trace.graph.CostGraph.attention`).

A mask handed over by a module that declares ``is_causal = True`` (Hugging Face's attention
modules) is the causal mask that module builds because tracing hides whether the batch is padded:
run eagerly without padding, as packed pre-training batches are, transformers drops it and calls
SDPA with ``is_causal``. Such a call is priced as causal FlashAttention, which skips the masked half
of the scores, not as the memory-efficient kernel over every score with an ``s × s`` bias read.
Under fx the rewrite happens while symbolic tracing, so the recorded graph calls the causal kernel.

Anything the kernels cannot take (fewer than 4 dims, real tensors, fx proxies while symbolic
tracing) falls through to torch's own function unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode

_aten = torch.ops.aten


def _is_meta_tensor(x: Any) -> bool:
    # fx proxies and other subclasses keep their own __torch_function__: leave them to torch. torch.export
    # traces with FakeTensors (a meta model's are on meta): those take the fused kernel too, or a Hugging
    # Face model (traced by export) would be priced on SDPA's math fallback, s x s scores stored.
    from torch._subclasses.fake_tensor import FakeTensor

    return (type(x) is torch.Tensor or isinstance(x, FakeTensor)) and x.device.type == "meta"


def fused_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
               dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
               enable_gqa: bool = False) -> torch.Tensor | None:
    """SDPA through the fused kernel on meta tensors, or ``None`` when it does not apply."""
    if not all(_is_meta_tensor(t) for t in (query, key, value)) or query.dim() != 4:
        return None
    if attn_mask is not None and not _is_meta_tensor(attn_mask):
        return None
    if key.shape[-3] != query.shape[-3]:
        if not enable_gqa or query.shape[-3] % key.shape[-3]:
            return None
        # Grouped-query attention: the kernel reads each kv head for its group of query heads.
        rep = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(rep, dim=-3), value.repeat_interleave(rep, dim=-3)
    if attn_mask is None:
        return _aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False,
                                                          scale=scale)[0]
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device="meta").masked_fill(
            attn_mask.logical_not(), float("-inf"))
    bias = attn_mask.to(query.dtype).expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    return _aten._scaled_dot_product_efficient_attention(query, key, value, bias, query.requires_grad, dropout_p,
                                                         is_causal, scale=scale)[0]


def declares_causal(modules: list[nn.Module]) -> bool:
    """Whether the innermost of ``modules`` (outermost first) that has a boolean ``is_causal``
    attribute sets it: the convention of transformers' attention modules."""
    for module in reversed(modules):
        flag = getattr(module, "is_causal", None)
        if isinstance(flag, bool):
            return flag
    return False


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _masked_self_attention(call: dict[str, Any]) -> bool:
    """An SDPA call (arguments by name) with a mask and without ``is_causal`` whose queries and keys
    have one length (or whose lengths fx proxies hide)."""
    query, key = call.get("query"), call.get("key")
    if call.get("attn_mask") is None or call.get("is_causal", False) is not False:
        return False
    if isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor) and _is_meta_tensor(query):
        return query.dim() >= 2 and query.shape[-2] == key.shape[-2]
    return isinstance(query, torch.fx.Proxy)


class FusedAttention(TorchFunctionMode):
    """While active, SDPA calls on meta tensors run the fused kernel; ``calls`` counts them, and
    ``causal_masks`` the masked calls priced as causal (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.causal_masks = 0
        self._modules: list[nn.Module] = []  # the forwards running now, outermost first
        self._hooks: list[Any] = []

    def __enter__(self):
        self._hooks = [register_module_forward_pre_hook(self._enter_module),
                       register_module_forward_hook(self._leave_module, always_call=True)]
        return super().__enter__()

    def start_attempt(self) -> None:
        """Forget what an abandoned capture counted: the counts describe the capture that is kept."""
        self.calls = 0
        self.causal_masks = 0

    def _enter_module(self, module: nn.Module, _args: tuple) -> None:
        self._modules.append(module)

    def _leave_module(self, *_: Any) -> None:  # returns None: a forward hook's result would replace the output
        if self._modules:
            self._modules.pop()

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        self._modules.clear()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            call = {**dict(zip(_SDPA_ARGS, args)), **kwargs}
            if declares_causal(self._modules) and _masked_self_attention(call):
                args, kwargs = (), {**call, "attn_mask": None, "is_causal": True}
                self.causal_masks += 1
            try:
                out = fused_sdpa(*args, **kwargs)
            except (RuntimeError, TypeError, ValueError):  # shapes the kernel refuses: torch's own path
                out = None
            if out is not None:
                self.calls += 1
                return out
        if func is F.multi_head_attention_forward:
            return self._multi_head(func, args, kwargs)
        return func(*args, **kwargs)

    def _multi_head(self, func, args: tuple, kwargs: dict):
        """``nn.MultiheadAttention``'s functional forward. Called from here, where torch has set this mode
        aside, its own SDPA call (``need_weights=False``, as ``nn.TransformerEncoderLayer`` asks) would run
        the math fallback and store the scores; it reads SDPA as a global of torch.nn.functional, so the
        fused kernel stands in for it for this one call. With ``need_weights=True`` torch computes the
        weights by hand (two bmm and a softmax), as a GPU does too: that path is left as it is."""
        import torch.nn.functional as functional

        own = functional.scaled_dot_product_attention

        def sdpa(*a: Any, **kw: Any) -> torch.Tensor:
            out = fused_sdpa(*a, **kw)
            if out is None:
                return own(*a, **kw)
            self.calls += 1
            return out

        functional.scaled_dot_product_attention = sdpa
        try:
            return func(*args, **kwargs)
        finally:
            functional.scaled_dot_product_attention = own
