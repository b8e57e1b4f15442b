"""torch.export of a model straight to a decomposed ATen graph: one trace where export and run_decompositions take two.

run_decompositions retraces export's graph through export's ATen-level tracer, its table split in two: the
CompositeImplicitAutograd ops it overrides by a context, and the rest, handed to the tracer as `decomp_table`.
Here the model itself goes through that tracer (`_export(pre_dispatch=False)`) so set up. These are torch
internals (alike in torch 2.11 to 2.13): `one_trace_supported` checks them, and capture traces twice without them.
"""
from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch

log = logging.getLogger(__name__)


@functools.cache
def one_trace_supported() -> bool:
    """Whether this torch has the internals `export_decomposed` calls, taking the arguments it passes them."""
    try:
        from torch.export import _trace, exported_program
    except ImportError:
        return False
    needed = ((_trace, "_export", ("strict", "pre_dispatch")),
              (_trace, "_export_to_aten_ir", ("decomp_table",)),
              (exported_program, "_split_decomp_table_to_cia_and_python_decomp", ()),
              (exported_program, "_override_composite_implicit_decomp", ()))
    for module, name, parameters in needed:
        function = getattr(module, name, None)
        if not callable(function) or not set(parameters) <= set(inspect.signature(function).parameters):
            log.debug("torch %s has no %s.%s taking %s", torch.__version__, module.__name__, name, parameters)
            return False
    # _export must look its tracer up by name when called, so that the one given the table is the one it calls
    if "_export_to_aten_ir" not in inspect.unwrap(_trace._export).__code__.co_names:
        log.debug("torch %s's _export does not call _export_to_aten_ir by name", torch.__version__)
        return False
    return True


def export_decomposed(model: torch.nn.Module, args: tuple, kwargs: Mapping[str, Any],
                      table: Mapping[torch._ops.OperatorBase, Callable]) -> torch.export.ExportedProgram:
    """`torch.export.export(model, args, kwargs).run_decompositions(table)` in one trace (non-strict, as export's
    default); raises what torch raises. Only where `one_trace_supported()`."""
    from torch.export import _trace, exported_program

    # CompositeImplicitAutograd op -> its decomposition, or a marker that keeps it whole; the rest of the table
    composite_rules, decompositions = exported_program._split_decomp_table_to_cia_and_python_decomp(dict(table))
    overridden = {op: rule for op, rule in composite_rules.items() if not _is_own_kernel(op, rule)}
    tracer = _trace._export_to_aten_ir  # given the table for this call (export itself is not thread-safe either)
    _trace._export_to_aten_ir = functools.partial(tracer, decomp_table=decompositions)
    try:
        with exported_program._override_composite_implicit_decomp(overridden):
            return _trace._export(model, args, dict(kwargs), strict=False, pre_dispatch=False)
    finally:
        _trace._export_to_aten_ir = tracer


def _is_own_kernel(op: torch._ops.OpOverload, rule: Callable) -> bool:
    """Whether `rule` is `op`'s own CompositeImplicitAutograd kernel (its Python one, or torch's wrapper of its C++
    one), which a trace below autograd runs anyway: overriding the ~500 such ops cost 0.3 s a capture, and changed
    nothing. The ones left to override are those kept whole and those with decompositions of their own."""
    registered = op.py_kernels.get(torch._C.DispatchKey.CompositeImplicitAutograd)
    if registered is not None and not isinstance(registered, torch._C.DispatchKey):
        return rule is registered
    return (isinstance(rule, functools.partial) and rule.keywords == {"kernel": op}
            and getattr(rule.func, "__name__", None) == "_special_op_to_decompose_cia")
