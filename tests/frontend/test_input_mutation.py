"""Inputs the model updates in place (a static KV cache handed in as an argument): both entry points compile the
graph as export gives it and write the new values back into the caller's tensors after each call."""
from __future__ import annotations

import logging

import torch

import ember


class Accumulate(torch.nn.Module):
    """Writes into the cache it is handed at a position, then reads the whole of it (as a static cache does)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, cache: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        cache.index_copy_(0, position, self.proj(x))
        return cache.sum(0, keepdim=True) * 2.0


def test_ember_compile_writes_an_updated_input_back():
    model = Accumulate().eval()
    cache, expected_cache = torch.zeros(5, 4), torch.zeros(5, 4)
    with torch.no_grad():
        program = ember.compile(model, (torch.randn(1, 4), cache.clone(), torch.tensor([0])))
        assert program.mutated_inputs == (1,)
        for step in range(3):
            x, position = torch.randn(1, 4), torch.tensor([step])
            torch.testing.assert_close(program(x, cache, position), model(x, expected_cache, position))
            torch.testing.assert_close(cache, expected_cache)


def test_the_backend_compiles_input_mutation_through_export(caplog):
    model = Accumulate().eval()
    compiled = torch.compile(model, backend="ember", fullgraph=True)
    cache, expected_cache = torch.zeros(5, 4), torch.zeros(5, 4)
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="ember"):
        for step in range(3):
            x, position = torch.randn(1, 4), torch.tensor([step])
            torch.testing.assert_close(compiled(x, cache, position), model(x, expected_cache, position))
            torch.testing.assert_close(cache, expected_cache)
    assert "through aot_autograd" not in caplog.text
