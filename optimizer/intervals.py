"""Bytes live at each step of a set of lifetimes: the one sweep every memory question asks (the lower bound a
plan is measured against, the live profile `inspect` draws, the windows arenas are cut into)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def live_per_step(sizes: Sequence[int], starts: Sequence[int], ends: Sequence[int], steps: int | None = None,
                  alignment: int = 1) -> np.ndarray:
    """Bytes live at each step 0..steps-1 (by default, to the last end), each size rounded up to `alignment`:
    a buffer is live from its start to its end, both included."""
    steps = max(ends, default=-1) + 1 if steps is None else steps
    rounded = -(-np.asarray(sizes, dtype=np.int64) // alignment) * alignment
    delta = np.zeros(steps + 1, dtype=np.int64)
    np.add.at(delta, np.minimum(np.asarray(starts, dtype=np.int64), steps), rounded)
    np.add.at(delta, np.minimum(np.asarray(ends, dtype=np.int64) + 1, steps), -rounded)
    return np.cumsum(delta)[:steps]


def lower_bound(sizes: Sequence[int], starts: Sequence[int], ends: Sequence[int]) -> int:
    """Max over steps of the bytes live at that step: no packing of these lifetimes is smaller."""
    return int(live_per_step(sizes, starts, ends).max(initial=0))
