r"""Gradient flows :math:`\partial_s\theta = -\operatorname{grad}C(\theta)` of any metric.

The vector field is ``-space.metric.gradient(theta)``: a flow knows its
metric only through ``gradient``, ``singular_values`` and the rank threshold.
Integrators (a small registry behind :func:`gradient_flow`):

* ``"dopri5"`` (default): adaptive Dormand–Prince 5(4) with error control
  :math:`\|e\|_{\rm rms} \le 1` on :math:`e_i = \mathrm{err}_i/(\mathrm{atol} + \mathrm{rtol}\,|\theta_i|)`;
* ``"rk4"``: classical fixed-step Runge–Kutta;
* ``"euler"``: explicit Euler, :math:`\theta_{n+1} = \theta_n - \eta\,\operatorname{grad}C`.
  For :math:`g_\lambda` this *is* discrete training: a Levenberg–Marquardt
  step with damping :math:`(1-\lambda)/\lambda`, the damped Gauss–Newton step at
  :math:`\lambda = 1` and plain gradient descent at :math:`\lambda = 0`.

Along the flow the numerical rank of :math:`D` is monitored at every
accepted step with a threshold :math:`\tau` that stays fixed (MATH.md §7); a
change of rank is localized by bisection on :math:`\sigma_k - \tau` and
recorded as a :class:`~subriemann.trajectory.RankChange`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from subriemann.trajectory import FlowStatus, RankChange, Trajectory

__all__ = ["gradient_flow", "METHODS"]

METHODS = ("dopri5", "rk4", "euler")

# Dormand–Prince 5(4) tableau.
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_E = (
    71 / 57600,
    0.0,
    -71 / 16695,
    71 / 1920,
    -17253 / 339200,
    22 / 525,
    -1 / 40,
)


class _Failure(Exception):
    """The vector field could not be evaluated (NaN/inf)."""


class _Flow:
    """One flow's integrator state and records (internal)."""

    def __init__(self, space, metric, theta0: Tensor, s_end: float, opts: dict[str, Any]) -> None:
        self.space, self.metric, self.s_end, self.o = space, metric, float(s_end), opts
        self.nfev = 0
        self.n_steps = 0
        self.n_rejected = 0
        self.events: list[RankChange] = []
        self.rec: dict[str, list[Any]] = {k: [] for k in ("s", "theta", "x", "c", "v", "sv", "r")}
        self.theta = theta0
        self.s = 0.0
        self.h: float | None = opts["step_size"] if opts["method"] != "dopri5" else opts["first_step"]
        self.err_prev = 1.0
        self.sv_prev: Tensor | None = None
        self.s_prev = 0.0
        self.v0norm: float | None = None
        self.tau = 0.0
        self.wall_before = 0.0
        self.grid_index = 0
        self.done_status: FlowStatus | None = None

    # -- evaluation ----------------------------------------------------------------
    def field(self, theta: Tensor) -> Tensor:
        from subriemann.space import NonFiniteError

        self.nfev += 1
        try:
            v = self.metric.gradient(theta)
        except NonFiniteError as err:
            raise _Failure(str(err)) from None
        if not torch.isfinite(v).all():
            raise _Failure("the vector field is NaN or inf")
        return -v

    def sv(self, theta: Tensor) -> Tensor:
        return self.metric.singular_values(theta).detach()

    def record(self, s: float, theta: Tensor, f: Tensor, sv: Tensor) -> None:
        st = self.space.point_state(theta)
        self.rec["s"].append(s)
        self.rec["theta"].append(theta.detach().clone())
        self.rec["x"].append(st.outputs.detach().clone())
        self.rec["c"].append(float(st.cost))
        self.rec["v"].append(float(f.norm()))
        self.rec["sv"].append(sv.clone())
        self.rec["r"].append(int((sv > self.tau).sum()))

    # -- one step --------------------------------------------------------------------
    def step(self, theta: Tensor, f0: Tensor, h: float) -> tuple[Tensor, Tensor, float]:
        """Return (theta1, f1, error_norm)."""
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
        for i in range(1, 7):
            yi = theta + h * sum(a * k for a, k in zip(_A[i], ks) if a != 0.0)
            ks.append(self.field(yi))
            if i == 6:
                y1 = yi
        errv = h * sum(e * k for e, k in zip(_E, ks) if e != 0.0)
        scale = self.o["atol"] + self.o["rtol"] * torch.maximum(theta.abs(), y1.abs())
        err = float(torch.sqrt(torch.mean((errv / scale) ** 2)))
        return y1, ks[6], err

    def initial_step(self, theta: Tensor, f0: Tensor) -> float:
        """Hairer–Wanner's starting step for an order-5 method."""
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
    def locate(self, s0: float, y0: Tensor, f0: Tensor, h: float, r0: int, r1: int,
               sv0: Tensor, sv1: Tensor) -> tuple[RankChange, Tensor, Tensor]:
        """Bisect the step ``[s0, s0 + h]`` for the crossing of ``sigma_k - tau``.

        Points inside the step are sub-steps of the same integrator from
        ``y0`` (exact to the integration tolerance; linear for Euler, whose
        path *is* piecewise linear).  Returns the event, and the point and
        singular values just after the crossing.
        """
        k = min(r0, r1)  # 0-based index of the singular value that crossed tau
        tau = self.tau
        # Sub-steps use the vector field of the stratum the step started on (a threshold
        # tau' on the same side of sigma_k as tau at the start), so that they continue the
        # old branch smoothly instead of sampling the jump.
        if r1 < r0:  # sigma_k falls below tau: keep it with tau' < tau
            below = float(sv0[k + 1]) if k + 1 < sv0.numel() else 0.0
            tau_old = math.sqrt(tau * below) if below > 1e-6 * tau else 1e-3 * tau
        else:  # sigma_k rises above tau: keep excluding it with tau' > tau
            above = float(sv0[k - 1]) if k >= 1 else math.inf
            tau_old = math.sqrt(tau * above) if math.isfinite(above) else 1e3 * tau

        def point(a: float) -> Tensor:
            if self.o["method"] == "euler":
                return y0 + a * f0
            saved = self.metric.rank_atol
            self.metric.rank_atol = tau_old
            try:
                return self.step(y0, f0, a)[0]
            finally:
                self.metric.rank_atol = saved

        lo, hi = 0.0, h
        sv_lo, sv_hi = sv0, sv1
        y_hi: Tensor | None = None
        above_lo = bool(sv0[k] > tau)
        for _ in range(200):
            if hi - lo <= self.o["event_tol"]:
                break
            mid = 0.5 * (lo + hi)
            try:
                ym = point(mid)
            except _Failure:
                hi = mid
                continue
            svm = self.sv(ym)
            if bool(svm[k] > tau) == above_lo:
                lo, sv_lo = mid, svm
            else:
                hi, sv_hi, y_hi = mid, svm, ym
        if y_hi is None:
            y_hi = point(hi)
        ev = RankChange(
            s=s0 + 0.5 * (lo + hi),
            theta=y_hi.detach().clone(),
            rank_before=r0,
            rank_after=r1,
            singular_values_before=sv_lo.clone(),
            singular_values_after=sv_hi.clone(),
            index=k,
            tau=tau,
            s_bracket=hi - lo,
        )
        return ev, y_hi, sv_hi

    def cap_near_tau(self, h: float, sv: Tensor) -> float:
        """Cap the step so no singular value moves more than half its distance to tau."""
        if self.sv_prev is None or self.s <= self.s_prev:
            return h
        dt = self.s - self.s_prev
        rate = (sv - self.sv_prev).abs() / dt
        gap = (sv - self.tau).abs()
        approaching = (sv - self.tau) * (sv - self.sv_prev) < 0
        mask = approaching & (rate > 0)
        if not bool(mask.any()):
            return h
        # move at most half the gap, but at least tau/2: a crossing is allowed (no Zeno
        # approach), two crossings of one singular value within a step are not.
        allowed = torch.clamp(0.5 * gap[mask], min=0.5 * self.tau)
        cap = float((allowed / rate[mask]).min())
        return max(min(h, cap), self.o["min_event_step"])

    # -- checkpoint ---------------------------------------------------------------
    def integrator_state(self, f: Tensor) -> dict[str, Any]:
        arrays = {"theta": self.theta}
        if self.sv_prev is not None:
            arrays["sv_prev"] = self.sv_prev
        return {
            "meta": {
                "s": self.s,
                "h": self.h,
                "err_prev": self.err_prev,
                "s_prev": self.s_prev,
                "v0norm": self.v0norm,
                "grid_index": self.grid_index,
                "nfev": self.nfev,
                "n_steps": self.n_steps,
                "n_rejected": self.n_rejected,
            },
            "arrays": arrays,
        }


def _trajectory(fl: _Flow, status: FlowStatus, wall: float) -> Trajectory:
    sp = fl.space
    rec = fl.rec
    dtype = sp.dtype
    m = min(sp.output_dim, sp.dim)
    return Trajectory(
        s=torch.tensor(rec["s"], dtype=dtype),
        theta=torch.stack(rec["theta"]) if rec["theta"] else torch.zeros(0, sp.dim, dtype=dtype),
        outputs=torch.stack(rec["x"]) if rec["x"] else torch.zeros(0, sp.output_dim, dtype=dtype),
        cost=torch.tensor(rec["c"], dtype=dtype),
        grad_norm=torch.tensor(rec["v"], dtype=dtype),
        singular_values=torch.stack(rec["sv"]) if rec["sv"] else torch.zeros(0, m, dtype=dtype),
        rank=torch.tensor(rec["r"], dtype=torch.int64),
        targets=sp.y.detach().clone(),
        rank_rtol=fl.metric.rank_rtol,
        rank_tau=fl.tau,
        events=list(fl.events),
        status=status,
        metric=fl.metric.description(),
        num_samples=sp.num_samples,
        num_outputs=sp.num_outputs,
        loss=getattr(sp.loss, "name", type(sp.loss).__name__),
        counters={
            "nfev": fl.nfev,
            "n_steps": fl.n_steps,
            "n_rejected": fl.n_rejected,
            "wall_time": fl.wall_before + wall,
        },
        settings={k: v for k, v in fl.o.items() if k not in ("save_at",)}
        | {"s_end": fl.s_end, "save_at": None if fl.o["save_at"] is None else list(fl.o["save_at"])},
    )


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
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 50,
    resume: str | Path | None = None,
    progress: bool = False,
    metric=None,
) -> Trajectory | list[Trajectory]:
    r"""Integrate the gradient flow :math:`\partial_s\theta = -\operatorname{grad}C(\theta)`.

    Parameters
    ----------
    space : ParameterSpace
        Equipped with the metric whose gradient defines the flow (or pass ``metric``).
    initial_point : Tensor, shape=[K] or [B, K]
        :math:`\theta(0)`.  A batch ``[B, K]`` returns a list of trajectories,
        one per initial point (integrated one after the other).
    s_end : float
        Final flow time.
    method : {"dopri5", "rk4", "euler"}
    rtol, atol : float
        Error control of ``"dopri5"`` (on :math:`\theta`).
    step_size : float, optional
        Step of ``"rk4"`` / ``"euler"`` (default ``s_end / 200``).
    first_step, max_step : float, optional
        Initial and largest step of ``"dopri5"``.
    save_at : sequence of float, optional
        Save exactly at these times (steps are shortened to land on them).
        Default: every accepted step, plus at least ``min_saves`` evenly spaced times.
    cost_tol : float, optional
        Stop once :math:`C \le` ``cost_tol``.
    stall_tol : float
        Stop ("equilibrium reached") once :math:`|V| \le` ``stall_tol`` :math:`|V(0)|`.
    max_steps : int, optional
        Budget of accepted steps.
    max_time : float, optional
        Budget of wall time in seconds.
    monitor_rank : bool
        Watch the numerical rank of :math:`D` at every accepted step and record
        rank changes (``events``).
    stop_on_rank_change : bool
        Stop at the first rank change (status ``"rank_change"``).
    event_tol : float
        Width in :math:`s` of the final bisection bracket of a rank event.
    fixed_threshold : bool
        Keep the rank threshold fixed at :math:`\tau = \mathrm{rank\_rtol}\,\sigma_{\max}(\theta(0))`
        (unless the metric has ``rank_atol``).  A threshold that moves makes the
        vector field discontinuous.
    checkpoint : path, optional
        Write the partial trajectory and the integrator state there every
        ``checkpoint_every`` accepted steps and on interruption.
    resume : path, optional
        Continue from a checkpoint written by a previous (interrupted) run with
        the same options; if the file does not exist the flow starts afresh.
        The resumed flow is step-for-step the uninterrupted one.
    progress : bool
        Show a progress bar (tqdm).
    metric : ParameterMetric, optional
        Defaults to ``space.metric``.

    Returns
    -------
    Trajectory
        With ``status`` saying why the flow stopped; on failure (NaN/inf,
        collapsing step) or ``KeyboardInterrupt`` the trajectory up to the
        last good state.

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
    if initial_point.ndim == 2:
        return [
            gradient_flow(
                space, p, s_end, method=method, rtol=rtol, atol=atol, step_size=step_size,
                first_step=first_step, max_step=max_step, save_at=save_at, min_saves=min_saves,
                cost_tol=cost_tol, stall_tol=stall_tol, max_steps=max_steps, max_time=max_time,
                monitor_rank=monitor_rank, stop_on_rank_change=stop_on_rank_change,
                event_tol=event_tol, fixed_threshold=fixed_threshold, progress=progress,
                metric=metric,
            )  # type: ignore[misc]
            for p in initial_point
        ]
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    s_end = float(s_end)
    if not (math.isfinite(s_end) and s_end > 0):
        raise ValueError(f"s_end must be a positive finite number, got {s_end}")
    for name, val in (("rtol", rtol), ("atol", atol), ("stall_tol", stall_tol), ("event_tol", event_tol)):
        if not (isinstance(val, (int, float)) and val >= 0 and math.isfinite(val)):
            raise ValueError(f"{name} must be a non-negative finite number, got {val!r}")
    if method == "dopri5" and rtol == 0 and atol == 0:
        raise ValueError("rtol and atol cannot both be 0")
    if method != "dopri5":
        step_size = s_end / 200 if step_size is None else float(step_size)
        if not step_size > 0:
            raise ValueError(f"step_size must be positive, got {step_size}")
    if save_at is not None:
        grid = sorted(float(v) for v in save_at)
        if not grid or grid[0] < 0 or grid[-1] > s_end or any(not math.isfinite(v) for v in grid):
            raise ValueError(f"save_at must be a non-empty list of times in [0, s_end={s_end}]")
    else:
        n = max(int(min_saves), 2)
        grid = [s_end * i / (n - 1) for i in range(n)]
    metric = space.metric if metric is None else metric
    theta0 = space.check_point(initial_point).detach().clone()

    opts: dict[str, Any] = dict(
        method=method, rtol=float(rtol), atol=float(atol), step_size=step_size,
        first_step=first_step, max_step=float(max_step), save_at=None if save_at is None else grid,
        min_saves=int(min_saves), cost_tol=cost_tol, stall_tol=float(stall_tol),
        max_steps=max_steps, max_time=max_time, monitor_rank=bool(monitor_rank),
        stop_on_rank_change=bool(stop_on_rank_change), event_tol=float(event_tol),
        fixed_threshold=bool(fixed_threshold), checkpoint_every=int(checkpoint_every),
        min_event_step=max(1e-10 * s_end, 1e-12),
    )
    fl = _Flow(space, metric, theta0, s_end, opts)
    saved_atol = metric.rank_atol
    try:
        return _run(fl, grid, save_at is None, checkpoint, resume, progress, saved_atol)
    finally:
        metric.rank_atol = saved_atol


def _run(fl: _Flow, grid: list[float], save_all: bool, checkpoint, resume, progress: bool,
         saved_atol: float | None) -> Trajectory:
    o = fl.o
    metric = fl.metric
    start = time.perf_counter()
    moving_tau = saved_atol is None and not o["fixed_threshold"]

    def tau_at(sv: Tensor) -> float:
        if saved_atol is not None:
            return saved_atol
        return metric.rank_rtol * float(sv[0]) if sv.numel() else 0.0

    # -- start or resume ------------------------------------------------------------
    resumed = resume is not None and Path(resume).exists()
    if resumed:
        _restore(fl, Path(resume))
        if fl.done_status is not None:
            return _trajectory(fl, fl.done_status, 0.0)
    else:
        fl.tau = tau_at(fl.sv(fl.theta))
    if not moving_tau:
        metric.rank_atol = fl.tau  # fixed along the flow; restored by the caller

    try:
        f = fl.field(fl.theta)
    except _Failure as err:
        return _trajectory(fl, FlowStatus("nonfinite", f"at the initial point: {err}"), 0.0)
    sv = fl.sv(fl.theta)
    if not resumed:
        fl.v0norm = float(f.norm())
        fl.record(0.0, fl.theta, f, sv)
        while fl.grid_index < len(grid) and grid[fl.grid_index] <= 0.0:
            fl.grid_index += 1
    r = int((sv > fl.tau).sum())

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=fl.s_end, desc=metric.description().get("class", "flow"), unit="s",
                   bar_format="{l_bar}{bar}| s={n:.3g}/{total:.3g} [{elapsed}<{remaining}]")
        bar.update(fl.s)

    def checkpoint_now(code: str = "running") -> None:
        if checkpoint is not None:
            traj = _trajectory(fl, FlowStatus(code), time.perf_counter() - start)
            traj.save(checkpoint, _extra=fl.integrator_state(f))

    status: FlowStatus | None = None
    if fl.v0norm == 0.0:
        status = FlowStatus("equilibrium_reached", "the vector field vanishes at the initial point")
    elif o["cost_tol"] is not None and fl.rec["c"][-1] <= o["cost_tol"]:
        status = FlowStatus("cost_tol_reached", f"C = {fl.rec['c'][-1]:.3e} at s = {fl.s:.6g}")
    try:
        while status is None:
            if fl.s >= fl.s_end:
                status = FlowStatus("s_end_reached")
                break
            if o["max_steps"] is not None and fl.n_steps >= o["max_steps"]:
                status = FlowStatus("max_steps_reached", f"{fl.n_steps} accepted steps")
                break
            if o["max_time"] is not None and time.perf_counter() - start > o["max_time"]:
                status = FlowStatus("max_time_reached", f"after {o['max_time']} s of wall time")
                break
            if fl.h is None:
                fl.h = fl.initial_step(fl.theta, f)
            h = min(fl.h, o["max_step"])
            if o["monitor_rank"]:
                h = fl.cap_near_tau(h, sv)
            target = grid[fl.grid_index] if fl.grid_index < len(grid) else fl.s_end
            landing = fl.s + h >= target - 1e-12 * h
            if landing:
                h = target - fl.s
            if h <= 16 * np.finfo(float).eps * max(1.0, abs(fl.s)):
                status = FlowStatus(
                    "step_size_collapsed",
                    f"step size {h:.3g} at s = {fl.s:.6g} (near-singular vector field; "
                    f"sigma_min = {float(sv[-1]):.3g}, tau = {fl.tau:.3g})",
                )
                break
            try:
                y1, f1, err = fl.step(fl.theta, f, h)
            except _Failure as failure:
                if o["method"] != "dopri5":
                    status = FlowStatus("nonfinite", f"at s = {fl.s:.6g}: {failure}")
                    break
                fl.n_rejected += 1
                fl.h = 0.25 * h
                continue
            jump: tuple[RankChange, Tensor, Tensor] | None = None
            if o["method"] == "dopri5":
                fac = 5.0 if err == 0 else min(5.0, max(0.2, 0.9 * err ** (-0.2)))
                if err > 1.0:
                    sv_trial = fl.sv(y1) if o["monitor_rank"] else sv
                    r_trial = int((sv_trial > fl.tau).sum())
                    if r_trial == r:
                        fl.n_rejected += 1
                        fl.h = h * fac
                        continue
                    # The step crosses a rank change, where the vector field jumps: no step
                    # across it passes error control.  Step to the crossing instead (the
                    # part before it is error-controlled by the previous steps) and go on
                    # on the new stratum.
                    jump = fl.locate(fl.s, fl.theta, f, h, r, r_trial, sv, sv_trial)
                    hit = jump[0].s_bracket
                    h = (jump[0].s - fl.s) + 0.5 * hit
                    landing = False
                    y1 = jump[1]
                    try:
                        f1 = fl.field(y1)
                    except _Failure as failure:
                        status = FlowStatus("nonfinite", f"after the rank change: {failure}")
                        break
                # a step shortened to land on a save time does not shrink the free step
                fl.h = max(fl.h, h * fac) if landing and fac >= 1.0 else h * fac
            # -- accepted ---------------------------------------------------------------
            s0, y0, f0, sv0 = fl.s, fl.theta, f, sv
            sv1 = jump[2] if jump is not None else (fl.sv(y1) if o["monitor_rank"] else sv)
            gi = fl.grid_index + 1 if landing and fl.grid_index < len(grid) else fl.grid_index
            # one statement, so an interruption never leaves a half-updated state
            fl.n_steps, fl.s, fl.grid_index, fl.sv_prev, fl.s_prev, fl.theta, f, sv = (
                fl.n_steps + 1, target if landing else s0 + h, gi, sv0, s0, y1, f1, sv1
            )
            if moving_tau:
                fl.tau = tau_at(sv1)
            r1 = int((sv1 > fl.tau).sum())
            if bar is not None:
                bar.update(fl.s - s0)
            if o["monitor_rank"] and r1 != r:
                ev = jump[0] if jump is not None else fl.locate(s0, y0, f0, h, r, r1, sv0, sv1)[0]
                fl.events.append(ev)
                if o["stop_on_rank_change"]:
                    fl.theta, fl.s = ev.theta, ev.s
                    f = fl.field(fl.theta)
                    sv = fl.sv(fl.theta)
                    fl.record(fl.s, fl.theta, f, sv)
                    status = FlowStatus("rank_change", f"rank {r} -> {r1} at s = {ev.s:.9g}")
                    break
            r = r1
            ev_s = [e.s for e in fl.events[-4:]]
            if len(ev_s) == 4 and ev_s[-1] - ev_s[0] <= 1e-3 * max(1.0, fl.s_end) and len(
                {(e.rank_before, e.rank_after) for e in fl.events[-4:]}
            ) == 2 and fl.events[-1].rank_before == fl.events[-3].rank_before:
                fl.record(fl.s, fl.theta, f, sv)
                status = FlowStatus(
                    "rank_chattering",
                    f"rank flips {fl.events[-1].rank_before} <-> {fl.events[-1].rank_after} at "
                    f"s = {fl.s:.6g} (sigma_{fl.events[-1].index + 1} stays at tau = {fl.tau:.3g}); "
                    + FlowStatus("rank_chattering").message,
                )
                break
            saved = save_all or landing
            if saved:
                fl.record(fl.s, fl.theta, f, sv)
            cost = float(fl.space.point_state(fl.theta).cost)
            if o["cost_tol"] is not None and cost <= o["cost_tol"]:
                status = FlowStatus("cost_tol_reached", f"C = {cost:.3e} at s = {fl.s:.6g}")
            elif fl.v0norm and float(f.norm()) <= o["stall_tol"] * fl.v0norm:
                status = FlowStatus(
                    "equilibrium_reached",
                    f"|V| = {float(f.norm()):.3e} <= {o['stall_tol']:.1e} |V(0)| at s = {fl.s:.6g}",
                )
            if status is not None:
                if not saved:
                    fl.record(fl.s, fl.theta, f, sv)
                break
            if checkpoint is not None and fl.n_steps % o["checkpoint_every"] == 0:
                checkpoint_now()
    except KeyboardInterrupt:
        status = FlowStatus("interrupted", f"at s = {fl.s:.6g}; trajectory kept up to there")
        checkpoint_now("running")  # resumable
    finally:
        if bar is not None:
            bar.close()
    if status.code != "interrupted":
        if fl.rec["s"][-1] != fl.s:  # keep the last good state
            fl.record(fl.s, fl.theta, f, sv)
        checkpoint_now(status.code)
    elif fl.rec["s"][-1] != fl.s:
        fl.record(fl.s, fl.theta, f, sv)
    return _trajectory(fl, status, time.perf_counter() - start)


def _restore(fl: _Flow, path: Path) -> None:
    import json

    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        integ = meta.get("integrator")
        if integ is None:
            raise ValueError(f"{path} is a trajectory without integrator state, not a checkpoint")
        traj = Trajectory.load(path)
        fl.theta = torch.from_numpy(np.array(data["integrator_theta"])).to(fl.space.device)
        fl.sv_prev = (
            torch.from_numpy(np.array(data["integrator_sv_prev"]))
            if "integrator_sv_prev" in data
            else None
        )
    fl.done_status = None if traj.status.code == "running" else traj.status
    fl.s, fl.h, fl.err_prev = integ["s"], integ["h"], integ["err_prev"]
    fl.s_prev, fl.v0norm, fl.grid_index = integ["s_prev"], integ["v0norm"], integ["grid_index"]
    fl.nfev, fl.n_steps, fl.n_rejected = integ["nfev"], integ["n_steps"], integ["n_rejected"]
    fl.tau = traj.rank_tau
    fl.events = list(traj.events)
    fl.wall_before = float(traj.counters.get("wall_time", 0.0))
    fl.rec = {
        "s": [float(v) for v in traj.s],
        "theta": list(traj.theta),
        "x": list(traj.outputs),
        "c": [float(v) for v in traj.cost],
        "v": [float(v) for v in traj.grad_norm],
        "sv": list(traj.singular_values),
        "r": [int(v) for v in traj.rank],
    }
