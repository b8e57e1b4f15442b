"""Folding inference batch norm into the convolution before it: the batch norm node is gone, the model agrees with
eager through both entry points, and nothing that cannot fold does (training, no convolution, a result read twice)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import ember
from ember import models
from ember.frontend import from_module
from ember.optimizer import cudnn
from ember.optimizer.fold_batch_norm import fold_batch_norm
from ember.tolerance import result_tolerance


def batch_norms(graph) -> list[str]:
    """The graph's batch norm nodes, in any form (the inference op or an extern of ATen's)."""
    return [node.name for node in graph.nodes if "batch_norm" in node.op or "batch_norm" in (node.target or "")]


def with_statistics(model: nn.Module) -> nn.Module:
    """`model` in eval mode with random running statistics, batch norm weights and biases (the defaults, mean 0 and
    variance 1, would make a wrong fold agree), and a non-default eps."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eps = 1e-3
            module.running_mean.uniform_(-1.0, 1.0)
            module.running_var.uniform_(0.25, 4.0)
            if module.affine:
                with torch.no_grad():
                    module.weight.uniform_(-2.0, 2.0)
                    module.bias.uniform_(-1.0, 1.0)
        if isinstance(module, nn.modules.conv._ConvNd) and module.bias is not None:
            with torch.no_grad():
                module.bias.uniform_(-1.0, 1.0)
    return model.eval()


def assert_agrees(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    error = (actual.double() - expected.double()).abs().max().item()
    assert error <= result_tolerance(expected), f"max error {error}, allowed {result_tolerance(expected)}"


CASES = {
    "conv2d_odd_channels_no_bias": (lambda: nn.Sequential(nn.Conv2d(3, 7, 3, padding=1, bias=False), nn.BatchNorm2d(7),
                                                          nn.ReLU()), (2, 3, 9, 11)),
    "conv2d_bias_stride_dilation": (lambda: nn.Sequential(nn.Conv2d(5, 9, 3, stride=2, padding=2, dilation=2),
                                                          nn.BatchNorm2d(9)), (2, 5, 13, 10)),
    "grouped": (lambda: nn.Sequential(nn.Conv2d(6, 9, 3, groups=3), nn.BatchNorm2d(9), nn.ReLU()), (1, 6, 7, 7)),
    "depthwise_multiplier_2": (lambda: nn.Sequential(nn.Conv2d(5, 10, 3, padding=1, groups=5, bias=False),
                                                     nn.BatchNorm2d(10), nn.ReLU6()), (2, 5, 8, 9)),
    "conv1d_affine_false": (lambda: nn.Sequential(nn.Conv1d(3, 11, 5, stride=2, padding=2),
                                                  nn.BatchNorm1d(11, affine=False), nn.ReLU()), (3, 3, 17)),
    "channels_last_weight": (lambda: nn.Sequential(nn.Conv2d(5, 7, 3, padding=1), nn.BatchNorm2d(7))
                             .to(memory_format=torch.channels_last), (2, 5, 6, 9)),
    "transposed_grouped": (lambda: nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, output_padding=1, groups=2),
                                                 nn.BatchNorm2d(6)), (2, 4, 5, 6)),
}


WIDE = [(case, torch.float32) for case in CASES] + [
    (case, dtype) for case in ("conv2d_odd_channels_no_bias", "transposed_grouped")
    for dtype in (torch.float64, torch.bfloat16)]
"""Every case in float32; two in float64 and bfloat16 (the fold is computed in float32, or float64, and cast back)."""


@pytest.mark.parametrize("case, dtype", WIDE, ids=lambda value: str(value).removeprefix("torch."))
def test_batch_norm_folds_into_the_convolution_and_agrees_with_eager(case, dtype, compiled_programs):
    build, shape = CASES[case]
    model = with_statistics(build()).to(dtype)
    x = torch.randn(shape, dtype=dtype)
    with torch.no_grad():
        expected = model(x)
        program = ember.compile(model, (x,))
        assert not batch_norms(program.graph), program.graph
        assert any("folded into convolution" in line for line in program.report.pass_decisions["fold_batch_norm"])
        assert_agrees(program(x), expected)
        compiled = torch.compile(model, backend="ember")
        assert_agrees(compiled(x), expected)
    assert len(compiled_programs) == 2 and not batch_norms(compiled_programs[1].graph), compiled_programs[1].graph


@pytest.mark.parametrize("name", ["cnn", "unet"])
def test_the_built_in_convolution_networks_lose_every_batch_norm(name):
    model, inputs = models.load(name)
    with_statistics(model)
    with torch.no_grad():
        program = ember.compile(model, inputs)
        assert not batch_norms(program.graph)
        assert_agrees(program(*inputs), model(*inputs))


def test_the_folded_weights_are_derived_from_every_source_and_the_originals_leave_the_graph():
    model = with_statistics(nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5)))
    graph = fold_batch_norm(from_module(model, (torch.randn(1, 3, 6, 6),)).graph)
    assert [node.op for node in graph.nodes] == ["convolution"]
    conv, norm = model
    sources = {id(t) for t in (conv.weight, conv.bias, norm.weight, norm.bias, norm.running_mean, norm.running_var)}
    assert set(graph.weights) == set(graph.derived) and len(graph.weights) == 2
    assert all({id(t) for t in graph.derived[name]} == sources for name in graph.weights)
    assert not any(t.requires_grad for t in graph.weights.values())


def test_an_in_place_update_of_a_statistic_is_refused_or_recompiled():
    model = with_statistics(nn.Sequential(nn.Conv2d(3, 5, 3, bias=False), nn.BatchNorm2d(5)))
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        program = ember.compile(model, (x,))
        compiled = torch.compile(model, backend="ember")
        assert_agrees(compiled(x), model(x))
        model[1].running_mean.add_(0.5)
        with pytest.raises(ember.InputError, match="updated in place after compiling"):
            program(x)
        assert_agrees(compiled(x), model(x))


class ReadTwice(nn.Module):
    """The convolution's result is read by the batch norm and by the residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.norm(y) + y


KEPT = {
    "input_not_a_convolution": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)),
                                "not a convolution"),
    "convolution_result_read_twice": (ReadTwice, "other reader"),
}


@pytest.mark.parametrize("case", KEPT)
def test_a_batch_norm_that_cannot_fold_stays_and_agrees(case, compiled_programs):
    build, reason = KEPT[case]
    model = with_statistics(build())
    x = torch.randn(2, model.conv.in_channels if isinstance(model, ReadTwice) else 3, 6, 7)
    with torch.no_grad():
        expected = model(x)
        program = ember.compile(model, (x,))
        assert_agrees(program(x), expected)
        assert_agrees(torch.compile(model, backend="ember")(x), expected)
    (decision,) = program.report.pass_decisions["fold_batch_norm"]
    assert "kept" in decision and reason in decision, decision
    assert all(len(batch_norms(p.graph)) == 1 for p in compiled_programs), [str(p.graph) for p in compiled_programs]


def test_a_training_batch_norm_stays_and_updates_its_statistics_as_eager_does():
    model = with_statistics(nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU())).train()
    reference = with_statistics(nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU())).train()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 7, 6)
    with torch.no_grad():
        program = ember.compile(model, (x,))
        model.load_state_dict(reference.state_dict())  # compiling ran the model once
        assert batch_norms(program.graph)
        assert any("training" in line for line in program.report.pass_decisions["fold_batch_norm"])
        assert_agrees(program(x), reference(x))
        assert_agrees(model[1].running_mean, reference[1].running_mean)


def test_float32_cuda_weights_under_tf32_are_not_folded(monkeypatch):
    """cuDNN runs float32 convolutions in TF32 by default: a folded weight rounds differently from eager's (1.7e-3
    on MobileNetV2 on an H200), so such a batch norm is kept unless TF32 is off."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert cudnn.rounds_to_tf32(torch.float32, cuda)
    assert not cudnn.rounds_to_tf32(torch.bfloat16, cuda) and not cudnn.rounds_to_tf32(torch.float32, torch.device("cpu"))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert not cudnn.rounds_to_tf32(torch.float32, cuda)


class Bottleneck(nn.Module):
    """A 1x1 convolution (its weight already channels-last), a depthwise 3x3 (likewise) and a dense 3x3, each with a
    batch norm, odd channel counts, a residual add."""

    def __init__(self):
        super().__init__()
        self.reduce, self.reduce_norm = nn.Conv2d(5, 7, 1, bias=False), nn.BatchNorm2d(7)
        self.depthwise, self.depthwise_norm = nn.Conv2d(7, 7, 3, padding=1, groups=7), nn.BatchNorm2d(7)
        self.dense, self.dense_norm = nn.Conv2d(7, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5)

    def forward(self, x):
        y = torch.relu(self.reduce_norm(self.reduce(x)))
        y = nn.functional.relu6(self.depthwise_norm(self.depthwise(y)))
        return torch.relu(self.dense_norm(self.dense(y)) + x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_on_cudnn_devices_a_channels_last_weight_keeps_its_memory_and_the_norm_joins_the_epilogue(monkeypatch, dtype):
    """Where the weight is already channels-last (1x1, depthwise) the batch norm becomes a scale and shift after the
    convolution, which fusion joins to the activation, so no copy of the weight is held; a dense 3x3's folds."""
    monkeypatch.setattr(cudnn, "LAYOUT_DEVICES", frozenset({"cpu", "cuda"}))
    model = with_statistics(Bottleneck()).to(dtype)
    x = torch.randn(2, 5, 9, 7, dtype=dtype)
    graph = fold_batch_norm(from_module(model, (x,)).graph)
    assert not batch_norms(graph)
    made = sorted(tuple(graph.weights[name].shape) for name in graph.derived)
    assert made == [(5,), (5, 7, 3, 3), (7,), (7,), (7,), (7,)], made
    held = {id(tensor) for tensor in graph.weights.values()}
    assert id(model.reduce.weight) in held and id(model.depthwise.weight) in held
    assert [node.op for node in graph.nodes].count("mul.Tensor") == 2
    assert {id(t) for t in graph.derived["convolution_1_norm_shift_folded"]} == {
        id(t) for t in (model.depthwise.bias, model.depthwise_norm.weight, model.depthwise_norm.bias,
                        model.depthwise_norm.running_mean, model.depthwise_norm.running_var)}
    with torch.no_grad():
        program = ember.compile(model, (x,))
        decisions = program.report.pass_decisions["fold_batch_norm"]
        assert sum("scale and shift" in line for line in decisions) == 2, decisions
        assert sum("folded into convolution" in line for line in decisions) == 1, decisions
        assert not any(node.is_extern for node in program.graph.nodes), program.graph
        assert_agrees(program(x), model(x))


def test_under_tf32_every_batch_norm_becomes_an_epilogue(monkeypatch):
    """A float32 convolution that cuDNN runs in TF32 keeps its weight (folding would round it differently from
    eager's), and its batch norm still leaves ATen for the epilogue."""
    from ember.optimizer import fold_batch_norm as module

    monkeypatch.setattr(cudnn, "LAYOUT_DEVICES", frozenset({"cpu", "cuda"}))
    monkeypatch.setattr(module.cudnn, "rounds_to_tf32", lambda dtype, device: dtype == torch.float32)
    model = with_statistics(Bottleneck())
    x = torch.randn(1, 5, 6, 6)
    graph = fold_batch_norm(from_module(model, (x,)).graph)
    assert not batch_norms(graph) and [node.op for node in graph.nodes].count("mul.Tensor") == 3
    assert id(model.dense.weight) in {id(tensor) for tensor in graph.weights.values()}
