"""`ember calibrate` measures the device at hand; on the CPU here, the quick sizes."""
from __future__ import annotations

import torch

from ember.optimizer.cost import CostModel, load_profile, save_profile
from ember.optimizer.cost.calibrate import calibrate
from ember.optimizer.cost.model import MatmulShape


def test_calibrated_cpu_profile_is_complete_and_usable(tmp_path):
    profile = calibrate("cpu", quick=True, name="test-cpu")
    assert profile.source == "calibrated" and profile.name == "test-cpu"
    assert profile.peak_flops("cuda", torch.float32) > 1e8
    assert profile.memory_bandwidth_gbps > 0.1 and profile.l2_bandwidth_gbps >= profile.memory_bandwidth_gbps
    assert not profile.asynchronous and profile.launch_overhead_us == 0  # on the CPU the op is the dispatch
    assert set(profile.dispatch_us) >= {"default", "pointwise", "view", "matmul", "attention"}
    assert all(0 < us < 1000 for us in profile.dispatch_us.values())
    assert {point[0] for point in profile.attention_points} == {"plain", "causal", "mask"}
    assert 0 < profile.attention_efficiency <= 1
    points = profile.matmul_efficiency["fp32"]
    assert len(points) == 12 and all(0 < p[3] <= 1 for p in points)
    reloaded = load_profile(save_profile(profile, tmp_path / "cpu.json"))
    assert reloaded == profile
    model = CostModel(reloaded)
    assert model.matmul_efficiency(MatmulShape(1, 128, 128, 128), torch.float32) > 0
