r"""The ``"ntk"`` route: push-through in the smaller space, with the :math:`\lambda = 1` guarantee.

For :math:`QN \le K`,
:math:`g_\lambda^{-1}D^\top = D^\top((1-\lambda)1 + \lambda DD^\top)^{-1}`: a
Cholesky factor for :math:`\lambda<1`, and at :math:`\lambda=1` the Cholesky
factor of :math:`DD^\top` where it certifies full rank above :math:`\tau`
(:meth:`~subriemann.linalg.PointState.certified_cholesky`), else the thresholded
eigendecomposition :math:`DD^\top = U\Sigma^2U^\top`.  For :math:`K < QN` the
same with :math:`D^\top D` in :math:`\mathbb{R}^K`.

Eigenvalues of a Gram matrix carry an absolute error of about
:math:`\epsilon\,\sigma_{\max}^2` (:func:`~subriemann.linalg.gram_rounding`), so the
:math:`\lambda = 1` direction :math:`D^+u` is certified to
:data:`~subriemann.linalg.ACCURACY` a priori, reached by iterative refinement
(:func:`refine_push_through`), or taken from the SVD (:data:`SVD_FALLBACK_LIMIT`);
where none applies, an :class:`~subriemann.linalg.AccuracyWarning` gives the
estimated error.  Singular values below :math:`\sqrt{\epsilon}\,\sigma_{\max}`
are not resolved on this route (a threshold below that warns).

For :math:`\lambda < 1` and a Gram dimension in :data:`REUSE_MIN_DIM` ..
:data:`REUSE_MAX_DIM`, the route keeps the Cholesky factor of the last point it
factored (:class:`ReferenceFactor`) and solves at nearby points by conjugate
gradients preconditioned with it, certified a posteriori or refactored
(:class:`NTKRoute`, docs/scale.md).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from subriemann._warnings import warn_once
from subriemann.engines.base import plain_tensor
from subriemann.linalg.info import ACCURACY, AccuracyWarning, SolverInfo, error_decade
from subriemann.linalg.krylov import pcg
from subriemann.linalg.routes.base import OPEN_UNIT, SolverRoute, Threshold
from subriemann.linalg.routes.svd import svd_project, svd_sharp, svd_solve
from subriemann.linalg.spectral import eigenvalue_rounding, gram_rounding
from subriemann.linalg.state import PointState
from subriemann.triangular import cholesky_solve
from subriemann.validation import check_int, check_real

__all__ = [
    "NTKRoute",
    "ReferenceFactor",
    "refine_push_through",
    "SVD_FALLBACK_LIMIT",
    "REUSE_MIN_DIM",
    "REUSE_MAX_DIM",
    "REUSE_MAXITER",
    "REUSE_RESTARTS",
    "REUSE_REFRESH",
]

SVD_FALLBACK_LIMIT = 50_000_000
r"""Largest :math:`QN\cdot K` for which the ``"ntk"`` route, when it cannot certify
:data:`~subriemann.linalg.ACCURACY`, falls back to the dense SVD (otherwise it warns)."""

REUSE_MIN_DIM = 1024
r"""Smallest Gram dimension :math:`n = \min(QN, K)` at which the ``"ntk"`` route, for
:math:`\lambda < 1`, reuses a nearby point's Cholesky factor as a PCG preconditioner.

Below it forming and factoring the Gram matrix (:math:`QN\,n^2 + n^3/3` flops) costs
little more than the few JVP/VJP pairs of PCG, and the route factors at every point."""

REUSE_MAX_DIM = 8192
r"""Largest :math:`n` for the reuse: the reference factor is an :math:`n\times n` matrix
kept between points (0.5 GB in float64 at 8192), and above it the engine's factor-free
parameter-space solve or the ``"nystrom"`` route are the better choice."""

REUSE_REFRESH = 0.75
r"""A point is factored without trying PCG when the last PCG solve took more than this
share of ``reuse_maxiter`` iterations: along a flow the count grows with the distance
from the reference, and the next point would most likely fail after the full cap."""

REUSE_RESTARTS = 2
r"""Defect corrections after the first PCG run of a reused factor, when its answer falls
short of the certificate: PCG stops at a residual set from the answer's size at the
reference point, an estimate that can be a few times too large."""

REUSE_MAXITER = 40
r"""Most PCG iterations at a point before the ``"ntk"`` route gives up the reference factor
and factors afresh (one JVP, one VJP and two triangular solves each: on full digits,
:math:`n = 3\,466`, 40 of them cost about 0.35 s, a third of forming and factoring the Gram
matrix, 1.1 s; the cost ratio only grows with :math:`n \ge` :data:`REUSE_MIN_DIM`)."""

_EPS64 = float(torch.finfo(torch.float64).eps)


def refine_push_through(
    jvp: Callable[[Tensor], Tensor],
    vjp: Callable[[Tensor], Tensor],
    solve: Callable[[Tensor], Tensor],
    u: Tensor,
    v: Tensor,
    accuracy: float,
    max_steps: int = 4,
) -> tuple[Tensor, SolverInfo]:
    r"""Iterative refinement of the minimum-norm solution :math:`v = D^+u` of :math:`Dv = u`.

    Given :math:`v_0 = D^\top \hat A^{-1}u` (``solve`` applies :math:`\hat A^{-1}`, a
    factorization of the computed :math:`A = DD^\top`), each step computes the residual
    :math:`\rho = u - Dv` (one JVP) and adds :math:`\delta v = D^\top\hat A^{-1}\rho`
    (one VJP).  The corrections stay in :math:`\operatorname{ran}D^\top`, so the limit
    is the minimum-norm solution; the error contracts by
    :math:`\approx\eta/\lambda_{\min}(A)` per step (:math:`\epsilon\kappa(D)^2`) down
    to the accuracy of the residual, :math:`\approx\epsilon\kappa(D)`, that of a
    backward stable solver.  The error after a step is at most its correction
    :math:`|\delta v|`, the a-posteriori estimate used to stop (``<= accuracy |v|``)
    or to give up (a correction that did not halve: stagnation).

    Returns
    -------
    v : Tensor, shape=[K]
    info : SolverInfo
        ``solver="refinement"``, ``residual`` the estimated relative error
        :math:`|\delta v|/|v|` of the last step, ``converged`` when it met ``accuracy``.
    """
    prev = math.inf
    est = math.inf
    reason = "iteration limit"
    steps = 0
    while steps < max_steps:
        steps += 1
        dv = vjp(solve(u - jvp(v)))
        v = v + dv
        step, vnorm = float(dv.norm()), float(v.norm())
        est = step / vnorm if vnorm > 0 else (0.0 if step == 0 else math.inf)
        if est <= accuracy:
            reason = "converged"
            break
        if not step < 0.5 * prev:
            reason = "stagnated"
            break
        prev = step
    converged = est <= accuracy
    return v, SolverInfo("refinement", steps, est, converged, accuracy, max_steps, reason=reason)


def eigh_error(s: Tensor, keep: Tensor) -> float:
    r"""Estimated relative error of the thresholded pseudoinverse of a Gram matrix.

    The eigenvalues :math:`\sigma_i^2` carry an absolute error :math:`\eta`
    (:func:`~subriemann.linalg.eigenvalue_rounding`), so a kept weight
    :math:`1/\sigma_i^2` is off by up to :math:`\eta/\sigma_r^2` (smallest kept
    :math:`\sigma_r`) and the kept eigenspace turns by up to
    :math:`\eta/(\sigma_r^2 - \sigma_{r+1}^2)`; the larger of the two.
    """
    r = int(keep.sum())
    if r == 0:
        return 0.0
    low = float(s[r - 1]) ** 2
    gap = low - (float(s[r]) ** 2 if r < s.shape[0] else 0.0)
    denom = min(low, gap)
    return eigenvalue_rounding(s) / denom if denom > 0 else math.inf


def weighted_eigh_error(s: Tensor, phi: Tensor) -> float:
    r"""Estimated relative error of a weighted pseudoinverse of a Gram matrix.

    Each direction's coefficient :math:`\phi_i/\sigma_i^2` carries a relative
    error up to :math:`\eta/\sigma_i^2` (:func:`eigh_error`), which counts with
    its weight :math:`\phi_i \in [0, 1]`: the estimate is
    :math:`\eta\max_i\phi_i/\sigma_i^2`.  With weights that are :math:`C^1`
    in :math:`\sigma` (the band filter's), nothing jumps at a threshold, so the
    turn of an eigenspace between close :math:`\sigma` changes the result only
    by a term of the same order (no gap term, unlike :func:`eigh_error`).
    """
    live = phi > 0
    if not bool(live.any()):
        return 0.0
    worst = float((phi[live] / s[live] ** 2).max())
    return eigenvalue_rounding(s) * worst


@dataclass
class ReferenceFactor:
    r"""The Cholesky factor of :math:`A = (1-\lambda)1 + \lambda G` at a reference point.

    Kept by :class:`NTKRoute` from the last point where it factored, to precondition
    conjugate gradients at nearby points (:meth:`NTKRoute.reuse_solve`).

    Attributes
    ----------
    chol : Tensor, shape=[n, n]
        Lower Cholesky factor of :math:`A(\theta_{\rm ref})`.
    lam : float
    output_side : bool
        :math:`G = DD^\top` (``n = QN``) when true, else :math:`D^\top D` (``n = K``).
    lam_max : float
        An upper bound of :math:`\lambda_{\max}(A(\theta_{\rm ref}))`:
        :math:`(1-\lambda) + \lambda\min(\|G\|_\infty, \|G\|_F)` (both norms bound
        the spectral norm of a symmetric matrix from above).
    """

    chol: Tensor
    lam: float
    output_side: bool
    lam_max: float

    @classmethod
    def at(cls, state: PointState, lam: float, chol: Tensor) -> ReferenceFactor:
        """The reference made of ``chol``, the factor at ``state`` (its Gram matrix is cached)."""
        gram = state.gram()
        norm = min(float(gram.abs().sum(1).max()), float(torch.linalg.matrix_norm(gram)))
        return cls(chol, lam, state.output_is_smaller, (1.0 - lam) + lam * norm)

    def matches(self, state: PointState, lam: float) -> bool:
        r"""Same :math:`\lambda`, side, size, dtype and device as the system at ``state``."""
        return (
            self.lam == lam
            and self.output_side == state.output_is_smaller
            and self.chol.shape[0] == state.gram_dim
            and self.chol.dtype == state.theta.dtype
            and self.chol.device == state.theta.device
        )

    def precondition(self, r: Tensor) -> Tensor:
        r""":math:`A(\theta_{\rm ref})^{-1}r` (:func:`~subriemann.triangular.cholesky_solve`)."""
        return cholesky_solve(self.chol, r)


class NTKRoute(SolverRoute):
    r"""Push-through in the smaller space (Cholesky / eigendecomposition of the Gram matrix).

    Parameters
    ----------
    accuracy : float
        Relative accuracy of the :math:`\lambda = 1` direction against the SVD
        route, and of the preconditioned solves for :math:`\lambda < 1` (default
        :data:`~subriemann.linalg.ACCURACY`).
    reuse_min_dim, reuse_max_dim : int
        The window of Gram dimensions :math:`n = \min(QN, K)` in which ``solve``
        reuses a nearby point's Cholesky factor for :math:`\lambda < 1`
        (:data:`REUSE_MIN_DIM`, :data:`REUSE_MAX_DIM`); outside it every point is
        factored (or solved by the engine) as without reuse.
    reuse_maxiter : int
        PCG iterations allowed before the route factors afresh (:data:`REUSE_MAXITER`).

    Attributes
    ----------
    reference : ReferenceFactor or None
        The factor from the last point where ``solve`` factored (reuse window only).

    Notes
    -----
    Cost: the Gram matrix (:math:`QN^2K`, or the structured NTK engine without
    :math:`D`), then :math:`QN^3/3` (Cholesky) or :math:`\approx 9QN^3` (eigh);
    memory :math:`QN^2`.  Accuracy :math:`\epsilon\kappa(A)` for
    :math:`\lambda < 1`, :math:`A = (1-\lambda)1+\lambda DD^\top`; at
    :math:`\lambda = 1` the guarantee of the module docstring.  For :math:`K < QN`
    ``sharp`` and ``project`` use the SVD.

    **Reuse across nearby points** (``solve``, :math:`\lambda < 1`,
    :math:`n` in the window, a plain :math:`\theta`).  A flow evaluates the
    gradient at many nearby points, and at each the Gram matrix :math:`G` costs far
    more than a product with it.  At a point without its own factor the route solves
    :math:`A(\theta)z = b`, :math:`A = (1-\lambda)1 + \lambda G`, by conjugate
    gradients (:func:`~subriemann.linalg.pcg`; a product is one JVP and one VJP,
    :meth:`~subriemann.linalg.PointState.shifted_gram_vec`) preconditioned by
    :math:`A(\theta_{\rm ref})^{-1}` (two triangular solves with the
    :class:`ReferenceFactor`).  The answer is certified a posteriori: with the
    true residual :math:`r = b - Az`, :math:`\|z - z^*\| = \|A^{-1}r\| \le
    \|r\|/(1-\lambda)` because :math:`\lambda_{\min}(A) \ge 1-\lambda`; on the
    output side the answer is :math:`v = D^\top z` and
    :math:`\|D^\top A^{-1}\| = \max_\sigma\sigma/((1-\lambda)+\lambda\sigma^2) \le
    1/(2\sqrt{\lambda(1-\lambda)})`.  So with :math:`\eta = \|r\|/(c\|v\|)`,
    :math:`c = 1-\lambda` or :math:`2\sqrt{\lambda(1-\lambda)}`, the relative error
    is at most :math:`\eta/(1-\eta)`, up to the rounding of the computed residual
    (:math:`\approx\epsilon\kappa(A)`, below the target; this implies the classical
    :math:`\kappa(A)\,\|r\|/\|b\|`, and needs no bound of
    :math:`\lambda_{\max}` at the new point).  The target is
    :math:`\max(\mathrm{accuracy}, 10\,\epsilon\hat\kappa)`,
    :math:`\hat\kappa = 2\hat\lambda_{\max}/(1-\lambda)` from the reference's
    bound :math:`\hat\lambda_{\max}` (the :math:`\epsilon\kappa(A)` that a
    Cholesky solve at the point itself is accurate to; in float64 it is
    ``accuracy``; the factor 2 is room for the drift of :math:`G` between nearby
    points).  CG stops at the residual that meets the target if :math:`\|v\|` is
    at least half its value at the reference (:meth:`pcg_rtol`); the certificate
    relies on neither estimate.  Where that estimate was too large and the answer
    misses the target, PCG continues on the defect :math:`b - Az` with a tolerance
    tightened by the factor missed (at most :data:`REUSE_RESTARTS` times).  An answer
    that the certificate does not accept within ``reuse_maxiter`` iterations in all
    is dropped: the point is factored (the path without reuse) and its factor becomes
    the reference.  Two rules keep the reference near the flow: a point is factored
    without trying PCG when the last PCG solve took more than :data:`REUSE_REFRESH`
    of the cap (the count grows with the distance from the reference), and the last
    point solved by PCG becomes the reference once its Gram matrix is formed (the
    rank monitor forms it at the accepted points it looks at), for one Cholesky
    factorization (:meth:`adopt_formed_gram`).  None of these choices changes the
    certificate, and they read iteration counts, never timings; a resumed flow starts
    without a reference, so its answers differ from the uninterrupted run's within
    the certified bound.  ``SolverInfo`` says which:
    ``solver="ntk+pcg"`` with the iterations, ``residual`` the certified error
    bound and ``cond`` the Ritz estimate of :math:`\kappa(P^{-1}A)`; or
    ``solver="ntk"`` with ``"new reference factor"`` in its ``reason``.  A second
    solve at a point that has its factor uses it, as without reuse.  In the reuse
    window the factor of :math:`D^\top D` is always a Cholesky factor of the Gram
    matrix (never the engine's factor-free solve), since it must be kept.
    """

    name = "ntk"
    tags = frozenset({"gram", "exact_cut"})
    factorization = "ntk"

    def __init__(
        self,
        accuracy: float = ACCURACY,
        *,
        reuse_min_dim: int = REUSE_MIN_DIM,
        reuse_max_dim: int = REUSE_MAX_DIM,
        reuse_maxiter: int = REUSE_MAXITER,
    ) -> None:
        self.accuracy = check_real(accuracy, "accuracy", **OPEN_UNIT)
        self.reuse_min_dim = check_int(reuse_min_dim, "reuse_min_dim", low=1)
        self.reuse_max_dim = check_int(reuse_max_dim, "reuse_max_dim", low=1)
        self.reuse_maxiter = check_int(reuse_maxiter, "reuse_maxiter", low=1)
        self.reference: ReferenceFactor | None = None
        self.last_iterations = 0
        self.last_pcg_state: PointState | None = None

    def description(self) -> dict[str, object]:
        """The name, ``accuracy``, and the reuse options that differ from their defaults."""
        out: dict[str, object] = {"solver": self.name, "accuracy": self.accuracy}
        reuse = {
            "reuse_min_dim": (self.reuse_min_dim, REUSE_MIN_DIM),
            "reuse_max_dim": (self.reuse_max_dim, REUSE_MAX_DIM),
            "reuse_maxiter": (self.reuse_maxiter, REUSE_MAXITER),
        }
        out.update({k: v for k, (v, default) in reuse.items() if v != default})
        return out

    def prepare(self, state: PointState) -> None:
        """Form the NTK first: the structured engine gives :math:`x[\\theta]` in the same pass."""
        if state.output_is_smaller:
            state.ntk  # noqa: B018

    def spectrum(self, state: PointState, lam: float) -> Tensor:
        r"""At :math:`\lambda = 1` with :math:`K < QN` the solve takes the eigendecomposition
        of :math:`D^\top D` (:meth:`eigh_pseudoinverse`): its eigenvalues, so that a monitored
        point costs one ``eigh`` and not an ``eigvalsh`` besides; else :meth:`singular_values`."""
        if lam == 1.0 and not state.output_is_smaller:
            return state.gram_eigh()[1]
        return self.singular_values(state)

    def checked_tau(self, state: PointState, threshold: Threshold, s: Tensor) -> float:
        r""":math:`\tau`, with a warning (once) when it is below what the Gram matrix resolves."""
        tau = self.tau(state, threshold)
        smax = float(s[0]) if s.numel() else 0.0
        if smax > 0 and tau < 10.0 * math.sqrt(_EPS64) * smax:
            warn_once(
                f"the rank threshold tau = {tau:.3g} is below what the 'ntk' route resolves "
                f"(about 1e-7 * sigma_max = {1e-7 * smax:.3g}): eigenvalues of D D^T carry an "
                "error of eps * sigma_max^2. Raise rank_rtol or use solver='svd'."
            )
        return tau

    # -- g_lam^+ D^T u ---------------------------------------------------------------
    def solve(
        self, state: PointState, rhs: Tensor, lam: float, threshold: Threshold
    ) -> tuple[Tensor, SolverInfo]:
        if lam < 1.0 and self.reuses(state):
            return self.reuse_solve(state, rhs, lam)
        if lam < 1.0:  # SPD with kappa <= 1 + lam sigma_max^2 / (1 - lam): Cholesky
            info = SolverInfo.direct("ntk", "Cholesky of (1 - lam) 1 + lam G")
            if state.output_is_smaller:
                z = cholesky_solve(state.cholesky(lam), rhs)
                return state.vjp(z), info
            first = not state.has(("param_chol", lam)) and not state.has(("engine_solve", lam))
            if first and state.solves_param_gram():
                # ((1-lam) 1 + lam D^T D) x = b  <=>  (D^T D + mu 1) x = b / lam, mu = (1-lam)/lam:
                # the engine eliminates its output layer, never forming D (docs/scale.md).  A
                # second solve at this point (the band filter asks one per direction) reuses
                # one Cholesky factor of the Gram matrix from the factors instead.
                state.store(("engine_solve", lam), True)
                mu = (1.0 - lam) / lam
                keep = getattr(state.space.backend, "factors", None)
                if keep is not None:  # the solve forms them: D^T u from them, not a new pass
                    keep(state.theta)
                b = state.vjp(rhs) / lam
                return state.space.backend.solve_param_gram(state.theta, b, mu), info
            chol = state.param_cholesky(lam)
            return cholesky_solve(chol, state.vjp(rhs)), info
        if state.output_is_smaller:
            # a certified Cholesky factor only where it proves every sigma > tau, so that
            # (D D^T)^+ = (D D^T)^{-1}; otherwise the thresholded eigendecomposition.
            # The accuracy certificate first: it usually implies the rank certificate
            # (eta / accuracy >= 2 tau^2), which then costs no second factorization.
            state.gram_exceeds(self.accuracy_shift(state))
            cert = state.certified_cholesky(threshold.rank_atol, threshold.rank_rtol)
            if cert is not None:
                return self.cholesky_pseudoinverse(state, rhs, cert, threshold)
        return self.eigh_pseudoinverse(state, rhs, threshold)

    # -- lam < 1: a nearby point's factor as the preconditioner ---------------------
    @staticmethod
    def pcg_rtol(
        b: Tensor, lam: float, ref: ReferenceFactor, target: float, c: float, kappa: float
    ) -> float:
        r"""Where PCG stops: :math:`\|r\| \le \mathrm{target}\,c\,|\tilde v|\,/\,2`.

        The certificate needs :math:`\|r\| \le \mathrm{target}\cdot c\,\|v\|`; the size
        of the answer is estimated at the reference, :math:`\tilde z = A_{\rm ref}^{-1}b`
        (two triangular solves), :math:`|\tilde v| = |\tilde z|`, or on the output side
        :math:`|D_{\rm ref}^\top\tilde z|^2 = (\tilde z^\top b - (1-\lambda)|\tilde z|^2)/\lambda`;
        the factor 1/2 is room for the drift of :math:`|v|`.  Without an estimate,
        :math:`\mathrm{target}/(2\hat\kappa)`.
        """
        zt, bnorm = ref.precondition(b), float(b.norm())
        if ref.output_side:
            est = math.sqrt(max((float(zt @ b) - (1.0 - lam) * float(zt @ zt)) / lam, 0.0))
        else:
            est = float(zt.norm())
        if est > 0.0 and bnorm > 0.0:
            return min(0.5 * target * c * est / bnorm, 0.5)
        return 0.5 * target / kappa

    def reuses(self, state: PointState) -> bool:
        r"""Whether ``solve`` (:math:`\lambda < 1`) takes the reuse path at ``state``.

        :math:`n = \min(QN, K)` within ``[reuse_min_dim, reuse_max_dim]`` and a plain
        :math:`\theta` (not a batched or traced one).
        """
        return self.reuse_min_dim <= state.gram_dim <= self.reuse_max_dim and plain_tensor(
            state.theta
        )

    def reuse_solve(self, state: PointState, rhs: Tensor, lam: float) -> tuple[Tensor, SolverInfo]:
        r""":math:`g_\lambda^{-1}D^\top u`, by PCG with the reference factor where it certifies.

        See the class notes.  Otherwise, and at a point that has its factor, the
        Cholesky solve at the point; a factor made here becomes the reference.
        """
        fresh = not state.has_shifted_cholesky(lam)
        self.adopt_formed_gram(lam)
        ref, note = self.reference, ""
        if fresh and ref is not None and ref.matches(state, lam):
            if self.last_iterations > REUSE_REFRESH * self.reuse_maxiter:
                note = (
                    f" (the last PCG took {self.last_iterations} of {self.reuse_maxiter} "
                    "iterations)"
                )
            else:
                out, info = self.pcg_solve(state, rhs, lam, ref)
                self.last_iterations = info.iterations if info.converged else 0
                if info.converged:
                    self.last_pcg_state = state
                    return out, info
                note = (
                    f" (PCG with the previous reference: error bound {info.residual:.2g} > "
                    f"{info.rtol:.2g} after {info.iterations} iterations)"
                )
        self.last_iterations, self.last_pcg_state = 0, None
        chol = state.shifted_cholesky(lam)
        if fresh:
            self.reference = ReferenceFactor.at(state, lam, chol)
            note = "; new reference factor" + note
        small = state.output_is_smaller
        z = cholesky_solve(chol, rhs if small else state.vjp(rhs))
        out = state.vjp(z) if small else z
        return out, SolverInfo.direct("ntk", "Cholesky of (1 - lam) 1 + lam G" + note)

    def adopt_formed_gram(self, lam: float) -> None:
        r"""Make the last point solved by PCG the reference if its Gram matrix has been formed
        since (by the rank monitor, :meth:`~subriemann.linalg.PointState.gram_singular_values`):
        a Cholesky factorization (:math:`n^3/3`) then buys a reference at an accepted point of
        the flow, without the Gram matrix (:math:`QN\,n^2`) that a refactorization costs."""
        st = self.last_pcg_state
        if st is None or self.reference is None or not st.has_gram():
            return
        if self.reference.matches(st, lam):
            self.reference = ReferenceFactor.at(st, lam, st.shifted_cholesky(lam))
            self.last_iterations, self.last_pcg_state = 0, None

    def pcg_solve(
        self, state: PointState, rhs: Tensor, lam: float, ref: ReferenceFactor
    ) -> tuple[Tensor, SolverInfo]:
        r"""PCG on :math:`A(\theta)z = b` preconditioned by ``ref``, with its error certified.

        Returns the answer and a :class:`~subriemann.linalg.SolverInfo` whose
        ``residual`` is the certified bound of the relative error (class notes),
        ``rtol`` the target and ``converged`` whether the bound meets it.
        """
        small = state.output_is_smaller
        b = rhs if small else state.vjp(rhs)
        kappa = 2.0 * ref.lam_max / (1.0 - lam)  # room 2 for the drift from the reference
        target = max(self.accuracy, 10.0 * float(torch.finfo(b.dtype).eps) * kappa)
        # |v - v*| <= |r| / c: c = lambda_min(A) >= 1 - lam, or 1 / |D^T A^-1| on the output side
        c = 2.0 * math.sqrt(lam * (1.0 - lam)) if small else 1.0 - lam
        bnorm = float(b.norm())
        rtol = self.pcg_rtol(b, lam, ref, target, c, kappa)
        z, r, used, cond = torch.zeros_like(b), b, 0, float("nan")
        for _ in range(REUSE_RESTARTS + 1):
            rnorm = float(r.norm())
            dz, info = pcg(
                lambda w: state.shifted_gram_vec(lam, w), r, ref.precondition,
                rtol=min(rtol * bnorm / rnorm, 0.5) if rnorm > 0.0 else 0.5,
                maxiter=self.reuse_maxiter - used,
            )  # fmt: skip
            z, used, cond = z + dz, used + info.iterations, info.cond
            res = info.residual * rnorm
            v, bound = self._certified(state, z, res, c, small)
            if bound <= target or used >= self.reuse_maxiter or not math.isfinite(bound):
                break
            # the stop was set from |v| at the reference; |v| here is smaller: correct the
            # defect b - A z with a tighter tolerance (one more product for the residual)
            rtol *= 0.5 * target / bound
            r = b - state.shifted_gram_vec(lam, z)
        reason = (
            "PCG preconditioned by the Cholesky factor at a nearby point: relative residual "
            f"{res / bnorm if bnorm > 0 else 0.0:.2g}, relative error <= {bound:.2g}"
        )
        return v, SolverInfo(
            "ntk+pcg", used, bound, bound <= target, target, self.reuse_maxiter, cond, reason,
        )  # fmt: skip

    @staticmethod
    def _certified(
        state: PointState, z: Tensor, res: float, c: float, small: bool
    ) -> tuple[Tensor, float]:
        r"""The answer ``v`` made from ``z`` and its certified relative error
        :math:`\eta/(1-\eta)`, :math:`\eta = \|r\|/(c|v|)` (``res`` the true residual norm)."""
        v = state.vjp(z) if small else z
        abs_err, vnorm = res / c, float(v.norm())
        eta = abs_err / vnorm if vnorm > 0.0 else (0.0 if abs_err == 0.0 else math.inf)
        finite = math.isfinite(vnorm) and math.isfinite(abs_err)
        return v, (eta / (1.0 - eta) if finite and eta < 1.0 else math.inf)

    def accuracy_shift(self, state: PointState) -> float:
        r""":math:`\eta/\mathrm{accuracy}`: above it, :math:`\lambda_{\min}(DD^\top)` makes
        the push-through solution accurate without refinement."""
        return state.memo(
            ("accuracy_shift", self.accuracy), lambda: gram_rounding(state.ntk) / self.accuracy
        )

    def cholesky_pseudoinverse(
        self, state: PointState, u: Tensor, chol: Tensor, threshold: Threshold
    ) -> tuple[Tensor, SolverInfo]:
        r""":math:`D^+u = D^\top(DD^\top)^{-1}u` with ``accuracy`` met or announced.

        The relative error of the push-through solution is at most
        :math:`\eta/\lambda_{\min}(DD^\top)` (:func:`~subriemann.linalg.gram_rounding`).
        If :math:`\lambda_{\min} > \eta/\mathrm{accuracy}` is certified (one shifted
        Cholesky factorization), that is all; otherwise iterative refinement
        (:func:`refine_push_through`), and if that does not reach the accuracy,
        the SVD (:meth:`accuracy_fallback`).
        """

        def solve(z: Tensor) -> Tensor:
            return cholesky_solve(chol, z)

        v = state.vjp(solve(u))
        if state.gram_exceeds(self.accuracy_shift(state)):
            return v, SolverInfo(
                "ntk", 0, self.accuracy, True, self.accuracy,
                reason="accuracy certified a priori (lambda_min(D D^T) > eta / accuracy)",
            )
        v, info = refine_push_through(state.jvp, state.vjp, solve, u, v, self.accuracy)
        info.solver = "ntk"
        if info.converged:
            info.reason = f"iterative refinement, {info.iterations} step(s)"
            return v, info
        return self.accuracy_fallback(
            state, u, v, info.residual, "iterative refinement", threshold
        )

    def weighted_solve(
        self, state: PointState, rhs: Tensor, weights: Callable[[Tensor], Tensor],
        threshold: Threshold,
    ) -> tuple[Tensor, SolverInfo]:
        """From the eigendecomposition of the smaller Gram matrix (:meth:`eigh_pseudoinverse`)."""
        return self.eigh_pseudoinverse(state, rhs, threshold, weights)

    def eigh_pseudoinverse(
        self, state: PointState, u: Tensor, threshold: Threshold,
        weights: Callable[[Tensor], Tensor] | None = None,
    ) -> tuple[Tensor, SolverInfo]:
        r"""Thresholded pseudoinverse of the smaller Gram matrix, with ``accuracy`` checked.

        With ``weights`` :math:`\phi`, the kept direction :math:`i` counts
        :math:`\phi(\sigma_i)` times (:meth:`weighted_solve`).  The error estimate is
        :func:`eigh_error` (:func:`weighted_eigh_error` with weights); above
        ``accuracy`` the SVD takes over (:meth:`accuracy_fallback`).
        """
        w, s = state.gram_eigh()
        keep = s > self.checked_tau(state, threshold, s)
        small = state.output_is_smaller
        rhs = u if small else state.vjp(u)
        # phi = 1 on the kept directions without weights (a product by 1 is exact)
        phi = keep.to(s.dtype) if weights is None else torch.where(keep, weights(s), 0.0)
        live = phi > 0
        coef = torch.where(live, phi * (w.T @ rhs) / torch.where(live, s**2, 1.0), 0.0)
        est = eigh_error(s, keep) if weights is None else weighted_eigh_error(s, phi)
        v = state.vjp(w @ coef) if small else w @ coef
        how = "thresholded eigendecomposition" + ("" if weights is None else ", spectral weights")
        if est <= self.accuracy:
            return v, SolverInfo("ntk", 0, est, True, self.accuracy, reason=how)
        return self.accuracy_fallback(state, u, v, est, how, threshold, weights)

    def accuracy_fallback(
        self, state: PointState, u: Tensor, v: Tensor, est: float, how: str,
        threshold: Threshold, weights: Callable[[Tensor], Tensor] | None = None,
    ) -> tuple[Tensor, SolverInfo]:
        r"""SVD if :math:`QN\cdot K \le` :data:`SVD_FALLBACK_LIMIT` (with the spectral
        ``weights``, if any); else ``v``, warned."""
        size = state.space.output_dim * state.space.dim
        note = (
            f"{how}: estimated relative error up to {error_decade(est)} > accuracy "
            f"{self.accuracy:.2g}"
        )
        if size <= SVD_FALLBACK_LIMIT:
            state.svd  # noqa: B018  (the threshold then reads the same factorization)
            info = SolverInfo(
                "svd", 0, 0.0, True, self.accuracy, reason=f"fallback to the SVD ({note})"
            )
            return svd_solve(state, u, 1.0, self.tau(state, threshold), weights), info
        warnings.warn(
            f"the 'ntk' route cannot certify the accuracy {self.accuracy:.2g} of the lam = 1 "
            f"direction here ({note}; D is too large for the SVD fallback, QN*K = "
            f"{size} > {SVD_FALLBACK_LIMIT}): raise rank_rtol, or use solver='matrix_free'",
            AccuracyWarning,
            stacklevel=5,
        )
        return v, SolverInfo("ntk", 0, est, False, self.accuracy, reason=note)

    # -- sharp, projection -----------------------------------------------------------
    def _gram_coefficients(
        self, state: PointState, a: Tensor, threshold: Threshold, power: Callable[[Tensor], Tensor]
    ) -> Tensor:
        r""":math:`D^\top U\,\mathrm{diag}(1/f(\sigma_i))\,U^\top Da` over :math:`\sigma_i > \tau`
        (:math:`QN \le K`), with :math:`f` = ``power``."""
        uu, s = state.gram_eigh()
        keep = s > self.checked_tau(state, threshold, s)
        coef = torch.where(keep, (uu.T @ state.jvp(a)) / torch.where(keep, power(s), 1.0), 0.0)
        return state.vjp(uu @ coef)

    def sharp(
        self, state: PointState, xi: Tensor, lam: float, threshold: Threshold
    ) -> tuple[Tensor, SolverInfo]:
        r"""Woodbury for :math:`\lambda < 1`,
        :math:`(1-\lambda)^{-1}[\xi - \lambda D^\top((1-\lambda)1+\lambda DD^\top)^{-1}D\xi]`;
        :math:`(D^\top D)^+ = D^\top U\Sigma^{-4}U^\top D` at :math:`\lambda = 1`
        (:math:`QN \le K`; the SVD otherwise)."""
        if not state.output_is_smaller:
            state.svd  # noqa: B018
            out = svd_sharp(state, xi, lam, self.tau(state, threshold), restrict=False)
            return out, SolverInfo.direct("svd", "thin SVD (ntk route, K < QN)")
        if lam < 1.0:
            w = cholesky_solve(state.cholesky(lam), state.jvp(xi))
            out = (xi - lam * state.vjp(w)) / (1.0 - lam)
            return out, SolverInfo.direct("ntk", "Woodbury, Cholesky of (1 - lam) 1 + lam D D^T")
        out = self._gram_coefficients(state, xi, threshold, lambda s: s**4)
        return out, SolverInfo.direct("ntk", "thresholded eigendecomposition of D D^T")

    def project(
        self, state: PointState, a: Tensor, threshold: Threshold
    ) -> tuple[Tensor, SolverInfo]:
        if not state.output_is_smaller:
            state.svd  # noqa: B018
            out = svd_project(state, a, self.tau(state, threshold))
            return out, SolverInfo.direct("svd", "thin SVD (ntk route, K < QN)")
        out = self._gram_coefficients(state, a, threshold, lambda s: s**2)
        return out, SolverInfo.direct("ntk", "thresholded eigendecomposition of D D^T")

    def restricted_sharp(
        self, state: PointState, xi: Tensor, lam: float, threshold: Threshold
    ) -> tuple[Tensor, SolverInfo]:
        if not state.output_is_smaller:
            state.svd  # noqa: B018
            out = svd_sharp(state, xi, lam, self.tau(state, threshold), restrict=True)
            return out, SolverInfo.direct("svd", "thin SVD (ntk route, K < QN)")
        # xi = D^T w + xi_perp; only D^T w counts: w = (DD^T)^+ D xi
        out = self._gram_coefficients(
            state, xi, threshold, lambda s: s**2 * ((1.0 - lam) + lam * s**2)
        )
        return out, SolverInfo.direct("ntk", "thresholded eigendecomposition of D D^T")
