r"""Metrics on parameter space (docs/theory.md §2).

Each row of the table of docs/theory.md §2 is a class (see ``docs/metrics.md``):

* Euclidean, :math:`1_K`: :class:`EuclideanMetric` (:mod:`~subriemann.metrics.euclidean`);
* output pullback, :math:`D^\top D`: :class:`OutputPullbackMetric`
  (:mod:`~subriemann.metrics.pullback`);
* interpolated, :math:`g_\lambda = (1-\lambda)1 + \lambda D^\top D`: :class:`InterpolatedMetric`
  (:mod:`~subriemann.metrics.interpolated`), which holds a solver route
  (:mod:`subriemann.linalg.routes`);
* sub-Riemannian bundle, :math:`g_\lambda` on :math:`\operatorname{ran}D^\top`:
  :class:`BundleMetric` (:mod:`~subriemann.metrics.bundle`).

Custom metrics:

* pullback :math:`D^\top G(x) D` of an output metric: :class:`OutputMetric`;
* softmax Fisher (natural gradient): :class:`SoftmaxFisherMetric`;
* sums :math:`\sum_i c_i g_i` and damping :math:`g + \mu 1`: :class:`SumMetric`,
  :class:`DampedMetric`;
* anything with a ``metric_matrix``: subclass :class:`ParameterMetric`.

A flow asks a metric for its capabilities (:attr:`ParameterMetric.is_euclidean`,
:attr:`ParameterMetric.field_may_jump`, :attr:`ParameterMetric.gradient_needs`),
never for its class.
"""

from subriemann.metrics.base import ParameterMetric, SumMetric
from subriemann.metrics.bundle import BundleMetric
from subriemann.metrics.custom import DampedMetric, OutputMetric
from subriemann.metrics.euclidean import EuclideanMetric
from subriemann.metrics.fisher import SoftmaxFisherMetric
from subriemann.metrics.interpolated import InterpolatedMetric, check_lam
from subriemann.metrics.pullback import OutputPullbackMetric

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
    "check_lam",
]
