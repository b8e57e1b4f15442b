"""format_bytes and format_us pick the unit that fits, so small sizes never print as "0.00 MiB"."""
from __future__ import annotations

import pytest

from ember.units import format_bytes, format_us


@pytest.mark.parametrize(("size_bytes", "text"), [
    (0, "0 B"), (512, "512 B"), (1023, "1023 B"), (1024, "1.00 KiB"), (3584, "3.50 KiB"),
    (5 * 2**20 + 2**19, "5.50 MiB"), (int(1.25 * 2**30), "1.25 GiB"), (3 * 2**40, "3.00 TiB"), (2**50, "1,024.00 TiB"),
])
def test_format_bytes_uses_the_largest_unit_that_keeps_at_least_one(size_bytes, text):
    assert format_bytes(size_bytes) == text


@pytest.mark.parametrize(("time_us", "text"), [
    (0, "0.0 µs"), (7.34, "7.3 µs"), (999.9, "999.9 µs"), (12_400, "12.40 ms"), (3_210_000, "3.21 s"),
])
def test_format_us_uses_micro_milli_or_whole_seconds(time_us, text):
    assert format_us(time_us) == text
