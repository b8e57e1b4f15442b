"""The device path of grouped_mm zeroes the rows past the last offset with a small Triton kernel (run here in
Triton's interpreter): only those rows change, whatever the offsets' dtype and the result's dtype and width."""
from __future__ import annotations

import pytest
import torch

from ember.codegen.grouped_mm import zero_rows_from_last_offset


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("last", [0, 7, 37, 40])
def test_rows_past_the_last_offset_become_zero_and_no_others_change(dtype, last):
    out = torch.randn(40, 300, dtype=dtype)
    expected = out.clone()
    expected[last:] = 0
    offsets = torch.tensor([3, 3, last], dtype=torch.int32 if last % 2 else torch.int64)
    assert zero_rows_from_last_offset(out, offsets) is out
    assert torch.equal(out, expected)


def test_a_padded_row_stride_is_kept():
    storage = torch.randn(21, 48)
    out = storage[:, :45]
    untouched = storage[:, 45:].clone()
    zero_rows_from_last_offset(out, torch.tensor([10]))
    assert torch.equal(out[10:], torch.zeros(11, 45)) and torch.equal(storage[:, 45:], untouched)


def test_a_result_it_cannot_address_is_refused():
    with pytest.raises(ValueError, match="row-contiguous"):
        zero_rows_from_last_offset(torch.zeros(8, 4).t(), torch.tensor([2]))
