r"""The ``"nystrom"`` route: randomized Nyström preconditioning of the matrix-free solves.

The solve of the interpolated metric (``docs/scale.md``) is, in the smaller
of the two spaces, a shifted positive semidefinite system

.. math:: (G + \mu 1)\,z = b,\qquad
          G = DD^\top\ (QN \le K)\ \text{or}\ D^\top D\ (K < QN),\qquad
          \mu = (1-\lambda)/\lambda ,

because :math:`(1-\lambda)1 + \lambda G = \lambda(G + \mu 1)`.  Conjugate
gradients on it need :math:`O(\sqrt{\kappa})` products with :math:`G`,
:math:`\kappa = (\sigma_{\max}^2 + \mu)/\mu`, which is large on data sets
with a few dominant directions.  The randomized Nyström preconditioner of
Frangella, Tropp and Udell (*Randomized Nyström preconditioning*, SIAM J.
Matrix Anal. Appl. 44, 2023) removes them:

1. a sketch :math:`Y = G\Omega` with a Gaussian test matrix
   :math:`\Omega\in\mathbb{R}^{n\times\ell}` (``ℓ`` JVPs and VJPs, batched);
2. the Nyström approximation :math:`\hat G = Y(\Omega^\top Y)^+Y^\top
   = U\hat\Lambda U^\top` (a stabilised Cholesky and a thin SVD,
   :func:`nystrom_sketch`);
3. the preconditioner
   :math:`P^{-1} = (\hat\lambda_\ell+\mu)\,U(\hat\Lambda+\mu 1)^{-1}U^\top
   + (1 - UU^\top)`.

With :math:`E = \|G - \hat G\|`, the preconditioned operator has condition
number at most :math:`(\hat\lambda_\ell + \mu + E)/\mu` (FTU, Prop. 5.3), so a
rank with :math:`\hat\lambda_\ell \lesssim \mu` gives a small, data-independent
iteration count.  The rank is chosen adaptively: it doubles from ``rank0``
until :math:`\hat\lambda_\ell \le \rho\,\mu` (default :math:`\rho = 1`) or the
memory budget ``max_rank`` is met; the sketch is extended, never recomputed.

A preconditioner only changes the speed of CG, never its answer: the true
residual is checked at the end (:func:`~subriemann.linalg.pcg`), so one built at
a nearby point of a flow is reused as long as it keeps the iteration count low
(:class:`NystromSolver`).  :class:`NystromRoute` is the ``"matrix_free"`` route
with this solver for :math:`\lambda < 1` (LSMR at :math:`\lambda = 1`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from subriemann.linalg.info import ACCURACY, SolverInfo, check_converged
from subriemann.linalg.krylov import pcg
from subriemann.linalg.routes.base import Threshold
from subriemann.linalg.routes.matrix_free import MatrixFreeRoute
from subriemann.linalg.state import PointState
from subriemann.validation import check_int, check_real

__all__ = ["NystromPreconditioner", "nystrom_sketch", "NystromSolver", "NystromRoute", "gram_rows"]


@dataclass
class NystromPreconditioner:
    r"""The preconditioner :math:`P^{-1}` of :math:`G + \mu 1`, from :math:`U\hat\Lambda U^\top`.

    Attributes
    ----------
    u : Tensor, shape=[n, ℓ]
        Orthonormal columns.
    lam_hat : Tensor, shape=[ℓ]
        Eigenvalues of :math:`\hat G`, descending, :math:`\ge 0`.
    mu : float
        The shift :math:`\mu > 0`.
    """

    u: Tensor
    lam_hat: Tensor
    mu: float

    @property
    def rank(self) -> int:
        """:math:`\\ell`, the number of columns of :math:`U`."""
        return int(self.u.shape[1])

    def apply(self, r: Tensor) -> Tensor:
        r""":math:`P^{-1}r = r + U\bigl((\hat\lambda_\ell+\mu)/(\hat\lambda+\mu) - 1\bigr)U^\top r`.

        Parameters
        ----------
        r : Tensor, shape=[n]
        """
        if self.rank == 0:
            return r
        scale = (self.lam_hat[-1] + self.mu) / (self.lam_hat + self.mu) - 1.0
        return r + self.u @ (scale * (self.u.T @ r))


def nystrom_sketch(omega: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    r"""Nyström approximation :math:`Y(\Omega^\top Y)^+Y^\top = U\hat\Lambda U^\top` from a sketch.

    The stabilised algorithm of FTU (Alg. 2.1): with :math:`\Omega = QR`
    (the approximation depends only on :math:`\operatorname{ran}\Omega`),
    :math:`Y_Q = YR^{-1} = GQ`, a shift :math:`\nu = \sqrt{n}\,\epsilon\,\|Y_Q\|_F`,
    :math:`Y_\nu = Y_Q + \nu Q`, :math:`C = \operatorname{chol}(Q^\top Y_\nu)`,
    :math:`B = Y_\nu C^{-\top} = U\Sigma W^\top`, :math:`\hat\Lambda = \max(0, \Sigma^2 - \nu)`.

    Parameters
    ----------
    omega : Tensor, shape=[n, ℓ]
        Test matrix (full column rank, e.g. Gaussian).
    y : Tensor, shape=[n, ℓ]
        :math:`G\Omega` for a symmetric positive semidefinite :math:`G`.

    Returns
    -------
    u : Tensor, shape=[n, ℓ]
    lam_hat : Tensor, shape=[ℓ]
        Descending.
    """
    q, r = torch.linalg.qr(omega)
    yq = torch.linalg.solve_triangular(r, y, upper=True, left=False)
    n = omega.shape[0]
    nu = math.sqrt(n) * torch.finfo(y.dtype).eps * float(torch.linalg.matrix_norm(yq))
    y_nu = yq + nu * q
    core = q.T @ y_nu
    core = 0.5 * (core + core.T)
    chol, info = torch.linalg.cholesky_ex(core)
    shift = nu
    while int(info) != 0:  # G Omega rounded to indefinite: raise the shift (rare)
        shift = max(10.0 * shift, torch.finfo(y.dtype).eps * float(core.diagonal().abs().max()))
        y_nu = yq + shift * q
        core = q.T @ y_nu
        chol, info = torch.linalg.cholesky_ex(0.5 * (core + core.T))
    b = torch.linalg.solve_triangular(chol, y_nu.T, upper=False).T
    u, sig, _ = torch.linalg.svd(b, full_matrices=False)
    return u, (sig**2 - shift).clamp_min(0.0)


class NystromSolver:
    r"""Nyström-preconditioned CG for :math:`(G + \mu 1)z = b`, reusing its preconditioner.

    Parameters
    ----------
    rank0 : int
        First sketch size :math:`\ell`.
    max_rank : int
        Largest sketch size (memory: two ``[n, max_rank]`` matrices).
    rho : float
        Stop growing the sketch once :math:`\hat\lambda_\ell \le \rho\mu`.
    reuse_iters : int
        A preconditioner built at an earlier point is kept while the solves
        with it take at most this many iterations; beyond, it is rebuilt at
        the current point.
    block : int
        Columns of :math:`\Omega` pushed through :math:`G` per batched pass
        (bounds the memory of the batched JVP/VJP).
    seed : int

    Attributes
    ----------
    precond : NystromPreconditioner or None
        The preconditioner in use.
    builds : int
        How many preconditioners were built.
    last_sketch_products : int
        Columns of :math:`\Omega` pushed through :math:`G` by the last build.
    """

    def __init__(
        self,
        *,
        rank0: int = 32,
        max_rank: int = 1024,
        rho: float = 1.0,
        reuse_iters: int = 30,
        block: int = 32,
        seed: int = 0,
    ) -> None:
        rank0 = check_int(rank0, "rank0", low=1)
        max_rank = check_int(max_rank, "max_rank", low=rank0)
        rho = check_real(rho, "rho", low=0.0, low_open=True)
        self.rank0, self.max_rank, self.rho = rank0, max_rank, float(rho)
        self.reuse_iters = check_int(reuse_iters, "reuse_iters", low=0)
        self.block = check_int(block, "block", low=1)
        self.gen = torch.Generator(device="cpu").manual_seed(check_int(seed, "seed"))
        self.precond: NystromPreconditioner | None = None
        self.builds = 0
        self.last_sketch_products = 0
        self._key: tuple[int, float, torch.dtype] | None = None
        self._stale = False

    def build(
        self,
        gram_rows: Callable[[Tensor], Tensor],
        n: int,
        mu: float,
        like: Tensor,
        start: int | None = None,
    ) -> NystromPreconditioner:
        r"""Sketch :math:`G` adaptively and return the preconditioner of :math:`G + \mu 1`.

        Parameters
        ----------
        gram_rows : callable
            :math:`W \mapsto WG` for ``W`` of shape ``[b, n]`` (rows; ``G`` is symmetric).
        n : int
        mu : float
        like : Tensor
            Gives dtype and device.
        start : int, optional
            First sketch size (default ``rank0``; a rebuild starts at the last rank).
        """
        omega = like.new_zeros(n, 0)
        y = like.new_zeros(n, 0)
        ell = min(start or self.rank0, self.max_rank, n)
        products = 0
        while True:
            new = ell - omega.shape[1]
            om = torch.randn(new, n, generator=self.gen, dtype=like.dtype).to(like.device)
            ys = [gram_rows(om[a : a + self.block]) for a in range(0, new, self.block)]
            products += new
            omega = torch.cat([omega, om.T], dim=1)
            y = torch.cat([y, torch.cat(ys).T], dim=1)
            u, lam_hat = nystrom_sketch(omega, y)
            if float(lam_hat[-1]) <= self.rho * mu or ell >= min(self.max_rank, n):
                break
            ell = min(2 * ell, self.max_rank, n)
        self.builds += 1
        self.last_sketch_products = products
        return NystromPreconditioner(u, lam_hat, mu)

    def solve(
        self,
        gram_rows: Callable[[Tensor], Tensor],
        rhs: Tensor,
        mu: float,
        *,
        rtol: float = 1e-12,
        maxiter: int | None = None,
    ) -> tuple[Tensor, SolverInfo]:
        r""":math:`(G + \mu 1)^{-1} b` by Nyström-PCG (``info.cond``: that of :math:`P^{-1}A`).

        The preconditioner of the previous call is reused (for the same ``n``,
        ``mu`` and dtype); once a solve with a reused one takes more than
        ``reuse_iters`` iterations, the next call builds a new one at its point
        (starting from the last rank).  The answer does not depend on the
        preconditioner: :func:`pcg` checks the true residual.
        """
        n = rhs.shape[0]
        key = (n, float(mu), rhs.dtype)
        fresh = self.precond is None or self._key != key or self._stale
        if fresh:
            start = self.precond.rank if self.precond is not None and self._key == key else None
            self.precond = self.build(gram_rows, n, mu, rhs, start=start)
            self._key, self._stale = key, False

        def matvec(z: Tensor) -> Tensor:
            return gram_rows(z.unsqueeze(0)).squeeze(0) + mu * z

        assert self.precond is not None
        z, info = pcg(matvec, rhs, self.precond.apply, rtol=rtol, maxiter=maxiter)
        # built at a point too far away: rebuild at the next call
        self._stale = not fresh and info.iterations > self.reuse_iters
        return z, info


def gram_rows(state: PointState, small_is_output: bool) -> Callable[[Tensor], Tensor]:
    r""":math:`W \mapsto WG` at one point, :math:`G = DD^\top` or :math:`D^\top D`, ``[b, n]``.

    Batched JVPs and VJPs of the state's engine (or products with its dense
    :math:`D` when that is already formed): :meth:`~subriemann.linalg.PointState.jvp_rows`,
    :meth:`~subriemann.linalg.PointState.vjp_rows`.

    Parameters
    ----------
    state : PointState
    small_is_output : bool
        :math:`G = DD^\top` (``n = QN``) when true, else :math:`D^\top D` (``n = K``).
    """
    if small_is_output:
        return lambda w: state.jvp_rows(state.vjp_rows(w))
    return lambda w: state.vjp_rows(state.jvp_rows(w))


class NystromRoute(MatrixFreeRoute):
    r"""The ``"matrix_free"`` route with Nyström-preconditioned CG for :math:`\lambda < 1`.

    CG on :math:`\lambda(G + \mu 1)`, :math:`\mu = (1-\lambda)/\lambda`, in the
    smaller space, preconditioned by :class:`NystromSolver` (built from batched
    JVP/VJP sketches, reused over nearby points); stopped on the true residual
    at ``rtol`` or warned.  At :math:`\lambda = 1` it is the ``"matrix_free"``
    LSMR, and ``sharp`` and ``project`` are those of ``"matrix_free"``.

    Parameters
    ----------
    rtol, maxiter, accuracy
        As :class:`~subriemann.linalg.routes.MatrixFreeRoute`.
    **nystrom
        Options of :class:`NystromSolver` (``rank0``, ``max_rank``, ``rho``,
        ``reuse_iters``, ``block``, ``seed``).

    Attributes
    ----------
    nystrom : NystromSolver
        The solver and its preconditioner (``builds``, ``precond``).
    """

    name = "nystrom"
    tags = frozenset({"matrix_free", "iterative", "preconditioned"})

    def __init__(
        self,
        rtol: float = 1e-12,
        maxiter: int | None = None,
        accuracy: float = ACCURACY,
        **nystrom: Any,
    ) -> None:
        super().__init__(rtol, maxiter, accuracy)
        self.nystrom = NystromSolver(**nystrom)

    def solve(
        self, state: PointState, rhs: Tensor, lam: float, threshold: Threshold
    ) -> tuple[Tensor, SolverInfo]:
        if lam == 1.0:
            return super().solve(state, rhs, lam, threshold)
        small = state.output_is_smaller
        # batched sketch rows within the memory budget
        self.nystrom.block = min(32, state.space.backend.rows_per_pass(state.theta))
        b = (rhs if small else state.vjp(rhs)) / lam
        z, info = self.nystrom.solve(
            gram_rows(state, small), b, (1.0 - lam) / lam, rtol=self.rtol, maxiter=self.maxiter
        )
        check_converged(info)
        return (state.vjp(z) if small else z), info
