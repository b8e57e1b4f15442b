"""ONNX export of the optimized IR, run in onnxruntime against ember's own outputs: every built-in model within
float32's tolerance (and the language models' argmax everywhere the same), ember's own ops by their decompositions
for any offsets, names kept, ops ONNX cannot express named, weights in a data file when asked."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import onnx
import onnxruntime
import pytest
import torch

import ember
import ember.codegen.onnx as ember_onnx
from ember import models
from ember.codegen.onnx import export_onnx, grouped_mm_decomposed, searchsorted_decomposed
from ember.codegen.onnx_verify import FLOAT32_TOLERANCE, compare_output, verify_onnx
from ember.errors import ExportError
from ember.ir import Graph, Node, Value
from ember.ir.ops import grouped_mm_reference, linears_reference
from ember.ir.schema import split_arguments
from ember.ir.types import TensorType, type_of

pytest.importorskip("onnxscript", reason="torch's ONNX exporter translates with onnxscript")

MODELS = ["demo", "mlp", "cnn", "unet", "gpt2", "llama", "mixtral", "bert", "bert_masked"]
NEEDS_TRANSFORMERS = {"gpt2", "llama", "mixtral", "bert", "bert_masked"}
LANGUAGE_MODELS = {"demo", "gpt2", "llama", "mixtral"}
"""Models whose first output is logits over a vocabulary."""


def single_node_graph(op: str, args: Sequence[Any], kwargs: dict[str, Any] | None = None, *, params: int = 0,
                      target: str | None = None) -> tuple[Graph, list[torch.Tensor], list[torch.Tensor]]:
    """A graph of one call of `op` (an extern of `target` when op is "extern"): its first tensor operands are inputs,
    the last `params` weights. Returns the graph, its inputs and the reference's results."""
    node = Node("probe", op, (), {}, (), target=target)
    tensors, attrs = split_arguments(node.definition.schema, args, kwargs or {},
                                     lambda value: isinstance(value, torch.Tensor))
    results = [result for result in node.definition.bind(attrs)(tensors) if result is not None]
    names = [f"operand_{position}" for position in range(len(tensors))]
    values = [Value(name, type_of(tensor)) for name, tensor in zip(names, tensors)]
    outputs = tuple(Value(f"result_{position}", type_of(result)) for position, result in enumerate(results))
    split = len(values) - params
    graph = Graph(tuple(values[:split]), tuple(values[split:]),
                  (Node("probe", op, tuple(names), attrs, outputs, target=target),), tuple(v.name for v in outputs),
                  dict(zip(names[split:], tensors[split:])))
    return graph, tensors[:split], results


def onnxruntime_outputs(path, inputs: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {argument.name: tensor.numpy() for argument, tensor in zip(session.get_inputs(), inputs)}
    names = [output.name for output in session.get_outputs()]
    return {name: torch.from_numpy(array) for name, array in zip(names, session.run(names, feeds))}


# ---------------------------------------------------------------------------------------------
# Built-in models

@pytest.mark.parametrize("name", MODELS)
def test_every_builtin_model_runs_in_onnxruntime_as_ember_runs_it(name, tmp_path):
    if name in NEEDS_TRANSFORMERS:
        pytest.importorskip("transformers")
    model, example = models.load(name)
    program = ember.compile(model, example)
    inputs = program.tensor_inputs(*example)
    expected = program.run(inputs)

    written = export_onnx(program.graph, tmp_path / f"{name}.onnx")
    result = verify_onnx(written.path, inputs, expected, language_model=name in LANGUAGE_MODELS)

    assert written.input_names == tuple(value.name for value in program.graph.inputs)
    assert written.output_names == program.graph.outputs and not written.external_data
    assert result.ok and len(result.outputs) == len(expected)
    for check in result.outputs:
        assert check.max_abs_error <= check.allowed_error and (check.atol, check.rtol) == FLOAT32_TOLERANCE, check
    if name in LANGUAGE_MODELS:
        assert result.argmax_agreement == 1.0
    if name == "mixtral":  # routing: ember's grouped_mm and searchsorted, in ops ONNX has
        assert written.decomposed["grouped_mm"] == 4 and written.decomposed["searchsorted.Tensor"] == 2


# ---------------------------------------------------------------------------------------------
# ember's own ops, and ATen's that ONNX lacks

GROUPED_OFFSETS = {
    "an empty expert and rows past the last offset": [4, 4, 11],
    "the first expert empty": [0, 6, 13],
    "every row routed": [5, 9, 13],
    "no row routed": [0, 0, 0],
    "the last experts empty": [7, 13, 13],
}


@pytest.mark.parametrize("offsets_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("case", sorted(GROUPED_OFFSETS))
def test_grouped_mm_decomposition_matches_the_reference(case, offsets_dtype):
    x = torch.randn(26, 5)[::2]  # 13 strided rows
    weight = torch.randn(3, 5, 7)
    offsets = torch.tensor(GROUPED_OFFSETS[case], dtype=offsets_dtype)
    torch.testing.assert_close(grouped_mm_decomposed(x, weight, offsets), grouped_mm_reference(x, weight, offsets),
                               atol=1e-6, rtol=1e-5)


def test_grouped_mm_decomposition_matches_the_reference_on_random_offsets():
    generator = torch.Generator().manual_seed(7)
    x, weight = torch.randn(37, 9, generator=generator), torch.randn(5, 9, 4, generator=generator)
    for _ in range(20):
        offsets = torch.randint(0, 38, (5,), generator=generator).sort().values
        expected = grouped_mm_reference(x, weight, offsets)
        torch.testing.assert_close(grouped_mm_decomposed(x, weight, offsets), expected, atol=1e-6, rtol=1e-5)


def test_exported_grouped_mm_follows_the_offsets_given_at_run_time(tmp_path):
    weight = torch.randn(3, 5, 7)
    graph = Graph(
        inputs=(Value("x", TensorType((13, 5), torch.float32)), Value("offsets", TensorType((3,), torch.int64))),
        params=(Value("weight", type_of(weight)),),
        nodes=(Node("grouped", "grouped_mm", ("x", "weight", "offsets"), {},
                    (Value("grouped", TensorType((13, 7), torch.float32)),)),),
        outputs=("grouped",), weights={"weight": weight})
    written = export_onnx(graph, tmp_path / "grouped.onnx")
    assert written.decomposed == {"grouped_mm": 1}
    for routed in GROUPED_OFFSETS.values():  # one file for any offsets: nothing about them was traced in
        x, offsets = torch.randn(13, 5), torch.tensor(routed)
        assert verify_onnx(written.path, [x, offsets], [grouped_mm_reference(x, weight, offsets)]).ok


def test_linears_export_as_one_linear_per_weight(tmp_path):
    weights = [torch.randn(11, 7), torch.randn(3, 7), torch.randn(5, 7)]
    biases = [torch.randn(11), None, torch.randn(5)]
    x = torch.randn(2, 1, 7)
    graph, inputs, expected = single_node_graph("linears", (x, weights, biases), params=5)
    written = export_onnx(graph, tmp_path / "linears.onnx")
    result = verify_onnx(written.path, inputs, linears_reference(x, weights, biases))
    assert written.decomposed == {"linears": 1} and len(result.outputs) == 3 and result.ok
    assert [tuple(tensor.shape) for tensor in expected] == [(2, 1, 11), (2, 1, 3), (2, 1, 5)]


@pytest.mark.parametrize("right", [False, True])
def test_searchsorted_decomposition_matches_torch(right):
    boundaries = torch.tensor([0.0, 0.5, 0.5, 2.0, 3.0])
    values = torch.tensor([[-1.0, 0.0, 0.5, 1.0], [2.0, 2.5, 3.0, 9.0]])
    for sequence in (boundaries, boundaries.repeat(2, 1)):
        for out_int32 in (False, True):
            expected = torch.searchsorted(sequence, values, right=right, out_int32=out_int32)
            got = searchsorted_decomposed(sequence, values, right=right, out_int32=out_int32)
            assert got.dtype == expected.dtype and torch.equal(got, expected)


def _scatter_mean(**kwargs: Any) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
    return "scatter_reduce.two", (torch.randn(5, 7), 1, torch.randint(0, 7, (5, 9)), torch.randn(5, 9), "mean"), kwargs


ATEN_CASES = {  # ops whose ONNX translation ember writes itself, with the arguments that need it
    "elu with scales": lambda: ("elu", (torch.randn(5, 13), 0.5, 1.25, 0.75), {}),
    "scatter_reduce mean": _scatter_mean,
    "scatter_reduce mean without self": lambda: _scatter_mean(include_self=False),
    "searchsorted": lambda: ("searchsorted.Tensor", (torch.randn(13).sort().values, torch.randn(5, 7)),
                             {"right": True}),
}


@pytest.mark.parametrize("case", sorted(ATEN_CASES))
def test_aten_ops_the_exporter_lacks_or_gets_wrong_run_as_torch_does(case, tmp_path):
    op, args, kwargs = ATEN_CASES[case]()
    graph, inputs, expected = single_node_graph(op, args, kwargs)
    written = export_onnx(graph, tmp_path / "op.onnx")
    assert written.decomposed == {op: 1}
    assert verify_onnx(written.path, inputs, expected).ok


# ---------------------------------------------------------------------------------------------
# What cannot be exported

UNEXPRESSIBLE = {  # a one-node graph ONNX cannot express, and what the error must say
    "an extern op with no ONNX function": lambda: (
        single_node_graph("extern", (torch.randn(5, 13), 1), target="aten.cummax.default"),
        r"node probe \(extern aten\.cummax\.default\)"),
    "an op the exporter refuses for its arguments": lambda: (  # histc's range is the data's: no static bins
        single_node_graph("histc", (torch.randn(5, 13),)), r"aten\.histc\.default: node probe \(histc\)"),
    "an argument the exporter would get wrong": lambda: (
        single_node_graph("avg_pool2d", (torch.randn(2, 3, 9, 9), [3, 3], [2, 2]), {"divisor_override": 5}),
        r"node probe \(avg_pool2d\).*divisor_override"),
}


@pytest.mark.parametrize("case", sorted(UNEXPRESSIBLE))
def test_an_op_onnx_cannot_express_raises_export_error_naming_it(case, tmp_path):
    (graph, _, _), named = UNEXPRESSIBLE[case]()
    with pytest.raises(ExportError, match=named):
        export_onnx(graph, tmp_path / "refused.onnx")
    assert not (tmp_path / "refused.onnx").exists()


def test_an_ember_op_without_a_decomposition_is_named(monkeypatch, tmp_path):
    monkeypatch.delitem(ember_onnx.DECOMPOSITIONS, torch.ops.ember.grouped_mm.default)
    graph, _, _ = single_node_graph("grouped_mm", (torch.randn(6, 4), torch.randn(2, 4, 3), torch.tensor([2, 6])))
    with pytest.raises(ExportError, match=r"node probe \(grouped_mm\).*no decomposition"):
        export_onnx(graph, tmp_path / "refused.onnx")


def test_an_aten_op_without_an_onnx_function_is_named_by_its_node(monkeypatch, tmp_path):
    monkeypatch.delitem(ember_onnx.DECOMPOSITIONS, torch.ops.aten.searchsorted.Tensor)
    graph, _, _ = single_node_graph("searchsorted.Tensor", (torch.arange(6.0), torch.randn(4)), {"right": True})
    with pytest.raises(ExportError, match=r"aten\.searchsorted\.Tensor: node probe \(searchsorted\.Tensor\)"):
        export_onnx(graph, tmp_path / "refused.onnx")


# ---------------------------------------------------------------------------------------------
# Files, names and devices

@pytest.fixture(scope="module")
def mlp_program():
    model, example = models.load("mlp")
    program = ember.compile(model, example)
    inputs = program.tensor_inputs(*example)
    return program, inputs, program.run(inputs)


def test_external_data_is_written_beside_the_model_and_loads_in_onnxruntime(mlp_program, tmp_path):
    program, inputs, expected = mlp_program
    written = export_onnx(program.graph, tmp_path / "mlp.onnx", external_data=True)
    weight_bytes = sum(tensor.nbytes for tensor in program.graph.weights.values())

    assert written.external_data and written.data_path == tmp_path / "mlp.onnx.data"
    assert written.weight_bytes == weight_bytes and written.data_path.stat().st_size >= 0.9 * weight_bytes
    assert written.model_bytes < weight_bytes // 4  # the graph, and tensors too small to be worth a reference
    stored = onnx.load(str(written.path), load_external_data=False)
    assert {tensor.name for tensor in stored.graph.initializer} == {value.name for value in program.graph.params}
    assert all(tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in stored.graph.initializer
               if program.graph.weights[tensor.name].nbytes >= 1024)
    moved = tmp_path / "moved"
    moved.mkdir()
    for file in (written.path, written.data_path):
        file.rename(moved / file.name)
    assert verify_onnx(moved / "mlp.onnx", inputs, expected).ok  # the data file is found beside the model


def test_small_weights_stay_inside_the_file_by_default(mlp_program, tmp_path):
    program, inputs, expected = mlp_program
    written = export_onnx(program.graph, tmp_path / "mlp.onnx")
    assert not written.external_data and written.data_path is None
    assert written.model_bytes > written.weight_bytes and list(tmp_path.iterdir()) == [written.path]
    assert written.opset >= 18 and written.node_count >= 3


def test_outputs_keep_the_ir_names_when_repeated_passed_through_or_named_like_other_ops(tmp_path):
    f32 = TensorType((3, 4), torch.float32)
    weight = torch.randn(3, 4)
    graph = Graph(
        inputs=(Value("x", f32),), params=(Value("w", f32),),
        nodes=(Node("n1", "mul.Tensor", ("x", "w"), {}, (Value("add", f32),)),  # torch.export calls this one "mul"
               Node("n2", "add.Tensor", ("add", "x"), {}, (Value("mul", f32),))),
        outputs=("mul", "add", "mul", "x", "w"), weights={"w": weight})
    x = torch.randn(3, 4)
    written = export_onnx(graph, tmp_path / "names.onnx")
    got = onnxruntime_outputs(written.path, [x])

    assert written.output_names == ("mul", "add", "mul_output_2", "x", "w") == tuple(got)
    torch.testing.assert_close(got["add"], x * weight)
    torch.testing.assert_close(got["mul"], x * weight + x)
    torch.testing.assert_close(got["mul_output_2"], x * weight + x)
    assert torch.equal(got["x"], x) and torch.equal(got["w"], weight)


def test_a_graph_typed_for_the_gpu_exports_for_the_cpu(tmp_path):
    on_gpu = TensorType((2, 5), torch.float32, device="cuda")
    graph = Graph(
        inputs=(Value("x", on_gpu),), params=(),
        nodes=(Node("positions", "arange", (), {"end": 5, "dtype": torch.float32, "device": torch.device("cuda")},
                    (Value("positions", TensorType((5,), torch.float32, device="cuda")),)),
               Node("shifted", "add.Tensor", ("x", "positions"), {}, (Value("shifted", on_gpu),))),
        outputs=("shifted",))
    x = torch.randn(2, 5)
    written = export_onnx(graph, tmp_path / "gpu.onnx")
    assert verify_onnx(written.path, [x], [x + torch.arange(5.0)]).ok


# ---------------------------------------------------------------------------------------------
# Verification's numbers

def test_verification_fails_with_the_numbers_when_an_output_differs(mlp_program, tmp_path):
    program, inputs, expected = mlp_program
    written = export_onnx(program.graph, tmp_path / "mlp.onnx")
    atol, rtol = FLOAT32_TOLERANCE
    nudged = expected[0].clone()
    nudged[0, 0] += 3 * (atol + rtol * nudged[0, 0].abs())
    with pytest.raises(ExportError, match=r"max abs error .*outside the tolerance"):
        verify_onnx(written.path, inputs, [nudged])


def test_outputs_compare_by_dtype():
    atol, rtol = FLOAT32_TOLERANCE
    expected = torch.tensor([1.0, -200.0, float("nan"), float("inf")])
    inside = expected + torch.tensor([0.9 * atol, -0.9 * (atol + rtol * 200), 0.0, 0.0])
    outside = expected + torch.tensor([0.0, 1.1 * (atol + rtol * 200), 0.0, 0.0])
    assert compare_output("y", inside, expected).ok
    check = compare_output("y", outside, expected)
    assert not check.ok and check.max_abs_error == pytest.approx(1.1 * (atol + rtol * 200), rel=1e-3)
    assert not compare_output("y", torch.tensor([1.0, -200.0, 0.0, float("inf")]), expected).ok  # NaN lost
    tokens = torch.tensor([3, 1, 4])
    assert compare_output("ids", tokens.clone(), tokens).ok
    assert not compare_output("ids", tokens + torch.tensor([0, 1, 0]), tokens).ok  # integers exactly
    assert not compare_output("ids", tokens.int(), tokens).ok  # and in their dtype


# ---------------------------------------------------------------------------------------------
# The command line

def test_export_with_onnx_writes_verifies_and_prints_the_numbers(tmp_path, capsys):
    from ember.cli import main

    path = tmp_path / "demo.onnx"
    assert main(["-q", "export", "demo", "--out", str(tmp_path / "demo"), "--device", "cpu", "--onnx", str(path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"ONNX: {path}" in out and "max abs error" in out and "argmax of the logits agrees at 100.00%" in out
    assert onnx.load(str(path)).graph.node


def test_export_with_an_onnx_path_it_cannot_write_is_one_line_error(tmp_path, one_line_error):
    from ember.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["-q", "export", "demo", "--out", str(tmp_path / "demo"), "--device", "cpu",
                 "--onnx", str(blocker / "demo.onnx")]) == 2
    one_line_error()
