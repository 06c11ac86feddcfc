r"""The linear-convergence certificate :math:`C(s) \le C(0)\,e^{-2\int_0^s\mu}` (``docs/optim.md``).

For the MSE cost :math:`C = \tfrac12|x-y|^2` and the flow of
:math:`g_\lambda = (1-\lambda)1 + \lambda D^\top D`, the residual obeys
:math:`\dot x = -D g_\lambda^{+} D^\top (x - y) = -K_\lambda(x-y)` with the
metric-weighted NTK

.. math:: K_\lambda = D g_\lambda^{+}D^\top = U\operatorname{diag}
          \Big(\frac{\sigma_i^2}{(1-\lambda)+\lambda\sigma_i^2}\Big)U^\top

(:math:`\sigma_i \le \tau` dropped where the metric drops them), so
:math:`\dot C = -(x-y)^\top K_\lambda(x-y) \le -2\mu C` with
:math:`\mu = \lambda_{\min}(K_\lambda)` over all :math:`QN` output directions
(0 when :math:`QN > K` or a direction is cut), and Grönwall gives

.. math:: C(s) \le C(0)\exp\Big(-2\int_0^s \mu(s')\,ds'\Big).

At :math:`\lambda = 0`, :math:`\mu = \sigma_{\min}(D)^2 = \lambda_{\min}(DD^\top)`;
at :math:`\lambda = 1` with full row rank, :math:`\mu = 1`: the uniform rate
:math:`C(s) = e^{-2s}C(0)` of [Che23] and the a priori stopping time
:math:`T_\varepsilon = \tfrac12\log(C(0)/\varepsilon)`
(:func:`~subriemann.analysis.interpolation.apriori_stopping_time`).  The
integral is evaluated by the trapezoid rule on the recorded times, so the
bound is as fine as the sampling of :math:`\mu`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "ConvergenceCertificate",
    "linear_convergence_certificate",
    "adapted_rate",
    "apriori_steps",
]


def adapted_rate(
    singular_values: Any, lam: float, num_outputs: int, tau: float = 0.0, cut: bool | None = None
) -> float:
    r"""The rate :math:`\mu = \lambda_{\min}(Dg_\lambda^{+}D^\top)` from the singular values of D.

    Parameters
    ----------
    singular_values : array_like, shape=[min(QN, K)]
    lam : float
        :math:`\lambda \in [0, 1]`.
    num_outputs : int
        :math:`QN`, the number of output directions; when it exceeds the
        number of singular values, :math:`K_\lambda` has a kernel and
        :math:`\mu = 0`.
    tau : float
        Threshold :math:`\tau`; singular values :math:`\le\tau` are dropped
        (rate 0) where ``cut`` (default: at :math:`\lambda = 1`).
    cut : bool, optional

    Returns
    -------
    mu : float
    """
    s = np.asarray(singular_values, dtype=np.float64).reshape(-1)
    if s.size < num_outputs or s.size == 0:
        return 0.0
    if cut is None:
        cut = lam == 1.0
    if cut and bool((s <= tau).any()):
        return 0.0
    rates = s**2 / ((1.0 - lam) + lam * s**2)
    return float(rates.min())


@dataclass
class ConvergenceCertificate:
    r"""The bound :math:`C(0)e^{-2\int\mu}` along a run, and whether the measured cost obeys it.

    Attributes
    ----------
    s : ndarray, shape=[T]
        Flow times (for a discrete run: :math:`s_k = \sum_{i<k}\eta_i`).
    cost : ndarray, shape=[T]
    mu : ndarray, shape=[T]
    bound : ndarray, shape=[T]
        :math:`C(0)\exp(-2\int_0^{s}\mu)`.
    holds : bool
        ``cost <= bound * (1 + rtol)`` at every recorded time.
    worst_ratio : float
        :math:`\max_k C(s_k)/\mathrm{bound}_k` (at most 1 when the certificate holds).
    lam : float
    stopping_time : float or None
        Where :math:`\mu \equiv 1` (:math:`\lambda = 1`, full rank): the a priori
        :math:`T_\varepsilon = \tfrac12\log(C(0)/\varepsilon)` for ``eps``.
    measured_time : float or None
        The first recorded :math:`s` with :math:`C(s) \le \varepsilon`.
    """

    s: np.ndarray
    cost: np.ndarray
    mu: np.ndarray
    bound: np.ndarray
    holds: bool
    worst_ratio: float
    lam: float
    stopping_time: float | None = None
    measured_time: float | None = None


def _lam_of(metric: dict) -> float:
    name = metric.get("class", "")
    if name == "EuclideanMetric":
        return 0.0
    if "lam" in metric:
        return float(metric["lam"])
    raise ValueError(
        f"linear_convergence_certificate knows the rate of the g_lambda metrics, not of {name!r}; "
        "pass lam= and mu= explicitly"
    )


def linear_convergence_certificate(
    traj: Any = None,
    *,
    s: Any = None,
    cost: Any = None,
    mu: Any = None,
    lam: float | None = None,
    eps: float | None = None,
    rtol: float = 1e-6,
) -> ConvergenceCertificate:
    r"""Check :math:`C(s) \le C(0)\exp(-2\int_0^s\mu)` along a flow or a training run.

    Parameters
    ----------
    traj : Trajectory, optional
        A flow of an MSE space with a :math:`g_\lambda` metric (Euclidean,
        interpolated, output pullback, bundle) and rank monitoring on (its
        singular values give :math:`\mu`, its ``rank_tau`` the threshold).
    s, cost, mu : array_like, shape=[T], optional
        Instead of ``traj``: times, costs and rates of a run, e.g. of
        :class:`~subriemann.optim.AdaptedGD` with ``record_spectrum=True``
        (:math:`s_k = \sum\eta`, ``cost`` the full-batch :math:`C` before
        step :math:`k`, ``mu`` from ``last_step.groups[0]["mu"]``).
    lam : float, optional
        :math:`\lambda` (read from the trajectory's metric when omitted).
    eps : float, optional
        Target cost for the a priori vs measured stopping time (at :math:`\lambda = 1`).
    rtol : float
        Relative slack of ``holds`` (round-off of the recorded costs and of
        the trapezoid rule).

    Returns
    -------
    ConvergenceCertificate

    Raises
    ------
    ValueError
        A non-MSE trajectory, a metric without a known rate, inconsistent arrays.
    """
    if traj is not None:
        if any(a is not None for a in (s, cost, mu)):
            raise ValueError("pass either traj or the arrays s, cost, mu, not both")
        if getattr(traj, "loss", "mse") != "mse":
            raise ValueError(
                f"the certificate is for the MSE cost (C = |x - y|^2 / 2), not {traj.loss!r}"
            )
        lam = _lam_of(traj.metric) if lam is None else lam
        sv = traj.singular_values.detach().cpu().double().numpy()
        if not np.isfinite(sv).all():
            raise ValueError("the trajectory has no singular values (run with monitor_rank=True)")
        qn = int(traj.targets.numel())
        cut = lam == 1.0 or traj.metric.get("class") == "BundleMetric"
        tau = float(traj.rank_tau)
        mu_arr = np.array([adapted_rate(row, lam, qn, tau, cut) for row in sv])
        s_arr = traj.s.detach().cpu().double().numpy()
        c_arr = traj.cost.detach().cpu().double().numpy()
    else:
        if s is None or cost is None or mu is None:
            raise ValueError("pass traj, or all of s, cost and mu")
        s_arr, c_arr, mu_arr = (np.asarray(a, dtype=np.float64).reshape(-1) for a in (s, cost, mu))
        if not (s_arr.size == c_arr.size == mu_arr.size) or s_arr.size == 0:
            raise ValueError("s, cost and mu must be non-empty and of the same length")
        lam = float("nan") if lam is None else float(lam)
    if bool((np.diff(s_arr) < 0).any()):
        raise ValueError("s must be non-decreasing")
    integral = np.concatenate([[0.0], np.cumsum(0.5 * (mu_arr[1:] + mu_arr[:-1]) * np.diff(s_arr))])
    bound = c_arr[0] * np.exp(-2.0 * integral)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(bound > 0, c_arr / bound, np.where(c_arr > 0, np.inf, 0.0))
    worst = float(ratio.max())
    stop = measured = None
    if eps is not None:
        if not (eps > 0 and math.isfinite(eps)):
            raise ValueError(f"eps must be a positive finite number, got {eps!r}")
        if bool(np.all(mu_arr == 1.0)):
            stop = 0.5 * math.log(c_arr[0] / eps) if c_arr[0] > eps else 0.0
        hit = np.nonzero(c_arr <= eps)[0]
        measured = float(s_arr[hit[0]]) if hit.size else None
    return ConvergenceCertificate(
        s_arr, c_arr, mu_arr, bound, worst <= 1.0 + rtol, worst, float(lam), stop, measured
    )


def apriori_steps(cost0: float, eps: float, lr: float) -> int:
    r"""Steps of the discrete :math:`\lambda = 1` MSE method to reach :math:`C \le \varepsilon`.

    On the linearization (or a linear model with :math:`D` of full row rank)
    one step with learning rate :math:`\eta \in (0, 2)` maps the residual
    :math:`x - y` to :math:`(1-\eta)(x - y)`, so
    :math:`C_k = (1-\eta)^{2k}C_0` and :math:`C_k \le \varepsilon` from
    :math:`k^* = \lceil \log(C_0/\varepsilon) / (-2\log|1-\eta|)\rceil`
    (the discrete counterpart of :math:`T_\varepsilon = \tfrac12\log(C_0/\varepsilon)`,
    with :math:`k^*\eta \le T_\varepsilon` for :math:`\eta \le 1`).  At
    :math:`\eta = 1` one step suffices.

    Parameters
    ----------
    cost0, eps : float
        :math:`C_0 \ge 0` and the target :math:`\varepsilon > 0`.
    lr : float
        :math:`\eta \in (0, 2)`.

    Returns
    -------
    k : int
    """
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    if not 0.0 < lr < 2.0:
        raise ValueError(f"lr must lie in (0, 2) for the residual to contract, got {lr!r}")
    if cost0 <= eps:
        return 0
    if lr == 1.0:
        return 1
    return int(math.ceil(math.log(cost0 / eps) / (-2.0 * math.log(abs(1.0 - lr))) - 1e-12))
