"""Errors the planner raises at its boundary.

Every error a user can cause names the field, the value and the fix, so the CLI can print it
without a traceback. Internal invariants use ``assert`` instead.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXIT_USER_ERROR = 2  # the input is wrong: the message names the field and the fix
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT


class PlannerError(Exception):
    """Base class for errors the CLI reports as a one-paragraph message (exit code 2)."""


class SpecError(PlannerError, ValueError):
    """A user-supplied value is wrong: names the field, the value, and how to fix it."""

    def __init__(self, field: str, value: object, fix: str, *, source: str | None = None) -> None:
        self.field = field
        self.value = value
        self.fix = fix
        self.source = source
        where = f" in {source}" if source else ""
        shown = repr(value)
        if len(shown) > 120:
            shown = shown[:117] + "..."
        super().__init__(f"{field}{where}: got {shown}; {fix}")


class SpecErrors(SpecError):
    """Several :class:`SpecError` found together (every bad argument of one command line), one per field.

    It is a :class:`SpecError` (``field``, ``value`` and ``fix`` are the first one's) so callers that
    catch one catch both; ``errors`` holds them all, and the message is one line per error.
    :func:`raise_all` raises a single error as itself.
    """

    def __init__(self, errors: Sequence[SpecError]) -> None:
        if not errors:
            raise ValueError("SpecErrors needs at least one error")
        self.errors = tuple(errors)
        first = self.errors[0]
        self.field, self.value, self.fix, self.source = first.field, first.value, first.fix, first.source
        PlannerError.__init__(self, "\n".join(str(e) for e in self.errors))

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(e.field for e in self.errors)


def each_error(exc: SpecError) -> tuple[SpecError, ...]:
    """The single errors ``exc`` holds: those of a :class:`SpecErrors`, else ``exc`` itself."""
    return exc.errors if isinstance(exc, SpecErrors) else (exc,)


def raise_all(errors: Sequence[SpecError]) -> None:
    """Raise nothing, the one error, or all of them as :class:`SpecErrors` (a :class:`SpecErrors` among
    them is flattened, so the CLI still prints one line per field)."""
    flat = [single for e in errors for single in each_error(e)]
    if len(flat) == 1:
        raise flat[0]
    if flat:
        raise SpecErrors(flat)


class InfeasibleError(PlannerError):
    """No configuration fits: says what overflows, where, and what would be enough."""

    def __init__(self, message: str, *, details: dict | None = None) -> None:
        self.details = details or {}
        super().__init__(message)


class TraceError(PlannerError):
    """The model could not be traced even at the coarsest granularity."""


class PlanMismatchError(PlannerError):
    """A plan file does not match the model, cluster, world or schema it is used with."""


# -- command-line arguments: read leniently, checked together -------------------------------------
# argparse stops at the first value it cannot convert. The CLIs give it the readers below instead of
# ``int``/``float``/``choices``: a bad value becomes an ``Unreadable`` in the namespace, parsing goes on,
# and ``ArgumentCheck`` reports it with every other problem of the same command line, one line per field.


@dataclass(frozen=True)
class Unreadable:
    """An argument's text that could not be read, and how to write it."""

    text: str
    fix: str


def int_arg(text: str) -> int | Unreadable:
    try:
        return int(text)
    except ValueError:
        return Unreadable(text, "expected an integer")


def float_arg(text: str) -> float | Unreadable:
    try:
        value = float(text)
    except ValueError:
        return Unreadable(text, "expected a number")
    return value if math.isfinite(value) else Unreadable(text, "expected a finite number")


def choice_arg(*options: object) -> Callable[[str], Any]:
    """A reader that accepts one of ``options`` (compared as text, returned as given)."""
    names = [str(o) for o in options]

    def read(text: str) -> Any:
        if text in names:
            return options[names.index(text)]
        close = difflib.get_close_matches(text, names, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        return Unreadable(text, f"{hint}use one of {', '.join(names)}")

    return read


def choices_metavar(*options: object) -> str:
    """What argparse would show for ``choices=options``: ``{a,b,c}``."""
    return "{" + ",".join(str(o) for o in options) + "}"


def flag(dest: str) -> str:
    """The option an argparse ``dest`` came from: ``micro_batch`` -> ``--micro-batch``."""
    return "--" + dest.replace("_", "-")


def subcommand_options(parser: argparse.ArgumentParser, command: str) -> list[str]:
    """The option strings of one subcommand, in ``--help`` order (for ordering errors and "did you mean")."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return [o for a in action.choices[command]._actions for o in a.option_strings]
    return []


class ArgumentCheck:
    """Every problem of one command line, collected, then raised together by :meth:`raise_if_any`.

    Made from the namespace and the leftovers of ``parse_known_args``: unreadable values and unknown
    options are recorded at once; the ``require``/``at_least``/``add`` calls add the rest. A value
    already found wrong reads as ``None`` from :meth:`value`, so a later check that needs it (batch
    divisibility needs dp and micro-batch) skips instead of blaming a second field for it.
    """

    def __init__(self, args: argparse.Namespace, unknown: Sequence[str] = (), *, command: str = "",
                 options: Sequence[str] = ()) -> None:
        self.args = args
        self.command = command
        self.options = list(options)
        self.errors: list[SpecError] = []
        for dest, value in vars(args).items():
            if isinstance(value, Unreadable):
                self.add(flag(dest), value.text, value.fix)
        self._unknown(list(unknown), self.options)

    def _unknown(self, tokens: list[str], options: list[str]) -> None:
        where = f"`{self.command}`" if self.command else "this command"
        i = 0
        while i < len(tokens):
            token = tokens[i]
            i += 1
            if not token.startswith("-") or token == "-":
                self.add("argument", token, f"unexpected extra argument to {where}")
                continue
            name, eq, value = token.partition("=")
            if not eq and i < len(tokens) and not tokens[i].startswith("-"):
                value, i = tokens[i], i + 1
            close = difflib.get_close_matches(name, options, n=1, cutoff=0.75)
            hint = f"did you mean {close[0]}? " if close else ""
            self.add(name, value or None, f"unknown option for {where}; {hint}`--help` lists them")

    def add(self, field: str, value: object, fix: str) -> None:
        self.errors.append(SpecError(field, value, fix))

    def attempt(self, check: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``check(*args, **kwargs)``, its SpecError recorded with the others instead of raised; its
        result, or None when it failed."""
        try:
            return check(*args, **kwargs)
        except SpecError as exc:
            self.errors.append(exc)
            return None

    def failed(self, dest: str) -> bool:
        return any(e.field == flag(dest) for e in self.errors)

    def value(self, dest: str) -> Any:
        """The argument's value, or ``None`` when it is absent or already reported as wrong."""
        value = getattr(self.args, dest, None)
        return None if isinstance(value, Unreadable) or self.failed(dest) else value

    def require(self, *dests: str) -> None:
        for dest in dests:
            if getattr(self.args, dest, None) is None:
                self.add(flag(dest), None, f"this option is required for `{self.command}`")

    def at_least(self, minimum: float, *dests: str, integer: bool = True) -> None:
        """Each given value of ``dests`` must be >= ``minimum`` (``> 0`` for ``minimum=0, integer=False``)."""
        for dest in dests:
            value = self.value(dest)
            if value is None:
                continue
            if integer and value < minimum:
                self.add(flag(dest), value, f"expected an integer >= {minimum:g}")
            elif not integer and value <= minimum:
                self.add(flag(dest), value, f"expected a number > {minimum:g}")

    def raise_if_any(self) -> None:
        """Raise what was found, in the order ``--help`` lists the options (unknown ones last)."""
        order = {name: i for i, name in enumerate(self.options)}
        raise_all(sorted(self.errors, key=lambda e: order.get(e.field, order.get(flag(e.field), len(order)))))


def read_json_file(path: str | Path, field: str, *, what: str, damaged_fix: str) -> Any:
    """Parse a user's JSON file; unreadable or malformed files become a SpecError naming the fix.

    Every file a user writes (cluster, plan, ``--constants``, a Hugging Face ``config.json``, a model
    preset) is read here, so each refuses a key written twice in one object (:func:`loads_unique`)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(field, str(path), f"cannot read {what} ({exc.strerror}); check the path") from exc
    except UnicodeDecodeError as exc:
        raise SpecError(field, str(path), f"{what} is not UTF-8 text (byte {exc.start}); {damaged_fix}") from None
    try:
        return loads_unique(text, source=str(path))
    except json.JSONDecodeError as exc:
        raise SpecError(field, str(path), f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                        f"{damaged_fix}") from exc


def loads_unique(text: str, *, source: str | None = None) -> Any:
    """``json.loads(text)``, refusing a key written twice in one object.

    JSON parsers keep the last of the two values without a word, so an edit that added a key instead of
    changing it (``"devices_per_node": 8, ..., "devices_per_node": 4``) would be read as the other
    value. Each such key is a :class:`SpecError` naming it (its path in the document: ``inter_node.latency_s``),
    its values and ``source``, all of them at once."""
    twice: list[tuple[dict, str, list]] = []

    def unique(pairs: list[tuple[str, Any]]) -> dict:
        obj = dict(pairs)
        if len(obj) < len(pairs):
            for key in obj:
                values = [v for k, v in pairs if k == key]
                if len(values) > 1:
                    twice.append((obj, key, values))
        return obj

    data = json.loads(text, object_pairs_hook=unique)
    if twice:
        prefixes = _object_prefixes(data)
        raise_all([SpecError(f"{prefixes.get(id(obj), '')}{key}", values,
                             f"the key is written {'twice' if len(values) == 2 else f'{len(values)} times'} in one "
                             "object (JSON would silently keep the last value); delete the ones you do not mean",
                             source=source) for obj, key, values in twice])
    return data


def _object_prefixes(data: Any, prefix: str = "") -> dict[int, str]:
    """``id`` of every object in parsed JSON -> its path as a field prefix (``""``, ``groups[0].device.``)."""
    out: dict[int, str] = {}
    if isinstance(data, dict):
        out[id(data)] = prefix
        for key, value in data.items():
            out.update(_object_prefixes(value, f"{prefix}{key}."))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            out.update(_object_prefixes(value, f"{prefix.rstrip('.')}[{i}]."))
    return out


def run_command(body: Callable[[], int], *, debug: bool,
                user_errors: type[Exception] | tuple[type[Exception], ...] = PlannerError) -> int:
    """Run one CLI command and turn the errors a user can cause into an exit code.

    ``user_errors`` (default :class:`PlannerError`) prints ``error: <message>`` on stderr (one line per
    error of a :class:`SpecErrors`) and returns :data:`EXIT_USER_ERROR`, with the traceback first when
    ``debug``; Ctrl-C prints ``interrupted`` and returns :data:`EXIT_INTERRUPTED`. Anything else is a
    bug and propagates with its traceback. ``python -m planner`` and ``python -m runtime`` both exit
    through here, so their codes and messages cannot drift apart.
    """
    try:
        return body()
    except user_errors as exc:
        if debug:
            traceback.print_exc()
        for error in exc.errors if isinstance(exc, SpecErrors) else (exc,):  # one line per field
            print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader stopped early (`... | head`): nothing more to say, and no traceback
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit cannot fail
        except (OSError, ValueError):  # stdout is not a file (a test's capture)
            pass
        return 0
