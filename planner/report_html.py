"""``python -m planner report plan.json --html -o report.html``: the plan as one interactive page.

One self-contained file, readable offline: the numbers are a JSON block in the page, drawn by the
plain JavaScript and CSS beside this module (``report_html.js``, ``report_html.css``), inlined; no
network, no framework. The page shows

* the schedule timeline per device: the plan's schedule simulated with its own per-chunk times
  (:func:`planner.report.simulate`, the same simulation the PNG timeline draws), with zoom (wheel or
  buttons) and a tooltip per action (action, micro-batch, start, end);
* memory per device (pipeline position), stacked by part, against the usable limit the plan was
  priced with (:func:`planner.report.usable_limit_bytes`);
* the baselines and the alternatives next to the plan, in a table sorted by clicking a header;
* what-if re-plans (:mod:`planner.whatif`) of the stored cost graph, one row per change.

:func:`report_data` is everything the page draws, so a test can compare the rendered page with it.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from planner.errors import PlannerError
from planner.plan import Plan
from planner.report import simulate, usable_limit_bytes
from planner.units import plural

DEFAULT_WHAT_IFS = ("nodes=2x", "inter_node_bandwidth=2x")
MEMORY_PARTS = ("weights", "gradients", "optimizer", "activations", "temporary")


def format_bytes(b: float) -> str:
    """Bytes as the page prints them (``formatBytes`` in report_html.js is the same rule)."""
    return "0" if b == 0 else f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def report_data(plan: Plan, *, what_ifs: tuple[str, ...] | list[str] = DEFAULT_WHAT_IFS) -> dict[str, Any]:
    """The page's numbers: summary, simulated timeline, memory per device, table rows, what-if rows."""
    cfg, pred = plan.parallel, plan.predicted
    sim = simulate(plan)
    return {
        "title": f"{plan.model.name} on {plan.cluster.name} ({plural(cfg.world_size, 'device')})",
        "summary": {"config": cfg.label(), "global_batch": cfg.global_batch, "step_time_s": pred.step_time_s,
                    "mfu": pred.mfu, "throughput_samples_per_s": pred.throughput_samples_per_s,
                    "peak_memory_bytes": pred.peak_memory_bytes, "fits": pred.fits,
                    "bubble_fraction": sim.bubble_fraction, "solver": f"{plan.solver.method}: {plan.solver.status}"},
        "timeline": _timeline(sim),
        "memory": _memory(plan),
        "rows": _rows(plan),
        "what_if": [_what_if(plan, text) for text in what_ifs],
        "explanation": list(plan.explanation),
    }


def _timeline(sim: Any) -> dict[str, Any]:
    from planner.schedules.actions import Action
    from planner.schedules.plot import _second_chunk_rule  # the PNG's shading, so both draw the same

    second = _second_chunk_rule(sim)
    end = sim.step_time_s if sim.synchronous else sim.window_s[1] + 0.04 * (sim.window_s[1] - sim.window_s[0])
    end = end or max((e for rows in sim.timeline for _, e, _ in rows), default=1.0)
    devices = [[[start, stop, text, int(second(Action.parse(text)))] for start, stop, text in rows if start < end]
               for rows in sim.timeline]
    return {"schedule": sim.schedule, "p": sim.p, "m": sim.m, "v": sim.v, "synchronous": sim.synchronous,
            "step_time_s": sim.step_time_s, "bubble_fraction": sim.bubble_fraction, "end_s": end,
            "window_s": [] if sim.synchronous else list(sim.window_s), "devices": devices}


def _memory(plan: Plan) -> dict[str, Any]:
    devices = plan.predicted.devices
    extra = sorted({k for d in devices for k in d.memory_bytes if k not in MEMORY_PARTS and k != "total"})
    parts = [*MEMORY_PARTS, *extra]
    return {"parts": parts, "limit_bytes": usable_limit_bytes(plan),
            "devices": [{"device": d.device_index, "parts": {k: int(d.memory_bytes.get(k, 0)) for k in parts},
                         "total": int(d.memory_bytes.get("total", sum(d.memory_bytes.get(k, 0) for k in parts))),
                         "binding": d.binding} for d in devices]}


def _rows(plan: Plan) -> list[dict[str, Any]]:
    pred = plan.predicted
    rows = [{"kind": "this plan", "name": "plan", "config": plan.parallel.label(), "step_time_s": pred.step_time_s,
             "mfu": pred.mfu, "peak_memory_bytes": pred.peak_memory_bytes, "vs_plan": 1.0, "fits": pred.fits}]
    for b in plan.search.baselines or ():
        rows.append({"kind": "baseline", "name": b.name, "config": b.config or f"cannot run: {b.reason or ''}",
                     "step_time_s": b.step_time_s, "mfu": b.mfu, "peak_memory_bytes": b.peak_memory_bytes,
                     "vs_plan": b.step_time_s / pred.step_time_s if b.step_time_s else None, "fits": b.fits})
    for i, a in enumerate(plan.search.alternatives or (), start=1):
        rows.append({"kind": "alternative", "name": f"#{i}", "config": a.config, "step_time_s": a.step_time_s,
                     "mfu": a.mfu, "peak_memory_bytes": a.peak_memory_bytes,
                     "vs_plan": a.step_time_s / pred.step_time_s, "fits": True})
    return rows


def _what_if(plan: Plan, text: str) -> dict[str, Any]:
    """One change re-planned from the stored graph; a change nothing fits under is a row saying so."""
    from planner import whatif

    change = whatif.parse(text)  # a malformed change is the caller's error, raised
    try:
        new = whatif.replan(plan, [change], baselines=False)
    except PlannerError as exc:
        return {"change": text, "config": None, "devices": None, "step_time_s": None, "throughput_ratio": None,
                "peak_memory_bytes": None, "note": str(exc).splitlines()[0]}
    now = plan.predicted.throughput_samples_per_s
    return {"change": text, "config": new.parallel.label(), "devices": new.parallel.world_size,
            "step_time_s": new.predicted.step_time_s,
            "throughput_ratio": new.predicted.throughput_samples_per_s / now if now else None,
            "peak_memory_bytes": new.predicted.peak_memory_bytes,
            "note": f"global batch {new.parallel.global_batch}" + ("" if new.predicted.fits else ", does not fit")}


def render(data: dict[str, Any]) -> str:
    """The page: the skeleton, the CSS and JavaScript inlined, the data as a JSON block."""
    here = Path(__file__).parent
    css = (here / "report_html.css").read_text()
    js = (here / "report_html.js").read_text()
    blob = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")  # never ends the script block
    s = data["summary"]
    esc = html.escape
    cards = [("configuration", s["config"]), ("step time", f"{s['step_time_s']:.4g} s"), ("MFU", f"{s['mfu']:.1%}"),
             ("throughput", f"{s['throughput_samples_per_s']:.4g} samples/s"),
             ("peak memory", format_bytes(s["peak_memory_bytes"]) + ("" if s["fits"] else " (does not fit)")),
             ("bubble (simulated)", f"{s['bubble_fraction']:.1%}"), ("global batch", str(s["global_batch"])),
             ("solver", s["solver"])]
    card_html = "".join(f'<div class="card"><div class="k">{esc(k)}</div><div class="v">{esc(v)}</div></div>'
                        for k, v in cards)
    tl = data["timeline"]
    steps = (f"one pipeline step, {tl['step_time_s']:.4g} s" if tl["synchronous"] else
             f"asynchronous: the warm-up, then one steady step of {tl['step_time_s']:.4g} s between the dashed lines")
    limit = ("the dashed line is the usable memory the plan was priced against" if data["memory"]["limit_bytes"] else
             "mixed device types: each has its own usable memory, so no single limit is drawn")
    why = "".join(f"<li>{esc(line)}</li>" for line in data["explanation"])
    what_if = ('<table id="what-if"></table>' if data["what_if"] else
               "<p>No what-if changes were asked for (<code>--what-if KNOB=VALUE</code>).</p>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Plan report: {esc(data["title"])}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{css}</style></head>
<body>
<h1>Plan report: {esc(data["title"])}</h1>
<p class="sub">Written by <code>python -m planner report --html</code>; every number comes from the plan file.</p>
<div class="cards">{card_html}</div>
<h2>Pipeline schedule per device</h2>
<p class="sub">{esc(tl["schedule"])}, p={tl["p"]}, m={tl["m"]}, v={tl["v"]}: the plan's schedule simulated with its own
per-chunk times ({steps}). Wheel over the chart or the buttons to zoom; hover an action for its times.</p>
<div class="toolbar"><button id="zoom-in">+</button><button id="zoom-out">&minus;</button>
<button id="zoom-reset">reset</button><span id="zoom-level"></span></div>
<div class="chart" id="timeline"></div><div class="legend" id="timeline-legend"></div>
<h2>Memory per device</h2>
<p class="sub">Predicted bytes per device of each pipeline position, stacked by part; {limit}.</p>
<div class="chart" id="memory"></div><div class="legend" id="memory-legend"></div>
<h2>The plan, the baselines and the alternatives</h2>
<p class="sub">Same cost model and graph. Click a header to sort.</p>
<table id="alternatives"></table>
<h2>What if</h2>
<p class="sub">Re-planned from the plan's stored cost graph (no retracing), one change at a time.</p>
{what_if}
<h2>Why</h2><ul class="why">{why}</ul>
<div id="tooltip"></div>
<script type="application/json" id="report-data">{blob}</script>
<script>{js}</script>
</body></html>
"""


def write_html_report(plan: Plan, path: Path, *, what_ifs: tuple[str, ...] | list[str] = DEFAULT_WHAT_IFS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(report_data(plan, what_ifs=what_ifs)), encoding="utf-8")
    return path
