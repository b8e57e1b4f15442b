"""The pipeline verifies the IR after every stage and can dump it: a broken pass is caught at that pass."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import ember
import ember.api
from ember.ir import Graph


def _drop_first_node(graph: Graph) -> Graph:
    return dataclasses.replace(graph, nodes=graph.nodes[1:])


def test_a_pass_that_breaks_the_ir_is_caught_at_that_stage(monkeypatch):
    monkeypatch.setattr(ember.api, "PIPELINE", (*ember.api.PIPELINE, _drop_first_node))
    with pytest.raises(ember.CompileError, match="invalid after stage '_drop_first_node'.*before it is defined"):
        ember.compile(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()), (torch.randn(3, 4),))


def test_verification_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(ember.api, "PIPELINE", (*ember.api.PIPELINE, _drop_first_node))
    ember.compile(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()), (torch.randn(3, 4),),
                  options={"verify": False})


def test_debug_dir_holds_the_ir_after_each_stage(tmp_path):
    program = ember.compile(torch.nn.Linear(4, 2), (torch.randn(3, 4),), options={"debug_dir": str(tmp_path)})
    dumps = sorted(path.name for path in tmp_path.iterdir())
    assert dumps == ["00_lower.ir.txt", "01_eliminate_dead_code.ir.txt", "02_fold_constant_masks.ir.txt",
                     "03_fold_constants.ir.txt", "04_drop_empty_cat_inputs.ir.txt", "05_decompose_attention.ir.txt",
                     "06_group_query_heads.ir.txt", "07_fold_query_groups.ir.txt", "08_convert_attention_masks.ir.txt",
                     "09_pad_linear_features.ir.txt"]
    assert (tmp_path / "09_pad_linear_features.ir.txt").read_text() == str(program.graph) + "\n"


def test_debug_dir_defaults_to_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_DEBUG_DIR", str(tmp_path))
    assert ember.Options().debug_dir == str(tmp_path)
