r"""The corrector: damped minimum-norm Newton steps onto :math:`\{\nabla_\theta C = 0\}`.

:func:`correct` drives :math:`F = \nabla_\theta C` to zero; its Jacobian is the
Hessian :math:`H = \nabla^2_\theta C` (:mod:`~subriemann.analysis.critical.spectrum`).
Each step is the truncated pseudo-inverse Newton step
:math:`\delta = -H^+_{\setminus k}F`, which ignores the eigen-directions of
smallest :math:`|h_i|` (the approximate tangent space of the critical set):
the minimum-norm solution of the truncated system, normal to the set.
:func:`refine_critical_point` is the public call; the continuation of
:mod:`~subriemann.analysis.critical.tracker` uses :func:`correct` as its
corrector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from subriemann.analysis.critical.classify import singular_state
from subriemann.analysis.critical.spectrum import (
    DENSE_HESSIAN_LIMIT,
    EPS,
    HessianOperator,
    arpack_eigsh,
    check_space,
    hessian_method,
)
from subriemann.linalg import lsmr
from subriemann.space import NonFiniteError, ParameterSpace
from subriemann.validation import check_int, check_optional, check_real

__all__ = ["Correction", "correct", "grad_scale", "refine_critical_point"]

DAMPING = (0.0, 1e-8, 1e-6, 1e-4, 1e-2, 1.0)
r"""Levenberg–Marquardt damping :math:`\mu/\|H\|^2` tried in turn until :math:`|F|` decreases."""


@dataclass
class Correction:
    """The outcome of :func:`correct`.

    Attributes
    ----------
    theta : Tensor, shape=[K]
        The last accepted point.
    converged : bool
        :math:`|\\nabla_\\theta C| \\le` ``grad_tol`` there.
    iterations : int
    grad_norm : float
    reason : str
        ``"converged"`` or why not.
    """

    theta: Tensor
    converged: bool
    iterations: int
    grad_norm: float
    reason: str


class _NewtonStep:
    r"""Damped Newton steps :math:`\delta(\mu)` for :math:`F` at one point.

    ``"dense"``: :math:`\delta = -\sum_{i \in \mathrm{keep}} h_i/(h_i^2 + \mu)\,
    (e_i^\top F)\,e_i` over the eigenpairs of :math:`H`, leaving out the
    ``dimension`` smallest :math:`|h_i|` (without ``dimension``: those
    :math:`\le` ``kernel_rtol`` :math:`\|H\|`).  ``"lanczos"``: LSMR on the
    Hessian operator with damping :math:`\sqrt\mu` and the condition limit
    :math:`1/\mathrm{kernel\_rtol}` in the part of the truncation.
    """

    def __init__(
        self, hess: HessianOperator, f: Tensor, method: str, dimension: int | None,
        kernel_rtol: float,
    ) -> None:
        self.hess, self.f, self.method, self.kernel_rtol = hess, f, method, kernel_rtol
        if method == "dense":
            self.evals, self.evecs = torch.linalg.eigh(hess.dense())
            mags = self.evals.abs()
            self.hnorm = float(mags.max()) if mags.numel() else 0.0
            keep = torch.ones_like(self.evals, dtype=torch.bool)
            if dimension is not None and dimension > 0:
                keep[torch.argsort(mags)[:dimension]] = False
            floor = max(kernel_rtol if dimension is None else 0.0, 10 * EPS) * self.hnorm
            self.keep = keep & (mags > floor)
            self.fc = self.evecs.T @ f
        else:
            top, _, _ = arpack_eigsh(hess.operator(), min(2, hess.dim - 1), "LM", 1e-6, 1000)
            self.hnorm = float(np.abs(top).max()) if top.size else 1.0

    def delta(self, damp: float) -> Tensor:
        """The step with damping ``damp`` (relative to :math:`\\|H\\|^2`)."""
        mu = damp * self.hnorm**2
        if self.method == "dense":
            ev = self.evals
            w = torch.where(self.keep, ev / (ev**2 + mu), torch.zeros_like(ev))
            return -self.evecs @ (w * self.fc)
        delta, _info = lsmr(
            self.hess.hvp, self.hess.hvp, (self.hess.dim, self.hess.dim), -self.f,
            damp=math.sqrt(mu), rtol=1e-12, conlim=1.0 / self.kernel_rtol,
        )
        return delta


def _decreasing_step(
    space: ParameterSpace, theta: Tensor, newton: _NewtonStep, nf: float, total: float,
    max_move: float,
) -> tuple[Tensor, Tensor, float, float] | None:
    """The first damped step that decreases :math:`|F|` within ``max_move``.

    Returns ``(theta, F, |F|, |step|)`` at the new point, or None.
    """
    for damp in DAMPING:
        delta = newton.delta(damp)
        step = float(delta.norm())
        if not math.isfinite(step) or total + step > max_move:
            continue
        trial = theta + delta
        try:
            ft = space.cost_grad(trial).detach()
        except NonFiniteError:
            continue
        nft = float(ft.norm())
        if nft < nf:
            return trial, ft, nft, step
    return None


def correct(
    space: ParameterSpace,
    theta: Tensor,
    *,
    grad_tol: float,
    max_iter: int,
    max_move: float,
    method: str,
    dimension: int | None = None,
    kernel_rtol: float = 1e-6,
) -> Correction:
    r"""Drive :math:`F = \nabla_\theta C` to zero by minimum-norm Newton steps on :math:`F`.

    The Jacobian of :math:`F` is the Hessian :math:`H = \nabla^2_\theta C`.
    Each step is the truncated pseudo-inverse Newton step
    :math:`\delta = -H^+_{\setminus k}F`, which ignores the ``dimension``
    eigen-directions of smallest :math:`|h_i|` (the approximate tangent space
    of the critical set; without ``dimension``, those with
    :math:`|h_i| \le` ``kernel_rtol`` :math:`\|H\|`): the minimum-norm
    solution of the truncated system, normal to the set.  A step that does
    not decrease :math:`|F|` is retried with Levenberg–Marquardt damping
    :math:`h_i/(h_i^2 + \mu)`, :math:`\mu = 10^{-8}, 10^{-6}, \dots, 1`
    times :math:`\|H\|^2`.  With ``method="lanczos"`` the step is LSMR on
    the Hessian-vector-product operator (its condition limit
    :math:`1/\mathrm{kernel\_rtol}` plays the role of the truncation).
    The total displacement stays below ``max_move``.
    """
    theta = theta.detach().clone()
    total = 0.0
    try:
        f = space.cost_grad(theta).detach()
    except NonFiniteError as err:
        return Correction(theta, False, 0, math.inf, f"non-finite gradient: {err}")
    nf = float(f.norm())
    for it in range(max_iter + 1):
        if nf <= grad_tol:
            return Correction(theta, True, it, nf, "converged")
        if it == max_iter:
            break
        newton = _NewtonStep(HessianOperator(space, theta), f, method, dimension, kernel_rtol)
        accepted = _decreasing_step(space, theta, newton, nf, total, max_move)
        if accepted is None:
            return Correction(
                theta, False, it + 1, nf,
                f"no decrease of |grad C| (stuck at {nf:.3e} > {grad_tol:.3e})",
            )
        theta, f, nf, step = accepted
        total += step
    return Correction(
        theta, False, max_iter, nf, f"no convergence in {max_iter} iterations (|grad C| = {nf:.3e})"
    )


def grad_scale(space: ParameterSpace, theta: Tensor) -> float:
    r""":math:`\sigma_{\max}(D)\max(1, |\nabla_xC|)` at ``theta``: the scale of the gradient."""
    _, s = singular_state(space, theta)
    smax = float(s[0]) if s.numel() else 1.0
    g = float(space.point_state(theta).output_grad.norm())
    return max(smax, 1e-300) * max(1.0, g)


def refine_critical_point(
    space: ParameterSpace,
    theta: Tensor,
    *,
    grad_tol: float | None = None,
    max_iter: int = 50,
    max_move: float = math.inf,
    kernel_rtol: float = 1e-6,
    hessian: str = "auto",
    dense_limit: int = DENSE_HESSIAN_LIMIT,
) -> tuple[Tensor, float]:
    r"""Move a near-critical point (e.g. where a flow stalled) onto :math:`\{\nabla_\theta C = 0\}`.

    Newton's method on :math:`F(\theta) = \nabla_\theta C` with Jacobian
    :math:`\nabla^2_\theta C`, pseudo-inverse steps that leave out the
    near-kernel eigen-directions, safeguarded by Levenberg–Marquardt damping
    (see :func:`correct`): the steps are minimum-norm, so the point moves
    normally to the critical set, to a nearby critical point.  It does not
    search globally: a point far from any critical point may not converge
    (use a flow first).

    Parameters
    ----------
    space : ParameterSpace
    theta : Tensor, shape=[K]
    grad_tol : float, optional
        Target :math:`|\nabla_\theta C|`; default
        :math:`10^{-10}\,\sigma_{\max}(D)\max(1, |\nabla_xC|)` at ``theta``.
    max_iter : int
    max_move : float
        Largest total displacement allowed.
    kernel_rtol : float
        Hessian eigenvalues below ``kernel_rtol`` times the largest are
        left out of the Newton step (treated as the tangent space).
    hessian, dense_limit
        As in :func:`~subriemann.analysis.critical.classify_equilibrium`.

    Returns
    -------
    theta : Tensor, shape=[K]
    grad_norm : float
        :math:`|\nabla_\theta C|` at the returned point.

    Raises
    ------
    RuntimeError
        If the corrector does not reach ``grad_tol`` (the message says why).
    """
    space = check_space(space)
    theta = space.check_point(theta).detach()
    method = hessian_method(space, hessian, check_int(dense_limit, "dense_limit", low=1))
    max_iter = check_int(max_iter, "max_iter", low=1)
    kernel_rtol = check_real(kernel_rtol, "kernel_rtol", low=0.0, high=1.0, low_open=True,
                             high_open=True)
    max_move = check_real(max_move, "max_move", low=0.0, low_open=True, finite=False)
    grad_tol = check_optional(check_real, grad_tol, "grad_tol", low=0.0, low_open=True)
    if grad_tol is None:
        grad_tol = 1e-10 * grad_scale(space, theta)
    res = correct(
        space, theta, grad_tol=grad_tol, max_iter=max_iter, max_move=max_move,
        method=method, kernel_rtol=kernel_rtol,
    )
    if not res.converged:
        raise RuntimeError(f"refine_critical_point: corrector failed: {res.reason}")
    return res.theta, res.grad_norm
