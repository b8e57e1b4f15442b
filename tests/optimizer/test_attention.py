"""Attention on torch's math path, written out: matmul, one fused scale-mask-softmax kernel, matmul; same results."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import ember
from ember.api import compile_graph
from ember.frontend import from_module
from ember.ir import Graph, Node, TensorType, Value
from ember.ir.types import contiguous_strides
from ember.optimizer.attention import (_unmasked, _viewable, convert_attention_masks, decompose_attention, fold_constant_masks,
                                      fold_query_groups, group_query_heads, runs_math_path)
from ember.optimizer import attention as attention_module
from ember.optimizer.cost import CostModel, load_profile
from ember.optimizer.fusion import plan_fusion
from ember import models
from ember.tolerance import assert_close, result_tolerance


class Attention(nn.Module):
    """Heads-second views of [batch, length, heads, features] inputs (non-contiguous), as transformers do."""

    def __init__(self, **options):
        super().__init__()
        self.options = options

    def forward(self, q, k, v, *mask):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), *mask, **self.options)
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)


def _qkv(dtype: torch.dtype, rows: int = 11, columns: int = 13) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(2, length, 3, 8, dtype=dtype) for length in (rows, columns, columns))


def _padding_mask(rows: int = 11, columns: int = 13) -> torch.Tensor:
    keep = torch.rand(2, 1, rows, columns) < 0.7
    keep[0, 0, 3] = False  # a query that sees no key: the math path gives 0 there, not NaN
    return keep


COST = CostModel(load_profile("h100"))

CASES = {
    "boolean mask": (Attention(), lambda dtype: (*_qkv(dtype), _padding_mask())),
    "additive mask": (Attention(), lambda dtype: (*_qkv(dtype), torch.randn(1, 3, 11, 13, dtype=dtype))),
    "causal, fewer queries than keys": (Attention(is_causal=True), lambda dtype: _qkv(dtype, 7, 13)),
    "no mask, scaled": (Attention(scale=0.3), lambda dtype: _qkv(dtype)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_written_out_attention_matches_torch_through_generated_kernels(case, dtype):
    model, make = CASES[case]
    inputs = make(dtype)
    graph = decompose_attention(from_module(model, inputs).graph, select=lambda node, types: True)
    assert "scaled_dot_product_attention" not in {node.op for node in graph.nodes}
    softmax = next(node.name for node in graph.nodes if "softmax" in node.op)
    group = next(group for group in plan_fusion(graph, COST).groups if softmax in group.nodes)
    assert group.kind == "reduction" and len(group.nodes) >= 2  # the scale (and mask) and softmax in one kernel
    program = compile_graph(graph, ember.Options(fusion=True))
    with torch.no_grad():
        (got,) = program(*inputs)
        expected = model(*inputs)
        exact = model(*(x.double() if x.is_floating_point() else x for x in inputs))
    if dtype == torch.float32:
        assert_close(got, expected)
    else:  # float32 inside, one rounding at the end: within the dtype's tolerance of the exact result
        assert models.max_error(exact, got) <= result_tolerance(expected)
        assert models.max_error(expected, got) <= result_tolerance(expected)


def test_attention_stays_whole_where_a_fused_kernel_takes_it_or_it_cannot_be_written_out():
    inputs = (*_qkv(torch.float32), _padding_mask())
    graph = from_module(Attention(), inputs).graph
    assert decompose_attention(graph) is graph  # on the CPU torch is not asked: nothing changes
    assert not runs_math_path(next(n for n in graph.nodes if n.op == "scaled_dot_product_attention"), graph.types())
    grouped = from_module(Attention(enable_gqa=True), (*_qkv(torch.float32)[:1], *(x[:, :, :1] for x in _qkv(torch.float32)[1:]))).graph
    assert decompose_attention(grouped, select=lambda node, types: True) is grouped


def _typed(shape, dtype=torch.bfloat16, device="cuda"):
    return TensorType(tuple(shape), dtype, contiguous_strides(tuple(shape)), device)


def _layers_sharing_a_mask(device: str) -> Graph:
    q, k, v = (Value(name, _typed((1, 4, 5, 16), device=device)) for name in "qkv")
    mask = Value("mask", _typed((1, 1, 5, 5), torch.bool, device))
    nodes = tuple(Node(f"a{i}", "scaled_dot_product_attention", ("q", "k", "v", "mask"), {"scale": 0.25},
                       (Value(f"a{i}", _typed((1, 4, 5, 16), device=device)),)) for i in range(3))
    return Graph((q, k, v, mask), (), nodes, ("a0", "a1", "a2"))


def test_a_boolean_mask_of_fused_attention_is_made_additive_once_for_every_layer():
    graph = convert_attention_masks(_layers_sharing_a_mask("cuda"))
    graph.verify()
    ops = [node.op for node in graph.nodes]
    assert ops == ["where.Scalar", "_to_copy"] + ["scaled_dot_product_attention"] * 3  # one kernel where fused
    additive = graph.nodes[1].outputs[0]
    assert additive.type.dtype == torch.bfloat16 and additive.type.shape == (1, 1, 5, 5)
    assert all(node.inputs[3] == additive.name for node in graph.nodes[2:])


def test_masks_off_the_gpu_are_left_to_torch():
    graph = _layers_sharing_a_mask("cpu")
    assert convert_attention_masks(graph) is graph


def test_torch_reads_the_additive_mask_as_it_reads_the_boolean_one():
    q, k, v = (torch.randn(2, 3, 7, 8, dtype=torch.bfloat16) for _ in range(3))
    mask = torch.rand(2, 1, 7, 7) < 0.7
    mask[..., 0] = True
    additive = torch.where(mask, torch.zeros((), dtype=torch.bfloat16), float("-inf"))
    boolean = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(boolean, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=additive))


def test_repeated_keys_and_values_are_read_unrepeated_by_grouped_query_attention():
    """transformers' repeat_kv copies keys and values per query head; attention that takes grouped heads reads
    them as they are: the copies go, and the model computes what eager does."""
    model, inputs = models.load("llama", "tiny")
    graph = from_module(model, inputs).graph
    grouped = group_query_heads(graph, select=lambda node, types: True)
    grouped.verify()
    attention = [node for node in grouped.nodes if node.op == "scaled_dot_product_attention"]
    assert attention and all(node.attrs["enable_gqa"] for node in attention)
    def repeat_copies(g):  # repeat_kv's contiguous copies (the KV cache's clones of its empty start are of weights)
        return [node for node in g.nodes if node.op == "clone" and node.inputs[0] not in g.weights]

    assert repeat_copies(graph) and not repeat_copies(grouped)
    with torch.no_grad():
        got = compile_graph(grouped, ember.Options())(*inputs)
        want = model(*inputs)
    assert models.max_error(want, got) <= result_tolerance(want)


def test_grouped_query_attention_is_asked_of_torch_and_off_the_gpu_left_as_written():
    graph = from_module(*models.load("llama", "tiny")).graph
    assert group_query_heads(graph) is graph


class DecodeAttention(nn.Module):
    """One query per head over a cache repeated for grouped-query heads (transformers' repeat_kv), with a mask over
    the keys, as a static-cache decode step attends."""

    def forward(self, x, keys, values, mask):
        batch, rows, heads, features = x.shape
        groups = heads // keys.shape[1]

        def repeat(cache):
            shape = cache.shape
            expanded = cache[:, :, None, :, :].expand(shape[0], shape[1], groups, shape[2], shape[3])
            return expanded.reshape(shape[0], shape[1] * groups, shape[2], shape[3])

        out = F.scaled_dot_product_attention(x.transpose(1, 2), repeat(keys), repeat(values), attn_mask=mask)
        return out.transpose(1, 2).reshape(batch, rows, -1)


def _decode_inputs(rows: int = 1, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    mask = torch.rand(2, 1, rows, 13) < 0.7
    mask[..., 0] = True
    return (torch.randn(2, rows, 6, 8, dtype=dtype), torch.randn(2, 2, 13, 8, dtype=dtype),
            torch.randn(2, 2, 13, 8, dtype=dtype), mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_query_per_head_is_folded_into_the_key_heads_rows_against_the_unrepeated_cache(dtype):
    """Queries [2, 6 heads, 1, 8] over keys of 2 heads: each group of 3 queries becomes 3 rows of its key head,
    the key mask broadcasting over them; the cache's repeated copies go and the result is eager's."""
    model, inputs = DecodeAttention().eval(), _decode_inputs(dtype=dtype)
    graph = from_module(model, inputs).graph
    folded = fold_query_groups(graph, select=lambda node, types: True)
    folded.verify()
    (attention,) = [node for node in folded.nodes if node.op == "scaled_dot_product_attention"]
    types = folded.types()
    assert types[attention.inputs[0]].shape == (2, 2, 3, 8) and types[attention.inputs[1]].shape == (2, 2, 13, 8)
    assert not [node for node in folded.nodes if node.op == "clone" and types[node.outputs[0].name].shape[-2] == 13]
    assert folded.types()[folded.outputs[0]] == graph.types()[graph.outputs[0]]
    with torch.no_grad():
        (got,) = compile_graph(folded, ember.Options())(*inputs)
        want = model(*inputs)
    assert_close(got, want)


def test_a_folded_result_laid_out_group_rows_outermost_is_copied_before_it_is_viewed_as_query_heads(monkeypatch):
    """Flash attention lays its result out [batch, rows, heads, features] whatever the IR's type says; the folded
    result is typed by torch's own choice, and where that layout cannot be viewed as the query heads, one small
    contiguous copy comes first (a view of it would fail, a kernel reading it as contiguous would be wrong)."""
    traced = attention_module.infer_by_tracing

    def flash_layout(definition, inputs, attrs):
        (made,) = traced(definition, inputs, attrs)
        batch, heads, rows, features = made.shape
        return (dataclasses.replace(made, strides=(rows * heads * features, features, heads * features, 1)),)

    model, inputs = DecodeAttention().eval(), _decode_inputs()
    graph = from_module(model, inputs).graph
    monkeypatch.setattr(attention_module, "infer_by_tracing", flash_layout)
    folded = fold_query_groups(graph, select=lambda node, types: True)
    (attention,) = [node for node in folded.nodes if node.op == "scaled_dot_product_attention"]
    (copy,) = [node for node in folded.nodes if attention.outputs[0].name in node.inputs]
    assert copy.op == "clone" and folded.types()[copy.outputs[0].name].is_contiguous
    with torch.no_grad():
        (got,) = compile_graph(folded, ember.Options())(*inputs)
        want = model(*inputs)
    assert_close(got, want)


def test_several_queries_per_head_or_a_mask_by_head_are_left_as_written():
    model = DecodeAttention().eval()
    rows = from_module(model, _decode_inputs(rows=3)).graph
    assert fold_query_groups(rows, select=lambda node, types: True) is rows
    x, keys, values, _ = _decode_inputs()
    by_head = from_module(model, (x, keys, values, torch.rand(2, 6, 1, 13) < 0.7)).graph
    assert fold_query_groups(by_head, select=lambda node, types: True) is by_head


def test_folding_queries_is_asked_of_torch_and_off_the_gpu_left_as_written():
    graph = from_module(DecodeAttention().eval(), _decode_inputs()).graph
    assert fold_query_groups(graph) is graph


def test_whether_a_value_can_be_viewed_is_answered_under_torch_compiles_fake_tensors_too():
    """The backend runs the passes while torch.compile's fake mode is active, where a view fails differently."""
    heads_second = TensorType((2, 4, 13, 16), torch.float32, (832, 16, 64, 1))
    with FakeTensorMode():
        assert not _viewable(heads_second, (8, 13, 16))
        assert _viewable(TensorType((2, 4, 13, 16), torch.float32), (8, 13, 16))


class BuiltMask(nn.Module):
    """Attention whose mask is built from aranges in forward, as transformers builds one when given no mask."""

    MASKS = {
        "keeps every key": lambda i, j, dtype: (j >= 0).expand(i.shape[0], j.shape[1]),
        "causal": lambda i, j, dtype: j <= i,
        "causal, additive": lambda i, j, dtype: torch.where(j <= i, 0.0, float("-inf")).to(dtype),
        "causal, additive, finite": lambda i, j, dtype: torch.where(j <= i, 0.0, -1e4).to(dtype),
        "sliding window": lambda i, j, dtype: (j <= i) & (j > i - 3),
        "diagonal shifted": lambda i, j, dtype: j <= i + 2,
    }

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, q, k, v):
        rows, columns = torch.arange(q.shape[1])[:, None], torch.arange(k.shape[1])[None, :]
        return Attention()(q, k, v, self.MASKS[self.kind](rows, columns, q.dtype)[None, None])


@pytest.mark.parametrize("kind, inputs, causal", [
    ("keeps every key", 3, False), ("causal", 3, True), ("causal, additive", 3, True),
    ("causal, additive, finite", 4, False), ("sliding window", 4, False), ("diagonal shifted", 4, False),
])
def test_a_mask_built_from_no_input_is_dropped_or_made_causal_where_that_is_exact(kind, inputs, causal):
    """A mask torch's own causal masking (top-left aligned) does not give exactly stays, as do its nodes."""
    model, qkv = BuiltMask(kind), _qkv(torch.float32, 11, 11)
    graph = from_module(model, qkv).graph
    folded = fold_constant_masks(graph)
    folded.verify()
    with FakeTensorMode():  # as torch.compile's backend runs it
        assert str(fold_constant_masks(graph)) == str(folded)
    (attention,) = [node for node in folded.nodes if node.op == "scaled_dot_product_attention"]
    assert (len(attention.inputs), attention.attrs.get("is_causal", False)) == (inputs, causal)
    assert (len(folded.nodes) < len(graph.nodes)) == (inputs == 3)
    with torch.no_grad():
        assert_close(ember.compile(model, qkv)(*qkv), model(*qkv))


def test_a_mask_given_by_the_caller_stays():
    graph = from_module(Attention(), (*_qkv(torch.float32), _padding_mask())).graph
    assert fold_constant_masks(graph) is graph


def test_transformers_masks_built_without_an_attention_mask_go():
    """BERT's all-keeping mask sent its attention down torch's math path; the decoders' causal masks were read
    by every layer."""
    for name, causal in (("bert", False), ("gpt2", True), ("llama", True), ("mixtral", True)):
        graph = fold_constant_masks(from_module(*models.load(name, "tiny")).graph)
        attention = [node for node in graph.nodes if node.op == "scaled_dot_product_attention"]
        assert attention and all(len(node.inputs) == 3 and node.attrs.get("is_causal", False) == causal
                                 for node in attention), name


def test_an_unmasked_attention_whose_kernel_lays_out_its_result_otherwise_is_copied_into_the_typed_layout():
    """On the GPU the math path a mask forced gives a contiguous result and the fused kernel a query-like one:
    the nodes after it were typed on the first, and generated kernels read by those strides."""
    graph = from_module(BuiltMask("keeps every key"), _qkv(torch.float32, 11, 11)).graph
    types = graph.types()
    (node,) = [node for node in graph.nodes if node.op == "scaled_dot_product_attention"]
    assert _unmasked(node, types, causal=False)[0].outputs == node.outputs  # the layout it had: no copy
    result = node.outputs[0]
    contiguous = Value(result.name, dataclasses.replace(result.type, strides=contiguous_strides(result.type.shape)))
    nodes = _unmasked(dataclasses.replace(node, outputs=(contiguous,)), types, causal=False)
    assert [n.op for n in nodes] == ["scaled_dot_product_attention", "_to_copy"]
    assert nodes[0].outputs[0].type.layout == result.type.layout
    assert nodes[-1].outputs[0].name == result.name and nodes[-1].outputs[0].type.layout == contiguous.type.layout
