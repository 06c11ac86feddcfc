r"""Verdicts of the report: each prediction of docs/theory.md checked on one flow.

The report states, for every flow, which predictions of the theory apply to
it, what was measured, within which tolerance, and whether the prediction held
(:class:`Verdict`).  Only predictions the theory makes for that flow are
checked; a measurement shown for comparison where the theory predicts nothing
has the outcome ``"no prediction"`` and no expected value.

The predictions (section of docs/theory.md in brackets):

* every flow, every loss: :math:`C` is non-increasing (§2);
* MSE, :math:`\lambda = 1`, :math:`\operatorname{rank}D = QN`: decay rate 2,
  :math:`C(s) = C(0)e^{-2s}`, and the straight line :math:`ty + (1-t)x(0)` (§3);
* MSE, :math:`\lambda = 1`, rank loss: the bend
  :math:`z = (1-t)(U(t,0)-1)(x(0)-y)` of (2.58) (§4);
* cross-entropy, :math:`\lambda = 1`, :math:`\operatorname{rank}D = QN`: constant
  hyperplane sums :math:`\langle 1, x_j(s)\rangle`, and, for labels with positive
  entries, :math:`x \to x^*` at the late-time rate :math:`\mu` (§6).

**Tolerances** come from an estimate :math:`\varepsilon` of the error of the
computed outputs :math:`x(s)` (:func:`output_error`), never from the measured
value itself:

* *integration*: every accepted step keeps its local error estimate within
  ``atol + rtol·|θ_i|`` per component (RMS norm :math:`\le 1`), so
  :math:`|\delta\theta| \le \mathrm{atol}\sqrt K + \mathrm{rtol}|\theta|` per
  step, and :math:`D` maps it to at most :math:`\sigma_{\max}` times that in
  output space.  The output flows checked here do not expand errors (the
  adapted MSE flow contracts at rate 1; the adapted cross-entropy flow is the
  gradient flow of a convex function of :math:`x`), so the errors of the
  ``n_steps`` steps add up:
  :math:`\varepsilon_{\rm int} = n\,\sigma_{\max}
  (\mathrm{atol}\sqrt K + \mathrm{rtol}\max_s|\theta|)`.
  This is an a-priori estimate from the error control, not a rigorous bound.
* *band filter* (docs/flows.md): while a singular value lies between
  :math:`\tau` and :math:`b = \beta\sigma_{\max}` the flow weighs its term
  down, which changes :math:`\partial_s x` by
  :math:`\sum_{\rm band}(1 - w_i)(u_i^\top r)u_i`, of norm at most
  :math:`\min(b\,\delta/(1-\delta)\,|V|,\ |r|)` with :math:`\delta` the
  recorded field deviation, :math:`V` the field and :math:`r = \nabla_xC`;
  integrated over the filtered segments this is :math:`\varepsilon_{\rm band}`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from subriemann.analysis.cross_entropy import (
    HyperplaneSums,
    LimitError,
    asymptotic_rate,
    fitted_rate,
)
from subriemann.flow.trajectory import Trajectory
from subriemann.losses import get_loss

__all__ = [
    "OUTCOMES",
    "Verdict",
    "OutputError",
    "output_error",
    "output_gradient_norms",
    "is_adapted",
    "on_hyperplanes",
    "flow_verdicts",
    "deviation",
    "verdict_line",
    "CE_RATE_RTOL",
    "CE_RATE_WINDOW",
]

OUTCOMES = ("held", "failed", "not checked", "no prediction")
"""The possible :attr:`Verdict.outcome` values."""

CE_RATE_RTOL = 0.05
r"""Relative tolerance of the fitted late-time rate against :math:`\mu` (cross-entropy).

Not an error bound: a fit over a finite window sees a weighted mean of the
slowest rates of the :math:`H_j^*`, which exceeds :math:`\mu` by a few percent
when the next rate is close (docs/cross_entropy.md)."""

CE_RATE_WINDOW = 1e-3
""":math:`|x - x^*|/|x(0) - x^*|` below which the late-time rate is fitted."""


@dataclass(frozen=True)
class Verdict:
    """One prediction checked on one flow.

    Attributes
    ----------
    check : str
        Key: ``descent``, ``decay_rate``, ``straight_line``, ``propagator``,
        ``hyperplane_sums`` or ``late_rate``.
    prediction : str
        What the theory predicts, in words (``"decay rate of C = 2"``).
    section : str
        Where: ``"docs/theory.md §3"``.
    measured, expected, tolerance : float or None
        The measured value, the predicted one and the largest admissible
        ``|measured - expected|`` (or ``measured - expected`` for one-sided
        checks); ``None`` when there is none.
    outcome : str
        One of :data:`OUTCOMES`.
    note : str
        What the tolerance is made of, or why nothing was checked.
    relation : str
        ``"="``: held when ``|measured - expected| <= tolerance``; ``"<="``: held
        when ``measured <= expected + tolerance``.
    """

    check: str
    prediction: str
    section: str
    measured: float | None
    expected: float | None
    tolerance: float | None
    outcome: str
    note: str = ""
    relation: str = "="

    @property
    def held(self) -> bool | None:
        """True/False when checked, else None."""
        return {"held": True, "failed": False}.get(self.outcome)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (non-finite numbers become None)."""
        d = asdict(self)
        for k in ("measured", "expected", "tolerance"):
            v = d[k]
            d[k] = None if v is None or not math.isfinite(v) else float(v)
        return d

    def line(self) -> str:
        """One line: prediction (section): measured vs expected, tolerance → outcome."""
        return verdict_line(self.as_dict())


def deviation(v: Mapping[str, Any]) -> float | None:
    """``measured - expected`` (``"<="``) or ``|measured - expected|`` (``"="``), if both exist."""
    if v["measured"] is None or v["expected"] is None:
        return None
    d = v["measured"] - v["expected"]
    return d if v["relation"] == "<=" else abs(d)


def verdict_line(v: Mapping[str, Any]) -> str:
    """The one-line text of a verdict (a :class:`Verdict` or its ``summary.json`` dict)."""
    meas = "–" if v["measured"] is None else f"{v['measured']:.4g}"
    if v["outcome"] in ("held", "failed"):
        off = f"{deviation(v):.2g}"
        if v["relation"] == "<=":
            body = f"measured {meas}, expected ≤ {v['expected']:.4g} + {v['tolerance']:.2g}"
        else:
            body = (f"measured {meas}, expected {v['expected']:.4g} ± {v['tolerance']:.2g} "
                    f"(off by {off})")
    elif v["outcome"] == "no prediction":
        body = f"measured {meas}"
    else:
        body = v["note"]
    return f"{v['prediction']} ({v['section']}): {body} → {v['outcome']}"


def _checked(check: str, prediction: str, section: str, measured: float, expected: float,
             tolerance: float, note: str, *, one_sided: bool = False) -> Verdict:
    if not (math.isfinite(measured) and math.isfinite(tolerance)):
        return Verdict(check, prediction, section, measured, expected, None, "not checked",
                       f"not checked: the error estimate is not finite ({note})",
                       "<=" if one_sided else "=")
    gap = measured - expected if one_sided else abs(measured - expected)
    outcome = "held" if gap <= tolerance else "failed"
    return Verdict(check, prediction, section, measured, expected, tolerance, outcome, note,
                   "<=" if one_sided else "=")


# -- error estimate --------------------------------------------------------------------------
@dataclass(frozen=True)
class OutputError:
    r"""Estimated error of the computed outputs :math:`x(s)` along a flow (absolute, 2-norm).

    Attributes
    ----------
    integration : float
        :math:`\varepsilon_{\rm int}` (see the module docstring).
    band_filter : float
        :math:`\varepsilon_{\rm band}`: 0 when no direction was filtered with a
        nonzero deviation.
    """

    integration: float
    band_filter: float

    @property
    def total(self) -> float:
        return self.integration + self.band_filter


def output_gradient_norms(traj: Trajectory) -> Tensor | None:
    r""":math:`|\nabla_xC(x(s))|` at the saved points, shape ``[T]``; None for an unknown loss."""
    try:
        loss = get_loss(traj.loss)
    except (ValueError, KeyError, TypeError):
        return None
    n, q = int(traj.num_samples), int(traj.num_outputs)
    x = traj.outputs.to(torch.float64).reshape(len(traj), n, q)
    y = traj.targets.to(torch.float64).reshape(n, q)
    return loss.grad(x, y).reshape(len(traj), -1).norm(dim=1)


def _band_error(traj: Trajectory, grad_x: Tensor | None) -> float:
    r""":math:`\varepsilon_{\rm band}`: the band filter's change of the outputs, integrated.

    On each interval between saved points that a filtered segment (deviation > 0)
    overlaps, the rate is the smaller of :math:`b\,\delta/(1-\delta)\,|V|` and
    :math:`|r|` (both maximized over the interval's ends, :math:`\delta` the
    largest deviation of the overlapping segments).
    """
    segs = [g for g in traj.segments if g.kind == "filtered" and g.max_deviation > 0.0]
    if not segs or len(traj) < 2:
        return 0.0
    beta = float(traj.settings.get("rank_band", 0.0) or 0.0)
    s = [float(v) for v in traj.s]
    smax = [float(v) for v in traj.singular_values[:, 0]]
    field = [float(v) for v in traj.grad_norm]
    total = 0.0
    for k in range(len(s) - 1):
        devs = [g.max_deviation for g in segs if g.s_start <= s[k + 1] and g.s_end >= s[k]]
        if not devs:
            continue
        dev = max(devs)
        top = beta * max(smax[k], smax[k + 1]) if beta > 0 else max(g.band_top for g in segs)
        rate = top * dev / (1.0 - dev) * max(field[k], field[k + 1]) if dev < 1 else math.inf
        if grad_x is not None:
            rate = min(rate, float(max(grad_x[k], grad_x[k + 1])))
        total += rate * (s[k + 1] - s[k])
    return total


def output_error(traj: Trajectory, grad_x: Tensor | None = None) -> OutputError:
    """:class:`OutputError` of ``traj`` (``grad_x``: :func:`output_gradient_norms`, if known)."""
    n = int(traj.counters.get("n_steps", 0))
    rtol = float(traj.settings.get("rtol", 0.0) or 0.0)
    atol = float(traj.settings.get("atol", 0.0) or 0.0)
    k = int(traj.theta.shape[1]) if traj.theta.ndim == 2 else 0
    sigma = float(traj.singular_values.max()) if traj.singular_values.numel() else 0.0
    theta = float(traj.theta.to(torch.float64).norm(dim=1).max()) if len(traj) else 0.0
    integration = n * sigma * (atol * math.sqrt(k) + rtol * theta)
    return OutputError(integration, _band_error(traj, grad_x))


# -- the checks ------------------------------------------------------------------------------
def is_adapted(traj: Trajectory, lam: float | None = None) -> bool:
    r"""Whether the flow is the adapted one, :math:`\lambda = 1` (from ``lam`` or the metric)."""
    if lam is None:
        lam = traj.metric.get("lam")
    return lam is not None and float(lam) == 1.0


def _descent(traj: Trajectory, grad_x: Tensor | None, err: OutputError) -> Verdict:
    c = traj.cost.to(torch.float64)
    rise = float((c[1:] - c[:-1]).max()) if len(c) > 1 else 0.0
    rise = max(rise, 0.0)
    if grad_x is None:
        return Verdict("descent", "C non-increasing", "docs/theory.md §2", rise, 0.0, None,
                       "not checked", f"not checked: no gradient for loss {traj.loss!r}", "<=")
    # |C(x + e) - C(x)| <= |grad_x C| |e| to first order, at both ends of each interval
    tol = 2.0 * float(grad_x.max()) * err.total
    return _checked("descent", "C non-increasing", "docs/theory.md §2", rise, 0.0, tol,
                    "largest rise of C between saved points; tolerance 2·max|∇ₓC|·ε",
                    one_sided=True)


def _rate_tolerance(traj: Trajectory, eps: float) -> float:
    """Bound on the error of the least-squares slope of log C caused by output errors <= eps."""
    s, c = traj.s.to(torch.float64), traj.cost.to(torch.float64)
    keep = (c > 1e-24 * float(c[0])) & (c > 0)  # the points decay_rate fits
    s, c = s[keep], c[keep]
    if len(s) < 2:
        return math.inf
    r = eps / torch.sqrt(2.0 * c)  # relative error of |x - y| = sqrt(2C)
    if bool((r >= 1).any()):
        return math.inf
    delta = -2.0 * torch.log1p(-r)  # |error of log C| <= 2 |log(1 - r)|
    ds = s - s.mean()
    return float((ds.abs() * delta).sum() / (ds * ds).sum())


def _mse_verdicts(traj: Trajectory, entry: Mapping[str, Any], err: OutputError,
                  full_rank: bool, quadrature: float | None) -> list[Verdict]:
    rate = entry["decay_rate"]
    adapted = is_adapted(traj, entry.get("lam"))
    scale = float((traj.outputs[0] - traj.targets).norm()) or 1.0
    out: list[Verdict] = []
    if not adapted:
        if rate is not None:
            out.append(Verdict("decay_rate", "decay rate of C", "docs/theory.md §3",
                               rate["rate"], None, None, "no prediction",
                               "rate 2 is predicted for the adapted flow (λ = 1) only"))
        return out
    if not full_rank:
        dev = entry.get("deviation")
        if dev is None or dev.get("propagator_error") is None:
            return [Verdict("propagator", "bend z(t) from rank loss, (2.58)", "docs/theory.md §4",
                            None, 0.0, None, "not checked", "not checked: no deviation computed")]
        tol = err.total / scale + (quadrature if quadrature is not None else math.inf)
        return [_checked("propagator", "bend z(t) from rank loss, (2.58)", "docs/theory.md §4",
                         dev["propagator_error"], 0.0, tol,
                         "max|z − z_prop|/|x(0) − y|; tolerance ε/|x(0) − y| + quadrature "
                         "error of U (Richardson, half the points)")]
    note = "tolerance from ε" + (" (incl. the band filter)" if err.band_filter else "")
    if rate is not None:
        out.append(_checked("decay_rate", "decay rate of C = 2", "docs/theory.md §3",
                            rate["rate"], 2.0, _rate_tolerance(traj, err.total), note))
    if entry.get("interpolation_residual") is not None:
        out.append(_checked("straight_line", "x on the line ty + (1−t)x(0)", "docs/theory.md §3",
                            entry["interpolation_residual"], 0.0, err.total / scale,
                            "max deviation / |x(0) − y|; " + note))
    return out


def on_hyperplanes(traj: Trajectory) -> Trajectory:
    r"""``traj`` with each sample's logits moved along :math:`1` back to its initial hyperplane.

    :math:`x_j \mapsto x_j - (\langle 1, x_j\rangle - \langle 1, x_j(0)\rangle)/Q\cdot 1`
    leaves the cross-entropy unchanged and removes the drift of the hyperplane
    sums, so :math:`|x - x^*|` becomes the distance to the nearest minimizer: the
    part of :math:`x - x^*` that the late-time rate :math:`\mu` is about
    (docs/theory.md §6).  The drift itself is checked on its own.
    """
    n, q = int(traj.num_samples), int(traj.num_outputs)
    x = traj.outputs.reshape(len(traj), n, q)
    drift = x.sum(dim=-1, keepdim=True) - x[:1].sum(dim=-1, keepdim=True)
    return dataclasses.replace(traj, outputs=(x - drift / q).reshape(len(traj), n * q))


def _late_rate(traj: Trajectory, dist: LimitError) -> Verdict:
    what, sec = "late-time rate of x → x* on 1⊥ = μ", "docs/theory.md §6"
    if not dist.finite or dist.relative_final is None:
        return Verdict("late_rate", what, sec, None, None, None, "not checked",
                       "not checked: labels with zero entries (one-hot) have no finite limit x* "
                       "and no exponential rate; give --label-smoothing EPS")
    mu = asymptotic_rate(traj.targets.reshape(traj.num_samples, traj.num_outputs))
    try:
        fit = fitted_rate(on_hyperplanes(traj), quantity="distance", upper=CE_RATE_WINDOW)
    except ValueError:
        rel = dist.relative_final
        more = math.log(max(rel, CE_RATE_WINDOW) / (0.1 * CE_RATE_WINDOW)) / mu if mu > 0 else 0.0
        return Verdict("late_rate", what, sec, None, mu, None, "not checked",
                       f"not checked: |x − x*| fell to {rel:.2g} of |x(0) − x*| by s_end; the fit "
                       f"starts at {CE_RATE_WINDOW:g} (try --s-end {float(traj.s[-1]) + more:.0f})")
    note = (f"fit of log |x − x*| (drift of the sums removed) over s ∈ [{fit.s_min:.3g}, "
            f"{fit.s_max:.3g}], where |x − x*| ≤ {CE_RATE_WINDOW:g}·|x(0) − x*|; tolerance "
            f"{CE_RATE_RTOL:.0%} of μ (finite-window bias)")
    filtered = [g for g in traj.segments if g.kind == "filtered" and g.max_deviation > 0
                and g.s_start <= fit.s_max and g.s_end >= fit.s_min]
    if filtered:
        dev = max(g.max_deviation for g in filtered)
        note += (f"; the band filter was active here (field deviation ≤ {dev:.2g}; "
                 "--rank-band 0 turns it off)")
    return _checked("late_rate", what, sec, fit.rate, mu, CE_RATE_RTOL * mu, note)


def _ce_verdicts(traj: Trajectory, lam: float | None, err: OutputError, full_rank: bool,
                 sums: HyperplaneSums, dist: LimitError) -> list[Verdict]:
    what, sec = "hyperplane sums ⟨1, x_j⟩ constant", "docs/theory.md §6"
    if not is_adapted(traj, lam):
        return [Verdict("hyperplane_sums", "drift of the hyperplane sums ⟨1, x_j⟩", sec,
                        sums.max_drift, None, None, "no prediction",
                        "docs/theory.md §6 predicts constant sums for the adapted flow "
                        "(λ = 1) only")]
    if not full_rank:
        return [Verdict("hyperplane_sums", what, sec, sums.max_drift, 0.0, None, "not checked",
                        "not checked: rank D < QN on this flow (then only Σ_j⟨1, x_j⟩ is kept, "
                        "and only with a last-layer bias)")]
    q = int(traj.num_outputs)
    note = "max over j and s of |⟨1, x_j(s) − x_j(0)⟩|; tolerance √Q·ε" + (
        " (incl. the band filter)" if err.band_filter else "")
    return [_checked("hyperplane_sums", what, sec, sums.max_drift, 0.0, math.sqrt(q) * err.total,
                     note), _late_rate(traj, dist)]


def flow_verdicts(
    traj: Trajectory,
    entry: Mapping[str, Any],
    *,
    sums: HyperplaneSums | None = None,
    dist: LimitError | None = None,
    quadrature: float | None = None,
) -> list[Verdict]:
    """The verdicts of one flow.

    Parameters
    ----------
    traj : Trajectory
    entry : dict
        Its ``summary.json`` entry (``lam``, ``decay_rate``, ``interpolation_residual``,
        ``deviation``, ``rank``), from :func:`subriemann.app.report.analyse_flow`.
    sums, dist : optional
        :func:`~subriemann.analysis.cross_entropy.hyperplane_sums` and
        :func:`~subriemann.analysis.cross_entropy.limit_error` of a cross-entropy flow.
    quadrature : float, optional
        Estimated quadrature error of the propagator prediction (MSE, rank loss).
    """
    grad_x = output_gradient_norms(traj)
    err = output_error(traj, grad_x)
    out = [_descent(traj, grad_x, err)]
    full_rank = entry["rank"]["min"] == traj.outputs.shape[1]
    if traj.loss == "mse":
        out += _mse_verdicts(traj, entry, err, full_rank, quadrature)
    elif sums is not None and dist is not None:
        out += _ce_verdicts(traj, entry.get("lam"), err, full_rank, sums, dist)
    return out
