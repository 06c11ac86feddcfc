r"""Theory diagnostics of MSE flows: decay, straight lines, deviation from rank loss.

MATH.md §3–§4.  For the adapted flow (:math:`\lambda = 1`) with
:math:`\operatorname{rank}D = QN` along the orbit,

* :math:`|x(s) - y| = e^{-s}|x(0) - y|` and :math:`C(s) = e^{-2s}C(0)`;
* after the time change :math:`t = 1 - e^{-s}` the outputs move on the straight
  line :math:`\tilde x(t) = t\,y + (1-t)\,x(0)` (Prop 2.4).

With rank loss the path bends: :math:`\tilde x(t) = t y + (1-t)x(0) + z(t)` with
:math:`z(t) = (1-t)(U(t,0) - 1)(x(0) - y)`, where the propagator solves
:math:`\partial_s U = P^\perp(s)U`, :math:`U(0) = 1` (2.58–2.59).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from subriemann.trajectory import Trajectory

__all__ = [
    "apriori_stopping_time",
    "linear_interpolation_residual",
    "decay_rate",
    "DecayFit",
    "interpolation_deviation",
    "InterpolationDeviation",
]


def _check_mse(loss_name: str, what: str) -> None:
    if loss_name != "mse":
        raise ValueError(f"{what} is a statement about the MSE cost (MATH.md §3); loss is {loss_name!r}")


def apriori_stopping_time(space, initial_point: Tensor, eps: float) -> float:
    r"""A priori stopping time :math:`T_\varepsilon = \tfrac12\log(C(0)/\varepsilon)` (MATH.md §3).

    Along the adapted flow (:math:`\lambda = 1`) with MSE cost,
    :math:`C(s) = e^{-2s}C(0)`, so :math:`C(s) \le \varepsilon` for all
    :math:`s \ge T_\varepsilon`, whatever the architecture, data or
    initialization ([Che23]).

    **When the bound holds**: MSE (summed, :math:`\tfrac12|x-y|^2`), the
    flow of ``OutputPullbackMetric`` / ``InterpolatedMetric(1.0)``, and
    :math:`\operatorname{rank}D[\theta(s)] = QN` for every :math:`s\le T_\varepsilon`
    (so :math:`K \ge QN`).  With rank loss :math:`C` still decreases
    (:math:`d|x-y|^2/ds = -2|P(x-y)|^2`) but may stall above :math:`\varepsilon`.
    A warning is issued when :math:`D` is not of full rank :math:`QN` at
    ``initial_point``.

    Parameters
    ----------
    space : ParameterSpace
    initial_point : Tensor, shape=[K]
    eps : float
        Target cost, :math:`> 0`.

    Returns
    -------
    T : float
        0 when :math:`C(0) \le \varepsilon`.
    """
    _check_mse(getattr(space.loss, "name", ""), "apriori_stopping_time")
    if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    st = space.point_state(initial_point)
    if space.output_dim > space.dim:
        warnings.warn(
            f"K = {space.dim} < QN = {space.output_dim}: D cannot have rank QN, the bound "
            "T_eps does not apply", UserWarning, stacklevel=2,
        )
    else:
        s = st.singular_values("ntk" if space.output_dim * space.dim > 2_000_000 else "svd")
        tau = 1e-6 * float(s[0])
        if int((s > tau).sum()) < space.output_dim:
            warnings.warn(
                "D is rank-deficient at the initial point (rank < QN): the bound T_eps does not apply",
                UserWarning, stacklevel=2,
            )
    c0 = float(st.cost)
    return 0.0 if c0 <= eps else 0.5 * math.log(c0 / eps)


def _line(traj: Trajectory) -> tuple[Tensor, Tensor, Tensor]:
    x0 = traj.outputs[0]
    y = traj.targets
    t = traj.t[:, None]
    return t * y + (1 - t) * x0, x0, y


def linear_interpolation_residual(traj: Trajectory, *, per_point: bool = False) -> float | Tensor:
    r"""Distance from the straight line of Prop 2.4, relative to :math:`|x(0) - y|`.

    .. math:: \max_t \frac{|\tilde x(t) - (t\,y + (1-t)\,x(0))|}{|x(0) - y|},
              \qquad t = 1 - e^{-s}.

    Zero (up to integration error) for the adapted flow with full rank.

    Parameters
    ----------
    traj : Trajectory
    per_point : bool
        Return the residual at every saved point (``[T]``) instead of the max.
    """
    line, x0, y = _line(traj)
    scale = float((x0 - y).norm()) or 1.0
    res = (traj.outputs - line).norm(dim=1) / scale
    return res if per_point else float(res.max())


@dataclass
class DecayFit:
    r"""Rate :math:`r` of a fit :math:`\log C(s) \approx a - r s`.

    Attributes
    ----------
    rate : float
    expected : float
        The uniform rate 2 of [Che23] (MSE, :math:`\lambda = 1`, full rank).
    relative_error : float
        :math:`|r - 2|/2`.
    s_min, s_max : float
        The fitted window.
    points : int
    """

    rate: float
    expected: float
    relative_error: float
    s_min: float
    s_max: float
    points: int


def decay_rate(
    traj: Trajectory, *, s_min: float = 0.0, s_max: float | None = None, floor: float = 1e-24
) -> DecayFit:
    r"""Least-squares fit of :math:`\log C(s) = a - r\,s`, compared with the rate 2 of [Che23].

    Points with :math:`C \le` ``floor`` :math:`\cdot C(0)` are left out (they sit at the
    round-off floor).  For cross-entropy the late-time rate is
    :math:`\mu` instead (see :mod:`subriemann.analysis.cross_entropy`).
    """
    s, c = traj.s, traj.cost
    keep = (s >= s_min) & (c > floor * float(c[0])) & (c > 0)
    if s_max is not None:
        keep &= s <= s_max
    if int(keep.sum()) < 2:
        raise ValueError("fewer than 2 points above the floor in the fit window")
    ss, lc = s[keep], torch.log(c[keep])
    a = torch.stack([torch.ones_like(ss), ss], dim=1)
    coef = torch.linalg.lstsq(a, lc.unsqueeze(1)).solution.squeeze(1)
    rate = -float(coef[1])
    return DecayFit(rate, 2.0, abs(rate - 2.0) / 2.0, float(ss[0]), float(ss[-1]), int(keep.sum()))


@dataclass
class InterpolationDeviation:
    r"""The deviation :math:`z(t)` from the straight line and its explanation (Prop 2.5).

    Attributes
    ----------
    s, t : Tensor, shape=[T]
    z : Tensor, shape=[T, QN]
        :math:`\tilde x(t) - (t y + (1-t) x(0))`.
    z_range, z_perp : Tensor, shape=[T, QN]
        :math:`P(t)z(t)` and :math:`P^\perp(t)z(t)`, with :math:`P` the projector
        on :math:`\operatorname{ran}D` at the same point (threshold ``traj.rank_tau``).
    z_propagator : Tensor, shape=[T, QN]
        The prediction :math:`(1-t)(U(t,0)-1)(x(0)-y)` of (2.58), with :math:`U` integrated
        along the stored path (exponential midpoint rule, second order in the spacing).
    propagator_error : float
        :math:`\max_t|z - z_{\rm prop}| / |x(0) - y|`.
    rank_loss_fraction : float
        :math:`\max_t|z_{\rm prop}| / \max_t|z|`: the share of the bend explained by rank
        loss (≈ 1 for the adapted flow; NaN when :math:`z \equiv 0`).
    applies : bool
        Whether (2.58) applies: MSE and :math:`\lambda = 1`.
    """

    s: Tensor
    t: Tensor
    z: Tensor
    z_range: Tensor
    z_perp: Tensor
    z_propagator: Tensor
    propagator_error: float
    rank_loss_fraction: float
    applies: bool

    @property
    def norms(self) -> dict[str, Tensor]:
        """Norms over time of ``z``, ``z_range``, ``z_perp`` and ``z_propagator``."""
        return {
            k: getattr(self, k).norm(dim=1) for k in ("z", "z_range", "z_perp", "z_propagator")
        }


def _projector(space, theta: Tensor, tau: float) -> Tensor:
    st = space.point_state(theta)
    if space.output_dim * space.dim <= 2_000_000:
        u, s, _ = st.svd
    else:
        u, s = st.ntk_eigh
    u = u[:, s > tau]
    return u @ u.T


def interpolation_deviation(traj: Trajectory, space) -> InterpolationDeviation:
    r"""Deviation :math:`z(t)` from linear interpolation, split on :math:`\operatorname{ran}D` and its complement.

    Recomputes :math:`P(s)` at every saved point (one factorization each) and
    integrates the propagator :math:`\partial_s U = P^\perp U` along the
    stored path; then checks :math:`z` against the Duhamel formula (2.58).

    Parameters
    ----------
    traj : Trajectory
        A flow on ``space``; dense saving (every accepted step) makes the
        propagator accurate.
    space : ParameterSpace
        The space the flow ran on (for :math:`D` at the saved points).
    """
    line, x0, y = _line(traj)
    z = traj.outputs - line
    qn = z.shape[1]
    eye = torch.eye(qn, dtype=z.dtype)
    ps = [_projector(space, th, traj.rank_tau) for th in traj.theta]
    z_range = torch.stack([p @ zz for p, zz in zip(ps, z)])
    z_perp = z - z_range
    u = eye.clone()
    r0 = x0 - y
    preds = [torch.zeros(qn, dtype=z.dtype)]
    for n in range(1, len(ps)):
        ds = float(traj.s[n] - traj.s[n - 1])
        gen = 0.5 * ((eye - ps[n - 1]) + (eye - ps[n]))
        u = torch.linalg.matrix_exp(ds * gen) @ u
        preds.append(float(1 - traj.t[n]) * ((u - eye) @ r0))
    z_prop = torch.stack(preds)
    scale = float(r0.norm()) or 1.0
    err = float((z - z_prop).norm(dim=1).max()) / scale
    zmax = float(z.norm(dim=1).max())
    frac = float(z_prop.norm(dim=1).max()) / zmax if zmax > 0 else math.nan
    lam = traj.metric.get("lam")
    applies = traj.loss == "mse" and lam == 1.0
    return InterpolationDeviation(traj.s, traj.t, z, z_range, z_perp, z_prop, err, frac, applies)
