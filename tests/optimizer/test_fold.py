"""Constant folding: tables made from weights and literals are worked out once, never read stale, never made of
memory the model writes, and never a copy of a large weight."""
from __future__ import annotations

import pytest
import torch

import ember
from ember import models
from ember.frontend import from_module
from ember.optimizer import fold
from ember.optimizer.fold import fold_constants


class Rotary(torch.nn.Module):
    """Llama's rotary table: cos and sin of positions times a buffer, made on every call in eager."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[1], device=x.device).float()
        angles = torch.outer(positions, self.inv_freq)
        table = torch.cat([angles, angles], dim=-1)
        return x * table.cos() + x * table.sin()


def ops_of(graph) -> list[str]:
    return [node.op for node in graph.nodes]


def test_a_rotary_table_is_worked_out_at_compile_time():
    model, x = Rotary(), torch.randn(2, 5, 8)
    graph = fold_constants(from_module(model, (x,)).graph)
    assert not {"arange", "cos", "sin", "cat"} & set(ops_of(graph)), ops_of(graph)
    assert ops_of(graph).count("mul.Tensor") == 2 and "add.Tensor" in ops_of(graph)
    folded = [name for name in graph.derived if name in graph.weights]
    assert folded and all(sources == (model.inv_freq,) for sources in (graph.derived[n] for n in folded))
    with torch.no_grad():
        torch.testing.assert_close(ember.compile(model, (x,))(x), model(x))


def test_the_llama_rotary_prologue_folds_and_the_model_agrees():
    model, inputs = models.load("llama", "tiny")
    graph = fold_constants(from_module(model, inputs).graph)
    assert not {"cos", "sin", "arange"} & set(ops_of(graph))
    with torch.no_grad():
        assert models.max_error(model(*inputs), ember.compile(model, inputs)(*inputs)) < 1e-5


def test_an_in_place_update_of_a_source_is_refused_or_recompiled(compiled_programs):
    model, x = Rotary(), torch.randn(2, 5, 8)
    with torch.no_grad():
        program = ember.compile(model, (x,))
        compiled = torch.compile(model, backend="ember")
        torch.testing.assert_close(compiled(x), model(x))
        model.inv_freq.mul_(2.0)
        with pytest.raises(ember.InputError, match="updated in place after compiling"):
            program(x)
        torch.testing.assert_close(compiled(x), model(x))


class Counter(torch.nn.Module):
    """A buffer the model writes every call: nothing made from it may fold."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("steps", torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.steps.add_(1.0)
        return x * self.steps.exp()


def test_memory_the_model_writes_never_folds():
    model, x = Counter(), torch.randn(3, 4)
    graph = fold_constants(from_module(model, (x,)).graph)
    assert "exp" in ops_of(graph)
    reference, compiled = Counter(), ember.compile(Counter(), (x,))
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(compiled(x), reference(x))


class Scaled(torch.nn.Module):
    """A weight scaled on every call (Gemma scales its embedding so): the result is as large as the weight."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(16, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.weight * 2.0).t()


def test_a_large_value_is_not_copied_beside_its_weight(monkeypatch):
    model, x = Scaled().requires_grad_(False), torch.randn(3, 8)
    assert "mul.Tensor" not in ops_of(fold_constants(from_module(model, (x,)).graph))
    monkeypatch.setattr(fold, "FOLDED_ELEMENTS", 64)
    assert "mul.Tensor" in ops_of(fold_constants(from_module(model, (x,)).graph))


class Returned(torch.nn.Module):
    """Returns a value made from a buffer alone, and an expanded one: the caller owns what it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("base", torch.arange(4.0))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        table = self.base.exp()
        return table * 2.0, x + table.expand(3, 4)


def test_returned_and_expanded_values_stay_computed_per_call():
    model, x = Returned(), torch.randn(3, 4)
    with torch.no_grad():
        program = ember.compile(model, (x,))
        first, _ = program(x)
        first.zero_()
        again, summed = program(x)
        expected, expected_sum = model(x)
    torch.testing.assert_close(again, expected)
    torch.testing.assert_close(summed, expected_sum)


class Cached(torch.nn.Module):
    """A cache's first update: an empty past (1-D, as transformers' DynamicCache starts) catted before the key,
    and a cat of three where only the middle one is empty."""

    def forward(self, key: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        past = torch.tensor([])
        first = torch.cat([past, key.transpose(1, 2)], dim=-2)
        return first, torch.cat([key, key[:, :0], other], dim=1)


def test_empty_cat_inputs_are_dropped_and_a_lone_one_copied():
    from ember.optimizer.canonicalize import drop_empty_cat_inputs

    model, inputs = Cached(), (torch.randn(2, 3, 4, 5), torch.randn(2, 1, 4, 5))
    graph = drop_empty_cat_inputs(fold_constants(from_module(model, inputs).graph))
    types = graph.types()
    cats = [node for node in graph.nodes if node.op == "cat"]
    assert [len(node.inputs) for node in cats] == [2] and all(types[n].numel for n in cats[0].inputs)
    assert [node.op for node in graph.nodes].count("clone") == 1
    with torch.no_grad():
        for actual, expected in zip(ember.compile(model, inputs)(*inputs), model(*inputs)):
            torch.testing.assert_close(actual, expected)
            assert actual.is_contiguous()


class Exponent(torch.nn.Module):
    """A parameter made into a per-call value: training updates it, so a folded copy would go stale every step."""

    def __init__(self) -> None:
        super().__init__()
        self.log_scale = torch.nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.log_scale.exp()


def test_nothing_made_from_a_parameter_that_requires_grad_folds():
    model, x = Exponent(), torch.randn(3, 4)
    program = ember.compile(model, (x,))
    assert "exp" in ops_of(program.graph)
    program(x).sum().backward()
    folded_grad, model.log_scale.grad = model.log_scale.grad.clone(), None
    model(x).sum().backward()
    torch.testing.assert_close(folded_grad, model.log_scale.grad)
    frozen = Exponent().requires_grad_(False)
    assert "exp" not in ops_of(fold_constants(from_module(frozen, (x,)).graph))


def test_a_returned_copy_to_the_gpu_folds_there_and_is_handed_out_as_a_copy_made_there():
    """transformers' sliding-window cache moves a CPU `torch.tensor(window)` to the GPU and hands it back: the copy
    folds into a constant already on the GPU, returned as a fresh copy of it made there (the caller owns what it is
    given), so no call copies from the host, which a CUDA graph cannot capture. The GPU is faked in the IR's types;
    the copy's attrs name no device, so that its reference (which gives the folded value) runs on this CPU."""
    from ember.ir import Graph, Node, TensorType, Value

    window = torch.tensor([4, 8, 15])
    on_gpu = TensorType((3,), torch.float32, (1,), "cuda")
    x, lifted = Value("x", on_gpu), Value("lifted", TensorType((3,), torch.int64, (1,), "cpu"))
    nodes = (Node("moved", "_to_copy", ("lifted",), {"dtype": torch.float32}, (Value("moved", on_gpu),)),
             Node("add", "add.Tensor", ("x", "moved"), {}, (Value("add", on_gpu),)))
    graph = fold_constants(Graph((x,), (lifted,), nodes, ("add", "moved"), {"lifted": window}))
    assert sorted(ops_of(graph)) == ["add.Tensor", "clone"] and graph.outputs == ("add", "moved")
    types = graph.types()
    assert all(types[name].device == "cuda" for node in graph.nodes for name in node.inputs)
    copy, add = sorted(graph.nodes, key=lambda node: node.op != "clone")
    (held,) = copy.inputs
    assert types[held] == on_gpu and copy.outputs == (Value("moved", on_gpu),)
    assert add.inputs == ("x", held)  # the add reads the constant, not the copy handed out
    assert graph.weights[held].dtype == torch.float32 and torch.equal(graph.weights[held], window.to(torch.float32))
    assert graph.derived[held] == (window,)


class MovedConstants(torch.nn.Module):
    """Tensors made in forward and moved to the input's device: one read, one returned as transformers' sliding
    window cache returns its window, one returned in another dtype."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        window = torch.tensor(8, dtype=torch.long).to(x.device)
        offsets = torch.tensor([1, 2, 3]).to(x.device) + torch.tensor(5, device=x.device)
        return x + offsets + window, window, torch.tensor([2.5, -1.0]).to(device=x.device, dtype=torch.bfloat16)


def test_after_the_passes_no_constant_crosses_from_the_host_to_the_device():
    """On a device other than the CPU (meta stands in for CUDA: any machine has it) every copy of a constant to the
    device is gone after the graph passes, and the constants are held on the device as the copies make them."""
    from ember.api import optimize

    graph = optimize(from_module(MovedConstants(), (torch.randn(4, 3, device="meta"),)).graph, ember.Options(), {})
    graph.verify()
    types = graph.types()
    assert not [node.name for node in graph.nodes if any(types[name].device == "cpu" for name in node.inputs)]
    assert all(tensor.device.type == "meta" for tensor in graph.weights.values())
    _, window, scaled = (types[name] for name in graph.outputs)
    assert (window.dtype, window.device, scaled.dtype, scaled.device) == (torch.int64, "meta", torch.bfloat16, "meta")
    made = {value.name: node for node in graph.nodes for value in node.outputs}
    assert all(made[name].op == "clone" and made[name].inputs[0] in graph.weights for name in graph.outputs[1:])


def test_constants_moved_to_the_inputs_device_agree_with_eager_and_are_returned_fresh(compiled_programs):
    model, x = MovedConstants(), torch.randn(4, 3)
    with torch.no_grad():
        expected = model(x)
        for compiled in (ember.compile(model, (x,)), torch.compile(model, backend="ember")):
            first = compiled(x)
            for actual, wanted in zip(first, expected):
                torch.testing.assert_close(actual, wanted, rtol=0, atol=0)
            first[1].add_(100)  # the caller owns what it is given
            torch.testing.assert_close(compiled(x)[1], expected[1], rtol=0, atol=0)
    assert len(compiled_programs) == 2  # neither ran eagerly
