r"""The built-in metrics of docs/theory.md §2.

* Euclidean, :math:`1_K`: :class:`EuclideanMetric`;
* output pullback, :math:`D^\top D`: :class:`OutputPullbackMetric`;
* interpolated, :math:`g_\lambda = (1-\lambda)1 + \lambda D^\top D`: :class:`InterpolatedMetric`;
* sub-Riemannian bundle, :math:`g_\lambda` restricted to :math:`\operatorname{ran}D^\top`:
  :class:`BundleMetric`.

All of them have the gradient :math:`V_\lambda = g_\lambda^+ D^\top\nabla_x C`
(the flow is :math:`\partial_s\theta = -V_\lambda`), with spectral form

.. math:: V_\lambda = \sum_{\sigma_i > \tau} \frac{\sigma_i}{(1-\lambda) + \lambda\sigma_i^2}
          \langle u_i, \nabla_x C\rangle\, v_i .
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import torch
from torch import Tensor

from subriemann._geomstats import default_dtype, import_geomstats
from subriemann._warnings import warn_once
from subriemann.integrators import TABLEAUS, fixed_steps
from subriemann.linalg.dense import (
    ACCURACY,
    SVD_FALLBACK_LIMIT,
    AccuracyWarning,
    SolverInfo,
    _rounding,
    cg,
    check_converged,
    choose_solver,
    interp_weights,
    lsmr,
)
from subriemann.metrics.base import ParameterMetric
from subriemann.vectorization import map_points

__all__ = ["EuclideanMetric", "InterpolatedMetric", "OutputPullbackMetric", "BundleMetric"]

_EPS64 = float(torch.finfo(torch.float64).eps)


def check_lam(lam: Any) -> float:
    r"""Validate :math:`\lambda \in [0, 1]` and return it as a float.

    Raises
    ------
    TypeError
        If ``lam`` is not a real number (a bool, a string, a tensor with more
        than one element, ...).
    ValueError
        If ``lam`` is NaN or outside :math:`[0, 1]`.
    """
    if isinstance(lam, bool) or isinstance(lam, (str, bytes)):
        raise TypeError(f"lam must be a real number in [0, 1], got {type(lam).__name__}")
    if isinstance(lam, Tensor):
        if lam.numel() != 1 or lam.is_complex() or lam.dtype == torch.bool:
            raise TypeError(
                f"lam must be a real scalar in [0, 1], got a tensor of shape {tuple(lam.shape)}"
            )
        lam = float(lam)
    elif not isinstance(lam, numbers.Real):
        raise TypeError(f"lam must be a real number in [0, 1], got {type(lam).__name__}")
    lam = float(lam)
    if math.isnan(lam):
        raise ValueError("lam must lie in [0, 1], got NaN")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must lie in [0, 1], got {lam}")
    return lam


def _second_derivative(space, theta: Tensor, v: Tensor) -> Tensor:
    r""":math:`\partial^2 x[v, v] = \frac{d^2}{dt^2} x(\theta + t v)|_{t=0}` (two nested JVPs)."""
    return torch.func.jvp(lambda t: space.backend.jvp(t, v), (theta,), (v,))[1]


class EuclideanMetric(ParameterMetric):
    r"""The Euclidean metric :math:`1_K`: ordinary gradient flow.

    :math:`\operatorname{grad} C = D^\top\nabla_x C`; its output-space velocity
    is :math:`-DD^\top\nabla_x C` (the NTK, [CM24] (2.17)).  This is
    :class:`InterpolatedMetric` at :math:`\lambda = 0`, implemented without
    any solve.  Geodesics are straight lines.
    """

    lam = 0.0

    @property
    def field_may_jump(self) -> bool:
        """``False``: the gradient :math:`D^\\top\\nabla_x C` does not depend on :math:`\\tau`."""
        return False

    def metric_matrix(self, base_point: Tensor) -> Tensor:
        self._require_small_k("metric_matrix")
        eye = torch.eye(self._space.dim, dtype=base_point.dtype, device=base_point.device)
        return eye.expand(*base_point.shape[:-1], *eye.shape).clone()

    def metric_vec(self, tangent_vec: Tensor, base_point: Tensor) -> Tensor:
        return self._check_tangent(tangent_vec).clone()

    def inner_product(self, tangent_vec_a, tangent_vec_b, base_point=None):
        a = self._check_tangent(tangent_vec_a, "tangent_vec_a")
        b = self._check_tangent(tangent_vec_b, "tangent_vec_b")
        return (a * b).sum(-1)

    def sharp(self, cotangent_vec: Tensor, base_point: Tensor) -> Tensor:
        return self._check_tangent(cotangent_vec, "cotangent_vec").clone()

    def sharp_pullback(self, output_covec: Tensor, base_point: Tensor) -> Tensor:
        u = self._space._check_vec(output_covec, self._space.output_dim, "output_covec")
        return self.state(base_point).vjp(u)

    def gradient(self, base_point: Tensor) -> Tensor:
        return self.state(base_point).cost_grad

    def distribution(self, base_point: Tensor) -> Tensor:
        self._require_small_k("distribution")
        return torch.eye(self._space.dim, dtype=self._space.dtype, device=self._space.device)

    def christoffels(self, base_point: Tensor) -> Tensor:
        k = self._space.dim
        return torch.zeros(*base_point.shape[:-1], k, k, k, dtype=base_point.dtype)

    def geodesic_equation(self, state: Tensor) -> Tensor:
        return torch.stack([state[..., 1, :], torch.zeros_like(state[..., 1, :])], dim=-2)

    def exp(self, tangent_vec: Tensor, base_point: Tensor) -> Tensor:
        """:math:`\\theta + v`: geodesics of the Euclidean metric are straight lines."""
        return base_point + tangent_vec


class InterpolatedMetric(ParameterMetric):
    r"""The family :math:`g_\lambda = (1-\lambda)1 + \lambda D^\top D`, :math:`\lambda\in[0,1]`.

    :math:`\lambda = 0` is the Euclidean metric and :math:`\lambda = 1` the
    output pullback :math:`D^\top D`, both reproduced *exactly*: at
    :math:`\lambda = 1` the gradient is the pseudoinverse
    :math:`D^+\nabla_x C` with the explicit threshold :math:`\tau` (never
    :math:`1 - \varepsilon`).

    Parameters
    ----------
    space : ParameterSpace
    lam : float
        :math:`\lambda \in [0, 1]`.
    solver : {"auto", "svd", "ntk", "lstsq", "matrix_free", "nystrom"}
        How ``sharp`` solves (see :mod:`subriemann.linalg` and ``docs/metrics.md``).
    rank_rtol, rank_atol, exp_steps
        See :class:`~subriemann.metrics.ParameterMetric`.
    maxiter : int, optional
        Fixed iteration limit of the matrix-free solvers (default: scaled
        with the conditioning, see :func:`subriemann.linalg.cg` and
        :func:`subriemann.linalg.lsmr`).
    solver_rtol : float
        Tolerance of the matrix-free solvers.
    accuracy : float
        Relative accuracy of the :math:`\lambda = 1` direction :math:`D^+u` against
        the SVD route (default :data:`~subriemann.linalg.ACCURACY`, :math:`10^{-8}`).
        The ``"ntk"`` route certifies it a priori, reaches it by iterative
        refinement, or falls back to the SVD; ``"matrix_free"`` (and
        ``"nystrom"``, whose :math:`\lambda = 1` route is the same LSMR) estimates its
        error; where it cannot be met, an
        :class:`~subriemann.linalg.AccuracyWarning` gives the estimated error.
        ``metric.last_solve`` records what was done.

    Notes
    -----
    The geodesic equation is :math:`\ddot\theta = -\lambda\, g_\lambda^{-1}D^\top\,
    \partial^2x[\dot\theta,\dot\theta]`, since the Christoffel symbols of the
    first kind of :math:`(1-\lambda)1+\lambda D^\top D` are
    :math:`\Gamma_{l,ij} = \lambda\sum_a D_{al}\,\partial_i\partial_j x_a`;
    ``exp`` integrates it with RK4 (geomstats' ``ExpODESolver``), each step
    costing two nested JVPs and one ``sharp``.  It is a Riemannian geodesic
    for :math:`\lambda<1`, and at :math:`\lambda=1` only where
    :math:`\operatorname{rank}D = K`; use :class:`BundleMetric` otherwise.

    Examples
    --------
    >>> import torch, subriemann as sr
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    >>> space = sr.ParameterSpace(net, torch.randn(6, 2), torch.randn(6, 1))
    >>> space = space.equip_with_metric(sr.metrics.InterpolatedMetric, lam=1.0)
    >>> theta = space.initial_point()
    >>> v = space.metric.gradient(theta)
    >>> # the adapted flow moves outputs along -(x - y):  D V_1 = P (x - y)
    >>> torch.allclose(space.jvp(theta, v), space.outputs(theta) - space.y, atol=1e-9)
    True
    """

    def __init__(
        self,
        space,
        lam: float = 0.5,
        *,
        solver: str = "auto",
        rank_rtol: float = 1e-6,
        rank_atol: float | None = None,
        exp_steps: int = 50,
        maxiter: int | None = None,
        solver_rtol: float = 1e-12,
        accuracy: float = ACCURACY,
    ) -> None:
        super().__init__(space, rank_rtol=rank_rtol, rank_atol=rank_atol, exp_steps=exp_steps)
        if not (isinstance(accuracy, (int, float)) and 0.0 < accuracy < 1.0):
            raise ValueError(f"accuracy must be a number in (0, 1), got {accuracy!r}")
        self.accuracy = float(accuracy)
        self.lam = check_lam(lam)
        self.solver_name = solver
        self.solver = choose_solver(space, solver)
        if maxiter is not None and (
            isinstance(maxiter, bool) or not isinstance(maxiter, int) or maxiter < 1
        ):
            raise ValueError(f"maxiter must be a positive integer or None, got {maxiter!r}")
        if not (isinstance(solver_rtol, (int, float)) and 0.0 < solver_rtol < 1.0):
            raise ValueError(f"solver_rtol must be a number in (0, 1), got {solver_rtol!r}")
        self.maxiter = maxiter
        self.solver_rtol = float(solver_rtol)
        self.last_solve: SolverInfo | None = None

    #: at lam = 0 the metric is the Euclidean one (not so for the bundle metric,
    #: which also drops the directions with sigma <= tau)
    _lam0_is_euclidean = True

    def description(self) -> dict[str, Any]:
        d = super().description()
        d.update(lam=self.lam, solver=self.solver)
        return d

    def _factorization(self) -> str:
        return "svd" if self.solver in ("svd", "lstsq") else "ntk"

    @property
    def field_may_jump(self) -> bool:
        r"""Only at :math:`\lambda = 1`: for :math:`\lambda < 1` every direction is kept
        (weights :math:`\sigma_i/((1-\lambda)+\lambda\sigma_i^2)`, continuous in :math:`D`)."""
        return self.lam == 1.0

    @property
    def _small_is_output(self) -> bool:
        return self._space.output_dim <= self._space.dim

    # -- the tensor ----------------------------------------------------------------
    def metric_matrix(self, base_point: Tensor) -> Tensor:
        r""":math:`(1-\lambda)1 + \lambda D^\top D`, shape ``[..., K, K]``."""
        self._require_small_k("metric_matrix")
        lam = self.lam

        def one(p: Tensor) -> Tensor:
            d = self._space.jacobian(p)
            eye = torch.eye(d.shape[1], dtype=d.dtype, device=d.device)
            return (1.0 - lam) * eye + lam * d.T @ d

        return map_points(one, base_point)

    def metric_vec(self, tangent_vec: Tensor, base_point: Tensor) -> Tensor:
        r""":math:`(1-\lambda)v + \lambda D^\top D v` (one JVP and one VJP)."""
        v = self._check_tangent(tangent_vec)

        def one(p: Tensor, a: Tensor) -> Tensor:
            st = self.state(p)
            return (1.0 - self.lam) * a + self.lam * st.vjp(st.jvp(a))

        return map_points(one, base_point, v)

    def inner_product(
        self, tangent_vec_a: Tensor, tangent_vec_b: Tensor, base_point: Tensor
    ) -> Tensor:
        r""":math:`(1-\lambda)\langle a, b\rangle + \lambda\langle Da, Db\rangle`, without K × K."""
        a = self._check_tangent(tangent_vec_a, "tangent_vec_a")
        b = self._check_tangent(tangent_vec_b, "tangent_vec_b")
        lam = self.lam

        def one(p: Tensor, u: Tensor, w: Tensor) -> Tensor:
            if lam == 0.0:
                return u @ w
            if p.requires_grad:  # inside autodiff: no cache
                da, db = self._space.jvp(p, u), self._space.jvp(p, w)
            else:
                st = self.state(p)
                da, db = st.jvp(u), st.jvp(w)
            return (1.0 - lam) * (u @ w) + lam * (da @ db)

        return map_points(one, base_point, a, b)

    def gradient(self, base_point: Tensor) -> Tensor:
        r"""Riemannian gradient :math:`g_\lambda^+ D^\top\nabla_x C`, shape ``[K]``.

        At :math:`\lambda = 0` it is one fused forward/backward pass; with the
        ``ntk`` solver the NTK is formed first, so that the structured engine
        gives :math:`x[\theta]` from the same pass.
        """
        st = self.state(base_point)
        if self.lam == 0.0 and self._lam0_is_euclidean:
            return st.cost_grad
        if self.solver == "ntk" and self._small_is_output:
            st.ntk  # noqa: B018  (computes x[theta] in the same network pass)
        return self.sharp_pullback(st.output_grad, st.theta)

    # -- thresholds ----------------------------------------------------------------
    def _tau(self, base_point: Tensor) -> float:
        return self.rank_threshold(base_point)

    def _conlim(self, base_point: Tensor) -> float:
        r""":math:`\sigma_{\max}/\tau` for LSMR's condition limit (no factorization needed)."""
        if self.rank_atol is None:
            return 1.0 / self.rank_rtol if self.rank_rtol > 0 else 0.0
        if self.rank_atol == 0.0:
            return 0.0
        # only the scale of a stopping test: a coarse power iteration suffices
        return self.state(base_point).sigma_max(rtol=1e-4, maxiter=100) / self.rank_atol

    def _rcond(self, base_point: Tensor) -> float:
        r""":math:`\tau/\sigma_{\max}` for ``gelsd``."""
        if self.rank_atol is None:
            return self.rank_rtol
        smax = self.state(base_point).sigma_max()
        return self.rank_atol / smax if smax > 0 else 0.0

    def _gram_eigh(self, base_point: Tensor) -> tuple[Tensor, Tensor]:
        r"""Eigendecomposition of the smaller Gram matrix, ``(W, sigma)`` descending.

        :math:`DD^\top = W\Sigma^2W^\top` (:math:`W = U`) when :math:`QN\le K`,
        else :math:`D^\top D = W\Sigma^2W^\top` (:math:`W = V`).
        """
        st = self.state(base_point)
        return st.ntk_eigh if self._small_is_output else st.param_eigh

    def _ntk_tau(self, base_point: Tensor, s: Tensor) -> float:
        tau = self._tau(base_point)
        smax = float(s[0]) if s.numel() else 0.0
        if smax > 0 and tau < 10.0 * math.sqrt(_EPS64) * smax:
            warn_once(
                f"the rank threshold tau = {tau:.3g} is below what the 'ntk' route resolves "
                f"(about 1e-7 * sigma_max = {1e-7 * smax:.3g}): eigenvalues of D D^T carry an "
                "error of eps * sigma_max^2. Raise rank_rtol or use solver='svd'."
            )
        return tau

    def _param_cholesky(self, base_point: Tensor) -> Tensor:
        st = self.state(base_point)
        key = ("param_chol", self.lam)
        if key not in st._cache:
            gram = st.param_gram
            a = self.lam * gram + (1.0 - self.lam) * torch.eye(
                gram.shape[1], dtype=gram.dtype, device=gram.device
            )
            st._cache[key] = torch.linalg.cholesky(a)
        return st._cache[key]

    # -- solves --------------------------------------------------------------------
    def _solve_info(self, info) -> None:
        self.last_solve = info
        check_converged(info)

    def sharp_pullback(self, output_covec: Tensor, base_point: Tensor) -> Tensor:
        r""":math:`g_\lambda^+ D^\top u`, the sharp of a pulled-back covector, shape ``[K]``.

        * ``svd``: :math:`V\operatorname{diag}(\sigma_i/((1-\lambda)+\lambda\sigma_i^2))U^\top u`;
        * ``ntk`` (push-through, smaller space): for :math:`QN\le K`,
          :math:`D^\top((1-\lambda)1+\lambda DD^\top)^{-1}u` (Cholesky) for
          :math:`\lambda<1` and :math:`D^\top U\Sigma^{-2}U^\top u` (thresholded
          eigendecomposition of :math:`DD^\top`) at :math:`\lambda=1`; for
          :math:`K<QN` the same with :math:`D^\top D` in :math:`\mathbb{R}^K`;
        * ``lstsq``: ``gelsd`` on :math:`D` (``rcond`` :math:`=\tau/\sigma_{\max}`)
          at :math:`\lambda=1`; for :math:`\lambda<1` the full-rank stacked
          least-squares problem in the smaller space,
          :math:`w = \arg\min_w |\sqrt\lambda D^\top w|^2
          + |\sqrt{1-\lambda}\,w - u/\sqrt{1-\lambda}|^2`,
          :math:`v = D^\top w` (:math:`QN \le K`), or
          :math:`\lambda^{-1}\arg\min_v |Dv-u|^2+\varepsilon|v|^2`,
          :math:`\varepsilon=(1-\lambda)/\lambda` (:math:`K<QN`);
        * ``matrix_free``: LSMR at :math:`\lambda=1` (condition limit
          :math:`\sigma_{\max}/\tau`), CG on the SPD operator in the smaller
          space for :math:`\lambda<1`;
        * ``nystrom``: for :math:`\lambda<1` CG on the same operator with a
          randomized Nyström preconditioner (:mod:`subriemann.linalg.nystrom`), stopped
          on the true residual at ``solver_rtol`` or warned
          (:class:`~subriemann.linalg.ConvergenceWarning`); at :math:`\lambda=1`
          the ``matrix_free`` LSMR with its accuracy estimate.  ``last_solve``
          records the iterations and the residual.
        """
        sp = self._space
        u = sp._check_vec(output_covec, sp.output_dim, "output_covec")
        st = self.state(base_point)
        lam = self.lam
        if lam == 0.0:
            return st.vjp(u)
        if self.solver == "svd":
            uu, s, v = st.svd
            return v @ (interp_weights(s, lam, self._tau(base_point)) * (uu.T @ u))
        if self.solver == "ntk":
            return self._ntk_pullback(u, base_point)
        if self.solver == "lstsq":
            return self._lstsq_pullback(u, base_point)
        if self.solver == "nystrom" and lam < 1.0:
            return self._nystrom_pullback(u, base_point)
        return self._mf_pullback(u, base_point)

    def _nystrom_pullback(self, u: Tensor, base_point: Tensor) -> Tensor:
        r"""Nyström-PCG on :math:`\lambda(G + \mu 1)`, :math:`\mu = (1-\lambda)/\lambda`."""
        from subriemann.linalg.nystrom import NystromSolver, gram_rows

        st, lam, small = self.state(base_point), self.lam, self._small_is_output
        if getattr(self, "_nystrom", None) is None:
            self._nystrom = NystromSolver()
        engine = getattr(st.space.backend, "fallback", st.space.backend)
        if hasattr(engine, "rows_per_pass"):  # batched sketch rows within the memory budget
            self._nystrom.block = min(32, engine.rows_per_pass(st.theta))
        rhs = (u if small else st.vjp(u)) / lam
        z, info = self._nystrom.solve(
            gram_rows(st, small), rhs, (1.0 - lam) / lam, rtol=self.solver_rtol,
            maxiter=self.maxiter,
        )
        self._solve_info(info)
        return st.vjp(z) if small else z

    def _ntk_pullback(self, u: Tensor, base_point: Tensor) -> Tensor:
        st = self.state(base_point)
        lam = self.lam
        if lam < 1.0:  # SPD with kappa <= 1 + lam sigma_max^2 / (1 - lam): Cholesky
            if self._small_is_output:
                return st.vjp(torch.cholesky_solve(u.unsqueeze(1), st.cholesky(lam)).squeeze(1))
            pchol = self._param_cholesky(base_point)
            return torch.cholesky_solve(st.vjp(u).unsqueeze(1), pchol).squeeze(1)
        if self._small_is_output:
            # a certified Cholesky factor only where it proves every sigma > tau, so that
            # (D D^T)^+ = (D D^T)^{-1}; otherwise the thresholded eigendecomposition.
            # The accuracy certificate first: it usually implies the rank certificate
            # (eta / accuracy >= 2 tau^2), which then costs no second factorization.
            st.gram_exceeds(self._accuracy_shift(base_point))
            chol = st.certified_cholesky(self.rank_atol, self.rank_rtol)
            if chol is not None:
                return self._cholesky_pseudoinverse(u, base_point, chol)
        return self._eigh_pseudoinverse(u, base_point)

    def _cholesky_pseudoinverse(self, u: Tensor, base_point: Tensor, chol: Tensor) -> Tensor:
        r""":math:`D^+u = D^\top(DD^\top)^{-1}u` with :data:`accuracy` met or announced.

        The relative error of the push-through solution is at most
        :math:`\eta/\lambda_{\min}(DD^\top)` (:func:`~subriemann.linalg.gram_rounding`).
        If :math:`\lambda_{\min} > \eta/\mathrm{accuracy}` is certified (one shifted
        Cholesky factorization), that is all; otherwise iterative refinement
        (:func:`~subriemann.linalg.refine_push_through`), and if that does not reach
        the accuracy, the SVD (:meth:`_accuracy_fallback`).
        """
        from subriemann.linalg import refine_push_through

        st = self.state(base_point)

        def solve(z: Tensor) -> Tensor:
            return torch.cholesky_solve(z.unsqueeze(1), chol).squeeze(1)

        v = st.vjp(solve(u))
        bound = self._accuracy_shift(base_point)
        if st.gram_exceeds(bound):
            self.last_solve = SolverInfo(
                "ntk", 0, self.accuracy, True, self.accuracy,
                reason="accuracy certified a priori (lambda_min(D D^T) > eta / accuracy)",
            )
            return v
        v, info = refine_push_through(st.jvp, st.vjp, solve, u, v, self.accuracy)
        info.solver = "ntk"
        if info.converged:
            info.reason = f"iterative refinement, {info.iterations} step(s)"
            self.last_solve = info
            return v
        return self._accuracy_fallback(u, base_point, v, info.residual, "iterative refinement")

    def _accuracy_shift(self, base_point: Tensor) -> float:
        r""":math:`\eta/\mathrm{accuracy}`: above it, :math:`\lambda_{\min}(DD^\top)` makes
        the push-through solution accurate without refinement."""
        from subriemann.linalg import gram_rounding

        st = self.state(base_point)
        key = ("accuracy_shift", self.accuracy)
        if key not in st._cache:
            st._cache[key] = gram_rounding(st.ntk) / self.accuracy
        return st._cache[key]

    def _eigh_pseudoinverse(self, u: Tensor, base_point: Tensor) -> Tensor:
        r"""Thresholded :math:`(G)^+` of the smaller Gram matrix, with :data:`accuracy` checked.

        The eigenvalues :math:`\sigma_i^2` carry an absolute error :math:`\eta`
        (:func:`~subriemann.linalg.gram_rounding`), so a kept weight :math:`1/\sigma_i^2`
        is off by up to :math:`\eta/\sigma_r^2` (smallest kept :math:`\sigma_r`) and the
        kept eigenspace turns by up to :math:`\eta/(\sigma_r^2 - \sigma_{r+1}^2)`.  The
        larger of the two is the error estimate; above :data:`accuracy` the SVD
        takes over (:meth:`_accuracy_fallback`).
        """
        st = self.state(base_point)
        w, s = self._gram_eigh(base_point)
        keep = s > self._ntk_tau(base_point, s)
        rhs = u if self._small_is_output else st.vjp(u)
        coef = torch.where(keep, (w.T @ rhs) / torch.where(keep, s**2, 1.0), 0.0)
        v = st.vjp(w @ coef) if self._small_is_output else w @ coef
        est = self._eigh_error(s, keep)
        if est <= self.accuracy:
            self.last_solve = SolverInfo(
                "ntk", 0, est, True, self.accuracy, reason="thresholded eigendecomposition"
            )
            return v
        return self._accuracy_fallback(u, base_point, v, est, "thresholded eigendecomposition")

    @staticmethod
    def _eigh_error(s: Tensor, keep: Tensor) -> float:
        """Estimated relative error of the thresholded Gram pseudoinverse (see above)."""
        r = int(keep.sum())
        if r == 0:
            return 0.0
        eta = _rounding(s.shape[0], float((s**4).sum().sqrt()), s.dtype)
        low = float(s[r - 1]) ** 2
        gap = low - (float(s[r]) ** 2 if r < s.shape[0] else 0.0)
        denom = min(low, gap)
        return eta / denom if denom > 0 else math.inf

    def _accuracy_fallback(
        self, u: Tensor, base_point: Tensor, v: Tensor, est: float, how: str
    ) -> Tensor:
        r"""The SVD route if :math:`QN\cdot K \le` ``SVD_FALLBACK_LIMIT``, else ``v``, warned."""
        sp = self._space
        decade = f"1e{math.ceil(math.log10(est))}" if 0 < est < math.inf else f"{est}"
        note = f"{how}: estimated relative error up to {decade} > accuracy {self.accuracy:.2g}"
        if sp.output_dim * sp.dim <= SVD_FALLBACK_LIMIT:
            uu, s, vv = self.state(base_point).svd
            self.last_solve = SolverInfo(
                "svd", 0, 0.0, True, self.accuracy, reason=f"fallback to the SVD ({note})"
            )
            return vv @ (interp_weights(s, 1.0, self._tau(base_point)) * (uu.T @ u))
        self.last_solve = SolverInfo("ntk", 0, est, False, self.accuracy, reason=note)
        warnings.warn(
            f"the 'ntk' route cannot certify the accuracy {self.accuracy:.2g} of the lam = 1 "
            f"direction here ({note}; D is too large for the SVD fallback, QN*K = "
            f"{sp.output_dim * sp.dim} > {SVD_FALLBACK_LIMIT}): raise rank_rtol, or use "
            "solver='matrix_free'",
            AccuracyWarning,
            stacklevel=4,
        )
        return v

    def _lstsq_pullback(self, u: Tensor, base_point: Tensor) -> Tensor:
        sp = self._space
        st = self.state(base_point)
        lam = self.lam
        d = st.jacobian
        if lam == 1.0:
            sol = torch.linalg.lstsq(
                d.cpu(), u.cpu().unsqueeze(1), rcond=self._rcond(base_point), driver="gelsd"
            ).solution
            return sol.squeeze(1).to(u.device)
        if self._small_is_output:
            # min_w |A w - b|, A = [sqrt(lam) D^T; sqrt(1-lam) 1], b = [0; u/sqrt(1-lam)]:
            # A^T A = (1-lam)1 + lam D D^T and A^T b = u.  Full column rank: QR.
            qn = sp.output_dim
            a = torch.cat(
                [
                    math.sqrt(lam) * d.T,
                    math.sqrt(1.0 - lam) * torch.eye(qn, dtype=d.dtype, device=d.device),
                ]
            )
            b = torch.cat(
                [torch.zeros(sp.dim, dtype=u.dtype, device=u.device), u / math.sqrt(1.0 - lam)]
            )
            w = torch.linalg.lstsq(a.cpu(), b.cpu().unsqueeze(1), driver="gels").solution
            return st.vjp(w.squeeze(1).to(u.device))
        eps = (1.0 - lam) / lam
        eye = math.sqrt(eps) * torch.eye(sp.dim, dtype=d.dtype, device=d.device)
        a = torch.cat([d, eye])
        b = torch.cat([u, torch.zeros(sp.dim, dtype=u.dtype, device=u.device)])
        sol = torch.linalg.lstsq(a.cpu(), b.cpu().unsqueeze(1), driver="gels").solution
        return sol.squeeze(1).to(u.device) / lam

    def _mf_pullback(self, u: Tensor, base_point: Tensor) -> Tensor:
        sp = self._space
        st = self.state(base_point)
        lam = self.lam
        if lam == 1.0:
            v, info = lsmr(
                st.jvp,
                st.vjp,
                (sp.output_dim, sp.dim),
                u,
                rtol=self.solver_rtol,
                maxiter=self.maxiter,
                conlim=self._conlim(base_point),
            )
            self._lsmr_accuracy(info)
        elif self._small_is_output:
            w, info = cg(
                lambda z: (1.0 - lam) * z + lam * st.jvp(st.vjp(z)),
                u,
                rtol=self.solver_rtol,
                maxiter=self.maxiter,
                eig_lower=1.0 - lam,
            )
            v = st.vjp(w)
        else:
            v, info = cg(
                lambda z: (1.0 - lam) * z + lam * st.vjp(st.jvp(z)),
                st.vjp(u),
                rtol=self.solver_rtol,
                maxiter=self.maxiter,
                eig_lower=1.0 - lam,
            )
        self._solve_info(info)
        return v

    def _lsmr_accuracy(self, info: SolverInfo) -> None:
        r"""Announce an LSMR solution of :math:`Dv = u` that may miss :data:`accuracy`.

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
                f"1e{math.ceil(math.log10(est))} (2 cond(D) x residual) > accuracy "
                f"{self.accuracy:.2g}; lower solver_rtol or use solver='ntk' or 'svd'",
                AccuracyWarning,
                stacklevel=4,
            )

    def _svd_sharp(self, xi: Tensor, base_point: Tensor, restrict: bool) -> Tensor:
        st = self.state(base_point)
        _, s, v = st.svd
        lam, tau = self.lam, self._tau(base_point)
        denom = (1.0 - lam) + lam * s**2
        keep = s > tau if (lam == 1.0 or restrict) else torch.ones_like(s, dtype=torch.bool)
        coef = v.T @ xi
        out = v @ torch.where(keep, coef / torch.where(keep, denom, 1.0), 0.0)
        if lam < 1.0 and not restrict:
            out = out + (xi - v @ coef) / (1.0 - lam)
        return out

    def sharp(self, cotangent_vec: Tensor, base_point: Tensor) -> Tensor:
        r""":math:`g_\lambda^+\xi` for a general covector :math:`\xi \in \mathbb{R}^K`.

        For :math:`\lambda<1`, :math:`g_\lambda^{-1}\xi`: through the SVD
        (``svd``, ``lstsq``), by Woodbury
        :math:`(1-\lambda)^{-1}[\xi - \lambda D^\top((1-\lambda)1+\lambda DD^\top)^{-1}D\xi]`
        (``ntk``, :math:`QN\le K`), or CG on :math:`g_\lambda` in
        :math:`\mathbb{R}^K` (``matrix_free``).  At :math:`\lambda = 1`,
        :math:`(D^\top D)^+\xi = D^+(D^+)^\top\xi` (thresholded), which lies in
        :math:`\operatorname{ran}D^\top`; ``matrix_free`` computes it with two
        LSMR solves.
        """
        xi = self._check_tangent(cotangent_vec, "cotangent_vec")
        lam = self.lam
        if lam == 0.0:
            return xi.clone()
        if self.solver in ("svd", "lstsq") or (self.solver == "ntk" and not self._small_is_output):
            return self._svd_sharp(xi, base_point, restrict=False)
        st = self.state(base_point)
        if self.solver == "ntk":
            if lam < 1.0:
                return self._woodbury(xi, base_point)
            uu, s = self._gram_eigh(base_point)
            keep = s > self._ntk_tau(base_point, s)
            coef = torch.where(keep, (uu.T @ st.jvp(xi)) / torch.where(keep, s**4, 1.0), 0.0)
            return st.vjp(uu @ coef)
        return self._mf_sharp(xi, base_point)

    def _mf_sharp(self, xi: Tensor, base_point: Tensor) -> Tensor:
        sp = self._space
        st = self.state(base_point)
        lam = self.lam
        if lam < 1.0:
            v, info = cg(
                lambda z: (1.0 - lam) * z + lam * st.vjp(st.jvp(z)),
                xi,
                rtol=self.solver_rtol,
                maxiter=self.maxiter,
                eig_lower=1.0 - lam,
            )
            self._solve_info(info)
            return v
        conlim = self._conlim(base_point)
        # (D^T D)^+ xi = D^+ (D^T)^+ xi: w = min-norm solution of D^T w = xi, then D^+ w
        w, info = lsmr(
            st.vjp,
            st.jvp,
            (sp.dim, sp.output_dim),
            xi,
            rtol=self.solver_rtol,
            maxiter=self.maxiter,
            conlim=conlim,
        )
        self._solve_info(info)
        v, info = lsmr(
            st.jvp,
            st.vjp,
            (sp.output_dim, sp.dim),
            w,
            rtol=self.solver_rtol,
            maxiter=self.maxiter,
            conlim=conlim,
        )
        self._solve_info(info)
        return v

    def _woodbury(self, xi: Tensor, base_point: Tensor) -> Tensor:
        st = self.state(base_point)
        lam = self.lam
        chol = st.cholesky(lam)
        w = torch.cholesky_solve(st.jvp(xi).unsqueeze(1), chol).squeeze(1)
        return (xi - lam * st.vjp(w)) / (1.0 - lam)

    def distribution(self, base_point: Tensor) -> Tensor:
        r"""Frame of the subspace where :math:`g_\lambda` is positive definite.

        :math:`\mathbb{R}^K` for :math:`\lambda < 1`; the right singular vectors
        :math:`v_i` with :math:`\sigma_i > \tau` (:math:`\operatorname{ran} D^\top`) at
        :math:`\lambda=1`.
        """
        self._require_small_k("distribution")
        if self.lam < 1.0:
            return torch.eye(self._space.dim, dtype=self._space.dtype, device=self._space.device)
        return self._range_frame(base_point)

    def _range_frame(self, base_point: Tensor) -> Tensor:
        st = self.state(base_point)
        _, s, v = st.svd
        return v[:, s > self._tau(base_point)]

    def cometric_matrix(self, base_point: Tensor) -> Tensor:
        if self.lam < 1.0:
            return torch.linalg.inv(self.metric_matrix(base_point))
        return super().cometric_matrix(base_point)

    # -- geodesics -----------------------------------------------------------------
    def christoffels(self, base_point: Tensor) -> Tensor:
        r""":math:`\Gamma^k_{ij} = \lambda\,(g_\lambda^{-1}D^\top)_{ka}\,\partial_i\partial_j x_a`.

        Shape ``[..., K, K, K]``, contravariant index first (small K).
        """
        self._require_small_k("christoffels")
        sp = self._space

        def one(p: Tensor) -> Tensor:
            hess = torch.func.hessian(sp.backend.outputs)(p)  # [QN, K, K]
            m = self.cometric_matrix(p) @ sp.jacobian(p).T  # [K, QN]
            return self.lam * torch.einsum("ka,aij->kij", m, hess)

        return map_points(one, base_point)

    def geodesic_equation(self, state: Tensor) -> Tensor:
        r"""Right-hand side of the geodesic ODE, ``state = [..., 2, K]`` (position, velocity).

        :math:`\ddot\theta = -\lambda\,g_\lambda^+D^\top\,\partial^2x[\dot\theta,\dot\theta]`:
        two nested JVPs and one ``sharp_pullback``, no Christoffel tensor.
        """
        sp = self._space

        def one(pos: Tensor, vel: Tensor) -> Tensor:
            if self.lam == 0.0:
                return torch.zeros_like(vel)
            pos = pos.detach()
            h = _second_derivative(sp, pos, vel)
            return -self.lam * self.sharp_pullback(h, pos)

        pos, vel = state[..., 0, :], state[..., 1, :]
        acc = map_points(one, pos, vel)
        return torch.stack([vel, acc], dim=-2)


class OutputPullbackMetric(InterpolatedMetric):
    r"""The pullback :math:`D^\top D` of the Euclidean output metric: the adapted flow (2.26).

    :math:`\operatorname{grad}C = D^+\nabla_x C`; the output flow is
    :math:`\partial_s x = -P\nabla_x C` (2.27).  It is Riemannian only where
    :math:`\operatorname{rank}D = K`; elsewhere ``sharp`` acts on the
    distribution :math:`\operatorname{ran}D^\top`.  Same as
    ``InterpolatedMetric(lam=1.0)``.
    """

    def __init__(self, space, **kwargs: Any) -> None:
        if "lam" in kwargs:
            raise TypeError(
                "OutputPullbackMetric has lam = 1 fixed; use InterpolatedMetric(lam=...)"
            )
        super().__init__(space, 1.0, **kwargs)


class _SpectralFunction(torch.autograd.Function):
    r"""Fixed-rank spectral function :math:`F = W\operatorname{diag}(f(\mu))W^\top` of symmetric G.

    Here :math:`G = W\operatorname{diag}(\mu)W^\top`.

    ``f`` is applied to the ``r`` largest eigenvalues and is 0 on the others
    (a fixed-rank spectral function).  The backward pass uses the
    Daleckii–Krein formula :math:`dF = W(\Gamma\circ W^\top dG\,W)W^\top`,
    :math:`\Gamma_{ij} = (f_i - f_j)/(\mu_i - \mu_j)` (:math:`f'(\mu_i)` for
    near-ties), which stays finite where eigendecomposition gradients do not
    (repeated or zero eigenvalues).
    """

    @staticmethod
    def forward(ctx, g, r, f, fprime):  # type: ignore[override]
        mu, w = torch.linalg.eigh(0.5 * (g + g.mT))
        mu, w = mu.flip(-1), w.flip(-1)
        n = mu.shape[-1]
        fv = torch.zeros_like(mu)
        dv = torch.zeros_like(mu)
        fv[:r] = f(mu[:r])
        dv[:r] = fprime(mu[:r])
        num = fv[:, None] - fv[None, :]
        den = mu[:, None] - mu[None, :]
        scale = float(mu.abs().max()) if n else 1.0
        tie = den.abs() <= 1e-9 * max(scale, 1e-300)
        avg = 0.5 * (dv[:, None] + dv[None, :])
        gamma = torch.where(tie, avg, num / torch.where(tie, torch.ones_like(den), den))
        ctx.save_for_backward(w, gamma)
        return (w * fv) @ w.mT

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        w, gamma = ctx.saved_tensors
        gs = 0.5 * (grad_out + grad_out.mT)
        return w @ (gamma * (w.mT @ gs @ w)) @ w.mT, None, None, None


class BundleMetric(InterpolatedMetric):
    r"""Sub-Riemannian bundle metric: :math:`g_\lambda` on :math:`\operatorname{ran}D^\top` (2.45).

    The distribution is :math:`\mathcal{V}_\theta = \operatorname{ran} D[\theta]^\top`.

    The distribution is :math:`\operatorname{ran}D^\top` for every
    :math:`\lambda` (rank threshold :math:`\tau`); on it the metric is
    :math:`g_\lambda`.  In the overparametrized or rank-deficient case
    :math:`(\mathbb{R}^K, \mathcal{V}, g_\lambda)` is sub-Riemannian.  The gradient
    equals :math:`V_\lambda` and lies in :math:`\mathcal{V}`.

    ``metric_matrix`` returns :math:`\bar P g_\lambda \bar P` with
    :math:`\bar P = D^+D` (zero off the distribution); :meth:`to_geomstats`
    exports a geomstats :class:`~geomstats.geometry.sub_riemannian_metric.SubRiemannianMetric`
    and :meth:`exp` follows the normal sub-Riemannian geodesics.

    Notes
    -----
    ``solver="lstsq"`` is served by the SVD (the same dense factorization).
    With ``solver="matrix_free"`` and :math:`\lambda<1` the directions with
    :math:`0<\sigma_i\le\tau` are not cut off (a Krylov solver cannot);
    their weight :math:`\sigma_i/((1-\lambda)+\lambda\sigma_i^2)\le\tau/(1-\lambda)`
    is negligible.
    """

    _lam0_is_euclidean = False

    @property
    def field_may_jump(self) -> bool:
        """Always: the directions with :math:`\\sigma_i \\le \\tau` are dropped at every
        :math:`\\lambda`."""
        return True

    def __init__(self, space, lam: float = 1.0, **kwargs: Any) -> None:
        super().__init__(space, lam, **kwargs)
        if self.solver == "lstsq":
            self.solver = "svd"

    def _frame_sv(self, p: Tensor) -> tuple[Tensor, Tensor]:
        d = self._space.jacobian(p)
        _, s, vh = torch.linalg.svd(d, full_matrices=False)
        tau = self.rank_atol if self.rank_atol is not None else self.rank_rtol * float(s[0])
        keep = s > tau
        return vh.mT[:, keep], s[keep]

    def metric_matrix(self, base_point: Tensor) -> Tensor:
        r""":math:`\bar Pg_\lambda\bar P`, shape ``[..., K, K]``.

        .. math:: \bar Pg_\lambda\bar P
                  = \sum_{\sigma_i>\tau}((1-\lambda)+\lambda\sigma_i^2)\,v_iv_i^\top.
        """
        self._require_small_k("metric_matrix")

        def one(p: Tensor) -> Tensor:
            v, s = self._frame_sv(p)
            return (v * ((1.0 - self.lam) + self.lam * s**2)) @ v.T

        return map_points(one, base_point)

    def _project(self, a: Tensor, base_point: Tensor) -> Tensor:
        r""":math:`\bar P a`, the orthogonal projection onto :math:`\operatorname{ran}D^\top`."""
        st = self.state(base_point)
        if self.solver == "svd" or not self._small_is_output:
            _, s, v = st.svd
            v = v[:, s > self._tau(base_point)]
            return v @ (v.T @ a)
        if self.solver == "ntk":
            uu, s = self._gram_eigh(base_point)
            keep = s > self._ntk_tau(base_point, s)
            coef = torch.where(keep, (uu.T @ st.jvp(a)) / torch.where(keep, s**2, 1.0), 0.0)
            return st.vjp(uu @ coef)
        sp = self._space
        out, info = lsmr(
            st.jvp,
            st.vjp,
            (sp.output_dim, sp.dim),
            st.jvp(a),
            rtol=self.solver_rtol,
            maxiter=self.maxiter,
            conlim=self._conlim(base_point),
        )
        self._solve_info(info)
        return out

    def metric_vec(self, tangent_vec: Tensor, base_point: Tensor) -> Tensor:
        r""":math:`\bar P g_\lambda \bar P v = (1-\lambda)\bar P v + \lambda D^\top D v`."""
        v = self._check_tangent(tangent_vec)

        def one(p: Tensor, a: Tensor) -> Tensor:
            st = self.state(p)
            out = self.lam * st.vjp(st.jvp(a))
            if self.lam < 1.0:
                out = out + (1.0 - self.lam) * self._project(a, p)
            return out

        return map_points(one, base_point, v)

    def inner_product(self, tangent_vec_a, tangent_vec_b, base_point):
        r""":math:`g_\lambda(\bar Pa,\bar Pb)`.

        .. math:: g_\lambda(\bar Pa,\bar Pb) = (1-\lambda)\langle\bar Pa,b\rangle
                  + \lambda\langle Da,Db\rangle.


        The components off :math:`\mathcal{V}` do not count; no K × K matrix is formed.
        """
        a = self._check_tangent(tangent_vec_a, "tangent_vec_a")
        b = self._check_tangent(tangent_vec_b, "tangent_vec_b")
        lam = self.lam

        def one(p: Tensor, u: Tensor, w: Tensor) -> Tensor:
            st = self.state(p)
            out = lam * (st.jvp(u) @ st.jvp(w))
            if lam < 1.0:
                out = out + (1.0 - lam) * (self._project(u, p) @ w)
            return out

        return map_points(one, base_point, a, b)

    def sharp_pullback(self, output_covec: Tensor, base_point: Tensor) -> Tensor:
        if self.lam == 1.0 or self.solver == "matrix_free":
            return super().sharp_pullback(output_covec, base_point)
        # drop the directions with sigma <= tau also for lam < 1: the frame is ran D^T
        return self.sharp(self.state(base_point).vjp(output_covec), base_point)

    def sharp(self, cotangent_vec: Tensor, base_point: Tensor) -> Tensor:
        r"""The sharp on :math:`\mathcal{V}`.

        .. math:: \sharp\xi = \sum_{\sigma_i>\tau}
                  \frac{\langle v_i,\xi\rangle}{(1-\lambda)+\lambda\sigma_i^2}\,v_i \in \mathcal{V}.
        """
        xi = self._check_tangent(cotangent_vec, "cotangent_vec")
        if self.solver == "svd" or not self._small_is_output:
            return self._svd_sharp(xi, base_point, restrict=True)
        st = self.state(base_point)
        if self.solver == "ntk":
            uu, s = self._gram_eigh(base_point)
            tau, lam = self._ntk_tau(base_point, s), self.lam
            keep = s > tau
            # xi = D^T w + xi_perp; only D^T w counts: w = (DD^T)^+ D xi
            denom = s**2 * ((1.0 - lam) + lam * s**2)
            coef = torch.where(keep, (uu.T @ st.jvp(xi)) / torch.where(keep, denom, 1.0), 0.0)
            return st.vjp(uu @ coef)
        if self.lam == 1.0:
            return self._mf_sharp(xi, base_point)
        # matrix-free, lam < 1: g_lam maps ran D^T to itself; CG from 0 on P xi stays there
        return self._mf_sharp(self._project(xi, base_point), base_point)

    def distribution(self, base_point: Tensor) -> Tensor:
        r"""Orthonormal frame of :math:`\mathcal{V} = \operatorname{ran}D^\top`, ``[K, r]``."""
        self._require_small_k("distribution")
        return self._range_frame(base_point)

    def cometric_matrix(self, base_point: Tensor) -> Tensor:
        return torch.linalg.pinv(self.metric_matrix(base_point), hermitian=True)

    # -- sub-Riemannian geometry ------------------------------------------------------
    def hamiltonian(self, position: Tensor, momentum: Tensor, rank: int) -> Tensor:
        r"""The sub-Riemannian Hamiltonian :math:`H(\theta, p)`.

        .. math:: H(\theta, p) = \tfrac12\sum_{i\le r}
                  \frac{\langle v_i, p\rangle^2}{(1-\lambda)+\lambda\sigma_i^2}.


        This is :math:`\tfrac12|F^\top p|^2` for the :math:`g_\lambda`-orthonormal
        frame :math:`F` of :meth:`to_geomstats`.  It is computed as a
        fixed-rank spectral function of the smaller Gram matrix, with no
        singular vectors (so it is differentiable wherever
        :math:`\sigma_r > \sigma_{r+1}`, repeated singular values included):

        * :math:`QN \le K`: :math:`\tfrac12 (Dp)^\top f(DD^\top)(Dp)`,
          :math:`f(s) = 1/(s((1-\lambda)+\lambda s))` on the top ``r`` eigenvalues;
        * :math:`K < QN`: :math:`\tfrac12 p^\top f(D^\top D)\,p`,
          :math:`f(s) = 1/((1-\lambda)+\lambda s)` on the top ``r`` eigenvalues.

        Parameters
        ----------
        position : Tensor, shape=[K]
        momentum : Tensor, shape=[K]
        rank : int
            :math:`r`, the (constant) rank of the distribution.
        """
        sp = self._space
        lam, c = self.lam, 1.0 - self.lam
        d = sp.backend.jacobian(position)
        if sp.output_dim <= sp.dim:
            w = d @ momentum
            fmat = _SpectralFunction.apply(
                d @ d.T,
                rank,
                lambda s: 1.0 / (s * (c + lam * s)),
                lambda s: -(c + 2.0 * lam * s) / (s * (c + lam * s)) ** 2,
            )
            return 0.5 * w @ (fmat @ w)
        fmat = _SpectralFunction.apply(
            d.T @ d, rank, lambda s: 1.0 / (c + lam * s), lambda s: -lam / (c + lam * s) ** 2
        )
        return 0.5 * momentum @ (fmat @ momentum)

    def _cosharp(self, position: Tensor, momentum: Tensor, rank: int) -> Tensor:
        r""":math:`\partial H/\partial p = FF^\top p`, the sub-Riemannian sharp."""
        sp = self._space
        lam, c = self.lam, 1.0 - self.lam
        d = sp.backend.jacobian(position)
        _, s, vh = torch.linalg.svd(d, full_matrices=False)
        v, s = vh[:rank].mT, s[:rank]
        return v @ ((v.T @ momentum) / (c + lam * s**2))

    def _hamilton_rhs(self, q: Tensor, p: Tensor, rank: int) -> tuple[Tensor, Tensor]:
        r"""Hamilton's equations :math:`(\partial_p H, -\partial_\theta H)`, one backward pass."""
        with torch.enable_grad():
            qq = q.detach().requires_grad_(True)
            pp = p.detach().requires_grad_(True)
            h = self.hamiltonian(qq, pp, rank)
            dq_h, dp_h = torch.autograd.grad(h, (qq, pp))
        return dp_h, -dq_h

    def exp(self, tangent_vec: Tensor, base_point: Tensor) -> Tensor:
        r"""End point of the normal sub-Riemannian geodesic with initial velocity :math:`v`.

        The initial covector is :math:`p_0 = g_\lambda\bar P v` (so that
        :math:`\dot\theta(0) = \sharp p_0 = \bar P v`); Hamilton's equations
        :math:`\dot\theta = \partial H/\partial p`,
        :math:`\dot p = -\partial H/\partial\theta` are integrated with
        ``exp_steps`` RK4 steps on :math:`[0, 1]` (:mod:`subriemann.integrators`).  The rank of the
        distribution is held at its value at ``base_point``.
        """
        self._require_small_k("exp")
        v = self._check_tangent(tangent_vec)

        def one(q: Tensor, vel: Tensor) -> Tensor:
            q = self._space.check_point(q.detach())
            rank = self.rank(q)
            p = self.metric_vec(vel, q)
            k = q.shape[0]

            def hamilton(qp: Tensor) -> Tensor:  # (q, p) stacked
                dq, dp = self._hamilton_rhs(qp[:k], qp[k:], rank)
                return torch.cat([dq, dp])

            qp = fixed_steps(TABLEAUS["rk4"], hamilton, torch.cat([q, p]), 1.0, self.exp_steps)
            return qp[:k]

        return map_points(one, base_point, v)

    def geodesic_equation(self, state: Tensor) -> Tensor:
        raise NotImplementedError(
            "BundleMetric is sub-Riemannian: its geodesics are the normal Hamiltonian ones; "
            "use BundleMetric.exp or to_geomstats()"
        )

    def to_geomstats(self, rank: int | None = None):
        r"""Export as a geomstats ``SubRiemannianMetric`` with a :math:`g_\lambda`-orthonormal frame

        The frame is :math:`F(\theta) = [v_i/\sqrt{(1-\lambda)+\lambda\sigma_i^2}]_{i\le r}`,
        the first ``r`` right singular vectors of :math:`D` (``r`` defaults to
        :math:`\operatorname{rank}D` at the initial point; the distribution must
        have constant rank along what geomstats integrates).  Its Hamiltonian
        :math:`H(\theta,p) = \tfrac12|F^\top p|^2` generates the normal
        sub-Riemannian geodesics (``symp_euler``, ``iterate``, ``exp``).  The
        Hamiltonian and the sharp map are evaluated without singular vectors
        (see :meth:`hamiltonian`), so geomstats' autodiff through them is
        well defined.  Calls run in the space's dtype.
        """
        import_geomstats()
        from geomstats.geometry.sub_riemannian_metric import SubRiemannianMetric

        sp = self._space
        self._require_small_k("to_geomstats")
        r = self.rank(sp.initial_point()) if rank is None else int(rank)
        lam = self.lam
        outer = self

        def frame(point: Tensor) -> Tensor:
            def one(p: Tensor) -> Tensor:
                d = sp.backend.jacobian(p)
                _, s, vh = torch.linalg.svd(d, full_matrices=False)
                scale = ((1.0 - lam) + lam * s[:r] ** 2).rsqrt()
                return vh[:r].mT * scale

            return map_points(one, point)

        class _Exported(SubRiemannianMetric):
            def __getattribute__(self, name: str) -> Any:
                attr = super().__getattribute__(name)
                if callable(attr) and not name.startswith("__"):

                    def call(*args: Any, **kw: Any) -> Any:
                        with default_dtype(sp.dtype):
                            return attr(*args, **kw)

                    return call
                return attr

            def _hamiltonian_frame(self, state):
                position, momentum = state
                return map_points(lambda q, m: outer.hamiltonian(q, m, r), position, momentum)

            def sr_sharp(self, base_point, cotangent_vec):
                return map_points(lambda q, m: outer._cosharp(q, m, r), base_point, cotangent_vec)

        exported = _Exported(sp, frame=frame)
        exported.rank = r
        return exported
