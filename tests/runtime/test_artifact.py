"""Saved programs: save → load gives the same outputs bit for bit, loading optimizes nothing and runs nothing from
the artifact, and every kind of damage is refused with the file named."""
from __future__ import annotations

import json
import logging
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils import _pytree as pytree

import ember
from ember import models
from ember.runtime import artifact


def _call(program, inputs):
    with torch.no_grad():
        return pytree.tree_leaves(program(*inputs))


def _reseal(directory, device=None):
    """Rewrite the manifest's checksums for the files as they are now: a consistent artifact whose content changed."""
    manifest = json.loads((directory / artifact.MANIFEST).read_text())
    artifact._write_manifest(directory, list(manifest["files"]), device or manifest["device"])


@pytest.fixture(scope="module")
def saved_gpt2(tmp_path_factory):
    model, inputs = models.load("gpt2")
    program = ember.compile(model.eval(), inputs)
    directory = tmp_path_factory.mktemp("gpt2")
    program.save(directory)
    return program, inputs, directory


@pytest.mark.parametrize("name", ["demo", "mlp", "cnn", "unet", "gpt2", "llama", "llama_b1", "mixtral", "bert",
                                  "bert_masked"])
def test_a_loaded_program_gives_the_compiled_programs_outputs_bit_for_bit(name, tmp_path):
    torch.manual_seed(0)
    model, inputs = models.load(name)
    program = ember.compile(model.eval(), inputs)
    expected = _call(program, inputs)
    program.save(tmp_path)
    loaded = ember.load(tmp_path)
    got = _call(loaded, inputs)
    assert len(got) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    with torch.no_grad():
        assert type(loaded(*inputs)) is type(program(*inputs))  # the model's own result structure


@pytest.mark.parametrize("name", ["llama", "bert_masked"])
def test_a_fused_program_regenerates_its_kernels_from_the_saved_plan(name, tmp_path, caplog):
    model, inputs = models.load(name)
    program = ember.compile(model.eval(), inputs, ember.Options(fusion=True))
    assert program.fusion.groups
    program.save(tmp_path)
    saved = sorted(path.name for path in (tmp_path / artifact.KERNELS).iterdir())
    assert saved == sorted(f"{group.name}.py" for group in program.fusion.groups)
    with caplog.at_level(logging.WARNING):
        loaded = ember.load(tmp_path)
    assert "generates other source" not in caplog.text
    assert loaded.fusion == program.fusion and loaded.executor.layout == program.executor.layout
    assert [step.name for step in loaded.executor.schedule.steps] == [step.name for step in program.executor.schedule.steps]
    assert all(torch.equal(a, b) for a, b in zip(_call(loaded, inputs), _call(program, inputs)))


def test_loading_runs_no_pass_no_planner_and_no_unpickling(saved_gpt2, monkeypatch):
    program, inputs, directory = saved_gpt2

    def forbidden(*args, **kwargs):
        raise AssertionError("loading a saved program must not call this")

    from ember.optimizer import arena, fusion, pipeline
    from ember.frontend import export

    for module, name in ((pipeline, "run"), (arena, "plan_arena"), (fusion, "plan_fusion"), (export, "capture"),
                         (pickle, "loads"), (pickle, "load"), (torch, "load")):
        monkeypatch.setattr(module, name, forbidden)
    loaded = ember.load(directory)
    assert all(torch.equal(a, b) for a, b in zip(_call(loaded, inputs), _call(program, inputs)))


def test_the_saved_sample_verifies_and_a_changed_output_fails(saved_gpt2, tmp_path):
    _, _, directory = saved_gpt2
    _, checks = artifact.verify_program(directory)
    assert checks and all(check.ok and check.max_error == 0 for check in checks)
    copy = tmp_path / "copy"
    _copy_tree(directory, copy)
    samples = load_file(copy / artifact.SAMPLES)
    samples["output.0"] = samples["output.0"] + 1e-3
    save_file(samples, copy / artifact.SAMPLES)
    _reseal(copy)
    _, checks = artifact.verify_program(copy)
    assert not checks[0].ok and checks[0].max_error == pytest.approx(1e-3, rel=1e-2)
    assert all(check.ok for check in checks[1:])


def _copy_tree(source, target):
    import shutil

    shutil.copytree(source, target)


@pytest.mark.parametrize("file", [artifact.MANIFEST, artifact.PROGRAM, artifact.WEIGHTS, artifact.SAMPLES])
@pytest.mark.parametrize("where", [0.1, 0.5, 0.9])
def test_a_flipped_byte_in_any_file_is_refused_naming_the_file(saved_gpt2, tmp_path, file, where):
    """Each file is checked before it is read, a block at a time: the error names the file and the bytes."""
    _, _, directory = saved_gpt2
    copy = tmp_path / "copy"
    _copy_tree(directory, copy)
    data = bytearray((copy / file).read_bytes())
    data[int(len(data) * where)] ^= 0x01
    (copy / file).write_bytes(bytes(data))
    with pytest.raises(ember.ArtifactError, match=file.replace(".", r"\.")):
        if file == artifact.SAMPLES:  # read by verify only: loading does not read it
            artifact.verify_program(copy)
        else:
            ember.load(copy)


def test_a_changed_kernel_source_is_refused(tmp_path):
    model, inputs = models.load("demo")
    ember.compile(model.eval(), inputs, ember.Options(fusion=True)).save(tmp_path)
    kernel = next((tmp_path / artifact.KERNELS).iterdir())
    kernel.write_text(kernel.read_text() + "\nimport os\n")
    with pytest.raises(ember.ArtifactError, match=kernel.name):
        ember.load(tmp_path)


def test_a_truncated_or_missing_file_is_refused(saved_gpt2, tmp_path):
    _, _, directory = saved_gpt2
    truncated = tmp_path / "truncated"
    _copy_tree(directory, truncated)
    weights = truncated / artifact.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ember.ArtifactError, match=r"weights\.safetensors: 1000 bytes, not the \d+ the manifest records"):
        ember.load(truncated)
    missing = tmp_path / "missing"
    _copy_tree(directory, missing)
    (missing / artifact.SAMPLES).unlink()
    with pytest.raises(ember.ArtifactError, match=r"samples\.safetensors: missing"):
        ember.load(missing)
    with pytest.raises(ember.ArtifactError, match="not a saved ember program"):
        ember.load(tmp_path / "nowhere")


def test_a_newer_schema_is_refused_with_both_versions(saved_gpt2, tmp_path):
    _, _, directory = saved_gpt2
    copy = tmp_path / "copy"
    _copy_tree(directory, copy)
    manifest = json.loads((copy / artifact.MANIFEST).read_text())
    body = {key: value for key, value in manifest.items() if key != "checksum"}
    body["schema"] = artifact.SCHEMA + 1
    (copy / artifact.MANIFEST).write_text(json.dumps({**body, "checksum": artifact._digest(artifact._canonical(body))}))
    with pytest.raises(ember.ArtifactError, match=rf"schema {artifact.SCHEMA + 1} is newer .* \(schema {artifact.SCHEMA}\)"):
        ember.load(copy)


def test_a_weight_of_the_wrong_shape_or_dtype_is_refused(saved_gpt2, tmp_path):
    _, _, directory = saved_gpt2
    for change, message in ((lambda t: t.t().contiguous() if t.dim() == 2 else t[:-1], "but the graph reads it as"),
                            (lambda t: t.double(), "float64")):
        copy = tmp_path / message.split()[0]
        _copy_tree(directory, copy)
        weights = load_file(copy / artifact.WEIGHTS)
        name = next(key for key, tensor in weights.items() if tensor.dim() == 2 and tensor.shape[0] != tensor.shape[1])
        weights[name] = change(weights[name])
        save_file(weights, copy / artifact.WEIGHTS)
        _reseal(copy)
        with pytest.raises(ember.ArtifactError, match=rf"weight {name} is .*{message}"):
            ember.load(copy)


def test_an_unknown_op_in_the_saved_graph_is_refused(saved_gpt2, tmp_path):
    _, _, directory = saved_gpt2
    copy = tmp_path / "copy"
    _copy_tree(directory, copy)
    description = json.loads((copy / artifact.PROGRAM).read_text())
    description["graph"]["nodes"][0]["op"] = "frobnicate"
    (copy / artifact.PROGRAM).write_text(json.dumps(description))
    _reseal(copy)
    with pytest.raises(ember.ArtifactError, match="op 'frobnicate', which this version of ember does not define"):
        ember.load(copy)


def test_a_program_built_for_a_gpu_is_refused_on_a_machine_without_one(saved_gpt2, tmp_path, monkeypatch):
    _, _, directory = saved_gpt2
    copy = tmp_path / "copy"
    _copy_tree(directory, copy)
    _reseal(copy, {"type": "cuda", "name": "NVIDIA H200", "capability": [9, 0]})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ember.ArtifactError, match=r"built for a GPU \(NVIDIA H200\) and this machine has none"):
        ember.load(copy)
    with pytest.raises(ember.ArtifactError, match="built for cpu"):
        ember.load(directory, device="cuda")


def test_another_gpu_generation_compiles_the_kernels_from_source(monkeypatch, caplog):
    """The device decision alone (no GPU here): a program built on compute capability 9.0 loaded on an 8.0 GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with caplog.at_level(logging.INFO, logger=artifact.__name__):
        target = artifact._load_device({"device": {"type": "cuda", "name": "H200", "capability": [9, 0]}}, None)
    assert target == torch.device("cuda", 0)
    assert "built on compute capability [9, 0], running on [8, 0]: kernels compile for this GPU" in caplog.text


def test_tied_and_strided_weights_are_saved_once_and_restored_as_laid_out(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(11, 6)
            self.head = torch.nn.Linear(6, 11, bias=False)
            self.head.weight = self.embed.weight
            self.register_buffer("columns", torch.randn(6, 5).t(), persistent=False)  # strided

        def forward(self, tokens):
            hidden = self.embed(tokens)
            return self.head(hidden), hidden @ self.columns.t()

    tokens = torch.randint(0, 11, (2, 3))
    program = ember.compile(Tied().eval(), (tokens,))
    program.save(tmp_path)
    saved = load_file(tmp_path / artifact.WEIGHTS)
    assert sum(tensor.shape == (11, 6) for tensor in saved.values()) == 1  # the tied weight, once
    loaded = ember.load(tmp_path)
    for name, tensor in program.graph.weights.items():
        assert torch.equal(loaded.graph.weights[name], tensor)
        assert loaded.graph.weights[name].stride() == tensor.stride()
    assert all(torch.equal(a, b) for a, b in zip(_call(loaded, (tokens,)), _call(program, (tokens,))))


def test_a_model_updating_its_buffer_keeps_doing_so_after_loading(tmp_path):
    class Counter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("count", torch.zeros(3))

        def forward(self, x):
            self.count.add_(x)
            return self.count * 2

    x = torch.ones(3)
    program = ember.compile(Counter(), (x,))
    program.save(tmp_path)
    loaded = ember.load(tmp_path)
    first, second = loaded(x), loaded(x)
    assert torch.equal(second, first + 2)


def test_the_command_line_exports_verifies_runs_and_describes(tmp_path, capsys):
    from ember.cli import main

    directory = tmp_path / "mlp"
    assert main(["-q", "export", "mlp", "--out", str(directory), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "weights.safetensors" in out and "PASS" in out
    assert main(["-q", "verify", str(directory)]) == 0
    samples = load_file(directory / artifact.SAMPLES)
    save_file({key: value for key, value in samples.items() if key.startswith("input.")}, tmp_path / "in.safetensors")
    assert main(["-q", "run", str(directory), "--inputs", str(tmp_path / "in.safetensors")]) == 0
    outputs = load_file(tmp_path / "outputs.safetensors")
    assert torch.equal(outputs["output.0"], samples["output.0"])
    assert main(["-q", "load", str(directory)]) == 0
    assert "saved by ember" in capsys.readouterr().out
    data = bytearray((directory / artifact.PROGRAM).read_bytes())
    data[10] ^= 1
    (directory / artifact.PROGRAM).write_bytes(bytes(data))
    assert main(["-q", "verify", str(directory)]) == 2
    assert "program.json" in capsys.readouterr().err
