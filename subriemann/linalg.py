r"""Linear algebra at one point of parameter space: factorizations and solvers.

The expensive object is :math:`D[\theta]`.  A :class:`PointState` holds,
for one :math:`\theta`, the outputs :math:`x`, the output gradient
:math:`\nabla_x C`, and, lazily, *one* factorization of :math:`D` that
serves the metric's ``sharp``, the rank monitor and the singular values:

* ``"svd"``: thin SVD of the dense :math:`D = U\Sigma V^\top` (small problems;
  most accurate, no squaring of the condition number);
* ``"ntk"``: push-through form, the eigendecomposition
  :math:`DD^\top = U\Sigma^2U^\top` in the smaller output space
  (:math:`QN \le K`), plus a Cholesky factor of
  :math:`(1-\lambda)1 + \lambda DD^\top` for :math:`\lambda < 1`;
* ``"lstsq"``: LAPACK ``gelsd`` least squares on :math:`D` (and the stacked
  form :math:`[D; \sqrt{\varepsilon}\,1]` for :math:`\lambda<1`);
* ``"matrix_free"``: LSMR on :math:`D` (for :math:`\lambda=1`) and CG on the
  SPD operator :math:`(1-\lambda)1+\lambda DD^\top` (for :math:`\lambda<1`),
  using one JVP and one VJP per iteration.

The rank threshold :math:`\tau` is always explicit: singular values
:math:`\sigma_i \le \tau` are treated as zero (MATH.md §7).  Eigenvalues of
:math:`DD^\top` carry an absolute error of about
:math:`\epsilon\,\sigma_{\max}^2`, so on the ``"ntk"`` route singular values
below :math:`\sqrt{\epsilon}\,\sigma_{\max}\approx 10^{-8}\sigma_{\max}` are
not resolved; the default ``rank_rtol = 1e-6`` stays clear of that.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from subriemann.space import ParameterSpace

__all__ = [
    "PointState",
    "SolverInfo",
    "ConvergenceWarning",
    "SOLVERS",
    "choose_solver",
    "interp_weights",
    "cg",
    "lsmr",
]

SOLVERS = ("auto", "svd", "ntk", "lstsq", "matrix_free")
DENSE_LIMIT = 2_000_000
"""Largest :math:`QN\\cdot K` for which ``solver="auto"`` forms :math:`D` and takes its SVD."""


class ConvergenceWarning(UserWarning):
    """An iterative solver stopped before reaching its tolerance."""


@dataclass
class SolverInfo:
    """What an iterative solve did: iterations, relative residual, success."""

    solver: str
    iterations: int
    residual: float
    converged: bool


def choose_solver(space: ParameterSpace, solver: str = "auto") -> str:
    """Pick the solver for ``space`` (see the module docstring).

    ``"auto"``: dense SVD when :math:`QN\\cdot K \\le` ``DENSE_LIMIT``;
    otherwise the push-through ``"ntk"`` route when :math:`QN \\le K`
    (or :math:`QN \\le 20000`), else ``"matrix_free"``.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if solver != "auto":
        return solver
    qn, k = space.output_dim, space.dim
    if qn * k <= DENSE_LIMIT:
        return "svd"
    if qn <= k or qn <= 20_000:
        return "ntk"
    return "matrix_free"


def interp_weights(sigma: Tensor, lam: float, tau: float) -> Tensor:
    r"""Spectral weights :math:`\sigma_i / ((1-\lambda) + \lambda\sigma_i^2)` of :math:`g_\lambda^+D^\top`.

    At :math:`\lambda = 1` singular values :math:`\sigma_i \le \tau` get weight 0
    (the pseudoinverse); for :math:`\lambda < 1` the denominator is at least
    :math:`1-\lambda > 0` and every direction is kept.
    """
    denom = (1.0 - lam) + lam * sigma**2
    if lam == 1.0:
        keep = sigma > tau
        return torch.where(keep, sigma / torch.where(keep, denom, torch.ones_like(denom)), 0.0)
    return sigma / denom


class PointState:
    r"""Everything computed at one point :math:`\theta`, computed at most once.

    Parameters
    ----------
    space : ParameterSpace
    theta : Tensor, shape=[K]

    Attributes
    ----------
    theta : Tensor, shape=[K]
    outputs : Tensor, shape=[QN]
        :math:`x[\theta]`.
    output_grad : Tensor, shape=[QN]
        :math:`\nabla_x C`.
    cost : Tensor, shape=[]
    """

    def __init__(self, space: ParameterSpace, theta: Tensor) -> None:
        self.space = space
        self.theta = space.check_point(theta)
        self._cache: dict[str, Any] = {}

    # -- basic quantities ---------------------------------------------------------
    @property
    def outputs(self) -> Tensor:
        if "x" not in self._cache:
            self._cache["x"] = self.space.outputs(self.theta)
        return self._cache["x"]

    @property
    def output_grad(self) -> Tensor:
        if "g" not in self._cache:
            self._cache["g"] = self.space.output_grad(self.outputs)
        return self._cache["g"]

    @property
    def cost(self) -> Tensor:
        if "c" not in self._cache:
            self._cache["c"] = self.space.output_cost(self.outputs)
        return self._cache["c"]

    @property
    def cost_grad(self) -> Tensor:
        r""":math:`\nabla_\theta C = D^\top\nabla_x C`."""
        if "dC" not in self._cache:
            self._cache["dC"] = self.vjp(self.output_grad)
        return self._cache["dC"]

    def jvp(self, v: Tensor) -> Tensor:
        """:math:`Dv` (through the dense D when it is already formed)."""
        if "D" in self._cache:
            return self._cache["D"] @ v
        return self.space.backend.jvp(self.theta, v)

    def vjp(self, u: Tensor) -> Tensor:
        r""":math:`D^\top u` (through the dense D when it is already formed)."""
        if "D" in self._cache:
            return self._cache["D"].T @ u
        return self.space.backend.vjp(self.theta, u)

    @property
    def jacobian(self) -> Tensor:
        if "D" not in self._cache:
            self._cache["D"] = self.space.backend.jacobian(self.theta)
        return self._cache["D"]

    @property
    def ntk(self) -> Tensor:
        if "ntk" not in self._cache:
            if "D" in self._cache:
                d = self._cache["D"]
                self._cache["ntk"] = d @ d.T
            else:
                self._cache["ntk"] = self.space.backend.ntk(self.theta)
        return self._cache["ntk"]

    # -- factorizations ---------------------------------------------------------
    @property
    def svd(self) -> tuple[Tensor, Tensor, Tensor]:
        r"""Thin SVD :math:`D = U \operatorname{diag}(\sigma) V^\top`: ``(U, sigma, V)``, descending."""
        if "svd" not in self._cache:
            u, s, vh = torch.linalg.svd(self.jacobian, full_matrices=False)
            self._cache["svd"] = (u, s, vh.mT)
        return self._cache["svd"]

    @property
    def ntk_eigh(self) -> tuple[Tensor, Tensor]:
        r"""``(U, sigma)`` with :math:`DD^\top = U\operatorname{diag}(\sigma^2)U^\top`, descending."""
        if "eigh" not in self._cache:
            evals, evecs = torch.linalg.eigh(self.ntk)
            evals, evecs = evals.flip(0), evecs.flip(1)
            self._cache["eigh"] = (evecs, evals.clamp_min(0.0).sqrt())
        return self._cache["eigh"]

    def singular_values(self, method: str = "svd") -> Tensor:
        r"""Singular values of :math:`D`, descending, shape ``[min(QN, K)]``.

        ``method="svd"`` uses the dense SVD, otherwise the NTK eigenvalues
        (or the SVD when one is already cached).
        """
        if "svd" in self._cache or method in ("svd", "lstsq"):
            s = self.svd[1]
        else:
            s = self.ntk_eigh[1]
        return s[: min(self.space.output_dim, self.space.dim)]

    def rank(self, tau: float, method: str = "svd") -> int:
        r"""Numerical rank: the number of :math:`\sigma_i > \tau`."""
        return int((self.singular_values(method) > tau).sum())

    def cholesky(self, lam: float) -> Tensor:
        r"""Cholesky factor of :math:`(1-\lambda)1 + \lambda DD^\top` (:math:`\lambda < 1`)."""
        key = ("chol", lam)
        if key not in self._cache:
            a = lam * self.ntk
            a = a + (1.0 - lam) * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
            factor, info = torch.linalg.cholesky_ex(a)
            if int(info) != 0:
                raise np.linalg.LinAlgError(
                    f"Cholesky of (1-lam)1 + lam*D D^T failed (lam={lam}); use solver='svd'"
                )
            self._cache[key] = factor
        return self._cache[key]


# -- iterative solvers -----------------------------------------------------------
def cg(
    matvec: Any,
    rhs: Tensor,
    *,
    rtol: float = 1e-10,
    maxiter: int | None = None,
) -> tuple[Tensor, SolverInfo]:
    r"""Conjugate gradients for an SPD operator, :math:`A z = b`, started at 0.

    ``maxiter`` defaults to ``2 * dim``: in exact arithmetic CG terminates in
    ``dim`` steps; in floating point the count grows like
    :math:`\sqrt{\kappa}`, so the solve reports its residual and
    :func:`check_converged` warns when the tolerance was not met.
    """
    n = rhs.shape[0]
    maxiter = 2 * n + 10 if maxiter is None else maxiter
    z = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rs = r @ r
    bnorm = float(rhs.norm()) or 1.0
    it = 0
    while it < maxiter and math.sqrt(float(rs)) > rtol * bnorm:
        ap = matvec(p)
        alpha = rs / (p @ ap)
        z = z + alpha * p
        r = r - alpha * ap
        rs_new = r @ r
        p = r + (rs_new / rs) * p
        rs = rs_new
        it += 1
    res = math.sqrt(float(rs)) / bnorm
    return z, SolverInfo("cg", it, res, res <= rtol)


def lsmr(
    matvec: Any,
    rmatvec: Any,
    shape: tuple[int, int],
    rhs: Tensor,
    *,
    damp: float = 0.0,
    rtol: float = 1e-12,
    maxiter: int | None = None,
) -> tuple[Tensor, SolverInfo]:
    r"""Minimum-norm least squares :math:`\arg\min |Av - b|^2 + \mathrm{damp}^2|v|^2` by LSMR.

    Started at 0, LSMR converges to :math:`A^+ b` (``damp = 0``).  Uses
    :func:`scipy.sparse.linalg.lsmr` with ``A`` given through ``matvec`` and
    ``rmatvec`` (torch JVP/VJP).  The returned residual is the relative
    norm of the normal-equation residual :math:`|A^\top(b - Av) - \mathrm{damp}^2 v|/|A^\top b|`.
    """
    from scipy.sparse.linalg import LinearOperator
    from scipy.sparse.linalg import lsmr as _lsmr

    dtype, device = rhs.dtype, rhs.device
    to_t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=dtype, device=device)  # noqa: E731
    to_n = lambda t: t.detach().cpu().numpy()  # noqa: E731
    op = LinearOperator(
        shape,
        matvec=lambda v: to_n(matvec(to_t(v).reshape(-1))),
        rmatvec=lambda u: to_n(rmatvec(to_t(u).reshape(-1))),
        dtype=np.float64 if dtype == torch.float64 else np.float32,
    )
    maxiter = maxiter if maxiter is not None else 4 * min(shape) + 20
    out = _lsmr(op, to_n(rhs), damp=damp, atol=rtol, btol=rtol, maxiter=maxiter)
    v = to_t(out[0])
    atb = rmatvec(rhs)
    normal_res = rmatvec(rhs - matvec(v)) - damp**2 * v
    res = float(normal_res.norm()) / (float(atb.norm()) or 1.0)
    return v, SolverInfo("lsmr", int(out[2]), res, res <= max(1e3 * rtol, 1e-8))


def check_converged(info: SolverInfo, on_fail: str = "warn") -> None:
    """Warn (or raise ``RuntimeError``) when an iterative solve did not converge."""
    if info.converged:
        return
    msg = (
        f"{info.solver} did not converge in {info.iterations} iterations: relative "
        f"residual {info.residual:.3g}; the result is not the exact Riemannian gradient"
    )
    if on_fail == "raise":
        raise RuntimeError(msg)
    warnings.warn(msg, ConvergenceWarning, stacklevel=3)
