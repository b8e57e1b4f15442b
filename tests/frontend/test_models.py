"""Every test model compiles through ember.compile and torch.compile(backend="ember") and matches eager.

Small configs with random weights; op coverage must stay at or above 95% on each.
"""
from __future__ import annotations

import pytest
import torch

import ember
from ember import models
from ember.tolerance import assert_close, result_tolerance

MODELS = ["mlp", "cnn", "unet", "demo", "gpt2", "llama", "mixtral", "bert", *models.BROADER]



@pytest.mark.parametrize("name", MODELS)
def test_ember_compile_matches_eager(name):
    model, inputs = models.load(name)
    with torch.no_grad():
        expected = model(*inputs)
        program = ember.compile(model, inputs)
        fresh = tuple(torch.randint_like(t, 0, 200) if not t.is_floating_point() else torch.randn_like(t) for t in inputs)
        assert models.max_error(expected, program(*inputs)) <= result_tolerance(expected)
        expected_fresh = model(*fresh)
        assert models.max_error(expected_fresh, program(*fresh)) <= result_tolerance(expected_fresh)
    program.graph.verify()
    assert program.report.op_coverage >= 0.95, program.report.extern_ops
    assert program.report.node_count == len(program.graph.nodes) > 0


@pytest.mark.parametrize("name", MODELS)
def test_torch_compile_backend_matches_eager(name, compiled_programs):
    model, inputs = models.load(name)
    with torch.no_grad():
        expected = model(*inputs)
        actual = torch.compile(model, backend="ember")(*inputs)
    assert models.max_error(expected, actual) <= result_tolerance(expected)
    assert compiled_programs, "ember compiled nothing: the backend fell back to eager"
    for program in compiled_programs:
        assert program.report.op_coverage >= 0.95, program.report.extern_ops


def test_mixtral_experts_are_one_native_grouped_matmul():
    model, inputs = models.load("mixtral")
    program = ember.compile(model, inputs)
    assert program.report.native_ops.get("grouped_mm", 0) == 2 * model.config.num_hidden_layers  # gate-up and down
    assert "transformers.grouped_mm_fallback.default" not in program.report.extern_ops


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_mlp_matches_eager_within_its_tolerance(dtype):
    model, inputs = models.load("mlp")
    model = model.to(dtype)
    inputs = tuple(t.to(dtype) for t in inputs)
    with torch.no_grad():
        expected = model(*inputs)
        actual = ember.compile(model, inputs)(*inputs)
    assert actual.dtype == dtype
    assert_close(actual, expected)


def test_attention_reaches_the_ir_as_one_op():
    model, inputs = models.load("demo")
    program = ember.compile(model, inputs)
    assert program.report.native_ops["scaled_dot_product_attention"] == 2
    assert not any(node.op in ("bmm", "_softmax") for node in program.graph.nodes)
