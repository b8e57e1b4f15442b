"""Bad input gets a clear error or a documented fallback: never a crash deep inside, never a wrong answer."""
from __future__ import annotations

import logging

import pytest
import torch

import ember
from ember import backend


class DataDependentBranch(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x - 1


class UncommonOps(torch.nn.Module):
    """Ops outside the op table, and a complex dtype, which native ops do not handle."""

    def forward(self, x):
        spectrum = torch.view_as_complex(torch.stack([x, x.flip(-1)], dim=-1))
        return torch.erfinv(x.clamp(-0.9, 0.9)) + torch.special.i0(x) + (spectrum * spectrum).real


def test_uncapturable_model_names_the_cause_and_suggests_the_backend():
    with pytest.raises(ember.CompileError) as error:
        ember.compile(DataDependentBranch(), (torch.randn(3, 5),))
    message = str(error.value)
    assert "DataDependentBranch" in message and "data-dependent" in message
    assert 'torch.compile(model, backend="ember")' in message


def test_backend_splits_at_the_graph_break_and_stays_correct():
    model, x = DataDependentBranch(), torch.randn(3, 5)
    torch.testing.assert_close(torch.compile(model, backend="ember")(x), model(x))
    torch.testing.assert_close(torch.compile(model, backend="ember")(-x.abs()), model(-x.abs()))


def test_unsupported_ops_and_dtypes_become_externs_that_run():
    model, x = UncommonOps(), torch.randn(4, 6)
    program = ember.compile(model, (x,))
    externs = program.report.extern_ops
    assert externs["aten.erfinv.default"] == 1 and externs["aten.i0.default"] == 1
    complex_nodes = [n for n in program.graph.nodes if any(v.type.dtype.is_complex for v in n.outputs)]
    assert complex_nodes and all(n.is_extern for n in complex_nodes)
    assert program.report.op_coverage < 1
    torch.testing.assert_close(program(x), model(x))
    assert "extern[aten.erfinv.default]" in str(program.graph)


@pytest.mark.parametrize(
    "bad, expected",
    [
        (torch.randn(4, 7), "expected f32[4, 6], got f32[4, 7]"),
        (torch.randn(4, 6, dtype=torch.float64), "expected f32[4, 6], got f64[4, 6]"),
        (torch.randint(0, 3, (4, 6)), "expected f32[4, 6], got i64[4, 6]"),
    ],
)
def test_wrong_shape_or_dtype_at_call_time_names_what_was_expected(bad, expected):
    program = ember.compile(torch.nn.Linear(6, 3), (torch.randn(4, 6),))
    with pytest.raises(ember.InputError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        program(bad)


def test_wrong_number_of_inputs_is_an_input_error():
    program = ember.compile(torch.nn.Linear(6, 3), (torch.randn(4, 6),))
    with pytest.raises(ember.InputError, match=r"expected 1 positional argument\(s\) and keywords \(\), got 2"):
        program(torch.randn(4, 6), torch.randn(4, 6))


def test_unknown_option_lists_the_known_ones():
    with pytest.raises(ember.CompileError, match="unknown ember option.*known: arena, check_inputs"):
        ember.compile(torch.nn.Linear(6, 3), (torch.randn(4, 6),), options={"fuse_everything": True})
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="unknown ember option.*known: arena, check_inputs"):
        torch.compile(torch.nn.Linear(6, 3), backend="ember", options={"nope": 1})(torch.randn(2, 6))


def test_backend_accepts_torch_compile_mode_and_options(compiled_programs):
    model, x = torch.nn.Linear(6, 3), torch.randn(4, 6)
    with torch.no_grad():
        out = torch.compile(model, backend="ember", mode="reduce-overhead")(x)
        torch._dynamo.reset()
        out_verified = torch.compile(model, backend="ember", options={"verify": True, "debug": True})(x)
    torch.testing.assert_close(out, model(x))
    torch.testing.assert_close(out_verified, model(x))
    assert len(compiled_programs) == 2


def test_backward_runs_eagerly_with_one_warning_and_correct_gradients(caplog):
    backend._warn_once.cache_clear()
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    reference = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    reference.load_state_dict(model.state_dict())
    x = torch.randn(3, 6)
    compiled = torch.compile(model, backend="ember")
    with caplog.at_level(logging.WARNING, logger="ember"):
        for _ in range(2):
            compiled(x).square().sum().backward()
    reference(x).square().sum().backward()
    reference(x).square().sum().backward()
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got.grad, want.grad)
    warnings = [r for r in caplog.records if "backward pass runs eagerly" in r.getMessage()]
    assert len(warnings) == 1


def test_new_input_shapes_recompile_instead_of_failing(compiled_programs):
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU())
    compiled = torch.compile(model, backend="ember")
    with torch.no_grad():
        for rows in (3, 5, 7, 5):
            x = torch.randn(rows, 8)
            torch.testing.assert_close(compiled(x), model(x))
    shapes = sorted({p.graph.inputs[-1].type.shape for p in compiled_programs})
    assert shapes == [(3, 8), (5, 8), (7, 8)], "each new shape is compiled once, by ember, not run eagerly"


def test_program_returns_the_model_output_structure():
    class TwoHeads(torch.nn.Module):
        def forward(self, x, *, scale):
            return {"double": x * 2, "pair": (x + scale, x.sum(0))}

    x, scale = torch.randn(3, 4), torch.randn(4)
    program = ember.compile(TwoHeads(), {"x": x, "scale": scale})
    result = program(scale=scale, x=x)  # keyword order is the caller's
    with pytest.raises(ember.InputError, match=r"keywords \(x, scale\), got 0 and \(x\)"):
        program(x=x)
    expected = TwoHeads()(x, scale=scale)
    assert result.keys() == expected.keys()
    torch.testing.assert_close(result["pair"][1], expected["pair"][1])
    torch.testing.assert_close(result["double"], expected["double"])


def test_buffer_mutation_is_written_back_to_the_model():
    class Counter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls.add_(1)
            return x + self.calls

    model = Counter()
    program = ember.compile(model, (torch.zeros(2),))
    assert model.calls.item() == 0
    program(torch.zeros(2))
    torch.testing.assert_close(program(torch.zeros(2)), torch.full((2,), 2.0))
    assert model.calls.item() == 2


def test_input_on_the_wrong_device_is_an_input_error():
    program = ember.compile(torch.nn.Linear(6, 3), (torch.randn(4, 6),))
    with pytest.raises(ember.InputError, match="expected a tensor on cpu, got one on meta"):
        program(torch.randn(4, 6, device="meta"))


def test_grouped_matmul_forms_with_other_semantics_stay_externs():
    """aten._grouped_mm's 2-D x 2-D form groups the K dimension: it must not become ember's grouped_mm."""
    from ember.frontend.lower import _is_plain_grouped_mm

    class Node:
        def __init__(self, value):
            self.meta = {"val": value}

    class Call:
        def __init__(self, *values):
            self.args = tuple(Node(v) for v in values)

    x2, w3, w2 = torch.empty(6, 4), torch.empty(3, 4, 5), torch.empty(4, 5)
    assert _is_plain_grouped_mm(Call(x2, w3), ("x", "w", "offs"), {})
    assert not _is_plain_grouped_mm(Call(x2, w2), ("x", "w", "offs"), {})
    assert not _is_plain_grouped_mm(Call(x2, w3), ("x", "w", "offs", "bias"), {})
    assert not _is_plain_grouped_mm(Call(x2, w3), ("x", "w", None), {})
    assert not _is_plain_grouped_mm(Call(x2, w3), ("x", "w", "offs"), {"out_dtype": torch.bfloat16})


def test_a_list_where_a_tensor_was_compiled_is_named_plainly():
    program = ember.compile(torch.nn.Linear(4, 3), (torch.randn(2, 4),))
    with pytest.raises(ember.InputError) as raised:
        program([torch.randn(2, 4)])
    assert str(raised.value) == "expected (args, kwargs) shaped like ((tensor,), {}), got (([tensor],), {})"
