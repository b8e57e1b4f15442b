"""Options.expert_placement: a plan fitted on a model's own routing is checked against its routers, kept in the
report and the saved program, and shown by inspect; a plan for another model is a PlanError."""
from __future__ import annotations

import json

import pytest
import torch

import ember
from ember import models
from ember.errors import PlanError
from ember.optimizer.expert_placement import plan_placement
from ember.optimizer.moe_traces import synthetic_trace
from ember.optimizer.routing_record import calibration_batches, record_routing


@pytest.fixture(scope="module")
def mixtral_and_plan():
    model, inputs = models.load("mixtral")
    trace = record_routing(model, calibration_batches("mixtral", 2, 16, 0))
    return model, inputs, plan_placement([trace], 2, method="descent", time_limit_s=2)


def test_a_fitted_plan_is_kept_in_the_report_and_the_saved_program(mixtral_and_plan, tmp_path):
    model, inputs, plan = mixtral_and_plan
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan.to_dict()))
    with torch.no_grad():
        program = ember.compile(model, inputs, ember.Options(expert_placement=str(path)))
    assert program.report.expert_placement["gpus_of"] == [[list(g) for g in layer] for layer in plan.gpus_of]
    assert any("placed on 2 GPUs by descent" in d for d in program.report.pass_decisions["place_experts"])
    assert "expert placement" in str(program.report)
    program.save(tmp_path / "saved")
    assert ember.load(tmp_path / "saved").report.expert_placement == program.report.expert_placement


def test_inspect_shows_the_routing_and_the_plan(mixtral_and_plan):
    model, inputs, plan = mixtral_and_plan
    report = ember.inspect(model, inputs, options={"expert_placement": plan})
    assert report.experts["moe_layers"] == plan.layers and report.experts["experts"] == plan.num_experts
    assert report.experts["placement"]["method"] == "descent"
    assert ember.inspect(model, inputs).experts["placement"] is None


def test_a_plan_for_another_model_is_a_plan_error(mixtral_and_plan):
    model, inputs, plan = mixtral_and_plan
    other = plan_placement([synthetic_trace(plan.num_experts + 2, plan.layers, 2, 50, 0.5)], 2, method="contiguous")
    with pytest.raises(PlanError, match="this model routes"):
        ember.compile(model, inputs, ember.Options(expert_placement=other))
