r"""Figures of the report (matplotlib, Agg; no pyplot global state).

Each function takes the flows of one run, as :class:`PlotFlow` records, and
writes one PNG:

* :func:`cost_figure`: :math:`C(s)` on a log scale for every flow, with the
  prediction :math:`C(0)e^{-2s}` of the adapted flow (docs/theory.md §3);
* :func:`output_path_figure`: the output-space paths :math:`x(s)` projected on
  the plane spanned by :math:`x(0) - y` and the largest orthogonal component of
  the paths; the adapted flow is the straight segment from :math:`x(0)` to
  :math:`y` (Prop 2.4);
* :func:`singular_values_figure`: the singular values of :math:`D` along each
  flow, with the rank threshold :math:`\tau` and the rank events;
* :func:`deviation_figure`: the deviation :math:`z(t)` from linear interpolation,
  split into its parts in :math:`\operatorname{ran}D` and
  :math:`(\operatorname{ran}D)^\perp` (docs/theory.md §4, 2.58).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from subriemann.analysis.interpolation import InterpolationDeviation
from subriemann.flow.trajectory import Trajectory

__all__ = [
    "PlotFlow",
    "PALETTE",
    "cost_figure",
    "output_path_figure",
    "singular_values_figure",
    "deviation_figure",
    "all_figures",
]

PALETTE = ("#c0392b", "#e67e22", "#1f5fa8", "#2e8b57", "#8e44ad", "#7f8c8d", "#b8860b")
"""Flow colours, in the order of the flows (red for the first: the standard flow by default)."""

_DPI = 150
_FLOOR = 1e-17  # zero on a log axis
_ROUNDOFF = 1e-13  # relative size of a deviation that is round-off


@dataclass
class PlotFlow:
    """One flow of a run, as the figures need it.

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
        Defaults to :data:`PALETTE` by position.
    """

    name: str
    label: str
    traj: Trajectory
    deviation: InterpolationDeviation | None = None
    color: str | None = None


def _colors(flows: Sequence[PlotFlow]) -> list[str]:
    return [f.color or PALETTE[i % len(PALETTE)] for i, f in enumerate(flows)]


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


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy()


def _s_end(traj: Trajectory) -> float:
    last = float(traj.s[-1]) if len(traj) else 0.0
    return max(float(traj.settings.get("s_end", last)), last) or 1.0


def _stopped_early(traj: Trajectory) -> bool:
    return traj.status.code not in ("s_end_reached", "cost_tol_reached", "equilibrium_reached")


def cost_figure(flows: Sequence[PlotFlow], path: str | Path) -> Path:
    r"""Figure (a): :math:`C(s)` on a log scale, with the reference :math:`C(0)e^{-2s}`.

    A flow that stopped before ``s_end`` for another reason than convergence
    (wall-time budget, interruption, ...) ends in a cross and says why in the
    legend.  The reference is drawn for MSE only.
    """
    fig, (ax,) = _new((6.4, 4.2))
    s_max = 0.0
    c0 = None
    mse = all(f.traj.loss == "mse" for f in flows)
    for f, col in zip(flows, _colors(flows)):
        s, c = _np(f.traj.s), _np(f.traj.cost)
        s_max = max(s_max, float(f.traj.settings.get("s_end", s[-1])), float(s[-1]))
        c0 = float(c[0]) if c0 is None else c0
        label = f.label
        if _stopped_early(f.traj):
            label += f"  [{f.traj.status.code} at s = {s[-1]:.3g}]"
        ax.semilogy(s, np.maximum(c, 1e-300), color=col, lw=1.8, label=label)
        if _stopped_early(f.traj):
            ax.plot(s[-1:], c[-1:], marker="x", ms=8, mew=2, color=col)
    if mse and c0 is not None and s_max > 0:
        ss = np.linspace(0.0, s_max, 200)
        ax.semilogy(ss, c0 * np.exp(-2 * ss), "k--", lw=1.1,
                    label=r"$C(0)\,e^{-2s}$ (adapted flow, rank $D = QN$)")
    ax.set_xlim(0.0, s_max or None)
    ax.set_xlabel(r"flow time $s$")
    ax.set_ylabel(r"cost $C(s)$")
    ax.set_title("Cost along the flows", fontsize=11)
    ax.legend(fontsize=8, loc="lower left", framealpha=0.9)
    return _save(fig, path)


def _plane(flows: Sequence[PlotFlow]) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    r"""Origin :math:`y`, unit :math:`e_1 \parallel x(0) - y`, unit :math:`e_2 \perp e_1`, scale."""
    y = _np(flows[0].traj.targets).astype(np.float64)
    r0 = _np(flows[0].traj.outputs[0]).astype(np.float64) - y
    scale = float(np.linalg.norm(r0)) or 1.0
    e1 = r0 / scale
    perp = []
    for f in flows:
        r = _np(f.traj.outputs).astype(np.float64) - y
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


def output_path_figure(flows: Sequence[PlotFlow], path: str | Path) -> Path:
    r"""Figure (b): output paths on the plane of :math:`x(0) - y` and the main orthogonal part.

    Coordinates, relative to :math:`|x(0) - y|` and with origin :math:`y`:
    :math:`a = \langle x - y, e_1\rangle`, :math:`e_1 = (x(0)-y)/|x(0)-y|`, and
    :math:`b = \langle x - y, e_2\rangle`, with :math:`e_2` the first principal
    direction of all the paths' components orthogonal to :math:`e_1`.  The
    straight segment from :math:`x(0)` (at :math:`(1, 0)`) to :math:`y` (at the
    origin) is linear interpolation; dots mark :math:`t = 1 - e^{-s} = 0.2, 0.4,
    0.6, 0.8`, equally spaced on the segment for the adapted flow.  The plane
    shows the largest bend; the legend gives the full residual
    :math:`\max_t|\tilde x(t) - (ty + (1-t)x(0))|/|x(0)-y|`.
    """
    fig, (ax,) = _new((6.4, 4.6))
    if not flows or any(f.traj.loss != "mse" for f in flows):
        _note(ax, "The straight-line prediction (Prop 2.4) is a statement about the MSE cost;\n"
              f"loss here: {flows[0].traj.loss if flows else 'none'}.")
        ax.set_axis_off()
        return _save(fig, path)
    from subriemann.analysis.interpolation import linear_interpolation_residual

    y, e1, e2, scale = _plane(flows)
    ax.plot([1.0, 0.0], [0.0, 0.0], color="0.55", lw=5, alpha=0.35, solid_capstyle="round",
            label=r"linear interpolation $t\,y + (1-t)\,x(0)$", zorder=1)
    for f, col in zip(flows, _colors(flows)):
        r = _np(f.traj.outputs).astype(np.float64) - y
        a, b = (r @ e1) / scale, (r @ e2) / scale
        res = float(linear_interpolation_residual(f.traj))
        ax.plot(a, b, color=col, lw=1.8, label=f"{f.label}: residual {res:.1e}", zorder=3)
        s = _np(f.traj.s)
        for tt in (0.2, 0.4, 0.6, 0.8):
            st = -math.log1p(-tt)
            if st <= s[-1]:
                ax.plot(np.interp(st, s, a), np.interp(st, s, b), "o", ms=4, color=col, zorder=4)
        if _stopped_early(f.traj):
            ax.plot(a[-1:], b[-1:], marker="x", ms=8, mew=2, color=col, zorder=4)
    ax.plot([1.0], [0.0], "o", ms=8, mfc="white", mec="k", zorder=5)
    ax.annotate(r"$x(0)$", (1.0, 0.0), textcoords="offset points", xytext=(6, 6), fontsize=10)
    ax.plot([0.0], [0.0], "*", ms=13, color="k", zorder=5)
    ax.annotate(r"$y$", (0.0, 0.0), textcoords="offset points", xytext=(-14, 6), fontsize=11)
    ax.set_xlabel(r"$\langle x - y,\, e_1\rangle / |x(0)-y|$,  $e_1 \parallel x(0) - y$")
    ax.set_ylabel(r"$\langle x - y,\, e_2\rangle / |x(0)-y|$,  $e_2$: main orthogonal part")
    ax.set_title("Output-space paths (dots: t = 0.2, 0.4, 0.6, 0.8)", fontsize=11)
    ax.set_aspect("equal", adjustable="datalim")  # true geometry: both axes in |x(0) - y|
    ax.legend(fontsize=8, loc="best", framealpha=0.9)
    return _save(fig, path)


def singular_values_figure(flows: Sequence[PlotFlow], path: str | Path) -> Path:
    r"""Figure (c): singular values :math:`\sigma_i(s)` of :math:`D`, one panel per flow.

    The dashed line is the rank threshold :math:`\tau` (fixed along a flow);
    vertical lines mark the rank events, labelled ``r → r'``.
    """
    n = max(len(flows), 1)
    fig, axes = _new((min(3.4 * n, 13.0), 3.8), ncols=n, sharey=True)
    if not flows:
        _note(axes[0], "no flows")
        return _save(fig, path)
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    for ax, f, col in zip(axes, flows, _colors(flows)):
        s = _np(f.traj.s)
        sv = _np(f.traj.singular_values)
        m = sv.shape[1] if sv.ndim == 2 else 0
        for i in range(m):
            ax.semilogy(s, np.maximum(sv[:, i], _FLOOR), color=cmap(i / max(m - 1, 1)), lw=0.9)
        ax.axhline(f.traj.rank_tau, color="0.3", ls="--", lw=1.0)
        ax.annotate(r"$\tau$", (s[-1] if len(s) else 0.0, f.traj.rank_tau),
                    textcoords="offset points", xytext=(-12, 3), fontsize=9, color="0.3")
        for ev in f.traj.events:
            ax.axvline(ev.s, color="#c0392b", lw=1.0, ls=":")
            ax.annotate(f"{ev.rank_before}→{ev.rank_after}", (ev.s, 0.97),
                        xycoords=("data", "axes fraction"), fontsize=8, color="#c0392b",
                        rotation=90, ha="right", va="top")
        ranks = _np(f.traj.rank) if len(f.traj) else np.zeros(1, dtype=int)
        rk = (f"rank {int(ranks.min())}" if ranks.min() == ranks.max()
              else f"rank {int(ranks.min())}–{int(ranks.max())}")
        ax.set_title(f"{f.label}\n{rk}, {len(f.traj.events)} event(s)", fontsize=9, color=col)
        ax.set_xlabel(r"$s$")
        ax.set_xlim(0.0, _s_end(f.traj))
        if _stopped_early(f.traj):
            ax.axvspan(float(s[-1]), _s_end(f.traj), color="0.92", zorder=0)
            ax.annotate(f.traj.status.code, (0.98, 0.5), xycoords="axes fraction", ha="right",
                        fontsize=8, color="0.35")
    axes[0].set_ylabel(r"singular values $\sigma_i$ of $D$")
    return _save(fig, path)


def deviation_figure(flows: Sequence[PlotFlow], path: str | Path) -> Path:
    r"""Figure (d): :math:`|P z(t)|` and :math:`|P^\perp z(t)|` relative to :math:`|x(0) - y|`.

    :math:`z(t) = \tilde x(t) - (t y + (1-t) x(0))`, :math:`P` the projector on
    :math:`\operatorname{ran}D` at the same point.  The dotted curves are the
    Duhamel prediction :math:`|(1-t)(U(t,0) - 1)(x(0)-y)|` of (2.58), drawn for the
    flows where it applies (MSE, :math:`\lambda = 1`).  Exact zeros sit at the
    bottom of the log axis.
    """
    fig, axes = _new((9.6, 3.9), ncols=2, sharey=True)
    devs = [(f, c) for f, c in zip(flows, _colors(flows)) if f.deviation is not None]
    if not devs:
        for ax in axes:
            _note(ax, "no deviation computed\n(the straight-line prediction is for MSE)")
            ax.set_axis_off()
        return _save(fig, path)
    all_perp_zero = True
    ymin = 1.0
    for f, col in devs:
        d = f.deviation
        assert d is not None
        scale = float((f.traj.outputs[0] - f.traj.targets).norm()) or 1.0
        t = _np(d.t)
        zr = _np(d.z_range.norm(dim=1)) / scale
        zp = _np(d.z_perp.norm(dim=1)) / scale
        all_perp_zero &= bool(zp[1:].max(initial=0.0) <= _ROUNDOFF)
        pos = np.concatenate([zr[1:][zr[1:] > 0], zp[1:][zp[1:] > 0]])
        if pos.size:
            ymin = min(ymin, float(pos.min()))
        axes[0].semilogy(t[1:], np.maximum(zr[1:], _FLOOR), color=col, lw=1.6, label=f.label)
        if zp[1:].max(initial=0.0) > _ROUNDOFF:  # else P^perp z is round-off: not drawn
            axes[1].semilogy(t[1:], np.maximum(zp[1:], _FLOOR), color=col, lw=1.6,
                             label=f.label)
            if d.applies:
                zq = _np(d.z_propagator.norm(dim=1)) / scale
                axes[1].semilogy(t[1:], np.maximum(zq[1:], _FLOOR), color=col, lw=1.2, ls=":",
                                 label=f"{f.label}: prediction (2.58)")
    for ax in axes:
        ax.set_xlabel(r"$t = 1 - e^{-s}$")
        ax.set_xlim(0.0, 1.0)
        ax.set_ylim(bottom=max(min(ymin, 1e-3) * 0.3, 3 * _FLOOR))
    axes[0].set_ylabel(r"$|\cdot| \,/\, |x(0) - y|$")
    axes[0].set_title(r"$|P z(t)|$: bend inside $\mathrm{ran}\,D$", fontsize=10)
    axes[1].set_title("|P⊥ z(t)|: bend outside ran D (rank loss)", fontsize=10)
    if all_perp_zero:
        axes[1].text(0.5, 0.5, "P⊥ z = 0 (to round-off) on every flow:\n"
                     "rank D = QN, so ran D is all of output space",
                     transform=axes[1].transAxes, ha="center", va="center", fontsize=9,
                     color="0.3")
    axes[0].legend(fontsize=8, loc="lower right", framealpha=0.9)
    if any(f.deviation is not None and f.deviation.applies for f, _ in devs) and not all_perp_zero:
        axes[1].legend(fontsize=7, loc="lower right", framealpha=0.9)
    return _save(fig, path)


FIGURES = {
    "cost": ("cost.png", cost_figure),
    "output_path": ("output_path.png", output_path_figure),
    "singular_values": ("singular_values.png", singular_values_figure),
    "deviation": ("interpolation_deviation.png", deviation_figure),
}
"""Key → (file name, function) of the report's figures, in report order."""


def all_figures(flows: Sequence[PlotFlow], folder: str | Path) -> dict[str, Path]:
    """Write the four figures into ``folder``; return key → path."""
    folder = Path(folder)
    return {key: fn(flows, folder / fname) for key, (fname, fn) in FIGURES.items()}
