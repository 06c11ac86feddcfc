r"""Output-space flows of the linearized model (D frozen).

Freezing :math:`D = D[\theta]` turns every flow of the family into an ODE in
output space,

.. math:: \partial_s x = -\mathcal K_\lambda \nabla_x C(x), \qquad
          \mathcal K_\lambda = DD^\top\bigl((1-\lambda)1 + \lambda DD^\top\bigr)^+,

with eigenvalues :math:`\kappa_i = \sigma_i^2/((1-\lambda)+\lambda\sigma_i^2)`
(at :math:`\lambda = 1`: 1 on :math:`\operatorname{ran}D`, 0 elsewhere).  For
MSE the solution is closed form (docs/theory.md §8 item 5):

.. math:: x(s) = y + \exp(-s\mathcal K_\lambda)(x(0) - y).

Comparing it with :func:`~subriemann.gradient_flow` on the network shows how
far training is from its linearization.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from subriemann.integrators import TABLEAUS, rk_step
from subriemann.linalg import rank_threshold
from subriemann.metrics.interpolated import check_lam

__all__ = ["OutputFlow", "output_flow", "kernel_eigh"]


@dataclass
class OutputFlow:
    """Outputs of the linearized flow at times ``s``: ``outputs`` ``[T, QN]``, ``cost`` ``[T]``."""

    s: Tensor
    outputs: Tensor
    cost: Tensor
    lam: float
    kappa: Tensor

    @property
    def t(self) -> Tensor:
        """:math:`t = 1 - e^{-s}`."""
        return -torch.expm1(-self.s)


def kernel_eigh(space, theta: Tensor, lam: float, rank_rtol: float = 1e-6) -> tuple[Tensor, Tensor]:
    r"""Eigendecomposition :math:`\mathcal K_\lambda = U\operatorname{diag}(\kappa)U^\top` at θ.

    Returns ``(U, kappa)`` with ``U`` of shape ``[QN, QN]`` (full orthonormal
    basis of output space) and ``kappa`` of shape ``[QN]``.
    """
    lam = check_lam(lam)
    ntk = space.point_state(theta).ntk
    evals, u = torch.linalg.eigh(0.5 * (ntk + ntk.T))
    sig2 = evals.clamp_min(0.0)
    tau2 = rank_threshold(float(sig2.max()) ** 0.5, rank_rtol) ** 2
    denom = (1.0 - lam) + lam * sig2
    if lam == 1.0:
        keep = sig2 > tau2
        kappa = torch.where(keep, sig2 / torch.where(keep, denom, 1.0), 0.0)
    else:
        kappa = sig2 / denom
    return u, kappa


def output_flow(
    space,
    theta: Tensor,
    s: Sequence[float] | Tensor,
    *,
    lam: float = 1.0,
    rank_rtol: float = 1e-6,
    n_steps: int = 2000,
) -> OutputFlow:
    r"""Flow of the linearized model :math:`\partial_s x = -\mathcal K_\lambda\nabla_x C`.

    Parameters
    ----------
    space : ParameterSpace
    theta : Tensor, shape=[K]
        Where :math:`D` is frozen; :math:`x(0) = x[\theta]`.
    s : sequence of float
        Times at which to return the outputs (non-negative, increasing).
    lam : float
        :math:`\lambda \in [0, 1]`.
    rank_rtol : float
        Rank threshold on singular values (relative), used at :math:`\lambda = 1`.
    n_steps : int
        RK4 steps up to ``max(s)`` for losses other than MSE (which is exact).
    """
    s_t = torch.as_tensor(s, dtype=space.dtype)
    if s_t.ndim != 1 or s_t.numel() == 0 or bool((s_t < 0).any()):
        raise ValueError("s must be a non-empty 1-D sequence of non-negative times")
    u, kappa = kernel_eigh(space, theta, lam, rank_rtol)
    x0 = space.point_state(theta).outputs
    y = space.y
    if getattr(space.loss, "name", "") == "mse":
        r0 = u.T @ (x0 - y)
        xs = y + (torch.exp(-s_t[:, None] * kappa[None, :]) * r0[None, :]) @ u.T
    else:
        k_mat = (u * kappa) @ u.T

        def field(x: Tensor) -> Tensor:
            return -k_mat @ space.output_grad(x)

        order = torch.argsort(s_t)
        xs_sorted = []
        x, cur = x0.clone(), 0.0
        h_max = float(s_t.max()) / max(n_steps, 1) if float(s_t.max()) > 0 else 1.0
        for target in s_t[order].tolist():
            while cur < target:
                h = min(h_max, target - cur)
                x = rk_step(TABLEAUS["rk4"], field, x, h)[0]
                cur += h
            xs_sorted.append(x.clone())
        xs = torch.empty(len(xs_sorted), x0.shape[0], dtype=x0.dtype)
        xs[order] = torch.stack(xs_sorted)
    cost = torch.stack([space.output_cost(x) for x in xs])
    return OutputFlow(s_t, xs, cost, float(lam), kappa)
