"""FP8 linears, as the plan's ``parallel.fp8`` says: torchao's float8 training (tensorwise dynamic scaling).

The planner prices every linear but the output head at the device's FP8 peak (``planner/cost/fp8.py``);
here the same linears become torchao ``Float8Linear`` s (``convert_to_float8_training``), converted on
each rank's stages before data parallelism wraps them, as torchtitan's float8 converter does.

What cannot run is refused before anything is built (:func:`check_float8`), naming ``fp8`` and the fix:
a run without CUDA (FP8 GEMMs are ``torch._scaled_mm`` on FP8 tensor cores, H100 and later), a GPU older
than compute capability 8.9, torchao not installed, or tensor parallelism (torchao's float8 TP styles are
not wired here). The conversion itself needs a GPU and torchao, which the project's CI has neither of: it
is exercised only where both are present.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from planner.plan import Plan
from runtime.errors import RunCheckError

FP8_CAPABILITY = (8, 9)  # Ada / Hopper: the first FP8 tensor cores


def check_float8(plan: Plan, device_type: str) -> None:
    """Refuse an ``fp8`` plan this run cannot execute (module docstring); nothing to check without it."""
    if not plan.parallel.fp8:
        return
    fix = "re-plan without FP8 (python -m planner plan ... --no-fp8)"
    if device_type != "cuda":
        raise RunCheckError(f"parallel.fp8: FP8 GEMMs need a CUDA GPU with FP8 tensor cores (H100 or later); this "
                            f"run is on {device_type}: run on such GPUs, or {fix}")
    if torch.cuda.is_available() and torch.cuda.get_device_capability() < FP8_CAPABILITY:  # (dry-run: no GPU)
        raise RunCheckError(f"parallel.fp8: this GPU ({torch.cuda.get_device_name()}) has no FP8 tensor cores "
                            f"(compute capability {torch.cuda.get_device_capability()} < {FP8_CAPABILITY}); {fix}")
    if importlib.util.find_spec("torchao") is None:
        raise RunCheckError(f"parallel.fp8: FP8 training runs torchao's float8 linears, and torchao is not "
                            f"installed: pip install torchao, or {fix}")
    if plan.parallel.tp > 1:
        raise RunCheckError("parallel.fp8: FP8 linears under tensor parallelism (torchao's Float8ColwiseParallel "
                            f"styles) are not run by this runtime; re-plan with --tp 1, or {fix}")


def convert_float8(stage: nn.Module, plan: Plan) -> int:
    """Swap ``stage``'s linears for torchao's ``Float8Linear`` (all but the output head, the plan's last layer,
    and linears whose dims are not multiples of 16, which ``torch._scaled_mm`` refuses); returns how many."""
    from torchao.float8 import convert_to_float8_training  # guarded by check_float8

    head = plan.model.layer_names[-1]
    converted = []

    def eligible(module: nn.Module, fqn: str) -> bool:
        ok = isinstance(module, nn.Linear) and not (fqn == head or fqn.startswith(head + ".")) \
            and module.in_features % 16 == 0 and module.out_features % 16 == 0
        if ok:
            converted.append(fqn)
        return ok

    convert_to_float8_training(stage, module_filter_fn=eligible)
    return len(converted)
