"""Chunk boundaries for multi-chunk schedules that balance each device's work, not each chunk's.

With ``v > 1`` chunks per device (interleaved 1F1B, zero-bubble V, Chimera) a device runs every
micro-batch of each of its chunks, so the steady state of the step goes at the pace of the busiest
device, whose work is the sum of its chunks (:mod:`planner.cost.model`). The chain solver
(:mod:`planner.inter_op.chain`) minimises the slowest *chunk*; many splits reach that, and the one it
returns can pile whole blocks onto alternate devices. Llama 3 70B on 8 stages × 5 chunks is the case
that showed it: 82 layers (embedding, 80 blocks, head) into 40 chunks gave the devices 11, 9, 12, 9,
12, 9, 12 and 6 blocks, where Megatron-LM's uniform split gives every device 10; balanced, they get
9 to 11 (the last device 9 and the head).

:func:`balance_chunks` searches the splits for the least busiest device, then the most even devices,
then the slowest chunk (the pipeline's fill and drain), and with memory given, first the least memory
over the devices' limits. It is a local search (each cut moved to its best place alone; where that is
stuck, two or three neighbouring cuts shifted by one layer together; from three starts: equal time
per chunk, the min-max split, equal layers per chunk, or on large chains (chunks × layers over 600)
from equal time alone), not an exact solver: the exact problem couples
every chunk of a device and has no chain recurrence.
``tests/inter_op/test_device_balance.py`` compares it with enumerating every split on small chains.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from planner.inter_op.chain import Partition, uniform_partition

# Per-device memory (bytes) of a split given as chunk boundaries.
DeviceMemory = Callable[[tuple[tuple[int, int], ...]], Sequence[float]]
_REL = 1e-9  # relative slack: a move must improve a key by more than rounding
_SMALL = 600  # chunks × layers up to which all three starts are searched
_WINDOW = 2  # window moves shift up to this many cuts beyond the first (more: slower, rarely better)


def _quantile_cuts(prefix: np.ndarray, k: int) -> list[int]:
    """Cuts at the layer boundaries nearest ``i/k`` of the total time (every chunk non-empty)."""
    n = len(prefix) - 1
    total = float(prefix[-1])
    cuts = [0]
    for i in range(1, k):
        j = int(np.searchsorted(prefix, total * i / k))
        if j > 0 and abs(prefix[j - 1] - total * i / k) <= abs(prefix[min(j, n)] - total * i / k):
            j -= 1
        cuts.append(min(max(j, cuts[-1] + 1), n - (k - i)))
    return cuts + [n]


class _Search:
    """One local search: each cut to its best position between its neighbours, and where that is
    stuck, windows of cuts shifted together, until a sweep changes nothing."""

    def __init__(self, time: np.ndarray, devices: Sequence[int], memory: DeviceMemory | None,
                 limits: Sequence[float]) -> None:
        self.devices = np.asarray(devices)
        self.p = int(self.devices.max()) + 1
        rows = np.broadcast_to(np.asarray(time, dtype=float), (self.p, np.shape(time)[-1]))
        self.prefix = np.concatenate([np.zeros((self.p, 1)), np.cumsum(rows, axis=1)], axis=1)  # [device, cut]
        self.memory, self.limits = memory, list(limits)
        self.plist, self.dlist = self.prefix.tolist(), self.devices.tolist()
        self.held: list[list[int]] = [[] for _ in range(self.p)]  # each device's chunks, in model order
        for j, d in enumerate(self.dlist):
            self.held[d].append(j)
        self._last_over: tuple[tuple[int, ...], set[int]] = ((), set())
        self._last_split: tuple[tuple[int, ...], list[float], list[float], list[float], list[float]] | None = None

    def _split_of(self, cuts: list[int]) -> tuple[list[float], list[float], list[float], list[float]]:
        """Chunk times, device works, and the running maxima of the chunk times from the left
        (``before[j]``: chunks ``< j``) and from the right (``after[j]``: chunks ``>= j``) at ``cuts``;
        the last answer is kept, as a sweep asks once per cut until a move is taken."""
        key = tuple(cuts)
        if self._last_split is None or self._last_split[0] != key:
            chunk, work = self._chunks_works(cuts)
            before, after = [0.0] * (len(chunk) + 1), [0.0] * (len(chunk) + 1)
            for j, t in enumerate(chunk):
                before[j + 1] = max(before[j], t)
            for j in range(len(chunk) - 1, -1, -1):
                after[j] = max(after[j + 1], chunk[j])
            self._last_split = (key, chunk, work, before, after)
        return self._last_split[1:]

    def _chunks_works(self, cuts: list[int]) -> tuple[list[float], list[float]]:
        """Each chunk's time at its device's speed, and each device's work (its chunks summed in model order)."""
        P, dev = self.plist, self.dlist
        chunk = [P[d][y] - P[d][x] for d, x, y in zip(dev, cuts, cuts[1:])]
        work = [0.0] * self.p
        for d, t in zip(dev, chunk):
            work[d] += t
        return chunk, work

    def key(self, cuts: list[int]) -> tuple[float, float, float, float]:
        chunk, work = self._chunks_works(cuts)
        over = 0.0
        if self.memory is not None:
            mem = self.memory(_bounds(cuts))
            over = sum(max(0.0, m - lim) for m, lim in zip(mem, self.limits))
        return over, max(work), sum(w * w for w in work), max(chunk)

    def _moved_key(self, cuts: list[int], trial: list[int], lo: int, hi: int) -> tuple[float, float, float, float]:
        """:meth:`key` of ``trial``, which differs from ``cuts`` only at cuts ``lo..hi`` (time only), from
        the kept split of ``cuts``: the chunks beside those cuts and the works of their devices are
        summed again, in the same order as :meth:`key` sums them, so the two agree to the bit."""
        chunk, work, before, after = self._split_of(cuts)
        P, dev = self.plist, self.dlist
        changed = {j: P[dev[j]][trial[j + 1]] - P[dev[j]][trial[j]] for j in range(lo - 1, hi + 1)}
        work = work.copy()
        for d in {dev[j] for j in changed}:
            total = 0.0
            for j in self.held[d]:
                total += changed[j] if j in changed else chunk[j]
            work[d] = total
        slowest = max(before[lo - 1], after[hi + 1], *changed.values())
        return 0.0, max(work), sum(w * w for w in work), slowest

    def _over(self, cuts: list[int]) -> set[int]:
        """The devices over their memory limit at ``cuts`` (the last answer kept: a sweep asks once per cut)."""
        assert self.memory is not None
        key = tuple(cuts)
        if self._last_over[0] != key:
            mem = self.memory(_bounds(cuts))
            self._last_over = (key, {d for d, (m, lim) in enumerate(zip(mem, self.limits)) if m > lim})
        return self._last_over[1]

    def _best_place(self, cuts: list[int], i: int) -> int:
        """Cut ``i``'s best position between its neighbours, every position keyed from the other chunks'
        totals (only the two chunks beside the cut change)."""
        P, dev = self.plist, self.dlist
        lo, hi = cuts[i - 1], cuts[i + 1]
        chunk, work, before, after = self._split_of(cuts)
        work = work.copy()
        a, b = dev[i - 1], dev[i]
        work[a] -= chunk[i - 1]
        work[b] -= chunk[i]
        rest = [w for d, w in enumerate(work) if d != a and d != b]
        rest_max, rest_sq = max(rest, default=0.0), sum(w * w for w in rest)
        others = max(before[i - 1], after[i + 1])  # every chunk but the two beside the cut
        best: tuple[tuple[float, float, float], int] | None = None
        for x in range(lo + 1, hi):
            left, right = P[a][x] - P[a][lo], P[b][hi] - P[b][x]
            if a == b:
                wa = wb = work[a] + left + right
                sq = rest_sq + wa * wa
            else:
                wa, wb = work[a] + left, work[b] + right
                sq = rest_sq + wa * wa + wb * wb
            key = (max(wa, wb, rest_max), sq, max(left, right, others))
            if best is None or key < best[0]:
                best = (key, x)
        return cuts[i] if best is None else best[1]

    def _single(self, cuts: list[int], i: int) -> list[list[int]]:
        """Cut ``i`` alone: at its best position between its neighbours (time only), or one layer either
        way (memory: each trial prices the devices)."""
        over = self._over(cuts) if self.memory is not None else set()
        if not over:
            xs = [self._best_place(cuts, i)]
        elif {self.dlist[i - 1], self.dlist[i]} & over:
            xs = [cuts[i] - 1, cuts[i] + 1]
        else:
            return []  # while a device is over its limit, only moves that can take layers off it
        return [cuts[:i] + [x] + cuts[i + 1:] for x in xs if x != cuts[i] and cuts[i - 1] < x < cuts[i + 1]]

    def _windows(self, cuts: list[int], i: int) -> list[list[int]]:
        """Cuts ``i..i+r`` (r >= 1) shifted together by one layer: work moves between the devices of
        chunks ``i-1`` and ``i+r``, which no single cut joins. Tried where single cuts are stuck."""
        out, last = [], len(cuts) - 1
        over = self._over(cuts) if self.memory is not None else set()
        for r in range(1, min(_WINDOW + 1, last - i)):
            if over and not {self.dlist[i - 1], self.dlist[i + r]} & over:
                continue
            for step in (-1, 1):
                moved = [x + step for x in cuts[i:i + r + 1]]
                if cuts[i - 1] < moved[0] and moved[-1] < cuts[i + r + 1]:
                    out.append(cuts[:i] + moved + cuts[i + r + 1:])
        return out

    def _sweep(self, cuts: list[int], best: tuple[float, ...],
               moves: Callable[[list[int], int], list[list[int]]]) -> tuple[list[int], tuple[float, ...], bool]:
        """One pass over the cuts, taking each improving move (first found)."""
        improved = False
        for i in range(1, len(cuts) - 1):
            for trial in moves(cuts, i):
                if self.memory is None:  # a move shifts the cuts from i on; the rest are as before
                    hi = i
                    while trial[hi + 1] != cuts[hi + 1]:
                        hi += 1
                    k = self._moved_key(cuts, trial, i, hi)
                else:
                    k = self.key(trial)
                if _better(k, best):
                    cuts, best, improved = trial, k, True
                    break
        return cuts, best, improved

    def run(self, cuts: list[int], max_sweeps: int) -> tuple[list[int], tuple[float, ...]]:
        best = self.key(cuts)
        for _ in range(max_sweeps):
            cuts, best, improved = self._sweep(cuts, best, self._single)
            if not improved:
                cuts, best, improved = self._sweep(cuts, best, self._windows)
            if not improved:
                break
        return cuts, best


def _better(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """``a`` lexicographically below ``b``, each term by more than rounding."""
    for x, y in zip(a, b):
        tol = _REL * max(abs(x), abs(y), 1e-300)
        if x < y - tol:
            return True
        if x > y + tol:
            return False
    return False


def _bounds(cuts: Sequence[int]) -> tuple[tuple[int, int], ...]:
    return tuple((a, b) for a, b in zip(cuts, cuts[1:]))


def balance_chunks(time: np.ndarray, devices: Sequence[int], start: Partition, *,
                   memory: DeviceMemory | None = None, limits: Sequence[float] = ()) -> Partition:
    """Boundaries of ``len(devices)`` chunks of the layers timed by ``time`` (seconds per micro-batch
    per layer: ``[L]``, or ``[devices, L]`` each device at its own speed), chunk ``j`` on device
    ``devices[j]``, lowering (memory over ``limits`` when ``memory``
    is given, busiest device's time, sum of squared device times, slowest chunk).

    Sweeps stop when nothing improves, or after 4·L of them (with memory, 2 per device).
    ``start`` is the chain solver's min-max split of the same chunks: one of the three starts, and its
    ``bottleneck_bound_s`` (no split has a faster slowest chunk, so no device runs less) is kept.
    """
    k, n = len(devices), int(np.shape(time)[-1])
    if not start.feasible or k <= 1 or k >= n or len(set(devices)) == k:
        return start  # nothing to balance: infeasible, one chunk per layer, or one chunk per device
    search = _Search(time, devices, memory, limits)
    starts = [_quantile_cuts(search.prefix.mean(axis=0), k), [a for a, _ in start.boundaries] + [n],
              [a for a, _ in uniform_partition(n, k)] + [n]]
    if k * n > _SMALL:
        starts = starts[:1]  # large chains: the equal-time start alone (each search costs ~k·n per sweep)
    sweeps = 4 * n if memory is None else 2 * search.p
    best_cuts, best_key = None, None
    for cuts in starts if memory is None else [[a for a, _ in start.boundaries] + [n]]:  # ``start``: time-balanced
        cuts, key = search.run(list(cuts), sweeps)
        if best_key is None or _better(key, best_key):
            best_cuts, best_key = cuts, key
    assert best_cuts is not None and best_key is not None
    own = [a for a, _ in start.boundaries] + [n]
    if _better(search.key(own), best_key):  # large chains skip ``start`` as a start: never return worse
        return start
    return Partition(_bounds(best_cuts), best_key[3], start.status, start.bottleneck_bound_s)


def busiest_work(time: np.ndarray, devices: Sequence[int], bounds: Sequence[tuple[int, int]]) -> float:
    """The busiest device's work (seconds per micro-batch) of the chunks ``bounds``, chunk ``j`` on
    ``devices[j]``, ``time`` as :func:`balance_chunks` takes it."""
    return _Search(time, devices, None, ()).key([a for a, _ in bounds] + [bounds[-1][1]])[1]
