"""transformers decoders as shipped (use_cache=True) compile through both entry points and return their KV cache.

The program's result is the model's own type, its cache a transformers DynamicCache whose keys and values per
layer equal eager's, and its logits eager's within tolerance. Tiny configs, random weights, CPU.
"""
from __future__ import annotations

import inspect

import pytest
import torch

import ember
from ember.tolerance import assert_close

transformers = pytest.importorskip("transformers")
from transformers.cache_utils import DynamicCache  # noqa: E402

VOCAB = 97


def tiny_llama() -> torch.nn.Module:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))


def tiny_gpt2() -> torch.nn.Module:
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1))


def tiny_mixtral() -> torch.nn.Module:
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64))


DECODERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "mixtral": tiny_mixtral}


def layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer, from transformers' layered caches (4.54 on) or the older key/value lists."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def cache_of(output) -> DynamicCache:
    """The cache a model returned: `cache` in transformers 5's outputs, `past_key_values` before."""
    return output["cache"] if "cache" in output.keys() else output["past_key_values"]


def with_cache(model: torch.nn.Module, input_ids: torch.Tensor, cache: DynamicCache):
    """One decoding step from `cache`, by whichever keyword this transformers' forward takes it."""
    keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return model(input_ids, **{keyword: cache})


def assert_same_result(actual, expected) -> None:
    assert type(actual) is type(expected)
    assert_close(actual.logits, expected.logits)
    assert type(cache_of(actual)) is DynamicCache
    assert type(cache_of(expected)) is DynamicCache
    actual_layers, expected_layers = layers(cache_of(actual)), layers(cache_of(expected))
    assert len(actual_layers) == len(expected_layers) > 0
    for (keys, values), (expected_keys, expected_values) in zip(actual_layers, expected_layers):
        assert_close(keys, expected_keys)
        assert_close(values, expected_values)


@pytest.mark.parametrize("name", DECODERS)
def test_default_config_decoder_returns_its_cache_through_ember_compile(name):
    model = DECODERS[name]().eval()
    assert model.config.use_cache
    input_ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        program = ember.compile(model, (input_ids,))
        assert_same_result(program(input_ids), model(input_ids))
        fresh = torch.randint(0, VOCAB, (2, 7))
        assert_same_result(program(fresh), model(fresh))


@pytest.mark.parametrize("name", DECODERS)
def test_default_config_decoder_returns_its_cache_through_the_backend(name, compiled_programs):
    model = DECODERS[name]().eval()
    input_ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        assert_same_result(torch.compile(model, backend="ember")(input_ids), model(input_ids))
    assert compiled_programs, "ember compiled nothing: the backend fell back to eager"


def test_cache_from_one_call_feeds_the_next_eager_step():
    """The returned cache is a working DynamicCache: eager decoding continues from it as from its own."""
    model = tiny_llama().eval()
    prompt, step = torch.randint(0, VOCAB, (2, 7)), torch.randint(0, VOCAB, (2, 1))
    with torch.no_grad():
        compiled = ember.compile(model, (prompt,))(prompt)
        expected = with_cache(model, step, cache_of(model(prompt)))
        actual = with_cache(model, step, cache_of(compiled))
    assert_same_result(actual, expected)


def test_cache_passed_in_runs_or_is_a_compile_error_naming_the_backend():
    """A cache passed in compiles and matches eager, or (where torch's retrace of the rebuilt cache loses its
    constants, as with transformers 5) ember.compile says so and names the entry point that takes it."""
    model = tiny_llama().eval()
    prompt, step = torch.randint(0, VOCAB, (2, 7)), torch.randint(0, VOCAB, (2, 1))
    keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        try:
            program = ember.compile(model, {"input_ids": step, keyword: cache_of(model(prompt))})
        except ember.CompileError as error:
            assert "DynamicCache passed in" in str(error) and 'backend="ember"' in str(error)
            return
        assert_same_result(program(input_ids=step, **{keyword: cache_of(model(prompt))}),
                           with_cache(model, step, cache_of(model(prompt))))


def recording_outputs(program: ember.Program, monkeypatch) -> list:
    """The flat outputs of each of the program's calls from now on, as its executor made them, in a list."""
    made = []
    run = type(program.executor).__call__
    monkeypatch.setattr(type(program.executor), "__call__",
                        lambda executor, tensors: made.append(run(executor, tensors)) or made[-1])
    return made


def test_the_returned_cache_holds_the_programs_tensors_not_copies(monkeypatch):
    """transformers rebuilds a DynamicCache by `update`, a cat per layer: a copy of the whole cache per call.
    ember's cache holds the tensors its program made."""
    model = tiny_llama().eval()
    input_ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        program = ember.compile(model, (input_ids,))
        made = recording_outputs(program, monkeypatch)
        result = program(input_ids)
    pointers = {tensor.data_ptr() for tensor in made[-1]}
    cache_layers = layers(cache_of(result))
    assert cache_layers and all(keys.data_ptr() in pointers and values.data_ptr() in pointers
                                for keys, values in cache_layers)
    assert_same_result(result, model(input_ids))


def tiny_gemma2() -> torch.nn.Module:
    """Sliding-window layers (a window of 4 on 7 tokens, so that they keep only the last 3) between global ones."""
    return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=4, max_position_embeddings=64))


def test_a_sliding_window_cache_holds_the_programs_tensors_as_transformers_would_rebuild_it(monkeypatch):
    """A sliding-window layer also counts the tokens it was given and keeps the last window - 1: ember's cache
    holds views of the program's tensors, equal in every attribute to transformers' own rebuild (which copies
    them), and decoding continues from it as from that rebuild."""
    from torch.utils import _pytree as pytree

    from ember.results import _same_layers

    model = tiny_gemma2().eval()
    prompt, step = torch.randint(0, VOCAB, (2, 7)), torch.randint(0, VOCAB, (2, 1))
    with torch.no_grad():
        program = ember.compile(model, (prompt,))
        made = recording_outputs(program, monkeypatch)
        result = program(prompt)
        cache = cache_of(result)
        rebuilt = cache_of(pytree.tree_unflatten(list(made[-1]), program.out_spec))
        kinds = {type(layer).__name__ for layer in cache.layers}
        assert kinds == {"DynamicLayer", "DynamicSlidingWindowLayer"}, kinds
        storages = {tensor.untyped_storage().data_ptr() for tensor in made[-1]}
        assert all(layer.keys.untyped_storage().data_ptr() in storages for layer in cache.layers)
        assert _same_layers(cache, rebuilt)
        assert min(layer.keys.shape[-2] for layer in cache.layers) == 3
        assert_same_result(with_cache(model, step, cache), with_cache(model, step, rebuilt))


def test_each_call_returns_a_cache_of_its_own_that_the_model_can_extend():
    """Every call's cache is a new object holding that call's tensors: extending one (the next decoding step)
    leaves the other calls' caches alone, and the extended cache gives eager's next step."""
    model = tiny_llama().eval()
    prompt, more = torch.randint(0, VOCAB, (2, 7)), torch.randint(0, VOCAB, (2, 1))
    with torch.no_grad():
        program = ember.compile(model, (prompt,))
        first, second = program(prompt), program(prompt)
        first_cache, second_cache = cache_of(first), cache_of(second)
        assert first_cache is not second_cache and first_cache.layers[0] is not second_cache.layers[0]
        before = [(keys.clone(), values.clone()) for keys, values in layers(second_cache)]
        stepped = model(more, past_key_values=first_cache)
        expected = model(more, past_key_values=cache_of(model(prompt)))
    assert first_cache.get_seq_length() == 8 and second_cache.get_seq_length() == 7
    assert all(torch.equal(keys, old_keys) and torch.equal(values, old_values)
               for (keys, values), (old_keys, old_values) in zip(layers(second_cache), before))
    assert_same_result(stepped, expected)


def test_a_cache_without_layers_is_rebuilt_by_transformers_itself():
    """Older transformers keep a DynamicCache's tensors in lists, not layers: no template, transformers rebuilds it."""
    from types import SimpleNamespace

    from ember.results import _cache_template

    keys, values = [torch.randn(1, 2, 3, 4)], [torch.randn(1, 2, 3, 4)]
    built = SimpleNamespace(key_cache=keys, value_cache=values)
    assert _cache_template([keys, values], (["key_cache", "value_cache"], None), lambda children, context: built) is None
