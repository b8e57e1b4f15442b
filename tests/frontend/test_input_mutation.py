"""Inputs the model updates in place (a static KV cache handed in as an argument): both entry points compile the
graph as export gives it and write the new values back into the caller's tensors after each call."""
from __future__ import annotations

import dataclasses
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


def _written_over(program: ember.Program) -> dict[str, str]:
    """Result -> the caller's input it is written over (results written over intermediates left out)."""
    inputs = {value.name for value in program.graph.inputs}
    reuses = program.executor.layout.reuses if program.executor.layout else {}
    return {result: source for result, source in reuses.items() if source in inputs}


def test_a_cache_update_runs_in_place_in_the_callers_tensor():
    """The functional update copies the whole cache and the write-back copies it again; in place, the new value
    is the caller's own tensor, so writing it back is no copy at all."""
    model = Accumulate().eval()
    cache, expected_cache = torch.zeros(5, 4), torch.zeros(5, 4)
    with torch.no_grad():
        program = ember.compile(model, (torch.randn(1, 4), cache.clone(), torch.tensor([0])))
        assert _written_over(program) == {program.graph.outputs[0]: program.graph.inputs[1].name}
        for step in range(3):
            x, position = torch.randn(1, 4), torch.tensor([step])
            outputs = program.run([x, cache, position])
            assert outputs[0] is cache
            expected = model(x, expected_cache, position)
            torch.testing.assert_close(program.finish(outputs, [x, cache, position]), expected)
            torch.testing.assert_close(cache, expected_cache)


class ReadsBefore(torch.nn.Module):
    """Reads the cache before updating it: the old value is read first, so the update may still run in place."""

    def forward(self, x: torch.Tensor, cache: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        before = cache.sum(0, keepdim=True)
        cache.index_copy_(0, position, x)
        return before + cache.sum(0, keepdim=True)


def test_an_update_runs_in_place_only_after_every_read_of_the_old_value():
    from ember.ir.schedule import schedule_of
    from ember.optimizer.liveness import updates_written_over

    with torch.no_grad():
        program = ember.compile(ReadsBefore().eval(), (torch.randn(1, 4), torch.zeros(5, 4), torch.tensor([0])))
    graph, cache = program.graph, program.graph.inputs[1].name
    update = graph.outputs[0]
    assert _written_over(program) == {update: cache}
    read = next(node for node in graph.nodes if cache in node.inputs and update not in (v.name for v in node.outputs))
    later = [node for node in graph.nodes if node is not read]
    at = next(index for index, node in enumerate(later) if update in (v.name for v in node.outputs))
    reordered = dataclasses.replace(graph, nodes=(*later[:at + 1], read, *later[at + 1:]))
    assert updates_written_over(schedule_of(reordered), reordered, {cache: update}) == {}
    cache_value, expected = torch.zeros(5, 4), torch.zeros(5, 4)
    with torch.no_grad():
        for step in range(3):
            x, position = torch.randn(1, 4), torch.tensor([step])
            torch.testing.assert_close(program(x, cache_value, position), ReadsBefore()(x, expected, position))
    torch.testing.assert_close(cache_value, expected)


class Accumulates(torch.nn.Module):
    """Adds into the cache (index_put with accumulate) and counts calls, as a static cache counts its positions."""

    def forward(self, x: torch.Tensor, cache: torch.Tensor, position: torch.Tensor, count: torch.Tensor):
        cache.index_put_((position,), x, accumulate=True)
        count.add_(1)
        return cache * 2


def test_a_counter_is_updated_in_place_and_an_accumulating_update_stays_functional():
    """The counter's add runs over the caller's tensor, marked as one a second run changes again (a capture's
    warm-up calls run on a copy of it); an accumulating index_put stays functional."""
    with torch.no_grad():
        adds = ember.compile(Accumulates().eval(),
                             (torch.randn(1, 4), torch.zeros(5, 4), torch.tensor([0]), torch.zeros((), dtype=torch.long)))
    count = adds.graph.inputs[3].name
    assert adds.mutated_inputs == (1, 3)
    assert _written_over(adds) == {adds.graph.outputs[1]: count}
    assert adds.executor.layout.unrepeatable == {count} and adds.executor._unrepeatable() == {3}
    cache, counter, expected_cache, expected_count = torch.zeros(5, 4), torch.zeros((), dtype=torch.long), \
        torch.zeros(5, 4), torch.zeros((), dtype=torch.long)
    with torch.no_grad():
        for step in range(3):
            x, position = torch.randn(1, 4), torch.tensor([step % 2])
            outputs = adds.run([x, cache, position, counter])
            assert outputs[1] is counter
            torch.testing.assert_close(adds.finish(outputs, [x, cache, position, counter]),
                                       Accumulates()(x, expected_cache, position, expected_count))
    torch.testing.assert_close(cache, expected_cache)
    assert counter.item() == expected_count.item() == 3


class FakeGraphedCall:
    """Stands for a CUDA-graph capture (no GPU here): records how it was captured, and refuses a call handing an
    aliased input in other memory, as the real one does."""

    captures: list[tuple[tuple[int, ...], int]] = []

    def __init__(self, run_prefix, run_tail, example, device, *, aliased, warm_up, unrepeatable=frozenset(), **_):
        self.pointers = {position: example[position].data_ptr() for position in aliased}
        self.calls = 0
        self.captures.append((tuple(sorted(aliased)), warm_up))
        self.unrepeatable = unrepeatable

    def __call__(self, inputs):
        if any(inputs[position].data_ptr() != pointer for position, pointer in self.pointers.items()):
            return None
        self.calls += 1
        return []


def test_a_cache_in_new_memory_is_captured_again_on_it_unless_it_moves_too_often(monkeypatch):
    """A static cache made anew per generate is aliased again (no warm-up: it ran at the first capture); one that
    moves after a few calls is copied in from then on."""
    from ember.runtime import executor

    monkeypatch.setattr(executor, "GraphedCall", FakeGraphedCall)
    monkeypatch.setattr(executor, "_device_of", lambda inputs, graph: torch.device("cuda", 0))
    monkeypatch.setattr(FakeGraphedCall, "captures", [])
    caches = [torch.zeros(5, 4), torch.zeros(5, 4)]
    long, short = executor.RECAPTURE_AFTER, executor.RECAPTURE_AFTER - 1
    with torch.no_grad():
        program = ember.compile(Accumulate().eval(), (torch.randn(1, 4), caches[0], torch.tensor([0])))
        program.executor.cuda_graphs = True
        for which in (0,) * long + (1,) * long + (0,) * short + (1, 1):
            program.executor([torch.randn(1, 4), caches[which], torch.tensor([0])])
    assert FakeGraphedCall.captures == [((1,), executor.WARM_UP_CALLS), ((1,), 0), ((1,), 0), ((), 0)]


def test_a_capture_is_told_which_aliased_inputs_its_warm_up_must_leave_alone(monkeypatch):
    from ember.runtime import executor

    monkeypatch.setattr(executor, "GraphedCall", FakeGraphedCall)
    monkeypatch.setattr(executor, "_device_of", lambda inputs, graph: torch.device("cuda", 0))
    monkeypatch.setattr(FakeGraphedCall, "captures", [])
    with torch.no_grad():
        adds = ember.compile(Accumulates().eval(),
                             (torch.randn(1, 4), torch.zeros(5, 4), torch.tensor([0]), torch.zeros((), dtype=torch.long)))
        adds.executor.cuda_graphs = True
        adds.executor([torch.randn(1, 4), torch.zeros(5, 4), torch.tensor([0]), torch.zeros((), dtype=torch.long)])
    assert adds.executor.graphed[torch.device("cuda", 0)].unrepeatable == {3}


class CountedCache(torch.nn.Module):
    """Writes at the position its counter holds, then counts (transformers' static cache)."""

    def forward(self, x: torch.Tensor, cache: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        position = torch.arange(1) + count
        count.add_(1)
        cache.index_copy_(0, position, x)
        return cache * 2


def test_warm_up_calls_leave_a_counter_as_it_was_and_write_the_cache_where_the_first_call_does():
    from ember.runtime.cuda_graph import warm_up_calls

    with torch.no_grad():
        program = ember.compile(CountedCache().eval(), (torch.randn(1, 4), torch.zeros(5, 4), torch.zeros((), dtype=torch.long)))
        assert program.executor._unrepeatable() == {2}
        x, cache, count = torch.randn(1, 4), torch.zeros(5, 4), torch.zeros((), dtype=torch.long)
        run = program.executor.wrapper_on(torch.device("cpu")).function
        warm_up_calls(lambda tensors: run(*tensors), [x, cache, count], 3, program.executor._unrepeatable())
        assert count.item() == 0
        torch.testing.assert_close(cache[0], x[0])
        assert not cache[1:].any()
        expected_cache, expected_count = torch.zeros(5, 4), torch.zeros((), dtype=torch.long)
        torch.testing.assert_close(program(x, cache, count), CountedCache()(x, expected_cache, expected_count))
        torch.testing.assert_close(cache, expected_cache)
        assert count.item() == expected_count.item() == 1
