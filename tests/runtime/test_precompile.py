"""Kernels are compiled at compile time, all at once, as their launches will want them (no GPU: Triton is faked)."""
from __future__ import annotations

import contextlib
import logging

import torch
from triton.runtime._async_compile import active_mode

import ember
from ember import models
from ember.codegen import GroupKernel, kernels, precompile


class FakeJit:
    """Stands for a @triton.jit function: records each warm-up, and whether Triton's async compile mode was on."""

    def __init__(self, calls: list, fails: bool = False):
        self.calls, self.fails = calls, fails

    def warmup(self, *args, grid, **kwargs):
        if self.fails:
            raise RuntimeError("no such kernel")
        self.calls.append((args, grid, kwargs, active_mode.get() is not None))


def _work():
    program = ember.compile(*models.load("gpt2"), {"fusion": True})
    return program.graph, [step for step in program.executor.work if isinstance(step, GroupKernel)]


def test_every_kernel_is_compiled_once_for_the_dtypes_and_meta_parameters_it_is_launched_with(monkeypatch):
    graph, work = _work()
    calls = []
    monkeypatch.setattr(kernels, "load_kernel", lambda name, source: FakeJit(calls))
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    types = graph.types()
    precompile(work, types, torch.device("cuda", 0))
    assert len(calls) == len(work) > 5
    for step, (args, grid, kwargs, in_async_mode) in zip(work, calls):
        source = step.kernel.source
        dtypes = [types[name].dtype for name in source.inputs] + [types[name].dtype for name in source.outputs]
        assert list(args) == [*dtypes, *source.scalars]
        assert grid == (source.programs,)
        assert kwargs == {**dict(source.constants), "num_warps": source.num_warps}
        assert in_async_mode


def test_a_kernel_that_does_not_precompile_is_left_to_its_launch(monkeypatch, caplog):
    graph, work = _work()
    calls = []
    failing = work[1].kernel.source.name
    monkeypatch.setattr(kernels, "load_kernel", lambda name, source: FakeJit(calls, fails=name == failing))
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    with caplog.at_level(logging.WARNING, logger="ember.codegen.kernels"):
        precompile(work, graph.types(), torch.device("cuda", 0))
    assert len(calls) == len(work) - 1
    assert f"kernel {work[1].name} did not precompile (no such kernel)" in caplog.text


def test_launch_hooks_count_as_set_only_when_a_hook_is_there(monkeypatch):
    """Triton starts with no hook (None, or on newer Tritons an empty chain): kernels then launch their binary
    directly; a profiler's hook sends them through Triton's JIT, which calls it."""
    from triton import knobs

    assert not kernels.launch_hooks_set()

    def hook(*args):
        return None

    if hasattr(knobs.runtime.launch_enter_hook, "add"):  # a chain: a new one holding the hook
        hooks = type(knobs.runtime.launch_enter_hook)()
        hooks.add(hook)
        monkeypatch.setattr(knobs.runtime, "launch_enter_hook", hooks)
    else:
        monkeypatch.setattr(knobs.runtime, "launch_enter_hook", hook)
    assert kernels.launch_hooks_set()


def test_a_direct_launch_passes_triton_launchers_their_arguments_in_order(monkeypatch):
    """Grid, stream, function, metadata, three unset hooks, the tensors, then the scalars and constexprs: the
    convention generated kernels and the grouped matmul's zero-tail kernel share (no GPU: the launcher is faked)."""
    calls = []
    monkeypatch.setattr(kernels, "raw_stream", lambda device: 99)
    direct = kernels.DirectLaunch(lambda *args: calls.append(args), 7, ("meta",), 0, (3, 256))
    a, b = torch.zeros(2), torch.ones(2)
    direct.launch(5, (a, b))
    assert len(calls) == 1 and calls[0][:9] == (5, 1, 1, 99, 7, ("meta",), None, None, None)
    assert calls[0][9] is a and calls[0][10] is b and calls[0][11:] == (3, 256)
