"""The broader suite (models.BROADER: convolution networks, a ViT, T5's encoder, Gemma-2, Qwen2, a 64-expert MoE)
compiles through ember.compile and torch.compile(backend="ember") and matches eager, at the tiny size on the CPU."""
from __future__ import annotations

import pytest
import torch

import ember
from ember import cli, models
from ember.tolerance import result_tolerance


def _fresh(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randint_like(t, 0, 200) if not t.is_floating_point() else torch.randn_like(t) for t in inputs)


def test_the_broader_suite_is_built_in_and_named_in_the_cli():
    assert set(models.BROADER) <= set(models.BUILTIN) and set(models.BROADER) <= set(cli.BUILTIN_MODELS)
    assert not set(models.BROADER) & set(models.SUITE)


@pytest.mark.parametrize("name", models.BROADER)
def test_ember_compile_matches_eager(name):
    model, inputs = models.load(name)
    fresh = _fresh(inputs)
    with torch.no_grad():
        expected = model(*inputs)
        program = ember.compile(model, inputs)
        assert models.max_error(expected, program(*inputs)) <= result_tolerance(expected)
        expected_fresh = model(*fresh)
        assert models.max_error(expected_fresh, program(*fresh)) <= result_tolerance(expected_fresh)
    program.graph.verify()
    assert program.report.op_coverage >= 0.95, program.report.extern_ops


@pytest.mark.parametrize("name", models.BROADER)
def test_torch_compile_backend_matches_eager(name, compiled_programs):
    model, inputs = models.load(name)
    with torch.no_grad():
        expected = model(*inputs)
        actual = torch.compile(model, backend="ember")(*inputs)
    assert models.max_error(expected, actual) <= result_tolerance(expected)
    assert compiled_programs, "ember compiled nothing: the backend fell back to eager"
    for program in compiled_programs:
        assert program.report.op_coverage >= 0.95, program.report.extern_ops


def test_tiny_gemma2_slides_its_window_over_the_sequence():
    """The tiny config's window is shorter than its inputs, so its sliding layers see a different mask than its
    global ones (at the suite size the 4096-token window covers the whole sequence)."""
    model, (tokens,) = models.load("gemma2")
    assert model.config.sliding_window < tokens.shape[1]
    assert set(model.config.layer_types) == {"sliding_attention", "full_attention"}
    with torch.no_grad():
        windowed = model(tokens).logits
        model.config.sliding_window = tokens.shape[1]
        assert models.max_error(windowed, model(tokens).logits) > 1e-4


def test_moe64_experts_are_native_grouped_matmuls():
    model, inputs = models.load("moe64")
    assert (model.config.num_experts, model.config.num_experts_per_tok) == (64, 8)
    program = ember.compile(model, inputs)
    assert program.report.native_ops.get("grouped_mm", 0) == 2 * model.config.num_hidden_layers  # gate-up and down
