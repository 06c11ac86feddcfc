r"""Rank events of a flow: the monitor's crossings, their location, the step cap near tau.

The numerical rank of :math:`D` is the number of :math:`\sigma_i > \tau`.
When it changes across an accepted (or a rejected) step, the crossing of the
smooth function :math:`\sigma_k(s) - \tau` is localized by a safeguarded
regula falsi (Illinois) on sub-steps of the same integrator that use the vector
field of the stratum the step started on (the *old branch*: threshold
:math:`\tau'` of :func:`old_branch_tau`, passed explicitly).  Where a singular
value approaches :math:`\tau`, :func:`cap_near_tau` caps the step so that it
moves at most half its distance to :math:`\tau` (but at least
``CAP_BAND`` :math:`\tau`).  :func:`chattering` detects a rank that flips back
and forth at the threshold.

Every function takes the flow first (anything with the attributes of :class:`Flow`).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
from torch import Tensor

from subriemann.flow.trajectory import RankChange

__all__ = ["CAP_BAND", "old_branch_tau", "substep", "locate", "locate_in_window", "crossings",
           "cap_near_tau", "first_crossing", "chattering"]

CAP_BAND = 1e-3
"""A singular value approaching tau moves at most ``max(gap / 2, CAP_BAND * tau)`` per step."""


class Flow(Protocol):
    """What the event functions use of a flow (:class:`subriemann.flow.engine.Flow`)."""

    tau: float
    s_end: float
    o: Any  # FlowOptions
    events: list[RankChange]

    def step(self, theta: Tensor, f0: Tensor, h: float, tau: float | None = None
             ) -> tuple[Tensor, Tensor, float]: ...

    def sv(self, theta: Tensor) -> Tensor: ...

    def rank_of(self, sv: Tensor) -> int: ...

    def sv_rounding(self, sv: Tensor) -> float: ...


class State(Protocol):
    """What :func:`cap_near_tau` and :func:`first_crossing` use of an integrator state."""

    @property
    def s(self) -> float: ...

    @property
    def s_prev(self) -> float: ...

    @property
    def sv(self) -> Tensor: ...

    @property
    def sv_prev(self) -> Tensor | None: ...


def old_branch_tau(fl: Flow, sv0: Tensor, k: int, falling: bool) -> float:
    r"""A threshold :math:`\tau'` on the side of :math:`\sigma_k` where :math:`\tau` starts.

    Sub-steps with :math:`\tau'` continue the vector field of the stratum
    the step started on (only :math:`\lambda = 1` fields depend on it).
    """
    tau = fl.tau
    if falling:  # sigma_k drops below tau: keep it with tau' < tau
        below = float(sv0[k + 1]) if k + 1 < sv0.numel() else 0.0
        return math.sqrt(tau * below) if below > 1e-6 * tau else 1e-3 * tau
    above = float(sv0[k - 1]) if k >= 1 else math.inf  # rises: keep excluding it
    return math.sqrt(tau * above) if math.isfinite(above) else 1e3 * tau

def substep(fl: Flow, y0: Tensor, f0: Tensor, a: float, tau_old: float) -> tuple[Tensor, float]:
    """The point at ``s0 + a`` on the old branch, and the sub-step's error norm."""
    if a == 0.0:
        return y0, 0.0
    if fl.o.method == "euler":  # the Euler path is piecewise linear
        return y0 + a * f0, 0.0
    y, _, err = fl.step(y0, f0, a, tau_old)
    return y, err

def locate(fl: Flow, s0: float, y0: Tensor, f0: Tensor, h: float, k: int, sv0: Tensor,
           sv1: Tensor, y1: Tensor | None
           ) -> tuple[RankChange, Tensor, Tensor, float] | None:
    r"""Localize the crossing of :math:`\sigma_k - \tau` inside the step ``[s0, s0 + h]``.

    A regula falsi with the Illinois modification, falling back to
    bisection whenever the bracket does not halve, until the bracket is at
    most ``event_tol`` wide, or narrower than the *noise band*
    :math:`2\delta/|\sigma_k'|`: the stretch of :math:`s` over which
    :math:`\sigma_k - \tau` stays within the rounding :math:`\delta` of the
    computed singular values near :math:`\tau` (``fl.sv_rounding``), where
    the sign of the computed difference says nothing more.  The slope
    :math:`\sigma_k'` is the secant of the last bracket whose ends differ by
    more than :math:`8\delta` (first: the whole step).  The band is the event's
    ``s_noise``.  ``y1`` is the accepted end of the step, or
    ``None`` for a rejected step (then the end is the old-branch sub-step,
    and ``None`` is returned when :math:`\sigma_k` does not cross on it).
    Returns the event, the point just after the crossing, its singular
    values and the error norm of the sub-step that reaches it.
    """
    tau = fl.tau
    above0 = bool(sv0[k] > tau)
    tau_old = old_branch_tau(fl, sv0, k, falling=above0)
    lo, hi = 0.0, h
    g_lo, g_hi = float(sv0[k]) - tau, float(sv1[k]) - tau
    sv_lo, sv_hi = sv0, sv1
    y_hi: Tensor | None = None
    err_hi = 0.0
    tol = fl.o.event_tol
    delta = fl.sv_rounding(sv0)
    raw = [g_lo, g_hi]  # the computed values at the ends (g_lo, g_hi are halved by Illinois)
    band = _noise_band(delta, raw, h)
    width_before = [hi - lo, hi - lo]  # widths one and two iterations ago
    last_side = 0
    for _ in range(200):
        width = hi - lo
        if abs(raw[1] - raw[0]) > 8.0 * delta:  # the secant is above the noise: the slope
            band = _noise_band(delta, raw, width)
        if width <= max(tol, band):
            break
        mid = _probe(lo, hi, g_lo, g_hi, width > 0.5 * width_before[0], tol)
        width_before = [width_before[1], width]
        ym, err_m = substep(fl, y0, f0, mid, tau_old)
        svm = fl.sv(ym)
        gm = float(svm[k]) - tau
        if (gm > 0) == above0:
            lo, g_lo, sv_lo, raw[0] = mid, gm, svm, gm
            if last_side == -1:
                g_hi *= 0.5  # Illinois: halve the retained end's value
            last_side = -1
        else:
            hi, g_hi, sv_hi, y_hi, err_hi, raw[1] = mid, gm, svm, ym, err_m, gm
            if last_side == 1:
                g_lo *= 0.5
            last_side = 1
    if y_hi is None:
        if y1 is not None and hi == h:
            y_hi, sv_hi = y1, sv1
        else:
            y_hi, err_hi = substep(fl, y0, f0, hi, tau_old)
            sv_hi = fl.sv(y_hi)
            if (float(sv_hi[k]) > tau) == above0:
                return None  # no crossing on the old branch within the step
    r_before = fl.rank_of(sv_lo)
    r_after = fl.rank_of(sv_hi)
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
        s_noise=band,
    )
    return ev, y_hi, sv_hi, err_hi


def _probe(lo: float, hi: float, g_lo: float, g_hi: float, stalled: bool, tol: float) -> float:
    """The next point: the secant's root (kept off the ends), or the midpoint when the
    bracket did not halve in two iterations (``stalled``)."""
    if stalled or g_lo == g_hi:
        return 0.5 * (lo + hi)
    width = hi - lo
    mid = lo + width * g_lo / (g_lo - g_hi)
    margin = min(0.25 * tol, 0.01 * width)
    return min(max(mid, lo + margin), hi - margin)


def _noise_band(delta: float, raw: list[float], width: float) -> float:
    r""":math:`2\delta/|\sigma_k'|` with the secant :math:`|g_1 - g_0|/w` as the slope."""
    slope = abs(raw[1] - raw[0]) / width if width > 0.0 else 0.0
    return 2.0 * delta / slope if slope > 0.0 else 0.0

def locate_in_window(fl: Flow, points: list[tuple[float, Tensor, Tensor]], sv_first: Tensor,
                     sv_last: Tensor) -> list[RankChange]:
    r"""The rank events between two monitored states with unmonitored accepted steps between.

    ``points`` are the accepted states ``(s, theta, f)`` from one monitored
    state (singular values ``sv_first``) to the next (``sv_last``), each
    consecutive pair one accepted step of the flow (the monitor's cadence
    ``rank_every``).  While the sides of :math:`\tau` differ between the
    left end and ``sv_last``, bisection over the states (one spectrum per
    probe) narrows them to one step in which the side changes, and
    :func:`locate` places the crossings inside that step exactly as for a
    monitored step; the search then goes on from its right end.  A crossing
    and its return between two probes with equal sides are not seen here; the
    flow's horizon near :math:`\tau` (``_Run.monitor_due`` in
    :mod:`subriemann.flow.engine`) keeps such windows to one step.
    """
    svs = {0: sv_first, len(points) - 1: sv_last}

    def side(i: int) -> Tensor:
        if i not in svs:
            svs[i] = fl.sv(points[i][1])
        return svs[i] > fl.tau

    found: list[RankChange] = []
    lo, end = 0, len(points) - 1
    while lo < end and not torch.equal(side(lo), side(end)):
        hi = end
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if torch.equal(side(mid), side(lo)):
                lo = mid
            else:
                hi = mid
        s0, y0, f0 = points[lo]
        for k in crossings(fl, svs[lo], svs[hi]):
            ev = locate(fl, s0, y0, f0, points[hi][0] - s0, k, svs[lo], svs[hi], points[hi][1])
            assert ev is not None  # the accepted end of the step is past the crossing
            found.append(ev[0])
        lo = hi
    return sorted(found, key=lambda e: e.s)


def crossings(fl: Flow, sv0: Tensor, sv1: Tensor) -> list[int]:
    """Indices :math:`k` with :math:`\\sigma_k - \\tau` of opposite signs at the ends."""
    side0, side1 = sv0 > fl.tau, sv1 > fl.tau
    return [int(i) for i in torch.nonzero(side0 != side1).flatten()]

def cap_near_tau(fl: Flow, h: float, st: State) -> float:
    """Cap the step so no singular value approaching tau moves more than half its distance."""
    tau = fl.tau
    if st.sv_prev is None or st.s <= st.s_prev or tau <= 0.0:
        return h
    rate = (st.sv - st.sv_prev) / (st.s - st.s_prev)
    gap = st.sv - tau
    mask = (gap * rate < 0) & (rate != 0)
    if not bool(mask.any()):
        return h
    # at least CAP_BAND * tau: a crossing is allowed (no Zeno approach), but a dip of
    # depth above CAP_BAND * tau below tau and back is sampled inside.
    allowed = torch.clamp(0.5 * gap[mask].abs(), min=CAP_BAND * tau)
    cap = float((allowed / rate[mask].abs()).min())
    return min(h, max(cap, fl.o.min_event_step))  # never lengthens the step


def first_crossing(fl: Flow, st: State, sv1: Tensor, cross: list[int]) -> int:
    """Among the crossing indices of a step, the one that (linearly) crosses first."""
    if len(cross) == 1:
        return cross[0]
    tau = fl.tau

    def frac(k: int) -> float:
        a, b = float(st.sv[k]) - tau, float(sv1[k]) - tau
        return a / (a - b) if a != b else 0.0

    return min(cross, key=frac)


def chattering(fl: Flow) -> bool:
    """The last 4 events flip the rank back and forth within a short stretch of s."""
    ev = fl.events[-4:]
    if len(ev) < 4:
        return False
    return (
        ev[-1].s - ev[0].s <= 1e-3 * max(1.0, fl.s_end)
        and len({(e.rank_before, e.rank_after) for e in ev}) == 2
        and ev[-1].rank_before == ev[-3].rank_before
    )
