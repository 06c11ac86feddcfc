r"""Linear algebra at one point of parameter space: factorizations and solvers.

The expensive object is :math:`D[\theta]`.  A :class:`PointState` holds,
for one :math:`\theta`, the outputs :math:`x`, the output gradient
:math:`\nabla_x C`, and, lazily, *one* factorization of :math:`D` that
serves the metric's ``sharp``, the rank monitor and the singular values.

Solvers (``solver=`` of :class:`~subriemann.metrics.InterpolatedMetric`)
------------------------------------------------------------------------
``"svd"``
    Thin SVD of the dense :math:`D = U\Sigma V^\top`.  One SVD serves every
    :math:`\lambda`:
    :math:`V_\lambda = V\operatorname{diag}(w_i)U^\top\nabla_xC`,
    :math:`w_i = \sigma_i/((1-\lambda)+\lambda\sigma_i^2)`.
    Backward stable; no squaring of the condition number.
``"ntk"``
    Push-through form in the smaller space.  For :math:`QN \le K`:
    :math:`g_\lambda^{-1}D^\top = D^\top((1-\lambda)1 + \lambda DD^\top)^{-1}`
    with a Cholesky factor for :math:`\lambda<1` and the thresholded
    eigendecomposition :math:`DD^\top = U\Sigma^2U^\top` at :math:`\lambda=1`.
    Eigenvalues of :math:`DD^\top` carry an absolute error of about
    :math:`\epsilon\,\sigma_{\max}^2`, so singular values below
    :math:`\sqrt{\epsilon}\,\sigma_{\max}\approx 10^{-8}\sigma_{\max}` are not
    resolved on this route (a threshold below that is refused with a warning).
``"lstsq"``
    LAPACK least squares on stacked matrices, never the normal equations:
    ``gelsd`` on :math:`D` with ``rcond`` :math:`=\tau/\sigma_{\max}` at
    :math:`\lambda=1`, and for :math:`\lambda<1` the full-rank stacked problem
    in the smaller space (QR, ``gels``).
``"matrix_free"``
    One JVP and one VJP per iteration, :math:`D` is never formed.  LSMR
    (started at 0, so it converges to :math:`D^+g`) at :math:`\lambda=1`,
    CG on the SPD operator :math:`(1-\lambda)1+\lambda DD^\top` for
    :math:`\lambda<1`.  Iteration limits scale with the (estimated)
    condition number; a solve that stops short warns with its residual
    (:class:`ConvergenceWarning`).
``"nystrom"``
    Like ``"matrix_free"``, with CG preconditioned by a randomized Nyström
    approximation of the Gram matrix built from batched JVP/VJP sketches
    (:mod:`subriemann.linalg.nystrom`) for :math:`\lambda<1`; LSMR at :math:`\lambda=1`.

The rank threshold :math:`\tau` is always explicit: singular values
:math:`\sigma_i \le \tau` are treated as zero (docs/theory.md §7).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from subriemann.linalg.scipy_adapter import scipy_operator, to_numpy, to_torch

if TYPE_CHECKING:
    from subriemann.space import ParameterSpace

__all__ = [
    "PointState",
    "prefill_states",
    "r_svd",
    "SolverInfo",
    "ConvergenceWarning",
    "RankThresholdWarning",
    "AccuracyWarning",
    "ACCURACY",
    "SVD_FALLBACK_LIMIT",
    "gram_rounding",
    "refine_push_through",
    "SOLVERS",
    "choose_solver",
    "interp_weights",
    "cg",
    "lsmr",
    "check_converged",
]

SOLVERS = ("auto", "svd", "ntk", "lstsq", "matrix_free", "nystrom")
SMALL_DENSE_LIMIT = 200_000
"""Largest :math:`QN\\cdot K` for which ``solver="auto"`` always takes the dense SVD."""

DENSE_LIMIT = 2_000_000
"""Largest :math:`QN\\cdot K` (with :math:`K < QN`) for which ``solver="auto"`` forms
:math:`D` and takes its SVD; also the size up to which analyses form :math:`D`."""

NTK_LIMIT = 20_000
"""Largest :math:`\\min(QN, K)` for which ``solver="auto"`` takes the ``"ntk"`` route."""

ACCURACY = 1e-8
r"""Relative accuracy of the :math:`\lambda = 1` direction :math:`D^+u` that every solver
meets against the SVD route, or announces with an :class:`AccuracyWarning`."""

SVD_FALLBACK_LIMIT = 50_000_000
r"""Largest :math:`QN\cdot K` for which the ``"ntk"`` route, when it cannot certify
:data:`ACCURACY`, falls back to the dense SVD (otherwise it warns)."""


class ConvergenceWarning(UserWarning):
    """An iterative solver stopped before reaching its tolerance."""


class AccuracyWarning(UserWarning):
    r"""A :math:`\lambda = 1` solve could not certify :data:`ACCURACY`; the message gives
    the estimated relative error."""


class RankThresholdWarning(ConvergenceWarning):
    r"""A matrix-free solve met singular values at or below the rank threshold.

    A Krylov solver cannot truncate the spectrum exactly at :math:`\tau`;
    it stops when its condition estimate exceeds :math:`\sigma_{\max}/\tau`,
    which regularizes but is not the thresholded pseudoinverse.
    """


@dataclass
class SolverInfo:
    """What an iterative solve did.

    Attributes
    ----------
    solver : str
        ``"cg"`` or ``"lsmr"``.
    iterations : int
    residual : float
        Relative residual of the returned solution (see :func:`cg`, :func:`lsmr`).
    converged : bool
        Whether ``residual`` met the requested tolerance.
    rtol : float
        The requested tolerance.
    maxiter : int
        The iteration limit that applied (after scaling with conditioning).
    cond : float
        The solver's estimate of the condition number of its operator.
    reason : str
        Why it stopped.
    """

    solver: str
    iterations: int
    residual: float
    converged: bool
    rtol: float = float("nan")
    maxiter: int = 0
    cond: float = float("nan")
    reason: str = ""


def choose_solver(space: ParameterSpace, solver: str = "auto") -> str:
    r"""Pick the solver for ``space``: the fastest route that meets :data:`ACCURACY`.

    ``"auto"`` takes the first of these rows that applies (:math:`D` is :math:`QN\times K`):

    1. :math:`QN\cdot K \le` ``SMALL_DENSE_LIMIT``: ``"svd"`` (cheap at this size; the
       reference);
    2. :math:`QN \le K` and :math:`QN \le` ``NTK_LIMIT``: ``"ntk"`` (push-through in
       :math:`\mathbb{R}^{QN}`; at :math:`\lambda = 1` its accuracy is certified a
       priori, reached by iterative refinement, or it falls back to the SVD);
    3. :math:`K < QN` and :math:`QN\cdot K \le` ``DENSE_LIMIT``: ``"svd"`` (:math:`D`
       is formed anyway);
    4. :math:`K < QN` and :math:`K \le` ``NTK_LIMIT``: ``"ntk"`` (:math:`D^\top D`);
    5. otherwise ``"matrix_free"`` (memory :math:`O(K + QN)`).

    A new route enters as a row of :func:`_auto_route`.  ``"nystrom"`` is not a
    row: it is taken only when asked for.  Its preconditioner costs one JVP and
    one VJP per sketch column, and on the measured problems (``docs/scale.md``)
    its first solve at a new point was slower than the dense routes of rows
    1--4 and than unpreconditioned CG; it pays only when the preconditioner is
    reused over many nearby solves (a flow at :math:`\lambda < 1`), which the
    route table, a function of :math:`(QN, K)` alone, cannot know.
    """
    if not isinstance(solver, str):
        raise TypeError(f"solver must be a string, one of {SOLVERS}, got {type(solver).__name__}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if solver != "auto":
        return solver
    return _auto_route(space.output_dim, space.dim)


def _auto_route(qn: int, k: int) -> str:
    """The table of :func:`choose_solver` (first matching row)."""
    rows: list[tuple[bool, str]] = [
        (qn * k <= SMALL_DENSE_LIMIT, "svd"),
        (qn <= k and qn <= NTK_LIMIT, "ntk"),
        (k < qn and qn * k <= DENSE_LIMIT, "svd"),
        (k < qn and k <= NTK_LIMIT, "ntk"),
    ]
    return next((route for applies, route in rows if applies), "matrix_free")


def interp_weights(sigma: Tensor, lam: float, tau: float) -> Tensor:
    r"""The spectral weights :math:`\sigma_i/(1-\lambda+\lambda\sigma_i^2)` of :math:`V_\lambda`.

    At :math:`\lambda = 1` singular values :math:`\sigma_i \le \tau` get weight 0
    (the pseudoinverse); for :math:`\lambda < 1` the denominator is at least
    :math:`1-\lambda > 0` and every direction is kept.
    """
    denom = (1.0 - lam) + lam * sigma**2
    if lam == 1.0:
        keep = sigma > tau
        return torch.where(keep, sigma / torch.where(keep, denom, torch.ones_like(denom)), 0.0)
    return sigma / denom


def gram_rounding(gram: Tensor) -> float:
    r"""The rounding model :math:`\eta = 4n\epsilon\,|A|_F` of a computed Gram matrix ``[n, n]``.

    The backward error of forming :math:`A = DD^\top` (or :math:`D^\top D`) and
    factorizing it (Cholesky, symmetric eigendecomposition) is taken as a
    perturbation :math:`E` with :math:`|E|_2 \le \eta`; it is also the margin of
    :meth:`PointState.certified_cholesky`.  An eigenvalue :math:`\sigma_i^2` then
    carries an absolute error :math:`\le\eta`, and the push-through direction
    :math:`D^\top A^{-1}u` a relative error :math:`\le \eta/\lambda_{\min}(A)`
    (:math:`\epsilon\,\kappa(D)^2`).
    """
    return _rounding(gram.shape[-1], float(torch.linalg.matrix_norm(gram)), gram.dtype)


def _rounding(n: int, fro: float, dtype: torch.dtype) -> float:
    """:func:`gram_rounding` from the size ``n`` and the Frobenius norm ``fro``."""
    return 4.0 * n * torch.finfo(dtype).eps * fro


def refine_push_through(
    jvp: Any, vjp: Any, solve: Any, u: Tensor, v: Tensor, accuracy: float, max_steps: int = 4
) -> tuple[Tensor, SolverInfo]:
    r"""Iterative refinement of the minimum-norm solution :math:`v = D^+u` of :math:`Dv = u`.

    Given :math:`v_0 = D^\top \hat A^{-1}u` (``solve`` applies :math:`\hat A^{-1}`, a
    factorization of the computed :math:`A = DD^\top`), each step computes the residual
    :math:`\rho = u - Dv` (one JVP) and adds :math:`\delta v = D^\top\hat A^{-1}\rho`
    (one VJP).  The corrections stay in :math:`\operatorname{ran}D^\top`, so the limit
    is the minimum-norm solution; the error contracts by
    :math:`\approx\eta/\lambda_{\min}(A)` per step (:math:`\epsilon\kappa(D)^2`) down
    to the accuracy of the residual, :math:`\approx\epsilon\kappa(D)`, that of a
    backward stable solver.  The error after a step is at most its correction
    :math:`|\delta v|`, the a-posteriori estimate used to stop (``<= accuracy |v|``)
    or to give up (a correction that did not halve: stagnation).

    Returns
    -------
    v : Tensor, shape=[K]
    info : SolverInfo
        ``solver="refinement"``, ``residual`` the estimated relative error
        :math:`|\delta v|/|v|` of the last step, ``converged`` when it met ``accuracy``.
    """
    prev = math.inf
    est = math.inf
    reason = "iteration limit"
    steps = 0
    while steps < max_steps:
        steps += 1
        dv = vjp(solve(u - jvp(v)))
        v = v + dv
        step, vnorm = float(dv.norm()), float(v.norm())
        est = step / vnorm if vnorm > 0 else (0.0 if step == 0 else math.inf)
        if est <= accuracy:
            reason = "converged"
            break
        if not step < 0.5 * prev:
            reason = "stagnated"
            break
        prev = step
    converged = est <= accuracy
    return v, SolverInfo("refinement", steps, est, converged, accuracy, max_steps, reason=reason)


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
        self._cache: dict[Any, Any] = {}

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
            pullback = getattr(self.space.backend, "pullback", None)
            if pullback is None or "x" in self._cache or "D" in self._cache:
                self._cache["dC"] = self.vjp(self.output_grad)
            else:  # one forward pass gives x[theta] and serves the VJP
                self._cache["dC"] = pullback(self.theta, self._output_grad_of)[1]
        return self._cache["dC"]

    def _output_grad_of(self, x: Tensor) -> Tensor:
        """Record ``x`` (checked) and return :math:`\nabla_x C` (for ``pullback``)."""
        self._cache["x"] = self.space._finite_outputs(x)
        self._cache["g"] = self.space.output_grad(x)
        return self._cache["g"]

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
        r"""Thin SVD :math:`D = U\operatorname{diag}(\sigma)V^\top` as ``(U, sigma, V)``.

        For a wide or tall :math:`D` (one side at least twice the other) it is
        computed as an R-SVD: a Householder QR of the long side first
        (:math:`D^\top = QR`), then the SVD of the small square factor
        (:math:`R^\top = U\Sigma W^\top`, :math:`V = QW`).  Both steps are
        backward stable, so the accuracy is that of a direct SVD; on the
        :math:`1024\times 83\,460` Jacobian of the benchmark it is about twice
        as fast as LAPACK's ``gesdd`` through :func:`torch.linalg.svd`.
        """
        if "svd" not in self._cache:
            self._cache["svd"] = r_svd(self.jacobian)
        return self._cache["svd"]

    @property
    def ntk_eigh(self) -> tuple[Tensor, Tensor]:
        r"""``(U, sigma)``, :math:`DD^\top = U\operatorname{diag}(\sigma^2)U^\top`, descending."""
        if "eigh" not in self._cache:
            evals, evecs = torch.linalg.eigh(self.ntk)
            evals, evecs = evals.flip(0), evecs.flip(1)
            self._cache["eigh"] = (evecs, evals.clamp_min(0.0).sqrt())
        return self._cache["eigh"]

    @property
    def param_gram(self) -> Tensor:
        r""":math:`D^\top D`, ``[K, K]``, formed once per point (the solve and the rank monitor)."""
        if "param_gram" not in self._cache:
            d = self.jacobian
            self._cache["param_gram"] = d.T @ d
        return self._cache["param_gram"]

    @property
    def param_eigh(self) -> tuple[Tensor, Tensor]:
        r"""``(V, sigma)`` with :math:`D^\top D = V\operatorname{diag}(\sigma^2)V^\top`, descending.

        The Gram matrix in parameter space, the smaller one when :math:`K < QN`.
        """
        if "param_eigh" not in self._cache:
            evals, evecs = torch.linalg.eigh(self.param_gram)
            self._cache["param_eigh"] = (evecs.flip(1), evals.flip(0).clamp_min(0.0).sqrt())
        return self._cache["param_eigh"]

    def singular_values(self, method: str = "svd") -> Tensor:
        r"""Singular values of :math:`D`, descending, shape ``[min(QN, K)]``.

        ``method="svd"`` (or ``"lstsq"``) uses the dense SVD; otherwise the
        eigenvalues of the smaller Gram matrix (:math:`DD^\top` when
        :math:`QN \le K`, else :math:`D^\top D`).  A cached SVD is always
        preferred.
        """
        if "svd" in self._cache or method in ("svd", "lstsq"):
            s = self.svd[1]
        elif "eigh" in self._cache:
            s = self.ntk_eigh[1]
        elif "param_eigh" in self._cache:
            s = self.param_eigh[1]
        else:
            s = self.gram_singular_values
        return s[: min(self.space.output_dim, self.space.dim)]

    @property
    def gram_singular_values(self) -> Tensor:
        r"""Singular values from the eigenvalues of the smaller Gram matrix, descending.

        :math:`\sigma_i = \mu_i^{1/2}` for the eigenvalues :math:`\mu_i` of
        :math:`DD^\top` (:math:`QN\le K`) or :math:`D^\top D`, values only
        (``eigvalsh``: no eigenvectors, several times cheaper than ``eigh``),
        from the Gram matrix the solve already formed at this point (shared
        cache).  Same accuracy as the eigenvalues of :attr:`ntk_eigh`: an
        absolute error of about :math:`\epsilon\sigma_{\max}^2` in :math:`\sigma^2`.
        """
        if "gram_sv" not in self._cache:
            gram = self.ntk if self.space.output_dim <= self.space.dim else self.param_gram
            evals = torch.linalg.eigvalsh(gram).flip(0)
            self._cache["gram_sv"] = evals.clamp_min(0.0).sqrt()
        return self._cache["gram_sv"]

    def rank(self, tau: float, method: str = "svd") -> int:
        r"""Numerical rank: the number of :math:`\sigma_i > \tau`."""
        return int((self.singular_values(method) > tau).sum())

    def sigma_max(self, rtol: float = 1e-10, maxiter: int = 500) -> float:
        r""":math:`\sigma_{\max}(D)`, from a cached factorization or by power iteration.

        Without a cached SVD or Gram eigendecomposition this runs the power
        method on :math:`D^\top D` (one JVP and one VJP per step, or products
        with the dense :math:`D` when it is formed) until the Rayleigh
        quotient changes by less than ``rtol`` (relative), at most ``maxiter``
        steps.  The estimate is a lower bound; it sets the scale of a
        threshold (``rcond`` of ``gelsd``, ``conlim`` of LSMR).
        """
        for key in ("svd", "eigh", "param_eigh", "gram_sv"):
            if key in self._cache:
                s = self._cache[key] if key == "gram_sv" else self._cache[key][1]
                return float(s.max()) if s.numel() else 0.0
        cached = self._cache.get("smax")
        if cached is not None and cached[1] <= rtol:
            return cached[0]
        gen = torch.Generator(device="cpu").manual_seed(0)
        v = torch.randn(self.space.dim, generator=gen, dtype=self.theta.dtype).to(self.theta.device)
        v = v / v.norm()
        est, change = 0.0, float("inf")
        for _ in range(maxiter):
            w = self.vjp(self.jvp(v))
            new = float(v @ w)
            nw = float(w.norm())
            if nw == 0.0:
                est, change = 0.0, 0.0
                break
            v = w / nw
            change = abs(new - est) / abs(new) if new else 0.0
            est = new
            if change <= rtol:
                break
        value = math.sqrt(max(est, 0.0))
        self._cache["smax"] = (value, change)
        return value

    def certified_cholesky(self, tau: float | None, rtol: float) -> Tensor | None:
        r"""Cholesky factor of :math:`DD^\top` when it certifies :math:`\sigma_{\min}(D) > \tau`.

        With :math:`\mu = 2\tau_+^2 + 4\,QN\,\epsilon\,|DD^\top|_F`, where
        :math:`\tau_+ = \tau` (absolute threshold) or
        :math:`\tau_+ = \mathrm{rtol}\,|DD^\top|_F^{1/2} \ge \mathrm{rtol}\,\sigma_{\max}`
        (relative threshold, ``tau=None``), a successful Cholesky
        factorization of :math:`DD^\top - \mu 1` proves (Sylvester's law of
        inertia, with a margin for the rounding of the factorization) that every
        eigenvalue of :math:`DD^\top` exceeds :math:`\mu > \tau^2`: :math:`D`
        has full row rank :math:`QN` above the threshold, so
        :math:`(DD^\top)^+ = (DD^\top)^{-1}` and the thresholded
        eigendecomposition is not needed.  Two Cholesky factorizations cost
        about a tenth of one symmetric eigendecomposition.

        Returns ``None`` (and caches that) when the certificate fails, when the
        eigendecomposition is already cached (then it serves), or when
        :math:`QN > K`.
        """
        if "eigh" in self._cache or self.space.output_dim > self.space.dim:
            return None
        key = ("chol_cert", tau, rtol)
        if key not in self._cache:
            a = self.ntk
            fro = float(torch.linalg.matrix_norm(a))
            tau2 = tau**2 if tau is not None else rtol**2 * fro
            factor = None
            if fro > 0.0 and math.isfinite(fro) and self.gram_exceeds(2.0 * tau2):
                chol, info = torch.linalg.cholesky_ex(a)
                factor = chol if int(info) == 0 else None
            self._cache[key] = factor
        return self._cache[key]

    def gram_exceeds(self, mu: float) -> bool:
        r"""Whether :math:`\lambda_{\min}(DD^\top) > \mu` is certified (:math:`QN \le K`).

        True when the Cholesky factorization of :math:`DD^\top - (\mu + \eta)1`
        succeeds, :math:`\eta` = :func:`gram_rounding` (Sylvester's law of inertia, with
        the margin :math:`\eta` for the rounding of the Gram matrix and of the
        factorization).  A success for some :math:`\mu' \ge \mu` is reused.
        """
        proven = self._cache.setdefault("gram_exceeds", {})
        if any(ok and m >= mu for m, ok in proven.items()):
            return True
        if mu not in proven:
            a = self.ntk
            eta = gram_rounding(a)
            ok = False
            if math.isfinite(eta) and eta > 0.0:
                shifted = a.clone()  # a - (mu + eta) 1, without forming the identity
                shifted.diagonal().sub_(mu + eta)
                ok = int(torch.linalg.cholesky_ex(shifted)[1]) == 0
            proven[mu] = ok
        return proven[mu]

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


BATCH_ENTRIES = 8_000_000
"""Largest number of entries of the stacked Jacobians ``[b, QN, K]`` that
:func:`prefill_states` forms in one vectorised pass (the batch is split)."""


def r_svd(d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""Thin SVD of ``d`` ``[..., m, n]`` as ``(U, sigma, V)``, QR first when one side is long.

    The scheme of :attr:`PointState.svd` (batched over leading dimensions).
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


def prefill_states(space: ParameterSpace, thetas: Tensor, need: str) -> list[PointState]:
    r"""Compute the :class:`PointState` of several points together, vectorised over the batch.

    Used by the lock-step integration of a batch of flows
    (:mod:`subriemann.flow.lockstep`): one :func:`torch.func.vmap` over the points
    replaces ``b`` separate network evaluations, and the factorizations are
    batched LAPACK calls.  The states are put in the space's point cache, so
    that ``metric.gradient`` and ``metric.singular_values`` at these points
    are then served from them.

    Parameters
    ----------
    space : ParameterSpace
    thetas : Tensor, shape=[b, K]
    need : {"cost_grad", "svd"}
        ``"cost_grad"``: :math:`x`, :math:`\nabla_x C` and
        :math:`\nabla_\theta C = D^\top\nabla_x C` (one fused forward and
        backward pass, vectorised); ``"svd"``: :math:`x`, :math:`\nabla_x C`,
        the dense :math:`D` (``vmap`` of the reverse-mode Jacobian) and its
        thin SVD (batched, :func:`r_svd`).

    Returns
    -------
    list of PointState
        One per point.  Entries a state already holds are not recomputed.

    Raises
    ------
    ValueError
        When the space's engine has no vectorisable dense route
        (:class:`~subriemann.engines.func.FuncBackend`, directly or as the
        structured engine's fallback).
    """
    from torch.func import vmap

    from subriemann.engines import FuncBackend

    if need not in ("cost_grad", "svd"):
        raise ValueError(f"need must be 'cost_grad' or 'svd', got {need!r}")
    fb = getattr(space.backend, "fallback", space.backend)
    if not isinstance(fb, FuncBackend):
        raise ValueError(f"the {type(space.backend).__name__} engine cannot be vectorised")
    states = [space.point_state(t) for t in thetas]
    todo = [i for i, st in enumerate(states) if ("svd" if need == "svd" else "dC") not in st._cache]
    per = space.output_dim * space.dim if need == "svd" else space.dim
    size = max(1, BATCH_ENTRIES // max(per, 1))
    for a in range(0, len(todo), size):
        idx = todo[a : a + size]
        th = torch.stack([states[i].theta for i in idx])
        if need == "svd":  # D^T g comes from the cached D when wanted: no backward pass here
            x = vmap(fb.outputs)(th)
            d = vmap(fb.jacobian)(th)
        else:
            x, dc = vmap(lambda t: fb.pullback(t, space.output_grad))(th)
        finite = torch.isfinite(x).all(dim=-1)
        if need == "svd":
            ok = finite & torch.isfinite(d).flatten(1).all(dim=-1)
            u, sig, v = r_svd(torch.where(ok[:, None, None], d, 0.0))
        for j, i in enumerate(idx):
            if not bool(finite[j]):
                continue  # left to the single-point route, which raises NonFiniteError
            cache = states[i]._cache
            cache.setdefault("x", x[j])
            if "g" not in cache:
                cache["g"] = space.output_grad(x[j])
            if need == "cost_grad":
                cache.setdefault("dC", dc[j])
            elif bool(ok[j]):
                cache.setdefault("D", d[j])
                cache.setdefault("svd", (u[j], sig[j], v[j]))
    return states


# -- iterative solvers -----------------------------------------------------------
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
        (e.g. :class:`subriemann.linalg.nystrom.NystromPreconditioner`); the stopping
        test stays on the unpreconditioned residual :math:`|b - Az|`, so
        ``rtol`` means the same with or without it.

    Returns
    -------
    z : Tensor, shape=[n]
    info : SolverInfo
        ``solver`` is ``"cg"`` (``"pcg"`` with ``precond``); ``residual`` is the
        *true* relative residual :math:`|b - Az|/|b|`, recomputed at the end.
    """
    if precond is not None and eig_lower is not None:
        raise ValueError("eig_lower bounds the spectrum of A, not of P^-1 A: omit it with precond")
    name = "cg" if precond is None else "pcg"
    pre = precond if precond is not None else (lambda v: v)
    n = rhs.shape[0]
    z = torch.zeros_like(rhs)
    bnorm = float(rhs.norm())
    if bnorm == 0.0:
        return z, SolverInfo(name, 0, 0.0, True, rtol, 0, 1.0, "zero right-hand side")
    hard_cap = 20 * n + 100
    limit = maxiter if maxiter is not None else min(_cg_budget(1.0, rtol), hard_cap)
    r = rhs.clone()
    p = pre(r).clone()
    rs = float(r @ p)  # r^T P^-1 r
    alphas: list[float] = []
    betas: list[float] = []
    kappa = 1.0
    it = 0
    reason = "iteration limit"
    while True:
        if float(r.norm()) <= rtol * bnorm:
            reason = "converged"
            break
        if it >= limit:
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
        it += 1
        if maxiter is None and (it <= 10 or it % 10 == 0):
            kappa = _ritz_kappa(alphas, betas, eig_lower)
            limit = min(max(limit, _cg_budget(kappa, rtol)), hard_cap)
    if alphas:
        kappa = _ritz_kappa(alphas, betas, eig_lower)
    res = float((rhs - matvec(z)).norm()) / bnorm
    # the recursive residual may drift from the true one; judge by the true one
    converged = res <= 10.0 * rtol
    if reason == "converged" and not converged:
        reason = "recursive residual met rtol but the true residual did not"
    return z, SolverInfo(name, it, res, converged, rtol, limit, kappa, reason)


def _ritz_kappa(alphas: list[float], betas: list[float], eig_lower: float | None) -> float:
    """Condition estimate from CG's coefficients (Lanczos tridiagonal, Ritz values)."""
    m = len(alphas)
    diag = np.empty(m)
    off = np.empty(max(m - 1, 0))
    for j in range(m):
        diag[j] = 1.0 / alphas[j] + (betas[j - 1] / alphas[j - 1] if j > 0 else 0.0)
        if j < m - 1:
            off[j] = math.sqrt(max(betas[j], 0.0)) / alphas[j]
    if m == 1:
        ritz = diag
    else:
        from scipy.linalg import eigvalsh_tridiagonal

        ritz = eigvalsh_tridiagonal(diag, off)
    top = float(ritz.max())
    low = eig_lower if eig_lower is not None else float(ritz.min())
    if not (low > 0.0 and math.isfinite(top)):
        return float("inf")
    return max(top / low, 1.0)


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
    """
    from scipy.sparse.linalg import lsmr as _lsmr

    dtype, device = rhs.dtype, rhs.device
    op = scipy_operator(shape, matvec, rmatvec, dtype=dtype, device=device)
    b = to_numpy(rhs)
    bnorm = float(np.linalg.norm(b))
    if bnorm == 0.0:
        return torch.zeros(shape[1], dtype=dtype, device=device), SolverInfo(
            "lsmr", 0, 0.0, True, rtol, 0, 1.0, "zero right-hand side"
        )
    small = min(shape)
    hard_cap = 50 * small + 100
    first = 4 * small + 20 if maxiter is None else int(maxiter)
    kw = dict(damp=damp, atol=rtol, btol=rtol, conlim=conlim)
    out = _lsmr(op, b, maxiter=first, **kw)
    total, limit = int(out[2]), first
    kappa, norma = float(out[6]), float(out[5])
    if maxiter is None:
        while out[1] == 7 and total < hard_cap:
            limit = min(
                max(limit, int(math.ceil(0.5 * kappa * math.log(2.0 / rtol))) + 20), hard_cap
            )
            if total >= limit:
                break
            out = _lsmr(op, b, x0=out[0], maxiter=limit - total, **kw)
            total += int(out[2])
            kappa, norma = max(kappa, float(out[6])), max(norma, float(out[5]))
    reasons = {
        0: "x = 0 is the solution",
        1: "converged (compatible system)",
        2: "converged (least squares)",
        3: "condition limit",
        4: "converged to machine precision (compatible system)",
        5: "converged to machine precision (least squares)",
        6: "condition limit",
        7: "iteration limit",
    }
    v = to_torch(out[0], dtype, device)
    r = rhs - matvec(v)
    rnorm = float(r.norm())
    norma = norma or 1.0
    # LSMR's two stopping tests, evaluated on the returned v:
    # compatible   |r| <= rtol (|b| + |A||v|),   least squares   |A^T r| <= rtol |A||r|
    res = rnorm / (bnorm + norma * float(v.norm()))
    if rnorm > 0.0:
        atr = rmatvec(r) - damp**2 * v
        res = min(res, float(atr.norm()) / (norma * rnorm))
    return v, SolverInfo(
        "lsmr", total, res, res <= 10.0 * rtol, rtol, limit, kappa, reasons.get(int(out[1]), "")
    )


def check_converged(info: SolverInfo, on_fail: str = "warn") -> None:
    """Warn (or raise ``RuntimeError``) when an iterative solve did not converge.

    A stop at LSMR's condition limit (the rank threshold) warns with
    :class:`RankThresholdWarning`, any other failure with
    :class:`ConvergenceWarning`; both carry the residual.
    """
    if info.converged and info.reason != "condition limit":
        return
    if info.reason == "condition limit":
        msg = (
            f"{info.solver} stopped after {info.iterations} iterations because its estimate of "
            f"cond(D) ({info.cond:.3g}) exceeded sigma_max/tau: D has singular values at or below "
            "the rank threshold, which a matrix-free solver cannot truncate exactly. The result "
            f"(relative residual {info.residual:.3g}) is not the thresholded pseudoinverse: "
            "components along singular values near tau may be amplified by up to 1/tau. "
            "Use solver='svd' or 'ntk' for the exact cut"
        )
        category: type[Warning] = RankThresholdWarning
    else:
        msg = (
            f"{info.solver} did not converge in {info.iterations} iterations (limit "
            f"{info.maxiter}, {info.reason}): relative residual {info.residual:.3g} > "
            f"rtol {info.rtol:.3g}; the result is not the exact Riemannian gradient"
        )
        category = ConvergenceWarning
    if on_fail == "raise":
        raise RuntimeError(msg)
    warnings.warn(msg, category, stacklevel=3)
