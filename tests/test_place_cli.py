"""`ember place`: one JSON object whose placement verifies, the plan written with --out, one-line errors, and a
built-in MoE model whose routing ember records."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ember.cli import main
from ember.optimizer.expert_placement import placement_from_dict, placement_from_lists
from ember.optimizer.moe_traces import save_trace, synthetic_trace

FAST = ["--time-limit", "5"]


@pytest.fixture
def traces(tmp_path) -> tuple[str, str]:
    """A fitting trace (ember's safetensors) and a held-out one (the shared JSON format): 8 experts, 3 layers, top-2."""
    fit = save_trace(synthetic_trace(8, 3, 2, 200, 0.8, seed=1, name="fit"), tmp_path / "fit.safetensors")
    held_out = synthetic_trace(8, 3, 2, 120, 0.8, seed=2)
    score = tmp_path / "score.json"
    score.write_text(json.dumps({str(layer): held_out.experts[:, layer].tolist() for layer in range(3)}))
    return str(fit), str(score)


def _place_json(capsys, *args: str) -> dict:
    assert main(["place", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_placement_is_per_layer_gpus_that_verify(capsys, traces):
    fit, score = traces
    result = _place_json(capsys, fit, "--gpus", "2", "--score", score, *FAST)
    placement = result["placement"]
    assert len(placement) == 3 and all(len(layer) == 8 for layer in placement)
    assert all(type(gpu) is int and 0 <= gpu < 2 for layer in placement for gpu in layer)
    plan = placement_from_lists(placement, 2)
    assert plan.replicas == 0 and plan.slots == 4
    assert result["method"] == "mip" and result["gpus"] == 2 and result["gpus_per_node"] == 2
    assert result["fitted_on"] == ["fit"] and result["scored_on"] == ["score"]
    methods = result["methods"]
    assert list(methods) == ["contiguous", "round_robin", "eplb", "mip"]
    for numbers in methods.values():
        assert set(numbers["fitted"]) == set(numbers["scored"]) == {
            "top1_remote", "trips_per_token_layer", "load_imbalance", "cross_node_share", "all_to_all_ms_per_1k_tokens"}
        assert numbers["fitted"]["cross_node_share"] == 0.0   # two GPUs, one node
    mip = methods["mip"]["plan"]
    assert mip["objective"] <= methods["contiguous"]["plan"]["objective"] + 1e-9
    assert mip["lower_bound"] is None or mip["lower_bound"] <= mip["objective"] + 1e-9
    assert methods["contiguous"]["plan"]["lower_bound"] is None


def test_json_placement_lists_replicated_experts_gpus(capsys, traces):
    fit, _ = traces
    result = _place_json(capsys, fit, "--gpus", "4", "--replicas", "2", "--method", "descent", *FAST)
    placement = result["placement"]
    for layer in placement:
        assert all(type(entry) is int or (isinstance(entry, list) and all(type(g) is int for g in entry))
                   for entry in layer)
        assert sum(1 if isinstance(entry, int) else len(entry) for entry in layer) == 10
        assert any(isinstance(entry, list) for entry in layer)
    assert placement_from_lists(placement, 4).replicas == 2
    assert result["methods"]["descent"]["plan"]["replicas"] == 2
    assert result["methods"]["eplb"]["plan"]["replicas"] == 2
    assert result["methods"]["contiguous"]["plan"]["replicas"] == 0


def test_out_writes_a_plan_placement_from_dict_reads(capsys, tmp_path, traces):
    fit, score = traces
    out = tmp_path / "plans" / "placement.json"
    out.parent.mkdir()
    result = _place_json(capsys, fit, "--gpus", "2", "--method", "eplb", "--replicas", "1", "--score", score,
                         "--out", str(out), *FAST)
    plan = placement_from_dict(json.loads(out.read_text()))
    assert plan.method == "eplb" and plan.gpus == 2 and plan.fitted_on == ("fit",) and plan.replicas == 1
    assert plan.as_lists() == result["placement"]


def test_nodes_set_gpus_per_node_and_traffic_crosses_them(capsys, traces):
    fit, _ = traces
    result = _place_json(capsys, fit, "--gpus", "4", "--nodes", "2", "--method", "eplb", *FAST)
    assert result["gpus_per_node"] == 2
    assert 0.0 < result["methods"]["contiguous"]["fitted"]["cross_node_share"] <= 1.0


def test_table_without_json(capsys, traces):
    fit, _ = traces
    assert main(["place", fit, "--gpus", "2", "--method", "descent", *FAST]) == 0
    out = capsys.readouterr().out
    assert "expert placement on 2 GPUs, fitted on fit" in out and "eplb" in out
    assert "top-1: share of token-layer steps" in out


def _corrupt(tmp_path: Path) -> str:
    path = tmp_path / "corrupt.json"
    path.write_text("{not json")
    return str(path)


@pytest.mark.parametrize("args, message", [
    (lambda tmp, fit: [str(tmp / "absent.json"), "--gpus", "2"], "no routing trace at"),
    (lambda tmp, fit: [fit, "--gpus", "2", "--score", str(tmp / "absent.safetensors")], "no routing trace at"),
    (lambda tmp, fit: [_corrupt(tmp), "--gpus", "2"], "is not valid JSON"),
    (lambda tmp, fit: [fit, "--gpus", "3", "--method", "exact"], "exact method needs"),
    (lambda tmp, fit: [fit, "--gpus", "4", "--nodes", "3"], "--gpus 4 must be a positive multiple of --nodes 3"),
    (lambda tmp, fit: [fit, "--gpus", "0"], "--gpus 0 must be a positive multiple"),
    (lambda tmp, fit: [fit, "--gpus", "2", "--replicas", "9", "--method", "eplb"], "at most 8"),
])
def test_bad_inputs_exit_2_with_one_line(capsys, tmp_path, traces, args, message, one_line_error):
    fit, _ = traces
    assert main(["place", *args(tmp_path, fit), *FAST]) == 2
    assert message in one_line_error()


def test_a_built_in_moe_model_is_recorded_and_placed(capsys):
    pytest.importorskip("transformers")
    result = _place_json(capsys, "mixtral", "--gpus", "2", "--method", "descent", *FAST)
    placement = result["placement"]
    plan = placement_from_lists(placement, 2)
    assert plan.layers >= 2 and plan.num_experts >= 2
    assert result["fitted_on"] == ["mixtral"] and list(result["methods"]) == ["contiguous", "round_robin", "eplb",
                                                                              "descent"]
    descent = result["methods"]["descent"]["plan"]
    assert descent["objective"] <= result["methods"]["contiguous"]["plan"]["objective"] + 1e-9
