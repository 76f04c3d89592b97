"""Pipeline schedules as data: one ordered list of actions per device, with a compact text form.

An action is one piece of compute on one model chunk (a *stage*, numbered in model order) for one
micro-batch. The text form follows ``torch.distributed.pipelining``: ``"2F0"`` is stage 2, forward,
micro-batch 0. The kinds are torch's ``_ComputationType`` letters, with torch's meaning:

* ``F`` forward;
* ``I`` backward for the input only (the activation gradient the previous stage waits for);
* ``W`` backward for the weights only (nothing waits for it but the optimizer step);
* ``B`` the full backward, ``I`` and ``W`` in one pass (``"1B3"``).

The zero-bubble papers write the input-only pass as ``B``; here, as in torch, ``B`` is always the full
backward, so a program prints exactly as torch prints the same schedule. A :class:`Program` is
the whole schedule: the stage -> device placement plus each device's ordered actions. It prints to one
line per device and parses back to an equal object, so a schedule can be stored, diffed and replayed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

KINDS = ("F", "I", "W", "B")
_ACTION_RE = re.compile(r"^(\d+)(F|I|W|B)(\d+)$")


class Action(NamedTuple):
    """One compute action: ``kind`` of ``stage`` (model chunk, model order) on ``microbatch``.

    A NamedTuple rather than a dataclass: programs hold thousands of them and the asynchronous
    simulations build them by the hundred thousand, so creation cost matters (torch's ``_Action`` is
    one too). Values are checked where they enter from outside, in :meth:`parse`.
    """

    stage: int
    kind: str
    microbatch: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.microbatch}"

    @staticmethod
    def parse(text: str) -> Action:
        """Reverse of ``str(action)``: ``"2F0"`` -> ``Action(2, "F", 0)``."""
        match = _ACTION_RE.match(text.strip())
        if not match:
            raise ValueError(
                f"action: got {text!r}; expected <stage><kind><microbatch> with kind in {KINDS}, e.g. '2F0' or '1B3'"
            )
        stage, kind, microbatch = match.groups()
        return Action(int(stage), kind, int(microbatch))


@dataclass(frozen=True)
class Program:
    """A whole schedule: which device runs each stage, and each device's actions in order.

    ``placements[r][k]`` is the device of stage ``k`` in model replica ``r``; ordinary schedules have
    one replica, Chimera has two (the down and the up pipeline). ``replica_of[j]`` says which replica
    micro-batch ``j`` flows through (empty: all use replica 0). ``actions[d]`` is device ``d``'s
    program. ``microbatches`` is how many micro-batches the program covers (several optimizer steps
    for the asynchronous schedules, which are simulated over a window of steps without a flush).
    """

    placements: tuple[tuple[int, ...], ...]
    actions: tuple[tuple[Action, ...], ...]
    microbatches: int
    replica_of: tuple[int, ...] = ()

    @property
    def num_devices(self) -> int:
        return len(self.actions)

    @property
    def num_stages(self) -> int:
        return len(self.placements[0])

    def device_of(self, stage: int, microbatch: int) -> int:
        replica = self.replica_of[microbatch] if self.replica_of else 0
        return self.placements[replica][stage]

    def to_text(self) -> str:
        """One line per device: ``"d0: 0F0 0F1 0B0 ..."``; parse back with :func:`parse_program`."""
        placement = " | ".join(" ".join(str(d) for d in pl) for pl in self.placements)
        head = f"# stages->devices: {placement}; microbatches: {self.microbatches}"
        if self.replica_of:
            head += f"; replica of microbatch: {' '.join(str(r) for r in self.replica_of)}"
        lines = [head]
        for device, device_actions in enumerate(self.actions):
            lines.append(f"d{device}: " + " ".join(str(a) for a in device_actions))
        return "\n".join(lines)


def format_actions(actions: tuple[Action, ...] | list[Action]) -> str:
    """Space-separated text form of one device's actions."""
    return " ".join(str(a) for a in actions)


def parse_actions(text: str) -> tuple[Action, ...]:
    """Reverse of :func:`format_actions`; commas are accepted as separators too."""
    return tuple(Action.parse(tok) for tok in text.replace(",", " ").split())


def parse_program(text: str) -> Program:
    """Reverse of :meth:`Program.to_text`."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    prefix = "# stages->devices:"
    if not lines or not lines[0].startswith(prefix):
        raise ValueError(f"program text: the first line must start with {prefix!r}")
    fields = [f.strip() for f in lines[0][len(prefix) :].split(";")]
    placements = tuple(tuple(int(tok) for tok in part.split()) for part in fields[0].split("|"))
    microbatches = int(fields[1].removeprefix("microbatches:"))
    replica_of: tuple[int, ...] = ()
    if len(fields) > 2:
        replica_of = tuple(int(tok) for tok in fields[2].removeprefix("replica of microbatch:").split())
    per_device: list[tuple[Action, ...]] = []
    for expected, line in enumerate(lines[1:]):
        label, _, rest = line.partition(":")
        if label != f"d{expected}":
            raise ValueError(f"program text: expected line for device d{expected}, got {label!r}")
        per_device.append(parse_actions(rest))
    return Program(placements, tuple(per_device), microbatches, replica_of)
