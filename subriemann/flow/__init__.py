r"""Gradient flows :math:`\partial_s\theta = -\operatorname{grad}C(\theta)` of any metric.

The package's public call is :func:`gradient_flow`; its parts, each in its
own module:

* :mod:`subriemann.flow.options`: :class:`FlowOptions`, every option
  validated once;
* :mod:`subriemann.flow.engine`: the integrator loop (the steps themselves
  come from :mod:`subriemann.integrators`);
* :mod:`subriemann.flow.events`: the rank monitor, the location of rank
  events and the step cap near :math:`\tau`;
* :mod:`subriemann.flow.checkpoint`: checkpoint paths, the problem
  fingerprint and the validated read of a checkpoint;
* :mod:`subriemann.flow.batch`: batches of initial points in lock-step rounds.
"""

from subriemann.flow.engine import gradient_flow
from subriemann.flow.options import METHODS, RANK_METHODS, FlowOptions

__all__ = ["gradient_flow", "FlowOptions", "METHODS", "RANK_METHODS"]
