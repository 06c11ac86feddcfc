r"""``AutoRoute``: the route for a problem's size, chosen by the one size policy.

Like lineax's ``AutoLinearSolver``, :class:`AutoRoute` is itself a route: at
each point it selects a concrete route from the sizes of :math:`D`
(:func:`~subriemann.linalg.size_policy`) and the tags it is asked to require,
and delegates to it.  A metric built with ``solver="auto"`` asks it once, at
construction (:meth:`AutoRoute.select`), so that ``metric.solver`` names the
route that runs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor

from subriemann.linalg.info import ACCURACY, SolverInfo
from subriemann.linalg.routes.base import TAGS, SolverRoute, Threshold
from subriemann.linalg.routes.lstsq import LstsqRoute
from subriemann.linalg.routes.matrix_free import MatrixFreeRoute
from subriemann.linalg.routes.ntk import NTKRoute
from subriemann.linalg.routes.nystrom import NystromRoute
from subriemann.linalg.routes.svd import SVDRoute
from subriemann.linalg.spectral import size_policy
from subriemann.linalg.state import PointState

__all__ = ["AutoRoute", "ROUTES", "SOLVERS", "make_route", "choose_solver"]

ROUTES: dict[str, type[SolverRoute]] = {
    "svd": SVDRoute,
    "ntk": NTKRoute,
    "lstsq": LstsqRoute,
    "matrix_free": MatrixFreeRoute,
    "nystrom": NystromRoute,
}
"""The concrete routes by their ``solver=`` name."""

SOLVERS = ("auto", *ROUTES)
"""Every ``solver=`` string a metric accepts."""

# the order in which a route is tried when the size policy's route lacks a required tag
_FALLBACK_ORDER = ("ntk", "svd", "matrix_free")


class AutoRoute(SolverRoute):
    r"""The fastest route that meets the accuracy contract for the size of :math:`D`.

    Parameters
    ----------
    require : iterable of str
        Tags (:data:`~subriemann.linalg.routes.TAGS`) the chosen route must carry,
        e.g. ``{"exact_cut"}`` to never take a Krylov route.  When the route of
        :func:`~subriemann.linalg.size_policy` lacks one, the first of ``ntk``,
        ``svd``, ``matrix_free`` that has them all is taken.
    rtol, maxiter, accuracy
        Options passed to the route that is built (those it takes).

    Examples
    --------
    >>> AutoRoute().select(24, 1441).name, AutoRoute().select(30_000, 40_000).name
    ('svd', 'matrix_free')
    >>> AutoRoute(require={"exact_cut"}).select(30_000, 40_000).name
    'ntk'
    """

    name = "auto"

    def __init__(
        self,
        require: Iterable[str] = (),
        *,
        rtol: float = 1e-12,
        maxiter: int | None = None,
        accuracy: float = ACCURACY,
    ) -> None:
        self.require = frozenset(require)
        unknown = sorted(self.require - set(TAGS))
        if unknown:
            raise ValueError(f"unknown route tags {unknown}; known: {sorted(TAGS)}")
        self.options: dict[str, Any] = dict(rtol=rtol, maxiter=maxiter, accuracy=accuracy)
        self._chosen: dict[tuple[int, int], SolverRoute] = {}

    def route_name(self, qn: int, k: int) -> str:
        """The name of the route for :math:`D` of shape ``(qn, k)`` under ``require``."""
        name = size_policy(qn, k)
        if self.require <= ROUTES[name].tags:
            return name
        for other in _FALLBACK_ORDER:
            if self.require <= ROUTES[other].tags:
                return other
        raise ValueError(f"no route carries all of the tags {sorted(self.require)}")

    def select(self, qn: int, k: int) -> SolverRoute:
        """The route (built once per size) for :math:`D` of shape ``(qn, k)``."""
        if (qn, k) not in self._chosen:
            self._chosen[(qn, k)] = make_route(self.route_name(qn, k), **self.options)
        return self._chosen[(qn, k)]

    def resolve(self, qn: int, k: int) -> SolverRoute:
        """:meth:`select`: the concrete route for this size."""
        return self.select(qn, k)

    def _at(self, state: PointState) -> SolverRoute:
        return self.select(state.space.output_dim, state.space.dim)

    def singular_values(self, state: PointState) -> Tensor:
        return self._at(state).singular_values(state)

    def spectrum(self, state: PointState, lam: float) -> Tensor:
        return self._at(state).spectrum(state, lam)

    def prepare(self, state: PointState) -> None:
        self._at(state).prepare(state)

    def solve(self, state: PointState, rhs: Tensor, lam: float, threshold: Threshold
              ) -> tuple[Tensor, SolverInfo]:
        return self._at(state).solve(state, rhs, lam, threshold)

    def weighted_solve(self, state: PointState, rhs: Tensor,
                       weights: Callable[[Tensor], Tensor], threshold: Threshold
                       ) -> tuple[Tensor, SolverInfo] | None:
        return self._at(state).weighted_solve(state, rhs, weights, threshold)

    def sharp(self, state: PointState, xi: Tensor, lam: float, threshold: Threshold
              ) -> tuple[Tensor, SolverInfo]:
        return self._at(state).sharp(state, xi, lam, threshold)

    def project(self, state: PointState, a: Tensor, threshold: Threshold
                ) -> tuple[Tensor, SolverInfo]:
        return self._at(state).project(state, a, threshold)

    def restricted_sharp(self, state: PointState, xi: Tensor, lam: float, threshold: Threshold
                         ) -> tuple[Tensor, SolverInfo]:
        return self._at(state).restricted_sharp(state, xi, lam, threshold)

    def bundle_solve(self, state: PointState, rhs: Tensor, lam: float, threshold: Threshold
                     ) -> tuple[Tensor, SolverInfo]:
        return self._at(state).bundle_solve(state, rhs, lam, threshold)

    def description(self) -> dict[str, object]:
        return {"solver": self.name, "require": sorted(self.require)}


def make_route(solver: str | SolverRoute, **options: Any) -> SolverRoute:
    r"""The route for a ``solver=`` argument: a name, or a route (returned as it is).

    Parameters
    ----------
    solver : str or SolverRoute
        One of :data:`SOLVERS`, or a :class:`~subriemann.linalg.routes.SolverRoute`.
    **options
        ``rtol``, ``maxiter``, ``accuracy``: passed to the route class where
        its constructor takes them (``"svd"`` and ``"lstsq"`` take none).

    Raises
    ------
    TypeError
        ``solver`` is neither a string nor a route.
    ValueError
        An unknown name.

    Examples
    --------
    >>> make_route("ntk", accuracy=1e-9)
    NTKRoute(accuracy=1e-09)
    """
    if isinstance(solver, SolverRoute):
        return solver
    if not isinstance(solver, str):
        raise TypeError(
            f"solver must be a string, one of {SOLVERS}, or a SolverRoute, "
            f"got {type(solver).__name__}"
        )
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if solver == "auto":
        return AutoRoute(**options)
    cls = ROUTES[solver]
    takes = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in options.items() if k in takes})


def choose_solver(space: Any, solver: str = "auto") -> str:
    r"""The name of the route that ``solver`` runs for ``space`` (``"auto"`` resolved by size).

    Parameters
    ----------
    space : ParameterSpace
        Gives :math:`QN` (``output_dim``) and :math:`K` (``dim``).
    solver : str
        One of :data:`SOLVERS`.
    """
    return make_route(solver).resolve(space.output_dim, space.dim).name
