"""The ffn gate (FFN-SkipLLM in decode steps, decided on the device): a tiny transformers Llama decoding greedily
with a static cache through torch.compile gives the eager model's tokens and KV cache under the same gate as hooks
(optimizer.ffn_gate.reference_gate), the full model's when the gate never opens; prefill graphs stay ungated; bad
configs and a graph without the token's position are clear CompileErrors. Random weights, CPU."""
from __future__ import annotations

import pytest
import torch

import ember
from ember.errors import CompileError
from ember.frontend import from_module
from ember.optimizer.ffn_gate import FFNGate, gate_ffns, reference_gate
from ember.options import Options
from ember.tolerance import assert_close

transformers = pytest.importorskip("transformers")

VOCAB, LAYERS, PROMPT, NEW = 128, 6, 5, 8
GATE = FFNGate(threshold=0.9984, cold=1, warmup=6)
"""Where this seed's cosines (0.991 to 0.9992) have the gate both open and shut past warm-up."""


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)).eval()


def decode(model: torch.nn.Module, options: dict | None = None):
    """Greedy decoding with a static cache, eagerly or (given options) through ember: (tokens, the cache's layers,
    the logits of each step)."""
    torch.manual_seed(1)
    prompt = torch.randint(0, VOCAB, (1, PROMPT))
    if options is not None:
        model.forward = torch.compile(model.forward, backend="ember", options=options)
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=NEW, do_sample=False, cache_implementation="static",
                             return_dict_in_generate=True, output_logits=True)
    cache = out["cache"] if "cache" in out.keys() else out["past_key_values"]
    return (out.sequences, [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers],
            torch.stack(out.logits))


def reference_decode(gate: FFNGate):
    """The eager model's decoding with the gate as hooks; also the gate's decisions per decode step."""
    model = tiny_llama()
    state = reference_gate(model, gate)
    tokens, cache, logits = decode(model)
    for handle in state["handles"]:
        handle.remove()
    return tokens, cache, logits, state["skipped"]


def ops(program) -> set[str]:
    return {node.op for node in program.graph.nodes}


@pytest.fixture(scope="module")
def gated_runs():
    """The compiled and the reference-gated decoding at GATE, with the compiled programs (prefill, then decode)."""
    import ember.api

    programs, original = [], ember.api.compile_graph
    ember.api.compile_graph = lambda *args, **kwargs: programs.append(original(*args, **kwargs)) or programs[-1]
    try:
        torch._dynamo.reset()
        compiled = decode(tiny_llama(), {"ffn_gate": GATE})
    finally:
        ember.api.compile_graph = original
        torch._dynamo.reset()
    return compiled, reference_decode(GATE), programs


def test_gated_decoding_gives_the_reference_gates_tokens(gated_runs):
    (tokens, _, logits), (expected_tokens, _, expected_logits, skipped), programs = gated_runs
    past_warmup = [step for offset, step in enumerate(skipped, start=PROMPT) if offset >= GATE.warmup]
    decided = [skip for step in past_warmup for skip in step[GATE.cold: LAYERS - GATE.cold]]
    assert any(decided) and not all(decided), skipped  # the gate both opened and stayed shut
    assert not any(skip for step in skipped for skip in step[:GATE.cold] + step[LAYERS - GATE.cold:])
    assert torch.equal(tokens, expected_tokens)
    assert_close(logits, expected_logits)
    full_logits = decode(tiny_llama())[2]
    assert (logits - full_logits).abs().max() > 100 * (logits - expected_logits).abs().max()  # skipping did something
    assert "gated_linears" in ops(programs[-1])
    assert programs[-1].report.ffn_gate == {"threshold": GATE.threshold, "cold": GATE.cold, "warmup": GATE.warmup,
                                          "replay": ()}


def test_the_kv_cache_is_complete_and_the_reference_gates(gated_runs):
    """Attention always runs: every layer's keys and values are written for every position fed to the model."""
    (_, cache, _), (_, expected_cache, _, _), _ = gated_runs
    fed = PROMPT + NEW - 1  # the last token decoded is never fed back
    assert len(cache) == len(expected_cache) == LAYERS
    for (keys, values), (expected_keys, expected_values) in zip(cache, expected_cache):
        for written in (keys, values):
            assert written[:, :, :fed].abs().amax(dim=(0, 1, 3)).gt(0).all()
            assert not written[:, :, fed:].any()
        assert_close(keys, expected_keys)
        assert_close(values, expected_values)


def test_a_gate_that_never_opens_is_the_full_model(compiled_programs):
    tokens, cache, logits = decode(tiny_llama(), {"ffn_gate": FFNGate(threshold=1.5, cold=1, warmup=0)})
    expected_tokens, expected_cache, expected_logits = decode(tiny_llama())
    assert torch.equal(tokens, expected_tokens)
    assert_close(logits, expected_logits)
    for (keys, values), (expected_keys, expected_values) in zip(cache, expected_cache):
        assert_close(keys, expected_keys)
        assert_close(values, expected_values)
    assert "gated_linears" in ops(compiled_programs[-1])


def test_a_replay_skips_what_it_recorded_and_keeps_the_cache_whole():
    """Replayed decisions (a string per position) give the eager model's tokens and cache under the same replay."""
    replay = tuple("".join("1" if (position + layer) % 3 == 0 and layer > 0 else "0" for layer in range(LAYERS))
                   for position in range(PROMPT + NEW - 2))  # the last step fed runs past the replay: nothing skipped
    gate = FFNGate(threshold=0.0, replay=replay)
    torch._dynamo.reset()
    tokens, cache, logits = decode(tiny_llama(), {"ffn_gate": gate})
    torch._dynamo.reset()
    expected_tokens, expected_cache, expected_logits, skipped = reference_decode(gate)
    assert [any(step) for step in skipped] == [True] * (NEW - 2) + [False]
    assert torch.equal(tokens, expected_tokens)
    assert_close(logits, expected_logits)
    for (keys, values), (expected_keys, expected_values) in zip(cache, expected_cache):
        assert_close(keys, expected_keys)
        assert_close(values, expected_values)
    assert (logits - decode(tiny_llama())[2]).abs().max() > 1e-3  # the replay skipped something


@pytest.mark.parametrize(("replay", "words"), [(("0101", "01"), "of one length"), (("01x",), "strings of 0 and 1")])
def test_a_bad_replay_is_a_compile_error(replay, words):
    with pytest.raises(CompileError, match=words):
        FFNGate(0.9, replay=replay)


def test_a_replay_of_another_models_width_is_a_compile_error():
    graph = from_module(tiny_llama(), (torch.randint(0, VOCAB, (1, 1)), torch.tensor([[3]]))).graph
    with pytest.raises(CompileError, match="2 decisions per position, and the graph has 6 feed-forwards"):
        gate_ffns(graph, FFNGate(0.9, replay=("01",)))


def test_a_prefill_graph_is_left_ungated(gated_runs):
    prefill = gated_runs[2][0]
    assert "gated_linears" not in ops(prefill)
    assert not any(node.name.startswith("ffn_gate") for node in prefill.graph.nodes)


def test_a_decode_graph_gates_every_ffn_but_the_cold_ones():
    model = tiny_llama()
    graph = from_module(model, (torch.randint(0, VOCAB, (1, 1)),)).graph
    gated = gate_ffns(graph, FFNGate(threshold=0.5, cold=2, warmup=0))
    gated.verify()
    nodes = [node for node in gated.nodes if node.op == "gated_linears"]
    assert len(nodes) == 2 * (LAYERS - 4)  # gate and up joined, then down, in each of the middle two
    assert sorted(len(node.outputs) for node in nodes) == [1, 1, 2, 2]
    ffn_linears = [node.inputs[1] for node in gated.nodes if node.op == "linear" and "_mlp_" in node.inputs[1]]
    assert len(ffn_linears) == 3 * 4 and not any(f"layers_{i}_" in name for name in ffn_linears for i in (2, 3))


@pytest.mark.parametrize(("config", "words"), [
    ({"threshold": "high"}, "threshold must be a number"),
    ({"threshold": 0.9, "cold": -1}, "cold must be a whole number"),
    ({"threshold": 0.9, "warmup": 1.5}, "warmup must be a whole number"),
    ({"cold": 2}, "threshold (required)"),
    ({"threshold": 0.9, "layers": 3}, "threshold (required), cold, warmup and replay"),
])
def test_a_bad_config_is_a_compile_error(config, words):
    with pytest.raises(CompileError, match=words.replace("(", r"\(").replace(")", r"\)")):
        Options(ffn_gate=config)


def test_options_take_the_gate_as_a_dict_and_nothing_else():
    assert ember.FFNGate is FFNGate
    assert Options(ffn_gate={"threshold": 0.95}).ffn_gate == FFNGate(0.95)
    assert Options().ffn_gate is None
    with pytest.raises(CompileError, match="FFNGate or a dict"):
        Options(ffn_gate=0.95)


def test_warmup_without_the_tokens_position_is_a_compile_error():
    model, step = tiny_llama(), torch.randint(0, VOCAB, (1, 1))
    with torch.no_grad():
        with pytest.raises(CompileError, match="cache_position"):
            ember.compile(model, (step,), {"ffn_gate": FFNGate(0.9, cold=1, warmup=4)})
        program = ember.compile(model, (step,), {"ffn_gate": FFNGate(0.9, cold=1, warmup=0)})
    assert "gated_linears" in ops(program)


@pytest.mark.parametrize("threshold", [-2.0, 2.0])
def test_a_gated_decode_step_exports_to_onnx_and_runs_as_ember_runs_it(threshold, tmp_path):
    """gated_linears maps back to a linear per weight and a where on the flag: onnxruntime gives ember's logits with
    the gate open everywhere past the first feed-forward (-2: every cosine passes) and shut (2: none does)."""
    pytest.importorskip("onnxscript", reason="torch's ONNX exporter translates with onnxscript")
    from ember.codegen.onnx import export_onnx
    from ember.codegen.onnx_verify import verify_onnx

    model, step = tiny_llama(), torch.randint(0, VOCAB, (1, 1))
    with torch.no_grad():
        program = ember.compile(model, (step,), {"ffn_gate": FFNGate(threshold, cold=1, warmup=0)})
        full = model(step).logits
    inputs = program.tensor_inputs(step)
    expected = program.run(inputs)
    written = export_onnx(program.graph, tmp_path / "gated.onnx")
    result = verify_onnx(written.path, inputs, expected, language_model=True)
    assert written.decomposed["gated_linears"] == 2 * (LAYERS - 2) and result.ok and result.argmax_agreement == 1.0
    skipped = (expected[0] - full).abs().max() > 1e-3
    assert skipped == (threshold < 0)
