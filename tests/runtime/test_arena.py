"""Arenas at run time: intermediates live in planned allocations each call makes and frees; outputs are the caller's."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import ember
from ember import models
from ember.optimizer.arena import plan_arena
from ember.ir.schedule import schedule_of
from ember.optimizer.memory_verify import verify_plan
from ember.ir import Node, Value
from ember.ir.types import type_of
from ember.runtime import executor
from ember.runtime.arena import bind_into
from ember.runtime.executor import _allocate, given_memory
from ember.tolerance import result_tolerance

MODELS = ["mlp", "cnn", "unet", "demo", "gpt2", "llama", "mixtral", "bert"]


def _in_arena(tensor: torch.Tensor, arenas: list[torch.Tensor]) -> bool:
    return any(tensor.untyped_storage().data_ptr() == arena.untyped_storage().data_ptr() for arena in arenas)


def _fresh(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randint_like(t, 0, 200) if not t.is_floating_point() else torch.randn_like(t) for t in inputs)


@pytest.fixture
def allocated(monkeypatch) -> list[torch.Tensor]:
    """Every arena the executor allocates from now on (kept alive by the list)."""
    arenas: list[torch.Tensor] = []

    def allocate(size_bytes, device):
        arenas.append(_allocate(size_bytes, device))
        return arenas[-1]

    monkeypatch.setattr(executor, "_allocate", allocate)
    return arenas


@pytest.mark.parametrize("name", MODELS)
def test_every_model_runs_from_its_arenas_and_keeps_its_outputs(name, allocated):
    model, inputs = models.load(name)
    with torch.no_grad():
        program = ember.compile(model, inputs)
        memory = program.report.memory
        assert memory["lower_bound_bytes"] <= memory["peak_bytes"] and memory["status"] == "optimal"
        first = program(*inputs)
        arenas = program.executor.layout.arenas
        assert [arena.numel() for arena in allocated] == [arena.size_bytes for arena in arenas] and arenas
        kept = [t.clone() for t in torch.utils._pytree.tree_leaves(first)]
        second_inputs = _fresh(inputs)
        second = program(*second_inputs)
        assert len(allocated) == 2 * len(arenas)  # each call allocates its own
        for output in torch.utils._pytree.tree_leaves((first, second)):
            assert not _in_arena(output, allocated)
        assert all(torch.equal(a, b) for a, b in zip(kept, torch.utils._pytree.tree_leaves(first)))
        assert models.max_error(model(*second_inputs), second) <= result_tolerance(model(*inputs))


@pytest.mark.parametrize("name", ["gpt2", "llama", "mixtral", "bert", "unet"])
def test_a_call_peaks_at_the_lower_bound(name):
    """The arenas' windows keep each step's open arenas plus the values outside them within the most bytes
    live at any step, which one arena plus the outputs it hands out would exceed."""
    model, inputs = models.load(name)
    graph = ember.compile(model, inputs).graph
    arena_plan = plan_arena(graph, verify=True)
    assert arena_plan.peak_bytes == arena_plan.lower_bound
    assert all(plan.arena_bytes == plan.lower_bound for plan in arena_plan.plans)


def test_intermediates_that_peak_before_a_large_output_is_made_leave_room_for_it(allocated):
    """As in a language model: a wide hidden layer, then logits. One arena for the hidden layer plus the
    logits would hold both; the windows free the hidden layer's arena before the logits are made."""
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down, self.head = nn.Linear(16, 256), nn.Linear(256, 16), nn.Linear(16, 512)

        def forward(self, x):
            return self.head(self.down(torch.relu(self.up(x))))

    model, x = Head(), torch.randn(64, 16)
    with torch.no_grad():
        program = ember.compile(model, (x,))
        memory = program.report.memory
        hidden, logits = 64 * 256 * 4, 64 * 512 * 4
        assert memory["reused_values"] == 1  # relu writes over the hidden layer
        assert memory["peak_bytes"] == memory["lower_bound_bytes"] < hidden + logits
        assert memory["arenas"] >= 1 and memory["arena_bytes"] >= hidden
        torch.testing.assert_close(program(x), model(x))


def test_intermediates_are_written_into_their_planned_views():
    """Every resident value the reference produces is the arena view at its planned offset, and every result
    written over an input is that input's memory."""
    model, inputs = models.load("gpt2")
    program = ember.compile(model, inputs)
    steps = program.executor.steps_on(torch.device("cpu"))
    layout = program.executor.layout
    env = dict(program.graph.weights)
    env.update(zip(program.executor.input_names, inputs))
    arenas: list[torch.Tensor | None] = [None] * len(layout.arenas)
    resident, reused = 0, 0
    with torch.no_grad():
        for step in steps:
            for index in step.opens:
                arenas[index] = torch.full((layout.arenas[index].size_bytes,), 0xFF, dtype=torch.uint8)
            args = [env[name] for name in step.inputs]
            results = step.run(args, given_memory(step, arenas, args) if step.targets else ())
            for name, position in zip(step.outputs, step.positions):
                env[name] = results[position]
                if name in layout.slots:
                    index, offset, value_type = layout.slots[name]
                    assert results[position].data_ptr() == arenas[index].data_ptr() + offset
                    assert results[position].stride() == value_type.strides
                    resident += 1
                if name in layout.reuses:
                    assert results[position].data_ptr() == env[layout.reuses[name]].data_ptr()
                    reused += 1
            for index in step.closes:
                arenas[index] = None
    assert resident == len(layout.slots) > 0 and reused == len(layout.reuses) > 0


def test_the_arena_plan_covers_every_buffer_but_outputs_and_saved_statistics():
    model, inputs = models.load("demo")
    graph = ember.compile(model, inputs).graph
    arena_plan = plan_arena(graph, verify=True)
    all_buffers = {b.name: b for b in schedule_of(graph).buffers}
    assert set(arena_plan.slots) | set(arena_plan.fresh) == set(all_buffers)
    assert not set(arena_plan.slots) & set(arena_plan.fresh)
    for index, (plan, arena) in enumerate(zip(arena_plan.plans, arena_plan.layout.arenas)):
        resident = [all_buffers[name] for name, slot in arena_plan.slots.items() if slot[0] == index]
        assert all(arena.first_step <= b.start <= b.end <= arena.last_step for b in resident)
        verify_plan(plan, [b.size_bytes for b in resident], [b.start - arena.first_step for b in resident],
                    [b.end - arena.first_step for b in resident])


def test_an_output_that_views_an_intermediate_is_not_in_an_arena(allocated):
    class Transposed(nn.Module):
        def forward(self, x):
            return (x * 2).t(), (x + 1).sum()

    x = torch.randn(5, 3)
    program = ember.compile(Transposed(), (x,))
    doubled, total = program(x)
    assert not _in_arena(doubled, allocated) and not _in_arena(total, allocated)
    torch.testing.assert_close(doubled, (x * 2).t())
    torch.testing.assert_close(total, (x + 1).sum())


def test_results_of_ops_that_allocate_their_own_are_not_copied_into_the_arena():
    """Attention has no out= overload: its result is allocated by the op, not computed elsewhere and copied in;
    a view an extern op returns owns nothing (here it views the complex cast's memory, which that op allocates)."""
    class Attention(nn.Module):
        def forward(self, q):
            return torch.nn.functional.scaled_dot_product_attention(q, q, q).sum(-1), torch.view_as_real(q.mul(2).to(torch.complex64)).exp()

    q = torch.randn(2, 3, 5, 8)
    program = ember.compile(Attention(), (q,))
    resident = set(program.executor.layout.slots)
    attention = next(node for node in program.graph.nodes if node.op == "scaled_dot_product_attention")
    as_real = next(node for node in program.graph.nodes if "view_as_real" in (node.target or ""))
    assert attention.outputs[0].name not in resident and as_real.outputs[0].name not in resident
    with torch.no_grad():
        for got, want in zip(program(q), Attention()(q)):
            torch.testing.assert_close(got, want)


def test_arena_off_runs_without_one(allocated):
    model, inputs = models.load("mlp")
    program = ember.compile(model, inputs, ember.Options(arena=False))
    assert program.report.memory == {} and program.executor.layout is None
    program(*inputs)
    assert not allocated


def test_the_backend_runs_from_an_arena(compiled_programs, allocated):
    model, inputs = models.load("demo")
    with torch.no_grad():
        expected = model(*inputs)
        actual = torch.compile(model, backend="ember")(*inputs)
    assert models.max_error(expected, actual) <= result_tolerance(expected)
    assert all(program.report.memory for program in compiled_programs)
    assert allocated


def test_a_call_that_autograd_records_runs_outside_the_arena_and_backpropagates(allocated):
    model, inputs = models.load("mlp")
    program = ember.compile(model, inputs)
    loss = program(*inputs).square().sum()
    loss.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(*inputs).square().sum().backward()
    for got, want in zip(expected, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want)
    assert not allocated
    with torch.no_grad():
        program(*inputs)
    assert allocated


@pytest.mark.parametrize("first, second", [(torch.inference_mode, torch.no_grad), (torch.no_grad, torch.inference_mode)])
def test_the_arena_serves_calls_inside_and_outside_inference_mode(first, second):
    model, inputs = models.load("mlp")
    program = ember.compile(model, inputs)
    with first():
        a = program(*inputs)
    with second():
        b = program(*inputs)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strided", [False, True])
def test_a_batched_linear_with_bias_writes_into_its_slot_as_the_functional_call_computes_it(strided, dtype):
    """ATen's linear.out on a 3-D input runs a matmul, then adds the bias in a second kernel; the functional call
    it stands for flattens a contiguous input to one addmm, and so does the arena's: bitwise the same result."""
    x = torch.randn(3, 10 if strided else 5, 7, dtype=dtype)[:, ::2 if strided else 1]
    weight, bias = torch.randn(9, 7, dtype=dtype), torch.randn(9, dtype=dtype)
    want = torch.nn.functional.linear(x, weight, bias)
    node = Node("n", "linear", ("x", "w", "b"), {}, (Value("out", type_of(want)),))
    out = torch.full_like(want, float("nan"))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        (got,) = bind_into(node, [True])([x, weight, bias], [out])
    ops = [event.name for event in profiler.events()]
    assert got is out and torch.equal(got, want)
    assert ("aten::add_" in ops) is strided  # only a strided input keeps the separate bias add, as in eager
