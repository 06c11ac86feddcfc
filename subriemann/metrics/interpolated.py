r"""The interpolated metric :math:`g_\lambda = (1-\lambda)1 + \lambda D^\top D` (docs/theory.md §2).

Its gradient is :math:`V_\lambda = g_\lambda^+ D^\top\nabla_x C` (the flow is
:math:`\partial_s\theta = -V_\lambda`), with spectral form

.. math:: V_\lambda = \sum_{\sigma_i > \tau} \frac{\sigma_i}{(1-\lambda) + \lambda\sigma_i^2}
          \langle u_i, \nabla_x C\rangle\, v_i

(the sum over all :math:`i` for :math:`\lambda < 1`).  How it is solved is a
**solver route** (:mod:`subriemann.linalg.routes`): the metric holds one and
delegates every solve to it, and keeps the last :class:`~subriemann.linalg.SolverInfo`
in ``last_solve``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from subriemann.linalg import (
    ACCURACY,
    PointState,
    SolverInfo,
    SolverRoute,
    Threshold,
    make_route,
)
from subriemann.linalg.routes.base import OPEN_UNIT
from subriemann.metrics.base import ParameterMetric
from subriemann.validation import check_int, check_optional, check_real
from subriemann.vectorization import map_points

__all__ = ["InterpolatedMetric", "check_lam"]


def check_lam(lam: Any) -> float:
    r"""Validate :math:`\lambda \in [0, 1]` and return it as a float.

    Raises
    ------
    TypeError
        If ``lam`` is not a real number (a bool, a string, a tensor with more
        than one element, ...).
    ValueError
        If ``lam`` is NaN or outside :math:`[0, 1]`.

    Examples
    --------
    >>> check_lam(1)
    1.0
    """
    try:
        return check_real(lam, "lam", low=0.0, high=1.0)
    except TypeError:
        raise TypeError(f"lam must be a real number in [0, 1], got {lam!r}") from None
    except ValueError:
        value = float(lam)
        shown = "NaN" if value != value else f"{value}"
        raise ValueError(f"lam must lie in [0, 1], got {shown}") from None


def second_derivative(space: Any, theta: Tensor, v: Tensor) -> Tensor:
    r""":math:`\partial^2 x[v, v] = \frac{d^2}{dt^2} x(\theta + t v)|_{t=0}` (two nested JVPs)."""
    return torch.func.jvp(lambda t: space.backend.jvp(t, v), (theta,), (v,))[1]


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
    solver : {"auto", "svd", "ntk", "lstsq", "matrix_free", "nystrom"} or SolverRoute
        How ``sharp`` solves: a route name, or a route object
        (:mod:`subriemann.linalg.routes`; see ``docs/metrics.md``).  ``"auto"``
        picks the route for the problem's size
        (:class:`~subriemann.linalg.AutoRoute`) once, here.
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

    Attributes
    ----------
    route : SolverRoute
        The route that solves (``solver`` is its name).
    last_solve : SolverInfo or None
        What the last solve did.

    Notes
    -----
    The geodesic equation is :math:`\ddot\theta = -\lambda\, g_\lambda^{-1}D^\top\,
    \partial^2x[\dot\theta,\dot\theta]`, since the Christoffel symbols of the
    first kind of :math:`(1-\lambda)1+\lambda D^\top D` are
    :math:`\Gamma_{l,ij} = \lambda\sum_a D_{al}\,\partial_i\partial_j x_a`;
    ``exp`` integrates it with RK4 (geomstats' ``ExpODESolver``), each step
    costing two nested JVPs and one ``sharp``.  It is a Riemannian geodesic
    for :math:`\lambda<1`, and at :math:`\lambda=1` only where
    :math:`\operatorname{rank}D = K`; use :class:`~subriemann.metrics.BundleMetric`
    otherwise.

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
    >>> space.metric.solver, space.metric.last_solve.solver
    ('svd', 'svd')
    """

    def __init__(
        self,
        space,
        lam: float = 0.5,
        *,
        solver: str | SolverRoute = "auto",
        rank_rtol: float = 1e-6,
        rank_atol: float | None = None,
        exp_steps: int = 50,
        maxiter: int | None = None,
        solver_rtol: float = 1e-12,
        accuracy: float = ACCURACY,
    ) -> None:
        super().__init__(space, rank_rtol=rank_rtol, rank_atol=rank_atol, exp_steps=exp_steps)
        self.accuracy = check_real(accuracy, "accuracy", **OPEN_UNIT)
        self.lam = check_lam(lam)
        self.maxiter = check_optional(check_int, maxiter, "maxiter", low=1)
        self.solver_rtol = check_real(solver_rtol, "solver_rtol", **OPEN_UNIT)
        opts = dict(rtol=self.solver_rtol, maxiter=self.maxiter, accuracy=self.accuracy)
        self.solver_name = solver if isinstance(solver, str) else solver.name
        self.route: SolverRoute = make_route(solver, **opts).resolve(space.output_dim, space.dim)
        self.last_solve: SolverInfo | None = None

    @property
    def solver(self) -> str:
        """The name of the route that solves (``"auto"`` resolved)."""
        return self.route.name

    @property
    def threshold(self) -> Threshold:
        """The rank threshold settings handed to the route."""
        return Threshold(self.rank_rtol, self.rank_atol)

    def description(self) -> dict[str, Any]:
        d = super().description()
        d.update(lam=self.lam, solver=self.solver)
        return d

    # -- capabilities --------------------------------------------------------------
    @property
    def is_euclidean(self) -> bool:
        r"""At :math:`\lambda = 0` the metric is the Euclidean one."""
        return self.lam == 0.0

    @property
    def field_may_jump(self) -> bool:
        r"""Only at :math:`\lambda = 1`: for :math:`\lambda < 1` every direction is kept
        (weights :math:`\sigma_i/((1-\lambda)+\lambda\sigma_i^2)`, continuous in :math:`D`)."""
        return self.lam == 1.0

    @property
    def gradient_needs(self) -> str | None:
        """``"cost_grad"`` at :math:`\\lambda = 0`, ``"svd"`` on the SVD route, else ``None``."""
        if self.is_euclidean:
            return "cost_grad"
        return "svd" if self.solver == "svd" else None

    @property
    def _nystrom(self) -> Any:
        """The ``NystromSolver`` of the ``"nystrom"`` route (``None`` on other routes)."""
        return getattr(self.route, "nystrom", None)

    # -- the spectrum --------------------------------------------------------------
    def singular_values(self, base_point: Tensor) -> Tensor:
        r"""Singular values of :math:`D[\theta]` from the route's factorization, descending."""
        return self.route.singular_values(self.state(base_point))

    def gradient_spectrum(self, base_point: Tensor) -> Tensor:
        r"""Singular values at a point whose gradient is taken too: the route's
        :meth:`~subriemann.linalg.routes.SolverRoute.spectrum` at this :math:`\lambda`
        (from the factorization the gradient takes, where it has them)."""
        return self.route.spectrum(self.state(base_point), self.lam)

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

    # -- solves --------------------------------------------------------------------
    def _record(self, result: tuple[Tensor, SolverInfo]) -> Tensor:
        """Keep the route's :class:`SolverInfo` as ``last_solve``; return its vector."""
        vec, self.last_solve = result
        return vec

    def gradient(self, base_point: Tensor) -> Tensor:
        r"""Riemannian gradient :math:`g_\lambda^+ D^\top\nabla_x C`, shape ``[K]``.

        At :math:`\lambda = 0` it is one fused forward/backward pass; otherwise
        the route prepares the point first (the ``ntk`` route forms the NTK, so
        that the structured engine gives :math:`x[\theta]` from the same pass).
        """
        st = self.state(base_point)
        if self.is_euclidean:
            return st.cost_grad
        self.route.prepare(st)
        return self.sharp_pullback(st.output_grad, st.theta)

    def weighted_gradient(
        self, base_point: Tensor, weights: Callable[[Tensor], Tensor]
    ) -> Tensor | None:
        r"""At :math:`\lambda = 1`,
        :math:`\sum_{\sigma_i>\tau}\phi(\sigma_i)\,\sigma_i^{-1}(u_i^\top\nabla_xC)\,v_i`
        from the route's one factorization
        (:meth:`~subriemann.linalg.routes.SolverRoute.weighted_solve`, checked against
        ``accuracy`` like :meth:`gradient`); ``None`` at :math:`\lambda < 1` or on a route
        without a spectral factorization.

        Examples
        --------
        >>> import torch, subriemann as sr
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
        >>> space = sr.ParameterSpace(net, torch.randn(4, 2), torch.randn(4, 1))
        >>> m = sr.metrics.InterpolatedMetric(space, lam=1.0, solver="svd")
        >>> th = space.initial_point()
        >>> bool(torch.allclose(m.weighted_gradient(th, torch.ones_like), m.gradient(th)))
        True
        """
        if self.lam != 1.0:
            return None
        st = self.state(base_point)
        self.route.prepare(st)
        out = self.route.weighted_solve(st, st.output_grad, weights, self.threshold)
        return None if out is None else self._record(out)

    def sharp_pullback(self, output_covec: Tensor, base_point: Tensor) -> Tensor:
        r""":math:`g_\lambda^+ D^\top u`, the sharp of a pulled-back covector, shape ``[K]``.

        The route's ``solve`` (:meth:`~subriemann.linalg.SolverRoute.solve`); see
        ``docs/metrics.md`` for what each route computes.
        """
        u = self._space.check_output_vec(output_covec)
        st = self.state(base_point)
        if self.lam == 0.0:
            return st.vjp(u)
        return self._record(self.route.solve(st, u, self.lam, self.threshold))

    def sharp(self, cotangent_vec: Tensor, base_point: Tensor) -> Tensor:
        r""":math:`g_\lambda^+\xi` for a general covector :math:`\xi \in \mathbb{R}^K`.

        For :math:`\lambda<1`, :math:`g_\lambda^{-1}\xi`; at :math:`\lambda = 1`,
        :math:`(D^\top D)^+\xi = D^+(D^+)^\top\xi` (thresholded), which lies in
        :math:`\operatorname{ran}D^\top`.  The route's ``sharp``.
        """
        xi = self._check_tangent(cotangent_vec, "cotangent_vec")
        if self.lam == 0.0:
            return xi.clone()
        st = self.state(base_point)
        return self._record(self.route.sharp(st, xi, self.lam, self.threshold))

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
        r"""The right singular vectors with :math:`\sigma_i > \tau`, ``[K, r]``."""
        st: PointState = self.state(base_point)
        _, s, v = st.svd
        return v[:, s > self.rank_threshold(base_point)]

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
            h = second_derivative(sp, pos, vel)
            return -self.lam * self.sharp_pullback(h, pos)

        pos, vel = state[..., 0, :], state[..., 1, :]
        acc = map_points(one, pos, vel)
        return torch.stack([vel, acc], dim=-2)
