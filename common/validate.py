"""Argument checks shared by every method: each returns the value as a plain Python type or raises naming it.

One rule per kind, so a method's ``__post_init__`` reads as a list of its fields:

- integers: ``int`` or any numpy integer; never ``bool`` (``True`` is not a token count), never a float;
- reals: ``int``, ``float`` or any numpy number; never ``bool`` or a string, never NaN;
- flags: ``bool`` or ``numpy.bool_`` only (the string ``"no"`` is truthy and must not read as ``True``);
- budgets: a token count (integer >= 1) or a keep ratio (real in (0, 1]).

Errors are ``ValueError`` whose message starts with the parameter's name. A wrong *type* raises ``TypeError``
(also naming it) where Python code would: ``apply(model, ZeroTPrune)`` with the class instead of an instance.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["check_bool", "check_budget", "check_choice", "check_int", "check_ints", "check_method", "check_real"]


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_int(value: Any, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an ``int`` in ``[low, high]`` (either bound optional)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
        raise ValueError(f"{name}: expected an integer, got {_describe(value)}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        span = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise ValueError(f"{name}: must lie in {span}, got {value}")
    return value


def check_ints(values: Any, name: str, *, low: int | None = None, high: int | None = None) -> tuple[int, ...]:
    """A sequence of integers (see :func:`check_int`) as a tuple; a float or bool element is an error."""
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)):
        raise ValueError(f"{name}: expected a sequence of integers, got {_describe(values)}")
    return tuple(check_int(v, f"{name}[{i}]", low=low, high=high) for i, v in enumerate(values))


def check_real(value: Any, name: str, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite-or-infinite, non-NaN ``float`` within the given bounds (closed unless ``*_open``)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.integer, np.floating)):
        raise ValueError(f"{name}: expected a number, got {_describe(value)}")
    value = float(value)
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if math.isnan(value) or below or above:
        span = f"{'(' if low_open else '['}{'-inf' if low is None else low}, " \
               f"{'inf' if high is None else high}{')' if high_open else ']'}"
        raise ValueError(f"{name}: must lie in {span}, got {value}")
    return value


def check_bool(value: Any, name: str) -> bool:
    """``value`` as a ``bool``; strings, numbers and ``None`` are errors, not truthiness."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}: expected True or False, got {_describe(value)}")
    return bool(value)


def check_choice(value: Any, name: str, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_budget(budget: Any, name: str = "budget") -> int | float:
    """A per-image budget: a token count (integer >= 1, returned as ``int``) or a keep ratio (real in (0, 1],
    returned as ``float``). Integer types are counts (``numpy.int64`` included), real types ratios."""
    if isinstance(budget, (bool, np.bool_)) or not isinstance(budget, (numbers.Real, np.integer, np.floating)):
        raise ValueError(f"{name}: expected a token count (int >= 1) or a keep ratio (float in (0, 1]), "
                         f"got {_describe(budget)}")
    if isinstance(budget, (numbers.Integral, np.integer)):
        return check_int(budget, f"{name} (a token count)", low=1)
    return check_real(budget, f"{name} (a keep ratio)", low=0.0, high=1.0, low_open=True)


def check_method(method: Any, name: str = "method") -> Any:
    """A method *instance*: passing the class (``apply(model, ZeroTPrune)``) raises with the fix."""
    if isinstance(method, type):
        raise TypeError(f"{name}: got the class {method.__name__}, expected an instance such as "
                        f"{method.__name__}(...)")
    if method is None:
        raise TypeError(f"{name}: expected a method instance, got None")
    return method
