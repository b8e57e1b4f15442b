"""Search over canonical packings: does every buffer fit in an arena of `capacity` bytes?

Any packing can be pushed down until every buffer rests on the arena floor or on another buffer, so
it suffices to build packings bottom-up, placing buffers in order of offset (the idea of MiniMalloc).
Time is cut into sections between lifetime boundaries; each section has a floor. At each step the
lowest open section either receives an unplaced buffer that can rest exactly there, or is closed: no
further buffer covering it starts at this height. A closed section whose live neighbours are all higher
rises at once to the lower of them, since whatever covers it next rests on a neighbour. One on a plateau
(a neighbour at its height) waits, and rises to the next open height once every section at its height is
closed or filled: in offset order nothing later is placed lower. A section whose floor plus the unplaced
bytes that must still fit in it exceeds the capacity prunes.
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
    closed = [False] * sections
    state = {"nodes": 0}
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 8 * (count + sections) + 100))

    def lowest_open() -> int:
        best, height = -1, None
        for section in range(sections):
            if not done[section] and not closed[section] and (height is None or floor[section] < height):
                best, height = section, floor[section]
        return best

    def raise_to(changed: list[int], level: int) -> bool:
        """Lift closed sections below `level` to it and reopen them; False if one then overflows."""
        for section in changed:
            floor[section], closed[section] = level, False
        return all(level + remaining[section] <= capacity for section in changed)

    def lower(changed: list[int], heights: list[int]) -> None:
        for section, height in zip(changed, heights):
            floor[section], closed[section] = height, True

    def search(placed: int) -> bool:
        state["nodes"] += 1
        if state["nodes"] % 2048 == 0 and time.perf_counter() > deadline:
            raise _Timeout
        if placed == count:
            return True
        section = lowest_open()
        if section < 0:
            return False  # every section still waiting is closed: nothing can ever rest there
        height = floor[section]
        waiting_closed = [s for s in range(sections) if closed[s] and floor[s] < height]
        if waiting_closed:
            heights = [floor[s] for s in waiting_closed]
            if raise_to(waiting_closed, height) and search(placed):
                return True
            lower(waiting_closed, heights)
            return False
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
            if shape in tried or any(floor[s] != height or closed[s] for s in span):
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
        # Close this section at this height. Whatever covers it next rests on a live neighbour, so with both
        # neighbours higher it rises at once to the lower; on a plateau it waits for the next open height.
        live = [floor[n] for n in (section - 1, section + 1) if 0 <= n < sections and not done[n]]
        if not live:
            return False
        if min(live) > height:
            if min(live) + remaining[section] > capacity:
                return False
            floor[section] = min(live)
            if search(placed):
                return True
            floor[section] = height
            return False
        closed[section] = True
        if search(placed):
            return True
        closed[section] = False
        return False

    try:
        return list(offsets) if search(0) else None
    except _Timeout:
        return None
    finally:
        sys.setrecursionlimit(limit)
