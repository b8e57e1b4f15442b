"""The IR as JSON: every attribute value, type, graph and plan comes back equal, through real JSON text, and data
that describes no IR object is refused rather than guessed at."""
from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, strategies as st

import ember
from ember import models
from ember.ir import TensorType
from ember.ir.serialize import (SerializeError, decode_fusion, decode_graph, decode_layout, decode_type, decode_value,
                                encode_fusion, encode_graph, encode_layout, encode_type, encode_value)
from ember.ir.graph import format_graph

_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5),
                     st.floats(allow_nan=False), st.sampled_from([math.inf, -math.inf]),
                     st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.contiguous_format,
                                      torch.channels_last, torch.strided, torch.device("cpu"), torch.device("cuda", 1)]))
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.lists(inner, max_size=3).map(tuple)), max_leaves=8)


def _through_json(data):
    return json.loads(json.dumps(data))


@given(_values)
def test_every_attribute_value_comes_back_equal_and_of_its_type(value):
    back = decode_value(_through_json(encode_value(value)))
    assert back == value and type(back) is type(value)


def test_nan_comes_back_as_nan():
    assert math.isnan(decode_value(_through_json(encode_value(math.nan))))


@pytest.mark.parametrize("data", [{"dtype": "Tensor"}, {"dtype": "manual_seed"}, {"memory_format": "float32"},
                                  {"device": "nowhere"}, {"float": "1e400"}, {"tuple": 3}, {"a": 1, "b": 2}])
def test_data_that_is_no_saved_value_is_refused(data):
    with pytest.raises(SerializeError):
        decode_value(data)


def test_a_value_of_another_kind_cannot_be_saved():
    with pytest.raises(SerializeError, match="cannot save an attribute of type complex"):
        encode_value(1j)


@pytest.mark.parametrize("type_", [TensorType((2, 3), torch.float16), TensorType((4, 5), torch.int64, (1, 4), "cuda"),
                                   TensorType((), torch.bool)])
def test_types_come_back_equal(type_):
    assert decode_type(_through_json(encode_type(type_))) == type_


@pytest.mark.parametrize("name", ["gpt2", "mixtral", "bert_masked"])
def test_a_compiled_graph_and_its_plans_come_back_equal(name):
    model, inputs = models.load(name)
    program = ember.compile(model.eval(), inputs, ember.Options(fusion=True))
    graph = program.graph
    back = decode_graph(_through_json(encode_graph(graph)), graph.weights)
    back.verify()
    assert format_graph(back) == format_graph(graph)
    assert [(node.name, node.op, node.target, node.inputs, dict(node.attrs), node.outputs, node.positions)
            for node in back.nodes] == [(node.name, node.op, node.target, node.inputs, dict(node.attrs), node.outputs,
                                         node.positions) for node in graph.nodes]
    assert back.written == graph.written
    assert decode_fusion(_through_json(encode_fusion(program.fusion))) == program.fusion
    assert decode_layout(_through_json(encode_layout(program.executor.layout))) == program.executor.layout


def test_an_op_this_ember_does_not_define_is_refused_by_name():
    model, inputs = models.load("mlp")
    data = _through_json(encode_graph(ember.compile(model, inputs).graph))
    data["nodes"][0]["op"] = "frobnicate"
    with pytest.raises(SerializeError, match="uses op 'frobnicate'"):
        decode_graph(data, {})
    data["nodes"][0]["op"] = "linear"
    del data["nodes"][0]["inputs"]
    with pytest.raises(SerializeError, match="malformed graph"):
        decode_graph(data, {})
