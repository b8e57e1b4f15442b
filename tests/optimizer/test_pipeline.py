"""The pipeline verifies the IR after every stage and can dump it: a broken pass is caught at that pass."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import ember
from ember.ir import Graph
from ember.optimizer import pipeline


def _drop_first_node(graph: Graph) -> Graph:
    return dataclasses.replace(graph, nodes=graph.nodes[1:])


def test_a_pass_that_breaks_the_ir_is_caught_at_that_stage(monkeypatch):
    monkeypatch.setattr(pipeline, "PASSES", (*pipeline.PASSES, _drop_first_node))
    with pytest.raises(ember.CompileError, match="invalid after stage '_drop_first_node'.*before it is defined"):
        ember.compile(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()), (torch.randn(3, 4),))


def test_verification_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(pipeline, "PASSES", (*pipeline.PASSES, _drop_first_node))
    ember.compile(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()), (torch.randn(3, 4),),
                  options={"verify": False})


def test_debug_dir_holds_the_ir_after_each_stage(tmp_path):
    program = ember.compile(torch.nn.Linear(4, 2), (torch.randn(3, 4),), options={"debug_dir": str(tmp_path)})
    files = sorted(path.name for path in tmp_path.iterdir())
    dumps = [name for name in files if name.endswith(".ir.txt")]
    stages = ["lower", *(transform.__name__ for transform in pipeline.PASSES)]
    assert dumps == [f"{index:02d}_{stage}.ir.txt" for index, stage in enumerate(stages)]
    assert "Linear_wrapper.py" in files  # generated when the program is built
    assert (tmp_path / dumps[-1]).read_text() == str(program.graph) + "\n"


def test_debug_dir_defaults_to_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_DEBUG_DIR", str(tmp_path))
    assert ember.Options().debug_dir == str(tmp_path)


def test_every_stage_runs_in_the_order_the_pipeline_lists_and_is_timed():
    """Graph passes, then the planners: what compile runs is the list, read top to bottom."""
    options = ember.Options()
    names = [pipeline.stage_name(stage) for stage in pipeline.stages(options)]
    assert names == [transform.__name__ for transform in pipeline.PASSES] + [
        "fuse", "schedule_steps", "lower_kernels", "compile_kernels", "plan_memory", "decide_capture"]
    program = ember.compile(torch.nn.Linear(4, 2), (torch.randn(3, 4),))
    assert set(names) <= set(program.report.stage_seconds)


class Chain(torch.nn.Module):
    def forward(self, x):
        return (torch.relu(x * 2) + 1).sum(-1), torch.sin(x).t()


def test_the_schedule_is_worked_out_once_and_read_by_memory_planning_and_the_executor(monkeypatch):
    """One derivation of the compiled graph's steps (and one of the captured graph's, for autograd's reference
    steps): the arena's reuses, the executor's steps and its frees all come from that one object."""
    import ember.ir.schedule as schedule_module

    derived = []
    steps = schedule_module._steps
    monkeypatch.setattr(schedule_module, "_steps", lambda graph, fusion: derived.append(fusion) or steps(graph, fusion))
    x = torch.randn(5, 7)
    program = ember.compile(Chain(), (x,), ember.Options(fusion=True))
    assert len(derived) == 2 and derived[0] is not None  # the fused program's, then the captured graph's
    schedule, executor = program.executor.schedule, program.executor
    assert [step.name for step in schedule.steps] == [step.node for step in executor.steps]
    assert executor.layout.reuses.items() >= schedule.reused.items()
    freed = {name: index for index, step in enumerate(executor.steps) for name in step.frees}
    assert all(freed[name] == schedule.last_read.get(name, schedule.made[name]) for name in freed)
    expected = Chain()(x)
    for got, want in zip(program(x), expected):
        torch.testing.assert_close(got, want)


def test_steps_are_bound_only_against_their_own_schedule():
    from ember.ir.schedule import schedule_of
    from ember.runtime.executor import Executor

    program = ember.compile(Chain(), (torch.randn(5, 7),), ember.Options(fusion=True))
    assert program.report.fusion["groups"]
    unfused = schedule_of(program.graph)
    with pytest.raises(ValueError, match="not the schedule's"):
        Executor(program.graph, work=program.executor.work, schedule=unfused)


def test_a_new_planner_is_one_function_in_the_list(monkeypatch):
    """A stage added to the list runs in its place, sees what earlier stages decided, and what it records is kept."""
    seen = []

    def count_groups(compilation):
        seen.append((compilation.arena is not None, compilation.capture))
        return dataclasses.replace(compilation, seconds={**compilation.seconds, "counted": 1.0})

    stages = pipeline.stages
    monkeypatch.setattr(pipeline, "stages", lambda options: (*stages(options), count_groups))
    monkeypatch.setattr(ember.api, "stages", pipeline.stages)
    program = ember.compile(torch.nn.Linear(4, 2), (torch.randn(3, 4),))
    assert seen == [(True, {"capture": False, "decided_by": "not on a GPU"})]
    assert program.report.stage_seconds["counted"] == 1.0


def test_the_target_is_decided_once_from_where_the_model_is():
    """Off a GPU: no device, the reference profile (generated kernels in the interpreter are planned as for a GPU)."""
    graph = ember.compile(torch.nn.Linear(4, 2), (torch.randn(3, 4),)).graph
    target = pipeline.decide_target(graph)
    assert target.device is None and not target.on_gpu and target.profile.name == pipeline.REFERENCE_PROFILE


@pytest.mark.parametrize("options, decided, captured", [
    ({}, "cost model", None), ({"cuda_graphs": False}, "options", False),
    ({"mode": "reduce-overhead"}, "mode 'reduce-overhead'", True),
    ({"mode": "max-autotune-no-cudagraphs"}, "mode 'max-autotune-no-cudagraphs'", False),
    ({"arena": False, "cuda_graphs": True}, "no arena (Options.arena=False)", False)])
def test_capture_is_decided_by_options_then_mode_then_cost_and_never_without_an_arena(options, decided, captured):
    """A program on a GPU target (faked: the decision reads only the record): torch.compile's modes say what they
    say for Inductor; without an arena nothing is captured, and the report says so rather than promise graphs."""
    graph = ember.compile(torch.nn.Linear(4, 2), (torch.randn(3, 4),)).graph
    target = pipeline.Target(torch.device("cuda", 0), pipeline.decide_target(graph).profile, "test")
    compilation = pipeline.plan_memory(pipeline.Compilation(graph, ember.Options(**options), target))
    capture = pipeline.decide_capture(compilation).capture
    assert capture["decided_by"] == decided
    if captured is not None:
        assert capture["capture"] is captured
    else:
        assert capture["capture"] is (capture["host_us"] >= pipeline.HOST_SHARE * capture["device_us"])


@pytest.mark.parametrize("gpu, calibrated, expected", [
    ("NVIDIA H200", False, "h200"), ("NVIDIA H100 80GB HBM3", False, "h100"), ("NVIDIA A100-SXM4-80GB", False, "a100"),
    ("NVIDIA H200", True, "h200-calibrated"), ("NVIDIA B300", False, pipeline.REFERENCE_PROFILE)])
def test_a_gpu_is_priced_with_its_calibrated_profile_else_the_shipped_one_by_name_else_the_reference(
        gpu, calibrated, expected, monkeypatch, tmp_path):
    """The GPU is faked (its name is all the choice reads); a calibrated profile is one `ember calibrate` saved."""
    from ember.ir import Value
    from ember.optimizer.cost import load_profile, save_profile

    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    if calibrated:
        save_profile(dataclasses.replace(load_profile("h200"), name="h200-calibrated"))
    graph = ember.compile(torch.nn.ReLU(), (torch.randn(3, 4),)).graph
    on_gpu = dataclasses.replace(graph, inputs=tuple(Value(value.name, dataclasses.replace(value.type, device="cuda"))
                                                     for value in graph.inputs))
    target = pipeline.decide_target(on_gpu)
    assert target.on_gpu and target.device == torch.device("cuda", 0) and target.profile.name == expected


def test_each_graph_pass_records_what_it_changed_by_op():
    """The report says, per pass that changed the graph, the nodes it removed, added and rewritten: on Mixtral the
    rotary tables fold, the empty cache cats become copies, the grouped matmuls are marked rows_covered and
    their offsets become a search."""
    from ember import models

    model, inputs = models.load("mixtral")
    report = ember.compile(model, inputs).report
    changes = report.pass_changes
    layers = model.config.num_hidden_layers
    assert changes["cover_grouped_rows"] == {"rewritten": {"grouped_mm": 2 * layers}}
    assert changes["offsets_by_search"] == {"removed": {"_to_copy": layers, "histc": layers, "cumsum": layers},
                                            "added": {"searchsorted.Tensor": layers}}
    assert changes["drop_empty_cat_inputs"]["removed"]["cat"] == changes["drop_empty_cat_inputs"]["added"]["clone"]
    assert sum(changes["fold_constants"]["removed"].values()) > 0
    assert "pad_linear_features" not in changes  # nothing to pad on the CPU: no entry
    assert "graph passes that changed the graph" in str(report) and "rewritten grouped_mm" in str(report)


def test_each_graph_pass_says_why_with_its_numbers():
    """The decisions behind the changes, per pass, in the report: Mixtral's proofs about its routing, and a decode
    step's joined projections (tiny Llama, one token)."""
    from ember import models

    model, inputs = models.load("mixtral")
    report = ember.compile(model, inputs).report
    decisions = report.pass_decisions
    layers = model.config.num_hidden_layers
    assert len(decisions["cover_grouped_rows"]) == 2 * layers
    assert all("proven to end at its" in decision for decision in decisions["cover_grouped_rows"])
    assert len(decisions["offsets_by_search"]) == layers and "fold_constants" in decisions
    assert set(decisions) <= set(report.pass_changes)  # a decision is a change's reason

    model, _ = models.load("llama")
    report = ember.compile(model, (torch.randint(1, 100, (1, 1)),)).report
    joined = report.pass_decisions["join_vector_products"]
    assert joined.count(joined[0]) == model.config.num_hidden_layers  # one of each kind per layer
    assert any(decision.startswith("3 linears of one row") for decision in joined)
    assert any(decision.startswith("2 linears of one row") for decision in joined)
    assert "3 linears of one row" in str(report)


def test_graph_changes_of_an_unchanged_graph_are_empty():
    graph = ember.compile(torch.nn.Linear(4, 2), (torch.randn(3, 4),)).graph
    assert pipeline.graph_changes(graph, graph) == {}
