"""Routing recorded from ember's IR against the transformers models' own routers, run eagerly (forward hooks)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import ember
from ember import models
from ember.errors import PlanError
from ember.optimizer.moe_traces import load_trace, save_trace
from ember.optimizer.routing_record import calibration_batches, find_routers, record_routing
from ember.tolerance import assert_close

transformers = pytest.importorskip("transformers")

MOE_MODELS = {"mixtral": ("MixtralForCausalLM", "mixtral"),
              "qwen2_moe": ("Qwen2MoeForCausalLM", "ember.models:qwen2_moe"),
              "olmoe": ("OlmoeForCausalLM", "ember.models:olmoe")}
"""Model family -> (the transformers class it needs, its model spec)."""

TIE_GAP = 1e-5
"""Router probabilities closer than this may be ordered either way by two correct runs."""


def _spec(family: str) -> str:
    class_name, spec = MOE_MODELS[family]
    if not hasattr(transformers, class_name):
        pytest.skip(f"transformers {transformers.__version__} has no {class_name}")
    return spec


def _load(family: str) -> nn.Module:
    torch.manual_seed(0)
    model, _ = models.load(_spec(family))
    return model


def _calls(family: str) -> list[tuple[torch.Tensor]]:
    """Three calls of two shapes, so that recording captures twice and concatenates across captures."""
    spec = _spec(family)
    return calibration_batches(spec, 2, 11, seed=1) + calibration_batches(spec, 1, 6, seed=2, batch_size=3)


def _routers(model: nn.Module) -> list[nn.Module]:
    """transformers' router modules (mlp.gate of each MoE layer), in layer order."""
    return [module for module in model.modules() if type(module).__name__.endswith("TopKRouter")]


def hf_routing(model: nn.Module, calls) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(experts, weights, probabilities [tokens, layers, E]) from the routers' outputs in an eager run."""
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    handles = [router.register_forward_hook(lambda module, args, out: seen.append(out)) for router in _routers(model)]
    experts, weights, probabilities = [], [], []
    try:
        with torch.no_grad():
            for call in calls:
                seen.clear()
                model(*call)
                experts.append(torch.stack([indices for _, _, indices in seen], 1))
                weights.append(torch.stack([scores.float() for _, scores, _ in seen], 1))
                probabilities.append(torch.stack([logits.float().softmax(-1) for logits, _, _ in seen], 1))
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(experts), torch.cat(weights), torch.cat(probabilities)


def assert_same_experts(recorded: torch.Tensor, expected: torch.Tensor, probabilities: torch.Tensor) -> None:
    """Equal expert ids, except where the two runs' choices have router probabilities within TIE_GAP."""
    differ = recorded != expected
    if differ.any():
        got = probabilities.gather(-1, recorded)[differ]
        want = probabilities.gather(-1, expected)[differ]
        assert torch.allclose(got, want, atol=TIE_GAP, rtol=0), \
            f"{int(differ.sum())} expert ids differ beyond ties: {recorded[differ]} vs {expected[differ]}"


@pytest.mark.parametrize("family", sorted(MOE_MODELS))
def test_recorded_routing_matches_the_models_own_routers(family):
    model = _load(family)
    calls = _calls(family)
    trace = record_routing(model, calls, name=f"{family}-calibration")
    experts, weights, probabilities = hf_routing(model, calls)
    config = model.config
    tokens = sum(call[0].numel() for call in calls)
    layers = config.num_hidden_layers
    num_experts = getattr(config, "num_local_experts", None) or config.num_experts
    assert (trace.name, trace.tokens, trace.layers, trace.k, trace.num_experts) == \
        (f"{family}-calibration", tokens, layers, config.num_experts_per_tok, num_experts)
    assert trace.experts.dtype == torch.int64 and trace.weights.dtype == torch.float32
    assert_same_experts(trace.experts, experts, probabilities)
    assert_close(trace.weights, weights)


@pytest.mark.parametrize("family, renormalised", [("mixtral", True), ("qwen2_moe", False), ("olmoe", False)])
def test_gate_weights_are_the_ones_the_model_uses(family, renormalised):
    """Mixtral renormalises its top-k probabilities; Qwen2-MoE and OLMoE (norm_topk_prob off) weight by them as
    they are, so their weights sum to less than one."""
    model = _load(family)
    trace = record_routing(model, _calls(family)[:1])
    sums = trace.weights.sum(-1)
    if renormalised:
        assert_close(sums, torch.ones_like(sums))
    else:
        assert (sums < 0.99).all()
    assert (trace.weights[..., :-1] >= trace.weights[..., 1:]).all()  # the router's order, best first


def test_qwen2_moe_with_norm_topk_prob_records_renormalised_weights():
    model = _load("qwen2_moe")
    for router in _routers(model):
        router.norm_topk_prob = True
    calls = _calls("qwen2_moe")[:1]
    trace = record_routing(model, calls)
    experts, weights, probabilities = hf_routing(model, calls)
    assert_same_experts(trace.experts, experts, probabilities)
    assert_close(trace.weights, weights)
    assert_close(trace.weights.sum(-1), torch.ones(trace.tokens, trace.layers))


def test_a_compiled_program_records_the_routing_of_its_final_graph():
    model = _load("mixtral")
    calls = calibration_batches("mixtral", 2, 9, seed=3)
    program = ember.compile(model, calls[0])
    from_program = record_routing(program, calls)
    from_module = record_routing(model, calls)
    assert torch.equal(from_program.experts, from_module.experts)
    assert_close(from_program.weights, from_module.weights)


def test_a_trace_saved_and_loaded_is_the_same(tmp_path):
    trace = record_routing(_load("mixtral"), _calls("mixtral")[:1], name="mixtral-small")
    loaded = load_trace(save_trace(trace, tmp_path / "mixtral.safetensors"))
    assert (loaded.name, loaded.num_experts) == ("mixtral-small", trace.num_experts)
    assert torch.equal(loaded.experts, trace.experts) and torch.equal(loaded.weights, trace.weights)


def test_a_dense_model_has_no_routing_to_record():
    model, inputs = models.load("llama")
    with pytest.raises(PlanError, match="no mixture-of-experts routing found.*topk"):
        record_routing(model, [inputs])


class TopKHead(nn.Module):
    """A linear layer and the top-k of its logits, as a sampling head: a top-k that selects no experts."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 7)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values, indices = self.head(x).softmax(-1).topk(2)
        return values, indices


def test_a_top_k_that_selects_no_experts_is_not_routing():
    with pytest.raises(PlanError, match="1 top-k"):
        record_routing(TopKHead().eval(), [(torch.randn(3, 16),)])


def test_no_calibration_inputs_is_an_error():
    with pytest.raises(PlanError, match="at least one call"):
        record_routing(_load("mixtral"), [])


def test_routers_are_found_in_layer_order():
    model = _load("qwen2_moe")
    from ember.frontend import from_module

    graph = from_module(model, calibration_batches("ember.models:qwen2_moe", 1, 5, seed=0)[0]).graph
    routers = find_routers(graph)
    order = [node.name for node in graph.nodes]
    assert len(routers) == model.config.num_hidden_layers
    assert [order.index(router.node) for router in routers] == sorted(order.index(router.node) for router in routers)
    assert all(f"layers_{layer}_mlp_gate" in _router_weight(graph, router.node) for layer, router in enumerate(routers))


def _router_weight(graph, topk_name: str) -> str:
    """The name of the weight the router matmul before a top-k reads (walking its single chain back)."""
    producer = {value.name: node for node in graph.nodes for value in node.outputs}
    params = {value.name for value in graph.params}
    node = producer[next(node for node in graph.nodes if node.name == topk_name).inputs[0]]
    while node.definition.kind != "matmul":
        node = producer[node.inputs[0]]
    return next(name for name in node.inputs if name in params)


def test_calibration_batches_are_seeded_token_ids_of_the_models_vocabulary():
    first = calibration_batches("mixtral", 3, 17, seed=5)
    again = calibration_batches("mixtral", 3, 17, seed=5)
    other = calibration_batches("mixtral", 3, 17, seed=6)
    vocab_size = models.load("mixtral", device="meta")[0].config.vocab_size
    assert [call[0].shape for call in first] == [torch.Size([2, 17])] * 3
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other))
    tokens = torch.cat([call[0].flatten() for call in first])
    assert tokens.dtype == torch.int64 and 0 <= int(tokens.min()) and int(tokens.max()) < vocab_size


def test_calibration_batches_refuse_a_model_without_tokens():
    with pytest.raises(PlanError, match="not a language model"):
        calibration_batches("mlp", 1, 8, seed=0)
    with pytest.raises(PlanError, match="at most 64 positions"):
        calibration_batches("mixtral", 1, 65, seed=0)
