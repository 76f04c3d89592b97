"""Where a command will write, checked before any work.

A wrong output path fails in milliseconds with a :class:`SpecError` naming the flag and the fix, not
with an ``OSError`` traceback after a search or a training run; nothing that exists is overwritten
without ``--force``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from planner.errors import SpecError


def check_output_file(flag: str, path: str | Path, *, force: bool, suffixes: tuple[str, ...] | None = None) -> Path:
    """The file ``flag`` will write: not a folder, under no file, existing only with ``force``.

    With ``suffixes`` (lower case, with the dot) a name without one gets the first (as matplotlib
    appends ``.png``) and any other suffix is refused. Returns the path to write.
    """
    text = str(path)
    out = Path(path)
    if out.is_dir() or text.endswith(("/", os.sep)):
        raise SpecError(flag, text, "it is a folder; give a file path")
    if suffixes:
        if not out.suffix:
            out = out.with_name(out.name + suffixes[0])
        elif out.suffix.lower() not in suffixes:
            raise SpecError(flag, text, f"cannot write {out.suffix} files; end the name with one of "
                            f"{', '.join(suffixes)}")
        if out.is_dir():
            raise SpecError(flag, str(out), "it is a folder; give a file path")
    _check_parents(flag, out)
    if out.exists() and not force:
        raise SpecError(flag, str(out), "the file exists; pass --force to overwrite it or choose another path")
    return out


def check_output_folder(flag: str, path: str | Path, *, force: bool, files: Iterable[str] | None = None,
                        exists_fix: str | None = None) -> Path:
    """The folder ``flag`` will write into: not a file, under no file, and without ``force`` either new,
    empty, or (with ``files``) holding none of the files to be written. ``exists_fix`` replaces the
    advice given when it is refused for what it holds."""
    out = Path(path)
    files = None if files is None else list(files)
    if out.exists() and not out.is_dir():
        raise SpecError(flag, str(out), "it is a file; give a folder path (this writes several files)")
    _check_parents(flag, out)
    if not out.is_dir():
        return out
    for name in files or ():
        if (out / name).is_dir():
            raise SpecError(flag, str(out), f"{name} is a folder there, where a file is written; choose another "
                            "folder")
    if force:
        return out
    if files is None:
        if any(out.iterdir()):
            raise SpecError(flag, str(out), exists_fix or "the folder is not empty; pass --force to write into it "
                            "or choose another folder")
        return out
    existing = [name for name in files if (out / name).exists()]
    if existing:
        raise SpecError(flag, str(out), exists_fix or f"{', '.join(existing)} exist there; pass --force to "
                        "overwrite them or choose another folder")
    return out


def _check_parents(flag: str, path: Path) -> None:
    """The nearest existing parent of ``path`` must be a folder this process can write into."""
    for parent in path.parents:
        if not parent.exists():
            continue  # created on write
        if not parent.is_dir():
            raise SpecError(flag, str(path), f"its parent {parent} is a file, not a folder; choose another path")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise SpecError(flag, str(path), f"cannot write into {parent} (permission denied); choose another path")
        return
