r"""The interface of a solver route: how :math:`g_\lambda` is solved at one point.

The interpolated metric :math:`g_\lambda = (1-\lambda)1 + \lambda D^\top D`
(docs/theory.md §2) needs four solves at a point :math:`\theta`, for
:math:`\lambda\in(0, 1]` and a rank threshold :math:`\tau`; with the thin SVD
:math:`D = \sum_i\sigma_iu_iv_i^\top` they are

.. math::

    \texttt{solve}(u) &= g_\lambda^+D^\top u
        = \sum_i w_\lambda(\sigma_i)\,\langle u_i, u\rangle\,v_i,
        \qquad w_\lambda(\sigma) = \frac{\sigma}{(1-\lambda)+\lambda\sigma^2},\\
    \texttt{sharp}(\xi) &= g_\lambda^+\xi
        = \sum_i\frac{\langle v_i,\xi\rangle}{(1-\lambda)+\lambda\sigma_i^2}v_i
        + \frac{(1 - VV^\top)\xi}{1-\lambda},\\
    \texttt{project}(a) &= \bar Pa = \sum_{\sigma_i>\tau}\langle v_i, a\rangle v_i,\\
    \texttt{restricted\_sharp}(\xi) &= \sum_{\sigma_i>\tau}
        \frac{\langle v_i,\xi\rangle}{(1-\lambda)+\lambda\sigma_i^2}v_i,

where at :math:`\lambda = 1` only :math:`\sigma_i > \tau` count (and the second
term of ``sharp`` is absent).  A route is one way to compute them (a dense
SVD, a Gram matrix in the smaller space, LAPACK least squares, Krylov
iterations); each returns its answer with a :class:`~subriemann.linalg.SolverInfo`.
The metric holds one route and delegates to it (lineax's solver objects are the
model: the operator is the point state, the solver an object with options).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from subriemann.linalg.info import SolverInfo
from subriemann.linalg.spectral import rank_threshold
from subriemann.linalg.state import PointState

__all__ = ["SolverRoute", "Threshold", "TAGS", "OPEN_UNIT"]

OPEN_UNIT: dict[str, Any] = dict(low=0.0, high=1.0, low_open=True, high_open=True)
"""Bounds for :func:`~subriemann.validation.check_real` of a tolerance in :math:`(0, 1)`."""

TAGS = {
    "dense": "forms the dense Jacobian D (memory QN*K)",
    "gram": "forms the smaller Gram matrix D D^T or D^T D (memory min(QN, K)^2)",
    "matrix_free": "only JVPs and VJPs (memory O(QN + K))",
    "exact_cut": "cuts the spectrum exactly at tau (a Krylov solver cannot)",
    "backward_stable": "error eps * kappa, never eps * kappa^2",
    "iterative": "stops at a tolerance; its SolverInfo holds iterations and residual",
    "preconditioned": "builds a preconditioner, reused over nearby points",
}
"""The tags a route may carry, and what each means (:attr:`SolverRoute.tags`)."""


@dataclass(frozen=True)
class Threshold:
    r"""A metric's rank threshold settings.

    :math:`\tau` = ``rank_atol``, or ``rank_rtol`` :math:`\sigma_{\max}`
    (:func:`~subriemann.linalg.rank_threshold`).

    Attributes
    ----------
    rank_rtol : float
    rank_atol : float or None
    """

    rank_rtol: float = 1e-6
    rank_atol: float | None = None


class SolverRoute(ABC):
    r"""One way to solve :math:`g_\lambda` at a point; see the module docstring for the math.

    Every method takes the :class:`~subriemann.linalg.PointState` (the operator
    :math:`D` at :math:`\theta`, with its cached factorizations), the
    right-hand side, :math:`\lambda\in(0, 1]` (:math:`\lambda = 0` is the
    metric's own shortcut) and the :class:`Threshold`, and returns
    ``(vector, SolverInfo)``.  A route that cannot meet its tolerance warns
    (:class:`~subriemann.linalg.ConvergenceWarning`,
    :class:`~subriemann.linalg.AccuracyWarning`) and says so in the info.

    Class attributes
    ----------------
    name : str
        The ``solver=`` string of the metrics.
    tags : frozenset of str
        Capabilities, from :data:`TAGS`; :class:`~subriemann.linalg.routes.AutoRoute`
        selects by them.
    factorization : {"svd", "ntk"}
        Which factorization :meth:`singular_values` reads (the dense SVD, or the
        eigenvalues of the smaller Gram matrix).
    """

    name: ClassVar[str] = ""
    tags: ClassVar[frozenset[str]] = frozenset()
    factorization: ClassVar[str] = "svd"

    # -- the spectrum ------------------------------------------------------------------
    def singular_values(self, state: PointState) -> Tensor:
        r"""Singular values of :math:`D`, descending, from this route's factorization."""
        return state.singular_values(self.factorization)

    def spectrum(self, state: PointState, lam: float) -> Tensor:
        r"""The singular values a metric at :math:`\lambda` reports (its rank monitor).

        Those of :meth:`singular_values`; a route whose :math:`\lambda` solve takes a
        factorization that has them anyway returns them from it instead.
        """
        return self.singular_values(state)

    def tau(self, state: PointState, threshold: Threshold) -> float:
        r"""The rank threshold :math:`\tau` at this point (from :meth:`singular_values`)."""
        return rank_threshold(
            lambda: self.singular_values(state), threshold.rank_rtol, threshold.rank_atol
        )

    def resolve(self, qn: int, k: int) -> SolverRoute:
        r"""The concrete route for :math:`D` of shape ``(qn, k)``: ``self`` (an automatic
        route chooses one)."""
        return self

    def prepare(self, state: PointState) -> None:  # noqa: B027  (a hook: nothing by default)
        """Compute, before a gradient, what the route will need (default: nothing)."""

    # -- the solves --------------------------------------------------------------------
    @abstractmethod
    def solve(
        self, state: PointState, rhs: Tensor, lam: float, threshold: Threshold
    ) -> tuple[Tensor, SolverInfo]:
        r""":math:`g_\lambda^+D^\top u` for an output covector ``rhs`` :math:`u`, ``[QN]->[K]``."""

    def weighted_solve(
        self, state: PointState, rhs: Tensor, weights: Callable[[Tensor], Tensor],
        threshold: Threshold,
    ) -> tuple[Tensor, SolverInfo] | None:
        r"""The :math:`\lambda = 1` solve with spectral weights :math:`\phi` (``weights``,
        ``[r] -> [r]``, applied to the singular values), from one factorization:

        .. math:: \sum_{\sigma_i > \tau} \phi(\sigma_i)\,\sigma_i^{-1}(u_i^\top u)\,v_i.

        A flow's band filter asks it (``subriemann.flow.continuation``).  ``None``
        (the default) where the route has no spectral factorization: the filter then
        sums thresholded solves, one per direction in the band.
        """
        return None

    @abstractmethod
    def sharp(
        self, state: PointState, xi: Tensor, lam: float, threshold: Threshold
    ) -> tuple[Tensor, SolverInfo]:
        r""":math:`g_\lambda^+\xi` for a covector :math:`\xi`, ``[K] -> [K]``."""

    @abstractmethod
    def project(
        self, state: PointState, a: Tensor, threshold: Threshold
    ) -> tuple[Tensor, SolverInfo]:
        r""":math:`\bar Pa`, the orthogonal projector onto :math:`\{v_i:\sigma_i>\tau\}`."""

    def restricted_sharp(
        self, state: PointState, xi: Tensor, lam: float, threshold: Threshold
    ) -> tuple[Tensor, SolverInfo]:
        r""":math:`g_\lambda^{-1}\bar P\xi` (:math:`\bar Pg_\lambda^+\xi` at :math:`\lambda = 1`).

        :math:`g_\lambda` maps :math:`\operatorname{ran}\bar P` to itself, so this is
        ``sharp(project(xi))``; routes with a factorization override it with
        the one-pass form.
        """
        if lam == 1.0:
            return self.sharp(state, xi, lam, threshold)
        p, _ = self.project(state, xi, threshold)
        return self.sharp(state, p, lam, threshold)

    def bundle_solve(
        self, state: PointState, rhs: Tensor, lam: float, threshold: Threshold
    ) -> tuple[Tensor, SolverInfo]:
        r""":math:`g_\lambda^{-1}\bar PD^\top u`: the gradient of the bundle metric.

        At :math:`\lambda = 1` it is :meth:`solve`.  For :math:`\lambda < 1` routes
        that cut exactly (tag ``"exact_cut"``) drop the directions with
        :math:`\sigma_i \le \tau`; a Krylov route keeps them (their weight is at
        most :math:`\tau/(1-\lambda)`) and solves as :meth:`solve`.
        """
        if lam == 1.0 or "exact_cut" not in self.tags:
            return self.solve(state, rhs, lam, threshold)
        return self.restricted_sharp(state, state.vjp(rhs), lam, threshold)

    def description(self) -> dict[str, object]:
        """The route's name and options (JSON-serialisable)."""
        return {"solver": self.name}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.description().items() if k != "solver")
        return f"{type(self).__name__}({args})"
