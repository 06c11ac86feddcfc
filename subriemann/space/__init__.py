r"""Parameter space :math:`\mathbb{R}^K` of a network on its training set.

* :mod:`~subriemann.space.parameter_space`: :class:`ParameterSpace`, the
  manifold (geomstats vocabulary: ``base_point``, ``tangent_vec``,
  ``equip_with_metric``), the outputs :math:`x[\theta]` and the cost;
* :mod:`~subriemann.space.coupling`: the check that the model treats samples
  independently, without which :math:`D` would be silently wrong.
"""

from subriemann.space.parameter_space import NonFiniteError, ParameterSpace, output_matrix

__all__ = ["ParameterSpace", "NonFiniteError", "output_matrix"]
