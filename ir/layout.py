"""Where a graph's arena-resident values live: the data the memory planner hands to the runtime."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .types import TensorType


@dataclass(frozen=True, slots=True)
class ArenaLayout:
    """Value name -> (byte offset, type) inside one arena of `arena_bytes`; values not named are allocated per call."""

    slots: Mapping[str, tuple[int, TensorType]]
    arena_bytes: int
