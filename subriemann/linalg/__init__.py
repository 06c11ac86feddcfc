r"""Numerical linear algebra at one point of parameter space.

* :mod:`~subriemann.linalg.dense`: the point state (:class:`PointState`, one
  factorization of :math:`D` shared by the metric's solve and the rank
  monitor), the solver routes and their size policy, the Krylov solvers;
* :mod:`~subriemann.linalg.nystrom`: the randomized Nyström preconditioner;
* :mod:`~subriemann.linalg.spectral`: :func:`rank_threshold`, the one rule for :math:`\tau`;
* :mod:`~subriemann.linalg.scipy_adapter`: torch products as a SciPy ``LinearOperator``.
"""

from subriemann.linalg.dense import (
    ACCURACY,
    SOLVERS,
    SVD_FALLBACK_LIMIT,
    AccuracyWarning,
    ConvergenceWarning,
    PointState,
    RankThresholdWarning,
    SolverInfo,
    cg,
    check_converged,
    choose_solver,
    gram_rounding,
    interp_weights,
    lsmr,
    prefill_states,
    r_svd,
    refine_push_through,
)
from subriemann.linalg.nystrom import NystromPreconditioner, NystromSolver
from subriemann.linalg.scipy_adapter import scipy_operator
from subriemann.linalg.spectral import rank_threshold

__all__ = [
    "PointState",
    "prefill_states",
    "r_svd",
    "SolverInfo",
    "ConvergenceWarning",
    "RankThresholdWarning",
    "AccuracyWarning",
    "ACCURACY",
    "SVD_FALLBACK_LIMIT",
    "gram_rounding",
    "refine_push_through",
    "SOLVERS",
    "choose_solver",
    "interp_weights",
    "cg",
    "lsmr",
    "check_converged",
    "NystromPreconditioner",
    "NystromSolver",
    "rank_threshold",
    "scipy_operator",
]
