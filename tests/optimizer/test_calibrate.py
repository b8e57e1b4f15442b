"""`ember calibrate` measures the device at hand; on the CPU here, the quick sizes.

Each figure is checked against an independent measurement made here with time.perf_counter. Other work
on the machine only slows a call down, so both sides take the fastest call, with all threads and with
one (a busy neighbour can stall every multi-threaded call for a scheduler slice): the assertions hold on
a loaded machine as on a quiet one.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch

import ember.optimizer.cost.calibrate as calibrate_module
from ember.frontend import from_module
from ember.ir import Graph
from ember.optimizer.cost import CostModel, DeviceProfile, load_profile, save_profile
from ember.optimizer.cost.calibrate import calibrate, time_us
from ember.optimizer.cost.model import MatmulShape

Linear = tuple[torch.nn.Linear, torch.Tensor, Graph]
FACTOR = 4.0
"""How far a calibrated figure may sit from the independent measurement, either way."""


@pytest.fixture(scope="module")
def calibrated() -> tuple[DeviceProfile, list[tuple[str, float, float]]]:
    """The quick CPU profile, and (description, total, advanced) of every progress task it reported."""
    tasks = []

    @contextmanager
    def recording_task(description: str, total: float | None = None) -> Iterator[Callable[..., None]]:
        advances = []
        yield lambda advance=0, description=None: advances.append(advance)
        tasks.append((description, total, sum(advances)))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(calibrate_module, "task", recording_task)
        profile = calibrate("cpu", quick=True, name="test-cpu")
    return profile, tasks


def _fastest_us(fn: Callable[[], object], seconds: float = 0.3) -> float:
    """The fastest single call over `seconds` with the default threads, then as long with one."""
    before = torch.get_num_threads()
    fastest_s = math.inf
    try:
        for threads in (before, 1):
            torch.set_num_threads(threads)
            fn()
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                fn()
                fastest_s = min(fastest_s, time.perf_counter() - started)
    finally:
        torch.set_num_threads(before)
    return fastest_s * 1e6


@pytest.fixture(scope="module")
def linear() -> Linear:
    """nn.Linear(256, 256) on a 64×256 input, and its captured graph (one `linear` node)."""
    torch.manual_seed(0)
    module, x = torch.nn.Linear(256, 256), torch.randn(64, 256)
    return module, x, from_module(module, (x,)).graph


def _predicted_vs_measured_us(profile: DeviceProfile, linear: Linear) -> tuple[float, float]:
    """The cost model's time for the linear, and its fastest measured call."""
    module, x, graph = linear
    (node,) = graph.nodes
    with torch.no_grad():
        measured_us = _fastest_us(lambda: module(x))
    return CostModel(profile).node(node, graph.types()).predicted_us, measured_us


def test_calibrated_cpu_profile_is_complete_and_usable(calibrated, tmp_path):
    profile, _ = calibrated
    assert profile.source == "calibrated" and profile.name == "test-cpu"
    assert set(profile.peak_tflops["cuda"]) == {"fp32", "fp64", "bf16", "fp16"}
    assert profile.memory_bandwidth_gbps > 0.1 and profile.l2_bandwidth_gbps >= profile.memory_bandwidth_gbps
    assert not profile.asynchronous and profile.launch_overhead_us == 0  # on the CPU the op is the dispatch
    assert set(profile.dispatch_us) >= {"default", "pointwise", "view", "matmul", "attention"}
    assert {point[0] for point in profile.attention_points} == {"plain", "causal", "mask"}
    assert sorted(point[0] for point in profile.convolution_points) == ["dense"] * 2 + ["depthwise"] * 2 + ["pointwise"] * 2
    assert len(profile.matmul_efficiency["fp32"]) == 12
    reloaded = load_profile(save_profile(profile, tmp_path / "cpu.json"))
    assert reloaded == profile
    assert CostModel(reloaded).matmul_efficiency(MatmulShape(1, 128, 128, 128), torch.float32) > 0


def test_calibrated_fp32_peak_matches_an_independently_timed_matmul(calibrated):
    profile, _ = calibrated
    rates = {}
    for size in (256, 512, 1024):  # the smaller ones fit between a busy neighbour's time slices
        a, b = torch.randn(size, size), torch.randn(size, size)
        rates[size] = 2 * size**3 / (_fastest_us(lambda: a @ b, seconds=0.4) / 1e6)
    ratio = profile.peak_flops("cuda", torch.float32) / max(rates.values())
    assert 1 / FACTOR < ratio < FACTOR, f"calibrated peak is {ratio:.2f}x the fastest timed matmul, FLOP/s {rates}"


def test_every_calibrated_efficiency_is_a_fraction(calibrated):
    profile, _ = calibrated
    efficiencies = [point[3] for point in profile.matmul_efficiency["fp32"]]
    efficiencies += [point[3] for point in profile.attention_points]
    efficiencies += [point[5] for point in profile.convolution_points]
    efficiencies += [profile.matmul_base_efficiency, profile.attention_efficiency, profile.misaligned_matmul_factor]
    assert all(0 < efficiency <= 1 for efficiency in efficiencies), efficiencies


def test_calibrated_dispatch_is_the_time_of_a_tiny_op(calibrated):
    profile, _ = calibrated
    a, b = torch.randn(4, 16), torch.randn(4, 16)
    aten, q = torch.ops.aten, a[None, None]
    ops = {  # ops of each kind like the calibration's own, built here
        "pointwise": lambda: aten.add.Tensor(a, b), "reduction": lambda: aten.sum.dim_IntList(a, [1]),
        "matmul": lambda: aten.mm.default(a, b.t()), "view": lambda: aten.view.default(a, [64]),
        "attention": lambda: aten.scaled_dot_product_attention.default(q, q, q),
    }
    measured = {kind: _fastest_us(op, seconds=0.15) for kind, op in ops.items()}
    ratios = {kind: profile.dispatch(kind) / us for kind, us in measured.items()}
    assert all(1 / FACTOR < ratio < FACTOR for ratio in ratios.values()), (profile.dispatch_us, measured)
    assert profile.dispatch("default") == profile.dispatch("pointwise")


def test_calibrated_profile_predicts_a_linear_within_a_small_factor(calibrated, linear):
    predicted, measured = _predicted_vs_measured_us(calibrated[0], linear)
    assert 1 / FACTOR < predicted / measured < FACTOR, f"predicted {predicted:.1f} us, measured {measured:.1f} us"


def test_shipped_cpu_profile_predicts_a_linear_within_a_sane_factor(linear):
    predicted, measured = _predicted_vs_measured_us(load_profile("cpu"), linear)
    assert 1 / 5 < predicted / measured < 5, f"predicted {predicted:.1f} us, measured {measured:.1f} us"


def test_calibration_reports_every_stage_to_the_end(calibrated):
    _, tasks = calibrated
    assert [description for description, _, _ in tasks] == [
        "calibrating: matmul peaks", "calibrating: matmul shapes", "calibrating: bandwidth",
        "calibrating: attention", "calibrating: convolutions", "calibrating: dispatch",
    ]
    assert all(total == advanced for _, total, advanced in tasks), tasks


def test_a_slow_call_now_and_then_does_not_poison_the_timing():
    calls = [0]

    def mostly_fast() -> None:
        calls[0] += 1
        pause_s = 0.02 if calls[0] % 7 == 0 else 50e-6
        deadline = time.perf_counter() + pause_s
        while time.perf_counter() < deadline:
            pass

    assert 45 < time_us(mostly_fast, torch.device("cpu")) < 100
