"""The schedule's buffer lifetimes: views share their base, outputs live to the end, the peak is hand-checked."""
from __future__ import annotations

import torch

import ember

from ember.ir import Graph, Node, TensorType, Value
from ember.ir.schedule import Buffer, schedule_of
from ember.optimizer.liveness import live_bytes, peak_live_bytes


def _v(name: str, *shape: int) -> Value:
    return Value(name, TensorType(shape, torch.float32))


def test_views_extend_their_base_and_outputs_live_to_the_end():
    x = _v("x", 4, 8)
    nodes = (
        Node("a", "exp", ("x",), {}, (_v("a", 4, 8),)),                      # 128 B, step 0
        Node("view", "view", ("a",), {"size": (32,)}, (_v("view", 32),)),     # alias of a
        Node("b", "neg", ("x",), {}, (_v("b", 4, 8),)),                      # 128 B, step 2
        Node("c", "relu", ("view",), {}, (_v("c", 32),)),                    # reads a through the view at step 3
        Node("d", "add.Tensor", ("b", "b"), {}, (_v("d", 4, 8),)),           # step 4, graph output written over b
        Node("xv", "view", ("x",), {"size": (32,)}, (_v("xv", 32),)),         # a view of an input owns nothing
    )
    graph = Graph((x,), (), nodes, ("c", "d", "xv"))
    graph.verify()
    assert schedule_of(graph).buffers == (Buffer("a", 128, 0, 3), Buffer("b", 128, 2, 5), Buffer("c", 128, 3, 5))
    assert live_bytes(schedule_of(graph).buffers, len(nodes)).tolist() == [128, 128, 256, 384, 256, 256]
    assert peak_live_bytes(schedule_of(graph)) == (384, 3)


def test_an_elementwise_result_is_written_over_an_input_that_dies_there():
    x = _v("x", 4, 4)
    nodes = (
        Node("a", "exp", ("x",), {}, (_v("a", 4, 4),)),
        Node("b", "neg", ("a",), {}, (_v("b", 4, 4),)),                 # a dies here: b takes its memory
        Node("c", "add.Tensor", ("b", "x"), {}, (_v("c", 4, 4),)),      # b dies here: c takes its memory, a's
        Node("t", "t", ("c",), {}, (Value("t", TensorType((4, 4), torch.float32, strides=(1, 4))),)),
        Node("d", "add.Tensor", ("c", "t"), {}, (_v("d", 4, 4),)),      # would race with its read of c.t()
        Node("e", "relu", ("d",), {}, (_v("e", 4, 4),)),                # returned, over d (it owns its memory)
        Node("f", "sum", ("e",), {}, (_v("f"),)),
    )
    graph = Graph((x,), (), nodes, ("e", "f"))
    graph.verify()
    assert schedule_of(graph).reused == {"b": "a", "c": "b", "e": "d"}
    assert schedule_of(graph).buffers == (Buffer("a", 64, 0, 4), Buffer("d", 64, 4, 6), Buffer("f", 4, 6, 6))


def test_nothing_is_written_over_memory_a_returned_view_keeps():
    x = _v("x", 4, 4)
    nodes = (
        Node("a", "exp", ("x",), {}, (_v("a", 4, 4),)),
        Node("view", "view", ("a",), {"size": (16,)}, (_v("view", 16),)),
        Node("b", "neg", ("a",), {}, (_v("b", 4, 4),)),
    )
    graph = Graph((x,), (), nodes, ("view", "b"))
    graph.verify()
    assert schedule_of(graph).reused == {}


def test_an_op_whose_out_overload_copies_is_written_over_its_first_input_in_place():
    """masked_fill's out= computes into a temporary: its result takes its dying input's memory through
    masked_fill_, and embedding's (no in-place variant) is left to the op, outside any arena."""
    x, y = _v("x", 4, 4), _v("y", 4, 4)
    mask = Value("mask", TensorType((4, 4), torch.bool))
    table, ids = _v("table", 10, 4), Value("ids", TensorType((4,), torch.int64))
    nodes = (
        Node("a", "exp", ("x",), {}, (_v("a", 4, 4),)),
        Node("b", "masked_fill.Scalar", ("a", "mask"), {"value": 0.0}, (_v("b", 4, 4),)),
        Node("c", "mul.Tensor", ("b", "y"), {}, (_v("c", 4, 4),)),
        Node("e", "embedding", ("table", "ids"), {}, (_v("e", 4, 4),)),
        Node("f", "add.Tensor", ("c", "e"), {}, (_v("f", 4, 4),)),
    )
    graph = Graph((x, y, mask, table, ids), (), nodes, ("f",))
    graph.verify()
    assert [node.fills_given_memory for node in nodes] == [True, False, True, False, True]
    assert schedule_of(graph).reused == {"b": "a", "c": "b", "f": "e"}  # the returned f over e, which owns its memory
    assert [buffer.name for buffer in schedule_of(graph).buffers] == ["a", "e"]


def test_an_inverse_permutation_is_written_into_the_buffer_it_fills_not_a_copy_of_it():
    """MoE routing's `inverse[order] = arange` is index_put over a fresh buffer: written over it in place where it
    dies (torch's functional index_put would copy it first), and not where it is read after."""
    order, positions = (Value(name, TensorType((6,), torch.int64)) for name in ("order", "positions"))
    empty = Node("inverse", "empty.memory_format", (), {"size": (6,), "dtype": torch.int64},
                 (Value("inverse", TensorType((6,), torch.int64)),))
    put = Node("put", "index_put", ("inverse", "order", "positions"), {"indices": (1,)},
               (Value("put", TensorType((6,), torch.int64)),))
    twice = Node("twice", "mul.Scalar", ("put",), {"other": 2}, (Value("twice", TensorType((6,), torch.int64)),))
    graph = Graph((order, positions), (), (empty, put, twice), ("twice",))
    graph.verify()
    assert schedule_of(graph).reused == {"put": "inverse"}
    kept = Graph((order, positions), (), (empty, put, twice), ("twice", "inverse"))
    assert "put" not in schedule_of(kept).reused
    with torch.inference_mode():
        program = ember.compile(_InversePermutation(), (torch.randperm(6),))
        order = torch.randperm(6)
        assert torch.equal(program(order), _InversePermutation()(order))
    step = next(step for step in program.executor.steps_on(torch.device("cpu")) if step.node.startswith("index_put"))
    assert step.call.how == "in_place"


class _InversePermutation(torch.nn.Module):
    def forward(self, order):
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel())
        return inverse * 2


def test_an_extern_op_returning_a_view_extends_its_base():
    """view_as_complex is outside the op table but returns a view of `s`: `s` must live while the view is read
    (it once shared an arena slot with `c`, made after `s`'s last direct read, and the answer was wrong)."""
    x = _v("x", 4, 4, 2)
    complex_type = TensorType((4, 4), torch.complex64)
    nodes = (
        Node("s", "exp", ("x",), {}, (_v("s", 4, 4, 2),)),
        Node("z", "extern", ("s",), {}, (Value("z", complex_type),), target="aten.view_as_complex.default"),
        Node("c", "exp", ("x",), {}, (_v("c", 4, 4, 2),)),
        Node("m", "extern", ("z", "z"), {}, (Value("m", complex_type),), target="aten.mul.Tensor"),
        Node("r", "add.Tensor", ("c", "x"), {}, (_v("r", 4, 4, 2),)),
    )
    graph = Graph((x,), (), nodes, ("m", "r"))
    graph.verify()
    assert Buffer("s", 128, 0, 3) in schedule_of(graph).buffers


def test_a_returned_result_is_written_over_an_input_owning_memory_that_dies_there():
    """A returned softcap over the logits needs no second logits buffer; but a result over a value itself written
    over another keeps memory of its own, so that an output made late is still made late (runtime.executor.tail_start)."""
    x = _v("x", 4, 8)
    nodes = (
        Node("logits", "exp", ("x",), {}, (_v("logits", 4, 8),)),
        Node("capped", "tanh", ("logits",), {}, (_v("capped", 4, 8),)),     # returned, over the logits
        Node("a", "neg", ("x",), {}, (_v("a", 4, 8),)),
        Node("b", "sin", ("a",), {}, (_v("b", 4, 8),)),                      # over a, not returned
        Node("c", "cos", ("b",), {}, (_v("c", 4, 8),)),                      # returned: b's memory is a's
    )
    graph = Graph((x,), (), nodes, ("capped", "c"))
    graph.verify()
    schedule = schedule_of(graph)
    assert schedule.reused == {"capped": "logits", "b": "a"}
    assert schedule.made_at("capped") == 0 and schedule.made_at("c") == 4
