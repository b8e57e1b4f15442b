"""The generated wrapper runs a program's steps exactly as the executor's step loop does: the same bits, the same
arenas, and source that reads like a hand-written forward."""
from __future__ import annotations

import dataclasses
import re
import traceback

import pytest
import torch
from torch.utils import _pytree as pytree

import ember
from ember import models
from ember.codegen import GroupKernel
from ember.runtime import executor
from ember.runtime.executor import _allocate, _carried, _failing_line


def _fresh(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randint_like(t, 0, 200) if not t.is_floating_point() else torch.randn_like(t) for t in inputs)


def _tensors(program: ember.runtime.Program, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    return program._tensor_inputs(pytree.tree_flatten((inputs, {}))[0])


def _assert_bitwise_equal(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.stride() == b.stride()
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _checked_wrapper_source(model: torch.nn.Module, x: torch.Tensor) -> str:
    """The CPU wrapper's source of `model` compiled for `x`, after checking it computes the step loop's bits."""
    with torch.inference_mode():
        program = ember.compile(model, (x,))
        tensors = [torch.randn_like(x)]
        _assert_bitwise_equal(program.executor(tensors), program.executor.interpret(tensors))
    return program.executor.wrapper_on(torch.device("cpu")).source


@pytest.fixture
def allocated(monkeypatch) -> list[int]:
    """The size of every arena the executor allocates from now on, in order."""
    sizes: list[int] = []

    def allocate(size_bytes, device):
        sizes.append(size_bytes)
        return _allocate(size_bytes, device)

    monkeypatch.setattr(executor, "_allocate", allocate)
    return sizes


@pytest.mark.parametrize("arena", [True, False])
@pytest.mark.parametrize("name", sorted(models.BUILTIN))
def test_the_wrapper_computes_what_the_step_loop_computes_bit_for_bit(name, arena, allocated):
    model, inputs = models.load(name)
    with torch.inference_mode():
        program = ember.compile(model, inputs, ember.Options(arena=arena))
        tensors = _tensors(program, _fresh(inputs))
        want = program.executor.interpret(tensors)
        interpreted = list(allocated)
        got = program.executor(tensors)
    _assert_bitwise_equal(got, want)
    planned = bool(program.report.memory.get("arenas"))  # a model whose results all reuse memory may need none
    assert allocated == 2 * interpreted and (bool(interpreted) is (arena and planned))  # the same arenas, as often
    memory = program.report.memory  # no arena only where fresh and reused buffers already reach the lower bound
    assert planned or not arena or memory["peak_bytes"] == memory["lower_bound_bytes"]


@pytest.mark.parametrize("name", ["demo", "llama_b1"])
def test_generated_kernels_run_from_the_wrapper_as_from_the_step_loop(name):
    model, inputs = models.load(name)
    with torch.inference_mode():
        program = ember.compile(model, inputs, ember.Options(fusion=True))
        tensors = _tensors(program, _fresh(inputs))
        want = program.executor.interpret(tensors)
        got = program.executor(tensors)
    assert program.report.fusion["groups"] > 0
    _assert_bitwise_equal(got, want)
    source = program.executor.wrapper_on(torch.device("cpu")).source
    assert re.search(r"\bfused_\w+_0\(\(", source)


def test_a_call_split_where_an_arena_is_open_computes_the_whole_call():
    """As a CUDA-graph capture splits a call (runtime/cuda_graph.py): the wrapper of the steps before the split
    hands its values and open arenas to the wrapper of the rest, and together they compute what one call does."""
    model, inputs = models.load("llama_b1")
    with torch.inference_mode():
        program = ember.compile(model, inputs)
        run = program.executor
        device = torch.device("cpu")
        steps = run.steps_on(device)
        split = next(index for index, step in enumerate(steps) if index > len(steps) // 2 and step.targets
                     and not step.opens and any(isinstance(target, tuple) for target in step.targets))
        carried = _carried(steps[:split], steps[split:], program.graph)
        prefix = run._generate(device, name="llama_b1_captured", stop=split, returns=carried)
        tail = run._generate(device, name="llama_b1_tail", start=split, carried=carried)
        tensors = _tensors(program, _fresh(inputs))
        values, arenas = prefix.function(*tensors)
        got = tail.function(*tensors, *values, arenas)
        want = run.interpret(tensors)
    assert prefix.arenas_out and tail.arenas_in and tail.source.splitlines()[1].endswith(", arenas):")
    assert any(arena is None for arena in arenas) and any(arena is not None for arena in arenas)
    _assert_bitwise_equal(got, want)


def test_the_source_reads_like_a_forward(tmp_path):
    """Ops by their ATen names, values by their IR names, dead values deleted, arenas typed once and sliced with
    one reinterpret_tensor per slot; dumped to the debug directory."""
    model, inputs = models.load("llama_b1")
    with torch.inference_mode():
        program = ember.compile(model, inputs, ember.Options(debug_dir=str(tmp_path)))
        program(*inputs)
    source = program.executor.wrapper_on(torch.device("cpu")).source
    lines = source.splitlines()
    assert lines[1].startswith("def LlamaForCausalLM(input_ids")  # named after the model and its inputs
    assert "aten_embedding_default(" in source and "linear_into(" in source
    assert any(line.strip().startswith("del ") for line in lines)
    assert "arena_0 = allocate(" in source and "arena_0_float32 = arena_0.view(float32)" in source
    assert "reinterpret_tensor(arena_0_float32, " in source and "slot_view" not in source
    assert lines[-1].strip().startswith("return [")
    assert (tmp_path / "LlamaForCausalLM_wrapper.py").read_text() == source


def test_an_error_inside_the_wrapper_points_at_its_generated_line():
    model, inputs = models.load("mlp")
    with torch.inference_mode():
        program = ember.compile(model, inputs, ember.Options(check_inputs=False))
        (x,) = inputs
        with pytest.raises(RuntimeError) as raised:
            program(x[:, :1])
    frames = [frame for frame in traceback.extract_tb(raised.value.__traceback__) if frame.filename == "<ember wrapper Sequential>"]
    assert frames and frames[-1].line.startswith("linear")
    assert _failing_line(raised.value).startswith(" at `linear") and "<ember wrapper Sequential>" in _failing_line(raised.value)


def test_a_call_that_autograd_records_stays_on_the_reference_steps():
    model, inputs = models.load("mlp")
    program = ember.compile(model, inputs)
    cpu = torch.device("cpu")

    def not_for_autograd(*tensors):
        raise AssertionError("a call autograd records ran the generated wrapper")

    program.executor._wrappers[cpu] = dataclasses.replace(program.executor.wrapper_on(cpu), function=not_for_autograd)
    program(*inputs).sum().backward()
    assert all(parameter.grad is not None for parameter in model.parameters())


def test_a_view_of_memory_the_wrapper_gave_is_one_reinterpret_tensor_and_a_view_of_an_input_is_the_op():
    """The strides of a value in an arena slot (or of a view of it) are its type's, so its views are written as
    `reinterpret_tensor` worked out at generation time, offsets included, a chain of them read once as one alias
    where it is read; an input's strides are the caller's, so a view of it stays the op."""
    class Heads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(12, 24)

        def forward(self, x):
            heads = self.proj(x).view(2, 5, 4, 6).transpose(1, 2)
            return heads[..., 2:] * 2, x.transpose(0, 1) + 1

    model, inputs = Heads(), (torch.randn(2, 5, 12),)
    with torch.inference_mode():
        program = ember.compile(model, inputs)
        tensors = _tensors(program, _fresh(inputs))
        want = program.executor.interpret(tensors)
        got = program.executor(tensors)
    _assert_bitwise_equal(got, want)
    source = program.executor.wrapper_on(torch.device("cpu")).source
    viewed = [line for line in source.splitlines() if "reinterpret_tensor(" in line and "arena" not in line]
    assert len(viewed) == 1 and "reinterpret_tensor(linear, (2, 4, 5, 4), (120, 6, 24, 1), 2)" in viewed[0]
    assert not any("reinterpret_tensor(x," in line for line in viewed) and "aten_transpose_int(x, 0, 1)" in source


def test_kernels_with_a_direct_launcher_are_launched_inline_when_aligned(monkeypatch):
    """A kernel whose compiled binary can be launched directly is launched from the wrapper's own line (the
    stream read once per call), unless a pointer is off 16 bytes, which goes through the kernel as before; one
    whose pointers are all known aligned at generation (weights, memory the call allocates) is checked never. No
    GPU here: the launcher is faked, computing through the kernel's own (interpreted) path."""
    from ember.codegen.kernels import DirectLaunch, Kernel
    from ember.runtime import wrapper

    launched = []

    def direct_launch(self, dtypes, device):
        def run(programs, grid_y, grid_z, stream, function, metadata, enter, exit_, scope, *tensors):
            launched.append((self.source.name, programs, stream))
            split = len(self.source.inputs)
            self(tensors[:split], tensors[split:])

        return DirectLaunch(run, 7, (4, 1, 0), 0, ())

    monkeypatch.setattr(Kernel, "direct_launch", direct_launch)
    monkeypatch.setattr(wrapper, "raw_stream", lambda index: 1234)
    class Chains(torch.nn.Module):  # kernels reading the inputs themselves
        def forward(self, x, row):
            return torch.sigmoid(x * 2.0 + row).relu(), (x - row).exp()

    with torch.inference_mode():
        inputs = (torch.randn(37, 129), torch.randn(129))
        program = ember.compile(Chains(), inputs, ember.Options(fusion=True))
        tensors = list(inputs)
        want = program.executor.interpret(tensors)
        _assert_bitwise_equal(program.executor(tensors), want)
        kernels = {step.kernel.source.name for step in program.executor.work if isinstance(step, GroupKernel)}
        assert kernels and {name for name, _, _ in launched} == kernels and all(s == 1234 for _, _, s in launched)
        source = program.executor.wrapper_on(torch.device("cpu")).source
        assert source.count("stream = ") == 1 and ".data_ptr()) & 15:" in source
        launched.clear()
        shifted = [torch.randn(t.numel() + 1)[1:].view(t.shape) for t in tensors]  # 4 bytes off alignment
        _assert_bitwise_equal(program.executor(shifted), program.executor.interpret(shifted))
        assert not launched  # every kernel reads an input: each went through the kernel's own path

    class Owned(torch.nn.Module):  # a kernel reading only memory the call allocated, and a weight
        def __init__(self):
            super().__init__()
            self.proj, self.scale = torch.nn.Linear(129, 64), torch.nn.Parameter(torch.randn(64))

        def forward(self, x):
            return torch.sigmoid(self.proj(x) * self.scale).relu()

    with torch.inference_mode():
        model, x = Owned(), torch.randn(37, 130)[:, 1:]  # the call's own input, 4 bytes off alignment
        program = ember.compile(model, (x,), ember.Options(fusion=True))
        launched.clear()
        _assert_bitwise_equal(program.executor([x]), program.executor.interpret([x]))
        assert len(launched) == 1 and "data_ptr" not in program.executor.wrapper_on(torch.device("cpu")).source


def test_linear_layers_on_row_contiguous_inputs_are_one_matrix_product_bit_for_bit():
    """A linear layer reading an exactly strided, row-contiguous input runs as one mm (addmm with a bias, on 2
    or 3 dims, as ATen's linear does) on the weight's transpose made once; a bias on 4 dims, or an input of
    strides not known at generation (the call's own input), stays ATen's linear."""
    class Layers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first = torch.nn.Linear(6, 6, bias=False)
            self.biased, self.plain, self.wide = torch.nn.Linear(6, 5), torch.nn.Linear(5, 7, bias=False), torch.nn.Linear(7, 3)

        def forward(self, x):
            hidden = self.first(x)  # the call's input: ATen's linear, whose result is a fresh row-major tensor
            three = self.biased(hidden)
            plain = self.plain(three)
            return three, plain, self.wide(torch.sigmoid(plain).unsqueeze(1)), self.biased(hidden.reshape(-1, 6))

    source = _checked_wrapper_source(Layers(), torch.randn(2, 4, 6))
    assert source.count("addmm(") == 2 and source.count(" mm(") == 1 and source.count("aten_linear_default(") == 2


def test_embers_own_python_ops_are_called_directly_not_through_torchs_dispatcher():
    """A Mixtral call's grouped matmuls run ember's Python implementation from the wrapper (the dispatcher's
    boxing into Python and back is host time on every step), with the step loop's results."""
    from ember.codegen.grouped_mm import grouped_mm

    model, inputs = models.load("mixtral")
    with torch.inference_mode():
        program = ember.compile(model, inputs)
        tensors = _tensors(program, _fresh(inputs))
        want = program.executor.interpret(tensors)
        got = program.executor(tensors)
    wrapper = program.executor.wrapper_on(None)
    assert "grouped_mm" in wrapper.source
    assert grouped_mm in wrapper.function.__globals__.values()
    _assert_bitwise_equal(got, want)


def test_reinterpret_tensor_and_its_fallback_view_past_the_tensors_own_offset():
    from ember.runtime.wrapper import _as_strided_from, reinterpret_tensor

    base = torch.arange(40.0)[3:]
    for view in (reinterpret_tensor, _as_strided_from):
        got = view(base, (2, 3), (1, 2), 4)
        assert got.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
        assert got.storage_offset() == 7 and got.tolist() == [[7.0, 9.0, 11.0], [8.0, 10.0, 12.0]]


def test_an_attention_result_is_held_at_its_ir_strides_and_read_exactly_after():
    """A fused attention lays its result out as its kernel chooses; the wrapper holds it at the IR type's strides
    (a copy only where they differ), so the head merge after it is `reinterpret_tensor` and the output
    projection one `addmm`, bit for bit as the step loop computes."""
    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.out = torch.nn.Linear(12, 36), torch.nn.Linear(12, 12)

        def forward(self, x):
            q, k, v = (t.view(2, 5, 3, 4).transpose(1, 2) for t in self.qkv(x).split(12, dim=-1))
            heads = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return self.out(heads.transpose(1, 2).reshape(2, 5, 12))

    source = _checked_wrapper_source(Attention(), torch.randn(2, 5, 12))
    after = source[source.index("\n", source.index("laid_out(")):]  # the lines after the attention's
    assert "aten_" not in after and "addmm(" in after


def test_laid_out_keeps_a_tensor_at_the_strides_asked_and_copies_any_other():
    from ember.runtime.wrapper import laid_out

    x = torch.randn(2, 5, 3, 4).transpose(1, 2)
    assert laid_out(x, (2, 3, 5, 4), x.stride()) is x
    for other in (x.contiguous(), torch.randn(121)[1:].as_strided((2, 3, 5, 4), x.stride())):
        held = laid_out(other, (2, 3, 5, 4), x.stride())
        assert held.stride() == x.stride() and held.storage_offset() == 0 and torch.equal(held, other)


def test_the_steps_are_bound_and_the_wrapper_generated_when_the_program_is_built(monkeypatch):
    """Compile does the binding and the generation; the first call runs what is there."""
    from ember.runtime import executor as executor_module

    generated = []
    original = executor_module.generate_wrapper
    monkeypatch.setattr(executor_module, "generate_wrapper", lambda *args, **kwargs: generated.append(1) or original(*args, **kwargs))
    model, inputs = models.load("mlp")
    with torch.inference_mode():
        program = ember.compile(model, inputs)
        assert len(generated) == 1
        program(*inputs)
        program(*_fresh(inputs))
    assert len(generated) == 1
