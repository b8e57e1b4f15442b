"""The broader suite (models.BROADER: convolution networks, a ViT, T5's encoder, Gemma-2, Qwen2, a 64-expert MoE):
named in the CLI, and what is particular to its models (both entry points against eager: tests/frontend/test_models.py)."""
from __future__ import annotations

import torch

import ember
from ember import cli, models


def test_the_broader_suite_is_built_in_and_named_in_the_cli():
    assert set(models.BROADER) <= set(models.BUILTIN) and set(models.BROADER) <= set(cli.BUILTIN_MODELS)
    assert not set(models.BROADER) & set(models.SUITE)


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
