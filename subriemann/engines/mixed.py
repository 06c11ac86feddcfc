r"""Shifted solves in mixed precision: a ``float32`` factorization refined to ``float64`` accuracy.

The sample-side elimination of :mod:`~subriemann.engines.kspace` spends
nearly all its time in two dense products, the triangular solve
:math:`Z = L^{-1}J` (:math:`N^2Q|C|` flops) and the Gram matrix
:math:`Z^\top Z` (:math:`NQ|C|^2`), on rows :math:`J` of the convolutions that
themselves cost a forward and a reverse pass.  In ``float32`` all of this
takes about half the time.  :func:`mixed_solve` therefore

1. computes the layer rows at :math:`\theta` in ``float32`` and factors
   :math:`\hat A \approx A = D^\top D + \mu 1` with them
   (:class:`~subriemann.engines.kspace.SampleSide`, every small factor in
   ``float64``);
2. refines :math:`x_{k+1} = x_k + \hat A^{-1}(r - Ax_k)`
   (:func:`refine`), with :math:`Ax = D^\top(Dx) + \mu x` applied in
   ``float64`` by the engine's Jacobian-vector products, until the normwise
   backward error

   .. math::

       \eta_k = \frac{|r - Ax_k|}{|A|\,|x_k| + |r|}

   is at most :math:`\sqrt K\,\epsilon_{64}`: the accuracy a backward-stable
   ``float64`` factorization of :math:`A` guarantees, which is what the
   direct solve (the same elimination in ``float64``) gives.

Each refinement multiplies the error by about
:math:`|1 - A\hat A^{-1}| \lesssim \epsilon_{32}\,\kappa(A)`, with
:math:`\kappa(A) \le |A|_2/\mu`.  :math:`|A|` in :math:`\eta` is the lower
bound :math:`a = \mu + \max_i |De_i|^2` of :math:`|A|_2`, so the computed
:math:`\eta` is never below the true one.  The solve is declined before the
factorization when :math:`\epsilon_{32}\,a/\mu > 1/10` (then
:math:`\epsilon_{32}|A|_2/\mu` is larger still), and gives up (``None``, the
caller then solves directly in ``float64``) when a refinement does not halve
:math:`\eta` or :data:`MAX_REFINEMENTS` do not reach the target.  (The upper
bound :math:`\mu + |D|_F^2` of :math:`|A|_2` is no guide: on the digits CNN it
is :math:`10^6`, while the refinement converges as for :math:`\kappa \approx 2\cdot10^3`.)

On the digits CNN of ``benchmarks/scale.py`` (:math:`N = 1\,797`, :math:`Q = 10`,
:math:`|C| = 2\,480`, :math:`K = 12\,730`) two refinements reach
:math:`\eta \approx 10^{-16}`; docs/scale.md has the timings.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from subriemann.engines.kspace import SampleSide, gather_rows

__all__ = ["MAX_REFINEMENTS", "MIN_FLOPS", "Refinement", "refine", "mixed_solve"]

MAX_REFINEMENTS = 10
"""At most this many refinements; then the solve gives up."""

MIN_FLOPS = 10**10
r"""``mixed_precision="auto"`` uses :func:`mixed_solve` where the triangular solve
costs at least this many flops (:math:`N^2Q|C|`): below, the three extra products
of the refinement cost more than ``float32`` saves."""


@dataclass
class Refinement:
    r"""What :func:`refine` did: the backward errors :math:`\eta_0, \eta_1, \dots`, the target."""

    target: float
    backward_errors: list[float] = field(default_factory=list)

    @property
    def converged(self) -> bool:
        return bool(self.backward_errors) and self.backward_errors[-1] <= self.target


def refine(
    apply_a: Callable[[Tensor], Tensor],
    apply_inverse: Callable[[Tensor], Tensor],
    rhs: Tensor,
    norm_a: float,
    target: float,
    max_refinements: int = MAX_REFINEMENTS,
) -> tuple[Tensor, Refinement]:
    r"""Iterative refinement of :math:`Ax = r` with an approximate inverse.

    Parameters
    ----------
    apply_a : callable
        :math:`x \mapsto Ax` in the working precision, ``[K, b] -> [K, b]``.
    apply_inverse : callable
        :math:`u \mapsto \hat A^{-1}u`, an approximate solve.
    rhs : Tensor, shape=[K, b]
    norm_a : float
        A lower bound of :math:`|A|_2` (so that :math:`\eta` is not underestimated).
    target : float
        Stop when the backward error :math:`\eta` (module docstring) is at most this.

    Returns
    -------
    x : Tensor, shape=[K, b]
        The last iterate (check ``info.converged``).
    info : Refinement

    Examples
    --------
    A ``float32`` solve refined to ``float64`` accuracy:

    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> b = torch.randn(30, 30, dtype=torch.float64)
    >>> a = b @ b.T + 30 * torch.eye(30, dtype=torch.float64)
    >>> inv32 = torch.linalg.inv(a.float())
    >>> r = torch.randn(30, 1, dtype=torch.float64)
    >>> x, info = refine(lambda v: a @ v, lambda u: (inv32 @ u.float()).double(), r,
    ...                  float(torch.linalg.matrix_norm(a, 2)), 1e-15)
    >>> info.converged, len(info.backward_errors) <= 4
    (True, True)
    >>> bool(torch.allclose(x, torch.linalg.solve(a, r), rtol=1e-13, atol=0))
    True
    """
    info = Refinement(float(target))
    b_norm = float(rhs.norm())
    x = apply_inverse(rhs)
    for k in range(max_refinements + 1):
        res = rhs - apply_a(x)
        eta = float(res.norm()) / (norm_a * float(x.norm()) + b_norm) if b_norm > 0 else 0.0
        info.backward_errors.append(eta)
        stalled = k > 0 and not eta <= 0.5 * info.backward_errors[-2]
        if eta <= target or stalled or not math.isfinite(eta) or k == max_refinements:
            break
        x = x + apply_inverse(res)
    return x, info


def mixed_solve(
    chunks: Callable[[], Any],
    ranges: list[tuple[int, int]],
    last: int,
    rhs: Tensor,
    shift: float,
    temp_entries: int,
    n_samples: int,
    apply_d: Callable[[Tensor], Tensor],
    apply_dt: Callable[[Tensor], Tensor],
    min_flops: int = MIN_FLOPS,
) -> tuple[Tensor, Refinement] | None:
    r""":math:`(D^\top D + \mu 1)^{-1}r` from ``float32`` rows, refined (module docstring).

    Parameters
    ----------
    chunks : callable
        Per-chunk form lists in ``float32`` (as for
        :func:`~subriemann.engines.kspace.sample_side_solve`).
    rhs : Tensor, shape=[K, b]
        In the working dtype (``float64``).
    apply_d, apply_dt : callable
        :math:`v \mapsto Dv` (``[b, K] -> [b, QN]``) and :math:`u \mapsto D^\top u`
        in the working dtype.
    min_flops : int
        Declined when the triangular solve would cost fewer flops.

    Returns
    -------
    (x, info) or None
        ``None`` where the sample side does not apply, the solve is too small
        or too ill-conditioned for ``float32``, or the refinement did not
        reach its target: then solve directly.

    Examples
    --------
    The rows of :func:`~subriemann.engines.kspace.sample_side_solve`'s example,
    with the products of the dense :math:`D` (``min_flops=0``: at any size):

    >>> import torch
    >>> from subriemann.engines.kspace import KronForm, RowsForm
    >>> _ = torch.manual_seed(0)
    >>> n, q, p, m = 6, 3, 5, 4
    >>> j, a = torch.randn(n, q, p, dtype=torch.float64), torch.randn(n, m, dtype=torch.float64)
    >>> g = torch.eye(q, dtype=torch.float64).expand(n, q, q)
    >>> forms = [RowsForm(j), KronForm(a, g, m, False)]
    >>> d = torch.cat([j.reshape(n * q, p),
    ...                torch.einsum("qc,ni->nqci", g[0], a).reshape(n * q, q * m)], dim=1)
    >>> r = torch.randn(p + q * m, 1, dtype=torch.float64)
    >>> x, info = mixed_solve(lambda: [forms], [(0, p), (p, p + q * m)], 1, r, 0.5, 10**6, n,
    ...                       lambda v: v @ d.T, lambda u: u @ d, min_flops=0)
    >>> info.converged, len(info.backward_errors) > 1
    (True, True)
    >>> ref = torch.linalg.solve(d.T @ d + 0.5 * torch.eye(p + q * m, dtype=torch.float64), r)
    >>> bool(torch.allclose(x, ref, rtol=1e-12, atol=1e-14))
    True
    """
    first = next(iter(chunks()), None)  # the size from the first chunk, before any copy
    if first is None:
        return None
    n_c = sum(f.size for i, f in enumerate(first) if i != last)
    if n_samples**2 * int(first[last].g.shape[1]) * n_c < min_flops:
        return None
    got = gather_rows(chunks, last, temp_entries, n_samples, torch.float32)
    if got is None:
        return None
    j, a, form = got
    n, q, n_c = j.shape
    cols = torch.cat([j.view(n * q, n_c).square().sum(dim=0), a.square().sum(dim=0)])
    norm_a = shift + float(cols.max())  # max_i |D e_i|^2 <= |D^T D|_2
    if torch.finfo(j.dtype).eps * norm_a / shift > 0.1:
        return None
    factor = SampleSide.factor(j, a, form, ranges, last, shift, rhs.dtype)
    del j

    def apply_a(x: Tensor) -> Tensor:
        return apply_dt(apply_d(x.T)).T + shift * x

    target = math.sqrt(rhs.shape[0]) * torch.finfo(rhs.dtype).eps
    x, info = refine(apply_a, factor.solve, rhs, norm_a, target)
    return (x, info) if info.converged else None
