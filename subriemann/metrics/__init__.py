r"""Metrics on parameter space (MATH.md §2).

=========================  ====================================================  ===============================
metric                     tensor at :math:`\theta`                              class
=========================  ====================================================  ===============================
Euclidean                  :math:`1_K`                                           :class:`EuclideanMetric`
output pullback            :math:`D^\top D`                                      :class:`OutputPullbackMetric`
interpolated               :math:`(1-\lambda)1 + \lambda D^\top D`                :class:`InterpolatedMetric`
sub-Riemannian bundle      :math:`g_\lambda` on :math:`\operatorname{ran}D^\top`  :class:`BundleMetric`
pullback of :math:`G(x)`   :math:`D^\top G D`                                    :class:`OutputMetric`
softmax Fisher             :math:`D^\top G_{\rm softmax} D`                      :class:`SoftmaxFisherMetric`
sums, damping              :math:`\sum c_i g_i`, :math:`g + \mu 1`                :class:`SumMetric`, :class:`DampedMetric`
=========================  ====================================================  ===============================
"""

from subriemann.metrics.base import ParameterMetric
from subriemann.metrics.builtin import (
    BundleMetric,
    EuclideanMetric,
    InterpolatedMetric,
    OutputPullbackMetric,
)
from subriemann.metrics.custom import DampedMetric, OutputMetric, SumMetric
from subriemann.metrics.fisher import SoftmaxFisherMetric

__all__ = [
    "ParameterMetric",
    "EuclideanMetric",
    "OutputPullbackMetric",
    "InterpolatedMetric",
    "BundleMetric",
    "OutputMetric",
    "SoftmaxFisherMetric",
    "SumMetric",
    "DampedMetric",
]
