r"""The point state: everything computed at one :math:`\theta`, computed at most once.

The expensive object is :math:`D[\theta]`.  A :class:`PointState` holds,
for one :math:`\theta`, the outputs :math:`x`, the output gradient
:math:`\nabla_x C`, and, lazily, *one* factorization of :math:`D` (its thin
SVD, or the eigendecomposition or Cholesky factor of a Gram matrix) that
serves the metric's solve, the rank monitor and the singular values.
:func:`prefill_states` computes the states of several points together.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from torch.func import vmap

from subriemann.engines import FuncBackend
from subriemann.engines.base import plain_tensor
from subriemann.linalg.spectral import dense_svd_fits, gram_rounding, r_svd
from subriemann.validation import check_choice

if TYPE_CHECKING:
    from subriemann.space import ParameterSpace

__all__ = ["PointState", "prefill_states", "BATCH_ENTRIES"]

BATCH_ENTRIES = 8_000_000
"""Largest number of entries of the stacked Jacobians ``[b, QN, K]`` that
:func:`prefill_states` forms in one vectorised pass (the batch is split)."""


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

    Notes
    -----
    Metrics and solver routes keep their own per-point results here too
    (:meth:`memo`), under keys that name them (a tuple starting with a string).
    """

    def __init__(self, space: ParameterSpace, theta: Tensor) -> None:
        self.space = space
        self.theta = space.check_point(theta)
        self._cache: dict[Any, Any] = {}

    # -- the cache ---------------------------------------------------------------------
    def memo(self, key: Any, compute: Callable[[], Any]) -> Any:
        """The entry ``key`` of this point, computed by ``compute()`` on the first call."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def has(self, key: Any) -> bool:
        """Whether the entry ``key`` is computed (``"D"``, ``"svd"``, ``"ntk"``, ...)."""
        return key in self._cache

    def store(self, key: Any, value: Any) -> None:
        """Set the entry ``key`` unless it is computed already (a batched pass fills states)."""
        self._cache.setdefault(key, value)

    @property
    def output_is_smaller(self) -> bool:
        r""":math:`QN \le K`: the smaller Gram matrix is :math:`DD^\top` (else :math:`D^\top D`)."""
        return self.space.output_dim <= self.space.dim

    # -- basic quantities ---------------------------------------------------------
    @property
    def outputs(self) -> Tensor:
        return self.memo("x", lambda: self.space.outputs(self.theta))

    @property
    def output_grad(self) -> Tensor:
        return self.memo("g", lambda: self.space.output_grad(self.outputs))

    @property
    def cost(self) -> Tensor:
        return self.memo("c", lambda: self.space.output_cost(self.outputs))

    @property
    def cost_grad(self) -> Tensor:
        r""":math:`\nabla_\theta C = D^\top\nabla_x C`."""
        if "dC" not in self._cache:
            if "x" in self._cache or "D" in self._cache:
                self._cache["dC"] = self.vjp(self.output_grad)
            else:  # one forward pass gives x[theta] and serves the VJP
                self._cache["dC"] = self.space.backend.pullback(self.theta, self._output_grad_of)[1]
        return self._cache["dC"]

    def _output_grad_of(self, x: Tensor) -> Tensor:
        r"""Record ``x`` (checked) and return :math:`\nabla_x C` (for ``pullback``)."""
        self._cache["x"] = self.space.finite_outputs(x)
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

    def jvp_rows(self, w: Tensor) -> Tensor:
        r"""Rows :math:`Dw_i` for ``w`` of shape ``[b, K]``, shape ``[b, QN]`` (batched JVPs)."""
        if "D" in self._cache:
            return w @ self._cache["D"].T
        return self.space.backend.jvp(self.theta, w)

    def vjp_rows(self, w: Tensor) -> Tensor:
        r"""Rows :math:`D^\top w_i` for ``w`` of shape ``[b, QN]``, shape ``[b, K]`` (VJPs)."""
        if "D" in self._cache:
            return w @ self._cache["D"]
        return self.space.backend.vjp(self.theta, w)

    @property
    def jacobian(self) -> Tensor:
        return self.memo("D", lambda: self.space.backend.jacobian(self.theta))

    @property
    def ntk(self) -> Tensor:
        r""":math:`DD^\top`, ``[QN, QN]`` (from the dense :math:`D` when it is formed)."""
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

        Computed by :func:`~subriemann.linalg.r_svd` (an R-SVD for a wide or
        tall :math:`D`, as accurate as a direct SVD and faster).
        """
        return self.memo("svd", lambda: r_svd(self.jacobian))

    @property
    def ntk_eigh(self) -> tuple[Tensor, Tensor]:
        r"""``(U, sigma)``, :math:`DD^\top = U\operatorname{diag}(\sigma^2)U^\top`, descending."""

        def eigh() -> tuple[Tensor, Tensor]:
            evals, evecs = torch.linalg.eigh(self.ntk)
            return evecs.flip(1), evals.flip(0).clamp_min(0.0).sqrt()

        return self.memo("eigh", eigh)

    @property
    def param_gram(self) -> Tensor:
        r""":math:`D^\top D`, ``[K, K]``, formed once per point (the solve and the rank monitor)."""
        return self.memo("param_gram", self._param_gram)

    def _param_gram(self) -> Tensor:
        backend = self.space.backend
        if "D" not in self._cache and backend.gram_from_factors and plain_tensor(self.theta):
            return backend.param_gram(self.theta)  # from layer factors, without D
        return self.jacobian.T @ self.jacobian

    def solves_param_gram(self) -> bool:
        r"""Whether the engine solves :math:`(D^\top D + \mu 1)x = r` from layer factors here."""
        return bool(self.space.backend.gram_from_factors) and plain_tensor(self.theta)

    @property
    def param_eigh(self) -> tuple[Tensor, Tensor]:
        r"""``(V, sigma)`` with :math:`D^\top D = V\operatorname{diag}(\sigma^2)V^\top`, descending.

        The Gram matrix in parameter space, the smaller one when :math:`K < QN`.
        """

        def eigh() -> tuple[Tensor, Tensor]:
            evals, evecs = torch.linalg.eigh(self.param_gram)
            return evecs.flip(1), evals.flip(0).clamp_min(0.0).sqrt()

        return self.memo("param_eigh", eigh)

    def gram_eigh(self) -> tuple[Tensor, Tensor]:
        r"""Eigendecomposition of the smaller Gram matrix, ``(W, sigma)`` descending.

        :math:`DD^\top = W\Sigma^2W^\top` (:math:`W = U`, :attr:`ntk_eigh`) when
        :math:`QN\le K`, else :math:`D^\top D = W\Sigma^2W^\top` (:math:`W = V`,
        :attr:`param_eigh`).
        """
        return self.ntk_eigh if self.output_is_smaller else self.param_eigh

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

        def values() -> Tensor:
            gram = self.ntk if self.output_is_smaller else self.param_gram
            return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0.0).sqrt()

        return self.memo("gram_sv", values)

    def output_spectrum(self) -> tuple[Tensor, Tensor]:
        r"""Left singular vectors and singular values of :math:`D`, ``([QN, m], [m])``, descending.

        :math:`m = \min(QN, K)`.  From the thin SVD where
        :func:`~subriemann.linalg.dense_svd_fits`, else from the eigendecomposition
        of :math:`DD^\top` (:attr:`ntk_eigh`): the size policy of the analyses.
        """
        if dense_svd_fits(self.space.output_dim, self.space.dim):
            u, s, _ = self.svd
        else:
            u, s = self.ntk_eigh
        m = min(self.space.output_dim, self.space.dim)
        return u[:, :m], s[:m]

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
        if "eigh" in self._cache or not self.output_is_smaller:
            return None

        def factor() -> Tensor | None:
            a = self.ntk
            fro = float(torch.linalg.matrix_norm(a))
            tau2 = tau**2 if tau is not None else rtol**2 * fro
            if fro > 0.0 and math.isfinite(fro) and self.gram_exceeds(2.0 * tau2):
                chol, info = torch.linalg.cholesky_ex(a)
                return chol if int(info) == 0 else None
            return None

        return self.memo(("chol_cert", tau, rtol), factor)

    def gram_exceeds(self, mu: float) -> bool:
        r"""Whether :math:`\lambda_{\min}(DD^\top) > \mu` is certified (:math:`QN \le K`).

        True when the Cholesky factorization of :math:`DD^\top - (\mu + \eta)1`
        succeeds, :math:`\eta` = :func:`~subriemann.linalg.gram_rounding`
        (Sylvester's law of inertia, with the margin :math:`\eta` for the rounding
        of the Gram matrix and of the factorization).  A success for some
        :math:`\mu' \ge \mu` is reused.
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
        return self.memo(("chol", lam), lambda: _shifted_cholesky(self.ntk, lam, "D D^T"))

    def param_cholesky(self, lam: float) -> Tensor:
        r"""Cholesky factor of :math:`(1-\lambda)1 + \lambda D^\top D` (:math:`\lambda < 1`)."""
        return self.memo(
            ("param_chol", lam), lambda: _shifted_cholesky(self.param_gram, lam, "D^T D")
        )

    # -- the shifted Gram operator in the smaller space ------------------------------
    @property
    def gram_dim(self) -> int:
        r""":math:`n = \min(QN, K)`, the size of the smaller Gram matrix."""
        return min(self.space.output_dim, self.space.dim)

    def gram(self) -> Tensor:
        r"""The smaller Gram matrix: :attr:`ntk` (:math:`QN \le K`) or :attr:`param_gram`."""
        return self.ntk if self.output_is_smaller else self.param_gram

    def has_gram(self) -> bool:
        """Whether :meth:`gram` is already formed at this point."""
        return self.has("ntk" if self.output_is_smaller else "param_gram")

    def shifted_cholesky(self, lam: float) -> Tensor:
        r"""Cholesky factor of :math:`(1-\lambda)1 + \lambda G` in the smaller space.

        :meth:`cholesky` (:math:`G = DD^\top`) or :meth:`param_cholesky`
        (:math:`G = D^\top D`), cached as those.
        """
        return self.cholesky(lam) if self.output_is_smaller else self.param_cholesky(lam)

    def has_shifted_cholesky(self, lam: float) -> bool:
        """Whether :meth:`shifted_cholesky` is already computed at this point."""
        return self.has(("chol", lam) if self.output_is_smaller else ("param_chol", lam))

    def shifted_gram_vec(self, lam: float, z: Tensor) -> Tensor:
        r""":math:`((1-\lambda)1 + \lambda G)z` in the smaller space: one JVP and one VJP.

        :math:`G = DD^\top` (``z`` of shape ``[QN]``) when :math:`QN \le K`,
        else :math:`D^\top D` (``z`` of shape ``[K]``); never forms :math:`G`.
        """
        gz = self.jvp(self.vjp(z)) if self.output_is_smaller else self.vjp(self.jvp(z))
        return (1.0 - lam) * z + lam * gz


def _shifted_cholesky(gram: Tensor, lam: float, what: str) -> Tensor:
    r"""Cholesky factor of :math:`(1-\lambda)1 + \lambda G`, SPD for :math:`\lambda < 1`."""
    a = lam * gram
    a.diagonal().add_(1.0 - lam)
    factor, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0:
        raise np.linalg.LinAlgError(
            f"Cholesky of (1-lam)1 + lam*{what} failed (lam={lam}); use solver='svd'"
        )
    return factor


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
        thin SVD (batched, :func:`~subriemann.linalg.r_svd`).

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
    check_choice(need, "need", ("cost_grad", "svd"))
    fb = space.backend.fallback
    if not isinstance(fb, FuncBackend):
        raise ValueError(f"the {type(space.backend).__name__} engine cannot be vectorised")
    states = [space.point_state(t) for t in thetas]
    todo = [i for i, st in enumerate(states) if not st.has("svd" if need == "svd" else "dC")]
    per = space.output_dim * space.dim if need == "svd" else space.dim
    size = max(1, BATCH_ENTRIES // max(per, 1))
    for a in range(0, len(todo), size):
        _fill([states[i] for i in todo[a : a + size]], fb, need)
    return states


def _fill(states: list[PointState], fb: FuncBackend, need: str) -> None:
    """One vectorised pass of :func:`prefill_states` over ``states``."""
    space = states[0].space
    th = torch.stack([st.theta for st in states])
    if need == "svd":  # D^T g comes from the cached D when wanted: no backward pass here
        x, d = vmap(fb.outputs)(th), vmap(fb.jacobian)(th)
        ok = torch.isfinite(x).all(dim=-1) & torch.isfinite(d).flatten(1).all(dim=-1)
        u, sig, v = r_svd(torch.where(ok[:, None, None], d, 0.0))
    else:
        x, dc = vmap(lambda t: fb.pullback(t, space.output_grad))(th)
    finite = torch.isfinite(x).all(dim=-1)
    for j, st in enumerate(states):
        if not bool(finite[j]):
            continue  # left to the single-point route, which raises NonFiniteError
        st.store("x", x[j])
        if not st.has("g"):
            st.store("g", space.output_grad(x[j]))
        if need == "cost_grad":
            st.store("dC", dc[j])
        elif bool(ok[j]):
            st.store("D", d[j])
            st.store("svd", (u[j], sig[j], v[j]))
