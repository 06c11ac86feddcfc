r"""Spectral helpers: the rank threshold, the spectral weights, one size policy.

**The rank threshold** (docs/theory.md §7): singular values :math:`\sigma_i \le \tau`
of :math:`D` are treated as zero, with

.. math::

    \tau = \begin{cases} \texttt{rank\_atol} & \text{if given,}\\
    \texttt{rank\_rtol}\cdot\sigma_{\max} & \text{otherwise.}\end{cases}

Every part of subriemann that decides a rank (the metrics' solves, the flow's
rank monitor, the critical-set analysis, the optimizer, the report) computes
:math:`\tau` with :func:`rank_threshold`, so a recorded ``rank_rtol`` always
means the same thing.

**The spectral filter** of the interpolated metric is :func:`interp_weights`;
**the rounding model** of a Gram matrix is :func:`gram_rounding`; **the size
policy** (which factorization of :math:`D` is affordable) is
:func:`size_policy` (the route table of ``solver="auto"``) and
:func:`dense_svd_fits` (whether :math:`D` is formed and its SVD taken), with
the limits :data:`SMALL_DENSE_LIMIT`, :data:`DENSE_LIMIT` and :data:`NTK_LIMIT`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "rank_threshold",
    "interp_weights",
    "r_svd",
    "gram_rounding",
    "eigenvalue_rounding",
    "size_policy",
    "dense_svd_fits",
    "SMALL_DENSE_LIMIT",
    "DENSE_LIMIT",
    "NTK_LIMIT",
]

SMALL_DENSE_LIMIT = 200_000
"""Largest :math:`QN\\cdot K` for which ``solver="auto"`` always takes the dense SVD."""

DENSE_LIMIT = 2_000_000
"""Largest :math:`QN\\cdot K` for which :math:`D` is formed and its SVD taken when the
SVD is not the only choice (``solver="auto"`` with :math:`K < QN`, and the analyses'
spectra, :meth:`~subriemann.linalg.PointState.output_spectrum`)."""

NTK_LIMIT = 20_000
"""Largest :math:`\\min(QN, K)` for which ``solver="auto"`` takes the ``"ntk"`` route."""


def rank_threshold(
    sigma_max: float | Tensor | Callable[[], float | Tensor],
    rank_rtol: float,
    rank_atol: float | None = None,
) -> float:
    r"""The threshold :math:`\tau` below which a singular value counts as zero.

    Parameters
    ----------
    sigma_max : float, Tensor or callable
        Largest singular value :math:`\sigma_{\max}` of :math:`D` (``0`` for an
        empty or zero matrix); or the singular values (a tensor: its largest
        entry is taken, 0 when empty); or a function without arguments that
        returns either, called only when ``rank_atol`` is ``None`` (so that
        no factorization is made for an absolute threshold).
    rank_rtol : float
        Relative threshold, used when ``rank_atol`` is ``None``.
    rank_atol : float, optional
        Absolute threshold; overrides ``rank_rtol``.

    Returns
    -------
    float
        ``rank_atol`` if given, else ``rank_rtol * sigma_max``.

    Examples
    --------
    >>> rank_threshold(2.0, 1e-6)
    2e-06
    >>> rank_threshold(2.0, 1e-6, rank_atol=0.5)
    0.5
    >>> import torch
    >>> rank_threshold(torch.tensor([3.0, 1.0]), 0.1)
    0.30000000000000004
    """
    if rank_atol is not None:
        return float(rank_atol)
    top = sigma_max() if callable(sigma_max) else sigma_max
    if isinstance(top, Tensor):
        top = float(top.max()) if top.numel() else 0.0
    return float(rank_rtol) * float(top)


def interp_weights(sigma: Tensor, lam: float, tau: float) -> Tensor:
    r"""The spectral weights :math:`\sigma_i/(1-\lambda+\lambda\sigma_i^2)` of :math:`V_\lambda`.

    At :math:`\lambda = 1` singular values :math:`\sigma_i \le \tau` get weight 0
    (the pseudoinverse); for :math:`\lambda < 1` the denominator is at least
    :math:`1-\lambda > 0` and every direction is kept.

    Parameters
    ----------
    sigma : Tensor, shape=[..., r]
    lam : float
    tau : float

    Returns
    -------
    Tensor, shape=[..., r]

    Examples
    --------
    >>> import torch
    >>> interp_weights(torch.tensor([2.0, 1e-9]), 1.0, 1e-6).tolist()
    [0.5, 0.0]
    """
    denom = (1.0 - lam) + lam * sigma**2
    if lam == 1.0:
        keep = sigma > tau
        return torch.where(keep, sigma / torch.where(keep, denom, torch.ones_like(denom)), 0.0)
    return sigma / denom


def r_svd(d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""Thin SVD of ``d`` ``[..., m, n]`` as ``(U, sigma, V)``, QR first when one side is long.

    For a wide or tall matrix (one side at least twice the other) it is an
    R-SVD: a Householder QR of the long side first (:math:`D^\top = QR`), then
    the SVD of the small square factor (:math:`R^\top = U\Sigma W^\top`,
    :math:`V = QW`).  Both steps are backward stable, so the accuracy is that of
    a direct SVD; on the :math:`1024\times 83\,460` Jacobian of the benchmark it
    is about twice as fast as LAPACK's ``gesdd`` through :func:`torch.linalg.svd`.
    Batched over leading dimensions.
    """
    m, n = d.shape[-2:]
    if n >= 2 * m and m > 0:  # wide: D = R^T Q^T
        q, r = torch.linalg.qr(d.mT, mode="reduced")
        u, s, wh = torch.linalg.svd(r.mT)
        return u, s, q @ wh.mT
    if m >= 2 * n and n > 0:  # tall: D = Q R
        q, r = torch.linalg.qr(d, mode="reduced")
        w, s, vh = torch.linalg.svd(r)
        return q @ w, s, vh.mT
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    return u, s, vh.mT


def _eta(n: int, fro: float, dtype: torch.dtype) -> float:
    """The rounding model from the size ``n`` and the Frobenius norm ``fro``."""
    return 4.0 * n * torch.finfo(dtype).eps * fro


def gram_rounding(gram: Tensor) -> float:
    r"""The rounding model :math:`\eta = 4n\epsilon\,|A|_F` of a computed Gram matrix ``[n, n]``.

    The backward error of forming :math:`A = DD^\top` (or :math:`D^\top D`) and
    factorizing it (Cholesky, symmetric eigendecomposition) is taken as a
    perturbation :math:`E` with :math:`|E|_2 \le \eta`; it is also the margin of
    :meth:`~subriemann.linalg.PointState.certified_cholesky`.  An eigenvalue
    :math:`\sigma_i^2` then carries an absolute error :math:`\le\eta`, and the
    push-through direction :math:`D^\top A^{-1}u` a relative error
    :math:`\le \eta/\lambda_{\min}(A)` (:math:`\epsilon\,\kappa(D)^2`).
    """
    return _eta(gram.shape[-1], float(torch.linalg.matrix_norm(gram)), gram.dtype)


def eigenvalue_rounding(sigma: Tensor) -> float:
    r""":func:`gram_rounding` of :math:`A` from its eigenvalues :math:`\sigma_i^2`.

    :math:`|A|_F = (\sum_i\sigma_i^4)^{1/2}`, ``sigma`` of shape ``[n]`` (the
    square roots of all ``n`` eigenvalues of the ``[n, n]`` Gram matrix).
    """
    return _eta(sigma.shape[0], float((sigma**4).sum().sqrt()), sigma.dtype)


def dense_svd_fits(qn: int, k: int) -> bool:
    r"""Whether :math:`D` (:math:`QN\times K`) is formed and its SVD taken: :math:`QN K\le`
    :data:`DENSE_LIMIT`; otherwise the eigendecomposition of the smaller Gram matrix serves.

    Examples
    --------
    >>> dense_svd_fits(1000, 1000), dense_svd_fits(1000, 10_000)
    (True, False)
    """
    return qn * k <= DENSE_LIMIT


def size_policy(qn: int, k: int) -> str:
    r"""The route ``solver="auto"`` takes for :math:`D` of shape :math:`QN\times K`.

    The first of these rows that applies:

    1. :math:`QN\cdot K \le` :data:`SMALL_DENSE_LIMIT`: ``"svd"`` (cheap at this
       size; the reference);
    2. :math:`QN \le K` and :math:`QN \le` :data:`NTK_LIMIT`: ``"ntk"``
       (push-through in :math:`\mathbb{R}^{QN}`; at :math:`\lambda = 1` its
       accuracy is certified a priori, reached by iterative refinement, or it
       falls back to the SVD);
    3. :math:`K < QN` and :func:`dense_svd_fits`: ``"svd"`` (:math:`D` is formed
       anyway);
    4. :math:`K < QN` and :math:`K \le` :data:`NTK_LIMIT`: ``"ntk"`` (:math:`D^\top D`);
    5. otherwise ``"matrix_free"`` (memory :math:`O(K + QN)`).

    ``"nystrom"`` is not a row: it is taken only when asked for.  Its
    preconditioner costs one JVP and one VJP per sketch column, and on the
    measured problems (``docs/scale.md``) its first solve at a new point was
    slower than the dense routes of rows 1--4 and than unpreconditioned CG; it
    pays only when the preconditioner is reused over many nearby solves (a flow
    at :math:`\lambda < 1`), which a function of :math:`(QN, K)` alone cannot know.

    Examples
    --------
    >>> size_policy(24, 1441), size_policy(1024, 75268), size_policy(30_000, 40_000)
    ('svd', 'ntk', 'matrix_free')
    """
    rows: list[tuple[bool, str]] = [
        (qn * k <= SMALL_DENSE_LIMIT, "svd"),
        (qn <= k and qn <= NTK_LIMIT, "ntk"),
        (k < qn and dense_svd_fits(qn, k), "svd"),
        (k < qn and k <= NTK_LIMIT, "ntk"),
    ]
    return next((route for applies, route in rows if applies), "matrix_free")
