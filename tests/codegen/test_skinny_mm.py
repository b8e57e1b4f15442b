"""ember.linears' kernel (run here in Triton's interpreter) against the op table's reference: fresh random data,
odd sizes, strided inputs and weights, biases on some weights, more weights than one launch takes, each dtype;
and calls it cannot take go to the reference. ember.gated_linears' run of it likewise, its skip flag set and not."""
from __future__ import annotations

import pytest
import torch

import ember.codegen.skinny_mm as skinny_mm
from ember.codegen.skinny_mm import MAX_WEIGHTS, Tiling, gated_linears, linears, takes
from ember.ir.ops import gated_linears_reference, linears_reference
from ember.tolerance import tolerance_for

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CASES = {  # rows per weight, depth, which weights have a bias, tiling (None: the default)
    "query key value": ((37, 5, 64), 70, (True, False, True), None),
    "depth past one step": ((20,), 300, (False,), Tiling(4, 64)),
    "two launches": ((8, 9, 10, 11, 12), 33, (False, True, False, False, True), Tiling(8, 16)),
    "fewer rows than a block": ((3, 2), 16, (True, True), None),
}


def _operands(rows: tuple[int, ...], depth: int, biased: tuple[bool, ...], dtype: torch.dtype):
    """A strided single row (every other element of a wider one), weights whose rows are slices of wider rows."""
    x = torch.randn(1, 1, 2 * depth, dtype=dtype)[..., ::2]
    weights = [torch.randn(count, depth + 3, dtype=dtype)[:, 1:depth + 1] for count in rows]
    biases = [torch.randn(count, dtype=dtype) if bias else None for count, bias in zip(rows, biased)]
    return x, weights, biases


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_matches_the_reference(case, dtype):
    rows, depth, biased, tiling = CASES[case]
    torch.manual_seed(len(case) + depth)
    x, weights, biases = _operands(rows, depth, biased, dtype)
    assert takes(x, weights, biases) and not x.is_contiguous() and not weights[0].is_contiguous()
    got = linears(x, weights, biases, tiling)
    want = linears_reference(x, weights, biases)
    assert len(got) == len(want) == len(rows)
    for result, expected in zip(got, want):
        assert result.shape == expected.shape == (1, 1, expected.shape[-1]) and result.dtype == dtype
        error = (result.double() - expected.double()).abs().max().item()
        assert error <= tolerance_for(dtype, scale=expected.abs().max().item()), (case, error)


def test_more_weights_than_one_launch_takes_go_in_further_launches(monkeypatch):
    launched = []
    launch = skinny_mm._launch
    monkeypatch.setattr(skinny_mm, "_launch", lambda x, weights, *rest: launched.append(len(weights)) or launch(x, weights, *rest))
    torch.manual_seed(0)
    x, weights, biases = _operands(tuple(range(3, 4 + MAX_WEIGHTS)), 20, (False,) * (MAX_WEIGHTS + 1), torch.float32)
    for result, expected in zip(linears(x, weights, biases), linears_reference(x, weights, biases)):
        torch.testing.assert_close(result, expected)
    assert launched == [MAX_WEIGHTS, 1]


@pytest.mark.parametrize("change", ["two rows", "column-major weight", "float64", "broadcast bias"])
def test_calls_the_kernel_cannot_take_run_the_reference(change):
    x, weights, biases = _operands((7, 5), 12, (True, False), torch.float32)
    if change == "two rows":
        x = torch.randn(2, 12)
    elif change == "column-major weight":
        weights[1] = torch.randn(12, 5).t()
    elif change == "float64":
        x, weights = x.double(), [weight.double() for weight in weights]
        biases = [None if bias is None else bias.double() for bias in biases]
    else:
        biases[0] = torch.randn(1)[0].expand(7)
    assert not takes(x, weights, biases)
    for result, expected in zip(linears(x, weights, biases), linears_reference(x, weights, biases)):
        assert torch.equal(result, expected)


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_gated_kernel_matches_the_reference(case, dtype, skip):
    rows, depth, biased, tiling = CASES[case]
    torch.manual_seed(len(case) + depth + skip)
    x, weights, biases = _operands(rows, depth, biased, dtype)
    flag = torch.tensor([[skip]])
    got = gated_linears(x, weights, biases, flag, tiling)
    want = gated_linears_reference(x, weights, biases, flag)
    assert len(got) == len(want) == len(rows)
    for result, expected in zip(got, want):
        assert result.shape == expected.shape == (1, 1, expected.shape[-1]) and result.dtype == dtype
        if skip:
            assert not result.any()
        error = (result.double() - expected.double()).abs().max().item()
        assert error <= tolerance_for(dtype, scale=expected.abs().max().item()), (case, error)


def test_a_skipped_gated_call_reads_no_weight():
    """NaN weights would poison any sum they entered: a skipped call's zeros show none was read."""
    x, weights, biases = _operands((9, 6), 21, (True, False), torch.float32)
    poisoned = [torch.full_like(weight, float("nan")) for weight in weights]
    for result in gated_linears(x, poisoned, biases, torch.tensor([[True]])):
        assert torch.equal(result, torch.zeros_like(result))
    assert all(result.isnan().all() for result in gated_linears(x, poisoned, biases, torch.tensor([[False]])))


def test_gated_calls_the_kernel_cannot_take_run_the_reference():
    x, weights, biases = torch.randn(2, 12), [torch.randn(5, 12)], [None]
    for skip in (torch.tensor([True, False]), torch.tensor([False, True])):
        assert not takes(x, weights, biases)
        for result, expected in zip(gated_linears(x, weights, biases, skip),
                                    gated_linears_reference(x, weights, biases, skip)):
            assert torch.equal(result, expected)
