r"""Figures of the report (matplotlib, Agg; no pyplot global state).

Each figure takes the flows of one run, as :class:`PlotFlow` records, and
writes one PNG with a caption that says exactly what is drawn
(:class:`ReportFigure`).  A metric has the same colour in every figure
(:func:`metric_color`).

MSE runs (:data:`FIGURES`):

* (a) :func:`cost_figure`: :math:`C(s)` on a log scale, with the prediction
  :math:`C(0)e^{-2s}` of the adapted flow (docs/theory.md §3);
* (b) :func:`output_path_figure`: the output-space paths :math:`x(s)` on the
  plane of :math:`x(0) - y` and the largest orthogonal component; the adapted
  flow is the straight segment from :math:`x(0)` to :math:`y` (docs/theory.md §3);
* (c) :func:`singular_values_figure`: the singular values of :math:`D` along
  each flow, with the rank threshold :math:`\tau` and the rank events (§5);
* (d) :func:`deviation_figure`: the deviation :math:`z(t)` from linear
  interpolation, split on :math:`\operatorname{ran}D` and its complement (§4).

Cross-entropy runs (:data:`CE_FIGURES`, docs/theory.md §6):

* (a) :func:`cost_figure`: :math:`C(s) - C^*`, :math:`C^* = \sum_j H(y_j)`, with
  the late-time slope :math:`-2\mu` of the adapted flow;
* (b) :func:`limit_distance_figure`: :math:`|x(s) - x^*|` on a log scale with
  the rate :math:`\mu` (or, for one-hot labels, the progress along the
  divergence direction);
* (c) :func:`singular_values_figure`;
* (d) :func:`hyperplane_sums_figure`: :math:`\langle 1, x_j(s)\rangle` per sample.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps, colors
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from subriemann.analysis.cross_entropy import (
    asymptotic_rate,
    hyperplane_sums,
    limit_error,
    minimum_cost,
)
from subriemann.analysis.interpolation import (
    InterpolationDeviation,
    linear_interpolation_residual,
)
from subriemann.app.verdicts import CE_RATE_WINDOW, is_adapted
from subriemann.flow.trajectory import Trajectory

__all__ = [
    "PlotFlow",
    "ReportFigure",
    "PALETTE",
    "metric_color",
    "cost_figure",
    "output_path_figure",
    "singular_values_figure",
    "deviation_figure",
    "limit_distance_figure",
    "hyperplane_sums_figure",
    "FIGURES",
    "CE_FIGURES",
    "all_figures",
]

EUCLIDEAN_COLOR = "#c0392b"
ADAPTED_COLOR = "#1f5fa8"
FISHER_COLOR = "#8e44ad"
PALETTE = ("#7f8c8d", "#b8860b", "#17becf", "#8c564b", "#e377c2", "#bcbd22")
"""Colours of metrics :func:`metric_color` does not know (custom ones), chosen by name."""

_DPI = 150
_FLOOR = 1e-17  # zero on a log axis
_ROUNDOFF = 1e-13  # relative size of a deviation that is round-off
_MAX_SAMPLES = 60  # hyperplane sums drawn per panel


@dataclass
class PlotFlow:
    r"""One flow of a run, as the figures need it.

    Attributes
    ----------
    name : str
        File-system name (``"euclidean"``).
    label : str
        Legend label, may contain mathtext (``r"$\\lambda=0$ (Euclidean)"``).
    traj : Trajectory
    deviation : InterpolationDeviation, optional
        From :func:`subriemann.analysis.interpolation_deviation` (MSE only).
    color : str, optional
        Defaults to :func:`metric_color` of the flow's metric.
    """

    name: str
    label: str
    traj: Trajectory
    deviation: InterpolationDeviation | None = None
    color: str | None = None


@dataclass(frozen=True)
class ReportFigure:
    """A figure written for the report: its file and the caption of what it draws."""

    key: str
    path: Path
    title: str
    caption: str
    wide: bool = False


@dataclass
class _Drawn:
    fig: Figure
    title: str
    caption: str
    wide: bool = False


def metric_color(metric: dict[str, Any], name: str = "") -> str:
    r"""The colour of a flow in every figure, fixed by its metric.

    Red: Euclidean (:math:`\lambda = 0`); blue: adapted (:math:`\lambda = 1`);
    oranges, darker with :math:`\lambda`: interpolated :math:`0 < \lambda < 1`;
    greens: the sub-Riemannian bundle; purple: the softmax Fisher metric;
    other metrics: :data:`PALETTE`, chosen by ``name``.

    Examples
    --------
    >>> metric_color({"class": "EuclideanMetric"})
    '#c0392b'
    >>> metric_color({"class": "InterpolatedMetric", "lam": 1.0}) == metric_color(
    ...     {"class": "OutputPullbackMetric", "lam": 1.0})
    True
    """
    cls, lam = metric.get("class", ""), metric.get("lam")
    if cls == "EuclideanMetric" or (cls == "InterpolatedMetric" and lam == 0):
        return EUCLIDEAN_COLOR
    if cls == "BundleMetric":
        lam = 1.0 if lam is None else float(lam)
        return colors.to_hex(colormaps["Greens"](0.55 + 0.35 * lam))
    if cls in ("OutputPullbackMetric", "InterpolatedMetric") and lam == 1:
        return ADAPTED_COLOR
    if cls == "InterpolatedMetric" and lam is not None:
        return colors.to_hex(colormaps["YlOrBr"](0.35 + 0.5 * float(lam)))
    if cls == "SoftmaxFisherMetric":
        return FISHER_COLOR
    return PALETTE[sum(map(ord, name or cls)) % len(PALETTE)]


def _colors(flows: Sequence[PlotFlow]) -> list[str]:
    return [f.color or metric_color(f.traj.metric, f.name) for f in flows]


def _new(
    figsize: tuple[float, float], ncols: int = 1, sharey: bool = False
) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=figsize, dpi=_DPI, layout="constrained")
    axes = fig.subplots(1, ncols, sharey=sharey, squeeze=False)[0]
    for ax in axes:
        ax.grid(True, which="major", alpha=0.3)
        ax.tick_params(labelsize=9)
    return fig, list(axes)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    log = logging.getLogger("matplotlib")
    level = log.level
    log.setLevel(max(level, logging.WARNING))  # no font-substitution chatter on stderr
    try:
        fig.savefig(path, dpi=_DPI, facecolor="white")
    finally:
        log.setLevel(level)
    return path


def _note(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=10,
            wrap=True, color="0.3")
    ax.set_axis_off()


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float64)


def _s_end(traj: Trajectory) -> float:
    last = float(traj.s[-1]) if len(traj) else 0.0
    return max(float(traj.settings.get("s_end", last)), last) or 1.0


def _stopped_early(traj: Trajectory) -> bool:
    return traj.status.code not in ("s_end_reached", "cost_tol_reached", "equilibrium_reached")


def _label(f: PlotFlow) -> str:
    if _stopped_early(f.traj) and len(f.traj):
        return f"{f.label}  [{f.traj.status.code} at s = {float(f.traj.s[-1]):.3g}]"
    return f.label


_CROSS = " A cross marks a flow that stopped before s_end (its status is in the legend)."
_COLOURS = " Colours: one per metric, the same in every figure."


def _cross_note(flows: Sequence[PlotFlow]) -> str:
    return _CROSS if any(_stopped_early(f.traj) for f in flows) else ""


def _drawable(flows: Sequence[PlotFlow], loss: str) -> bool:
    """Every flow has the ``loss`` and at least two saved points."""
    return bool(flows) and all(f.traj.loss == loss and len(f.traj) >= 2 for f in flows)


def _nothing(fig: Figure, axes: Sequence[Axes], title: str, note: str, caption: str,
             wide: bool = False) -> _Drawn:
    """A figure that says in its panels and its caption why nothing is drawn."""
    for ax in axes:
        _note(ax, note)
    return _Drawn(fig, title, caption, wide)


def _targets(traj: Trajectory) -> Any:
    return traj.targets.reshape(int(traj.num_samples), int(traj.num_outputs))


# -- (a) cost ------------------------------------------------------------------------------
def _cost_reference(ax: Axes, flows: Sequence[PlotFlow], ce: bool, s_max: float) -> str:
    """Draw the prediction of the adapted flow, if the theory makes one; its caption text."""
    adapted = [f for f in flows if is_adapted(f.traj) and len(f.traj)]
    if not adapted:
        return (" No flow is the adapted one (λ = 1), so no decay is predicted and no "
                "reference is drawn.")
    traj = adapted[0].traj
    if not ce:
        c0 = float(traj.cost[0])
        ss = np.linspace(0.0, s_max, 200)
        ax.semilogy(ss, c0 * np.exp(-2 * ss), "k--", lw=1.1,
                    label=r"$C(0)\,e^{-2s}$ (prediction for $\lambda = 1$)")
        return (" Dashed black: C(0)·e^(−2s), the decay of the adapted flow (λ = 1) when "
                "rank D = QN, whatever the architecture, data or initialization "
                "(docs/theory.md §3, [Che23]).")
    mu = asymptotic_rate(_targets(traj))
    if mu <= 0:
        return (" The labels have zero entries (one-hot): C* = 0 is an infimum that no finite "
                "logits reach, C − C* decays like 1/s and no exponential rate is predicted "
                "(docs/theory.md §6), so no reference is drawn.")
    s1, c1 = float(traj.s[-1]), float(traj.cost[-1]) - minimum_cost(_targets(traj))
    ss = np.linspace(0.5 * s1, s_max, 100)
    ax.semilogy(ss, max(c1, _FLOOR) * np.exp(-2 * mu * (ss - s1)), "k--", lw=1.1,
                label=rf"slope $-2\mu$, $\mu = {mu:.3g}$")
    return (f" Dashed black: slope −2μ (μ = {mu:.3g}) through the last point of the adapted "
            "flow: the late-time decay of C − C* once x is close to the limit x* "
            "(docs/theory.md §6; μ = min_j λ₂(diag y_j − y_j y_jᵀ)).")


def _draw_cost(flows: Sequence[PlotFlow]) -> _Drawn:
    fig, (ax,) = _new((6.4, 4.2))
    ce = bool(flows) and flows[0].traj.loss == "cross_entropy"
    cstar = minimum_cost(_targets(flows[0].traj)) + 0.0 if ce else 0.0  # never -0.0
    s_max = max([_s_end(f.traj) for f in flows], default=1.0)
    for f, col in zip(flows, _colors(flows)):
        s, c = _np(f.traj.s), _np(f.traj.cost) - cstar
        ax.semilogy(s, np.maximum(c, _FLOOR), color=col, lw=1.8, label=_label(f))
        if _stopped_early(f.traj) and len(s):
            ax.plot(s[-1:], np.maximum(c[-1:], _FLOOR), marker="x", ms=8, mew=2, color=col)
    ref = _cost_reference(ax, flows, ce, s_max) if flows else ""
    ax.set_xlim(0.0, s_max)
    ax.set_xlabel(r"flow time $s$")
    ax.set_ylabel(r"$C(s) - C^*$" if ce else r"cost $C(s)$")
    ax.legend(fontsize=8, loc="lower left", framealpha=0.9)
    if ce:
        title = "(a) Cost above its minimum"
        what = (f"C(s) − C* on a log scale, C* = Σ_j H(y_j) = {cstar:.4g} the minimum of the "
                "cross-entropy over all logits (docs/theory.md §6); the table's decay rate is "
                "the slope of this curve.")
    else:
        title = "(a) Cost along the flows"
        what = "C(s) on a log scale; the table's decay rate is the slope of this curve."
    ax.set_title(title[4:], fontsize=11)
    return _Drawn(fig, title, what + ref + _cross_note(flows) + _COLOURS)


def cost_figure(flows: Sequence[PlotFlow], path: str | Path) -> Path:
    r"""Figure (a): :math:`C(s)` (MSE) or :math:`C(s) - C^*` (cross-entropy), log scale.

    With the prediction for the adapted flow where the theory makes one:
    :math:`C(0)e^{-2s}` for MSE, the late-time slope :math:`-2\mu` for
    cross-entropy labels with positive entries.  A flow that stopped before
    ``s_end`` for another reason than convergence ends in a cross.
    """
    return _save(_draw_cost(flows).fig, path)


# -- (b) MSE: output paths -------------------------------------------------------------------
def _plane(flows: Sequence[PlotFlow]) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    r"""Origin :math:`y`, unit :math:`e_1 \parallel x(0) - y`, unit :math:`e_2 \perp e_1`, scale."""
    y = _np(flows[0].traj.targets)
    r0 = _np(flows[0].traj.outputs[0]) - y
    scale = float(np.linalg.norm(r0)) or 1.0
    e1 = r0 / scale
    perp = []
    for f in flows:
        r = _np(f.traj.outputs) - y
        perp.append(r - np.outer(r @ e1, e1))
    stack = np.concatenate(perp, axis=0)
    e2 = np.zeros_like(e1)
    if stack.size and float(np.abs(stack).max()) > 0:
        # largest (uncentred) principal direction of the orthogonal parts: the origin is y
        _, sv, vt = np.linalg.svd(stack, full_matrices=False)
        if sv[0] > 1e-14 * scale:
            e2 = vt[0]
            e2 = e2 - (e2 @ e1) * e1
            e2 /= np.linalg.norm(e2)
    return y, e1, e2, scale


def _path(ax: Axes, f: PlotFlow, col: str, plane: tuple) -> None:
    y, e1, e2, scale = plane
    r = _np(f.traj.outputs) - y
    a, b = (r @ e1) / scale, (r @ e2) / scale
    res = float(linear_interpolation_residual(f.traj))
    ax.plot(a, b, color=col, lw=1.8, label=f"{_label(f)}: residual {res:.1e}", zorder=3)
    s = _np(f.traj.s)
    for tt in (0.2, 0.4, 0.6, 0.8):
        st = -math.log1p(-tt)
        if st <= s[-1]:
            ax.plot(np.interp(st, s, a), np.interp(st, s, b), "o", ms=4, color=col, zorder=4)
    if _stopped_early(f.traj):
        ax.plot(a[-1:], b[-1:], marker="x", ms=8, mew=2, color=col, zorder=4)


def _draw_paths(flows: Sequence[PlotFlow]) -> _Drawn:
    fig, (ax,) = _new((6.4, 4.6))
    title = "(b) Output-space paths"
    if not _drawable(flows, "mse"):
        return _nothing(fig, [ax], title, "no output paths: the straight line is for MSE flows",
                        "No paths drawn: the straight-line prediction (docs/theory.md §3) is a "
                        "statement about completed MSE flows.")
    plane = _plane(flows)
    ax.plot([1.0, 0.0], [0.0, 0.0], color="0.55", lw=5, alpha=0.35, solid_capstyle="round",
            label=r"linear interpolation $t\,y + (1-t)\,x(0)$", zorder=1)
    for f, col in zip(flows, _colors(flows)):
        _path(ax, f, col, plane)
    ax.plot([1.0], [0.0], "o", ms=8, mfc="white", mec="k", zorder=5)
    ax.annotate(r"$x(0)$", (1.0, 0.0), textcoords="offset points", xytext=(6, 6), fontsize=10)
    ax.plot([0.0], [0.0], "*", ms=13, color="k", zorder=5)
    ax.annotate(r"$y$", (0.0, 0.0), textcoords="offset points", xytext=(-14, 6), fontsize=11)
    ax.set_xlabel(r"$\langle x - y,\, e_1\rangle / |x(0)-y|$,  $e_1 \parallel x(0) - y$")
    ax.set_ylabel(r"$\langle x - y,\, e_2\rangle / |x(0)-y|$,  $e_2$: main orthogonal part")
    ax.set_title("Output-space paths (dots: t = 0.2, 0.4, 0.6, 0.8)", fontsize=11)
    ax.set_aspect("equal", adjustable="datalim")  # true geometry: both axes in |x(0) - y|
    ax.legend(fontsize=8, loc="best", framealpha=0.9)
    caption = (
        "The outputs x(s) projected on the plane through the targets y (black star, origin) "
        "spanned by e₁ ∥ x(0) − y (horizontal; x(0) is the open circle at 1) and e₂, the first "
        "principal direction of all paths' components orthogonal to e₁; both axes in units of "
        "|x(0) − y|. The grey band is linear interpolation t·y + (1 − t)·x(0). With "
        "t = 1 − e^(−s), the adapted flow (λ = 1) moves on it at constant speed when "
        "rank D = QN (docs/theory.md §3, [CM24] Prop 2.4): its dots at t = 0.2, 0.4, 0.6, 0.8 "
        "are equally spaced. The legend gives each flow's residual "
        "max_t |x(t) − (t·y + (1 − t)·x(0))| / |x(0) − y| in all of output space, not only in "
        "this plane.")
    return _Drawn(fig, title, caption + _cross_note(flows) + _COLOURS)


def output_path_figure(flows: Sequence[PlotFlow], path: str | Path) -> Path:
    r"""Figure (b), MSE: output paths on the plane of :math:`x(0) - y` and the main orthogonal part.

    Coordinates, relative to :math:`|x(0) - y|` and with origin :math:`y`:
    :math:`a = \langle x - y, e_1\rangle`, :math:`e_1 = (x(0)-y)/|x(0)-y|`, and
    :math:`b = \langle x - y, e_2\rangle`, with :math:`e_2` the first principal
    direction of all the paths' components orthogonal to :math:`e_1`.  The
    straight segment from :math:`x(0)` (at :math:`(1, 0)`) to :math:`y` (at the
    origin) is linear interpolation; dots mark :math:`t = 1 - e^{-s} = 0.2, 0.4,
    0.6, 0.8`, equally spaced on the segment for the adapted flow.
    """
    return _save(_draw_paths(flows).fig, path)


# -- (c) singular values ---------------------------------------------------------------------
def _band_drawn(traj: Trajectory) -> bool:
    """Whether the band filter changed the flow (some direction filtered with deviation > 0)."""
    return any(g.kind == "filtered" and g.max_deviation > 0 for g in traj.segments)


def _sv_panel(ax: Axes, f: PlotFlow, col: str) -> None:
    s, sv = _np(f.traj.s), _np(f.traj.singular_values)
    m = sv.shape[1] if sv.ndim == 2 else 0
    cmap = colormaps["viridis"]
    for i in range(m):
        ax.semilogy(s, np.maximum(sv[:, i], _FLOOR), color=cmap(i / max(m - 1, 1)), lw=0.9)
    ax.axhline(f.traj.rank_tau, color="0.3", ls="--", lw=1.0)
    ax.annotate(r"$\tau$", (s[-1] if len(s) else 0.0, f.traj.rank_tau),
                textcoords="offset points", xytext=(-12, 3), fontsize=9, color="0.3")
    if _band_drawn(f.traj) and m:
        beta = float(f.traj.settings.get("rank_band", 0.0) or 0.0)
        ax.semilogy(s, beta * sv[:, 0], color="0.45", ls=":", lw=1.1)
        ax.annotate(r"$b$", (s[-1], beta * sv[-1, 0]), textcoords="offset points",
                    xytext=(-12, 3), fontsize=9, color="0.3")
    for ev in f.traj.events:
        ax.axvline(ev.s, color="#c0392b", lw=1.0, ls=":")
        ax.annotate(f"{ev.rank_before}→{ev.rank_after}", (ev.s, 0.97),
                    xycoords=("data", "axes fraction"), fontsize=8, color="#c0392b",
                    rotation=90, ha="right", va="top")
    ranks = _np(f.traj.rank) if len(f.traj) else np.zeros(1)
    rk = (f"rank {int(ranks.min())}" if ranks.min() == ranks.max()
          else f"rank {int(ranks.min())}–{int(ranks.max())}")
    ax.set_title(f"{f.label}\n{rk}, {len(f.traj.events)} event(s)", fontsize=9, color=col)
    ax.set_xlabel(r"$s$")
    ax.set_xlim(0.0, _s_end(f.traj))
    if _stopped_early(f.traj) and len(s):
        ax.axvspan(float(s[-1]), _s_end(f.traj), color="0.92", zorder=0)
        ax.annotate(f.traj.status.code, (0.98, 0.5), xycoords="axes fraction", ha="right",
                    fontsize=8, color="0.35")


def _sv_caption(flows: Sequence[PlotFlow]) -> str:
    t = flows[0].traj
    parts = [
        "σ_i(s), the singular values of the Jacobian D = ∂x/∂θ along each flow (one panel per "
        "flow, titled in its colour), coloured by index: dark blue σ_1 (largest) to yellow "
        "σ_min. Dashed grey: the rank threshold τ = rank_rtol·σ_max(D(θ(0))) = "
        f"{t.rank_rtol:.3g} × {float(t.singular_values[0, 0]) if len(t) else 0.0:.3g} = "
        f"{t.rank_tau:.3g}, fixed along the flow; rank D counts the σ_i above it "
        "(docs/theory.md §5, §7)."]
    if any(_band_drawn(f.traj) for f in flows):
        beta = float(t.settings.get("rank_band", 0.0) or 0.0)
        parts.append(
            f" Dotted grey (on the flows it changed): b(s) = {beta:g}·σ_max(s), the top of the "
            "band in which the flow's continuation filter weighs a direction down smoothly "
            "instead of cutting it at τ (docs/flows.md); the verdict tolerances include it.")
    if any(f.traj.events for f in flows):
        parts.append(" Vertical dotted red lines: rank changes (events), labelled r → r'.")
    if any(_stopped_early(f.traj) for f in flows):
        parts.append(" A grey tail is flow time that a flow did not reach.")
    return "".join(parts)


def _draw_singular_values(flows: Sequence[PlotFlow]) -> _Drawn:
    n = max(len(flows), 1)
    fig, axes = _new((min(max(3.4 * n, 9.6), 13.0), 3.8), ncols=n, sharey=True)
    title = "(c) Singular values of D"
    if not flows:
        return _nothing(fig, axes, title, "no flows", "No flows.", wide=True)
    for ax, f, col in zip(axes, flows, _colors(flows)):
        _sv_panel(ax, f, col)
    axes[0].set_ylabel(r"singular values $\sigma_i$ of $D$")
    return _Drawn(fig, title, _sv_caption(flows), wide=True)


def singular_values_figure(flows: Sequence[PlotFlow], path: str | Path) -> Path:
    r"""Figure (c): singular values :math:`\sigma_i(s)` of :math:`D`, one panel per flow.

    The dashed line is the rank threshold :math:`\tau` (fixed along a flow);
    the dotted one, on flows the band filter changed, the band top
    :math:`b(s)`; vertical lines mark the rank events, labelled ``r → r'``.
    """
    return _save(_draw_singular_values(flows).fig, path)


# -- (d) MSE: deviation from the straight line -------------------------------------------------
def _deviation_curves(axes: list[Axes], devs: list[tuple[PlotFlow, str]]) -> tuple[bool, bool]:
    """Draw |Pz| and |P⊥z|; return (P⊥z is round-off on every flow, a propagator was drawn)."""
    all_perp_zero, drew_prop, ymin = True, False, 1.0
    for f, col in devs:
        d = f.deviation
        assert d is not None
        scale = float((f.traj.outputs[0] - f.traj.targets).norm()) or 1.0
        t = _np(d.t)
        zr, zp = _np(d.z_range.norm(dim=1)) / scale, _np(d.z_perp.norm(dim=1)) / scale
        all_perp_zero &= bool(zp[1:].max(initial=0.0) <= _ROUNDOFF)
        pos = np.concatenate([zr[1:][zr[1:] > 0], zp[1:][zp[1:] > 0]])
        ymin = min(ymin, float(pos.min())) if pos.size else ymin
        axes[0].semilogy(t[1:], np.maximum(zr[1:], _FLOOR), color=col, lw=1.6, label=f.label)
        if zp[1:].max(initial=0.0) > _ROUNDOFF:  # else P^perp z is round-off: not drawn
            axes[1].semilogy(t[1:], np.maximum(zp[1:], _FLOOR), color=col, lw=1.6, label=f.label)
            if d.applies:
                zq = _np(d.z_propagator.norm(dim=1)) / scale
                axes[1].semilogy(t[1:], np.maximum(zq[1:], _FLOOR), color=col, lw=1.2, ls=":",
                                 label=f"{f.label}: prediction (2.58)")
                drew_prop = True
    for ax in axes:
        ax.set_xlabel(r"$t = 1 - e^{-s}$")
        ax.set_xlim(0.0, 1.0)
        ax.set_ylim(bottom=max(min(ymin, 1e-3) * 0.3, 3 * _FLOOR))
    return all_perp_zero, drew_prop


def _draw_deviation(flows: Sequence[PlotFlow]) -> _Drawn:
    fig, axes = _new((9.6, 3.9), ncols=2, sharey=True)
    title = "(d) Deviation from linear interpolation"
    devs = [(f, c) for f, c in zip(flows, _colors(flows)) if f.deviation is not None]
    if not devs:
        return _nothing(fig, axes, title, "no deviation computed\n(the straight line is for MSE)",
                        "No deviation computed (it needs completed MSE flows).", wide=True)
    all_perp_zero, drew_prop = _deviation_curves(axes, devs)
    axes[0].set_ylabel(r"$|\cdot| \,/\, |x(0) - y|$")
    axes[0].set_title(r"$|P z(t)|$: bend inside $\mathrm{ran}\,D$", fontsize=10)
    axes[1].set_title("|P⊥ z(t)|: bend outside ran D (rank loss)", fontsize=10)
    axes[0].legend(fontsize=8, loc="lower right", framealpha=0.9)
    caption = [
        "z(t) = x(t) − (t·y + (1 − t)·x(0)), the deviation from linear interpolation at "
        "t = 1 − e^(−s), split into P z (left: inside ran D, P = DD⁺ the projector on the range "
        "of D at the same point) and P⊥ z = z − P z (right: outside ran D, possible only with "
        "rank loss), both relative to |x(0) − y|, log scale. For the adapted flow (λ = 1), "
        "(2.58) of [CM24] says z = (1 − t)(U(t, 0) − 1)(x(0) − y) with ∂_s U = P⊥ U: z comes "
        "from rank loss alone (docs/theory.md §4); with rank D = QN it vanishes, and the "
        "adapted flow's curve is integration error."]
    if all_perp_zero:
        axes[1].text(0.5, 0.5, "P⊥ z = 0 (to round-off) on every flow:\n"
                     "rank D = QN, so ran D is all of output space",
                     transform=axes[1].transAxes, ha="center", va="center", fontsize=9,
                     color="0.3")
        caption.append(" Here P⊥ z is round-off on every flow (|P⊥ z| ≤ 1e-13 |x(0) − y|): "
                       "ran D is all of output space, and the right panel is empty.")
    if drew_prop:
        axes[1].legend(fontsize=7, loc="lower right", framealpha=0.9)
        caption.append(" Dotted, right: the prediction |(1 − t)(U(t, 0) − 1)(x(0) − y)| of "
                       "(2.58), U integrated along the saved path.")
    return _Drawn(fig, title, "".join(caption) + _COLOURS, wide=True)


def deviation_figure(flows: Sequence[PlotFlow], path: str | Path) -> Path:
    r"""Figure (d), MSE: :math:`|P z(t)|` and :math:`|P^\perp z(t)|` relative to :math:`|x(0) - y|`.

    :math:`z(t) = \tilde x(t) - (t y + (1-t) x(0))`, :math:`P` the projector on
    :math:`\operatorname{ran}D` at the same point.  The dotted curves are the
    Duhamel prediction :math:`|(1-t)(U(t,0) - 1)(x(0)-y)|` of (2.58), drawn for the
    flows where it applies (MSE, :math:`\lambda = 1`) and :math:`P^\perp z` is not
    round-off.  Exact zeros sit at the bottom of the log axis.
    """
    return _save(_draw_deviation(flows).fig, path)


# -- (b) cross-entropy: distance to the limit ------------------------------------------------
def _limit_curves(ax: Axes, flows: Sequence[PlotFlow]) -> tuple[float, float, float]:
    """|x − x*| (solid) and the distance to the minimizers (dotted); (|x(0) − x*|, s, d) last."""
    d0, last = 1.0, (0.0, 0.0)
    for f, col in zip(flows, _colors(flows)):
        err = limit_error(f.traj)
        assert err.distance is not None and err.minimizer_distance is not None
        d0 = float(err.distance[0]) or 1.0
        s = _np(f.traj.s)
        ax.semilogy(s, np.maximum(_np(err.distance) / d0, _FLOOR), color=col, lw=1.8,
                    label=_label(f))
        ax.semilogy(s, np.maximum(_np(err.minimizer_distance) / d0, _FLOOR), color=col,
                    lw=1.1, ls=":")
        if is_adapted(f.traj):
            last = (float(s[-1]), float(err.minimizer_distance[-1]) / d0)
    ax.plot([], [], color="0.4", lw=1.1, ls=":", label="dotted: to the nearest minimizer")
    return d0, last[0], last[1]


def _draw_limit_finite(ax: Axes, flows: Sequence[PlotFlow]) -> str:
    d0, s1, q1 = _limit_curves(ax, flows)
    mu = asymptotic_rate(_targets(flows[0].traj))
    ref = " No flow is the adapted one (λ = 1): no rate is predicted."
    if s1 > 0 and q1 > 0:
        ss = np.linspace(0.5 * s1, s1, 50)
        ax.semilogy(ss, q1 * np.exp(-mu * (ss - s1)), "k--", lw=1.1,
                    label=rf"slope $-\mu$, $\mu = {mu:.3g}$")
        ref = (f" Dashed black: slope −μ, μ = min_j λ₂(diag y_j − y_j y_jᵀ) = {mu:.3g}, through "
               "the last point of the adapted flow's dotted curve: its predicted late-time "
               f"rate, reached once |x − x*| ≲ {CE_RATE_WINDOW:g}·|x(0) − x*| (the verdict fits "
               "it there, on the dotted curve).")
    ax.set_ylabel(r"$|x(s) - x^*| \,/\, |x(0) - x^*|$")
    ax.set_title("Distance to the predicted limit $x^*$", fontsize=11)
    return ("Solid: |x(s) − x*| / |x(0) − x*| on a log scale, x* the limit predicted for the "
            "adapted flow (λ = 1) from x(0): on each sample's hyperplane ⟨1, x_j⟩ = ⟨1, x_j(0)⟩ "
            "the unique point with softmax(x*_j) = y_j, x*_j = log y_j + const·1 "
            f"(docs/theory.md §6, [CM24] Prop 2.7; |x(0) − x*| = {d0:.3g}). Dotted, same "
            "colour: the distance to the nearest minimizer, any point with softmax(x_j) = y_j, "
            "i.e. |x − x*| without the drift of the hyperplane sums: a flow that leaves its "
            "hyperplanes (λ < 1) approaches another minimizer, and its solid curve levels off "
            "above its dotted one (the adapted flow's only at the size of its drift, figure "
            "(d))." + ref)


def _draw_limit_divergent(ax: Axes, flows: Sequence[PlotFlow]) -> str:
    for f, col in zip(flows, _colors(flows)):
        coord = limit_error(f.traj).divergence_coordinate
        assert coord is not None
        ax.plot(_np(f.traj.s), _np(coord), color=col, lw=1.8, label=_label(f))
    ax.set_ylabel(r"$\langle x(s) - x(0),\, d\rangle$")
    ax.set_title("No finite limit (one-hot labels): progress along $d$", fontsize=11)
    return ("The labels have zero entries (one-hot), so the cross-entropy has no minimizer: "
            "there is no limit x* and no rate μ (docs/theory.md §6). The logits move off to "
            "infinity along the unit direction d (on each sample's hyperplane, the logits of its "
            "label's support rise and the others fall by equal amounts); drawn is the progress "
            "⟨x(s) − x(0), d⟩, which grows like log s at late times. Give --label-smoothing EPS "
            "(0 < EPS < 1) for a finite limit x*, the rate μ and their check.")


def _draw_limit(flows: Sequence[PlotFlow]) -> _Drawn:
    fig, (ax,) = _new((6.4, 4.2))
    title = "(b) Distance to the limit"
    if not _drawable(flows, "cross_entropy"):
        return _nothing(fig, [ax], title, "no limit: x* is for cross-entropy flows",
                        "Nothing drawn: the limit x* is a statement about completed "
                        "cross-entropy flows (docs/theory.md §6).")
    if limit_error(flows[0].traj).finite:
        caption = _draw_limit_finite(ax, flows)
    else:
        title = "(b) No finite limit: progress along the divergence direction"
        caption = _draw_limit_divergent(ax, flows)
    ax.set_xlabel(r"flow time $s$")
    ax.set_xlim(0.0, max(_s_end(f.traj) for f in flows))
    ax.legend(fontsize=8, loc="best", framealpha=0.9)
    return _Drawn(fig, title, caption + _cross_note(flows) + _COLOURS)


def limit_distance_figure(flows: Sequence[PlotFlow], path: str | Path) -> Path:
    r"""Figure (b), cross-entropy: :math:`|x(s) - x^*|/|x(0) - x^*|`, log scale, with the rate.

    :math:`x^*` is :func:`~subriemann.analysis.cross_entropy.predicted_limit` of
    :math:`x(0)`; dotted: the distance to the nearest minimizer; dashed: the
    slope :math:`-\mu` through the adapted flow's last point.  With one-hot
    labels (no finite limit) it draws :math:`\langle x(s) - x(0), d\rangle`
    instead, :math:`d` the divergence direction.
    """
    return _save(_draw_limit(flows).fig, path)


# -- (d) cross-entropy: hyperplane sums ---------------------------------------------------------
def _sums_panel(ax: Axes, f: PlotFlow, col: str) -> int:
    sums = hyperplane_sums(f.traj)
    c = _np(sums.sums)
    n = c.shape[1]
    pick = np.unique(np.linspace(0, n - 1, min(n, _MAX_SAMPLES)).round().astype(int))
    s = _np(f.traj.s)
    for j in pick:
        ax.plot(s, c[:, j], color=col, lw=0.8, alpha=0.75)
    ax.set_title(f"{f.label}\nmax drift {sums.max_drift:.2g}", fontsize=9, color=col)
    ax.set_xlabel(r"$s$")
    ax.set_xlim(0.0, _s_end(f.traj))
    if _stopped_early(f.traj) and len(s):
        ax.axvspan(float(s[-1]), _s_end(f.traj), color="0.92", zorder=0)
    return len(pick)


def _draw_hyperplanes(flows: Sequence[PlotFlow]) -> _Drawn:
    n = max(len(flows), 1)
    fig, axes = _new((min(max(3.4 * n, 9.6), 13.0), 3.6), ncols=n, sharey=True)
    title = "(d) Hyperplane sums"
    if not _drawable(flows, "cross_entropy"):
        return _nothing(fig, axes[:1], title, "no hyperplane sums: a cross-entropy statement",
                        "Nothing drawn (completed cross-entropy flows only).", wide=True)
    shown = [_sums_panel(ax, f, col) for ax, f, col in zip(axes, flows, _colors(flows))]
    axes[0].set_ylabel(r"$c_j(s) = \langle 1, x_j(s)\rangle$")
    n_samples = int(flows[0].traj.num_samples)
    which = (f"one line per training sample j (all {n_samples})" if max(shown) == n_samples
             else f"one line per training sample j ({max(shown)} of {n_samples}, evenly chosen)")
    caption = (
        f"c_j(s) = ⟨1, x_j(s)⟩, the sum of sample j's logits, against s: {which}, one panel "
        "per flow in its colour. The cross-entropy does not change when a sample's logits all "
        "shift by the same amount, so its gradient in x_j, softmax(x_j) − y_j, is orthogonal to "
        "1: under "
        "the adapted flow (λ = 1) with rank D = QN each c_j stays constant, its hyperplane is "
        "invariant (docs/theory.md §6, [CM24] §2.3); other flows move it. Panel titles give "
        "max over j and s of |c_j(s) − c_j(0)|; the verdicts compare the adapted flow's with "
        "its error estimate.")
    return _Drawn(fig, title, caption + _cross_note(flows), wide=True)


def hyperplane_sums_figure(flows: Sequence[PlotFlow], path: str | Path) -> Path:
    r"""Figure (d), cross-entropy: :math:`c_j(s) = \langle 1, x_j(s)\rangle`, one panel per flow.

    Constant under the adapted flow with :math:`\operatorname{rank}D = QN`
    (docs/theory.md §6); at most 60 samples are drawn per panel.
    """
    return _save(_draw_hyperplanes(flows).fig, path)


# -- all of them ---------------------------------------------------------------------------------
_Drawer = Callable[[Sequence[PlotFlow]], _Drawn]

FIGURES: dict[str, tuple[str, _Drawer]] = {
    "cost": ("cost.png", _draw_cost),
    "output_path": ("output_path.png", _draw_paths),
    "singular_values": ("singular_values.png", _draw_singular_values),
    "deviation": ("interpolation_deviation.png", _draw_deviation),
}
"""Key → (file name, drawing function) of the figures of an MSE run, in report order."""

CE_FIGURES: dict[str, tuple[str, _Drawer]] = {
    "cost": ("cost.png", _draw_cost),
    "limit_distance": ("limit_distance.png", _draw_limit),
    "singular_values": ("singular_values.png", _draw_singular_values),
    "hyperplane_sums": ("hyperplane_sums.png", _draw_hyperplanes),
}
"""Key → (file name, drawing function) of the figures of a cross-entropy run."""


def all_figures(flows: Sequence[PlotFlow], folder: str | Path) -> dict[str, ReportFigure]:
    """Write the four figures of the run's loss into ``folder``; key → :class:`ReportFigure`."""
    folder = Path(folder)
    ce = bool(flows) and flows[0].traj.loss == "cross_entropy"
    out = {}
    for key, (fname, draw) in (CE_FIGURES if ce else FIGURES).items():
        d = draw(flows)
        out[key] = ReportFigure(key, _save(d.fig, folder / fname), d.title, d.caption, d.wide)
    return out
