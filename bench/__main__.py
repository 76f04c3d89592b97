"""`python -m bench [--only SECTION ...] [--quick]`: run benchmark sections, write docs/benchmarks.md.

Every section is a function in ``bench.sections`` returning Markdown; the page records the exact
command line that produced it, and each figure sits next to the command that drew it. Ratios
compare runs made in the same invocation, since this machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

from bench.common import REPO, Context
from bench.sections import SECTIONS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=list(SECTIONS), help="run only these sections")
    parser.add_argument("--quick", action="store_true", help="small sweeps (the smoke run of tests/bench)")
    parser.add_argument("-o", "--output", default="docs/benchmarks.md")
    parser.add_argument("--work-dir", default="out/bench", help="plans, metrics and logs of the runs")
    args = parser.parse_args(argv)
    names = args.only or list(SECTIONS)
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.output)
    if not out.is_absolute():
        out = REPO / out
    if args.only and out.exists() and out.resolve() == (REPO / "docs/benchmarks.md").resolve():
        print(f"[bench] --only given: writing {out.with_suffix('.partial.md')} instead of replacing {out}")
        out = out.with_suffix(".partial.md")
    work = Path(args.work_dir)
    # Figures of a partial page go beside the full page's, in a subfolder, so they never replace those.
    link = out.stem.replace(".partial", "") + ("/partial" if out.stem.endswith(".partial") else "")
    ctx = Context(quick=args.quick, fig_dir=out.parent / link, fig_link=link,
                  work_dir=work if work.is_absolute() else REPO / work)
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    parts = [
        "# Benchmarks\n",
        f"Produced by `{command.strip()}` (`make bench` runs `python -m bench`) from the repository root. "
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.python_implementation()} "
        f"{platform.python_version()}. Times are wall clock on a shared machine: compare ratios within one run. "
        "Every number on this page was printed by that command; rerun a section with "
        "`python -m bench --only SECTION` (it writes `docs/benchmarks.partial.md`).\n",
        "Sections: " + ", ".join(f"[{n}](#{n.replace('_', '-')})" for n in names) + ".\n",
    ]
    total = time.perf_counter()
    timings = []
    for name in names:
        start = time.perf_counter()
        print(f"[bench] {name} ...", flush=True)
        try:
            body = SECTIONS[name](ctx)
        except Exception as exc:  # a broken section is reported on the page, the others still run
            body = f"## {name}\n\nThe section failed: `{type(exc).__name__}: {exc}`."
            print(f"[bench] {name} FAILED: {type(exc).__name__}: {exc}", flush=True)
        took = time.perf_counter() - start
        timings.append((name, took))
        parts.append(f'<a id="{name.replace("_", "-")}"></a>\n\n' + body.rstrip()
                     + f"\n\n_Section `{name}`: `python -m bench --only {name}{' --quick' if args.quick else ''}`, "
                       f"took {took:.1f} s._\n")
        print(f"[bench] {name} done in {took:.1f} s", flush=True)
    elapsed = time.perf_counter() - total
    parts.append("## Bench time\n\n" + "| section | wall (s) |\n|---|---|\n"
                 + "".join(f"| {n} | {t:.1f} |\n" for n, t in timings) + f"| **total** | **{elapsed:.1f}** |\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts))
    print(f"[bench] wrote {out} in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
