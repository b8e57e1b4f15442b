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


def _written_over(program: ember.Program) -> dict[str, str]:
    return dict(program.executor.layout.reuses) if program.executor.layout else {}


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
    """Reads the cache before updating it: the old value is still needed, so the update stays functional."""

    def forward(self, x: torch.Tensor, cache: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        before = cache.sum(0, keepdim=True)
        cache.index_copy_(0, position, x)
        return before + cache.sum(0, keepdim=True)


class Accumulates(torch.nn.Module):
    """Adds into the cache (index_put with accumulate) and counts calls: neither may run twice in place, as a
    CUDA graph's warm-up would run them."""

    def forward(self, x: torch.Tensor, cache: torch.Tensor, position: torch.Tensor, count: torch.Tensor):
        cache.index_put_((position,), x, accumulate=True)
        count.add_(1)
        return cache * 2


def test_an_update_whose_input_is_read_elsewhere_or_that_accumulates_stays_functional():
    with torch.no_grad():
        reads = ember.compile(ReadsBefore().eval(), (torch.randn(1, 4), torch.zeros(5, 4), torch.tensor([0])))
        adds = ember.compile(Accumulates().eval(),
                             (torch.randn(1, 4), torch.zeros(5, 4), torch.tensor([0]), torch.zeros((), dtype=torch.long)))
    assert reads.mutated_inputs == (1,) and not _written_over(reads)
    assert adds.mutated_inputs == (1, 3) and not _written_over(adds)
    cache, count, expected_cache, expected_count = torch.zeros(5, 4), torch.zeros((), dtype=torch.long), \
        torch.zeros(5, 4), torch.zeros((), dtype=torch.long)
    with torch.no_grad():
        for step in range(3):
            x, position = torch.randn(1, 4), torch.tensor([step % 2])
            torch.testing.assert_close(adds(x, cache, position, count), Accumulates()(x, expected_cache, position, expected_count))
    torch.testing.assert_close(cache, expected_cache)
    assert count.item() == expected_count.item() == 3


class FakeGraphedCall:
    """Stands for a CUDA-graph capture (no GPU here): records how it was captured, and refuses a call handing an
    aliased input in other memory, as the real one does."""

    captures: list[tuple[tuple[int, ...], int]] = []

    def __init__(self, run_prefix, run_tail, example, device, *, aliased, warm_up, **_):
        self.pointers = {position: example[position].data_ptr() for position in aliased}
        self.calls = 0
        self.captures.append((tuple(sorted(aliased)), warm_up))

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
