"""ember's decomposition table: core ATen's, minus every op ember handles natively.

Attention stays whole (fusion needs it as one op) and ops in the op table are kept as they are.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
from torch._decomp import core_aten_decompositions

from ..ir.ops import OP_TABLE, op_name

KEEP_WHOLE = frozenset({"scaled_dot_product_attention"})


@cache
def ember_decompositions() -> dict[torch._ops.OperatorBase, Callable]:
    """Core ATen decompositions for the ops that the op table does not cover."""
    table = {}
    for op, decomposition in core_aten_decompositions().items():
        name = op_name(op) if isinstance(op, torch._ops.OpOverload) else None
        if name in OP_TABLE or name in KEEP_WHOLE:
            continue
        table[op] = decomposition
    return table
