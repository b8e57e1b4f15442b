"""The pass pipeline: a list you can read top to bottom. Each pass is Graph -> Graph."""
from __future__ import annotations

from collections.abc import Callable

from ..ir import Graph
from .attention import (convert_attention_masks, decompose_attention, fold_constant_masks, fold_query_groups,
                        group_query_heads)
from .canonicalize import drop_empty_cat_inputs, eliminate_dead_code
from .fold import fold_constants
from .layout import pad_linear_features
from .reorder import reorder_for_memory

Pass = Callable[[Graph], Graph]

PIPELINE: tuple[Pass, ...] = (eliminate_dead_code, fold_constant_masks, fold_constants, drop_empty_cat_inputs,
                              decompose_attention, group_query_heads, fold_query_groups, convert_attention_masks,
                              pad_linear_features)
REORDER: tuple[Pass, ...] = (reorder_for_memory,)
"""Run after the pipeline when Options(reorder=True)."""
