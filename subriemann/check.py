r"""Gradient check for metrics, in the spirit of pymanopt's ``check_gradient``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["GradientCheck", "check_gradient"]


@dataclass
class GradientCheck:
    r"""Result of :func:`check_gradient`.

    Attributes
    ----------
    residuals : Tensor, shape=[n_directions]
        :math:`|g(\operatorname{grad}C, w) - dC(w)| / (|dC|\,|w|)` for each random
        :math:`w` in the distribution.
    max_residual : float
    rtol : float
        The tolerance ``passed`` was judged by.
    passed : bool
    distribution_dim : int
    """

    residuals: Tensor
    max_residual: float
    rtol: float
    passed: bool
    distribution_dim: int


def check_gradient(
    space,
    base_point: Tensor,
    *,
    n_directions: int = 8,
    rtol: float = 1e-8,
    seed: int = 0,
) -> GradientCheck:
    r"""Verify :math:`g(\operatorname{grad}C, w) = dC(w)` for random :math:`w \in \mathcal{V}`.

    This is the characterization of the Riemannian gradient (MATH.md §2,
    §8 item 4), checked for ``space.metric`` at ``base_point``: it works for
    any metric with ``distribution``, ``inner_product`` and ``gradient``,
    custom ones included.

    Parameters
    ----------
    space : ParameterSpace
        Equipped with the metric to check.
    base_point : Tensor, shape=[K]
    n_directions : int
    rtol : float
    seed : int

    Returns
    -------
    GradientCheck
    """
    metric = space.metric
    theta = space.check_point(base_point)
    frame = metric.distribution(theta)
    gen = torch.Generator().manual_seed(seed)
    coef = torch.randn(frame.shape[1], n_directions, generator=gen, dtype=frame.dtype)
    ws = (frame @ coef.to(frame.device)).T  # [n, K]
    grad = metric.gradient(theta)
    dc = space.point_state(theta).cost_grad
    lhs = metric.inner_product(grad.expand_as(ws), ws, theta)
    rhs = ws @ dc
    scale = float(dc.norm()) * ws.norm(dim=1)
    res = (lhs - rhs).abs() / torch.clamp(scale, min=torch.finfo(ws.dtype).tiny)
    m = float(res.max()) if res.numel() else 0.0
    return GradientCheck(res, m, rtol, m <= rtol, frame.shape[1])
