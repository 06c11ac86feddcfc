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
    subriemann.validation.ArgumentTypeError: n_directions must be a positive integer, got True

``bool`` is never accepted where a number is asked for (``True == 1`` in
Python, but ``lr=True`` is a mistake), and non-finite numbers are refused
unless ``finite=False``.

A wrong type raises :class:`ArgumentTypeError`, which is a ``TypeError`` and
also a ``ValueError``: code that catches either keeps working (the checks
this module replaced did not agree on which of the two to raise).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection
from typing import Any

import numpy as np
import torch

__all__ = [
    "ArgumentTypeError",
    "check_int",
    "check_real",
    "check_bool",
    "check_choice",
    "check_optional",
    "check_tensor",
]


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type.

    A ``TypeError``, and a ``ValueError`` as well (as numpy's ``AxisError`` is
    both a ``ValueError`` and an ``IndexError``), so that callers written
    against either convention catch it.
    """


def _bound_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    return " and ".join(parts)


def _int_text(low: int | None, high: int | None) -> str:
    """``"a positive integer"`` for ``low = 1`` alone, else ``"an integer >= low ..."``."""
    if low == 1 and high is None:
        return "a positive integer"
    bounds = _bound_text(low, high, False, False)
    return f"an integer {bounds}" if bounds else "an integer"


def _real_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    """``"a positive number"`` / ``"a non-negative number"`` for ``low = 0`` alone."""
    if low == 0 and high is None:
        return "a positive number" if low_open else "a non-negative number"
    return f"a number {_bound_text(low, high, low_open, high_open)}"


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
    ArgumentTypeError
        ``value`` is not an integer (``numbers.Integral``; ``bool`` is refused).
    ValueError
        ``value`` is out of bounds.

    Examples
    --------
    >>> check_int(0, "max_steps", low=0)
    0
    >>> check_int(0, "chunk_size", low=1)
    Traceback (most recent call last):
    ...
    ValueError: chunk_size must be a positive integer, got 0
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{name} must be {_int_text(low, high)}, got {value!r}")
    out = int(value)
    if (low is not None and out < low) or (high is not None and out > high):
        raise ValueError(f"{name} must be {_int_text(low, high)}, got {value!r}")
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
    ArgumentTypeError
        Not a number (``"must be a number"``), or a complex one
        (``"must be a real number"``).
    ValueError
        Non-finite or out of bounds.

    Examples
    --------
    >>> check_real(float("inf"), "max_step", low=0.0, low_open=True, finite=False)
    inf
    >>> check_real(-1e-8, "rtol", low=0.0)
    Traceback (most recent call last):
    ...
    ValueError: rtol must be a non-negative number, got -1e-08
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        item = getattr(value, "item", None)
        if isinstance(value, bool) or getattr(value, "ndim", None) != 0 or item is None:
            complex_ = isinstance(value, numbers.Complex) and not isinstance(value, bool)
            kind = "a real number" if complex_ else "a number"
            raise ArgumentTypeError(f"{name} must be {kind}, got {value!r}")
        value = item()
        if isinstance(value, (bool, complex)):
            raise ArgumentTypeError(f"{name} must be a real number, got {value!r}")
    out = float(value)
    if math.isnan(out) or (finite and math.isinf(out)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    bad_low = low is not None and (out <= low if low_open else out < low)
    bad_high = high is not None and (out >= high if high_open else out > high)
    if bad_low or bad_high:
        raise ValueError(
            f"{name} must be {_real_text(low, high, low_open, high_open)}, got {value!r}"
        )
    return out


def check_bool(value: Any, name: str) -> bool:
    """``True`` or ``False`` (numpy booleans too), nothing else.

    Raises
    ------
    ArgumentTypeError
        Any other value, e.g. ``1`` or ``"yes"``.
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ArgumentTypeError(f"{name} must be True or False, got {value!r}")


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


def _shape_text(shape: tuple[Any, ...]) -> str:
    dims = ["..." if d is Ellipsis else "?" if d is None else str(d) for d in shape]
    if shape and shape[0] is Ellipsis:
        return f"[{', '.join(dims)}]"
    return f"({dims[0]},)" if len(dims) == 1 else f"({', '.join(dims)})"


def _shape_matches(actual: tuple[int, ...], shape: tuple[Any, ...]) -> bool:
    want = shape[1:] if shape and shape[0] is Ellipsis else shape
    if len(actual) < len(want) or (want is shape and len(actual) != len(shape)):
        return False
    tail = actual[len(actual) - len(want):]
    return all(w is None or w == a for w, a in zip(want, tail))


def check_tensor(
    value: Any,
    name: str,
    *,
    shape: tuple[Any, ...] | None = None,
    dtype: torch.dtype | None = None,
    real: bool = False,
    finite: bool = False,
) -> torch.Tensor:
    """A ``torch.Tensor``, optionally of a given shape and dtype, real or finite.

    Parameters
    ----------
    value : Any
    name : str
        The argument's name, used in the messages (``finite`` says
        ``"<name> contain NaN or inf"``: name the entries, e.g. ``"inputs"``).
    shape : tuple, optional
        Sizes of the dimensions; ``None`` is any size, and a leading
        ``...`` (Ellipsis) any number of leading dimensions: ``(..., K)`` is
        ``shape=[..., K]``.
    dtype : torch.dtype, optional
    real : bool
        Refuse complex tensors.
    finite : bool
        Refuse NaN and ``±inf`` entries.

    Returns
    -------
    Tensor
        ``value`` itself (not converted).

    Raises
    ------
    ArgumentTypeError
        Not a tensor, a complex tensor where ``real``, another dtype.
    ValueError
        Another shape, or NaN/inf entries where ``finite``.

    Examples
    --------
    >>> check_tensor(torch.zeros(2, 3), "tangent_vec", shape=(..., 3)).shape
    torch.Size([2, 3])
    >>> check_tensor(torch.zeros(4), "theta", shape=(3,))
    Traceback (most recent call last):
    ...
    ValueError: theta must have shape (3,), got (4,)
    >>> check_tensor(torch.tensor([1.0, float("nan")]), "inputs", finite=True)
    Traceback (most recent call last):
    ...
    ValueError: inputs contain NaN or inf
    """
    if not isinstance(value, torch.Tensor):
        raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if real and value.is_complex():
        raise ArgumentTypeError(f"{name} must be real, got {value.dtype}")
    if dtype is not None and value.dtype != dtype:
        raise ArgumentTypeError(f"{name} must have dtype {dtype}, got {value.dtype}")
    if shape is not None and not _shape_matches(tuple(value.shape), tuple(shape)):
        raise ValueError(f"{name} must have shape {_shape_text(tuple(shape))}, "
                         f"got {tuple(value.shape)}")
    if finite and (value.is_floating_point() or value.is_complex()):
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name} contain NaN or inf")
    return value
