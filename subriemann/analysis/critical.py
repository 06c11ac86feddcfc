r"""Critical points of :math:`C`, their local dimension, and continuation along critical sets.

docs/theory.md §5: every flow of the family stops exactly where
:math:`F(\theta) := \nabla_\theta C = D^\top\nabla_x C = 0`.  With full rank
:math:`QN` this forces :math:`\nabla_x C = 0` (a global minimum for MSE), so
a *non-global* equilibrium needs rank loss; such equilibria are generically
not isolated but fill critical submanifolds, on each connected component of
which :math:`C` is constant.

This module answers three questions about a point :math:`\theta^*`:

* **What is it?**  :func:`classify_equilibrium` reports the gradient, the
  cost, the rank of :math:`D` and the split
  :math:`\nabla_x C = P\nabla_x C + P^\perp\nabla_x C`, the spectrum of the
  Hessian :math:`\nabla^2_\theta C`, the estimated dimension of the critical
  set through :math:`\theta^*` (the dimension of the Hessian's kernel, read
  off at the largest eigenvalue gap) and the index (number of negative
  eigenvalues).
* **Where does the set go?**  :func:`track_critical_set` walks along it by
  predictor–corrector continuation and returns a :class:`CriticalSet` whose
  ``graph`` (a :class:`networkx.Graph`) has the sampled critical points as
  nodes and the continuation steps as edges.
* **What does it look like?**  :func:`plot_critical_set`.

The Hessian
-----------
.. math:: \nabla^2_\theta C = D^\top\,\nabla^2_x C\,D
          + \sum_a (\nabla_x C)_a\,\nabla^2_\theta x_a ,

a Gauss–Newton part and a second-order part that vanishes at global minima.
It is applied through Hessian-vector products (forward-over-reverse
:func:`torch.func.jvp` of :func:`torch.func.grad`), either column by column
into a dense :math:`K\times K` matrix (``hessian="dense"``, the default for
:math:`K \le` ``dense_limit``) or inside ARPACK's Lanczos iteration
(``hessian="lanczos"``, :func:`scipy.sparse.linalg.eigsh` on a
:class:`~scipy.sparse.linalg.LinearOperator`).

The dimension estimate
----------------------
If the critical set :math:`Z` is a manifold through :math:`\theta^*`,
:math:`T_{\theta^*}Z \subset \ker\nabla^2C(\theta^*)`, with equality when
:math:`Z` is non-degenerate in the normal directions (Morse–Bott).  With the
eigenvalue magnitudes :math:`a_1\le\dots\le a_K`, :math:`A = a_K`, the
estimate is the cut :math:`k` that maximizes the gap
:math:`a_{k+1}/\max(a_k, \epsilon A)` among the cuts with
:math:`a_k \le \mathrm{kernel\_rtol}\cdot A` (:math:`k = 0`, no kernel, has
the gap :math:`a_1/(\epsilon A)`).  The gap is reported; below ``min_gap``
the estimate is flagged unreliable.  The index counts the eigenvalues below
minus the cut value :math:`\sqrt{\max(a_k,\epsilon A)\,a_{k+1}}`.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import networkx as nx
import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from subriemann.space import ParameterSpace

__all__ = [
    "EquilibriumReport",
    "CriticalSet",
    "ComponentInfo",
    "classify_equilibrium",
    "refine_critical_point",
    "track_critical_set",
    "plot_critical_set",
    "hessian_vector_product",
]

_EPS = float(np.finfo(np.float64).eps)
HESSIAN_METHODS = ("auto", "dense", "lanczos")
DENSE_HESSIAN_LIMIT = 1500
"""Largest :math:`K` for which ``hessian="auto"`` forms the dense Hessian."""


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------
def _check_space(space: Any) -> ParameterSpace:
    from subriemann.space import ParameterSpace

    if not isinstance(space, ParameterSpace):
        raise TypeError(f"space must be a subriemann.ParameterSpace, got {type(space).__name__}")
    return space


def _check_pos(
    name: str, val: Any, *, allow_zero: bool = False, upper: float | None = None
) -> float:
    if isinstance(val, bool) or not isinstance(val, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(val).__name__}")
    val = float(val)
    ok = math.isfinite(val) and (val >= 0 if allow_zero else val > 0)
    if upper is not None:
        ok = ok and val < upper
    if not ok:
        bound = "non-negative" if allow_zero else "positive"
        extra = f" and < {upper}" if upper is not None else ""
        raise ValueError(f"{name} must be a {bound} finite number{extra}, got {val!r}")
    return val


def _check_int(name: str, val: Any, low: int) -> int:
    if isinstance(val, bool) or not isinstance(val, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(val).__name__}")
    if int(val) < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {val}")
    return int(val)


def _hessian_method(space: ParameterSpace, hessian: Any, dense_limit: int) -> str:
    if not isinstance(hessian, str):
        raise TypeError(f"hessian must be one of {HESSIAN_METHODS}, got {type(hessian).__name__}")
    if hessian not in HESSIAN_METHODS:
        raise ValueError(f"hessian must be one of {HESSIAN_METHODS}, got {hessian!r}")
    if hessian == "auto":
        return "dense" if space.dim <= dense_limit else "lanczos"
    if hessian == "lanczos" and space.dim < 3:
        raise ValueError(f"hessian='lanczos' needs K >= 3 (K = {space.dim}); use 'dense'")
    return hessian


# ---------------------------------------------------------------------------
# Hessian-vector products and spectra
# ---------------------------------------------------------------------------
def _grad_function(space: ParameterSpace) -> Any:
    r"""A :mod:`torch.func`-differentiable :math:`\theta \mapsto \nabla_\theta C`."""

    def cost_of(t: Tensor) -> Tensor:
        return space.output_cost(space.backend.outputs(t))

    return torch.func.grad(cost_of)


class _Hessian:
    r"""Hessian-vector products :math:`v \mapsto \nabla^2_\theta C(\theta)\,v` at one point.

    Single products (Lanczos, LSMR) differentiate a retained autograd graph of
    :math:`\nabla_\theta C` once more (double backward: the graph is built
    once per point); the dense matrix uses :func:`torch.func.vmap` over
    forward-over-reverse products.
    """

    def __init__(self, space: ParameterSpace, theta: Tensor) -> None:
        self.space = space
        self.theta = theta.detach()
        self._grad = _grad_function(space)
        self._graph: tuple[Tensor, Tensor] | None = None
        self.n_hvp = 0

    def hvp(self, v: Tensor) -> Tensor:
        self.n_hvp += 1
        if self._graph is None:
            try:
                leaf = self.theta.clone().requires_grad_(True)
                with torch.enable_grad():
                    cost = self.space.output_cost(self.space.backend.outputs(leaf))
                    (grad,) = torch.autograd.grad(cost, leaf, create_graph=True)
                if not grad.requires_grad:  # C is linear in theta: H = 0
                    return torch.zeros_like(v)
                self._graph = (leaf, grad)
            except RuntimeError:  # an engine without double backward: use torch.func
                self._graph = (self.theta, self.theta)  # sentinel
        leaf, grad = self._graph
        if grad is leaf:
            return torch.func.jvp(self._grad, (self.theta,), (v,))[1]
        (out,) = torch.autograd.grad(grad, leaf, grad_outputs=v, retain_graph=True)
        return out.detach()

    def dense(self, chunk: int = 128) -> Tensor:
        k = self.space.dim
        eye = torch.eye(k, dtype=self.theta.dtype, device=self.theta.device)
        cols = torch.func.vmap(
            lambda v: torch.func.jvp(self._grad, (self.theta,), (v,))[1], chunk_size=chunk
        )(eye)
        self.n_hvp += k
        h = cols.T
        return 0.5 * (h + h.T)

    def operator(self) -> Any:
        from scipy.sparse.linalg import LinearOperator

        dtype, device = self.theta.dtype, self.theta.device

        def mv(v: np.ndarray) -> np.ndarray:
            t = torch.as_tensor(np.ascontiguousarray(v).reshape(-1), dtype=dtype, device=device)
            return self.hvp(t).detach().cpu().numpy()

        k = self.space.dim
        return LinearOperator((k, k), matvec=mv, rmatvec=mv, dtype=np.float64)


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
    space = _check_space(space)
    theta = space.check_point(theta)
    v = space._check_vec(tangent_vec, space.dim, "tangent_vec")
    if v.ndim != 1:
        raise ValueError(f"tangent_vec must have shape ({space.dim},), got {tuple(v.shape)}")
    return _Hessian(space, theta).hvp(v).detach()


@dataclass
class _Spectrum:
    eigenvalues: Tensor  # computed eigenvalues, ascending
    kernel_basis: Tensor  # [K, d]
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
    # dense only: the full eigendecomposition (for the corrector)
    evecs: Tensor | None = None


def _cut(a: np.ndarray, scale: float, kernel_rtol: float) -> tuple[int, float, float]:
    """Kernel cut on ascending magnitudes ``a`` (the bottom of a spectrum of scale ``scale``).

    Returns ``(k, gap, threshold)``: the first ``k`` entries are the kernel.
    """
    n = a.shape[0]
    if scale <= 0.0:  # the zero matrix
        return n, math.inf, 0.0
    floor = _EPS * scale
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


def _dense_spectrum(hess: _Hessian, kernel_rtol: float, min_gap: float) -> _Spectrum:
    h = hess.dense()
    evals, evecs = torch.linalg.eigh(h)
    mags = evals.abs()
    order = torch.argsort(mags)
    a = mags[order].cpu().numpy()
    scale = float(a[-1]) if a.size else 0.0
    k, gap, thr = _cut(a, scale, kernel_rtol)
    notes = []
    if gap < min_gap:
        notes.append(
            f"no clear eigenvalue gap (largest admissible gap {gap:.3g} < min_gap {min_gap:.3g}): "
            "the dimension estimate is unreliable"
        )
    index = int((evals < -thr).sum())
    return _Spectrum(
        eigenvalues=evals.detach(),
        kernel_basis=evecs[:, order[:k]].detach(),
        method="dense",
        scale=scale,
        dimension=k,
        gap=gap,
        threshold=thr,
        complete=True,
        dimension_lower_bound=False,
        index=index,
        index_lower_bound=False,
        n_hvp=hess.n_hvp,
        notes=notes,
        evecs=evecs.detach(),
    )


def _eigsh(
    op: Any, k: int, which: str, tol: float, maxiter: int, seed: int = 0,
    avoid: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """ARPACK ``eigsh`` from a seeded Gaussian start vector (it has a component in every
    eigenspace, kernels included; orthogonal to the columns of ``avoid``), retrying with a
    larger Krylov space on ARPACK errors."""
    from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, eigsh

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


def _lanczos_spectrum(
    hess: _Hessian,
    kernel_rtol: float,
    min_gap: float,
    n_eigs: int,
    max_rounds: int,
    arpack_tol: float = 1e-10,
    patience: int = 2,
) -> _Spectrum:
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
    from scipy.sparse.linalg import LinearOperator

    kdim = hess.space.dim
    op = hess.operator()
    notes: list[str] = []
    k = min(n_eigs, kdim - 1)
    maxiter = max(300, 2 * kdim)  # ARPACK restarts; a run that stops short gives what it has
    top, _, ok = _eigsh(op, min(4, kdim - 1), "LM", arpack_tol, maxiter)
    if not ok:
        notes.append("ARPACK did not converge for the largest eigenvalues")
    scale = float(np.abs(top).max()) if top.size else 0.0
    sa, _, ok = _eigsh(op, k, "SA", arpack_tol, maxiter)
    if not ok:
        notes.append("ARPACK did not converge for the most negative eigenvalues")
    kernel = np.zeros((kdim, 0))
    kernel_vals: list[float] = []
    others = np.zeros(0)
    rounds_exhausted = True
    misses = 0
    for rnd in range(max_rounds):
        basis = kernel

        def mv(v: np.ndarray, basis: np.ndarray = basis) -> np.ndarray:
            v = np.asarray(v).reshape(-1)
            c = basis.T @ v
            w = v - basis @ c
            hw = op.matvec(w)
            hw = hw - basis @ (basis.T @ hw)
            return hw + (2.0 * scale) * (basis @ c)

        dop = LinearOperator((kdim, kdim), matvec=mv, rmatvec=mv, dtype=np.float64)
        w, vecs, ok = _eigsh(dop, k, "SM", arpack_tol, maxiter, seed=1 + rnd, avoid=basis)
        if not ok:
            notes.append("ARPACK did not converge for the smallest-magnitude eigenvalues")
        small = np.abs(w) <= kernel_rtol * scale
        if not small.any():
            others = w
            # a Krylov run can miss a repeated eigenvalue: stop after `patience` misses
            misses += 1
            if misses >= patience:
                rounds_exhausted = False
                break
            continue
        misses = 0
        others = w[~small]
        kernel = np.linalg.qr(np.hstack([kernel, vecs[:, small]]))[0]
        kernel_vals.extend(float(x) for x in w[small])
        if kernel.shape[1] >= kdim - 1:
            rounds_exhausted = False
            break
    computed = np.concatenate([np.asarray(kernel_vals), others])
    a_order = np.argsort(np.abs(computed))
    a = np.abs(computed)[a_order]
    kcut, gap, thr = _cut(a, scale, kernel_rtol)
    lower = rounds_exhausted
    if lower:
        gap = math.nan
        thr = max(float(a[kcut - 1]) if kcut else 0.0, _EPS * scale)
        notes.append(
            f"the kernel has at least {kernel.shape[1]} dimensions; {max_rounds} deflation rounds "
            f"of {k} eigenvalues did not confirm its end (raise n_eigs or max_rounds)"
        )
    elif gap < min_gap:
        notes.append(
            f"no clear eigenvalue gap among the computed eigenvalues (gap {gap:.3g} < min_gap "
            f"{min_gap:.3g}): the dimension estimate is unreliable"
        )
    # the kernel vectors that the cut keeps (the deflated ones in the order found)
    nkeep = min(kcut, kernel.shape[1])
    if kcut > kernel.shape[1]:
        notes.append("the cut includes eigenvalues above kernel_rtol whose vectors were not kept")
    neg = sa[sa < -thr] if sa.size else sa
    index = int(neg.size)
    index_lower = bool(sa.size) and index == sa.size
    if index_lower:
        notes.append(
            f"all {sa.size} computed most-negative eigenvalues are negative: index >= {index}"
        )
    # the bottom of the spectrum (kernel + the last round), then the other computed
    # eigenvalues that are not copies of those (one run each, so distinct eigenpairs)
    bottom = list(computed)
    extra = [
        float(x)
        for x in np.concatenate([sa, top])
        if not any(abs(float(x) - b) <= 1e-8 * max(scale, 1e-300) for b in bottom)
    ]
    extra_unique: list[float] = []
    for x in sorted(extra):
        if not extra_unique or abs(x - extra_unique[-1]) > 1e-8 * max(scale, 1e-300):
            extra_unique.append(x)
    allvals = np.array(bottom + extra_unique)
    # kernel vectors: keep those with the smallest Rayleigh quotients if the cut drops some
    kb = torch.as_tensor(kernel[:, :nkeep], dtype=hess.theta.dtype, device=hess.theta.device)
    notes.append(
        f"Lanczos: {allvals.size} of {kdim} eigenvalues computed; the dimension is estimated "
        "from the computed part of the spectrum"
    )
    return _Spectrum(
        eigenvalues=torch.as_tensor(np.sort(allvals), dtype=hess.theta.dtype),
        kernel_basis=kb,
        method="lanczos",
        scale=scale,
        dimension=int(kcut),
        gap=gap,
        threshold=thr,
        complete=False,
        dimension_lower_bound=lower,
        index=index,
        index_lower_bound=index_lower,
        n_hvp=hess.n_hvp,
        notes=notes,
    )


# ---------------------------------------------------------------------------
# classification
# ---------------------------------------------------------------------------
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


def _singular_state(space: ParameterSpace, theta: Tensor) -> tuple[Tensor, Tensor]:
    """(left singular vectors U [QN, m], singular values [m]) of D, descending."""
    from subriemann.linalg import DENSE_LIMIT

    st = space.point_state(theta)
    if space.output_dim * space.dim <= DENSE_LIMIT:
        u, s, _ = st.svd
    else:
        u, s = st.ntk_eigh
    m = min(space.output_dim, space.dim)
    return u[:, :m], s[:m]


def _report(
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
    theta = theta.detach()
    st = space.point_state(theta)
    g = st.output_grad.detach()
    cost = float(st.cost)
    dc = space.cost_grad(theta).detach()
    u, s = _singular_state(space, theta)
    smax = float(s[0]) if s.numel() else 0.0
    tau = rank_atol if rank_atol is not None else rank_rtol * smax
    rank = int((s > tau).sum())
    ug = u[:, :rank].T @ g
    gnorm = float(g.norm())
    range_norm = float(ug.norm())
    perp_norm = math.sqrt(max(gnorm**2 - range_norm**2, 0.0))
    perp_direct = float((g - u[:, :rank] @ ug).norm())
    perp_norm = perp_direct if math.isfinite(perp_direct) else perp_norm
    grad_norm = float(dc.norm())
    denom = smax * gnorm
    rel = grad_norm / denom if denom > 0 else (0.0 if grad_norm == 0 else math.inf)
    ynorm = float(space.y.norm())
    is_global = gnorm <= tol * max(1.0, ynorm)
    is_crit = is_global or rel <= tol

    hess = _Hessian(space, theta)
    if method == "dense":
        spec = _dense_spectrum(hess, kernel_rtol, min_gap)
    else:
        spec = _lanczos_spectrum(hess, kernel_rtol, min_gap, n_eigs, max_rounds)
    notes = list(spec.notes)
    if not is_crit:
        notes.append(
            f"not a critical point (relative gradient {rel:.2e} > tol {tol:.1e}): the Hessian "
            "kernel is not the tangent space of a critical set here; refine the point first "
            "(refine_critical_point)"
        )
    if is_global:
        kind = "global minimum"
    elif not is_crit:
        kind = "not critical"
    elif spec.index == 0:
        kind = "non-global minimum"
    else:
        kind = "non-global saddle"
    m = min(space.output_dim, space.dim)
    return EquilibriumReport(
        grad_norm=grad_norm,
        relative_grad=rel,
        cost=cost,
        output_grad_norm=gnorm,
        is_critical=is_crit,
        is_global_minimum=is_global,
        kind=kind,
        rank=rank,
        rank_deficit=m - rank,
        rank_tau=float(tau),
        singular_values=s.detach().clone(),
        range_grad_norm=range_norm,
        perp_grad_norm=perp_norm,
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
            "tol": tol,
            "rank_rtol": rank_rtol,
            "rank_atol": rank_atol,
            "kernel_rtol": kernel_rtol,
            "min_gap": min_gap,
            "hessian": method,
            "n_eigs": n_eigs if method == "lanczos" else None,
            "max_rounds": max_rounds if method == "lanczos" else None,
            "hessian_scale": spec.scale,
            "n_hvp": spec.n_hvp,
        },
        notes=notes,
    )


def _common_options(
    tol: Any, rank_rtol: Any, rank_atol: Any, kernel_rtol: Any, min_gap: Any, n_eigs: Any,
    max_rounds: Any,
) -> dict[str, Any]:
    return dict(
        tol=_check_pos("tol", tol, upper=1.0),
        rank_rtol=_check_pos("rank_rtol", rank_rtol, allow_zero=True, upper=1.0),
        rank_atol=(
            None if rank_atol is None else _check_pos("rank_atol", rank_atol, allow_zero=True)
        ),
        kernel_rtol=_check_pos("kernel_rtol", kernel_rtol, upper=1.0),
        min_gap=_check_pos("min_gap", min_gap),
        n_eigs=_check_int("n_eigs", n_eigs, 1),
        max_rounds=_check_int("max_rounds", max_rounds, 1),
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
        ``rank_atol`` when given.
    kernel_rtol : float
        Hessian eigenvalues of magnitude at most ``kernel_rtol`` times the
        largest may be counted as kernel; the cut is placed at the largest
        gap among them (see the module docstring).
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
    :func:`refine_critical_point`.

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
    space = _check_space(space)
    theta = space.check_point(theta)
    opts = _common_options(tol, rank_rtol, rank_atol, kernel_rtol, min_gap, n_eigs, max_rounds)
    method = _hessian_method(space, hessian, _check_int("dense_limit", dense_limit, 1))
    return _report(space, theta, method=method, **opts)


# ---------------------------------------------------------------------------
# the corrector: damped minimum-norm Newton on F = grad C
# ---------------------------------------------------------------------------
@dataclass
class _Correction:
    theta: Tensor
    converged: bool
    iterations: int
    grad_norm: float
    reason: str


def _correct(
    space: ParameterSpace,
    theta: Tensor,
    *,
    grad_tol: float,
    max_iter: int,
    max_move: float,
    method: str,
    dimension: int | None = None,
    kernel_rtol: float = 1e-6,
) -> _Correction:
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
    """
    from subriemann.linalg import lsmr
    from subriemann.space import NonFiniteError

    theta = theta.detach().clone()
    total = 0.0
    try:
        f = space.cost_grad(theta).detach()
    except NonFiniteError as err:
        return _Correction(theta, False, 0, math.inf, f"non-finite gradient: {err}")
    nf = float(f.norm())
    damping = (0.0, 1e-8, 1e-6, 1e-4, 1e-2, 1.0)
    for it in range(max_iter + 1):
        if nf <= grad_tol:
            return _Correction(theta, True, it, nf, "converged")
        if it == max_iter:
            break
        hess = _Hessian(space, theta)
        if method == "dense":
            evals, evecs = torch.linalg.eigh(hess.dense())
            mags = evals.abs()
            hnorm = float(mags.max()) if mags.numel() else 0.0
            keep = torch.ones_like(evals, dtype=torch.bool)
            if dimension is not None and dimension > 0:
                keep[torch.argsort(mags)[:dimension]] = False
            keep &= mags > max(kernel_rtol if dimension is None else 0.0, 10 * _EPS) * hnorm
            fc = evecs.T @ f
        else:
            top, _, _ = _eigsh(hess.operator(), min(2, space.dim - 1), "LM", 1e-6, 1000)
            hnorm = float(np.abs(top).max()) if top.size else 1.0
        accepted = False
        for damp in damping:
            mu = damp * hnorm**2
            if method == "dense":
                w = torch.where(keep, evals / (evals**2 + mu), torch.zeros_like(evals))
                delta = -evecs @ (w * fc)
            else:
                delta, _info = lsmr(
                    hess.hvp, hess.hvp, (space.dim, space.dim), -f, damp=math.sqrt(mu),
                    rtol=1e-12, conlim=1.0 / kernel_rtol,
                )
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
                theta, f, nf = trial, ft, nft
                total += step
                accepted = True
                break
        if not accepted:
            return _Correction(
                theta, False, it + 1, nf,
                f"no decrease of |grad C| (stuck at {nf:.3e} > {grad_tol:.3e})",
            )
    return _Correction(
        theta, False, max_iter, nf, f"no convergence in {max_iter} iterations (|grad C| = {nf:.3e})"
    )


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
    (see :func:`track_critical_set`, "corrector"): the steps are
    minimum-norm, so the point moves normally to the critical set, to a
    nearby critical point.  It does not search globally: a point far from
    any critical point may not converge (use a flow first).

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
        As in :func:`classify_equilibrium`.

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
    space = _check_space(space)
    theta = space.check_point(theta).detach()
    method = _hessian_method(space, hessian, _check_int("dense_limit", dense_limit, 1))
    max_iter = _check_int("max_iter", max_iter, 1)
    kernel_rtol = _check_pos("kernel_rtol", kernel_rtol, upper=1.0)
    if not (isinstance(max_move, (int, float)) and max_move > 0):
        raise ValueError(f"max_move must be a positive number, got {max_move!r}")
    if grad_tol is None:
        grad_tol = 1e-10 * _grad_scale(space, theta)
    else:
        grad_tol = _check_pos("grad_tol", grad_tol)
    res = _correct(
        space, theta, grad_tol=grad_tol, max_iter=max_iter, max_move=float(max_move),
        method=method, kernel_rtol=kernel_rtol,
    )
    if not res.converged:
        raise RuntimeError(f"refine_critical_point: corrector failed: {res.reason}")
    return res.theta, res.grad_norm


def _frames(space: ParameterSpace, theta: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    r"""``(sigma, U, V)``: the ``rank`` leading singular triplets, :math:`V = D^\top U/\sigma`."""
    u, s = _singular_state(space, theta)
    s, u = s[:rank], u[:, :rank]
    v = space.vjp(theta, u.T).T / s if rank else torch.zeros(space.dim, 0, dtype=space.dtype)
    return s.detach(), u.detach(), v.detach()


def _grad_scale(space: ParameterSpace, theta: Tensor) -> float:
    _, s = _singular_state(space, theta)
    smax = float(s[0]) if s.numel() else 1.0
    g = float(space.point_state(theta).output_grad.norm())
    return max(smax, 1e-300) * max(1.0, g)


# ---------------------------------------------------------------------------
# continuation
# ---------------------------------------------------------------------------
@dataclass
class ComponentInfo:
    r"""One connected component of the sampled critical set.

    Attributes
    ----------
    nodes : set of int
    n_nodes : int
    dimension : int
        The most frequent node dimension.
    dimensions : list of int
        All node dimensions seen (sorted, unique).
    dimension_consistent : bool
        Every node has the same dimension.
    cost_mean, cost_min, cost_max, cost_spread : float
        :math:`C` is constant on a connected critical set, so ``cost_spread``
        (max - min) measures the accuracy of the sampling.
    cost_constant : bool
        ``cost_spread <= cost_tol``.
    rank_profile : dict
        rank of :math:`D` → number of nodes.
    index_values : list of int
    max_grad_norm : float
        Largest :math:`|\nabla_\theta C|` at the nodes.
    seeds : list of int
        Indices of the start points that lie in this component.
    diameter : float
        Largest Euclidean distance between two nodes.
    """

    nodes: set[int]
    n_nodes: int
    dimension: int
    dimensions: list[int]
    dimension_consistent: bool
    cost_mean: float
    cost_min: float
    cost_max: float
    cost_spread: float
    cost_constant: bool
    rank_profile: dict[int, int]
    index_values: list[int]
    max_grad_norm: float
    seeds: list[int]
    diameter: float


@dataclass
class CriticalSet:
    r"""Sampled critical set: the continuation graph and what it says.

    Attributes
    ----------
    graph : networkx.Graph
        Nodes are sampled critical points (integer ids) with attributes
        ``theta`` (Tensor ``[K]``), ``cost``, ``rank``, ``dimension``,
        ``grad_norm``, ``dimension_gap``, ``index``, ``seed`` (index of the
        start point whose exploration found it) and ``depth``; edges are
        continuation steps with attributes ``length`` and ``step`` (the
        string ``"link"`` for the joins of :func:`track_critical_set`'s step 6).
    components : list of set of int
        Connected components (node sets), the start point's first.
    component_info : list of ComponentInfo
        Aligned with ``components``.
    dimension : int or None
        The dimension estimate on the start point's component.
    status : str
        Why the continuation stopped: ``"n_points reached"``, or, when every
        branch ended, the reasons (e.g. ``"corrector failed at node 3"``,
        ``"rank changed at node 7"``).
    terminations : list of dict
        Every branch end: ``node``, ``code`` (``"corrector_failed"``,
        ``"rank_change"``, ``"dimension_change"``, ``"no_tangent"``,
        ``"seed_failed"``), ``reason``.
    seed_nodes : list of int or None
        Node of each start point (None where its corrector failed).
    start_report : EquilibriumReport
        The classification at the (corrected) start point.
    tolerances : dict
    """

    graph: nx.Graph
    components: list[set[int]]
    component_info: list[ComponentInfo]
    dimension: int | None
    status: str
    terminations: list[dict[str, Any]]
    seed_nodes: list[int | None]
    start_report: EquilibriumReport
    tolerances: dict[str, Any]

    @property
    def n_components(self) -> int:
        return len(self.components)

    @property
    def thetas(self) -> Tensor:
        """Node parameters stacked in node order, shape ``[n, K]``."""
        return torch.stack([self.graph.nodes[n]["theta"] for n in sorted(self.graph.nodes)])

    def component_table(self) -> list[dict[str, Any]]:
        """One row (a dict) per component: nodes, dimension, cost and its spread, ranks, index."""
        rows = []
        for i, c in enumerate(self.component_info):
            rows.append(
                {
                    "component": i,
                    "nodes": c.n_nodes,
                    "dimension": c.dimension,
                    "dimensions": c.dimensions,
                    "cost": c.cost_mean,
                    "cost_spread": c.cost_spread,
                    "ranks": dict(sorted(c.rank_profile.items())),
                    "index": c.index_values,
                    "max_grad_norm": c.max_grad_norm,
                    "diameter": c.diameter,
                    "seeds": c.seeds,
                }
            )
        return rows

    def summary(self) -> str:
        """The component table as text, and the status."""
        head = (
            f"{'comp':>4} {'nodes':>5} {'dim':>4} {'cost':>12} {'spread':>9} "
            f"{'rank(s)':>10} {'index':>6} {'max|gradC|':>10} {'diameter':>9} seeds"
        )
        lines = [head]
        for r in self.component_table():
            dims = str(r["dimension"]) + ("" if len(r["dimensions"]) == 1 else "*")
            ranks = ",".join(str(k) for k in r["ranks"])
            idx = ",".join(str(k) for k in r["index"])
            lines.append(
                f"{r['component']:>4} {r['nodes']:>5} {dims:>4} {r['cost']:>12.6g} "
                f"{r['cost_spread']:>9.2e} {ranks:>10} {idx:>6} {r['max_grad_norm']:>10.2e} "
                f"{r['diameter']:>9.3g} {r['seeds']}"
            )
        lines.append(f"status: {self.status}")
        if any(len(r["dimensions"]) > 1 for r in self.component_table()):
            lines.append("* the node dimension varies on this component")
        return "\n".join(lines)


def _as_seeds(space: ParameterSpace, theta_star: Any) -> list[Tensor]:
    if isinstance(theta_star, Tensor):
        if theta_star.ndim == 1:
            return [space.check_point(theta_star).detach().clone()]
        if theta_star.ndim == 2:
            if theta_star.shape[0] == 0:
                raise ValueError("theta_star holds no points")
            return [space.check_point(t).detach().clone() for t in theta_star]
        raise ValueError(
            f"theta_star must have shape ({space.dim},) or (B, {space.dim}), "
            f"got {tuple(theta_star.shape)}"
        )
    if isinstance(theta_star, (list, tuple)):
        if not theta_star:
            raise ValueError("theta_star holds no points")
        return [space.check_point(t).detach().clone() for t in theta_star]
    raise TypeError(
        f"theta_star must be a Tensor [K] or [B, K] or a list of Tensors, "
        f"got {type(theta_star).__name__}"
    )


def track_critical_set(
    space: ParameterSpace,
    theta_star: Tensor | list[Tensor],
    n_points: int = 50,
    step: float = 0.1,
    *,
    max_directions: int = 8,
    max_halvings: int = 4,
    grad_tol: float | None = None,
    tol: float = 1e-6,
    rank_rtol: float = 1e-6,
    kernel_rtol: float = 1e-6,
    min_gap: float = 1e3,
    sigma_drop: float = 0.5,
    max_correction: float = 0.5,
    merge_rtol: float = 0.5,
    corrector_iters: int = 20,
    cost_tol: float | None = None,
    hessian: str = "auto",
    dense_limit: int = DENSE_HESSIAN_LIMIT,
    n_eigs: int = 20,
    max_rounds: int = 8,
) -> CriticalSet:
    r"""Walk along the critical set :math:`\{D^\top\nabla_xC = 0\}` through ``theta_star``.

    Predictor–corrector continuation:

    1. **Node.** At a critical point :math:`\theta_i` the Hessian
       :math:`H_i = \nabla^2_\theta C(\theta_i)` is decomposed; its kernel
       :math:`T_i` (see :func:`classify_equilibrium`) approximates the
       tangent space of the critical set.
    2. **Predictor.** :math:`\theta' = \theta_i + h\,u`, :math:`u \in T_i`
       a unit vector: the projections onto :math:`T_i` of a fixed set of
       reference directions (:math:`\pm` ``max_directions // 2`` orthonormal
       directions of the kernel at the start point, so that the exploration
       keeps consistent directions, like a grid in a chart of the set).  They
       are a fixed Gaussian matrix projected onto the kernel and
       orthonormalized, so they depend on the kernel only, not on the basis
       the eigensolver returns for it (which changes with rounding).
    3. **Corrector.** Newton on :math:`F(\theta) = D^\top\nabla_xC` with
       Jacobian :math:`H`: pseudo-inverse steps that leave out the
       :math:`\dim T_i` smallest eigen-directions of :math:`H` (minimum-norm,
       normal to the set), safeguarded by Levenberg–Marquardt damping, until
       :math:`|F| \le` ``grad_tol``.
    4. **Acceptance.** The corrected point is accepted when the corrector
       converged, moved at most ``max_correction`` :math:`h`, the rank of
       :math:`D` is unchanged and no counted singular value fell below
       ``sigma_drop`` times its value at :math:`\theta_i` (a rank change
       ahead), and the Hessian kernel has the same dimension.  Otherwise the
       step is halved, at most ``max_halvings`` times; then the branch ends
       (``"corrector failed at node i"``, ``"rank changed at node i"``,
       ``"dimension changed at node i"``).
    5. **Graph.** The accepted point becomes a node joined to
       :math:`\theta_i`, unless it lies within ``merge_rtol`` :math:`h` of an
       existing node, which is then joined instead (so branches that meet
       close loops and seeds on one component end up connected).
    6. **Links.** After the walk, two nodes of different components that lie
       within :math:`h` of each other are joined (edge ``step="link"``) when
       the chord between them lies on the set: their costs agree within
       ``cost_tol``, and the chord's midpoint, corrected onto the set, moved
       at most ``max_correction / 4`` times the chord (a chord of length
       :math:`l` is off a set of curvature radius :math:`R` by
       :math:`l^2/8R`, a quarter of a tangent predictor's :math:`l^2/2R`)
       and passes the acceptance tests of step 4 against both nodes.  Two
       separate sets :math:`l` apart would need a correction of :math:`l/2`.
       So whether two explorations are one component is decided by
       distances compared with fractions of :math:`h`, not by whether two
       walks happen to land on each other.

    Nodes are expanded breadth-first until ``n_points`` nodes exist or every
    branch ended.  Components are the connected components of the graph.

    Parameters
    ----------
    space : ParameterSpace
    theta_star : Tensor, shape=[K] or [B, K], or list of Tensor
        Start point(s), near critical points (each is first corrected onto
        the set).  Several start points may give several components.
    n_points : int
        Maximal number of nodes.
    step : float
        Predictor step :math:`h` (Euclidean, in parameter space).
    max_directions : int
        Predictor directions per node (:math:`\pm` up to ``max_directions // 2``
        reference directions; at least 2).
    max_halvings : int
        Step halvings before a branch ends.
    grad_tol : float, optional
        Corrector tolerance on :math:`|\nabla_\theta C|`; default
        :math:`10^{-10}\,\sigma_{\max}(D)\max(1, |\nabla_xC|)` at the first start point.
    tol, rank_rtol, kernel_rtol, min_gap
        As in :func:`classify_equilibrium`.  The rank threshold
        :math:`\tau = \mathrm{rank\_rtol}\;\sigma_{\max}` is taken at the first
        start point and then **fixed**.
    sigma_drop : float
        A step is refused when a singular value counted in the rank falls
        below ``sigma_drop`` times its value at the parent (approach of a
        rank change).
    max_correction : float
        Largest corrector displacement, relative to :math:`h`.
    merge_rtol : float
        Merge distance relative to :math:`h`.
    corrector_iters : int
    cost_tol : float, optional
        Allowed cost spread on a component; default :math:`10^{-8}\max(1, |C|)`.
    hessian, dense_limit, n_eigs, max_rounds
        As in :func:`classify_equilibrium` (``"lanczos"``: kernels from the
        deflated Lanczos runs, corrector steps by LSMR on the Hessian operator).

    Returns
    -------
    CriticalSet

    Raises
    ------
    ValueError
        If no start point could be corrected onto the critical set.
    """
    space = _check_space(space)
    seeds = _as_seeds(space, theta_star)
    n_points = _check_int("n_points", n_points, 1)
    step = _check_pos("step", step)
    max_directions = max(2, _check_int("max_directions", max_directions, 1))
    max_halvings = _check_int("max_halvings", max_halvings, 0)
    opts = _common_options(tol, rank_rtol, None, kernel_rtol, min_gap, n_eigs, max_rounds)
    sigma_drop = _check_pos("sigma_drop", sigma_drop, upper=1.0)
    max_correction = _check_pos("max_correction", max_correction)
    merge_rtol = _check_pos("merge_rtol", merge_rtol, upper=1.0)
    corrector_iters = _check_int("corrector_iters", corrector_iters, 1)
    method = _hessian_method(space, hessian, _check_int("dense_limit", dense_limit, 1))

    first = seeds[0]
    _, s0 = _singular_state(space, first)
    tau = opts["rank_rtol"] * (float(s0[0]) if s0.numel() else 0.0)
    opts["rank_atol"] = tau
    if grad_tol is None:
        grad_tol = 1e-10 * _grad_scale(space, first)
    else:
        grad_tol = _check_pos("grad_tol", grad_tol)

    def correct(theta: Tensor, max_move: float, dimension: int | None = None) -> _Correction:
        return _correct(
            space, theta, grad_tol=grad_tol, max_iter=corrector_iters, max_move=max_move,
            method=method, dimension=dimension, kernel_rtol=opts["kernel_rtol"],
        )

    def analyze(theta: Tensor) -> EquilibriumReport:
        return _report(space, theta, method=method, **opts)

    graph = nx.Graph()
    kernels: dict[int, Tensor] = {}
    sigmas: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
    terminations: list[dict[str, Any]] = []
    seed_nodes: list[int | None] = []
    start_report: EquilibriumReport | None = None
    ref_dirs: Tensor | None = None
    frontier: deque[int] = deque()

    def add_node(theta: Tensor, rep: EquilibriumReport, seed: int, depth: int) -> int:
        nid = graph.number_of_nodes()
        graph.add_node(
            nid,
            theta=theta.detach().clone(),
            cost=rep.cost,
            rank=rep.rank,
            dimension=rep.dimension,
            grad_norm=rep.grad_norm,
            dimension_gap=rep.dimension_gap,
            index=rep.index,
            seed=seed,
            depth=depth,
        )
        kernels[nid] = rep.kernel_basis
        sigmas[nid] = _frames(space, theta, rep.rank)
        points.append(theta.detach().clone())
        stacked.clear()
        return nid

    points: list[Tensor] = []  # node thetas in node order (ids are 0, 1, 2, ...)
    stacked: list[Tensor] = []  # cache of torch.stack(points)

    def nearest(theta: Tensor, exclude: int | None = None) -> tuple[int | None, float]:
        if not points:
            return None, math.inf
        if not stacked:
            stacked.append(torch.stack(points))
        d = (stacked[0] - theta).norm(dim=1)
        if exclude is not None:
            d[exclude] = math.inf
        best = int(torch.argmin(d))
        dist = float(d[best])
        return (best, dist) if math.isfinite(dist) else (None, math.inf)

    # -- seeds --------------------------------------------------------------------
    for si, seed in enumerate(seeds):
        res = correct(seed, math.inf)
        if not res.converged:
            terminations.append(
                {"node": None, "seed": si, "code": "seed_failed",
                 "reason": f"corrector failed at start point {si}: {res.reason}"}
            )
            seed_nodes.append(None)
            continue
        rep = analyze(res.theta)
        if start_report is None:
            start_report = rep
        near, dist = nearest(res.theta)
        if near is not None and dist <= merge_rtol * step:
            seed_nodes.append(near)
            continue
        nid = add_node(res.theta, rep, si, 0)
        seed_nodes.append(nid)
        if ref_dirs is None and rep.dimension > 0:
            ref_dirs = _reference_frame(rep.kernel_basis, max_directions // 2)
        frontier.append(nid)
    if start_report is None:
        reasons = "; ".join(t["reason"] for t in terminations)
        raise ValueError(f"no start point could be corrected onto the critical set: {reasons}")

    def directions(nid: int) -> list[Tensor]:
        kb = kernels[nid]
        if kb.shape[1] == 0:
            return []
        dirs: list[Tensor] = []
        refs = ref_dirs if ref_dirs is not None else _reference_frame(kb, max_directions // 2)
        for j in range(refs.shape[1]):
            p = kb @ (kb.T @ refs[:, j])
            if float(p.norm()) < 0.3:  # the kernel turned away from this reference direction
                continue
            p = p / p.norm()
            dirs += [p, -p]
        if not dirs:
            own = _reference_frame(kb, max_directions // 2)
            for j in range(own.shape[1]):
                dirs += [own[:, j], -own[:, j]]
        return dirs

    def component_of(n: int) -> set[int]:
        return nx.node_connected_component(graph, n)

    # -- breadth-first continuation ------------------------------------------------
    while frontier and graph.number_of_nodes() < n_points:
        nid = frontier.popleft()
        node = graph.nodes[nid]
        theta_i = node["theta"]
        dirs = directions(nid)
        if not dirs:
            if node["dimension"] == 0:
                terminations.append(
                    {"node": nid, "code": "no_tangent",
                     "reason": f"isolated critical point at node {nid} (dimension 0)"}
                )
            continue
        for u in dirs:
            if graph.number_of_nodes() >= n_points:
                break
            h = step
            last_reason: tuple[str, str] | None = None
            done = False
            for _attempt in range(max_halvings + 1):
                pred = theta_i + h * u
                # already explored: a node of this component lies where the predictor points
                near, dist = nearest(pred, exclude=nid)
                if near is not None and dist <= merge_rtol * h and near in component_of(nid):
                    done = True
                    break
                res = correct(pred, max_correction * h * 4.0, node["dimension"])
                if not res.converged:
                    last_reason = (
                        "corrector_failed", f"corrector failed at node {nid}: {res.reason}"
                    )
                    h *= 0.5
                    continue
                moved = float((res.theta - pred).norm())
                if moved > max_correction * h:
                    last_reason = (
                        "corrector_failed",
                        f"corrector failed at node {nid}: correction {moved:.3g} > "
                        f"{max_correction} x step {h:.3g}",
                    )
                    h *= 0.5
                    continue
                rep = analyze(res.theta)
                defect = _step_defect(space, nid, node, sigmas[nid], rep, res.theta, h,
                                      sigma_drop)
                if defect is not None:
                    last_reason = defect
                    h *= 0.5
                    continue
                # accepted
                near, dist = nearest(res.theta, exclude=nid)
                if near is not None and dist <= merge_rtol * h:
                    if not graph.has_edge(nid, near):
                        length = float((res.theta - theta_i).norm())
                        graph.add_edge(nid, near, length=length, step=h)
                else:
                    new = add_node(res.theta, rep, node["seed"], node["depth"] + 1)
                    graph.add_edge(nid, new, length=float((res.theta - theta_i).norm()), step=h)
                    frontier.append(new)
                done = True
                break
            if not done and last_reason is not None:
                terminations.append({"node": nid, "code": last_reason[0], "reason": last_reason[1]})

    # -- summary --------------------------------------------------------------------
    if graph.number_of_nodes() >= n_points:
        status = "n_points reached"
    elif terminations:
        ends = [t["reason"].split(":")[0] for t in terminations]
        status = "; ".join(dict.fromkeys(ends))
    else:
        status = "exhausted: every direction leads back to explored nodes"
    costs = [d["cost"] for _, d in graph.nodes(data=True)]
    if cost_tol is None:
        cost_tol = 1e-8 * max(1.0, max(abs(c) for c in costs))
    else:
        cost_tol = _check_pos("cost_tol", cost_tol, allow_zero=True)

    def verify_link(a: int, b: int) -> bool:
        # the chord's midpoint, corrected onto the set, must stay within a quarter of the
        # step allowance: a chord of length l is off a set of curvature radius R by
        # l^2 / (8 R), a quarter of what a tangent predictor of length l is (l^2 / (2 R)).
        # Two separate sets l apart need a correction of l / 2 and are refused.
        na, nb = graph.nodes[a], graph.nodes[b]
        if abs(na["cost"] - nb["cost"]) > cost_tol:
            return False
        length = float((nb["theta"] - na["theta"]).norm())
        mid = 0.5 * (na["theta"] + nb["theta"])
        allowed = 0.25 * max_correction * length
        res = correct(mid, allowed, na["dimension"])
        if not res.converged or float((res.theta - mid).norm()) > allowed:
            return False
        rep = analyze(res.theta)
        half = 0.5 * length
        return all(
            _step_defect(space, n, graph.nodes[n], sigmas[n], rep, res.theta, half, sigma_drop)
            is None
            for n in (a, b)
        )

    # explorations that came within one step of each other (one may stop before the
    # other's nodes are within merge_rtol * h of a predictor): join them if the chord
    # between the two nodes lies on the set.  Every decision compares a distance with
    # a fraction of the step, never a round-off-level quantity.
    _link_explorations(graph, step, verify_link)

    comps = [set(c) for c in nx.connected_components(graph)]
    seed_of = {n: i for i, n in enumerate(seed_nodes) if n is not None}

    def comp_key(c: set[int]) -> tuple[int, int]:
        sd = [seed_of[n] for n in c if n in seed_of]
        return (min(sd) if sd else len(seeds), -len(c))

    comps.sort(key=comp_key)
    infos = [_component_info(graph, c, seed_nodes, cost_tol) for c in comps]
    start = seed_nodes[0] if seed_nodes and seed_nodes[0] is not None else None
    dimension = None
    if start is not None:
        for c, info in zip(comps, infos):
            if start in c:
                dimension = info.dimension
    tolerances = dict(start_report.tolerances)
    tolerances.update(
        grad_tol=grad_tol, rank_atol=tau, step=step, sigma_drop=sigma_drop,
        max_correction=max_correction, merge_rtol=merge_rtol, max_halvings=max_halvings,
        cost_tol=cost_tol, corrector_iters=corrector_iters, link_radius=step,
    )
    graph.graph.update(status=status, tolerances=tolerances)
    return CriticalSet(
        graph=graph,
        components=comps,
        component_info=infos,
        dimension=dimension,
        status=status,
        terminations=terminations,
        seed_nodes=seed_nodes,
        start_report=start_report,
        tolerances=tolerances,
    )


def _step_defect(
    space: ParameterSpace,
    nid: int,
    node: dict[str, Any],
    frames: tuple[Tensor, Tensor, Tensor],
    rep: EquilibriumReport,
    theta: Tensor,
    h: float,
    sigma_drop: float,
) -> tuple[str, str] | None:
    """Why a corrected point ``theta`` (report ``rep``) may not join node ``nid``, or None.

    The rank of D and the dimension of the Hessian kernel must be those of the node, and
    no singular value counted in the rank may fall below ``sigma_drop`` times its value at
    the node.  Returns ``(code, reason)`` for the termination record.
    """
    if rep.rank != node["rank"]:
        return (
            "rank_change",
            f"rank changed at node {nid}: rank {node['rank']} -> {rep.rank} within {h:.3g}",
        )
    s_par, u_par, v_par = frames
    if s_par.numel():
        # signed singular values u_k^T D(new) v_k (frames of the parent): a
        # singular value that shrinks or passes through 0 within the step
        # (its vectors flip sign) shows as a small or negative value
        dv = space.jvp(theta, v_par.T)  # [r, QN]
        signed = (dv * u_par.T).sum(-1)
        ratio = signed / s_par
        if bool((ratio < sigma_drop).any()):
            kmin = int(torch.argmin(ratio))
            return (
                "rank_change",
                f"rank changed at node {nid}: sigma_{kmin + 1} = {float(s_par[kmin]):.3g} "
                f"goes to {float(signed[kmin]):.3g} (signed) within {h:.3g}: a rank change ahead",
            )
    if rep.dimension != node["dimension"]:
        return (
            "dimension_change",
            f"dimension changed at node {nid}: {node['dimension']} -> {rep.dimension} "
            f"within {h:.3g}",
        )
    return None


def _reference_frame(kernel_basis: Tensor, m: int) -> Tensor:
    r"""``m`` orthonormal directions spanning ``kernel_basis``, independent of that basis.

    An eigensolver returns an arbitrary orthonormal basis of a repeated eigenvalue's
    eigenspace (the Hessian kernel of a critical set of dimension > 1), and which one
    depends on rounding (the BLAS path).  Only the span, i.e. the projector
    :math:`P = BB^\top`, is geometry.  The frame is :math:`PG` for a fixed Gaussian
    :math:`G \in \mathbb{R}^{K\times m}` (seed 0), orthonormalized by the QR
    factorization with a positive diagonal, a continuous function of :math:`P`.
    """
    kdim, d = kernel_basis.shape
    m = min(m, d)
    gen = torch.Generator(device="cpu").manual_seed(0)
    g = torch.randn(kdim, m, generator=gen, dtype=kernel_basis.dtype).to(kernel_basis.device)
    q, r = torch.linalg.qr(kernel_basis @ (kernel_basis.T @ g))
    sign = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)
    return q * sign


def _link_explorations(
    graph: nx.Graph,
    radius: float,
    verify: Any,
) -> None:
    r"""Join the components of ``graph`` that have nodes within ``radius`` of each other.

    Candidate pairs :math:`(p, q)` in different components with
    :math:`|p - q| \le` ``radius`` are tried nearest first; ``verify(p, q)`` (the ids)
    decides whether the chord between them lies on the set.  A verified pair gets an
    edge with ``step="link"``.  Pairs already in one component are skipped.
    """
    nodes = sorted(graph.nodes)
    if len(nodes) < 2:
        return
    th = torch.stack([graph.nodes[n]["theta"] for n in nodes])
    dist = torch.cdist(th, th)
    pairs = [
        (float(dist[i, j]), nodes[i], nodes[j])
        for i in range(len(nodes))
        for j in range(i + 1, len(nodes))
        if float(dist[i, j]) <= radius
    ]
    comp = {n: i for i, c in enumerate(nx.connected_components(graph)) for n in c}
    for length, a, b in sorted(pairs):
        if comp[a] == comp[b] or not verify(a, b):
            continue
        graph.add_edge(a, b, length=length, step="link")
        old, new = comp[b], comp[a]
        comp = {n: (new if c == old else c) for n, c in comp.items()}


def _component_info(
    graph: nx.Graph, comp: set[int], seed_nodes: list[int | None], cost_tol: float
) -> ComponentInfo:
    data = [graph.nodes[n] for n in sorted(comp)]
    dims = Counter(d["dimension"] for d in data)
    costs = np.array([d["cost"] for d in data])
    thetas = torch.stack([d["theta"] for d in data])
    diam = float(torch.cdist(thetas, thetas).max()) if len(data) > 1 else 0.0
    spread = float(costs.max() - costs.min())
    return ComponentInfo(
        nodes=set(comp),
        n_nodes=len(comp),
        dimension=dims.most_common(1)[0][0],
        dimensions=sorted(dims),
        dimension_consistent=len(dims) == 1,
        cost_mean=float(costs.mean()),
        cost_min=float(costs.min()),
        cost_max=float(costs.max()),
        cost_spread=spread,
        cost_constant=spread <= cost_tol,
        rank_profile=dict(Counter(d["rank"] for d in data)),
        index_values=sorted({d["index"] for d in data}),
        max_grad_norm=float(max(d["grad_norm"] for d in data)),
        seeds=[i for i, n in enumerate(seed_nodes) if n is not None and n in comp],
        diameter=diam,
    )


# ---------------------------------------------------------------------------
# plot
# ---------------------------------------------------------------------------
def plot_critical_set(critical_set: CriticalSet, ax: Any = None, *, colorbar: bool = True) -> Any:
    r"""Nodes of the sampled critical set on its two principal directions, coloured by cost.

    The node parameters are centred and projected on the first two right
    singular vectors of the centred ``[n, K]`` matrix (PCA); edges are the
    continuation steps, start points are stars.  Uses whatever matplotlib
    backend is active (call ``matplotlib.use("Agg")`` for files).

    Parameters
    ----------
    critical_set : CriticalSet
    ax : matplotlib Axes, optional
    colorbar : bool

    Returns
    -------
    matplotlib Axes
    """
    if not isinstance(critical_set, CriticalSet):
        raise TypeError(f"critical_set must be a CriticalSet, got {type(critical_set).__name__}")
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 5))
    g = critical_set.graph
    nodes = sorted(g.nodes)
    if not nodes:
        ax.set_title("empty critical set")
        return ax
    th = torch.stack([g.nodes[n]["theta"] for n in nodes]).detach().cpu().double()
    centred = th - th.mean(0)
    if len(nodes) > 1 and float(centred.abs().max()) > 0:
        _, sv, vh = torch.linalg.svd(centred, full_matrices=False)
        comps = vh[:2].T
        xy = (centred @ comps).numpy()
        var = (sv**2 / (sv**2).sum()).numpy()
    else:
        xy = np.zeros((len(nodes), 2))
        var = np.array([1.0, 0.0])
    if xy.shape[1] == 1:
        xy = np.hstack([xy, np.zeros((xy.shape[0], 1))])
        var = np.append(var, 0.0)
    pos = {n: xy[i] for i, n in enumerate(nodes)}
    for a, b in g.edges:
        ax.plot([pos[a][0], pos[b][0]], [pos[a][1], pos[b][1]], color="0.6", lw=0.8, zorder=1)
    costs = np.array([g.nodes[n]["cost"] for n in nodes])
    lo, hi = float(costs.min()), float(costs.max())
    if hi - lo <= 1e-9 * max(1.0, abs(hi)):  # constant cost: a visible, centred colour range
        pad = max(1e-3 * max(1.0, abs(hi)), hi - lo)
        lo, hi = lo - pad, hi + pad
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=costs, cmap="viridis", vmin=lo, vmax=hi, s=22,
                    zorder=2)
    seeds = [n for n in critical_set.seed_nodes if n is not None]
    if seeds:
        sxy = np.array([pos[n] for n in seeds])
        ax.scatter(sxy[:, 0], sxy[:, 1], marker="*", s=160, facecolor="none",
                   edgecolor="crimson", zorder=3, label="start point(s)")
        ax.legend(loc="best", fontsize=8)
    if colorbar:
        cb = ax.figure.colorbar(sc, ax=ax)
        cb.set_label("cost C")
        cb.formatter.set_useOffset(False)
        cb.update_ticks()
    ax.set_xlabel(f"PC 1 ({100 * var[0]:.0f}% of variance)")
    ax.set_ylabel(f"PC 2 ({100 * var[1]:.0f}% of variance)")
    dims = ", ".join(str(i.dimension) for i in critical_set.component_info)
    ax.set_title(
        f"critical set: {len(nodes)} points, {critical_set.n_components} component(s), "
        f"dim {dims}\nC from {float(costs.min()):.8g} to {float(costs.max()):.8g}",
        fontsize=9,
    )
    ax.set_aspect("equal", adjustable="datalim")
    return ax
