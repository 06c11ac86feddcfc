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
   = U\hat\Lambda U^\top` (a stabilised Cholesky factorization and the
   eigendecomposition of an :math:`\ell\times\ell` matrix, :func:`nystrom_sketch`);
3. the preconditioner
   :math:`P^{-1} = (\hat\lambda_\ell+\mu)\,U(\hat\Lambda+\mu 1)^{-1}U^\top
   + (1 - UU^\top)`.

With :math:`E = \|G - \hat G\|_2`, the preconditioned operator has condition
number at most :math:`(\hat\lambda_\ell + \mu + E)/\mu` (FTU, Prop. 5.3).  The
rank follows the problem: it doubles from ``rank0`` until
:math:`\hat\lambda_\ell \le \rho\mu` and :math:`\hat\lambda_\ell + E \le 2\rho\mu`
(:math:`E` estimated by power iteration, :func:`sketch_error`), so that the
bound is :math:`1 + 2\rho` (3 at the default :math:`\rho = 1`: at most about 25 CG
iterations for ``rtol = 1e-12``), or until :math:`\ell = n` or the memory budget;
the sketch is extended, never recomputed.

**When the Gram matrix is cheap** (:func:`formed_gram`: the engine forms
:math:`G` from layer factors and it fits the memory budget, or the point already
holds it), a sketch of :math:`\ell` products costs more than :math:`G` itself
(at the benchmarks' sizes, :math:`G` costs from half a product to a few
hundred, while the rank needed is hundreds to thousands), and the sketch
:math:`G\Omega` alone (:math:`2n^2\ell` flops) costs more than the Cholesky
factor of :math:`G + \mu 1` (:math:`n^3/3`) once :math:`\ell > n/6`.  There the
preconditioner is that Cholesky factor (:class:`CholeskyPreconditioner`, the
limit :math:`\ell = n` of :math:`P`): exact at the point where it is built, and
reused at the next points as the Nyström one.

A preconditioner only changes the speed of CG, never its answer: the true
residual is checked at the end (:func:`~subriemann.linalg.pcg`), so one built at
a nearby point of a flow is reused; a reused one gets at most ``reuse_iters``
iterations (30), after which one is built at the current point and CG goes on
from its iterate (:class:`NystromSolver`).  :class:`NystromRoute` is the
``"matrix_free"`` route with this solver for :math:`\lambda < 1` (LSMR at
:math:`\lambda = 1`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from subriemann.engines.base import MEMORY_BUDGET, items_within, plain_tensor
from subriemann.linalg.info import ACCURACY, SolverInfo, check_converged
from subriemann.linalg.krylov import pcg
from subriemann.linalg.routes.base import Threshold
from subriemann.linalg.routes.matrix_free import MatrixFreeRoute
from subriemann.linalg.state import PointState
from subriemann.triangular import cholesky_solve
from subriemann.validation import check_bool, check_int, check_optional, check_real

__all__ = [
    "NystromPreconditioner",
    "CholeskyPreconditioner",
    "nystrom_sketch",
    "NystromSolver",
    "NystromRoute",
    "nystrom_eigenvalues",
    "sketch_error",
    "SKETCH_COPIES",
    "gram_rows",
    "formed_gram",
]


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


@dataclass
class CholeskyPreconditioner:
    r"""The preconditioner :math:`P = G_0 + \mu 1` from a formed Gram matrix :math:`G_0`.

    The limit :math:`\ell = n` of :class:`NystromPreconditioner` (then
    :math:`\hat G = G_0` and :math:`P^{-1} \propto (G_0 + \mu 1)^{-1}`): exact at the
    point where :math:`G_0` was formed, and at a nearby point with Gram matrix
    :math:`G` the preconditioned operator is
    :math:`1 + (G_0 + \mu 1)^{-1}(G - G_0)`, of condition at most
    :math:`(1 + \|G - G_0\|/\mu)/(1 - \|G - G_0\|/\mu)`.

    Attributes
    ----------
    chol : Tensor, shape=[n, n]
        Lower Cholesky factor of :math:`G_0 + \mu 1`.
    mu : float
    """

    chol: Tensor
    mu: float

    @classmethod
    def factor(cls, gram: Tensor, mu: float) -> CholeskyPreconditioner | None:
        r"""From :math:`G_0` (``[n, n]``, symmetric PSD); ``None`` if rounding made
        :math:`G_0 + \mu 1` fail its Cholesky factorization."""
        shifted = gram.clone()
        shifted.diagonal().add_(mu)
        chol, info = torch.linalg.cholesky_ex(shifted)
        return cls(chol, mu) if int(info) == 0 else None

    @property
    def rank(self) -> int:
        """:math:`n` (the whole space)."""
        return int(self.chol.shape[0])

    def apply(self, r: Tensor) -> Tensor:
        r""":math:`P^{-1}r = (G_0 + \mu 1)^{-1}r`, two triangular solves.

        Parameters
        ----------
        r : Tensor, shape=[n]
        """
        return cholesky_solve(self.chol, r)


def _nystrom_factor(omega: Tensor, y: Tensor) -> tuple[Tensor, float]:
    r"""``(B, shift)`` with :math:`\hat G + \text{shift}\cdot QQ^\top = BB^\top` (FTU, Alg. 2.1)."""
    q, r = torch.linalg.qr(omega)
    yq = torch.linalg.solve_triangular(r, y, upper=True, left=False)
    n = omega.shape[0]
    eps = torch.finfo(y.dtype).eps
    shift = math.sqrt(n) * eps * float(torch.linalg.matrix_norm(yq))
    while True:
        y_nu = yq + shift * q
        core = q.T @ y_nu
        chol, info = torch.linalg.cholesky_ex(0.5 * (core + core.T))
        if int(info) == 0:
            break
        # G Omega rounded to indefinite (rare), or G = 0: raise the shift
        shift = max(10.0 * shift, eps * float(core.diagonal().abs().max()), eps)
    return torch.linalg.solve_triangular(chol, y_nu.T, upper=False).T, shift


def nystrom_eigenvalues(omega: Tensor, y: Tensor) -> Tensor:
    r"""The eigenvalues :math:`\hat\lambda` of :func:`nystrom_sketch` (descending), no vectors."""
    b, shift = _nystrom_factor(omega, y)
    gram = b.T @ b
    return (torch.linalg.eigvalsh(0.5 * (gram + gram.T)).flip(0) - shift).clamp_min(0.0)


def nystrom_sketch(omega: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    r"""Nyström approximation :math:`Y(\Omega^\top Y)^+Y^\top = U\hat\Lambda U^\top` from a sketch.

    The stabilised algorithm of FTU (Alg. 2.1): with :math:`\Omega = QR`
    (the approximation depends only on :math:`\operatorname{ran}\Omega`),
    :math:`Y_Q = YR^{-1} = GQ`, a shift :math:`\nu = \sqrt{n}\,\epsilon\,\|Y_Q\|_F`,
    :math:`Y_\nu = Y_Q + \nu Q`, :math:`C = \operatorname{chol}(Q^\top Y_\nu)`,
    :math:`B = Y_\nu C^{-\top}`, :math:`BB^\top = U\Sigma^2U^\top`,
    :math:`\hat\Lambda = \max(0, \Sigma^2 - \nu)`.

    :math:`\Sigma^2` and :math:`W` come from the eigendecomposition of the
    :math:`\ell\times\ell` matrix :math:`B^\top B = W\Sigma^2W^\top` (several times
    cheaper than a thin SVD of :math:`B`), :math:`U = BW\Sigma^{-1}`,
    re-orthonormalized by a QR factorization.  The eigenvalues have an absolute
    error of about :math:`\epsilon\sigma_1^2 \le \nu`, the level of the shift; a
    column of :math:`U` has an error of about :math:`\epsilon\sigma_1^2/\sigma_i^2`,
    which is small wherever the preconditioner acts (:math:`\hat\lambda_i \gg
    \hat\lambda_\ell`) and harmless elsewhere: the QR makes the columns orthonormal,
    so :math:`P^{-1}` is SPD whatever the rounding.

    Parameters
    ----------
    omega : Tensor, shape=[n, ℓ]
        Test matrix (full column rank, e.g. Gaussian).
    y : Tensor, shape=[n, ℓ]
        :math:`G\Omega` for a symmetric positive semidefinite :math:`G`.

    Returns
    -------
    u : Tensor, shape=[n, ℓ]
        Orthonormal columns.
    lam_hat : Tensor, shape=[ℓ]
        Descending.
    """
    b, shift = _nystrom_factor(omega, y)
    gram = b.T @ b
    evals, w = torch.linalg.eigh(0.5 * (gram + gram.T))
    evals, w = evals.flip(0), w.flip(1)
    sig = evals.clamp_min(torch.finfo(b.dtype).tiny).sqrt()
    u = torch.linalg.qr((b @ w) / sig).Q
    return u, (evals - shift).clamp_min(0.0)


def sketch_error(
    gram_rows: Callable[[Tensor], Tensor],
    precond: NystromPreconditioner,
    gen: torch.Generator,
    iters: int = 10,
) -> float:
    r"""An estimate of :math:`E = \|G - \hat G\|_2` by ``iters`` power iterations.

    :math:`G - \hat G` is positive semidefinite (a Nyström approximation never
    exceeds :math:`G`), so the power iteration's :math:`|(G-\hat G)v|` increases
    towards :math:`E` from below; ``iters`` products with :math:`G`.
    """
    u, lam = precond.u, precond.lam_hat
    v = torch.randn(u.shape[0], generator=gen, dtype=u.dtype).to(u.device)
    v = v / v.norm()
    est = 0.0
    for _ in range(iters):
        w = gram_rows(v.unsqueeze(0)).squeeze(0) - u @ (lam * (u.T @ v))
        est = float(w.norm())
        if est == 0.0:
            break
        v = w / est
    return est


SKETCH_COPIES = 6
"""``[n, ℓ]`` matrices alive while a sketch is factored (Ω, Y, Q, Y_ν, B, U): the default
largest rank keeps them within the memory budget."""


class NystromSolver:
    r"""Nyström-preconditioned CG for :math:`(G + \mu 1)z = b`, reusing its preconditioner.

    Parameters
    ----------
    rank0 : int
        First sketch size :math:`\ell`.
    max_rank : int, optional
        Largest sketch size.  By default the rank follows the problem: it grows
        until :math:`\hat\lambda_\ell \le \rho\mu` or :math:`\ell = n`, as far as
        ``SKETCH_COPIES`` matrices ``[n, ℓ]`` fit in ``memory_budget``.
    rho : float
        Stop growing the sketch once :math:`\hat\lambda_\ell \le \rho\mu` and
        :math:`\hat\lambda_\ell + \|G - \hat G\|_2 \le 2\rho\mu` (:meth:`build`).
    reuse_iters : int
        A preconditioner built at an earlier point gets at most this many
        iterations; a solve that needs more rebuilds it at its own point and
        goes on from its iterate (CG on the residual equation), so that no
        preconditioner runs more than ``reuse_iters`` iterations at a point where
        it was reused.
    block : int
        Columns of :math:`\Omega` pushed through :math:`G` per batched pass
        (bounds the memory of the batched JVP/VJP).
    seed : int
    memory_budget : int
        Bytes for the sketch (default :data:`~subriemann.engines.base.MEMORY_BUDGET`).

    Attributes
    ----------
    precond : NystromPreconditioner or CholeskyPreconditioner or None
        The preconditioner in use.
    builds : int
        How many preconditioners were built.
    last_sketch_products : int
        Columns of :math:`\Omega` pushed through :math:`G` by the last build.
    last_error : float
        The estimate of :math:`E = \|G - \hat G\|_2` of the last build
        (:func:`sketch_error`; 0 when the sketch has rank ``n``).
    sketch_source : str
        ``"gram"`` when the last sketch was :math:`G\Omega` from a formed
        :math:`G`, ``"products"`` when it came from batched products.
    """

    def __init__(
        self,
        *,
        rank0: int = 32,
        max_rank: int | None = None,
        rho: float = 1.0,
        reuse_iters: int = 30,
        block: int = 32,
        seed: int = 0,
        memory_budget: int = MEMORY_BUDGET,
    ) -> None:
        self.rank0 = check_int(rank0, "rank0", low=1)
        self.max_rank = check_optional(check_int, max_rank, "max_rank", low=self.rank0)
        self.rho = float(check_real(rho, "rho", low=0.0, low_open=True))
        self.reuse_iters = check_int(reuse_iters, "reuse_iters", low=0)
        self.block = check_int(block, "block", low=1)
        self.memory_budget = check_int(memory_budget, "memory_budget", low=1)
        self.gen = torch.Generator(device="cpu").manual_seed(check_int(seed, "seed"))
        self.precond: NystromPreconditioner | CholeskyPreconditioner | None = None
        self.builds = 0
        self.last_sketch_products = 0
        self.sketch_source = ""
        self.last_error = float("nan")
        self._key: tuple[int, float, torch.dtype] | None = None

    def rank_cap(self, n: int, itemsize: int) -> int:
        r"""The largest sketch size for :math:`G` of size ``n``: ``max_rank``, or
        :math:`\min(n, \text{what fits the budget})` (at least ``rank0``)."""
        if self.max_rank is not None:
            return min(self.max_rank, n)
        fits = items_within(self.memory_budget, SKETCH_COPIES * n * itemsize, n)
        return min(n, max(self.rank0, fits))

    def build(
        self,
        gram_rows: Callable[[Tensor], Tensor],
        n: int,
        mu: float,
        like: Tensor,
        start: int | None = None,
    ) -> NystromPreconditioner:
        r"""Sketch :math:`G` adaptively and return the preconditioner of :math:`G + \mu 1`.

        The rank doubles from ``start`` until :math:`\hat\lambda_\ell \le \rho\mu`
        and :math:`\hat\lambda_\ell + E \le 2\rho\mu`, with the error
        :math:`E = \|G - \hat G\|_2` estimated by :func:`sketch_error`, or the cap
        (:meth:`rank_cap`); the sketch is extended, never recomputed.  Then the
        preconditioned operator has condition number at most
        :math:`(\hat\lambda_\ell + \mu + E)/\mu \le 1 + 2\rho` (FTU, Prop. 5.3),
        and CG needs at most about 25 iterations for ``rtol = 1e-12`` at
        :math:`\rho = 1` (:func:`~subriemann.linalg.cg`'s bound).

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
        cap = self.rank_cap(n, like.element_size())
        omega = like.new_zeros(n, 0)
        y = like.new_zeros(n, 0)
        ell = min(start or self.rank0, cap)
        while True:
            new = ell - omega.shape[1]
            om = torch.randn(new, n, generator=self.gen, dtype=like.dtype).to(like.device)
            ys = [gram_rows(om[a : a + self.block]) for a in range(0, new, self.block)]
            omega = torch.cat([omega, om.T], dim=1)
            y = torch.cat([y, torch.cat(ys).T], dim=1)
            # values only while the last one is still above rho mu (cheaper)
            if ell < cap and float(nystrom_eigenvalues(omega, y)[-1]) > self.rho * mu:
                ell = min(2 * ell, cap)
                continue
            pre = NystromPreconditioner(*nystrom_sketch(omega, y), mu)
            # exact at ell = n (up to the shift nu); otherwise E by power iteration
            self.last_error = 0.0 if ell >= n else sketch_error(gram_rows, pre, self.gen)
            if ell >= cap or float(pre.lam_hat[-1]) + self.last_error <= 2.0 * self.rho * mu:
                break
            ell = min(2 * ell, cap)
        self.builds += 1
        self.last_sketch_products = int(omega.shape[1])
        return pre

    def solve(
        self,
        gram_rows: Callable[[Tensor], Tensor],
        rhs: Tensor,
        mu: float,
        *,
        rtol: float = 1e-12,
        maxiter: int | None = None,
        gram: Callable[[], Tensor | None] | None = None,
    ) -> tuple[Tensor, SolverInfo]:
        r""":math:`(G + \mu 1)^{-1} b` by Nyström-PCG (``info.cond``: that of :math:`P^{-1}A`).

        The preconditioner of the previous call is reused (for the same ``n``,
        ``mu`` and dtype) for at most ``reuse_iters`` iterations; if the solve
        has not converged by then, a preconditioner is built at this point and
        CG goes on with it on the residual equation :math:`(G + \mu 1)\delta = b - (G+\mu 1)z`
        (``info.iterations`` counts both parts).  The answer does not depend on
        the preconditioner: :func:`pcg` checks the true residual.

        Parameters
        ----------
        gram_rows : callable
            :math:`W \mapsto WG`, ``[b, n] -> [b, n]`` (batched products).
        rhs : Tensor, shape=[n]
        mu : float
        rtol : float
        maxiter : int, optional
            Iteration limit of CG with a preconditioner built at this point
            (default: scaled with the conditioning, :func:`~subriemann.linalg.cg`).
        gram : callable, optional
            Called only when a preconditioner is built: the formed :math:`G`
            (``[n, n]``) or ``None``.  With :math:`G` the sketch is the matrix
            product :math:`G\Omega` instead of ``ℓ`` batched products, and CG at
            this point multiplies by :math:`G`.
        """
        key = (rhs.shape[0], float(mu), rhs.dtype)
        if self.precond is None or self._key != key:
            self.precond = None
            rows = self._build_here(gram_rows, rhs, mu, gram)
            assert self.precond is not None
            return pcg(_shifted(rows, mu), rhs, self.precond.apply, rtol=rtol, maxiter=maxiter)
        limit = self.reuse_iters if maxiter is None else min(maxiter, self.reuse_iters)
        z, info = pcg(_shifted(gram_rows, mu), rhs, self.precond.apply, rtol=rtol, maxiter=limit)
        if info.converged or (maxiter is not None and maxiter <= self.reuse_iters):
            return z, info
        # the preconditioner was built too far away: build one here, go on from z
        bnorm = float(rhs.norm())
        rows = self._build_here(gram_rows, rhs, mu, gram)
        assert self.precond is not None
        res = rhs - _shifted(rows, mu)(z)
        rnorm = float(res.norm())
        more = None if maxiter is None else maxiter - info.iterations
        dz, info2 = pcg(_shifted(rows, mu), res, self.precond.apply,
                        rtol=min(0.5, rtol * bnorm / rnorm), maxiter=more)  # fmt: skip
        residual = info2.residual * rnorm / bnorm
        return z + dz, replace(
            info2,
            iterations=info.iterations + info2.iterations,
            residual=residual,
            converged=residual <= 10.0 * rtol,
            rtol=rtol,
            reason=f"{info2.reason} (preconditioner rebuilt after {info.iterations} iterations)",
        )

    def _build_here(
        self,
        gram_rows: Callable[[Tensor], Tensor],
        rhs: Tensor,
        mu: float,
        gram: Callable[[], Tensor | None] | None,
    ) -> Callable[[Tensor], Tensor]:
        """Build the preconditioner at this point; the products to use here (from ``G``
        when ``gram`` gives it)."""
        g = gram() if gram is not None else None
        self._key = (rhs.shape[0], float(mu), rhs.dtype)
        self.sketch_source = "products" if g is None else "gram"
        if g is None:
            rows = gram_rows
        else:
            rows = _products_with(g)
            exact = CholeskyPreconditioner.factor(g, mu)
            if exact is not None:  # the l = n limit of the Nystrom preconditioner, cheaper here
                self.precond, self.last_error, self.last_sketch_products = exact, 0.0, 0
                self.builds += 1
                return rows
        last = self.precond
        start = last.rank if isinstance(last, NystromPreconditioner) else None
        self.precond = self.build(rows, rhs.shape[0], mu, rhs, start=start)
        return rows


def _products_with(gram: Tensor) -> Callable[[Tensor], Tensor]:
    r""":math:`W \mapsto WG` with a formed :math:`G`."""
    return lambda w: w @ gram


def _shifted(gram_rows: Callable[[Tensor], Tensor], mu: float) -> Callable[[Tensor], Tensor]:
    r""":math:`z \mapsto (G + \mu 1)z` from the batched products."""
    return lambda z: gram_rows(z.unsqueeze(0)).squeeze(0) + mu * z


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


def formed_gram(state: PointState, small_is_output: bool, budget: int) -> Tensor | None:
    r"""The smaller Gram matrix :math:`G` at this point, when it is cheap; else ``None``.

    :math:`G` (:math:`DD^\top` or :math:`D^\top D`, ``[n, n]``) is cheap when the
    state already holds it (e.g. formed by the rank monitor), or when the engine
    forms it from layer factors (``backend.gram_from_factors``, without
    :math:`D`) and its :math:`n^2` entries fit in ``budget`` bytes.  In the
    benchmarks (``docs/scale.md``) forming it from the factors cost from half a
    product with :math:`G` (a JVP and a VJP) to a few hundred, where a sketch
    needs hundreds to thousands of products.  The Gram is kept in the state, so
    that the rank monitor reuses it.

    Parameters
    ----------
    state : PointState
    small_is_output : bool
        :math:`G = DD^\top` when true, else :math:`D^\top D`.
    budget : int
        Bytes.
    """
    key = "ntk" if small_is_output else "param_gram"
    if not state.has(key):
        n = min(state.space.output_dim, state.space.dim)
        fits = n * n * state.theta.element_size() <= budget
        if not (fits and state.space.backend.gram_from_factors and plain_tensor(state.theta)):
            return None
    return state.ntk if small_is_output else state.param_gram


class NystromRoute(MatrixFreeRoute):
    r"""The ``"matrix_free"`` route with Nyström-preconditioned CG for :math:`\lambda < 1`.

    CG on :math:`\lambda(G + \mu 1)`, :math:`\mu = (1-\lambda)/\lambda`, in the
    smaller space, preconditioned by :class:`NystromSolver` (reused over nearby
    points); stopped on the true residual at ``rtol`` or warned.  The
    preconditioner is built from the Gram matrix :math:`G` where that is cheap
    (:func:`formed_gram`: the Cholesky factor of :math:`G + \mu 1`,
    :class:`CholeskyPreconditioner`), else from a randomized sketch of batched
    JVP/VJP products (:class:`NystromPreconditioner`).  At :math:`\lambda = 1` it
    is the ``"matrix_free"`` LSMR, and ``sharp`` and ``project`` are those of
    ``"matrix_free"``.

    Parameters
    ----------
    rtol, maxiter, accuracy
        As :class:`~subriemann.linalg.routes.MatrixFreeRoute`.
    use_gram : bool
        Whether to build from a cheap :math:`G` (default); ``False`` always
        sketches by products (the route for problems whose :math:`G` does not fit).
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
        use_gram: bool = True,
        **nystrom: Any,
    ) -> None:
        super().__init__(rtol, maxiter, accuracy)
        self.use_gram = check_bool(use_gram, "use_gram")
        self.nystrom = NystromSolver(**nystrom)

    def description(self) -> dict[str, object]:
        return {**super().description(), "use_gram": self.use_gram}

    def solve(
        self, state: PointState, rhs: Tensor, lam: float, threshold: Threshold
    ) -> tuple[Tensor, SolverInfo]:
        if lam == 1.0:
            return super().solve(state, rhs, lam, threshold)
        small = state.output_is_smaller
        backend = state.space.backend
        # batched sketch rows within the memory budget, and the budget of the sketch itself
        self.nystrom.block = max(1, int(backend.rows_per_pass(state.theta)))
        self.nystrom.memory_budget = int(getattr(backend, "memory_budget", MEMORY_BUDGET))
        b = (rhs if small else state.vjp(rhs)) / lam
        budget = self.nystrom.memory_budget
        z, info = self.nystrom.solve(
            gram_rows(state, small), b, (1.0 - lam) / lam, rtol=self.rtol, maxiter=self.maxiter,
            gram=(lambda: formed_gram(state, small, budget)) if self.use_gram else None,
        )  # fmt: skip
        check_converged(info)
        return (state.vjp(z) if small else z), info
