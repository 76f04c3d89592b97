"""The sample input a module was planned with, as a plan file records it: structure, shapes and dtypes.

The runtime traces a user's module again before it runs a plan (the fingerprint check) and cuts its
stages with that trace, so it needs an input of the planned structure. A token model can be given
``[1, seq_len]`` token ids; an image model, a model with several inputs or with keyword inputs cannot
be guessed. The plan keeps the sample's description (``plan.model.sample_input``), never its values,
and :func:`sample_from_spec` makes zeros of it (what a trace on shapes needs).

The description is JSON: a tensor is ``{"tensor": {"shape": [...], "dtype": "int64"}}``, a tuple or list
``{"tuple": [...]}``, a dict ``{"dict": {name: ...}}``, and a plain value (bool, int, float, str, None)
``{"value": v}``.
"""

from __future__ import annotations

from typing import Any

import torch

from planner.errors import SpecError


def describe_sample(sample: Any) -> dict[str, Any] | None:
    """``sample``'s description, or None when some part of it is not a tensor, a container of them or a
    plain value (an object the plan file cannot hold)."""
    if isinstance(sample, torch.Tensor):
        return {"tensor": {"shape": list(sample.shape), "dtype": str(sample.dtype).removeprefix("torch.")}}
    if isinstance(sample, (tuple, list)):
        parts = [describe_sample(s) for s in sample]
        return None if any(p is None for p in parts) else {"tuple": parts}
    if isinstance(sample, dict):
        if not all(isinstance(k, str) for k in sample):
            return None
        parts_d = {k: describe_sample(v) for k, v in sample.items()}
        return None if any(p is None for p in parts_d.values()) else {"dict": parts_d}
    if sample is None or isinstance(sample, (bool, int, float, str)):
        return {"value": sample}
    return None


def sample_from_spec(spec: dict[str, Any], device: str | torch.device = "cpu") -> Any:
    """Zeros of the structure, shapes and dtypes ``spec`` (:func:`describe_sample`) records."""
    if not isinstance(spec, dict) or len(spec) != 1:
        raise SpecError("model.sample_input", spec, "a plan's sample_input is one of {'tensor': ...}, "
                        "{'tuple': [...]}, {'dict': {...}} or {'value': ...}; re-create the plan")
    (kind, body), = spec.items()
    if kind == "tensor":
        dtype = getattr(torch, str(body.get("dtype")), None)
        if not isinstance(dtype, torch.dtype):
            raise SpecError("model.sample_input", body, "the dtype is not a torch dtype; re-create the plan")
        return torch.zeros([int(d) for d in body["shape"]], dtype=dtype, device=device)
    if kind == "tuple":
        return tuple(sample_from_spec(s, device) for s in body)
    if kind == "dict":
        return {k: sample_from_spec(v, device) for k, v in body.items()}
    if kind == "value":
        return body
    raise SpecError("model.sample_input", kind, "expected tensor, tuple, dict or value; re-create the plan")
