r"""The options of a flow, validated once: :class:`FlowOptions`.

:func:`subriemann.gradient_flow` builds a :class:`FlowOptions` from its
keyword arguments with :meth:`FlowOptions.create` (every value checked, with a
one-line ``TypeError``/``ValueError`` naming the option), and the engine only
reads its typed attributes.  :meth:`FlowOptions.settings` is what a
trajectory records (``Trajectory.settings``) and what ``resume`` compares.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from subriemann.integrators import TABLEAUS
from subriemann.validation import check_bool, check_choice, check_int, check_optional, check_real

__all__ = ["FlowOptions", "METHODS", "RANK_METHODS", "RESUME_FREE", "SMALL_PROBLEM"]

METHODS = tuple(TABLEAUS)
"""The integrators of :func:`~subriemann.gradient_flow` (the tableaus' names)."""

RANK_METHODS = ("auto", "metric", "ntk")
"""How the rank monitor computes singular values (see :func:`~subriemann.gradient_flow`)."""

SMALL_PROBLEM = 4_000_000
"""QN·K up to which a problem is small: one spectrum of D costs about one vector field
(``rank_every="auto"`` monitors every step; ``subriemann run`` uses one thread and saves
50 points)."""

RESUME_FREE = ("max_steps", "max_time", "checkpoint_every", "progress")
"""Options that may differ between a run and its resumption (budgets and presentation)."""


def _save_grid(save_at: Any, s_end: float) -> list[float]:
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
    return grid


@dataclass
class FlowOptions:
    r"""Every option of a flow, validated once (build it with :meth:`create`).

    After validation ``save_at`` is the sorted list of requested save times
    (None: the default saves) and ``min_event_step`` the shortest step the
    cap near :math:`\tau` may impose.

    Parameters
    ----------
    s_end : float
        Final flow time, :math:`> 0`.
    method : {"dopri5", "rk4", "euler"}
        Integrator: a tableau of :data:`subriemann.integrators.TABLEAUS`.
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
        (``metric.field_may_jump``: :math:`\lambda = 1`, bundle and custom
        metrics).
    checkpoint_every : int
        Accepted steps between two checkpoints (with ``checkpoint`` of
        :func:`~subriemann.gradient_flow`).
    progress : bool
        Show a progress bar (tqdm).
    rank_every : int or "auto"
        Compute the singular values at every ``rank_every``-th accepted step
        (and at every saved point) instead of at every accepted step, where the
        vector field cannot jump at a rank change (``metric.field_may_jump``
        false: :math:`\lambda < 1`, Euclidean); 1 for the other metrics.
        When the rank differs between two monitored steps, the step of the
        crossing is found by bisection over the accepted states in between and
        the event is located in it exactly as with ``rank_every=1``.  A step
        that ends beyond the last monitored state's horizon (where a singular
        value approaching :math:`\tau` at its measured rate would cover half
        its distance) is monitored too, so that near :math:`\tau` every step is
        and a rank that drops and recovers is seen as at ``rank_every=1``
        (unless within one step).  With ``save_at`` unset, the
        saved points are the monitored steps.  ``"auto"``: 1 where the
        spectrum is cheap (:math:`QN\cdot K \le 4\cdot10^6`), else three
        times the ratio of the mean measured costs of one spectrum and of one
        step, updated at every monitored step, so that the cadence's spectra add
        at most about a third of the integration's time (the last value is
        ``Trajectory.counters["rank_every"]``).  Where it monitors then
        depends on timings, never the path: with a cadence the steps ignore the
        monitor.  See docs/scale.md.
    rank_band : float
        :math:`\beta` of the continuation through rank loss
        (:mod:`subriemann.flow.continuation`): directions with
        :math:`\tau < \sigma < b = \max(\beta\sigma_{\max}, 10\tau)` are
        weighed by a smooth step, so the vector field is continuous where a
        singular value crosses :math:`\tau` and :math:`|V| \lesssim |r|/b`.
        0 restores the hard threshold (a field that jumps at :math:`\tau`).
    """

    s_end: float
    method: str = "dopri5"
    rtol: float = 1e-8
    atol: float = 1e-10
    step_size: float | None = None
    first_step: float | None = None
    max_step: float = math.inf
    save_at: list[float] | None = None
    min_saves: int = 50
    cost_tol: float | None = None
    stall_tol: float = 1e-12
    max_steps: int | None = None
    max_time: float | None = None
    monitor_rank: bool = True
    stop_on_rank_change: bool = False
    event_tol: float = 1e-9
    fixed_threshold: bool = True
    rank_method: str = "auto"
    checkpoint_every: int = 50
    progress: bool = False
    rank_band: float = 1e-3
    rank_every: int | str = 1
    min_event_step: float = field(default=0.0)

    @classmethod
    def names(cls) -> set[str]:
        """The keyword options (every field but ``s_end`` and the derived ``min_event_step``)."""
        return {f for f in cls.__dataclass_fields__ if f not in ("s_end", "min_event_step")}

    @classmethod
    def create(cls, s_end: Any, **options: Any) -> FlowOptions:
        """Validate ``s_end`` and the keyword options; unknown names raise ``TypeError``."""
        known = cls.names()
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"gradient_flow() got unknown option(s) {', '.join(unknown)} "
                            f"(known: {', '.join(sorted(known))})")
        o = cls(s_end=check_real(s_end, "s_end", low=0.0, low_open=True), **options)
        o._validate()
        return o

    def _validate(self) -> None:
        check_choice(self.method, "method", METHODS)
        check_choice(self.rank_method, "rank_method", RANK_METHODS)
        self._validate_steps()
        self.first_step = check_optional(check_real, self.first_step, "first_step", low=0.0,
                                         low_open=True)
        self.cost_tol = check_optional(check_real, self.cost_tol, "cost_tol", low=0.0)
        self.max_time = check_optional(check_real, self.max_time, "max_time", low=0.0)
        self.max_steps = check_optional(check_int, self.max_steps, "max_steps", low=0)
        self.min_saves = max(check_int(self.min_saves, "min_saves", low=0), 2)
        self.checkpoint_every = check_int(self.checkpoint_every, "checkpoint_every", low=1)
        for name in ("monitor_rank", "stop_on_rank_change", "fixed_threshold", "progress"):
            setattr(self, name, check_bool(getattr(self, name), name))
        if self.save_at is not None:
            self.save_at = _save_grid(self.save_at, self.s_end)
        self.rank_band = check_real(self.rank_band, "rank_band", low=0.0, high=1.0,
                                    high_open=True)
        if self.rank_every != "auto":
            if isinstance(self.rank_every, str):
                raise ValueError(f"rank_every must be a positive integer or 'auto', "
                                 f"got {self.rank_every!r}")
            self.rank_every = check_int(self.rank_every, "rank_every", low=1)
        self.min_event_step = max(1e-10 * self.s_end, 1e-12)

    def _validate_steps(self) -> None:
        self.rtol = check_real(self.rtol, "rtol", low=0.0)
        self.atol = check_real(self.atol, "atol", low=0.0)
        self.stall_tol = check_real(self.stall_tol, "stall_tol", low=0.0)
        self.event_tol = check_real(self.event_tol, "event_tol", low=0.0, low_open=True)
        self.max_step = check_real(self.max_step, "max_step", low=0.0, low_open=True,
                                   finite=False)
        adaptive = TABLEAUS[self.method].adaptive
        if adaptive and self.rtol == 0 and self.atol == 0:
            raise ValueError("rtol and atol cannot both be 0")
        if not adaptive:
            self.step_size = self.s_end / 200 if self.step_size is None else check_real(
                self.step_size, "step_size", low=0.0, low_open=True)
        elif self.step_size is not None:
            raise ValueError(f"step_size is for fixed-step methods; {self.method} adapts its step")

    @property
    def adaptive(self) -> bool:
        """The method controls its step size (an embedded error estimate)."""
        return TABLEAUS[self.method].adaptive

    def grid(self) -> list[float]:
        """The times the flow lands on: ``save_at``, else (adaptive methods) ``min_saves``
        evenly spaced times; fixed steps are not shortened (every step is saved)."""
        if self.save_at is not None:
            return list(self.save_at)
        if self.adaptive:
            return [self.s_end * i / (self.min_saves - 1) for i in range(self.min_saves)]
        return []

    def batch_options(self) -> dict[str, Any]:
        """The keyword options again (for the members of a batch)."""
        d = asdict(self)
        del d["s_end"], d["min_event_step"]
        if self.adaptive:
            d["step_size"] = None
        return d

    def settings(self) -> dict[str, Any]:
        """The options as recorded in a trajectory (``Trajectory.settings``)."""
        d = asdict(self)
        s_end = d.pop("s_end")
        return d | {"s_end": s_end, "save_at": None if self.save_at is None else list(self.save_at)}
