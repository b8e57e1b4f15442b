"""The pass pipeline: a list you can read top to bottom. Each pass is Graph -> Graph."""
from __future__ import annotations

from collections.abc import Callable

from ..ir import Graph
from .canonicalize import eliminate_dead_code

Pass = Callable[[Graph], Graph]

PIPELINE: tuple[Pass, ...] = (eliminate_dead_code,)
