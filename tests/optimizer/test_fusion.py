"""Fusion: pointwise chains become one generated kernel; legality, cost decisions, and models that still match."""
from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
import torch
from torch import nn

import ember
from ember import models
from ember.frontend import from_module
from ember.optimizer.cost import CostModel, load_profile
from ember.ir.plans import FusionError
from ember.optimizer.fusion import plan_fusion
from ember.optimizer.fusion_verify import verify_fusion
from ember.tolerance import result_tolerance, tolerance_for

MODELS = ["mlp", "cnn", "unet", "demo", "gpt2", "llama", "mixtral", "bert"]
COST = CostModel(load_profile("h100"))


def _plan(module: nn.Module, *inputs: torch.Tensor):
    graph = from_module(module, inputs).graph
    plan = plan_fusion(graph, COST)
    verify_fusion(plan, graph)
    return graph, plan


def _ops(graph, group) -> list[str]:
    nodes = {node.name: node for node in graph.nodes}
    return [nodes[name].op for name in group.nodes]


class BiasGeluScale(nn.Module):
    def forward(self, x, w, b):
        return torch.nn.functional.gelu(x @ w + b) * 0.5


def test_a_pointwise_chain_after_a_matmul_is_one_group_and_the_matmul_stays_out():
    graph, plan = _plan(BiasGeluScale(), torch.randn(5, 7), torch.randn(7, 9), torch.randn(9))
    assert [_ops(graph, group) for group in plan.groups] == [["add.Tensor", "gelu", "mul.Tensor"]]
    group = plan.groups[0]
    assert group.fused_us < group.unfused_us and group.outputs == (graph.outputs[0],)
    assert len(group.inputs) == 2  # the matmul's result and the bias; the scale is a constant in the kernel
    assert len(plan.schedule) == len(graph.nodes) - 2


class Diamond(nn.Module):
    """a = x + 1 feeds a matmul and a product with the matmul's result: a and the product cannot fuse."""

    def forward(self, x, w):
        a = x + 1
        return (a * (a @ w)).relu()


def test_a_group_never_swallows_a_node_that_depends_on_it_through_an_outside_node():
    graph, plan = _plan(Diamond(), torch.randn(6, 6), torch.randn(6, 6))
    add = next(node.name for node in graph.nodes if node.op == "add.Tensor")
    assert [_ops(graph, group) for group in plan.groups] == [["mul.Tensor", "relu"]]
    assert add in plan.schedule  # the add runs on its own, before the matmul that the product waits for
    assert plan.schedule.index(add) < plan.schedule.index(plan.groups[0].name)


class Broadcasts(nn.Module):
    def forward(self, x, row, column):
        return torch.sigmoid(x * row - column).sum(), x.exp() + 1


def test_pointwise_groups_hold_one_iteration_shape_and_stop_at_whole_tensor_reductions():
    graph, plan = _plan(Broadcasts(), torch.randn(4, 5), torch.randn(5), torch.randn(4, 1))
    assert sorted(_ops(graph, group) for group in plan.groups) == [
        ["exp", "add.Tensor"], ["mul.Tensor", "sub.Tensor", "sigmoid"]]
    for group in plan.groups:
        assert len({node.outputs[0].type.shape for node in graph.nodes if node.name in group.nodes}) == 1


class AddLayerNorm(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.norm = nn.LayerNorm(features)

    def forward(self, x, residual):
        hidden = x + residual
        return hidden, self.norm(hidden) * 2.0


def test_a_residual_add_its_layer_norm_and_the_scale_after_are_one_row_kernel():
    graph, plan = _plan(AddLayerNorm(37), torch.randn(3, 5, 37), torch.randn(3, 5, 37))
    assert [_ops(graph, group) for group in plan.groups] == [["add.Tensor", "native_layer_norm", "mul.Tensor"]]
    group = plan.groups[0]
    assert (group.kind, group.shape, group.reduced) == ("reduction", (3, 5, 37), 1)
    assert set(group.outputs) == set(graph.outputs)  # the sum is stored for the caller; the norm's statistics are not


class RMSNorm(nn.Module):
    """Llama's RMS norm, op by op: float32 statistics, cast back, then the weight."""

    def __init__(self, features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(features))

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(variance + 1e-6)).to(x.dtype)


def test_an_rms_norm_written_op_by_op_is_one_kernel_more_accurate_than_eager_in_bf16():
    model = RMSNorm(45).to(torch.bfloat16)
    x = torch.randn(2, 7, 45, dtype=torch.bfloat16)
    with torch.no_grad():
        program = ember.compile(model, (x,), ember.Options(fusion=True))
        got, eager = program(x), model(x)
    (step,) = program.executor.steps
    assert step.node.startswith("fused_add_mean_mul_pow_and_") and step.node.endswith("_more_0")  # rsqrt, casts
    assert program.report.fusion["decisions"][0]["nodes"] == len(program.graph.nodes)
    exact = model.weight.double() * x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6)
    assert (got.double() - exact).abs().max() <= (eager.double() - exact).abs().max()


class RowsAndColumns(nn.Module):
    """`x - x.mean(-1)` broadcasts the means along the last dim (one per column), not back over their rows;
    a square input makes the two readings the same shape, so only the values tell them apart."""

    def forward(self, x):
        return torch.softmax(x - x.mean(-1), dim=-1), x.sum(0)


def test_a_reduction_broadcast_the_other_way_or_over_leading_dims_stays_out_of_the_row_kernel():
    x = torch.randn(9, 9)
    graph, plan = _plan(RowsAndColumns(), x)
    assert [_ops(graph, group) for group in plan.groups] == [["sub.Tensor", "_softmax"]]
    program = ember.compile(RowsAndColumns(), (x,), ember.Options(fusion=True))
    for got, want in zip(program(x), RowsAndColumns()(x)):
        torch.testing.assert_close(got, want)


class SavedStatistics(nn.Module):
    def forward(self, x):
        out, mean, rstd = torch.ops.aten.native_layer_norm(x + 1, [x.shape[-1]], None, None, 1e-5)
        return out, rstd


def test_a_layer_norm_whose_statistics_are_read_stays_a_reference_step():
    graph, plan = _plan(SavedStatistics(), torch.randn(4, 11))
    assert "native_layer_norm" not in [op for group in plan.groups for op in _ops(graph, group)]


def test_the_verifier_rejects_a_group_that_misstates_its_iteration_space():
    graph, plan = _plan(AddLayerNorm(37), torch.randn(3, 5, 37), torch.randn(3, 5, 37))
    with pytest.raises(FusionError, match="cannot compute"):
        verify_fusion(dataclasses.replace(plan, groups=(dataclasses.replace(plan.groups[0], reduced=2),)), graph)


class HeadsFirst(nn.Module):
    def forward(self, x):
        return x.transpose(1, 2).contiguous(), torch.nn.functional.gelu(x)


def test_a_lone_copy_of_a_permuted_view_becomes_a_kernel_and_a_lone_contiguous_op_does_not():
    graph, plan = _plan(HeadsFirst(), torch.randn(16, 512, 12, 64))
    assert [_ops(graph, group) for group in plan.groups] == [["clone"]]
    assert plan.groups[0].fused_us < plan.groups[0].unfused_us


def test_the_verifier_rejects_a_schedule_out_of_order_and_a_node_in_two_groups():
    graph, plan = _plan(BiasGeluScale(), torch.randn(5, 7), torch.randn(7, 9), torch.randn(9))
    with pytest.raises(FusionError, match="before the step"):
        verify_fusion(dataclasses.replace(plan, schedule=tuple(reversed(plan.schedule))), graph)
    twice = dataclasses.replace(plan.groups[0], name="copy")
    with pytest.raises(FusionError, match="in both"):
        verify_fusion(dataclasses.replace(plan, groups=(plan.groups[0], twice)), graph)


def test_the_verifier_checks_what_a_group_reads_and_writes_and_what_it_may_hold():
    """Re-derived from the graph, not taken from the planner: a group's inputs, the values it must write, and
    whether a kernel can compute each node (a matmul cannot)."""
    graph, plan = _plan(BiasGeluScale(), torch.randn(5, 7), torch.randn(7, 9), torch.randn(9))
    group = plan.groups[0]
    with pytest.raises(FusionError, match="says it reads"):
        verify_fusion(dataclasses.replace(plan, groups=(dataclasses.replace(group, inputs=group.inputs[1:]),)), graph)
    with pytest.raises(FusionError, match="does not write"):
        verify_fusion(dataclasses.replace(plan, groups=(dataclasses.replace(group, outputs=()),)), graph)
    matmul = next(node for node in graph.nodes if node.name not in group.nodes)
    grown = dataclasses.replace(group, nodes=(matmul.name, *group.nodes), inputs=tuple(matmul.inputs) + group.inputs[1:])
    schedule = tuple(step for step in plan.schedule if step != matmul.name)
    with pytest.raises(FusionError, match="no expression, move or row reduction"):
        verify_fusion(dataclasses.replace(plan, groups=(grown,), schedule=schedule), graph)


@pytest.mark.parametrize("name", MODELS)
def test_every_model_runs_its_fused_kernels_and_matches_eager(name):
    model, inputs = models.load(name)
    with torch.no_grad():
        expected = model(*inputs)
        program = ember.compile(model, inputs, ember.Options(fusion=True))
        first = program(*inputs)
        second = program(*inputs)
    assert models.max_error(expected, first) <= result_tolerance(expected)
    assert models.max_error(first, second) == 0
    fusion = program.report.fusion
    assert fusion["steps"] == len(program.executor.steps)
    assert all(d["kept"] == (d["fused_us"] < d["unfused_us"]) for d in fusion["decisions"])


def test_fused_results_live_in_the_arena_and_intermediates_inside_a_group_nowhere():
    model, inputs = models.load("gpt2")
    program = ember.compile(model, inputs, ember.Options(fusion=True))
    groups = [item for item in program.executor.work if hasattr(item, "kernel")]
    assert groups
    slots = program.executor.layout.slots
    written = {name for step in program.executor.steps for name in step.outputs}
    grouped_away = {value.name for node in program.graph.nodes for value in node.outputs} - written
    assert grouped_away and not grouped_away & set(slots)
    assert any(value.name in slots for group in groups for value in group.outputs)
    names = {group.name for group in groups}
    written_over = [step for step in program.executor.steps_on(torch.device("cpu"))
                    if step.node in names and any(isinstance(target, int) for target in step.targets)]
    assert written_over  # kernels that write a result over an input dying there
    with torch.no_grad():
        assert models.max_error(model(*inputs), program(*inputs)) <= result_tolerance(model(*inputs))


def test_half_precision_chains_compute_in_float32_and_round_once():
    x = torch.randn(33, 17, dtype=torch.bfloat16)

    class Chain(nn.Module):
        def forward(self, x):
            return torch.nn.functional.silu(x * 3.0 + 1.0) - x

    program = ember.compile(Chain(), (x,), ember.Options(fusion=True))
    assert program.report.fusion["fused_nodes"] == 4
    assert [step.node for step in program.executor.steps] == ["fused_add_mul_silu_sub_0"]  # one kernel, nothing else
    exact = torch.nn.functional.silu(x.float() * 3.0 + 1.0) - x.float()
    fused_error = (program(x).float() - exact).abs().max()
    eager_error = (Chain()(x).float() - exact).abs().max()
    assert fused_error <= eager_error


def test_fusion_on_the_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ember.CompileError, match="TRITON_INTERPRET=1"):
        ember.compile(BiasGeluScale(), (torch.randn(5, 7), torch.randn(7, 9), torch.randn(9)), ember.Options(fusion=True))


def test_on_the_cpu_fusion_is_off_by_default():
    model, inputs = models.load("gpt2")
    program = ember.compile(model, inputs)
    assert program.report.fusion == {} and program.executor.work is None


def test_generated_kernels_are_dumped_with_their_ir(tmp_path):
    ember.compile(BiasGeluScale(), (torch.randn(5, 7), torch.randn(7, 9), torch.randn(9)),
                  ember.Options(fusion=True, debug_dir=str(tmp_path)))
    (dumped,) = tmp_path.glob("fused_*_0.py")
    source = dumped.read_text()
    assert source.startswith("# %") and "gelu" in source and "@triton.jit" in source


class Rotary(nn.Module):
    """A rotary embedding as transformers writes it: `x * cos + cat(-x2, x1) * sin` on a transposed view."""

    def forward(self, x, cos, sin):
        x = x.transpose(1, 2)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin


class MaskedSwiGLU(nn.Module):
    """A matmul result masked past a row count, split into SwiGLU's halves (Mixtral's experts)."""

    def forward(self, x, w, rows):
        up = (x @ w).masked_fill(rows, 0.0)
        gate, value = up.split(up.shape[-1] // 2, dim=-1)
        return torch.nn.functional.silu(gate) * value


def _fused_through_moves(model, *inputs):
    """The program, its generated kernels, and its result checked against float64: as close as eager's."""
    with torch.no_grad():
        program = ember.compile(model, inputs, ember.Options(fusion=True))
        got, eager = program(*inputs), model(*inputs)
        exact = model.double()(*(t.double() if t.is_floating_point() else t for t in inputs))
    kernels = [step.node for step in program.executor.steps if step.node.startswith("fused_")]
    error = (got.double() - exact).abs().max()
    assert error <= max((eager.double() - exact).abs().max(), tolerance_for(got.dtype, scale=exact.abs().max()))
    return program, kernels, got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_rotary_embedding_is_one_kernel_reading_through_its_cat(dtype):
    x = torch.randn(3, 11, 5, 18, dtype=dtype)  # odd sizes; transposed, so read at its strides
    cos, sin = torch.randn(11, 18, dtype=dtype), torch.randn(11, 18, dtype=dtype)
    program, kernels, got = _fused_through_moves(Rotary(), x, cos, sin)
    views = [node for node in program.graph.nodes if node.op in ("transpose.int", "slice.Tensor")]
    assert len(kernels) == 1 and len(program.executor.steps) == 1 + len(views)  # views are read through strides
    assert program.report.fusion["fused_nodes"] == len(program.graph.nodes) - len(views)  # the cat too


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_masked_result_split_into_swiglu_halves_is_one_kernel(dtype):
    x, w = torch.randn(13, 7, dtype=dtype), torch.randn(7, 2 * 19, dtype=dtype)
    rows = (torch.arange(13) >= 9).unsqueeze(1)
    program, kernels, got = _fused_through_moves(MaskedSwiGLU(), x, w, rows)
    assert len(kernels) == 1
    fused = next(group for group in program.report.fusion["decisions"] if group["kept"])
    assert fused["nodes"] == 4  # masked_fill, split, silu, mul
    assert torch.equal(got[9:], torch.zeros_like(got[9:]))


class SliceAlsoReturned(nn.Module):
    """The value a slice reads is also returned: it must be stored whole, so the slice cannot pull it in."""

    def forward(self, x):
        y = x.exp()
        return y, y[:, 1:4] * 2.0


def test_a_value_read_outside_is_not_pulled_through_a_move():
    graph, plan = _plan(SliceAlsoReturned(), torch.randn(5, 6))
    assert all("slice.Tensor" not in _ops(graph, group) for group in plan.groups)


class RotatedKeysRepeated(nn.Module):
    """Rotated keys repeated for grouped-query attention, as transformers' repeat_kv writes it."""

    def forward(self, k, cos, sin):
        half = k.shape[-1] // 2
        k = k * cos + torch.cat((-k[..., half:], k[..., :half]), dim=-1) * sin
        batch, heads, length, width = k.shape
        return k[:, :, None].expand(batch, heads, 3, length, width).reshape(batch, heads * 3, length, width)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_keys_rotated_and_repeated_for_grouped_query_attention_are_one_kernel(dtype):
    k = torch.randn(2, 5, 3, 7, 10, dtype=dtype)[..., 1, :, :]  # odd sizes, not contiguous
    cos, sin = torch.randn(7, 10, dtype=dtype), torch.randn(7, 10, dtype=dtype)
    program, kernels, _ = _fused_through_moves(RotatedKeysRepeated(), k, cos, sin)
    assert len(kernels) == 1
    assert {"unsqueeze", "expand", "clone", "cat"} <= {node.op for node in program.graph.nodes}


class CombineExperts(nn.Module):
    """Each token's expert outputs, weighted, gathered back in token order and summed (transformers' MoE)."""

    def forward(self, expert_out, weights, order):
        weighted = expert_out * weights.unsqueeze(-1)
        tokens = weighted[order].view(-1, 2, expert_out.shape[-1]).sum(dim=1)
        return tokens.to(expert_out.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_weighted_experts_gathered_back_and_summed_are_one_kernel(dtype):
    expert_out = torch.randn(22, 9, dtype=dtype)
    weights, order = torch.rand(22), torch.randperm(22)
    order[3] -= 22  # a negative index counts from the end, as in torch
    program, kernels, _ = _fused_through_moves(CombineExperts(), expert_out, weights, order)
    steps = [step.node for step in program.executor.steps]
    assert len(kernels) == 1 and steps == ["unsqueeze", *kernels]  # gather, view and sum read through


class EmbeddingsNormed(nn.Module):
    """BERT's input: word, token-type and position embeddings (positions shared by the batch) summed and
    layer-normed; with `returned`, the word embeddings are also returned (a decoder's residual reads them)."""

    def __init__(self, returned: bool = False):
        super().__init__()
        self.returned = returned

    def forward(self, ids, kinds, positions, words, types, places, weight, bias):
        embedded = torch.nn.functional.embedding(ids, words)
        summed = embedded + torch.nn.functional.embedding(kinds, types) + torch.nn.functional.embedding(positions, places)
        normed = torch.nn.functional.layer_norm(summed, (words.shape[1],), weight, bias)
        return (normed, embedded * 2) if self.returned else normed


@pytest.mark.parametrize("index", [torch.int64, torch.int32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("returned", [False, True], ids=["read once", "also returned"])
def test_embeddings_summed_into_a_layer_norm_are_read_from_their_tables_by_its_kernel(dtype, index, returned):
    batch, length, vocabulary, width = 3, 7, 23, 19  # odd sizes; the word table transposed (strided rows)
    ids = torch.randint(0, vocabulary, (batch, length), dtype=index)
    kinds = torch.randint(0, 2, (batch, length), dtype=index)
    positions = torch.arange(length, dtype=index).unsqueeze(0)
    words = torch.randn(width, vocabulary, dtype=dtype).t()
    tables = (words, torch.randn(2, width, dtype=dtype), torch.randn(length, width, dtype=dtype))
    norm = (torch.randn(width, dtype=dtype), torch.randn(width, dtype=dtype))
    model = EmbeddingsNormed(returned)
    with torch.no_grad():
        program = ember.compile(model, (ids, kinds, positions, *tables, *norm), ember.Options(fusion=True))
        got, want = program(ids, kinds, positions, *tables, *norm), model(ids, kinds, positions, *tables, *norm)
    torch.testing.assert_close(got, want, atol=result_tolerance(want), rtol=0)
    steps = [step.node for step in program.executor.steps]
    assert not any(step.startswith("embedding") for step in steps)
    assert steps[0].startswith("fused_") and "embedding" in steps[0]


class IntegerArithmetic(nn.Module):
    """Integer arithmetic a kernel computes in integers: scaled, subtracted, divided by a number, cast, offset."""

    def __init__(self, divisor: int, rounding: str):
        super().__init__()
        self.divisor, self.rounding = divisor, rounding

    def forward(self, a, b):
        return torch.div(a * 3 - b, self.divisor, rounding_mode=self.rounding).to(torch.int32) + 1


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("divisor", [2, -3, 1])
@pytest.mark.parametrize("rounding", ["floor", "trunc"])
def test_integer_arithmetic_is_one_kernel_exact_for_either_sign(dtype, divisor, rounding):
    a = torch.randint(-50, 50, (5, 7), dtype=dtype).t()  # odd sizes, transposed: read at its strides
    b = torch.randint(-9, 9, (5,), dtype=torch.int32)  # broadcast along the rows, promoted
    model = IntegerArithmetic(divisor, rounding)
    with torch.no_grad():
        program = ember.compile(model, (a, b), ember.Options(fusion=True))
        got = program(a, b)
    assert got.dtype == torch.int32 and torch.equal(got, model(a, b))
    assert [step.node.startswith("fused_") for step in program.executor.steps] == [True]


class TokensOfChoices(nn.Module):
    """The token row of each sorted expert choice, as transformers' MoE gathers them: `hidden[order // top_k]`."""

    def forward(self, hidden, order):
        return hidden[order // 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rows_gathered_at_an_index_divided_in_the_kernel_are_one_kernel(dtype):
    hidden = torch.randn(11, 9, dtype=dtype)
    order = torch.randperm(22)
    order[4] = -3  # a negative index counts from the end, as in torch, after rounding down
    with torch.no_grad():
        program = ember.compile(TokensOfChoices(), (hidden, order), ember.Options(fusion=True))
        got = program(hidden, order)
    assert torch.equal(got, TokensOfChoices()(hidden, order))
    assert [step.node.startswith("fused_") for step in program.executor.steps] == [True]


def test_integer_division_by_a_tensor_stays_on_aten():
    """A divisor tensor may hold a zero, which ATen reports and a kernel could not."""
    class ByTensor(nn.Module):
        def forward(self, a, b):
            return torch.div(a * 2, b, rounding_mode="floor") + 1

    a, b = torch.randint(1, 9, (4, 3)), torch.randint(1, 9, (4, 3))
    with torch.no_grad():
        program = ember.compile(ByTensor(), (a, b), ember.Options(fusion=True))
    divide = next(node for node in program.graph.nodes if node.op == "div.Tensor_mode")
    assert divide.name in {step.node for step in program.executor.steps}  # its own step: ATen's kernel
    assert torch.equal(program(a, b), ByTensor()(a, b))


class PaddingMaskMadeAdditive(nn.Module):
    """A padding mask as transformers builds one for attention (an int mask made boolean, read at broadcast
    [batch, key] indices, and-ed with a constant mask) made additive in the model's dtype, as ember's
    attention pass makes it for fused attention."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, attention_mask):
        batch, length = attention_mask.shape
        padding = attention_mask.to(torch.bool)[torch.arange(batch).view(-1, 1, 1, 1), torch.arange(length).view(1, 1, 1, -1)]
        allowed = torch.arange(length).view(1, 1, -1, 1) >= 0
        return torch.where(allowed & padding, 0.0, float("-inf")).to(self.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_padding_mask_is_made_additive_by_one_kernel(dtype):
    attention_mask = torch.ones(3, 7, dtype=torch.int64)
    attention_mask[0, 5:], attention_mask[2, 1:] = 0, 0
    model = PaddingMaskMadeAdditive(dtype)
    with torch.no_grad():
        program = ember.compile(model, (attention_mask,), ember.Options(fusion=True))
        got = program(attention_mask)
    assert torch.equal(got, model(attention_mask))
    assert [step.node for step in program.executor.steps if not step.node.startswith("fused_")] == []


def test_a_sum_over_many_elements_is_not_unrolled():
    class WideSum(nn.Module):
        def forward(self, x):
            return (x.sum(dim=1) * 2.0).to(torch.float16)

    graph, plan = _plan(WideSum(), torch.randn(4, 9, 5))
    assert all("sum.dim_IntList" not in _ops(graph, group) for group in plan.groups)


MOVE_STEPS = {
    "roll": lambda x, order: torch.cat((x[..., 2:], x[..., :2]), dim=-1),
    "rotate half": lambda x, order: torch.cat((-x[..., x.shape[-1] // 2:], x[..., :x.shape[-1] // 2]), dim=-1)
    if x.shape[-1] % 2 == 0 else x.flip(-1).neg(),
    "repeat and sum back": lambda x, order: x[:, None].expand(x.shape[0], 3, *x.shape[1:]).reshape(
        x.shape[0] * 3, *x.shape[1:]).view(x.shape[0], 3, *x.shape[1:]).sum(dim=1) * 0.5,
    "gather rows": lambda x, order: x[order],
    "transpose twice": lambda x, order: (x.transpose(0, 1) * 1.5).transpose(0, 1),
    "split halves": lambda x, order: torch.cat(x.split((1, x.shape[0] - 1), dim=0)[::-1], dim=0),
    "sin": lambda x, order: torch.sin(x),
    "scale and shift": lambda x, order: x * 0.75 + 0.25,
}


class MoveChain(nn.Module):
    def __init__(self, steps):
        super().__init__()
        self.steps = steps

    def forward(self, x, order):
        for step in self.steps:
            x = MOVE_STEPS[step](x, order)
        return torch.tanh(x)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(steps=["gather rows", "split halves"], shape=(2, 1, 3))  # loads at no coordinate
@example(steps=["repeat and sum back", "split halves", "roll"], shape=(2, 1, 3))  # at an address made of numbers
@given(steps=st.lists(st.sampled_from(sorted(MOVE_STEPS)), min_size=1, max_size=5),
       shape=st.tuples(st.integers(2, 7), st.integers(1, 5), st.integers(3, 9)))
def test_random_chains_of_moves_and_pointwise_ops_match_eager(steps, shape):
    """Property: whatever moves a kernel reads through, in whatever order, it computes what eager does. In
    float32, where a wrong coordinate shows far above rounding (half precision is checked per pattern above,
    against float64, and on the GPU by bench/gpu_kernels.py)."""
    generator = torch.Generator().manual_seed(len(steps) * 100 + sum(shape))
    x = torch.randn(*shape, generator=generator)
    order = torch.randperm(shape[0], generator=generator)
    model = MoveChain(steps)
    with torch.no_grad():
        program = ember.compile(model, (x, order), ember.Options(fusion=True))
        got, eager = program(x, order), model(x, order)
    assert models.max_error(eager, got) <= result_tolerance(eager)


def test_a_kernel_reads_a_one_element_input_into_every_lane():
    """A value of one element has an address no coordinate reaches; Triton wants it spread like the mask."""
    class ScaledSoftmax(nn.Module):
        def forward(self, x, s):
            return torch.softmax(x * s, -1) + s, torch.sin(x) * s

    x, s = torch.randn(5, 7), torch.randn(1)
    with torch.no_grad():
        program = ember.compile(ScaledSoftmax(), (x, s), ember.Options(fusion=True))
        for got, want in zip(program(x, s), ScaledSoftmax()(x, s)):
            torch.testing.assert_close(got, want)
    assert program.report.fusion["groups"] == 2


class RowSumOfOneRow(nn.Module):
    """A decode step's row statistic kept as a result (the ffn gate's cosine sums): one row, so no coordinate
    reaches the address its kernel stores it at."""

    def forward(self, x):
        y = x * 2.0
        return y, (y * y).sum(-1)


def test_a_one_element_result_is_stored_through_a_block_of_addresses(tmp_path):
    """Triton on a GPU refuses a masked store of a block through one pointer (the interpreter does not): the address
    is spread to the mask's shape, as a one-element load's is."""
    x = torch.randn(1, 1, 37)
    program = ember.compile(RowSumOfOneRow(), (x,), ember.Options(fusion=True, debug_dir=str(tmp_path)))
    stores = [line for path in tmp_path.glob("fused_*.py") for line in path.read_text().splitlines()
              if "tl.store" in line]
    assert stores and all("_ptr + 0," not in line for line in stores), stores
    assert any("mask.to(tl.int64) * 0 + 0" in line for line in stores), stores
    y, sums = program(x)
    torch.testing.assert_close(sums, (4 * x * x).sum(-1))
    torch.testing.assert_close(y, 2 * x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_constant_pad_is_read_through_by_the_kernel_around_it(dtype):
    """TF "same" padding (MobileNet) between an activation and a convolution: no kernel of its own. Pads on either
    side, a negative one (a crop), a fill value, a transposed input of odd sizes; relu, doubling and negation round
    nothing, so any difference from eager is a wrong read."""

    class Padded(nn.Module):
        def forward(self, x):
            same = nn.functional.pad(torch.relu(x) * 2.0, (1, 2, 0, 3), value=-0.5)
            return -same, nn.functional.pad(x, (-1, 1))

    x = torch.randn(2, 3, 5, 7, dtype=dtype).transpose(2, 3)
    program = ember.compile(Padded(), (x,), ember.Options(fusion=True))
    assert [step.node for step in program.executor.steps] == ["fused_constant_pad_nd_mul_neg_relu_0",
                                                              "fused_constant_pad_nd_1"]
    for expected, actual in zip(Padded()(x), program(x)):
        assert actual.dtype == dtype and models.max_error(expected, actual) == 0
