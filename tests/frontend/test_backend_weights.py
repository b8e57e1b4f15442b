"""The torch.compile backend holds parameters as weights, by reference, and never reads a stale one."""
from __future__ import annotations

import pytest
import torch

import ember

from ember.optimizer import layout


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.ReLU(),
                               torch.nn.Linear(5, 3)).eval()


def test_parameters_and_buffers_are_weights_not_inputs(compiled_programs):
    model, x = make_model(), torch.randn(4, 6)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="ember")(x), model(x))
    (program,) = compiled_programs
    assert [value.type.shape for value in program.graph.inputs] == [(4, 6)]
    held = {tensor.data_ptr() for tensor in program.graph.weights.values()}
    assert held == {tensor.data_ptr() for tensor in (*model.parameters(), *model.buffers()) if tensor.is_floating_point()}


@pytest.mark.parametrize("change", ["data", "new_parameter", "load_state_dict", "in_place"])
def test_a_changed_parameter_is_never_read_stale(change):
    model, x = make_model(), torch.randn(4, 6)
    compiled = torch.compile(model, backend="ember")
    with torch.no_grad():
        compiled(x)
        if change == "data":
            model[0].weight.data = torch.randn(5, 6)
        elif change == "new_parameter":
            model[3].weight = torch.nn.Parameter(torch.randn(3, 5))
        elif change == "load_state_dict":
            model.load_state_dict({name: torch.rand_like(value) + 0.5 if value.is_floating_point() else value
                                   for name, value in model.state_dict().items()})
        else:
            model[3].weight.mul_(-2)
        torch.testing.assert_close(compiled(x), model(x))


@pytest.fixture
def padded_copies(monkeypatch):
    """Every odd-featured linear gets a padded weight copy at compile time, as half-precision CUDA linears do."""
    def pad_every_odd_linear(node, types, weights):
        features = node.outputs[0].type.shape[-1]
        known = node.op == "linear" and all(name in weights for name in node.inputs[1:])
        return -(-features // 8) * 8 if known and features % 8 else None

    monkeypatch.setattr(layout, "_padded_features", pad_every_odd_linear)


def test_an_in_place_update_under_a_derived_copy_recompiles(compiled_programs, padded_copies):
    model, x = make_model(), torch.randn(4, 6)
    compiled = torch.compile(model, backend="ember")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
        assert compiled_programs[0].graph.derived, "the pass made no padded copy: the test tests nothing"
        model[3].weight.add_(1.0)
        torch.testing.assert_close(compiled(x), model(x))
    assert len(compiled_programs) == 2


def test_a_program_never_reads_a_stale_derived_copy(padded_copies):
    """ember.compile cannot compile again by itself: it says so rather than answer with the old weight."""
    model, x = make_model(), torch.randn(4, 6)
    with torch.no_grad():
        program = ember.compile(model, (x,))
        assert program.graph.derived
        torch.testing.assert_close(program(x), model(x))
        model[3].weight.add_(1.0)
        with pytest.raises(ember.InputError, match="updated in place after compiling"):
            program(x)


def test_new_shapes_of_a_dynamic_graph_compile_once_each(compiled_programs):
    model = make_model()
    compiled = torch.compile(model, backend="ember")
    with torch.no_grad():
        for rows in (4, 5, 7, 5, 4):
            x = torch.randn(rows, 6)
            torch.testing.assert_close(compiled(x), model(x))
    # dynamo's first graph is static (4 rows); its dynamic graph, from the second shape on, compiles each shape once
    assert [program.graph.inputs[0].type.shape[0] for program in compiled_programs] == [4, 5, 7, 4]


def test_a_graph_autograd_records_still_compiles_its_forward(compiled_programs):
    model, x = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)), torch.randn(4, 6)
    out = torch.compile(model, backend="ember")(x)
    out.sum().backward()
    expected = model(x)
    torch.testing.assert_close(out, expected)
    assert model[0].weight.grad is not None
    (program,) = compiled_programs
    assert len(program.graph.inputs) == 1 and len(program.graph.params) == 4


def test_a_call_autograd_records_gives_the_weight_under_a_derived_copy_its_gradient(padded_copies):
    """A padded copy carries no gradient back to the weight it was made from: a call that autograd records
    runs the graph as captured, so every weight gets eager's gradient (and an in-place update between
    training steps is no reason to refuse the call)."""
    model, x = make_model().train(False), torch.randn(4, 6, requires_grad=True)
    program = ember.compile(model, (x,))
    assert program.graph.derived
    for _ in range(2):
        program(x).square().sum().backward()
        compiled = [parameter.grad.clone() for parameter in model.parameters()]
        model.zero_grad()
        model(x).square().sum().backward()
        for actual, parameter in zip(compiled, model.parameters()):
            torch.testing.assert_close(actual, parameter.grad)
        with torch.no_grad():
            model[3].weight.add_(0.5)
        model.zero_grad()
