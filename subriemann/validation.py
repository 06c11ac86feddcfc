"""Argument checks: one home for the one-line errors that name the bad value.

Every public function of subriemann checks its arguments with these helpers,
so that the same mistake always gets the same message::

    >>> from subriemann.validation import check_int, check_real
    >>> check_int(3, "n_directions", low=1)
    3
    >>> check_real(0.5, "lam", low=0.0, high=1.0)
    0.5
    >>> check_int(True, "n_directions", low=1)
    Traceback (most recent call last):
    ...
    TypeError: n_directions must be an integer, got True

``bool`` is never accepted where a number is asked for (``True == 1`` in
Python, but ``lr=True`` is a mistake), and non-finite numbers are refused
unless ``finite=False``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection
from typing import Any

__all__ = ["check_int", "check_real", "check_bool", "check_choice", "check_optional"]


def _bound_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    return " and ".join(parts)


def check_int(value: Any, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """An integer (not a bool) with ``low <= value <= high``.

    Parameters
    ----------
    value : Any
    name : str
        The argument's name, used in the message.
    low, high : int, optional
        Inclusive bounds.

    Returns
    -------
    int

    Raises
    ------
    TypeError
        ``value`` is not an integer (``numbers.Integral``; ``bool`` is refused).
    ValueError
        ``value`` is out of bounds.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    out = int(value)
    if (low is not None and out < low) or (high is not None and out > high):
        raise ValueError(
            f"{name} must be an integer {_bound_text(low, high, False, False)}, got {value!r}"
        )
    return out


def check_real(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    finite: bool = True,
) -> float:
    """A real number (not a bool) inside the given bounds.

    Parameters
    ----------
    value : Any
        An ``int``, ``float``, numpy scalar or 0-d tensor (anything that is a
        ``numbers.Real`` or has ``.item()``).
    name : str
    low, high : float, optional
        Bounds; inclusive unless ``low_open`` / ``high_open``.
    finite : bool
        Refuse ``nan`` and ``±inf`` (default).  With ``finite=False``, ``inf``
        passes but ``nan`` is still refused.

    Returns
    -------
    float

    Raises
    ------
    TypeError
        Not a real number.
    ValueError
        Non-finite or out of bounds.
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if not isinstance(value, numbers.Real):
        item = getattr(value, "item", None)
        if getattr(value, "ndim", None) != 0 or item is None:
            raise TypeError(f"{name} must be a real number, got {value!r}")
        value = item()
        if isinstance(value, (bool, complex)):
            raise TypeError(f"{name} must be a real number, got {value!r}")
    out = float(value)
    if math.isnan(out) or (finite and math.isinf(out)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    bad_low = low is not None and (out <= low if low_open else out < low)
    bad_high = high is not None and (out >= high if high_open else out > high)
    if bad_low or bad_high:
        bounds = _bound_text(low, high, low_open, high_open)
        raise ValueError(f"{name} must be a number {bounds}, got {value!r}")
    return out


def check_bool(value: Any, name: str) -> bool:
    """``True`` or ``False`` (numpy booleans too), nothing else.

    Raises
    ------
    TypeError
        Any other value, e.g. ``1`` or ``"yes"``.
    """
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r}")


def check_choice(value: Any, name: str, choices: Collection[str]) -> str:
    """One of the strings in ``choices``.

    Raises
    ------
    ValueError
        ``value`` is not one of them; the message lists them.
    """
    if not isinstance(value, str) or value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {listed}, got {value!r}")
    return value


def check_optional(check: Any, value: Any, name: str, **bounds: Any) -> Any:
    """``None``, or ``check(value, name, **bounds)``.

    Examples
    --------
    >>> check_optional(check_real, None, "rank_atol", low=0.0) is None
    True
    """
    return None if value is None else check(value, name, **bounds)
