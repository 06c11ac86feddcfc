r"""Engines that evaluate the network and differentiate it: outputs, :math:`D`, its products, NTK.

* :mod:`~subriemann.engines.base`: :class:`ParameterLayout` and the
  :class:`JacobianBackend` protocol, everything the parameter space uses;
* :mod:`~subriemann.engines.func`: :class:`FuncBackend`, generic, any module,
  on :mod:`torch.func`;
* :mod:`~subriemann.engines.structured`: :class:`StructuredBackend`, the
  per-layer structured NTK for common layers, never forming :math:`D`;
* :mod:`~subriemann.engines.kspace`: :math:`D^\top D` and its shifted solves from
  the structured engine's layer factors (the parameter-space route when :math:`K < QN`);
* :mod:`~subriemann.engines.mixed`: those solves from a ``float32`` factorization refined
  to ``float64`` accuracy (large convolutional networks);
* the one memory budget of the engines: :data:`MEMORY_BUDGET`, :func:`items_within`
  (:class:`~subriemann.engines.structured.MemoryPlan` shares it out);
* :mod:`~subriemann.engines.select`: :func:`make_backend` picks one.
"""

from subriemann.engines.base import MEMORY_BUDGET, JacobianBackend, ParameterLayout, items_within
from subriemann.engines.func import FuncBackend
from subriemann.engines.select import make_backend
from subriemann.engines.structured import StructuredBackend, UnsupportedModuleError

__all__ = [
    "JacobianBackend",
    "ParameterLayout",
    "FuncBackend",
    "StructuredBackend",
    "UnsupportedModuleError",
    "make_backend",
    "MEMORY_BUDGET",
    "items_within",
]
