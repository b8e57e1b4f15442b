"""Capture traces a model once: torch.export straight to ember's decomposed ATen set, the graph that
torch.export + run_decompositions (two traces) give, with the same signature."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.export.exported_program import ExportedProgram
from torch.fx.experimental.proxy_tensor import _MakefxTracer

import ember
from ember import models
from ember.frontend import export
from ember.frontend.lower import DROPPED
from ember.frontend.one_trace import one_trace_supported


@pytest.fixture
def traces(monkeypatch) -> Counter:
    """How often, during the test, make_fx traced a function and an ExportedProgram was decomposed."""
    counts: Counter = Counter()
    trace, decompose = _MakefxTracer.trace, ExportedProgram.run_decompositions

    def counted_trace(self, *args, **kwargs):
        counts["make_fx"] += 1
        return trace(self, *args, **kwargs)

    def counted_decompose(self, *args, **kwargs):
        counts["run_decompositions"] += 1
        return decompose(self, *args, **kwargs)

    monkeypatch.setattr(_MakefxTracer, "trace", counted_trace)
    monkeypatch.setattr(ExportedProgram, "run_decompositions", counted_decompose)
    return counts


def test_this_torch_supports_one_trace_capture():
    assert one_trace_supported(), f"torch {torch.__version__}: capture falls back to two traces"


def test_ember_compile_traces_the_model_once(traces):
    model, inputs = models.load("demo")
    with torch.no_grad():
        ember.compile(model, inputs)
    assert traces == {"make_fx": 1}


def test_the_backend_traces_each_graph_once(traces, compiled_programs):
    model, inputs = models.load("demo")
    with torch.no_grad():
        torch.compile(model, backend="ember")(*inputs)
    assert len(compiled_programs) == 1
    assert traces == {"make_fx": 1}


def aten_ops(exported: torch.export.ExportedProgram) -> Counter:
    """The graph's ops, less the runtime checks lowering drops, a copy of a lifted constant counted as a clone
    (two traces copy one by clone, one trace by lift_fresh_copy)."""
    names = (str(node.target).removeprefix("aten.") for node in exported.graph.nodes if node.op == "call_function")
    return Counter("clone.default" if name == "lift_fresh_copy.default" else name
                   for name in names if name.removesuffix(".default") not in DROPPED)


def signature(exported: torch.export.ExportedProgram) -> tuple:
    """What from_module reads: inputs by kind and target (in any order), outputs by kind in order, and the weights."""
    inputs = Counter((spec.kind, spec.target) for spec in exported.graph_signature.input_specs)
    outputs = [(spec.kind, spec.target) for spec in exported.graph_signature.output_specs]
    buffers = sorted(name for name, _ in exported.named_buffers())
    return inputs, outputs, sorted(exported.state_dict), sorted(exported.constants), buffers


@pytest.mark.parametrize("name", ["llama", "mixtral", "bert", "gpt2"])
def test_one_trace_gives_the_two_trace_graph(name):
    pytest.importorskip("transformers")
    model, inputs = models.load(name)
    export.register_transformers_caches()
    with torch.no_grad():
        once, once_spec = export.capture_in_one_trace(model, inputs, {})
        twice, twice_spec = export.capture_in_two_traces(model, inputs, {})
    assert aten_ops(once) == aten_ops(twice)
    assert "scaled_dot_product_attention.default" in aten_ops(once)
    assert signature(once) == signature(twice)
    assert once_spec == twice_spec and once.call_spec.in_spec == twice.call_spec.in_spec


class TiedHead(torch.nn.Module):
    """An embedding whose weight is also the output projection's, as in GPT-2's LM head."""

    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(23, 8)
        self.head = torch.nn.Linear(8, 23, bias=False)
        self.head.weight = self.embedding.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(tokens))


def test_a_tied_weight_is_held_once():
    model, tokens = TiedHead().eval(), torch.randint(0, 23, (3, 5))
    with torch.no_grad():
        program = ember.compile(model, (tokens,))
        expected = model(tokens)
    assert [tuple(value.type.shape) for value in program.graph.params] == [(23, 8)]
    assert torch.allclose(program(tokens), expected)
