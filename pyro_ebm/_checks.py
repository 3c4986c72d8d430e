"""Argument checks shared by the modules: each raises a ``ValueError`` naming the argument."""

from __future__ import annotations

import math

__all__ = ["check_int", "check_positive"]


def check_int(name: str, value: int, minimum: int) -> int:
    """``value`` if it is an ``int`` (not a ``bool``) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_positive(name: str, value: float) -> float:
    """``float(value)`` if it is a positive finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)
