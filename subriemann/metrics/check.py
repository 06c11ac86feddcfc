r"""Gradient check for metrics, in the spirit of pymanopt's ``check_gradient``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from subriemann.metrics import base
from subriemann.validation import check_int, check_real

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
        Dimension of the distribution the directions were drawn from, or
        ``-1`` when they were drawn as ``sharp`` of random covectors
        (large K, no frame formed).
    """

    residuals: Tensor
    max_residual: float
    rtol: float
    passed: bool
    distribution_dim: int

    def __str__(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"gradient check {verdict}: max residual {self.max_residual:.3g} "
            f"(rtol {self.rtol:.1g}) over {self.residuals.numel()} directions, "
            f"distribution dim {self.distribution_dim}"
        )


def check_gradient(
    space,
    base_point: Tensor,
    *,
    n_directions: int = 8,
    rtol: float = 1e-8,
    seed: int = 0,
) -> GradientCheck:
    r"""Verify :math:`g(\operatorname{grad}C, w) = dC(w)` for random :math:`w \in \mathcal{V}`.

    This is the characterization of the Riemannian gradient (docs/theory.md §2,
    §8 item 4; our ``gradient`` is :math:`+\operatorname{grad}C`, the flow
    is its negative), checked for ``space.metric`` at ``base_point``.  It
    works for any metric with ``inner_product`` and ``gradient``, custom
    ones included.  The directions are :math:`w = Fc` with :math:`F` the
    orthonormal frame ``distribution(base_point)`` and :math:`c` standard
    normal; when the metric refuses to form the frame (large K) they are
    :math:`w = \sharp\xi` for random covectors :math:`\xi`, which lie in the
    distribution by definition.

    Parameters
    ----------
    space : ParameterSpace
        Equipped with the metric to check.
    base_point : Tensor, shape=[K]
    n_directions : int
    rtol : float
        Pass when every residual
        :math:`|g(\operatorname{grad}C, w) - dC(w)|/(|dC|\,|w|)` is at most ``rtol``.
    seed : int

    Returns
    -------
    GradientCheck
        Prints as a one-line verdict.

    Examples
    --------
    >>> import torch, subriemann as sr
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    >>> space = sr.ParameterSpace(net, torch.randn(5, 2), torch.randn(5, 1))
    >>> space = space.equip_with_metric(sr.metrics.InterpolatedMetric, lam=0.5)
    >>> sr.check_gradient(space, space.initial_point()).passed
    True
    """
    n_directions = check_int(n_directions, "n_directions", low=1)
    rtol = check_real(rtol, "rtol", low=0.0, low_open=True)
    metric = space.metric
    theta = space.check_point(base_point)
    gen = torch.Generator().manual_seed(seed)
    if space.dim <= base.DENSE_K_LIMIT:  # read at call time (tests lower it)
        frame = metric.distribution(theta)
        coef = torch.randn(frame.shape[1], n_directions, generator=gen, dtype=frame.dtype)
        ws = (frame @ coef.to(frame.device)).T  # [n, K]
        dist_dim = int(frame.shape[1])
    else:
        xis = torch.randn(n_directions, space.dim, generator=gen, dtype=space.dtype).to(
            space.device
        )
        ws = torch.stack([metric.sharp(xi, theta) for xi in xis])
        dist_dim = -1
    grad = metric.gradient(theta)
    dc = space.point_state(theta).cost_grad
    lhs = torch.stack([metric.inner_product(grad, w, theta) for w in ws])
    rhs = ws @ dc
    scale = float(dc.norm()) * ws.norm(dim=1)
    res = (lhs - rhs).abs() / torch.clamp(scale, min=torch.finfo(ws.dtype).tiny)
    m = float(res.max()) if res.numel() else 0.0
    return GradientCheck(res, m, rtol, m <= rtol, dist_dim)
