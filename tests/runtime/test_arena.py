"""The arena at run time: intermediates live in one planned allocation; outputs are the caller's to keep."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import ember
from ember import models
from ember.optimizer.arena import plan_arena
from ember.optimizer.liveness import buffers
from ember.optimizer.memory_verify import verify_plan
from ember.tolerance import result_tolerance

MODELS = ["mlp", "cnn", "unet", "demo", "gpt2", "llama", "mixtral", "bert"]


def _in_arena(tensor: torch.Tensor, arena: torch.Tensor) -> bool:
    return tensor.untyped_storage().data_ptr() == arena.untyped_storage().data_ptr()


def _fresh(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randint_like(t, 0, 200) if not t.is_floating_point() else torch.randn_like(t) for t in inputs)


@pytest.mark.parametrize("name", MODELS)
def test_every_model_runs_from_its_arena_and_keeps_its_outputs(name):
    model, inputs = models.load(name)
    with torch.no_grad():
        program = ember.compile(model, inputs)
        memory = program.report.memory
        assert memory["arena_bytes"] >= memory["lower_bound_bytes"] and memory["status"] == "optimal"
        first = program(*inputs)
        arena = program.executor.arenas[torch.device("cpu")]
        assert arena.numel() == memory["arena_bytes"]
        kept = [t.clone() for t in torch.utils._pytree.tree_leaves(first)]
        second_inputs = _fresh(inputs)
        second = program(*second_inputs)
        assert program.executor.arenas[torch.device("cpu")] is arena  # allocated once
        for output in torch.utils._pytree.tree_leaves((first, second)):
            assert not _in_arena(output, arena)
        assert all(torch.equal(a, b) for a, b in zip(kept, torch.utils._pytree.tree_leaves(first)))
        assert models.max_error(model(*second_inputs), second) <= result_tolerance(model(*inputs))


def test_intermediates_are_written_into_their_planned_views():
    """Every resident value the reference produces is the arena view at its planned offset."""
    model, inputs = models.load("gpt2")
    program = ember.compile(model, inputs)
    steps = program.executor.steps_on(torch.device("cpu"))
    arena = program.executor.arenas[torch.device("cpu")]
    env = dict(program.graph.weights)
    env.update(zip(program.executor.input_names, inputs))
    slots = program.executor.layout.slots
    resident = 0
    with torch.no_grad():
        for step in steps:
            results = step.run([env[name] for name in step.inputs])
            for name, position in zip(step.outputs, step.positions):
                env[name] = results[position]
                if name in slots:
                    offset, value_type = slots[name]
                    assert _in_arena(results[position], arena)
                    assert results[position].data_ptr() == arena.data_ptr() + offset
                    assert results[position].stride() == value_type.strides
                    resident += 1
    assert resident == len(slots) > 0


def test_the_arena_plan_covers_every_buffer_but_outputs_and_saved_statistics():
    model, inputs = models.load("demo")
    graph = ember.compile(model, inputs).graph
    arena_plan = plan_arena(graph, verify=True)
    all_buffers = {b.name: b for b in buffers(graph)}
    assert set(arena_plan.slots) | set(arena_plan.fresh) == set(all_buffers)
    assert not set(arena_plan.slots) & set(arena_plan.fresh)
    resident = [all_buffers[name] for name in arena_plan.slots]
    verify_plan(arena_plan.plan, [b.size_bytes for b in resident], [b.start for b in resident], [b.end for b in resident])


def test_an_output_that_views_an_intermediate_is_not_in_the_arena():
    class Transposed(nn.Module):
        def forward(self, x):
            return (x * 2).t(), (x + 1).sum()

    x = torch.randn(5, 3)
    program = ember.compile(Transposed(), (x,))
    doubled, total = program(x)
    arena = program.executor.arenas[torch.device("cpu")]
    assert not _in_arena(doubled, arena) and not _in_arena(total, arena)
    torch.testing.assert_close(doubled, (x * 2).t())
    torch.testing.assert_close(total, (x + 1).sum())


def test_results_of_ops_that_allocate_their_own_are_not_copied_into_the_arena():
    """Attention has no out= overload: its result is allocated by the op, not computed elsewhere and copied in;
    a view an extern op returns is copied in, since the memory it views is reused."""
    class Attention(nn.Module):
        def forward(self, q):
            return torch.nn.functional.scaled_dot_product_attention(q, q, q).sum(-1), torch.view_as_real(q.mul(2).to(torch.complex64)).exp()

    q = torch.randn(2, 3, 5, 8)
    program = ember.compile(Attention(), (q,))
    resident = set(program.executor.layout.slots)
    attention = next(node for node in program.graph.nodes if node.op == "scaled_dot_product_attention")
    as_real = next(node for node in program.graph.nodes if "view_as_real" in (node.target or ""))
    assert attention.outputs[0].name not in resident and as_real.outputs[0].name in resident
    with torch.no_grad():
        for got, want in zip(program(q), Attention()(q)):
            torch.testing.assert_close(got, want)


def test_arena_off_runs_without_one():
    model, inputs = models.load("mlp")
    program = ember.compile(model, inputs, ember.Options(arena=False))
    assert program.report.memory == {} and program.executor.layout is None
    program(*inputs)
    assert program.executor.arenas == {}


def test_the_backend_runs_from_an_arena(compiled_programs):
    model, inputs = models.load("demo")
    with torch.no_grad():
        expected = model(*inputs)
        actual = torch.compile(model, backend="ember")(*inputs)
    assert models.max_error(expected, actual) <= result_tolerance(expected)
    assert all(program.report.memory for program in compiled_programs)
    assert any(program.executor.arenas for program in compiled_programs)


def test_a_call_that_autograd_records_runs_outside_the_arena_and_backpropagates():
    model, inputs = models.load("mlp")
    program = ember.compile(model, inputs)
    loss = program(*inputs).square().sum()
    loss.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(*inputs).square().sum().backward()
    for got, want in zip(expected, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want)
    assert program.executor.arenas == {}
    with torch.no_grad():
        program(*inputs)
    assert program.executor.arenas


@pytest.mark.parametrize("first, second", [(torch.inference_mode, torch.no_grad), (torch.no_grad, torch.inference_mode)])
def test_the_arena_serves_calls_inside_and_outside_inference_mode(first, second):
    model, inputs = models.load("mlp")
    program = ember.compile(model, inputs)
    with first():
        a = program(*inputs)
    with second():
        b = program(*inputs)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
