r"""Critical points of :math:`C`, their local dimension, and continuation along critical sets.

docs/theory.md §5: every flow of the family stops exactly where
:math:`F(\theta) := \nabla_\theta C = D^\top\nabla_x C = 0`.  With full rank
:math:`QN` this forces :math:`\nabla_x C = 0` (a global minimum for MSE), so
a *non-global* equilibrium needs rank loss; such equilibria are generically
not isolated but fill critical submanifolds, on each connected component of
which :math:`C` is constant.

The package answers two questions about a point :math:`\theta^*`, one module
per step:

* :mod:`~subriemann.analysis.critical.spectrum`: the Hessian
  :math:`\nabla^2_\theta C` as an operator (Hessian-vector products), its
  dense or Lanczos (ARPACK) spectrum and the kernel cut;
* :mod:`~subriemann.analysis.critical.classify`: **what is it?**
  :func:`classify_equilibrium` reports the gradient, the cost, the rank of
  :math:`D`, the Hessian spectrum, the dimension of the critical set through
  :math:`\theta^*` and the index, as an :class:`EquilibriumReport`;
* :mod:`~subriemann.analysis.critical.refine`: the corrector, damped
  minimum-norm Newton steps onto :math:`\{F = 0\}`
  (:func:`refine_critical_point`);
* :mod:`~subriemann.analysis.critical.tracker`: **where does the set go?**
  :func:`track_critical_set` walks along it by predictor–corrector
  continuation (a :class:`CriticalSetTracker`) and returns a
  :class:`CriticalSet` whose ``graph`` (a :class:`networkx.Graph`) has the
  sampled critical points as nodes and the continuation steps as edges.

The plot of a critical set lives in the application layer:
:func:`subriemann.app.plots_analysis.plot_critical_set`.
"""

from __future__ import annotations

from subriemann.analysis.critical.classify import EquilibriumReport, classify_equilibrium
from subriemann.analysis.critical.refine import refine_critical_point
from subriemann.analysis.critical.spectrum import (
    DENSE_HESSIAN_LIMIT,
    HESSIAN_METHODS,
    HessianOperator,
    hessian_vector_product,
)
from subriemann.analysis.critical.tracker import (
    ComponentInfo,
    CriticalSet,
    CriticalSetTracker,
    TrackingOptions,
    track_critical_set,
)
from subriemann.analysis.moved import moved_getattr

__all__ = [
    "EquilibriumReport",
    "CriticalSet",
    "ComponentInfo",
    "CriticalSetTracker",
    "TrackingOptions",
    "HessianOperator",
    "classify_equilibrium",
    "refine_critical_point",
    "track_critical_set",
    "hessian_vector_product",
    "HESSIAN_METHODS",
    "DENSE_HESSIAN_LIMIT",
]

__getattr__ = moved_getattr(__name__, ["plot_critical_set"])
