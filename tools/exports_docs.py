"""Regenerate the "## The demo plans" section of docs/exports.md: ``python -m tools.exports_docs [--write]``.

The section shows two demo plans (GPT-3 175B on 128 DGX A100 nodes, Llama-2 70B on 8) exported to
every framework. This module makes it from real runs so it can not drift from the planner or the
exporters: it plans both models with ``python -m planner plan``, exports each plan with
``python -m planner export ... --force``, reads the files each export wrote, and parses them back with
``tests/export/framework_check.py``, all as subprocesses in a temporary folder. The page shows that
folder as ``/tmp`` so the commands read as a user would type them. The summary table and the
"Reading it" paragraph are built only from what those commands printed.

Without ``--write`` the section goes to stdout; with it, it replaces docs/exports.md from the
"## The demo plans" heading to the end of the file. It takes a minute or two (two large plans, eight
exports that each price the nearest expressible configuration, eight framework-side parses).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

from planner.export import FRAMEWORKS
from planner.plan import Plan

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "exports.md"
HEADING = "## The demo plans"
COMMAND = "python -m tools.exports_docs"
SHOWN_DIR = "/tmp"  # what the page shows in place of the temporary folder
CHECK_SCRIPT = "tests/export/framework_check.py"
# The page's order; the assert in main() notices a framework added to planner.export.
FRAMEWORK_ORDER = ("megatron", "torchtitan", "deepspeed", "nanotron")
WIDTH = 105  # prose line width, as the hand-written sections
FENCE_LANG = {".toml": "toml", ".json": "json", ".yaml": "yaml", ".yml": "yaml"}


@dataclass(frozen=True)
class DemoPlan:
    """One demo plan: its title on the page, its file stem and the ``planner plan`` arguments."""

    title: str
    name: str
    args: tuple[str, ...]

    def plan_args(self, folder: str) -> list[str]:
        return ["plan", *self.args, "-o", f"{folder}/{self.name}.json"]


DEMO_PLANS = (
    DemoPlan("GPT-3 175B", "175b", ("--model", "gpt3-175b", "--cluster", "dgx-a100-80g", "--nodes", "128",
                                    "--global-batch", "1536")),
    DemoPlan("Llama-2 70B", "70b", ("--model", "llama2-70b", "--cluster", "dgx-a100-80g", "--nodes", "8",
                                    "--global-batch", "512")),
)


@dataclass(frozen=True)
class PlanFacts:
    """What the page says about a plan, read from its JSON."""

    demo: DemoPlan
    label: str
    step_s: float
    dp: int
    stage_layers: tuple[int, ...]
    first_layer: str
    last_layer: str


@dataclass(frozen=True)
class ExportRun:
    """One plan x framework: the export's printed lines, the files it wrote, the framework-side parse."""

    demo: DemoPlan
    framework: str
    dp: int
    printed: str
    files: dict[str, str]  # name -> text, LOST.md left out (its lines are the printed ones)
    check: str

    @property
    def out_dir(self) -> str:
        return f"{SHOWN_DIR}/{self.demo.name}-{self.framework}"

    @property
    def export_command(self) -> str:
        return f"python -m planner export {SHOWN_DIR}/{self.demo.name}.json --to {self.framework} -o {self.out_dir} --force"

    @property
    def check_command(self) -> str:
        return f"python {CHECK_SCRIPT} {self.out_dir} --to {self.framework} --dp {self.dp}"


@dataclass(frozen=True)
class Outcome:
    """The summary of one export, parsed from its printed lines (the format of ``ExportResult.summary_lines``)."""

    lost: tuple[str, ...]
    nearest_step: str | None  # as printed, e.g. "17.68"
    fits: bool | None
    ratio: str | None  # as printed, e.g. "1.039"


_LOST = re.compile(r"^LOST (.+?): plan ", re.M)
_NEAREST = re.compile(r"^nearest expressible: .*: predicted step (\S+) s \((fits|DOES NOT FIT); (\S+)x the plan\)$", re.M)


def outcome(printed: str) -> Outcome:
    """Lost knobs and the nearest configuration's step, fit and ratio, as the export printed them."""
    lost = tuple(_LOST.findall(printed))
    if not lost:
        if "nothing lost;" not in printed:
            raise ValueError(f"export output has neither LOST lines nor 'nothing lost': {printed!r}")
        return Outcome((), None, None, None)
    m = _NEAREST.search(printed)
    if m is None:
        return Outcome(lost, None, None, None)
    return Outcome(lost, m.group(1), m.group(2) == "fits", m.group(3))


def _run(argv: list[str], folder: str) -> str:
    """Run a command from the repository root; its stdout with the temporary folder shown as /tmp."""
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done.stdout.replace(folder, SHOWN_DIR).rstrip("\n")


def make_plan(demo: DemoPlan, folder: str) -> PlanFacts:
    """Plan one demo model with ``python -m planner plan`` and read the facts the page states."""
    _run([sys.executable, "-m", "planner", *demo.plan_args(folder)], folder)
    plan = Plan.from_json(f"{folder}/{demo.name}.json")
    stages = sorted(plan.stages, key=lambda s: s.index)
    return PlanFacts(demo, plan.parallel.label(), plan.predicted.step_time_s, plan.parallel.dp,
                     tuple(s.layer_stop - s.layer_start for s in stages),
                     plan.model.layer_names[0], plan.model.layer_names[-1])


def export(facts: PlanFacts, framework: str, folder: str) -> ExportRun:
    """Export one plan to one framework, read the files, and parse them back with the framework's parser."""
    name = facts.demo.name
    out = Path(folder) / f"{name}-{framework}"
    printed = _run([sys.executable, "-m", "planner", "export", f"{folder}/{name}.json", "--to", framework,
                    "-o", str(out), "--force"], folder)
    files = {p.name: p.read_text().replace(folder, SHOWN_DIR).rstrip("\n")
             for p in sorted(out.iterdir()) if p.name != "LOST.md"}
    check = _run([sys.executable, CHECK_SCRIPT, str(out), "--to", framework, "--dp", str(facts.dp)], folder)
    return ExportRun(facts.demo, framework, facts.dp, printed, files, _last_json_line(check))


def _last_json_line(stdout: str) -> str:
    """The check's JSON line: DeepSpeed prints its accelerator warnings (with a timestamp) to stdout first."""
    line = stdout.splitlines()[-1]
    json.loads(line)  # fails loudly if the check's output changed shape
    return line


def _stages_phrase(facts: PlanFacts) -> str:
    if len(facts.stage_layers) == 1:
        return ""
    sizes = ", ".join(str(n) for n in facts.stage_layers)
    return (f"; {len(facts.stage_layers)} stages of {sizes} of the {sum(facts.stage_layers)} traced layers, "
            f"{facts.first_layer} … {facts.last_layer}")


def intro(plans: list[PlanFacts]) -> str:
    commands = "\n".join("python -m planner " + " ".join(p.demo.plan_args(SHOWN_DIR)) for p in plans)
    configs = " and ".join(f"`{p.label}` (predicted step {p.step_s:.4g} s{_stages_phrase(p)})" for p in plans)
    lead = (f"This section is generated by `{COMMAND}`, which runs every command shown here (in a temporary "
            f"folder, shown as `{SHOWN_DIR}`); regenerate it with `{COMMAND} --write` after changing the planner "
            f"or an exporter. The plans:")
    return (f"{HEADING}\n\n{_wrap(lead)}\n\n```\n{commands}\n```\n\n"
            f"{_wrap(f'printed the configurations {configs}.')}\n")


def _wrap(text: str) -> str:
    """Prose wrapped like the rest of the page (code spans may break: markdown joins them with a space)."""
    return textwrap.fill(text, width=WIDTH, break_long_words=False, break_on_hyphens=False)


def _step_cell(o: Outcome) -> str:
    if not o.lost:
        return "= plan"
    if o.nearest_step is None:
        return "not priced"
    return f"{o.nearest_step} s ({'fits' if o.fits else 'does not fit'})"


def summary(runs: list[ExportRun]) -> str:
    rows = ["### Summary", "",
            "Lost knobs and the nearest expressible configuration's predicted step time (from the printed lines "
            "below):", "",
            "| plan | framework | lost | nearest predicted step | nearest / plan |", "|---|---|---|---|---|"]
    for r in runs:
        o = outcome(r.printed)
        ratio = "1.000" if not o.lost else (o.ratio or "-")
        rows.append(f"| {r.demo.title} | {r.framework} | {', '.join(o.lost) or 'nothing'} | {_step_cell(o)} "
                    f"| {ratio} |")
    return "\n".join(rows) + "\n"


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _loss_clause(r: ExportRun) -> str:
    o = outcome(r.printed)
    if o.nearest_step is None:
        return f"{r.framework} loses {_join(list(o.lost))} (the nearest configuration is not priced)"
    return (f"{r.framework} loses {_join(list(o.lost))} ({o.ratio}x the plan's step, "
            f"{'and it fits' if o.fits else 'and it does not fit'})")


def reading(plans: list[PlanFacts], runs: list[ExportRun]) -> str:
    """The "Reading it" paragraph: per plan, who expresses everything and what the others lose and cost."""
    sentences = []
    for p in plans:
        mine = [r for r in runs if r.demo == p.demo]
        exact = [r.framework for r in mine if not outcome(r.printed).lost]
        lossy = [_loss_clause(r) for r in mine if outcome(r.printed).lost]
        head = f"for {p.demo.title} (`{p.label}`)"
        if exact and lossy:
            verb = "expresses" if len(exact) == 1 else "express"
            sentences.append(f"{head}, {_join(exact)} {verb} everything; {'; '.join(lossy)}.")
        elif exact:
            sentences.append(f"{head}, every framework expresses everything.")
        else:
            sentences.append(f"{head}, no framework expresses everything: {'; '.join(lossy)}.")
    text = " ".join(s[0].upper() + s[1:] if i else s for i, s in enumerate(sentences))
    return _wrap(f"Reading it: {text} Each LOST line below says what the files write instead and why; "
                 f"\"fits\" is the cost model's memory check of the nearest configuration.") + "\n"


def _fence(name: str, text: str) -> str:
    return f"```{FENCE_LANG.get(Path(name).suffix, '')}\n{text}\n```"


def _shorten_layers(text: str) -> tuple[str, bool]:
    """A JSON file's long ``layers`` list replaced by a one-line description (the page stays readable)."""
    data = json.loads(text)
    layers = data.get("layers") if isinstance(data, dict) else None
    if not isinstance(layers, list) or len(layers) <= 4:
        return text, False
    data["layers"] = f"<the plan's {len(layers)} layer names: {layers[0]}, {layers[1]}, ..., {layers[-1]}>"
    return json.dumps(data, indent=2), True


def pair_block(r: ExportRun) -> str:
    parts = [f"#### {r.demo.title} → {r.framework}", "", f"```\n$ {r.export_command}\n{r.printed}\n```", ""]
    for name, text in r.files.items():
        shortened = False
        if name.endswith(".json"):
            text, shortened = _shorten_layers(text)
        parts += [f"`{name}`" + (" (the `layers` list shortened here)" if shortened else "") + ":", "",
                  _fence(name, text), ""]
    parts += ["The framework-side parse that accepted it:", "", f"```\n$ {r.check_command}\n{r.check}\n```", ""]
    return "\n".join(parts)


def section(plans: list[PlanFacts], runs: list[ExportRun]) -> str:
    blocks = [intro(plans), summary(runs), reading(plans, runs)]
    for p in plans:
        blocks.append(f"### {p.demo.title}\n")
        blocks += [pair_block(r) for r in runs if r.demo == p.demo]
    return "\n".join(blocks).rstrip("\n") + "\n"


def build() -> str:
    """Run the plans, exports and parses in a temporary folder and return the section's markdown."""
    with tempfile.TemporaryDirectory(prefix="exports_docs-") as folder:
        plans = [make_plan(d, folder) for d in DEMO_PLANS]
        runs = [export(p, fw, folder) for p in plans for fw in FRAMEWORK_ORDER]
    return section(plans, runs)


def write(text: str, doc: Path = DOC) -> None:
    """Replace the doc from the section heading to the end of the file."""
    page = doc.read_text()
    at = page.find("\n" + HEADING + "\n")
    if at < 0:
        raise ValueError(f"{doc} has no line {HEADING!r}; add it where the section belongs")
    doc.write_text(page[: at + 1] + text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help=f"replace the section in {DOC.relative_to(REPO)}")
    args = ap.parse_args(argv)
    assert sorted(FRAMEWORK_ORDER) == sorted(FRAMEWORKS), "FRAMEWORK_ORDER must list every exporter"
    text = build()
    if args.write:
        write(text)
        print(f"wrote {DOC.relative_to(REPO)} from {HEADING!r} to the end")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
