"""Buffer lifetimes: views share their base, outputs live to the end, the peak is hand-checked."""
from __future__ import annotations

import torch

from ember.ir import Graph, Node, TensorType, Value
from ember.optimizer.liveness import Buffer, buffers, live_bytes, peak_live_bytes, reuses


def _v(name: str, *shape: int) -> Value:
    return Value(name, TensorType(shape, torch.float32))


def test_views_extend_their_base_and_outputs_live_to_the_end():
    x = _v("x", 4, 8)
    nodes = (
        Node("a", "exp", ("x",), {}, (_v("a", 4, 8),)),                      # 128 B, step 0
        Node("view", "view", ("a",), {"size": (32,)}, (_v("view", 32),)),     # alias of a
        Node("b", "neg", ("x",), {}, (_v("b", 4, 8),)),                      # 128 B, step 2
        Node("c", "relu", ("view",), {}, (_v("c", 32),)),                    # reads a through the view at step 3
        Node("d", "add.Tensor", ("b", "b"), {}, (_v("d", 4, 8),)),           # step 4, graph output
        Node("xv", "view", ("x",), {"size": (32,)}, (_v("xv", 32),)),         # a view of an input owns nothing
    )
    graph = Graph((x,), (), nodes, ("c", "d", "xv"))
    graph.verify()
    assert buffers(graph) == (
        Buffer("a", 128, 0, 3), Buffer("b", 128, 2, 4), Buffer("c", 128, 3, 5), Buffer("d", 128, 4, 5),
    )
    assert live_bytes(buffers(graph), len(nodes)) == [128, 128, 256, 384, 384, 256]
    assert peak_live_bytes(graph) == (384, 3)


def test_an_elementwise_result_is_written_over_an_input_that_dies_there():
    x = _v("x", 4, 4)
    nodes = (
        Node("a", "exp", ("x",), {}, (_v("a", 4, 4),)),
        Node("b", "neg", ("a",), {}, (_v("b", 4, 4),)),                 # a dies here: b takes its memory
        Node("c", "add.Tensor", ("b", "x"), {}, (_v("c", 4, 4),)),      # b dies here: c takes its memory, a's
        Node("t", "t", ("c",), {}, (Value("t", TensorType((4, 4), torch.float32, strides=(1, 4))),)),
        Node("d", "add.Tensor", ("c", "t"), {}, (_v("d", 4, 4),)),      # would race with its read of c.t()
        Node("e", "relu", ("d",), {}, (_v("e", 4, 4),)),                # returned: allocated on its own
        Node("f", "sum", ("e",), {}, (_v("f"),)),
    )
    graph = Graph((x,), (), nodes, ("e", "f"))
    graph.verify()
    assert reuses(graph) == {"b": "a", "c": "b"}
    assert buffers(graph) == (Buffer("a", 64, 0, 4), Buffer("d", 64, 4, 5), Buffer("e", 64, 5, 6),
                              Buffer("f", 4, 6, 6))


def test_nothing_is_written_over_memory_a_returned_view_keeps():
    x = _v("x", 4, 4)
    nodes = (
        Node("a", "exp", ("x",), {}, (_v("a", 4, 4),)),
        Node("view", "view", ("a",), {"size": (16,)}, (_v("view", 16),)),
        Node("b", "neg", ("a",), {}, (_v("b", 4, 4),)),
    )
    graph = Graph((x,), (), nodes, ("view", "b"))
    graph.verify()
    assert reuses(graph) == {}
