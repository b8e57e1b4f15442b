"""Where a graph's arena-resident values live: the data the memory planner hands to the runtime."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .types import TensorType

ALIGNMENT = 256
"""Bytes every arena slot's offset (and every planned buffer's size) is rounded up to: the alignment CUDA's caching
allocator gives, which vectorized kernels and cuBLAS expect of their operands."""


@dataclass(frozen=True, slots=True)
class Arena:
    """One allocation of `size_bytes`, made before step `first_step` of a call and freed after `last_step`."""

    size_bytes: int
    first_step: int
    last_step: int


@dataclass(frozen=True, slots=True)
class ArenaLayout:
    """Value name -> (arena index, byte offset, type) for values living in `arenas`; `reuses` maps a result to
    the input its step writes it over; every other value is allocated by its step on each call. `unrepeatable`:
    the graph inputs an update is written over that running the call twice would change again (a counter's add),
    so that a CUDA graph's warm-up calls run on copies of them."""

    slots: Mapping[str, tuple[int, int, TensorType]]
    arenas: tuple[Arena, ...]
    reuses: Mapping[str, str] = field(default_factory=dict)
    unrepeatable: frozenset[str] = frozenset()
