r"""subriemann: the differential geometry of neural-network training.

Parameter space :math:`\mathbb{R}^K` of a network on its training set, with
pluggable metric tensors, gradient flows derived as Riemannian gradients,
rank monitoring, critical submanifolds and the predictions of
[CM24]/[Che23] checked numerically.  See ``docs/`` (the mathematics: ``docs/theory.md``).

Importing subriemann selects geomstats' pytorch backend (raising a clear
error if geomstats already runs another backend) and leaves
:func:`torch.get_default_dtype` unchanged.
"""

from subriemann import _compat
from subriemann._geomstats import import_geomstats as _import_geomstats

_compat.install()
_import_geomstats()

from subriemann import analysis, losses, metrics, optim  # noqa: E402
from subriemann.flow import gradient_flow  # noqa: E402
from subriemann.flow.trajectory import FlowStatus, RankChange, Trajectory  # noqa: E402
from subriemann.metrics.check import GradientCheck, check_gradient  # noqa: E402
from subriemann.space import NonFiniteError, ParameterSpace  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ParameterSpace",
    "NonFiniteError",
    "metrics",
    "losses",
    "analysis",
    "optim",
    "check_gradient",
    "gradient_flow",
    "Trajectory",
    "RankChange",
    "FlowStatus",
    "GradientCheck",
    "__version__",
]
