r"""The integrator loop of a gradient flow :math:`\partial_s\theta = -\operatorname{grad}C(\theta)`.

The vector field is ``-metric.gradient(theta)``: a flow knows its metric only
through ``gradient``, ``singular_values`` and the rank threshold :math:`\tau`,
which it sets on its **own copy** of the metric (and passes explicitly, as
:math:`\tau'`, to the sub-steps on the old branch of an event): the metric
object the user passed is never written on.

Integrators (:mod:`subriemann.integrators`, by name in ``method``):

* ``"dopri5"`` (default): adaptive Dormand–Prince 5(4) with error control
  :math:`\|e\|_{\rm rms} \le 1` on
  :math:`e_i = \mathrm{err}_i/(\mathrm{atol} + \mathrm{rtol}\max(|\theta_i|, |\theta_i'|))`;
* ``"rk4"``: classical fixed-step Runge–Kutta (order 4);
* ``"euler"``: explicit Euler, :math:`\theta_{n+1} = \theta_n - \eta\,\operatorname{grad}C`.
  For :math:`g_\lambda` this *is* discrete training: the Levenberg–Marquardt step
  :math:`\theta_{n+1} = \theta_n - \tfrac{\eta}{\lambda}(\varepsilon 1 + D^\top D)^{-1}
  D^\top\nabla_xC` with damping :math:`\varepsilon = (1-\lambda)/\lambda`, the damped
  Gauss–Newton step :math:`-\eta D^+\nabla_xC` at :math:`\lambda = 1` and plain
  gradient descent at :math:`\lambda = 0`.

**Rank events** are monitored at every accepted step (or every ``rank_every``-th and
wherever a singular value comes near :math:`\tau`, with a bisection over the steps in
between when the rank differs) with a threshold
:math:`\tau` that stays fixed along the flow (:mod:`subriemann.flow.events`).
At :math:`\lambda = 1` the vector field jumps at a rank change; a step across
the jump that fails error control is cut at the crossing and the flow
continues on the new stratum.

**Continuation through rank loss** (:mod:`subriemann.flow.continuation`): with
``rank_band`` :math:`\beta > 0` the field weighs the directions with
:math:`\tau < \sigma < \beta\sigma_{\max}` by a smooth step, so it no longer jumps
at :math:`\tau` and stays bounded by :math:`\tfrac32|r|/(\beta\sigma_{\max})`; the
stretches where a direction is filtered or dropped are the trajectory's ``segments``.

The loop (:class:`_Run`) is one attempt per iteration: budgets, the step to
try (:meth:`_Run.plan`), the attempt and its error control
(:meth:`_Run.attempt`), the events of an accepted step, the commit of the new
state in one assignment, and the stops after it.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from subriemann._warnings import one_line
from subriemann.flow import batch, continuation, events
from subriemann.flow.checkpoint import (
    check_same_problem,
    checkpoint_path,
    problem_fingerprint,
    read_checkpoint,
)
from subriemann.flow.options import METHODS, RANK_METHODS, RESUME_FREE, SMALL_PROBLEM, FlowOptions
from subriemann.flow.trajectory import FlowStatus, RankChange, Trajectory, existing_npz
from subriemann.integrators import TABLEAUS, StepController, rk_step
from subriemann.linalg import rank_threshold
from subriemann.space import NonFiniteError, ParameterSpace
from subriemann.validation import check_tensor

__all__ = ["gradient_flow", "METHODS", "RANK_METHODS", "Flow", "State"]

# Consecutive non-finite evaluations (each shrinking the step 4x) before "nonfinite".
_MAX_NONFINITE = 25
# Consecutive rejected steps before "step_size_collapsed" (a safety net: h shrinks by at
# least 4x per rejection and collapses long before).
_MAX_REJECTIONS = 200


class _Failure(ArithmeticError):
    """The vector field or the singular values could not be evaluated (NaN/inf)."""


class _OutOfTime(Exception):
    """``max_time`` ran out between two evaluations of a step's stages."""


@dataclass(frozen=True)
class State:
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


class _Plan(NamedTuple):
    """The step to attempt: its free size, its size, and where it lands."""

    h_free: float
    h: float
    target: float
    on_grid: bool
    landing: bool


@dataclass(frozen=True)
class _Step:
    """An accepted step, before its events are recorded."""

    h: float
    y1: Tensor
    f1: Tensor
    sv1: Tensor | None
    new_h: float | None
    landing: bool
    jump: RankChange | None  # an event at which an error-control failure was cut


class Flow:
    """One flow's integrator, evaluations and records (internal)."""

    def __init__(self, space, metric, opts: FlowOptions) -> None:
        # the flow's own copy: its threshold tau is set there, never on the user's metric
        self.space, self.metric, self.o = space, copy.copy(metric), opts
        self.s_end = opts.s_end
        self._at_tau: dict[float, Any] = {}
        self.tableau = TABLEAUS[opts.method]
        self.controller = StepController(opts.rtol, opts.atol, self.tableau.order - 1)
        self.nfev = 0
        self.deadline: float | None = None  # set while a step's stages are evaluated
        self.n_rejected = 0
        self.rec: list[_Row] = []
        self.events: list[RankChange] = []
        self.tau = 0.0
        self.v0norm = 0.0
        self.wall_before = 0.0
        self.description: dict[str, Any] = metric.description()
        self.cheap_sv = False
        # may the field jump at a rank change? then a rejected step may be an event
        self.field_jumps = bool(metric.field_may_jump)
        self.problem: dict[str, str] = {}
        self.state: State | None = None
        self.lockstep: Any = None  # a LockStep when integrated in a batch
        self.book = continuation.SegmentBook()
        # the band filter, only where the vector field depends on tau at all: a field that
        # cannot jump at a rank change (lambda < 1, Euclidean) keeps every direction, so its
        # thresholded gradients G(t) all agree and filtering would only repeat the solve
        self.banded = opts.rank_band > 0.0 and self.field_jumps
        # the monitor's cadence (FlowOptions.rank_every): None = "auto", set at step 1
        if opts.rank_every not in (1, "auto") and self.field_jumps:
            raise ValueError(
                f"rank_every = {opts.rank_every} needs a vector field that cannot jump at a rank "
                f"change; {type(metric).__name__} may (field_may_jump): use rank_every=1")
        small = space.output_dim * space.dim <= SMALL_PROBLEM
        # with a cadence the steps ignore the monitor (no cap near tau), so that where it
        # monitors never changes the path: only for explicit N > 1, or "auto" on large problems
        self.cadence = (opts.monitor_rank and not self.field_jumps and opts.rank_every != 1
                        and not (small and opts.rank_every == "auto"))
        self.auto_cadence = self.cadence and opts.rank_every == "auto"
        self.rank_every: int | None = (
            None if self.auto_cadence else int(opts.rank_every) if self.cadence else 1)
        self.timing = [0.0, 0, 0.0, 0]  # time and count of the steps, then of the spectra
        # what the rank monitor cost: seconds (spectra, and the sub-steps that locate events)
        # and the number of spectra; counted across a resume (Trajectory.counters)
        self.monitor_time = 0.0
        self.n_spectra = 0
        self._monitor_depth = 0
        self.last_filter: tuple[Tensor, float] | None = None  # (theta, deviation)

    # -- evaluation ----------------------------------------------------------------
    def metric_at(self, tau: float | None) -> Any:
        """The flow's metric with rank threshold ``tau`` (None: the flow's own ``self.tau``)."""
        if tau is None or tau == self.metric.rank_atol:
            return self.metric
        if tau not in self._at_tau:
            m = copy.copy(self.metric)
            m.rank_atol = tau
            if len(self._at_tau) >= 8:  # the thresholds of one band, or of one event
                self._at_tau.clear()
            self._at_tau[tau] = m
        return self._at_tau[tau]

    def band_field(self, theta: Tensor) -> Tensor:
        """The metric's gradient with the band filter (:mod:`~subriemann.flow.continuation`):
        from one factorization where the metric weighs its spectrum itself
        (``weighted_gradient``), else as the sum of its thresholded gradients."""
        sv = self.metric.gradient_spectrum(theta)
        tau = self.tau
        top = continuation.band_top(tau, sv, self.o.rank_band)
        at_tau = self.metric_at(tau)
        g = None
        if continuation.band_indices(sv, tau, top):
            g = at_tau.weighted_gradient(
                theta, lambda s: continuation.band_weights(s, tau, top))
        if g is None:
            g, _, dev = continuation.filtered_gradient(
                lambda t: self.metric_at(t).gradient(theta), sv, tau, top)
        else:
            dev = continuation.deviation(g, at_tau.gradient(theta))
        self.last_filter = (theta, dev)
        return g

    def deviation_at(self, theta: Tensor) -> float:
        """The band filter's relative deviation from the exact field at ``theta``."""
        if self.last_filter is None or not torch.equal(self.last_filter[0], theta):
            self.evaluate("field", theta)
        assert self.last_filter is not None
        return self.last_filter[1]

    def compute(self, kind: str, payload: tuple[Tensor, float | None]) -> Any:
        """What the flow asks at ``theta`` (``payload = (theta, tau)``), computed here."""
        theta, tau = payload
        if kind == "field":
            if self.banded and self.tau > 0.0:
                return self.band_field(theta)  # continuous: one branch on both sides of tau
            return self.metric_at(tau).gradient(theta)
        if kind == "sv":
            if self.cheap_sv:
                return self.space.point_state(theta).singular_values("ntk")
            return self.metric.singular_values(theta)
        st = self.space.point_state(theta)
        return st.outputs, float(st.cost)

    def evaluate(self, kind: str, theta: Tensor, tau: float | None = None) -> Any:
        """``"field"``, ``"sv"`` or ``"point"`` at ``theta``: here, or in the lock-step round."""
        if self.lockstep is not None:
            return self.lockstep.request(self, kind, (theta, tau))
        return self.compute(kind, (theta, tau))

    def field(self, theta: Tensor, tau: float | None = None) -> Tensor:
        """:math:`-\\operatorname{grad}C(\\theta)` with threshold ``tau`` (default the flow's).

        Raises :class:`_Failure` on NaN/inf.
        """
        if self.deadline is not None and time.perf_counter() > self.deadline:
            raise _OutOfTime
        self.nfev += 1
        try:
            v = self.evaluate("field", theta, tau)
        except (NonFiniteError, torch.linalg.LinAlgError) as err:
            raise _Failure(one_line(err)) from None
        if not bool(torch.isfinite(v).all()):
            raise _Failure("the vector field is NaN or inf")
        return -v.detach()

    @contextmanager
    def monitoring(self) -> Iterator[None]:
        """Count the time of the block as the rank monitor's (nested blocks once)."""
        self._monitor_depth += 1
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._monitor_depth -= 1
            if self._monitor_depth == 0:
                self.monitor_time += time.perf_counter() - t0

    def sv(self, theta: Tensor) -> Tensor:
        """Singular values of :math:`D[\\theta]`, descending; raises :class:`_Failure` on NaN."""
        self.n_spectra += 1
        try:
            with self.monitoring():
                s = self.evaluate("sv", theta)
        except (NonFiniteError, torch.linalg.LinAlgError) as err:
            raise _Failure(f"singular values of D: {one_line(err)}") from None
        if not bool(torch.isfinite(s).all()):
            raise _Failure("the Jacobian D is NaN or inf")
        return s.detach()

    def rank_of(self, sv: Tensor) -> int:
        return int((sv > self.tau).sum())

    def sv_rounding(self, sv: Tensor) -> float:
        r"""The rounding :math:`\delta = \epsilon\sigma_{\max}^2/2\tau` of a computed
        singular value near :math:`\tau`.

        An eigenvalue of the Gram matrix (the monitor's spectrum on large problems)
        is computed to about :math:`\epsilon|D^\top D| = \epsilon\sigma_{\max}^2`
        (a backward-stable eigensolver, one unit in the last place of the largest),
        so :math:`\sigma_k` near :math:`\tau` to about this :math:`\delta`; from
        an SVD it is :math:`\epsilon\sigma_{\max}`, smaller.  An estimate, not a
        bound (docs/scale.md, "Where the spectra go": the scatter measured on full
        digits is 0.4 of it).
        """
        if self.tau <= 0.0 or sv.numel() == 0:
            return 0.0
        return torch.finfo(sv.dtype).eps * float(sv[0]) ** 2 / (2.0 * self.tau)

    def row(self, s: float, theta: Tensor, f: Tensor, sv: Tensor | None) -> _Row:
        """A saved point (``sv=None``: computed here, when the rank is not monitored)."""
        if sv is None:
            sv = self.sv(theta)
        x, cost = self.evaluate("point", theta)
        return _Row(s, theta.detach().clone(), x.detach().clone(), cost, float(f.norm()),
                    sv.clone(), self.rank_of(sv))

    # -- one step --------------------------------------------------------------------
    def step(self, theta: Tensor, f0: Tensor, h: float, tau: float | None = None
             ) -> tuple[Tensor, Tensor, float]:
        """One step of size ``h`` from ``theta``: ``(theta_1, f(theta_1), error_norm)``.

        ``tau``: the rank threshold of the vector field (default: the flow's).
        """
        def field(y: Tensor) -> Tensor:
            return self.field(y, tau)

        y1, f1, err = rk_step(self.tableau, field, theta, h, f0)
        if f1 is None:
            f1 = field(y1)
        if err is None:
            return y1, f1, 0.0
        return y1, f1, self.controller.error_norm(err, theta, y1)

    def initial_step(self, theta: Tensor, f0: Tensor) -> float:
        """Hairer–Wanner's starting step (one extra evaluation)."""
        return self.controller.initial_step(self.field, theta, f0, self.s_end)

    # -- checkpoint ---------------------------------------------------------------
    def integrator_state(self) -> dict[str, Any]:
        st = self.state
        assert st is not None
        arrays = {"theta": st.theta, "f": st.f, "sv": st.sv}
        if st.sv_prev is not None:
            arrays["sv_prev"] = st.sv_prev
        meta = {k: getattr(st, k) for k in ("s", "h", "rank", "n_steps", "grid_index", "s_prev",
                                            "n_rec", "n_events")}
        meta |= {"v0norm": self.v0norm, "nfev": self.nfev, "n_rejected": self.n_rejected,
                 "cheap_sv": self.cheap_sv, "description": self.description,
                 "rank_every": self.rank_every,
                 "segments": self.book.to_meta()}
        return {"meta": meta, "arrays": arrays}

    def trajectory(self, status: FlowStatus, wall: float) -> Trajectory:
        """The records so far as a :class:`~subriemann.Trajectory`."""
        sp, rows, st = self.space, self.rec, self.state

        def stack(name: str, width: int) -> Tensor:
            if not rows:
                return torch.zeros(0, width, dtype=sp.dtype)
            return torch.stack([getattr(r, name) for r in rows])

        return Trajectory(
            s=torch.tensor([r.s for r in rows], dtype=torch.float64),
            theta=stack("theta", sp.dim),
            outputs=stack("x", sp.output_dim),
            cost=torch.tensor([r.c for r in rows], dtype=sp.dtype),
            grad_norm=torch.tensor([r.v for r in rows], dtype=sp.dtype),
            singular_values=stack("sv", min(sp.output_dim, sp.dim)),
            rank=torch.tensor([r.r for r in rows], dtype=torch.int64),
            targets=sp.y.detach().clone(),
            rank_rtol=self.metric.rank_rtol,
            rank_tau=self.tau,
            events=list(self.events),
            status=status,
            metric=dict(self.description),
            num_samples=sp.num_samples,
            num_outputs=sp.num_outputs,
            loss=getattr(sp.loss, "name", type(sp.loss).__name__),
            counters={"nfev": self.nfev, "n_steps": 0 if st is None else st.n_steps,
                      "n_rejected": self.n_rejected, "wall_time": self.wall_before + wall,
                      "rank_every": self.rank_every, "monitor_time": self.monitor_time,
                      "n_spectra": self.n_spectra},
            settings=self.o.settings(),
            problem=dict(self.problem),
            segments=self.book.segments(),
        )

    def record_modes(self, s: float, theta: Tensor, sv: Tensor) -> None:
        """Update the segments at an accepted state (filtered / dropped directions)."""
        top = continuation.band_top(self.tau, sv, self.o.rank_band) if self.banded else 0.0
        in_band = bool(((sv > self.tau) & (sv < top)).any())
        dev = self.deviation_at(theta) if in_band else 0.0
        self.book.update(s, sv, self.tau, top, dev)


def gradient_flow(
    space,
    initial_point: Tensor,
    s_end: float,
    *,
    method: str = "dopri5",
    rtol: float = 1e-8,
    atol: float = 1e-10,
    checkpoint: str | Path | None = None,
    resume: str | Path | None = None,
    metric=None,
    **options: Any,
) -> Trajectory | list[Trajectory]:
    r"""Integrate the gradient flow :math:`\partial_s\theta = -\operatorname{grad}C(\theta)`.

    For :math:`g_\lambda` the vector field is :math:`V_\lambda = -g_\lambda^+D^\top\nabla_xC`;
    for MSE, :math:`\lambda = 1` and :math:`\operatorname{rank}D = QN` the outputs obey
    :math:`x(s) = y + e^{-s}(x(0) - y)` (Prop 2.4 of docs/theory.md).

    Parameters
    ----------
    space : ParameterSpace
        Equipped with the metric whose gradient defines the flow (or pass ``metric``).
    initial_point : Tensor, shape=[K] or [B, K]
        :math:`\theta(0)`; a batch ``[B, K]`` returns ``B`` trajectories integrated
        together (:mod:`subriemann.flow.batch`), each the single run up to rounding.
    s_end : float
        Final flow time, :math:`> 0`.
    method : {"dopri5", "rk4", "euler"}
        A tableau of :data:`subriemann.integrators.TABLEAUS`.
    rtol, atol : float
        Error control of ``"dopri5"`` on :math:`\theta`.
    checkpoint : path, optional
        Written (atomically) every ``checkpoint_every`` accepted steps, on
        interruption and at the end; checked writable before the first step.
    resume : path, optional
        Continue from a checkpoint of the same problem and options (budgets,
        ``checkpoint_every`` and ``progress`` may differ), step for step as the
        uninterrupted run; a finished run is returned as it is, a missing file
        starts afresh.  ``"run"`` and ``"run.npz"`` name the same file.
    metric : ParameterMetric, optional
        Defaults to ``space.metric``; never written on.
    **options
        The other options of :class:`~subriemann.flow.options.FlowOptions`.

    Returns
    -------
    Trajectory or list of Trajectory
        With ``status`` saying why the flow stopped
        (:data:`subriemann.flow.trajectory.STATUS_CODES`); on failure or
        interrupt, up to the last good state.

    Raises
    ------
    TypeError, ValueError
        On invalid arguments or a bad checkpoint (before any work), and
        ``ValueError`` when the vector field is not finite at ``initial_point``.

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
    if not isinstance(space, ParameterSpace):
        raise TypeError(f"space must be a subriemann.ParameterSpace, got {type(space).__name__}")
    check_tensor(initial_point, "initial_point")
    opts = FlowOptions.create(s_end, method=method, rtol=rtol, atol=atol, **options)
    metric = space.metric if metric is None else metric
    if initial_point.ndim == 2:
        return _flow_batch(space, initial_point, opts, metric, checkpoint, resume)
    return _flow_one(space, initial_point, opts, metric, checkpoint, resume)


def _flow_batch(space: ParameterSpace, points: Tensor, opts: FlowOptions, metric: Any,
                checkpoint: Any, resume: Any) -> list[Trajectory]:
    """One flow per row of ``points`` ``[B, K]``, integrated together in lock-step rounds."""
    if checkpoint is not None or resume is not None:
        raise ValueError("checkpoint/resume take a single initial point [K], not a batch")
    if points.shape[0] == 0:
        raise ValueError("the batch of initial points is empty")
    points = torch.stack([space.check_point(p) for p in points])
    return batch.run_batch(space, points, lambda p: gradient_flow(
        space, p, opts.s_end, metric=metric, **opts.batch_options()))


def _flow_one(space: ParameterSpace, initial_point: Tensor, opts: FlowOptions, metric: Any,
              checkpoint: str | Path | None, resume: str | Path | None) -> Trajectory:
    """The flow from one point ``[K]`` (a member of a batch posts to its lock-step rounds)."""
    theta0 = space.check_point(initial_point).detach().clone()
    if checkpoint is not None:
        checkpoint = checkpoint_path(checkpoint)  # fails now, not after the integration
    if resume is not None:
        resume = existing_npz(resume)
    fl = Flow(space, metric, opts)
    fl.problem = problem_fingerprint(space, fl.description, theta0)
    fl.lockstep = getattr(batch.MEMBER, "lockstep", None)
    return _Run(fl, checkpoint, metric.rank_atol).run(theta0, resume)


def _use_cheap_sv(fl: Flow) -> bool:
    rm = fl.o.rank_method
    if rm == "metric":
        return False
    if rm == "ntk":
        return True
    return bool(fl.metric.is_euclidean)


class _Run:
    """One run of the integrator loop over a :class:`Flow` (start or resume, steps, stops)."""

    def __init__(self, fl: Flow, checkpoint: Path | None, user_atol: float | None) -> None:
        self.fl, self.o, self.checkpoint = fl, fl.o, checkpoint
        self.grid = fl.o.grid()
        self.save_all = fl.o.save_at is None
        self.user_atol = user_atol
        self.moving_tau = user_atol is None and not fl.o.fixed_threshold
        self.start = time.perf_counter()
        self.bar: Any = None
        self.resumed = False
        self.nonfinite_streak = 0
        self.rejected_before = 0
        self.last_failure = ""
        # the monitor's cadence: accepted, unmonitored states (s, theta, f) since the last
        # monitored state, the anchor (rank_every > 1 only; empty otherwise)
        self.window: list[tuple[float, Tensor, Tensor]] = []
        self.anchor: State | None = None
        self.checkpoint_owed = False

    # -- start -------------------------------------------------------------------------
    def tau_at(self, sv: Tensor) -> float:
        """The rank threshold for the singular values ``sv`` (descending)."""
        sigma_max = float(sv[0]) if sv.numel() else 0.0
        return rank_threshold(sigma_max, self.fl.metric.rank_rtol, self.user_atol)

    def begin(self, theta0: Tensor) -> None:
        """The state at ``s = 0``: threshold, singular values, vector field, first record."""
        fl, o = self.fl, self.o
        fl.cheap_sv = _use_cheap_sv(fl)
        try:
            sv = fl.sv(theta0)
            if fl.cheap_sv and o.rank_method == "auto":
                tau = self.tau_at(sv)
                if sv.numel() and tau < 1e-7 * float(sv[0]):  # below what the NTK resolves
                    fl.cheap_sv = False
                    sv = fl.sv(theta0)
            fl.tau = self.tau_at(sv)
            if not self.moving_tau:
                fl.metric.rank_atol = fl.tau
            f = fl.field(theta0)
        except _Failure as failure:
            raise ValueError(f"the flow cannot start at initial_point: {failure}") from None
        fl.v0norm = float(f.norm())
        fl.rec.append(fl.row(0.0, theta0, f, sv))
        if o.monitor_rank:
            fl.record_modes(0.0, theta0, sv)
        gi = 0
        while gi < len(self.grid) and self.grid[gi] <= 0.0:
            gi += 1
        fl.state = State(
            s=0.0, theta=theta0, f=f, sv=sv, rank=fl.rank_of(sv), n_steps=0, grid_index=gi,
            s_prev=0.0, sv_prev=None, h=o.first_step if o.adaptive else o.step_size,
            n_rec=1, n_events=0,
        )

    def initial_status(self) -> FlowStatus | None:
        fl = self.fl
        if fl.v0norm == 0.0:
            return FlowStatus("equilibrium_reached",
                              "the vector field vanishes at the initial point")
        if self.o.cost_tol is not None and not self.resumed and fl.rec[0].c <= self.o.cost_tol:
            return FlowStatus("cost_tol_reached", f"C = {fl.rec[0].c:.3e} at s = 0")
        return None

    def open_bar(self) -> None:
        if not self.o.progress:
            return
        from tqdm.auto import tqdm

        fl = self.fl
        assert fl.state is not None
        self.bar = tqdm(total=fl.s_end, desc=fl.description.get("class", "flow"), unit="s",
                        bar_format="{l_bar}{bar}| s={n:.3g}/{total:.3g} [{elapsed}<{remaining}]")
        self.bar.update(fl.state.s)

    def save_checkpoint(self, code: str) -> None:
        if self.checkpoint is not None:
            traj = self.fl.trajectory(FlowStatus(code), time.perf_counter() - self.start)
            traj.save(self.checkpoint, _extra=self.fl.integrator_state())

    # -- the loop ----------------------------------------------------------------------
    def run(self, theta0: Tensor, resume: Path | None) -> Trajectory:
        """Start (or resume), iterate until a status, keep the last good state, return."""
        fl = self.fl
        self.resumed = resume is not None and resume.exists()
        if self.resumed:
            assert resume is not None
            done = _restore(fl, resume)
            if done is not None:
                return done
        else:
            self.begin(theta0)
        if not self.moving_tau:
            fl.metric.rank_atol = fl.tau  # fixed along the flow (the flow's own copy)
        self.anchor = fl.state
        self.open_bar()
        status = self.initial_status()
        self.rejected_before = fl.n_rejected
        try:
            while status is None:
                status = self.iterate()
            self.flush()
        except KeyboardInterrupt:
            status = self.interrupted()
        finally:
            if self.bar is not None:
                self.bar.close()
        self.keep_last_state(status)
        self.save_checkpoint(status.code)
        return fl.trajectory(status, time.perf_counter() - self.start)

    def interrupted(self) -> FlowStatus:
        """Drop what an interrupted commit left half-done; the status says where."""
        fl = self.fl
        if self.window:  # back to the last monitored state (a checkpoint resumes from there)
            fl.state, self.window = self.anchor, []
        assert fl.state is not None
        del fl.rec[fl.state.n_rec:]
        del fl.events[fl.state.n_events:]
        status = FlowStatus("interrupted", "trajectory kept up to the last accepted step")
        status.message = f"at s = {fl.state.s:.9g}; " + status.message
        return status

    def keep_last_state(self, status: FlowStatus) -> None:
        """Append the last good state (not a regular save: ``n_rec`` excludes it)."""
        fl = self.fl
        st = fl.state
        assert st is not None
        reached = status.code == "s_end_reached"
        if fl.rec[-1].s == st.s or not (self.save_all or not reached):
            return
        try:
            monitored = self.o.monitor_rank and not self.window
            fl.rec.append(fl.row(st.s, st.theta, st.f, st.sv if monitored else None))
        except _Failure:
            fl.rec.append(fl.row(st.s, st.theta, st.f, torch.full_like(st.sv, math.nan)))

    def flush(self) -> None:
        """Monitor the state the flow stops at when it lies inside a window (``rank_every``)."""
        fl, a = self.fl, self.anchor
        st = fl.state
        if not self.window or st is None or a is None:
            return
        try:
            with fl.monitoring():
                sv = fl.sv(st.theta)
                found = events.locate_in_window(fl, [(a.s, a.theta, a.f), *self.window], a.sv, sv)
        except _Failure:
            fl.state, self.window = a, []  # the last monitored state is the last good one
            return
        fl.events.extend(found)
        fl.state = replace(st, sv=sv, rank=fl.rank_of(sv), s_prev=a.s, sv_prev=a.sv,
                           n_events=len(fl.events))
        self.window, self.anchor = [], fl.state
        fl.record_modes(st.s, st.theta, sv)

    def monitor_due(self, st: State, plan: _Plan) -> bool:
        """Whether the step being tried is monitored: every ``rank_every``-th accepted step
        (counted from ``s = 0``, so a resumed run monitors where the whole run does), every
        landing on a save time, and every step that ends beyond the anchor's horizon.

        The horizon: from the last monitored state (the anchor), a singular value moving
        towards :math:`\tau` at the rate measured between the last two monitored states
        covers half its distance to :math:`\tau` (at least ``CAP_BAND`` :math:`\tau`;
        :func:`~subriemann.flow.events.cap_near_tau`, the cap of the steps at
        ``rank_every = 1``).  Near :math:`\tau` the flow is thus monitored at every step,
        and a dip below :math:`\tau` and back is not lost between two monitored states
        of the cadence.  The steps themselves never change (the path does not depend on
        the monitor); only the spectra are added.
        """
        every = self.fl.rank_every
        if every is None or every <= 1 or plan.landing or (st.n_steps + 1) % every == 0:
            return True
        a = self.anchor
        return a is not None and st.s + plan.h > a.s + events.cap_near_tau(self.fl, math.inf, a)

    def time_monitor(self, t_step: float, t_sv: float | None) -> None:
        """``rank_every="auto"``: three times the mean cost of a spectrum over that of a step.

        Updated at every monitored step from the times measured so far, so that
        the cadence follows the costs along the flow (the first steps, which
        form the first factorizations, are dearer than the later ones).  A
        third, not a half: the saved points and the location of events cost
        spectra too (measured on full digits at lambda = 0.5 with the factor
        2: 71% on top of a step).
        """
        fl = self.fl
        tm = fl.timing
        tm[0], tm[1] = tm[0] + t_step, tm[1] + 1
        if t_sv is None or not fl.auto_cadence:
            return
        tm[2], tm[3] = tm[2] + t_sv, tm[3] + 1
        ratio = (tm[2] / tm[3]) / max(tm[0] / tm[1], 1e-9)
        fl.rank_every = max(1, math.ceil(3.0 * ratio))  # the cadence's spectra: <= 1/3

    def iterate(self) -> FlowStatus | None:
        """One attempted step: a status when the flow stops, else None."""
        st = self.fl.state
        assert st is not None
        status = self.budget_status(st)
        if status is not None:
            return status
        plan = self.plan(st)
        if isinstance(plan, FlowStatus):
            return plan
        step = self.attempt(st, plan)
        if not isinstance(step, _Step):
            return step  # a status, or None after a rejection
        new_events = self.step_events(st, step)
        if not isinstance(new_events, list):
            return new_events
        return self.commit(st, plan, step, new_events)

    def timed_step(self, st: State, h: float) -> tuple[Tensor, Tensor, float]:
        """One step of the integrator, abandoned (:class:`_OutOfTime`) when ``max_time``
        runs out before one of its stages: an evaluation can cost seconds at data scale, and
        a step of six of them would overrun the budget by as much (not in lock-step, whose
        stages are evaluated together)."""
        fl, o = self.fl, self.o
        if o.max_time is not None and fl.lockstep is None:
            fl.deadline = self.start + o.max_time
        try:
            return fl.step(st.theta, st.f, h)
        finally:
            fl.deadline = None

    def budget_status(self, st: State) -> FlowStatus | None:
        fl, o = self.fl, self.o
        if st.s >= fl.s_end:
            return FlowStatus("s_end_reached")
        if o.max_steps is not None and st.n_steps >= o.max_steps:
            return FlowStatus("max_steps_reached", f"{st.n_steps} accepted steps")
        if o.max_time is not None and time.perf_counter() - self.start > o.max_time:
            return FlowStatus("max_time_reached", f"after {o.max_time} s of wall time")
        if fl.n_rejected - self.rejected_before > _MAX_REJECTIONS:
            return FlowStatus("step_size_collapsed",
                              f"{_MAX_REJECTIONS} rejected steps in a row at s = {st.s:.9g}")
        return None

    def plan(self, st: State) -> _Plan | FlowStatus:
        """The step to try: the proposed one, capped near tau, shortened to land on the grid."""
        fl, o = self.fl, self.o
        h_free = st.h if st.h is not None else fl.initial_step(st.theta, st.f)
        h = min(h_free, o.max_step)
        if o.monitor_rank and not fl.cadence:  # with a cadence the steps ignore the monitor
            h = events.cap_near_tau(fl, h, st)
        on_grid = st.grid_index < len(self.grid)
        target = self.grid[st.grid_index] if on_grid else fl.s_end
        landing = st.s + h >= target - 1e-12 * h
        if landing:
            h = target - st.s
        if h > 16 * np.finfo(float).eps * max(1.0, abs(st.s)):
            return _Plan(h_free, h, target, on_grid, landing)
        if self.nonfinite_streak:
            return FlowStatus("nonfinite", f"at s = {st.s:.9g}: {self.last_failure}")
        return FlowStatus(
            "step_size_collapsed",
            f"step size {h:.3g} at s = {st.s:.9g} (near-singular vector field; "
            f"sigma_min = {float(st.sv[-1]) if st.sv.numel() else 0.0:.3g}, tau = {fl.tau:.3g})",
        )

    def reject(self, st: State, h: float, failure: _Failure | None = None) -> None:
        """Retry from ``st`` with step ``h`` (a failed evaluation counts in the streak)."""
        self.fl.n_rejected += 1
        if failure is not None:
            self.nonfinite_streak += 1
            self.last_failure = str(failure)
        self.fl.state = replace(st, h=h)

    def attempt(self, st: State, plan: _Plan) -> _Step | FlowStatus | None:
        """Try the planned step: the accepted step, a status, or None (rejected, retry)."""
        fl, o = self.fl, self.o
        h = plan.h
        try:
            t0 = time.perf_counter()
            y1, f1, err = self.timed_step(st, h)
            t1 = time.perf_counter()
            # rank monitor at accepted (monitored) steps; at a rejected one only where the
            # vector field may jump at a rank change (a rejection may then be an event)
            accepted = not o.adaptive or err <= 1.0
            watch = o.monitor_rank and (accepted or fl.field_jumps) and self.monitor_due(st, plan)
            sv1 = fl.sv(y1) if watch else None
            self.time_monitor(t1 - t0, time.perf_counter() - t1 if watch and accepted else None)
        except _OutOfTime:
            return FlowStatus(
                "max_time_reached", f"after {o.max_time} s of wall time (inside the step from "
                f"s = {st.s:.9g}, dropped; the flow ends at its last accepted state)")
        except _Failure as failure:
            if not o.adaptive:
                return FlowStatus("nonfinite", f"at s = {st.s:.9g}: {failure}")
            fl.n_rejected += 1
            self.nonfinite_streak += 1
            self.last_failure = str(failure)
            if self.nonfinite_streak >= _MAX_NONFINITE:
                return FlowStatus("nonfinite", f"at s = {st.s:.9g}: {failure}")
            fl.state = replace(st, h=0.25 * h)
            return None
        step = _Step(h, y1, f1, sv1, st.h, plan.landing, None)
        if o.adaptive:
            fac = fl.controller.factor(err)
            if err > 1.0:
                cut = self.cut_at_event(st, step, fac)
                if cut is None:
                    return None
                step = cut
            h, landing = step.h, step.landing
            # a step shortened to land on a save time does not shrink the free step
            new_h = max(plan.h_free, h * fac) if landing and fac >= 1.0 else h * fac
            step = replace(step, new_h=new_h)
        self.nonfinite_streak = 0
        self.rejected_before = fl.n_rejected
        return step

    def cut_at_event(self, st: State, step: _Step, fac: float) -> _Step | None:
        """A step that fails error control across a rank change, cut at the crossing.

        The vector field may jump at a rank change, so no step across it
        passes error control: step to the crossing on the old branch instead
        (when that sub-step passes error control) and go on on the new stratum.
        None: an ordinary rejection (already recorded).
        """
        fl, h, sv1 = self.fl, step.h, step.sv1
        cross = events.crossings(fl, st.sv, sv1) if sv1 is not None else []
        if sv1 is None or not cross:
            self.reject(st, h * fac)
            return None
        try:
            k = events.first_crossing(fl, st, sv1, cross)
            with fl.monitoring():
                found = events.locate(fl, st.s, st.theta, st.f, h, k, st.sv, sv1, None)
            f_hi = fl.field(found[1]) if found is not None and found[3] <= 1.0 else None
        except _Failure as failure:
            self.reject(st, 0.25 * h, failure)
            return None
        if found is None or f_hi is None:
            # no crossing on the old branch, or the sub-step to it is itself too long
            self.reject(st, h * fac)
            return None
        ev, y_hi, sv_hi, _ = found
        return _Step((ev.s - st.s) + 0.5 * ev.s_bracket, y_hi, f_hi, sv_hi, step.new_h, False, ev)

    def step_events(self, st: State, step: _Step) -> list[RankChange] | FlowStatus | None:
        """The rank events inside an accepted step, by time (None: rejected after all)."""
        if step.jump is not None:
            return [step.jump]
        if step.sv1 is None:
            return []
        try:
            with self.fl.monitoring():
                return self.locate_events(st, step, step.sv1)
        except _Failure as failure:
            if not self.o.adaptive:
                return FlowStatus("nonfinite", f"at s = {st.s:.9g}: {failure}")
            self.reject(st, 0.25 * step.h)
            return None

    def locate_events(self, st: State, step: _Step, sv1: Tensor) -> list[RankChange]:
        """The events of an accepted step whose end has singular values ``sv1``, by time."""
        fl = self.fl
        if self.window:  # unmonitored steps since the anchor: search them
            a = self.anchor
            assert a is not None
            points = [(a.s, a.theta, a.f), *self.window, (st.s + step.h, step.y1, step.f1)]
            return events.locate_in_window(fl, points, a.sv, sv1)
        found: list[RankChange] = []
        for k in events.crossings(fl, st.sv, sv1):
            ev = events.locate(fl, st.s, st.theta, st.f, step.h, k, st.sv, sv1, step.y1)
            assert ev is not None  # the accepted end is past the crossing
            found.append(ev[0])
        return sorted(found, key=lambda e: e.s)

    def rank_stop(self, step: _Step, new_events: list[RankChange]
                  ) -> tuple[_Step, float, FlowStatus] | FlowStatus:
        """``stop_on_rank_change``: the step ends just after the first event."""
        ev = new_events[0]
        try:
            f_ev = step.f1 if step.jump is not None else self.fl.field(ev.theta)
        except _Failure as failure:
            return FlowStatus("nonfinite", f"at the rank change: {failure}")
        stop = FlowStatus("rank_change",
                          f"rank {ev.rank_before} -> {ev.rank_after} at s = {ev.s:.9g}")
        cut = replace(step, y1=ev.theta, f1=f_ev, sv1=ev.singular_values_after, landing=False)
        return cut, ev.s + 0.5 * ev.s_bracket, stop

    def commit(self, st: State, plan: _Plan, step: _Step, new_events: list[RankChange]
               ) -> FlowStatus | None:
        """Record the accepted step, then replace the state in one assignment."""
        fl, o = self.fl, self.o
        s1 = plan.target if step.landing else st.s + step.h
        if self.moving_tau and step.sv1 is not None:
            fl.tau = self.tau_at(step.sv1)
            fl.metric.rank_atol = None
        stop_here: FlowStatus | None = None
        if new_events and o.stop_on_rank_change:
            cut = self.rank_stop(step, new_events)
            if isinstance(cut, FlowStatus):
                return cut
            step, s1, stop_here = cut
            new_events = new_events[:1]
        on_grid_landing = step.landing and plan.on_grid
        sv1 = step.sv1
        monitored = sv1 is not None or not o.monitor_rank
        rows: list[_Row] = []
        if (self.save_all and monitored) or on_grid_landing or stop_here is not None:
            try:
                if sv1 is None:  # not monitored: singular values at saved points only
                    sv1 = fl.sv(step.y1)
            except _Failure as failure:
                return FlowStatus("nonfinite", f"at s = {s1:.9g}: {failure}")
            rows.append(fl.row(s1, step.y1, step.f1, sv1))
        if sv1 is None:
            sv1 = st.sv  # stale, unused: the rank is not monitored
        fl.rec.extend(rows)
        fl.events.extend(new_events)
        self.advance(st, State(
            s=s1, theta=step.y1, f=step.f1, sv=sv1, rank=fl.rank_of(sv1),
            n_steps=st.n_steps + 1, grid_index=st.grid_index + 1 if on_grid_landing
            else st.grid_index, s_prev=st.s_prev, sv_prev=st.sv_prev, h=step.new_h,
            n_rec=len(fl.rec), n_events=len(fl.events),
        ), monitored)
        if self.bar is not None:
            self.bar.update(s1 - st.s)
        return stop_here if stop_here is not None else self.after_commit()

    def advance(self, st: State, new: State, monitored: bool) -> None:
        """Replace the state by ``new``; a monitored state becomes the anchor of the cadence.

        The rate of the singular values (:func:`~subriemann.flow.events.cap_near_tau`)
        is taken between consecutive monitored states; an unmonitored state keeps
        the singular values of the anchor and joins the window.
        """
        fl = self.fl
        if monitored:
            a = self.anchor if self.anchor is not None else st
            new = replace(new, s_prev=a.s, sv_prev=a.sv)
        fl.state = new
        if monitored:
            self.window, self.anchor = [], new
            if self.o.monitor_rank:
                fl.record_modes(new.s, new.theta, new.sv)
        else:
            self.window.append((new.s, new.theta, new.f))

    def after_commit(self) -> FlowStatus | None:
        """The stops after an accepted step: chattering, cost, equilibrium; a checkpoint."""
        fl, o = self.fl, self.o
        st = fl.state
        assert st is not None
        if events.chattering(fl):
            last = fl.events[-1]
            top = continuation.band_top(fl.tau, st.sv, o.rank_band) if fl.banded else 0.0
            tried = (f"the continuation band [tau, {top:.3g}] (rank_band = {o.rank_band:g}) "
                     "made the field continuous, yet sigma keeps crossing tau"
                     if top > 0.0 else
                     "hard threshold: no continuation band (rank_band = 0 or "
                     "rank_band * sigma_max <= tau); a rank_band above tau / sigma_max "
                     "smooths the field")
            return FlowStatus(
                "rank_chattering",
                f"rank flips {last.rank_before} <-> {last.rank_after} at s = {st.s:.6g} "
                f"(sigma_{last.index + 1} stays at tau = {fl.tau:.3g}); tried: {tried}; "
                + FlowStatus("rank_chattering").message,
            )
        cost = fl.evaluate("point", st.theta)[1]
        if o.cost_tol is not None and cost <= o.cost_tol:
            return FlowStatus("cost_tol_reached", f"C = {cost:.3e} at s = {st.s:.9g}")
        vnorm = float(st.f.norm())
        if fl.v0norm and vnorm <= o.stall_tol * fl.v0norm:
            return FlowStatus("equilibrium_reached",
                              f"|V| = {vnorm:.3e} <= {o.stall_tol:.1e} |V(0)| at s = {st.s:.9g}")
        # a checkpoint at a monitored state only (a resumed run starts with no window)
        self.checkpoint_owed |= st.n_steps % o.checkpoint_every == 0
        if self.checkpoint is not None and self.checkpoint_owed and not self.window:
            self.checkpoint_owed = False
            self.save_checkpoint("running")
        return None


def _restore(fl: Flow, path: Path) -> Trajectory | None:
    """Load a checkpoint into ``fl``; return the trajectory when that run had finished."""
    traj, integ, arrays = read_checkpoint(path)
    if not integ:
        raise ValueError(f"{path} is a trajectory without integrator state, not a checkpoint")
    check_same_problem(traj.problem, fl.problem, path)
    resumable = ("running", "interrupted", "max_steps_reached", "max_time_reached")
    if traj.status.code not in resumable:
        return traj
    _check_resume(fl, traj, integ, path)
    dev = fl.space.device
    fl.tau = traj.rank_tau
    fl.cheap_sv = bool(integ.get("cheap_sv", False))
    if fl.rank_every is None or "rank_every" in integ:
        fl.rank_every = integ.get("rank_every", fl.rank_every)
    fl.book = continuation.SegmentBook.from_meta(integ.get("segments"))
    fl.v0norm = integ["v0norm"]
    fl.nfev, fl.n_rejected = integ["nfev"], integ["n_rejected"]
    fl.wall_before = float(traj.counters.get("wall_time", 0.0))
    fl.monitor_time = float(traj.counters.get("monitor_time", 0.0))
    fl.n_spectra = int(traj.counters.get("n_spectra", 0))
    n_rec, n_events = integ["n_rec"], integ["n_events"]
    fl.rec = [
        _Row(float(traj.s[i]), traj.theta[i].to(dev), traj.outputs[i].to(dev),
             float(traj.cost[i]), float(traj.grad_norm[i]), traj.singular_values[i].to(dev),
             int(traj.rank[i]))
        for i in range(n_rec)
    ]
    fl.events = list(traj.events[:n_events])
    fl.state = State(
        s=integ["s"], theta=arrays["theta"].to(dev), f=arrays["f"].to(dev),
        sv=arrays["sv"].to(dev), rank=integ["rank"], n_steps=integ["n_steps"],
        grid_index=integ["grid_index"], s_prev=integ["s_prev"],
        sv_prev=arrays["sv_prev"].to(dev) if "sv_prev" in arrays else None, h=integ["h"],
        n_rec=n_rec, n_events=n_events,
    )
    return None


def _check_resume(fl: Flow, traj: Trajectory, integ: dict[str, Any], path: Path) -> None:
    now = fl.o.settings()
    then = traj.settings
    diff = [
        f"{k}: {then.get(k)!r} -> {v!r}"
        for k, v in now.items()
        if k not in RESUME_FREE and then.get(k) != v
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
