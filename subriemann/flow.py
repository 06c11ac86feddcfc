r"""Gradient flows :math:`\partial_s\theta = -\operatorname{grad}C(\theta)` of any metric.

The vector field is ``-metric.gradient(theta)``: a flow knows its metric only
through ``gradient``, ``singular_values`` and the rank threshold.
Integrators (a small registry behind :func:`gradient_flow`):

* ``"dopri5"`` (default): adaptive Dormand–Prince 5(4) with error control
  :math:`\|e\|_{\rm rms} \le 1` on
  :math:`e_i = \mathrm{err}_i/(\mathrm{atol} + \mathrm{rtol}\max(|\theta_i|, |\theta_i'|))`;
* ``"rk4"``: classical fixed-step Runge–Kutta (order 4);
* ``"euler"``: explicit Euler, :math:`\theta_{n+1} = \theta_n - \eta\,\operatorname{grad}C`.
  For :math:`g_\lambda` this *is* discrete training: the Levenberg–Marquardt step
  :math:`\theta_{n+1} = \theta_n - \tfrac{\eta}{\lambda}(\varepsilon 1 + D^\top D)^{-1}
  D^\top\nabla_xC` with damping :math:`\varepsilon = (1-\lambda)/\lambda`, the damped
  Gauss–Newton step :math:`-\eta D^+\nabla_xC` at :math:`\lambda = 1` (for
  MSE and a linear model of full rank :math:`QN` it contracts the residual
  exactly by :math:`1-\eta`, MATH.md §3) and plain gradient descent at
  :math:`\lambda = 0`.

**Rank events** (MATH.md §5).  The numerical rank of :math:`D` (the number of
:math:`\sigma_i > \tau`) is monitored at every accepted step with a threshold
:math:`\tau` that stays fixed along the flow (MATH.md §7).  When it changes
across a step, the crossing of the smooth function :math:`\sigma_k(s) - \tau`
is localized by a safeguarded regula falsi (Illinois) bracketing search on
sub-steps of the same integrator that use the vector field of the stratum the
step started on (the *old branch*), and recorded as a
:class:`~subriemann.trajectory.RankChange`.  Where a singular value approaches
:math:`\tau`, steps are capped so that it moves at most half its distance to
:math:`\tau` (but at least ``1e-3`` :math:`\tau`) per step, so a dip below
:math:`\tau` and back within one natural step is not skipped.  At
:math:`\lambda = 1` the vector field jumps at a rank change; a step across the
jump that fails error control is cut at the crossing and the flow continues on
the new stratum.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from subriemann.trajectory import FlowStatus, RankChange, Trajectory

__all__ = ["gradient_flow", "METHODS", "RANK_METHODS"]

METHODS = ("dopri5", "rk4", "euler")
"""The integrators of :func:`gradient_flow`."""

RANK_METHODS = ("auto", "metric", "ntk")
"""How the rank monitor computes singular values (see :func:`gradient_flow`)."""

# Dormand–Prince 5(4) tableau.
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
# 5th minus 4th order weights (the 7th stage is the FSAL stage f(theta_1)).
_E = (
    71 / 57600,
    0.0,
    -71 / 16695,
    71 / 1920,
    -17253 / 339200,
    22 / 525,
    -1 / 40,
)

# A singular value approaching tau moves at most max(gap / 2, _CAP_BAND * tau) per step.
_CAP_BAND = 1e-3
# Consecutive non-finite evaluations (each shrinking the step 4x) before "nonfinite".
_MAX_NONFINITE = 25
# Consecutive rejected steps before "step_size_collapsed" (a safety net: h shrinks by at
# least 4x per rejection and collapses long before).
_MAX_REJECTIONS = 200
# Options that may differ between a run and its resumption (budgets and presentation).
_RESUME_FREE = ("max_steps", "max_time", "checkpoint_every", "progress")


class _Failure(Exception):
    """The vector field or the singular values could not be evaluated (NaN/inf)."""


class _State(NamedTuple):
    """The committed integrator state: replaced in one assignment per accepted step."""

    s: float
    theta: Tensor
    f: Tensor  # vector field at theta
    sv: Tensor  # singular values of D at theta
    rank: int
    n_steps: int
    grid_index: int  # next save time to land on
    s_prev: float  # start of the last accepted step (for the rate of sigma)
    sv_prev: Tensor | None
    h: float | None  # proposed next step
    n_rec: int  # committed saved points
    n_events: int  # committed events


class _Row(NamedTuple):
    s: float
    theta: Tensor
    x: Tensor
    c: float
    v: float
    sv: Tensor
    r: int


_MEMBER = threading.local()
"""``lockstep``: set in the threads of a batch of flows (see :func:`_run_batch`)."""


def _compute(fl: _Flow, kind: str, theta: Tensor) -> Any:
    """What a flow asks at ``theta`` (see :meth:`_Flow.evaluate`)."""
    if kind == "field":
        return fl.metric.gradient(theta)
    if kind == "sv":
        if fl.cheap_sv:
            return fl.space.point_state(theta).singular_values("ntk")
        return fl.metric.singular_values(theta)
    st = fl.space.point_state(theta)
    return st.outputs, float(st.cost)


def _serve_round(requests: Sequence[tuple[_Flow, str, Tensor]]) -> list[tuple[bool, Any]]:
    """One lock-step round: batched vector fields first, then every answer from the caches."""
    from subriemann.linalg import prefill_states
    from subriemann.metrics.builtin import EuclideanMetric, InterpolatedMetric

    fields = [(fl, th) for fl, kind, th in requests if kind == "field"]
    if len(fields) > 1:
        fl0 = fields[0][0]
        m = fl0.metric  # the members' metrics are copies of one metric
        # which cache entries the vector field reads (filling them is only a cache fill)
        euclidean = isinstance(m, EuclideanMetric) or (
            isinstance(m, InterpolatedMetric) and m.lam == 0.0 and m._lam0_is_euclidean
        )
        need = "cost_grad" if euclidean else "svd" if getattr(m, "solver", "") == "svd" else None
        if need is not None:
            try:
                prefill_states(fl0.space, torch.stack([th for _, th in fields]), need)
            except Exception:  # noqa: BLE001  (the single-point route below reports it)
                pass
    out: list[tuple[bool, Any]] = []
    for fl, kind, th in requests:
        try:
            out.append((True, _compute(fl, kind, th)))
        except Exception as err:  # noqa: BLE001  (raised again in the member's thread)
            out.append((False, err))
    return out


class _Flow:
    """One flow's integrator and records (internal)."""

    def __init__(self, space, metric, s_end: float, opts: dict[str, Any]) -> None:
        self.space, self.metric, self.s_end, self.o = space, metric, float(s_end), opts
        self.nfev = 0
        self.n_rejected = 0
        self.rec: list[_Row] = []
        self.events: list[RankChange] = []
        self.tau = 0.0
        self.v0norm = 0.0
        self.wall_before = 0.0
        self.description: dict[str, Any] = metric.description()
        self.cheap_sv = False
        self.field_jumps = True
        self.state: _State | None = None
        self.lockstep: Any = None  # a LockStep when integrated in a batch

    # -- evaluation ----------------------------------------------------------------
    def field(self, theta: Tensor) -> Tensor:
        """:math:`-\\operatorname{grad}C(\\theta)`; raises :class:`_Failure` on NaN/inf."""
        from subriemann.space import NonFiniteError

        self.nfev += 1
        try:
            v = self.evaluate("field", theta)
        except (NonFiniteError, torch.linalg.LinAlgError) as err:
            raise _Failure(f"{type(err).__name__}: {err}") from None
        if not bool(torch.isfinite(v).all()):
            raise _Failure("the vector field is NaN or inf")
        return -v.detach()

    def sv(self, theta: Tensor) -> Tensor:
        """Singular values of :math:`D[\\theta]`, descending; raises :class:`_Failure` on NaN."""
        from subriemann.space import NonFiniteError

        try:
            s = self.evaluate("sv", theta)
        except (NonFiniteError, torch.linalg.LinAlgError) as err:
            raise _Failure(f"singular values of D: {type(err).__name__}: {err}") from None
        if not bool(torch.isfinite(s).all()):
            raise _Failure("the Jacobian D is NaN or inf")
        return s.detach()

    def evaluate(self, kind: str, theta: Tensor) -> Any:
        """``"field"``, ``"sv"`` or ``"point"`` at ``theta``: here, or in the lock-step round."""
        if self.lockstep is not None:
            return self.lockstep.request(self, kind, theta)
        return _compute(self, kind, theta)

    def rank_of(self, sv: Tensor) -> int:
        return int((sv > self.tau).sum())

    def row(self, s: float, theta: Tensor, f: Tensor, sv: Tensor | None) -> _Row:
        """A saved point (``sv=None``: computed here, when the rank is not monitored)."""
        if sv is None:
            sv = self.sv(theta)
        x, cost = self.evaluate("point", theta)
        return _Row(
            s,
            theta.detach().clone(),
            x.detach().clone(),
            cost,
            float(f.norm()),
            sv.clone(),
            self.rank_of(sv),
        )

    # -- one step --------------------------------------------------------------------
    def step(self, theta: Tensor, f0: Tensor, h: float) -> tuple[Tensor, Tensor, float]:
        """One step of size ``h`` from ``theta``: ``(theta_1, f(theta_1), error_norm)``."""
        method = self.o["method"]
        if method == "euler":
            y1 = theta + h * f0
            return y1, self.field(y1), 0.0
        if method == "rk4":
            k2 = self.field(theta + 0.5 * h * f0)
            k3 = self.field(theta + 0.5 * h * k2)
            k4 = self.field(theta + h * k3)
            y1 = theta + (h / 6.0) * (f0 + 2 * k2 + 2 * k3 + k4)
            return y1, self.field(y1), 0.0
        ks = [f0]
        y1 = theta
        for i in range(1, 7):
            y1 = theta + h * sum(a * k for a, k in zip(_A[i], ks) if a != 0.0)
            ks.append(self.field(y1))
        errv = h * sum(e * k for e, k in zip(_E, ks) if e != 0.0)
        scale = self.o["atol"] + self.o["rtol"] * torch.maximum(theta.abs(), y1.abs())
        err = float(torch.sqrt(torch.mean((errv / scale) ** 2)))
        return y1, ks[6], err

    def initial_step(self, theta: Tensor, f0: Tensor) -> float:
        """Hairer–Wanner's starting step for an order-5 method (one extra evaluation)."""
        sc = self.o["atol"] + self.o["rtol"] * theta.abs()
        d0 = float(torch.sqrt(torch.mean((theta / sc) ** 2)))
        d1 = float(torch.sqrt(torch.mean((f0 / sc) ** 2)))
        h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
        h0 = min(h0, self.s_end)
        try:
            f1 = self.field(theta + h0 * f0)
        except _Failure:
            return h0 * 1e-3
        d2 = float(torch.sqrt(torch.mean(((f1 - f0) / sc) ** 2))) / h0
        h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / 5)
        return min(100 * h0, h1, self.s_end)

    # -- events ----------------------------------------------------------------------
    def old_branch_tau(self, sv0: Tensor, k: int, falling: bool) -> float:
        r"""A threshold :math:`\tau'` on the side of :math:`\sigma_k` where :math:`\tau` starts.

        Sub-steps with :math:`\tau'` continue the vector field of the stratum
        the step started on (only :math:`\lambda = 1` fields depend on it).
        """
        tau = self.tau
        if falling:  # sigma_k drops below tau: keep it with tau' < tau
            below = float(sv0[k + 1]) if k + 1 < sv0.numel() else 0.0
            return math.sqrt(tau * below) if below > 1e-6 * tau else 1e-3 * tau
        above = float(sv0[k - 1]) if k >= 1 else math.inf  # rises: keep excluding it
        return math.sqrt(tau * above) if math.isfinite(above) else 1e3 * tau

    def substep(self, y0: Tensor, f0: Tensor, a: float, tau_old: float) -> tuple[Tensor, float]:
        """The point at ``s0 + a`` on the old branch, and the sub-step's error norm."""
        if a == 0.0:
            return y0, 0.0
        if self.o["method"] == "euler":  # the Euler path is piecewise linear
            return y0 + a * f0, 0.0
        saved = self.metric.rank_atol
        self.metric.rank_atol = tau_old
        try:
            y, _, err = self.step(y0, f0, a)
        finally:
            self.metric.rank_atol = saved
        return y, err

    def locate(self, s0: float, y0: Tensor, f0: Tensor, h: float, k: int, sv0: Tensor,
               sv1: Tensor, y1: Tensor | None
               ) -> tuple[RankChange, Tensor, Tensor, float] | None:
        r"""Localize the crossing of :math:`\sigma_k - \tau` inside the step ``[s0, s0 + h]``.

        A regula falsi with the Illinois modification, falling back to
        bisection whenever the bracket does not halve, until the bracket is at
        most ``event_tol`` wide.  ``y1`` is the accepted end of the step, or
        ``None`` for a rejected step (then the end is the old-branch sub-step,
        and ``None`` is returned when :math:`\sigma_k` does not cross on it).
        Returns the event, the point just after the crossing, its singular
        values and the error norm of the sub-step that reaches it.
        """
        tau = self.tau
        above0 = bool(sv0[k] > tau)
        tau_old = self.old_branch_tau(sv0, k, falling=above0)
        lo, hi = 0.0, h
        g_lo, g_hi = float(sv0[k]) - tau, float(sv1[k]) - tau
        sv_lo, sv_hi = sv0, sv1
        y_hi: Tensor | None = None
        err_hi = 0.0
        tol = self.o["event_tol"]
        width_before = [hi - lo, hi - lo]  # widths one and two iterations ago
        last_side = 0
        for _ in range(200):
            width = hi - lo
            if width <= tol:
                break
            if width > 0.5 * width_before[0] or g_lo == g_hi:  # no halving in two steps
                mid = 0.5 * (lo + hi)
            else:
                mid = lo + width * g_lo / (g_lo - g_hi)
                margin = min(0.25 * tol, 0.01 * width)
                mid = min(max(mid, lo + margin), hi - margin)
            width_before = [width_before[1], width]
            ym, err_m = self.substep(y0, f0, mid, tau_old)
            svm = self.sv(ym)
            gm = float(svm[k]) - tau
            if (gm > 0) == above0:
                lo, g_lo, sv_lo = mid, gm, svm
                if last_side == -1:
                    g_hi *= 0.5  # Illinois: halve the retained end's value
                last_side = -1
            else:
                hi, g_hi, sv_hi, y_hi, err_hi = mid, gm, svm, ym, err_m
                if last_side == 1:
                    g_lo *= 0.5
                last_side = 1
        if y_hi is None:
            if y1 is not None and hi == h:
                y_hi, sv_hi = y1, sv1
            else:
                y_hi, err_hi = self.substep(y0, f0, hi, tau_old)
                sv_hi = self.sv(y_hi)
                if (float(sv_hi[k]) > tau) == above0:
                    return None  # no crossing on the old branch within the step
        r_before = self.rank_of(sv_lo)
        r_after = self.rank_of(sv_hi)
        ev = RankChange(
            s=s0 + 0.5 * (lo + hi),
            theta=y_hi.detach().clone(),
            rank_before=r_before,
            rank_after=r_after,
            singular_values_before=sv_lo.clone(),
            singular_values_after=sv_hi.clone(),
            index=k,
            tau=tau,
            s_bracket=hi - lo,
        )
        return ev, y_hi, sv_hi, err_hi

    def crossings(self, sv0: Tensor, sv1: Tensor) -> list[int]:
        """Indices :math:`k` with :math:`\\sigma_k - \\tau` of opposite signs at the ends."""
        side0, side1 = sv0 > self.tau, sv1 > self.tau
        return [int(i) for i in torch.nonzero(side0 != side1).flatten()]

    def cap_near_tau(self, h: float, st: _State) -> float:
        """Cap the step so no singular value approaching tau moves more than half its distance."""
        tau = self.tau
        if st.sv_prev is None or st.s <= st.s_prev or tau <= 0.0:
            return h
        rate = (st.sv - st.sv_prev) / (st.s - st.s_prev)
        gap = st.sv - tau
        mask = (gap * rate < 0) & (rate != 0)
        if not bool(mask.any()):
            return h
        # at least _CAP_BAND * tau: a crossing is allowed (no Zeno approach), but a dip of
        # depth above _CAP_BAND * tau below tau and back is sampled inside.
        allowed = torch.clamp(0.5 * gap[mask].abs(), min=_CAP_BAND * tau)
        cap = float((allowed / rate[mask].abs()).min())
        return min(h, max(cap, self.o["min_event_step"]))  # never lengthens the step

    # -- checkpoint ---------------------------------------------------------------
    def integrator_state(self) -> dict[str, Any]:
        st = self.state
        assert st is not None
        arrays = {"theta": st.theta, "f": st.f, "sv": st.sv}
        if st.sv_prev is not None:
            arrays["sv_prev"] = st.sv_prev
        return {
            "meta": {
                "s": st.s,
                "h": st.h,
                "rank": st.rank,
                "n_steps": st.n_steps,
                "grid_index": st.grid_index,
                "s_prev": st.s_prev,
                "n_rec": st.n_rec,
                "n_events": st.n_events,
                "v0norm": self.v0norm,
                "nfev": self.nfev,
                "n_rejected": self.n_rejected,
                "cheap_sv": self.cheap_sv,
                "description": self.description,
            },
            "arrays": arrays,
        }


def _trajectory(fl: _Flow, status: FlowStatus, wall: float) -> Trajectory:
    sp = fl.space
    rows = fl.rec
    dtype = sp.dtype
    m = min(sp.output_dim, sp.dim)
    st = fl.state
    return Trajectory(
        s=torch.tensor([r.s for r in rows], dtype=torch.float64),
        theta=torch.stack([r.theta for r in rows]) if rows else torch.zeros(0, sp.dim, dtype=dtype),
        outputs=torch.stack([r.x for r in rows])
        if rows
        else torch.zeros(0, sp.output_dim, dtype=dtype),
        cost=torch.tensor([r.c for r in rows], dtype=dtype),
        grad_norm=torch.tensor([r.v for r in rows], dtype=dtype),
        singular_values=torch.stack([r.sv for r in rows])
        if rows
        else torch.zeros(0, m, dtype=dtype),
        rank=torch.tensor([r.r for r in rows], dtype=torch.int64),
        targets=sp.y.detach().clone(),
        rank_rtol=fl.metric.rank_rtol,
        rank_tau=fl.tau,
        events=list(fl.events),
        status=status,
        metric=dict(fl.description),
        num_samples=sp.num_samples,
        num_outputs=sp.num_outputs,
        loss=getattr(sp.loss, "name", type(sp.loss).__name__),
        counters={
            "nfev": fl.nfev,
            "n_steps": 0 if st is None else st.n_steps,
            "n_rejected": fl.n_rejected,
            "wall_time": fl.wall_before + wall,
        },
        settings=_settings(fl),
    )


def _settings(fl: _Flow) -> dict[str, Any]:
    """The solver options as recorded in a trajectory."""
    save_at = fl.o["save_at"]
    return {k: v for k, v in fl.o.items() if k != "save_at"} | {
        "s_end": fl.s_end,
        "save_at": None if save_at is None else list(save_at),
    }


def _check_number(name: str, val: Any, *, positive: bool = False, allow_inf: bool = False) -> float:
    if isinstance(val, bool) or not isinstance(val, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(val).__name__}")
    val = float(val)
    ok = (val > 0 if positive else val >= 0) and (math.isfinite(val) or (allow_inf and val > 0))
    if not ok:
        kind = "positive" if positive else "non-negative"
        fin = "" if allow_inf else "finite "
        raise ValueError(f"{name} must be a {kind} {fin}number, got {val}")
    return val


def _check_int(name: str, val: Any, minimum: int) -> int:
    if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {val!r}")
    return int(val)


def gradient_flow(
    space,
    initial_point: Tensor,
    s_end: float,
    *,
    method: str = "dopri5",
    rtol: float = 1e-8,
    atol: float = 1e-10,
    step_size: float | None = None,
    first_step: float | None = None,
    max_step: float = math.inf,
    save_at: Sequence[float] | None = None,
    min_saves: int = 50,
    cost_tol: float | None = None,
    stall_tol: float = 1e-12,
    max_steps: int | None = None,
    max_time: float | None = None,
    monitor_rank: bool = True,
    stop_on_rank_change: bool = False,
    event_tol: float = 1e-9,
    fixed_threshold: bool = True,
    rank_method: str = "auto",
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 50,
    resume: str | Path | None = None,
    progress: bool = False,
    metric=None,
) -> Trajectory | list[Trajectory]:
    r"""Integrate the gradient flow :math:`\partial_s\theta = -\operatorname{grad}C(\theta)`.

    For the metric :math:`g_\lambda` the vector field is
    :math:`V_\lambda = -g_\lambda^+D^\top\nabla_xC` (MATH.md §2); for MSE and
    :math:`\lambda = 1` with :math:`\operatorname{rank}D = QN` the outputs obey
    :math:`x(s) = y + e^{-s}(x(0) - y)` (MATH.md §3), which the diagnostics of
    :mod:`subriemann.analysis` check.

    Parameters
    ----------
    space : ParameterSpace
        Equipped with the metric whose gradient defines the flow (or pass ``metric``).
    initial_point : Tensor, shape=[K] or [B, K]
        :math:`\theta(0)`.  A batch ``[B, K]`` returns a list of ``B``
        trajectories, one per initial point, integrated together
        (:mod:`subriemann.lockstep`): each flow keeps its own steps, events
        and status, and every round of vector-field evaluations is one
        vectorised computation (``vmap`` over the points, batched QR/SVD)
        for the Euclidean metric, :math:`\lambda = 0`, and the ``"svd"``
        solver; other metrics are evaluated point by point in the same
        rounds.  Each trajectory agrees with the single run from its point up
        to rounding.
    s_end : float
        Final flow time, :math:`> 0`.
    method : {"dopri5", "rk4", "euler"}
        Integrator (see the module docstring).
    rtol, atol : float
        Error control of ``"dopri5"`` on :math:`\theta`.
    step_size : float, optional
        Step of ``"rk4"`` / ``"euler"`` (default ``s_end / 200``).
    first_step, max_step : float, optional
        Initial and largest step of ``"dopri5"``.
    save_at : sequence of float, optional
        Save exactly at these times in :math:`[0, s_{\rm end}]` (steps are
        shortened to land on them).  :math:`s = 0` is always saved (the
        diagnostics need :math:`x(0)`), and so is the last good state when the
        flow stops before ``s_end``.  Default: every accepted step, plus (for
        ``"dopri5"``) at least ``min_saves`` evenly spaced times, so at least
        ``min_saves`` points when the flow reaches ``s_end``.  The fixed-step
        methods are not shortened to land on these times: they save their
        ``ceil(s_end / step_size) + 1`` points (201 by default).
    min_saves : int
        See ``save_at``.
    cost_tol : float, optional
        Stop ("cost_tol_reached") once :math:`C \le` ``cost_tol``.
    stall_tol : float
        Stop ("equilibrium_reached") once :math:`|V| \le` ``stall_tol`` :math:`|V(0)|`.
    max_steps : int, optional
        Budget of accepted steps ("max_steps_reached"; resumable).
    max_time : float, optional
        Budget of wall time in seconds ("max_time_reached"; resumable).
    monitor_rank : bool
        Watch the numerical rank of :math:`D` at every accepted step, cap the
        steps near :math:`\tau` and record rank changes (``events``).
    stop_on_rank_change : bool
        Stop at the first rank change (status ``"rank_change"``), at the point
        just after the crossing.
    event_tol : float
        Width in :math:`s` of the final bracket of a rank event.
    fixed_threshold : bool
        Keep the rank threshold fixed at
        :math:`\tau = \mathrm{rank\_rtol}\,\sigma_{\max}(\theta(0))` (or the
        metric's ``rank_atol``).  A threshold that moves makes the vector
        field discontinuous; ``False`` recomputes it at every step.
    rank_method : {"auto", "metric", "ntk"}
        How the monitor computes singular values: ``"metric"`` uses
        ``metric.singular_values`` (the factorization the vector field uses);
        ``"ntk"`` the eigenvalues of the smaller Gram matrix :math:`DD^\top`
        or :math:`D^\top D` (cheap, resolves
        :math:`\sigma \gtrsim 10^{-7}\sigma_{\max}`); ``"auto"`` is
        ``"metric"`` except for :math:`\lambda = 0` metrics (whose vector field
        needs no factorization) with a threshold the Gram matrix resolves.
        The singular values are computed at accepted steps, and at rejected
        ones only where the vector field may jump at a rank change
        (:math:`\lambda = 1`, bundle and custom metrics).
    checkpoint : path, optional
        Write the trajectory so far and the integrator state there every
        ``checkpoint_every`` accepted steps, on interruption and at the end.
    checkpoint_every : int
        See ``checkpoint``.
    resume : path, optional
        Continue from a checkpoint written by a previous run with the same
        options (budgets ``max_steps``/``max_time``, ``checkpoint_every`` and
        ``progress`` may differ).  A run that was interrupted or stopped by a
        budget continues step for step as the uninterrupted run; one that had
        finished is returned as it is; a missing file starts afresh.
    progress : bool
        Show a progress bar (tqdm).
    metric : ParameterMetric, optional
        Defaults to ``space.metric``.

    Returns
    -------
    Trajectory or list of Trajectory
        With ``status`` saying why the flow stopped (codes in
        :data:`subriemann.trajectory.STATUS_CODES`); on failure (NaN/inf,
        collapsing step) or ``KeyboardInterrupt`` the trajectory up to the
        last good state.

    Raises
    ------
    TypeError, ValueError
        On invalid arguments (checked before any work), and ``ValueError``
        when the vector field is not finite at ``initial_point``.

    Examples
    --------
    >>> import torch, subriemann as sr
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    >>> space = sr.ParameterSpace(net, torch.randn(4, 2), torch.randn(4, 1))
    >>> space = space.equip_with_metric(sr.metrics.OutputPullbackMetric)
    >>> traj = sr.gradient_flow(space, space.initial_point(), s_end=3.0, rtol=1e-10, atol=1e-12)
    >>> traj.status.code
    's_end_reached'
    >>> ratio = float(traj.cost[-1] / traj.cost[0])   # C(s) = e^{-2s} C(0)
    >>> abs(ratio / float(torch.exp(torch.tensor(-6.0))) - 1) < 1e-6
    True
    """
    from subriemann.space import ParameterSpace

    if not isinstance(space, ParameterSpace):
        raise TypeError(f"space must be a subriemann.ParameterSpace, got {type(space).__name__}")
    if not isinstance(initial_point, Tensor):
        raise TypeError(f"initial_point must be a torch.Tensor, got {type(initial_point).__name__}")
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(rank_method, str) or rank_method not in RANK_METHODS:
        raise ValueError(f"rank_method must be one of {RANK_METHODS}, got {rank_method!r}")
    s_end = _check_number("s_end", s_end, positive=True)
    rtol = _check_number("rtol", rtol)
    atol = _check_number("atol", atol)
    stall_tol = _check_number("stall_tol", stall_tol)
    event_tol = _check_number("event_tol", event_tol, positive=True)
    max_step = _check_number("max_step", max_step, positive=True, allow_inf=True)
    if method == "dopri5" and rtol == 0 and atol == 0:
        raise ValueError("rtol and atol cannot both be 0")
    if method != "dopri5":
        step_size = s_end / 200 if step_size is None else _check_number(
            "step_size", step_size, positive=True
        )
    elif step_size is not None:
        raise ValueError('step_size is for method="rk4" or "euler"; dopri5 adapts its step')
    if first_step is not None:
        first_step = _check_number("first_step", first_step, positive=True)
    if cost_tol is not None:
        cost_tol = _check_number("cost_tol", cost_tol)
    if max_time is not None:
        max_time = _check_number("max_time", max_time)
    if max_steps is not None:
        max_steps = _check_int("max_steps", max_steps, 0)
    min_saves = max(_check_int("min_saves", min_saves, 0), 2)
    checkpoint_every = _check_int("checkpoint_every", checkpoint_every, 1)
    if save_at is not None:
        try:
            grid = sorted({float(v) for v in save_at})
        except (TypeError, ValueError):
            raise TypeError("save_at must be a sequence of numbers") from None
        bad = [v for v in grid if not (math.isfinite(v) and 0.0 <= v <= s_end)]
        if not grid or bad:
            raise ValueError(
                f"save_at must be a non-empty list of times in [0, s_end={s_end}]; "
                f"got {bad[:3] if bad else 'an empty list'}"
            )
    elif method == "dopri5":
        grid = [s_end * i / (min_saves - 1) for i in range(min_saves)]
    else:  # fixed steps are not shortened: every step is saved
        grid = []
    metric = space.metric if metric is None else metric

    if initial_point.ndim == 2:
        if checkpoint is not None or resume is not None:
            raise ValueError("checkpoint/resume take a single initial point [K], not a batch")
        if initial_point.shape[0] == 0:
            raise ValueError("the batch of initial points is empty")
        kwargs = dict(
            method=method, rtol=rtol, atol=atol,
            step_size=None if method == "dopri5" else step_size,
            first_step=first_step, max_step=max_step, save_at=save_at, min_saves=min_saves,
            cost_tol=cost_tol, stall_tol=stall_tol, max_steps=max_steps, max_time=max_time,
            monitor_rank=monitor_rank, stop_on_rank_change=stop_on_rank_change,
            event_tol=event_tol, fixed_threshold=fixed_threshold, rank_method=rank_method,
            progress=progress, metric=metric,
        )
        return _run_batch(space, initial_point, s_end, kwargs)
    theta0 = space.check_point(initial_point).detach().clone()

    opts: dict[str, Any] = dict(
        method=method, rtol=rtol, atol=atol, step_size=step_size,
        first_step=first_step, max_step=max_step, save_at=None if save_at is None else grid,
        min_saves=min_saves, cost_tol=cost_tol, stall_tol=stall_tol,
        max_steps=max_steps, max_time=max_time, monitor_rank=bool(monitor_rank),
        stop_on_rank_change=bool(stop_on_rank_change), event_tol=event_tol,
        fixed_threshold=bool(fixed_threshold), rank_method=rank_method,
        checkpoint_every=checkpoint_every, progress=bool(progress),
        min_event_step=max(1e-10 * s_end, 1e-12),
    )
    fl = _Flow(space, metric, s_end, opts)
    fl.lockstep = getattr(_MEMBER, "lockstep", None)
    saved_atol = metric.rank_atol
    try:
        return _run(fl, theta0, grid, save_at is None, checkpoint, resume, saved_atol)
    finally:
        metric.rank_atol = saved_atol


def _run_batch(space, points: Tensor, s_end: float, kwargs: dict[str, Any]) -> list[Trajectory]:
    """Integrate the flows from ``points`` ``[B, K]`` together (see :mod:`subriemann.lockstep`).

    Each flow runs the single-flow engine in its own thread with its own copy
    of the metric (its threshold is its own); every network evaluation is
    served in this thread, in rounds, by :func:`_serve_round`.
    """
    import copy

    from subriemann.lockstep import LockStep

    points = torch.stack([space.check_point(p) for p in points])
    metric = kwargs.pop("metric")
    n = points.shape[0]
    results: list[Any] = [None] * n
    lock = LockStep(n, _serve_round, _compute)

    def member(i: int) -> None:
        try:
            _MEMBER.lockstep = lock  # this thread's flow posts its evaluations to the rounds
            results[i] = gradient_flow(space, points[i], s_end, metric=copy.copy(metric), **kwargs)
        except BaseException as err:  # noqa: BLE001  (re-raised by the caller below)
            results[i] = err
        finally:
            lock.finished()

    saved_size = space._state_cache_size
    space._state_cache_size = max(saved_size, 4 * n)
    threads = [threading.Thread(target=member, args=(i,), daemon=True) for i in range(n)]
    try:
        for t in threads:
            t.start()
        try:
            lock.serve()
        except KeyboardInterrupt:
            pass  # every member stops at its next request and keeps its trajectory
        for t in threads:
            t.join()
    finally:
        space._state_cache_size = saved_size
        del space.__dict__.setdefault("_states", [])[saved_size:]
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def _use_cheap_sv(fl: _Flow) -> bool:
    from subriemann.metrics.builtin import BundleMetric

    rm = fl.o["rank_method"]
    if rm == "metric":
        return False
    if rm == "ntk":
        return True
    return getattr(fl.metric, "lam", None) == 0.0 and not isinstance(fl.metric, BundleMetric)


def _field_jumps(fl: _Flow) -> bool:
    r"""Whether the vector field may jump where the rank changes (it depends on tau).

    Not for :math:`g_\lambda`, :math:`\lambda < 1` (every direction is kept), nor
    for the Euclidean metric; conservatively yes for any other metric.
    """
    from subriemann.metrics.builtin import BundleMetric, EuclideanMetric, InterpolatedMetric

    m = fl.metric
    if isinstance(m, EuclideanMetric):
        return False
    if isinstance(m, InterpolatedMetric) and not isinstance(m, BundleMetric):
        return m.lam == 1.0
    return True


def _run(fl: _Flow, theta0: Tensor, grid: list[float], save_all: bool, checkpoint,
         resume, saved_atol: float | None) -> Trajectory:
    o = fl.o
    metric = fl.metric
    start = time.perf_counter()
    moving_tau = saved_atol is None and not o["fixed_threshold"]

    def tau_at(sv: Tensor) -> float:
        if saved_atol is not None:
            return saved_atol
        return metric.rank_rtol * float(sv[0]) if sv.numel() else 0.0

    # -- start or resume ------------------------------------------------------------
    fl.field_jumps = _field_jumps(fl)
    resumed = resume is not None and Path(resume).exists()
    if resumed:
        done = _restore(fl, Path(resume))
        if done is not None:
            return done
        assert fl.state is not None
    else:
        fl.cheap_sv = _use_cheap_sv(fl)
        try:
            sv = fl.sv(theta0)
            if fl.cheap_sv and o["rank_method"] == "auto":
                tau = tau_at(sv)
                if sv.numel() and tau < 1e-7 * float(sv[0]):  # below what the NTK resolves
                    fl.cheap_sv = False
                    sv = fl.sv(theta0)
            fl.tau = tau_at(sv)
            if not moving_tau:
                metric.rank_atol = fl.tau
            f = fl.field(theta0)
        except _Failure as failure:
            raise ValueError(f"the flow cannot start at initial_point: {failure}") from None
        fl.v0norm = float(f.norm())
        fl.rec.append(fl.row(0.0, theta0, f, sv))
        gi = 0
        while gi < len(grid) and grid[gi] <= 0.0:
            gi += 1
        fl.state = _State(
            s=0.0, theta=theta0, f=f, sv=sv, rank=fl.rank_of(sv), n_steps=0, grid_index=gi,
            s_prev=0.0, sv_prev=None, h=o["first_step"] if o["method"] == "dopri5"
            else o["step_size"], n_rec=1, n_events=0,
        )
    if not moving_tau:
        metric.rank_atol = fl.tau  # fixed along the flow; restored by the caller

    bar = None
    if o["progress"]:
        from tqdm.auto import tqdm

        bar = tqdm(total=fl.s_end, desc=fl.description.get("class", "flow"), unit="s",
                   bar_format="{l_bar}{bar}| s={n:.3g}/{total:.3g} [{elapsed}<{remaining}]")
        bar.update(fl.state.s)

    def checkpoint_now(code: str) -> None:
        if checkpoint is not None:
            traj = _trajectory(fl, FlowStatus(code), time.perf_counter() - start)
            traj.save(checkpoint, _extra=fl.integrator_state())

    status: FlowStatus | None = None
    st0 = fl.state
    assert st0 is not None
    if fl.v0norm == 0.0:
        status = FlowStatus("equilibrium_reached", "the vector field vanishes at the initial point")
    elif o["cost_tol"] is not None and not resumed and fl.rec[0].c <= o["cost_tol"]:
        status = FlowStatus("cost_tol_reached", f"C = {fl.rec[0].c:.3e} at s = 0")
    nonfinite_streak = 0
    rejected_before = fl.n_rejected
    last_failure = ""
    try:
        while status is None:
            st = fl.state
            if st.s >= fl.s_end:
                status = FlowStatus("s_end_reached")
                break
            if o["max_steps"] is not None and st.n_steps >= o["max_steps"]:
                status = FlowStatus("max_steps_reached", f"{st.n_steps} accepted steps")
                break
            if o["max_time"] is not None and time.perf_counter() - start > o["max_time"]:
                status = FlowStatus("max_time_reached", f"after {o['max_time']} s of wall time")
                break
            if fl.n_rejected - rejected_before > _MAX_REJECTIONS:
                status = FlowStatus(
                    "step_size_collapsed",
                    f"{_MAX_REJECTIONS} rejected steps in a row at s = {st.s:.9g}",
                )
                break
            h_free = st.h if st.h is not None else fl.initial_step(st.theta, st.f)
            h = min(h_free, o["max_step"])
            if o["monitor_rank"]:
                h = fl.cap_near_tau(h, st)
            on_grid = st.grid_index < len(grid)
            target = grid[st.grid_index] if on_grid else fl.s_end
            landing = st.s + h >= target - 1e-12 * h
            if landing:
                h = target - st.s
            if h <= 16 * np.finfo(float).eps * max(1.0, abs(st.s)):
                if nonfinite_streak:
                    status = FlowStatus("nonfinite", f"at s = {st.s:.9g}: {last_failure}")
                else:
                    status = FlowStatus(
                        "step_size_collapsed",
                        f"step size {h:.3g} at s = {st.s:.9g} (near-singular vector field; "
                        f"sigma_min = {float(st.sv[-1]) if st.sv.numel() else 0.0:.3g}, "
                        f"tau = {fl.tau:.3g})",
                    )
                break
            # -- attempt a step ---------------------------------------------------------
            event_jump: tuple[RankChange, Tensor, Tensor] | None = None
            try:
                y1, f1, err = fl.step(st.theta, st.f, h)
                # rank monitor at accepted steps; at a rejected one only where the vector
                # field may jump at a rank change (a rejection may then be an event)
                watch = o["monitor_rank"] and (err <= 1.0 or fl.field_jumps)
                sv1: Tensor | None = fl.sv(y1) if watch else None
            except _Failure as failure:
                if o["method"] != "dopri5":
                    status = FlowStatus("nonfinite", f"at s = {st.s:.9g}: {failure}")
                    break
                fl.n_rejected += 1
                nonfinite_streak += 1
                last_failure = str(failure)
                if nonfinite_streak >= _MAX_NONFINITE:
                    status = FlowStatus("nonfinite", f"at s = {st.s:.9g}: {failure}")
                    break
                fl.state = st._replace(h=0.25 * h)
                continue
            new_h = st.h
            if o["method"] == "dopri5":
                fac = 5.0 if err == 0 else min(5.0, max(0.2, 0.9 * err ** (-0.2)))
                if err > 1.0:
                    cross = fl.crossings(st.sv, sv1) if sv1 is not None else []
                    if sv1 is None or not cross:
                        fl.n_rejected += 1
                        fl.state = st._replace(h=h * fac)
                        continue
                    # The step crosses a rank change, where the vector field may jump: no
                    # step across it passes error control.  Step to the crossing on the old
                    # branch instead (if that sub-step passes error control) and go on on
                    # the new stratum.
                    try:
                        k = _first_crossing(fl, st, sv1, cross)
                        found = fl.locate(st.s, st.theta, st.f, h, k, st.sv, sv1, None)
                        f_hi = None
                        if found is not None and found[3] <= 1.0:
                            f_hi = fl.field(found[1])
                    except _Failure as failure:
                        fl.n_rejected += 1
                        nonfinite_streak += 1
                        last_failure = str(failure)
                        fl.state = st._replace(h=0.25 * h)
                        continue
                    if found is None or f_hi is None:
                        # no crossing on the old branch, or the sub-step to it is itself
                        # too long: an ordinary rejection
                        fl.n_rejected += 1
                        fl.state = st._replace(h=h * fac)
                        continue
                    ev, y_hi, sv_hi, _ = found
                    event_jump = (ev, y_hi, sv_hi)
                    h = (ev.s - st.s) + 0.5 * ev.s_bracket
                    landing = False
                    y1, f1, sv1 = y_hi, f_hi, sv_hi
                # a step shortened to land on a save time does not shrink the free step
                new_h = max(h_free, h * fac) if landing and fac >= 1.0 else h * fac
            nonfinite_streak = 0
            rejected_before = fl.n_rejected
            # -- accepted: events ------------------------------------------------------
            new_events: list[RankChange] = []
            if event_jump is not None:
                new_events.append(event_jump[0])
            elif sv1 is not None:
                cross = fl.crossings(st.sv, sv1)
                if cross:
                    try:
                        for k in cross:
                            found = fl.locate(st.s, st.theta, st.f, h, k, st.sv, sv1, y1)
                            assert found is not None  # the accepted end is past the crossing
                            new_events.append(found[0])
                    except _Failure as failure:
                        if o["method"] == "dopri5":
                            fl.n_rejected += 1
                            fl.state = st._replace(h=0.25 * h)
                            continue
                        status = FlowStatus("nonfinite", f"at s = {st.s:.9g}: {failure}")
                        break
                    new_events.sort(key=lambda e: e.s)
            s1 = target if landing else st.s + h
            if moving_tau and sv1 is not None:
                fl.tau = tau_at(sv1)
                metric.rank_atol = None
            rows: list[_Row] = []
            stop_here: FlowStatus | None = None
            if new_events and o["stop_on_rank_change"]:
                ev = new_events[0]
                new_events = new_events[:1]
                try:
                    f_ev = f1 if event_jump is not None else fl.field(ev.theta)
                except _Failure as failure:
                    status = FlowStatus("nonfinite", f"at the rank change: {failure}")
                    break
                # theta of the event is the far end of its final bracket
                s1, y1, f1 = ev.s + 0.5 * ev.s_bracket, ev.theta, f_ev
                sv1 = ev.singular_values_after
                landing = False
                stop_here = FlowStatus(
                    "rank_change", f"rank {ev.rank_before} -> {ev.rank_after} at s = {ev.s:.9g}"
                )
            on_grid_landing = landing and on_grid
            if save_all or on_grid_landing or stop_here is not None:
                try:
                    if sv1 is None:  # not monitored: singular values at saved points only
                        sv1 = fl.sv(y1)
                except _Failure as failure:
                    status = FlowStatus("nonfinite", f"at s = {s1:.9g}: {failure}")
                    break
                rows.append(fl.row(s1, y1, f1, sv1))
            if sv1 is None:
                sv1 = st.sv  # stale, unused: the rank is not monitored
            r1 = fl.rank_of(sv1)
            gi = st.grid_index + 1 if on_grid_landing else st.grid_index
            # commit: records first, then the state in one assignment
            fl.rec.extend(rows)
            fl.events.extend(new_events)
            fl.state = _State(
                s=s1, theta=y1, f=f1, sv=sv1, rank=r1, n_steps=st.n_steps + 1, grid_index=gi,
                s_prev=st.s, sv_prev=st.sv, h=new_h, n_rec=len(fl.rec), n_events=len(fl.events),
            )
            if bar is not None:
                bar.update(s1 - st.s)
            # -- stops -------------------------------------------------------------------
            if stop_here is not None:
                status = stop_here
                break
            if _chattering(fl):
                last = fl.events[-1]
                status = FlowStatus(
                    "rank_chattering",
                    f"rank flips {last.rank_before} <-> {last.rank_after} at s = {s1:.6g} "
                    f"(sigma_{last.index + 1} stays at tau = {fl.tau:.3g}); "
                    + FlowStatus("rank_chattering").message,
                )
                break
            cost = fl.evaluate("point", y1)[1]
            if o["cost_tol"] is not None and cost <= o["cost_tol"]:
                status = FlowStatus("cost_tol_reached", f"C = {cost:.3e} at s = {s1:.9g}")
                break
            vnorm = float(f1.norm())
            if fl.v0norm and vnorm <= o["stall_tol"] * fl.v0norm:
                status = FlowStatus(
                    "equilibrium_reached",
                    f"|V| = {vnorm:.3e} <= {o['stall_tol']:.1e} |V(0)| at s = {s1:.9g}",
                )
                break
            if checkpoint is not None and fl.state.n_steps % o["checkpoint_every"] == 0:
                checkpoint_now("running")
    except KeyboardInterrupt:
        status = FlowStatus("interrupted", "trajectory kept up to the last accepted step")
        # drop what an interrupted commit left half-done
        del fl.rec[fl.state.n_rec:]
        del fl.events[fl.state.n_events:]
        status.message = f"at s = {fl.state.s:.9g}; " + status.message
    finally:
        if bar is not None:
            bar.close()
    st = fl.state
    reached = status.code == "s_end_reached"
    if fl.rec[-1].s != st.s and (save_all or not reached):
        # keep the last good state (not part of the regular saves: n_rec excludes it)
        try:
            fl.rec.append(fl.row(st.s, st.theta, st.f, st.sv if o["monitor_rank"] else None))
        except _Failure:
            fl.rec.append(fl.row(st.s, st.theta, st.f, torch.full_like(st.sv, math.nan)))
    checkpoint_now(status.code)
    return _trajectory(fl, status, time.perf_counter() - start)


def _first_crossing(fl: _Flow, st: _State, sv1: Tensor, cross: list[int]) -> int:
    """Among the crossing indices of a step, the one that (linearly) crosses first."""
    if len(cross) == 1:
        return cross[0]
    tau = fl.tau

    def frac(k: int) -> float:
        a, b = float(st.sv[k]) - tau, float(sv1[k]) - tau
        return a / (a - b) if a != b else 0.0

    return min(cross, key=frac)


def _chattering(fl: _Flow) -> bool:
    """The last 4 events flip the rank back and forth within a short stretch of s."""
    ev = fl.events[-4:]
    if len(ev) < 4:
        return False
    return (
        ev[-1].s - ev[0].s <= 1e-3 * max(1.0, fl.s_end)
        and len({(e.rank_before, e.rank_after) for e in ev}) == 2
        and ev[-1].rank_before == ev[-3].rank_before
    )


def _restore(fl: _Flow, path: Path) -> Trajectory | None:
    """Load a checkpoint into ``fl``; return the trajectory when that run had finished."""
    import json

    with np.load(path, allow_pickle=False) as data:
        try:
            meta = json.loads(str(data["meta"]))
        except KeyError:
            raise ValueError(f"{path} is not a subriemann checkpoint (no 'meta')") from None
        integ = meta.get("integrator")
        if integ is None:
            raise ValueError(f"{path} is a trajectory without integrator state, not a checkpoint")
        arrays = {
            k[len("integrator_"):]: torch.from_numpy(np.array(data[k]))
            for k in data.files
            if k.startswith("integrator_")
        }
    traj = Trajectory.load(path)
    resumable = ("running", "interrupted", "max_steps_reached", "max_time_reached")
    if traj.status.code not in resumable:
        return traj
    _check_resume(fl, traj, integ, path)
    dev = fl.space.device
    fl.tau = traj.rank_tau
    fl.cheap_sv = bool(integ.get("cheap_sv", False))
    fl.v0norm = integ["v0norm"]
    fl.nfev, fl.n_rejected = integ["nfev"], integ["n_rejected"]
    fl.wall_before = float(traj.counters.get("wall_time", 0.0))
    n_rec, n_events = integ["n_rec"], integ["n_events"]
    fl.rec = [
        _Row(float(traj.s[i]), traj.theta[i].to(dev), traj.outputs[i].to(dev),
             float(traj.cost[i]), float(traj.grad_norm[i]), traj.singular_values[i].to(dev),
             int(traj.rank[i]))
        for i in range(n_rec)
    ]
    fl.events = list(traj.events[:n_events])
    fl.state = _State(
        s=integ["s"], theta=arrays["theta"].to(dev), f=arrays["f"].to(dev),
        sv=arrays["sv"].to(dev), rank=integ["rank"], n_steps=integ["n_steps"],
        grid_index=integ["grid_index"], s_prev=integ["s_prev"],
        sv_prev=arrays["sv_prev"].to(dev) if "sv_prev" in arrays else None, h=integ["h"],
        n_rec=n_rec, n_events=n_events,
    )
    return None


def _check_resume(fl: _Flow, traj: Trajectory, integ: dict[str, Any], path: Path) -> None:
    now = _settings(fl)
    then = traj.settings
    diff = [
        f"{k}: {then.get(k)!r} -> {v!r}"
        for k, v in now.items()
        if k not in _RESUME_FREE and then.get(k) != v
    ]
    if integ.get("description", fl.description) != fl.description:
        diff.append(f"metric: {integ.get('description')} -> {fl.description}")
    if traj.theta.shape[1:] != (fl.space.dim,):
        diff.append(f"K: {traj.theta.shape[1]} -> {fl.space.dim}")
    if diff:
        raise ValueError(
            f"cannot resume from {path}: the options differ from the checkpointed run ("
            + "; ".join(diff) + ")"
        )
