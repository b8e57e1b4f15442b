"""A call's results live as long as the caller holds them, and no longer: nothing ember keeps refers to them
(a reference cycle would keep them, and their memory, until Python's cycle collector ran)."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

import ember
from ember import models
from torch.utils import _pytree as pytree


def tensors_of(result) -> list[torch.Tensor]:
    """Every tensor in a model's result, a transformers cache's layers included."""
    found = []
    for leaf in pytree.tree_leaves(result):
        if isinstance(leaf, torch.Tensor):
            found.append(leaf)
        for layer in getattr(leaf, "layers", ()):
            found += [tensor for tensor in (layer.keys, layer.values) if isinstance(tensor, torch.Tensor)]
    return found


@pytest.mark.parametrize("entry", ["export", "backend"])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_dropping_a_result_frees_every_tensor_in_it_at_once(name, entry):
    torch.manual_seed(0)
    model, inputs = models.load(name)
    compiled = ember.compile(model, inputs) if entry == "export" else torch.compile(model, backend="ember")
    with torch.no_grad():
        compiled(*inputs)  # compiles
        gc.collect()
        gc.disable()
        try:
            result = compiled(*inputs)
            held = [weakref.ref(tensor) for tensor in tensors_of(result)]
            assert len(held) > 2  # the logits and the KV cache
            del result
            alive = sum(reference() is not None for reference in held)
        finally:
            gc.enable()
    assert alive == 0
