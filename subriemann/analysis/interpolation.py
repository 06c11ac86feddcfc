r"""Theory diagnostics of MSE flows: decay, straight lines, deviation from rank loss.

docs/theory.md §3–§4.  For the adapted flow (:math:`\lambda = 1`) with
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
from typing import Any

import torch
from torch import Tensor

from subriemann.flow.trajectory import Trajectory
from subriemann.linalg import rank_threshold
from subriemann.linalg.spectral import dense_svd_fits
from subriemann.validation import check_real

__all__ = [
    "apriori_stopping_time",
    "check_target_cost",
    "linear_interpolation_residual",
    "decay_rate",
    "DecayFit",
    "interpolation_deviation",
    "InterpolationDeviation",
]


def _check_mse(loss_name: str, what: str) -> None:
    if loss_name != "mse":
        raise ValueError(
            f"{what} is a statement about the MSE cost (docs/theory.md §3); loss is {loss_name!r}"
        )


def check_target_cost(eps: Any) -> float:
    """A target cost :math:`\\varepsilon`: a finite number :math:`> 0`.

    Raises
    ------
    TypeError
        Not a real number.
    ValueError
        Not positive or not finite: ``eps must be a positive finite number``.
    """
    try:
        return check_real(eps, "eps", low=0.0, low_open=True)
    except ValueError:
        raise ValueError(f"eps must be a positive finite number, got {eps!r}") from None


def apriori_stopping_time(space, initial_point: Tensor, eps: float) -> float:
    r"""A priori stopping time :math:`T_\varepsilon = \tfrac12\log(C(0)/\varepsilon)`.

    (docs/theory.md §3.) Along the adapted flow (:math:`\lambda = 1`) with MSE cost,
    :math:`C(s) = e^{-2s}C(0)`, so :math:`C(s) \le \varepsilon` for all
    :math:`s \ge T_\varepsilon`, whatever the architecture, data or
    initialization ([Che23]).

    **When the bound holds**: MSE (summed, :math:`\tfrac12|x-y|^2`), the
    flow of ``OutputPullbackMetric`` / ``InterpolatedMetric(1.0)``, and
    :math:`\operatorname{rank}D[\theta(s)] = QN` for every :math:`s\le T_\varepsilon`
    (so :math:`K \ge QN`).  With rank loss :math:`C` still decreases
    (:math:`d|x-y|^2/ds = -2|P(x-y)|^2`) but may stall above :math:`\varepsilon`.
    A warning is issued when :math:`D` is not of full rank :math:`QN` at
    ``initial_point`` (threshold: the space's metric's ``rank_atol``, or its
    ``rank_rtol`` :math:`\sigma_{\max}`, default :math:`10^{-6}\sigma_{\max}`).
    The bound is checked, not assumed, by comparing with a flow's ``cost``
    (``tests/analysis/test_interpolation.py``).

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
    eps = check_target_cost(eps)
    st = space.point_state(space.check_point(initial_point))
    if space.output_dim > space.dim:
        warnings.warn(
            f"K = {space.dim} < QN = {space.output_dim}: D cannot have rank QN, the bound "
            "T_eps does not apply", UserWarning, stacklevel=2,
        )
    else:
        s = st.singular_values("svd" if dense_svd_fits(space.output_dim, space.dim) else "ntk")
        metric = getattr(space, "metric", None)
        tau = rank_threshold(float(s[0]), getattr(metric, "rank_rtol", 1e-6),
                             getattr(metric, "rank_atol", None))
        rank = int((s > tau).sum())
        if rank < space.output_dim:
            warnings.warn(
                f"D is rank-deficient at the initial point (rank {rank} < QN = "
                f"{space.output_dim}): the bound T_eps does not apply",
                UserWarning, stacklevel=2,
            )
    c0 = float(st.cost)
    return 0.0 if c0 <= eps else 0.5 * math.log(c0 / eps)


def _line(traj: Trajectory) -> tuple[Tensor, Tensor, Tensor]:
    """The straight line :math:`t y + (1-t) x(0)` at the saved times, :math:`x(0)`, :math:`y`."""
    if len(traj) == 0:
        raise ValueError("the trajectory has no saved points")
    x0 = traj.outputs[0].to(torch.float64)
    y = traj.targets.to(torch.float64)
    t = traj.t.to(torch.float64)[:, None]
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
    res = (traj.outputs.to(torch.float64) - line).norm(dim=1) / scale
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
    s, c = traj.s.to(torch.float64), traj.cost.to(torch.float64)
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


def _range_basis(space, theta: Tensor) -> tuple[Tensor, Tensor]:
    """Left singular vectors of :math:`D[\\theta]` and its singular values (float64)."""
    st = space.point_state(theta)
    if dense_svd_fits(space.output_dim, space.dim):
        u, s, _ = st.svd
    else:
        u, s = st.ntk_eigh
    return u.to(torch.float64), s.to(torch.float64)


def _projector(space, theta: Tensor, tau: float | None = None, rank: int | None = None) -> Tensor:
    r"""Orthogonal projector :math:`P` on :math:`\operatorname{ran}D[\theta]` (``[QN, QN]``).

    Spanned by the left singular vectors with :math:`\sigma_i > \tau`, or by
    the top ``rank`` of them.
    """
    u, s = _range_basis(space, theta)
    if rank is None:
        rank = int((s > (0.0 if tau is None else tau)).sum())
    u = u[:, :rank]
    return u @ u.T


def _expm_sym(a: Tensor) -> Tensor:
    r""":math:`\exp(A)` of a symmetric matrix, through its eigendecomposition."""
    evals, evecs = torch.linalg.eigh(0.5 * (a + a.T))
    return (evecs * torch.exp(evals)) @ evecs.T


def interpolation_deviation(traj: Trajectory, space) -> InterpolationDeviation:
    r"""Deviation :math:`z(t)` from the straight line, on :math:`\operatorname{ran}D` and off it.

    With :math:`\tilde x(t) = x(s(t))`, :math:`t = 1 - e^{-s}`,

    .. math:: z(t) = \tilde x(t) - \bigl(t\,y + (1-t)\,x(0)\bigr)
              = x(s) - y - e^{-s}(x(0) - y),

    split as :math:`z = Pz + P^\perp z` with :math:`P` the projector on
    :math:`\operatorname{ran}D` at the same point (threshold ``traj.rank_tau``).
    For MSE and :math:`\lambda = 1`, :math:`\partial_s(x - y) = -P(x - y)`, so
    :math:`x(s) - y = e^{-s}U(s)(x(0) - y)` with the propagator
    :math:`\partial_s U = P^\perp(s)U`, :math:`U(0) = 1`, and (2.58–2.59)

    .. math:: z(t) = (1-t)\bigl(U(t, 0) - 1\bigr)(x(0) - y)
              = (1-t)\int_0^t U(t,t')P^\perp(t')(x(0)-y)\,\frac{dt'}{1-t'}.

    This function recomputes :math:`P` at every saved point (one
    factorization each), integrates :math:`U` along the stored path with the
    exponential midpoint rule :math:`U_{n} = \exp\bigl(\tfrac{h}{2}(P^\perp_{n-1}
    + P^\perp_n)\bigr)U_{n-1}` (second order in the spacing :math:`h`; exact
    when :math:`P` is constant; carried out on the bounded :math:`e^{-s}U`),
    splitting an interval at each recorded rank event where :math:`P` jumps,
    and compares :math:`z` with the prediction.
    With full rank :math:`P^\perp = 0`: :math:`U = 1` and the prediction is
    :math:`z = 0` (Prop 2.4).

    Parameters
    ----------
    traj : Trajectory
        A flow on ``space``.  The propagator error is :math:`O(h^2|\partial_s P|)`
        for a saved spacing :math:`h`: save densely (``save_at``) for a tight check.
    space : ParameterSpace
        The space the flow ran on (for :math:`D` at the saved points).

    Returns
    -------
    InterpolationDeviation
        ``propagator_error`` is :math:`\max_t|z - z_{\rm prop}|/|x(0) - y|`.
    """
    line, x0, y = _line(traj)
    z = traj.outputs.to(torch.float64) - line
    qn = z.shape[1]
    dev = z.device
    eye = torch.eye(qn, dtype=torch.float64, device=dev)
    perps = [eye - _projector(space, th, traj.rank_tau).to(dev) for th in traj.theta]
    z_perp = torch.stack([q @ zz for q, zz in zip(perps, z)]) if len(z) else z.clone()
    z_range = z - z_perp
    events = sorted(traj.events, key=lambda e: e.s)
    # W = e^{-s} U, with dW/ds = -P W (bounded, unlike U); exp of the symmetric generator
    # by eigh (accurate to round-off, unlike a Pade exponential of a small matrix)
    w = eye.clone()
    r0 = x0 - y
    preds = [torch.zeros(qn, dtype=torch.float64, device=dev)]
    for n in range(1, len(perps)):
        s_a, s_b = float(traj.s[n - 1]), float(traj.s[n])
        # pieces [s_a, e_1], [e_1, e_2], ..., [e_m, s_b] split at the rank events inside
        nodes: list[tuple[float, Tensor, Tensor]] = [(s_a, perps[n - 1], perps[n - 1])]
        for e in events:
            if s_a < e.s < s_b:
                before = eye - _projector(space, e.theta, rank=e.rank_before).to(dev)
                after = eye - _projector(space, e.theta, rank=e.rank_after).to(dev)
                nodes.append((e.s, before, after))
        nodes.append((s_b, perps[n], perps[n]))
        for (sa, _, qa), (sb, qb, _) in zip(nodes, nodes[1:]):
            if sb > sa:
                w = _expm_sym(-0.5 * (sb - sa) * ((eye - qa) + (eye - qb))) @ w
        preds.append(w @ r0 - math.exp(-float(traj.s[n])) * r0)
    z_prop = torch.stack(preds)[: len(z)]
    scale = float(r0.norm()) or 1.0
    err = float((z - z_prop).norm(dim=1).max()) / scale if len(z) else 0.0
    zmax = float(z.norm(dim=1).max()) if len(z) else 0.0
    frac = float(z_prop.norm(dim=1).max()) / zmax if zmax > 0 else math.nan
    lam = traj.metric.get("lam")
    applies = traj.loss == "mse" and lam == 1.0
    return InterpolationDeviation(traj.s, traj.t, z, z_range, z_perp, z_prop, err, frac, applies)
