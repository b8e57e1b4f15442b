"""The installed package: the `ember` console script, `ember demo`, and the torch.compile entry point."""
from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

import ember
from ember.cli import main


def test_demo_json_reports_a_correct_run(capsys):
    assert main(["demo", "mlp", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["passed"] and result["max_error"] <= result["tolerance"]
    assert result["op_coverage"] == 1.0 and result["extern_ops"] == {}
    assert {"capture", "lower", "eliminate_dead_code", "build"} <= set(result["stage_seconds"])


def test_demo_prints_what_happened(capsys):
    assert main(["demo", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for expected in ("ember compile report", "nodes", "op coverage", "0 extern", "max |error| vs eager",
                     "time per stage", "PASS"):
        assert expected in out


def test_demo_accepts_a_module_function_spec(capsys):
    assert main(["demo", "ember.models:cnn", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["passed"]


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["demo", "no-such-model"]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err


def test_version_names_ember_and_torch(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert f"ember {ember.__version__}" in capsys.readouterr().out


def test_console_script_is_installed():
    result = subprocess.run(["ember", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in result.stdout


def test_backend_is_found_by_name_without_importing_ember():
    assert any(ep.name == "ember" for ep in entry_points(group="torch_dynamo_backends"))
    script = (
        "import sys, torch\n"
        "model = torch.nn.Linear(4, 3)\n"
        "x = torch.randn(2, 4)\n"
        "assert 'ember' not in sys.modules\n"
        "torch.testing.assert_close(torch.compile(model, backend='ember')(x), model(x))\n"
        "assert 'ember' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd="/")


def test_inspect_prints_the_report_for_a_suite_model(capsys):
    assert main(["inspect", "mlp", "--device", "h200"]) == 0
    out = capsys.readouterr().out
    assert "Sequential on h200" in out and "the 3 costliest nodes" in out


def test_inspect_json_and_files(capsys, tmp_path):
    plot, graph = tmp_path / "r.png", tmp_path / "g.html"
    memory_plot = tmp_path / "memory.png"
    assert main(["inspect", "bert", "--size", "tiny", "--json", "--plot", str(plot), "--graph", str(graph),
                 "--plot-memory", str(memory_plot)]) == 0
    assert memory_plot.read_bytes()[:4] == b"\x89PNG"
    data = json.loads(capsys.readouterr().out)
    assert data["rows"] and data["totals"]["predicted_us"] > 0
    assert plot.stat().st_size > 0 and graph.stat().st_size > 0


def test_inspect_unknown_device_is_a_clear_error(capsys):
    assert main(["inspect", "mlp", "--device", "tpu9"]) == 2
    assert "unknown device 'tpu9'; known:" in capsys.readouterr().err


def test_calibrate_writes_a_profile_inspect_can_use(capsys, tmp_path):
    out = tmp_path / "here.json"
    assert main(["calibrate", "--quick", "--out", str(out), "--name", "here"]) == 0
    assert out.exists() and "saved" in capsys.readouterr().out
    assert main(["inspect", "mlp", "--device", str(out)]) == 0


def test_optimize_shows_and_exports_the_memory_plan(capsys, tmp_path):
    plot, out = tmp_path / "mem.png", tmp_path / "export"
    assert main(["optimize", "gpt2", "--size", "tiny", "--json", "--plot-memory", str(plot), "--out", str(out)]) == 0
    memory = json.loads(capsys.readouterr().out)
    assert memory["lower_bound_bytes"] <= memory["planned_bytes"] <= memory["greedy_bytes"] <= memory["no_reuse_bytes"]
    compiled = memory["compile"]  # the plan compile builds on the asked device, as inspect shows it
    assert compiled["device"] == "h100" and compiled["arena"]["arenas"] >= 1 and compiled["fusion_groups"] > 0
    assert compiled["capture"]["decided_by"] == "cost model"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    exported = json.loads((out / "memory_plan.json").read_text())
    assert exported["planned_bytes"] == memory["planned_bytes"]
    assert max(b["offset"] + b["bytes"] for b in exported["buffers"]) <= memory["planned_bytes"]
    assert (out / "graph.ir.txt").read_text().startswith("graph")


def test_optimize_reorder_never_raises_the_peak(capsys):
    assert main(["optimize", "unet", "--size", "tiny", "--reorder", "--json"]) == 0
    memory = json.loads(capsys.readouterr().out)
    assert memory["lower_bound_bytes"] <= memory["eager_order_peak_bytes"]


def test_optimize_prints_a_table(capsys):
    assert main(["optimize", "mlp", "--size", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "lower bound" in out and "planned" in out and "greedy" in out
