r"""Gradient flows :math:`\partial_s\theta = -\operatorname{grad}C(\theta)` of any metric.

The package's public call is :func:`gradient_flow`; its parts:

* :mod:`subriemann.flow.engine`: the integrator loop, rank monitor and events;
* :mod:`subriemann.flow.checkpoint`: checkpoint paths, the problem
  fingerprint and the validated restore of a checkpoint.
"""

from subriemann.flow.engine import METHODS, RANK_METHODS, gradient_flow

__all__ = ["gradient_flow", "METHODS", "RANK_METHODS"]
