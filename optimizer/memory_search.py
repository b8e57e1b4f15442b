"""Search over canonical packings: does every buffer fit in an arena of `capacity` bytes?

Any packing can be pushed down until every buffer rests on the arena floor or on another buffer, and
then built bottom-up: buffers placed in order of offset (ties in a fixed rank order, since buffers at
one offset never overlap in time), each at the top of the placed buffers it overlaps. These are
MiniMalloc's canonical packings; the search enumerates them with three cuts from that paper:
  - dominance: a buffer placed at or above the lowest top any unplaced buffer could reach leaves a
    gap that buffer would fill, and the packing with it filled is searched elsewhere;
  - section floors: time is cut into sections between lifetime boundaries; a section's floor is the
    highest top placed in it, raised to the lowest offset any of its unplaced buffers can still take;
  - capacity: a section whose floor (at least the current offset) plus its unplaced bytes exceeds the
    capacity cannot be completed.
Several rank orders are tried in turn with doubling node limits, since one order can stall where
another finishes at once.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import numpy as np


class _Timeout(Exception):
    pass


class _NodeLimit(Exception):
    pass


def fits(sizes: Sequence[int], starts: Sequence[int], ends: Sequence[int], capacity: int,
         deadline: float) -> list[int] | None:
    """Offsets packing every buffer below `capacity`, or None if none exists or the deadline passed first.

    Lifetimes are closed step intervals [starts[i], ends[i]].
    """
    count = len(sizes)
    if count == 0:
        return []
    if max(sizes) > capacity:
        return None
    cuts = sorted(set(starts) | {end + 1 for end in ends})
    section_of = {cut: index for index, cut in enumerate(cuts)}
    spans = [range(section_of[start], section_of[end + 1]) for start, end in zip(starts, ends)]
    totals = np.zeros(len(cuts) - 1, dtype=np.int64)
    for size, span in zip(sizes, spans):
        totals[span.start:span.stop] += size
    if totals.max() > capacity:
        return None
    overlaps = [[j for j in range(count) if j != i and starts[i] <= ends[j] and starts[j] <= ends[i]]
                for i in range(count)]
    covering: list[list[int]] = [[] for _ in range(len(cuts) - 1)]
    for index, span in enumerate(spans):
        for section in span:
            covering[section].append(index)
    busiest = [int(totals[span.start:span.stop].max()) for span in spans]
    lengths = [end - start for start, end in zip(starts, ends)]
    orders = (  # measured on MiniMalloc's hard instances: each order finds packings the others miss
        sorted(range(count), key=lambda i: (starts[i], -sizes[i], i)),
        sorted(range(count), key=lambda i: (-lengths[i], -sizes[i], i)),
        sorted(range(count), key=lambda i: (-sizes[i] * (lengths[i] + 1), -sizes[i], i)),
        sorted(range(count), key=lambda i: (-busiest[i], -sizes[i], -lengths[i], i)),
    )
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 4 * count + 100))
    try:
        node_limit = count
        while True:
            node_limit *= 2
            for order in orders:
                try:
                    return _search(sizes, spans, overlaps, covering, totals.copy(), capacity, order, deadline, node_limit)
                except _NodeLimit:
                    continue
    except _Timeout:
        return None
    finally:
        sys.setrecursionlimit(limit)


def _search(sizes: Sequence[int], spans: Sequence[range], overlaps: Sequence[Sequence[int]],
            covering: Sequence[Sequence[int]], remaining: np.ndarray, capacity: int, order: Sequence[int], deadline: float, node_limit: int) -> list[int] | None:
    """One complete depth-first search in one rank order; raises _NodeLimit past `node_limit` nodes."""
    count = len(sizes)
    rank = [0] * count
    for position, index in enumerate(order):
        rank[index] = position
    offsets = [-1] * count
    lowest = [0] * count  # the lowest offset each unplaced buffer can still take
    floor = np.zeros(len(remaining), dtype=np.int64)
    nodes = [0]

    def search(placed: int, last: tuple[int, int]) -> bool:
        nodes[0] += 1
        if nodes[0] > node_limit:
            raise _NodeLimit
        if nodes[0] % 64 == 0 and time.perf_counter() > deadline:
            raise _Timeout
        if placed == count:
            return True
        unplaced = sorted((lowest[i], rank[i], i) for i in range(count) if offsets[i] < 0)
        ceiling = min(lowest[i] + sizes[i] for _, _, i in unplaced)
        # Placing raises no section's floor plus unplaced bytes above the current offset: offsets past this fail.
        ceiling = min(ceiling, capacity - int(remaining.max()) + 1)
        for offset, position, index in unplaced:
            if (offset, position) < last:
                continue
            if offset >= ceiling:
                break
            top = offset + sizes[index]
            span = spans[index]
            offsets[index] = offset
            raised = [(j, lowest[j]) for j in overlaps[index] if offsets[j] < 0 and lowest[j] < top]
            for j, _ in raised:
                lowest[j] = top
            saved_floor = floor[span.start:span.stop].copy()
            floor[span.start:span.stop] = top
            remaining[span.start:span.stop] -= sizes[index]
            touched = _raise_floors(floor, remaining, raised, top, spans, covering, offsets, lowest)
            if (np.maximum(floor, offset) + remaining <= capacity).all() and search(placed + 1, (offset, position)):
                return True
            for section, height in reversed(touched):
                floor[section] = height
            remaining[span.start:span.stop] += sizes[index]
            floor[span.start:span.stop] = saved_floor
            for j, height in raised:
                lowest[j] = height
            offsets[index] = -1
        return False

    return offsets if search(0, (-1, -1)) else None


def _raise_floors(floor: np.ndarray, remaining: np.ndarray, raised: Sequence[tuple[int, int]], top: int,
                  spans: Sequence[range], covering: Sequence[Sequence[int]], offsets: Sequence[int],
                  lowest: Sequence[int]) -> list[tuple[int, int]]:
    """Lift each section the raised buffers (now able to go no lower than `top`) cover to the lowest offset
    its unplaced buffers can take.

    Returns (section, old floor) for each change, to undo.
    """
    touched: list[tuple[int, int]] = []
    for section in {s for j, _ in raised for s in spans[j]}:
        if remaining[section] == 0 or floor[section] >= top:
            continue
        low = min(lowest[k] for k in covering[section] if offsets[k] < 0)
        if low > floor[section]:
            touched.append((section, int(floor[section])))
            floor[section] = low
    return touched
