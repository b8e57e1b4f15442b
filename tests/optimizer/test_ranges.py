"""Integer ranges: expert routing proves its grouped matmuls have no tail and its overflow masks are false; a
graph that proves neither is left as it is."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import ember
from ember import models
from ember.frontend import from_module
from ember.optimizer.ranges import cover_grouped_rows, drop_decided_masks, integer_ranges, offsets_by_search


class Routing(nn.Module):
    """transformers' grouped-matmul MoE routing: top-k experts, sorted, counted into offsets; tokens whose
    expert is `>= experts` masked (`bins`/`top` change what the histogram counts)."""

    def __init__(self, experts: int = 4, bins: int | None = None, top: int | None = None,
                 summed: torch.dtype = torch.int32, descending: bool = False):
        super().__init__()
        self.experts, self.bins, self.top = experts, bins or experts, experts - 1 if top is None else top
        self.summed, self.descending = summed, descending

    def forward(self, logits, x, weight):
        _, chosen = torch.topk(logits.softmax(-1), 2, dim=-1)
        experts, order = chosen.view(-1).sort(descending=self.descending)
        counted = experts.to(torch.float32 if logits.device.type == "cpu" else torch.int32)  # as transformers counts
        offsets = torch.histc(counted, bins=self.bins, max=self.top).cumsum(0, dtype=self.summed)
        if self.descending:
            offsets = offsets.to(torch.int32)
        rows = x.repeat_interleave(2, dim=0)[order].masked_fill((experts >= self.experts).unsqueeze(-1), 0.0)
        return torch.ops.ember.grouped_mm(rows, weight, offsets).masked_fill((experts >= self.experts)[:, None], 0.0)


def _inputs(tokens: int = 6, experts: int = 4):
    return torch.randn(tokens, experts), torch.randn(tokens, 8), torch.randn(experts, 8, 5)


def test_expert_choices_lie_in_the_experts_range():
    graph = from_module(Routing(), _inputs()).graph
    ranges = integer_ranges(graph)
    topk = next(node for node in graph.nodes if node.op == "topk")
    assert ranges[topk.outputs[1].name] == (0, 3)
    casts = [node for node in graph.nodes if node.op == "_to_copy" and node.inputs[0] in ranges]
    assert casts and all(ranges[node.outputs[0].name] == (0, 3) for node in casts)


def test_a_grouped_matmul_whose_offsets_count_every_row_has_no_tail():
    graph = cover_grouped_rows(from_module(Routing(), _inputs()).graph)
    assert [node.attrs.get("rows_covered") for node in graph.nodes if node.op == "grouped_mm"] == [True]


@pytest.mark.parametrize("routing", [Routing(top=2), Routing(bins=3, top=2)], ids=["a choice past the bins", "fewer bins"])
def test_offsets_that_may_miss_rows_keep_the_tail(routing):
    graph = cover_grouped_rows(from_module(routing, _inputs()).graph)
    assert [node.attrs.get("rows_covered") for node in graph.nodes if node.op == "grouped_mm"] == [None]


class Overflowing(Routing):
    """The mask compares with 3, which the last expert's choice (3) passes: a real mask."""

    def forward(self, logits, x, weight):
        _, chosen = torch.topk(logits, 2, dim=-1)
        return x.repeat_interleave(2, dim=0).masked_fill((chosen.view(-1) >= 3).unsqueeze(-1), 0.0)


def test_masks_no_expert_choice_passes_are_dropped_and_others_kept():
    graph = drop_decided_masks(from_module(Routing(), _inputs()).graph)
    assert not any(node.op in ("masked_fill.Scalar", "ge.Scalar") for node in graph.nodes)
    kept = drop_decided_masks(from_module(Overflowing(), _inputs()).graph)
    assert [node.op for node in kept.nodes].count("masked_fill.Scalar") == 1


def _offsets(graph):
    return [(node.op, node.attrs.get("out_int32")) for node in graph.nodes if node.op in ("histc", "cumsum", "searchsorted.Tensor")]


@pytest.mark.parametrize("summed", [torch.int32, torch.int64])
def test_offsets_counting_each_expert_in_its_own_bin_are_a_search_of_the_sorted_choices(summed):
    graph = offsets_by_search(from_module(Routing(summed=summed), _inputs()).graph)
    assert _offsets(graph) == [("searchsorted.Tensor", summed == torch.int32)]
    assert not any(node.op == "_to_copy" for node in graph.nodes)  # the cast only the histogram read is gone


@pytest.mark.parametrize("routing", [Routing(top=2), Routing(bins=3, top=2), Routing(bins=2, top=3),
                                     Routing(descending=True)],
                         ids=["a choice past the bins", "fewer bins", "bins two values wide", "sorted descending"])
def test_offsets_a_search_would_not_reproduce_stay_a_histogram(routing):
    graph = offsets_by_search(from_module(routing, _inputs()).graph)
    assert [op for op, _ in _offsets(graph)] == ["histc", "cumsum"]


@pytest.mark.parametrize("routing", [Routing(), Routing(top=2), Routing(summed=torch.int64), Routing(descending=True)],
                         ids=["covered", "not covered", "int64 offsets", "sorted descending"])
def test_routing_compiled_matches_eager(routing):
    """On fresh inputs, some of which leave experts with no tokens (one expert's logit far above the rest)."""
    for seed in range(4):
        torch.manual_seed(seed)
        inputs = _inputs(tokens=7)
        if seed % 2:
            inputs[0][:, 1] += 10.0
        with torch.no_grad():
            got, want = ember.compile(routing, inputs)(*inputs), routing(*inputs)
        torch.testing.assert_close(got, want)


def test_mixtral_grouped_matmuls_have_no_tail_and_no_overflow_mask():
    model, inputs = models.load("mixtral")
    program = ember.compile(model, inputs)
    grouped = [node for node in program.graph.nodes if node.op == "grouped_mm"]
    assert grouped and all(node.attrs.get("rows_covered") for node in grouped)
    assert not any(node.op in ("ge.Scalar", "histc", "cumsum") for node in program.graph.nodes)
