"""Where a captured call's graph ends: the steps that make the outputs run after the replay, into the caller's memory."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import ember
from ember import models
from ember.optimizer.pipeline import HOST_SHARE, REFERENCE_PROFILE, capture_by_cost
from ember.frontend import from_module
from ember.optimizer.cost import CostModel, load_profile
from ember.runtime import cuda_graph
from ember.runtime.cuda_graph import lend, reclaim
from ember.runtime.executor import MAX_TAIL_STEPS, _carried, tail_start


COST = CostModel(load_profile(REFERENCE_PROFILE))


def _steps(model: nn.Module, inputs: tuple[torch.Tensor, ...]):
    program = ember.compile(model, inputs)
    return program, program.executor.steps_on(torch.device("cpu"))


@pytest.mark.parametrize("use_cache", [False, True])
def test_a_language_model_makes_its_logits_after_the_graph(use_cache):
    """The head runs after the replay; with a KV cache (made layer by layer, early) the cache is copied out."""
    model, inputs = models.load("gpt2")
    model.config.use_cache = use_cache
    program, steps = _steps(model, inputs)
    split = tail_start(program.executor.schedule, program.graph, min_bytes=0)
    nodes = {node.name: node for node in program.graph.nodes}
    assert 0 < len(steps) - split <= MAX_TAIL_STEPS
    assert nodes[steps[split].node].op in ("linear", "mm", "addmm", "matmul")  # the language-model head
    in_tail = {n for step in steps[split:] for n in step.outputs}
    assert program.graph.outputs[0] in in_tail  # the logits
    assert all(name in in_tail for name in program.graph.outputs) != use_cache  # the cache was made early
    carried = _carried(steps[:split], steps[split:], program.graph)
    assert carried and any(any(name in step.inputs for step in steps[split:]) for name in carried)


def test_small_outputs_are_made_inside_the_graph():
    """A tiny model's logits hold far fewer bytes than the host time of steps after each replay is worth."""
    program, steps = _steps(*models.load("gpt2"))
    assert tail_start(program.executor.schedule, program.graph) == len(steps)
    assert tail_start(program.executor.schedule, program.graph, min_bytes=1) < len(steps)


def test_outputs_made_early_stay_in_the_graph_and_are_copied_out():
    class Early(nn.Module):
        def forward(self, x):
            hidden = torch.relu(x * 2)
            deep = hidden
            for _ in range(MAX_TAIL_STEPS + 2):
                deep = torch.sin(deep) + 1
            return hidden, deep.sum(0, keepdim=True) * deep

    program, steps = _steps(Early(), (torch.randn(8, 8),))
    split = tail_start(program.executor.schedule, program.graph, min_bytes=0)
    assert split < len(steps) and program.graph.outputs[0] in _carried(steps[:split], steps[split:], program.graph)


def test_an_output_viewing_a_result_starts_the_tail_where_that_result_is_made():
    """A padded head's logits are a slice of its result: the head itself runs after the graph."""
    class Sliced(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.head = nn.Linear(8, 32), nn.Linear(32, 24)

        def forward(self, x):
            return self.head(torch.relu(self.up(x)))[..., :20]

    program, steps = _steps(Sliced(), (torch.randn(4, 8),))
    split = tail_start(program.executor.schedule, program.graph, min_bytes=0)
    nodes = {node.name: node for node in program.graph.nodes}
    assert nodes[steps[split].node].op == "linear" and steps[split].node != steps[0].node
    assert nodes[steps[-1].node].definition.kind == "view"


class WideLayers(nn.Module):
    """Two big matrix products: the device is busy far longer than the host takes to launch them."""

    def forward(self, x, w1, w2):
        return torch.relu(x @ w1) @ w2


class ManySmallOps(nn.Module):
    """A long chain of tiny ops: launching them costs the host more than running them costs the device."""

    def forward(self, x):
        for _ in range(20):
            x = torch.sin(x) * 1.5 + x.exp().mean(-1, keepdim=True)
        return x


def test_graphs_are_captured_where_the_cost_model_predicts_the_host_is_the_bottleneck():
    wide = from_module(WideLayers(), (torch.randn(4096, 2048), torch.randn(2048, 4096), torch.randn(4096, 2048))).graph
    small = from_module(ManySmallOps(), (torch.randn(3, 5),)).graph
    for graph, capture in ((wide, False), (small, True)):
        decision = capture_by_cost(graph, COST)
        assert decision["capture"] is capture and decision["decided_by"] == "cost model"
        assert (decision["host_us"] >= HOST_SHARE * decision["device_us"]) is capture


def test_a_program_off_the_gpu_is_never_captured():
    program = ember.compile(ManySmallOps(), (torch.randn(3, 5),), ember.Options(cuda_graphs=True))
    assert program.report.cuda_graphs == {"capture": False, "decided_by": "not on a GPU"}
    assert not program.executor.cuda_graphs


def test_cpu_inputs_the_graph_only_copies_to_the_gpu_are_staged_on_it():
    """A capture cannot copy from pageable host memory: a CPU input read only by copies to the GPU gets a
    device-side capture buffer; one the graph also reads on the CPU does not (that call is not captured)."""
    from ember.ir import Graph, Node, TensorType, Value
    from ember.runtime.executor import _staged_inputs

    def value(name: str, device: str) -> Value:
        return Value(name, TensorType((), torch.int64, (), device))

    counter, other, x = value("counter", "cpu"), value("other", "cpu"), value("x", "cuda")
    nodes = (Node("moved", "_to_copy", ("counter",), {"device": torch.device("cuda")}, (value("moved", "cuda"),)),
             Node("moved_other", "_to_copy", ("other",), {"device": torch.device("cuda")}, (value("o", "cuda"),)),
             Node("read", "add.Tensor", ("other", "other"), {}, (value("read", "cpu"),)))
    graph = Graph((x, counter, other), (), nodes, ("moved", "o", "read"))
    assert _staged_inputs(graph, torch.device("cuda", 0)) == frozenset({1})


@pytest.mark.skipif(not cuda_graph.LENDS, reason="this torch cannot move storages")
def test_a_lent_tensor_and_its_views_keep_their_values_when_the_pool_is_overwritten():
    """What a replay's caller still holds of the pool (the tensor or any view of it) moves out before the next
    replay; what it dropped costs nothing."""
    pool = torch.arange(24.0)
    lent, loan = lend(pool[2:14].view(3, 4).t())
    row, expected = lent[1], lent.clone()
    assert lent.data_ptr() == pool.data_ptr() + 2 * pool.element_size() and lent.stride() == (1, 4)
    assert reclaim([loan]) == (1, [])
    pool.fill_(float("nan"))
    assert torch.equal(lent, expected) and torch.equal(row, expected[1]) and lent.data_ptr() != pool.data_ptr() + 8
    del lent, row
    assert reclaim([loan]) == (0, [])


@pytest.mark.skipif(not cuda_graph.LENDS, reason="this torch cannot move storages")
def test_a_view_alone_keeps_the_lent_memory_it_sees():
    pool = torch.randn(5, 7)
    lent, loan = lend(pool[:, 1:4])
    column = lent[:, 2]
    expected = column.clone()
    del lent
    assert reclaim([loan]) == (1, [])
    pool.zero_()
    assert torch.equal(column, expected)


def test_without_moving_storages_a_lent_tensor_moves_alone_and_a_view_pins_its_memory(monkeypatch):
    """A torch that cannot move storages (torch 2.11) swaps the lent tensor's contents with a copy's: the
    tensor keeps its values when the pool is overwritten; while a view of the lent memory is held, the loan stays
    open (the caller then runs without the graph) until the view is dropped."""
    monkeypatch.setattr(cuda_graph, "LENDS", False)
    pool = torch.arange(24.0)
    lent, loan = lend(pool[2:14].view(3, 4).t())
    expected = lent.clone()
    assert reclaim([loan]) == (1, [])
    pool.fill_(float("nan"))
    assert torch.equal(lent, expected) and lent.stride() == (1, 4)

    pool = torch.arange(24.0)
    lent, loan = lend(pool[:12].view(3, 4))
    row = lent[1]
    assert reclaim([loan]) == (0, [loan])
    del row
    assert reclaim([loan]) == (1, [])
    pool.zero_()
    assert torch.equal(lent, torch.arange(12.0).view(3, 4))

    lent, loan = lend(pool[:4])
    column = lent[1:]
    del lent
    assert reclaim([loan]) == (0, [loan])  # the view alone: nothing can move it
    del column
    assert reclaim([loan]) == (0, [])


def test_a_call_while_lent_memory_is_pinned_runs_without_the_graph(monkeypatch):
    """The executor runs a call step by step (same results) when a replay would overwrite a pinned loan."""
    from ember.runtime import executor

    class Pinned:
        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, inputs):
            raise cuda_graph.PoolInUse

    inputs = (torch.randn(3, 5), torch.randn(5, 4), torch.randn(4, 2))
    with torch.no_grad():
        program = ember.compile(WideLayers(), inputs)
        run = program.executor
        on_cpu = run.wrapper_on(torch.device("cpu"))
        monkeypatch.setattr(executor, "GraphedCall", Pinned)
        monkeypatch.setattr(executor, "_device_of", lambda inputs, graph: torch.device("cuda", 0))
        monkeypatch.setattr(run, "wrapper_on", lambda device: on_cpu)
        run.cuda_graphs = True
        torch.testing.assert_close(run(list(inputs))[0], WideLayers()(*inputs))
        assert isinstance(run.graphed[torch.device("cuda", 0)], Pinned)


def test_small_pool_outputs_are_copied_out_and_large_ones_lent():
    """An output left in the pool is lent from LEND_MIN_BYTES up (copied out below), every one copied once a
    graph copies out; an output made outside the pool is handed as it is."""
    call = object.__new__(cuda_graph.GraphedCall)  # the hand-out alone, on the CPU
    large, small, outside = torch.zeros(cuda_graph.LEND_MIN_BYTES // 4), torch.ones(7), torch.ones(3)
    call.pool = {large.untyped_storage().data_ptr(), small.untyped_storage().data_ptr()}
    call.written_back, call.pinned_calls, call.lent = 0, 0, []
    handed = call._hand_out([large, small, outside])
    assert handed[0] is not large and handed[0].data_ptr() == large.data_ptr() and len(call.lent) == 1
    assert handed[1].data_ptr() != small.data_ptr() and torch.equal(handed[1], small)
    assert handed[2] is outside
    call.pinned_calls, call.lent = cuda_graph.PINNED_CALLS_BEFORE_COPYING, []
    handed = call._hand_out([large, small, outside])
    assert handed[0].data_ptr() != large.data_ptr() and torch.equal(handed[0], large) and not call.lent


def test_a_dropped_graph_keeps_its_memory_while_a_pinned_loan_is_open(monkeypatch):
    """What a view of lent memory sees stays allocated after its graph is dropped, until that view is gone."""
    monkeypatch.setattr(cuda_graph, "LENDS", False)
    monkeypatch.setattr(cuda_graph, "_KEPT", [])
    pool = torch.arange(12.0)
    lent, loan = lend(pool[:6])
    view = lent[1:]
    del lent
    moved, pinned = reclaim([loan])
    assert (moved, pinned) == (0, [loan])
    memory = pool.untyped_storage()
    cuda_graph.keep_pinned((pool,), pinned)
    del pool
    assert cuda_graph._KEPT and cuda_graph._KEPT[0][0][0].untyped_storage().data_ptr() == memory.data_ptr()
    del view
    cuda_graph.keep_pinned((), [])  # each drop prunes what no loan holds any more
    assert cuda_graph._KEPT == []


def test_copies_in_and_out_are_one_multi_tensor_copy_per_dtype():
    """torch's multi-tensor copy takes one launch only over tensors of one dtype; mixed, it copies each alone."""
    from ember.runtime.cuda_graph import _by_dtype

    tensors = [torch.zeros(2), torch.zeros(3, dtype=torch.long), torch.zeros(4), torch.zeros((), dtype=torch.bool)]
    sets = _by_dtype([0, 1, 2, 3], tensors)
    assert [positions for _, positions in sets] == [[0, 2], [1], [3]]
    assert all(chosen[i] is tensors[p] for chosen, positions in sets for i, p in enumerate(positions))
    assert _by_dtype([], tensors) == []
