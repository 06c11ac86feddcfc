r"""Engines that evaluate the network and differentiate it: outputs, :math:`D`, its products, NTK.

* :mod:`~subriemann.engines.base`: :class:`ParameterLayout` and the
  :class:`JacobianBackend` protocol, everything the parameter space uses;
* :mod:`~subriemann.engines.func`: :class:`FuncBackend`, generic, any module,
  on :mod:`torch.func`;
* :mod:`~subriemann.engines.structured`: :class:`StructuredBackend`, the
  per-layer structured NTK for common layers, never forming :math:`D`;
* :mod:`~subriemann.engines.select`: :func:`make_backend` picks one.
"""

from subriemann.engines.base import JacobianBackend, ParameterLayout
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
]
