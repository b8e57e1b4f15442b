"""Layout: half-precision CUDA linear layers with a misaligned feature count compute padded features."""
from __future__ import annotations

import torch
from torch.nn import functional as F

from ember.ir import Graph, Node, TensorType, Value
from ember.optimizer.arena import plan_arena
from ember.optimizer.layout import pad_linear_features
from ember.runtime import Executor
from ember.tolerance import assert_close


def typed(tensor: torch.Tensor, device: str = "cuda") -> TensorType:
    return TensorType(tuple(tensor.shape), tensor.dtype, tuple(tensor.stride()), device)


def head(features: int = 37, dtype: torch.dtype = torch.bfloat16, bias: bool = True, device: str = "cuda"):
    """x @ weightᵀ + bias, then relu; returns the logits too. The tensors live on the CPU; the types say `device`."""
    x, weight, b = torch.randn(5, 16, dtype=dtype), torch.randn(features, 16, dtype=dtype), torch.randn(features, dtype=dtype)
    logits = F.linear(x, weight, b if bias else None)
    params = (Value("w", typed(weight, device)),) + ((Value("b", typed(b, device)),) if bias else ())
    nodes = (Node("lm_head", "linear", ("x", "w", "b") if bias else ("x", "w"), {} if bias else {"bias": None},
                  (Value("logits", typed(logits, device)),)),
             Node("act", "relu", ("logits",), {}, (Value("act", typed(logits, device)),)))
    graph = Graph((Value("x", typed(x, device)),), params, nodes, ("act", "logits"), {"w": weight, "b": b} if bias else {"w": weight})
    return graph, x, logits


def test_a_misaligned_linear_computes_padded_features_and_returns_the_first_ones():
    graph, x, logits = head()
    padded = pad_linear_features(graph)
    padded.verify()
    assert [node.op for node in padded.nodes] == ["linear", "slice.Tensor", "relu"]
    types = padded.types()
    assert types["logits_padded"].shape == (5, 40) and types["logits"].strides == (40, 1)
    assert padded.weights["w_padded40"].shape == (40, 16) and torch.equal(padded.weights["w_padded40"][37:], torch.zeros(3, 16, dtype=torch.bfloat16))
    act, got = Executor(padded)([x])
    assert_close(got, logits)
    assert_close(act, logits.relu())
    arena = plan_arena(padded)
    assert "logits_padded" in arena.fresh  # returned through its view: allocated per call, never in the arena


def test_aligned_features_float32_and_cpu_layers_stay_as_they_are():
    for graph, _, _ in (head(features=40), head(dtype=torch.float32), head(device="cpu")):
        assert pad_linear_features(graph) is graph


def test_a_layer_without_bias_is_padded_too():
    graph, x, logits = head(bias=False)
    padded = pad_linear_features(graph)
    assert padded.nodes[0].inputs == ("x", "w_padded40")
    assert_close(Executor(padded)([x])[1], logits)
