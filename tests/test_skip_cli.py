"""`ember skip`: the choice, the curves and held-out numbers, the plan written for Options, and its errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ember
from ember.cli import main
from ember.errors import CompileError
from ember.optimizer.skip_search import SkipPlan
from ember.skipping import load_subject, text_calls

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "text"
PLAYS = [str(TEXT / "hamlet.txt")]
PROSE = str(TEXT / "areopagitica.txt")
SMALL = ["--length", "32", "--calls", "2", "--max-flops", "0.5"]


def _skip_json(capsys, *args: str) -> dict:
    assert main(["skip", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_names_what_was_removed_and_the_held_out_perplexity(capsys):
    result = _skip_json(capsys, "llama", "--budget", "0.05", "--calibrate", *PLAYS, "--eval", PROSE, *SMALL)
    assert result["metric"] == "perplexity" and result["method"] == "ember"
    assert 0.0 <= result["flops_removed"] < 1.0
    assert len(result["removed"]) == len(result["plan"]["removed"])
    numbers = result["eval"][PROSE]
    assert numbers["full_ppl"] > 1.0 and numbers["skipped_ppl"] > 1.0
    assert result["calibration"]["loss"] <= 0.05
    (where, speedup), = result["plan"]["measured_speedup"].items()
    assert where.startswith("cpu") and speedup > 0
    assert set(result["curves"]) == {"ember", "finercut", "sleb", "bi"}
    for points in result["curves"].values():
        assert points[0]["removed"] == [] and points[0]["heldout"][PROSE] == pytest.approx(numbers["full_ppl"])
        shares = [point["flops_removed"] for point in points]
        assert shares == sorted(shares)


def test_budget_zero_removes_nothing_and_keeps_the_full_perplexity(capsys):
    result = _skip_json(capsys, "llama", "--budget", "0", "--calibrate", *PLAYS, "--eval", PROSE, *SMALL,
                        "--methods", "ember")
    assert result["removed"] == [] and result["flops_removed"] == 0.0
    assert result["eval"][PROSE]["skipped_ppl"] == pytest.approx(result["eval"][PROSE]["full_ppl"])


def test_an_encoder_is_scored_by_embedding_cosine(capsys):
    result = _skip_json(capsys, "bert", "--budget", "0.01", "--calibrate", *PLAYS, "--eval", PROSE, *SMALL,
                        "--methods", "ember", "bi")
    assert result["metric"] == "divergence" and result["calibration"]["full_ppl"] is None
    cosine = result["eval"][PROSE]["embedding_cosine"]
    assert -1.0 <= cosine <= 1.0 + 1e-6


def test_the_written_plan_compiles_the_skipped_model(capsys, tmp_path):
    plan_path = tmp_path / "plan.json"
    assert main(["skip", "llama", "--budget", "0.5", "--calibrate", *PLAYS, *SMALL, "--methods", "ember",
                 "--out", str(plan_path)]) == 0
    assert "within budget 0.5" in capsys.readouterr().out
    plan = SkipPlan.from_dict(json.loads(plan_path.read_text()))
    subject = load_subject("llama")
    calls = text_calls(subject, PLAYS, 32, 1)
    with torch.no_grad():
        program = ember.compile(subject.model, calls[0], ember.Options(layer_skip=str(plan_path)))
    assert tuple(program.report.layer_skip["removed"]) == plan.removed


def test_the_plot_is_written(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "curves.png"
    assert main(["skip", "llama", "--budget", "0.05", "--calibrate", *PLAYS, "--eval", PROSE, *SMALL,
                 "--methods", "ember", "bi", "--plot", str(plot)]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_text_calls_are_token_ids_below_the_vocabulary():
    subject = load_subject("llama")
    calls = text_calls(subject, PLAYS, 48, 3)
    vocabulary = subject.model.get_input_embeddings().num_embeddings
    assert len(calls) == 3 and all(call[0].shape == (subject.example[0].shape[0], 48) for call in calls)
    assert all(int(call[0].max()) < vocabulary for call in calls)
    assert not torch.equal(calls[0][0], calls[1][0])


def test_too_little_text_is_a_clear_error(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("A few words.")
    with pytest.raises(CompileError, match="fewer than one call"):
        text_calls(load_subject("llama"), [short], 256, 4)
    with pytest.raises(CompileError, match="not the 100000 asked"):
        text_calls(load_subject("llama"), PLAYS, 256, 100000)


def test_a_model_without_token_ids_is_refused(capsys):
    assert main(["skip", "cnn", "--budget", "0.05"]) != 0
    assert "needs a model that reads token ids" in capsys.readouterr().err


def test_an_unknown_method_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["skip", "llama", "--budget", "0.05", "--method", "magic"])
    assert "invalid choice" in capsys.readouterr().err
