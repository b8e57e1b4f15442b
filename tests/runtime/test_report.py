"""CompileReport prints as tables: the real node count, coverage, stages, memory and decisions, with no ANSI codes."""
from __future__ import annotations

import dataclasses
import io
import re

import pytest
import torch
from rich.console import Console

import ember
from ember.units import format_bytes

ANSI = re.compile(r"\x1b\[")


@pytest.fixture(scope="module")
def report():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    return ember.compile(model, (torch.randn(3, 5),)).report


def _row(text: str, label: str) -> str:
    """The summary row that starts with `label`, its cells joined."""
    line = next(line for line in text.splitlines() if line.startswith(f"│ {label} "))
    return " ".join(cell.strip() for cell in line.strip("│").split("│"))


def test_str_shows_the_real_counts_and_no_ansi(report):
    text = str(report)
    assert not ANSI.search(text)
    assert _row(text, "nodes") == f"nodes {report.node_count} (3 native, 0 extern)" and report.node_count == 3
    assert _row(text, "op coverage") == "op coverage 100.0% of nodes run natively"
    assert _row(text, "native ops") == "native ops linear ×2, relu ×1"
    assert "CUDA graphs" in text and "not captured (not on a GPU)" in text


def test_every_stage_is_a_row_with_its_time(report):
    text = str(report)
    assert set(report.stage_seconds) >= {"capture", "lower", "plan_memory", "build"}
    for stage in report.stage_seconds:
        assert re.search(rf"│ {stage} +│ +[\d.,]+ (µs|ms|s) │", text), stage
    assert re.search(r"│ total +│", text)


def test_memory_rows_use_the_unit_that_fits(report):
    text = str(report)
    memory = report.memory
    assert _row(text, "arena").startswith(f"arena {format_bytes(memory['arena_bytes'])} (1 arena)")
    assert f"lower bound {format_bytes(memory['lower_bound_bytes'])}" in _row(text, "peak memory")
    assert _row(text, "memory plan").startswith(f"memory plan {memory['status']}, gap")
    assert "0.00 MiB" not in text


def test_externs_fusion_and_capture_are_spelled_out(report):
    changed = dataclasses.replace(
        report, extern_ops={"aten.cumsum.default": 2, "aten.sort.default": 1}, memory={},
        fusion={"groups": 2, "fused_nodes": 5, "rejected": 1, "steps": 4,
                "decisions": [{"group": "fused_0", "nodes": 3, "unfused_us": 10.0, "fused_us": 4.0, "kept": True},
                              {"group": "fused_1", "nodes": 2, "unfused_us": 6.0, "fused_us": 2.5, "kept": True},
                              {"group": "fused_2", "nodes": 2, "unfused_us": 1.0, "fused_us": 1.5, "kept": False}]},
        cuda_graphs={"capture": True, "decided_by": "cost model", "host_us": 12.0, "device_us": 50.0},
    )
    text = str(changed)
    assert re.search(r"│ aten\.cumsum\.default +│ +2 │", text) and re.search(r"│ aten\.sort\.default +│ +1 │", text)
    assert text.index("aten.cumsum.default") < text.index("aten.sort.default")
    assert _row(text, "fusion") == "fusion 2 group(s) kept (5 nodes), 1 turned down"
    assert _row(text, "fused time") == "fused time 16.0 µs unfused → 6.5 µs fused (kept groups, predicted)"
    assert "captured (cost model): predicted host dispatch 12.0 µs, device 50.0 µs" in text
    assert _row(text, "arena") == "arena none (compiled with arena=False)"


def test_rich_renders_the_same_tables_in_colour(report):
    console = Console(file=io.StringIO(), width=100, force_terminal=True, color_system="truecolor")
    console.print(report)
    coloured = console.file.getvalue()
    assert ANSI.search(coloured)
    assert re.sub(r"\x1b\[[0-9;]*m", "", coloured).split() == str(report).split()


def test_report_stays_a_frozen_dataclass_with_its_fields(report):
    assert [f.name for f in dataclasses.fields(report)] == [
        "node_count", "op_coverage", "extern_ops", "stage_seconds", "native_ops", "memory", "fusion", "cuda_graphs",
        "pass_changes", "pass_decisions", "layer_skip", "ffn_gate", "expert_placement"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.node_count = 4
    assert repr(report).startswith("CompileReport(node_count=3,")
