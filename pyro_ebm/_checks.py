"""Argument checks shared by the modules: each raises a ``ValueError`` naming the argument."""

from __future__ import annotations

import math
import numbers
import operator

__all__ = ["check_int", "check_positive"]


def check_int(name: str, value: int, minimum: int) -> int:
    """``value`` as an ``int`` if it is an integer ``>= minimum``: a Python ``int`` or anything
    with ``__index__`` (a NumPy integer, a 0-d integer tensor), never a ``bool``."""
    try:
        index = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        index = None
    if index is None or index < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return index


def check_positive(name: str, value: float) -> float:
    """``float(value)`` if it is a positive finite real number (NumPy scalars included)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)
