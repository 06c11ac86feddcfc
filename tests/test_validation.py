"""The one home of argument checks: subriemann.validation."""

import math

import numpy as np
import pytest
import torch

from subriemann.validation import (
    ArgumentTypeError,
    check_bool,
    check_choice,
    check_int,
    check_optional,
    check_real,
    check_tensor,
)


def test_wrong_type_is_both_type_and_value_error():
    # the older checks disagreed: callers catching either keep working
    assert issubclass(ArgumentTypeError, TypeError) and issubclass(ArgumentTypeError, ValueError)
    for bad in (True, 2.5, "3", None):
        with pytest.raises(TypeError):
            check_int(bad, "n", low=1)
        with pytest.raises(ValueError):
            check_int(bad, "n", low=1)


@pytest.mark.parametrize(
    "value, kw, match",
    [
        (0, dict(low=1), "chunk_size must be a positive integer, got 0"),
        (True, dict(low=1), "chunk_size must be a positive integer, got True"),
        (-1, dict(low=0), "chunk_size must be an integer >= 0, got -1"),
        (5, dict(low=0, high=4), "chunk_size must be an integer >= 0 and <= 4, got 5"),
        (2.0, {}, "chunk_size must be an integer, got 2.0"),
    ],
)
def test_check_int_messages(value, kw, match):
    with pytest.raises(ValueError, match=match):
        check_int(value, "chunk_size", **kw)


def test_check_int_accepts_integers():
    assert check_int(np.int64(7), "n", low=1) == 7 and type(check_int(np.int64(7), "n")) is int
    assert check_int(0, "n", low=0, high=0) == 0


@pytest.mark.parametrize(
    "value, kw, exc, match",
    [
        (-1.0, dict(low=0.0, low_open=True), ValueError, "s_end must be a positive number"),
        (0, dict(low=0.0, low_open=True), ValueError, "s_end must be a positive number"),
        (-1e-8, dict(low=0.0), ValueError, "s_end must be a non-negative number"),
        (1.5, dict(low=0.0, high=1.0), ValueError, r"s_end must be a number >= 0 and <= 1"),
        (1.0, dict(low=0.0, high=1.0, high_open=True), ValueError, r"a number >= 0 and < 1"),
        (math.nan, {}, ValueError, "s_end must be a finite number"),
        (math.inf, {}, ValueError, "s_end must be a finite number"),
        (math.nan, dict(finite=False), ValueError, "s_end must be a finite number"),
        ("1", {}, TypeError, "s_end must be a number, got '1'"),
        (None, {}, TypeError, "s_end must be a number, got None"),
        (True, {}, TypeError, "s_end must be a number, got True"),
        (0.5j, {}, TypeError, "s_end must be a real number"),
        (torch.tensor(0.5j), {}, TypeError, "s_end must be a real number"),
        (torch.tensor([1.0, 2.0]), {}, TypeError, "s_end must be a number"),
        (torch.tensor(True), {}, TypeError, "s_end must be a real number"),
    ],
)
def test_check_real_messages(value, kw, exc, match):
    with pytest.raises(exc, match=match):
        check_real(value, "s_end", **kw)


def test_check_real_accepts_scalars():
    assert check_real(3, "x") == 3.0 and type(check_real(3, "x")) is float
    assert check_real(np.float32(0.25), "x") == 0.25
    assert check_real(torch.tensor(0.75, dtype=torch.float64), "x", low=0.0, high=1.0) == 0.75
    assert check_real(math.inf, "x", low=0.0, low_open=True, finite=False) == math.inf
    assert check_real(0.0, "x", low=0.0) == 0.0  # closed bound


def test_check_bool_and_choice_and_optional():
    assert check_bool(np.bool_(True), "progress") is True
    for bad in (1, 0, "yes", None):
        with pytest.raises(TypeError, match="progress must be True or False"):
            check_bool(bad, "progress")
    assert check_choice("rk4", "method", ("dopri5", "rk4")) == "rk4"
    with pytest.raises(ValueError, match="method must be one of 'dopri5', 'rk4', got 'rk45'"):
        check_choice("rk45", "method", ("dopri5", "rk4"))
    with pytest.raises(ValueError, match="method must be one of"):
        check_choice(3, "method", ("dopri5", "rk4"))
    assert check_optional(check_int, None, "n", low=1) is None
    assert check_optional(check_int, 3, "n", low=1) == 3
    with pytest.raises(ValueError, match="n must be a positive integer"):
        check_optional(check_int, 0, "n", low=1)


def test_check_tensor():
    t = torch.zeros(2, 3)
    assert check_tensor(t, "v", shape=(..., 3)) is t  # returned as it is
    assert check_tensor(torch.zeros(3), "v", shape=(..., 3)).shape == (3,)
    assert check_tensor(t, "v", shape=(None, 3), dtype=torch.float32, real=True, finite=True) is t
    with pytest.raises(TypeError, match="v must be a torch.Tensor, got list"):
        check_tensor([1.0], "v")
    with pytest.raises(TypeError, match="v must be real, got torch.complex64"):
        check_tensor(t.to(torch.complex64), "v", real=True)
    with pytest.raises(TypeError, match="v must have dtype torch.float64, got torch.float32"):
        check_tensor(t, "v", dtype=torch.float64)
    with pytest.raises(ValueError, match=r"v must have shape \[\.\.\., 4\], got \(2, 3\)"):
        check_tensor(t, "v", shape=(..., 4))
    with pytest.raises(ValueError, match=r"v must have shape \(6,\), got \(2, 3\)"):
        check_tensor(t, "v", shape=(6,))
    with pytest.raises(ValueError, match=r"v must have shape \(\?, 3\), got \(3,\)"):
        check_tensor(torch.zeros(3), "v", shape=(None, 3))
    with pytest.raises(ValueError, match=r"v must have shape \[\.\.\., 2, 3\], got \(3,\)"):
        check_tensor(torch.zeros(3), "v", shape=(..., 2, 3))
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="v contain NaN or inf"):
            check_tensor(torch.tensor([0.0, bad]), "v", finite=True)
    check_tensor(torch.tensor([1, 2]), "v", finite=True)  # integers are finite
