r"""What a point :math:`\theta` is: gradient, cost, rank of :math:`D`, Hessian, dimension, index.

:func:`classify_equilibrium` reports the gradient, the cost, the rank of
:math:`D` and the split :math:`\nabla_x C = P\nabla_x C + P^\perp\nabla_x C`,
the spectrum of the Hessian :math:`\nabla^2_\theta C`
(:mod:`~subriemann.analysis.critical.spectrum`), the estimated dimension of
the critical set through :math:`\theta` (the dimension of the Hessian's
kernel, read off at the largest eigenvalue gap) and the index (number of
negative eigenvalues).

The dimension estimate
----------------------
If the critical set :math:`Z` is a manifold through :math:`\theta^*`,
:math:`T_{\theta^*}Z \subset \ker\nabla^2C(\theta^*)`, with equality when
:math:`Z` is non-degenerate in the normal directions (Morse–Bott).  The gap
at the kernel cut is reported; below ``min_gap`` the estimate is flagged
unreliable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from subriemann.analysis.critical.spectrum import (
    DENSE_HESSIAN_LIMIT,
    HessianOperator,
    HessianSpectrum,
    check_space,
    hessian_method,
    hessian_spectrum,
)
from subriemann.linalg import rank_threshold
from subriemann.space import ParameterSpace
from subriemann.validation import check_int, check_optional, check_real

__all__ = [
    "EquilibriumReport",
    "classify_equilibrium",
    "equilibrium_report",
    "report_options",
    "singular_state",
]


@dataclass
class EquilibriumReport:
    r"""What a point :math:`\theta` is: gradient, cost, rank, Hessian spectrum, dimension, index.

    Attributes
    ----------
    grad_norm : float
        :math:`|\nabla_\theta C| = |D^\top\nabla_x C|`.
    relative_grad : float
        :math:`|D^\top\nabla_x C| / (\sigma_{\max}(D)\,|\nabla_x C|)` (0 when
        :math:`\nabla_x C = 0`): how far from critical, scale-free.
    cost : float
    output_grad_norm : float
        :math:`|\nabla_x C|` (:math:`|x - y|` for MSE).
    is_critical : bool
        ``is_global_minimum`` or ``relative_grad <= tol``.
    is_global_minimum : bool
        :math:`|\nabla_x C| \le \mathrm{tol}\cdot\max(1, |y|)`.
    kind : str
        ``"global minimum"``, ``"non-global minimum"`` (critical, index 0),
        ``"non-global saddle"`` (critical, index :math:`\ge 1`) or
        ``"not critical"``.
    rank : int
        Numerical rank of :math:`D`: singular values :math:`> \tau`.
    rank_deficit : int
        :math:`\min(QN, K) - \mathrm{rank}`.
    rank_tau : float
        The absolute threshold :math:`\tau`.
    singular_values : Tensor
        Of :math:`D`, descending.
    range_grad_norm, perp_grad_norm : float
        :math:`|P\nabla_xC|` and :math:`|P^\perp\nabla_xC|`, with :math:`P`
        the projector onto the span of the left singular vectors with
        :math:`\sigma_i > \tau`.  At a critical point :math:`P\nabla_xC = 0`;
        a non-global one has :math:`P^\perp\nabla_xC \ne 0`.
    hessian_eigenvalues : Tensor
        The computed eigenvalues of :math:`\nabla^2_\theta C`, ascending (all
        :math:`K` for ``hessian_method="dense"``, the computed ones for
        ``"lanczos"``).
    hessian_method : str
    dimension : int
        Estimated dimension of the critical set through :math:`\theta`
        (dimension of the Hessian's kernel).
    dimension_gap : float
        The eigenvalue ratio :math:`a_{k+1}/\max(a_k, \epsilon A)` at the cut
        (NaN when the cut could not be closed, see ``dimension_lower_bound``).
    dimension_threshold : float
        Eigenvalues of magnitude below it are the kernel.
    dimension_reliable : bool
        ``dimension_gap >= min_gap`` (and not a lower bound).
    dimension_lower_bound : bool
        Lanczos only: the kernel was not exhausted, ``dimension`` is a lower bound.
    index : int
        Number of eigenvalues below ``-dimension_threshold``.
    index_lower_bound : bool
    kernel_basis : Tensor, shape=[K, dimension]
        Orthonormal basis of the (computed) Hessian kernel: approximate
        tangent space of the critical set.
    tolerances : dict
        Every tolerance used.
    notes : list of str
        Warnings about the reliability of the estimates.
    """

    grad_norm: float
    relative_grad: float
    cost: float
    output_grad_norm: float
    is_critical: bool
    is_global_minimum: bool
    kind: str
    rank: int
    rank_deficit: int
    rank_tau: float
    singular_values: Tensor
    range_grad_norm: float
    perp_grad_norm: float
    hessian_eigenvalues: Tensor
    hessian_method: str
    dimension: int
    dimension_gap: float
    dimension_threshold: float
    dimension_reliable: bool
    dimension_lower_bound: bool
    index: int
    index_lower_bound: bool
    kernel_basis: Tensor = field(repr=False)
    tolerances: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def is_saddle(self) -> bool:
        """Critical with index >= 1."""
        return self.is_critical and self.index >= 1

    def summary(self) -> str:
        """A few lines for humans."""
        dim = f">= {self.dimension}" if self.dimension_lower_bound else str(self.dimension)
        lines = [
            f"{self.kind}: C = {self.cost:.6g}, |grad_theta C| = {self.grad_norm:.3e} "
            f"(relative {self.relative_grad:.2e}), |grad_x C| = {self.output_grad_norm:.3e}",
            f"rank D = {self.rank} (deficit {self.rank_deficit}, tau = {self.rank_tau:.3g}); "
            f"|P grad_x C| = {self.range_grad_norm:.3e}, "
            f"|P_perp grad_x C| = {self.perp_grad_norm:.3e}",
            f"critical-set dimension {dim} (Hessian kernel, gap {self.dimension_gap:.3g}, "
            f"{self.hessian_method}), index {self.index}"
            + (" (lower bound)" if self.index_lower_bound else ""),
        ]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def singular_state(space: ParameterSpace, theta: Tensor) -> tuple[Tensor, Tensor]:
    """(left singular vectors U [QN, m], singular values [m]) of D, descending.

    The size policy of :meth:`subriemann.linalg.PointState.output_spectrum`.
    """
    return space.point_state(theta).output_spectrum()


@dataclass
class _Gradient:
    """The first-order part of a report: gradient, cost, rank and the split of grad_x C."""

    grad_norm: float
    relative_grad: float
    cost: float
    output_grad_norm: float
    rank: int
    tau: float
    singular_values: Tensor
    range_grad_norm: float
    perp_grad_norm: float


def _gradient_part(
    space: ParameterSpace, theta: Tensor, rank_rtol: float, rank_atol: float | None
) -> _Gradient:
    st = space.point_state(theta)
    g = st.output_grad.detach()
    u, s = singular_state(space, theta)
    smax = float(s[0]) if s.numel() else 0.0
    tau = rank_threshold(smax, rank_rtol, rank_atol)
    rank = int((s > tau).sum())
    ug = u[:, :rank].T @ g
    gnorm = float(g.norm())
    range_norm = float(ug.norm())
    perp_direct = float((g - u[:, :rank] @ ug).norm())
    perp_norm = (
        perp_direct if math.isfinite(perp_direct)
        else math.sqrt(max(gnorm**2 - range_norm**2, 0.0))
    )
    grad_norm = float(space.cost_grad(theta).detach().norm())
    denom = smax * gnorm
    rel = grad_norm / denom if denom > 0 else (0.0 if grad_norm == 0 else math.inf)
    return _Gradient(grad_norm, rel, float(st.cost), gnorm, rank, tau, s.detach().clone(),
                     range_norm, perp_norm)


def _kind(is_global: bool, is_crit: bool, index: int) -> str:
    if is_global:
        return "global minimum"
    if not is_crit:
        return "not critical"
    return "non-global minimum" if index == 0 else "non-global saddle"


def equilibrium_report(
    space: ParameterSpace,
    theta: Tensor,
    *,
    tol: float,
    rank_rtol: float,
    rank_atol: float | None,
    kernel_rtol: float,
    min_gap: float,
    method: str,
    n_eigs: int,
    max_rounds: int,
) -> EquilibriumReport:
    """:func:`classify_equilibrium` on validated arguments (``method``: dense or lanczos)."""
    theta = theta.detach()
    grad = _gradient_part(space, theta, rank_rtol, rank_atol)
    is_global = grad.output_grad_norm <= tol * max(1.0, float(space.y.norm()))
    is_crit = is_global or grad.relative_grad <= tol
    spec: HessianSpectrum = hessian_spectrum(
        HessianOperator(space, theta), method, kernel_rtol=kernel_rtol, min_gap=min_gap,
        n_eigs=n_eigs, max_rounds=max_rounds,
    )
    notes = list(spec.notes)
    if not is_crit:
        notes.append(
            f"not a critical point (relative gradient {grad.relative_grad:.2e} > tol {tol:.1e}): "
            "the Hessian kernel is not the tangent space of a critical set here; refine the "
            "point first (refine_critical_point)"
        )
    lanczos = method == "lanczos"
    return EquilibriumReport(
        grad_norm=grad.grad_norm,
        relative_grad=grad.relative_grad,
        cost=grad.cost,
        output_grad_norm=grad.output_grad_norm,
        is_critical=is_crit,
        is_global_minimum=is_global,
        kind=_kind(is_global, is_crit, spec.index),
        rank=grad.rank,
        rank_deficit=min(space.output_dim, space.dim) - grad.rank,
        rank_tau=float(grad.tau),
        singular_values=grad.singular_values,
        range_grad_norm=grad.range_grad_norm,
        perp_grad_norm=grad.perp_grad_norm,
        hessian_eigenvalues=spec.eigenvalues,
        hessian_method=spec.method,
        dimension=spec.dimension,
        dimension_gap=spec.gap,
        dimension_threshold=spec.threshold,
        dimension_reliable=(not spec.dimension_lower_bound) and spec.gap >= min_gap,
        dimension_lower_bound=spec.dimension_lower_bound,
        index=spec.index,
        index_lower_bound=spec.index_lower_bound,
        kernel_basis=spec.kernel_basis,
        tolerances={
            "tol": tol, "rank_rtol": rank_rtol, "rank_atol": rank_atol,
            "kernel_rtol": kernel_rtol, "min_gap": min_gap, "hessian": method,
            "n_eigs": n_eigs if lanczos else None, "max_rounds": max_rounds if lanczos else None,
            "hessian_scale": spec.scale, "n_hvp": spec.n_hvp,
        },
        notes=notes,
    )


def report_options(
    tol: Any, rank_rtol: Any, rank_atol: Any, kernel_rtol: Any, min_gap: Any, n_eigs: Any,
    max_rounds: Any,
) -> dict[str, Any]:
    """The validated tolerances of :func:`classify_equilibrium`, as keyword arguments."""
    return dict(
        tol=check_real(tol, "tol", low=0.0, high=1.0, low_open=True, high_open=True),
        rank_rtol=check_real(rank_rtol, "rank_rtol", low=0.0, high=1.0, high_open=True),
        rank_atol=check_optional(check_real, rank_atol, "rank_atol", low=0.0),
        kernel_rtol=check_real(kernel_rtol, "kernel_rtol", low=0.0, high=1.0, low_open=True,
                               high_open=True),
        min_gap=check_real(min_gap, "min_gap", low=0.0, low_open=True),
        n_eigs=check_int(n_eigs, "n_eigs", low=1),
        max_rounds=check_int(max_rounds, "max_rounds", low=1),
    )


def classify_equilibrium(
    space: ParameterSpace,
    theta: Tensor,
    *,
    tol: float = 1e-6,
    rank_rtol: float = 1e-6,
    rank_atol: float | None = None,
    kernel_rtol: float = 1e-6,
    min_gap: float = 1e3,
    hessian: str = "auto",
    dense_limit: int = DENSE_HESSIAN_LIMIT,
    n_eigs: int = 20,
    max_rounds: int = 8,
) -> EquilibriumReport:
    r"""Classify a point where a flow stalled: gradient, cost, rank, Hessian, dimension, index.

    Parameters
    ----------
    space : ParameterSpace
    theta : Tensor, shape=[K]
    tol : float
        Relative tolerance of the two tests:

        * critical: :math:`|D^\top\nabla_xC| \le \mathrm{tol}\;\sigma_{\max}(D)\,|\nabla_xC|`;
        * global minimum: :math:`|\nabla_xC| \le \mathrm{tol}\cdot\max(1, |y|)`
          (for MSE: :math:`|x - y|` small).
    rank_rtol, rank_atol : float
        Rank threshold :math:`\tau = \mathrm{rank\_rtol}\,\sigma_{\max}(D)`, or
        ``rank_atol`` when given (:func:`subriemann.linalg.rank_threshold`).
    kernel_rtol : float
        Hessian eigenvalues of magnitude at most ``kernel_rtol`` times the
        largest may be counted as kernel; the cut is placed at the largest
        gap among them (see :mod:`~subriemann.analysis.critical.spectrum`).
    min_gap : float
        Gap below which the dimension estimate is flagged unreliable.
    hessian : {"auto", "dense", "lanczos"}
        ``"dense"``: :math:`K` Hessian-vector products and a full symmetric
        eigendecomposition.  ``"lanczos"``: ARPACK on the Hessian-vector
        product operator for the largest, the most negative (``n_eigs``) and
        the smallest-magnitude (``n_eigs`` per round, ``max_rounds`` rounds
        with deflation) eigenvalues.  ``"auto"``: dense for
        :math:`K \le` ``dense_limit``.
    dense_limit : int
    n_eigs, max_rounds : int
        Lanczos only.

    Returns
    -------
    EquilibriumReport

    Notes
    -----
    The dimension is that of :math:`\ker\nabla^2_\theta C(\theta)`: an upper
    bound of the dimension of the critical set through :math:`\theta`, equal
    to it when the set is a non-degenerate (Morse–Bott) critical manifold.
    At a point that is not critical (``is_critical`` false) it says nothing
    about a critical set: refine the point first with
    :func:`~subriemann.analysis.critical.refine_critical_point`.

    Examples
    --------
    >>> import torch, subriemann as sr
    >>> class Line(torch.nn.Module):            # x = a * b * X
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a = torch.nn.Parameter(torch.tensor(1.0))
    ...         self.b = torch.nn.Parameter(torch.tensor(2.0))
    ...     def forward(self, X):
    ...         return self.a * self.b * X
    >>> X = torch.tensor([[1.0], [2.0]]); Y = torch.tensor([[1.0], [0.0]])
    >>> space = sr.ParameterSpace(Line(), X, Y, backend="func")
    >>> origin = torch.zeros(2, dtype=torch.float64)
    >>> rep = sr.analysis.classify_equilibrium(space, origin)
    >>> rep.kind, rep.index, rep.dimension, rep.is_global_minimum
    ('non-global saddle', 1, 0, False)
    """
    space = check_space(space)
    theta = space.check_point(theta)
    opts = report_options(tol, rank_rtol, rank_atol, kernel_rtol, min_gap, n_eigs, max_rounds)
    method = hessian_method(space, hessian, check_int(dense_limit, "dense_limit", low=1))
    return equilibrium_report(space, theta, method=method, **opts)
