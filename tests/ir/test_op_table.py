"""Every op in OP_TABLE, run on sample calls: its bound reference, shape rule and costs must agree with torch.

The op table is what the verifier, executor and cost model trust, so each entry is checked against eager torch.
"""
from __future__ import annotations

import builtins
import itertools
import math
import zlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from ember.codegen import Kernel, generate, generate_rows
from ember.ir import OP_TABLE, Graph, Node, Value
from ember.codegen.expressions import EXPRESSIONS, fusible
from ember.codegen.reductions import REDUCTIONS, reduced_dims
from ember.ir.ops import as_tuple, op_name
from ember.ir.schema import split_arguments
from ember.ir.types import TensorType, type_of
from ember.ir.schema import COPYING_OUT, inplace_overload, out_overload
from ember.runtime.arena import bind_into, slot_view
from ember.tolerance import assert_close


Call = tuple[tuple[Any, ...], dict[str, Any]]
Samples = Callable[[torch.dtype], list[Call]]

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
INTEGER_OPS = {"bitwise_not", "bitwise_and.Tensor", "bitwise_or.Tensor", "bitwise_xor.Tensor"}
UNINITIALISED = {"empty.memory_format", "empty_permuted"}  # only the type of the result is defined


def is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


# ---------------------------------------------------------------------------------------------
# Inputs

class Make:
    """Input makers for one dtype. Values are drawn in float32 and then cast, so every dtype sees the same numbers."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def _cast(self, values: torch.Tensor) -> torch.Tensor:
        return values.to(self.dtype)

    def normal(self, *shape: int) -> torch.Tensor:
        return self._cast(torch.randn(shape))

    def strided(self, *shape: int) -> torch.Tensor:
        """Normal values in a non-contiguous layout."""
        return non_contiguous(self.normal(*shape))

    def positive(self, *shape: int) -> torch.Tensor:
        return self._cast(torch.rand(shape) * 2 + 0.25)

    def away_from_zero(self, *shape: int) -> torch.Tensor:
        return self._cast(torch.where(torch.rand(shape) < 0.5, -1.0, 1.0) * (torch.rand(shape) + 0.5))

    def small_ints(self, *shape: int) -> torch.Tensor:
        """Values in -2..2, so comparisons see ties."""
        return self._cast(torch.randint(-2, 3, shape))

    def with_zeros(self, *shape: int) -> torch.Tensor:
        return self._cast(torch.where(torch.rand(shape) < 0.5, 0.0, torch.randn(shape)))

    def with_specials(self, *shape: int) -> torch.Tensor:
        values = torch.randn(shape)
        flat = values.view(-1)
        flat[0::5], flat[1::7], flat[2::11] = math.nan, math.inf, -math.inf
        return self._cast(values)

    def distinct(self, *shape: int) -> torch.Tensor:
        """No ties, even in bfloat16 (small integers are exact)."""
        count = math.prod(shape)
        return self._cast((torch.randperm(count) - count // 2).reshape(shape))

    def ints(self, *shape: int) -> torch.Tensor:
        return self._cast(torch.randint(-50, 50, shape))

    def channels_last(self, n: int, c: int, h: int, w: int) -> torch.Tensor:
        return self.normal(n, h, w, c).permute(0, 3, 1, 2)

    def heads(self, b: int, h: int, length: int, e: int) -> torch.Tensor:
        """(B, H, L, E) as it comes out of a head split: a transposed (B, L, H, E)."""
        return self.normal(b, length, h, e).transpose(1, 2)


def non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values with the first and last dims' memory order swapped."""
    return t.transpose(0, -1).contiguous().transpose(0, -1)


def mask(*shape: int) -> torch.Tensor:
    return torch.rand(shape) < 0.5


def index(high: int, *shape: int) -> torch.Tensor:
    return torch.randint(0, high, shape)


def unique_columns(rows: int, cols: int, count: int) -> torch.Tensor:
    """(rows, count) column indices, distinct within each row, so scatter results do not depend on order."""
    return torch.rand(rows, cols).argsort(dim=1)[:, :count]


def unique_cells(rows: int, cols: int, count: int) -> list[torch.Tensor]:
    flat = torch.randperm(rows * cols)[:count]
    return [flat // cols, flat % cols]


def attention_mask() -> torch.Tensor:
    keep = mask(2, 1, 5, 11)
    keep[..., 0] = True  # every query sees at least one key
    return keep


# ---------------------------------------------------------------------------------------------
# Sample builders per family: each turns a dtype into a list of (args, kwargs)

def calls(*builders: Callable[[Make], Call]) -> Samples:
    """Hand-written samples, one builder per call."""
    return lambda dtype: [build(Make(dtype)) for build in builders]


def unary(values: str = "normal", *variants: Call) -> Samples:
    """A non-contiguous (5, 13) input, then each variant's extra args and kwargs."""
    variants = variants or (((), {}),)
    return lambda dtype: [
        ((non_contiguous(getattr(Make(dtype), values)(5, 13)), *extra), dict(kwargs)) for extra, kwargs in variants
    ]


def reduction(values: str = "normal", *variants: Call) -> Samples:
    """A non-contiguous (3, 5, 7) input, then each variant's extra args and kwargs."""
    variants = variants or (((), {}),)
    return lambda dtype: [
        ((non_contiguous(getattr(Make(dtype), values)(3, 5, 7)), *extra), dict(kwargs)) for extra, kwargs in variants
    ]


def binary(left: str = "normal", right: str | None = None, number: float | None = None, **kwargs: Any) -> Samples:
    """Broadcasting against a row, two-sided broadcasting, then optionally kwargs or a Python number for `other`."""

    def samples(dtype: torch.dtype) -> list[Call]:
        make = Make(dtype)
        a, b = getattr(make, left), getattr(make, right or left)
        result = [((non_contiguous(a(5, 13)), b(13)), {}), ((a(3, 1, 7), b(5, 1)), {})]
        if kwargs:
            result.append(((a(5, 13), b(5, 13)), kwargs))
        if number is not None:
            result.append(((non_contiguous(a(5, 13)), number), {}))
        return result

    return samples


SAMPLES: dict[str, Samples] = {}
_CPU = torch.device("cpu")

for _values, _names in {
    "normal": "abs neg relu sign floor ceil round trunc logical_not exp exp2 expm1 sin cos tan tanh sigmoid erf "
    "silu mish hardsigmoid hardswish lift_fresh_copy",
    "positive": "log log2 log1p sqrt rsqrt",
    "away_from_zero": "reciprocal",
    "with_specials": "isnan isinf",
    "ints": "bitwise_not",
}.items():
    SAMPLES.update({name: unary(_values) for name in _names.split()})

SAMPLES.update({
    "clamp": unary("normal", ((-0.5, 0.5), {}), ((None, 0.25), {}), ((), {"min": -0.25})),
    "clamp_min": unary("normal", ((0.1,), {})),
    "clamp_max": unary("normal", ((-0.1,), {})),
    "hardtanh": unary("normal", ((), {}), ((-0.5, 0.75), {})),
    "leaky_relu": unary("normal", ((), {}), ((0.2,), {})),
    "elu": unary("normal", ((), {}), ((0.5, 1.25, 0.75), {})),
    "softplus": unary("normal", ((), {}), ((2.0, 1.5), {})),
    "gelu": unary("normal", ((), {}), ((), {"approximate": "tanh"})),
    "clone": unary("normal", ((), {}), ((), {"memory_format": torch.contiguous_format})),
    "_to_copy": lambda dtype: unary("normal", ((), {"dtype": torch.float64}), ((), {"dtype": torch.int32, "device": _CPU}),
                                    ((), {"dtype": torch.bfloat16}), ((), {"dtype": torch.float32}))(dtype) + calls(
        lambda m: ((non_contiguous(index(3, 5, 13)),), {"dtype": torch.bool, "device": _CPU}),  # an int mask made boolean
        lambda m: ((non_contiguous(index(3, 5, 13)).int(),), {"dtype": m.dtype}),
        lambda m: ((m.with_zeros(5, 13),), {"dtype": torch.bool}),
        lambda m: ((m.with_specials(5, 13),), {"dtype": torch.bool}),  # NaN is true, as torch casts it
    )(dtype),
    "pow.Tensor_Scalar": unary("positive", ((2.5,), {}), ((3,), {})),
    "pow.Scalar": calls(lambda m: ((2.0, m.strided(5, 13)), {})),
    "add.Scalar": unary("normal", ((2.5,), {}), ((2.5, 0.5), {})),
    "sub.Scalar": unary("normal", ((2.5,), {}), ((2.5, 0.5), {})),
    "rsub.Scalar": unary("normal", ((2.5,), {}), ((2.5, 0.5), {})),
    "mul.Scalar": unary("normal", ((2.5,), {})),
    "div.Scalar": unary("normal", ((-3.0,), {})),
    "remainder.Scalar": unary("normal", ((1.5,), {})),
    "fmod.Scalar": unary("normal", ((1.5,), {})),
    "fill.Scalar": unary("normal", ((3.0,), {})),
    "full_like": unary("normal", ((2.0,), {}), ((7,), {"dtype": torch.int64})),
    "zeros_like": unary("normal", ((), {}), ((), {"dtype": torch.int64})),
    "ones_like": unary("normal", ((), {}), ((), {"memory_format": torch.preserve_format})),
    **{f"{name}.Scalar": unary("small_ints", ((1,), {})) for name in "eq ne lt le gt ge".split()},
})

SAMPLES.update({
    "add.Tensor": binary(number=2.5, alpha=0.5),
    "sub.Tensor": binary(number=2.5, alpha=0.5),
    "mul.Tensor": binary(number=2.5),
    "div.Tensor": binary("normal", "away_from_zero", number=3),
    "maximum": binary(),
    "minimum": binary(),
    "atan2": binary(),
    "logical_and": binary("with_zeros"),
    "logical_or": binary("with_zeros"),
    "remainder.Tensor": binary("normal", "away_from_zero"),
    "fmod.Tensor": binary("normal", "away_from_zero"),
    "pow.Tensor_Tensor": binary("positive", "normal"),
    **{f"{name}.Tensor": binary("small_ints") for name in "eq ne lt le gt ge".split()},
    **{f"bitwise_{name}.Tensor": binary("ints") for name in "and or xor".split()},
    "div.Tensor_mode": calls(*(
        lambda m, mode=mode: ((m.strided(5, 13) * 4, m.away_from_zero(13)), {"rounding_mode": mode})
        for mode in ("floor", "trunc", None)
    )),
    "where.self": calls(
        lambda m: ((non_contiguous(mask(5, 13)), m.strided(5, 13), m.normal(13)), {}),
        lambda m: ((mask(5, 1), m.normal(3, 1, 13), m.normal(13)), {}),
    ),
    "where.Scalar": calls(
        lambda m: ((mask(5, 13), 0.0, float("-inf")), {}),
        lambda m: ((non_contiguous(mask(5, 13)), 2, -1.5), {}),
    ),
    "where.ScalarOther": calls(
        lambda m: ((mask(5, 13), m.strided(5, 13), float("-inf")), {}),
        lambda m: ((mask(5, 1), m.normal(3, 1, 13), 2.5), {}),
    ),
    "masked_fill.Scalar": calls(lambda m: ((m.strided(5, 13), mask(13), -1.5), {})),
    "masked_fill.Tensor": calls(lambda m: ((m.strided(5, 13), mask(5, 1), m.normal()), {})),
})

_DIMS = (([0, 2], True), {}), (([1],), {})
_TRAILING_DIMS = (([-1],), {}), (([1, 2], True), {})
_ONE_DIM = ((1,), {}), ((-1, True), {})
_CORRECTION = (([1],), {"correction": 0, "keepdim": True}), ((), {}), ((None,), {"correction": 2})
SAMPLES.update({
    **{name: reduction() for name in "mean max min prod".split()},
    **{name: reduction("with_zeros") for name in "any all".split()},
    **{name: reduction("normal", *_DIMS) for name in "amax amin logsumexp".split()},
    "sum.dim_IntList": reduction("normal", *_DIMS, *_TRAILING_DIMS, (([2],), {"dtype": torch.float32})),
    "mean.dim": reduction("normal", *_DIMS, *_TRAILING_DIMS),
    **{name: reduction("normal", *_ONE_DIM) for name in "max.dim min.dim prod.dim_int".split()},
    **{name: reduction("normal", ((), {}), *_ONE_DIM) for name in "argmax argmin".split()},
    **{name: reduction("with_zeros", *_ONE_DIM) for name in "any.dim all.dim".split()},
    **{name: reduction("normal", *_CORRECTION) for name in "var.correction var_mean.correction std.correction".split()},
    "sum": reduction("normal", ((), {}), ((), {"dtype": torch.float64})),
    "cumsum": reduction("normal", ((1,), {}), ((-1,), {"dtype": torch.float64})),
    "linalg_vector_norm": reduction("normal", ((), {}), ((3, [0, 2], True), {}), ((1, 1), {})),
    "_softmax": reduction("normal", ((1, False), {}), ((-1, False), {})),
    "_log_softmax": reduction("normal", ((1, False), {}), ((-1, False), {})),
    "_safe_softmax": calls(  # rows masked out entirely give 0, not NaN
        lambda m: ((non_contiguous(m.normal(3, 5, 7)).masked_fill(mask(3, 5, 1), float("-inf")), -1), {}),
        lambda m: ((m.normal(3, 5, 7).masked_fill(mask(3, 5, 7), float("-inf")), 1), {}),
    ),
})

SAMPLES.update({
    "native_layer_norm": calls(
        lambda m: ((m.strided(3, 5, 7), [7], m.normal(7), m.normal(7), 1e-5), {}),
        lambda m: ((m.normal(3, 5, 7), [5, 7], None, None, 1e-3), {}),
    ),
    "native_group_norm": calls(  # torch requires a contiguous or channels-last input
        lambda m: ((m.normal(3, 9, 7), m.normal(9), m.normal(9), 3, 9, 7, 3, 1e-5), {}),
        lambda m: ((m.channels_last(3, 9, 5, 7), None, None, 3, 9, 35, 9, 1e-3), {}),
    ),
    "_native_batch_norm_legit_no_training": calls(
        lambda m: ((m.strided(3, 5, 7), m.normal(5), m.normal(5), m.normal(5), m.positive(5), 0.1, 1e-5), {}),
        lambda m: ((m.channels_last(3, 5, 7, 11), None, None, m.normal(5), m.positive(5), 0.1, 1e-3), {}),
    ),
    "mm": calls(lambda m: ((m.strided(5, 7), m.normal(7, 11)), {})),
    "bmm": calls(lambda m: ((m.normal(3, 5, 7), m.normal(3, 11, 7).transpose(1, 2)), {})),
    "addmm": calls(
        lambda m: ((m.normal(11), m.strided(5, 7), m.normal(7, 11)), {}),
        lambda m: ((m.normal(5, 11), m.normal(5, 7), m.normal(7, 11)), {"beta": 0.5, "alpha": 2.0}),
    ),
    "baddbmm": calls(
        lambda m: (
            (m.normal(3, 5, 11), m.normal(3, 5, 7), m.normal(3, 11, 7).transpose(1, 2)), {"beta": 0.5, "alpha": 2.0}
        ),
    ),
    "linear": calls(
        lambda m: ((m.strided(3, 5, 7), m.normal(11, 7), m.normal(11)), {}),
        lambda m: ((m.normal(5, 7), m.strided(11, 7)), {}),
    ),
    "linears": calls(  # one row: a strided one, biases on some weights; one row kept in three dims
        lambda m: ((m.strided(1, 7), [m.normal(11, 7), m.normal(3, 7), m.strided(5, 7)], [m.normal(11), None, m.normal(5)]),
                   {}),
        lambda m: ((m.normal(1, 1, 7), [m.normal(2, 7), m.normal(9, 7)], [None, None]), {}),
    ),
    "gated_linears": calls(  # linears' rows, skipped and not
        lambda m: ((m.strided(1, 7), [m.normal(11, 7), m.strided(5, 7)], [m.normal(11), None], torch.tensor([True])),
                   {}),
        lambda m: ((m.normal(1, 1, 7), [m.normal(2, 7), m.normal(9, 7)], [None, m.normal(9)],
                    torch.tensor([[False]])), {}),
    ),
    "grouped_mm": calls(  # an empty group, and rows past the last offset
        lambda m: ((m.strided(13, 5), m.normal(3, 5, 7), torch.tensor([4, 4, 11])), {}),
        lambda m: ((m.normal(13, 5), m.normal(3, 5, 7), torch.tensor([5, 9, 13], dtype=torch.int32)), {}),
    ),
    "convolution": calls(
        # (input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
        lambda m: (
            (m.channels_last(2, 3, 13, 11), m.normal(5, 3, 3, 3), m.normal(5), [1, 1], [1, 1], [1, 1], False, [0, 0], 1), {}
        ),
        lambda m: ((m.normal(2, 6, 13, 11), m.normal(9, 2, 3, 3), None, [2, 2], [0, 0], [1, 1], False, [0, 0], 3), {}),
        lambda m: ((m.normal(2, 3, 13), m.normal(5, 3, 3), m.normal(5), [1], [2], [2], False, [0], 1), {}),
        lambda m: (
            (m.normal(2, 6, 5, 7), m.normal(6, 3, 3, 3), m.normal(3), [2, 2], [1, 1], [1, 1], True, [1, 1], 1), {}
        ),
    ),
    "scaled_dot_product_attention": calls(
        lambda m: ((m.heads(2, 3, 5, 7), m.heads(2, 3, 11, 7), m.heads(2, 3, 11, 9)), {}),
        lambda m: ((m.heads(2, 3, 5, 7), m.heads(2, 3, 11, 7), m.heads(2, 3, 11, 9)), {"is_causal": True}),
        lambda m: ((m.heads(2, 3, 5, 7), m.heads(2, 3, 11, 7), m.heads(2, 3, 11, 9), m.normal(5, 11)), {"scale": 0.3}),
        lambda m: ((m.heads(2, 3, 5, 7), m.heads(2, 3, 11, 7), m.heads(2, 3, 11, 9), attention_mask()), {}),
        lambda m: ((m.heads(2, 6, 5, 7), m.heads(2, 3, 11, 7), m.heads(2, 3, 11, 9)), {"enable_gqa": True}),
        lambda m: ((m.heads(1, 3, 5, 7), m.heads(2, 3, 11, 7), m.heads(2, 3, 11, 9)), {}),  # batch broadcasts
    ),
})

SAMPLES.update({
    "view": calls(lambda m: ((m.normal(3, 5, 7), [15, 7]), {}), lambda m: ((m.normal(3, 5, 7), [-1]), {})),
    "_unsafe_view": calls(lambda m: ((m.normal(3, 5, 7), [5, 21]), {})),
    "reshape": calls(lambda m: ((m.strided(3, 5, 7), [15, 7]), {}), lambda m: ((m.strided(3, 5, 7), [3, -1]), {})),
    "permute": calls(lambda m: ((m.strided(3, 5, 7), [2, 0, 1]), {})),
    "transpose.int": calls(lambda m: ((m.strided(3, 5, 7), 0, 2), {})),
    "t": calls(lambda m: ((m.strided(5, 7),), {})),
    "expand": calls(
        lambda m: ((m.strided(3, 1, 7), [3, 5, 7]), {}), lambda m: ((m.normal(3, 1, 7), [13, -1, 5, -1]), {})
    ),
    "slice.Tensor": calls(
        lambda m: ((m.strided(3, 5, 7), 1, 1, 6, 2), {}),
        lambda m: ((m.strided(3, 5, 7), 2, None, -2), {}),
        lambda m: ((m.strided(3, 5, 7),), {"end": 2}),
    ),
    "select.int": calls(lambda m: ((m.strided(3, 5, 7), 1, -2), {})),
    "unsqueeze": calls(lambda m: ((m.strided(3, 5, 7), 2), {}), lambda m: ((m.strided(3, 5, 7), -1), {})),
    "squeeze": calls(lambda m: ((m.strided(3, 1, 7, 1),), {})),
    "squeeze.dim": calls(lambda m: ((m.strided(3, 1, 7), 1), {})),
    "squeeze.dims": calls(lambda m: ((m.strided(3, 1, 7, 1), [1, 3]), {})),
    "alias": calls(lambda m: ((m.strided(3, 5, 7),), {})),
    "detach": calls(lambda m: ((m.strided(3, 5, 7),), {})),
    "split_with_sizes": calls(lambda m: ((m.strided(3, 5, 7), [2, 3], 1), {})),
    "split.Tensor": calls(lambda m: ((m.strided(3, 5, 7), 2, 1), {}), lambda m: ((m.strided(3, 5, 7), 3), {})),
    "unbind.int": calls(lambda m: ((m.strided(3, 5, 7), 1), {}), lambda m: ((m.strided(3, 5, 7),), {})),
})

SAMPLES.update({
    "cat": calls(
        lambda m: (([m.strided(3, 5, 7), m.normal(3, 2, 7), m.normal(3, 1, 7)], 1), {}),
        lambda m: (([m.strided(3, 5, 7), m.normal(1, 5, 7)],), {}),
    ),
    "stack": calls(
        lambda m: (([m.strided(3, 5, 7), m.normal(3, 5, 7)], 1), {}), lambda m: (([m.strided(3, 5, 7)],), {})
    ),
    "embedding": calls(
        lambda m: ((m.strided(13, 5), index(13, 3, 7)), {}),
        lambda m: ((m.normal(13, 5), index(13, 7), 2), {}),
    ),
    "index.Tensor": calls(
        lambda m: ((m.strided(3, 5, 7), [None, index(5, 4)]), {}),
        lambda m: ((m.strided(3, 5, 7), [index(3, 3, 1), index(5, 1, 4)]), {}),
    ),
    "index_select": calls(lambda m: ((m.strided(3, 5, 7), 1, index(5, 9)), {})),
    "constant_pad_nd": calls(
        lambda m: ((m.strided(3, 5, 7), [1, 2, 0, 3], 0.5), {}), lambda m: ((m.strided(3, 5, 7), [2, 1]), {})
    ),
    "arange": calls(lambda m: ((13,), {"dtype": m.dtype}), lambda m: ((7,), {})),
    "arange.start": calls(lambda m: ((2, 13), {"dtype": m.dtype, "device": _CPU, "pin_memory": False})),
    "arange.start_step": calls(lambda m: ((1, 13, 3), {"dtype": m.dtype}), lambda m: ((0.5, 3.0, 0.25), {})),
    "full": calls(lambda m: (([3, 5], 1.5), {"dtype": m.dtype, "device": _CPU}), lambda m: (([7], 3), {})),
    "zeros": calls(lambda m: (([3, 5],), {"dtype": m.dtype, "layout": torch.strided, "device": _CPU})),
    "ones": calls(lambda m: (([3, 5, 7],), {"dtype": m.dtype})),
    "empty.memory_format": calls(
        lambda m: (([3, 5, 7],), {"dtype": m.dtype}),
        lambda m: (([3, 5, 7, 11],), {"dtype": m.dtype, "memory_format": torch.channels_last}),
    ),
    "empty_permuted": calls(lambda m: (([3, 5, 7], [2, 0, 1]), {"dtype": m.dtype})),
    "scalar_tensor": calls(lambda m: ((2.5,), {"dtype": m.dtype}), lambda m: ((3,), {})),
    "repeat": calls(
        lambda m: ((m.strided(3, 1, 5), [2, 3, 1]), {}), lambda m: ((m.strided(3, 5, 7), [2, 1, 1, 3]), {})
    ),
    "flip": calls(lambda m: ((m.strided(3, 5, 7), [0, 2]), {})),
    "roll": calls(
        lambda m: ((m.strided(3, 5, 7), [2], [1]), {}),
        lambda m: ((m.strided(3, 5, 7), [3]), {}),
        lambda m: ((m.strided(3, 5, 7), [1, -2], [0, 2]), {}),
    ),
    "tril": calls(lambda m: ((m.strided(5, 7), 1), {}), lambda m: ((m.strided(3, 5, 7),), {})),
    "triu": calls(lambda m: ((m.strided(5, 7), -1), {}), lambda m: ((m.strided(3, 5, 7),), {})),
    "max_pool2d_with_indices": calls(
        lambda m: ((m.channels_last(2, 3, 13, 11), [3, 3], [2, 2], [1, 1]), {}),
        lambda m: ((m.normal(2, 3, 13, 11), [3, 2]), {}),
        lambda m: ((m.normal(2, 3, 13, 11), [3, 3], [2, 2], [0, 0], [1, 1], True), {}),
    ),
    "avg_pool2d": calls(
        lambda m: ((m.channels_last(2, 3, 13, 11), [3, 3], [2, 2], [1, 1], False, False), {}),
        lambda m: ((m.normal(2, 3, 13, 11), [3, 3], [], 0, True), {}),
        lambda m: ((m.normal(2, 3, 13, 11), [3, 3], [2, 2]), {"divisor_override": 5}),
    ),
    "_adaptive_avg_pool2d": calls(lambda m: ((m.channels_last(2, 3, 13, 11), [3, 5]), {})),
    "upsample_nearest2d.vec": calls(
        lambda m: ((m.channels_last(2, 3, 5, 7), [7, 13], None), {}),
        lambda m: ((m.normal(2, 3, 5, 7), None, [2.0, 1.5]), {}),
    ),
})

SAMPLES.update({
    "topk": calls(
        lambda m: ((non_contiguous(m.distinct(5, 13)), 3), {}), lambda m: ((m.distinct(5, 13), 3, 0, False), {})
    ),
    "sort": calls(lambda m: ((non_contiguous(m.distinct(5, 13)), 1, True), {}), lambda m: ((m.distinct(5, 13),), {})),
    "argsort": calls(
        lambda m: ((non_contiguous(m.distinct(5, 13)), 0), {}), lambda m: ((m.distinct(5, 13), -1, True), {})
    ),
    "histc": calls(lambda m: ((m.strided(5, 13), 7, -2, 2), {}), lambda m: ((m.normal(5, 13),), {})),
    "searchsorted.Tensor": calls(
        lambda m: ((m.normal(13).sort().values, m.strided(5, 7)), {"right": True, "out_int32": True}),
        lambda m: ((m.normal(5, 13).sort(-1).values, m.normal(5, 7)), {}),
    ),
    "gather": calls(
        lambda m: ((m.strided(5, 7), 1, index(7, 5, 4)), {}), lambda m: ((m.normal(5, 7), 0, index(5, 3, 7)), {})
    ),
    "scatter.src": calls(lambda m: ((m.strided(5, 7), 1, unique_columns(5, 7, 4), m.normal(5, 4)), {})),
    "scatter.value": calls(lambda m: ((m.strided(5, 7), 1, unique_columns(5, 7, 4), 2.5), {})),
    "scatter_add": calls(
        lambda m: ((m.strided(5, 7), 1, index(7, 5, 9), m.normal(5, 9)), {}),
        lambda m: ((m.normal(5, 7), 0, index(5, 3, 7), m.strided(3, 7)), {}),
    ),
    "scatter_reduce.two": calls(
        lambda m: ((m.strided(5, 7), 1, index(7, 5, 9), m.normal(5, 9), "sum"), {}),
        lambda m: ((m.normal(5, 7), 1, index(7, 5, 9), m.normal(5, 9), "amax"), {"include_self": False}),
        lambda m: ((m.normal(5, 7), 1, index(7, 5, 9), m.normal(5, 9), "mean"), {}),
    ),
    "index_add": calls(
        lambda m: ((m.strided(5, 7), 0, index(5, 9), m.normal(9, 7)), {"alpha": 2.0}),
        lambda m: ((m.normal(5, 7), 1, index(7, 3), m.strided(5, 3)), {}),
    ),
    "index_put": calls(
        lambda m: ((m.strided(5, 7), unique_cells(5, 7, 4), m.normal(4)), {}),
        lambda m: ((m.normal(5, 7), [index(5, 9), index(7, 9)], m.normal(9), True), {}),
        lambda m: ((m.strided(3, 5, 7), [index(3, 4)], m.normal(4, 5, 7), True), {}),
    ),
})


def dtypes_of(name: str) -> tuple[torch.dtype, ...]:
    """The dtypes an op is tested in; the first is never skipped."""
    return (torch.int64, torch.bool) if name in INTEGER_OPS else FLOATS


def sample_count(name: str) -> int:
    torch.manual_seed(0)
    return len(SAMPLES[name](torch.float32)) if name in SAMPLES else 1


def seed(name: str, index: int) -> None:
    torch.manual_seed(zlib.crc32(f"{name}/{index}".encode()))


CASES = [
    pytest.param(name, i, dtype, id=f"{name}-{i}-{str(dtype).removeprefix('torch.')}")
    for name in sorted(OP_TABLE)
    for i in range(sample_count(name))
    for dtype in dtypes_of(name)
]


def run_sample(name: str, index: int, dtype: torch.dtype):
    """(op, inputs, attrs, outputs of calling the ATen target directly) for one sample call."""
    op = OP_TABLE[name]
    seed(name, index)
    args, kwargs = SAMPLES[name](dtype)[index]
    try:
        direct = as_tuple(op.target(*args, **kwargs))
    except (RuntimeError, NotImplementedError) as error:
        if dtype == dtypes_of(name)[0]:
            raise
        pytest.skip(f"eager torch on CPU has no {dtype} kernel for {name}: {str(error).splitlines()[0]}")
    inputs, attrs = split_arguments(op.schema, args, kwargs, is_tensor)
    return op, inputs, attrs, direct


# ---------------------------------------------------------------------------------------------
# Every op

def test_every_op_has_a_sample():
    assert set(SAMPLES) == set(OP_TABLE)


@pytest.mark.parametrize("name, index, dtype", CASES)
def test_reference_matches_direct_call(name, index, dtype):
    op, inputs, attrs, direct = run_sample(name, index, dtype)
    reference = op.bind(attrs)(inputs)
    assert len(reference) == len(direct)
    for got, want in zip(reference, direct):
        if name in UNINITIALISED:
            assert type_of(got) == type_of(want)
        else:
            assert_close(got, want)


KEEPING = [pytest.param(name, i, id=f"{name}-{i}") for name in sorted(OP_TABLE) for i in range(sample_count(name))
           if OP_TABLE[name].keeps_values and not OP_TABLE[name].converts
           or OP_TABLE[name].move is not None and OP_TABLE[name].move.kind != "sum"]


@pytest.mark.parametrize("name, index", KEEPING)
def test_moves_and_ops_that_keep_values_only_pick_their_input_elements(name, index):
    """What the op table says of a move (ir.moves) or of `keeps_values`: every element of a result (but an index
    result) is an element of an operand, or a pad's fill value. Sample data are random floats, so a computed
    element would be new."""
    op, inputs, attrs, direct = run_sample(name, index, torch.float64)
    operands = inputs if op.move is not None else inputs[:1]
    known = set(torch.cat([t.reshape(-1) for t in operands if t.is_floating_point()]).tolist())
    if op.move is not None and op.move.kind == "pad":
        known.add(float(attrs.get("value", 0)))
    picked = [t for position, t in enumerate(direct) if position != op.index_result]
    assert picked and all(set(t.reshape(-1).tolist()) <= known for t in picked)


@pytest.mark.parametrize("name, index", [pytest.param(name, i, id=f"{name}-{i}") for name in sorted(OP_TABLE)
                                         for i in range(sample_count(name)) if OP_TABLE[name].index_result is not None])
def test_an_index_result_indexes_the_reduced_dim(name, index):
    op, inputs, attrs, direct = run_sample(name, index, torch.float64)
    indices, size = direct[op.index_result], inputs[0].shape[attrs.get("dim", -1)]
    assert not indices.is_floating_point() and bool(((indices >= 0) & (indices < size)).all())


@pytest.mark.parametrize("name, index", [pytest.param(name, i, id=f"{name}-{i}") for name in sorted(OP_TABLE)
                                         for i in range(sample_count(name)) if OP_TABLE[name].reduces is not None])
def test_the_reduced_dims_are_those_the_result_loses(name, index):
    """`reduces` names the dims a reduction folds: its first result has size 1 there (kept) or lacks them, as a
    layer norm's saved statistics do; a softmax's probabilities add up to one over them."""
    op, inputs, attrs, direct = run_sample(name, index, torch.float64)
    rank = inputs[0].dim()
    dims = op.reduces(attrs, rank)
    result = direct[-1] if op.kind == "normalization" and len(direct) > 1 else direct[0]
    kept = [size for dim, size in enumerate(inputs[0].shape) if dim not in dims]
    if op.kind == "normalization" and len(direct) == 1:  # a softmax: the shape stays
        sums = (result.exp() if name == "_log_softmax" else result).sum(tuple(dims))
        masked = sums == 0 if name == "_safe_softmax" else torch.zeros_like(sums, dtype=torch.bool)  # rows all masked
        assert bool(((sums - 1).abs() < 1e-9).logical_or(masked).all()), sums
    else:
        assert result.numel() == math.prod(kept), (dims, inputs[0].shape, result.shape)


@pytest.mark.parametrize("name, index, dtype", CASES)
def test_writing_into_arena_views_matches_direct_call(name, index, dtype):
    """Each op run as the arena runs it: results land in views at an odd planned offset of a dirty arena."""
    op, inputs, attrs, direct = run_sample(name, index, dtype)
    if op.kind == "view":
        return
    typed = len(direct) if op.typed_outputs is None else op.typed_outputs
    values = tuple(Value(f"out{i}", type_of(t)) for i, t in enumerate(direct))
    node = Node("n", name, tuple(f"in{i}" for i in range(len(inputs))), attrs, values)
    arena = torch.full((512 + sum(v.type.storage_bytes + 256 for v in values),), 0xFF, dtype=torch.uint8)
    views, offset = {}, 256
    for value in values[:typed]:
        views[value.name] = slot_view(arena, offset, value.type)
        offset += -(-value.type.storage_bytes // 256) * 256 + 256
    outs = [views.get(value.name) for value in values]
    results = bind_into(node, [out is not None for out in outs])(inputs, outs)
    for value, got, want in zip(values, results, direct):
        if value.name in views:
            assert got.untyped_storage().data_ptr() == arena.untyped_storage().data_ptr()
        if name in UNINITIALISED:
            assert type_of(got) == type_of(want)
        else:
            assert_close(got, want)
    if out_overload(op.target) is not None and op.typed_outputs is None:
        assert all(got is views[value.name] for value, got in zip(values, results))


POINTWISE_CASES = [case for case in CASES if OP_TABLE[case.values[0]].target in EXPRESSIONS]


@pytest.mark.parametrize("name, index, dtype", [case for case in CASES if OP_TABLE[case.values[0]].kind == "pointwise"])
def test_pointwise_ops_written_over_an_input_of_their_type_match_direct_call(name, index, dtype):
    """As the arena runs an elementwise op whose input dies there: its out= is that very input, or over the
    first input, the op's in-place variant where it has one."""
    op, inputs, attrs, direct = run_sample(name, index, dtype)
    node = Node("n", name, tuple(f"in{i}" for i in range(len(inputs))), attrs, (Value("out", type_of(direct[0])),))
    if node.is_cast:
        return
    overwritable = [position for position, tensor in enumerate(inputs)
                    if isinstance(tensor, torch.Tensor) and type_of(tensor) == type_of(direct[0])]
    if not node.fills_given_memory:  # only over its first input, in place
        overwritable = [0] if overwritable[:1] == [0] and inplace_overload(op.target) is not None else []
    for position in overwritable:
        overwritten = [t.clone() if i == position else t for i, t in enumerate(inputs)]
        (got,) = bind_into(node, [True], over_first=position == 0)(overwritten, [overwritten[position]])
        assert got is overwritten[position]
        assert_close(got, direct[0])


def _allocated_bytes(call: Callable[[], Any]) -> int:
    """Bytes the call allocates on the CPU, freed or not, by the profiler's memory records."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
        call()
    return sum(max(event.self_cpu_memory_usage, 0) for event in profiler.events())


def _contiguous(argument: Any) -> Any:
    if isinstance(argument, torch.Tensor):
        return argument.contiguous()
    if isinstance(argument, (list, tuple)):
        return type(argument)(_contiguous(item) for item in argument)
    return argument


def _copies_through_a_temporary(name: str) -> list[bool]:
    """For each sample of op `name` (contiguous inputs, its first dtype): whether its out= overload allocates at
    least its results' bytes beyond what the functional call allocates besides its results."""
    op = OP_TABLE[name]
    overload, names = out_overload(op.target)
    copied = []
    for index in range(len(SAMPLES[name](dtypes_of(name)[0]))):
        seed(name, index)
        args, kwargs = SAMPLES[name](dtypes_of(name)[0])[index]
        args, kwargs = _contiguous(args), {key: _contiguous(value) for key, value in kwargs.items()}
        direct = as_tuple(op.target(*args, **kwargs))
        outs = dict(zip(names, (torch.empty_like(result) for result in direct)))
        result_bytes = sum(result.untyped_storage().nbytes() for result in direct)
        beyond = _allocated_bytes(lambda: overload(*args, **kwargs, **outs)) - (
            _allocated_bytes(lambda: op.target(*args, **kwargs)) - result_bytes)
        copied.append(beyond >= result_bytes > 0)
    return copied


@pytest.mark.parametrize("name", sorted(name for name, op in OP_TABLE.items()
                                        if out_overload(op.target) is not None and op.typed_outputs is None))
def test_copying_out_overloads_are_the_measured_ones(name):
    """COPYING_OUT holds exactly the out= overloads that write through a temporary on every sample; those that
    copy only for some arguments (e.g. cumsum to another dtype) are left to write directly."""
    copied = _copies_through_a_temporary(name)
    listed = str(out_overload(OP_TABLE[name].target)[0]) in COPYING_OUT
    assert listed == all(copied), copied


@pytest.mark.parametrize("name, index, dtype", POINTWISE_CASES)
def test_generated_pointwise_kernel_matches_direct_call(name, index, dtype):
    """Each fusible op as a one-node Triton kernel (the interpreter on the CPU), reading its inputs at their
    strides (the samples include non-contiguous and broadcast ones)."""
    op, inputs, attrs, direct = run_sample(name, index, dtype)
    values = tuple(Value(f"in{i}", type_of(t)) for i, t in enumerate(inputs))
    result = Value("out", type_of(direct[0]))
    node = Node("n", name, tuple(v.name for v in values), attrs, (result,))
    if not fusible(node, {v.name: v.type for v in values}):
        pytest.skip(f"{name} with {attrs} on {dtype} stays a reference step (not fusible)")
    graph = Graph(values, (), (node,), ("out",))
    out = torch.full_like(direct[0], 7)
    Kernel(generate("k", [node], graph, ["out"]))(inputs, [out])
    assert_close(out, direct[0])


REDUCTION_CASES = [case for case in CASES if OP_TABLE[case.values[0]].target in REDUCTIONS]


def _reduction_node(name: str, inputs, attrs, direct) -> tuple[Node, dict[str, TensorType], int | None]:
    """The sample call as a node, its value types, and the trailing dims a row kernel reduces (None: not fusible)."""
    node = Node("n", name, tuple(f"in{i}" for i in range(len(inputs))), attrs,
                tuple(Value(f"out{i}", type_of(t)) for i, t in enumerate(direct)))
    types = {f"in{i}": type_of(t) for i, t in enumerate(inputs)}
    return node, types, reduced_dims(node, types, frozenset({"out0"}))


@pytest.mark.parametrize("name, index, dtype", REDUCTION_CASES)
def test_generated_reduction_kernel_matches_direct_call(name, index, dtype):
    """Each reduction as a one-node row kernel (the interpreter on the CPU), over non-contiguous inputs of odd
    sizes, one and two reduced dims."""
    op, inputs, attrs, direct = run_sample(name, index, dtype)
    node, types, reduced = _reduction_node(name, inputs, attrs, direct)
    if reduced is None:
        pytest.skip(f"{name} with {attrs} reduces dims that are not trailing: stays a reference step")
    graph = Graph(tuple(Value(n, t) for n, t in types.items()), (), (node,), ("out0",))
    out = torch.full_like(direct[0], 7)
    Kernel(generate_rows("k", [node], graph, ["out0"], types["in0"].shape, reduced))(inputs, [out])
    assert_close(out, direct[0])


def _codegen_takes(name: str, inputs, attrs, direct) -> bool:
    if OP_TABLE[name].target in REDUCTIONS:
        return _reduction_node(name, inputs, attrs, direct)[2] is not None
    node = Node("n", name, tuple(f"in{i}" for i in range(len(inputs))), attrs, (Value("out", type_of(direct[0])),))
    return fusible(node, {f"in{i}": type_of(t) for i, t in enumerate(inputs)})


@pytest.mark.parametrize("name", sorted(op_name(target) for target in {*EXPRESSIONS, *REDUCTIONS}))
def test_every_op_codegen_emits_has_a_sample_it_takes(name):
    torch.manual_seed(0)
    op = OP_TABLE[name]
    taken = 0
    for dtype in dtypes_of(name):
        for args, kwargs in SAMPLES[name](dtype):
            inputs, attrs = split_arguments(op.schema, args, kwargs, is_tensor)
            taken += _codegen_takes(name, inputs, attrs, as_tuple(op.target(*args, **kwargs)))
    assert taken


@pytest.mark.parametrize("name, index, dtype", CASES)
def test_infer_matches_actual_outputs(name, index, dtype):
    op, inputs, attrs, direct = run_sample(name, index, dtype)
    inferred = op.infer(op, [type_of(t) for t in inputs], attrs)
    assert len(inferred) == len(direct)
    typed = len(inferred) if op.typed_outputs is None else op.typed_outputs
    for rule, actual in zip(inferred[:typed], direct[:typed]):
        assert rule.same_as(type_of(actual)), f"infer says {rule}, torch gives {type_of(actual)}"


@pytest.mark.parametrize("name, index, dtype", CASES)
def test_flops_and_bytes_moved_are_consistent(name, index, dtype):
    op, inputs, attrs, direct = run_sample(name, index, dtype)
    input_types, output_types = [type_of(t) for t in inputs], [type_of(t) for t in direct]
    flops = op.flops(input_types, output_types, attrs)
    assert isinstance(flops, int) and flops >= 0
    written = sum(t.numel() * t.element_size() for t in direct)
    if op.kind == "view":
        expected = (0, 0)
    elif op.gathers:  # only the returned rows of the first input are read, plus the indices
        expected = (written + sum(t.numel() * t.element_size() for t in inputs[1:]), written)
    else:
        expected = (sum(t.numel() * t.element_size() for t in inputs), written)
    assert op.bytes_moved(input_types, output_types) == expected


def test_gather_ops_read_the_rows_they_return_not_the_whole_table():
    op = OP_TABLE["embedding"]
    table, indices, out = TensorType((50257, 768), torch.bfloat16), TensorType((8, 512), torch.int64), TensorType((8, 512, 768), torch.bfloat16)
    assert op.bytes_moved([table, indices], [out]) == (8 * 512 * 768 * 2 + 8 * 512 * 8, 8 * 512 * 768 * 2)


# ---------------------------------------------------------------------------------------------
# Independent expressions for the important ops, compared in float64

def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b over the last two dims, as a broadcast multiply and sum (no matmul kernel)."""
    return (a[..., :, :, None] * b[..., None, :, :]).sum(-2)


def _attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False):
    if enable_gqa:
        repeats = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeats, -3), value.repeat_interleave(repeats, -3)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = _product(query, key.transpose(-2, -1)) * scale
    if is_causal:
        scores = scores.masked_fill(~torch.ones(scores.shape[-2:], dtype=torch.bool).tril(), -math.inf)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, -math.inf)
    elif attn_mask is not None:
        scores = scores + attn_mask
    weights = (scores - scores.amax(-1, keepdim=True)).exp()
    return (_product(weights / weights.sum(-1, keepdim=True), value),)


def _convolution(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
    spatial = x.dim() - 2
    if transposed:
        conv = (F.conv_transpose1d, F.conv_transpose2d)[spatial - 1]
        return (conv(x, weight, bias, stride, padding, output_padding, groups, dilation),)
    conv = (F.conv1d, F.conv2d)[spatial - 1]
    return (conv(x, weight, bias, stride, padding, dilation, groups),)


def _layer_norm(x, normalized_shape, weight, bias, eps):
    dims = tuple(range(x.dim() - len(normalized_shape), x.dim()))
    mean = x.mean(dims, keepdim=True)
    rstd = ((x - mean) ** 2).mean(dims, keepdim=True).add(eps).rsqrt()
    out = (x - mean) * rstd
    out = out * weight if weight is not None else out
    out = out + bias if bias is not None else out
    return out, mean, rstd


def _group_norm(x, weight, bias, n, c, hw, groups, eps):
    grouped = x.reshape(n, groups, -1)
    mean = grouped.mean(-1, keepdim=True)
    rstd = ((grouped - mean) ** 2).mean(-1, keepdim=True).add(eps).rsqrt()
    out = ((grouped - mean) * rstd).reshape(x.shape)
    channel = (1, c) + (1,) * (x.dim() - 2)
    out = out * weight.reshape(channel) if weight is not None else out
    out = out + bias.reshape(channel) if bias is not None else out
    return out, mean.squeeze(-1), rstd.squeeze(-1)


def _batch_norm(x, weight, bias, running_mean, running_var, momentum, eps):
    channel = (1, -1) + (1,) * (x.dim() - 2)
    out = (x - running_mean.reshape(channel)) / (running_var.reshape(channel) + eps).sqrt()
    out = out * weight.reshape(channel) if weight is not None else out
    out = out + bias.reshape(channel) if bias is not None else out
    return out, x.new_empty(0), x.new_empty(0)


def _grouped_mm(x, weight, offsets):
    out = torch.zeros(x.shape[0], weight.shape[2], dtype=x.dtype)
    bounds = [0, *offsets.tolist()]
    for expert in range(weight.shape[0]):
        for row in range(bounds[expert], bounds[expert + 1]):
            out[row] = _product(x[row][None], weight[expert])[0]
    return (out,)


def _positions(shape):
    return itertools.product(*(range(size) for size in shape))


def _at(position, dim, value):
    position = list(position)
    position[dim] = value
    return tuple(position)


def _gather(x, dim, index, *, sparse_grad=False):
    out = torch.empty(index.shape, dtype=x.dtype)
    for p in _positions(index.shape):
        out[p] = x[_at(p, dim, int(index[p]))]
    return (out,)


def _scatter_add(x, dim, index, src):
    out = x.clone()
    for p in _positions(index.shape):
        out[_at(p, dim, int(index[p]))] += src[p]
    return (out,)


def _index_add(x, dim, index, source, *, alpha=1):
    out = x.clone()
    for i, target in enumerate(index.tolist()):
        out.select(dim, target).add_(alpha * source.select(dim, i))
    return (out,)


def _index_put(x, indices, values, accumulate=False):
    out = x.clone()
    shape = torch.broadcast_shapes(*(i.shape for i in indices))
    indices = [i.expand(shape) for i in indices]
    values = values.expand(*shape, *x.shape[len(indices):])
    for p in _positions(shape):
        cell = tuple(int(i[p]) for i in indices)
        out[cell] = out[cell] + values[p] if accumulate else values[p]
    return (out,)


def _embedding(weight, indices, *rest):
    rows = [weight[i] for i in indices.reshape(-1).tolist()]
    return (torch.stack(rows).reshape(*indices.shape, weight.shape[1]),)


def _cumsum(x, dim, *, dtype=None):
    x = x.to(dtype) if dtype is not None else x
    return (torch.stack([x.narrow(dim, 0, i + 1).sum(dim) for i in range(x.shape[dim])], dim),)


def _topk(x, k, dim=-1, largest=True, sorted=True):
    moved = x.movedim(dim, -1)
    lines = moved.reshape(-1, moved.shape[-1]).tolist()
    ranks = [builtins.sorted(range(len(line)), key=line.__getitem__, reverse=largest)[:k] for line in lines]
    values = torch.tensor([[line[j] for j in rank] for line, rank in zip(lines, ranks)], dtype=x.dtype)
    shape = (*moved.shape[:-1], k)
    return values.reshape(shape).movedim(-1, dim), torch.tensor(ranks).reshape(shape).movedim(-1, dim)


def _softmax(x, dim, half_to_float):
    e = (x - x.amax(dim, keepdim=True)).exp()
    return (e / e.sum(dim, keepdim=True),)


def _log_softmax(x, dim, half_to_float):
    shifted = x - x.amax(dim, keepdim=True)
    return (shifted - shifted.exp().sum(dim, keepdim=True).log(),)


ORACLES: dict[str, Callable[..., tuple[torch.Tensor, ...]]] = {
    "mm": lambda a, b: (_product(a, b),),
    "bmm": lambda a, b: (_product(a, b),),
    "addmm": lambda c, a, b, *, beta=1, alpha=1: (beta * c + alpha * _product(a, b),),
    "baddbmm": lambda c, a, b, *, beta=1, alpha=1: (beta * c + alpha * _product(a, b),),
    "linear": lambda x, w, b=None: (_product(x, w.t()) + (b if b is not None else 0),),
    "grouped_mm": _grouped_mm,
    "linears": lambda x, weights, biases: tuple(_product(x, w.t()) + (b if b is not None else 0)
                                               for w, b in zip(weights, biases)),
    "gated_linears": lambda x, weights, biases, skip: tuple(
        torch.where(skip[..., None], 0.0, _product(x, w.t()) + (b if b is not None else 0)).to(x.dtype)
        for w, b in zip(weights, biases)),
    "convolution": _convolution,
    "scaled_dot_product_attention": _attention,
    "_softmax": _softmax,
    "_log_softmax": _log_softmax,
    "native_layer_norm": _layer_norm,
    "native_group_norm": _group_norm,
    "_native_batch_norm_legit_no_training": _batch_norm,
    "embedding": _embedding,
    "gather": _gather,
    "scatter_add": _scatter_add,
    "index_add": _index_add,
    "index_put": _index_put,
    "cumsum": _cumsum,
    "topk": _topk,
}

ORACLE_CASES = [
    pytest.param(name, i, id=f"{name}-{i}") for name in sorted(ORACLES) for i in range(sample_count(name))
]


@pytest.mark.parametrize("name, index", ORACLE_CASES)
def test_reference_matches_independent_expression(name, index):
    op = OP_TABLE[name]
    seed(name, index)
    args, kwargs = SAMPLES[name](torch.float64)[index]
    inputs, attrs = split_arguments(op.schema, args, kwargs, is_tensor)
    reference = op.bind(attrs)(inputs)
    expected = ORACLES[name](*args, **kwargs)
    assert len(reference) == len(expected)
    for got, want in zip(reference, expected):
        assert_close(got, want)


# ---------------------------------------------------------------------------------------------
# Exact FLOP counts and shape errors

def _flops(name: str, *args: Any, **kwargs: Any) -> int:
    op = OP_TABLE[name]
    inputs, attrs = split_arguments(op.schema, args, kwargs, is_tensor)
    outputs = as_tuple(op.target(*args, **kwargs))
    return op.flops([type_of(t) for t in inputs], [type_of(t) for t in outputs], attrs)


def r(*shape: int) -> torch.Tensor:
    return torch.randn(shape)


FLOP_CASES = {
    "mm": (lambda: _flops("mm", r(5, 7), r(7, 11)), 2 * 5 * 11 * 7),
    "bmm": (lambda: _flops("bmm", r(3, 5, 7), r(3, 7, 11)), 2 * 3 * 5 * 11 * 7),
    "addmm": (lambda: _flops("addmm", r(11), r(5, 7), r(7, 11)), 2 * 5 * 11 * 7 + 5 * 11),
    "baddbmm": (lambda: _flops("baddbmm", r(3, 5, 11), r(3, 5, 7), r(3, 7, 11)), 2 * 3 * 5 * 11 * 7 + 3 * 5 * 11),
    "linear_bias": (lambda: _flops("linear", r(3, 5, 7), r(11, 7), r(11)), 2 * 15 * 11 * 7 + 15 * 11),
    "linear_no_bias": (lambda: _flops("linear", r(3, 5, 7), r(11, 7)), 2 * 15 * 11 * 7),
    "conv_bias": (
        lambda: _flops("convolution", r(2, 6, 13, 11), r(9, 6, 3, 3), r(9), [1, 1], [1, 1], [1, 1], False, [0, 0], 1),
        2 * 2 * 9 * 13 * 11 * 6 * 3 * 3 + 2 * 9 * 13 * 11,
    ),
    "conv_groups3_stride2": (  # Hout = (13 - 3) // 2 + 1 = 6, Wout = (11 - 3) // 2 + 1 = 5
        lambda: _flops("convolution", r(2, 6, 13, 11), r(9, 2, 3, 3), None, [2, 2], [0, 0], [1, 1], False, [0, 0], 3),
        2 * 2 * 9 * 6 * 5 * (6 // 3) * 3 * 3,
    ),
    "conv_groups3_stride2_bias": (  # Hout = (13 + 2 - 3) // 2 + 1 = 7, Wout = (11 + 2 - 3) // 2 + 1 = 6
        lambda: _flops("convolution", r(2, 6, 13, 11), r(9, 2, 3, 3), r(9), [2, 2], [1, 1], [1, 1], False, [0, 0], 3),
        2 * 2 * 9 * 7 * 6 * 2 * 3 * 3 + 2 * 9 * 7 * 6,
    ),
    "conv_transposed_bias": (  # every input element times C_out/groups·kh·kw; Hout = 4·2+3 = 11, Wout = 6·2+3 = 15
        lambda: _flops("convolution", r(2, 6, 5, 7), r(6, 3, 3, 3), r(3), [2, 2], [0, 0], [1, 1], True, [0, 0], 1),
        2 * 2 * 6 * 5 * 7 * 3 * 3 * 3 + 2 * 3 * 11 * 15,
    ),
    "attention": (
        lambda: _flops("scaled_dot_product_attention", r(2, 3, 5, 7), r(2, 3, 11, 7), r(2, 3, 11, 9)),
        2 * 2 * 3 * 5 * 11 * (7 + 9),
    ),
    "attention_causal": (
        lambda: _flops("scaled_dot_product_attention", r(2, 3, 5, 7), r(2, 3, 11, 7), r(2, 3, 11, 9), is_causal=True),
        2 * 2 * 3 * 5 * 11 * (7 + 9),
    ),
    "grouped_mm": (lambda: _flops("grouped_mm", r(13, 5), r(3, 5, 7), torch.tensor([4, 4, 13])), 2 * 13 * 5 * 7),
    "linears": (lambda: _flops("linears", r(1, 7), [r(11, 7), r(3, 7)], [r(11), None]), 2 * 7 * (11 + 3) + 11),
    "gated_linears": (lambda: _flops("gated_linears", r(1, 7), [r(11, 7), r(3, 7)], [r(11), None], torch.tensor([False])),
                      2 * 7 * (11 + 3) + 11),
}


@pytest.mark.parametrize("case", sorted(FLOP_CASES))
def test_flops_match_hand_computed_count(case):
    count, expected = FLOP_CASES[case]
    assert count() == expected


def _infer(name: str, *types: TensorType, **attrs: Any) -> tuple[TensorType, ...]:
    op = OP_TABLE[name]
    return op.infer(op, types, attrs)


def f32(*shape: int) -> TensorType:
    return TensorType(shape, torch.float32)


@pytest.mark.parametrize(
    "name, types",
    [
        ("mm", (f32(5, 7), f32(6, 11))),
        ("addmm", (f32(11), f32(5, 7), f32(6, 11))),
        ("bmm", (f32(3, 5, 7), f32(3, 6, 11))),
        ("bmm", (f32(3, 5, 7), f32(5, 7, 11))),
        ("baddbmm", (f32(3, 5, 11), f32(3, 5, 7), f32(3, 6, 11))),
        ("linear", (f32(5, 7), f32(11, 6))),
        ("grouped_mm", (f32(13, 5), f32(3, 6, 7), TensorType((3,), torch.int64))),
        ("scaled_dot_product_attention", (f32(2, 3, 5, 7), f32(2, 3, 11, 7), f32(2, 3, 13, 9))),
        ("scaled_dot_product_attention", (f32(2, 3, 5, 7), f32(2, 3, 11, 6), f32(2, 3, 11, 9))),
    ],
)
def test_shape_rule_rejects_mismatched_operands(name, types):
    with pytest.raises(ValueError):
        _infer(name, *types)


@pytest.mark.parametrize("types, attrs", [
    ((f32(1, 7), f32(11, 6)), {"weights": (1,), "biases": (None,)}),  # features differ
    ((f32(1, 7), f32(11, 7), f32(10)), {"weights": (1,), "biases": (2,)}),  # a bias of the wrong length
    ((f32(1, 7), f32(11, 7)), {"weights": (1,), "biases": (None, None)}),  # more biases than weights
    ((f32(1, 7),), {"weights": (), "biases": ()}),  # no weight
])
def test_linears_shape_rule_rejects_mismatched_operands(types, attrs):
    with pytest.raises(ValueError):
        _infer("linears", *types, **attrs)


@pytest.mark.parametrize("skip", [TensorType((1,), torch.float32), TensorType((2,), torch.bool),
                                  TensorType((1, 1), torch.bool)])
def test_gated_linears_shape_rule_wants_one_bool_per_input_row(skip):
    with pytest.raises(ValueError):
        _infer("gated_linears", f32(1, 7), f32(11, 7), skip, weights=(1,), biases=(None,))
