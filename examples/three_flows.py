"""Three gradient flows from one initialization: lambda = 0, 0.5 and 1.

docs/theory.md §2–§3 / [CM24].  A tanh MLP [8, 64, 64, 1] (K = 4801) regresses N = 32
points of a smooth teacher (QN = 32, overparametrized).  From the same seeded
initialization it integrates the flows of

    g_lambda = (1 - lambda) 1 + lambda D^T D,   lambda in {0, 0.5, 1},

(lambda = 0: the Euclidean, standard gradient flow; lambda = 1: the adapted
flow, theta' = -D^+ (x - y)) and prints, for each: the status, the final cost,
the decay rate fitted to log C(s) (the adapted flow decays at the uniform rate
2, C(s) = e^{-2s} C(0)), the linear-interpolation residual
max_t |x(s(t)) - (t y + (1 - t) x(0))| / |x(0) - y| with t = 1 - e^{-s} (zero for
the adapted flow, Prop 2.4), the range of rank D along the flow, the rank events
and the number of vector-field evaluations.

It writes a figure (cost against s on a log scale with the reference
C(0) e^{-2s}; the numerical rank and sigma_min(D) against s) and the numbers
(JSON) to --out (default: a temporary folder).

The standard flow is stiff (its output velocity is -DD^T (x - y), and DD^T has
eigenvalues in the hundreds), so it takes many more steps than the others.

--fast: N = 16 points, s_end = 2 and rtol 1e-6 (the full run: N = 32, s_end = 10,
rtol 1e-8, atol 1e-10).

Run:  python examples/three_flows.py [--fast] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import subriemann as sr
from subriemann.analysis import decay_rate, linear_interpolation_residual
from subriemann.metrics import EuclideanMetric, InterpolatedMetric, OutputPullbackMetric

LAMBDAS = (0.0, 0.5, 1.0)


def build_problem(seed: int = 0, n: int = 32, widths=(8, 64, 64, 1)) -> sr.ParameterSpace:
    """A seeded tanh MLP and N points of a smooth teacher ``y = sin(x . a) + 0.5 tanh(x . b)``."""
    gen = torch.Generator().manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        lin = torch.nn.Linear(a, b, dtype=torch.float64)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=gen, dtype=torch.float64) / a**0.5)
            lin.bias.copy_(0.1 * torch.randn(b, generator=gen, dtype=torch.float64))
        layers.append(lin)
        if i < len(widths) - 2:
            layers.append(torch.nn.Tanh())
    model = torch.nn.Sequential(*layers)
    x = torch.randn(n, widths[0], generator=gen, dtype=torch.float64)
    a = torch.randn(widths[0], generator=gen, dtype=torch.float64) / widths[0] ** 0.5
    b = torch.randn(widths[0], generator=gen, dtype=torch.float64) / widths[0] ** 0.5
    y = torch.sin(x @ a) + 0.5 * torch.tanh(x @ b)
    return sr.ParameterSpace(model, x, y.unsqueeze(1))


def equip(space: sr.ParameterSpace, lam: float) -> None:
    if lam == 0.0:
        space.equip_with_metric(EuclideanMetric)
    elif lam == 1.0:
        space.equip_with_metric(OutputPullbackMetric)
    else:
        space.equip_with_metric(InterpolatedMetric, lam=lam)


def run(fast: bool) -> dict[str, Any]:
    s_end = 2.0 if fast else 10.0
    rtol, atol = (1e-6, 1e-8) if fast else (1e-8, 1e-10)
    n = 16 if fast else 32
    space = build_problem(n=n)
    theta0 = space.initial_point()
    rows: dict[str, Any] = {}
    trajs = {}
    for lam in LAMBDAS:
        equip(space, lam)
        t0 = time.perf_counter()
        traj = sr.gradient_flow(space, theta0, s_end, rtol=rtol, atol=atol)
        assert isinstance(traj, sr.Trajectory)
        wall = time.perf_counter() - t0
        fit = decay_rate(traj)
        rows[f"{lam:g}"] = {
            "lam": lam,
            "status": traj.status.code,
            "s_final": float(traj.s[-1]),
            "cost_0": float(traj.cost[0]),
            "cost_final": traj.final_cost,
            "decay_rate": fit.rate,
            "line_residual": float(linear_interpolation_residual(traj)),
            "rank_min": int(traj.rank.min()),
            "rank_max": int(traj.rank.max()),
            "sigma_min_min": float(traj.singular_values[:, -1].min()),
            "events": len(traj.events),
            "nfev": traj.counters["nfev"],
            "n_steps": traj.counters["n_steps"],
            "wall_s": wall,
        }
        trajs[lam] = traj
    return {
        "mode": "fast" if fast else "full",
        "K": space.dim,
        "QN": space.output_dim,
        "s_end": s_end,
        "rtol": rtol,
        "atol": atol,
        "flows": rows,
        "_trajs": trajs,
    }


def print_table(res: dict[str, Any]) -> None:
    print(f"[8, 64, 64, 1] tanh MLP, K = {res['K']}, N = QN = {res['QN']}; "
          f"s_end = {res['s_end']:g}, rtol = {res['rtol']:g}, atol = {res['atol']:g}")
    head = (f"{'lambda':>6} {'status':>14} {'C(0)':>9} {'C(end)':>9} {'rate':>8} "
            f"{'line res.':>9} {'rank':>7} {'events':>6} {'nfev':>6} {'wall s':>7}")
    print(head)
    print("-" * len(head))
    for r in res["flows"].values():
        rank = f"{r['rank_min']}" if r["rank_min"] == r["rank_max"] else (
            f"{r['rank_min']}-{r['rank_max']}")
        print(f"{r['lam']:>6g} {r['status']:>14} {r['cost_0']:>9.3e} {r['cost_final']:>9.3e} "
              f"{r['decay_rate']:>8.5f} {r['line_residual']:>9.2e} {rank:>7} {r['events']:>6} "
              f"{r['nfev']:>6} {r['wall_s']:>7.1f}")
    print("rate: fit of log C(s) = a - rate*s (lambda = 1: 2 exactly, [Che23]); line res.: "
          "max_t |x~(t) - (t y + (1-t) x(0))| / |x(0) - y| (lambda = 1: 0, Prop 2.4)")


def plot(res: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    trajs = res["_trajs"]
    colors = dict(zip(trajs, ("C0", "C1", "C2")))
    for lam, traj in trajs.items():
        ax1.semilogy(traj.s.numpy(), traj.cost.numpy(), color=colors[lam], label=f"λ = {lam:g}")
        ax2.semilogy(traj.s.numpy(), traj.singular_values[:, -1].numpy(), color=colors[lam],
                     label=f"σ_min, λ = {lam:g}")
    s = trajs[1.0].s
    ax1.semilogy(s.numpy(), (trajs[1.0].cost[0] * torch.exp(-2 * s)).numpy(), "k:",
                 label="C(0) e^{-2s}")
    ax1.set_xlabel("s")
    ax1.set_ylabel("C(s)")
    ax1.set_title("cost")
    ax1.legend()
    ax2.axhline(trajs[1.0].rank_tau, color="gray", ls="--", label="τ (rank threshold)")
    ax2.set_xlabel("s")
    ax2.set_ylabel("σ_min(D)")
    twin = ax2.twinx()
    for lam, traj in trajs.items():
        twin.step(traj.s.numpy(), traj.rank.numpy(), where="post", alpha=0.6, ls="-.",
                  color=colors[lam])
    twin.set_ylabel("numerical rank of D (dash-dot)")
    twin.set_ylim(0, res["QN"] + 1)
    ax2.set_title("rank of D along the flows")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path = out / "three_flows.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true",
                        help="N = 16, s_end = 2, rtol 1e-6 (< 30 s)")
    parser.add_argument("--out", default=None, help="output folder (default: a temp dir)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="three_flows_"))
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    res = run(args.fast)
    print_table(res)
    fig = plot(res, out)
    summary = {k: v for k, v in res.items() if not k.startswith("_")}
    (out / "three_flows.json").write_text(json.dumps(summary, indent=2))
    print(f"figure: {fig}\nnumbers: {out / 'three_flows.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
