r"""Solver routes: one class per way of solving :math:`g_\lambda` at a point.

* :mod:`~subriemann.linalg.routes.base`: :class:`SolverRoute` (the interface:
  ``solve``, ``sharp``, ``project``, ``restricted_sharp``, ``singular_values``,
  tags) and :class:`Threshold`;
* :mod:`~subriemann.linalg.routes.svd`: :class:`SVDRoute`, the thin SVD (the reference);
* :mod:`~subriemann.linalg.routes.ntk`: :class:`NTKRoute`, push-through in the
  smaller space with the :math:`\lambda = 1` accuracy guarantee
  (:func:`refine_push_through`);
* :mod:`~subriemann.linalg.routes.lstsq`: :class:`LstsqRoute`, LAPACK least squares;
* :mod:`~subriemann.linalg.routes.matrix_free`: :class:`MatrixFreeRoute`, CG and LSMR;
* :mod:`~subriemann.linalg.routes.nystrom`: :class:`NystromRoute`, Nyström-preconditioned CG;
* :mod:`~subriemann.linalg.routes.auto`: :class:`AutoRoute`, the route for a size
  (:func:`~subriemann.linalg.size_policy`), and :func:`make_route`.
"""

from subriemann.linalg.routes.auto import ROUTES, SOLVERS, AutoRoute, choose_solver, make_route
from subriemann.linalg.routes.base import TAGS, SolverRoute, Threshold
from subriemann.linalg.routes.lstsq import LstsqRoute
from subriemann.linalg.routes.matrix_free import MatrixFreeRoute
from subriemann.linalg.routes.ntk import SVD_FALLBACK_LIMIT, NTKRoute, refine_push_through
from subriemann.linalg.routes.nystrom import (
    NystromPreconditioner,
    NystromRoute,
    NystromSolver,
    nystrom_sketch,
)
from subriemann.linalg.routes.svd import SVDRoute

__all__ = [
    "SolverRoute",
    "Threshold",
    "TAGS",
    "SVDRoute",
    "NTKRoute",
    "LstsqRoute",
    "MatrixFreeRoute",
    "NystromRoute",
    "AutoRoute",
    "ROUTES",
    "SOLVERS",
    "make_route",
    "choose_solver",
    "refine_push_through",
    "SVD_FALLBACK_LIMIT",
    "NystromPreconditioner",
    "NystromSolver",
    "nystrom_sketch",
]
