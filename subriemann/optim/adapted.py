r"""Geometrically adapted gradient descent, :class:`AdaptedGD` (``docs/optim.md``).

**The step.**  On a batch with outputs :math:`x \in \mathbb{R}^{QN_B}`, Jacobian
:math:`D = \partial x/\partial\theta` and cost :math:`C` (the project's summed
convention, :mod:`subriemann.losses`), one step with learning rate
:math:`\eta` is the explicit Euler step of the flow of the metric
:math:`g_\lambda = (1-\lambda)1 + \lambda D^\top G D`:

.. math:: \delta = g_\lambda^{+} D^\top\nabla_x C
          = D^\top T\big((1-\lambda)1 + \lambda T^\top DD^\top T\big)^{-1} r,
          \qquad \theta \leftarrow \theta - \eta\,\delta,

where the output metric :math:`G = TT^\top` and :math:`\nabla_x C = Tr` come
from the loss: :math:`T = 1`, :math:`r = x - y` for MSE, and for
cross-entropy :math:`T_j = V_j\operatorname{diag}(\sqrt{e_j})` from the
eigendecomposition of the softmax Fisher block
:math:`G_j = \operatorname{diag}p_j - p_jp_j^\top = V_j\operatorname{diag}(e_j)V_j^\top`
(its :math:`Q-1` positive eigenvalues; :math:`\mathrm{span}\{1\}` is its
kernel) and :math:`r_j = \operatorname{diag}(e_j)^{-1/2}V_j^\top(p_j - y_j)`.
The identity is the push-through
:math:`(a1 + \lambda \tilde D^\top\tilde D)^{-1}\tilde D^\top =
\tilde D^\top(a1 + \lambda\tilde D\tilde D^\top)^{-1}` with
:math:`\tilde D = T^\top D`, so only a matrix of size
:math:`R = QN_B` (MSE) or :math:`(Q-1)N_B` (cross-entropy) is factorized,
never anything of size :math:`K`.  :math:`DD^\top` is the batch NTK of the
structured engine (:mod:`subriemann.engines.structured`), whose cached layer factors
also give :math:`x` and :math:`D^\top(Tw)` without another network pass.

**Solves** (:class:`~subriemann.linalg.PointState` on the :math:`R\times R`
matrix :math:`M = T^\top DD^\top T`): a Cholesky factor of
:math:`(1-\lambda)1+\lambda M` for :math:`\lambda < 1`; at :math:`\lambda = 1`
the Cholesky factor of :math:`M` when it *certifies* that every singular value
of :math:`\tilde D` exceeds the threshold :math:`\tau`
(:meth:`~subriemann.linalg.PointState.certified_cholesky`), otherwise the
thresholded eigendecomposition (:math:`\sigma_i \le \tau` dropped: the
pseudoinverse).  :math:`\tau` (absolute ``rank_atol``, or ``rank_rtol``
relative to :math:`\sigma_{\max}`) and the route are recorded in
:attr:`AdaptedGD.last_step`.

**What λ = 1 means.**  For MSE with :math:`\eta = 1` the linearized outputs
jump to the targets (the Gauss–Newton step; on the range of :math:`D`).  For
cross-entropy the output step :math:`\Delta x_j = -G_j^{+}(p_j - y_j)` is
Newton's step on the logits of each sample (the natural-gradient / generalized
Gauss–Newton step): for a one-hot target :math:`e_c` it raises the logit of
class :math:`c` by :math:`1/p_{jc}` relative to the others.  That is large
for a confidently misclassified sample, which is why cross-entropy training
usually wants :math:`\lambda < 1` or :math:`\eta < 1` (``docs/optim.md``).
For :math:`\sigma_i^2 \gg (1-\lambda)/\lambda` the output moves by
:math:`\eta/\lambda` times the Gauss–Newton step, so :math:`\eta \approx \lambda`
is the matching learning rate for :math:`\lambda < 1`.

**The sampled Fisher** (``fisher="sampled"``, cross-entropy): :math:`G_j` is replaced
by :math:`\hat g_j\hat g_j^\top`, :math:`\hat g_j = e_{\hat y_j} - p_j` with
:math:`\hat y_j \sim \mathrm{Categorical}(p_j)` drawn at each step
(:math:`\mathbb{E}\,\hat g_j\hat g_j^\top = G_j`), so the solve has size
:math:`N_B` whatever :math:`Q`; the gradient is then not in the range of
:math:`\hat T` and the step is assembled by Woodbury (:func:`_sampled_solve`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import scipy.linalg
import torch
from torch import Tensor, nn
from torch.func import functional_call

from subriemann._warnings import warn_once
from subriemann.engines import ParameterLayout, StructuredBackend, make_backend
from subriemann.linalg import PointState, rank_threshold
from subriemann.linalg.scipy_adapter import to_numpy, to_torch
from subriemann.losses import CrossEntropyLoss, Loss, MSELoss, get_loss
from subriemann.metrics.interpolated import check_lam
from subriemann.space import NonFiniteError, output_matrix
from subriemann.triangular import cholesky_solve
from subriemann.validation import check_choice, check_int, check_optional, check_real

__all__ = ["AdaptedGD", "StepInfo"]

_STOCHASTIC = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class StepInfo:
    """What one :meth:`AdaptedGD.step` did.

    Attributes
    ----------
    cost : float
        The batch cost :math:`C` before the step (summed over the batch).
    batch_size : int
    groups : list of dict
        Per parameter group: ``lam``, ``lr``, ``route`` (``"gradient"``,
        ``"cholesky"``, ``"certified_cholesky"``, ``"eigh"`` or ``"metric"``),
        ``size`` (:math:`R`, the dimension of the solve), ``rank`` (directions
        kept), ``tau`` (the absolute threshold on the singular values of
        :math:`\\tilde D`, NaN where no threshold applies), ``engine``
        (``"structured"`` or ``"func"``) and, with ``record_spectrum=True``,
        ``mu``: the smallest eigenvalue of the metric-weighted batch NTK
        :math:`\\tilde D g_\\lambda^{+}\\tilde D^\\top` (0 when some direction is
        dropped), the rate of :func:`subriemann.analysis.linear_convergence_certificate`.
    """

    cost: float
    batch_size: int
    groups: list[dict[str, Any]] = field(default_factory=list)


def _check_lr(lr: Any) -> float:
    return check_real(lr, "lr", low=0.0)


def _check_rtol(rank_rtol: Any, rank_atol: Any) -> None:
    check_optional(check_real, rank_rtol, "rank_rtol", low=0.0, high=1.0, high_open=True)
    check_optional(check_real, rank_atol, "rank_atol", low=0.0)


class _GramView:
    """A stand-in for the space of :class:`~subriemann.linalg.PointState`: the matrix :math:`M`.

    :class:`PointState` factorizes ``space.backend.ntk(theta)``; here that is
    the whitened batch Gram matrix :math:`M = T^\\top DD^\\top T` of size
    :math:`R`, so the certified Cholesky and the thresholded eigendecomposition
    of :mod:`subriemann.linalg` serve the optimizer unchanged.
    """

    def __init__(self, gram: Tensor, num_params: int) -> None:
        self.output_dim = int(gram.shape[0])
        self.dim = int(num_params)
        self.backend = self
        self._gram = gram

    def ntk(self, theta: Tensor) -> Tensor:
        return self._gram

    @staticmethod
    def check_point(theta: Tensor) -> Tensor:
        return theta


def _shifted_solve(gram: Tensor, rhs: Tensor, lam: float) -> Tensor:
    r""":math:`w = ((1-\lambda)1 + \lambda M)^{-1}r`, :math:`\lambda < 1`, in the dtype of ``gram``.

    One Cholesky factorization in the precision :math:`M` was formed in, then one
    step of iterative refinement in the same precision.  :math:`M` carries the
    rounding of its dtype, a relative perturbation of order :math:`\epsilon`,
    which bounds the accuracy of :math:`w` by :math:`\kappa\epsilon` whatever
    precision factorizes it; one refinement step brings Cholesky's backward error
    (up to :math:`c\,n\,\epsilon` in the worst case) down to :math:`O(\epsilon)`
    (Skeel, Math. Comp. 35, 1980), so a float32 factorization of a float32
    :math:`M` loses nothing against a float64 one, at half the cost.  If the
    factorization fails (:math:`\kappa \gtrsim 1/\epsilon`), it is redone in float64.
    """
    a = gram * lam
    a.diagonal().add_(1.0 - lam)
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0 and a.dtype != torch.float64:
        a, rhs = a.double(), rhs.double()
        chol, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0:
        raise torch.linalg.LinAlgError(
            f"AdaptedGD: the Cholesky factorization of (1-lam)1 + lam M failed (lam={lam})"
        )
    r = rhs.to(a.dtype)
    w = cholesky_solve(chol, r)
    return (w + cholesky_solve(chol, r - a @ w)).to(gram.dtype)


def _solve(
    gram: Tensor,
    rhs: Tensor,
    lam: float,
    num_params: int,
    rank_rtol: float,
    rank_atol: float | None,
) -> tuple[Tensor, dict[str, Any]]:
    r""":math:`w = ((1-\lambda)1 + \lambda M)^{+}r` (thresholded at :math:`\lambda = 1`).

    :math:`\lambda < 1`: :func:`_shifted_solve`.  :math:`\lambda = 1`: the certified
    Cholesky factor in the dtype :math:`M` was formed in (a factorization that fails
    only withholds the certificate), else the thresholded eigendecomposition in
    float64, with :math:`\tau` from :func:`~subriemann.linalg.rank_threshold`; the
    threshold stays that of the dtype :math:`M` was formed in.
    """
    size = int(gram.shape[0])
    if lam < 1.0:
        w = _shifted_solve(gram, rhs, lam)
        return w, {"route": "cholesky", "size": size, "rank": size, "tau": float("nan")}
    eps = torch.finfo(gram.dtype).eps
    st = PointState(_GramView(gram, num_params), rhs)  # type: ignore[arg-type]
    cert = st.certified_cholesky(rank_atol, rank_rtol)
    if cert is not None:  # it certifies sigma_min > tau for sigma_max <= |M|_F^(1/2)
        fro = float(torch.linalg.matrix_norm(gram))
        tau = rank_threshold(math.sqrt(fro), rank_rtol, rank_atol)
        w = cholesky_solve(cert, rhs)
        return w, {"route": "certified_cholesky", "size": size, "rank": size, "tau": tau}
    u, s = _eigh64(gram)
    smax = float(s[0]) if s.numel() else 0.0
    tau = rank_threshold(smax, rank_rtol, rank_atol)
    if smax > 0 and tau < math.sqrt(eps) * smax:  # eps: of the dtype M was formed in
        warn_once(
            f"AdaptedGD: the rank threshold tau = {tau:.3g} is below what an eigendecomposition "
            f"of the batch Gram matrix resolves (about sqrt(eps) * sigma_max = "
            f"{math.sqrt(eps) * smax:.3g}); raise rank_rtol"
        )
    keep = s > tau
    coef = torch.where(keep, (u.T @ rhs.double()) / torch.where(keep, s**2, 1.0), 0.0)
    info = {"route": "eigh", "size": size, "rank": int(keep.sum()), "tau": tau}
    return (u @ coef).to(gram.dtype), info


def _eigh64(gram: Tensor) -> tuple[Tensor, Tensor]:
    r"""``(U, sigma)``, :math:`M = U\operatorname{diag}(\sigma^2)U^\top`, descending, in float64.

    In float64 because LAPACK's float32 eigh can fail to converge and MKL's ``ssyevd``
    has returned NaN without an error on a rank-deficient batch Gram matrix.  MKL's
    ``dsyevd`` has failed to converge on such matrices as well (one thread), where
    SciPy's MRRR driver (``syevr``) succeeds: it is the fallback.
    """
    m = gram.double()
    try:
        evals, evecs = torch.linalg.eigh(m)
        ok = bool(torch.isfinite(evals).all() and torch.isfinite(evecs).all())
    except torch.linalg.LinAlgError:
        ok = False
    if not ok:
        vals, vecs = scipy.linalg.eigh(to_numpy(m), driver="evr")
        evals = to_torch(vals, m.dtype, m.device)
        evecs = to_torch(vecs, m.dtype, m.device).reshape(vecs.shape)
    return evecs.flip(1), evals.flip(0).clamp_min(0.0).sqrt()


def _output_factor(loss: Loss, out: Tensor, targets: Tensor) -> tuple[Tensor | None, Tensor]:
    r"""``(T, r)`` with :math:`G = TT^\top` and :math:`\nabla_x C = Tr`, per sample.

    MSE: ``T = None`` (the identity) and :math:`r = x - y`, shape ``[N*Q]``.
    Cross-entropy: ``T`` of shape ``[N, Q, Q-1]`` from the eigendecomposition
    of each softmax Fisher block (the kernel direction :math:`1` dropped;
    eigenvalues at or below :math:`Q\epsilon`, their absolute round-off since the
    entries of :math:`G_j` lie in :math:`[-1/4, 1]`, give a zero column: a
    saturated softmax has numerically flat directions), and :math:`r` of shape
    ``[N*(Q-1)]``.
    """
    g = loss.grad(out, targets)
    if isinstance(loss, MSELoss):
        return None, g.reshape(-1)
    from subriemann.metrics.fisher import softmax_fisher_blocks

    q = out.shape[1]
    # in float64: LAPACK's float32 eigh can fail on blocks with denormal entries
    blocks = softmax_fisher_blocks(out.double(), q)
    evals, evecs = torch.linalg.eigh(blocks)  # ascending
    evals, evecs = evals[:, 1:], evecs[:, :, 1:]  # drop the kernel span{1}
    # G's entries lie in [-1/4, 1]: its eigenvalues carry an absolute round-off of about
    # Q eps (eps of the logits' dtype); below that a direction is numerically flat
    tol = q * torch.finfo(out.dtype).eps
    keep = evals > tol
    root = torch.where(keep, evals.clamp_min(0.0).sqrt(), 0.0)
    inv_root = torch.where(keep, 1.0 / torch.where(keep, root, 1.0), 0.0)
    t = evecs * root[:, None, :]
    r = inv_root * torch.einsum("nqa,nq->na", evecs, g.double())
    return t.to(out.dtype), r.reshape(-1).to(out.dtype)


def _sampled_factor(out: Tensor, generator: torch.Generator) -> Tensor:
    r"""The sampled Fisher factor ``[N, Q, 1]``: :math:`\hat g_j = e_{\hat y_j} - p_j` per sample.

    One class :math:`\hat y_j \sim \mathrm{Categorical}(p_j)` per sample, drawn with
    ``generator`` from :math:`p_j = \operatorname{softmax}(x_j)` (in float64), so that
    :math:`\mathbb{E}[\hat g_j\hat g_j^\top] = \operatorname{diag}p_j - p_jp_j^\top = G_j`:
    :math:`\hat G = \hat T\hat T^\top` is an unbiased rank-one estimate of each Fisher block.
    """
    p = torch.softmax(out.double(), dim=-1)
    drawn = torch.multinomial(p, 1, generator=generator).squeeze(1)
    g = torch.nn.functional.one_hot(drawn, p.shape[1]).to(p.dtype) - p
    return g.to(out.dtype).unsqueeze(2)


def _sampled_solve(
    engine: Any,
    theta: Tensor,
    gram: Tensor,
    t: Tensor,
    grad: Tensor,
    lam: float,
    tol: tuple[float, float | None],
) -> tuple[Tensor, dict[str, Any]]:
    r""":math:`\delta = \hat g_\lambda^{+}D^\top c` for the sampled metric, :math:`c = \nabla_x C`.

    With :math:`A = \hat T^\top D` (``[N, K]``), :math:`M = AA^\top` (``gram``),
    :math:`v = D^\top c` and :math:`b = Av = \hat T^\top D v` (one VJP, one JVP),
    :math:`\hat g_\lambda = a1 + \lambda A^\top A`, :math:`a = 1-\lambda`:

    * :math:`\lambda < 1` (Woodbury):
      :math:`\delta = \big(v - \lambda A^\top(a1 + \lambda M)^{-1}b\big)/a`, a Cholesky
      solve of size :math:`N` (:func:`_shifted_solve`); the difference loses at most
      :math:`\epsilon|v|/a` to cancellation;
    * :math:`\lambda = 1`: :math:`\hat g^{+} = A^{+}A^{+\top}`, so
      :math:`\delta = A^\top M^{+2}b` from the thresholded eigendecomposition of
      :math:`M` (:math:`\sigma_i \le \tau` dropped; :func:`_eigh64`): the gradient's
      component outside the :math:`N` sampled directions is discarded.

    The gradient :math:`c = p - y` is *not* in the range of :math:`\hat T` (unlike the exact
    route, where :math:`c = Tr`), hence the extra products.  ``tol = (rank_rtol, rank_atol)``.
    """
    n, q = t.shape[0], t.shape[1]
    v = engine.vjp(theta, grad)
    b = torch.einsum("nq,nq->n", t[:, :, 0], engine.jvp(theta, v).reshape(n, q))
    size = int(gram.shape[0])
    if lam < 1.0:
        w = _shifted_solve(gram, b, lam)
        back = engine.vjp(theta, (t[:, :, 0] * w[:, None]).reshape(-1))
        info = {"route": "cholesky", "size": size, "rank": size, "tau": float("nan")}
        return (v - lam * back) / (1.0 - lam), info
    u, s = _eigh64(gram)
    tau = rank_threshold(float(s[0]) if s.numel() else 0.0, *tol)
    keep = s > tau
    coef = torch.where(keep, (u.T @ b.double()) / torch.where(keep, s**4, 1.0), 0.0)
    w = (u @ coef).to(gram.dtype)
    info = {"route": "eigh", "size": size, "rank": int(keep.sum()), "tau": tau}
    return engine.vjp(theta, (t[:, :, 0] * w[:, None]).reshape(-1)), info


def _whiten(ntk: Tensor, t: Tensor | None, n: int, q: int) -> Tensor:
    r""":math:`M = T^\top (DD^\top) T`, block by block (:math:`T` block diagonal)."""
    if t is None:
        return ntk
    k4 = ntk.reshape(n, q, n, q)
    right = torch.einsum("jqkr,krb->jqkb", k4, t)  # two contractions of N^2 Q^2 each
    m = torch.einsum("jqa,jqkb->jakb", t, right)
    r = t.shape[2]
    m = m.reshape(n * r, n * r)
    return 0.5 * (m + m.T)


class AdaptedGD(torch.optim.Optimizer):
    r"""Geometrically adapted gradient descent: a ``torch.optim.Optimizer`` that knows its model.

    One call ``cost = opt.step(inputs, targets)`` evaluates the model on the
    batch, forms the batch NTK with the structured engine, solves in the
    batch's output space and moves every trainable parameter by
    :math:`-\eta\,\delta` (module docstring, ``docs/optim.md``).

    Parameters
    ----------
    model : nn.Module
        Maps inputs ``[n, ...]`` to outputs ``[n, Q]`` (or ``[n]``). Its
        parameters' dtype (float32 or float64) and device are used as they are.
    lam : float
        :math:`\lambda \in [0, 1]`: 0 is SGD on the summed cost, 1 the
        adapted (Gauss–Newton / natural-gradient) step.
    lr : float
        :math:`\eta \ge 0`.
    loss : {"mse", "cross_entropy"} or Loss
        ``"mse"``: :math:`C = \frac12|x - y|^2`; ``"cross_entropy"``: summed
        cross-entropy on logits, with the softmax Fisher output metric.
    params : iterable, optional
        Parameters or param-group dicts (keys ``params``, ``lr``, ``lam``,
        ``rank_rtol``, ``rank_atol``), as for any torch optimizer; every
        parameter must belong to ``model``.  Default: ``model.parameters()``.
        **With several groups the metric is block diagonal**, one block
        :math:`g_{\lambda_i} = (1-\lambda_i)1 + \lambda_i D_i^\top G D_i` per
        group :math:`i` (:math:`D_i` the columns of :math:`D` of that group):
        each group gets its own step
        :math:`\delta_i = D_i^\top T((1-\lambda_i)1+\lambda_i T^\top D_iD_i^\top T)^{-1}r`
        from its own batch NTK :math:`D_iD_i^\top`, all at the same
        :math:`\theta`.  One group (the default) is the full metric.
    rank_rtol : float, optional
        At :math:`\lambda = 1`, singular values :math:`\sigma_i \le
        \mathrm{rank\_rtol}\,\sigma_{\max}` of :math:`\tilde D = T^\top D` are
        dropped (the pseudoinverse).  Default: :math:`10\sqrt{\epsilon}` of
        the model's dtype (what an eigendecomposition of :math:`M` resolves:
        1.5e-7 in float64, 3.5e-3 in float32).
    rank_atol : float, optional
        Absolute threshold :math:`\tau`; overrides ``rank_rtol``.
    metric : type, optional
        For research: any :class:`~subriemann.metrics.ParameterMetric` class.
        Each step then builds a :class:`~subriemann.ParameterSpace` on the
        batch, equips it with ``metric(space, **metric_kwargs)`` and steps
        along ``-lr * space.metric.gradient(theta)`` (one param group; the
        space's parameters are the group's; much slower than the built-in route).
    metric_kwargs : dict, optional
    backend : {"auto", "structured", "func"}
        Jacobian engine (:func:`subriemann.engines.func.make_backend`).
    record_spectrum : bool
        Record ``mu`` in :attr:`last_step` (one extra eigendecomposition of
        the :math:`R\times R` matrix per step; ``fisher="exact"`` only).
    fisher : {"exact", "sampled"}
        Cross-entropy only.  ``"exact"``: the softmax Fisher blocks :math:`G_j`, a
        solve of size :math:`(Q-1)N_B`.  ``"sampled"``: the Monte-Carlo Fisher
        :math:`\hat G_j = \hat g_j\hat g_j^\top`, :math:`\hat g_j = e_{\hat y_j} - p_j`
        with :math:`\hat y_j \sim \mathrm{Categorical}(p_j)` drawn anew at every
        step; :math:`\mathbb{E}\hat G_j = G_j` (an unbiased metric, not an unbiased
        step), a solve of size :math:`N_B` whatever :math:`Q` (at :math:`Q = 10`,
        batch 256: a quarter of the exact step's time, twice an MSE step's, since the
        engine's backward pass still runs over all :math:`Q` outputs;
        ``docs/optim.md``).  Use :math:`\lambda < 1`:
        at :math:`\lambda = 1` the step keeps only the gradient's component in the
        :math:`N_B` sampled directions.
    seed : int, optional
        Seed of the optimizer's own generator for ``fisher="sampled"`` (on the
        model's device); default: drawn from torch's global generator.  Its state
        is part of :meth:`state_dict`, so a round trip resumes bit-exactly.

    Attributes
    ----------
    model : nn.Module
    loss : Loss
    last_step : StepInfo or None

    Notes
    -----
    * Parameters with ``requires_grad=False`` (frozen) are held fixed, as are
      parameters of ``model`` in no group; ``p.grad`` is neither used nor set
      (the direction comes from the batch).
    * Dropout and BatchNorm in train mode are evaluated in eval mode during the
      step (their randomness / batch statistics would make :math:`D`
      ill-defined); a warning says so once.  BatchNorm running statistics are
      therefore not updated by ``step``.
    * The optimizer holds no state besides a step counter per parameter, so a
      ``state_dict`` round trip resumes bit-exactly; LR schedulers act on
      ``param_groups[i]["lr"]`` as usual.

    Examples
    --------
    >>> import torch
    >>> from subriemann.optim import AdaptedGD
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
    >>> opt = AdaptedGD(net, lam=1.0, lr=1.0, loss="mse")
    >>> costs = [opt.step(x, y) for _ in range(5)]  # returns C before each step
    >>> costs[-1] < 1e-6 * costs[0]  # Gauss-Newton: quadratic convergence near the end
    True
    >>> opt.last_step.groups[0]["route"]  # D has full row rank 8: a certified Cholesky
    'certified_cholesky'
    """

    def __init__(
        self,
        model: nn.Module,
        lam: float = 1.0,
        lr: float = 1.0,
        loss: str | Loss = "mse",
        *,
        params: Any = None,
        rank_rtol: float | None = None,
        rank_atol: float | None = None,
        metric: type | None = None,
        metric_kwargs: dict[str, Any] | None = None,
        backend: str = "auto",
        record_spectrum: bool = False,
        fisher: str = "exact",
        seed: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.loss = get_loss(loss)
        if not isinstance(self.loss, (MSELoss, CrossEntropyLoss)):
            raise ValueError(
                f"AdaptedGD supports loss='mse' or 'cross_entropy', got {self.loss!r} "
                "(the output metric G of another loss is not defined here)"
            )
        check_choice(backend, "backend", ("auto", "structured", "func"))
        _check_rtol(rank_rtol, rank_atol)
        self.model = model
        self.backend = backend
        self.metric = metric
        self.metric_kwargs = dict(metric_kwargs or {})
        self.record_spectrum = bool(record_spectrum)
        self.fisher = check_choice(fisher, "fisher", ("exact", "sampled"))
        self._generator = self._fisher_generator(check_optional(check_int, seed, "seed", low=0))
        self._draw: Tensor | None = None  # the sampled factor of the current step
        self.last_step: StepInfo | None = None
        self._names = {id(p): n for n, p in model.named_parameters()}
        self._engines: dict[tuple, Any] = {}  # per group and batch shape (see _engine)
        defaults = dict(
            lr=_check_lr(lr), lam=check_lam(lam), rank_rtol=rank_rtol, rank_atol=rank_atol
        )
        super().__init__(model.parameters() if params is None else params, defaults)
        if metric is not None and len(self.param_groups) != 1:
            raise ValueError("metric= supports one param group (the metric couples all of them)")

    def _fisher_generator(self, seed: int | None) -> torch.Generator | None:
        """The generator of the sampled Fisher (``None`` for ``fisher="exact"``), checked."""
        if self.fisher == "exact":
            if seed is not None:
                raise ValueError("seed applies to fisher='sampled' only")
            return None
        if not isinstance(self.loss, CrossEntropyLoss):
            raise ValueError("fisher='sampled' applies to loss='cross_entropy' (G = 1 for MSE)")
        if self.metric is not None or self.record_spectrum:
            raise ValueError("fisher='sampled' does not combine with metric= or record_spectrum")
        gen = torch.Generator(device=self._reference().device)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        return gen.manual_seed(seed)

    def state_dict(self) -> dict[str, Any]:
        """Torch's optimizer state dict, plus ``"fisher_generator"`` (``fisher="sampled"``)."""
        state = super().state_dict()
        if self._generator is not None:
            state["fisher_generator"] = self._generator.get_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load :meth:`state_dict`: the parameter state and the sampled Fisher's generator."""
        state = dict(state_dict)
        gen_state = state.pop("fisher_generator", None)
        if (gen_state is None) != (self._generator is None):
            raise ValueError(
                "the state dict and this optimizer disagree on fisher='sampled' "
                f"(this optimizer: fisher={self.fisher!r})"
            )
        super().load_state_dict(state)
        if self._generator is not None:
            self._generator.set_state(gen_state)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (checked: parameters of ``model``, ``lam`` in [0, 1], ``lr`` >= 0)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["lam"] = check_lam(group["lam"])
        group["lr"] = _check_lr(group["lr"])
        _check_rtol(group["rank_rtol"], group["rank_atol"])
        foreign = [p for p in group["params"] if id(p) not in self._names]
        if foreign:
            raise ValueError(
                f"{len(foreign)} parameter(s) of this group do not belong to the model "
                "AdaptedGD was built with"
            )

    # -- batches ----------------------------------------------------------------------
    def _apply(self, params: dict[str, Tensor], inputs: Tensor) -> Tensor:
        return output_matrix(functional_call(self.model, params, (inputs,)), inputs.shape[0])

    def _reference(self) -> Tensor:
        for p in self.model.parameters():
            return p
        raise ValueError("model has no parameters")

    def _prepare(self, inputs: Any, targets: Any) -> tuple[Tensor, Tensor]:
        """Check a batch and bring it to the model's dtype and device; one-hot class indices."""
        for what, t in (("inputs", inputs), ("targets", targets)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
        if inputs.ndim == 0 or inputs.shape[0] == 0:
            raise ValueError(
                f"inputs must have shape (n, ...) with n >= 1, got {tuple(inputs.shape)}"
            )
        if targets.ndim == 0 or targets.shape[0] != inputs.shape[0]:
            raise ValueError(
                f"inputs and targets disagree on the batch size: {tuple(inputs.shape)} vs "
                f"{tuple(targets.shape)}"
            )
        ref = self._reference()
        x = (
            inputs.to(device=ref.device, dtype=ref.dtype)
            if inputs.is_floating_point()
            else (inputs.to(device=ref.device))
        )
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise ValueError("the batch inputs contain NaN or inf")
        with torch.no_grad(), self._geometry_mode([]):  # eval-mode BatchNorm: no stat update
            q = self._apply({}, x[:1]).shape[1]
        y = self._targets(targets.to(device=ref.device), q, ref.dtype)
        self.loss.check_targets(y)
        return x, self.loss.prepare_targets(y)

    def _targets(self, y: Tensor, q: int, dtype: torch.dtype) -> Tensor:
        """Targets ``[n, Q]`` in ``dtype``: class indices one-hot (cross-entropy), checked."""
        if isinstance(self.loss, CrossEntropyLoss) and not y.is_floating_point():
            if y.ndim != 1:
                raise ValueError(f"class-index targets must have shape (n,), got {tuple(y.shape)}")
            if bool(((y < 0) | (y >= q)).any()):
                raise ValueError(
                    f"class indices must lie in [0, {q}), got {int(y.min())}..{int(y.max())}"
                )
            y = torch.nn.functional.one_hot(y.long(), q)
        y = y.to(dtype)
        if y.ndim == 1:
            y = y.unsqueeze(1)
        if not torch.isfinite(y).all():
            raise ValueError("the batch targets contain NaN or inf")
        if y.ndim != 2 or y.shape[1] != q:
            raise ValueError(
                f"model has {q} outputs per sample but targets have shape {tuple(y.shape)}"
            )
        return y

    @contextmanager
    def _geometry_mode(self, params: Sequence[Tensor]) -> Iterator[None]:
        """Only ``params`` trainable, stochastic layers in eval mode (restored afterwards)."""
        keep = {id(p) for p in params}
        frozen = [p for p in self.model.parameters() if p.requires_grad and id(p) not in keep]
        switched = [
            m
            for m in self.model.modules()
            if m.training and isinstance(m, _STOCHASTIC + _BATCHNORM)
        ]
        if switched:
            warn_once(
                "AdaptedGD evaluates Dropout/BatchNorm layers in eval mode during a step "
                "(the Jacobian of a random or batch-coupled network is not defined); "
                "BatchNorm running statistics are not updated by step()"
            )
        for p in frozen:
            p.requires_grad_(False)
        for m in switched:
            m.train(False)
        try:
            yield
        finally:
            for p in frozen:
                p.requires_grad_(True)
            for m in switched:
                m.train(True)

    # -- directions -------------------------------------------------------------------
    def _gradient(self, params: list[Tensor], x: Tensor, y: Tensor) -> tuple[list[Tensor], Tensor]:
        with torch.enable_grad():
            out = self._apply({}, x)
            if not torch.isfinite(out).all():
                raise NonFiniteError("model outputs contain NaN or inf on this batch")
            cost = self.loss.value(out, y)
            grads = torch.autograd.grad(cost, params, allow_unused=True)
        dirs = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        return dirs, cost.detach()

    def _adapted(
        self, group: dict[str, Any], params: list[Tensor], x: Tensor, y: Tensor
    ) -> tuple[list[Tensor], Tensor, dict[str, Any]]:
        names = [self._names[id(p)] for p in params]
        layout = ParameterLayout(names, [p.shape for p in params])
        theta = torch.cat([p.detach().reshape(-1) for p in params])
        n, q = y.shape
        engine = self._engine(names, layout, x, q)
        out, gram, t, r = self._batch_gram(engine, theta, y)
        cost = self.loss.value(out, y)
        lam = group["lam"]
        rtol = group["rank_rtol"]
        if rtol is None:
            rtol = 10.0 * math.sqrt(torch.finfo(theta.dtype).eps)
        if self.fisher == "sampled":
            assert t is not None
            delta, info = _sampled_solve(engine, theta, gram, t, r, lam, (rtol, group["rank_atol"]))
        else:
            w, info = _solve(gram, r, lam, theta.numel(), rtol, group["rank_atol"])
            u = w if t is None else torch.einsum("nqa,na->nq", t, w.reshape(n, -1)).reshape(-1)
            delta = engine.vjp(theta, u)
        info["engine"] = engine.name
        if self.record_spectrum:
            info["mu"] = _rate(gram, lam, info)
        dirs = [d.view_as(p) for d, p in zip(layout.unflatten(delta).values(), params)]
        return dirs, cost.detach(), info

    def _engine(self, names: list[str], layout: ParameterLayout, x: Tensor, q: int) -> Any:
        """The Jacobian engine of a group on this batch: the structured engine of the last step
        with the same parameters and batch shape, pointed at the new batch (its compilation
        and checks cost about an Adam step), or a new one (:func:`make_backend`)."""
        key = (tuple(names), tuple(x.shape), x.dtype, x.device, q, self.backend)
        engine = self._engines.get(key)
        if isinstance(engine, StructuredBackend):
            engine.set_inputs(x)
            return engine
        engine = make_backend(self.backend, self.model, self._apply, layout, x, q)
        if isinstance(engine, StructuredBackend):
            if len(self._engines) >= 4:  # a few batch shapes (e.g. the last, partial batch)
                self._engines.pop(next(iter(self._engines)))
            self._engines[key] = engine
        return engine

    def _batch_gram(
        self, engine: Any, theta: Tensor, y: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        r"""``(x, M, T, r)``: outputs ``[n, Q]``, :math:`M = T^\top DD^\top T`, ``T`` and ``r``.

        ``fisher="sampled"``: ``T`` is the sampled factor ``[n, Q, 1]`` (drawn once per
        step, shared by the param groups) and ``r`` the full output gradient ``[nQ]``.

        With the structured engine the layer factors are computed first (one
        forward and one vectorised reverse pass); :math:`x`, then :math:`T`, come
        from them, and :math:`M` is assembled from the factors mixed by
        :math:`T_j` (size :math:`R`, never :math:`QN_B`).  Otherwise the NTK is
        whitened afterwards (:func:`_whiten`).
        """
        n, q = y.shape
        mixed = isinstance(engine, StructuredBackend)
        if mixed:
            engine.factors(theta)
        else:
            ntk = engine.ntk(theta)
        out = engine.outputs(theta).reshape(n, q)
        if not torch.isfinite(out).all():
            raise NonFiniteError("model outputs contain NaN or inf on this batch")
        t: Tensor | None
        if self.fisher == "sampled":
            if self._draw is None:
                assert self._generator is not None
                self._draw = _sampled_factor(out, self._generator)
            t, r = self._draw, self.loss.grad(out, y).reshape(-1)
        else:
            t, r = _output_factor(self.loss, out, y)
        if mixed:
            gram = engine.ntk(theta, output_basis=t)
        else:
            gram = _whiten(ntk, t, n, q)
        # a NaN or inf entry of D makes the diagonal entry of its row non-finite
        if not torch.isfinite(gram.diagonal()).all():
            raise NonFiniteError("model outputs or their Jacobian contain NaN or inf on this batch")
        return out, gram, t, r

    def _research(self, params: list[Tensor], x: Tensor, y: Tensor) -> tuple[list[Tensor], Tensor]:
        from subriemann.space import ParameterSpace

        # inside _geometry_mode(params): exactly the group's parameters require grad, so the
        # space's layout is theirs and the others are held fixed
        ref = self._reference()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the eval-mode copy (said once above)
            space = ParameterSpace(
                self.model,
                x,
                y,
                loss=self.loss,
                dtype=ref.dtype,
                device=ref.device,
                backend=self.backend,
            )
        space = space.equip_with_metric(self.metric, **self.metric_kwargs)
        theta = space.initial_point()
        cost = space.cost(theta)
        delta = space.metric.gradient(theta)
        named = space.unflatten(delta)
        return [named[self._names[id(p)]] for p in params], cost.detach()

    # -- the step ---------------------------------------------------------------------
    def step(  # type: ignore[override]
        self,
        inputs: Tensor | Callable[[], Any] | None = None,
        targets: Tensor | None = None,
        *,
        closure: Callable[[], Any] | None = None,
    ) -> float:
        r"""One adapted step on a batch; returns the batch cost :math:`C` *before* the step.

        Call as ``opt.step(inputs, targets)`` or, in the style of
        ``torch.optim.LBFGS``, ``opt.step(closure)`` where ``closure()``
        returns the batch ``(inputs, targets)``.

        Parameters
        ----------
        inputs : Tensor, shape=[n, ...], or callable
        targets : Tensor, shape=[n, Q] or [n]
            MSE: real targets.  Cross-entropy: probability rows ``[n, Q]`` or
            integer class indices ``[n]``.
        closure : callable, optional

        Returns
        -------
        cost : float
            :math:`C` on the batch (summed over its samples) at the parameters
            before the step.

        Raises
        ------
        TypeError
            No batch, both a batch and a closure, or a closure that does not
            return a pair of tensors.
        ValueError
            Non-finite or inconsistent batch, invalid targets.
        NonFiniteError
            The model's outputs on the batch are not finite.
        """
        if callable(inputs) and not isinstance(inputs, Tensor):
            if closure is not None or targets is not None:
                raise TypeError("pass either a batch (inputs, targets) or a closure, not both")
            closure, inputs = inputs, None
        if closure is not None:
            if inputs is not None or targets is not None:
                raise TypeError("pass either a batch (inputs, targets) or a closure, not both")
            batch = closure()
            if not (
                isinstance(batch, (tuple, list))
                and len(batch) == 2
                and all(isinstance(b, Tensor) for b in batch)
            ):
                got = type(batch).__name__
                raise TypeError(
                    "the closure of AdaptedGD must return the batch (inputs, targets) as a pair "
                    f"of tensors, got {got}: the step evaluates the model itself, so a loss "
                    "closure in the style of LBFGS does not apply"
                )
            inputs, targets = batch
        if inputs is None or targets is None:
            raise TypeError("step() needs a batch: opt.step(inputs, targets) or opt.step(closure)")
        x, y = self._prepare(inputs, targets)
        return self._step(x, y)

    def _direction(
        self, group: dict[str, Any], params: list[Tensor], x: Tensor, y: Tensor
    ) -> tuple[list[Tensor], Tensor, dict[str, Any]]:
        """The direction of one group's parameters, the batch cost, and what the step did."""
        info: dict[str, Any] = {"lam": group["lam"], "lr": group["lr"]}
        with self._geometry_mode(params):
            if self.metric is not None:
                dirs, c = self._research(params, x, y)
                info["route"] = "metric"
            elif group["lam"] == 0.0:
                dirs, c = self._gradient(params, x, y)
                info.update(route="gradient", rank=float("nan"), tau=float("nan"))
            else:
                dirs, c, extra = self._adapted(group, params, x, y)
                info.update(extra)
        return dirs, c, info

    def _step(self, x: Tensor, y: Tensor) -> float:
        self._draw = None  # a new sample of the Fisher (fisher="sampled") at every step
        plans = []
        cost: Tensor | None = None
        groups_info: list[dict[str, Any]] = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.requires_grad]
            if not params:
                groups_info.append({"lam": group["lam"], "lr": group["lr"], "route": "none"})
                continue
            dirs, c, info = self._direction(group, params, x, y)
            groups_info.append(info)
            cost = c if cost is None else cost
            plans.append((group, params, dirs))
        if cost is None:  # nothing trainable: evaluate the cost only
            with torch.no_grad():
                cost = self.loss.value(self._apply({}, x), y)
        if not torch.isfinite(cost):
            raise NonFiniteError("the batch cost is NaN or inf")
        for _, _, dirs in plans:  # nothing is changed unless every direction is finite
            if not all(bool(torch.isfinite(d).all()) for d in dirs):
                raise NonFiniteError("the adapted direction contains NaN or inf")
        with torch.no_grad():  # all directions at the same theta, then the update
            for group, params, dirs in plans:
                for p, d in zip(params, dirs):
                    p.add_(d.to(p.dtype), alpha=-group["lr"])
                    st = self.state[p]
                    st["step"] = st.get("step", 0) + 1
        value = float(cost)
        self.last_step = StepInfo(value, int(x.shape[0]), groups_info)
        return value


def _rate(gram: Tensor, lam: float, info: dict[str, Any]) -> float:
    r"""Smallest eigenvalue of :math:`M((1-\lambda)1 + \lambda M)^{+}` (0 if a direction is cut)."""
    if lam == 1.0:  # K_1 is the projector onto the kept directions
        return 0.0 if info["rank"] < info["size"] else 1.0
    evals = torch.linalg.eigvalsh(gram.double()).clamp_min(0.0)
    return float((evals / ((1.0 - lam) + lam * evals)).min())
