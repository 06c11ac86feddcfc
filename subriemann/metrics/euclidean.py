r"""The Euclidean metric :math:`1_K`: ordinary gradient flow (docs/theory.md §2)."""

from __future__ import annotations

import torch
from torch import Tensor

from subriemann.metrics.base import ParameterMetric

__all__ = ["EuclideanMetric"]


class EuclideanMetric(ParameterMetric):
    r"""The Euclidean metric :math:`1_K`: ordinary gradient flow.

    :math:`\operatorname{grad} C = D^\top\nabla_x C`; its output-space velocity
    is :math:`-DD^\top\nabla_x C` (the NTK, [CM24] (2.17)).  This is
    :class:`~subriemann.metrics.InterpolatedMetric` at :math:`\lambda = 0`,
    implemented without any solve.  Geodesics are straight lines.

    Examples
    --------
    >>> import torch, subriemann as sr
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    >>> space = sr.ParameterSpace(net, torch.randn(3, 2), torch.randn(3, 1))
    >>> theta = space.initial_point()
    >>> torch.equal(EuclideanMetric(space).gradient(theta), space.cost_grad(theta))
    True
    """

    lam = 0.0

    @property
    def is_euclidean(self) -> bool:
        """``True``: the gradient is :math:`D^\\top\\nabla_x C`, no solve."""
        return True

    @property
    def field_may_jump(self) -> bool:
        """``False``: the gradient :math:`D^\\top\\nabla_x C` does not depend on :math:`\\tau`."""
        return False

    def metric_matrix(self, base_point: Tensor) -> Tensor:
        self._require_small_k("metric_matrix")
        eye = torch.eye(self._space.dim, dtype=base_point.dtype, device=base_point.device)
        return eye.expand(*base_point.shape[:-1], *eye.shape).clone()

    def metric_vec(self, tangent_vec: Tensor, base_point: Tensor) -> Tensor:
        return self._check_tangent(tangent_vec).clone()

    def inner_product(self, tangent_vec_a, tangent_vec_b, base_point=None):
        a = self._check_tangent(tangent_vec_a, "tangent_vec_a")
        b = self._check_tangent(tangent_vec_b, "tangent_vec_b")
        return (a * b).sum(-1)

    def sharp(self, cotangent_vec: Tensor, base_point: Tensor) -> Tensor:
        return self._check_tangent(cotangent_vec, "cotangent_vec").clone()

    def sharp_pullback(self, output_covec: Tensor, base_point: Tensor) -> Tensor:
        u = self._space.check_output_vec(output_covec)
        return self.state(base_point).vjp(u)

    def gradient(self, base_point: Tensor) -> Tensor:
        return self.state(base_point).cost_grad

    def distribution(self, base_point: Tensor) -> Tensor:
        self._require_small_k("distribution")
        return torch.eye(self._space.dim, dtype=self._space.dtype, device=self._space.device)

    def christoffels(self, base_point: Tensor) -> Tensor:
        k = self._space.dim
        return torch.zeros(*base_point.shape[:-1], k, k, k, dtype=base_point.dtype)

    def geodesic_equation(self, state: Tensor) -> Tensor:
        return torch.stack([state[..., 1, :], torch.zeros_like(state[..., 1, :])], dim=-2)

    def exp(self, tangent_vec: Tensor, base_point: Tensor) -> Tensor:
        """:math:`\\theta + v`: geodesics of the Euclidean metric are straight lines."""
        return base_point + tangent_vec
