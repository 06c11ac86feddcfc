r"""The base class of every metric on parameter space.

A metric :math:`g` on :math:`\mathbb{R}^K` turns the differential of the cost
into a vector: the Riemannian gradient is the *sharp* of :math:`dC`, the
vector :math:`v` in the metric's distribution :math:`\mathcal{V}` with

.. math:: g(v, w) = dC(w) \quad \text{for all } w \in \mathcal{V},

and the gradient flow is :math:`\partial_s\theta = -v` (docs/theory.md §2).  A flow
is never hand-coded per metric: :meth:`ParameterMetric.gradient` is
``sharp(dC)``.

Subclasses give at least :meth:`~ParameterMetric.metric_matrix`; everything
else (``inner_product``, ``sharp``, ``distribution``, geodesics through
geomstats) then works, densely.  Built-in metrics override the methods with
matrix-free or push-through forms.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from subriemann._geomstats import default_dtype, import_geomstats
from subriemann.linalg import PointState, cg, check_converged, rank_threshold
from subriemann.validation import check_int, check_optional, check_real
from subriemann.vectorization import map_points

import_geomstats()
from geomstats.geometry.riemannian_metric import RiemannianMetric  # noqa: E402
from geomstats.numerics.geodesic import ExpODESolver  # noqa: E402
from geomstats.numerics.ivp import GSIVPIntegrator  # noqa: E402

if TYPE_CHECKING:
    from subriemann.space import ParameterSpace

__all__ = ["ParameterMetric", "SumMetric", "DENSE_K_LIMIT"]

_TOKENS = itertools.count()

DENSE_K_LIMIT = 8000
"""Largest K for which K × K matrices (``metric_matrix``, ``distribution``) are formed."""


class ParameterMetric(RiemannianMetric):
    r"""A (possibly degenerate) metric tensor on parameter space :math:`\mathbb{R}^K`.

    A geomstats :class:`~geomstats.geometry.riemannian_metric.RiemannianMetric`
    with an attached exp solver (RK4 on the geodesic equation), so
    ``inner_product``, ``norm``, ``christoffels``, ``exp`` and ``geodesic``
    work on small models.

    Parameters
    ----------
    space : ParameterSpace
    rank_rtol : float
        Relative rank threshold: singular values of :math:`D` (or eigenvalues
        of a dense metric matrix) at most ``rank_rtol`` times the largest are
        treated as zero.  It *defines* the distribution.
    rank_atol : float, optional
        Absolute threshold :math:`\tau`; overrides ``rank_rtol``.  Flows fix
        it at its initial value so that the vector field stays continuous.
    exp_steps : int
        RK4 steps of geomstats' geodesic integrator used by ``exp``.

    Notes
    -----
    Shapes follow geomstats: ``base_point`` has shape ``[..., K]``.
    Methods that solve (``sharp``, ``gradient``, ``distribution``) take a
    single point ``[K]``.
    """

    def __init__(
        self,
        space: ParameterSpace,
        *,
        rank_rtol: float = 1e-6,
        rank_atol: float | None = None,
        exp_steps: int = 50,
    ) -> None:
        if not callable(getattr(space, "point_state", None)) or not hasattr(space, "layout"):
            raise TypeError(
                f"{type(self).__name__} needs a subriemann.ParameterSpace, "
                f"got {type(space).__name__}"
            )
        super().__init__(space)
        self.rank_rtol = check_real(rank_rtol, "rank_rtol", low=0.0, high=1.0, high_open=True)
        self.rank_atol = check_optional(check_real, rank_atol, "rank_atol", low=0.0)
        self.exp_steps = check_int(exp_steps, "exp_steps", low=1)
        # key of this metric's entries in the shared per-point cache (never reused, unlike id())
        self._token = next(_TOKENS)
        self.exp_solver = ExpODESolver(space, integrator=GSIVPIntegrator(exp_steps, "rk4"))

    # -- plumbing ------------------------------------------------------------------
    @property
    def space(self) -> ParameterSpace:
        """The parameter space this metric lives on."""
        return self._space

    def state(self, base_point: Tensor) -> PointState:
        """Shared per-point cache (see :meth:`ParameterSpace.point_state`)."""
        return self._space.point_state(base_point)

    def _check_tangent(self, vec: Tensor, what: str = "tangent_vec") -> Tensor:
        return self._space.check_tangent(vec, what)

    def _require_small_k(self, what: str) -> None:
        if self._space.dim > DENSE_K_LIMIT:
            raise ValueError(
                f"{what} forms a K x K matrix and K = {self._space.dim} > {DENSE_K_LIMIT}; "
                "use the operator forms instead (inner_product, metric_vec, sharp, gradient)"
            )

    def description(self) -> dict[str, Any]:
        """A JSON-serialisable description, recorded in trajectories."""
        return {
            "class": type(self).__name__,
            "rank_rtol": self.rank_rtol,
            "rank_atol": self.rank_atol,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.description().items() if k != "class")
        return f"{type(self).__name__}({args})"

    # -- rank of D ---------------------------------------------------------------
    def singular_values(self, base_point: Tensor) -> Tensor:
        r"""Singular values of :math:`D[\theta]`, descending, shape ``[min(QN, K)]``."""
        return self.state(base_point).singular_values("svd")

    def gradient_spectrum(self, base_point: Tensor) -> Tensor:
        r"""Singular values at a point where :meth:`gradient` is taken too (the band filter
        of a flow asks both): :meth:`singular_values`, unless a metric takes them from
        the factorization its gradient makes anyway."""
        return self.singular_values(base_point)

    def weighted_gradient(
        self, base_point: Tensor, weights: Callable[[Tensor], Tensor]
    ) -> Tensor | None:
        r"""The gradient with spectral weights :math:`\phi` on the singular directions of
        :math:`D`, from one factorization, or ``None`` (the default) where the metric
        offers none.

        A flow's band filter (``subriemann.flow.continuation``) asks it first; on
        ``None`` it sums the metric's thresholded gradients, one per direction in the band.
        """
        return None

    def rank_threshold(self, base_point: Tensor) -> float:
        r"""The threshold :math:`\tau`: ``rank_atol``, or ``rank_rtol`` :math:`\sigma_{\max}`
        (:func:`~subriemann.linalg.rank_threshold`)."""
        return rank_threshold(
            lambda: self.singular_values(base_point), self.rank_rtol, self.rank_atol
        )

    def rank(self, base_point: Tensor) -> int:
        r"""Numerical rank of :math:`D[\theta]`: the number of :math:`\sigma_i > \tau`."""
        s = self.singular_values(base_point)
        return int((s > self.rank_threshold(base_point)).sum())

    # -- capabilities (what the flow asks instead of checking classes) -------------
    @property
    def is_euclidean(self) -> bool:
        r"""Whether the metric is the Euclidean one here: its gradient is
        :math:`D^\top\nabla_x C`, with no solve and no dependence on :math:`\tau`.

        The flow then skips the band filter and monitors the rank from the cheap
        Gram eigenvalues.  ``False`` unless the metric knows it
        (:class:`~subriemann.metrics.EuclideanMetric`, :math:`g_\lambda` at
        :math:`\lambda = 0`).
        """
        return False

    @property
    def gradient_needs(self) -> str | None:
        r"""What :meth:`gradient` reads from the point state, for a batch of points.

        ``"cost_grad"`` (:math:`D^\top\nabla_x C` only) or ``"svd"`` (the thin SVD of
        :math:`D`): :func:`~subriemann.linalg.prefill_states` can then compute it for
        several points in one vectorised pass; ``None`` (default): nothing to prefill.
        """
        return "cost_grad" if self.is_euclidean else None

    @property
    def field_may_jump(self) -> bool:
        r"""Whether the gradient may jump where a singular value of :math:`D` crosses :math:`\tau`.

        A flow computes the singular values at a rejected step only where this
        is true (a rejection may then be a rank event, located on the old
        branch); elsewhere at accepted steps only.  The band filter of
        ``subriemann.flow.continuation`` applies only where it is true (a
        continuous field needs none).  ``True``, the safe answer,
        unless the metric knows its gradient is continuous across rank changes
        (the Euclidean metric, :math:`g_\lambda` with :math:`\lambda < 1`).
        """
        return True

    # -- the tensor ----------------------------------------------------------------
    def metric_matrix(self, base_point: Tensor) -> Tensor:
        r"""The metric tensor :math:`g_{ij}(\theta)`, shape ``[..., K, K]`` (dense, small K)."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement metric_matrix(base_point) "
            "(or override inner_product and sharp)"
        )

    def metric_vec(self, tangent_vec: Tensor, base_point: Tensor) -> Tensor:
        r""":math:`g(\theta)\,v` (the flat map of a tangent vector), shape ``[..., K]``."""
        v = self._check_tangent(tangent_vec)
        return map_points(lambda p, a: self.metric_matrix(p) @ a, base_point, v)

    def inner_product(
        self, tangent_vec_a: Tensor, tangent_vec_b: Tensor, base_point: Tensor
    ) -> Tensor:
        r""":math:`g_\theta(a, b)`, shape ``[...]``."""
        a = self._check_tangent(tangent_vec_a, "tangent_vec_a")
        b = self._check_tangent(tangent_vec_b, "tangent_vec_b")
        return (a * self.metric_vec(b, base_point)).sum(-1)

    def _dense_eigh(self, base_point: Tensor) -> tuple[Tensor, Tensor, float]:
        st = self.state(base_point)

        def eigh() -> tuple[Tensor, Tensor]:
            self._require_small_k("the dense metric route")
            m = self.metric_matrix(st.theta)
            return torch.linalg.eigh(0.5 * (m + m.T))

        evals, evecs = st.memo(("metric_eigh", self._token), eigh)
        return evals, evecs, rank_threshold(evals.abs(), self.rank_rtol, self.rank_atol)

    def distribution(self, base_point: Tensor) -> Tensor:
        r"""Orthonormal frame of the subspace where :math:`g` is positive definite, ``[K, r]``."""
        evals, evecs, tol = self._dense_eigh(base_point)
        return evecs[:, evals > tol]

    def sharp(self, cotangent_vec: Tensor, base_point: Tensor) -> Tensor:
        r"""The :math:`v\in\mathcal{V}` with :math:`g(v, w) = \xi(w)` on all of :math:`\mathcal{V}`.

        Parameters
        ----------
        cotangent_vec : Tensor, shape=[K]
            :math:`\xi`, in coordinates (so :math:`\xi(w) = \xi\cdot w`).
        base_point : Tensor, shape=[K]

        Returns
        -------
        tangent_vec : Tensor, shape=[K]
            :math:`g^+\xi`, the pseudoinverse restricted to the distribution.

        Notes
        -----
        The generic implementation eigendecomposes ``metric_matrix``
        (eigenvalues at most ``rank_atol``, or ``rank_rtol`` times the largest,
        count as zero).  For :math:`K >` ``DENSE_K_LIMIT`` it runs CG on
        ``metric_vec`` instead, which needs :math:`g` positive definite and
        warns (:class:`~subriemann.linalg.ConvergenceWarning`) with its
        residual when it does not converge.
        """
        xi = self._check_tangent(cotangent_vec, "cotangent_vec")
        if self._space.dim > DENSE_K_LIMIT:
            return self._sharp_cg(xi, base_point)
        evals, evecs, tol = self._dense_eigh(base_point)
        keep = evals > tol
        w = evecs[:, keep]
        return w @ ((w.T @ xi) / evals[keep])

    def _sharp_cg(self, xi: Tensor, base_point: Tensor) -> Tensor:
        theta = self._space.check_point(base_point)
        v, info = cg(lambda z: self.metric_vec(z, theta), xi)
        check_converged(info)
        return v

    def sharp_pullback(self, output_covec: Tensor, base_point: Tensor) -> Tensor:
        r"""``sharp`` of the pulled-back covector :math:`D^\top u`, shape ``[K]``.

        Built-in metrics solve this in output space (push-through).
        """
        u = self._space.check_output_vec(output_covec)
        return self.sharp(self.state(base_point).vjp(u), base_point)

    def gradient(self, base_point: Tensor) -> Tensor:
        r"""Riemannian gradient :math:`\operatorname{grad} C = \sharp(dC)`, shape ``[K]``.

        :math:`dC = D^\top\nabla_x C`; the gradient flow is
        :math:`\partial_s\theta = -\operatorname{grad} C`.
        """
        st = self.state(base_point)
        return self.sharp_pullback(st.output_grad, st.theta)

    # -- checks --------------------------------------------------------------------
    def check(self, base_point: Tensor, *, atol: float = 1e-10, n_directions: int = 4) -> None:
        r"""Check that the metric is a metric: symmetric, positive on its distribution, consistent.

        Verifies, relative to :math:`\max|g_{ij}|`:

        * ``metric_matrix`` is symmetric, :math:`\max|g - g^\top| \le` ``atol``;
        * it is positive semidefinite (smallest eigenvalue :math:`\ge -` ``atol``);
        * ``distribution`` is an orthonormal frame on which :math:`g` is
          positive definite (smallest eigenvalue of :math:`F^\top gF` above
          rounding, :math:`100\,\epsilon\max|g_{ij}|`);
        * ``inner_product(a, b)`` equals :math:`a^\top g\, b` and is symmetric
          for random :math:`a, b` (this catches an ``inner_product`` override
          that disagrees with ``metric_matrix``).

        Raises
        ------
        ValueError
            Naming the failed property and its size.
        """
        theta = self._space.check_point(base_point)
        self._require_small_k("check")
        m = self.metric_matrix(theta)
        k = self._space.dim
        if tuple(m.shape) != (k, k):
            raise ValueError(f"metric_matrix must have shape ({k}, {k}), got {tuple(m.shape)}")
        if not torch.isfinite(m).all():
            raise ValueError("metric_matrix contains NaN or inf")
        scale = float(m.abs().max()) or 1.0
        asym = float((m - m.T).abs().max()) / scale
        if asym > atol:
            raise ValueError(
                f"metric_matrix is not symmetric: max |g - g^T| / max |g| = {asym:.3g}"
            )
        evals = torch.linalg.eigvalsh(0.5 * (m + m.T))
        if float(evals.min()) < -atol * scale:
            raise ValueError(
                "metric_matrix is not positive semidefinite: smallest eigenvalue "
                f"{float(evals.min()):.3g} (max |g| = {scale:.3g})"
            )
        frame = self.distribution(theta)
        if frame.shape[1] == 0:
            raise ValueError("metric has an empty distribution at this point")
        gram = frame.T @ frame
        ortho = float(
            (gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)).abs().max()
        )
        if ortho > 1e-8:
            raise ValueError(
                f"distribution is not an orthonormal frame: max |F^T F - 1| = {ortho:.3g}"
            )
        restricted = torch.linalg.eigvalsh(frame.T @ m @ frame)
        # positive beyond rounding: eigenvalues carry an absolute error of ~eps * max|g|
        floor = 100.0 * float(torch.finfo(m.dtype).eps) * scale
        if float(restricted.min()) <= floor:
            raise ValueError(
                "metric is not positive definite on its distribution: smallest eigenvalue "
                f"{float(restricted.min()):.3g} (threshold {floor:.3g})"
            )
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(n_directions, k, generator=gen, dtype=m.dtype).to(m.device)
        b = torch.randn(n_directions, k, generator=gen, dtype=m.dtype).to(m.device)
        ab = torch.stack([self.inner_product(x, y, theta) for x, y in zip(a, b)])
        ba = torch.stack([self.inner_product(y, x, theta) for x, y in zip(a, b)])
        ref = torch.einsum("ni,ij,nj->n", a, m, b)
        norm = scale * a.norm(dim=1) * b.norm(dim=1)
        if float(((ab - ba).abs() / norm).max()) > 1e-8:
            raise ValueError("inner_product is not symmetric: g(a, b) != g(b, a)")
        err = float(((ab - ref).abs() / norm).max())
        if err > 1e-8:
            raise ValueError(
                "inner_product disagrees with metric_matrix: "
                f"max |g(a, b) - a^T G b| / (|G||a||b|) = {err:.3g}"
            )

    # -- geomstats -----------------------------------------------------------------
    def exp(self, tangent_vec: Tensor, base_point: Tensor) -> Tensor:
        """Riemannian exponential through geomstats' geodesic ODE (small K)."""
        self._require_small_k("exp")
        with default_dtype(self._space.dtype):
            return super().exp(tangent_vec, base_point)

    def geodesic(self, initial_point, end_point=None, initial_tangent_vec=None):
        """geomstats' geodesic, run in the space's dtype (small K)."""
        self._require_small_k("geodesic")
        with default_dtype(self._space.dtype):
            path = super().geodesic(initial_point, end_point, initial_tangent_vec)

        def run(t):
            with default_dtype(self._space.dtype):
                return path(t)

        return run

    def geodesic_equation(self, state: Tensor) -> Tensor:
        r"""Right-hand side of the geodesic ODE, ``state = [..., 2, K]`` (position, velocity).

        :math:`\ddot\theta^k = -\Gamma^k(\dot\theta,\dot\theta)` with
        :math:`g\,\Gamma(v, v) = (\partial_v g)\,v - \tfrac12\nabla_\theta(v^\top g\,v)`
        (the Koszul formula contracted with :math:`v` twice), computed with
        one forward-mode and one reverse-mode derivative of ``metric_matrix``
        and ``cometric_matrix`` (the inverse, or pseudo-inverse, of
        :math:`g`): no :math:`K^3` Christoffel tensor.  Needs
        ``metric_matrix`` to be differentiable by :mod:`torch.func`.
        """
        self._require_small_k("geodesic_equation")

        def one(pos: Tensor, vel: Tensor) -> Tensor:
            pos = pos.detach()
            dg_v = torch.func.jvp(self.metric_matrix, (pos,), (vel,))[1]
            grad_q = torch.func.grad(lambda p: vel @ self.metric_matrix(p) @ vel)(pos)
            rhs = dg_v @ vel - 0.5 * grad_q
            return -(self.cometric_matrix(pos) @ rhs)

        pos, vel = state[..., 0, :], state[..., 1, :]
        acc = map_points(one, pos, vel)
        return torch.stack([vel, acc], dim=-2)

    def christoffels(self, base_point: Tensor) -> Tensor:
        """Christoffel symbols by autodiff of ``metric_matrix`` (small K; pseudo-inverse)."""
        self._require_small_k("christoffels")
        with default_dtype(self._space.dtype):
            return super().christoffels(base_point)

    def cometric_matrix(self, base_point: Tensor) -> Tensor:
        """Pseudo-inverse of ``metric_matrix`` (the inverse where it is invertible)."""
        return torch.linalg.pinv(self.metric_matrix(base_point), hermitian=True)

    # -- combination ---------------------------------------------------------------
    def __add__(self, other: ParameterMetric) -> ParameterMetric:
        if not isinstance(other, ParameterMetric):
            return NotImplemented
        return SumMetric(self._space, [self, other])

    def __mul__(self, scalar: float) -> ParameterMetric:  # type: ignore[override]
        if not isinstance(scalar, (int, float)) or isinstance(scalar, bool):
            return NotImplemented
        return SumMetric(self._space, [self], weights=[float(scalar)])

    __rmul__ = __mul__  # type: ignore[assignment]


class SumMetric(ParameterMetric):
    r"""A weighted sum :math:`g = \sum_i c_i\, g_i` of metrics on the same space.

    ``a + b`` and ``c * a`` on metrics build one.  ``sharp`` is dense
    (eigendecomposition of the summed ``metric_matrix``) for
    :math:`K \le` ``DENSE_K_LIMIT`` and conjugate gradients on
    ``metric_vec`` beyond.

    Parameters
    ----------
    space : ParameterSpace
    metrics : sequence of ParameterMetric
        Instances on ``space``.
    weights : sequence of float, optional
        Non-negative :math:`c_i` (default all 1).
    """

    def __init__(
        self,
        space,
        metrics: Sequence[ParameterMetric],
        weights: Sequence[float] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(space, **kwargs)
        metrics = list(metrics)
        if not metrics:
            raise ValueError("SumMetric needs at least one metric")
        for m in metrics:
            if not isinstance(m, ParameterMetric):
                raise TypeError(
                    f"SumMetric combines ParameterMetric instances, got {type(m).__name__}"
                )
            if m.space is not space:
                raise ValueError("all metrics of a SumMetric must live on the same space")
        weights = [1.0] * len(metrics) if weights is None else list(weights)
        if len(weights) != len(metrics):
            raise ValueError(f"got {len(metrics)} metrics but {len(weights)} weights")
        try:
            self.weights = [check_real(w, "weights", low=0.0) for w in weights]
        except ValueError:
            raise ValueError(f"weights must be finite and non-negative, got {weights}") from None
        self.metrics = metrics

    def description(self) -> dict[str, Any]:
        d = super().description()
        d["terms"] = [dict(weight=w, **m.description()) for m, w in zip(self.metrics, self.weights)]
        return d

    def metric_matrix(self, base_point: Tensor) -> Tensor:
        r""":math:`\sum_i c_i g_i(\theta)`, shape ``[..., K, K]``."""
        terms = [w * m.metric_matrix(base_point) for m, w in zip(self.metrics, self.weights)]
        return torch.stack(terms).sum(0)

    def metric_vec(self, tangent_vec: Tensor, base_point: Tensor) -> Tensor:
        r""":math:`\sum_i c_i g_i v` (each term's own operator form)."""
        pairs = zip(self.metrics, self.weights)
        terms = [w * m.metric_vec(tangent_vec, base_point) for m, w in pairs]
        return torch.stack(terms).sum(0)

    def inner_product(self, tangent_vec_a, tangent_vec_b, base_point):
        return sum(
            w * m.inner_product(tangent_vec_a, tangent_vec_b, base_point)
            for m, w in zip(self.metrics, self.weights)
        )

    def __add__(self, other: ParameterMetric) -> ParameterMetric:
        if isinstance(other, SumMetric) and other.space is self._space:
            return SumMetric(
                self._space, self.metrics + other.metrics, self.weights + other.weights
            )
        if isinstance(other, ParameterMetric):
            return SumMetric(self._space, [*self.metrics, other], [*self.weights, 1.0])
        return NotImplemented

    def __mul__(self, scalar: float) -> ParameterMetric:  # type: ignore[override]
        if not isinstance(scalar, (int, float)) or isinstance(scalar, bool):
            return NotImplemented
        return SumMetric(self._space, self.metrics, [scalar * w for w in self.weights])

    __rmul__ = __mul__  # type: ignore[assignment]
