r"""The sweep report: ``sweep_report.html``, the strata graph (GraphML), the rank-loss table.

``sweep_report.html`` is one self-contained page (figures as base64 PNG):

* the fraction of flows that lose rank (:math:`\min_s\operatorname{rank}D <
  \operatorname{rank}D(\theta_0)`) against :math:`K/QN`, one line per depth;
* the final cost against :math:`\lambda`;
* the distribution of the decay rates of :math:`C` (2 for the adapted flow at
  full rank, docs/theory.md §3);
* the codimension :math:`(QN - r)(K - r)` of the lowest stratum each flow reached;
* the rank-loss table (:func:`rank_loss_table`), the status counts and every row.

``strata.graphml`` is :func:`~subriemann.analysis.strata.strata_graph` of
every cell's trajectory, one subgraph per training problem (nodes prefixed by
``"<data> <model> K=.. QN=..: "``, since a stratum :math:`S_r` means something
else for another :math:`K, QN`), with list- and dict-valued attributes stored
as JSON strings (GraphML holds scalars only).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from subriemann.app.sweep.cells import CellResult
from subriemann.app.sweep.store import atomic_write_bytes

if TYPE_CHECKING:
    import networkx as nx

    from subriemann.app.sweep.store import SweepStore

__all__ = ["rank_loss_table", "sweep_strata_graph", "write_graphml", "write_sweep_report"]


def _ok(results: Sequence[CellResult]) -> list[CellResult]:
    return [r for r in results if not r.failed and r.min_rank is not None]


def rank_loss_table(results: Sequence[CellResult]) -> list[dict[str, Any]]:
    """How often flows lost rank, per depth and :math:`K/QN` (failed cells left out).

    Returns
    -------
    list of dict
        Sorted by ``depth``, ``k_over_qn``; keys ``depth``, ``k_over_qn``,
        ``num_parameters``, ``output_dim``, ``n`` (flows), ``lost`` (flows
        whose rank fell below its initial value), ``fraction``,
        ``max_codim`` (largest codimension reached).

    Examples
    --------
    >>> from subriemann.app.sweep.cells import CellResult
    >>> r = CellResult("cell-0000", 0, "teacher", 6, "mlp:2", 1, 2, "tanh", "mse", "pullback",
    ...                1.0, 0, "s_end_reached", num_parameters=13, output_dim=6,
    ...                k_over_qn=13 / 6, min_rank=5, lost_rank=True, codim_reached=8)
    >>> rank_loss_table([r])[0]["fraction"]
    1.0
    """
    groups: dict[tuple[Any, Any], list[CellResult]] = defaultdict(list)
    for r in _ok(results):
        groups[(r.depth, r.k_over_qn)].append(r)
    rows = []
    for (depth, kq), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] or -1, kv[0][1])):
        lost = sum(bool(r.lost_rank) for r in rs)
        rows.append({
            "depth": depth, "k_over_qn": kq, "num_parameters": rs[0].num_parameters,
            "output_dim": rs[0].output_dim, "n": len(rs), "lost": lost,
            "fraction": lost / len(rs), "max_codim": max(r.codim_reached or 0 for r in rs),
        })
    return rows


def sweep_strata_graph(store: SweepStore, results: Sequence[CellResult]) -> nx.DiGraph:
    """The strata graph of every finished cell, one subgraph per training problem.

    The end of each flow is labelled by the cell's ``endpoint`` (computed on
    the worker with the space, :func:`~subriemann.analysis.strata.classify_endpoint`).
    """
    import networkx as nx

    from subriemann.analysis.strata import strata_graph

    groups: dict[str, list[tuple[Any, str]]] = defaultdict(list)
    for r in _ok(results):
        traj = store.trajectory(r.cell)
        if traj is None:
            continue
        key = f"{r.data} {r.model} K={r.num_parameters} QN={r.output_dim}"
        groups[key].append((traj, r.endpoint or "not converged"))
    parts = []
    for key, items in sorted(groups.items()):
        g = strata_graph([t for t, _ in items], classify=[lab for _, lab in items])
        g = nx.relabel_nodes(g, {n: f"{key}: {n}" for n in g.nodes})
        for n in g.nodes:
            g.nodes[n]["problem"] = key
        parts.append(g)
    graph = nx.compose_all(parts) if parts else nx.DiGraph()
    graph.graph = {"n_runs": sum(len(v) for v in groups.values()), "problems": len(groups)}
    return graph


def write_graphml(graph: nx.DiGraph, path: str | Path) -> Path:
    """Write ``graph`` as GraphML (atomically), non-scalar attributes as JSON strings."""
    import networkx as nx

    def scalar(v: Any) -> Any:
        return v if isinstance(v, (str, int, float, bool)) else json.dumps(v, default=str)

    g = nx.DiGraph()
    g.graph.update({k: scalar(v) for k, v in graph.graph.items()})
    g.add_nodes_from((n, {k: scalar(v) for k, v in d.items()}) for n, d in graph.nodes(data=True))
    g.add_edges_from((a, b, {k: scalar(v) for k, v in d.items()})
                     for a, b, d in graph.edges(data=True))
    buf = io.BytesIO()
    nx.write_graphml(g, buf)
    return atomic_write_bytes(path, buf.getvalue())


# -- figures ------------------------------------------------------------------------------
def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figures(results: Sequence[CellResult]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ok = _ok(results)
    figs: dict[str, str] = {}
    fig, ax = plt.subplots(figsize=(5, 3.4))
    by_depth: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for row in rank_loss_table(results):
        by_depth[row["depth"]].append(row)
    for depth, rows in by_depth.items():
        ax.plot([r["k_over_qn"] for r in rows], [r["fraction"] for r in rows], "o-",
                label=f"depth {depth}" if depth is not None else "model file")
    ax.set(xscale="log", xlabel="K / QN", ylabel="fraction of flows that lose rank",
           ylim=(-0.05, 1.05))
    ticks = sorted({r["k_over_qn"] for rows in by_depth.values() for r in rows})
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xticks(ticks, [f"{v:.3g}" for v in ticks])
    if by_depth:
        ax.legend(fontsize=8)
    figs["rank_loss"] = _png(fig)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    pts = [(r.lam, r.final_cost) for r in ok if r.lam is not None and r.final_cost]
    if pts:
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=18, alpha=0.7)
        ax.set_yscale("log")
    ax.set(xlabel="λ", ylabel="final cost C(s_final)")
    figs["cost_vs_lambda"] = _png(fig)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    rates = [r.decay_rate for r in ok if r.decay_rate is not None]
    if rates:
        ax.hist(rates, bins=min(30, max(5, len(rates) // 2)))
    ax.set(xlabel="decay rate of C (slope of −log C)", ylabel="flows")
    figs["decay_rates"] = _png(fig)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    codims = Counter(r.codim_reached or 0 for r in ok)
    if codims:
        keys = sorted(codims)
        ax.bar([str(k) for k in keys], [codims[k] for k in keys])
    ax.set(xlabel="codimension (QN−r)(K−r) of the lowest stratum reached", ylabel="flows")
    figs["codimension"] = _png(fig)
    return figs


_CAPTIONS = {
    "rank_loss": "Fraction of flows whose rank of D fell below its initial value, against K/QN",
    "cost_vs_lambda": "Final cost against λ",
    "decay_rates": "Distribution of the decay rates of C",
    "codimension": "Codimension of the lowest rank stratum reached (0: full rank throughout)",
}


def _html_table(rows: Sequence[dict[str, Any]], limit: int = 500) -> str:
    if not rows:
        return "<p>(none)</p>"
    esc = html.escape

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.4g}"
        return "" if v is None else str(v)

    head = "".join(f"<th>{esc(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{esc(fmt(v))}</td>" for v in r.values()) + "</tr>"
                   for r in rows[:limit])
    more = f"<p>… {len(rows) - limit} more rows in results.csv</p>" if len(rows) > limit else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}"


_CSS = ("body{font-family:system-ui,sans-serif;margin:24px;max-width:1300px}"
        "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccd;"
        "padding:2px 6px;text-align:right}figure{display:inline-block;margin:8px}"
        "img{max-width:560px}.sub{color:#5a6475}")


def write_sweep_report(store: SweepStore, results: Sequence[CellResult]) -> dict[str, Path]:
    """Write ``strata.graphml`` and ``sweep_report.html`` into the sweep's folder.

    Returns
    -------
    dict
        ``graphml`` and ``report`` → path.
    """
    esc = html.escape
    graph = write_graphml(sweep_strata_graph(store, results), store.out / "strata.graphml")
    figs = "".join(
        f'<figure id="fig-{k}"><img alt="{esc(_CAPTIONS[k])}" src="data:image/png;base64,{v}">'
        f"<figcaption>{esc(_CAPTIONS[k])}</figcaption></figure>"
        for k, v in _figures(results).items()
    )
    status = Counter(r.status if not r.failed else "failed" for r in results)
    cfg = store.config
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>subriemann sweep report</title>
<style>{_CSS}</style></head><body>
<h1>subriemann sweep report</h1>
<p class="sub">{len(results)} of {len(cfg.cells())} cells · config {esc(cfg.source)} ·
fingerprint {cfg.fingerprint()}</p>
<h2>Does training lose rank?</h2>
{_html_table(rank_loss_table(results))}
<h2>Figures</h2><div>{figs}</div>
<h2>Status</h2>{_html_table([{"status": k, "cells": v} for k, v in sorted(status.items())])}
<h2>Cells</h2>{_html_table([asdict(r) for r in results])}
<h2>Config</h2><pre>{esc(json.dumps(cfg.identity(), indent=1))}</pre>
</body></html>
"""
    report = atomic_write_bytes(store.out / "sweep_report.html", page.encode("utf-8"))
    return {"graphml": graph, "report": report}
