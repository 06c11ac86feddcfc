r"""The ``"matrix_free"`` route: Krylov solves with one JVP and one VJP per iteration.

:math:`D` is never formed (memory :math:`O(K + QN)`).  At :math:`\lambda=1`,
LSMR started at 0, which converges to :math:`D^+u` (condition limit
:math:`\sigma_{\max}/\tau`); for :math:`\lambda<1`, CG on the SPD operator
:math:`(1-\lambda)1+\lambda DD^\top` in the smaller space.  Iteration limits
scale with the (estimated) condition number; a solve that stops short warns
with its residual (:class:`~subriemann.linalg.ConvergenceWarning`), and a
:math:`\lambda = 1` solve whose error estimate :math:`2\hat\kappa\rho` exceeds the
accuracy warns with :class:`~subriemann.linalg.AccuracyWarning`.  A Krylov
solver cannot cut the spectrum exactly at :math:`\tau`
(:class:`~subriemann.linalg.RankThresholdWarning`).
"""

from __future__ import annotations

import warnings

from torch import Tensor

from subriemann.linalg.info import (
    ACCURACY,
    AccuracyWarning,
    SolverInfo,
    check_converged,
    error_decade,
)
from subriemann.linalg.krylov import cg, lsmr
from subriemann.linalg.routes.base import OPEN_UNIT, SolverRoute, Threshold
from subriemann.linalg.routes.svd import svd_project, svd_sharp
from subriemann.linalg.state import PointState
from subriemann.validation import check_int, check_optional, check_real

__all__ = ["MatrixFreeRoute"]


class MatrixFreeRoute(SolverRoute):
    r"""CG for :math:`\lambda < 1`, LSMR at :math:`\lambda = 1`; :math:`D` is never formed.

    Parameters
    ----------
    rtol : float
        Tolerance of the Krylov solvers (``solver_rtol`` of the metrics).
    maxiter : int, optional
        Fixed iteration limit (default: scaled with the conditioning, see
        :func:`~subriemann.linalg.cg` and :func:`~subriemann.linalg.lsmr`).
    accuracy : float
        Relative accuracy of the :math:`\lambda = 1` direction; LSMR's error
        estimate above it warns.

    Notes
    -----
    ``sharp`` of a general covector: CG on :math:`g_\lambda` in
    :math:`\mathbb{R}^K` for :math:`\lambda < 1`; at :math:`\lambda = 1` two LSMR
    solves, :math:`(D^\top D)^+ = D^+(D^+)^\top`.
    """

    name = "matrix_free"
    tags = frozenset({"matrix_free", "iterative"})
    factorization = "ntk"

    def __init__(
        self, rtol: float = 1e-12, maxiter: int | None = None, accuracy: float = ACCURACY
    ) -> None:
        self.rtol = check_real(rtol, "solver_rtol", **OPEN_UNIT)
        self.maxiter = check_optional(check_int, maxiter, "maxiter", low=1)
        self.accuracy = check_real(accuracy, "accuracy", **OPEN_UNIT)

    def description(self) -> dict[str, object]:
        return {"solver": self.name, "rtol": self.rtol, "maxiter": self.maxiter,
                "accuracy": self.accuracy}

    @staticmethod
    def conlim(state: PointState, threshold: Threshold) -> float:
        r""":math:`\sigma_{\max}/\tau` for LSMR's condition limit (no factorization needed)."""
        if threshold.rank_atol is None:
            return 1.0 / threshold.rank_rtol if threshold.rank_rtol > 0 else 0.0
        if threshold.rank_atol == 0.0:
            return 0.0
        # only the scale of a stopping test: a coarse power iteration suffices
        return state.sigma_max(rtol=1e-4, maxiter=100) / threshold.rank_atol

    def _lsmr(
        self, state: PointState, rhs: Tensor, threshold: Threshold, transposed: bool = False
    ) -> tuple[Tensor, SolverInfo]:
        """Minimum-norm solution of :math:`Dv = b` (or :math:`D^\\top w = b`), checked."""
        sp = state.space
        shape = (sp.dim, sp.output_dim) if transposed else (sp.output_dim, sp.dim)
        fwd, back = (state.vjp, state.jvp) if transposed else (state.jvp, state.vjp)
        v, info = lsmr(fwd, back, shape, rhs, rtol=self.rtol, maxiter=self.maxiter,
                       conlim=self.conlim(state, threshold))
        check_converged(info)
        return v, info

    def _cg(self, matvec, rhs: Tensor, lam: float) -> tuple[Tensor, SolverInfo]:
        r"""CG on an operator with spectrum :math:`\ge 1-\lambda`, checked."""
        z, info = cg(matvec, rhs, rtol=self.rtol, maxiter=self.maxiter, eig_lower=1.0 - lam)
        check_converged(info)
        return z, info

    def lsmr_accuracy(self, info: SolverInfo) -> None:
        r"""Announce an LSMR solution of :math:`Dv = u` that may miss ``accuracy``.

        LSMR stops at a relative residual :math:`\rho` (``info.residual``); the error of
        :math:`v` is then at most about :math:`2\hat\kappa\rho` (compatible system,
        :math:`|\delta v| \le |r|/\sigma_{\min}`), :math:`\hat\kappa` LSMR's estimate
        of :math:`\kappa(D)`.  Solves that did not converge warn elsewhere.
        """
        if not info.converged or info.reason == "condition limit":
            return
        est = 2.0 * info.cond * info.residual
        if est > self.accuracy:
            warnings.warn(
                f"matrix-free lam = 1 solve: estimated relative error up to "
                f"{error_decade(est)} (2 cond(D) x residual) > accuracy "
                f"{self.accuracy:.2g}; lower solver_rtol or use solver='ntk' or 'svd'",
                AccuracyWarning,
                stacklevel=5,
            )

    def solve(
        self, state: PointState, rhs: Tensor, lam: float, threshold: Threshold
    ) -> tuple[Tensor, SolverInfo]:
        if lam == 1.0:
            v, info = self._lsmr(state, rhs, threshold)
            self.lsmr_accuracy(info)
            return v, info
        if state.output_is_smaller:
            w, info = self._cg(lambda z: (1.0 - lam) * z + lam * state.jvp(state.vjp(z)), rhs, lam)
            return state.vjp(w), info
        return self._cg(
            lambda z: (1.0 - lam) * z + lam * state.vjp(state.jvp(z)), state.vjp(rhs), lam
        )

    def sharp(
        self, state: PointState, xi: Tensor, lam: float, threshold: Threshold
    ) -> tuple[Tensor, SolverInfo]:
        if lam < 1.0:
            return self._cg(lambda z: (1.0 - lam) * z + lam * state.vjp(state.jvp(z)), xi, lam)
        # (D^T D)^+ xi = D^+ (D^T)^+ xi: w = min-norm solution of D^T w = xi, then D^+ w
        w, _ = self._lsmr(state, xi, threshold, transposed=True)
        return self._lsmr(state, w, threshold)

    def project(
        self, state: PointState, a: Tensor, threshold: Threshold
    ) -> tuple[Tensor, SolverInfo]:
        r""":math:`D^+Da`, the minimum-norm solution of :math:`Dv = Da` (LSMR).

        For :math:`K < QN` the thin SVD, which cuts exactly at :math:`\tau`
        (:math:`D` is the tall side's :math:`QN\times K`; this route's bundle
        projector has always been the SVD there).
        """
        if not state.output_is_smaller:
            state.svd  # noqa: B018
            out = svd_project(state, a, self.tau(state, threshold))
            return out, SolverInfo.direct("svd", "thin SVD (matrix_free route, K < QN)")
        return self._lsmr(state, state.jvp(a), threshold)

    def restricted_sharp(
        self, state: PointState, xi: Tensor, lam: float, threshold: Threshold
    ) -> tuple[Tensor, SolverInfo]:
        if not state.output_is_smaller:  # as project: the thin SVD for K < QN
            state.svd  # noqa: B018
            out = svd_sharp(state, xi, lam, self.tau(state, threshold), restrict=True)
            return out, SolverInfo.direct("svd", "thin SVD (matrix_free route, K < QN)")
        return super().restricted_sharp(state, xi, lam, threshold)
