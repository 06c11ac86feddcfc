r"""The sub-Riemannian bundle metric: :math:`g_\lambda` on :math:`\operatorname{ran}D^\top`.

The distribution :math:`\mathcal{V}_\theta = \operatorname{span}\{v_i : \sigma_i > \tau\}`
(docs/theory.md §2, (2.45)) at every :math:`\lambda`; on it the metric is
:math:`g_\lambda`.  The solves are the route's restricted forms
(:meth:`~subriemann.linalg.SolverRoute.project`,
:meth:`~subriemann.linalg.SolverRoute.restricted_sharp`,
:meth:`~subriemann.linalg.SolverRoute.bundle_solve`); the normal
sub-Riemannian geodesics come from a Hamiltonian that needs no singular vectors.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from subriemann._geomstats import default_dtype, import_geomstats
from subriemann.integrators import TABLEAUS, fixed_steps
from subriemann.linalg import SVDRoute, rank_threshold
from subriemann.metrics.interpolated import InterpolatedMetric
from subriemann.vectorization import map_points

import_geomstats()
from geomstats.geometry.sub_riemannian_metric import SubRiemannianMetric  # noqa: E402

__all__ = ["BundleMetric"]


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
    With the Krylov routes (``solver="matrix_free"`` or ``"nystrom"``: no
    ``"exact_cut"`` tag) and :math:`\lambda<1` the gradient's directions with
    :math:`0<\sigma_i\le\tau` are not cut off (a Krylov solver cannot);
    their weight :math:`\sigma_i/((1-\lambda)+\lambda\sigma_i^2)\le\tau/(1-\lambda)`
    is negligible.
    """

    @property
    def is_euclidean(self) -> bool:
        r"""``False`` at every :math:`\lambda`: the directions with :math:`\sigma_i \le \tau`
        are dropped (at :math:`\lambda = 0` too)."""
        return False

    @property
    def field_may_jump(self) -> bool:
        """Always: the directions with :math:`\\sigma_i \\le \\tau` are dropped at every
        :math:`\\lambda`."""
        return True

    def __init__(self, space, lam: float = 1.0, **kwargs: Any) -> None:
        super().__init__(space, lam, **kwargs)
        if self.solver == "lstsq":  # the same dense factorization: the SVD serves
            self.route = SVDRoute()

    def _frame_sv(self, p: Tensor) -> tuple[Tensor, Tensor]:
        d = self._space.jacobian(p)
        _, s, vh = torch.linalg.svd(d, full_matrices=False)
        tau = rank_threshold(s, self.rank_rtol, self.rank_atol)
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
        return self._record(self.route.project(st, a, self.threshold))

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
        r""":math:`g_\lambda^{-1}\bar PD^\top u`, the route's
        :meth:`~subriemann.linalg.SolverRoute.bundle_solve`.

        The directions with :math:`\sigma_i \le \tau` are dropped at every
        :math:`\lambda` by the routes that cut exactly; see the class notes for
        the matrix-free routes.
        """
        u = self._space.check_output_vec(output_covec)
        st = self.state(base_point)
        return self._record(self.route.bundle_solve(st, u, self.lam, self.threshold))

    def sharp(self, cotangent_vec: Tensor, base_point: Tensor) -> Tensor:
        r"""The sharp on :math:`\mathcal{V}`.

        .. math:: \sharp\xi = \sum_{\sigma_i>\tau}
                  \frac{\langle v_i,\xi\rangle}{(1-\lambda)+\lambda\sigma_i^2}\,v_i \in \mathcal{V}.
        """
        xi = self._check_tangent(cotangent_vec, "cotangent_vec")
        st = self.state(base_point)
        return self._record(self.route.restricted_sharp(st, xi, self.lam, self.threshold))

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
