r"""The Hessian :math:`\nabla^2_\theta C` at one point: products, spectrum, kernel.

.. math:: \nabla^2_\theta C = D^\top\,\nabla^2_x C\,D
          + \sum_a (\nabla_x C)_a\,\nabla^2_\theta x_a ,

a Gauss–Newton part and a second-order part that vanishes at global minima
(docs/theory.md §5).  :class:`HessianOperator` applies it through
Hessian-vector products (forward-over-reverse :func:`torch.func.jvp` of
:func:`torch.func.grad`), either column by column into a dense
:math:`K\times K` matrix (``"dense"``) or inside ARPACK's Lanczos iteration
(``"lanczos"``, :func:`scipy.sparse.linalg.eigsh` on the operator of
:func:`subriemann.linalg.scipy_operator`).

The kernel cut
--------------
With the eigenvalue magnitudes :math:`a_1\le\dots\le a_K`, :math:`A = a_K`,
the kernel dimension is the cut :math:`k` that maximizes the gap
:math:`a_{k+1}/\max(a_k, \epsilon A)` among the cuts with
:math:`a_k \le \mathrm{kernel\_rtol}\cdot A` (:math:`k = 0`, no kernel, has
the gap :math:`a_1/(\epsilon A)`); see :func:`kernel_cut`.  The index counts
the eigenvalues below minus the cut value
:math:`\sqrt{\max(a_k,\epsilon A)\,a_{k+1}}`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, eigsh
from torch import Tensor

from subriemann.linalg import scipy_operator
from subriemann.space import ParameterSpace
from subriemann.validation import check_choice

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "HESSIAN_METHODS",
    "DENSE_HESSIAN_LIMIT",
    "HessianOperator",
    "HessianSpectrum",
    "hessian_vector_product",
    "hessian_spectrum",
    "hessian_method",
    "kernel_cut",
    "check_space",
    "arpack_eigsh",
]

EPS = float(np.finfo(np.float64).eps)
"""Machine epsilon of float64: the floor :math:`\\epsilon A` of the kernel cut."""

HESSIAN_METHODS = ("auto", "dense", "lanczos")
DENSE_HESSIAN_LIMIT = 1500
"""Largest :math:`K` for which ``hessian="auto"`` forms the dense Hessian."""


def check_space(space: Any) -> ParameterSpace:
    """``space`` if it is a :class:`~subriemann.ParameterSpace`; a one-line TypeError otherwise."""
    if not isinstance(space, ParameterSpace):
        raise TypeError(f"space must be a subriemann.ParameterSpace, got {type(space).__name__}")
    return space


def hessian_method(space: ParameterSpace, hessian: Any, dense_limit: int) -> str:
    """The Hessian route: ``"dense"`` or ``"lanczos"`` (``"auto"``: dense for K <= dense_limit)."""
    check_choice(hessian, "hessian", HESSIAN_METHODS)
    if hessian == "auto":
        return "dense" if space.dim <= dense_limit else "lanczos"
    if hessian == "lanczos" and space.dim < 3:
        raise ValueError(f"hessian='lanczos' needs K >= 3 (K = {space.dim}); use 'dense'")
    return str(hessian)


# ---------------------------------------------------------------------------
# Hessian-vector products
# ---------------------------------------------------------------------------
def _grad_function(space: ParameterSpace) -> Callable[[Tensor], Tensor]:
    r"""A :mod:`torch.func`-differentiable :math:`\theta \mapsto \nabla_\theta C`."""

    def cost_of(t: Tensor) -> Tensor:
        return space.output_cost(space.backend.outputs(t))

    return torch.func.grad(cost_of)


class HessianOperator:
    r"""Hessian-vector products :math:`v \mapsto \nabla^2_\theta C(\theta)\,v` at one point.

    Single products (Lanczos, LSMR) differentiate a retained autograd graph of
    :math:`\nabla_\theta C` once more (double backward: the graph is built
    once per point); the dense matrix uses :func:`torch.func.vmap` over
    forward-over-reverse products.

    Parameters
    ----------
    space : ParameterSpace
    theta : Tensor, shape=[K]

    Attributes
    ----------
    n_hvp : int
        Products computed so far (a dense matrix counts :math:`K`).
    """

    def __init__(self, space: ParameterSpace, theta: Tensor) -> None:
        self.space = space
        self.theta = theta.detach()
        self._grad = _grad_function(space)
        self._graph: tuple[Tensor, Tensor] | None = None
        self.n_hvp = 0

    @property
    def dim(self) -> int:
        """:math:`K`."""
        return self.space.dim

    def hvp(self, tangent_vec: Tensor) -> Tensor:
        r""":math:`\nabla^2_\theta C\,v`, shape ``[K]``."""
        self.n_hvp += 1
        if self._graph is None:
            try:
                leaf = self.theta.clone().requires_grad_(True)
                with torch.enable_grad():
                    cost = self.space.output_cost(self.space.backend.outputs(leaf))
                    (grad,) = torch.autograd.grad(cost, leaf, create_graph=True)
                if not grad.requires_grad:  # C is linear in theta: H = 0
                    return torch.zeros_like(tangent_vec)
                self._graph = (leaf, grad)
            except RuntimeError:  # an engine without double backward: use torch.func
                self._graph = (self.theta, self.theta)  # sentinel
        leaf, grad = self._graph
        if grad is leaf:
            return torch.func.jvp(self._grad, (self.theta,), (tangent_vec,))[1]
        (out,) = torch.autograd.grad(grad, leaf, grad_outputs=tangent_vec, retain_graph=True)
        return out.detach()

    def dense(self, chunk: int = 128) -> Tensor:
        r"""The symmetric matrix :math:`\nabla^2_\theta C`, shape ``[K, K]`` (K products)."""
        eye = torch.eye(self.dim, dtype=self.theta.dtype, device=self.theta.device)
        cols = torch.func.vmap(
            lambda v: torch.func.jvp(self._grad, (self.theta,), (v,))[1], chunk_size=chunk
        )(eye)
        self.n_hvp += self.dim
        h = cols.T
        return 0.5 * (h + h.T)

    def hvp64(self, tangent_vec: Tensor) -> Tensor:
        """:meth:`hvp` with float64 in and out (ARPACK runs in double precision)."""
        return self.hvp(tangent_vec.to(self.theta.dtype)).to(torch.float64)

    def operator(self) -> Any:
        """The products as a float64 SciPy ``LinearOperator`` (through ``scipy_operator``)."""
        return scipy_operator(
            (self.dim, self.dim), self.hvp64, dtype=torch.float64, device=self.theta.device
        )


def hessian_vector_product(space: ParameterSpace, theta: Tensor, tangent_vec: Tensor) -> Tensor:
    r""":math:`\nabla^2_\theta C(\theta)\,v`, one forward-over-reverse product.

    .. math:: \nabla^2_\theta C\,v = D^\top\nabla^2_xC\,Dv
              + \sum_a(\nabla_xC)_a\,\nabla^2_\theta x_a\,v .

    Parameters
    ----------
    space : ParameterSpace
    theta : Tensor, shape=[K]
    tangent_vec : Tensor, shape=[K]

    Returns
    -------
    Tensor, shape=[K]
    """
    space = check_space(space)
    theta = space.check_point(theta)
    v = space.check_tangent(tangent_vec)
    if v.ndim != 1:
        raise ValueError(f"tangent_vec must have shape ({space.dim},), got {tuple(v.shape)}")
    return HessianOperator(space, theta).hvp(v).detach()


# ---------------------------------------------------------------------------
# spectra
# ---------------------------------------------------------------------------
@dataclass
class HessianSpectrum:
    r"""The computed part of the spectrum of :math:`\nabla^2_\theta C` and its kernel cut.

    Attributes
    ----------
    eigenvalues : Tensor
        Computed eigenvalues, ascending.
    kernel_basis : Tensor, shape=[K, dimension]
        Orthonormal basis of the (computed) kernel.
    method : str
        ``"dense"`` or ``"lanczos"``.
    scale : float
        Largest eigenvalue magnitude :math:`A`.
    dimension, gap, threshold
        The kernel cut of :func:`kernel_cut` (``gap`` NaN for a lower bound).
    complete : bool
        All :math:`K` eigenvalues were computed.
    dimension_lower_bound : bool
        Lanczos: the deflation rounds did not close the kernel.
    index : int
        Eigenvalues below ``-threshold``.
    index_lower_bound : bool
    n_hvp : int
    notes : list of str
    evecs : Tensor or None
        Dense only: every eigenvector, ``[K, K]``.
    """

    eigenvalues: Tensor
    kernel_basis: Tensor
    method: str
    scale: float
    dimension: int
    gap: float
    threshold: float
    complete: bool
    dimension_lower_bound: bool
    index: int
    index_lower_bound: bool
    n_hvp: int
    notes: list[str] = field(default_factory=list)
    evecs: Tensor | None = None


def kernel_cut(a: np.ndarray, scale: float, kernel_rtol: float) -> tuple[int, float, float]:
    """Kernel cut on ascending magnitudes ``a`` (the bottom of a spectrum of scale ``scale``).

    Returns ``(k, gap, threshold)``: the first ``k`` entries are the kernel.

    Examples
    --------
    >>> import numpy as np
    >>> k, gap, thr = kernel_cut(np.array([1e-14, 2e-14, 0.5, 1.0]), 1.0, 1e-6)
    >>> k, gap > 1e12
    (2, True)
    """
    n = a.shape[0]
    if scale <= 0.0:  # the zero matrix
        return n, math.inf, 0.0
    floor = EPS * scale
    best_k = 0
    best_gap = float(a[0]) / floor if n else math.inf
    for k in range(1, n):
        low = float(a[k - 1])
        if low > kernel_rtol * scale:
            break
        gap = float(a[k]) / max(low, floor)
        if gap > best_gap:
            best_k, best_gap = k, gap
    low = max(float(a[best_k - 1]), floor) if best_k > 0 else floor
    high = float(a[best_k]) if best_k < n else low
    return best_k, best_gap, math.sqrt(low * high)


def _gap_note(gap: float, min_gap: float, among: str = "") -> str:
    return (
        f"no clear eigenvalue gap{among} (largest admissible gap {gap:.3g} < min_gap "
        f"{min_gap:.3g}): the dimension estimate is unreliable"
    )


def _dense_spectrum(hess: HessianOperator, kernel_rtol: float, min_gap: float) -> HessianSpectrum:
    evals, evecs = torch.linalg.eigh(hess.dense())
    mags = evals.abs()
    order = torch.argsort(mags)
    a = mags[order].cpu().numpy()
    scale = float(a[-1]) if a.size else 0.0
    k, gap, thr = kernel_cut(a, scale, kernel_rtol)
    notes = [_gap_note(gap, min_gap)] if gap < min_gap else []
    return HessianSpectrum(
        eigenvalues=evals.detach(),
        kernel_basis=evecs[:, order[:k]].detach(),
        method="dense",
        scale=scale,
        dimension=k,
        gap=gap,
        threshold=thr,
        complete=True,
        dimension_lower_bound=False,
        index=int((evals < -thr).sum()),
        index_lower_bound=False,
        n_hvp=hess.n_hvp,
        notes=notes,
        evecs=evecs.detach(),
    )


def arpack_eigsh(
    op: Any, k: int, which: str, tol: float, maxiter: int, seed: int = 0,
    avoid: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """ARPACK ``eigsh`` from a seeded Gaussian start vector, retried on ARPACK errors.

    The start vector has a component in every eigenspace, kernels included, and is
    orthogonal to the columns of ``avoid``; an ARPACK error is retried with a larger
    Krylov space.  Returns ``(eigenvalues, eigenvectors, converged)`` (what ARPACK has
    when it did not converge).
    """
    n = op.shape[0]
    ncv = min(n, max(2 * k + 1, k + 20))
    v0 = np.random.default_rng(seed).standard_normal(n)
    if avoid is not None and avoid.shape[1]:
        v0 = v0 - avoid @ (avoid.T @ v0)
    for _ in range(3):
        try:
            w, v = eigsh(op, k=k, which=which, tol=tol, maxiter=maxiter, ncv=ncv, v0=v0)
            return w, v, True
        except ArpackNoConvergence as err:
            return np.asarray(err.eigenvalues), np.asarray(err.eigenvectors), False
        except ArpackError:
            if ncv >= n:
                break
            ncv = min(n, 2 * ncv)
    return np.zeros(0), np.zeros((n, 0)), False


@dataclass
class _Deflation:
    """What the deflated smallest-magnitude rounds found."""

    kernel: np.ndarray  # [K, d], orthonormal
    kernel_values: list[float]
    others: np.ndarray  # the last round's non-kernel eigenvalues
    exhausted: bool  # max_rounds spent without confirming the end of the kernel


def _deflated(hess: HessianOperator, basis: np.ndarray, shift: float) -> Any:
    r"""The Hessian with the columns of ``basis`` moved to the eigenvalue ``shift``.

    :math:`v \mapsto (I - BB^\top)H(I - BB^\top)v + \mathrm{shift}\,BB^\top v`.
    """
    device = hess.theta.device
    b = torch.as_tensor(basis, dtype=torch.float64, device=device)

    def mv(v: Tensor) -> Tensor:
        c = b.T @ v
        hw = hess.hvp64(v - b @ c)
        return hw - b @ (b.T @ hw) + shift * (b @ c)

    return scipy_operator((hess.dim, hess.dim), mv, dtype=torch.float64, device=device)


def _kernel_rounds(
    hess: HessianOperator, k: int, scale: float, kernel_rtol: float, max_rounds: int,
    patience: int, tol: float, maxiter: int, notes: list[str],
) -> _Deflation:
    """Smallest-magnitude ARPACK runs with the kernel found so far deflated (to :math:`2A`)."""
    kdim = hess.dim
    out = _Deflation(np.zeros((kdim, 0)), [], np.zeros(0), True)
    misses = 0
    for rnd in range(max_rounds):
        dop = _deflated(hess, out.kernel, 2.0 * scale)
        w, vecs, ok = arpack_eigsh(dop, k, "SM", tol, maxiter, seed=1 + rnd, avoid=out.kernel)
        if not ok:
            notes.append("ARPACK did not converge for the smallest-magnitude eigenvalues")
        small = np.abs(w) <= kernel_rtol * scale
        if not small.any():
            out.others = w
            # a Krylov run can miss a repeated eigenvalue: stop after `patience` misses
            misses += 1
            if misses >= patience:
                out.exhausted = False
                break
            continue
        misses = 0
        out.others = w[~small]
        out.kernel = np.linalg.qr(np.hstack([out.kernel, vecs[:, small]]))[0]
        out.kernel_values.extend(float(x) for x in w[small])
        if out.kernel.shape[1] >= kdim - 1:
            out.exhausted = False
            break
    return out


def _distinct(bottom: list[float], more: np.ndarray, scale: float) -> np.ndarray:
    """``bottom`` and the values of ``more`` that are not copies of one already listed."""
    close = 1e-8 * max(scale, 1e-300)
    extra = sorted(float(x) for x in more if not any(abs(float(x) - b) <= close for b in bottom))
    unique: list[float] = []
    for x in extra:
        if not unique or abs(x - unique[-1]) > close:
            unique.append(x)
    return np.array(bottom + unique)


def _lanczos_spectrum(
    hess: HessianOperator,
    kernel_rtol: float,
    min_gap: float,
    n_eigs: int,
    max_rounds: int,
    arpack_tol: float = 1e-10,
    patience: int = 2,
) -> HessianSpectrum:
    r"""Extreme and smallest-magnitude eigenvalues by ARPACK, with explicit deflation.

    ARPACK's single-vector Lanczos finds only some copies of a repeated
    eigenvalue (in exact arithmetic one per Krylov space; more only through
    rounding), and a kernel is exactly that.  So the smallest-magnitude run
    is repeated with the kernel vectors found so far deflated (moved to the
    eigenvalue :math:`2A`) and a fresh random start vector orthogonal to
    them, until ``patience`` consecutive rounds find no new kernel vector, or
    ``max_rounds`` rounds were spent (then the dimension is flagged as a
    lower bound).  This is a randomized search: a kernel direction can still
    be missed, and the notes say that the estimate rests on the computed
    part of the spectrum.
    """
    kdim = hess.dim
    op = hess.operator()
    notes: list[str] = []
    k = min(n_eigs, kdim - 1)
    maxiter = max(300, 2 * kdim)  # ARPACK restarts; a run that stops short gives what it has
    top, _, ok = arpack_eigsh(op, min(4, kdim - 1), "LM", arpack_tol, maxiter)
    if not ok:
        notes.append("ARPACK did not converge for the largest eigenvalues")
    scale = float(np.abs(top).max()) if top.size else 0.0
    sa, _, ok = arpack_eigsh(op, k, "SA", arpack_tol, maxiter)
    if not ok:
        notes.append("ARPACK did not converge for the most negative eigenvalues")
    found = _kernel_rounds(hess, k, scale, kernel_rtol, max_rounds, patience, arpack_tol, maxiter,
                           notes)
    computed = np.concatenate([np.asarray(found.kernel_values), found.others])
    a = np.sort(np.abs(computed))
    kcut, gap, thr = kernel_cut(a, scale, kernel_rtol)
    if found.exhausted:
        gap = math.nan
        thr = max(float(a[kcut - 1]) if kcut else 0.0, EPS * scale)
        notes.append(
            f"the kernel has at least {found.kernel.shape[1]} dimensions; {max_rounds} deflation "
            f"rounds of {k} eigenvalues did not confirm its end (raise n_eigs or max_rounds)"
        )
    elif gap < min_gap:
        notes.append(_gap_note(gap, min_gap, " among the computed eigenvalues"))
    if kcut > found.kernel.shape[1]:
        notes.append("the cut includes eigenvalues above kernel_rtol whose vectors were not kept")
    index = int((sa < -thr).sum()) if sa.size else 0
    index_lower = bool(sa.size) and index == sa.size
    if index_lower:
        notes.append(
            f"all {sa.size} computed most-negative eigenvalues are negative: index >= {index}"
        )
    # the bottom of the spectrum (kernel + the last round), then the other computed
    # eigenvalues that are not copies of those (one run each, so distinct eigenpairs)
    allvals = _distinct(list(computed), np.concatenate([sa, top]), scale)
    notes.append(
        f"Lanczos: {allvals.size} of {kdim} eigenvalues computed; the dimension is estimated "
        "from the computed part of the spectrum"
    )
    kb = found.kernel[:, : min(kcut, found.kernel.shape[1])]  # the deflated ones, in order found
    return HessianSpectrum(
        eigenvalues=torch.as_tensor(np.sort(allvals), dtype=hess.theta.dtype),
        kernel_basis=torch.as_tensor(kb, dtype=hess.theta.dtype, device=hess.theta.device),
        method="lanczos",
        scale=scale,
        dimension=int(kcut),
        gap=gap,
        threshold=thr,
        complete=False,
        dimension_lower_bound=found.exhausted,
        index=index,
        index_lower_bound=index_lower,
        n_hvp=hess.n_hvp,
        notes=notes,
    )


def hessian_spectrum(
    hess: HessianOperator, method: str, *, kernel_rtol: float, min_gap: float,
    n_eigs: int = 20, max_rounds: int = 8,
) -> HessianSpectrum:
    """The spectrum and kernel cut of ``hess`` by ``method`` (``"dense"`` or ``"lanczos"``).

    ``n_eigs`` eigenvalues per ARPACK run and ``max_rounds`` deflation rounds (Lanczos only).
    """
    if method == "dense":
        return _dense_spectrum(hess, kernel_rtol, min_gap)
    return _lanczos_spectrum(hess, kernel_rtol, min_gap, n_eigs, max_rounds)
