"""Human-readable sizes and times for reports: one place, so every table prints bytes the same way."""
from __future__ import annotations

_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(size_bytes: float) -> str:
    """`size_bytes` in the largest binary unit that keeps it at least 1: "512 B", "3.50 KiB", "1.25 GiB"."""
    value, unit = float(size_bytes), _BYTE_UNITS[0]
    for unit in _BYTE_UNITS:
        if abs(value) < 1024 or unit == _BYTE_UNITS[-1]:
            break
        value /= 1024
    return f"{int(value)} B" if unit == "B" else f"{value:,.2f} {unit}"


def format_us(time_us: float) -> str:
    """A duration in µs, ms or s as it fits: "7.3 µs", "12.40 ms", "3.21 s"."""
    if abs(time_us) < 1000:
        return f"{time_us:,.1f} µs"
    if abs(time_us) < 1e6:
        return f"{time_us / 1e3:,.2f} ms"
    return f"{time_us / 1e6:,.2f} s"
