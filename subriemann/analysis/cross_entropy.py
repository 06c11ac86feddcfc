r"""Cross-entropy geometry (docs/theory.md §6, [CM24] §2.3): hyperplanes, limit, rate.

For the cross-entropy :math:`C = \sum_j -\langle y_j, \log\sigma(x_j)\rangle` on
logits :math:`x_j \in \mathbb{R}^Q` (labels :math:`y_j` in the simplex),
:math:`\nabla_{x_j}C = \sigma(x_j) - y_j` has :math:`\langle 1, \nabla_{x_j}C\rangle = 0`
and the Hessian blocks :math:`H_j = \operatorname{diag}\sigma_j - \sigma_j\sigma_j^\top`
have kernel :math:`\operatorname{span}\{1\}` (Lemma 2.6).  Under the adapted flow
(:math:`\lambda = 1`) with :math:`\operatorname{rank}D = QN` the outputs obey

.. math:: \partial_s x_j = -(\sigma(x_j) - y_j), \qquad j = 1, \dots, N,

so that

* **invariant hyperplanes**: :math:`\langle 1, x_j(s)\rangle = c_j` is constant
  (:func:`hyperplane_sums`);
* **strict convexity on each hyperplane**: at every finite :math:`x_j` all
  :math:`\sigma_{j,i} > 0`, so :math:`H_j` is positive definite on :math:`1^\perp`
  and a minimizer on :math:`\{\langle 1, \cdot\rangle = c_j\}`, if one exists, is
  unique;
* **explicit limit** (Prop 2.7, Cor 2.8): if every :math:`y_{j,i} > 0`,

  .. math:: x_j(s) \to x_j^* = \log y_j + \frac{c_j - \langle 1, \log y_j\rangle}{Q}\,1,
            \qquad \sigma(x_j^*) = y_j

  (:func:`predicted_limit`, :func:`limit_error`), with minimum
  :math:`C(x^*) = \sum_j H(y_j)` (:func:`minimum_cost`);
* **rate**: linearized at :math:`x^*`, :math:`\partial_s(x_j - x_j^*) = -H_j^*(x_j - x_j^*)`
  with :math:`H_j^* = \operatorname{diag}y_j - y_jy_j^\top` on :math:`1^\perp`, so
  :math:`|x(s) - x^*|` decays like :math:`e^{-\mu s}` and :math:`C - C^*` like
  :math:`e^{-2\mu s}`, with

  .. math:: \mu = \min_j \lambda_2\bigl(\operatorname{diag}y_j - y_jy_j^\top\bigr)
            \le \frac1Q

  (:func:`asymptotic_rate`, :func:`fitted_rate`);
* **one-hot labels** (any :math:`y_{j,i} = 0`): no finite minimizer exists; the
  logits diverge along a fixed direction of the hyperplane, logarithmically in
  :math:`s`, and :math:`C - \sum_j H(y_j) = O(1/s)`.  The functions here report
  this explicitly (:class:`CrossEntropyLimit`, :class:`NoFiniteLimitError`); they
  never return inf or NaN.

With rank loss (:math:`\operatorname{rank}D < QN`) and a **bias in the last layer**
only the total :math:`\sum_j\langle 1, x_j\rangle` is guaranteed to be conserved:
the bias makes :math:`1_{QN} \in \operatorname{ran}D`, so :math:`P1 = 1` and
:math:`\tfrac{d}{ds}\langle 1, x\rangle = -\langle 1, P\nabla_xC\rangle
= -\langle 1, \nabla_xC\rangle = 0`.  (A model linear in its parameters with shared
features, :math:`x_j = W\phi_j + b`, keeps every per-sample sum at any rank:
:math:`P = \Pi_S\otimes 1_Q` commutes with summing a sample's logits.  See
``docs/cross_entropy.md``.)

Also here: :func:`smooth_labels` (so that the finite-limit statements apply to
real data).  A real data set ready for these statements, scikit-learn's digits
with smoothed labels, is :func:`subriemann.app.datasets.load_digits_problem`.

Examples
--------
>>> import torch
>>> from subriemann.analysis.cross_entropy import predicted_limit, smooth_labels
>>> y = smooth_labels(torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64), 0.3)
>>> y
tensor([[0.8000, 0.1000, 0.1000]], dtype=torch.float64)
>>> lim = predicted_limit(torch.tensor([[0.5, -1.0, 2.0]]), y)
>>> lim.finite, bool(torch.allclose(torch.softmax(lim.limit, -1), y))
(True, True)
>>> round(float(lim.limit.sum()), 12)  # on the hyperplane <1, x> = 0.5 - 1 + 2
1.5
>>> predicted_limit(torch.zeros(1, 3), torch.tensor([[1.0, 0.0, 0.0]])).finite
False
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from subriemann.analysis.moved import moved_getattr
from subriemann.flow.trajectory import Trajectory
from subriemann.losses import CrossEntropyLoss
from subriemann.validation import check_choice, check_real

__all__ = [
    "HyperplaneSums",
    "CrossEntropyLimit",
    "NoFiniteLimitError",
    "LimitError",
    "RateFit",
    "hyperplane_sums",
    "predicted_limit",
    "limit_error",
    "asymptotic_rate",
    "fitted_rate",
    "smooth_labels",
    "check_smoothing",
    "minimum_cost",
    "divergence_direction",
]


# -- input handling -----------------------------------------------------------------------
def _as_tensor(a: Any, what: str) -> Tensor:
    if isinstance(a, Tensor):
        t = a.detach()
    else:
        try:
            t = torch.as_tensor(np.asarray(a))
        except Exception as err:  # noqa: BLE001 - any conversion failure is a bad input
            raise TypeError(f"{what} must be a tensor or array, got {type(a).__name__}") from err
    if not t.is_floating_point():
        t = t.to(torch.float64)
    return t


def _check_targets(targets: Any, what: str = "targets") -> Tensor:
    """Targets as an ``[N, Q]`` float64 tensor on the simplex (rows renormalized exactly).

    Raises
    ------
    ValueError
        Not 2-D, fewer than 2 classes, NaN/inf, negative entries or rows not summing to 1.
    """
    y = _as_tensor(targets, what)
    if y.ndim != 2:
        raise ValueError(
            f"{what} must have shape (N, Q) (probability rows, e.g. one-hot), got "
            f"{tuple(y.shape)}"
        )
    if y.shape[0] == 0:
        raise ValueError(f"{what} must have at least one row")
    loss = CrossEntropyLoss()
    loss.check_targets(y)  # finite, Q >= 2, non-negative, rows summing to 1 (ValueError)
    return loss.prepare_targets(y.to(torch.float64))


def _as_logits(x: Any, shape: torch.Size, what: str = "x0") -> Tensor:
    t = _as_tensor(x, what).to(torch.float64)
    n, q = shape
    if t.shape == (n * q,):
        t = t.reshape(n, q)
    if t.shape != (n, q):
        raise ValueError(
            f"{what} must have shape ({n}, {q}) or ({n * q},) to match the targets, "
            f"got {tuple(t.shape)}"
        )
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} contains NaN or inf")
    return t


def _check_ce_trajectory(traj: Trajectory, what: str) -> tuple[int, int]:
    if not isinstance(traj, Trajectory):
        raise TypeError(f"{what} needs a subriemann.Trajectory, got {type(traj).__name__}")
    if traj.loss not in ("cross_entropy", "ce"):
        raise ValueError(
            f"{what} is a statement about the cross-entropy cost (docs/theory.md §6); the "
            f"trajectory's loss is {traj.loss!r}"
        )
    if len(traj) == 0:
        raise ValueError(f"{what}: the trajectory has no saved points")
    n, q = int(traj.num_samples), int(traj.num_outputs)
    if n * q != traj.outputs.shape[1]:
        raise ValueError(
            f"trajectory outputs have {traj.outputs.shape[1]} columns, not N*Q = {n}*{q}"
        )
    return n, q


def _adapted(traj: Trajectory) -> bool:
    """Whether the flow is the adapted one (:math:`\\lambda = 1` of the interpolated family)."""
    lam = traj.metric.get("lam")
    return lam is not None and float(lam) == 1.0


# -- hyperplane sums -------------------------------------------------------------------------
@dataclass
class HyperplaneSums:
    r"""Per-sample logit sums :math:`\langle 1, x_j(s)\rangle` along a flow.

    Attributes
    ----------
    s : Tensor, shape=[T]
    sums : Tensor, shape=[T, N]
        :math:`c_j(s) = \langle 1, x_j(s)\rangle`.
    drift : Tensor, shape=[T, N]
        :math:`c_j(s) - c_j(0)`.
    max_drift : float
        :math:`\max_{j,s}|c_j(s) - c_j(0)|`: zero (to the integration error) for the
        adapted flow with :math:`\operatorname{rank}D = QN`.
    total : Tensor, shape=[T]
        :math:`\sum_j c_j(s)`.
    total_drift : float
        :math:`\max_s|\sum_j c_j(s) - \sum_j c_j(0)|`: zero for the adapted flow of
        a network with a last-layer bias, whatever the rank.
    adapted : bool
        The flow is :math:`\lambda = 1` (``traj.metric["lam"] == 1``).
    full_rank : bool
        :math:`\operatorname{rank}D = QN` at every saved point.
    """

    s: Tensor
    sums: Tensor
    drift: Tensor
    max_drift: float
    total: Tensor
    total_drift: float
    adapted: bool
    full_rank: bool

    @property
    def max_drift_over_time(self) -> Tensor:
        r""":math:`\max_j|c_j(s) - c_j(0)|`, shape ``[T]`` (for plots)."""
        return self.drift.abs().amax(dim=1)

    @property
    def total_drift_over_time(self) -> Tensor:
        r""":math:`|\sum_j c_j(s) - \sum_j c_j(0)|`, shape ``[T]``."""
        return (self.total - self.total[0]).abs()


def hyperplane_sums(traj: Trajectory) -> HyperplaneSums:
    r"""Logit sums :math:`\langle 1, x_j(s)\rangle` of every sample along a flow, and their drift.

    Under the adapted flow with :math:`\operatorname{rank}D = QN`,
    :math:`\partial_s x_j = -(\sigma(x_j) - y_j)` and
    :math:`\langle 1, \sigma(x_j) - y_j\rangle = 1 - 1 = 0`, so every sum is constant
    (docs/theory.md §6).  Other flows (:math:`\lambda < 1`, natural gradient) move the sums;
    with rank loss and a last-layer bias only the total is kept.

    Parameters
    ----------
    traj : Trajectory
        A flow with the cross-entropy loss.

    Returns
    -------
    HyperplaneSums
    """
    n, q = _check_ce_trajectory(traj, "hyperplane_sums")
    x = traj.outputs.reshape(len(traj), n, q)
    sums = x.sum(dim=-1)
    drift = sums - sums[0]
    total = sums.sum(dim=-1)
    return HyperplaneSums(
        s=traj.s,
        sums=sums,
        drift=drift,
        max_drift=float(drift.abs().max()),
        total=total,
        total_drift=float((total - total[0]).abs().max()),
        adapted=_adapted(traj),
        full_rank=bool((traj.rank == n * q).all()) if traj.rank.numel() else False,
    )


# -- predicted limit ---------------------------------------------------------------------------
class NoFiniteLimitError(ValueError):
    """Raised when a finite limit is needed but some label has zero entries.

    Attributes
    ----------
    limit : CrossEntropyLimit
        The report, with the divergence direction.
    """

    def __init__(self, limit: CrossEntropyLimit) -> None:
        super().__init__(limit.message)
        self.limit = limit


@dataclass
class CrossEntropyLimit:
    r"""Where the adapted cross-entropy flow goes: :math:`x^*`, or the direction it diverges in.

    Attributes
    ----------
    finite : bool
        Every :math:`y_{j,i} > 0`: the flow converges to the finite point ``limit``.
    limit : Tensor, shape=[N, Q], or None
        :math:`x_j^* = \log y_j + (c_j - \langle 1, \log y_j\rangle)/Q\cdot 1`, or ``None``
        when some label has a zero entry (never inf or NaN).
    divergence_direction : Tensor, shape=[N, Q], or None
        ``None`` when ``finite``.  Otherwise row :math:`j` is the unit vector of
        :func:`divergence_direction` for the samples whose label has zeros, and
        the zero row for the others.
    diverging : Tensor, shape=[N], bool
        Samples whose label has a zero entry.
    offsets : Tensor, shape=[N]
        :math:`c_j = \langle 1, x_j(0)\rangle`, the hyperplanes.
    minimum_cost : float
        :math:`\sum_j H(y_j)`: the minimum of :math:`C` (attained at ``limit``) or,
        when not finite, its infimum (not attained).
    message : str
        A human summary.
    """

    finite: bool
    limit: Tensor | None
    divergence_direction: Tensor | None
    diverging: Tensor
    offsets: Tensor
    minimum_cost: float
    message: str

    def require(self) -> Tensor:
        """The finite limit :math:`x^*`, ``[N, Q]``; raise :class:`NoFiniteLimitError` if none."""
        if not self.finite or self.limit is None:
            raise NoFiniteLimitError(self)
        return self.limit

    def __str__(self) -> str:
        return self.message


def divergence_direction(targets: Any) -> Tensor:
    r"""Unit direction, within :math:`1^\perp`, in which the logits of one-hot-like labels diverge.

    For a label with support :math:`S_j = \{i : y_{j,i} > 0\}` and
    :math:`|S_j| < Q`,

    .. math:: d_j = \frac{u_j}{|u_j|}, \qquad
              u_j = \frac{1_{S_j}}{|S_j|} - \frac{1}{Q}\,1,

    i.e. every logit of the support rises by the same amount and every other logit
    falls by the same amount, on the hyperplane (:math:`\langle 1, d_j\rangle = 0`).
    Rows of labels with full support are zero.

    Why this direction: on the hyperplane the cost decreases strictly along
    :math:`d_j` for ever (:math:`\partial_\tau C(x_j + \tau d_j)
    = (\sigma_j(S_j) - 1)/(|S_j||u_j|) < 0`), and the infimum
    :math:`H(y_j)` is approached only as the logits outside :math:`S_j` go to
    :math:`-\infty` relative to those in :math:`S_j`.  Along the adapted flow
    :math:`\tfrac{d}{ds}\langle x_j, d_j\rangle = (1 - \sigma_j(S_j))/(|S_j||u_j|) > 0`;
    the gap between the two groups grows like :math:`\log s`, while the differences
    :math:`x_{j,i} - x_{j,k}` converge to :math:`\log(y_{j,i}/y_{j,k})` for
    :math:`i, k \in S_j` and to 0 for :math:`i, k \notin S_j`; so
    :math:`(x_j(s) - x_j(0))/|x_j(s) - x_j(0)| \to d_j` (slowly).

    Parameters
    ----------
    targets : Tensor, shape=[N, Q]
        Labels on the simplex.

    Returns
    -------
    Tensor, shape=[N, Q]
    """
    y = _check_targets(targets)
    q = y.shape[1]
    support = (y > 0).to(y.dtype)
    size = support.sum(dim=1, keepdim=True)
    u = support / size - 1.0 / q
    norm = u.norm(dim=1, keepdim=True)
    full = (size == q).squeeze(1)
    return torch.where(full[:, None], 0.0, u / torch.where(full[:, None], 1.0, norm))


def minimum_cost(targets: Any) -> float:
    r"""The minimum :math:`C(x^*) = \sum_j H(y_j) = -\sum_{j,i} y_{j,i}\log y_{j,i}` (nats).

    With :math:`0\log 0 = 0`.  When a label has zero entries this is the
    infimum of :math:`C`, which is not attained (one-hot labels: 0).

    Parameters
    ----------
    targets : Tensor, shape=[N, Q]
    """
    y = _check_targets(targets)
    return float(-torch.special.xlogy(y, y).sum())


def predicted_limit(x0: Any, targets: Any) -> CrossEntropyLimit:
    r"""The limit :math:`x^*` of the adapted flow from :math:`x(0)` (Prop 2.7, Cor 2.8).

    .. math:: x_j^* = \log y_j + \frac{c_j - \langle 1, \log y_j\rangle}{Q}\,1,
              \qquad c_j = \langle 1, x_j(0)\rangle,

    the unique point of the hyperplane :math:`\{\langle 1, \cdot\rangle = c_j\}` with
    :math:`\sigma(x_j^*) = y_j` (the cost is strictly convex on it).  It is the limit
    of the adapted flow (:math:`\lambda = 1`) when :math:`\operatorname{rank}D = QN`
    along the orbit.

    With a zero label entry (one-hot labels) there is **no finite limit**: the
    result has ``finite=False``, ``limit=None`` and the direction in which the
    logits diverge (:func:`divergence_direction`).  Nothing is inf or NaN.

    Parameters
    ----------
    x0 : Tensor, shape=[N, Q] or [QN]
        Initial logits (sample-major when flat).
    targets : Tensor, shape=[N, Q]
        Labels on the simplex.

    Returns
    -------
    CrossEntropyLimit

    Raises
    ------
    ValueError
        Labels off the simplex, or ``x0`` of the wrong shape or not finite.
    """
    y = _check_targets(targets)
    x = _as_logits(x0, y.shape)
    n, q = y.shape
    c = x.sum(dim=1)
    diverging = (y <= 0).any(dim=1)
    h = minimum_cost(y)
    if not bool(diverging.any()):
        logy = torch.log(y)
        lim = logy + ((c - logy.sum(dim=1)) / q)[:, None]
        msg = (
            f"finite limit x* (all {n} labels have positive entries): sigma(x*_j) = y_j on "
            f"the hyperplanes <1, x_j> = c_j; minimum C = sum_j H(y_j) = {h:.6g}"
        )
        return CrossEntropyLimit(True, lim, None, diverging, c, h, msg)
    idx = torch.nonzero(diverging).flatten().tolist()
    shown = ", ".join(str(i) for i in idx[:8]) + (", ..." if len(idx) > 8 else "")
    msg = (
        f"no finite limit: {len(idx)} of {n} labels have zero entries (samples {shown}); "
        "along the adapted flow their logits diverge (logarithmically in s) in "
        "divergence_direction: the logits of the zero-label classes go to -inf relative to "
        f"the others, on the hyperplane <1, x_j> = c_j. inf C = sum_j H(y_j) = {h:.6g} is not "
        "attained. Use smooth_labels(targets, eps) for a finite limit."
    )
    return CrossEntropyLimit(False, None, divergence_direction(y), diverging, c, h, msg)


# -- distance to the limit -----------------------------------------------------------------
@dataclass
class LimitError:
    r"""Distance of a flow's logits to the predicted limit :math:`x^*`.

    Attributes
    ----------
    s : Tensor, shape=[T]
    limit : CrossEntropyLimit
        The prediction from :math:`x(0)` and the trajectory's targets.
    distance : Tensor, shape=[T], or None
        :math:`|x(s) - x^*|` (Euclidean in :math:`\mathbb{R}^{QN}`); ``None`` when
        there is no finite limit.
    final : float or None
        :math:`|x(s_{\rm end}) - x^*|`.
    relative_final : float or None
        ``final`` / :math:`|x(0) - x^*|`.
    minimizer_distance : Tensor, shape=[T], or None
        Distance to the set of *all* global minimizers
        :math:`\{x : \sigma(x_j) = y_j\} = \prod_j(\log y_j + \mathbb{R}1)`, i.e.
        :math:`(\sum_j|\Pi_{1^\perp}(x_j(s) - \log y_j)|^2)^{1/2}`.  A flow that
        converges to a minimizer on other hyperplanes (:math:`\lambda < 1`) has
        ``minimizer_distance`` :math:`\to 0` but ``distance`` :math:`\not\to 0`.
    divergence_coordinate : Tensor, shape=[T], or None
        Only without a finite limit: :math:`\langle x(s) - x(0), d\rangle` with
        :math:`d` the stacked ``divergence_direction`` normalized in
        :math:`\mathbb{R}^{QN}`.  Strictly increasing along the adapted full-rank flow
        (like :math:`\log s` at late times).
    message : str
    """

    s: Tensor
    limit: CrossEntropyLimit
    distance: Tensor | None
    final: float | None
    relative_final: float | None
    minimizer_distance: Tensor | None
    divergence_coordinate: Tensor | None
    message: str = field(default="")

    @property
    def finite(self) -> bool:
        return self.limit.finite


def limit_error(traj: Trajectory) -> LimitError:
    r"""Distance :math:`|x(s) - x^*|` along a flow to the limit predicted from :math:`x(0)`.

    Uses the trajectory's targets and its first saved outputs for the hyperplanes
    :math:`c_j`.  Without a finite limit (labels with zero entries) the result says
    so (``distance=None``) and gives the progress along the divergence direction.

    Parameters
    ----------
    traj : Trajectory
        A cross-entropy flow.

    Returns
    -------
    LimitError
    """
    n, q = _check_ce_trajectory(traj, "limit_error")
    y = traj.targets.reshape(n, q)
    x = traj.outputs.reshape(len(traj), n, q).to(torch.float64)
    lim = predicted_limit(x[0], y)
    if lim.finite and lim.limit is not None:
        diff = (x - lim.limit).reshape(len(traj), -1)
        dist = diff.norm(dim=1)
        r = x - torch.log(y)
        r = r - r.mean(dim=-1, keepdim=True)
        mind = r.reshape(len(traj), -1).norm(dim=1)
        d0 = float(dist[0])
        final = float(dist[-1])
        rel = final / d0 if d0 > 0 else 0.0
        msg = f"|x(s_end) - x*| = {final:.3e} ({rel:.3e} of |x(0) - x*| = {d0:.3e})"
        return LimitError(traj.s, lim, dist, final, rel, mind, None, msg)
    assert lim.divergence_direction is not None
    d = lim.divergence_direction.reshape(-1)
    d = d / d.norm()
    coord = (x.reshape(len(traj), -1) - x[0].reshape(-1)) @ d
    return LimitError(traj.s, lim, None, None, None, None, coord, lim.message)


# -- rates -----------------------------------------------------------------------------------
def asymptotic_rate(targets: Any) -> float:
    r"""The late-time rate :math:`\mu = \min_j\lambda_2(\operatorname{diag}y_j - y_jy_j^\top)`.

    :math:`\lambda_2` is the second-smallest eigenvalue of
    :math:`H_j^* = \operatorname{diag}y_j - y_jy_j^\top`, i.e. its smallest eigenvalue
    on :math:`1^\perp` (:math:`H_j^*1 = 0`).  Near :math:`x^*` the adapted flow is
    :math:`\partial_s(x_j - x_j^*) = -H_j^*(x_j - x_j^*)`, so :math:`|x - x^*|` decays
    like :math:`e^{-\mu s}` (slowest mode) and :math:`C - C^*` like :math:`e^{-2\mu s}`.

    Always :math:`\mu \le 1/Q` (the trace :math:`1 - |y_j|^2 \le 1 - 1/Q` is shared by
    :math:`Q - 1` eigenvalues), with equality for uniform labels.  For labels smoothed
    with ``eps`` (:func:`smooth_labels`) and :math:`Q \ge 3`, :math:`\mu = \varepsilon/Q`.

    With a zero label entry :math:`\mu = 0` exactly: there is no exponential rate
    (and no finite limit; :math:`C - \sum_j H(y_j) = O(1/s)`).

    Parameters
    ----------
    targets : Tensor, shape=[N, Q]

    Returns
    -------
    mu : float
    """
    y = _check_targets(targets)
    if bool((y <= 0).any()):
        return 0.0
    h = torch.diag_embed(y) - y[:, :, None] * y[:, None, :]
    evals = torch.linalg.eigvalsh(h)
    return float(evals[:, 1].min())


@dataclass
class RateFit:
    r"""A fit :math:`\log q(s) \approx a - r s` at late times, compared with the theory.

    Attributes
    ----------
    rate : float
        The fitted :math:`r`.
    mu : float
        :math:`\mu` of :func:`asymptotic_rate`.
    expected : float
        :math:`\mu` for ``quantity="distance"`` (:math:`q = |x - x^*|`),
        :math:`2\mu` for ``quantity="cost"`` (:math:`q = C - C^*`).
    relative_error : float
        :math:`|r - \text{expected}|/\text{expected}`.
    quantity : str
    s_min, s_max : float
        The fitted window.
    points : int
    """

    rate: float
    mu: float
    expected: float
    relative_error: float
    quantity: str
    s_min: float
    s_max: float
    points: int

    def __str__(self) -> str:
        return (
            f"fitted rate of {self.quantity} {self.rate:.6g} vs expected {self.expected:.6g} "
            f"(mu = {self.mu:.6g}): relative error {self.relative_error:.2e} over "
            f"s in [{self.s_min:.4g}, {self.s_max:.4g}] ({self.points} points)"
        )


def _rate_series(
    traj: Trajectory, err: LimitError, mu: float, quantity: str, lower: float | None
) -> tuple[Tensor, float, float]:
    r"""``(q(s), lower, expected rate)`` for ``quantity``: :math:`|x - x^*|` or :math:`C - C^*`."""
    if quantity == "distance":
        assert err.distance is not None
        lo = 1e-7 if lower is None else float(lower)
        return err.distance, lo, mu
    cstar = err.limit.minimum_cost
    val = traj.cost.to(torch.float64) - cstar
    q0 = float(val[0])
    if not q0 > 0:
        raise ValueError(f"fitted_rate: C(0) - C* = {q0:.3e}; the flow starts at the minimum")
    # C - C* is resolved only down to about eps C*
    eps = float(torch.finfo(torch.float64).eps)
    lo = max(1e-12, 1e3 * eps * abs(cstar) / q0) if lower is None else float(lower)
    return val, lo, 2 * mu


def _log_linear_fit(s: Tensor, val: Tensor) -> float:
    r"""The rate :math:`r` of the least-squares fit :math:`\log q(s) \approx a - r s`."""
    a = torch.stack([torch.ones_like(s), s], dim=1)
    coef = torch.linalg.lstsq(a, torch.log(val).unsqueeze(1)).solution.squeeze(1)
    return -float(coef[1])


def fitted_rate(
    traj: Trajectory,
    *,
    quantity: Literal["distance", "cost"] = "distance",
    s_min: float | None = None,
    s_max: float | None = None,
    upper: float | None = None,
    lower: float | None = None,
) -> RateFit:
    r"""Late-time decay rate of :math:`|x(s) - x^*|` (or of :math:`C - C^*`), against :math:`\mu`.

    Least-squares fit of :math:`\log q(s) = a - r s` over the saved points with

    .. math:: \text{lower}\cdot q(0) \le q(s) \le \text{upper}\cdot q(0)

    (the linear regime, above the round-off floor) and, if given,
    :math:`s_{\min} \le s \le s_{\max}`.

    * ``quantity="distance"`` (default): :math:`q = |x(s) - x^*|`, expected rate
      :math:`\mu`; defaults ``upper = 1e-3``, ``lower = 1e-7``.
    * ``quantity="cost"``: :math:`q = C(s) - \sum_j H(y_j)`, expected rate
      :math:`2\mu`; defaults ``upper = 1e-6`` (:math:`C - C^*` is quadratic in
      :math:`x - x^*`) and ``lower = max(1e-12, 1e3\,\epsilon\,C^*/q(0))``
      (:math:`C - C^*` is resolved only down to about :math:`\epsilon C^*`).

    The comparison is meaningful for the adapted flow with :math:`\operatorname{rank}D = QN`.

    **Which rate is seen.**  :math:`|x(s) - x^*|^2` is, at late times, a sum of
    :math:`e^{-2\lambda s}` over the eigenvalues :math:`\lambda` of all the
    :math:`H_j^*` on :math:`1^\perp`; a fit over a finite window returns a weighted
    average of the slowest of them, which approaches :math:`\mu` only once
    :math:`s \gg 1/(\lambda' - \mu)`, :math:`\lambda'` the next rate.  Smoothed
    one-hot labels have a wide gap (one rate for :math:`Q = 2`;
    :math:`\lambda' \ge 1.5\mu` for :math:`Q \ge 3` and :math:`\varepsilon \le 0.75`);
    generic soft labels can have nearly
    degenerate slow rates, and then the fit overestimates :math:`\mu` by a few
    percent (``docs/cross_entropy.md``).

    Parameters
    ----------
    traj : Trajectory
        A cross-entropy flow, long enough to reach the linear regime.
    quantity : {"distance", "cost"}
    s_min, s_max : float, optional
    upper, lower : float, optional
        Window on :math:`q(s)/q(0)`.

    Returns
    -------
    RateFit

    Raises
    ------
    NoFiniteLimitError
        Labels with zero entries: there is no :math:`x^*` and no exponential rate.
    ValueError
        Fewer than 3 points in the window (the flow did not approach :math:`x^*`:
        too short, :math:`\lambda < 1`, or rank loss).
    """
    n, q = _check_ce_trajectory(traj, "fitted_rate")
    check_choice(quantity, "quantity", ("distance", "cost"))
    up = (1e-3 if quantity == "distance" else 1e-6) if upper is None else float(upper)
    if not (0 < up <= 1):
        raise ValueError(f"upper must lie in (0, 1], got {upper!r}")
    err = limit_error(traj)
    err.limit.require()
    mu = asymptotic_rate(traj.targets.reshape(n, q))
    val, lo, expected = _rate_series(traj, err, mu, quantity, lower)
    if not (0 <= lo < up):
        raise ValueError(f"lower must lie in [0, upper), got {lo!r}")
    v0 = float(val[0])
    if not v0 > 0:
        raise ValueError("fitted_rate: the flow starts at the predicted limit")
    s = traj.s.to(torch.float64)
    keep = (val > lo * v0) & (val <= up * v0) & (val > 0)
    if s_min is not None:
        keep &= s >= s_min
    if s_max is not None:
        keep &= s <= s_max
    npts = int(keep.sum())
    if npts < 3:
        raise ValueError(
            f"fitted_rate: only {npts} saved points with {lo:.1e} <= q(s)/q(0) <= {up:.1e} "
            f"(q = {quantity}, final q/q(0) = {float(val[-1]) / v0:.3e}); run the flow longer "
            "(the window starts once q has fallen to `upper` times q(0)), or the flow does not "
            "approach x* (lambda < 1, rank loss)"
        )
    ss = s[keep]
    rate = _log_linear_fit(ss, val[keep])
    rel = abs(rate - expected) / expected if expected > 0 else math.inf
    return RateFit(rate, mu, expected, rel, quantity, float(ss[0]), float(ss[-1]), npts)


# -- labels ----------------------------------------------------------------------------------
def check_smoothing(eps: Any) -> float:
    r"""A label smoothing :math:`\varepsilon`: a real number in :math:`[0, 1)`.

    Raises
    ------
    TypeError
        Not a real number.
    ValueError
        Outside :math:`[0, 1)` or NaN: ``eps must lie in [0, 1)``.
    """
    try:
        return check_real(eps, "eps", low=0.0, high=1.0, high_open=True)
    except ValueError:
        raise ValueError(f"eps must lie in [0, 1), got {eps!r}") from None


def smooth_labels(targets: Any, eps: float) -> Tensor:
    r"""Label smoothing :math:`(1 - \varepsilon)\,y + \varepsilon/Q`.

    For :math:`\varepsilon > 0` every entry is positive, so the adapted flow has the
    finite limit of :func:`predicted_limit`; for smoothed one-hot labels and
    :math:`Q\ge 3` the rate is :math:`\mu = \varepsilon/Q` and the minimum is
    :math:`N\,H((1-\varepsilon+\varepsilon/Q, \varepsilon/Q, \dots))`.
    The one home of label smoothing: the command line (``--label-smoothing``)
    and :func:`subriemann.app.datasets.load_digits_problem` use it too.

    Parameters
    ----------
    targets : Tensor, shape=[N, Q]
        Labels on the simplex (e.g. one-hot).
    eps : float
        In :math:`[0, 1)`.

    Returns
    -------
    Tensor, shape=[N, Q]
        float64 (or the targets' floating dtype).

    Raises
    ------
    TypeError
        ``eps`` is not a real number.
    ValueError
        ``eps`` outside :math:`[0, 1)` or not finite; targets off the simplex.
    """
    eps = check_smoothing(eps)
    raw = _as_tensor(targets, "targets")
    y = _check_targets(raw)
    q = y.shape[1]
    out = (1.0 - eps) * y + eps / q
    return out.to(raw.dtype) if raw.is_floating_point() else out


__getattr__ = moved_getattr(__name__, ["load_digits_problem", "DigitsProblem"])
