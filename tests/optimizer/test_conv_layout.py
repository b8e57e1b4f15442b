"""Convolution layout: biases move into the epilogue and activations stay channels-last where that moves fewer
bytes, results agree with eager in each dtype, values that must keep their traced strides are copied back, and
graphs that cannot take the layout keep theirs.

The passes rewrite cuDNN's convolutions; the tests let them rewrite the CPU's too (ATen's CPU convolution takes
channels-last weights the same way), and run the generated kernels in Triton's interpreter."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import ember
from ember import models
from ember.codegen.source import memory_order
from ember.frontend import from_module
from ember.ir import TensorType
from ember.ir.verify import verify
from ember.optimizer import conv_layout, cudnn
from ember.optimizer.conv_layout import convolutions_channels_last, split_convolution_bias
from ember.optimizer.decisions import recording
from ember.tolerance import result_tolerance

CNNS = ["cnn", "unet", "resnet50", "convnext_t", "mobilenet_v2", "mobilenet_v3"]


@pytest.fixture(autouse=True)
def on_the_cpu(monkeypatch):
    monkeypatch.setattr(cudnn, "LAYOUT_DEVICES", frozenset({"cpu", "cuda"}))


def convolutions(graph) -> list:
    return [node for node in graph.nodes if node.op == conv_layout.CONVOLUTION]


def channels_last(value_type: TensorType) -> bool:
    n, c, h, w = value_type.shape
    return value_type.layout == (h * w * c, 1, w * c, c)


class Stages(nn.Module):
    """Odd sizes: a convolution with a bias, an activation and a residual add, a grouped convolution, a
    squeeze-and-excitation gate and a flatten that needs row-major strides."""

    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(3, 6, 3, padding=1)
        self.second = nn.Conv2d(6, 6, 3, padding=1, groups=3)
        self.squeeze, self.excite = nn.Conv2d(6, 2, 1), nn.Conv2d(2, 6, 1)
        self.last = nn.Conv2d(6, 5, 3, stride=2)

    def forward(self, x):
        y = torch.relu(self.first(x))
        y = nn.functional.gelu(self.second(y)) + y
        gate = torch.sigmoid(self.excite(torch.relu(self.squeeze(y.mean((2, 3), keepdim=True)))))
        return self.last(y * gate).view(x.shape[0], -1)


def bias_added_after(model: nn.Module) -> nn.Module:
    """`model` rounding as cuDNN's path does: ATen's CUDA convolution rounds its result to the dtype and adds the bias
    in a kernel of its own (the CPU's adds it inside, before rounding), so each convolution here does that."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.bias is not None:
            bias, module.bias = module.bias, None
            module.register_forward_hook(lambda _, __, out, bias=bias: out + bias.view(-1, 1, 1))
    return model


def test_a_bias_becomes_an_add_after_the_convolution():
    model, x = Stages().eval(), torch.randn(2, 3, 9, 11)
    graph = split_convolution_bias(from_module(model, (x,)).graph)
    verify(graph)
    assert all(len(node.inputs) == 2 and node.attrs["bias"] is None for node in convolutions(graph))
    adds = [node for node in graph.nodes if node.name.endswith("_bias")]
    assert len(adds) == len(convolutions(graph)) == 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fusion", [True, False], ids=["generated kernels", "aten"])
def test_activations_stay_channels_last_and_agree_with_eager(dtype, fusion):
    """In the float dtypes whose CPU rounding matches CUDA's; bf16 and fp16 are checked on the GPU (bench/gpu_check.py),
    where eager rounds as the rewritten graph does."""
    model, x = Stages().eval().to(dtype), torch.randn(2, 3, 9, 11, dtype=dtype)
    with torch.no_grad():
        program = ember.compile(model, (x,), ember.Options(fusion=fusion))
        actual = program(x)
        expected = bias_added_after(model)(x)
    assert actual.shape == expected.shape and actual.stride() == expected.stride() and actual.dtype == dtype
    assert models.max_error(expected, actual) <= result_tolerance(expected)
    convs = convolutions(program.graph)
    assert len(convs) == 5 and all(channels_last(node.outputs[0].type) for node in convs)
    assert all(program.graph.weights[node.inputs[1]].is_contiguous(memory_format=torch.channels_last) for node in convs)
    restored = [node for node in program.graph.nodes if node.name.endswith("_traced_layout")]
    assert len(restored) == 1  # before the flatten, which needs row-major strides
    assert any("channels-last" in decision for decision in program.report.pass_decisions["convolutions_channels_last"])


@pytest.mark.parametrize("name", CNNS)
def test_the_convolution_networks_agree_with_eager_channels_last(name):
    model, inputs = models.load(name)
    with torch.no_grad():
        expected = model(*inputs)
        program = ember.compile(model, inputs, ember.Options(fusion=True))
        actual = program(*inputs)
        again = program(*inputs)
    assert models.max_error(expected, actual) <= result_tolerance(expected)
    assert models.max_error(actual, again) == 0
    assert all(channels_last(node.outputs[0].type) for node in convolutions(program.graph))


def test_a_lone_convolution_whose_result_is_returned_keeps_its_layout():
    """Converting its input on entry and its result back on exit moves as many bytes as cuDNN's transposes."""
    model, x = nn.Conv2d(3, 8, 3).eval(), torch.randn(2, 3, 9, 9)
    graph = split_convolution_bias(from_module(model, (x,)).graph)
    with recording() as decisions:
        kept = convolutions_channels_last(graph)
    assert kept is graph
    assert any("kept in the traced layout" in decision for decision in decisions)


def test_a_graph_that_writes_memory_in_place_keeps_its_layout():
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls.add_(1)
            return self.second(torch.relu(self.first(x))).sum()

    graph = from_module(Counting().eval(), (torch.randn(1, 3, 9, 9),)).graph
    with recording() as decisions:
        assert convolutions_channels_last(graph) is graph
    assert any("in place" in decision for decision in decisions)


def test_generated_kernels_walk_a_value_in_memory_order():
    assert memory_order(TensorType((2, 3, 5, 7), torch.float32)) == (0, 1, 2, 3)
    assert memory_order(TensorType((2, 3, 5, 7), torch.float32, (105, 1, 21, 3))) == (0, 2, 3, 1)
    assert memory_order(TensorType((2, 3, 1, 1), torch.float32, (3, 1, 3, 3))) == (0, 2, 3, 1)
    model, x = Stages().eval(), torch.randn(2, 3, 9, 11)
    program = ember.compile(model, (x,), ember.Options(fusion=True))
    types = program.graph.types()
    kernels = [item.kernel.source for item in program.executor.work if hasattr(item, "kernel")]
    walked = [kernel for kernel in kernels if kernel.name.startswith("fused_") and "index //" in kernel.source
              and channels_last(types[kernel.outputs[0]])]
    assert walked  # the activations after the convolutions: the channel coordinate moves fastest, not the width's
    assert all("c1 = (index // 1) %" in kernel.source for kernel in walked)


def test_a_bias_read_through_a_permute_joins_the_layer_norm_after_it():
    """ConvNeXt's block: a depthwise convolution, a permute to channels-last and a layer norm over channels. The
    permute moves before the bias add, which then shares the layer norm's rows: one row kernel for both."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.filter, self.norm = nn.Conv2d(6, 6, 7, padding=3, groups=6), nn.LayerNorm(6)

        def forward(self, x):
            return self.norm(self.filter(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2) + x

    model, x = Block().eval(), torch.randn(2, 6, 9, 11)
    graph = conv_layout.hoist_permutes(split_convolution_bias(from_module(model, (x,)).graph))
    verify(graph)
    (conv,) = convolutions(graph)
    (permute,) = [node for node in graph.nodes if conv.outputs[0].name in node.inputs]
    assert permute.op == conv_layout.PERMUTE and [n.op for n in graph.nodes].index("add.Tensor") > graph.nodes.index(permute)
    with torch.no_grad():
        program = ember.compile(model, (x,), ember.Options(fusion=True))
        assert models.max_error(model(x), program(x)) <= result_tolerance(model(x))
    assert any(step.node.startswith("fused_add_native_layer_norm") for step in program.executor.steps)


class Downsample(nn.Module):
    """ConvNeXt's block end and downsampling: a layer-scaled branch permuted back and added to the residual, then a
    channels-first layer norm (permute, layer norm over channels, permute back) before a strided convolution."""

    def __init__(self):
        super().__init__()
        self.stem, self.mix = nn.Conv2d(3, 6, 3, padding=1), nn.Linear(6, 6)
        self.scale = nn.Parameter(torch.rand(6) + 0.5)
        self.norm, self.down = nn.LayerNorm(6), nn.Conv2d(6, 4, 2, stride=2)

    def forward(self, x):
        x = self.stem(x)
        branch = (self.scale * self.mix(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        y = x + branch
        return self.down(self.norm(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


def test_a_permute_before_a_layer_norm_moves_before_the_ops_it_reads_and_they_join_its_kernel():
    model, x = Downsample().eval(), torch.randn(2, 3, 8, 10)
    with torch.no_grad():
        program = ember.compile(model, (x,), ember.Options(fusion=True))
        assert models.max_error(model(x), program(x)) <= result_tolerance(model(x))
    steps = [step.node for step in program.executor.steps]
    assert any(step.startswith("fused_add_mul_native_layer_norm") for step in steps)
    assert "native_layer_norm" not in steps  # no layer norm left to ATen
    assert any("permute" in decision for decision in program.report.pass_decisions["hoist_permutes"])


def test_a_permute_that_leads_to_no_row_kernel_stays_where_it_is():
    class Back(nn.Module):
        def forward(self, x):
            return torch.relu(x * 2.0).permute(0, 3, 1, 2) + 1.0

    graph = from_module(Back(), (torch.randn(2, 5, 7, 3),)).graph
    assert conv_layout.hoist_permutes(graph) is graph
