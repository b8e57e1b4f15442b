"""Device profiles: the ceilings the cost model divides by, as plain JSON data.

Shipped profiles carry datasheet peaks; `ember calibrate` measures the device at hand and writes one
to the user cache directory, where `load_profile` finds it by name.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...errors import EmberError

SHIPPED = Path(__file__).parent / "profiles"

DTYPE_KEYS: dict[torch.dtype, str] = {
    torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
}
"""Profile keys of the float dtypes; integer and bool work counts as fp32 on the general cores."""


class ProfileError(EmberError):
    """A device profile is unknown, unreadable or inconsistent."""


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    """What one device can do.

    peak_tflops: unit ("tensor" or "cuda", the general cores) -> dtype key -> dense TFLOP/s.
    memory_bandwidth_gbps: achievable DRAM bandwidth, bytes read plus written, in GB/s.
    l2_bandwidth_gbps: the same for working sets that fit in L2.
    launch_overhead_us: device time between back-to-back kernels (kernel launch), per kernel.
    dispatch_us: op kind ("pointwise", "view", …, "default") -> host time to issue one eager op; an
        asynchronous device hides it behind longer kernels, so it is a floor, not an addend.
    asynchronous: the device runs kernels while the host issues more (GPUs); on the CPU they add up.
    kernel_floor_us: op kind -> device time of the smallest kernel of that kind (launch gap included):
        no kernel of the kind takes less, however little work it has.
    matmul_efficiency: dtype key -> measured (m, n, k, fraction of peak) points; empty for datasheet profiles.
    matmul_base_efficiency: fraction of peak a large, well-shaped matmul reaches.
    misaligned_matmul_factor: efficiency multiplier when a 16-bit matmul dimension is not a multiple of 8.
    attention_efficiency: fraction of tensor peak a fused attention kernel reaches, where no point is measured.
    attention_points: measured (variant, sequence length, head dim, fraction of peak); variants are
        "plain", "causal" (is_causal) and "mask" (an explicit mask: a different kernel in PyTorch).
    convolution_points: measured (class, groups, m, n, k, fraction of peak) of cuDNN's (or the CPU's) 2-D
        convolutions as implicit GEMMs (per group: m output pixels, n output channels, k input channels × kernel
        taps); classes are "pointwise" (1x1), "dense" (one group, a larger kernel) and "depthwise".
    link_gbps: what one GPU sends per second to the other GPUs of its node in an all-to-all (NVLink), GB/s.
    network_gbps: the same to GPUs on other nodes (the node's network, per GPU), GB/s.
    collective_latency_us: the fixed cost of one all-to-all (its launch and the exchange of split sizes).
    """

    name: str
    peak_tflops: Mapping[str, Mapping[str, float]]
    memory_bandwidth_gbps: float
    l2_bandwidth_gbps: float
    l2_bytes: int
    sm_count: int
    launch_overhead_us: float
    dispatch_us: Mapping[str, float] = field(default_factory=lambda: {"default": 8.0})
    asynchronous: bool = True
    kernel_floor_us: Mapping[str, float] = field(default_factory=lambda: {"default": 0.0})
    matmul_base_efficiency: float = 0.8
    misaligned_matmul_factor: float = 1.0
    attention_efficiency: float = 0.45
    attention_points: tuple[tuple[str, int, int, float], ...] = ()
    convolution_points: tuple[tuple[str, int, int, int, int, float], ...] = ()
    matmul_efficiency: Mapping[str, tuple[tuple[int, int, int, float], ...]] = field(default_factory=dict)
    link_gbps: float = 150.0
    network_gbps: float = 25.0
    collective_latency_us: float = 30.0
    description: str = ""
    source: str = "datasheet"

    def dispatch(self, kind: str) -> float:
        """Host time to issue one eager op of this kind."""
        return self.dispatch_us.get(kind, self.dispatch_us["default"])

    def kernel_floor(self, kind: str) -> float:
        """Device time of the smallest kernel of this kind."""
        return self.kernel_floor_us.get(kind, self.kernel_floor_us.get("default", 0.0))

    def peak_flops(self, unit: str, dtype: torch.dtype) -> float:
        """FLOP/s of `unit` for `dtype`; the general cores' fp32 rate when the profile has no entry."""
        key = DTYPE_KEYS.get(dtype, "fp32")
        rates = self.peak_tflops.get(unit, {})
        tflops = rates.get(key) or self.peak_tflops["cuda"].get(key) or self.peak_tflops["cuda"]["fp32"]
        return tflops * 1e12

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def profile_from_dict(data: Mapping[str, Any], where: str) -> DeviceProfile:
    """Build and check a profile; ProfileError says which field is wrong and where it came from."""
    try:
        profile = DeviceProfile(**{
            **data,
            "matmul_efficiency": {
                key: tuple(tuple(point) for point in points) for key, points in data.get("matmul_efficiency", {}).items()
            },
            "attention_points": tuple(tuple(point) for point in data.get("attention_points", ())),
            "convolution_points": tuple(tuple(point) for point in data.get("convolution_points", ())),
        })
    except TypeError as error:
        raise ProfileError(f"{where} is not a device profile: {error}") from None
    positive = {
        "memory_bandwidth_gbps": profile.memory_bandwidth_gbps, "l2_bandwidth_gbps": profile.l2_bandwidth_gbps,
        "sm_count": profile.sm_count, "launch_overhead_us": profile.launch_overhead_us,
        "misaligned_matmul_factor": profile.misaligned_matmul_factor,
        "matmul_base_efficiency": profile.matmul_base_efficiency, "attention_efficiency": profile.attention_efficiency,
        "link_gbps": profile.link_gbps, "network_gbps": profile.network_gbps,
    }
    for key, value in positive.items():
        if not isinstance(value, (int, float)) or value < 0 or (value == 0 and key != "launch_overhead_us"):
            raise ProfileError(f"{where}: {key} must be a positive number, got {value!r}")
    if "fp32" not in profile.peak_tflops.get("cuda", {}):
        raise ProfileError(f"{where}: peak_tflops needs at least cuda.fp32")
    if "default" not in profile.dispatch_us:
        raise ProfileError(f"{where}: dispatch_us needs a 'default' entry")
    return profile


def cache_dir() -> Path:
    """Where `ember calibrate` saves profiles: $EMBER_CACHE_DIR, else $XDG_CACHE_HOME/ember, else ~/.cache/ember."""
    if os.environ.get("EMBER_CACHE_DIR"):
        return Path(os.environ["EMBER_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ember"


def known_profiles() -> dict[str, Path]:
    """Profile name -> file: calibrated ones in the cache directory override shipped ones of the same name."""
    found = {path.stem: path for path in sorted(SHIPPED.glob("*.json"))}
    found.update({path.stem: path for path in sorted((cache_dir() / "profiles").glob("*.json"))})
    return found


def load_profile(name_or_path: str | os.PathLike) -> DeviceProfile:
    """A profile by name (`h100`, a calibrated one) or by the path of a JSON file."""
    known = known_profiles()
    path = known.get(str(name_or_path)) or Path(name_or_path)
    if str(name_or_path) not in known and path.suffix != ".json":
        raise ProfileError(f"unknown device {str(name_or_path)!r}; known: {', '.join(sorted(known))} (or a profile .json)")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ProfileError(f"no profile file {path}") from None
    except (OSError, ValueError) as error:
        raise ProfileError(f"{path} is not a readable JSON profile: {error}") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{path} is not a device profile: expected a JSON object")
    return profile_from_dict(data, str(path))


def save_profile(profile: DeviceProfile, path: str | os.PathLike | None = None) -> Path:
    """Write a profile as JSON (default: the cache directory, under its name); returns the path."""
    target = Path(path) if path is not None else cache_dir() / "profiles" / f"{profile.name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(profile.to_json() + "\n")
    return target
