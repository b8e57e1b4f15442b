"""The IR's text form, verifier, networkx view and dead-code elimination, on small hand-checked graphs."""
from __future__ import annotations

import dataclasses

import networkx as nx
import pytest
import torch

import ember
from ember.ir import Graph, Node, TensorType, Value, VerifyError
from ember.optimizer.canonicalize import eliminate_dead_code


class SplitCatSoftmax(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(5, 3)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        a, b = h.split([1, 2], dim=-1)
        return torch.cat([b, a], dim=-1).softmax(-1).transpose(0, 1)


GOLDEN = """\
graph(%x: f32[7, 5], %p_fc_weight: f32[3, 5] param, %p_fc_bias: f32[3] param) {
  %linear: f32[7, 3] = linear(%x, %p_fc_weight, %p_fc_bias)
  %relu: f32[7, 3] = relu(%linear)
  %getitem: f32[7, 1]@(3, 1), %getitem_1: f32[7, 2]@(3, 1) = split_with_sizes(%relu) {split_sizes=(1, 2), dim=-1}
  %cat: f32[7, 3] = cat(%getitem_1, %getitem) {dim=-1}
  %_softmax: f32[7, 3] = _softmax(%cat) {dim=-1, half_to_float=False}
  %transpose: f32[3, 7]@(1, 3) = transpose.int(%_softmax) {dim0=0, dim1=1}
  return (%transpose)
}"""


@pytest.fixture
def graph() -> Graph:
    return ember.compile(SplitCatSoftmax(), (torch.randn(7, 5),)).graph


def test_text_form_is_stable_and_readable(graph):
    assert str(graph) == GOLDEN


def test_weights_are_held_by_reference_not_copied():
    model = SplitCatSoftmax()
    graph = ember.compile(model, (torch.randn(7, 5),)).graph
    assert graph.weights["p_fc_weight"] is model.fc.weight


def test_verifier_accepts_the_lowered_graph(graph):
    graph.verify()


def _replace_node(graph: Graph, index: int, **changes) -> Graph:
    nodes = list(graph.nodes)
    nodes[index] = dataclasses.replace(nodes[index], **changes)
    return dataclasses.replace(graph, nodes=tuple(nodes))


def test_verifier_rejects_a_use_before_definition(graph):
    swapped = list(graph.nodes)
    swapped[0], swapped[1] = swapped[1], swapped[0]
    with pytest.raises(VerifyError, match="uses %linear before it is defined"):
        dataclasses.replace(graph, nodes=tuple(swapped)).verify()


def test_verifier_rejects_a_value_defined_twice(graph):
    relu = graph.nodes[1]
    duplicate = dataclasses.replace(relu, name="relu_again")
    nodes = (*graph.nodes[:2], duplicate, *graph.nodes[2:])
    with pytest.raises(VerifyError, match="defined twice"):
        dataclasses.replace(graph, nodes=nodes).verify()


def test_verifier_rejects_an_output_type_the_rule_disagrees_with(graph):
    wrong = (Value("relu", TensorType((7, 4), torch.float32)),)
    with pytest.raises(VerifyError, match=r"%relu \(relu\): outputs f32\[7, 4\], rule gives f32\[7, 3\]"):
        _replace_node(graph, 1, outputs=wrong).verify()


def test_verifier_rejects_a_wrong_dtype(graph):
    wrong = (Value("relu", TensorType((7, 3), torch.float16)),)
    with pytest.raises(VerifyError, match="rule gives f32"):
        _replace_node(graph, 1, outputs=wrong).verify()


def test_verifier_rejects_an_unknown_op(graph):
    with pytest.raises(VerifyError, match="unknown op 'frobnicate'"):
        _replace_node(graph, 1, op="frobnicate").verify()


def test_verifier_rejects_operands_the_shape_rule_refuses():
    x = Value("x", TensorType((3, 4), torch.float32))
    y = Value("y", TensorType((5, 6), torch.float32))
    node = Node("mm", "mm", ("x", "y"), {}, (Value("mm", TensorType((3, 6), torch.float32)),))
    with pytest.raises(VerifyError, match="inner dimensions differ"):
        Graph((x, y), (), (node,), ("mm",)).verify()


def test_verifier_rejects_an_undefined_output(graph):
    with pytest.raises(VerifyError, match="graph output %nowhere"):
        dataclasses.replace(graph, outputs=("nowhere",)).verify()


def test_verifier_rejects_a_weight_that_disagrees_with_its_param_type(graph):
    weights = dict(graph.weights, p_fc_bias=torch.zeros(4))
    with pytest.raises(VerifyError, match="p_fc_bias"):
        dataclasses.replace(graph, weights=weights).verify()


def test_networkx_view_has_an_edge_per_use(graph):
    g = graph.to_networkx()
    assert nx.is_directed_acyclic_graph(g)
    assert set(g.predecessors("linear")) == {"x", "p_fc_weight", "p_fc_bias"}
    assert set(g.successors("split_with_sizes")) == {"cat"}
    assert set(g["split_with_sizes"]["cat"]) == {"getitem", "getitem_1"}
    assert g.number_of_edges() == sum(len(set(node.inputs)) for node in graph.nodes)
    assert list(nx.topological_sort(g.subgraph(n.name for n in graph.nodes))) == [n.name for n in graph.nodes]


def test_dead_code_elimination_drops_unused_nodes_and_weights():
    class Wasteful(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x):
            self.unused(x).exp()
            return self.used(x)

    program = ember.compile(Wasteful(), (torch.randn(2, 4),))
    assert [node.op for node in program.graph.nodes] == ["linear"]
    assert set(program.graph.weights) == {"p_used_weight", "p_used_bias"}


def test_dead_code_elimination_keeps_everything_that_reaches_an_output(graph):
    assert eliminate_dead_code(graph).nodes == graph.nodes


def test_verifier_checks_only_the_outputs_an_op_defines():
    """Batch norm's saved statistics are [C] or [0], fp32 or not, by device and torch version."""
    program = ember.compile(torch.nn.BatchNorm2d(3).eval(), (torch.randn(2, 3, 5, 5),))
    (index, node), = [(i, n) for i, n in enumerate(program.graph.nodes) if n.op == "_native_batch_norm_legit_no_training"]
    output, mean, rstd = node.outputs
    other_stats = (output, Value(mean.name, TensorType((3,), torch.float32)), Value(rstd.name, TensorType((3,), torch.float32)))
    _replace_node(program.graph, index, outputs=other_stats).verify()
    wrong_output = (Value(output.name, TensorType((2, 3, 5, 4), torch.float32)), mean, rstd)
    with pytest.raises(VerifyError, match="rule gives"):
        _replace_node(program.graph, index, outputs=wrong_output).verify()


def test_shape_rules_run_on_the_values_device():
    """histc takes int32 on CUDA but not on the CPU: the rule must follow the graph's device (fake tensors, no GPU needed)."""
    histc = ember.ir.OP_TABLE["histc"]
    attrs = {"bins": 4, "min": 0, "max": 4}
    (out,) = histc.infer(histc, [TensorType((13,), torch.int32, device="cuda")], attrs)
    assert out == TensorType((4,), torch.int32, (1,), "cuda")
    with pytest.raises(RuntimeError, match="not implemented"):
        histc.infer(histc, [TensorType((13,), torch.int32, device="cpu")], attrs)


def test_traced_types_run_once_per_op_types_and_attrs(monkeypatch):
    """The verifier types nodes again after every pass: a rule traced on fake tensors runs once per op, input types
    and attrs, and attrs equal in value but not in type (2, 2.0, True) stay apart."""
    from ember.ir import ops

    monkeypatch.setattr(ops, "_TRACED_TYPES", {})
    runs = []
    fake_mode = ops.FakeTensorMode
    monkeypatch.setattr(ops, "FakeTensorMode", lambda: runs.append(1) or fake_mode())
    mul, ints = ember.ir.OP_TABLE["mul.Scalar"], TensorType((3, 17), torch.int64)
    dtypes = [mul.infer(mul, [ints], {"other": other})[0].dtype for other in (2, 2.0, True, 2, 2.0, True)]
    assert dtypes == [torch.int64, torch.float32, torch.int64] * 2
    assert len(runs) == 3


def test_ops_that_leave_results_empty_keep_the_others_in_place():
    """convolution_backward without the input gradient returns (None, grad_weight, grad_bias)."""

    class WeightGradient(torch.nn.Module):
        def forward(self, grad_out, x, weight):
            _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                grad_out, x, weight, [5], [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [False, True, True])
            return grad_weight * 2, grad_bias

    args = (torch.randn(2, 5, 7, 7), torch.randn(2, 3, 9, 9), torch.randn(5, 3, 3, 3))
    program = ember.compile(WeightGradient(), args)
    (node,) = [n for n in program.graph.nodes if n.is_extern or n.op == "convolution_backward"]
    assert node.positions == (1, 2) and len(node.outputs) == 2
    assert " = " in str(program.graph) and "_, %" in str(program.graph)
    program.graph.verify()
    for got, want in zip(program(*args), WeightGradient()(*args)):
        torch.testing.assert_close(got, want)
    wrong = dataclasses.replace(node, positions=(0, 1))
    index = program.graph.nodes.index(node)
    with pytest.raises(VerifyError, match="rule gives _"):
        _replace_node(program.graph, index, outputs=wrong.outputs, positions=(0, 1)).verify()
