r"""Explicit Runge–Kutta integrators: Butcher tableaus, one step, one step-size controller.

The one Runge–Kutta implementation of the package: the gradient flows
(:func:`subriemann.gradient_flow`), the geodesics of
:meth:`subriemann.metrics.BundleMetric.exp` and the linearized output flow
(:func:`subriemann.analysis.output_flow`) all step with :func:`rk_step`.
This module imports nothing from the rest of the package, so every layer
may use it.

A tableau :math:`(c, A, b, e)` defines the step of size :math:`h` from
:math:`y` for :math:`\dot y = f(y)`:

.. math::

    k_1 = f(y),\quad k_i = f\Big(y + h\sum_{j<i} a_{ij}k_j\Big),\quad
    y_1 = y + h\sum_i b_ik_i,\quad \mathrm{err} = h\sum_i e_ik_i,

where :math:`e = b - \hat b` is the difference with an embedded method of
lower order (adaptive tableaus only).  For a *FSAL* tableau (first same as
last) the last stage is evaluated at :math:`y_1`, so it is :math:`f(y_1)`,
the first stage of the next step.

:class:`StepController` is the standard controller of Hairer, Nørsett &
Wanner (*Solving ODEs I*, §II.4): the error is measured in the RMS norm of
:math:`\mathrm{err}_i / (\mathrm{atol} + \mathrm{rtol}\max(|y_i|, |y_{1,i}|))`,
a step is accepted when that norm is at most 1, and the next step is
:math:`h\cdot\min(5, \max(0.2, 0.9\,\|e\|^{-1/(p+1)}))` with :math:`p` the
order of the embedded (lower-order) solution.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ButcherTableau", "TABLEAUS", "rk_step", "fixed_steps", "StepController"]

Field = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class ButcherTableau:
    r"""An explicit Runge–Kutta method.

    Attributes
    ----------
    name : str
    order : int
        Order of the solution :math:`y_1`.
    a : tuple of tuple of float
        Row ``i`` holds :math:`a_{i,0..i-1}` (row 0 is empty).
    b : tuple of float
        Weights of :math:`y_1`.
    e : tuple of float or None
        Error weights :math:`b - \hat b` (None: no error estimate, fixed steps).
    fsal : bool
        The last stage is evaluated at :math:`y_1` (its weights are ``b``).
    """

    name: str
    order: int
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    e: tuple[float, ...] | None = None
    fsal: bool = False

    @property
    def stages(self) -> int:
        return len(self.a)

    @property
    def adaptive(self) -> bool:
        return self.e is not None


EULER = ButcherTableau("euler", 1, ((),), (1.0,))
RK4 = ButcherTableau(
    "rk4", 4,
    ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
    (1 / 6, 1 / 3, 1 / 3, 1 / 6),
)
DOPRI5 = ButcherTableau(
    "dopri5", 5,
    (
        (),
        (1 / 5,),
        (3 / 40, 9 / 40),
        (44 / 45, -56 / 15, 32 / 9),
        (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
        (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
    ),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0),
    (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40),
    fsal=True,
)

TABLEAUS: dict[str, ButcherTableau] = {t.name: t for t in (DOPRI5, RK4, EULER)}
"""The registry of tableaus by name (``"dopri5"``, ``"rk4"``, ``"euler"``)."""


def _wsum(weights: Sequence[float], ks: Sequence[Tensor]) -> Tensor:
    """:math:`\\sum_j w_jk_j` over the non-zero weights, summed left to right."""
    terms = [w * k for w, k in zip(weights, ks) if w != 0.0]
    return sum(terms[1:], terms[0])


def _combine(y: Tensor, h: float, weights: Sequence[float], ks: Sequence[Tensor]) -> Tensor:
    """:math:`y + h\\sum_j w_jk_j`."""
    return y + h * _wsum(weights, ks)


def rk_step(tableau: ButcherTableau, field: Field, y: Tensor, h: float,
            f0: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    r"""One step of size ``h``: ``(y_1, f(y_1) or None, err or None)``.

    Parameters
    ----------
    tableau : ButcherTableau
    field : callable
        :math:`f`, ``Tensor [n] -> Tensor [n]``.
    y : Tensor, shape=[n]
    h : float
    f0 : Tensor, shape=[n], optional
        :math:`f(y)` when already known (saves one evaluation).

    Returns
    -------
    y1 : Tensor, shape=[n]
    f1 : Tensor or None
        :math:`f(y_1)` for a FSAL tableau (its last stage), else None.
    err : Tensor or None
        The local error estimate :math:`h\sum_i e_ik_i` (adaptive tableaus).

    Examples
    --------
    >>> import torch
    >>> y1, _, _ = rk_step(TABLEAUS["rk4"], lambda y: -y, torch.ones(1, dtype=torch.float64), 0.1)
    >>> abs(float(y1) - float(torch.exp(torch.tensor(-0.1, dtype=torch.float64)))) < 1e-7
    True
    """
    ks = [field(y) if f0 is None else f0]
    for row in tableau.a[1:]:
        ks.append(field(_combine(y, h, row, ks)))
    if tableau.fsal:  # the last stage was evaluated at y_1
        y1 = _combine(y, h, tableau.a[-1], ks[:-1])
        f1: Tensor | None = ks[-1]
    else:
        y1 = _combine(y, h, tableau.b, ks)
        f1 = None
    err = None if tableau.e is None else h * _wsum(tableau.e, ks)
    return y1, f1, err


def fixed_steps(tableau: ButcherTableau, field: Field, y: Tensor, span: float,
                n_steps: int) -> Tensor:
    r"""``n_steps`` equal steps of ``tableau`` over a flow time ``span``; returns the end.

    Examples
    --------
    >>> import torch
    >>> y = fixed_steps(TABLEAUS["rk4"], lambda y: -y, torch.ones(1, dtype=torch.float64), 1.0, 20)
    >>> abs(float(y) - 0.36787944117144233) < 1e-7   # e^{-1}, error O(h^4)
    True
    """
    h = span / n_steps
    for _ in range(n_steps):
        y = rk_step(tableau, field, y, h)[0]
    return y


@dataclass(frozen=True)
class StepController:
    r"""Error norm, acceptance and next step of an adaptive tableau (see the module docstring).

    Attributes
    ----------
    rtol, atol : float
    order : int
        Order of the embedded solution (4 for ``dopri5``).
    """

    rtol: float
    atol: float
    order: int = 4

    def error_norm(self, err: Tensor, y0: Tensor, y1: Tensor) -> float:
        r""":math:`\|e\|_{\rm rms}`, :math:`e_i = \mathrm{err}_i/(\mathrm{atol} + \mathrm{rtol}\max(|y_{0,i}|, |y_{1,i}|))`."""  # noqa: E501
        scale = self.atol + self.rtol * torch.maximum(y0.abs(), y1.abs())
        return float(torch.sqrt(torch.mean((err / scale) ** 2)))

    def factor(self, error_norm: float) -> float:
        """The factor of the next step (accepted or retried) after an error norm."""
        if error_norm == 0:
            return 5.0
        return min(5.0, max(0.2, 0.9 * error_norm ** (-1.0 / (self.order + 1))))

    def initial_step(self, field: Field, y0: Tensor, f0: Tensor, h_max: float) -> float:
        """Hairer–Wanner's starting step (one extra evaluation of ``field``).

        An evaluation that raises gives ``1e-3`` times the first guess.
        """
        sc = self.atol + self.rtol * y0.abs()
        d0 = float(torch.sqrt(torch.mean((y0 / sc) ** 2)))
        d1 = float(torch.sqrt(torch.mean((f0 / sc) ** 2)))
        h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
        h0 = min(h0, h_max)
        try:
            f1 = field(y0 + h0 * f0)
        except ArithmeticError:
            return h0 * 1e-3
        d2 = float(torch.sqrt(torch.mean(((f1 - f0) / sc) ** 2))) / h0
        p1 = self.order + 1
        h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / p1)
        return min(100 * h0, h1, h_max)
