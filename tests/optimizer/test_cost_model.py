"""The cost model against hand-computed numbers: FLOPs, bytes, bounds, fused groups and matmul efficiency."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import ember
from ember import models
from ember.ir import Graph, Node, TensorType, Value
from ember.optimizer.cost import CostModel, ProfileError, known_profiles, load_profile, save_profile
from ember.optimizer.cost.model import MatmulShape

H100 = load_profile("h100")
ANALYTIC = dataclasses.replace(H100, matmul_efficiency={}, attention_points=())
"""The profile without its measured points: the analytic model alone."""


def _graph(*nodes: Node, inputs: tuple[Value, ...], outputs: tuple[str, ...]) -> Graph:
    graph = Graph(inputs, (), nodes, outputs)
    graph.verify()
    return graph


def _value(name: str, *shape: int, dtype=torch.bfloat16) -> Value:
    return Value(name, TensorType(shape, dtype))


def test_matmul_flops_bytes_and_time_from_hand_formulas():
    m, k, n = 4096, 3072, 768
    x, w = _value("x", m, k), _value("w", k, n)
    graph = _graph(Node("mm", "mm", ("x", "w"), {}, (_value("mm", m, n),)), inputs=(x, w), outputs=("mm",))
    cost = CostModel(H100).node(graph.nodes[0], graph.types())
    assert cost.flops == 2 * m * n * k
    assert cost.bytes_read == 2 * (m * k + k * n) and cost.bytes_written == 2 * m * n
    assert cost.bound == "compute"
    efficiency = CostModel(H100).matmul_efficiency(MatmulShape(1, m, n, k), torch.bfloat16)
    expected_us = 2 * m * n * k / (H100.peak_flops("tensor", torch.bfloat16) * efficiency) * 1e6 + H100.launch_overhead_us
    assert cost.predicted_us == pytest.approx(expected_us)  # long enough to hide the host's dispatch


def test_misaligned_16_bit_matmuls_lose_their_fast_path():
    model = CostModel(H100)
    odd = model.matmul_efficiency(MatmulShape(1, 4096, 50257, 768), torch.bfloat16)
    padded = model.matmul_efficiency(MatmulShape(1, 4096, 50304, 768), torch.bfloat16)
    assert odd == pytest.approx(padded * H100.misaligned_matmul_factor, rel=0.01)
    assert model.matmul_efficiency(MatmulShape(1, 4096, 50257, 768), torch.float32) > odd


def test_attention_flops_are_exact_and_causal_attention_costs_half_the_compute():
    b, h, length, e = 2, 16, 1024, 64
    q, k, v = (_value(name, b, h, length, e) for name in "qkv")
    out = _value("attention", b, h, length, e)
    dense = Node("attention", "scaled_dot_product_attention", ("q", "k", "v"), {"attn_mask": None}, (out,))
    causal = dataclasses.replace(dense, attrs={"attn_mask": None, "is_causal": True})
    types = {value.name: value.type for value in (q, k, v, out)}
    model = CostModel(ANALYTIC)
    assert model.node(dense, types).flops == model.node(causal, types).flops == 4 * b * h * length * length * e
    assert model.node(causal, types).compute_us == pytest.approx(model.node(dense, types).compute_us / 2)


def test_convolution_flops_follow_the_implicit_gemm():
    program = ember.compile(torch.nn.Conv2d(6, 9, 3, stride=2, groups=3), (torch.randn(2, 6, 13, 11),))
    (node,) = program.graph.nodes
    cost = CostModel(H100).node(node, program.graph.types())
    out = node.outputs[0].type
    assert out.shape == (2, 9, 6, 5)
    assert cost.flops == 2 * out.numel * (6 // 3) * 3 * 3 + out.numel


def test_elementwise_is_memory_bound_and_tiny_ops_are_launch_bound():
    big, small = _value("big", 8192, 4096), _value("small", 7)
    graph = _graph(
        Node("exp", "exp", ("big",), {}, (_value("exp", 8192, 4096),)),
        Node("neg", "neg", ("small",), {}, (_value("neg", 7),)),
        inputs=(big, small), outputs=("exp", "neg"),
    )
    costs = CostModel(H100).nodes(graph)
    assert costs["exp"].bound == "memory"
    assert costs["exp"].memory_us == pytest.approx(2 * 2 * 8192 * 4096 / (H100.memory_bandwidth_gbps * 1e3))
    assert costs["neg"].bound == "overhead" and costs["neg"].predicted_us == H100.dispatch("pointwise")


def test_views_launch_nothing_and_cost_only_their_dispatch():
    model, inputs = models.load("gpt2")
    graph = ember.compile(model, inputs).graph
    costs = CostModel(H100).nodes(graph)
    views = [node.name for node in graph.nodes if node.definition.kind == "view"]
    assert views
    for name in views:
        cost = costs[name]
        assert (cost.kernels, cost.bytes_moved, cost.bound) == (0, 0, "none")
        assert cost.predicted_us == H100.dispatch("view")


def test_on_a_synchronous_device_the_program_is_the_sum_of_its_nodes():
    model, inputs = models.load("gpt2")
    graph = ember.compile(model, inputs).graph
    cpu = CostModel(load_profile("cpu"))
    costs = cpu.nodes(graph)
    total = cpu.program(graph)
    assert total.predicted_us == pytest.approx(sum(cost.predicted_us for cost in costs.values()))
    assert total.flops == sum(cost.flops for cost in costs.values())


def test_on_a_gpu_long_kernels_hide_the_dispatch_of_the_ops_after_them():
    """Host issues at 9 µs per op; the device runs a 1 ms matmul, then four tiny adds queued behind it."""
    x, w = _value("x", 8192, 8192), _value("w", 8192, 8192)
    small = _value("s", 16)
    nodes = [Node("mm", "mm", ("x", "w"), {}, (_value("mm", 8192, 8192),))]
    previous = "s"
    for i in range(4):
        nodes.append(Node(f"add{i}", "add.Tensor", (previous, "s"), {}, (_value(f"add{i}", 16),)))
        previous = f"add{i}"
    graph = _graph(*nodes, inputs=(x, w, small), outputs=("mm", previous))
    model = CostModel(H100)
    costs = model.nodes(graph)
    overlapped = model.program(graph).predicted_us
    mm = costs["mm"]
    tiny_kernel = costs["add0"].kernel_us
    expected = H100.dispatch("matmul") + mm.kernel_us + 4 * tiny_kernel
    assert overlapped == pytest.approx(expected)
    assert overlapped < sum(cost.predicted_us for cost in costs.values())


def test_a_fused_group_moves_only_the_bytes_that_cross_its_boundary():
    x, y = _value("x", 1024, 1023), _value("y", 1024, 1023)
    graph = _graph(
        Node("exp", "exp", ("x",), {}, (_value("exp", 1024, 1023),)),
        Node("mul", "mul.Tensor", ("exp", "y"), {}, (_value("mul", 1024, 1023),)),
        Node("tanh", "tanh", ("mul",), {}, (_value("tanh", 1024, 1023),)),
        inputs=(x, y), outputs=("tanh",),
    )
    model = CostModel(H100)
    one_tensor = 1024 * 1023 * 2
    fused = model.group(graph.nodes, graph)
    assert (fused.bytes_read, fused.bytes_written, fused.kernels) == (2 * one_tensor, one_tensor, 1)
    assert fused.memory_us == pytest.approx(3 * one_tensor / (H100.l2_bandwidth_gbps * 1e3))
    unfused = model.program(graph)
    assert unfused.bytes_moved == 7 * one_tensor and unfused.kernels == 3
    assert fused.flops == unfused.flops and fused.predicted_us < unfused.predicted_us
    single = model.group(graph.nodes[:1], graph)
    assert single.bytes_moved == model.node(graph.nodes[0], graph.types()).bytes_moved


def test_small_and_skinny_matmuls_reach_less_of_peak():
    model = CostModel(ANALYTIC)
    square = model.matmul_efficiency(MatmulShape(1, 8192, 8192, 8192), torch.bfloat16)
    skinny = model.matmul_efficiency(MatmulShape(1, 16, 8192, 8192), torch.bfloat16)
    short_k = model.matmul_efficiency(MatmulShape(1, 8192, 8192, 64), torch.bfloat16)
    one_wave_short = model.matmul_efficiency(MatmulShape(1, 128 * 12, 128 * 12, 4096), torch.bfloat16)
    assert square > one_wave_short > skinny and square > short_k
    assert 0 < skinny < 0.1 and square <= H100.matmul_base_efficiency


def test_calibration_points_pull_the_efficiency_to_what_was_measured():
    measured = dataclasses.replace(H100, matmul_efficiency={"bf16": ((16, 4096, 4096, 0.02), (8192, 8192, 8192, 0.9))})
    model, analytic = CostModel(measured), CostModel(ANALYTIC)
    at_point = model.matmul_efficiency(MatmulShape(1, 16, 4096, 4096), torch.bfloat16)
    assert at_point == pytest.approx(0.02, rel=0.05)
    assert analytic.matmul_efficiency(MatmulShape(1, 16, 4096, 4096), torch.bfloat16) != pytest.approx(0.02, rel=0.05)


def test_extern_nodes_are_priced_by_the_bytes_they_move():
    class Erfinv(torch.nn.Module):
        def forward(self, x):
            return torch.erfinv(x)

    report = ember.inspect(Erfinv(), (torch.rand(512, 513),), device="h100")
    (row,) = report.rows
    assert row.extern and row.op == "aten.erfinv.default"
    memory_us = 2 * 512 * 513 * 4 / (H100.l2_bandwidth_gbps * 1e3)
    assert row.bytes == 2 * 512 * 513 * 4
    assert row.predicted_us == pytest.approx(max(memory_us + H100.launch_overhead_us, H100.dispatch("extern")))


def test_every_shipped_profile_loads():
    for name in ("h100", "h200", "a100", "cpu"):
        assert name in known_profiles()
        profile = load_profile(name)
        assert profile.name == name and profile.peak_flops("cuda", torch.float32) > 0


def test_unknown_device_lists_the_known_ones():
    with pytest.raises(ProfileError, match=r"unknown device 'b200'; known: a100, cpu, h100, h200"):
        load_profile("b200")


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not a readable JSON profile"),
        ("[1, 2]", "expected a JSON object"),
        ('{"name": "x"}', "is not a device profile"),
        ('{"name": "x", "peak_tflops": {"cuda": {"fp32": 1}}, "memory_bandwidth_gbps": -5, "l2_bandwidth_gbps": 1,'
         ' "l2_bytes": 1, "sm_count": 1, "launch_overhead_us": 1}', "memory_bandwidth_gbps must be a positive number"),
    ],
)
def test_a_corrupt_profile_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "broken.json"
    path.write_text(content)
    with pytest.raises(ProfileError, match=message):
        load_profile(path)
    with pytest.raises(ProfileError, match="no profile file"):
        load_profile(tmp_path / "missing.json")


def test_a_saved_profile_is_found_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path))
    path = save_profile(dataclasses.replace(H100, name="my-gpu", launch_overhead_us=3.5))
    assert path == tmp_path / "profiles" / "my-gpu.json"
    assert load_profile("my-gpu").launch_overhead_us == 3.5
    assert math.isclose(load_profile(path).memory_bandwidth_gbps, H100.memory_bandwidth_gbps)


def test_attention_efficiency_comes_from_the_measured_point_of_its_variant():
    measured = dataclasses.replace(H100, attention_points=(("mask", 512, 64, 0.1), ("plain", 512, 64, 0.6)))
    model = CostModel(measured)
    q = TensorType((4, 16, 512, 64), torch.bfloat16)
    mask = TensorType((4, 1, 512, 512), torch.bool)
    node = Node("a", "scaled_dot_product_attention", ("q", "k", "v"), {}, (Value("a", q),))
    masked = dataclasses.replace(node, inputs=("q", "k", "v", "m"))
    assert model.attention_efficiency(node, [q, q, q]) == pytest.approx(0.6)
    assert model.attention_efficiency(masked, [q, q, q, mask]) == pytest.approx(0.1)
    assert model.attention_efficiency(dataclasses.replace(node, attrs={"is_causal": True}), [q, q, q]) == measured.attention_efficiency


def test_no_kernel_is_shorter_than_its_kinds_floor():
    floored = dataclasses.replace(ANALYTIC, kernel_floor_us={"default": 2.0, "reduction": 5.0})
    tiny, big = _value("tiny", 7), _value("big", 8192, 4096)
    graph = _graph(
        Node("neg", "neg", ("tiny",), {}, (_value("neg", 7),)),
        Node("total", "sum", ("tiny",), {}, (_value("total"),)),
        Node("exp", "exp", ("big",), {}, (_value("exp", 8192, 4096),)),
        inputs=(tiny, big), outputs=("neg", "total", "exp"),
    )
    costs = CostModel(floored).nodes(graph)
    assert costs["neg"].kernel_us == 2.0 and costs["total"].kernel_us == 5.0
    assert costs["exp"].kernel_us == pytest.approx(costs["exp"].memory_us + floored.launch_overhead_us)


def _convolution(name: str, batch: int, channels: int, out_channels: int, side: int, kernel: int, groups: int):
    """A bf16 2-D convolution node (same padding) and its input types."""
    x = TensorType((batch, channels, side, side), torch.bfloat16)
    weight = TensorType((out_channels, channels // groups, kernel, kernel), torch.bfloat16)
    out = TensorType((batch, out_channels, side, side), torch.bfloat16)
    attrs = {"stride": [1, 1], "padding": [kernel // 2] * 2, "dilation": [1, 1], "transposed": False,
             "output_padding": [0, 0], "groups": groups, "bias": None}
    return Node(name, "convolution", ("x", "w"), attrs, (Value(name, out),)), [x, weight]


def test_convolution_efficiency_comes_from_the_measured_points_of_its_class():
    """A depthwise convolution is a stencil, not a GEMM: its measured point, not the matmul points, prices it (as
    a GEMM of one output channel per group the analytic model gives it the least efficiency there is); a
    convolution of exactly a measured shape gets that point's efficiency; a class with no point falls back to
    the matmul points' correction of its implicit GEMM."""
    depthwise, depthwise_inputs = _convolution("d", 32, 512, 512, 28, 3, 512)
    dense, dense_inputs = _convolution("c", 32, 128, 128, 28, 3, 1)
    measured = dataclasses.replace(H100, convolution_points=(
        ("depthwise", 512, 32 * 28 * 28, 1, 9, 0.015), ("dense", 1, 32 * 28 * 28, 128, 1152, 0.55)))
    model, plain = CostModel(measured), CostModel(H100)
    for node, inputs, expected in ((depthwise, depthwise_inputs, 0.015), (dense, dense_inputs, 0.55)):
        shape = MatmulShape(*node.definition.gemm(inputs, [node.outputs[0].type], node.attrs))
        assert model.convolution_efficiency(node, inputs, shape, torch.bfloat16) == pytest.approx(expected)
        assert plain.convolution_efficiency(node, inputs, shape, torch.bfloat16) == \
            plain.matmul_efficiency(shape, torch.bfloat16)
    types = {"x": depthwise_inputs[0], "w": depthwise_inputs[1]}
    cost = model.node(depthwise, types)
    assert cost.compute_us == pytest.approx(cost.flops / (H100.peak_flops("tensor", torch.bfloat16) * 0.015) * 1e6)
    assert plain.node(depthwise, types).compute_us > 10 * cost.compute_us
    pointwise, pointwise_inputs = _convolution("p", 32, 512, 128, 28, 1, 1)
    shape = MatmulShape(*pointwise.definition.gemm(pointwise_inputs, [pointwise.outputs[0].type], pointwise.attrs))
    assert model.convolution_efficiency(pointwise, pointwise_inputs, shape, torch.bfloat16) == \
        model.matmul_efficiency(shape, torch.bfloat16)


def test_convolution_points_survive_a_profile_round_trip(tmp_path):
    from ember.optimizer.cost.profile import save_profile

    measured = dataclasses.replace(H100, name="conv-test", convolution_points=(("pointwise", 1, 100352, 64, 256, 0.4),))
    assert load_profile(save_profile(measured, tmp_path / "p.json")).convolution_points == measured.convolution_points
