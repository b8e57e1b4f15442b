"""ember.compile and torch.compile(backend="ember") reach the same program for the same model and inputs."""
from __future__ import annotations

import pytest
import torch

import ember
from ember import models


def signature(program: ember.Program) -> tuple:
    """The program up to value names: each node's op and result types, the weights' types, the plans' decisions."""
    graph = program.graph
    nodes = tuple((node.target if node.is_extern else node.op, tuple(str(value.type) for value in node.outputs))
                  for node in graph.nodes)
    weights = sorted(str(value.type) for value in graph.params)
    inputs = tuple(str(value.type) for value in graph.inputs)
    report = program.report
    fusion = (report.fusion or {}).get("groups")
    memory = {key: report.memory.get(key) for key in ("lower_bound_bytes", "arena_bytes")}
    return nodes, weights, inputs, fusion, memory, dict(report.cuda_graphs).get("capture")


@pytest.mark.parametrize("name", ["mlp", "cnn", "demo", "gpt2", "llama", "mixtral", "bert"])
def test_both_entry_points_build_the_same_program(name, compiled_programs):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model, inputs = models.load(name, "tiny")
    if name in ("llama", "mixtral"):
        # With a KV cache, transformers chooses its grouped-query path by whether dynamo or export traces it
        # (repeat_kv under one, enable_gqa under the other): the graphs differ before ember sees them.
        model.config.use_cache = False
    with torch.no_grad():
        expected = model(*inputs)
        exported = ember.compile(model, inputs)
        through_backend = torch.compile(model, backend="ember")(*inputs)
    assert len(compiled_programs) == 2, "the backend split the model: the comparison needs one graph"
    assert signature(compiled_programs[1]) == signature(exported)
    assert models.max_error(expected, through_backend) <= 1e-4
