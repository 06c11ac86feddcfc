r"""Krylov solvers on torch operators: conjugate gradients and LSMR.

Both take the operator as torch products (JVPs and VJPs of the network, or a
dense matrix), stop on the **true** residual, and scale their iteration limit
with the conditioning they observe, so that a solve meets its tolerance or
says it did not (:class:`~subriemann.linalg.SolverInfo`,
:func:`~subriemann.linalg.check_converged`).

* :func:`cg`, :func:`pcg`: (preconditioned) conjugate gradients for an SPD
  operator, e.g. :math:`(1-\lambda)1 + \lambda DD^\top`;
* :func:`lsmr`: minimum-norm least squares through SciPy's LSMR (one
  adapter, :func:`~subriemann.linalg.scipy_operator`), e.g. :math:`D^+u`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from scipy.linalg import eigvalsh_tridiagonal
from scipy.sparse.linalg import lsmr as scipy_lsmr
from torch import Tensor

from subriemann.linalg.info import SolverInfo
from subriemann.linalg.scipy_adapter import scipy_operator, to_numpy, to_torch

__all__ = ["cg", "pcg", "lsmr"]

LSMR_REASONS = {
    0: "x = 0 is the solution",
    1: "converged (compatible system)",
    2: "converged (least squares)",
    3: "condition limit",
    4: "converged to machine precision (compatible system)",
    5: "converged to machine precision (least squares)",
    6: "condition limit",
    7: "iteration limit",
}
"""SciPy's ``istop`` codes of LSMR, as :attr:`SolverInfo.reason`."""


def _cg_budget(kappa: float, rtol: float) -> int:
    r"""Iterations after which CG has met ``rtol`` on an SPD system of condition ``kappa``.

    The classical bound :math:`\|e_m\|_A \le 2\rho^m\|e_0\|_A`,
    :math:`\rho = (\sqrt\kappa-1)/(\sqrt\kappa+1)`, turned into a residual
    bound (one more factor :math:`\sqrt\kappa`), gives
    :math:`m \ge \tfrac12\sqrt\kappa\,\ln(2\sqrt\kappa/\mathrm{rtol})`;
    a factor 1.5 and 20 extra steps absorb the delay of finite precision.
    """
    kappa = max(kappa, 1.0)
    m = 0.5 * math.sqrt(kappa) * math.log(2.0 * math.sqrt(kappa) / rtol)
    return int(math.ceil(1.5 * m)) + 20


def cg(
    matvec: Any,
    rhs: Tensor,
    *,
    rtol: float = 1e-12,
    maxiter: int | None = None,
    eig_lower: float | None = None,
    precond: Any = None,
) -> tuple[Tensor, SolverInfo]:
    r"""(Preconditioned) conjugate gradients for an SPD operator, :math:`A z = b`, started at 0.

    Parameters
    ----------
    matvec : callable
        :math:`z \mapsto Az`.
    rhs : Tensor, shape=[n]
    rtol : float
        Stop when :math:`|b - Az| \le \mathrm{rtol}\,|b|`.
    maxiter : int, optional
        Fixed iteration limit.  By default the limit **scales with the
        conditioning**: the extreme eigenvalues of :math:`A` are estimated
        on the fly from the Lanczos tridiagonal matrix that CG builds (its
        Ritz values), :math:`\hat\kappa = \hat\lambda_{\max}/\lambda_{\min}`,
        and the limit is the iteration count of the classical bound
        :math:`\tfrac12\sqrt{\hat\kappa}\ln(2\sqrt{\hat\kappa}/\mathrm{rtol})`
        (times 1.5, plus 20; at most :math:`20n + 100`).
    eig_lower : float, optional
        A known lower bound of the spectrum of :math:`A` (e.g.
        :math:`1-\lambda` for :math:`(1-\lambda)1+\lambda DD^\top`); otherwise
        the smallest Ritz value is used.  Not with ``precond`` (the Ritz
        values are then those of :math:`P^{-1}A`).
    precond : callable, optional
        :math:`r \mapsto P^{-1}r` for an SPD preconditioner :math:`P`
        (e.g. :class:`subriemann.linalg.routes.nystrom.NystromPreconditioner`); the stopping
        test stays on the unpreconditioned residual :math:`|b - Az|`, so
        ``rtol`` means the same with or without it.

    Returns
    -------
    z : Tensor, shape=[n]
    info : SolverInfo
        ``solver`` is ``"cg"`` (``"pcg"`` with ``precond``); ``residual`` is the
        *true* relative residual :math:`|b - Az|/|b|`, recomputed at the end.

    Examples
    --------
    >>> import torch
    >>> a = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> z, info = cg(lambda v: a @ v, torch.tensor([1.0, 2.0], dtype=torch.float64))
    >>> info.converged, torch.allclose(a @ z, torch.tensor([1.0, 2.0], dtype=torch.float64))
    (True, True)
    """
    if precond is not None and eig_lower is not None:
        raise ValueError("eig_lower bounds the spectrum of A, not of P^-1 A: omit it with precond")
    name = "cg" if precond is None else "pcg"
    pre = precond if precond is not None else (lambda v: v)
    z = torch.zeros_like(rhs)
    bnorm = float(rhs.norm())
    if bnorm == 0.0:
        return z, SolverInfo(name, 0, 0.0, True, rtol, 0, 1.0, "zero right-hand side")
    hard_cap = 20 * rhs.shape[0] + 100
    limit = maxiter if maxiter is not None else min(_cg_budget(1.0, rtol), hard_cap)
    r = rhs.clone()
    p = pre(r).clone()
    rs = float(r @ p)  # r^T P^-1 r
    alphas: list[float] = []
    betas: list[float] = []
    reason = "iteration limit"
    while True:
        if float(r.norm()) <= rtol * bnorm:
            reason = "converged"
            break
        if len(alphas) >= limit:
            break
        ap = matvec(p)
        pap = float(p @ ap)
        if not pap > 0.0 or not rs > 0.0:
            reason = "operator (or preconditioner) is not positive definite (p^T A p <= 0)"
            break
        alpha = rs / pap
        z = z + alpha * p
        r = r - alpha * ap
        s = pre(r)
        rs_new = float(r @ s)
        beta = rs_new / rs
        p = s + beta * p
        rs = rs_new
        alphas.append(alpha)
        betas.append(beta)
        it = len(alphas)
        if maxiter is None and (it <= 10 or it % 10 == 0):
            kappa = _ritz_kappa(alphas, betas, eig_lower)
            limit = min(max(limit, _cg_budget(kappa, rtol)), hard_cap)
    kappa = _ritz_kappa(alphas, betas, eig_lower) if alphas else 1.0
    res = float((rhs - matvec(z)).norm()) / bnorm
    # the recursive residual may drift from the true one; judge by the true one
    converged = res <= 10.0 * rtol
    if reason == "converged" and not converged:
        reason = "recursive residual met rtol but the true residual did not"
    return z, SolverInfo(name, len(alphas), res, converged, rtol, limit, kappa, reason)


def _ritz_kappa(alphas: list[float], betas: list[float], eig_lower: float | None) -> float:
    """Condition estimate from CG's coefficients (Lanczos tridiagonal, Ritz values)."""
    m = len(alphas)
    diag = np.empty(m)
    off = np.empty(max(m - 1, 0))
    for j in range(m):
        diag[j] = 1.0 / alphas[j] + (betas[j - 1] / alphas[j - 1] if j > 0 else 0.0)
        if j < m - 1:
            off[j] = math.sqrt(max(betas[j], 0.0)) / alphas[j]
    ritz = diag if m == 1 else eigvalsh_tridiagonal(diag, off)
    top = float(ritz.max())
    low = eig_lower if eig_lower is not None else float(ritz.min())
    if not (low > 0.0 and math.isfinite(top)):
        return float("inf")
    return max(top / low, 1.0)


def pcg(
    matvec: Callable[[Tensor], Tensor],
    rhs: Tensor,
    precond: Callable[[Tensor], Tensor] | None = None,
    *,
    rtol: float = 1e-12,
    maxiter: int | None = None,
) -> tuple[Tensor, SolverInfo]:
    r"""Preconditioned conjugate gradients for an SPD operator, :math:`Az = b`, started at 0.

    :func:`cg` with a preconditioner: it stops when
    :math:`|b - Az| \le \mathrm{rtol}\,|b|` (the unpreconditioned residual,
    so the tolerance means the same as without a preconditioner).
    Without ``maxiter`` the limit scales with the condition number of
    :math:`P^{-1}A` estimated from the Lanczos coefficients of the iteration,
    as in :func:`cg`.

    Parameters
    ----------
    matvec : callable
        :math:`z\mapsto Az`, shape ``[n] -> [n]``.
    rhs : Tensor, shape=[n]
    precond : callable, optional
        :math:`r \mapsto P^{-1}r` (SPD); the identity when omitted.
    rtol : float
    maxiter : int, optional

    Returns
    -------
    z : Tensor, shape=[n]
    info : SolverInfo
        ``solver="pcg"``; ``residual`` is the true relative residual, recomputed.
    """
    pre = precond if precond is not None else (lambda r: r)  # solver name "pcg" either way
    return cg(matvec, rhs, rtol=rtol, maxiter=maxiter, precond=pre)


def lsmr(
    matvec: Any,
    rmatvec: Any,
    shape: tuple[int, int],
    rhs: Tensor,
    *,
    damp: float = 0.0,
    rtol: float = 1e-12,
    maxiter: int | None = None,
    conlim: float = 1e8,
) -> tuple[Tensor, SolverInfo]:
    r"""Minimum-norm least squares :math:`\arg\min |Av - b|^2 + \mathrm{damp}^2|v|^2` by LSMR.

    Started at 0, LSMR stays in :math:`\operatorname{ran}A^\top` and converges
    to :math:`A^+ b` (``damp = 0``).  Uses :func:`scipy.sparse.linalg.lsmr`
    with ``A`` given through ``matvec`` and ``rmatvec`` (torch JVP/VJP), with
    ``atol = btol = rtol``.

    Parameters
    ----------
    matvec, rmatvec : callable
        :math:`v \mapsto Av` and :math:`u \mapsto A^\top u`.
    shape : (int, int)
    rhs : Tensor, shape=[m]
    damp : float
    rtol : float
    maxiter : int, optional
        Fixed iteration limit.  By default it **scales with conditioning**:
        a first run of :math:`4\min(m, n) + 20` iterations; if that is not
        enough, LSMR is restarted from its iterate (which keeps the
        minimum-norm property: the correction also lies in
        :math:`\operatorname{ran}A^\top`) with the budget
        :math:`\tfrac12\hat\kappa\ln(2/\mathrm{rtol})` of CG on the normal
        equations, :math:`\hat\kappa` being LSMR's own estimate of
        :math:`\operatorname{cond}(A)` (at most :math:`50\min(m,n) + 100` in all).
    conlim : float
        Stop when the estimate of :math:`\operatorname{cond}(A)` exceeds it
        (0: never).  Callers pass :math:`\sigma_{\max}/\tau`, so that the
        Krylov space does not resolve singular values below the rank
        threshold :math:`\tau`; such a stop is reported with
        ``reason="condition limit"``.

    Returns
    -------
    v : Tensor, shape=[n]
    info : SolverInfo
        ``residual`` is LSMR's own stopping measure recomputed on the
        returned ``v`` (:math:`r = b - Av`):
        :math:`\min\bigl(|r|/(|b| + \|A\||v|),\ |A^\top r|/(\|A\||r|)\bigr)`,
        the first for compatible systems, the second the least-squares
        optimality, with LSMR's Frobenius-norm estimate :math:`\|A\|`.
        ``converged`` means ``residual <= 10 * rtol``.

    Examples
    --------
    >>> import torch
    >>> a = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]], dtype=torch.float64)
    >>> v, info = lsmr(lambda x: a @ x, lambda y: a.T @ y, (2, 3),
    ...                torch.tensor([1.0, 1.0], dtype=torch.float64))
    >>> [round(x, 12) for x in v.tolist()], info.converged
    ([1.0, 0.5, 0.0], True)
    """
    dtype, device = rhs.dtype, rhs.device
    if float(rhs.norm()) == 0.0:
        return torch.zeros(shape[1], dtype=dtype, device=device), SolverInfo(
            "lsmr", 0, 0.0, True, rtol, 0, 1.0, "zero right-hand side"
        )
    op = scipy_operator(shape, matvec, rmatvec, dtype=dtype, device=device)
    kw = dict(damp=damp, atol=rtol, btol=rtol, conlim=conlim)
    out, total, limit, kappa, norma = _lsmr_restarted(op, to_numpy(rhs), min(shape), maxiter, kw)
    v = to_torch(out[0], dtype, device)
    r = rhs - matvec(v)
    rnorm = float(r.norm())
    norma = norma or 1.0
    # LSMR's two stopping tests, evaluated on the returned v:
    # compatible   |r| <= rtol (|b| + |A||v|),   least squares   |A^T r| <= rtol |A||r|
    res = rnorm / (float(rhs.norm()) + norma * float(v.norm()))
    if rnorm > 0.0:
        atr = rmatvec(r) - damp**2 * v
        res = min(res, float(atr.norm()) / (norma * rnorm))
    reason = LSMR_REASONS.get(int(out[1]), "")
    return v, SolverInfo("lsmr", total, res, res <= 10.0 * rtol, rtol, limit, kappa, reason)


def _lsmr_restarted(
    op: Any, b: np.ndarray, small: int, maxiter: int | None, kw: dict[str, Any]
) -> tuple[Any, int, int, float, float]:
    """SciPy's LSMR, restarted from its iterate while the conditioning asks for more steps.

    Returns SciPy's last output, the total iterations, the limit that applied,
    and the largest estimates of ``cond(A)`` and ``|A|_F``.
    """
    rtol = kw["atol"]
    hard_cap = 50 * small + 100
    first = 4 * small + 20 if maxiter is None else int(maxiter)
    out = scipy_lsmr(op, b, maxiter=first, **kw)
    total, limit = int(out[2]), first
    kappa, norma = float(out[6]), float(out[5])
    while maxiter is None and out[1] == 7 and total < hard_cap:
        budget = int(math.ceil(0.5 * kappa * math.log(2.0 / rtol))) + 20
        limit = min(max(limit, budget), hard_cap)
        if total >= limit:
            break
        out = scipy_lsmr(op, b, x0=out[0], maxiter=limit - total, **kw)
        total += int(out[2])
        kappa, norma = max(kappa, float(out[6])), max(norma, float(out[5]))
    return out, total, limit, kappa, norma
