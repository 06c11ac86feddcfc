r"""The softmax Fisher metric for classification (docs/theory.md §6).

For cross-entropy on logits, the output-space Hessian of the cost is the
block-diagonal matrix

.. math:: G(x) = \operatorname{blockdiag}_j
          \bigl(\operatorname{diag}\sigma_j - \sigma_j\sigma_j^\top\bigr),
          \qquad \sigma_j = \operatorname{softmax}(x_j),

which is also the Fisher information of the categorical model in logit
coordinates.  Its pullback :math:`F = D^\top G D` is the Fisher information
matrix of the network (equal to the generalized Gauss–Newton matrix for
cross-entropy), so the flow of this metric is the **natural-gradient flow**
:math:`\partial_s\theta = -F^+\nabla_\theta C`.

Each block has kernel :math:`\operatorname{span}\{1\}` (Lemma 2.6): shifting a
sample's logits by a constant changes nothing.  So :math:`G` is singular and
:math:`F` is degenerate even when :math:`D` has full rank: this is a
sub-Riemannian case, and ``sharp`` works on the distribution where :math:`F`
is positive.
"""

from __future__ import annotations

import torch
from torch import Tensor

from subriemann.losses import CrossEntropyLoss
from subriemann.metrics.custom import OutputMetric

__all__ = ["SoftmaxFisherMetric", "softmax_fisher_blocks"]


def softmax_fisher_blocks(x: Tensor, num_outputs: int) -> Tensor:
    r"""Blocks :math:`\operatorname{diag}\sigma_j - \sigma_j\sigma_j^\top`, shape ``[N, Q, Q]``.

    The cross-entropy loss's Hessian blocks
    (:meth:`~subriemann.losses.CrossEntropyLoss.hessian_blocks`), ``x`` flat ``[QN]``.
    """
    return CrossEntropyLoss.hessian_blocks(x.reshape(-1, num_outputs))


class SoftmaxFisherMetric(OutputMetric):
    r"""Fisher/softmax metric :math:`D^\top G(x) D` with :math:`G` the softmax Fisher blocks.

    Parameters
    ----------
    space : ParameterSpace
        Usually with ``loss="cross_entropy"``; needs :math:`Q \ge 2`.
    rank_rtol, rank_atol, exp_steps
        See :class:`~subriemann.metrics.ParameterMetric`.
    """

    def __init__(self, space, **kwargs) -> None:
        if space.num_outputs < 2:
            raise ValueError("SoftmaxFisherMetric needs Q >= 2 outputs (logits) per sample")
        super().__init__(space, output_metric=self._fisher_matrix, **kwargs)

    def _fisher_matrix(self, x: Tensor) -> Tensor:
        return torch.block_diag(*softmax_fisher_blocks(x, self._space.num_outputs))

    def output_metric_vec(self, x: Tensor, u: Tensor) -> Tensor:
        r""":math:`G(x)u = \sigma\odot u - \sigma\langle\sigma, u\rangle` per sample.

        The cross-entropy loss's Hessian product
        (:meth:`~subriemann.losses.CrossEntropyLoss.hessian_vec`).
        """
        q = self._space.num_outputs
        return CrossEntropyLoss.hessian_vec(x.reshape(-1, q), u.reshape(-1, q)).reshape(-1)
