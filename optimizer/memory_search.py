"""Search over canonical packings: does every buffer fit in an arena of `capacity` bytes?

Any packing can be pushed down until every buffer rests on the arena floor or on another buffer, and
then built bottom-up: buffers placed in order of offset (ties in a rank order, since buffers at one
offset never overlap in time), each at the top of the placed buffers it overlaps. These are
MiniMalloc's canonical packings (Moffitt, ASPLOS 2023); the search enumerates them with that paper's cuts:
  - dominance: a buffer placed at or above the lowest top any unplaced buffer could reach leaves a
    gap that buffer would fill, and the packing with it filled is searched elsewhere;
  - section floors: time is cut into sections between lifetime boundaries; a section's floor is the
    lowest offset any of its unplaced buffers can still take (recomputed only where a placement moved it);
  - capacity: a section whose floor (at least the current offset) plus its unplaced bytes exceeds the
    capacity cannot be completed;
  - hatless buffers: once a buffer that overlaps no unplaced buffer has been tried, the others need not
    be, since nothing else depends on where it goes;
  - dynamic decomposition: when no unplaced buffer crosses a section boundary, the two sides are
    independent problems, solved one after the other instead of multiplying their choices. A side
    found impossible is remembered (its buffers and how low each can go decide it), and not searched again.
Several rank orders are tried in turn with doubling node limits, since one order can stall where
another finishes at once.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PREORDERS = ("TWA", "WAT", "TAW", "SZ")
"""Rank orders, as keys compared in turn: T the most unplaced bytes live in any section of the buffer's
lifetime (recomputed for each independent part), W its lifetime, A its size times lifetime, Z its size
(all largest first), S its first step (earliest first). The first three are MiniMalloc's; "SZ" packs
instances where they stall (on the MiniMalloc suite, B at its capacity, D at 0.98 of it)."""

_PLACED = np.iinfo(np.int64).max // 4
"""The lowest offset of a placed buffer (and of the padding in `_Sections.cover`): above every real one."""


class _Timeout(Exception):
    pass


class _NodeLimit(Exception):
    pass


@dataclass(frozen=True, slots=True)
class _Sections:
    """The buffers of positive size cut into sections: the time between consecutive lifetime boundaries."""

    size: np.ndarray  # bytes per buffer, and a trailing 0 for the padding index
    first: np.ndarray  # the first section each buffer is live in
    last: np.ndarray  # one past its last section
    width: np.ndarray  # lifetime in steps
    overlaps: list[np.ndarray]  # the buffers live with each buffer
    cover: np.ndarray  # sections × most live buffers: the buffers live in each section, padded with the buffer count
    totals: np.ndarray  # bytes live in each section
    crossing: np.ndarray  # buffers live on both sides of each boundary between consecutive sections


@dataclass(frozen=True, slots=True)
class Packing:
    """What the search learned at one capacity: offsets that fit, or else whether none can (False when the
    deadline came first)."""

    offsets: list[int] | None
    impossible: bool


def fits(sizes: Sequence[int], starts: Sequence[int], ends: Sequence[int], capacity: int,
         deadline: float) -> list[int] | None:
    """Offsets packing every buffer below `capacity`, or None if none exists or the deadline passed first.

    Lifetimes are closed step intervals [starts[i], ends[i]].
    """
    return pack(sizes, starts, ends, capacity, deadline).offsets


def pack(sizes: Sequence[int], starts: Sequence[int], ends: Sequence[int], capacity: int,
         deadline: float) -> Packing:
    """Search for offsets packing every buffer below `capacity` until `deadline` (a time.perf_counter() value)."""
    count = len(sizes)
    if count == 0 or max(sizes) <= 0:
        return Packing([0] * count, False)
    if max(sizes) > capacity:
        return Packing(None, True)
    live = [i for i in range(count) if sizes[i] > 0]  # empty buffers sit at offset 0
    sections = _sections([sizes[i] for i in live], [starts[i] for i in live], [ends[i] for i in live])
    if sections.totals.max() > capacity:
        return Packing(None, True)
    failures: set[tuple[bytes, bytes]] = set()  # shared by every order: an impossible part is impossible in all
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 4 * len(live) + 100))
    try:
        node_limit = len(live)
        while True:
            node_limit *= 2
            for preorder in PREORDERS:
                try:
                    packed = _search(sections, capacity, preorder, deadline, node_limit, failures)
                except _NodeLimit:
                    continue
                if packed is None:
                    return Packing(None, True)
                offsets = [0] * count
                for index, offset in zip(live, packed):
                    offsets[index] = offset
                return Packing(offsets, False)
    except _Timeout:
        return Packing(None, False)
    finally:
        sys.setrecursionlimit(limit)


def _sections(sizes: Sequence[int], starts: Sequence[int], ends: Sequence[int]) -> _Sections:
    """The problem as the search reads it: sections, and which buffers live in each and with each other."""
    count = len(sizes)
    cuts = sorted(set(starts) | {end + 1 for end in ends})
    section_of = {cut: index for index, cut in enumerate(cuts)}
    first = np.array([section_of[start] for start in starts], dtype=np.int64)
    last = np.array([section_of[end + 1] for end in ends], dtype=np.int64)
    size = np.array([*sizes, 0], dtype=np.int64)
    totals = np.zeros(len(cuts) - 1, dtype=np.int64)
    crossing = np.zeros(len(cuts) - 2, dtype=np.int64)
    live_in: list[list[int]] = [[] for _ in range(len(cuts) - 1)]
    for index in range(count):
        totals[first[index]:last[index]] += sizes[index]
        crossing[first[index]:last[index] - 1] += 1
        for section in range(first[index], last[index]):
            live_in[section].append(index)
    cover = np.full((len(live_in), max(map(len, live_in))), count, dtype=np.int64)
    for section, buffers in enumerate(live_in):
        cover[section, :len(buffers)] = buffers
    overlaps = [np.array([j for j in range(count) if j != i and starts[i] <= ends[j] and starts[j] <= ends[i]],
                         dtype=np.int64) for i in range(count)]
    width = np.array([end - start + 1 for start, end in zip(starts, ends)], dtype=np.int64)
    return _Sections(size, first, last, width, overlaps, cover, totals, crossing)


def _search(sections: _Sections, capacity: int, preorder: str, deadline: float, node_limit: int,
            failures: set[tuple[bytes, bytes]]) -> list[int] | None:
    """One complete depth-first search in one rank order: offsets, or None if no packing exists.

    Raises _NodeLimit past `node_limit` nodes and _Timeout past the deadline.
    """
    size, first, last, overlaps, cover = sections.size, sections.first, sections.last, sections.overlaps, sections.cover
    count = len(first)
    size_of, first_of, last_of = size.tolist(), first.tolist(), last.tolist()
    rank = np.zeros(count, dtype=np.int64)
    lowest = np.zeros(count + 1, dtype=np.int64)  # how low each unplaced buffer can go; _PLACED once placed
    lowest[count] = _PLACED
    remaining = sections.totals.copy()  # unplaced bytes live in each section
    crossing = sections.crossing.copy()  # unplaced buffers live on both sides of each boundary
    offsets = [0] * count  # written as buffers are placed; the last writes are the packing found
    nodes = 0

    def solve(part: np.ndarray, low: int, high: int) -> bool:
        """Place every buffer of `part`, which lives in sections [low, high) and shares none with other parts."""
        key = (part.tobytes(), lowest[part].tobytes())
        if key in failures:
            return False
        saved = rank[part]
        rank[part] = _ranks(part, preorder, sections, remaining)
        found = place(part, low, high, -1)
        rank[part] = saved
        if not found:
            failures.add(key)
        return found

    def place(part: np.ndarray, low: int, high: int, least_key: int) -> bool:
        """Place the rest of `part`, the next buffer at a (lowest offset, rank) key of at least `least_key`."""
        nonlocal nodes
        nodes += 1
        if nodes > node_limit:
            raise _NodeLimit
        if nodes % 64 == 0 and time.perf_counter() > deadline:
            raise _Timeout
        bases = lowest[part]
        unplaced = bases < _PLACED
        part, bases = part[unplaced], bases[unplaced]
        if not part.size:
            return True
        # Offsets from `ceiling` up are cut: by dominance, and by the capacity, as every floor of the part rises
        # to at least the offset placed (canonical offsets only grow). argmin and argmax, not min and max:
        # numpy's reductions cost several times more than its index lookups on arrays this small.
        heights = bases + size[part]
        unplaced_bytes = remaining[low:high]
        ceiling = min(int(heights[heights.argmin()]), capacity - int(unplaced_bytes[unplaced_bytes.argmax()]) + 1)
        keys = bases * count + rank[part]
        in_order = keys.argsort()
        keys = keys[in_order]
        begin, end = keys.searchsorted(least_key), keys.searchsorted(ceiling * count)
        for index, key in zip(part[in_order[begin:end]].tolist(), keys[begin:end].tolist()):
            offset = key // count
            top = offset + size_of[index]
            near = overlaps[index]
            near_lowest = lowest[near]
            hatless = not near.size or near_lowest[near_lowest.argmin()] == _PLACED
            lifted = near_lowest < top
            raised = near[lifted]
            moved_start, moved_stop = first_of[index], last_of[index]  # the sections whose floors can move
            if raised.size:
                raised_from = near_lowest[lifted]
                raised_first, raised_last = first[raised], last[raised]
                moved_start = min(moved_start, int(raised_first[raised_first.argmin()]))
                moved_stop = max(moved_stop, int(raised_last[raised_last.argmax()]))
                lowest[raised] = top
            lowest[index] = _PLACED
            remaining[first_of[index]:last_of[index]] -= size_of[index]
            found = _fits_above(lowest, cover, remaining, capacity, moved_start, moved_stop)
            if found:
                offsets[index] = offset
                found = split(part, low, high, index, key)
            remaining[first_of[index]:last_of[index]] += size_of[index]
            if raised.size:
                lowest[raised] = raised_from
            lowest[index] = offset
            if found:
                return True
            if hatless:
                break
        return False

    def split(part: np.ndarray, low: int, high: int, placed: int, key: int) -> bool:
        """Go on after placing `placed`: in `part` if it still hangs together, else in each independent piece."""
        start, stop = first_of[placed], last_of[placed]
        boundaries = crossing[start:stop - 1]
        boundaries -= 1
        freed = boundaries.size and not boundaries[boundaries.argmin()]  # a boundary nothing unplaced crosses
        cuts = (np.flatnonzero(boundaries == 0) + start + 1).tolist() if freed else []
        if not cuts:
            found = place(part, low, high, key)
        else:
            rest = part[lowest[part] < _PLACED]
            begins = first[rest]
            bounds = [low, *cuts, high]
            found = all(solve(piece, lower, upper) for lower, upper in zip(bounds, bounds[1:])
                        if (piece := rest[(begins >= lower) & (begins < upper)]).size)
        boundaries += 1
        return found

    everything = np.arange(count, dtype=np.int64)
    bounds = [0, *(np.flatnonzero(crossing == 0) + 1).tolist(), len(remaining)]
    for lower, upper in zip(bounds, bounds[1:]):
        if not solve(everything[(first >= lower) & (first < upper)], lower, upper):
            return None
    return offsets


def _fits_above(lowest: np.ndarray, cover: np.ndarray, remaining: np.ndarray, capacity: int, low: int,
                high: int) -> bool:
    """Whether the unplaced bytes of each section in [low, high) fit between the capacity and its floor,
    the lowest offset any of them can take."""
    floor = lowest[cover[low:high]].min(axis=1)
    np.minimum(floor, capacity, out=floor)  # a section with nothing left to place: any floor fits
    return not np.count_nonzero(floor + remaining[low:high] > capacity)


def _ranks(part: np.ndarray, preorder: str, sections: _Sections, remaining: np.ndarray) -> np.ndarray:
    """Each buffer's position in `part` sorted by `preorder` (see PREORDERS)."""
    bounds = np.empty(2 * part.size, dtype=np.int64)
    bounds[0::2], bounds[1::2] = sections.first[part], sections.last[part]
    busiest = np.maximum.reduceat(np.append(remaining, 0), bounds)[0::2]
    width = sections.width[part]
    columns = {"T": -busiest, "W": -width, "A": -sections.size[part] * width, "Z": -sections.size[part],
               "S": sections.first[part]}
    order = np.lexsort([part, *(columns[letter] for letter in reversed(preorder))])
    ranks = np.empty(part.size, dtype=np.int64)
    ranks[order] = np.arange(part.size)
    return ranks
