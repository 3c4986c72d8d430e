"""The one argument-validation helper of the package.

Every check names the argument: a value of the wrong type is a ``TypeError``, a value of the
right type out of range a ``ValueError``. NumPy scalars (and 0-d tensors for integers) are
accepted where Python numbers are; a ``bool`` is never a number.
"""

from __future__ import annotations

import math
import numbers
import operator
import warnings

import numpy as np
import torch

__all__ = [
    "NOT_GIVEN",
    "DefaultValue",
    "check_choice",
    "check_flag",
    "check_hidden",
    "check_int",
    "check_positive",
    "check_real",
    "check_tensor",
    "renamed",
]


def _shown(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_int(name: str, value: int, minimum: int) -> int:
    """``value`` as an ``int`` if it is an integer ``>= minimum``: a Python ``int`` or anything
    with ``__index__`` (a NumPy integer, a 0-d integer tensor), never a ``bool`` or a float.

    Example:

    >>> import numpy as np
    >>> check_int("num_steps", np.int64(5), 1)
    5
    >>> check_int("num_steps", "5", 1)
    Traceback (most recent call last):
    ...
    TypeError: num_steps must be an integer, got '5' (str)
    """
    index = None
    if not isinstance(value, bool | np.bool_):
        try:
            index = operator.index(value)
        except TypeError:
            pass
    if index is None:
        raise TypeError(f"{name} must be an integer, got {_shown(value)}")
    if index < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return index


def check_real(
    name: str,
    value: float,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``float(value)`` if it is a finite real number in ``[low, high]`` (an end excluded when
    ``low_open`` / ``high_open``).

    Example:

    >>> check_real("target_accept_prob", 0.8, 0, 1, low_open=True, high_open=True)
    0.8
    """
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {_shown(value)}")
    value = float(value)
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if not math.isfinite(value) or below or above:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name} must be a finite number in {lo}{low}, {high}{hi}, got {value!r}")
    return value


def check_positive(name: str, value: float) -> float:
    """``float(value)`` if it is a positive finite real number (NumPy scalars included)."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive finite number, got {_shown(value)}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_choice(name: str, value, choices: tuple) -> object:
    """``value`` if it is one of ``choices`` (compared with ``==``, bools kept apart)."""
    if not any(type(value) is type(c) and value == c for c in choices):
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_hidden(name: str, value) -> tuple[int, ...]:
    """Hidden-layer widths as a tuple of positive ints: one integer is one layer of that width,
    a sequence is one width per layer.

    Example:

    >>> check_hidden("hidden", 32), check_hidden("hidden", [64, 64])
    ((32,), (64, 64))
    """
    if isinstance(value, str) or not (
        isinstance(value, list | tuple) or hasattr(value, "__index__")
    ):
        raise TypeError(
            f"{name} must be an integer width or a sequence of widths, got {_shown(value)}"
        )
    widths = (value,) if hasattr(value, "__index__") else tuple(value)
    return tuple(check_int(f"{name}[{i}]", w, 1) for i, w in enumerate(widths))


def check_tensor(
    name: str,
    value,
    *,
    ndim: int | None = None,
    shape: tuple[int, ...] | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``value`` if it is a tensor of ``ndim`` dimensions or of ``shape``; with ``dtype``, a
    floating tensor is converted to it (so that float64 data meet a float32 model), any other
    is a ``TypeError``.

    Example:

    >>> check_tensor("x", torch.zeros(3, 2, dtype=torch.float64), ndim=2, dtype=torch.float32).dtype
    torch.float32
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(value.shape)}")
    if dtype is not None and value.dtype != dtype:
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
        value = value.to(dtype)
    return value


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
