"""The broader suite (models.BROADER: convolution networks, MobileNetV3's blocks, a ViT, T5's encoder, Gemma-2, Qwen2, a 64-expert MoE):
named in the CLI, and what is particular to its models (both entry points against eager: tests/frontend/test_models.py)."""
from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import ember
from ember import cli, models
from ember.errors import CompileError
from ember.optimizer import cudnn
from ember.tolerance import result_tolerance


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


def test_tiny_mobilenet_v3_has_its_blocks_and_they_are_generated_kernels(monkeypatch):
    """Hard swish, squeeze-and-excitation gates with a hard sigmoid, 5x5 depthwise convolutions and residuals: with
    the convolution layout passes on (as on CUDA) each activation and gate joins the kernel adding its convolution's
    bias, so none runs as an ATen op of its own."""
    monkeypatch.setattr(cudnn, "LAYOUT_DEVICES", frozenset({"cpu", "cuda"}))
    model, inputs = models.load("mobilenet_v3")
    kinds = {type(module) for module in model.modules()}
    assert {nn.Hardswish, nn.Hardsigmoid, nn.AdaptiveAvgPool2d} <= kinds
    assert any(isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1 and m.kernel_size == (5, 5)
               for m in model.modules())
    assert any(isinstance(m, models.InvertedResidual) and m.residual for m in model.modules())
    with torch.no_grad():
        program = ember.compile(model, inputs, ember.Options(fusion=True))
        expected = model(*inputs)
        assert models.max_error(expected, program(*inputs)) <= result_tolerance(expected)
    steps = [step.node for step in program.executor.steps]
    assert any("hardswish" in step for step in steps) and any("hardsigmoid" in step for step in steps)
    assert all(step.startswith("fused_") for step in steps if "hard" in step)


def test_suite_mobilenet_v3_without_torchvision_is_a_clear_error(monkeypatch):
    real = importlib.import_module

    def without_torchvision(name, *args):
        if name == "torchvision":
            raise RuntimeError("operator torchvision::nms does not exist")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_torchvision)
    with pytest.raises(CompileError, match="needs torchvision"):
        models.load("mobilenet_v3", "suite")
