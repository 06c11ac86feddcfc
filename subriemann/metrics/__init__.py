r"""Metrics on parameter space (docs/theory.md §2).

Each row of the table of docs/theory.md §2 is a class (see ``docs/metrics.md``):

* Euclidean, :math:`1_K`: :class:`EuclideanMetric`;
* output pullback, :math:`D^\top D`: :class:`OutputPullbackMetric`;
* interpolated, :math:`g_\lambda = (1-\lambda)1 + \lambda D^\top D`: :class:`InterpolatedMetric`;
* sub-Riemannian bundle, :math:`g_\lambda` on :math:`\operatorname{ran}D^\top`:
  :class:`BundleMetric`.

Custom metrics:

* pullback :math:`D^\top G(x) D` of an output metric: :class:`OutputMetric`;
* softmax Fisher (natural gradient): :class:`SoftmaxFisherMetric`;
* sums :math:`\sum_i c_i g_i` and damping :math:`g + \mu 1`: :class:`SumMetric`,
  :class:`DampedMetric`;
* anything with a ``metric_matrix``: subclass :class:`ParameterMetric`.
"""

from subriemann.metrics.base import ParameterMetric, SumMetric
from subriemann.metrics.builtin import (
    BundleMetric,
    EuclideanMetric,
    InterpolatedMetric,
    OutputPullbackMetric,
)
from subriemann.metrics.custom import DampedMetric, OutputMetric
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
