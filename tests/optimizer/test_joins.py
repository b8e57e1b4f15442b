"""Linears of one input row join into one `linears` node; anything else stays as it was; results do not change,
through either entry point, and a tiny Llama decodes the same greedy tokens as eager with its projections joined."""
from __future__ import annotations

import pytest
import torch

import ember
import ember.codegen.skinny_mm as skinny_mm
from ember import models
from ember.frontend import from_module
from ember.optimizer.joins import MAX_JOINED, join_vector_products


class Projections(torch.nn.Module):
    """`count` linears of one input (every third with a bias), one of them read twice, and one linear of another."""

    def __init__(self, count: int = 3):
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(24, 8 + i, bias=i % 3 == 2) for i in range(count))
        self.other = torch.nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = x * 2
        results = tuple(head(h) for head in self.heads)
        return (*results, results[0] + 1, self.other(x))


def _ops(graph) -> list[str]:
    return [node.op for node in graph.nodes]


def test_the_linears_of_one_row_become_one_node_with_their_own_names():
    module = Projections().eval()
    graph = from_module(module, (torch.randn(1, 1, 24),)).graph
    joined = join_vector_products(graph)
    assert _ops(joined).count("linears") == 1 and _ops(joined).count("linear") == 1
    (node,) = [node for node in joined.nodes if node.op == "linears"]
    linears = [node for node in graph.nodes if node.op == "linear" and node.inputs[0] != "x"]
    assert [value.name for value in node.outputs] == [linear.outputs[0].name for linear in linears]
    assert node.attrs["biases"] == (None, None, 4) and node.inputs[4] == linears[2].inputs[2]
    assert [n.name for n in joined.nodes].index(node.name) == [n.name for n in graph.nodes].index(linears[0].name)


def test_more_linears_than_one_node_takes_are_joined_in_sets():
    module = Projections(MAX_JOINED + 2).eval()
    joined = join_vector_products(from_module(module, (torch.randn(1, 24),)).graph)
    assert sorted(len(node.outputs) for node in joined.nodes if node.op == "linears") == [2, MAX_JOINED]


@pytest.mark.parametrize("shape", [(2, 24), (1, 3, 24)])
def test_linears_of_more_than_one_row_are_left_alone(shape):
    graph = from_module(Projections().eval(), (torch.randn(shape),)).graph
    assert join_vector_products(graph) is graph


def test_a_linear_of_a_computed_weight_is_left_alone():
    class Computed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(6, 4))

        def forward(self, x):
            return torch.nn.functional.linear(x, self.a * 2), torch.nn.functional.linear(x, self.b)

    graph = from_module(Computed().eval(), (torch.randn(1, 4),)).graph
    assert join_vector_products(graph) is graph


@pytest.mark.parametrize("fusion", [False, True])
def test_joined_results_match_eager_through_both_entry_points(fusion, monkeypatch):
    launches = []
    launch = skinny_mm._launch
    monkeypatch.setattr(skinny_mm, "_launch", lambda *args: launches.append(1) or launch(*args))
    torch.manual_seed(0)
    module, x = Projections().eval(), torch.randn(1, 1, 24)
    with torch.no_grad():
        expected = module(x)
        program = ember.compile(module, (x,), ember.Options(fusion=fusion))
        exported = program(x)
        backend = torch.compile(module, backend="ember", options={"fusion": fusion})(x)
    assert "linears" in _ops(program.graph)
    assert launches  # the kernel ran (Triton's interpreter, here)
    for results in (exported, backend):
        for got, want in zip(results, expected):
            torch.testing.assert_close(got, want)


def test_a_tiny_llama_decodes_the_eager_tokens_with_its_projections_joined(monkeypatch):
    """model.generate with a static cache, the forward compiled by the ember backend, as Hugging Face documents."""
    launches = []
    launch = skinny_mm._launch
    monkeypatch.setattr(skinny_mm, "_launch", lambda *args: launches.append(len(args[1])) or launch(*args))
    t = models._transformers()
    torch.manual_seed(0)
    model = t.LlamaForCausalLM(models._llama_config(t, "tiny")).eval()
    prompt = torch.randint(1, model.config.vocab_size, (1, 5))
    settings = dict(do_sample=False, max_new_tokens=6, min_new_tokens=6, cache_implementation="static",
                    max_cache_len=16, pad_token_id=0, disable_compile=True)
    with torch.no_grad():
        eager = model.generate(prompt, **settings)
        model.forward = torch.compile(model.forward, backend="ember", fullgraph=True)
        compiled = model.generate(prompt, **settings)
    assert torch.equal(compiled, eager)
    assert 3 in launches and 2 in launches  # query, key and value joined; the MLP's gate and up joined
