"""Every bad input gets a clear answer; docs/reliability.md is this table, kept in sync.

Regenerate the doc with: PLANNER_WRITE_DOCS=1 .venv/bin/pytest tests/reliability/test_bad_inputs.py
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from planner.cli import main

from .cases import CASES  # noqa: TID252

DOC = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"
_results: dict[str, tuple[int, str, str]] = {}  # id -> (exit code, stderr, subcommand)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_clear_answer(case, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps --help to the terminal: the page must not depend on it
    argv = case.make(tmp_path)
    capsys.readouterr()
    old_umask = os.umask(case.umask) if case.umask is not None else None
    try:
        if case.cli == "runtime":
            from runtime.cli import main as runtime_main

            code = runtime_main(argv)
        else:
            code = main(argv)
    except SystemExit as exc:  # --help
        code = exc.code
    finally:
        if old_umask is not None:
            os.umask(old_umask)
    captured = capsys.readouterr()
    err = captured.err
    text = captured.out if case.stream == "stdout" else err
    if case.observe:
        text += "\n" + case.observe(tmp_path)
    shown = err.strip() if case.stream == "stderr" else " … ".join(
        " ".join(line.split()) for line in text.splitlines() if any(f in line for f in case.fragments))
    _results[case.id] = (code, shown, argv[0])
    assert code == case.exit_code, err
    assert "Traceback" not in err
    for fragment in case.fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"


def _render() -> str:
    lines = [
        "# Reliability: bad inputs and the answers they get\n",
        "Generated from `tests/reliability/cases.py` by "
        "`PLANNER_WRITE_DOCS=1 .venv/bin/pytest tests/reliability/test_bad_inputs.py`; the same test "
        "asserts every exit code and message fragment below, and fails if this page is stale.\n",
        f"{len(CASES)} cases. Exit code 2: the input is wrong (message names the field and the fix, one line "
        "per field); 3: the configuration was priced but does not fit in memory; 0: a good input, shown for "
        "the lines of what it prints that the case checks.\n",
        "| # | area | input | command | exit | message |", "| --- | --- | --- | --- | --- | --- |",
    ]
    for i, case in enumerate(CASES, 1):
        code, err, verb = _results[case.id]
        msg = err.replace("|", "\\|").replace("\n", "<br>")
        if code == 3:
            msg = "(prediction printed; stdout says DOES NOT FIT)"
        lines.append(f"| {i} | {case.area} | {case.what} | python -m {case.cli} {verb} | {code} | {msg} |")
    fuzzing = Path(__file__).with_name("fuzzing.md")  # the property test's recorded budget run (test_fuzz_cli.py)
    return "\n".join(lines) + "\n" + ("\n" + fuzzing.read_text() if fuzzing.exists() else "")


def test_doc_table_is_current():
    if len(_results) != len(CASES):
        pytest.skip("run with the case tests (the whole file) to check the doc")
    text = _render()
    # Temp paths differ per run: compare with them masked.
    import re

    # (under pytest-xdist each worker's temp root has one more level, popen-gwN)
    mask = lambda s: re.sub(r"/tmp/pytest-of-[^/\s]+/pytest-\d+/(?:popen-gw\d+/)?[^/\s]+", "<tmp>", s)  # noqa: E731
    if os.environ.get("PLANNER_WRITE_DOCS"):
        DOC.write_text(mask(text))
    assert DOC.exists(), "docs/reliability.md missing: regenerate it (see module docstring)"
    assert mask(DOC.read_text()) == mask(text), "docs/reliability.md is stale: regenerate it"
