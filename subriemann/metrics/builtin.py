r"""The built-in metrics of MATH.md §2.

=========================  =================================================  ==========================
metric                     tensor at :math:`\theta`                           class
=========================  =================================================  ==========================
Euclidean                  :math:`1_K`                                        :class:`EuclideanMetric`
output pullback            :math:`D^\top D`                                   :class:`OutputPullbackMetric`
interpolated               :math:`g_\lambda = (1-\lambda)1 + \lambda D^\top D`  :class:`InterpolatedMetric`
sub-Riemannian bundle      :math:`g_\lambda` restricted to :math:`\operatorname{ran} D^\top`  :class:`BundleMetric`
=========================  =================================================  ==========================

All of them have the gradient :math:`V_\lambda = g_\lambda^+ D^\top\nabla_x C`
(the flow is :math:`\partial_s\theta = -V_\lambda`), with spectral form

.. math:: V_\lambda = \sum_{\sigma_i > \tau} \frac{\sigma_i}{(1-\lambda) + \lambda\sigma_i^2}
          \langle u_i, \nabla_x C\rangle\, v_i .
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from subriemann._geomstats import default_dtype, import_geomstats
from subriemann.linalg import (
    choose_solver,
    cg,
    check_converged,
    interp_weights,
    lsmr,
)
from subriemann.metrics.base import ParameterMetric, _batched

__all__ = ["EuclideanMetric", "InterpolatedMetric", "OutputPullbackMetric", "BundleMetric"]


def check_lam(lam: Any) -> float:
    """Validate :math:`\\lambda \\in [0, 1]`."""
    if isinstance(lam, bool) or not isinstance(lam, (int, float)):
        if isinstance(lam, Tensor) and lam.numel() == 1:
            lam = float(lam)
        else:
            raise TypeError(f"lam must be a real number in [0, 1], got {type(lam).__name__}")
    lam = float(lam)
    if math.isnan(lam) or not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must lie in [0, 1], got {lam}")
    return lam


class EuclideanMetric(ParameterMetric):
    r"""The Euclidean metric :math:`1_K`: ordinary gradient flow.

    :math:`\operatorname{grad} C = D^\top\nabla_x C`; its output-space velocity
    is :math:`-DD^\top\nabla_x C` (the NTK, MATH.md (2.17)).  This is
    :class:`InterpolatedMetric` at :math:`\lambda = 0`, implemented without
    any solve.
    """

    lam = 0.0

    def metric_matrix(self, base_point: Tensor) -> Tensor:
        self._require_small_k("metric_matrix")
        eye = torch.eye(self._space.dim, dtype=base_point.dtype, device=base_point.device)
        return eye.expand(*base_point.shape[:-1], *eye.shape).clone()

    def metric_vec(self, tangent_vec: Tensor, base_point: Tensor) -> Tensor:
        return self._check_tangent(tangent_vec).clone()

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

    def exp(self, tangent_vec: Tensor, base_point: Tensor) -> Tensor:
        return base_point + tangent_vec


class InterpolatedMetric(ParameterMetric):
    r"""The family :math:`g_\lambda = (1-\lambda)1 + \lambda D^\top D`, :math:`\lambda\in[0,1]` (2.44).

    :math:`\lambda = 0` is the Euclidean metric and :math:`\lambda = 1` the
    output pullback :math:`D^\top D`, both reproduced *exactly*: at
    :math:`\lambda = 1` the gradient is the pseudoinverse
    :math:`D^+\nabla_x C` (never :math:`1 - \varepsilon`).

    Parameters
    ----------
    space : ParameterSpace
    lam : float
        :math:`\lambda \in [0, 1]`.
    solver : {"auto", "svd", "ntk", "lstsq", "matrix_free"}
        How ``sharp`` solves (see :mod:`subriemann.linalg`).
    rank_rtol, rank_atol, exp_steps
        See :class:`~subriemann.metrics.ParameterMetric`.
    maxiter : int, optional
        Iteration limit of the matrix-free solvers.
    solver_rtol : float
        Tolerance of the matrix-free solvers.

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
        solver_rtol: float = 1e-10,
    ) -> None:
        super().__init__(space, rank_rtol=rank_rtol, rank_atol=rank_atol, exp_steps=exp_steps)
        self.lam = check_lam(lam)
        self.solver_name = solver
        self.solver = choose_solver(space, solver)
        self.maxiter = maxiter
        self.solver_rtol = solver_rtol
        self.last_solve = None

    def description(self) -> dict[str, Any]:
        d = super().description()
        d.update(lam=self.lam, solver=self.solver)
        return d

    def _factorization(self) -> str:
        return "svd" if self.solver in ("svd", "lstsq") else "ntk"

    # -- the tensor ----------------------------------------------------------------
    def metric_matrix(self, base_point: Tensor) -> Tensor:
        r""":math:`(1-\lambda)1 + \lambda D^\top D`, shape ``[..., K, K]``."""
        self._require_small_k("metric_matrix")
        lam = self.lam

        def one(p: Tensor) -> Tensor:
            d = self._space.jacobian(p)
            eye = torch.eye(d.shape[1], dtype=d.dtype, device=d.device)
            return (1.0 - lam) * eye + lam * d.T @ d

        return _batched(one, base_point)

    def metric_vec(self, tangent_vec: Tensor, base_point: Tensor) -> Tensor:
        r""":math:`(1-\lambda)v + \lambda D^\top D v` (one JVP and one VJP)."""
        v = self._check_tangent(tangent_vec)

        def one(p: Tensor, a: Tensor) -> Tensor:
            st = self.state(p)
            return (1.0 - self.lam) * a + self.lam * st.vjp(st.jvp(a))

        return _batched(one, base_point, v)

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

        return _batched(one, base_point, a, b)

    # -- solves --------------------------------------------------------------------
    def _tau(self, base_point: Tensor) -> float:
        return self.rank_threshold(base_point)

    def sharp_pullback(self, output_covec: Tensor, base_point: Tensor) -> Tensor:
        r""":math:`g_\lambda^+ D^\top u`, solved in the smaller of K and QN.

        * ``svd``: :math:`V\operatorname{diag}(\sigma_i/((1-\lambda)+\lambda\sigma_i^2))U^\top u`;
        * ``ntk``: :math:`D^\top((1-\lambda)1+\lambda DD^\top)^{+}u`, Cholesky for
          :math:`\lambda<1`, thresholded eigendecomposition at :math:`\lambda=1`;
        * ``lstsq``: :math:`\lambda^{-1}\arg\min_v |Dv-u|^2+\varepsilon|v|^2`,
          :math:`\varepsilon = (1-\lambda)/\lambda`, as a stacked least-squares problem;
        * ``matrix_free``: LSMR (:math:`\lambda=1`) or CG (:math:`\lambda<1`).
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
        if self.solver == "ntk" and sp.output_dim <= sp.dim:
            if lam < 1.0 and "eigh" not in st._cache:
                chol = st.cholesky(lam)
                w = torch.cholesky_solve(u.unsqueeze(1), chol).squeeze(1)
                return st.vjp(w)
            uu, s = st.ntk_eigh
            tau = self._tau(base_point)
            denom = (1.0 - lam) + lam * s**2
            keep = s > tau if lam == 1.0 else torch.ones_like(s, dtype=torch.bool)
            coef = torch.where(keep, (uu.T @ u) / torch.where(keep, denom, 1.0), 0.0)
            return st.vjp(uu @ coef)
        if self.solver == "ntk":  # K < QN: K-space form through the SVD
            uu, s, v = st.svd
            return v @ (interp_weights(s, lam, self._tau(base_point)) * (uu.T @ u))
        if self.solver == "lstsq":
            d = st.jacobian
            if lam == 1.0:
                tau = self._tau(base_point)
                smax = float(st.singular_values("svd")[0]) or 1.0
                sol = torch.linalg.lstsq(
                    d.cpu(), u.cpu().unsqueeze(1), rcond=tau / smax, driver="gelsd"
                ).solution
                return sol.squeeze(1).to(u.device)
            eps = (1.0 - lam) / lam
            eye = math.sqrt(eps) * torch.eye(sp.dim, dtype=d.dtype, device=d.device)
            a = torch.cat([d, eye])
            b = torch.cat([u, torch.zeros(sp.dim, dtype=u.dtype, device=u.device)])
            sol = torch.linalg.lstsq(a.cpu(), b.cpu().unsqueeze(1), driver="gelsd").solution
            return sol.squeeze(1).to(u.device) / lam
        # matrix-free
        if lam == 1.0:
            v, info = lsmr(
                st.jvp, st.vjp, (sp.output_dim, sp.dim), u,
                rtol=self.solver_rtol, maxiter=self.maxiter,
            )
        elif sp.output_dim <= sp.dim:
            w, info = cg(
                lambda z: (1.0 - lam) * z + lam * st.jvp(st.vjp(z)), u,
                rtol=self.solver_rtol, maxiter=self.maxiter,
            )
            v = st.vjp(w)
        else:
            v, info = cg(
                lambda z: (1.0 - lam) * z + lam * st.vjp(st.jvp(z)), st.vjp(u),
                rtol=self.solver_rtol, maxiter=self.maxiter,
            )
        self.last_solve = info
        check_converged(info)
        return v

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

        For :math:`\lambda<1` by Woodbury,
        :math:`g_\lambda^{-1}\xi = (1-\lambda)^{-1}[\xi - \lambda D^\top((1-\lambda)1+\lambda DD^\top)^{-1}D\xi]`;
        at :math:`\lambda = 1`, :math:`(D^\top D)^+\xi` on :math:`\operatorname{ran}D^\top`.
        """
        xi = self._check_tangent(cotangent_vec, "cotangent_vec")
        sp = self._space
        lam = self.lam
        if lam == 0.0:
            return xi.clone()
        if self.solver in ("svd", "lstsq") or sp.output_dim > sp.dim and self.solver == "ntk":
            return self._svd_sharp(xi, base_point, restrict=False)
        st = self.state(base_point)
        if self.solver == "ntk":
            if lam < 1.0:
                return self._woodbury(xi, base_point)
            uu, s = st.ntk_eigh
            tau = self._tau(base_point)
            keep = s > tau
            coef = torch.where(keep, (uu.T @ st.jvp(xi)) / torch.where(keep, s**4, 1.0), 0.0)
            return st.vjp(uu @ coef)
        # matrix-free
        v, info = cg(lambda z: self.metric_vec(z, st.theta), xi, rtol=self.solver_rtol, maxiter=self.maxiter)
        self.last_solve = info
        check_converged(info)
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
        :math:`v_i` with :math:`\sigma_i > \tau` (:math:`\operatorname{ran} D^\top`) at :math:`\lambda=1`.
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
            raise TypeError("OutputPullbackMetric has lam = 1 fixed; use InterpolatedMetric(lam=...)")
        super().__init__(space, 1.0, **kwargs)


class BundleMetric(InterpolatedMetric):
    r"""The sub-Riemannian bundle metric: :math:`g_\lambda` on :math:`\mathcal{V}_\theta = \operatorname{ran} D[\theta]^\top` (2.45).

    The distribution is :math:`\operatorname{ran}D^\top` for every
    :math:`\lambda` (rank threshold :math:`\tau`); on it the metric is
    :math:`g_\lambda`.  In the overparametrized or rank-deficient case
    :math:`(\mathbb{R}^K, \mathcal{V}, g_\lambda)` is sub-Riemannian.  The gradient
    equals :math:`V_\lambda` and lies in :math:`\mathcal{V}`.

    ``metric_matrix`` returns :math:`\bar P g_\lambda \bar P` with
    :math:`\bar P = D^+D` (zero off the distribution); :meth:`to_geomstats`
    exports a geomstats :class:`~geomstats.geometry.sub_riemannian_metric.SubRiemannianMetric`.
    """

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
        r""":math:`\bar P g_\lambda \bar P = \sum_{\sigma_i>\tau} ((1-\lambda)+\lambda\sigma_i^2) v_iv_i^\top`."""
        self._require_small_k("metric_matrix")

        def one(p: Tensor) -> Tensor:
            v, s = self._frame_sv(p)
            return (v * ((1.0 - self.lam) + self.lam * s**2)) @ v.T

        return _batched(one, base_point)

    def _project(self, a: Tensor, base_point: Tensor) -> Tensor:
        st = self.state(base_point)
        if self.solver == "svd" or self._space.output_dim > self._space.dim:
            _, s, v = st.svd
            v = v[:, s > self._tau(base_point)]
            return v @ (v.T @ a)
        uu, s = st.ntk_eigh
        keep = s > self._tau(base_point)
        coef = torch.where(keep, (uu.T @ st.jvp(a)) / torch.where(keep, s**2, 1.0), 0.0)
        return st.vjp(uu @ coef)

    def metric_vec(self, tangent_vec: Tensor, base_point: Tensor) -> Tensor:
        v = self._check_tangent(tangent_vec)

        def one(p: Tensor, a: Tensor) -> Tensor:
            st = self.state(p)
            pa = self._project(a, p)
            return (1.0 - self.lam) * pa + self.lam * st.vjp(st.jvp(pa))

        return _batched(one, base_point, v)

    def inner_product(self, tangent_vec_a, tangent_vec_b, base_point):
        r""":math:`g_\lambda(\bar Pa, \bar Pb)`: the components off :math:`\mathcal{V}` do not count."""
        a = self._check_tangent(tangent_vec_a, "tangent_vec_a")
        b = self._check_tangent(tangent_vec_b, "tangent_vec_b")
        return (a * self.metric_vec(b, base_point)).sum(-1)

    def sharp_pullback(self, output_covec: Tensor, base_point: Tensor) -> Tensor:
        if self.lam == 1.0 or self.solver == "matrix_free":
            return super().sharp_pullback(output_covec, base_point)
        # drop the directions with sigma <= tau also for lam < 1: the frame is ran D^T
        return self.sharp(self.state(base_point).vjp(output_covec), base_point)

    def sharp(self, cotangent_vec: Tensor, base_point: Tensor) -> Tensor:
        r""":math:`\sum_{\sigma_i>\tau} v_i\langle v_i,\xi\rangle/((1-\lambda)+\lambda\sigma_i^2)`, in :math:`\mathcal{V}`."""
        xi = self._check_tangent(cotangent_vec, "cotangent_vec")
        sp = self._space
        if self.solver == "svd" or sp.output_dim > sp.dim:
            return self._svd_sharp(xi, base_point, restrict=True)
        st = self.state(base_point)
        if self.solver == "ntk":
            uu, s = st.ntk_eigh
            tau, lam = self._tau(base_point), self.lam
            keep = s > tau
            # xi = D^T w + xi_perp; only D^T w counts: w = (DD^T)^+ D xi
            denom = s**2 * ((1.0 - lam) + lam * s**2)
            coef = torch.where(keep, (uu.T @ st.jvp(xi)) / torch.where(keep, denom, 1.0), 0.0)
            return st.vjp(uu @ coef)
        pxi = self._project(xi, base_point)
        v, info = cg(lambda z: self.metric_vec(z, st.theta), pxi, rtol=self.solver_rtol)
        self.last_solve = info
        check_converged(info)
        return v

    def distribution(self, base_point: Tensor) -> Tensor:
        r"""Orthonormal frame of :math:`\mathcal{V} = \operatorname{ran}D^\top`, ``[K, r]``."""
        self._require_small_k("distribution")
        return self._range_frame(base_point)

    def cometric_matrix(self, base_point: Tensor) -> Tensor:
        return torch.linalg.pinv(self.metric_matrix(base_point), hermitian=True)

    def to_geomstats(self, rank: int | None = None):
        r"""Export as a geomstats ``SubRiemannianMetric`` through a :math:`g_\lambda`-orthonormal frame.

        The frame is :math:`F(\theta) = [v_i/\sqrt{(1-\lambda)+\lambda\sigma_i^2}]_{i\le r}`,
        the first ``r`` right singular vectors of :math:`D` (``r`` defaults to
        :math:`\operatorname{rank}D` at the initial point; the distribution must
        have constant rank along what geomstats integrates).  Its Hamiltonian
        :math:`H(\theta,p) = \tfrac12|F^\top p|^2` generates the normal
        sub-Riemannian geodesics (``symp_euler``, ``iterate``).  Calls run in
        the space's dtype.
        """
        import_geomstats()
        from geomstats.geometry.sub_riemannian_metric import SubRiemannianMetric

        sp = self._space
        self._require_small_k("to_geomstats")
        r = self.rank(sp.initial_point()) if rank is None else int(rank)
        lam = self.lam

        def frame(point: Tensor) -> Tensor:
            def one(p: Tensor) -> Tensor:
                d = sp.jacobian(p)
                _, s, vh = torch.linalg.svd(d, full_matrices=False)
                scale = ((1.0 - lam) + lam * s[:r] ** 2).rsqrt()
                return vh[:r].mT * scale

            return _batched(one, point)

        class _Wrapped(SubRiemannianMetric):
            def __getattribute__(self, name: str) -> Any:
                attr = super().__getattribute__(name)
                if callable(attr) and not name.startswith("__"):
                    def call(*args: Any, **kw: Any) -> Any:
                        with default_dtype(sp.dtype):
                            return attr(*args, **kw)
                    return call
                return attr

        return _Wrapped(sp, frame=frame)

