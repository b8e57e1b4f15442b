"""A program's result in the model's own structure: the pytree of its flat outputs (a transformers ModelOutput
holding a DynamicCache), shared by the frontend (which captures it), the runtime and saved programs (which rebuild
it)."""
from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils import _pytree as pytree

log = logging.getLogger(__name__)


def register_transformers_caches() -> None:
    """Make transformers' DynamicCache a pytree node, as torch.export needs to return one; a no-op without
    transformers loaded or where it is one already.

    Older transformers registered it on import; later ones (5.x among them) ship the registration as
    `transformers.integrations.executorch.register_dynamic_cache_export_support` and leave calling it to
    exporters. The registration is process-wide, as transformers' own exporters leave it.
    """
    if "transformers" not in sys.modules:
        return
    try:
        from transformers.cache_utils import DynamicCache
    except ImportError:
        return
    if DynamicCache in pytree.SUPPORTED_NODES:
        return
    try:
        from transformers.integrations.executorch import register_dynamic_cache_export_support
    except ImportError:
        log.debug("transformers %s offers no DynamicCache export support; a model returning one will not export",
                  sys.modules["transformers"].__version__)
        return
    register_dynamic_cache_export_support()


@dataclasses.dataclass
class ResultBuilder:
    """A Program's result from its flat outputs: `pytree.tree_unflatten`, except that a transformers DynamicCache
    whose layers keep their tensors as given holds the tensors themselves rather than copies. transformers rebuilds
    one by `update`, a `cat` onto an empty tensor per layer made by `torch.tensor([])`: a copy of the whole cache on
    every call (GPT-2 at batch 8: 24 copies of 6 MiB, and the memory for them; Gemma-2-2B's sliding-window cache
    at batch 2 and 1024 tokens: 208 MiB), and about half a millisecond of host time for eight layers. Here each
    such cache is built once, empty, as a template, and every call's cache is a shallow copy of it holding that
    call's tensors, as `update` would have left them (a sliding-window layer counting their tokens and keeping the
    last window - 1 of them)."""

    templates: dict[int, tuple[Any, tuple[int, ...]] | None] = dataclasses.field(default_factory=dict)

    def __call__(self, leaves: list[Any], spec: pytree.TreeSpec) -> Any:
        return _build(spec, iter(leaves), self.templates, itertools.count())


def _build(node: pytree.TreeSpec, given: Iterator[Any], templates: dict[int, Any], caches: Iterator[int]) -> Any:
    """`node` rebuilt from the leaves `given` yields, in order; the n-th DynamicCache from `templates[n]`. (A
    module-level function, not a closure calling itself: such a closure is a reference cycle, and would keep
    every output of a call alive until Python's cycle collector happened to run.)"""
    if node.is_leaf():
        return next(given)
    children = [_build(child, given, templates, caches)
                for child in (node.children() if hasattr(node, "children") else node.children_specs)]
    unflatten = pytree.SUPPORTED_NODES[node.type].unflatten_fn
    if node.type.__name__ == "DynamicCache" and node.type.__module__.startswith("transformers."):
        index = next(caches)
        if index not in templates:
            templates[index] = _cache_template(children, node.context, unflatten)
        if templates[index] is not None:
            return _cache_holding(children, *templates[index])
    return unflatten(children, node.context)


def _cache_template(children: list[Any], context: Any, unflatten: Any) -> tuple[Any, tuple[int, ...]] | None:
    """An empty DynamicCache shaped as `children` (its key and value tensors) say, built by transformers itself,
    with the positions of its layers that hold tensors; None for a cache that must be rebuilt by transformers.

    Only caches whose layers `_holding` rebuilds as transformers' `update` does qualify (DynamicLayer, and
    DynamicSlidingWindowLayer not recording its past), and only if a probe agrees: the first token of each tensor
    rebuilt both ways must leave every layer's attributes equal."""
    names = context[0] if isinstance(context, (list, tuple)) and context else ()
    if list(names) != ["key_cache", "value_cache"] or not all(
            isinstance(tensor, torch.Tensor) and tensor.dim() >= 2 for tensor in pytree.tree_leaves(children)):
        return None
    cache = unflatten(pytree.tree_map(lambda tensor: tensor[..., :0, :], children), context)
    layers = getattr(cache, "layers", None)  # older transformers keeps lists of tensors, not layers
    if layers is None:
        return None
    held = tuple(position for position, layer in enumerate(layers) if getattr(layer, "keys", None) is not None)
    keys, values = children
    if not all(_rebuildable(layer) for layer in layers) or not (len(held) == len(keys) == len(values)):
        return None
    for position in held:  # the template keeps no tensor of the call it was built from
        cache.layers[position].keys = cache.layers[position].values = None
    probe = pytree.tree_map(lambda tensor: tensor[..., :1, :], children)
    if not _same_layers(_cache_holding(probe, cache, held), unflatten(probe, context)):
        log.debug("a DynamicCache rebuilt without copies differs from transformers' own; transformers rebuilds it")
        return None
    return cache, held


def _rebuildable(layer: Any) -> bool:
    """Whether `_holding` rebuilds this kind of cache layer as its `update` would."""
    kind = type(layer).__name__
    return kind == "DynamicLayer" or (kind == "DynamicSlidingWindowLayer" and not getattr(layer, "record_past", True))


def _same_layers(ours: Any, theirs: Any) -> bool:
    """Whether two caches' layers are of one type with equal attributes (tensors equal in shape and values)."""
    if len(ours.layers) != len(theirs.layers):
        return False
    for mine, expected in zip(ours.layers, theirs.layers):
        if type(mine) is not type(expected) or vars(mine).keys() != vars(expected).keys():
            return False
        for name, value in vars(expected).items():
            other = vars(mine)[name]
            same = (isinstance(other, torch.Tensor) and other.shape == value.shape and torch.equal(other, value)) \
                if isinstance(value, torch.Tensor) else other == value
            if not same:
                return False
    return True


def _cache_holding(children: list[Any], template: Any, held: tuple[int, ...]) -> Any:
    """A shallow copy of the `template` cache (and of each of its layers) holding the tensors themselves."""
    cache = copy.copy(template)
    cache.layers = [copy.copy(layer) for layer in template.layers]
    for position, key, value in zip(held, *children):
        _hold(cache.layers[position], key, value)
    return cache


def _hold(layer: Any, keys: torch.Tensor, values: torch.Tensor) -> None:
    """`layer` (empty) as its `update(keys, values)` leaves it, without the copy: a sliding-window layer counts the
    tokens and keeps the last `sliding_window - 1` (a view)."""
    window = getattr(layer, "sliding_window", None)
    if window is not None:
        layer.cumulative_length += keys.shape[-2]
        keys, values = keys[:, :, -window + 1:, :], values[:, :, -window + 1:, :]
    layer.keys, layer.values = keys, values
