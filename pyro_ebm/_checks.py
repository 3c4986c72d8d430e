"""Argument checks shared by the modules: each raises a ``ValueError`` naming the argument."""

from __future__ import annotations

import math
import numbers
import operator
import warnings

import numpy as np

__all__ = [
    "NOT_GIVEN",
    "DefaultValue",
    "check_flag",
    "check_int",
    "check_positive",
    "renamed",
]


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


#: the value of an old argument name that was not passed (``None`` can be a value)
NOT_GIVEN = object()


class DefaultValue(float):
    """A number used as an argument's default, told apart (``type(x) is DefaultValue``) from the
    same number passed explicitly: passing an argument under both its new and its old name is
    then always caught. Shown and used as the plain number."""

    __slots__ = ()


def check_flag(name: str, value) -> bool:
    """``value`` as a bool; ``TypeError`` naming the argument if it is not one."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def renamed(owner: str, new: str, new_value, new_given: bool, old: str, old_value):
    """The value of an argument renamed to Pyro's name ``new`` from ``old``: ``new_value``
    unless the old name was used (``old_value`` is not :data:`NOT_GIVEN`), in which case a
    ``FutureWarning`` names the new name and ``old_value`` is returned; both names passed
    (``new_given``) is a ``TypeError`` naming both."""
    if old_value is NOT_GIVEN:
        return new_value
    if new_given:
        raise TypeError(f"{owner} got both {new}= and {old}=, its old name: pass {new} only")
    warnings.warn(
        f"{owner}'s {old} is deprecated: use {new} (Pyro's name)", FutureWarning, stacklevel=3
    )
    return old_value
