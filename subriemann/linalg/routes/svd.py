r"""The ``"svd"`` route: the thin SVD of the dense :math:`D`, the reference.

One SVD :math:`D = U\Sigma V^\top` serves every :math:`\lambda`:
:math:`g_\lambda^+D^\top u = V\operatorname{diag}(w_i)U^\top u`,
:math:`w_i = \sigma_i/((1-\lambda)+\lambda\sigma_i^2)`
(:func:`~subriemann.linalg.interp_weights`).  Backward stable (no squaring of
the condition number) and an exact cut at :math:`\tau`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from subriemann.linalg.info import SolverInfo
from subriemann.linalg.routes.base import SolverRoute, Threshold
from subriemann.linalg.spectral import interp_weights
from subriemann.linalg.state import PointState

__all__ = ["SVDRoute", "svd_solve", "svd_sharp", "svd_project"]


def svd_solve(state: PointState, rhs: Tensor, lam: float, tau: float,
              weights: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    r""":math:`g_\lambda^+D^\top u = V\operatorname{diag}(w_i\phi_i)U^\top u` from the thin SVD:
    :math:`w_i` of :func:`~subriemann.linalg.interp_weights` (cut at :math:`\tau` when
    :math:`\lambda = 1`), times the spectral ``weights`` :math:`\phi(\sigma_i)` if given."""
    uu, s, v = state.svd
    w = interp_weights(s, lam, tau)
    if weights is not None:
        w = w * weights(s)
    return v @ (w * (uu.T @ rhs))


def svd_sharp(state: PointState, xi: Tensor, lam: float, tau: float, restrict: bool) -> Tensor:
    r""":math:`g_\lambda^+\xi` from the thin SVD; only :math:`\sigma_i > \tau` with ``restrict``.

    .. math:: \sum_{i} \frac{\langle v_i,\xi\rangle}{(1-\lambda)+\lambda\sigma_i^2}v_i
              + \frac{(1 - VV^\top)\xi}{1-\lambda}

    (the sum over :math:`\sigma_i > \tau` at :math:`\lambda = 1` or with
    ``restrict``, which also drops the second term).
    """
    _, s, v = state.svd
    denom = (1.0 - lam) + lam * s**2
    keep = s > tau if (lam == 1.0 or restrict) else torch.ones_like(s, dtype=torch.bool)
    coef = v.T @ xi
    out = v @ torch.where(keep, coef / torch.where(keep, denom, 1.0), 0.0)
    if lam < 1.0 and not restrict:
        out = out + (xi - v @ coef) / (1.0 - lam)
    return out


def svd_project(state: PointState, a: Tensor, tau: float) -> Tensor:
    r""":math:`\bar Pa = \sum_{\sigma_i>\tau}\langle v_i, a\rangle v_i` from the thin SVD."""
    _, s, v = state.svd
    v = v[:, s > tau]
    return v @ (v.T @ a)


class SVDRoute(SolverRoute):
    r"""Thin SVD of the dense :math:`D` (the reference route).

    Cost: form :math:`D` (:math:`QN` VJPs or :math:`K` JVPs), then
    :math:`O(QN\,K\min(QN,K))`; memory :math:`QN\cdot K`.  Accuracy
    :math:`\epsilon\kappa`, exact cut at :math:`\tau`.

    Examples
    --------
    >>> import torch, subriemann as sr
    >>> from subriemann.linalg.routes import SVDRoute, Threshold
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    >>> space = sr.ParameterSpace(net, torch.randn(3, 2), torch.randn(3, 1))
    >>> st = space.point_state(space.initial_point())
    >>> v, info = SVDRoute().solve(st, st.output_grad, 1.0, Threshold())
    >>> torch.allclose(st.jvp(v), st.output_grad), info.solver   # D D^+ g = g (full row rank)
    (True, 'svd')
    """

    name = "svd"
    tags = frozenset({"dense", "exact_cut", "backward_stable"})
    factorization = "svd"

    def solve(
        self, state: PointState, rhs: Tensor, lam: float, threshold: Threshold
    ) -> tuple[Tensor, SolverInfo]:
        state.svd  # noqa: B018  (the threshold then reads the same factorization)
        out = svd_solve(state, rhs, lam, self.tau(state, threshold))
        return out, SolverInfo.direct("svd", "thin SVD")

    def weighted_solve(
        self, state: PointState, rhs: Tensor, weights: Callable[[Tensor], Tensor],
        threshold: Threshold,
    ) -> tuple[Tensor, SolverInfo]:
        state.svd  # noqa: B018
        out = svd_solve(state, rhs, 1.0, self.tau(state, threshold), weights)
        return out, SolverInfo.direct("svd", "thin SVD, spectral weights")

    def sharp(
        self, state: PointState, xi: Tensor, lam: float, threshold: Threshold
    ) -> tuple[Tensor, SolverInfo]:
        state.svd  # noqa: B018  (the threshold then reads the same factorization)
        out = svd_sharp(state, xi, lam, self.tau(state, threshold), restrict=False)
        return out, SolverInfo.direct("svd", "thin SVD")

    def project(
        self, state: PointState, a: Tensor, threshold: Threshold
    ) -> tuple[Tensor, SolverInfo]:
        state.svd  # noqa: B018
        out = svd_project(state, a, self.tau(state, threshold))
        return out, SolverInfo.direct("svd", "thin SVD")

    def restricted_sharp(
        self, state: PointState, xi: Tensor, lam: float, threshold: Threshold
    ) -> tuple[Tensor, SolverInfo]:
        state.svd  # noqa: B018
        out = svd_sharp(state, xi, lam, self.tau(state, threshold), restrict=True)
        return out, SolverInfo.direct("svd", "thin SVD")
