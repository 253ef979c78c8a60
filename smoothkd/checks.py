"""Range checks for the configs' validate(): each returns the problem, in words that say what to set,
or None. A NaN fails every comparison, so a check that only tests `x < 0` lets it through; these
test finiteness first."""

from __future__ import annotations

import math
from typing import Any


def count(flag: str, value: Any, low: int = 1) -> str | None:
    """A whole number >= low (None passes: the option is unset)."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= low):
        return None
    return f"{flag} must be at least {low}, got {value!r}"


def number(flag: str, value: Any, low: float | None = None, high: float | None = None, *,
           low_open: bool = False, high_open: bool = False, note: str = "") -> str | None:
    """A finite number in [low, high] (either end open, either missing); `note` says what the bound means."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if ok:
        return None
    span = ""
    if low is not None and high is not None:
        span = f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        span = f" {'>' if low_open else '>='} {low:g}"
    elif high is not None:
        span = f" {'<' if high_open else '<='} {high:g}"
    return f"{flag} must be a finite number{span}{note}, got {value!r}"
