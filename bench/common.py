"""What every benchmark shares: the environment it ran in, writing its JSON and table under one name, and the
wall time of a call."""
from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
import triton

import ember


def environment(device: torch.device) -> dict[str, str]:
    """Device, torch, triton, Python and ember versions, as every result file records them."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "ember": ember.__version__}


def write_results(out: str, stem: str, result: dict, table: str) -> None:
    """`out/stem.json` and `out/stem.txt` (the table under a line naming the device, torch and triton), then
    the table on stdout."""
    if "device" in result and not table.startswith("#"):
        table = f"# {result['device']}, torch {result['torch']}, triton {result['triton']}\n{table}"
    Path(out).mkdir(parents=True, exist_ok=True)
    Path(out, f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    Path(out, f"{stem}.txt").write_text(table + "\n")
    print(table)


def wall_us(call: Callable[[], object], calls: int) -> float:
    """Wall µs per call over `calls` calls back to back, the device's work included."""
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        call()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / calls * 1e6
