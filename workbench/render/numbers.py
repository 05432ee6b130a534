"""How numbers read on screen and in report.md: bytes in binary units, durations, counts, changes.

Shared by the run summary, report.md, the app's results index and preflight's messages, so one
figure reads the same everywhere. Every formatter takes None (or a non-number) for a missing value.
"""

from __future__ import annotations

from typing import Any


def as_number(value: Any) -> float | None:
    """`value` as a float when it is a real number (not a bool); None otherwise."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def format_bytes(n: float | None) -> str:
    """1288490188 -> '1.2 GiB' (binary units: 1 GiB = 1024³ bytes)."""
    if as_number(n) is None:
        return "n/a"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_seconds(s: float | None) -> str:
    """3.21 -> '3.2 s', 125 -> '2 m 05 s', 7300 -> '2 h 01 m'."""
    if as_number(s) is None:
        return "n/a"
    if s < 60:
        return f"{s:.1f} s"
    s = int(round(s))
    if s < 3600:
        return f"{s // 60} m {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} m"


def format_count(n: float | None) -> str:
    """134515008 -> '134.5 M' (parameter counts)."""
    if as_number(n) is None:
        return "n/a"
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.1f} {suffix}"
    return f"{n:.0f}"


def format_figure(value: Any, name: str = "", missing: str = "n/a") -> str:
    """A metric's value for a table: bytes when its name says so, else as many digits as it needs."""
    v = as_number(value)
    if v is None:
        return missing
    if "bytes" in name:  # memory figures: 1.2 GiB rather than 1,288,490,188
        return format_bytes(v)
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    return f"{v:.4f}"


def format_short(value: Any, missing: str = "?") -> str:
    """Four significant digits, for one-line summaries: 14.9712 -> '14.97'."""
    v = as_number(value)
    return missing if v is None else f"{v:.4g}"


def format_change(dense: Any, compressed: Any, percent: bool = True) -> str:
    """Compressed relative to dense: '×1.250 (+25.0%)', or '×1.250' without `percent`; '' when undefined."""
    d, c = as_number(dense), as_number(compressed)
    if d is None or c is None or d == 0:
        return ""
    text = f"×{c / d:.3f}"
    return f"{text} ({(c - d) / abs(d):+.1%})" if percent else text
