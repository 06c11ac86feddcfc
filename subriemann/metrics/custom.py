r"""Building blocks for user-defined metrics.

Three recipes (see ``examples/custom_metrics.py``):

(a) subclass :class:`~subriemann.metrics.ParameterMetric` and give
    ``metric_matrix(base_point)``;
(b) give an output-space metric :math:`G(x)` (``[QN, QN]``) and pull it back,
    :math:`g = D^\top G D` (:class:`OutputMetric`);
(c) combine metrics: weighted sums (:class:`SumMetric`, or ``a + b`` and
    ``c * a``) and damping (:class:`DampedMetric`).

The generic ``sharp`` works for all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from subriemann.linalg import rank_threshold
from subriemann.metrics.base import ParameterMetric, SumMetric
from subriemann.metrics.euclidean import EuclideanMetric
from subriemann.metrics.interpolated import InterpolatedMetric
from subriemann.metrics.pullback import OutputPullbackMetric
from subriemann.validation import check_real
from subriemann.vectorization import map_points

__all__ = ["OutputMetric", "DampedMetric"]


class OutputMetric(ParameterMetric):
    r"""Pullback :math:`g = D^\top G(x) D` of an output-space metric :math:`G(x)`.

    Parameters
    ----------
    space : ParameterSpace
    output_metric : callable
        ``output_metric(x) -> G``, with ``x`` of shape ``[QN]`` (sample-major)
        and ``G`` symmetric positive semidefinite of shape ``[QN, QN]``.
        ``None`` means the identity (then this is the output pullback).
    rank_rtol, rank_atol, exp_steps
        See :class:`~subriemann.metrics.ParameterMetric`.

    Notes
    -----
    With the thin SVD :math:`D = U_r\Sigma_r V_r^\top` (:math:`\sigma_i>\tau`),
    the metric in the coordinates of :math:`V_r` is
    :math:`M = \Sigma_r U_r^\top G U_r \Sigma_r` (``[r, r]``), so

    .. math:: \sharp\xi = V_r M^+ V_r^\top \xi,

    where :math:`M^+` keeps the eigenvalues above ``rank_rtol**2`` times the
    largest: :math:`M` scales like :math:`\sigma^2`, so this is the same
    relative threshold as the one on the singular values of :math:`D`, and it
    cuts the exact zeros of :math:`G` (e.g. the all-ones direction of each
    sample for the softmax Fisher metric), which are rounding-level.
    The distribution is :math:`V_r` times the eigenvectors of :math:`M` kept.
    This forms :math:`D` (small and moderate problems).

    Examples
    --------
    >>> import torch, subriemann as sr
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    >>> space = sr.ParameterSpace(net, torch.randn(4, 2), torch.randn(4, 1))
    >>> w = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    >>> G = lambda x: torch.diag(w)
    >>> space = space.equip_with_metric(sr.metrics.OutputMetric, output_metric=G)
    >>> sr.check_gradient(space, space.initial_point()).passed
    True
    """

    def __init__(
        self,
        space,
        output_metric: Callable[[Tensor], Tensor] | None = None,
        *,
        rank_rtol: float = 1e-6,
        rank_atol: float | None = None,
        exp_steps: int = 50,
    ) -> None:
        super().__init__(space, rank_rtol=rank_rtol, rank_atol=rank_atol, exp_steps=exp_steps)
        if output_metric is not None and not callable(output_metric):
            raise TypeError("output_metric must be a callable x -> G(x) of shape [QN, QN]")
        self._output_metric = output_metric

    def output_metric(self, x: Tensor) -> Tensor:
        """:math:`G(x)`, shape ``[QN, QN]``, checked for shape and finiteness."""
        qn = self._space.output_dim
        if self._output_metric is None:
            return torch.eye(qn, dtype=x.dtype, device=x.device)
        g = self._output_metric(x)
        if not isinstance(g, Tensor) or g.shape != (qn, qn):
            shape = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
            raise ValueError(f"output_metric must return a [{qn}, {qn}] tensor, got {shape}")
        if not torch.isfinite(g).all():
            raise ValueError("output_metric returned NaN or inf")
        return g

    def output_metric_vec(self, x: Tensor, u: Tensor) -> Tensor:
        """:math:`G(x)u`; override for structured :math:`G` (e.g. block diagonal)."""
        return self.output_metric(x) @ u

    def metric_matrix(self, base_point: Tensor) -> Tensor:
        r""":math:`D^\top G(x) D`, shape ``[..., K, K]``."""
        self._require_small_k("metric_matrix")
        sp = self._space

        def one(p: Tensor) -> Tensor:
            d = sp.jacobian(p)
            x = sp.backend.outputs(p)
            return d.T @ self.output_metric(x) @ d

        return map_points(one, base_point)

    def metric_vec(self, tangent_vec: Tensor, base_point: Tensor) -> Tensor:
        r""":math:`D^\top G D v` (one JVP and one VJP)."""
        v = self._check_tangent(tangent_vec)

        def one(p: Tensor, a: Tensor) -> Tensor:
            st = self.state(p)
            return st.vjp(self.output_metric_vec(st.outputs, st.jvp(a)))

        return map_points(one, base_point, v)

    def inner_product(self, tangent_vec_a, tangent_vec_b, base_point):
        r""":math:`\langle Da, G\,Db\rangle`, without K × K."""
        a = self._check_tangent(tangent_vec_a, "tangent_vec_a")
        b = self._check_tangent(tangent_vec_b, "tangent_vec_b")
        sp = self._space

        def one(p: Tensor, u: Tensor, w: Tensor) -> Tensor:
            if p.requires_grad:
                x, du, dw = sp.backend.outputs(p), sp.jvp(p, u), sp.jvp(p, w)
            else:
                st = self.state(p)
                x, du, dw = st.outputs, st.jvp(u), st.jvp(w)
            return du @ self.output_metric_vec(x, dw)

        return map_points(one, base_point, a, b)

    def _reduced(self, base_point: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(V_r, sigma_r, U_r, W, evals)`` pieces of the reduced form, cached per point."""
        st = self.state(base_point)
        tau = self.rank_threshold(base_point)

        def reduced() -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
            u, s, v = st.svd
            keep = s > tau
            u, s, v = u[:, keep], s[keep], v[:, keep]
            gu = (
                torch.stack([self.output_metric_vec(st.outputs, c) for c in u.T], dim=1)
                if u.shape[1]
                else u
            )
            m = s[:, None] * (u.T @ gu) * s[None, :]
            evals, w = torch.linalg.eigh(0.5 * (m + m.T))
            return v, s, u, w, evals

        # keyed by tau too: copies of the metric with other thresholds share the point's cache
        return st.memo(("output_metric", self._token, tau), reduced)

    def _eig_cut(self, evals: Tensor) -> Tensor:
        # M scales like sigma^2: the relative threshold rank_rtol^2 (see the class notes)
        return evals > rank_threshold(evals.abs(), self.rank_rtol**2)

    def _pinv_apply(self, coef: Tensor, base_point: Tensor) -> Tensor:
        v, _, _, w, evals = self._reduced(base_point)
        keep = self._eig_cut(evals)
        w = w[:, keep]
        return v @ (w @ ((w.T @ coef) / evals[keep]))

    def sharp(self, cotangent_vec: Tensor, base_point: Tensor) -> Tensor:
        r""":math:`V_r M^+ V_r^\top\xi` (see Notes)."""
        xi = self._check_tangent(cotangent_vec, "cotangent_vec")
        v = self._reduced(base_point)[0]
        return self._pinv_apply(v.T @ xi, base_point)

    def sharp_pullback(self, output_covec: Tensor, base_point: Tensor) -> Tensor:
        r""":math:`V_r M^+ \Sigma_r U_r^\top u`."""
        u = self._space.check_output_vec(output_covec)
        _, s, uu, _, _ = self._reduced(base_point)
        return self._pinv_apply(s * (uu.T @ u), base_point)

    def distribution(self, base_point: Tensor) -> Tensor:
        """Frame :math:`V_r W_+` of the directions where :math:`D^\\top G D` is positive."""
        self._require_small_k("distribution")
        v, _, _, w, evals = self._reduced(base_point)
        return v @ w[:, self._eig_cut(evals)]


class DampedMetric(SumMetric):
    r"""A metric plus damping, :math:`g + \mu 1_K` (Levenberg–Marquardt style).

    ``DampedMetric(space, OutputPullbackMetric(space), damping=mu)`` is
    :math:`D^\top D + \mu 1`, i.e. :math:`(1+\mu)\,g_{\lambda'}` with
    :math:`\lambda' = 1/(1+\mu)`.  In general, for ``base`` in the
    interpolated family (:class:`~subriemann.metrics.EuclideanMetric`,
    :class:`~subriemann.metrics.InterpolatedMetric`,
    :class:`~subriemann.metrics.OutputPullbackMetric`),

    .. math:: g_\lambda + \mu 1 = (1+\mu)\, g_{\lambda/(1+\mu)},

    and ``sharp``/``gradient`` use that identity with the base's solver
    (push-through or matrix-free, no K × K matrix).  Other bases go through
    the generic :class:`SumMetric` route.

    Parameters
    ----------
    space : ParameterSpace
    base : ParameterMetric
    damping : float
        :math:`\mu \ge 0`.
    """

    def __init__(self, space, base: ParameterMetric, damping: float, **kwargs: Any) -> None:
        damping = check_real(damping, "damping", low=0.0)
        super().__init__(space, [base, EuclideanMetric(space)], [1.0, damping], **kwargs)
        self.damping = damping
        self._equivalent: ParameterMetric | None = None
        self._scale: float = 1.0 + self.damping
        if type(base) in (EuclideanMetric, InterpolatedMetric, OutputPullbackMetric):
            lam = float(getattr(base, "lam", 0.0))
            opts: dict[str, Any] = dict(rank_rtol=base.rank_rtol, rank_atol=base.rank_atol)
            if isinstance(base, InterpolatedMetric):
                opts.update(solver=base.solver, maxiter=base.maxiter, solver_rtol=base.solver_rtol)
            self._equivalent = InterpolatedMetric(space, lam / self._scale, **opts)

    def sharp(self, cotangent_vec: Tensor, base_point: Tensor) -> Tensor:
        r""":math:`(g+\mu1)^{+}\xi`, or :math:`(1+\mu)^{-1}g_{\lambda/(1+\mu)}^{+}\xi` (family)."""
        if self._equivalent is None:
            return super().sharp(cotangent_vec, base_point)
        return self._equivalent.sharp(cotangent_vec, base_point) / self._scale

    def sharp_pullback(self, output_covec: Tensor, base_point: Tensor) -> Tensor:
        if self._equivalent is None:
            return super().sharp_pullback(output_covec, base_point)
        return self._equivalent.sharp_pullback(output_covec, base_point) / self._scale

    def distribution(self, base_point: Tensor) -> Tensor:
        if self._equivalent is None:
            return super().distribution(base_point)
        return self._equivalent.distribution(base_point)
