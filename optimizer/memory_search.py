"""Search over canonical packings: does every buffer fit in an arena of `capacity` bytes?

Any packing can be pushed down until every buffer rests on the arena floor or on another buffer, so
it suffices to build packings bottom-up (the idea of MiniMalloc). Time is cut into sections between
lifetime boundaries; each section has a floor. At each step the lowest section either receives an
unplaced buffer that can rest exactly there, or is left empty up to its lower live neighbour's floor.
A section whose floor plus the unplaced bytes that must still fit in it exceeds the capacity prunes.

Known gap: a section left empty is raised only to a strictly higher live neighbour; when its neighbour
is at the same height (a plateau) the branch is abandoned instead of deferred, so some packings are
missed (tests/optimizer/test_memory_plan.py pins one). Plans stay valid; the MIP covers the rest.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Sequence


class _Timeout(Exception):
    pass


def fits(sizes: Sequence[int], starts: Sequence[int], ends: Sequence[int], capacity: int,
         deadline: float) -> list[int] | None:
    """Offsets packing every buffer below `capacity`, or None if none exists or the deadline passed first.

    Lifetimes are closed step intervals [starts[i], ends[i]].
    """
    count = len(sizes)
    if count == 0:
        return []
    cuts = sorted({start for start in starts} | {end + 1 for end in ends})
    section_of = {cut: index for index, cut in enumerate(cuts)}
    first = [section_of[start] for start in starts]
    last = [section_of[end + 1] for end in ends]  # exclusive
    sections = len(cuts) - 1
    covering: list[list[int]] = [[] for _ in range(sections)]
    remaining = [0] * sections
    # Larger and longer buffers first: they are the hardest to place late.
    for index in sorted(range(count), key=lambda i: (-sizes[i], first[i] - last[i], i)):
        for section in range(first[index], last[index]):
            covering[section].append(index)
            remaining[section] += sizes[index]
    if any(need > capacity for need in remaining):
        return None
    floor = [0] * sections
    offsets = [-1] * count
    done = [False] * sections
    state = {"nodes": 0}
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 4 * (count + sections) + 100))

    def lowest() -> int:
        best, height = -1, None
        for section in range(sections):
            if not done[section] and (height is None or floor[section] < height):
                best, height = section, floor[section]
        return best

    def search(placed: int) -> bool:
        state["nodes"] += 1
        if state["nodes"] % 2048 == 0 and time.perf_counter() > deadline:
            raise _Timeout
        if placed == count:
            return True
        section = lowest()
        height = floor[section]
        waiting = [i for i in covering[section] if offsets[i] < 0]
        if not waiting:
            done[section] = True
            if search(placed):
                return True
            done[section] = False
            return False
        tried: set[tuple[int, int, int]] = set()
        for index in waiting:
            shape = (sizes[index], first[index], last[index])
            span = range(first[index], last[index])
            if shape in tried or any(floor[s] != height for s in span):
                continue
            tried.add(shape)
            if height + sizes[index] > capacity:
                continue
            offsets[index] = height
            for s in span:
                floor[s] = height + sizes[index]
                remaining[s] -= sizes[index]
            if all(floor[s] + remaining[s] <= capacity for s in span) and search(placed + 1):
                return True
            for s in span:
                floor[s] = height
                remaining[s] += sizes[index]
            offsets[index] = -1
        # Leave this section empty up to its lower live neighbour: a buffer still to come that covers it
        # rests on a neighbour, and floors only rise.
        higher = [floor[n] for n in (section - 1, section + 1) if 0 <= n < sections and not done[n] and floor[n] > height]
        if not higher:
            return False
        next_level = min(higher)
        if next_level + remaining[section] > capacity:
            return False
        floor[section] = next_level
        if search(placed):
            return True
        floor[section] = height
        return False

    try:
        return list(offsets) if search(0) else None
    except _Timeout:
        return None
    finally:
        sys.setrecursionlimit(limit)
