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
from ember.ir import Node
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


def tiny_bloom() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """transformers' BLOOM: ALiBi, a per-head linear bias on the scores, added by baddbmm."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BloomConfig(vocab_size=97, hidden_size=32, n_layer=2, n_head=4)
    return transformers.BloomForCausalLM(config).eval(), (torch.randint(0, 97, (2, 9)),)


ATTENTION_VARIANTS = {"alibi": tiny_bloom, "softcap_sliding_window": lambda: models.load("gemma2"),
                      "relative_position_buckets": lambda: models.load("t5_encoder")}


@pytest.mark.parametrize("variant", ATTENTION_VARIANTS)
def test_attention_variants_take_a_fused_path_and_agree_with_eager(variant, compiled_programs):
    """ALiBi (BLOOM) and soft-capping over a sliding window (Gemma-2), written out by the model: the scores are
    biased, capped and masked in the row kernel that takes the softmax, between the two batched matmuls. T5's
    bucketed relative position bias goes to scaled_dot_product_attention as an additive float mask, which torch's
    fused (memory-efficient) kernel takes. Both entry points, against eager."""
    torch.manual_seed(0)
    model, inputs = ATTENTION_VARIANTS[variant]()
    with torch.no_grad():
        expected = model(*inputs)[0]
        program = ember.compile(model, inputs, ember.Options(fusion=True))
        exported = program(*inputs)[0]
        backend = torch.compile(model, backend="ember", options={"fusion": True})(*inputs)[0]
    for actual in (exported, backend):
        assert models.max_error(expected, actual) <= result_tolerance(expected)
    for compiled in (program, compiled_programs[-1]):
        steps = [step.op for step in compiled.executor.work if isinstance(step, Node)]
        if variant == "relative_position_buckets":
            types = compiled.graph.types()
            attention = [node for node in compiled.graph.nodes if node.op == "scaled_dot_product_attention"]
            assert attention and all(len(node.inputs) == 4 and types[node.inputs[3]].dtype.is_floating_point
                                     for node in attention)
        else:
            assert any("softmax" in node.op for node in compiled.graph.nodes)
            assert not [op for op in steps if "softmax" in op], steps
