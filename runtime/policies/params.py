"""Checks for policy parameters: the right type and range, or a ValueError naming the fix."""

from __future__ import annotations

import numbers


def number(name: str, value, low: float, high: float, low_open: bool = False, hint: str = "") -> float:
    """``value`` as a float in [low, high] ((low, high] with ``low_open``); bools and strings
    are rejected rather than coerced (``tau=True`` is a mistake, not 1.0)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__}){hint}")
    value = float(value)
    below = value <= low if low_open else value < low
    if below or value > high or value != value:
        interval = f"({low:g}, {high:g}]" if low_open else f"[{low:g}, {high:g}]"
        raise ValueError(f"{name} must lie in {interval}; got {value}{hint}")
    return value


def count(name: str, value, minimum: int = 1, allow_none: bool = False) -> int | None:
    """``value`` as an int >= ``minimum`` (None passes when ``allow_none``)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        extra = " (or None)" if allow_none else ""
        raise ValueError(f"{name} must be an integer >= {minimum}{extra}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return int(value)


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def choice(name: str, value, options: tuple) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {options}; got {value!r}")
    return value
