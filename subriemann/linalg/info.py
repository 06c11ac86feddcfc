r"""What a solve did, and how it says that it missed its tolerance.

Every solver route (:mod:`subriemann.linalg.routes`) returns a :class:`SolverInfo`
with its answer; a metric keeps the last one as ``metric.last_solve``.  An
iterative solve that stops short warns (:func:`check_converged`), and a
:math:`\lambda = 1` direction that cannot be certified to :data:`ACCURACY`
warns with :class:`AccuracyWarning`: a solve is never silently inaccurate.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from subriemann.validation import check_choice

__all__ = [
    "ACCURACY",
    "SolverInfo",
    "ConvergenceWarning",
    "AccuracyWarning",
    "RankThresholdWarning",
    "check_converged",
    "error_decade",
]

ACCURACY = 1e-8
r"""Relative accuracy of the :math:`\lambda = 1` direction :math:`D^+u` that every solver
meets against the SVD route, or announces with an :class:`AccuracyWarning`."""


class ConvergenceWarning(UserWarning):
    """An iterative solver stopped before reaching its tolerance."""


class AccuracyWarning(UserWarning):
    r"""A :math:`\lambda = 1` solve could not certify :data:`ACCURACY`; the message gives
    the estimated relative error."""


class RankThresholdWarning(ConvergenceWarning):
    r"""A matrix-free solve met singular values at or below the rank threshold.

    A Krylov solver cannot truncate the spectrum exactly at :math:`\tau`;
    it stops when its condition estimate exceeds :math:`\sigma_{\max}/\tau`,
    which regularizes but is not the thresholded pseudoinverse.
    """


@dataclass
class SolverInfo:
    """What a solve did.

    Attributes
    ----------
    solver : str
        ``"svd"``, ``"ntk"``, ``"lstsq"`` (direct), ``"cg"``, ``"pcg"``,
        ``"lsmr"`` (iterative) or ``"refinement"``.
    iterations : int
        0 for a direct solve.
    residual : float
        Relative residual of the returned solution (see :func:`~subriemann.linalg.cg`,
        :func:`~subriemann.linalg.lsmr`), or the estimated relative error of a
        certified :math:`\\lambda = 1` solve; ``nan`` where a backward stable
        direct solve did not compute it.
    converged : bool
        Whether ``residual`` met the requested tolerance.
    rtol : float
        The requested tolerance.
    maxiter : int
        The iteration limit that applied (after scaling with conditioning).
    cond : float
        The solver's estimate of the condition number of its operator.
    reason : str
        Why it stopped, or what was done.
    """

    solver: str
    iterations: int
    residual: float
    converged: bool
    rtol: float = float("nan")
    maxiter: int = 0
    cond: float = float("nan")
    reason: str = ""

    @classmethod
    def direct(cls, solver: str, reason: str) -> SolverInfo:
        """The record of a backward stable direct solve (no iterations, residual not computed).

        Examples
        --------
        >>> SolverInfo.direct("svd", "thin SVD").converged
        True
        """
        return cls(solver, 0, float("nan"), True, reason=reason)


def error_decade(est: float) -> str:
    """An error estimate rounded up to its decade, ``"1e-6"`` (for messages).

    Examples
    --------
    >>> error_decade(3e-7)
    '1e-6'
    """
    return f"1e{math.ceil(math.log10(est))}" if 0 < est < math.inf else f"{est}"


def check_converged(info: SolverInfo, on_fail: str = "warn") -> None:
    """Warn (or raise ``RuntimeError``) when an iterative solve did not converge.

    A stop at LSMR's condition limit (the rank threshold) warns with
    :class:`RankThresholdWarning`, any other failure with
    :class:`ConvergenceWarning`; both carry the residual.
    """
    check_choice(on_fail, "on_fail", ("warn", "raise"))
    if info.converged and info.reason != "condition limit":
        return
    if info.reason == "condition limit":
        msg = (
            f"{info.solver} stopped after {info.iterations} iterations because its estimate of "
            f"cond(D) ({info.cond:.3g}) exceeded sigma_max/tau: D has singular values at or below "
            "the rank threshold, which a matrix-free solver cannot truncate exactly. The result "
            f"(relative residual {info.residual:.3g}) is not the thresholded pseudoinverse: "
            "components along singular values near tau may be amplified by up to 1/tau. "
            "Use solver='svd' or 'ntk' for the exact cut"
        )
        category: type[Warning] = RankThresholdWarning
    else:
        msg = (
            f"{info.solver} did not converge in {info.iterations} iterations (limit "
            f"{info.maxiter}, {info.reason}): relative residual {info.residual:.3g} > "
            f"rtol {info.rtol:.3g}; the result is not the exact Riemannian gradient"
        )
        category = ConvergenceWarning
    if on_fail == "raise":
        raise RuntimeError(msg)
    warnings.warn(msg, category, stacklevel=3)
