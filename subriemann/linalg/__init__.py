r"""Numerical linear algebra at one point of parameter space.

* :mod:`~subriemann.linalg.state`: the point state (:class:`PointState`, one
  factorization of :math:`D` shared by the metric's solve and the rank
  monitor) and :func:`prefill_states` (several points at once);
* :mod:`~subriemann.linalg.routes`: the solver routes, one class each
  (:class:`~subriemann.linalg.routes.SVDRoute`, ``NTKRoute``, ``LstsqRoute``,
  ``MatrixFreeRoute``, ``NystromRoute``, and ``AutoRoute`` that picks one by size);
* :mod:`~subriemann.linalg.krylov`: conjugate gradients and LSMR on torch operators;
* :mod:`~subriemann.linalg.info`: :class:`SolverInfo` and the warnings of a solve
  that misses its tolerance;
* :mod:`~subriemann.linalg.spectral`: :func:`rank_threshold` (the one rule for
  :math:`\tau`), :func:`interp_weights`, :func:`r_svd`, :func:`gram_rounding`, and
  the size policy (:func:`size_policy`, :func:`dense_svd_fits`);
* :mod:`~subriemann.linalg.scipy_adapter`: torch products as a SciPy ``LinearOperator``.
"""

from subriemann.linalg.info import (
    ACCURACY,
    AccuracyWarning,
    ConvergenceWarning,
    RankThresholdWarning,
    SolverInfo,
    check_converged,
)
from subriemann.linalg.krylov import cg, lsmr, pcg
from subriemann.linalg.routes import (
    SOLVERS,
    SVD_FALLBACK_LIMIT,
    AutoRoute,
    LstsqRoute,
    MatrixFreeRoute,
    NTKRoute,
    NystromPreconditioner,
    NystromRoute,
    NystromSolver,
    SolverRoute,
    SVDRoute,
    Threshold,
    choose_solver,
    make_route,
    refine_push_through,
)
from subriemann.linalg.scipy_adapter import scipy_operator
from subriemann.linalg.spectral import (
    DENSE_LIMIT,
    NTK_LIMIT,
    SMALL_DENSE_LIMIT,
    dense_svd_fits,
    eigenvalue_rounding,
    gram_rounding,
    interp_weights,
    r_svd,
    rank_threshold,
    size_policy,
)
from subriemann.linalg.state import BATCH_ENTRIES, PointState, prefill_states

__all__ = [
    "PointState",
    "prefill_states",
    "BATCH_ENTRIES",
    "SolverRoute",
    "Threshold",
    "SVDRoute",
    "NTKRoute",
    "LstsqRoute",
    "MatrixFreeRoute",
    "NystromRoute",
    "AutoRoute",
    "make_route",
    "SOLVERS",
    "choose_solver",
    "SolverInfo",
    "ConvergenceWarning",
    "RankThresholdWarning",
    "AccuracyWarning",
    "ACCURACY",
    "check_converged",
    "SVD_FALLBACK_LIMIT",
    "refine_push_through",
    "cg",
    "pcg",
    "lsmr",
    "NystromPreconditioner",
    "NystromSolver",
    "rank_threshold",
    "interp_weights",
    "r_svd",
    "gram_rounding",
    "eigenvalue_rounding",
    "size_policy",
    "dense_svd_fits",
    "SMALL_DENSE_LIMIT",
    "DENSE_LIMIT",
    "NTK_LIMIT",
    "scipy_operator",
]
