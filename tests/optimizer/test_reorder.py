"""Operator reordering lowers the peak where the order allows it, and never changes results."""
from __future__ import annotations

import torch

import ember
from ember import models
from ember.ir.schedule import schedule_of
from ember.optimizer.liveness import peak_live_bytes
from ember.optimizer.reorder import reorder_for_memory
from ember.tolerance import assert_close


class TwoBranches(torch.nn.Module):
    """Eager order makes both wide tensors before reducing either; reducing each at once halves the peak."""

    def forward(self, x):
        wide_a = torch.exp(x).repeat(1, 64)
        wide_b = torch.sin(x).repeat(1, 64)
        return wide_a.sum(-1) + wide_b.sum(-1)


def test_reordering_lowers_the_peak_and_keeps_the_results():
    x = torch.randn(31, 17)
    eager = ember.compile(TwoBranches(), (x,))
    reordered = ember.compile(TwoBranches(), (x,), options={"reorder": True})
    wide = 31 * 17 * 64 * 4
    assert peak_live_bytes(schedule_of(eager.graph))[0] >= 2 * wide
    assert peak_live_bytes(schedule_of(reordered.graph))[0] < 2 * wide
    assert [n.name for n in reordered.graph.nodes] != [n.name for n in eager.graph.nodes]
    assert_close(reordered(x), TwoBranches()(x))


def test_reordering_never_raises_the_peak_of_a_suite_model():
    model, inputs = models.load("llama")
    graph = ember.compile(model, inputs).graph
    reordered = reorder_for_memory(graph)
    reordered.verify()
    assert peak_live_bytes(schedule_of(reordered))[0] <= peak_live_bytes(schedule_of(graph))[0]
    with torch.no_grad():
        program = ember.compile(model, inputs, options={"reorder": True})
        assert_close(program(*inputs).logits, model(*inputs).logits)
