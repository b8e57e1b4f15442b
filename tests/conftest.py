"""Shared fixtures: deterministic seeds, a fresh dynamo cache, a spy on the programs ember builds, the CLI's one-line
error; hypothesis profiles."""
from __future__ import annotations

import os
import tempfile

# Generated Triton kernels run in Triton's interpreter on the CPU (set before anything imports triton),
# and are cached in a directory of this run's own.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("EMBER_CACHE_DIR", tempfile.mkdtemp(prefix="ember-test-cache-"))

import pytest
import torch
from hypothesis import settings

# CI replays a fixed set of examples (a red CI must be reproducible); local runs keep exploring.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _fresh_state():
    torch.manual_seed(0)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def compiled_programs(monkeypatch):
    """The Programs that ember builds during the test, in order (the torch.compile path included)."""
    import ember.api

    programs = []
    original = ember.api.compile_graph

    def spy(*args, **kwargs):
        program = original(*args, **kwargs)
        programs.append(program)
        return program

    monkeypatch.setattr(ember.api, "compile_graph", spy)
    return programs


@pytest.fixture
def one_line_error(capsys):
    """Reads what the CLI wrote to stderr and checks it is one `error: ` line without a traceback."""
    def read() -> str:
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert err.startswith("error: ") and "Traceback" not in err
        return err
    return read
