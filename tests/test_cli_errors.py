"""Every bad input to the CLI is one clear line on stderr and a non-zero exit; `--debug` shows the traceback."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from ember import cli, models
from ember.cli import main

BAD_MODELS = textwrap.dedent('''
    import torch

    def raises():
        raise RuntimeError("weights not found")

    def needs_arguments(width):
        return torch.nn.Linear(width, width), (torch.randn(2, width),)

    class ScalarOut(torch.nn.Module):
        def forward(self, x):
            return (2 * x).sum().item()

    def scalar_out():
        return ScalarOut(), (torch.randn(3),)

    class DataDependentShape(torch.nn.Module):
        def forward(self, x):
            return torch.ones(int(x.sum().item()) % 5 + 1)

    def data_dependent_shape():
        return DataDependentShape(), (torch.randn(3),)

    def inputs_as_a_list():
        return torch.nn.Linear(4, 3), [torch.randn(2, 4)]

    def wrong_inputs():
        return torch.nn.Linear(4, 3), (torch.randn(2, 5),)
''')


@pytest.fixture
def in_user_directory(tmp_path, monkeypatch):
    """The current directory holds the user's `usermodels.py`, as for `ember demo usermodels:fn` run there."""
    (tmp_path / "usermodels.py").write_text(BAD_MODELS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "usermodels", raising=False)
    yield tmp_path
    sys.modules.pop("usermodels", None)


def test_a_module_in_the_current_directory_is_found(in_user_directory, capsys):
    assert main(["demo", "usermodels:inputs_as_a_list", "--device", "cpu", "--json"]) == 0
    assert '"passed": true' in capsys.readouterr().out


@pytest.mark.parametrize("spec, expected", [
    ("usermodels:raises", "usermodels:raises raised RuntimeError: weights not found"),
    ("usermodels:needs_arguments", "must be callable without arguments"),
    ("usermodels:absent", "usermodels has no function 'absent'"),
    ("nosuchmodule:build", "No module named 'nosuchmodule'"),
    ("nosuchmodel", "unknown model 'nosuchmodel'"),
    ("usermodels:wrong_inputs", "fails on its own example inputs in eager PyTorch"),
    ("usermodels:scalar_out", "such as a tensor's .item()"),
    ("usermodels:data_dependent_shape", "torch.export could not capture DataDependentShape"),
])
def test_a_bad_model_spec_is_one_line(in_user_directory, capsys, spec, expected, one_line_error):
    assert main(["demo", spec, "--device", "cpu"]) == 2
    assert expected in one_line_error()


def test_a_failed_export_does_not_print_torchs_graph(in_user_directory, capsys):
    assert main(["demo", "usermodels:data_dependent_shape", "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert "def forward" not in captured.err + captured.out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line(capsys, one_line_error):
    assert main(["demo", "--device", "cuda"]) == 2
    assert "sees no CUDA GPU: run with --device cpu" in one_line_error()


def test_an_unknown_device_is_one_line(capsys, one_line_error):
    assert main(["demo", "--device", "tpu"]) == 2
    assert "unknown device 'tpu'" in one_line_error()


def test_a_missing_extra_names_it_literally(capsys, monkeypatch, one_line_error):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    assert main(["demo", "gpt2"]) == 2
    assert "pip install 'ember[test]'" in one_line_error()


def test_an_internal_error_is_one_line_and_debug_shows_it(capsys, monkeypatch, one_line_error):
    def broken(args):
        raise KeyError("a bug in ember")

    monkeypatch.setitem(cli.COMMANDS, "demo", broken)
    assert main(["demo"]) == 1
    err = one_line_error()
    assert "internal error: KeyError" in err and "a bug in ember" in err and "--debug" in err
    with pytest.raises(KeyError):
        main(["--debug", "demo"])


def test_a_closed_pipe_ends_quietly(tmp_path):
    reader = subprocess.Popen(["ember", "optimize", "mlp", "--size", "tiny", "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    reader.stdout.close()  # `| head -0`: gone before ember writes a byte
    stderr = reader.stderr.read().decode()
    assert reader.wait(timeout=300) == 141
    assert stderr == ""


def test_help_and_version_load_no_torch():
    script = ("import sys\nfrom ember.cli import main\n"
              "for argv in (['--help'], ['--version'], ['demo', '--help']):\n"
              "    try:\n        main(argv)\n    except SystemExit as exit_:\n        assert exit_.code == 0\n"
              "assert 'torch' not in sys.modules, 'ember --help imported torch'\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "ember " in result.stdout and "(torch " in result.stdout


def test_the_cli_knows_every_builtin_model():
    assert cli.BUILTIN_MODELS == tuple(models.BUILTIN) and cli.SIZES == models.SIZES


def test_the_transformers_demos_raise_no_config_warnings(capsys, caplog):
    pytest.importorskip("transformers")
    assert main(["demo", "gpt2", "--device", "cpu", "--json"]) == 0
    captured = capsys.readouterr()
    assert "token_id" not in captured.err + caplog.text
