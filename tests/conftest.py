"""Shared fixtures: deterministic seeds, a fresh dynamo cache, and a spy on the programs ember builds."""
from __future__ import annotations

import pytest
import torch


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
