"""Routing traces: the shared JSON and ember's safetensors formats, transition counts against a brute-force count,
and the seeded synthetic traces whose affinity the placement search should find."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ember.errors import PlanError
from ember.optimizer.expert_placement import plan_placement
from ember.optimizer.moe_traces import (RoutingTrace, load_trace, loads, save_trace, synthetic_trace,
                                        transitions)

MIXTRAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "moe_traces" / "mixtral"
needs_shared = pytest.mark.skipif(not MIXTRAL.exists(), reason="shared/data/moe_traces is beside the checkout in CI")


def _random_experts(tokens: int, layers: int, k: int, num_experts: int, seed: int) -> torch.Tensor:
    """int64 [tokens, layers, k]: distinct experts per token and layer, uniformly drawn."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(tokens, layers, num_experts, generator=generator).argsort(-1)[..., :k]


def _write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


# ---- loading and saving ----------------------------------------------------------------------------------------

def test_json_trace_is_tokens_by_layers_by_k_with_layers_in_numeric_order(tmp_path):
    experts = _random_experts(5, 12, 2, 7, seed=1)
    data = {str(layer): experts[:, layer].tolist() for layer in reversed(range(12))}   # "10" sorts before "2" as text
    trace = load_trace(_write_json(tmp_path / "coding.json", data))
    assert (trace.tokens, trace.layers, trace.k) == (5, 12, 2)
    assert trace.experts.dtype == torch.int64 and trace.weights is None
    assert trace.name == "coding" and trace.num_experts == int(experts.max()) + 1
    for layer in range(12):
        for token in range(5):
            assert trace.experts[token, layer].tolist() == data[str(layer)][token]


def test_json_trace_with_one_expert_per_token_has_k_one(tmp_path):
    trace = load_trace(_write_json(tmp_path / "top1.json", {"0": [3, 1, 2], "1": [0, 0, 4]}))
    assert tuple(trace.experts.shape) == (3, 2, 1)
    assert trace.experts[:, :, 0].tolist() == [[3, 0], [1, 0], [2, 4]]


def test_json_num_experts_may_be_given(tmp_path):
    path = _write_json(tmp_path / "t.json", {"0": [[0, 1]], "1": [[1, 2]]})
    assert load_trace(path).num_experts == 3
    assert load_trace(path, num_experts=8).num_experts == 8


@pytest.mark.parametrize("with_weights", [True, False])
def test_safetensors_round_trip_keeps_experts_weights_name_and_expert_count(tmp_path, with_weights):
    experts = _random_experts(9, 3, 2, 6, seed=2)
    weights = torch.rand(9, 3, 2) if with_weights else None
    trace = RoutingTrace("recorded", experts, 10, weights)   # more experts than the ids show
    path = save_trace(trace, tmp_path / "nested" / "trace.safetensors")
    loaded = load_trace(path)
    assert loaded.name == "recorded" and loaded.num_experts == 10
    assert loaded.experts.dtype == torch.int64 and torch.equal(loaded.experts, experts)
    if with_weights:
        assert torch.equal(loaded.weights, weights)
    else:
        assert loaded.weights is None


def _not_a_trace(tmp_path: Path) -> Path:
    path = tmp_path / "other.safetensors"
    save_file({"experts": torch.zeros(2, 2, 1, dtype=torch.int64)}, str(path), metadata={"format": "something"})
    return path


def _garbage(tmp_path: Path) -> Path:
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"\x07\x00\x00\x00\x00\x00\x00\x00not a header at all")
    return path


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "absent.json", "no routing trace at"),
    (lambda tmp: tmp / "absent.safetensors", "no routing trace at"),
    (lambda tmp: tmp, "no routing trace at"),   # a directory
    (lambda tmp: _write_text(tmp / "bad.json", "{not json"), "not valid JSON"),
    (lambda tmp: _write_bytes(tmp / "binary.json", b"\xff\xfe\x00"), "not valid JSON"),
    (lambda tmp: _write_json(tmp / "list.json", [[0, 1]]), "object from layer index"),
    (lambda tmp: _write_json(tmp / "empty.json", {}), "object from layer index"),
    (lambda tmp: _write_json(tmp / "ragged.json", {"0": [[0, 1], [1, 2]], "1": [[0, 1]]}), "same number of tokens"),
    (lambda tmp: _write_json(tmp / "mixed_k.json", {"0": [[0, 1]], "1": [[0]]}), "same number"),
    (lambda tmp: _write_json(tmp / "names.json", {"first": [[0, 1]]}), "layer"),
    (lambda tmp: _write_json(tmp / "deep.json", {"0": [[[0, 1]]]}), "expected [layers][tokens][k]"),
    (lambda tmp: _write_json(tmp / "negative.json", {"0": [[0, -1]]}), "expert ids must lie in"),
    (_garbage, "not a routing trace"),
    (_not_a_trace, "not an ember routing trace"),
])
def test_a_bad_trace_file_is_a_plan_error(tmp_path, make, message):
    with pytest.raises(PlanError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_trace(make(tmp_path))


@pytest.mark.parametrize("data", [{"0": [], "1": []}, {"0": [[]], "1": [[]]}])
def test_a_json_trace_without_expert_ids_is_a_plan_error(tmp_path, data):
    """Nothing tells how many experts there are: a PlanError, not an internal error from an empty max()."""
    with pytest.raises(PlanError):
        load_trace(_write_json(tmp_path / "empty_layers.json", data))


@pytest.mark.parametrize("data, message", [
    ({"0": [[0.5, 1]], "1": [[1, 2]]}, "must be integers"),
    ({"0": [[True, False]], "1": [[True, False]]}, "must be integers"),
    ({"0": [[0, 1]], "2": [[1, 2]]}, "none missing"),
])
def test_a_json_trace_with_loose_ids_or_missing_layers_is_a_plan_error(tmp_path, data, message):
    """Fractional or boolean ids are not silently truncated, and a missing layer is not silently skipped."""
    with pytest.raises(PlanError, match=message):
        load_trace(_write_json(tmp_path / "loose.json", data))


def test_more_ids_than_the_given_expert_count_is_a_plan_error(tmp_path):
    path = _write_json(tmp_path / "t.json", {"0": [[0, 5]]})
    with pytest.raises(PlanError, match=r"\[0, 4\)"):
        load_trace(path, num_experts=4)
    saved = save_trace(RoutingTrace("t", torch.tensor([[[0, 5]]]), 6), tmp_path / "t.safetensors")
    with pytest.raises(PlanError, match="expert ids must lie in"):
        load_trace(saved, num_experts=4)


@pytest.mark.parametrize("experts, weights, message", [
    (torch.zeros(4, 2, dtype=torch.int64), None, "integer tensor"),
    (torch.zeros(4, 2, 1), None, "integer tensor"),                      # float ids
    (torch.full((4, 2, 1), 3), None, "expert ids must lie in"),
    (torch.zeros(4, 2, 2, dtype=torch.int64), torch.rand(4, 2, 1), "weights of shape"),
])
def test_a_malformed_trace_is_a_plan_error(experts, weights, message):
    with pytest.raises(PlanError, match=message):
        RoutingTrace("bad", experts, 3, weights)


def _write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ---- transitions and loads -------------------------------------------------------------------------------------

def _brute_transitions(traces: list[RoutingTrace], k: int) -> torch.Tensor:
    layers, num_experts = traces[0].layers, traces[0].num_experts
    counts = torch.zeros(layers - 1, num_experts, num_experts, dtype=torch.float64)
    for trace in traces:
        experts = trace.experts.tolist()
        for token in experts:
            for layer in range(layers - 1):
                for i in token[layer][:k]:
                    for j in token[layer + 1][:k]:
                        counts[layer, i, j] += 1
    return counts


@pytest.mark.parametrize("k", [1, 2, 3])
def test_transitions_equal_a_brute_force_count_summed_over_traces(k):
    traces = [RoutingTrace("a", _random_experts(37, 5, 3, 7, seed=3), 7),
              RoutingTrace("b", _random_experts(11, 5, 3, 7, seed=4), 7)]
    counts = transitions(traces, k)
    assert counts.dtype == torch.float64 and tuple(counts.shape) == (4, 7, 7)
    assert torch.equal(counts, _brute_transitions(traces, k))
    assert float(counts.sum()) == 48 * 4 * k * k


def test_transitions_of_a_non_contiguous_expert_tensor():
    experts = _random_experts(13, 4, 2, 5, seed=5).transpose(0, 1).contiguous().transpose(0, 1)
    assert not experts.is_contiguous()
    trace = RoutingTrace("strided", experts, 5)
    assert torch.equal(transitions([trace], 2), _brute_transitions([trace], 2))


def test_transitions_of_a_single_layer_trace_are_empty():
    """[layers - 1, E, E] is [0, E, E] for one MoE layer: nothing crosses between layers."""
    trace = RoutingTrace("one layer", _random_experts(6, 1, 2, 4, seed=6), 4)
    counts = transitions([trace], 2)
    assert tuple(counts.shape) == (0, 4, 4)


def test_loads_count_each_tokens_experts():
    trace = RoutingTrace("a", _random_experts(23, 3, 2, 5, seed=7), 5)
    expected = torch.zeros(3, 5, dtype=torch.float64)
    expected_top1 = torch.zeros(3, 5, dtype=torch.float64)
    for token in trace.experts.tolist():
        for layer, chosen in enumerate(token):
            expected_top1[layer, chosen[0]] += 1
            for expert in chosen:
                expected[layer, expert] += 1
    assert torch.equal(loads([trace]), expected)
    assert torch.equal(loads([trace, trace], k=1), 2 * expected_top1)


def test_traces_that_differ_in_shape_are_a_plan_error():
    a = RoutingTrace("a", _random_experts(4, 3, 2, 5, seed=8), 5)
    b = RoutingTrace("b", _random_experts(4, 2, 2, 5, seed=8), 5)
    c = RoutingTrace("c", _random_experts(4, 3, 2, 5, seed=8), 6)
    for pair in ([a, b], [a, c]):
        with pytest.raises(PlanError, match="differ in layers or experts"):
            transitions(pair)
    with pytest.raises(PlanError, match="no routing traces"):
        transitions([])


# ---- synthetic traces ------------------------------------------------------------------------------------------

def test_synthetic_trace_is_seeded():
    first = synthetic_trace(16, 5, 2, 300, 0.6, seed=3)
    again = synthetic_trace(16, 5, 2, 300, 0.6, seed=3)
    other = synthetic_trace(16, 5, 2, 300, 0.6, seed=4)
    assert torch.equal(first.experts, again.experts)
    assert not torch.equal(first.experts, other.experts)


@pytest.mark.parametrize("num_experts, k, affinity, skew", [(8, 2, 0.9, 1.0), (6, 3, 1.0, 2.0), (5, 5, 0.5, 0.0),
                                                           (7, 1, 0.7, 1.0)])
def test_synthetic_trace_experts_are_distinct_and_in_range(num_experts, k, affinity, skew):
    trace = synthetic_trace(num_experts, 4, k, 400, affinity, skew=skew, seed=1)
    assert tuple(trace.experts.shape) == (400, 4, k) and trace.num_experts == num_experts
    assert int(trace.experts.min()) >= 0 and int(trace.experts.max()) < num_experts
    ordered = trace.experts.sort(-1).values
    assert bool((ordered[..., 1:] != ordered[..., :-1]).all())


def test_higher_affinity_gives_a_lower_exact_optimum():
    shares = [plan_placement([synthetic_trace(8, 4, 2, 1500, affinity, seed=2)], 2, method="exact").fitted_cost
              for affinity in (0.0, 0.5, 0.95)]
    assert shares[0] > shares[1] > shares[2]
    assert shares[0] > 0.3 and shares[2] < 0.2


@pytest.mark.parametrize("args", [(8, 4, 2, 10, 1.5), (8, 4, 2, 10, -0.1), (4, 4, 5, 10, 0.5), (8, 0, 2, 10, 0.5),
                                  (8, 4, 2, 0, 0.5)])
def test_synthetic_trace_rejects_bad_arguments(args):
    with pytest.raises(PlanError, match="synthetic trace"):
        synthetic_trace(*args)


# ---- the shared real traces ------------------------------------------------------------------------------------

@needs_shared
def test_shared_mixtral_trace_loads_token_by_token():
    path = MIXTRAL / "math.json"
    data = json.loads(path.read_text())
    trace = load_trace(path)
    tokens = len(data["0"])
    assert (trace.tokens, trace.layers, trace.k, trace.num_experts) == (tokens, 32, 2, 8)
    generator = torch.Generator().manual_seed(0)
    for token, layer in zip(torch.randint(tokens, (200,), generator=generator).tolist(),
                            torch.randint(32, (200,), generator=generator).tolist()):
        assert trace.experts[token, layer].tolist() == data[str(layer)][token]
    sliced = RoutingTrace("math[:4]", trace.experts[:, :4], 8)
    exact = plan_placement([sliced], 2, method="exact")
    contiguous = plan_placement([sliced], 2, method="contiguous")
    assert exact.status == "optimal" and exact.fitted_cost < contiguous.fitted_cost
