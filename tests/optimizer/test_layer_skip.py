"""Layer skipping: sublayers found by structure in any transformer, removed exactly (the stream passes through),
chosen within a budget on calibration calls, and applied by both entry points and kept in a saved program."""
from __future__ import annotations

import json

import pytest
import torch

import ember
from ember import models
from ember.errors import CompileError
from ember.frontend import from_module
from ember.optimizer.layer_skip import apply_skip, blocks, find_sublayers, removed_nodes, skip_sublayers
from ember.optimizer.skip_search import (Calibration, LayerSkip, SkipPlan, curve, is_language_model, plan,
                                         run_graph)

pytest.importorskip("transformers")

TRANSFORMERS = ["demo", "gpt2", "llama", "mixtral", "bert", "bert_masked"]


def captured(name: str):
    torch.manual_seed(0)
    model, inputs = models.load(name)
    return model.eval(), inputs, from_module(model.eval(), inputs).graph


def token_calls(inputs, count: int, vocab: int = 64, seed: int = 1) -> list[tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(seed)
    return [tuple(torch.randint(0, vocab, t.shape, generator=generator) if not t.is_floating_point() else
                  torch.randn(t.shape, generator=generator) for t in inputs) for _ in range(count)]


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_sublayers_are_found_by_structure_in_any_transformer(name):
    _, _, graph = captured(name)
    sublayers = find_sublayers(graph)
    assert [s.kind for s in sublayers] == ["attention", "ffn"] * 2  # the tiny models have two layers
    assert blocks(sublayers) == ((0, 1), (2, 3))
    for sublayer in sublayers:
        assert str(sublayer.block) in sublayer.label and sublayer.branch
    assert sublayers[1].stream_in == sublayers[0].stream_out  # one stream, handed on


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_a_model_without_a_residual_stream_has_no_sublayers(name):
    _, _, graph = captured(name)
    assert find_sublayers(graph) == ()
    with pytest.raises(CompileError, match="no residual sublayers"):
        Calibration(graph, [tuple(torch.zeros(value.type.shape) for value in graph.inputs)])


@pytest.mark.parametrize(("weight", "index"), [("model.layers.1.self_attn.o_proj.weight", 2),
                                               ("model.layers.0.mlp.down_proj.weight", 1)])
def test_skipping_a_pre_norm_sublayer_is_the_model_with_its_branch_zeroed(weight, index):
    model, inputs, graph = captured("llama")
    skipped = run_graph(skip_sublayers(graph, [index]), inputs)
    with torch.no_grad():
        model.get_parameter(weight).zero_()
        expected = model(*inputs)
    torch.testing.assert_close(skipped[0], expected.logits)
    keys = [layer.keys for layer in expected.past_key_values.layers]
    assert any(torch.equal(key, value) for key in keys for value in skipped[1:])  # the cache is still written


def test_skipping_a_post_norm_layer_hands_on_the_stream_it_read():
    model, inputs, graph = captured("bert")
    skipped = run_graph(skip_sublayers(graph, [2, 3]), inputs)
    with torch.no_grad():
        hidden = model(*inputs, output_hidden_states=True).hidden_states
    torch.testing.assert_close(skipped[0], hidden[1])


def test_removing_nothing_is_the_graph_and_unknown_sublayers_are_refused():
    _, _, graph = captured("llama")
    assert skip_sublayers(graph, []) is graph
    assert removed_nodes(graph, []) == set()
    with pytest.raises(CompileError, match=r"sublayer\(s\) \[7\] do not exist"):
        skip_sublayers(graph, [7])
    with pytest.raises(CompileError, match="made for a model with 6 residual sublayers"):
        apply_skip(graph, [1], expected=6)


def test_removing_a_sublayer_drops_its_branch_and_its_weights():
    _, _, graph = captured("llama")
    sublayers = find_sublayers(graph)
    skipped = skip_sublayers(graph, [1], sublayers)
    assert removed_nodes(graph, [1], sublayers) >= set(sublayers[1].branch) - {sublayers[1].add}
    assert not any("layers_0_mlp" in value.name for value in skipped.params)
    assert any("layers_0_self_attn" in value.name for value in skipped.params)


def test_language_models_are_told_from_encoders():
    assert is_language_model(captured("llama")[2]) and is_language_model(captured("gpt2")[2])
    assert not is_language_model(captured("bert")[2])


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_runs_from_the_last_choice_equal_whole_runs(name):
    _, inputs, graph = captured(name)
    calibration = Calibration(graph, token_calls(inputs, 2))
    for base, removed in [((), (2,)), ((1,), (1, 3)), ((0,), (0, 1)), ((1, 2), (1, 2, 3)), ((3,), (0, 3))]:
        calibration.base = None
        whole = calibration.loss(removed)
        calibration.rebase(base)
        assert calibration.loss(removed) == pytest.approx(whole, abs=1e-6)


@pytest.mark.parametrize("method", ["bi", "sleb", "finercut", "ember"])
def test_each_scorer_gives_a_curve_of_growing_removals(method):
    _, inputs, graph = captured("llama")
    calibration = Calibration(graph, token_calls(inputs, 2, vocab=211))
    points = curve(calibration, method, max_flops=1.0)
    assert points[0].removed == () and points[0].loss == 0
    assert all(set(a.removed) < set(b.removed) and a.flops_removed < b.flops_removed for a, b in zip(points, points[1:]))
    if method in ("bi", "sleb"):
        assert all(len(point.removed) % 2 == 0 for point in points)  # whole blocks
    if method == "sleb":
        assert len(points) == 1 or points[1].removed in ((0, 1), (2, 3))  # two blocks: both inner by SLEB's rule


def test_a_plan_keeps_within_its_budget_and_a_zero_budget_removes_nothing():
    _, inputs, graph = captured("demo")
    calibration = Calibration(graph, token_calls(inputs, 2, vocab=100))
    losses = {point.removed: point.loss for point in curve(calibration, "ember", max_flops=1.0)}
    budget = sorted(losses.values())[len(losses) // 2]
    chosen = plan(calibration, budget)
    assert chosen.calibration_loss <= budget and chosen.removed
    assert chosen.calibration_loss == pytest.approx(calibration.loss(chosen.removed))
    assert plan(calibration, 0.0).removed == ()
    with pytest.raises(CompileError, match="budget"):
        plan(calibration, -0.1)


def test_an_encoder_is_judged_by_divergence():
    _, inputs, graph = captured("bert")
    calibration = Calibration(graph, token_calls(inputs, 2))
    assert calibration.metric == "divergence" and calibration.full_perplexity() == 0
    assert calibration.loss([]) == pytest.approx(0, abs=1e-6)
    assert 0 < calibration.loss([0, 1, 2, 3]) <= 2


# ---------------------------------------------------------------------------------------------
# Through the entry points

@pytest.fixture(scope="module")
def llama_plan():
    model, inputs, _ = captured("llama")
    with torch.no_grad():
        chosen = ember.plan_skip(model, token_calls(inputs, 2, vocab=211), budget=0.5)
    assert chosen.removed
    return chosen


def test_compile_with_a_request_runs_the_skipped_model(llama_plan):
    model, inputs, graph = captured("llama")
    request = LayerSkip(0.5, token_calls(inputs, 2, vocab=211))
    with torch.no_grad():
        program = ember.compile(model, inputs, ember.Options(layer_skip=request))
        expected = run_graph(skip_sublayers(graph, program.report.layer_skip["removed"]), inputs)
        result = program(*inputs)
    assert tuple(program.report.layer_skip["removed"]) == llama_plan.removed
    torch.testing.assert_close(result.logits, expected[0])
    assert "layer skipping" in str(program.report) and "skip_layers" in program.report.pass_changes


def test_a_call_autograd_records_runs_the_skipped_model_too(llama_plan):
    model, inputs, graph = captured("llama")
    program = ember.compile(model, inputs, {"layer_skip": llama_plan})
    result = program(*inputs)
    assert result.logits.requires_grad
    torch.testing.assert_close(result.logits.detach(), run_graph(skip_sublayers(graph, llama_plan.removed), inputs)[0])


def test_torch_compile_takes_a_plan_as_its_dict_or_json_file(llama_plan, tmp_path):
    model, inputs, graph = captured("llama")
    expected = run_graph(skip_sublayers(graph, llama_plan.removed), inputs)[0]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(llama_plan.to_dict()))
    for given in (llama_plan.to_dict(), str(path)):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="ember", options={"layer_skip": given})
        with torch.no_grad():
            torch.testing.assert_close(compiled(*inputs).logits, expected)


def test_torch_compile_refuses_a_request_it_cannot_plan():
    model, inputs, _ = captured("llama")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="ember",
                             options={"layer_skip": LayerSkip(0.1, token_calls(inputs, 1, vocab=211))})
    with pytest.raises(Exception, match="ember.plan_skip"):
        with torch.no_grad():
            compiled(*inputs)


def test_bad_plans_are_refused_clearly(tmp_path):
    with pytest.raises(CompileError, match="cannot read a skip plan"):
        ember.Options(layer_skip=str(tmp_path / "missing.json"))
    with pytest.raises(CompileError, match="not a skip plan"):
        ember.Options(layer_skip={"removed": [1]})
    with pytest.raises(CompileError, match="layer_skip takes"):
        ember.Options(layer_skip=3)
    with pytest.raises(CompileError, match="unknown layer-skip method"):
        LayerSkip(0.1, [torch.zeros(1)], method="random")
    with pytest.raises(CompileError, match="calibration inputs"):
        LayerSkip(0.1, [])


def test_calibration_calls_of_other_shapes_are_refused():
    model, inputs, _ = captured("llama")
    with pytest.raises(CompileError, match="give calls of one shape"):
        ember.plan_skip(model, [inputs, (inputs[0][:, :5],)], budget=0.1)


def test_a_saved_program_keeps_its_plan(llama_plan, tmp_path):
    model, inputs, _ = captured("llama")
    with torch.no_grad():
        program = ember.compile(model, inputs, {"layer_skip": llama_plan})
        expected = program(*inputs).logits
    loaded = ember.load(program.save(tmp_path / "skipped"))
    assert SkipPlan.from_dict(loaded.report.layer_skip) == llama_plan
    with torch.no_grad():
        assert torch.equal(loaded(*inputs).logits, expected)
