"""Exports: a plan as the configuration files Megatron-LM, torchtitan, DeepSpeed and nanotron read.

``python -m planner export plan.json --to FRAMEWORK -o DIR`` (:mod:`planner.export.command`). One
module per framework (``export(plan) -> ExportResult``); :mod:`planner.export.common` holds what
they share, including the pricing of the nearest configuration a framework can express when it
cannot express the plan. ``docs/exports.md`` shows the exports of the demo plans and what each
framework keeps and loses.

Nothing is imported here, so that registering the command stays cheap.
"""

from __future__ import annotations

FRAMEWORKS = ("torchtitan", "megatron", "deepspeed", "nanotron")


def export_plan(plan, to: str):  # noqa: ANN001, ANN201 (typed in the framework modules)
    """The :class:`~planner.export.common.ExportResult` of ``plan`` for framework ``to``."""
    import importlib

    from planner.errors import SpecError

    if to not in FRAMEWORKS:
        raise SpecError("--to", to, f"use one of {', '.join(FRAMEWORKS)}")
    return importlib.import_module(f"planner.export.{to}").export(plan)
