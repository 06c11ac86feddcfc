r"""Find a non-global critical submanifold of a small tanh network, measure it, walk it.

The network is ``x -> a . tanh(w x) + c`` (one input, two hidden tanh units
without bias, one output with bias: K = 5 parameters), trained on N = 8
symmetric inputs :math:`\pm x_j` with even targets :math:`y = x^2`.  Its
hidden part is odd in x and the targets are even, so the odd part can
only hurt: :math:`C = \tfrac12|a_1t_1 + a_2t_2|^2 + \tfrac12|c - y|^2` with
:math:`t_i = \tanh(w_iX)`.  The targets are not representable, and

* the adapted flow (:math:`\lambda = 1`, ``OutputPullbackMetric``) moves the
  outputs straight towards :math:`y` inside :math:`\operatorname{ran}D`:
  :math:`a(s) = e^{-s}a(0)` while :math:`w` stays put.  The two columns of
  :math:`D` for :math:`w` shrink with :math:`a`: the rank drops 5 -> 4 -> 3
  (rank-change events) and the flow stalls at :math:`C = \tfrac12|y-\bar y|^2 > 0`;
* it stalls where the odd part vanishes, :math:`a_1t_1 + a_2t_2 = 0`, with
  :math:`c = \bar y`.  Which piece of that set depends on the start: *dead
  units* :math:`\{a = 0\}` (:math:`w \in \mathbb{R}^2` free); from
  :math:`w_1 \approx \pm w_2`, *cancelling units*
  :math:`\{w_1 = \mp w_2,\ a_1 = \pm a_2\}`; from a small :math:`w_i`, a *flat
  unit* :math:`w_i = 0` (:math:`a_i` free) next to a dead one.  Each piece is a
  **non-global critical submanifold of dimension 2**, and the pieces are
  separated by the lines where the rank of :math:`D` drops.

The script runs the flows from a few initializations
(:func:`subriemann.analysis.sample_strata`), classifies where they stopped
(:func:`~subriemann.analysis.refine_critical_point`,
:func:`~subriemann.analysis.classify_equilibrium`), walks the critical set
from those points (:func:`~subriemann.analysis.track_critical_set`), prints
the dimension and the component table, and saves two plots.

Run ``python examples/critical_sets.py [--fast] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import subriemann as sr  # noqa: E402
from subriemann.analysis import (  # noqa: E402
    classify_equilibrium,
    refine_critical_point,
    sample_strata,
    track_critical_set,
)
from subriemann.analysis.strata import NON_GLOBAL, default_init  # noqa: E402
from subriemann.app.plots_analysis import plot_critical_set, plot_strata_graph  # noqa: E402

F64 = torch.float64


def make_space(rank_rtol: float) -> sr.ParameterSpace:
    """The odd tanh network on symmetric data with even targets, adapted metric (lambda = 1)."""
    xs = torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=F64)
    x = torch.cat([xs, -xs]).unsqueeze(1)
    net = torch.nn.Sequential(
        torch.nn.Linear(1, 2, bias=False), torch.nn.Tanh(), torch.nn.Linear(2, 1)
    )
    space = sr.ParameterSpace(net, x, x**2)
    return space.equip_with_metric(sr.metrics.OutputPullbackMetric, rank_rtol=rank_rtol)


def _which_set(th: torch.Tensor, eps: float = 1e-6) -> str:
    """Name the piece of {a1 t1 + a2 t2 = 0} that the points ``th`` ([n, 5]) lie on."""
    w, a = th[:, :2], th[:, 2:4]
    small = lambda v: float(v.abs().max()) < eps  # noqa: E731
    if small(w[:, 0] + w[:, 1]) and small(a[:, 0] - a[:, 1]) and not small(a):
        return "cancelling units: w1 = -w2, a1 = a2 (t1 = -t2)"
    if small(w[:, 0] - w[:, 1]) and small(a[:, 0] + a[:, 1]) and not small(a):
        return "cancelling units: w1 = w2, a1 = -a2 (t1 = t2)"
    units = []
    for k in range(2):
        if small(a[:, k]):
            units.append(f"unit {k + 1} dead (a{k + 1} = 0, w{k + 1} free)")
        elif small(w[:, k]):
            units.append(f"unit {k + 1} flat (w{k + 1} = 0, t{k + 1} = 0, a{k + 1} free)")
        else:
            return "another critical set"
    return ", ".join(units)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="a quick run (< 30 s)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the plots")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initializations")
    args = parser.parse_args(argv)
    out = args.out if args.out is not None else Path(tempfile.mkdtemp(prefix="critical_sets_"))
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    n_init = 3 if args.fast else 8
    n_points = 24 if args.fast else 120
    s_end = 8.0 if args.fast else 14.0
    flow = dict(method="rk4", step_size=0.25) if args.fast else dict(rtol=1e-8, atol=1e-10)
    space = make_space(rank_rtol=1e-4)
    print(f"{space}; metric {space.metric}")
    ybar = float(space.y.mean())
    c_star = 0.5 * float(((space.y - ybar) ** 2).sum())
    print(f"prediction: flows stall where the odd part a1 t1 + a2 t2 vanishes and c = {ybar:.4g}"
          f" (dimension 2), at C = 1/2 |y - mean y|^2 = {c_star:.6g} > 0")

    # -- 1. flows from a few initializations, and the strata they visit ------------------
    inits = [default_init(space, i, args.seed) for i in range(n_init)]
    if args.fast:  # no process start-up: one work item, the flows in lock-step in this process
        with ThreadPoolExecutor(max_workers=1) as pool:
            graph, trajs = sample_strata(space, inits, s_end, executor=pool, max_workers=1,
                                         **flow)
    else:  # the default: a local process pool (2 workers)
        graph, trajs = sample_strata(space, inits, s_end, **flow)
    print(f"\n{len(trajs)} flows to s = {s_end} ({graph.graph['n_failed']} failed)")
    print("rank strata visited (flow time spent in each):")
    for n, d in sorted(graph.nodes(data=True), key=lambda nd: -nd[1].get("rank", -1)):
        if d["kind"] == "stratum":
            print(f"  {n}: time {d['time']:.3g} over {d['n_flows']} flows "
                  f"({d['n_start']} started, {d['n_end']} ended here)")
    for a, b, d in graph.edges(data=True):
        what = "rank change" if d["kind"] == "rank_change" else "ended as"
        print(f"  {a} -> {b}: {what}, {d['count']} time(s)")

    # -- 2. where did they stop? ---------------------------------------------------
    print("\nwhere the flows stopped (refined onto grad C = 0, then classified):")
    print(f"{'run':>3} {'C':>10} {'rank':>4} {'kind':>20} {'dim':>3} {'gap':>8} {'index':>5} "
          f"{'moved':>8}")
    seeds = []
    for i, t in enumerate(trajs):
        theta = t.theta[-1]
        try:
            refined, _ = refine_critical_point(space, theta, max_move=0.5)
        except RuntimeError as err:
            print(f"{i:>3} refinement failed: {err}")
            continue
        rep = classify_equilibrium(space, refined)
        moved = float((refined - theta).norm())
        print(f"{i:>3} {rep.cost:>10.6g} {rep.rank:>4} {rep.kind:>20} {rep.dimension:>3} "
              f"{rep.dimension_gap:>8.2g} {rep.index:>5} {moved:>8.1e}")
        if not rep.is_global_minimum and rep.is_critical:
            seeds.append(refined)
    labels = [end.label for end in graph.graph["details"]]
    if not seeds or NON_GLOBAL not in labels:
        print("no non-global critical point found")
        return 1

    # -- 3. walk the critical set -------------------------------------------------
    cs = track_critical_set(space, torch.stack(seeds), n_points=n_points, step=0.15)
    print(f"\ncritical set through the end points: dimension {cs.dimension} "
          f"(Hessian kernel at the first end point, gap {cs.start_report.dimension_gap:.2g})")
    print(cs.summary())
    ends = {}
    for term in cs.terminations:
        ends[term["code"]] = ends.get(term["code"], 0) + 1
    if ends:
        print("branch ends: " + ", ".join(f"{k}: {v}" for k, v in sorted(ends.items())))
    print("which set each component lies on (theta = (w1, w2, a1, a2, c)):")
    for i, comp in enumerate(cs.components):
        th = torch.stack([cs.graph.nodes[n]["theta"] for n in comp])
        print(f"  component {i}: {_which_set(th)}; "
              f"max |c - mean y| = {float((th[:, 4] - ybar).abs().max()):.1e}")

    # -- 4. plots -------------------------------------------------------------------
    fig, ax = plt.subplots(figsize=(6, 5))
    plot_critical_set(cs, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "critical_set.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plot_strata_graph(graph, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "strata_graph.png", dpi=120)
    plt.close(fig)
    print(f"\nplots: {out / 'critical_set.png'}, {out / 'strata_graph.png'}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    ok = cs.dimension == 2 and all(c.cost_constant for c in cs.component_info)
    return 0 if ok and math.isclose(cs.component_info[0].cost_mean, c_star, rel_tol=1e-8) else 1


if __name__ == "__main__":  # the process pool starts workers that import this file
    sys.exit(main())
