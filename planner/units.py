"""How counts read in messages: parameter counts in K, M, B and T, and nouns that agree with their number.

Every place that prints a parameter count calls :func:`format_count`, so a 4,562-parameter model
reads "4.6K", not "0.0M"; every message that counts something calls :func:`plural`, so one device
reads "1 device" and one launched process "1 process was launched".
"""

from __future__ import annotations

_SUFFIXES = ("", "K", "M", "B", "T")


def format_count(n: float) -> str:
    """``n`` with a thousands suffix and three significant figures at most: 512, 4.6K, 126M, 175B, 1.0T.

    One decimal below 100 of a unit, none from 100 up; a value that rounds to 1000 of one unit moves
    to the next (999,960 reads "1.0M", not "1000.0K"). Past T the number grows ("1200T").
    """
    if n != n or n in (float("inf"), float("-inf")):
        return str(n)
    sign = "-" if n < 0 else ""
    value = abs(float(n))
    if value < 1000:
        return f"{sign}{value:.0f}" if value == int(value) else f"{sign}{value:.3g}"
    for i, suffix in enumerate(_SUFFIXES[1:], 1):
        scaled = value / 1000**i
        text = f"{scaled:.1f}" if scaled < 99.95 else f"{scaled:.0f}"
        if float(text) < 1000 or i == len(_SUFFIXES) - 1:
            return f"{sign}{text}{suffix}"
    raise AssertionError("unreachable")


def plural(n: int, noun: str, plural_noun: str | None = None) -> str:
    """``"1 device"``, ``"2 devices"``; ``plural_noun`` for the irregular ones (``"process"``, ``"processes"``)."""
    return f"{n} {noun if n == 1 else (plural_noun or noun + 's')}"


def verb(n: int, singular: str, plural_verb: str) -> str:
    """The verb that agrees with ``n``: ``verb(1, "was", "were")`` is ``"was"``."""
    return singular if n == 1 else plural_verb
