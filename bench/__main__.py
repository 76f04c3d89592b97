"""`python -m bench [--only SECTION ...] [--quick]`: run benchmark sections, write docs/benchmarks.md.

Every section is a function in ``bench.sections`` returning Markdown; the page records the exact
command line that produced it. Ratios compare runs made in the same invocation, since this
machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

from bench.sections import SECTIONS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--only", nargs="*", choices=sorted(SECTIONS), help="run only these sections")
    parser.add_argument("--quick", action="store_true", help="smaller sweeps (for a smoke run)")
    parser.add_argument("-o", "--output", default="docs/benchmarks.md")
    args = parser.parse_args(argv)
    names = args.only or list(SECTIONS)
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    parts = [
        "# Benchmarks\n",
        f"Produced by `{command.strip()}` (`make bench` runs `python -m bench`). Machine: "
        f"{platform.machine()}, {platform.python_implementation()} {platform.python_version()}. "
        "Times are wall-clock on a shared 2-core machine: compare ratios within one run.\n",
    ]
    for name in names:
        start = time.perf_counter()
        print(f"[bench] {name} ...", flush=True)
        body = SECTIONS[name](quick=args.quick)
        took = time.perf_counter() - start
        parts.append(body.rstrip() + f"\n\n_Section `{name}` took {took:.1f} s._\n")
        print(f"[bench] {name} done in {took:.1f} s", flush=True)
    out = Path(args.output)
    if args.only and out.exists():
        print(f"[bench] --only given: writing {out.with_suffix('.partial.md')} instead of replacing {out}")
        out = out.with_suffix(".partial.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts))
    print(f"[bench] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
