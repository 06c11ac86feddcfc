r"""Figures of the analyses: a sampled critical set and a rank-strata graph (matplotlib).

* :func:`plot_critical_set`: the nodes of a
  :class:`~subriemann.analysis.critical.CriticalSet` on their two principal
  directions, coloured by cost;
* :func:`plot_strata_graph`: the graph of
  :func:`~subriemann.analysis.strata.strata_graph` (strata by decreasing rank,
  terminal classes below).

The mathematics lives in :mod:`subriemann.analysis`; these functions only draw
its results.  They use whatever matplotlib backend is active when no ``ax`` is
given (call ``matplotlib.use("Agg")`` for files).
"""

from __future__ import annotations

from typing import Any

import networkx as nx
import numpy as np
import torch
from torch import Tensor

from subriemann.analysis.critical import CriticalSet
from subriemann.analysis.strata import GLOBAL_MINIMUM, NON_GLOBAL, NOT_CONVERGED, TERMINALS

__all__ = ["plot_critical_set", "plot_strata_graph"]

TERMINAL_COLOURS = {GLOBAL_MINIMUM: "tab:green", NON_GLOBAL: "tab:red", NOT_CONVERGED: "tab:gray"}
"""Colour of each terminal class of a strata graph (any other label: orange)."""


def _new_axes(figsize: tuple[float, float]) -> Any:
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize)
    return ax


def _principal_plane(thetas: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Centred ``[n, K]`` points on their two principal directions, and the variance shares."""
    n = thetas.shape[0]
    centred = thetas - thetas.mean(0)
    if n > 1 and float(centred.abs().max()) > 0:
        _, sv, vh = torch.linalg.svd(centred, full_matrices=False)
        xy = (centred @ vh[:2].T).numpy()
        var = (sv**2 / (sv**2).sum()).numpy()
    else:
        xy, var = np.zeros((n, 2)), np.array([1.0, 0.0])
    if xy.shape[1] == 1:
        xy = np.hstack([xy, np.zeros((n, 1))])
        var = np.append(var, 0.0)
    return xy, var


def _colour_range(costs: np.ndarray) -> tuple[float, float]:
    """The colour range of the costs: a visible, centred range when the cost is constant."""
    lo, hi = float(costs.min()), float(costs.max())
    if hi - lo <= 1e-9 * max(1.0, abs(hi)):
        pad = max(1e-3 * max(1.0, abs(hi)), hi - lo)
        lo, hi = lo - pad, hi + pad
    return lo, hi


def plot_critical_set(critical_set: CriticalSet, ax: Any = None, *, colorbar: bool = True) -> Any:
    r"""Nodes of the sampled critical set on its two principal directions, coloured by cost.

    The node parameters are centred and projected on the first two right
    singular vectors of the centred ``[n, K]`` matrix (PCA); edges are the
    continuation steps, start points are stars.

    Parameters
    ----------
    critical_set : CriticalSet
        From :func:`~subriemann.analysis.critical.track_critical_set`.
    ax : matplotlib Axes, optional
    colorbar : bool

    Returns
    -------
    matplotlib Axes
    """
    if not isinstance(critical_set, CriticalSet):
        raise TypeError(f"critical_set must be a CriticalSet, got {type(critical_set).__name__}")
    ax = _new_axes((6, 5)) if ax is None else ax
    g = critical_set.graph
    nodes = sorted(g.nodes)
    if not nodes:
        ax.set_title("empty critical set")
        return ax
    th = torch.stack([g.nodes[n]["theta"] for n in nodes]).detach().cpu().double()
    xy, var = _principal_plane(th)
    pos = {n: xy[i] for i, n in enumerate(nodes)}
    for a, b in g.edges:
        ax.plot([pos[a][0], pos[b][0]], [pos[a][1], pos[b][1]], color="0.6", lw=0.8, zorder=1)
    costs = np.array([g.nodes[n]["cost"] for n in nodes])
    lo, hi = _colour_range(costs)
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=costs, cmap="viridis", vmin=lo, vmax=hi, s=22,
                    zorder=2)
    seeds = [n for n in critical_set.seed_nodes if n is not None]
    if seeds:
        sxy = np.array([pos[n] for n in seeds])
        ax.scatter(sxy[:, 0], sxy[:, 1], marker="*", s=160, facecolor="none",
                   edgecolor="crimson", zorder=3, label="start point(s)")
        ax.legend(loc="best", fontsize=8)
    if colorbar:
        cb = ax.figure.colorbar(sc, ax=ax)
        cb.set_label("cost C")
        cb.formatter.set_useOffset(False)
        cb.update_ticks()
    ax.set_xlabel(f"PC 1 ({100 * var[0]:.0f}% of variance)")
    ax.set_ylabel(f"PC 2 ({100 * var[1]:.0f}% of variance)")
    dims = ", ".join(str(i.dimension) for i in critical_set.component_info)
    ax.set_title(
        f"critical set: {len(nodes)} points, {critical_set.n_components} component(s), "
        f"dim {dims}\nC from {float(costs.min()):.8g} to {float(costs.max()):.8g}",
        fontsize=9,
    )
    ax.set_aspect("equal", adjustable="datalim")
    return ax


def _strata_layout(
    graph: nx.DiGraph,
) -> tuple[list[Any], list[Any], dict[Any, tuple[float, float]]]:
    """Strata by decreasing rank on a row (flows that lose rank go right), terminals below."""
    strata = sorted(
        (n for n, d in graph.nodes(data=True) if d.get("kind") == "stratum"),
        key=lambda n: -graph.nodes[n]["rank"],
    )
    terms = [n for n, d in graph.nodes(data=True) if d.get("kind") == "terminal"]
    order = {t: i for i, t in enumerate(TERMINALS)}
    terms.sort(key=lambda t: (order.get(t, len(TERMINALS)), t))
    pos: dict[Any, tuple[float, float]] = {n: (float(i), 1.0) for i, n in enumerate(strata)}
    width = max(len(strata) - 1, 1)
    for j, n in enumerate(terms):
        x = width * (j + 0.5) / max(len(terms), 1) if len(strata) > 1 else j - (len(terms) - 1) / 2
        pos[n] = (float(x), 0.0)
    return strata, terms, pos


def plot_strata_graph(graph: nx.DiGraph, ax: Any = None) -> Any:
    r"""Draw a strata graph: strata by decreasing rank on a row, terminal classes below.

    Stratum nodes are sized by the flow time spent in them and labelled
    ``S_r`` with the time; rank-change edges carry their counts, and each
    stratum is joined to the terminal classes of the flows that ended in it.

    Parameters
    ----------
    graph : networkx.DiGraph
        From :func:`~subriemann.analysis.strata.strata_graph` or
        :func:`~subriemann.analysis.strata.sample_strata`.
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib Axes
    """
    if not isinstance(graph, nx.DiGraph):
        raise TypeError(f"graph must be a networkx.DiGraph, got {type(graph).__name__}")
    ax = _new_axes((7, 4.5)) if ax is None else ax
    strata, terms, pos = _strata_layout(graph)
    times = np.array([graph.nodes[n]["time"] for n in strata]) if strata else np.zeros(0)
    tmax = float(times.max()) if times.size and times.max() > 0 else 1.0
    sizes = [300 + 1700 * float(t) / tmax for t in times]
    nx.draw_networkx_nodes(graph, pos, nodelist=strata, node_size=sizes, node_color="tab:blue",
                           alpha=0.8, ax=ax)
    term_colors = [TERMINAL_COLOURS.get(t, "tab:orange") for t in terms]
    nx.draw_networkx_nodes(graph, pos, nodelist=terms, node_shape="s", node_size=900,
                           node_color=term_colors, alpha=0.8, ax=ax)
    change = [(a, b) for a, b, d in graph.edges(data=True) if d.get("kind") == "rank_change"]
    ends = [(a, b) for a, b, d in graph.edges(data=True) if d.get("kind") == "end"]
    nx.draw_networkx_edges(graph, pos, edgelist=change, ax=ax, arrows=True, arrowsize=15,
                           connectionstyle="arc3,rad=0.3", node_size=900, edge_color="tab:purple")
    nx.draw_networkx_edges(graph, pos, edgelist=ends, ax=ax, arrows=True, arrowsize=12,
                           node_size=900, edge_color="0.5", style="dashed")
    labels = {n: f"{n}\nt={graph.nodes[n]['time']:.3g}" for n in strata}
    labels.update({n: f"{n}\n({graph.nodes[n]['count']})" for n in terms})
    nx.draw_networkx_labels(graph, pos, labels=labels, font_size=7, ax=ax)
    elab = {(a, b): str(graph.edges[a, b]["count"]) for a, b in change + ends}
    nx.draw_networkx_edge_labels(graph, pos, edge_labels=elab, font_size=7, ax=ax,
                                 label_pos=0.5)
    n_runs = graph.graph.get("n_runs", "?")
    ax.set_title(f"rank strata of {n_runs} flows (node size: flow time; edges: counts)",
                 fontsize=9)
    ax.set_axis_off()
    xs = [p[0] for p in pos.values()] or [0.0]
    ax.set_xlim(min(xs) - 0.8, max(xs) + 0.8)
    ax.set_ylim(-0.5, 1.5)
    return ax
